"""``python -m bench``: run the selected cases, print the table, write results."""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import numpy as np

from . import peer_cases, report
from .cases import (MSG_SIZES, SIZES, LargeStream, PingPong, ShmLargeSend, ShmSmallBytes, SmallStream, all_cases,
                    pool_sum, uniq)
from .harness import CaseFailed, measure


class Config:
    def __init__(self, quick: bool, repeats=None, duration=None):
        self.quick = quick
        self.repeats = repeats or (3 if quick else 5)
        self.warm_s = 0.08 if quick else 0.2
        self.small_s = duration or (0.25 if quick else 0.8)
        self.large_s = duration or (0.25 if quick else 0.6)
        self.ping_s = duration or (0.25 if quick else 0.6)
        self.warm_timeout = 30.0
        self.min_round_timeout = 20.0
        self.pin = True

    def target_s(self, case):
        if isinstance(case, SmallStream):
            return self.small_s
        if isinstance(case, LargeStream):
            return self.large_s
        return self.ping_s


def _row(case, order):
    return {"workload": case.workload, "transport": case.transport, "unit": case.unit,
            "higher_better": case.higher_better, "queue_ref": case.queue_ref, "shm_ref": case.shm_ref,
            "note": case.note, "order": order, "median": None, "values": [], "error": None}


def _rate(fn, nbytes, cfg):
    """GB/s of ``fn()`` (which processes ``nbytes``): warm-up of cfg.warm_s that calibrates
    the count, then cfg.repeats rounds of about cfg.large_s each.  Returns (values, n)."""
    t_end = time.perf_counter() + cfg.warm_s
    k = 0
    t0 = time.perf_counter()
    while time.perf_counter() < t_end or k < 3:
        fn()
        k += 1
    per = (time.perf_counter() - t0) / k
    n = max(3, int(cfg.large_s / per))
    values = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        values.append(n * nbytes / (time.perf_counter() - t0) / 1e9)
    return values, n


def _ref_row(workload, transport, note, order, values, n, log):
    row = {"workload": workload, "transport": transport, "unit": "GB/s", "higher_better": True,
           "queue_ref": "", "shm_ref": "", "note": note, "order": order,
           "median": statistics.median(values), "values": values, "error": None, "n": n}
    log(f"  {workload:<22} {transport:<44} {row['median']:.3g} GB/s")
    return row


BIG = 256 << 20          # > the 32 MiB L3 of the machine the targets refer to: DRAM bandwidth


def limits_rows(cfg, log):
    """Single-core physical limits, measured in this process: memcpy of a buffer far larger
    than L3 and read bandwidth (XOR-reduce of uint64 words: the cheapest full read numpy
    has, ~1 op per 8 bytes) in cache and from DRAM; np.sum of float32 from DRAM.  The
    in-cache memcpy limits (1 MiB, 16 MiB) are the np.copyto rows of the stream workloads,
    the per-size np.sum limits the np.sum rows of the -sum workloads."""
    rows = []
    big_src = np.ones(BIG // 4, np.float32)
    big_dst = np.ones_like(big_src)
    try:
        v, n = _rate(lambda: np.copyto(big_dst, big_src), BIG, cfg)
        rows.append(_ref_row("limits", report.LIMIT_COPY_BIG, "memcpy from DRAM to DRAM (bytes copied, not "
                             "bytes moved: the bus carries ~2-3x)", 0, v, n, log))
        del big_dst
        xor = np.bitwise_xor.reduce
        small = np.ones(1 << 17, np.uint64)            # 1 MiB: stays in L2
        v, n = _rate(lambda: xor(small), small.nbytes, cfg)
        rows.append(_ref_row("limits", report.LIMIT_READ_1M, "read bandwidth in cache", 1, v, n, log))
        big_u64 = big_src.view(np.uint64)
        v, n = _rate(lambda: xor(big_u64), BIG, cfg)
        rows.append(_ref_row("limits", report.LIMIT_READ_BIG, "read bandwidth from DRAM", 2, v, n, log))
        v, n = _rate(big_src.sum, BIG, cfg)
        rows.append(_ref_row("limits", report.LIMIT_SUM_BIG, "what a consumer that sums pays from DRAM "
                             "(numpy's pairwise float32 sum is slower than a plain read)", 3, v, n, log))
    finally:
        del big_src
    return rows


def sum_rows(nbytes, cfg, order, log):
    """np.sum of a float32 array of the same size in one process: the consumer's own limit
    in the -sum workloads (what it costs to read and add every element once)."""
    a = np.ones(nbytes // 4, np.float32)
    v, n = _rate(a.sum, nbytes, cfg)
    return [_ref_row(f"{nbytes >> 20}MiB-stream-sum", report.SUM_REF, "same size, same private array every time: "
                     "the consumer's read limit", order, v, n, log)]


def loop_rows(size, cfg, order, log):
    """The message rows' own two loops with the transport taken out, in this process:
    what the 64 B / 4 KiB rows could reach if ``send`` and ``recv_bytes`` cost no more
    than the cheapest C call (``len`` of the message; the next message of the pool from
    ``itertools.cycle``).  The producer's loop and the consumer's loop (its unpack and
    sum included) are timed one after the other; the two run on two cores in a real
    row, so the slower one bounds the stream: the row is ``n / max(producer, consumer)``."""
    import itertools

    case = ShmSmallBytes(size)

    class _Stub:                # the handles of ShmSmallBytes, with the transport taken out
        send = len

    stub = {"h": _Stub()}

    def both(n):
        _Stub.recv_bytes = itertools.cycle(case.pool).__next__
        t0 = time.perf_counter()
        case.produce(stub, n)
        t1 = time.perf_counter()
        s = case.consume(stub, n)
        t2 = time.perf_counter()
        if s != pool_sum(n):
            raise RuntimeError(f"loops alone: the consumer's loop summed {s}, expected {pool_sum(n)}")
        return t1 - t0, t2 - t1

    cpus = os.sched_getaffinity(0) if cfg.pin and hasattr(os, "sched_getaffinity") else None
    if cpus and len(cpus) > 1:
        os.sched_setaffinity(0, {max(cpus)})        # one CPU, as a pinned row's consumer
    try:
        n = 20000
        while True:
            tp, tc = both(n)
            if tp + tc >= cfg.warm_s or n >= 1 << 26:
                break
            n *= 4
        n = max(10000, int(n * cfg.small_s / max(tp, tc, 1e-9)))
        values, parts = [], []
        for _ in range(cfg.repeats):
            tp, tc = both(n)
            values.append(n / max(tp, tc) / 1e6)
            parts.append((n / tp / 1e6, n / tc / 1e6))
    finally:
        if cpus and len(cpus) > 1:
            os.sched_setaffinity(0, cpus)
    w = case.workload
    mp = statistics.median(p for p, _ in parts)
    mc = statistics.median(c for _, c in parts)
    row = {"workload": w, "transport": report.LOOPS, "unit": "M msg/s", "higher_better": True,
           "queue_ref": "", "shm_ref": "", "order": order, "median": statistics.median(values),
           "values": values, "error": None, "n": n,
           "note": (f"the shmring row's loops with send = len and recv_bytes = the pool's next message: "
                    f"producer's loop {mp:.3g}, consumer's loop {mc:.3g} M/s; the stream cannot beat the slower")}
    log(f"  {w:<22} {row['transport']:<44} {row['median']:.4g} M msg/s (producer's loop {mp:.4g}, "
        f"consumer's loop {mc:.4g})")
    return [row]


def ring_footprint():
    """Bytes a ring of each capacity occupies in /dev/shm (design.md §9: its capacity plus
    one header page).  Returns {"rings": [...], "line": str} or None if shmring is missing."""
    try:
        import shmring
        from shmring import segment
    except Exception:        # noqa: BLE001 -- no shmring: nothing to measure
        return None
    out = []
    for cap in (1 << 16, 1 << 20, 64 << 20):
        name = uniq("bench_mem")
        ring = shmring.Ring.create(name, cap)
        try:
            size = os.stat(os.path.join(segment.SHM_DIR, segment.PREFIX + name)).st_size
        finally:
            ring.close()
            shmring.unlink(name, missing_ok=True)
        out.append({"capacity": cap, "segment_bytes": size, "overhead_bytes": size - cap})
    page = os.sysconf("SC_PAGE_SIZE")
    met = all(r["overhead_bytes"] <= page for r in out)
    line = ("Memory: a ring's /dev/shm segment is its capacity + "
            + ", ".join(f"{r['overhead_bytes']} B (capacity {r['capacity'] >> 10} KiB)" for r in out)
            + f"; target capacity + one {page} B header page: {'met' if met else '**missed**'}")
    return {"rings": out, "page": page, "met": met, "line": line}


def copyto_rows(nbytes, cfg, order, log):
    """np.copyto of the same size in this (single) process: the one-copy ceiling."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.ones_like(src)
    t_end = time.perf_counter() + cfg.warm_s
    k = 0
    t0 = time.perf_counter()
    while time.perf_counter() < t_end or k < 3:
        np.copyto(dst, src)
        k += 1
    per = (time.perf_counter() - t0) / k
    n = max(3, int(cfg.large_s / per))
    values = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            np.copyto(dst, src)
        values.append(n * nbytes / (time.perf_counter() - t0) / 1e9)
    row = {"workload": f"{nbytes >> 20}MiB-stream", "transport": report.COPYTO, "unit": "GB/s",
           "higher_better": True, "queue_ref": "mp.Queue put/get (pickle)", "shm_ref": "shmring send(arr)",
           "note": "same size, same two private buffers every time: the one-copy reference",
           "order": order, "median": statistics.median(values), "values": values, "error": None,
           "n": n}
    log(f"  {row['workload']:<22} {row['transport']:<44} {row['median']:.3g} GB/s")
    rows = [row]

    # The same copy into POSIX shared memory, rotating over as many slots as the
    # shmring ring of this size holds (4K shmem pages, a footprint that may not fit the
    # caches): separates what the memory system costs from what shmring costs.
    from multiprocessing import shared_memory
    slots = ShmLargeSend(nbytes).capacity // nbytes
    shm = shared_memory.SharedMemory(name=uniq("bench_cp"), create=True, size=slots * nbytes)
    try:
        views = [np.ndarray(nbytes // 4, np.float32, buffer=shm.buf, offset=k * nbytes) for k in range(slots)]
        for v in views:
            np.copyto(v, src)
        values = []
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            for i in range(n):
                np.copyto(views[i % slots], src)
            values.append(n * nbytes / (time.perf_counter() - t0) / 1e9)
        del views, v
    finally:
        shm.close()
        shm.unlink()
    row2 = {**row, "transport": report.COPYTO_RING, "order": order + 0.1, "median": statistics.median(values),
            "values": values,
            "note": f"{slots} slots of the size in one /dev/shm segment ({slots * nbytes >> 20} MiB, like the ring)"}
    log(f"  {row2['workload']:<22} {row2['transport']:<44} {row2['median']:.3g} GB/s")
    rows.append(row2)

    # The same rotation in private memory: if it is as slow as the /dev/shm one, the cost
    # is the footprint (slots x size against the caches), not shared memory as such.
    priv = np.ones(slots * (nbytes // 4), np.float32)
    views = [priv[k * (nbytes // 4):(k + 1) * (nbytes // 4)] for k in range(slots)]
    values = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        for i in range(n):
            np.copyto(views[i % slots], src)
        values.append(n * nbytes / (time.perf_counter() - t0) / 1e9)
    del views, priv
    row3 = {**row, "transport": report.COPYTO_RING_PRIVATE, "order": order + 0.2,
            "median": statistics.median(values), "values": values,
            "note": f"the same {slots} slots in private memory: separates the footprint from /dev/shm"}
    log(f"  {row3['workload']:<22} {row3['transport']:<44} {row3['median']:.3g} GB/s")
    rows.append(row3)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="3 repeats, ~0.25 s rounds (whole run < 2 min)")
    ap.add_argument("--only", metavar="PATTERN",
                    help="regex (case-insensitive) matched against 'WORKLOAD TRANSPORT', e.g. "
                         "'64B', 'pingpong', 'MiB.*shmring'")
    ap.add_argument("--out", default="bench/out", help="output folder for results.json, results.md, "
                                                         "results.png (default bench/out)")
    ap.add_argument("--repeats", type=int, help="measured rounds per case (default 5, --quick 3)")
    ap.add_argument("--duration", type=float, help="seconds per measured round (default 0.6-0.8)")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the two processes of a case to two different CPUs")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--primitives", action="store_true",
                    help="also run the zero-copy primitives study (python -m bench.primitives: read vs mmap, "
                         "read+send vs sendfile; ~1 min, needs ~1 GiB free in the temp dir)")
    ap.add_argument("--snapshots", action="store_true",
                    help="also run the SharedState study (python -m bench.snapshot_cases: pin+unpin, publish, "
                         "readers while a writer publishes vs Manager dict and shared_memory+Lock; ~40 s)")
    ap.add_argument("--pipeline", action="store_true",
                    help="also run the pipeline study (python -m bench.pipeline_cases: the image pipeline as "
                         "shmring.Pipeline, Pool.imap and multiprocessing.Queue stages)")
    ap.add_argument("--multi", action="store_true",
                    help="also run the multi-party and record rings study (python -m bench.multi_cases: mpsc "
                         "fan-in, broadcast fan-out, mpmc work-sharing, record batches vs mp.Queue and "
                         "faster-fifo; ~3 min, ~1 min with --quick)")
    ap.add_argument("--queues", action="store_true",
                    help="also run the queue study (python -m bench.queue_cases: shmring.Queue vs "
                         "multiprocessing.Queue vs faster-fifo for 64 B objects, dicts and 1 MiB arrays)")
    args = ap.parse_args(argv)

    cfg = Config(args.quick, args.repeats, args.duration)
    cfg.pin = not args.no_pin
    pat = re.compile(args.only, re.I) if args.only else None
    cases = all_cases()
    if pat:
        cases = [c for c in cases if pat.search(f"{c.workload} {c.transport}")]
    # single-process reference rows: {workload: (labels, function(order) -> rows)}
    refs = {f"{nb >> 20}MiB-stream": ((report.COPYTO, report.COPYTO_RING, report.COPYTO_RING_PRIVATE),
                                      lambda o, nb=nb: copyto_rows(nb, cfg, o, log)) for nb in SIZES}
    refs.update({f"{nb >> 20}MiB-stream-sum": ((report.SUM_REF,), lambda o, nb=nb: sum_rows(nb, cfg, o, log))
                 for nb in SIZES})
    refs["limits"] = (report.LIMIT_LABELS, lambda o: limits_rows(cfg, log))
    refs.update({ShmSmallBytes(sz).workload: ((report.LOOPS,), lambda o, sz=sz: loop_rows(sz, cfg, o, log))
                 for sz in MSG_SIZES})
    refs = {w: r for w, r in refs.items() if not pat or any(pat.search(f"{w} {t}") for t in r[0])}
    if args.list:
        for c in cases:
            print(f"{c.workload:<16} {c.transport}")
        for w, (labels, _) in refs.items():
            for t in labels:
                print(f"{w:<16} {t}")
        print(f"(--primitives) {'':<2} python -m bench.primitives: read vs mmap, read+send vs sendfile")
        return 0
    if not cases and not refs and not args.primitives and not args.snapshots and not args.multi \
            and not args.pipeline and not args.queues:
        print(f"no case matches {args.only!r} (see --list)", file=sys.stderr)
        return 2

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    minfo = report.machine()
    run = {"mode": "quick" if args.quick else "full", "repeats": cfg.repeats, "only": args.only, "pin": cfg.pin,
           "round_s": {"64B": cfg.small_s, "arrays": cfg.large_s, "pingpong": cfg.ping_s}}
    log("\n".join(report.machine_lines(minfo, run)))
    t_start = time.monotonic()
    rows = []
    done_refs = set()
    failures = 0
    if "limits" in refs:
        done_refs.add("limits")
        rows += refs["limits"][1](-1)
    try:
        for i, case in enumerate(cases):
            if case.workload in refs and case.workload not in done_refs:
                done_refs.add(case.workload)
                rows += refs[case.workload][1](i - 0.5)
            t0 = time.monotonic()
            log(f"  {case.workload:<22} {case.transport:<44} ...")
            reason = case.unavailable()
            if reason:
                log(f"    {reason}")
                if isinstance(case, PingPong):
                    for m in ("median", "p99"):
                        r = _row(case, i)
                        r.update(workload=f"{case.workload}-{m}", error=reason)
                        rows.append(r)
                else:
                    rows.append({**_row(case, i), "error": reason})
                continue
            try:
                res = measure(case, cfg, log)
                err = None
            except CaseFailed as e:
                res, err = None, f"FAILED: {str(e).splitlines()[0][:300]}"
                log(f"    {e}")
                failures += 1
            except Exception as e:       # noqa: BLE001 -- a crash of one case must not lose the others
                res, err = None, f"FAILED: {type(e).__name__}: {e}"
                log(f"    {err}")
                failures += 1
            metric_names = ([f"{case.workload}-median", f"{case.workload}-p99"] if isinstance(case, PingPong)
                            else [case.workload])
            for m in metric_names:
                r = _row(case, i)
                r["workload"] = m
                if res is None:
                    r["error"] = err
                else:
                    vals = res["values"][m]
                    r.update(median=statistics.median(vals), values=vals, n=res["n"], rounds=res["rounds"])
                    log(f"    {m}: {r['median']:.4g} {case.unit}  (repeats {', '.join(f'{v:.4g}' for v in vals)};"
                        f" {time.monotonic() - t0:.1f} s)")
                rows.append(r)
    finally:
        peer_cases.shutdown()          # the Ray cluster, if a Ray case started one
    for k, w in enumerate(refs):
        if w not in done_refs:
            rows += refs[w][1](1000 + k)
    def optional_study(wanted, module, title):
        """Run one of the opt-in studies: (results, markdown), or (None, None) if not asked for.
        A failure is recorded and reported; the main table is still written."""
        nonlocal failures
        if not wanted:
            return None, None
        import importlib
        mod = importlib.import_module(f".{module}", __package__)
        log(f"{title} (python -m bench.{module})")
        try:
            res = mod.study(quick=args.quick, log=log)
            return res, mod.markdown(res)
        except Exception as e:       # noqa: BLE001 -- the table above must still be written
            err = f"FAILED: {type(e).__name__}: {e}"
            log(f"    {err}")
            failures += 1
            return {"error": err}, f"{title}: {err}"

    prim, prim_md = optional_study(args.primitives, "primitives", "Zero-copy primitives study")
    _, snaps_md = optional_study(args.snapshots, "snapshot_cases", "SharedState study")
    multi, multi_md = optional_study(args.multi, "multi_cases", "Multi-party and record rings study")
    _, pipe_md = optional_study(args.pipeline, "pipeline_cases", "Pipeline study")
    _, queues_md = optional_study(args.queues, "queue_cases", "Queue study")
    failures += sum(1 for r in (multi or {}).get("rows", []) if (r.get("error") or "").startswith("FAILED"))
    try:
        run["memory"] = ring_footprint()
    except Exception as e:       # noqa: BLE001
        run["memory"] = {"line": f"Memory: not measured ({type(e).__name__}: {e})"}
    run["total_s"] = time.monotonic() - t_start

    rows = report.finish_rows(report.order_rows(rows))
    head = report.machine_lines(minfo, run)
    md = "\n".join(["\n".join(f"{h}  " for h in head), "", report.table(rows), "", report.LEGEND])
    for extra in (prim_md, snaps_md, multi_md, pipe_md, queues_md):
        if extra is not None:
            md += "\n\n" + extra
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    report.write_json(os.path.join(args.out, "results.json"), minfo, run, rows, primitives=prim)
    if multi is not None:
        with open(os.path.join(args.out, "multi.json"), "w") as f:
            json.dump(multi, f, indent=1, default=float)
    log(report.plot(os.path.join(args.out, "results.png"), rows))
    log(f"results written to {args.out}/ (results.md, results.json); total {run['total_s']:.1f} s")
    return 1 if failures else 0
