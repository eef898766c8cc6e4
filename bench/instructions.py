"""Where a receive's time goes, in CPU instructions (issue 15 item 2).

``python -m bench.instructions [--n N]`` runs small receive loops under
``valgrind --tool=callgrind`` and prints the instructions per iteration of
each.  Instruction counts do not depend on what else the machine runs, so
this is the study to use on a loaded VM, where timings of a 100 ns call
swing by 2x; they are not times (a cache miss is one instruction).

Each loop runs in a function (fast locals, as user code would), collected
only inside one ``functools.reduce`` call (``--toggle-collect``), so start-up
and imports are not counted.  The consumer-side loops read a ring filled
beforehand; the pair loops send and receive in one process.  Needs valgrind.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

LOOPS = {
    # name: (what it measures, body run n times; p / c / payload are bound)
    "empty": ("the loop alone (range's int objects)", "pass"),
    "recv_bytes": ("consumer: copying receive", "recv_bytes()"),
    "recv+release": ("consumer: a Message, released", "recv().release()"),
    "with recv()": ("consumer: a with block, value unread", "with recv() as m:\n            pass"),
    "with recv(): m.value": ("consumer: the zero-copy receive", "with recv() as m:\n            m.value"),
    "memoryview(b)": ("no ring: one memoryview made and dropped", "memoryview(payload)"),
    "send+recv_bytes": ("pair: send 64 B, copy it out", "send(payload)\n        recv_bytes()"),
    "send+with recv(): m.value": ("pair: send 64 B, zero-copy receive",
                                  "send(payload)\n        with recv() as m:\n            m.value"),
}

PROGRAM = """
import functools, os, sys
import shmring
mode, n = sys.argv[1], int(sys.argv[2])
payload = b"x" * 64
def loop(n, send, recv_bytes, recv):
    for _ in range(n):
        {body}
with shmring.Ring.create(f"instr-{{os.getpid()}}", 1 << 24) as ring, ring.producer() as p, ring.consumer() as c:
    if not mode.startswith("send"):
        for _ in range(n + 2000):
            p.send(payload)
    args = (p.send, c.recv_bytes, c.recv)
    loop(2000, *args)                                                  # warm: caches, freelists, specialisation
    functools.reduce(lambda a, b: loop(n, *args), [0, 0])              # the only part collected
"""


def count(name: str, body: str, n: int, tmp: str) -> float:
    src = os.path.join(tmp, "loop.py")
    with open(src, "w") as f:
        f.write(PROGRAM.format(body=body))
    out = os.path.join(tmp, "callgrind.out")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    r = subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=functools_reduce",
                        f"--callgrind-out-file={out}", sys.executable, src, name, str(n)],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode:
        raise SystemExit(f"{name}: valgrind failed:\n{r.stderr[-2000:]}")
    for line in r.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split()[-1]) / n
    raise SystemExit(f"{name}: no instruction count in valgrind's output")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="iterations per loop (default 20000)")
    args = ap.parse_args(argv)
    if not shutil.which("valgrind"):
        print("valgrind is not installed: this study counts instructions with callgrind", file=sys.stderr)
        return 1
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (what, body) in LOOPS.items():
            rows[name] = count(name, body, args.n, tmp)
            print(f"  {name}: {rows[name]:.0f}", file=sys.stderr)
    empty = rows["empty"]
    print(f"| loop ({args.n} iterations, Python {sys.version.split()[0]}) | what | instructions / iteration | less the empty loop |")
    print("|---|---|---:|---:|")
    for name, (what, _) in LOOPS.items():
        print(f"| `{name}` | {what} | {rows[name]:.0f} | {rows[name] - empty:.0f} |")
    rb, zc = rows["recv_bytes"] - empty, rows["with recv(): m.value"] - empty
    value = rows["with recv(): m.value"] - rows["with recv()"]
    print(f"\nconsumer side, in instructions: the zero-copy receive is {zc / rb:.2f}x a recv_bytes(). "
          f"Its `m.value` alone (the memoryview made and dropped) is {value:.0f}, {value / rb:.2f}x a whole "
          f"recv_bytes(): a receive that hands out a memoryview is at most {rb / (rb + value):.2f}x as fast "
          "as recv_bytes() even if everything else were free.")
    pair_c, pair_z = rows["send+recv_bytes"] - empty, rows["send+with recv(): m.value"] - empty
    print(f"pair (one process): send+recv_bytes {pair_c:.0f}, send + zero-copy receive {pair_z:.0f}: {pair_c / pair_z:.2f}x.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
