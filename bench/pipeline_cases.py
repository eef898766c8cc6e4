"""``python -m bench.pipeline_cases``: the image pipeline of ``shmring demo pipeline``,
written three ways and timed in the same run.

The workload (``shmring.demo``): a source makes 240x320 float32 frames, four
workers blur (3x3 box) and halve each one, a sink checks every result against
the analytic answer (``FrameChecker``: values, duplicates, missing frames).

* **shmring.Pipeline**: ``source -> map(blur_and_halve, workers=4) -> sink``, every
  hop a ring; ordered (source order kept) and unordered.
* **multiprocessing.Pool.imap**: the parent generates the frames, ``Pool(4).imap``
  runs the blur (frames and results pickled through the pool's pipes, order kept),
  the parent checks them: what most Python code does.
* **multiprocessing.Queue stages**: one source process, four worker processes and
  one sink process, joined by two ``multiprocessing.Queue``s (unordered; ``None``
  markers end the stream): the same process layout as the shmring pipeline.

A round runs the whole pipeline (process start-up included, as a user sees it)
and is timed in the parent from start to the sink's verified result; the table
shows the median of the rounds, frames/s, and each peer's ratio to shmring.  A
round whose check fails raises: a broken pipeline cannot look fast.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import multiprocess

from shmring import Pipeline
from shmring.demo import FRAME, FrameChecker, blur_and_halve, ramp_frames

from .harness import write_study

CTX = multiprocess.get_context("fork")
WORKERS = 4


def _checked(result: dict, frames: int) -> None:
    if result["frames"] != frames or result["bad"] or result["missing"] or result["duplicates"]:
        raise RuntimeError(f"verification failed: {result}")


def shmring_pipeline(frames: int, ordered: bool) -> float:
    t0 = time.perf_counter()
    with Pipeline("bench-pipeline", capacity=1 << 24) as p:
        small = p.map(blur_and_halve, p.source(lambda: ramp_frames(frames)), workers=WORKERS, ordered=ordered)
        p.sink(FrameChecker(frames, ordered), small)
        summary = p.run(timeout=600)
    t = time.perf_counter() - t0
    _checked(summary["result"], frames)
    return t


def pool_imap(frames: int) -> float:
    t0 = time.perf_counter()
    check = FrameChecker(frames, ordered=True)
    with CTX.Pool(WORKERS) as pool:
        for item in pool.imap(blur_and_halve, ramp_frames(frames), chunksize=4):
            check(item)
    t = time.perf_counter() - t0
    _checked(check.finish(), frames)
    return t


def _q_source(frames, out):
    for item in ramp_frames(frames):
        out.put(item)
    for _ in range(WORKERS):
        out.put(None)


def _q_worker(inq, outq):
    while (item := inq.get()) is not None:
        outq.put(blur_and_halve(item))
    outq.put(None)


def _q_sink(frames, inq, result):
    check, ended = FrameChecker(frames, ordered=False), 0
    while ended < WORKERS:
        item = inq.get()
        if item is None:
            ended += 1
        else:
            check(item)
    result.put(check.finish())


def queue_stages(frames: int) -> float:
    t0 = time.perf_counter()
    a, b, result = CTX.Queue(64), CTX.Queue(64), CTX.Queue()
    procs = [CTX.Process(target=_q_source, args=(frames, a))]
    procs += [CTX.Process(target=_q_worker, args=(a, b)) for _ in range(WORKERS)]
    procs += [CTX.Process(target=_q_sink, args=(frames, b, result))]
    for p in procs:
        p.start()
    res = result.get(timeout=600)
    for p in procs:
        p.join(60)
    t = time.perf_counter() - t0
    _checked(res, frames)
    return t


CASES = [("shmring.Pipeline, ordered", lambda n: shmring_pipeline(n, True)),
         ("shmring.Pipeline, unordered", lambda n: shmring_pipeline(n, False)),
         ("multiprocessing.Pool(4).imap", pool_imap),
         ("multiprocessing.Queue stages", queue_stages)]


def study(quick: bool = False, log=print, frames: int | None = None) -> dict:
    frames = frames or (1000 if quick else 4000)
    rounds = 3 if quick else 5
    rows = []
    for name, fn in CASES:
        fn(min(frames, 200))                                   # warm-up: imports, page cache
        times = []
        for r in range(rounds):
            times.append(fn(frames))
            log(f"pipeline: {name}: round {r + 1}/{rounds}: {frames / times[-1]:,.0f} frames/s")
        med = statistics.median(times)
        rows.append({"case": name, "frames": frames, "seconds": times, "median_s": med,
                     "frames_per_s": frames / med, "MBps_in": frames * 4 * FRAME[0] * FRAME[1] / med / 1e6,
                     "unstable": max(times) / min(times) > 1.5})
    base = rows[0]["frames_per_s"]
    for r in rows:
        r["vs_shmring"] = r["frames_per_s"] / base
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
            "workers": WORKERS, "rows": rows}


def markdown(res) -> str:
    out = [f"### Image pipeline, {res['workers']} workers — {res['machine']}", "",
           f"{res['rows'][0]['frames']:,} frames of {FRAME[0]}x{FRAME[1]} float32 per round, start-up included, "
           f"every frame checked; median of {len(res['rows'][0]['seconds'])} rounds (`*`: rounds differ by > 1.5x).",
           "", "| pipeline | frames/s | input MB/s | vs shmring ordered |", "|---|---:|---:|---:|"]
    for r in res["rows"]:
        out.append(f"| {r['case']}{' *' if r['unstable'] else ''} | {r['frames_per_s']:,.0f} | "
                   f"{r['MBps_in']:,.0f} | {r['vs_shmring']:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline_cases", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1000 frames, 3 rounds")
    ap.add_argument("--frames", type=int, help="frames per round")
    ap.add_argument("--out", default="bench/out", help="writes pipeline.md and pipeline.json here")
    args = ap.parse_args(argv)
    res = study(args.quick, log=lambda m: print(m, file=sys.stderr, flush=True), frames=args.frames)
    write_study(args.out, "pipeline", res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
