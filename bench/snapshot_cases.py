"""``python -m bench.snapshot_cases``: shmring.SharedState (copy-on-write shared state), measured.

Three experiments, in one run on one machine (also run by ``python -m bench --snapshots``):

1. **pin + unpin**: ``with state.read() as snap: pass`` from Python, in one process
   (the pin and the unpin are one C call each); also with ``snap.value`` (decoding
   the array view) inside the block.  ns per read.
2. **publish** of a float32 array of 1 KiB, 1 MiB and 100 MiB (``state.publish(arr)``:
   pick a free slot, one copy, one atomic store; 3 slots), next to ``np.copyto`` of
   the same size into one preallocated /dev/shm array (stays in cache when it fits)
   and rotating over 3 of them (the same memory footprint as publish's slots): the
   one memcpy publish should cost.
   GB/s (1e9 B/s) and us per call.
3. **readers while a writer publishes**: 1, 2 and 4 reader processes read the
   latest 1 MiB float32 array as fast as they can, while one writer process
   publishes new versions flat out, for ``--seconds``.  Each read checks in place
   either the version's first and last element, or its whole value (min == max ==
   the version: a reader that scans the data it reads, and, for the Lock peer,
   holds the lock that long).  Reported: total reads/s of all readers, and
   the writer's versions/s meanwhile.  Peers, same workload, same run:
   - ``multiprocessing.Manager().dict()``: the writer assigns ``d["w"] = arr``, a
     reader gets ``d["w"]`` (pickled through the manager process: copies);
   - a ``multiprocessing.shared_memory`` block guarded by a ``multiprocessing.Lock``:
     the writer copies in under the lock, a reader checks in place under the lock
     (zero-copy, but readers and the writer exclude each other).

Every reader verifies what it reads; a wrong value fails the run.  On a 2-core
machine, 4 readers + 1 writer oversubscribe the CPUs: numbers there show
contention, not scaling.

    python -m bench.snapshot_cases            # ~1 min
    python -m bench.snapshot_cases --quick    # shorter rounds
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import uuid
from multiprocessing import shared_memory

import numpy as np

import shmring

from .harness import write_study

CTX = mp.get_context("fork")
KiB, MiB = 1 << 10, 1 << 20
PUBLISH_SIZES = (1 * KiB, 1 * MiB, 100 * MiB)
READ_BYTES = 1 * MiB
READER_COUNTS = (1, 2, 4)


def _name(tag):
    return f"bench-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _best_of(fn, n, repeats):
    """Median seconds per call of fn over `repeats` timed loops of n calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


# --------------------------------------------------------------------------- 1. pin + unpin

def pin_unpin(repeats):
    with shmring.SharedState.create(_name("pin"), 4096) as state:
        state.publish(np.arange(16, dtype=np.float32))
        read = state.read
        n = 200_000

        def loop_pin():
            for _ in range(n):
                with read():
                    pass

        def loop_value():
            for _ in range(n // 4):
                with read() as s:
                    s.value

        loop_pin()
        pin = statistics.median(_time(loop_pin) / n for _ in range(repeats))
        val = statistics.median(_time(loop_value) / (n // 4) for _ in range(repeats))
    return [{"experiment": "pin+unpin", "what": "with state.read(): pass", "ns": pin * 1e9},
            {"experiment": "pin+unpin", "what": "with state.read() as s: s.value (1-D array view)", "ns": val * 1e9}]


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- 2. publish

def publish_cost(repeats):
    rows = []
    for nb in PUBLISH_SIZES:
        arr = np.random.default_rng(0).random(nb // 4, dtype=np.float32)
        n = max(3, min(20000, (256 * MiB) // nb))
        with shmring.SharedState.create(_name("pub"), nb + 4096, slots=3) as state:
            state.publish(arr)
            t_pub = _best_of(lambda: state.publish(arr), n, repeats)
            with state.read() as s:
                assert np.array_equal(s.value, arr)
        shm = shared_memory.SharedMemory(create=True, size=nb * 3)
        try:
            dsts = [np.ndarray(arr.shape, arr.dtype, buffer=shm.buf, offset=i * nb) for i in range(3)]
            for d in dsts:
                np.copyto(d, arr)
            t_cp = _best_of(lambda: np.copyto(dsts[0], arr), n, repeats)
            turn = iter(range(1 << 62))
            t_rot = _best_of(lambda: np.copyto(dsts[next(turn) % 3], arr), n, repeats)
            del dsts, d
        finally:
            shm.close()
            shm.unlink()
        label = f"{nb // MiB} MiB" if nb >= MiB else f"{nb // KiB} KiB"
        rows.append({"experiment": "publish", "size": label, "bytes": nb,
                     "publish_us": t_pub * 1e6, "publish_GBps": nb / t_pub / 1e9,
                     "copyto_us": t_cp * 1e6, "copyto_GBps": nb / t_cp / 1e9, "ratio": t_cp / t_pub,
                     "copyto3_us": t_rot * 1e6, "copyto3_GBps": nb / t_rot / 1e9, "ratio3": t_rot / t_pub})
    return rows


# --------------------------------------------------------------------------- 3. readers + writer

def _ok(a, v, full):
    """A consistent version: its first and last element (or, with full, every element) equal v."""
    if full:
        return a.min() == a.max() == v
    return a[0] == a[-1] == v


def _shm_writer(name, full, go, stop, q):
    state = shmring.SharedState.attach(name)
    arr = np.zeros(READ_BYTES // 4, np.float32)
    go.wait()
    n = 0
    while not stop.is_set():
        v = state.version + 1
        if full:
            arr.fill(v)
        else:
            arr[0] = arr[-1] = v
        state.publish(arr)
        n += 1
    q.put(("writer", n))
    state.close()


def _shm_reader(name, full, go, stop, q):
    state = shmring.SharedState.attach(name)
    read = state.read
    go.wait()
    n = bad = 0
    while not stop.is_set():
        with read() as s:
            a = s.value
            bad += not _ok(a, s.version, full)
            del a
        n += 1
    q.put(("reader", n, bad))
    state.close()


def _mgr_writer(d, full, go, stop, q):
    arr = np.zeros(READ_BYTES // 4, np.float32)
    go.wait()
    n = 0
    while not stop.is_set():
        n += 1
        if full:
            arr.fill(n)
        else:
            arr[0] = arr[-1] = n
        d["w"] = arr
    q.put(("writer", n))


def _mgr_reader(d, full, go, stop, q):
    go.wait()
    n = bad = 0
    while not stop.is_set():
        a = d["w"]
        bad += not _ok(a, a[0], full)
        n += 1
    q.put(("reader", n, bad))


def _lock_writer(shm_name, lock, full, go, stop, q):
    shm = shared_memory.SharedMemory(shm_name)
    a = np.ndarray(READ_BYTES // 4, np.float32, buffer=shm.buf)
    src = np.zeros_like(a)
    go.wait()
    n = 0
    while not stop.is_set():
        n += 1
        if full:
            src.fill(n)
        else:
            src[0] = src[-1] = n
        with lock:
            np.copyto(a, src)
    q.put(("writer", n))
    del a
    shm.close()


def _lock_reader(shm_name, lock, full, go, stop, q):
    shm = shared_memory.SharedMemory(shm_name)
    a = np.ndarray(READ_BYTES // 4, np.float32, buffer=shm.buf)
    go.wait()
    n = bad = 0
    while not stop.is_set():
        with lock:
            bad += not _ok(a, a[0], full)
        n += 1
    q.put(("reader", n, bad))
    del a
    shm.close()


def _run(writer, reader, args, readers, seconds):
    go, stop, q = CTX.Event(), CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=writer, args=(*args, go, stop, q), daemon=True)]
    procs += [CTX.Process(target=reader, args=(*args, go, stop, q), daemon=True) for _ in range(readers)]
    for p in procs:
        p.start()
    time.sleep(0.3)
    go.set()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    results = [q.get(timeout=60) for _ in procs]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
            raise RuntimeError(f"{writer.__name__}: a child hung")
    w = sum(r[1] for r in results if r[0] == "writer")
    rs = [r for r in results if r[0] == "reader"]
    bad = sum(r[2] for r in rs)
    if bad:
        raise RuntimeError(f"{reader.__name__}: {bad} inconsistent reads")
    return {"reads_per_s": sum(r[1] for r in rs) / elapsed, "writes_per_s": w / elapsed}


def readers_while_writing(seconds):
    rows = []
    for full in (False, True):
        what = "whole value (min == max == version)" if full else "first and last element"
        for k in READER_COUNTS:
            name = _name("rd")
            with shmring.SharedState.create(name, READ_BYTES + 4096, slots=4) as state:
                with shmring.SharedState.attach(name) as first:
                    first.publish(np.ones(READ_BYTES // 4, np.float32))      # version 1
                r = _run(_shm_writer, _shm_reader, (name, full), k, seconds)
                st = state.stats()
            rows.append({"experiment": "readers", "check": what, "transport": "shmring SharedState (read in place, pinned)",
                         "readers": k, **r, "writer_waits": st["writer_waits"]})

            with CTX.Manager() as mgr:
                d = mgr.dict()
                d["w"] = np.zeros(READ_BYTES // 4, np.float32)
                r = _run(_mgr_writer, _mgr_reader, (d, full), k, seconds)
            rows.append({"experiment": "readers", "check": what, "transport": "multiprocessing.Manager dict (pickled copies)",
                         "readers": k, **r})

            shm = shared_memory.SharedMemory(create=True, size=READ_BYTES)
            try:
                r = _run(_lock_writer, _lock_reader, (shm.name, CTX.Lock(), full), k, seconds)
            finally:
                shm.close()
                shm.unlink()
            rows.append({"experiment": "readers", "check": what, "transport": "shared_memory + multiprocessing.Lock (in place)",
                         "readers": k, **r})
    return rows


# --------------------------------------------------------------------------- report

def study(quick=False, log=print, seconds=None):
    repeats = 3 if quick else 5
    seconds = seconds or (0.7 if quick else 1.5)
    log("snapshots: pin + unpin")
    rows = pin_unpin(repeats)
    log("snapshots: publish 1 KiB / 1 MiB / 100 MiB")
    rows += publish_cost(repeats)
    log(f"snapshots: readers while a writer publishes ({seconds} s per configuration)")
    rows += readers_while_writing(seconds)
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
            "rows": rows}


def markdown(res) -> str:
    out = [f"### SharedState (snapshots) — {res['machine']}", "",
           "| pin + unpin | ns per read |", "|---|---:|"]
    for r in res["rows"]:
        if r["experiment"] == "pin+unpin":
            out.append(f"| `{r['what']}` | {r['ns']:.0f} |")
    out += ["", "| publish | shmring publish (3 slots) | np.copyto, one /dev/shm buffer | np.copyto rotating "
            "over 3 /dev/shm buffers (publish's footprint) | publish / copyto | publish / rotating copyto |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if r["experiment"] == "publish":
            out.append(f"| {r['size']} | {r['publish_GBps']:.2f} GB/s ({r['publish_us']:.1f} us) | "
                       f"{r['copyto_GBps']:.2f} GB/s ({r['copyto_us']:.1f} us) | "
                       f"{r['copyto3_GBps']:.2f} GB/s ({r['copyto3_us']:.1f} us) | {r['ratio']:.2f} | {r['ratio3']:.2f} |")
    out += ["", "| 1 MiB value, readers + 1 writer | each read checks | readers | reads/s (all readers) | "
            "writer versions/s |", "|---|---|---:|---:|---:|"]
    for r in res["rows"]:
        if r["experiment"] == "readers":
            out.append(f"| {r['transport']} | {r['check']} | {r['readers']} | {r['reads_per_s']:,.0f} | "
                       f"{r['writes_per_s']:,.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.snapshot_cases", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats, 0.7 s per reader configuration")
    ap.add_argument("--seconds", type=float, help="seconds per reader configuration")
    ap.add_argument("--out", default="bench/out", help="writes snapshots.md and snapshots.json here")
    args = ap.parse_args(argv)
    res = study(args.quick, log=lambda m: print(m, file=sys.stderr, flush=True), seconds=args.seconds)
    write_study(args.out, "snapshots", res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
