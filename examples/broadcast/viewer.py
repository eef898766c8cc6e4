"""Terminal 2, 3, ...: watch the frames broadcast on "broadcast-example", read in place.

    python examples/broadcast/viewer.py [--start newest|oldest] [--slow SECONDS]

Subscribes at the newest frame (or the oldest still in the ring), then checks
every frame zero-copy: its CRC-32, and that frame numbers go up by exactly 1
(nothing lost while it keeps up).  --slow S spends S seconds on each frame
after releasing it: with the camera's --policy evict and S > --evict-after it
gets evicted, catches shmring.Lagged (how many frames it missed) and rejoins
at the newest frame.  Ends at the camera's end of stream; exit status 1 if a
frame was bad or lost without a Lagged.
"""
import argparse
import os
import time
import zlib

import shmring

NAME = "broadcast-example"


def check(value):
    """(frame number, crc ok, latency in s) of a frame, read in place."""
    return value["frame"], zlib.crc32(value["img"]) == value["crc"], time.time() - value["t"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", choices=["newest", "oldest"], default="newest", help="where to join the stream")
    ap.add_argument("--slow", type=float, default=0.0, help="seconds spent on each frame")
    ap.add_argument("--name", default=NAME, help="ring name")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the camera / a frame")
    args = ap.parse_args(argv)
    me = os.getpid()
    frames, bad, gaps, lagged, missed, latency = 0, 0, 0, 0, 0, 0.0
    first = prev = None
    rejoined = False
    with shmring.Ring.attach(args.name, wait=args.wait) as ring, ring.subscribe(args.start) as sub:
        print(f"viewer {me}: subscribed at the {args.start} frame", flush=True)
        while True:
            try:
                with sub.recv(timeout=args.wait) as msg:          # a read-only view of the ring
                    i, ok, lat = check(msg.value)
            except shmring.EndOfStream:
                break
            except shmring.Lagged as e:                           # evicted: the camera went on without us
                lagged += 1
                print(f"viewer {me}: Lagged after frame {prev}: evicted {e.missed} frames "
                      f"({e.missed_bytes / 1e6:.1f} MB) behind; rejoining at the newest", flush=True)
                sub.rejoin("newest")
                rejoined = True
                continue
            if rejoined:                                          # the gap we were told about
                skipped = i - prev - 1 if prev is not None else 0
                print(f"viewer {me}: rejoined at frame {i}, {skipped} frames skipped", flush=True)
                missed, rejoined = missed + skipped, False
            elif prev is not None and i != prev + 1:              # a gap nobody told us about: a bug
                gaps += 1
                print(f"viewer {me}: frame {i} after {prev}", flush=True)
            first = i if first is None else first
            frames, bad, prev, latency = frames + 1, bad + (not ok), i, latency + lat
            if frames % 100 == 1:
                print(f"viewer {me}: frame {i}, latency {lat * 1e3:.2f} ms", flush=True)
            time.sleep(args.slow)                 # "processing" happens after the release: see the README
    print(f"viewer {me}: {frames} frames ({first}..{prev}), {bad} bad, {gaps} gaps, "
          f"lagged {lagged} times ({missed} frames missed), "
          f"mean latency {latency / max(frames, 1) * 1e3:.2f} ms", flush=True)
    if bad or gaps:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
