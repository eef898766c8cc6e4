"""Terminal 2, 3, ...: send numbered, checksummed arrays into the mpsc ring "fanin-example".

    python examples/fanin/worker.py --id 0 [--count 2000]

Each worker is one of the ring's producers (any number of them send at once,
no locks).  Message i of worker K is either a dict
{"worker": K, "seq": i, "crc": CRC-32 of data, "data": array} or, every
fourth message, a bare uint32 array [K, i, crc, *data] (the fastest path: one
copy in C).  The last message is {"worker": K, "done": count}; leaving the
``with`` block closes this worker's part of the stream.
"""
import argparse
import zlib

import numpy as np

import shmring

NAME = "fanin-example"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--id", type=int, required=True, help="this worker's number (0, 1, ...)")
    ap.add_argument("--count", type=int, default=2000, help="messages to send")
    ap.add_argument("--size", type=int, default=4096, help="largest array, in uint32 elements")
    ap.add_argument("--name", default=NAME, help="ring name")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the collector / for room")
    args = ap.parse_args(argv)
    rng = np.random.default_rng()
    k = args.id
    with shmring.Ring.attach(args.name, wait=args.wait) as ring, ring.producer() as prod:
        for i in range(args.count):
            data = rng.integers(0, 2**32, int(rng.integers(1, args.size + 1)), dtype=np.uint32)
            crc = zlib.crc32(data)
            if i % 4 == 3:
                prod.send(np.concatenate((np.array([k, i, crc], np.uint32), data)), timeout=args.wait)
            else:
                prod.send({"worker": k, "seq": i, "crc": crc, "data": data}, timeout=args.wait)
        prod.send({"worker": k, "done": args.count}, timeout=args.wait)
    print(f"worker {k}: sent {args.count} messages", flush=True)


if __name__ == "__main__":
    main()
