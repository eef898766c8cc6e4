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
