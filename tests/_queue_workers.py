"""Process targets of tests/test_queue_conformance.py (module level, so they
also run under ``spawn``)."""
import os
import queue as pyqueue
import time
import zlib

import numpy as np

import shmring

DELTA = 0.1


def take_n(q, n, can_start, done):
    can_start.wait(60)
    for _ in range(n):
        q.get(timeout=60)
    done.set()


def put_2_to_5(q, can_start, done):
    can_start.wait(60)
    for i in (2, 3, 4, 5):
        q.put(i)
    done.set()


def put_10_to_19(q):
    for i in range(10, 20):
        q.put(i)


def task_worker(q):
    for obj in iter(q.get, None):
        time.sleep(DELTA / 10)
        q.task_done()
    q.task_done()


def put_empty_twice(q, can_start, done):
    can_start.wait(60)
    try:
        q.put(q.empty())
        q.put(q.empty())
    finally:
        done.set()


def check_full_queue_of_two(q, out):
    # the manager-queue scenario: what a child sees of a maxsize=2 queue holding 5, 6
    try:
        assert q.qsize() == 2
        assert q.full()
        assert not q.empty()
        assert q.get() == 5
        assert not q.empty()
        assert q.get() == 6
        assert q.empty()
        out.put("ok")
    except BaseException as e:
        out.put(repr(e))


def get_nowait_or_empty(q):
    try:
        q.get(block=False)
    except pyqueue.Empty:
        pass


def queue_in_process(method):
    import multiprocessing
    ctx = multiprocessing.get_context(method)
    q = shmring.Queue()
    p = ctx.Process(target=get_nowait_or_empty, args=(q,))
    p.start()
    p.join(60)
    raise SystemExit(0 if p.exitcode == 0 else 1)


def put_one(q):
    q.put(1)


def put_two_and_nest(q, method):
    import multiprocessing
    q.put(2)
    p = multiprocessing.get_context(method).Process(target=put_one, args=(q,))
    p.start()
    p.join(60)


def put_pid(q):
    q.put(os.getpid())


def produce(q, who, n, batch):
    """Items (who, i, payload, crc): the consumer checks each checksum."""
    rng = np.random.default_rng(who)
    items = []
    for i in range(n):
        a = rng.integers(0, 255, size=int(rng.integers(1, 9000)), dtype=np.uint8)
        item = (who, i, a, zlib.crc32(a.tobytes()))
        if batch:
            items.append(item)
            if len(items) == 16:
                q.put_many(items)
                items = []
        else:
            q.put(item)
    if items:
        q.put_many(items)


def consume(q, out, batch):
    """Until None: (count, xor of crc) per producer, the order of each producer's items kept."""
    seen = {}
    last = {}
    while True:
        got = q.get_many(timeout=60) if batch else [q.get(timeout=60)]
        for j, item in enumerate(got):
            if item is None:
                if got[j + 1:]:              # a batch may hold the other consumer's None too: hand it back
                    q.put_many(got[j + 1:])
                out.put((seen, "ok"))
                return
            who, i, a, crc = item
            if zlib.crc32(a.tobytes()) != crc:
                out.put((seen, f"bad checksum {who} {i}"))
                return
            if i <= last.get(who, -1):
                out.put((seen, f"order {who}: {i} after {last[who]}"))
                return
            last[who] = i
            n, x = seen.get(who, (0, 0))
            seen[who] = (n + 1, x ^ crc)


def init_worker(q):
    global _worker_queue
    _worker_queue = q


def pool_task(x):
    _worker_queue.put((os.getpid(), x * x))
    return x


def blocked_put(q, out, started):
    started.set()
    q.put("third")                     # maxsize 2 and full: waits for a get
    out.put("put")


def join_then_report(q, out, started):
    started.set()
    q.join()
    out.put("joined")


def put_array(q, n):
    q.put(np.arange(n, dtype=np.float64))


def import_uses_queue(path):
    import sys
    sys.path.insert(0, path)
    __import__("imported_by_an_imported_module")


def put_arrays_with_checksums(q, n):
    """Put ``n`` arrays of varying sizes and dtypes, each with its crc32, then None."""
    import zlib
    for i in range(n):
        a = (np.arange(1000 + 97 * i) * (i + 1)).astype([np.float32, np.int64, np.uint8][i % 3])
        q.put((i, zlib.crc32(a.tobytes()), a), timeout=60)
    q.put(None, timeout=60)


def array_zoo():
    """Arrays put on their own (R95), with what must come back exactly: dtypes,
    orders, shapes, and the ones that are pickled instead (object dtype, a
    1-D uint8 array that starts like an out-of-band item)."""
    rng = np.random.default_rng(95)
    f = np.asfortranarray(rng.random((7, 5)))
    zoo = [rng.random(1000), f, np.arange(40)[::3], np.array(5.5), np.zeros((0, 3)),
           rng.integers(0, 255, 5000, dtype=np.uint8),
           np.frombuffer(b"SHQB" + bytes(range(60)), np.uint8),
           np.array(["a", "bc", "def"]), np.array([1, -2, 3], dtype=">i4"),
           np.array([(1, 2.5, b"x"), (3, 4.5, b"yz")], dtype=[("a", "<i4"), ("b", "<f8"), ("c", "S2")]),
           np.array(["2020-01-01", "2021-06-30"], dtype="M8[D]"), np.arange(6, dtype=np.complex64).reshape(2, 3),
           np.array([None, 1, "x"], dtype=object),
           (np.arange(1 << 18, dtype=np.float32) * 3).reshape(512, 512)]
    return zoo


def put_array_zoo(q):
    for a in array_zoo():
        q.put(a, timeout=60)


def get_array_zoo(q, out):
    """Get the zoo and report what differs (an empty list: all of it came back)."""
    bad = []
    for i, want in enumerate(array_zoo()):
        got = q.get(timeout=60)
        fortran = want.flags.f_contiguous and not want.flags.c_contiguous
        same = (got.tolist() == want.tolist() if want.dtype == object
                else got.tobytes("A") == want.tobytes("A"))
        if type(got) is not type(want) or got.dtype != want.dtype or got.shape != want.shape or not same \
                or (fortran and not got.flags.f_contiguous) or (want.flags.writeable and not got.flags.writeable):
            bad.append((i, repr(got)[:80]))
    out.put(bad)


def put_checked_arrays(q, who, n, seed):
    """``n`` items (who, i, crc) each followed by its array on its own, of varying sizes and
    dtypes; arrays and small pickled items interleave, so both paths share the ring."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = rng.integers(0, 1 << 30, size=int(rng.integers(0, 40000)))
        a = a.astype([np.float32, np.int64, np.uint8, np.int16][i % 4])
        q.put((who, i, zlib.crc32(a.tobytes()), a.dtype.str, a.shape), timeout=60)
        q.put(a, timeout=60)


def get_checked_arrays(q, out, n):
    """Take ``n`` (header, array) pairs put by put_checked_arrays through a JoinableQueue-free
    plain Queue with one producer per consumer; report (count, xor of crc) or the first fault."""
    got, x = 0, 0
    for _ in range(n):
        who, i, crc, dt, shape = q.get(timeout=60)
        a = q.get(timeout=60)
        if type(a) is not np.ndarray or a.dtype.str != dt or a.shape != shape:
            out.put(f"item {who}/{i}: {type(a).__name__} {getattr(a, 'dtype', None)} {getattr(a, 'shape', None)}")
            return
        if zlib.crc32(a.tobytes()) != crc:
            out.put(f"item {who}/{i}: bad checksum")
            return
        a[...] = 0                      # writable, its own memory
        got, x = got + 1, x ^ crc
    out.put((got, x))


def _self_checking(who, i):
    """An int64 array that says who put it and which it was, its content a function of both."""
    n = 2 + (i * 7919 + who * 104729) % 30000
    a = np.arange(n, dtype=np.int64) * (i + 1) + who
    a[0], a[1] = who, i
    return a


def put_self_checking(q, who, n):
    for i in range(n):
        q.put(_self_checking(who, i), timeout=60)
        if i % 5 == 0:
            q.put(("small", who, i), timeout=60)       # pickled items share the ring
    q.put(None, timeout=60)


def get_self_checking(q, out):
    """Until None: the (who, i) of every array taken, in order per producer; a fault ends it."""
    seen, small = [], 0
    while True:
        a = q.get(timeout=60)
        if a is None:
            out.put((seen, small))
            return
        if type(a) is tuple:
            small += 1
            continue
        who, i = int(a[0]), int(a[1])
        if type(a) is not np.ndarray or not np.array_equal(a, _self_checking(who, i)):
            out.put(f"array {who}/{i} arrived wrong")
            return
        a[0] = -1                       # writable, its own memory
        seen.append((who, i))
