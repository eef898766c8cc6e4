"""Terminal 1: create the ring "stream-example" and send arrays and messages into it.

    python examples/stream/producer.py [--count 200]

Waits (up to --wait seconds) for a consumer whenever the ring is full, closes the
stream at the end, and unlinks the ring on exit (a consumer still attached
keeps reading: the mapping outlives the name).
"""
import argparse
import time

import numpy as np

import shmring

NAME = "stream-example"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200, help="frames to send")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for room in the ring")
    args = ap.parse_args(argv)
    with shmring.Ring.create(NAME, 1 << 24, replace_dead=True) as ring, ring.producer() as prod:
        print(f"producer: ring {NAME!r} created ({ring.capacity >> 20} MiB); start the consumer")
        prod.send({"hello": "stream", "count": args.count}, timeout=args.wait)
        for i in range(args.count):
            with prod.reserve_array((240, 320), np.float32, timeout=args.wait) as frame:
                frame[:] = i                                # built in place: no copy
            prod.send({"seq": i, "t": time.time(), "stats": np.array([i, i * i], dtype=np.int64)},
                      timeout=args.wait)
        print(f"producer: sent {args.count} frames and {args.count + 1} messages; closing the stream")


if __name__ == "__main__":
    main()
