"""Terminal 1: create the mpsc ring "fanin-example" and collect what --workers workers send.

    python examples/fanin/collector.py [--workers 4]            # then start the workers
    python examples/fanin/collector.py --workers 4 --spawn      # or start them from here

Many producers, one consumer: each worker's messages arrive in the order it
sent them, interleaved with the others'.  The collector checks every message:
per worker, sequence numbers 0, 1, 2, ... with none lost, duplicated or out
of order, and every array's CRC-32 equal to the one its worker computed (a
torn message would not match).  The stream ends (EndOfStream) once
--workers workers have closed; shmring.PeerGone instead if one died.  Exit
status 1 if any check fails.
"""
import argparse
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

import shmring

NAME = "fanin-example"


def check(value):
    """(worker, seq, crc ok, done count or None) of one received value (read in place)."""
    if isinstance(value, np.ndarray):                     # bare array: [worker, seq, crc, *data]
        k, seq, crc = (int(x) for x in value[:3])
        return k, seq, zlib.crc32(value[3:]) == crc, None
    if "done" in value:
        return value["worker"], None, True, value["done"]
    return value["worker"], value["seq"], zlib.crc32(value["data"]) == value["crc"], None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4, help="workers that end the stream")
    ap.add_argument("--spawn", action="store_true", help="start the workers as subprocesses")
    ap.add_argument("--count", type=int, default=2000, help="with --spawn: messages per worker")
    ap.add_argument("--name", default=NAME, help="ring name")
    ap.add_argument("--capacity", type=int, default=1 << 22, help="ring size in bytes (a power of two)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a message")
    args = ap.parse_args(argv)
    last, got, done, bad, nbytes = {}, {}, {}, [], 0
    with shmring.Ring.create(args.name, args.capacity, kind="mpsc", producers=args.workers,
                             replace_dead=True) as ring, \
            ring.consumer() as cons:
        print(f"collector: ring {args.name!r} created ({ring.capacity >> 20} MiB), "
              f"waiting for {args.workers} workers", flush=True)
        kids = []
        if args.spawn:
            worker = Path(__file__).with_name("worker.py")
            kids = [subprocess.Popen([sys.executable, str(worker), "--id", str(k), "--count", str(args.count),
                                      "--name", args.name]) for k in range(args.workers)]
        t0 = None
        try:
            while True:
                with cons.recv(timeout=args.wait) as msg:
                    t0 = t0 or time.perf_counter()
                    k, seq, ok, count = check(msg.value)
                    nbytes += msg.nbytes
                if count is not None:                     # the worker's last message
                    done[k] = count
                    if count != last.get(k, -1) + 1:
                        bad.append(f"worker {k} said it sent {count}, got {last.get(k, -1) + 1}")
                    continue
                if not ok:
                    bad.append(f"worker {k} message {seq}: checksum mismatch")
                if seq != last.get(k, -1) + 1:
                    bad.append(f"worker {k}: message {seq} after {last.get(k, -1)}")
                last[k], got[k] = seq, got.get(k, 0) + 1
        except shmring.EndOfStream:
            pass
        except shmring.PeerGone as e:                     # a worker died or raised: the rest was drained
            bad.append(f"stream ended early: {e}")
        except shmring.Timeout:
            bad.append(f"nothing arrived for {args.wait} s: fewer than {args.workers} workers came?")
        elapsed = time.perf_counter() - (t0 or time.perf_counter())
        for k, kid in enumerate(kids):
            if kid.wait():
                bad.append(f"worker {k} exited with status {kid.returncode}")
    if len(done) != args.workers:
        bad.append(f"{len(done)} of {args.workers} workers finished")
    total = sum(got.values())
    counts = ", ".join(f"{k}: {got[k]}" for k in sorted(got))
    print(f"collector: {total} messages from {len(got)} workers ({counts})")
    print(f"collector: {nbytes / 1e6:.1f} MB in {elapsed:.2f} s, {total / max(elapsed, 1e-9):,.0f} messages/s")
    for line in bad[:10]:
        print(f"collector: BAD {line}")
    print(f"collector: {'OK' if not bad else 'FAILED'}, {len(bad)} problems")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
