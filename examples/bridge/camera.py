"""Host A: a camera publishing frames into spsc ring NAME once a reader is on (then end of stream).

    python examples/bridge/camera.py --name camera --frames 100 --fps 30
"""
import argparse
import time

import numpy as np

import shmring


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="camera")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--fps", type=float, default=30)
    ap.add_argument("--capacity", type=int, default=1 << 24)
    a = ap.parse_args(argv)
    with shmring.Ring.create(a.name, a.capacity) as ring, ring.producer() as prod:
        print(f"camera: ring {a.name} ready", flush=True)
        deadline = time.monotonic() + 60           # start once a reader (the bridge) holds the ring,
        while not ring.stats()["consumer"]["alive"]:   # so a short run cannot end before it attaches
            if time.monotonic() > deadline:
                raise SystemExit("camera: nobody took the ring's consumer role within 60 s")
            time.sleep(0.05)
        for i in range(a.frames):
            frame = np.random.default_rng(i).integers(0, 255, (240, 320, 3), dtype=np.uint8)
            frame[0, 0, :] = [i & 255, (i >> 8) & 255, 0]
            prod.send({"seq": i, "t": time.time(), "frame": frame}, timeout=60)
            time.sleep(1 / a.fps if a.fps > 0 else 0)
        print(f"camera: sent {a.frames} frames", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
