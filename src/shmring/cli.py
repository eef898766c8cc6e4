"""The ``shmring`` command (also ``python -m shmring``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import layout as L
from ._proc import alive
from .errors import ShmringError
from .segment import SHM_DIR, list_segments


def _size(text: str) -> int:
    t = text.strip().lower()
    for suffix, mul in (("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30), ("k", 1 << 10),
                        ("m", 1 << 20), ("g", 1 << 30), ("", 1)):
        if t.endswith(suffix):
            num = t[: len(t) - len(suffix)] if suffix else t
            try:
                return int(float(num) * mul)
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64k, 1MiB)")


def _describe(name: str) -> dict:
    from .ring import Ring
    try:
        ring = Ring.attach(name)
    except ShmringError as e:
        return {"name": name, "error": str(e)}
    try:
        st = ring.stats()
    finally:
        ring.close()
    st["age_s"] = round(time.time() - st["created_ns"] / 1e9, 1)
    return st


def cmd_ls(args) -> int:
    rows = [_describe(n) for n in list_segments()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no shmring segments in {SHM_DIR}")
        return 0
    print(f"{'NAME':24} {'KIND':6} {'CAPACITY':>10} {'FILL':>6} {'PRODUCER':>10} {'CONSUMER':>10} {'AGE':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:24} {r['error']}")
            continue

        def role(x):
            return "-" if not x["pid"] else f"{x['pid']}{'' if x['alive'] else '(dead)'}"
        print(f"{r['name']:24} {r['kind']:6} {r['capacity']:>10,} {r['fill'] * 100:5.1f}% "
              f"{role(r['producer']):>10} {role(r['consumer']):>10} {r['age_s']:>7.0f}s")
    return 0


def cmd_stat(args) -> int:
    st = _describe(args.name)
    if "error" in st:
        print(st["error"], file=sys.stderr)
        return 1
    print(json.dumps(st, indent=2) if args.json else "\n".join(f"{k:12} {v}" for k, v in st.items()))
    return 0


def cmd_rm(args) -> int:
    from .segment import unlink
    rc = 0
    for name in args.names:
        try:
            unlink(name)
            print(f"removed {name}")
        except ShmringError as e:
            print(e, file=sys.stderr)
            rc = 1
    return rc


def cmd_demo(args) -> int:
    from .demo import run
    return run(seconds=args.seconds, frame_bytes=args.size, capacity=args.capacity)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="shmring", description="zero-copy IPC rings over shared memory")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="stream arrays between a producer and a consumer process")
    d.add_argument("--seconds", type=float, default=3.0, help="how long the producer sends (default 3)")
    d.add_argument("--size", type=_size, default=1 << 20, help="frame size (default 1MiB)")
    d.add_argument("--capacity", type=_size, default=1 << 26, help="ring capacity, a power of two (default 64MiB)")
    d.set_defaults(func=cmd_demo)
    s = sub.add_parser("ls", help="list shmring segments")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ls)
    s = sub.add_parser("stat", help="show one ring's state")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stat)
    s = sub.add_parser("rm", help="remove segments by name")
    s.add_argument("names", nargs="+")
    s.set_defaults(func=cmd_rm)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ShmringError, ValueError) as e:
        print(f"shmring {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
