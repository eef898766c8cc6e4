"""Terminal 1: broadcast synthetic camera frames on the ring "broadcast-example".

    python examples/broadcast/camera.py [--fps 50] [--frames 1500] [--policy block|evict]

One producer, any number of viewers (subscribers) joining and leaving at any
time, each of which sees every frame sent after it joined.  A frame is
{"frame": i, "t": send time, "crc": CRC-32 of img, "img": 240x320 uint8}.
With --policy block the camera waits for the slowest viewer; with
--policy evict a viewer that holds the camera back without releasing a frame
for --evict-after seconds is evicted (it gets shmring.Lagged and rejoins).
Closes the stream at the end (viewers get EndOfStream) and unlinks the ring.
"""
import argparse
import time
import zlib

import numpy as np

import shmring

NAME = "broadcast-example"


def viewers(ring) -> int:
    """Subscribers attached now (an evicted one stays attached until it leaves)."""
    return sum(c["alive"] for c in ring.stats()["consumers"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1500, help="frames to send")
    ap.add_argument("--fps", type=float, default=50.0, help="frames per second")
    ap.add_argument("--policy", choices=["block", "evict"], default="block", help="what a slow viewer does")
    ap.add_argument("--evict-after", type=float, default=0.5, help="evict: seconds a viewer may stall the camera")
    ap.add_argument("--viewers", type=int, default=0, help="wait for this many viewers before the first frame")
    ap.add_argument("--name", default=NAME, help="ring name")
    ap.add_argument("--capacity", type=int, default=1 << 21, help="ring size in bytes (a power of two)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for viewers / for room")
    args = ap.parse_args(argv)
    base = (np.add.outer(np.arange(240), np.arange(320)) % 256).astype(np.uint8)   # a diagonal gradient
    with shmring.Ring.create(args.name, args.capacity, kind="broadcast", policy=args.policy,
                             evict_after=args.evict_after, replace_dead=True) as ring, ring.producer() as prod:
        print(f"camera: ring {args.name!r} created ({ring.capacity >> 20} MiB, policy {args.policy}); "
              "start viewers", flush=True)
        deadline = time.monotonic() + args.wait
        while viewers(ring) < args.viewers and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = t_next = time.monotonic()
        for i in range(args.frames):
            img = base + np.uint8(i % 256)                                # the gradient moves by one a frame
            prod.send({"frame": i, "t": time.time(), "crc": zlib.crc32(img), "img": img}, timeout=args.wait)
            if i % max(1, int(args.fps)) == 0:                            # about once a second
                print(f"camera: frame {i}, {viewers(ring)} viewers, {ring.stats()['evicted']} evicted", flush=True)
            t_next += 1 / args.fps
            time.sleep(max(0.0, t_next - time.monotonic()))
        st = ring.stats()
        elapsed = time.monotonic() - t0
        print(f"camera: sent {args.frames} frames in {elapsed:.1f} s ({args.frames / elapsed:.0f} fps); "
              f"{len(st['consumers'])} viewers joined, {st['evicted']} evictions", flush=True)


if __name__ == "__main__":
    main()
