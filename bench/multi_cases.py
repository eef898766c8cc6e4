"""``python -m bench.multi_cases``: multi-party rings (mpsc, broadcast, mpmc) and record rings, measured.

Four workloads, every transport in the same run on the same machine (also run by
``python -m bench --multi``), each party a separate forked process:

1. **mpsc fan-in**: 1, 2, 4 producers -> 1 consumer, 64-byte bytes messages.
   shmring ``Ring.create(name, 1 << 20, kind="mpsc", producers=N)``: each producer
   ``send(b)``, the consumer ``recv_bytes()`` until EndOfStream.  Peers: one
   ``multiprocessing.Queue`` (N producers put, 1 consumer gets) and one
   ``faster_fifo.Queue`` (put/get, and put/get_many).  Reference in the same run:
   a plain spsc ring 1 -> 1.  Metric: total messages/s.
2. **broadcast fan-out**: 1 producer -> 1, 2, 4 subscribers, 64-byte messages.
   shmring ``kind="broadcast"``: every subscriber ``subscribe()``s before the producer
   starts (an Event), then counts messages until EndOfStream.  Peers: one
   ``multiprocessing.Queue`` / ``faster_fifo.Queue`` per subscriber, the producer
   putting every message to each (what a user would otherwise do).  Metrics:
   messages/s delivered to each subscriber (= the producer's send rate) and total
   deliveries/s (that times the subscribers).
3. **mpmc work-sharing**: 1 or 2 producers -> 2 or 4 consumers, 64-byte messages,
   each message to one consumer.  shmring ``kind="mpmc", producers=P``: consumers
   ``recv_bytes()`` until EndOfStream.  Peers: one ``multiprocessing.Queue`` /
   ``faster_fifo.Queue`` shared by all getters.  Metric: total messages/s.
4. **records**: 16-byte records (``[("a", "<u8"), ("b", "<f8")]``) in batches of 256,
   4096 and 65536.  shmring ``Ring.create(name, 1 << 22, dtype=dt)``: the producer
   loops ``send_many(arr)``, the consumer ``with c.recv_many() as b: n += len(b)``
   until EndOfStream.  Peers: ``multiprocessing.Queue`` putting the same ndarray
   (pickled by its feeder thread) and ``faster_fifo`` putting ``arr.tobytes()``
   (the consumer ``np.frombuffer``s it).  Metric: records/s (design target
   >= 50 M records/s).

Timing and rounds: one round = a fresh ring (or queue) and fresh processes; every
party opens its end (attach, take its role, subscribe) and reports ready; the
parent then sets one Event, and the round runs from the first producer's first
send to the last consumer's end of stream (``time.perf_counter``, CLOCK_MONOTONIC:
comparable across processes).  Warm-up rounds calibrate the message count so a
measured round lasts the target time; the table shows the median of the measured
rounds (all rounds are in the JSON).  Process start-up and ring creation are not
timed; the page faults of the fresh ring are.

End of stream, per transport: shmring producers ``close()`` (mpsc/mpmc: the stream
ends once the ``producers=`` count closed).  Queues carry ``None`` markers: a
producer puts one after its messages; a broadcast subscriber stops at its queue's
marker; in fan-in and work-sharing the getters count the markers in a shared
counter, and the getter that takes the last producer's marker puts one stop marker
for each other getter (every message is in the queue before that last marker).

Verification, so that a broken transport cannot look fast: 64-byte messages come
from the prebuilt pool of bench.cases (message j starts with u64 j); every consumer
unpacks that u64 from every message and sums it; the parent checks the count and
the sum (per subscriber for broadcast, over all consumers for mpmc).  Records:
field ``a`` holds the record's index in its batch; the consumer checks the first
and last record of everything it gets against its running count, and the parent
checks the total.

Pinning (like the main bench's producer on CPU 0 and consumer on CPU 1): producers
are pinned round-robin to the first half of the usable CPUs, consumers to the
second half (2 CPUs: every producer on CPU 0, every consumer on CPU 1); ``--no-pin``
leaves placement to the scheduler.  With more processes than CPUs the numbers show
contention, not scaling: the table says which rows are oversubscribed.

    python -m bench.multi_cases               # 5 rounds of ~0.6 s per case, ~3 min on 2 cores
    python -m bench.multi_cases --quick       # 3 rounds of ~0.25 s, ~1 min
    python -m bench.multi_cases --only 'records|mpsc.*shmring'
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import time
import traceback

import numpy as np

from . import report
from .cases import MASK, U64, msg_pool, pool_sum, uniq
from .harness import CTX, CaseFailed, _kill, collect, write_study

MSG_SIZE = 64
MSG_CAP = 1 << 20
REC_CAP = 1 << 22
REC_DTYPE = np.dtype([("a", "<u8"), ("b", "<f8")])
REC_BATCHES = (256, 4096, 65536)
FAN_IN = (1, 2, 4)
FAN_OUT = (1, 2, 4)
SHARE = ((1, 2), (1, 4), (2, 2), (2, 4))
RECORDS_TARGET = 50.0           # M records/s (design target for the record ring)
FF_MANY = 1000                  # get_many's max_messages_to_get
READY_TIMEOUT = 30.0
JOIN_TIMEOUT = 15.0
UNSTABLE = 1.5                  # max/min of the rounds above this: marked unstable (as in report.py)

perf = time.perf_counter

SHM = {"mpsc": "shmring mpsc", "broadcast": "shmring broadcast", "mpmc": "shmring mpmc",
       "records": "shmring send_many/recv_many"}
SPSC_REF = "shmring spsc (reference)"
MPQ = "mp.Queue"
FF = "faster-fifo put/get"
FF_GM = "faster-fifo put/get_many"
MPQ_REC = "mp.Queue put(ndarray)"
FF_REC = "faster-fifo put(arr.tobytes())"


class Settings:
    """Rounds and their length, as bench.cli.Config: --quick 3 rounds of ~0.25 s, else 5 of ~0.6 s."""

    def __init__(self, quick=False, repeats=None, duration=None, pin=True):
        self.quick = quick
        self.repeats = repeats or (3 if quick else 5)
        self.warm_s = 0.08 if quick else 0.2
        self.round_s = duration or (0.25 if quick else 0.6)
        self.warm_timeout = 30.0
        self.min_round_timeout = 20.0
        self.pin = pin


# ============================================================================= child processes

def _child(target, args, conn, others, go, cpu):
    """One party: open its end, report ready, wait for go, run, report the result."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent handles Ctrl-C and kills us
        for c in others:                                 # so the parent sees EOF when we die
            c.close()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

        def ready():
            conn.send(("ready", os.getpid()))
            if not go.wait(READY_TIMEOUT + 10):
                raise RuntimeError("no start signal from the parent")

        conn.send(("result", target(ready, *args)))
    except BaseException as e:                           # report, then die: the parent kills the rest
        try:
            conn.send(("error", f"{target.__name__}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
        except BaseException:
            pass
    finally:
        os._exit(0)                                      # no atexit joins that could hang


def _flush(q):
    """An mp.Queue's feeder thread has written everything to the pipe (faster-fifo's put
    is synchronous: nothing to do)."""
    if hasattr(q, "join_thread"):
        q.close()
        q.join_thread()


# ---------------------------------------------------------------------------- shmring messages

def shm_producer(ready, name, n):
    import shmring
    ring = shmring.Ring.attach(name)
    pool = msg_pool(MSG_SIZE)
    with ring.producer() as p:
        send = p.send
        ready()
        t0 = perf()
        for i in range(n):
            send(pool[i & MASK])
        t1 = perf()
    ring.close()
    return {"t0": t0, "t1": t1, "sent": n}


def shm_consumer(ready, name):
    """mpsc / spsc consumer, mpmc consumer or broadcast subscriber: recv_bytes() until EndOfStream."""
    import shmring
    ring = shmring.Ring.attach(name)
    h = ring.subscribe() if ring.kind == "broadcast" else ring.consumer()
    with h:
        recv, u = h.recv_bytes, U64
        ready()
        s = k = 0
        try:
            while True:
                s += u(recv())[0]
                k += 1
        except shmring.EndOfStream:
            pass
        t_end = perf()
    ring.close()
    return {"t_end": t_end, "n": k, "sum": s}


# ---------------------------------------------------------------------------- queue messages

def q_producer(ready, q, n):
    """Put n pooled messages, then one None marker."""
    put, pool = q.put, msg_pool(MSG_SIZE)
    ready()
    t0 = perf()
    for i in range(n):
        put(pool[i & MASK])
    t1 = perf()
    put(None)
    _flush(q)
    return {"t0": t0, "t1": t1, "sent": n}


def q_fanout_producer(ready, qs, n):
    """One queue per subscriber: put every message to each, then None to each."""
    puts, pool = [q.put for q in qs], msg_pool(MSG_SIZE)
    ready()
    t0 = perf()
    if len(puts) == 1:
        put = puts[0]
        for i in range(n):
            put(pool[i & MASK])
    else:
        for i in range(n):
            m = pool[i & MASK]
            for put in puts:
                put(m)
    t1 = perf()
    for put in puts:
        put(None)
    for q in qs:
        _flush(q)
    return {"t0": t0, "t1": t1, "sent": n}


def _marker(q, counter, producers, getters):
    """A getter took a None.  Returns how many stop markers to hand on (>= 0) if this
    getter stops now, or -1 if it must go on (a producer finished, others have not).
    The getter that takes the last producer's marker puts a stop for each other getter."""
    with counter.get_lock():
        counter.value += 1
        v = counter.value
    if v < producers:
        return -1
    if v == producers:
        for _ in range(getters - 1):
            q.put(None)
        if getters > 1:
            _flush(q)
    return 0


def q_getter(ready, q, producers, getters, counter):
    """get() until the end (see _marker); counts and sums every message."""
    get, u = q.get, U64
    ready()
    s = k = 0
    while True:
        for x in iter(get, None):
            s += u(x)[0]
            k += 1
        if counter is None or _marker(q, counter, producers, getters) >= 0:
            break
    t_end = perf()
    return {"t_end": t_end, "n": k, "sum": s}


def ff_many_getter(ready, q, producers, getters, counter):
    """faster-fifo get_many(): as q_getter; a batch may hold markers meant for other
    getters after ours: those are put back."""
    get_many, u = q.get_many, U64
    ready()
    s = k = 0
    done = False
    while not done:
        xs = get_many(max_messages_to_get=FF_MANY)
        for j, x in enumerate(xs):
            if x is not None:
                s += u(x)[0]
                k += 1
            elif _marker(q, counter, producers, getters) >= 0:
                rest = xs[j + 1:]
                if any(y is not None for y in rest):
                    raise RuntimeError("a message came after the last stop marker")
                for _ in rest:
                    q.put(None)
                done = True
                break
    t_end = perf()
    return {"t_end": t_end, "n": k, "sum": s}


# ---------------------------------------------------------------------------- records

def rec_batch(count):
    a = np.empty(count, REC_DTYPE)
    a["a"] = np.arange(count, dtype=np.uint64)
    a["b"] = 1.0
    return a


def rec_shm_producer(ready, name, batch, nbatches):
    import shmring
    ring = shmring.Ring.attach(name)
    arr = rec_batch(batch)
    with ring.producer() as p:
        send_many = p.send_many
        ready()
        t0 = perf()
        for _ in range(nbatches):
            send_many(arr)
        t1 = perf()
    ring.close()
    return {"t0": t0, "t1": t1, "sent": nbatches * batch}


def rec_shm_consumer(ready, name, batch):
    """with c.recv_many() as b: n += len(b), until EndOfStream; checks the first and
    last record of each batch it gets (no loop variable may keep a view past the
    block: the batch's space would be held, see the study's notes)."""
    import shmring
    ring = shmring.Ring.attach(name)
    with ring.consumer() as c:
        recv_many = c.recv_many
        ready()
        n = bad = got = 0
        try:
            while True:
                with recv_many() as b:
                    k = len(b)
                    arrs = b.arrays
                    if arrs[0]["a"][0] != n % batch or arrs[-1]["a"][-1] != (n + k - 1) % batch:
                        bad += 1
                    n += k
                    got += 1
                    del arrs
        except shmring.EndOfStream:
            pass
        t_end = perf()
    ring.close()
    return {"t_end": t_end, "n": n, "bad": bad, "batches": got}


def rec_q_producer(ready, q, batch, nbatches, as_bytes):
    arr = rec_batch(batch)
    put = q.put
    ready()
    t0 = perf()
    if as_bytes:
        for _ in range(nbatches):
            put(arr.tobytes())
    else:
        for _ in range(nbatches):
            put(arr)                        # never changed: the feeder may pickle it any time later
    t1 = perf()
    put(None)
    _flush(q)
    return {"t0": t0, "t1": t1, "sent": nbatches * batch}


def rec_q_consumer(ready, q, batch):
    get = q.get
    ready()
    n = bad = 0
    while True:
        x = get()
        if x is None:                       # (not iter(get, None): that compares arrays with ==)
            break
        a = np.frombuffer(x, REC_DTYPE) if isinstance(x, bytes) else x
        if len(a) != batch or a["a"][0] != 0 or a["a"][-1] != batch - 1:
            bad += 1
        n += len(a)
    t_end = perf()
    return {"t_end": t_end, "n": n, "bad": bad}


# ============================================================================= cases (parent side)

class Case:
    """One transport in one configuration.  ``n``: messages (mpsc/mpmc: in total; broadcast:
    sent by the producer) or batches (records) per round."""
    requires: tuple = ()
    unit = "M msg/s"
    n_warm, n_min, n_max = 20000, 5000, 50_000_000
    note = ""

    def __init__(self, workload, transport, producers, consumers):
        self.workload, self.transport = workload, transport
        self.producers, self.consumers = producers, consumers
        self.config = f"{producers}->{consumers}"

    @property
    def key(self):
        return f"{self.workload} {self.config} {self.transport}"

    def unavailable(self):
        for m in self.requires:
            try:
                __import__(m)
            except Exception as e:     # noqa: BLE001 -- any import failure means "cannot run"
                return f"not run: cannot import {m} ({type(e).__name__}: {e})"
        return None

    def per_producer(self, n):
        return max(1, n // self.producers)

    # parent side, per round
    def setup(self, n):
        return {}

    def procs(self, res, n):
        """[(side "p" or "c", target, args)], producers first."""
        raise NotImplementedError

    def cleanup(self, res):
        pass

    def evaluate(self, outs, n):
        """(elapsed s, {metric: value}, details) from the parties' results; raises CaseFailed."""
        prods = [o for o in outs if "t0" in o]
        cons = [o for o in outs if "t_end" in o]
        elapsed = max(c["t_end"] for c in cons) - min(p["t0"] for p in prods)
        self.check(prods, cons, n)
        details = {"elapsed_s": elapsed, "producer_s": [p["t1"] - p["t0"] for p in prods],
                   "received": [c["n"] for c in cons]}
        if "batches" in cons[0]:
            details["recv_many_calls"] = cons[0]["batches"]
        return elapsed, self.metrics(prods, cons, elapsed), details

    def check(self, prods, cons, n):
        sent = [p["sent"] for p in prods]
        want_n = sum(sent)
        want_sum = sum(pool_sum(k) for k in sent)
        got_n, got_sum = sum(c["n"] for c in cons), sum(c["sum"] for c in cons)
        if (got_n, got_sum) != (want_n, want_sum):
            raise CaseFailed(f"received {got_n} messages (checksum {got_sum}); sent {want_n} (checksum {want_sum})")

    def metrics(self, prods, cons, elapsed):
        return {"rate": sum(p["sent"] for p in prods) / elapsed / 1e6}


# ---------------------------------------------------------------------------- shmring rings

class ShmMessages(Case):
    requires = ("shmring",)

    def __init__(self, workload, producers, consumers, kind=None, transport=None):
        super().__init__(workload, transport or SHM[workload], producers, consumers)
        self.kind = kind or workload

    def setup(self, n):
        import shmring
        name = uniq("bench_multi")
        kw = {"producers": self.producers} if self.kind in ("mpsc", "mpmc") else {}
        ring = shmring.Ring.create(name, MSG_CAP, kind=self.kind, **kw)
        return {"name": name, "ring": ring}

    def cleanup(self, res):
        import shmring
        res["ring"].close()
        shmring.unlink(res["name"], missing_ok=True)

    def procs(self, res, n):
        k = n if self.workload == "broadcast" else self.per_producer(n)
        return ([("p", shm_producer, (res["name"], k))] * self.producers
                + [("c", shm_consumer, (res["name"],))] * self.consumers)


# ---------------------------------------------------------------------------- queues

class _QueueMixin:
    def new_queue(self, nbytes=1 << 20):
        if self.ff:
            import faster_fifo
            return faster_fifo.Queue(max_size_bytes=nbytes)
        return CTX.Queue()

    def cleanup(self, res):
        for q in res.get("qs", []):
            q.close()


class QueueMessages(_QueueMixin, Case):
    """mpsc / mpmc peers: one queue, P producers, C getters."""

    def __init__(self, workload, producers, consumers, transport):
        super().__init__(workload, transport, producers, consumers)
        self.ff = transport != MPQ
        self.many = transport == FF_GM
        self.requires = ("faster_fifo",) if self.ff else ()
        if self.many:
            self.note = f"get_many takes up to {FF_MANY} per call"

    def setup(self, n):
        return {"qs": [self.new_queue()], "counter": CTX.Value("q", 0)}

    def procs(self, res, n):
        q = res["qs"][0]
        getter = ff_many_getter if self.many else q_getter
        return ([("p", q_producer, (q, self.per_producer(n)))] * self.producers
                + [("c", getter, (q, self.producers, self.consumers, res["counter"]))] * self.consumers)


class QueueFanOut(_QueueMixin, Case):
    """broadcast peers: one queue per subscriber, the producer puts every message to each."""

    def __init__(self, subscribers, transport):
        super().__init__("broadcast", transport, 1, subscribers)
        self.ff = transport != MPQ
        self.requires = ("faster_fifo",) if self.ff else ()
        self.note = "one queue per subscriber"

    def setup(self, n):
        return {"qs": [self.new_queue() for _ in range(self.consumers)]}

    def procs(self, res, n):
        qs = res["qs"]
        return [("p", q_fanout_producer, (qs, n))] + [("c", q_getter, (q, 1, 1, None)) for q in qs]


# ---------------------------------------------------------------------------- broadcast metrics and checks

class _Fanout:
    def check(self, prods, cons, n):
        sent = prods[0]["sent"]
        for i, c in enumerate(cons):
            if (c["n"], c["sum"]) != (sent, pool_sum(sent)):
                raise CaseFailed(f"subscriber {i} received {c['n']} messages (checksum {c['sum']}); "
                                 f"{sent} were sent (checksum {pool_sum(sent)})")

    def metrics(self, prods, cons, elapsed):
        per = prods[0]["sent"] / elapsed / 1e6
        return {"rate": per, "total": per * len(cons)}


class ShmFanOut(_Fanout, ShmMessages):
    def __init__(self, subscribers):
        super().__init__("broadcast", 1, subscribers)


class QueueFanOutChecked(_Fanout, QueueFanOut):
    pass


# ---------------------------------------------------------------------------- records

class _Records:
    unit = "M rec/s"

    def __init__(self, batch, transport):
        Case.__init__(self, "records", transport, 1, 1)
        self.batch = batch
        self.config = f"{batch} rec/batch"
        self.n_warm = max(4, (1 << 20) // batch)          # ~16 MiB of records
        self.n_min, self.n_max = 4, 10**8

    def check(self, prods, cons, n):
        c = cons[0]
        if c["bad"] or c["n"] != prods[0]["sent"]:
            raise CaseFailed(f"received {c['n']} records of {prods[0]['sent']}; {c['bad']} batches out of order")

    def metrics(self, prods, cons, elapsed):
        rate = prods[0]["sent"] / elapsed / 1e6
        return {"rate": rate, "GBps": rate * REC_DTYPE.itemsize / 1e3}


class ShmRecords(_Records, Case):
    requires = ("shmring",)

    def __init__(self, batch):
        super().__init__(batch, SHM["records"])

    def setup(self, n):
        import shmring
        name = uniq("bench_rec")
        return {"name": name, "ring": shmring.Ring.create(name, REC_CAP, dtype=REC_DTYPE)}

    def cleanup(self, res):
        import shmring
        res["ring"].close()
        shmring.unlink(res["name"], missing_ok=True)

    def procs(self, res, n):
        return [("p", rec_shm_producer, (res["name"], self.batch, n)),
                ("c", rec_shm_consumer, (res["name"], self.batch))]


class QueueRecords(_Records, _QueueMixin, Case):
    def __init__(self, batch, transport):
        super().__init__(batch, transport)
        self.ff = transport == FF_REC
        self.requires = ("faster_fifo",) if self.ff else ()
        self.note = ("tobytes() per batch, frombuffer on receipt" if self.ff
                     else "pickled by the feeder thread; unbounded queue")

    def setup(self, n):
        nbytes = self.batch * REC_DTYPE.itemsize
        return {"qs": [self.new_queue(4 * nbytes + (1 << 20))]}

    def procs(self, res, n):
        q = res["qs"][0]
        return [("p", rec_q_producer, (q, self.batch, n, self.ff)), ("c", rec_q_consumer, (q, self.batch))]


def all_cases():
    cases = []
    for p in FAN_IN:
        cases.append(ShmMessages("mpsc", p, 1))
        if p == 1:
            cases.append(ShmMessages("mpsc", 1, 1, kind="spsc", transport=SPSC_REF))
        cases += [QueueMessages("mpsc", p, 1, t) for t in (MPQ, FF, FF_GM)]
    for s in FAN_OUT:
        cases += [ShmFanOut(s), QueueFanOutChecked(s, MPQ), QueueFanOutChecked(s, FF)]
    for p, c in SHARE:
        cases.append(ShmMessages("mpmc", p, c))
        cases += [QueueMessages("mpmc", p, c, t) for t in (MPQ, FF, FF_GM)]
    for b in REC_BATCHES:
        cases += [ShmRecords(b), QueueRecords(b, MPQ_REC), QueueRecords(b, FF_REC)]
    return cases


# ============================================================================= running

def placement(sides, pin=True):
    """CPU per party: producers round-robin over the first half of the usable CPUs,
    consumers over the second half; None everywhere when not pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return [None] * len(sides)
    half = len(cpus) // 2
    groups = {"p": cpus[:half], "c": cpus[half:]}
    used = {"p": 0, "c": 0}
    out = []
    for s in sides:
        out.append(groups[s][used[s] % len(groups[s])])
        used[s] += 1
    return out


def run_round(case, n, st, timeout):
    """One round in fresh processes: (elapsed s, metrics, details)."""
    res = case.setup(n)
    procs, conns = [], []
    try:
        specs = case.procs(res, n)
        cpus = placement([s for s, _, _ in specs], st.pin)
        go = CTX.Event()
        pipes = [CTX.Pipe(duplex=False) for _ in specs]          # (parent's reader, child's writer)
        for i, ((side, target, args), cpu) in enumerate(zip(specs, cpus)):
            others = [c for j, (r, w) in enumerate(pipes) for c in (r, w) if not (j == i and c is w)]
            p = CTX.Process(target=_child, args=(target, args, pipes[i][1], others, go, cpu), daemon=True,
                            name=f"{target.__name__}#{i}")
            p.start()
            procs.append(p)
        for r, w in pipes:
            w.close()
        conns = [r for r, _ in pipes]
        collect(conns, procs, "ready", READY_TIMEOUT)
        go.set()
        outs = collect(conns, procs, "result", timeout)
        for p in procs:
            p.join(JOIN_TIMEOUT)
        return case.evaluate(outs, n)
    finally:
        _kill(procs)
        for c in conns:
            c.close()
        case.cleanup(res)


def measure(case, st, log):
    """Warm up (growing n until a round lasts st.warm_s), then st.repeats rounds of ~st.round_s."""
    n = case.n_warm
    t_warm = time.monotonic()
    for _ in range(6):
        el, _, _ = run_round(case, n, st, st.warm_timeout)
        if el >= st.warm_s or n >= case.n_max:
            break
        n = min(case.n_max, max(n * 2, int(n * st.warm_s / max(el, 1e-6) * 1.2)))
    per = el / n
    n_run = max(case.n_min, min(case.n_max, int(st.round_s / max(per, 1e-12))))
    timeout = max(st.min_round_timeout, 20 * n_run * per)
    log(f"    warm-up {time.monotonic() - t_warm:.2f} s; n = {n_run} per round")
    values, rounds = {}, []
    for _ in range(st.repeats):
        el, m, d = run_round(case, n_run, st, timeout)
        for k, v in m.items():
            values.setdefault(k, []).append(v)
        rounds.append(d)
    return {"values": values, "n": n_run, "rounds": rounds}


def _procs_note(case, usable):
    k = case.producers + case.consumers
    return f"{k} on {usable}" + (" (oversubscribed)" if k > usable else "")


def study(quick=False, log=print, repeats=None, duration=None, pin=True, only=None):
    st = Settings(quick, repeats, duration, pin)
    usable = len(os.sched_getaffinity(0))
    cases = all_cases()
    if only:
        pat = re.compile(only, re.I)
        cases = [c for c in cases if pat.search(c.key)]
    minfo = report.machine()                     # its date: when the study started
    t_start = time.monotonic()
    rows = []
    for case in cases:
        row = {"workload": case.workload, "config": case.config, "producers": case.producers,
               "consumers": case.consumers, "transport": case.transport, "unit": case.unit,
               "note": case.note, "processes": _procs_note(case, usable),
               "batch": getattr(case, "batch", None), "median": None, "values": [], "error": None}
        rows.append(row)
        log(f"  {case.workload:<10} {case.config:<16} {case.transport:<32} ...")
        reason = case.unavailable()
        if reason:
            row["error"] = reason
            log(f"    {reason}")
            continue
        t0 = time.monotonic()
        try:
            r = measure(case, st, log)
        except CaseFailed as e:
            row["error"] = f"FAILED: {str(e).splitlines()[0][:300]}"
            log(f"    {e}")
            continue
        except Exception as e:           # noqa: BLE001 -- one crash must not lose the others
            row["error"] = f"FAILED: {type(e).__name__}: {e}"
            log(f"    {row['error']}")
            continue
        vals = r["values"]["rate"]
        row.update(median=statistics.median(vals), values=vals, n=r["n"], rounds=r["rounds"])
        for k, v in r["values"].items():
            if k != "rate":
                row[f"{k}_median"] = statistics.median(v)
                row[f"{k}_values"] = v
        log(f"    {row['median']:.4g} {case.unit}  (rounds {', '.join(f'{v:.4g}' for v in vals)}; "
            f"{time.monotonic() - t0:.1f} s)")
    return {"machine": minfo, "mode": "quick" if quick else "full", "repeats": st.repeats,
            "round_s": st.round_s, "pin": pin, "usable_cpus": usable, "only": only,
            "placement": _placement_line(pin, usable), "total_s": time.monotonic() - t_start, "rows": rows}


def _placement_line(pin, usable):
    if not pin or usable < 2:
        return "not pinned (the scheduler places every process)"
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    return (f"producers pinned round-robin to CPU(s) {', '.join(map(str, cpus[:half]))}, consumers / "
            f"subscribers to CPU(s) {', '.join(map(str, cpus[half:]))}")


# ============================================================================= report

def _num(v):
    return report._num(v)


def _find(rows, workload, config, transport):
    for r in rows:
        if (r["workload"], r["config"], r["transport"]) == (workload, config, transport):
            return r
    return None


def _unstable(r):
    v = r.get("values") or []
    return len(v) >= 2 and min(v) > 0 and max(v) / min(v) > UNSTABLE


def _cell(r, fmt=None):
    if r is None:
        return ""
    if r.get("median") is None:
        return "not run" if (r.get("error") or "").startswith("not run") else "FAILED"
    s = fmt(r) if fmt else _num(r["median"])
    return s + ("*" if _unstable(r) else "")


def _ratio(shm, peer):
    if not shm or not peer or shm.get("median") is None or peer.get("median") is None or peer["median"] <= 0:
        return ""
    return f"{shm['median'] / peer['median']:.3g}x"


def _notes(rows, rs):
    out = []
    for r in rs:
        if r is None:
            continue
        if r.get("error"):
            out.append(f"{r['config']} {r['transport']}: {r['error']}")
        elif _unstable(r):
            out.append(f"{r['config']} {r['transport']}: **unstable**, rounds ranged {_num(min(r['values']))} "
                       f"to {_num(max(r['values']))}")
    return out


def _table(res, workload, configs, peers, head, cell=None, extra=None):
    """One wide table: a row per configuration; shmring, its peers, shmring / each peer."""
    rows = res["rows"]
    shm_label = SHM[workload]
    cols = [shm_label] + list(peers)
    out = [f"| {head} | processes / CPUs | " + " | ".join(cols) + " | "
           + " | ".join(f"shmring ÷ {p}" for p in peers) + (" | " + extra[0] if extra else "") + " |",
           "|---|---|" + "---:|" * (len(cols) + len(peers)) + ("---|" if extra else "")]
    used = []
    for cfg in configs:
        rs = [_find(rows, workload, cfg, t) for t in cols]
        if all(r is None for r in rs):
            continue
        used += rs
        procs = next(r["processes"] for r in rs if r is not None)
        shm = rs[0]
        line = (f"| {cfg} | {procs} | " + " | ".join(_cell(r, cell) for r in rs) + " | "
                + " | ".join(_ratio(shm, p) for p in rs[1:]) + (f" | {extra[1](shm)}" if extra else "") + " |")
        out.append(line)
    return out, used


def markdown(res) -> str:
    if "rows" not in res:
        return f"### Multi-party and record rings\n\n{res.get('error', 'no result')}"
    m = res["machine"]
    usable = res["usable_cpus"]
    out = ["### Multi-party and record rings (python -m bench.multi_cases)", "",
           f"Machine: {m['cpu']}, {m['cores']} cores ({usable} usable), {m['kernel']}, Python {m['python']}, "
           f"numpy {m['numpy']}; shmring {m['shmring']}, faster-fifo {m['faster-fifo']}  ",
           f"Run: {res['mode']}, {res['repeats']} rounds of ~{res['round_s']:g} s after warm-up (median shown), "
           f"each round in fresh processes on a fresh ring/queue; {res['placement']}; {m['date']}, "
           f"total {res['total_s']:.0f} s" + (f"; only {res['only']!r}" if res.get("only") else ""),
           ""]
    notes_all = []
    over = ("Rows whose 'processes / CPUs' says *oversubscribed* run more processes than the machine has "
            "usable CPUs: they show contention (time-slicing, a preempted party holding up the others), "
            "not scaling. mp.Queue producers also run a feeder thread each.")

    # 1. mpsc
    t, used = _table(res, "mpsc", [f"{p}->1" for p in FAN_IN], (MPQ, FF, FF_GM), "producers -> consumer")
    if used:
        out += ["**mpsc fan-in**, 64 B messages: total M msg/s (all producers together)", ""] + t
        spsc = _find(res["rows"], "mpsc", "1->1", SPSC_REF)
        mp1 = _find(res["rows"], "mpsc", "1->1", SHM["mpsc"])
        if spsc and spsc.get("median") is not None:
            line = f"Reference, same run: a plain spsc ring 1->1, {_cell(spsc)} M msg/s"
            if mp1 and mp1.get("median") is not None:
                line += f"; the mpsc ring with one producer runs at {100 * mp1['median'] / spsc['median']:.0f}% of it"
            out += ["", line + "."]
        out.append("")
        notes_all += _notes(res["rows"], used + [spsc])

    # 2. broadcast
    def bc(r):
        return f"{_num(r['median'])} ({_num(r.get('total_median'))})"
    t, used = _table(res, "broadcast", [f"1->{s}" for s in FAN_OUT], (MPQ, FF), "producer -> subscribers", cell=bc)
    if used:
        out += ["**broadcast fan-out**, 64 B messages: M msg/s delivered to each subscriber (= the producer's "
                "send rate), in parentheses total deliveries M msg/s; peers: one queue per subscriber, the "
                "producer puts every message to each", ""] + t + [""]
        notes_all += _notes(res["rows"], used)

    # 3. mpmc
    t, used = _table(res, "mpmc", [f"{p}->{c}" for p, c in SHARE], (MPQ, FF, FF_GM), "producers -> consumers")
    if used:
        out += ["**mpmc work-sharing**, 64 B messages: total M msg/s (each message to one consumer)", ""] + t + [""]
        notes_all += _notes(res["rows"], used)

    # 4. records
    def rc(r):
        return f"{_num(r['median'])} ({_num(r.get('GBps_median'))} GB/s)"

    def target(r):
        if r is None or r.get("median") is None:
            return ""
        return f">= {RECORDS_TARGET:g} M rec/s: " + ("met" if r["median"] >= RECORDS_TARGET else "**missed**")
    t, used = _table(res, "records", [f"{b} rec/batch" for b in REC_BATCHES], (MPQ_REC, FF_REC),
                     "batch", cell=rc, extra=("target", target))
    if used:
        out += [f"**records**, 16-byte records ({REC_DTYPE.descr}), 1 producer -> 1 consumer: M records/s "
                "(GB/s); shmring record ring of 4 MiB", ""] + t + [""]
        notes_all += _notes(res["rows"], used)

    out.append("Legend: 'shmring ÷ X' = how many times shmring's median is X's (> 1: shmring faster). "
               "`*` = rounds differ by more than 1.5x (ranges below). " + over)
    if notes_all:
        out += [""] + [f"- {n}" for n in notes_all]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.multi_cases", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of ~0.25 s per case (default 5 of ~0.6 s)")
    ap.add_argument("--repeats", type=int, help="measured rounds per case")
    ap.add_argument("--duration", type=float, help="seconds per measured round")
    ap.add_argument("--no-pin", action="store_true", help="let the scheduler place every process")
    ap.add_argument("--only", metavar="PATTERN",
                    help="regex (case-insensitive) on 'WORKLOAD CONFIG TRANSPORT', e.g. 'mpsc', 'records.*shmring'")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--out", default="bench/out", help="writes multi.md and multi.json here (default bench/out)")
    args = ap.parse_args(argv)
    if args.list:
        for c in all_cases():
            print(c.key)
        return 0
    res = study(args.quick, log=lambda msg: print(msg, file=sys.stderr, flush=True), repeats=args.repeats,
                duration=args.duration, pin=not args.no_pin, only=args.only)
    write_study(args.out, "multi", res, markdown(res))
    print(f"results written to {args.out}/ (multi.md, multi.json); total {res['total_s']:.1f} s", file=sys.stderr)
    return 1 if any(r["error"] and r["error"].startswith("FAILED") for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
