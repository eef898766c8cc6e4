"""An image pipeline over shared-memory rings: frames -> 4 blur workers -> a checking sink.

    python examples/pipeline/image_pipeline.py [--frames 5000] [--workers 4] [--unordered] [--no-progress]

The stages live in shmring/demo.py (so that `shmring demo pipeline` runs the
same code; README.md here shows it): the source yields float32 240x320 ramps
f[y, x] = i + 0.5*x + 0.25*y, each worker blurs a frame (3x3 box, valid
region) and keeps every other pixel, and the sink checks every small frame
against the analytic answer and the frame numbers' order.  Exits 1 if a frame
is bad or missing.
"""
import argparse
import sys

from shmring.cli import _size                 # "16MiB", "4M", 65536
from shmring.demo import run_pipeline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=5000, help="frames the source sends (default 5000)")
    ap.add_argument("--workers", type=int, default=4, help="blur_and_halve processes (default 4)")
    ap.add_argument("--unordered", action="store_true",
                    help="deliver results as workers finish them (the sink then only checks each arrives once)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="live tqdm bars per stage (default: on)")
    ap.add_argument("--capacity", type=_size, default=1 << 24,
                    help="bytes per ring, a power of two (default 16MiB)")
    args = ap.parse_args(argv)
    return run_pipeline(frames=args.frames, workers=args.workers, ordered=not args.unordered,
                        progress=args.progress, capacity=args.capacity)


if __name__ == "__main__":
    sys.exit(main())
