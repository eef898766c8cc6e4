"""Host B: view the frames that `shmring bridge in` commits into ring NAME.

    python examples/bridge/viewer.py --name camera-b
"""
import argparse
import time

import numpy as np

import shmring


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="camera-b")
    ap.add_argument("--wait", type=float, default=30, help="seconds to wait for the ring to appear")
    a = ap.parse_args(argv)
    deadline = time.monotonic() + a.wait
    while True:
        try:
            ring = shmring.Ring.attach(a.name)
            break
        except shmring.SegmentNotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    n = bad = 0
    with ring, ring.consumer() as cons:
        for msg in cons:
            with msg:
                v = msg.value
                exp = np.random.default_rng(v["seq"]).integers(0, 255, (240, 320, 3), dtype=np.uint8)
                exp[0, 0, :] = [v["seq"] & 255, (v["seq"] >> 8) & 255, 0]
                bad += not np.array_equal(v["frame"], exp)
                n += 1
                if n % 50 == 0:
                    print(f"viewer: frame {v['seq']}, {1000 * (time.time() - v['t']):.1f} ms old", flush=True)
    print(f"viewer: end of stream after {n} frames, {bad} bad", flush=True)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
