"""Record throughput: the kernel copy (copy_file_range / sendfile from the
segment fd) vs the user-space write fallback, same run, same stream.

    python -m bench.record_cases [--seconds 1] [--dir /tmp]

A producer process streams into an spsc ring; this process records it with
shmring.record.record(method=...) into a file in --dir (page cache, fsync
"none" so the disk is not what is measured; then "end" as a second row set).
Prints a markdown table: payload size, method, messages/s, MB/s (median of 3).
"""
import argparse
import os
import statistics
import tempfile
import time

import multiprocess
import numpy as np

import shmring
from shmring.record import record


def _produce(ring, size, seconds):
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    end = time.monotonic() + seconds
    with ring.producer() as p:
        if size <= 64:
            b = data.tobytes()
            while time.monotonic() < end:
                for _ in range(1000):
                    p.send(b)
        else:
            while time.monotonic() < end:
                p.send(data)
    ring.close()


def one(size, method, seconds, where, fsync):
    ring = shmring.Ring.create(None, 1 << 26)
    ctx = multiprocess.get_context("fork")
    path = os.path.join(where, f"bench-{os.getpid()}.rec")
    p = ctx.Process(target=_produce, args=(ring, size, seconds))
    t0 = time.perf_counter()
    p.start()
    r = record(ring, path, method=method, fsync=fsync, overwrite=True)
    dt = time.perf_counter() - t0
    p.join()
    os.unlink(path)
    ring.close()
    return r["messages"] / dt, r["bytes"] / dt / 1e6


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"record into {a.dir} ({os.uname().release}, {os.cpu_count()} CPUs), {a.seconds:g} s rounds, "
          f"median of {a.repeats}\n")
    print("| payload | fsync | method | msg/s | MB/s |\n|---|---|---|---:|---:|")
    for size in (1 << 20, 64):
        for fsync in ("none", "end"):
            for method in ("kernel", "write", "auto"):       # interleaved: every method in every round
                rows = [one(size, method, a.seconds, a.dir, fsync) for _ in range(a.repeats)]
                m = statistics.median(r[0] for r in rows)
                mb = statistics.median(r[1] for r in rows)
                print(f"| {'1 MiB' if size > 64 else '64 B'} array | {fsync} | {method} | {m:,.0f} | {mb:,.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
