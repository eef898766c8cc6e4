"""``python -m bench.queue_cases``: ``shmring.Queue`` against
``multiprocessing.Queue`` and faster-fifo, in the same run (issue 17 item 4).

Workloads (any picklable object, as a ``multiprocessing`` queue carries):

* **64 B**: a ``bytes`` object of 64 bytes per item.
* **dict**: a small dict (``{"id": i, "x": 1.5, "tag": "abc", "ok": True}``).
* **1 MiB array**: a 1 MiB float32 numpy array (``shmring.Queue``: out-of-band,
  one copy into the ring and one out, or none out with ``get(lease=True)``, a
  read-only view of the ring; the others pickle it in the stream).

One producer process puts N items, one consumer process gets them (both
forked from this one); a round runs from the producer's first put to the
consumer's last get (``time.perf_counter``, comparable across processes).
Arrays: ``multiprocessing.Queue`` pickles in a feeder thread after ``put``
returns, so its producer puts a fresh copy of the array each time (a 1 MiB
copy it pays on top); ``shmring.Queue`` and faster-fifo pickle inside
``put`` and are handed one array changed between puts; batches put copies
for every transport.  The consumer verifies every item (count, and for arrays two elements that
encode the sequence number; for dicts the ``id``), so a broken transport
cannot look fast.  The last row is a floor for ``shmring.Queue``: the same
mpmc ring used directly, small items as ``pickle.dumps`` + ``send`` and
``recv_bytes`` + ``pickle.loads``, arrays as the ring's own one-memcpy ``send``
and a zero-copy view on the consumer.  Each transport runs per item (``put`` / ``get``) and,
where it has them, in batches of 64 (8 for arrays) (``put_many`` / ``get_many``).  The
table shows the median of the rounds and the ratio to
``multiprocessing.Queue`` (per item).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import platform
import statistics
import sys
import time

import numpy as np

import shmring

from .harness import write_study

CTX = multiprocessing.get_context("fork")
BATCH = 64
ARRAY = 1 << 18                     # float32 elements: 1 MiB


def _item(kind: str, i: int):
    if kind == "64 B":
        return b"%064d" % i
    if kind == "dict":
        return {"id": i, "x": 1.5, "tag": "abc", "ok": True}
    a = _item.array
    a[0] = i
    a[-1] = -i
    return a


_item.array = np.ones(ARRAY, np.float32)


def _batch(kind: str) -> int:
    return 8 if kind == "1 MiB array" else BATCH   # 64 MiB batches would not fit faster-fifo's 16 MiB


def _check(kind: str, i: int, got) -> None:
    if kind == "64 B":
        ok = got == b"%064d" % i
    elif kind == "dict":
        ok = got["id"] == i
    else:
        ok = got.shape == (ARRAY,) and got[0] == i and got[-1] == -i
    if not ok:
        raise RuntimeError(f"item {i} of {kind} arrived wrong")


def _make(transport: str):
    if transport.startswith("floor"):
        # the ring a queue sits on (anonymous mpmc, a stream that never ends), used directly
        return shmring.Ring.anonymous(1 << 24, kind="mpmc", max_producers=4, max_consumers=4,
                                      producers=(1 << 31) - 1)
    if transport.startswith("shmring"):
        return shmring.Queue(capacity=1 << 24)
    if transport.startswith("faster-fifo"):
        import faster_fifo
        import faster_fifo_reduction  # noqa: F401  (pickling of the queue object for fork)
        return faster_fifo.Queue(max_size_bytes=1 << 24)
    return CTX.Queue()


def _consumer(q, transport, kind, n, batched, conn):
    try:
        got = 0
        if transport.startswith("floor"):
            # what a queue cannot avoid: small items pickle.loads of a bytes message; an array
            # the ring's zero-copy view (the consumer's copy of a plain get is not counted)
            c = q.consumer()
            for got in range(n):
                if kind == "1 MiB array":
                    with c.recv(timeout=60) as m:
                        _check(kind, got, m.value)
                else:
                    _check(kind, got, pickle.loads(c.recv_bytes(timeout=60)))
            c.close()
        elif batched:
            while got < n:
                for x in (q.get_many(timeout=60) if "faster" not in transport
                          else q.get_many(timeout=60, max_messages_to_get=_batch(kind))):
                    _check(kind, got, x)
                    got += 1
        elif "lease" in transport:          # the array is a view of the ring, dropped after the check
            for got in range(n):
                _check(kind, got, q.get(timeout=60, lease=True))
        else:
            for got in range(n):
                _check(kind, got, q.get(timeout=60))
        conn.send(("done", time.perf_counter()))
    except BaseException as e:          # noqa: BLE001 -- reported to the parent
        conn.send(("error", repr(e)))


def _producer(q, transport, kind, n, batched, go, conn):
    try:
        items = [_item(kind, i) if kind != "1 MiB array" else None for i in range(n)]
        go.wait(60)
        t0 = time.perf_counter()
        if transport.startswith("floor"):
            # pickle.dumps and the ring's send; an array: the ring's one-memcpy send
            p = q.producer()
            if kind == "1 MiB array":
                for i in range(n):
                    p.send(_item(kind, i), timeout=60)
            else:
                for x in items:
                    p.send(pickle.dumps(x, 5), timeout=60)
            p.detach()
        elif batched:
            b = _batch(kind)
            for s in range(0, n, b):
                q.put_many([items[i] if items[i] is not None else _item(kind, i).copy()
                            for i in range(s, min(n, s + b))], timeout=60)
        elif kind == "1 MiB array":
            # multiprocessing.Queue pickles later, in its feeder thread: the caller may not
            # change an object after put(), so it gets a fresh copy each time (the others
            # pickle inside put() and may be handed the same array, changed in between)
            later = transport == "multiprocessing.Queue"
            for i in range(n):
                q.put(_item(kind, i).copy() if later else _item(kind, i), timeout=60)
        else:
            for x in items:
                q.put(x, timeout=60)
        conn.send(("start", t0))
    except BaseException as e:          # noqa: BLE001
        conn.send(("error", repr(e)))


def one_round(transport: str, kind: str, n: int, batched: bool) -> float:
    q = _make(transport)
    go = CTX.Event()
    pr, pw = CTX.Pipe(False)
    cr, cw = CTX.Pipe(False)
    cons = CTX.Process(target=_consumer, args=(q, transport, kind, n, batched, cw), daemon=True)
    prod = CTX.Process(target=_producer, args=(q, transport, kind, n, batched, go, pw), daemon=True)
    cons.start()
    prod.start()
    go.set()
    try:
        if not pr.poll(300) or not cr.poll(300):
            raise RuntimeError(f"{transport} {kind}: timeout")
        (k1, t0), (k2, t1) = pr.recv(), cr.recv()
        if k1 == "error" or k2 == "error":
            raise RuntimeError(f"{transport} {kind}: {t0 if k1 == 'error' else t1}")
        return t1 - t0
    finally:
        for p in (prod, cons):
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        if hasattr(q, "close"):
            q.close()


TRANSPORTS = [("shmring.Queue", False), ("shmring.Queue get(lease=True)", False),
              ("shmring.Queue put_many/get_many", True),
              ("multiprocessing.Queue", False), ("faster-fifo", False), ("faster-fifo put_many/get_many", True),
              ("floor: the queue's ring + pickle", False)]
KINDS = ["64 B", "dict", "1 MiB array"]


def study(quick: bool = False, log=print, seconds: float | None = None) -> dict:
    target = seconds or (0.3 if quick else 0.8)
    rounds = 3 if quick else 5
    try:
        import faster_fifo  # noqa: F401
        all_transports = TRANSPORTS
    except ImportError:
        all_transports = [t for t in TRANSPORTS if not t[0].startswith("faster")]
    rows = []
    # transports interleaved within each round, so a noisy moment hits them all
    for kind in KINDS:
        counts = {}
        # a leased get differs from a get only for items with out-of-band buffers: arrays
        transports = [t for t in all_transports if "lease" not in t[0] or kind == "1 MiB array"]
        for name, batched in transports:         # calibrate: a round of ~target seconds
            n = 64 if kind == "1 MiB array" else 2048
            while True:
                t = one_round(name, kind, n, batched)
                if t >= target / 4 or n >= 1 << 22:
                    break
                n *= 4
            counts[name] = max(64, int(n * target / max(t, 1e-6)) // 64 * 64)
        times = {name: [] for name, _ in transports}
        for r in range(rounds):
            for name, batched in transports:
                times[name].append(one_round(name, kind, counts[name], batched))
                rate = counts[name] / times[name][-1]
                log(f"queues: {kind}: {name}: round {r + 1}/{rounds}: {rate:,.0f} items/s")
        for name, _ in transports:
            rates = [counts[name] / t for t in times[name]]
            rows.append({"kind": kind, "transport": name, "items": counts[name], "seconds": times[name],
                         "items_per_s": statistics.median(rates),
                         "GBps": statistics.median(rates) * ARRAY * 4 / 1e9 if kind == "1 MiB array" else None,
                         "unstable": max(rates) / min(rates) > 1.5})
    for r in rows:
        base = next(x for x in rows if x["kind"] == r["kind"] and x["transport"] == "multiprocessing.Queue")
        r["vs_mp_queue"] = r["items_per_s"] / base["items_per_s"]
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
                       f"numpy {np.__version__}",
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds,
            "load_before": os.getloadavg()[0], "rows": rows}


def markdown(res) -> str:
    out = [f"### shmring.Queue vs multiprocessing.Queue vs faster-fifo — {res['machine']}, {res['when']}", "",
           f"1 producer process -> 1 consumer process, every item verified; median of {res['rounds']} rounds "
           f"(`*`: rounds differ by > 1.5x); load average at the start {res['load_before']:.1f}.", "",
           "| items | transport | items/s | GB/s | vs multiprocessing.Queue |", "|---|---|---:|---:|---:|"]
    for r in res["rows"]:
        gb = f"{r['GBps']:.2f}" if r["GBps"] is not None else ""
        out.append(f"| {r['kind']} | {r['transport']}{' *' if r['unstable'] else ''} | {r['items_per_s']:,.0f} | "
                   f"{gb} | {r['vs_mp_queue']:.1f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.queue_cases", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of ~0.3 s")
    ap.add_argument("--seconds", type=float, help="target length of a round")
    ap.add_argument("--out", default="bench/out", help="writes queues.md and queues.json here")
    args = ap.parse_args(argv)
    res = study(args.quick, log=lambda m: print(m, file=sys.stderr, flush=True), seconds=args.seconds)
    write_study(args.out, "queues", res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
