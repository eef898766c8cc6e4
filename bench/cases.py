"""The cases: one transport on one workload, as a producer side "a" and a consumer side "b".

Workloads (``Case.workload``) and their metrics:

* ``64B-stream``, ``4KiB-stream`` -- messages of that size, a -> b, as fast as possible: M msg/s.
* ``1MiB-stream``, ``16MiB-stream`` -- float32 arrays of that size: GB/s (1e9 B/s); the
  consumer touches two elements of each array.
* ``1MiB-stream-sum``, ``16MiB-stream-sum`` -- the same, but the consumer sums the whole
  array (``a.sum()``): every byte is read on the receiving side too.
* ``pingpong-64B`` -- a sends 64 B, b echoes it back: round-trip time, median and p99 in us.

Verification, so that a broken transport cannot look fast:

* small messages come from a pool of 1024 prebuilt messages of the workload's size
  whose first 8 bytes hold their pool index; the consumer unpacks that u64 from every message
  it receives and sums it; the parent checks the count and the sum;
* arrays carry the message's sequence number in their first and last element;
  the consumer checks both on every message; in the ``-sum`` workloads it also checks
  the sum of the whole array (all other elements are 1.0, so it is exact in float32);
* the ping-pong client checks that every echo carries the index it sent.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import struct
import time
from itertools import count

import numpy as np

from .harness import CTX, CaseFailed

# ----------------------------------------------------------------------------- helpers

POOL_SIZE = 1024
MASK = POOL_SIZE - 1
MSG_SIZE = 64
U64 = struct.Struct("<Q").unpack_from
FF_BATCH = 64
_POOLS: dict[int, list[bytes]] = {}


def msg_pool(size: int) -> list[bytes]:
    """The 1024 prebuilt messages of ``size`` bytes; message j starts with u64 j."""
    p = _POOLS.get(size)
    if p is None:
        p = _POOLS[size] = [struct.pack("<Q", j) + bytes(size - 8) for j in range(POOL_SIZE)]
    return p


POOL = msg_pool(MSG_SIZE)        # the 64 B pool (ping-pong uses it)

_uniq = count()


def uniq(prefix="b"):
    """A name no other run or case uses: includes our pid and a counter."""
    return f"{prefix}{os.getpid()}x{next(_uniq)}"


def pool_sum(n: int) -> int:
    full, r = divmod(n, POOL_SIZE)
    return full * (MASK * POOL_SIZE // 2) + r * (r - 1) // 2


def source_array(count: int) -> np.ndarray:
    """A float32 source with real pages (np.zeros would leave most of them mapped to the
    kernel's shared zero page, which makes reading the source unrealistically cheap)."""
    return np.ones(count, np.float32)


def next_pow2(n: int) -> int:
    return 1 << max(12, (n - 1).bit_length())


perf = time.perf_counter   # CLOCK_MONOTONIC on Linux: comparable across processes


# ----------------------------------------------------------------------------- base classes

class Case:
    """One transport on one workload.  Subclasses fill in setup/open and the loops."""

    workload = ""
    transport = ""
    requires: tuple = ()          # importable modules needed
    note = ""
    pin = None                    # None: follow --pin/--no-pin; False: never pin this case
    shm_ref = ""                  # transport label of the shmring row this row is compared with
    queue_ref = ""                # transport label of the multiprocessing.Queue row
    higher_better = True
    unit = ""
    n_warm, n_min, n_max = 1000, 100, 10**8

    @property
    def key(self):
        return f"{self.workload}/{self.transport}"

    def unavailable(self) -> str | None:
        for m in self.requires:
            try:
                __import__(m)
            except Exception as e:      # noqa: BLE001 -- any import failure means "cannot run"
                return f"not run: cannot import {m} ({type(e).__name__}: {e})"
        return None

    # parent side
    def setup(self):
        return {}

    def cleanup(self, res):
        pass

    # child side
    def open(self, role, res):
        raise NotImplementedError

    def run(self, role, ep, n):
        raise NotImplementedError

    def finish(self, role, ep):
        """Orderly close after the last round; returns data for check_final."""
        self.abandon(role, ep)
        return None

    def abandon(self, role, ep):
        """Close on error (best effort)."""

    # parent-side evaluation
    def check(self, a, b, n):
        pass

    def check_final(self, fa, fb):
        pass

    def details(self, a, b, n):
        return {}


class SmallStream(Case):
    """Messages of ``size`` bytes (64 B or 4 KiB) from a prebuilt pool."""
    unit = "M msg/s"
    queue_ref = "mp.Queue put/get"
    shm_ref = "shmring send(bytes) + recv_bytes()"
    n_warm, n_min, n_max = 20000, 10000, 50_000_000

    def __init__(self, size=MSG_SIZE):
        self.size = size
        self.workload = f"{size}B-stream" if size < 1024 else f"{size >> 10}KiB-stream"

    @property
    def pool(self):
        return msg_pool(self.size)

    def run(self, role, ep, n):
        if role == "a":
            t0 = perf()
            self.produce(ep, n)
            return {"t0": t0, "t1": perf()}
        s = self.consume(ep, n)
        return {"t_end": perf(), "sum": s}

    def check(self, a, b, n):
        if b["sum"] != pool_sum(n):
            raise CaseFailed(f"checksum mismatch: consumer summed {b['sum']}, expected {pool_sum(n)} "
                             f"for {n} messages")

    def elapsed(self, a, b):
        return b["t_end"] - a["t0"]

    def metrics(self, a, b, n):
        return {self.workload: n / self.elapsed(a, b) / 1e6}

    def details(self, a, b, n):
        return {"producer_s": a["t1"] - a["t0"]}


class LargeStream(Case):
    unit = "GB/s"
    queue_ref = "mp.Queue put/get (pickle)"
    shm_ref = "shmring send(arr)"

    def __init__(self, nbytes, summing=False):
        self.nbytes = nbytes
        self.count = nbytes // 4
        self.summing = summing
        self.workload = f"{nbytes >> 20}MiB-stream" + ("-sum" if summing else "")
        self.n_warm = max(4, (64 << 20) // nbytes)
        self.n_min, self.n_max = 4, 10**7

    def bad_array(self, a, i) -> bool:
        """The consumer's per-message check: first and last element carry the sequence
        number ``i``; with ``summing``, the whole array is also summed and checked (every
        other element is 1.0; all partial sums are integers < 2**24, so float32 is exact)."""
        if a[0] != i or a[-1] != i:
            return True
        return self.summing and a.sum() != self.count - 2 + 2 * i

    def run(self, role, ep, n):
        if role == "a":
            t0 = perf()
            self.produce(ep, n)
            return {"t0": t0, "t1": perf()}
        bad = self.consume(ep, n)
        return {"t_end": perf(), "bad": bad}

    def check(self, a, b, n):
        if b["bad"]:
            raise CaseFailed(f"{b['bad']} of {n} arrays arrived with a wrong sequence number in "
                             "their first/last element")

    def elapsed(self, a, b):
        return b["t_end"] - a["t0"]

    def metrics(self, a, b, n):
        return {self.workload: n * self.nbytes / self.elapsed(a, b) / 1e9}

    def details(self, a, b, n):
        return {"producer_s": a["t1"] - a["t0"]}

    def src(self, ep):
        """The producer's source array, made once per process."""
        a = ep.get("src")
        if a is None:
            a = ep["src"] = source_array(self.count)
        return a


class PingPong(Case):
    """Round trips of one 64-byte message.  With ``gap`` > 0 (the "-idle" workload) the
    client sleeps that long between round trips (outside the timed part), so a
    blocking waiter on the other side has really gone to sleep when the ping
    arrives: that measures wake-ups, not spin windows."""
    unit = "us"
    higher_better = False
    queue_ref = "mp.Queue pair"
    shm_ref = "shmring blocking (spin=0)"
    n_warm, n_min, n_max = 500, 300, 5_000_000
    gap = 0.0

    def __init__(self, gap=0.0):
        self.gap = gap
        self.workload = "pingpong-64B-idle" if gap else "pingpong-64B"
        if gap:
            self.n_warm, self.n_min = 100, 300

    def run(self, role, ep, n):
        if role == "a":
            lat = np.empty(n, np.int64)
            t0 = perf()
            bad = self.ping(ep, n, lat)
            t1 = perf()
            q = np.percentile(lat, [50, 99]) / 1e3
            return {"t0": t0, "t1": t1, "bad": bad, "median": float(q[0]), "p99": float(q[1]),
                    "mean": float(lat.mean() / 1e3)}
        self.pong(ep, n)
        return {}

    def check(self, a, b, n):
        if a["bad"]:
            raise CaseFailed(f"{a['bad']} of {n} echoes carried the wrong index")

    def elapsed(self, a, b):
        return a["t1"] - a["t0"]

    def metrics(self, a, b, n):
        return {f"{self.workload}-median": a["median"], f"{self.workload}-p99": a["p99"]}

    def details(self, a, b, n):
        return {"mean_us": a["mean"]}

    # generic loops over send/recv callables (ep = (send, recv))
    def ping(self, ep, n, lat):
        send, recv = ep["send"], ep["recv"]
        pc, sleep, gap = time.perf_counter_ns, time.sleep, self.gap
        pool, u = POOL, U64
        bad = 0
        for i in range(n):
            j = i & MASK
            if gap:
                sleep(gap)
            t = pc()
            send(pool[j])
            r = recv()
            lat[i] = pc() - t
            if u(r)[0] != j:
                bad += 1
        return bad

    def pong(self, ep, n):
        send, recv = ep["send"], ep["recv"]
        for _ in range(n):
            send(recv())


# ----------------------------------------------------------------------------- shmring

class _ShmRing:
    requires = ("shmring",)
    spin = 50e-6

    @staticmethod
    def _create(capacity):
        import shmring
        name = uniq("bench")
        ring = shmring.Ring.create(name, capacity)
        return {"name": name, "ring": ring}

    @staticmethod
    def _destroy(res):
        import shmring
        res["ring"].close()
        shmring.unlink(res["name"], missing_ok=True)

    def setup(self):
        return self._create(self.capacity)

    def cleanup(self, res):
        self._destroy(res)

    def open(self, role, res):
        import shmring
        ring = shmring.Ring.attach(res["name"])
        h = ring.producer(spin=self.spin) if role == "a" else ring.consumer(spin=self.spin)
        return {"ring": ring, "h": h}

    def finish(self, role, ep):
        """Producer closes the stream; the consumer must then see EndOfStream, not a message."""
        import shmring
        out = None
        if role == "a":
            ep["h"].close()
        else:
            try:
                ep["h"].recv_bytes(timeout=5)
                out = "extra message after the last round"
            except shmring.EndOfStream:
                out = "eos"
            except shmring.Timeout:
                out = "no EndOfStream within 5 s after the producer closed"
            ep["h"].close()
        ep["ring"].close()
        return out

    def abandon(self, role, ep):
        ep["h"].close()
        ep["ring"].close()

    def check_final(self, fa, fb):
        if fb != "eos":
            raise CaseFailed(f"shmring end-of-stream check: {fb}")


class ShmSmallBytes(_ShmRing, SmallStream):
    transport = "shmring send(bytes) + recv_bytes()"
    capacity = 1 << 20

    def produce(self, ep, n):
        send, pool = ep["h"].send, self.pool
        for i in range(n):
            send(pool[i & MASK])

    def consume(self, ep, n):
        recv, u = ep["h"].recv_bytes, U64
        s = 0
        for _ in range(n):
            s += u(recv())[0]
        return s


class ShmSmallZeroCopy(ShmSmallBytes):
    transport = "shmring send(bytes) + with recv() as msg"
    note = "zero-copy receive (msg.value memoryview)"

    def consume(self, ep, n):
        recv, u = ep["h"].recv, U64
        s = 0
        for _ in range(n):
            with recv() as m:
                s += u(m.value)[0]
        return s


RING_MESSAGES = int(os.environ.get("SHMRING_BENCH_RING_MESSAGES", "4"))


class ShmLargeSend(_ShmRing, LargeStream):
    transport = "shmring send(arr)"

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        # 4 messages' worth by default; SHMRING_BENCH_RING_MESSAGES=2 measures the smallest
        # ring a big message fits twice with the double map (R60: 32 MiB for 16 MiB arrays)
        self.capacity = next_pow2(max(8 << 20, RING_MESSAGES * nbytes))
        self.note = ("one copy (producer), consumer " + ("sums" if summing else "reads a[0], a[-1] of")
                     + " a zero-copy view")

    def produce(self, ep, n):
        send = ep["h"].send
        src = self.src(ep)
        for i in range(n):
            src[0] = i
            src[-1] = i
            send(src)

    def consume(self, ep, n):
        recv = ep["h"].recv
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            with recv() as m:
                a = m.value
                if bad_array(a, i):
                    bad += 1
                del a
        return bad


class ShmLargeReserve(ShmLargeSend):
    transport = "shmring reserve_array (fill in place)"

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        self.note = "NO copy: producer writes only out[0], out[-1] (not comparable to one-copy rows)"
        if summing:
            self.note += ("; the sum is computed but not checked (the body holds whatever the ring held "
                          "before: nobody wrote it)")

    def bad_array(self, a, i):
        if a[0] != i or a[-1] != i:
            return True
        if self.summing:
            a.sum()
        return False

    def produce(self, ep, n):
        rsv = ep["h"].reserve_array
        shape, f32 = (self.count,), np.float32
        for i in range(n):
            with rsv(shape, f32) as out:
                out[0] = i
                out[-1] = i


class ShmPingPong(_ShmRing, PingPong):
    capacity = 1 << 16

    def __init__(self, spin, label, busy, gap=0.0):
        super().__init__(gap)
        self.spin = spin
        self.transport = label
        self.busy = busy
        if busy:
            self.shm_ref = "shmring busy-poll (spin=1 s)"

    def setup(self):
        ping = self._create(self.capacity)
        try:
            return {"ping": ping, "pong": self._create(self.capacity)}
        except BaseException:
            self._destroy(ping)
            raise

    def cleanup(self, res):
        for r in res.values():
            self._destroy(r)

    def open(self, role, res):
        import shmring
        ping = shmring.Ring.attach(res["ping"]["name"])
        pong = shmring.Ring.attach(res["pong"]["name"])
        if role == "a":
            p, c = ping.producer(spin=self.spin), pong.consumer(spin=self.spin)
        else:
            p, c = pong.producer(spin=self.spin), ping.consumer(spin=self.spin)
        return {"rings": (ping, pong), "p": p, "c": c, "send": p.send, "recv": c.recv_bytes}

    def finish(self, role, ep):
        self.abandon(role, ep)

    def abandon(self, role, ep):
        ep["p"].close()
        ep["c"].close()
        for r in ep["rings"]:
            r.close()

    def check_final(self, fa, fb):
        pass


# ----------------------------------------------------------------------------- multiprocessing.Queue

class QueueSmall(SmallStream):
    transport = "mp.Queue put/get"

    def setup(self):
        return {"q": CTX.Queue()}

    def cleanup(self, res):
        res["q"].close()

    def open(self, role, res):
        return {"q": res["q"]}

    def produce(self, ep, n):
        put, pool = ep["q"].put, self.pool
        for i in range(n):
            put(pool[i & MASK])

    def consume(self, ep, n):
        get, u = ep["q"].get, U64
        s = 0
        for _ in range(n):
            s += u(get())[0]
        return s

    def abandon(self, role, ep):
        ep["q"].cancel_join_thread()


class QueueLarge(LargeStream):
    transport = "mp.Queue put/get (pickle)"
    note = "pickled in a feeder thread; pool of 8 arrays, maxsize=4"
    POOL_N, MAXSIZE = 8, 4        # a pooled array is reused only after it was received

    def setup(self):
        return {"q": CTX.Queue(maxsize=self.MAXSIZE)}

    def cleanup(self, res):
        res["q"].close()

    def open(self, role, res):
        ep = {"q": res["q"]}
        if role == "a":
            ep["pool"] = [source_array(self.count) for _ in range(self.POOL_N)]
        return ep

    def produce(self, ep, n):
        put, pool, k = ep["q"].put, ep["pool"], self.POOL_N
        for i in range(n):
            a = pool[i % k]
            a[0] = i
            a[-1] = i
            put(a)

    def consume(self, ep, n):
        get = ep["q"].get
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            a = get()
            if bad_array(a, i):
                bad += 1
        return bad

    def abandon(self, role, ep):
        ep["q"].cancel_join_thread()


class QueuePingPong(PingPong):
    transport = "mp.Queue pair"

    def setup(self):
        return {"q1": CTX.Queue(), "q2": CTX.Queue()}

    def cleanup(self, res):
        for q in res.values():
            q.close()

    def open(self, role, res):
        q1, q2 = res["q1"], res["q2"]
        if role == "a":
            return {"qs": (q1, q2), "send": q1.put, "recv": q2.get}
        return {"qs": (q1, q2), "send": q2.put, "recv": q1.get}

    def abandon(self, role, ep):
        for q in ep["qs"]:
            q.cancel_join_thread()


# ----------------------------------------------------------------------------- multiprocessing.Pipe

class PipeSmall(SmallStream):
    transport = "mp.Pipe send_bytes/recv_bytes"

    def setup(self):
        r, w = CTX.Pipe(duplex=False)
        return {"r": r, "w": w}

    def cleanup(self, res):
        res["r"].close()
        res["w"].close()

    def open(self, role, res):
        return {"c": res["w"] if role == "a" else res["r"]}

    def produce(self, ep, n):
        send, pool = ep["c"].send_bytes, self.pool
        for i in range(n):
            send(pool[i & MASK])

    def consume(self, ep, n):
        recv, u = ep["c"].recv_bytes, U64
        s = 0
        for _ in range(n):
            s += u(recv())[0]
        return s


class PipeLarge(LargeStream):
    transport = "mp.Pipe send_bytes/recv_bytes"
    note = "copies through the kernel; np.frombuffer on the received bytes"

    setup = PipeSmall.setup
    cleanup = PipeSmall.cleanup
    open = PipeSmall.open

    def produce(self, ep, n):
        send = ep["c"].send_bytes
        src = self.src(ep)
        for i in range(n):
            src[0] = i
            src[-1] = i
            send(src)

    def consume(self, ep, n):
        recv = ep["c"].recv_bytes
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            a = np.frombuffer(recv(), np.float32)
            if bad_array(a, i):
                bad += 1
        return bad


class PipePickle5Large(LargeStream):
    transport = "mp.Pipe pickle protocol 5 (out-of-band)"
    note = ("pickle.dumps(arr, protocol=5, buffer_callback=...): the header and the raw buffer as two "
            "send_bytes, pickle.loads(header, buffers=[recv_bytes()]) on the consumer (no pickle copy; "
            "copies through the kernel)")

    setup = PipeSmall.setup
    cleanup = PipeSmall.cleanup
    open = PipeSmall.open

    def produce(self, ep, n):
        send = ep["c"].send_bytes
        dumps = pickle.dumps
        src = self.src(ep)
        for i in range(n):
            src[0] = i
            src[-1] = i
            bufs = []
            head = dumps(src, protocol=5, buffer_callback=bufs.append)
            send(bytes((len(bufs),)) + head)      # first byte: how many buffers follow
            for b in bufs:
                send(b.raw())
            del bufs

    def consume(self, ep, n):
        recv = ep["c"].recv_bytes
        loads = pickle.loads
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            head = recv()
            bufs = [recv() for _ in range(head[0])]
            a = loads(memoryview(head)[1:], buffers=bufs)
            if bad_array(a, i):
                bad += 1
        return bad


class PipePingPong(PingPong):
    transport = "mp.Pipe (duplex)"

    def setup(self):
        a, b = CTX.Pipe()
        return {"a": a, "b": b}

    def cleanup(self, res):
        res["a"].close()
        res["b"].close()

    def open(self, role, res):
        c = res[role]
        return {"send": c.send_bytes, "recv": c.recv_bytes}


# ----------------------------------------------------------------------------- shared_memory + Pipe handoff

class ShmPipeLarge(LargeStream):
    transport = "shared_memory + Pipe handoff"
    note = "hand-rolled: np.copyto into one of 4 slots, slot index over a Pipe and back"
    SLOTS = 4

    def setup(self):
        from multiprocessing import shared_memory
        shm = shared_memory.SharedMemory(name=uniq("bench_shm"), create=True, size=self.SLOTS * self.nbytes)
        a, b = CTX.Pipe()
        return {"shm": shm, "a": a, "b": b}

    def cleanup(self, res):
        res["a"].close()
        res["b"].close()
        res["shm"].close()
        res["shm"].unlink()

    def open(self, role, res):
        buf = res["shm"].buf           # inherited mapping (fork): no second attach, no tracker noise
        views = [np.ndarray(self.count, np.float32, buffer=buf, offset=k * self.nbytes)
                 for k in range(self.SLOTS)]
        ep = {"c": res[role], "views": views}
        if role == "a":
            ep["free"] = list(range(self.SLOTS))
            ep["src"] = source_array(self.count)
        return ep

    def produce(self, ep, n):
        conn, views, free, src = ep["c"], ep["views"], ep["free"], ep["src"]
        copyto = np.copyto
        for i in range(n):
            k = free.pop() if free else conn.recv()
            src[0] = i
            src[-1] = i
            copyto(views[k], src)
            conn.send(k)

    def consume(self, ep, n):
        conn, views = ep["c"], ep["views"]
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            k = conn.recv()
            a = views[k]
            if bad_array(a, i):
                bad += 1
            conn.send(k)
        return bad

    def abandon(self, role, ep):
        ep["views"].clear()


# ----------------------------------------------------------------------------- pyzmq

class _Zmq:
    requires = ("zmq",)
    a_type, b_type = "PUSH", "PULL"
    hwm = None

    def setup(self):
        path = f"/tmp/{uniq('bench_zmq')}.ipc"
        return {"path": path, "addr": f"ipc://{path}"}

    def cleanup(self, res):
        try:
            os.unlink(res["path"])
        except FileNotFoundError:
            pass

    def open(self, role, res):
        import zmq
        ctx = zmq.Context()
        s = ctx.socket(getattr(zmq, self.a_type if role == "a" else self.b_type))
        s.setsockopt(zmq.LINGER, 0)
        if self.hwm is not None:
            s.setsockopt(zmq.SNDHWM, self.hwm)
            s.setsockopt(zmq.RCVHWM, self.hwm)
        if role == "b":
            s.bind(res["addr"])
        else:
            s.connect(res["addr"])
        return {"ctx": ctx, "s": s, "send": s.send, "recv": s.recv}

    def abandon(self, role, ep):
        ep["s"].close(linger=0)
        ep["ctx"].term()


class ZmqSmall(_Zmq, SmallStream):
    transport = "pyzmq ipc PUSH/PULL copy=False"

    def produce(self, ep, n):
        send, pool = ep["send"], self.pool
        for i in range(n):
            send(pool[i & MASK], copy=False)

    def consume(self, ep, n):
        recv, u = ep["recv"], U64
        s = 0
        for _ in range(n):
            s += u(recv(copy=False))[0]
        return s


class ZmqLarge(_Zmq, LargeStream):
    transport = "pyzmq ipc PUSH/PULL copy=False"
    note = "zero-copy send (tracked, pool of 4), HWM 2; kernel copy + receive copy"
    hwm = 2
    POOL_N = 4

    def open(self, role, res):
        ep = super().open(role, res)
        if role == "a":
            ep["pool"] = [source_array(self.count) for _ in range(self.POOL_N)]
            ep["trackers"] = [None] * self.POOL_N
        return ep

    def produce(self, ep, n):
        send, k, pool, trackers = ep["send"], self.POOL_N, ep["pool"], ep["trackers"]
        for i in range(n):
            j = i % k
            t = trackers[j]
            if t is not None:
                t.wait(30)            # the previous send of this array is done with it
            a = pool[j]
            a[0] = i
            a[-1] = i
            trackers[j] = send(a, copy=False, track=True)

    def consume(self, ep, n):
        recv = ep["recv"]
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            f = recv(copy=False)
            a = np.frombuffer(f.buffer, np.float32)
            if bad_array(a, i):
                bad += 1
            del a, f
        return bad


class ZmqPingPong(_Zmq, PingPong):
    transport = "pyzmq ipc PAIR"
    a_type = b_type = "PAIR"


# ----------------------------------------------------------------------------- faster-fifo

class _FF:
    requires = ("faster_fifo",)
    buf_bytes = 1 << 20

    def setup(self):
        import faster_fifo
        return {"q": faster_fifo.Queue(max_size_bytes=self.buf_bytes)}

    def cleanup(self, res):
        res["q"].close()

    def open(self, role, res):
        return {"q": res["q"]}


class FFSmall(_FF, SmallStream):
    transport = "faster-fifo put/get"

    def produce(self, ep, n):
        put, pool = ep["q"].put, self.pool
        for i in range(n):
            put(pool[i & MASK])

    def consume(self, ep, n):
        get, u = ep["q"].get, U64
        s = 0
        for _ in range(n):
            s += u(get())[0]
        return s


class FFSmallBatched(FFSmall):
    transport = "faster-fifo put_many/get_many"
    note = f"batched: {FF_BATCH} messages per put_many; get_many takes up to 1000"

    def produce(self, ep, n):
        pool = self.pool
        put_many, batches = ep["q"].put_many, [pool[k:k + FF_BATCH] for k in range(0, POOL_SIZE, FF_BATCH)]
        nb = len(batches)
        full, rest = divmod(n, FF_BATCH)
        for i in range(full):
            put_many(batches[i % nb])
        if rest:
            put_many(batches[full % nb][:rest])

    def consume(self, ep, n):
        get_many, u = ep["q"].get_many, U64
        s = 0
        got = 0
        while got < n:
            xs = get_many(max_messages_to_get=min(1000, n - got))
            got += len(xs)
            for x in xs:
                s += u(x)[0]
        return s


class FFLarge(_FF, LargeStream):
    transport = "faster-fifo put/get"
    note = "pickled; shared circular buffer of 4x the message"

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        self.buf_bytes = 4 * nbytes + (1 << 20)

    def produce(self, ep, n):
        put = ep["q"].put
        src = self.src(ep)
        for i in range(n):
            src[0] = i
            src[-1] = i
            put(src)                  # pickles synchronously: src may be reused at once

    def consume(self, ep, n):
        get = ep["q"].get
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            a = get()
            if bad_array(a, i):
                bad += 1
        return bad


class FFPingPong(PingPong):
    transport = "faster-fifo pair"
    requires = ("faster_fifo",)

    def setup(self):
        import faster_fifo
        return {"q1": faster_fifo.Queue(1 << 20), "q2": faster_fifo.Queue(1 << 20)}

    def cleanup(self, res):
        for q in res.values():
            q.close()

    def open(self, role, res):
        q1, q2 = res["q1"], res["q2"]
        if role == "a":
            return {"send": q1.put, "recv": q2.get}
        return {"send": q2.put, "recv": q1.get}


# ----------------------------------------------------------------------------- iceoryx2 (Python bindings)

class _Iox:
    """iceoryx2 publish-subscribe over its shared-memory IPC service.  The subscriber
    polls ``receive()`` (iceoryx2 pub-sub has no blocking receive; blocking needs its
    event service, not benchmarked here); the publisher retries while the subscriber's
    buffer is full (no overflow, nothing dropped)."""
    requires = ("iceoryx2",)
    buffer = 1024
    note = "subscriber busy-polls receive()"

    def setup(self):
        return {"name": uniq("bench_iox")}

    def payload_type(self):
        return ctypes.c_uint8 * getattr(self, "size", MSG_SIZE)

    def _service(self, node, name):
        import iceoryx2 as iox2
        return (node.service_builder(iox2.ServiceName.new(name)).publish_subscribe(self.payload_type())
                .enable_safe_overflow(False).subscriber_max_buffer_size(self.buffer).history_size(0)
                .open_or_create())

    def _publisher(self, svc):
        import iceoryx2 as iox2
        return svc.publisher_builder().backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)

    def open(self, role, res):
        import iceoryx2 as iox2
        iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        svc = self._service(node, res["name"])
        ep = {"node": node, "svc": svc}
        if role == "a":
            ep["pub"] = self._publisher(svc).create()
        else:
            ep["sub"] = svc.subscriber_builder().create()
        return ep

    def abandon(self, role, ep):
        for k in ("pub", "sub", "svc", "node"):
            obj = ep.pop(k, None)
            if obj is not None and hasattr(obj, "delete"):
                obj.delete()


class IoxSmall(_Iox, SmallStream):
    transport = "iceoryx2 pub/sub send_copy"

    def produce(self, ep, n):
        t = self.payload_type()
        pool = ep.get("pool") or ep.setdefault("pool", [t.from_buffer_copy(m) for m in self.pool])
        send = ep["pub"].send_copy
        for i in range(n):
            send(pool[i & MASK])

    def consume(self, ep, n):
        recv, fa = ep["sub"].receive, ctypes.c_uint64.from_address
        s = 0
        got = 0
        while got < n:
            smp = recv()
            if smp is None:
                continue
            s += fa(smp.payload_ptr).value
            got += 1
            del smp
        return s


class IoxLarge(_Iox, LargeStream):
    transport = "iceoryx2 loan_slice_uninit + np.copyto"
    buffer = 2

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        self.note = "one copy into a loaned sample; subscriber busy-polls receive()"

    def payload_type(self):
        import iceoryx2 as iox2
        return iox2.Slice[ctypes.c_uint8]

    def _publisher(self, svc):
        return super()._publisher(svc).initial_max_slice_len(self.nbytes)

    def produce(self, ep, n):
        loan, src = ep["pub"].loan_slice_uninit, self.src(ep)
        arr_t = ctypes.c_float * self.count
        for i in range(n):
            smp = loan(self.nbytes)
            dst = np.frombuffer(arr_t.from_address(smp.payload_ptr), np.float32)
            src[0] = i
            src[-1] = i
            np.copyto(dst, src)
            del dst
            smp.assume_init().send()

    def consume(self, ep, n):
        recv = ep["sub"].receive
        arr_t = ctypes.c_float * self.count
        bad = 0
        bad_array = self.bad_array
        i = 0
        while i < n:
            smp = recv()
            if smp is None:
                continue
            a = np.frombuffer(arr_t.from_address(smp.payload_ptr), np.float32)
            if bad_array(a, i):
                bad += 1
            del a, smp
            i += 1
        return bad


class IoxPingPong(_Iox, PingPong):
    transport = "iceoryx2 pub/sub pair (polling)"
    shm_ref = "shmring busy-poll (spin=1 s)"
    buffer = 16

    def open(self, role, res):
        a = super().open("a" if role == "a" else "b", {"name": res["name"] + "p"})
        b = super().open("b" if role == "a" else "a", {"name": res["name"] + "q"})
        pool = [self.payload_type().from_buffer_copy(m) for m in POOL]
        return {"eps": (a, b), "pub": (a if role == "a" else b)["pub"],
                "sub": (b if role == "a" else a)["sub"], "pool": pool}

    def abandon(self, role, ep):
        for e in ep["eps"]:
            super().abandon(role, e)

    def ping(self, ep, n, lat):
        send, recv, pool = ep["pub"].send_copy, ep["sub"].receive, ep["pool"]
        fa = ctypes.c_uint64.from_address
        pc = time.perf_counter_ns
        bad = 0
        for i in range(n):
            j = i & MASK
            t = pc()
            send(pool[j])
            smp = recv()
            while smp is None:
                smp = recv()
            lat[i] = pc() - t
            if fa(smp.payload_ptr).value != j:
                bad += 1
            del smp
        return bad

    def pong(self, ep, n):
        send, recv, pool = ep["pub"].send_copy, ep["sub"].receive, ep["pool"]
        fa = ctypes.c_uint64.from_address
        for _ in range(n):
            smp = recv()
            while smp is None:
                smp = recv()
            j = fa(smp.payload_ptr).value
            del smp
            send(pool[j])


# ----------------------------------------------------------------------------- raw floors (ping-pong)

class SemPingPong(PingPong):
    transport = "raw posix_ipc.Semaphore pair"
    note = "blocking floor: futex wake-ups only, no payload"
    requires = ("posix_ipc",)

    def setup(self):
        import posix_ipc
        s1 = posix_ipc.Semaphore(f"/{uniq('bench_sem')}", posix_ipc.O_CREX, initial_value=0)
        try:
            s2 = posix_ipc.Semaphore(f"/{uniq('bench_sem')}", posix_ipc.O_CREX, initial_value=0)
        except BaseException:
            s1.unlink()
            s1.close()
            raise
        return {"s1": s1, "s2": s2}

    def cleanup(self, res):
        for s in res.values():
            s.unlink()
            s.close()

    def open(self, role, res):
        return dict(res)

    def ping(self, ep, n, lat):
        up, down = ep["s1"].release, ep["s2"].acquire
        pc, sleep, gap = time.perf_counter_ns, time.sleep, self.gap
        for i in range(n):
            if gap:
                sleep(gap)
            t = pc()
            up()
            down()
            lat[i] = pc() - t
        return 0

    def pong(self, ep, n):
        down, up = ep["s1"].acquire, ep["s2"].release
        for _ in range(n):
            down()
            up()


class SpinPingPong(PingPong):
    transport = "raw shm word spin (Python)"
    note = "busy floor: two u64 words in a shared mmap, Python spin loops"
    shm_ref = "shmring busy-poll (spin=1 s)"

    def setup(self):
        return {"mm": mmap.mmap(-1, 4096)}    # MAP_SHARED | MAP_ANONYMOUS, inherited by fork

    def open(self, role, res):
        mm = res["mm"]
        return {"ping": ctypes.c_uint64.from_buffer(mm, 0), "pong": ctypes.c_uint64.from_buffer(mm, 128),
                "seq": 0}

    def ping(self, ep, n, lat):
        ping, pong, base = ep["ping"], ep["pong"], ep["seq"]
        pc = time.perf_counter_ns
        for i in range(n):
            s = base + i + 1
            t = pc()
            ping.value = s
            while pong.value != s:
                pass
            lat[i] = pc() - t
        ep["seq"] = base + n
        return 0

    def pong(self, ep, n):
        ping, pong, base = ep["ping"], ep["pong"], ep["seq"]
        for i in range(n):
            s = base + i + 1
            while ping.value != s:
                pass
            pong.value = s
        ep["seq"] = base + n

    def abandon(self, role, ep):
        ep.clear()


# ----------------------------------------------------------------------------- registry

MSG_SIZES = (64, 4096)
SIZES = (1 << 20, 16 << 20)
IDLE_GAP = 300e-6     # client's sleep between round trips in the "-idle" ping-pong


def _unpinned(case):
    case.pin = False
    case.note = ("both processes left to the scheduler, which tends to put a blocking ping-pong pair on "
                 "one CPU: a spinning waiter then delays its woken peer by its spin window")
    return case


def all_cases():
    from . import peer_cases as peers      # zenoh, Ray, torch.multiprocessing, Arrow (issue 15 item 4)
    cases = []
    for size in MSG_SIZES:
        cases += [ShmSmallBytes(size), ShmSmallZeroCopy(size), QueueSmall(size), PipeSmall(size),
                  ZmqSmall(size), FFSmall(size), FFSmallBatched(size), IoxSmall(size)] + peers.small_cases(size)
    for summing in (False, True):
        for nb in SIZES:
            cases += [ShmLargeSend(nb, summing), ShmLargeReserve(nb, summing), QueueLarge(nb, summing),
                      ShmPipeLarge(nb, summing), IoxLarge(nb, summing), ZmqLarge(nb, summing),
                      FFLarge(nb, summing), PipeLarge(nb, summing), PipePickle5Large(nb, summing)]
            cases += peers.large_cases(nb, summing)
    cases += peers.interop_cases.frame_cases()      # torch / Arrow rows: issue 17 item 4
    cases += [
        ShmPingPong(1.0, "shmring busy-poll (spin=1 s)", busy=True),
        ShmPingPong(50e-6, "shmring hybrid (spin=50 us, default)", busy=True),
        SpinPingPong(), IoxPingPong(),
        ShmPingPong(0.0, "shmring blocking (spin=0)", busy=False),
        SemPingPong(), QueuePingPong(), PipePingPong(), ZmqPingPong(), FFPingPong(),
    ] + peers.pingpong_cases()
    g = IDLE_GAP          # busy pollers are left out: idle gaps do not change a spinning waiter
    cases += [
        ShmPingPong(50e-6, "shmring hybrid (spin=50 us, default)", busy=False, gap=g),
        ShmPingPong(0.0, "shmring blocking (spin=0)", busy=False, gap=g),
        _unpinned(ShmPingPong(50e-6, "shmring hybrid (spin=50 us), NOT pinned", busy=False, gap=g)),
        SemPingPong(g), QueuePingPong(g), PipePingPong(g), ZmqPingPong(g), FFPingPong(g),
    ] + peers.pingpong_cases(g)
    return cases
