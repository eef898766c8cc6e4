"""shmring.Queue / SimpleQueue / JoinableQueue against the scenarios of
CPython's ``Lib/test/_test_multiprocessing.py`` (``_TestQueue``,
``TestSimpleQueue``, the manager queue test, the nested / mixed start-method
and bad-stdin queue tests), rewritten for shmring and run under the ``fork``
and ``spawn`` start methods; then what the queues add (batches, threads,
many producers and consumers, out-of-band buffers, corrupt messages,
``multiprocess`` and ``Pool`` initializers).

Each CPython scenario is one test named ``test_cpython_*``; where shmring
differs on purpose, the test asserts the shmring behaviour and says why
(README, "multiprocessing queues").  Timing assertions are lower bounds only
(a timed wait did not return early), never speed.
"""
import gc
import multiprocessing
import os
import pickle
import queue as pyqueue
import sys
import threading
import time
import warnings

import multiprocess
import numpy as np
import pytest

import shmring
from shmring import layout as L

import _queue_workers as W
from _procs import finish, start

TIMEOUT1, TIMEOUT2, TIMEOUT3 = 0.1, 0.1, 0.1


@pytest.fixture(params=["fork", "spawn"])
def ctx(request):
    """A standard-library multiprocessing context, per start method."""
    return multiprocessing.get_context(request.param)


def start_parent(procs, ctx, target, *args):
    """A non-daemon child (a daemon process may not start children of its own)."""
    p = ctx.Process(target=target, args=args)
    p.start()
    procs.append(p)
    return p


def timed(f, *args, **kwargs):
    t = time.monotonic()
    try:
        f(*args, **kwargs)
    finally:
        timed.elapsed = time.monotonic() - t


# --------------------------------------------------------------------------
# _TestQueue


def test_cpython_put(ctx, procs):
    q = shmring.Queue(maxsize=6)
    can_start, done = ctx.Event(), ctx.Event()
    p = start(procs, ctx, W.take_n, q, 6, can_start, done)
    assert q.empty() and not q.full()
    q.put(1)
    q.put(2, True)
    q.put(3, True, None)
    q.put(4, False)
    q.put(5, False, None)
    q.put_nowait(6)
    assert not q.empty() and q.full()          # no feeder thread: no sleep needed
    with pytest.raises(pyqueue.Full):
        q.put(7, False)
    with pytest.raises(pyqueue.Full):
        q.put(7, False, None)
    with pytest.raises(pyqueue.Full):
        q.put_nowait(7)
    with pytest.raises(pyqueue.Full):
        timed(q.put, 7, True, TIMEOUT1)
    assert timed.elapsed >= TIMEOUT1 * 0.9
    with pytest.raises(pyqueue.Full):
        q.put(7, False, TIMEOUT2)
    with pytest.raises(pyqueue.Full):
        timed(q.put, 7, True, timeout=TIMEOUT3)
    assert timed.elapsed >= TIMEOUT3 * 0.9
    assert q.qsize() == 6
    can_start.set()
    assert done.wait(60)
    assert q.empty() and not q.full()
    assert finish(p) == 0
    q.close()


def test_cpython_get(ctx, procs):
    q = shmring.Queue()
    can_start, done = ctx.Event(), ctx.Event()
    p = start(procs, ctx, W.put_2_to_5, q, can_start, done)
    assert q.empty()
    can_start.set()
    assert done.wait(60)
    assert not q.empty()
    assert q.get(True, None) == 2
    assert q.get(True) == 3
    assert q.get(timeout=1) == 4
    assert q.get_nowait() == 5
    assert q.empty()
    with pytest.raises(pyqueue.Empty):
        q.get(False)
    with pytest.raises(pyqueue.Empty):
        q.get(False, None)
    with pytest.raises(pyqueue.Empty):
        q.get_nowait()
    with pytest.raises(pyqueue.Empty):
        timed(q.get, True, TIMEOUT1)
    assert timed.elapsed >= TIMEOUT1 * 0.9
    with pytest.raises(pyqueue.Empty):
        q.get(False, TIMEOUT2)
    with pytest.raises(pyqueue.Empty):
        timed(q.get, timeout=TIMEOUT3)
    assert timed.elapsed >= TIMEOUT3 * 0.9
    assert finish(p) == 0
    q.close()


def test_cpython_fork(ctx, procs):
    q = shmring.Queue()
    for i in range(10):
        q.put(i)
    p = start(procs, ctx, W.put_10_to_19, q)
    assert finish(p) == 0                      # the child may exit at once: its items are in the ring
    assert [q.get(timeout=60) for _ in range(20)] == list(range(20))
    with pytest.raises(pyqueue.Empty):
        q.get(False)
    q.close()


def test_cpython_qsize():
    q = shmring.Queue()
    assert q.qsize() == 0
    q.put(1)
    assert q.qsize() == 1
    q.put(5)
    assert q.qsize() == 2
    q.get()
    assert q.qsize() == 1
    q.get()
    assert q.qsize() == 0
    q.close()


def test_cpython_task_done(ctx, procs):
    q = shmring.JoinableQueue()
    workers = [start(procs, ctx, W.task_worker, q) for _ in range(4)]
    for i in range(10):
        q.put(i)
    assert q.join(timeout=120) is True
    for _ in workers:
        q.put(None)
    for p in workers:
        assert finish(p) == 0
    assert q.join(timeout=60) is True          # the None markers were marked done too
    q.close()


def test_cpython_no_import_lock_contention(tmp_path, ctx, procs):
    # a module that uses a queue while being imported (bpo-22853): in a child, so the import is fresh
    (tmp_path / "imported_by_an_imported_module.py").write_text(
        "import shmring\nq = shmring.Queue()\nq.put('knock knock')\nassert q.get(timeout=3) == 'knock knock'\n"
        "q.close()\ndel q\n")
    p = start(procs, ctx, W.import_uses_queue, str(tmp_path))
    assert finish(p) == 0


def test_cpython_timeout():
    q = shmring.Queue()
    t = time.monotonic()
    with pytest.raises(pyqueue.Empty):
        q.get(True, 0.200)
    assert time.monotonic() - t >= 0.100
    q.close()


class NotSerializable:
    def __init__(self):
        self.reduce_was_called = False

    def __reduce__(self):
        self.reduce_was_called = True
        raise AttributeError("not serializable")


def test_cpython_feeder_does_not_stop_on_exception():
    # Differs on purpose: there is no feeder thread, so the pickling error is
    # raised by put() itself (multiprocessing prints it from the feeder
    # thread and drops the item).  The queue stays usable and the size exact.
    q = shmring.Queue()
    with pytest.raises(AttributeError):
        q.put(NotSerializable())
    q.put(True)
    assert q.get(timeout=10) is True
    q.close()
    q = shmring.Queue(maxsize=1)
    with pytest.raises(AttributeError):
        q.put(NotSerializable())
    q.put(True)
    assert q.qsize() == 1
    assert q.get(timeout=10) is True
    assert q.empty()
    q.close()


def test_cpython_feeder_error_hook():
    # Differs on purpose: no feeder thread, so no _on_queue_feeder_error hook;
    # the caller of put() gets the exception (and the object's __reduce__ ran).
    class SafeQueue(shmring.Queue):
        called = []

        @staticmethod
        def _on_queue_feeder_error(e, obj):
            SafeQueue.called.append(obj)
    obj = NotSerializable()
    q = SafeQueue()
    with pytest.raises(AttributeError):
        q.put(obj)
    assert obj.reduce_was_called and SafeQueue.called == []
    q.put(True)
    assert q.get(timeout=10) is True
    q.close()


def test_cpython_closed_queue_put_get_exceptions():
    for q in shmring.Queue(), shmring.JoinableQueue(), shmring.SimpleQueue():
        q.close()
        with pytest.raises(ValueError, match="is closed"):
            q.put("foo")
        with pytest.raises(ValueError, match="is closed"):
            q.get()


# --------------------------------------------------------------------------
# TestSimpleQueue


def test_cpython_simplequeue_empty(ctx, procs):
    q = shmring.SimpleQueue()
    can_start, done = ctx.Event(), ctx.Event()
    p = start(procs, ctx, W.put_empty_twice, q, can_start, done)
    assert q.empty()
    can_start.set()
    assert done.wait(60)
    assert not q.empty()
    assert q.get() is True
    assert q.get() is False
    assert q.empty()
    assert finish(p) == 0


def test_cpython_simplequeue_close_twice():
    q = shmring.SimpleQueue()
    q.close()
    q.close()


def test_cpython_simplequeue_closed():
    # Differs: multiprocessing checks its private pipe ends (_reader/_writer
    # closed); a shmring queue has none, so check what closing promises: this
    # process's roles in the ring are given back, and the object refuses use.
    q = shmring.SimpleQueue()
    q.put(1)
    assert q.get() == 1
    st = q._ring.stats()
    assert sum(p["pid"] == os.getpid() for p in st["producers"]) == 1
    assert sum(c["pid"] == os.getpid() for c in st["consumers"]) == 1
    q.close()
    st = q._ring.stats()
    assert not any(p["pid"] == os.getpid() for p in st["producers"])
    assert not any(c["pid"] == os.getpid() for c in st["consumers"])
    with pytest.raises(ValueError, match="is closed"):
        q.empty()


# --------------------------------------------------------------------------
# the manager queue test, and the process-nesting tests


@pytest.mark.parametrize("cls", [shmring.Queue, shmring.JoinableQueue])
def test_cpython_manager_queue_of_two(cls, ctx, procs):
    q = cls(2)
    q.put(5)
    q.put(6)
    out = shmring.Queue()
    p = start(procs, ctx, W.check_full_queue_of_two, q, out)
    assert out.get(timeout=60) == "ok"
    assert finish(p) == 0
    assert q.empty()
    assert not q.full()


def test_cpython_queue_in_process(ctx, procs):
    # a queue made in a child, passed on to a grandchild (TestStdinBadfiledescriptor)
    p = start_parent(procs, ctx, W.queue_in_process, ctx.get_start_method())
    assert finish(p) == 0


def test_cpython_nested_startmethod(ctx, procs):
    q = shmring.Queue()
    p = start_parent(procs, ctx, W.put_two_and_nest, q, ctx.get_start_method())
    assert finish(p) == 0
    results = []
    while not q.empty():
        results.append(q.get())
    assert sorted(results) == [1, 2]


def test_cpython_mixed_startmethod(procs):
    # Differs on purpose: multiprocessing refuses a fork-context queue in a
    # spawned process (its SemLock); a shmring queue has no context and
    # passes by descriptor, so every start method works with any queue.
    q = shmring.Queue()
    pids = []
    for method in multiprocessing.get_all_start_methods():
        c = multiprocessing.get_context(method)
        p = start(procs, c, W.put_pid, q)
        assert finish(p) == 0
        pids.append(p.pid)
    assert sorted(q.get(timeout=10) for _ in pids) == sorted(pids)


# --------------------------------------------------------------------------
# beyond CPython's scenarios


def test_maxsize_put_blocks_until_a_get(ctx, procs):
    q = shmring.Queue(maxsize=2)
    q.put("first")
    q.put("second")
    out = shmring.Queue()
    started = ctx.Event()
    p = start(procs, ctx, W.blocked_put, q, out, started)
    assert started.wait(60)
    with pytest.raises(pyqueue.Empty):
        out.get(timeout=0.3)                   # still blocked: the queue is full
    assert q.qsize() == 2
    assert q.get(timeout=10) == "first"
    assert out.get(timeout=60) == "put"
    assert finish(p) == 0
    assert [q.get(timeout=10), q.get(timeout=10)] == ["second", "third"]
    assert q.qsize() == 0


def test_join_waits_for_task_done_across_processes(ctx, procs):
    q = shmring.JoinableQueue()
    q.put("job")
    out = shmring.Queue()
    started = ctx.Event()
    p = start(procs, ctx, W.join_then_report, q, out, started)
    assert started.wait(60)
    assert q.get(timeout=10) == "job"
    with pytest.raises(pyqueue.Empty):
        out.get(timeout=0.3)                   # join() still waiting
    q.task_done()
    assert out.get(timeout=60) == "joined"
    assert finish(p) == 0
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()


@pytest.mark.parametrize("batch", [False, True])
def test_many_producers_many_consumers(ctx, procs, batch):
    q = shmring.Queue(capacity=1 << 20)        # small: producers wait for room often
    out = shmring.Queue()
    n = 300
    producers = [start(procs, ctx, W.produce, q, who, n, batch) for who in range(3)]
    consumers = [start(procs, ctx, W.consume, q, out, batch) for _ in range(2)]
    for p in producers:
        assert finish(p) == 0
    for _ in consumers:
        q.put(None)
    results = [out.get(timeout=120) for _ in consumers]
    for p in consumers:
        assert finish(p) == 0
    assert [r[1] for r in results] == ["ok", "ok"]
    total = {}
    for seen, _ in results:
        for who, (k, x) in seen.items():
            t = total.get(who, (0, 0))
            total[who] = (t[0] + k, t[1] ^ x)
    expect = {}
    for who in range(3):
        import zlib
        rng = np.random.default_rng(who)
        x = 0
        for i in range(n):
            a = rng.integers(0, 255, size=int(rng.integers(1, 9000)), dtype=np.uint8)
            x ^= zlib.crc32(a.tobytes())
        expect[who] = (n, x)
    assert total == expect
    assert q.qsize() == 0


def test_threads_put_and_get_concurrently():
    q = shmring.Queue(capacity=1 << 16)
    n, got = 2000, []
    lock = threading.Lock()

    def producer(k):
        for i in range(n):
            q.put((k, i))

    def consumer():
        while True:
            item = q.get(timeout=60)
            if item is None:
                return
            with lock:
                got.append(item)
    ts = [threading.Thread(target=producer, args=(k,)) for k in range(3)]
    cs = [threading.Thread(target=consumer) for _ in range(2)]
    for t in ts + cs:
        t.start()
    for t in ts:
        t.join(120)
    for _ in cs:
        q.put(None)
    for t in cs:
        t.join(120)
    assert sorted(got) == sorted((k, i) for k in range(3) for i in range(n))
    assert q.qsize() == 0
    q.close()


def test_out_of_band_items_arrive_writable_and_equal():
    q = shmring.Queue()
    a = np.arange(1 << 18, dtype=np.float32).reshape(512, 512)
    f = np.asfortranarray(np.arange(30000.0).reshape(100, 300))
    ro = np.arange(5000, dtype=np.int64)
    ro.flags.writeable = False
    big = os.urandom(100_000)
    q.put({"a": a, "f": f, "ro": ro, "big": big, "small": np.arange(3), "ba": bytearray(big)})
    q.put(big)
    q.put(bytearray(big))
    got = q.get(timeout=10)
    assert np.array_equal(got["a"], a) and got["a"].flags.writeable
    assert np.array_equal(got["f"], f) and got["f"].flags.f_contiguous
    assert np.array_equal(got["ro"], ro) and not got["ro"].flags.writeable   # as pickle: read-only stays so
    assert got["big"] == big and got["ba"] == bytearray(big) and np.array_equal(got["small"], np.arange(3))
    b = q.get(timeout=10)
    assert type(b) is bytes and b == big
    ba = q.get(timeout=10)
    assert type(ba) is bytearray and ba == big
    got["a"][0, 0] = -1                        # its own memory: the ring's space is already free
    q.put(0)
    assert q.get() == 0
    assert q._ring.stats()["used"] == 0
    q.close()


def test_too_large_item_is_message_too_large_and_not_counted():
    q = shmring.Queue(capacity=1 << 16)
    with pytest.raises(shmring.MessageTooLarge, match="capacity="):
        q.put(np.zeros(1 << 16, np.uint8))
    with pytest.raises(shmring.MessageTooLarge):
        q.put(b"x" * (1 << 16))
    assert q.qsize() == 0
    q.put("fits")
    assert q.get(timeout=1) == "fits"


def test_full_in_bytes_is_queue_full():
    q = shmring.Queue(capacity=1 << 14)
    blob = os.urandom(3000)
    n = 0
    with pytest.raises(pyqueue.Full):
        while True:
            q.put(blob, timeout=0.05)
            n += 1
    assert n >= 2 and q.qsize() == n
    with pytest.raises(pyqueue.Full):
        q.put_nowait(blob)
    assert q.get(timeout=1) == blob and q.qsize() == n - 1


def test_put_many_get_many():
    q = shmring.Queue()
    q.put_many([1, "two", np.arange(2000), None])
    q.put_many([])
    got = q.get_many(timeout=1)
    assert got[:2] == [1, "two"] and np.array_equal(got[2], np.arange(2000)) and got[3] is None
    with pytest.raises(pyqueue.Empty):
        q.get_many(timeout=0.05)
    q.put_many(range(10))
    assert q.get_many(max_messages_to_get=4) == [0, 1, 2, 3]
    assert q.qsize() == 6
    assert q.get_many(block=False) == [4, 5, 6, 7, 8, 9]
    b = shmring.Queue(maxsize=3)
    with pytest.raises(ValueError, match="never fit"):
        b.put_many(range(4))
    b.put_many(range(2))
    with pytest.raises(pyqueue.Full):
        b.put_many(range(2), timeout=0.05)     # counted in at once: 2 more do not fit
    assert b.qsize() == 2


def test_unpicklable_on_the_consumer_side_raises_and_releases():
    # the class cannot be found where it is unpickled (as with spawn and a
    # class defined in __main__): get raises; the message is consumed, its
    # space released (no EscapedViewWarning: warnings are errors here)
    q = shmring.Queue()
    q.put([np.arange(5000)])          # an out-of-band item (R74; an array on its own is not pickled, R95)
    q.put("after")
    real = pickle.loads

    def broken(*a, **k):
        raise AttributeError("Can't get attribute 'Gone' on <module '__main__'>")
    import shmring.queues as Q
    try:
        Q.pickle.loads = broken
        with pytest.raises(AttributeError):
            q.get(timeout=1)
    finally:
        Q.pickle.loads = real
    gc.collect()
    assert q.get(timeout=1) == "after"
    assert q._ring.stats()["used"] == 0


def test_corrupt_messages_are_corrupt_segment_error():
    q = shmring.Queue()
    q.put(0)                                     # joins this thread as producer
    assert q.get() == 0
    raw = q._ring.producer()                     # a second producer writing what a queue never would
    raw.send(b"XXXX not a pickle")
    raw.send({"not": "an item"})                 # an object message (msgpack): a queue sends none
    bad = np.zeros(64, np.uint8)
    bad[:4] = np.frombuffer(b"SHQB", np.uint8)
    bad[4:8] = np.frombuffer((1).to_bytes(4, "little"), np.uint8)      # one buffer ...
    bad[16:24] = np.frombuffer((48).to_bytes(8, "little"), np.uint8)   # ... at 48 ...
    bad[24:32] = np.frombuffer((1 << 40).to_bytes(8, "little"), np.uint8)   # ... of 2**40 bytes
    raw.send(bad)
    raw.detach()
    for _ in range(3):
        q._add(L.Q_OFF_ITEMS, 1)
        with pytest.raises(shmring.CorruptSegmentError):
            q.get(timeout=1)
    q.put("still works")
    assert q.get(timeout=1) == "still works"


def test_queue_pickles_outside_process_start():
    # unlike multiprocessing, a queue may travel inside another queue
    inner, outer = shmring.Queue(), shmring.Queue()
    outer.put(inner)
    again = outer.get(timeout=1)
    again.put("through the copy")
    assert inner.get(timeout=1) == "through the copy"
    with pytest.raises(shmring.IncompatibleSegment):   # a Queue's ring is no JoinableQueue's
        shmring.queues._rebuild(shmring.JoinableQueue, inner._ring, 0.0)
    with pytest.raises(shmring.IncompatibleSegment):   # a plain mpmc ring is no queue's
        shmring.queues._rebuild(shmring.Queue, shmring.Ring.anonymous(1 << 16, kind="mpmc"), 0.0)


def test_fork_child_takes_its_own_handles(procs):
    q = shmring.Queue()
    q.put("parent")                               # the parent joined as producer
    assert q.get() == "parent"
    c = multiprocessing.get_context("fork")
    p = start(procs, c, W.put_pid, q)
    assert finish(p) == 0
    assert q.get(timeout=10) == p.pid
    q.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_with_multiprocess_package(method, procs):
    c = multiprocess.get_context(method)
    q = shmring.Queue()
    p = start(procs, c, W.put_pid, q)
    assert finish(p) == 0
    assert q.get(timeout=10) == p.pid
    lam = shmring.Queue()
    p = start(procs, c, W.put_array, lam, 1000)
    assert finish(p) == 0
    assert np.array_equal(lam.get(timeout=10), np.arange(1000.0))


@pytest.mark.parametrize("lib", ["multiprocessing", "multiprocess"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_initializer(lib, method):
    c = (multiprocessing if lib == "multiprocessing" else multiprocess).get_context(method)
    q = shmring.Queue()
    with c.Pool(2, initializer=W.init_worker, initargs=(q,)) as pool:
        assert sorted(pool.map(W.pool_task, range(8))) == list(range(8))
    got = [q.get(timeout=10) for _ in range(8)]
    assert sorted(sq for _, sq in got) == [x * x for x in range(8)]
    with pytest.raises(pyqueue.Empty):
        q.get_nowait()


def test_dropped_queue_gives_roles_back_quietly():
    q = shmring.Queue()
    ring = q._ring
    q.put(1)
    q.get()
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no ResourceWarning from the handles
        del q
        gc.collect()
    st = ring.stats()
    assert not any(p["pid"] == os.getpid() for p in st["producers"])
    assert not any(c["pid"] == os.getpid() for c in st["consumers"])


def test_bad_arguments():
    with pytest.raises(TypeError):
        shmring.Queue(maxsize=1.5)
    with pytest.raises(ValueError):
        shmring.Queue(capacity=1000)
    q = shmring.Queue()
    with pytest.raises(ValueError):
        q.get_many(max_messages_to_get=0)
    q.close()
    with pytest.raises(ValueError):
        pickle.dumps(q)
    q2 = shmring.Queue()
    with pytest.raises(AssertionError):
        q2.join_thread()
    q2.close()
    q2.join_thread()
    q2.cancel_join_thread()
    assert sys.modules["shmring.queues"].Empty is pyqueue.Empty


def test_a_thread_that_ends_gives_its_handles_back():
    q = shmring.Queue()

    def work():
        q.put("from a thread")
        assert q.get(timeout=10) == "from a thread"
    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    gc.collect()
    st = q._ring.stats()
    assert not any(p["pid"] == os.getpid() for p in st["producers"])
    assert not any(c["pid"] == os.getpid() for c in st["consumers"])
    q.put(1)                                    # this thread joins now
    assert q.get(timeout=1) == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_items_use_the_standard_pickler_not_dill():
    q = shmring.Queue()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        q.put(lambda x: x)
    assert q.qsize() == 0
    a, b = multiprocessing.Pipe()                 # multiprocessing's reducers: a connection travels
    q.put(a)
    a2 = q.get(timeout=10)
    a2.send("through a pickled connection")
    assert b.recv() == "through a pickled connection"
    b.close()                                     # (a and a2 close when collected)


# --------------------------------------------------------------------------
# get(lease=True): out-of-band buffers as views of the ring (R87)

def test_get_lease_gives_read_only_views_that_hold_the_ring_space_until_they_die():
    q = shmring.Queue(capacity=1 << 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no EscapedViewWarning: leasing is the point
        q.put({"a": np.arange(4096, dtype=np.int32), "n": 1})
        got = q.get(lease=True, timeout=10)
        a = got["a"]
        assert got["n"] == 1 and a.tolist() == list(range(4096)) and not a.flags.writeable
        with pytest.raises(ValueError):
            a[0] = 5
        del got
        kept = 0                                             # the leased 16 KiB stays held: the ring fills
        with pytest.raises(pyqueue.Full):
            while True:
                q.put(np.full(4096, kept, np.int32), timeout=0.05)
                kept += 1
        assert 0 < kept < 4
        assert a.tolist() == list(range(4096))               # never overwritten while held
        del a                                                # the view dies: its message is released
        gc.collect()
        q.put(np.full(4096, -1, np.int32), timeout=10)
        for i in range(kept):
            assert q.get(timeout=10).tolist() == [i] * 4096
        b = q.get(timeout=10, lease=True)
        assert b.tolist() == [-1] * 4096
        del b
        q.put(b"small", timeout=10)                          # items without buffers: as a plain get
        assert q.get(lease=True, timeout=10) == b"small"
        assert q.qsize() == 0
        with pytest.raises(pyqueue.Empty):
            q.get(lease=True, timeout=0.01)
    q.close()


def test_get_lease_of_a_corrupt_item_raises_and_releases():
    q = shmring.Queue(capacity=1 << 16)
    prod = q._producer()
    with prod.reserve_array((64,), np.uint8) as arr:
        arr[:] = 7
        arr[:4] = np.frombuffer(b"SHQB", np.uint8)           # an out-of-band item (R74) ...
        arr[4:8] = np.frombuffer((9).to_bytes(4, "little"), np.uint8)   # ... of 9 buffers in 64 bytes
    q._add(L.Q_OFF_ITEMS, 1)
    with pytest.raises(shmring.CorruptSegmentError):
        q.get(lease=True, timeout=10)
    q.put(np.ones(2000), timeout=10)
    assert q.get(lease=True, timeout=10).sum() == 2000
    q.close()


def test_get_lease_across_processes_keeps_every_held_array_intact(ctx, procs):
    """A child puts checksummed arrays into a small ring; the parent leases them and holds
    the last three at any time while the ring's space is reused: each checks out when it
    arrives and again when it is dropped.  (Holding any one for good would stop the ring
    once it wraps around to it: space comes back in ring order, R87.)"""
    import collections
    import zlib
    q = shmring.Queue(capacity=1 << 18)
    child = start(procs, ctx, W.put_arrays_with_checksums, q, 60)
    held, n = collections.deque(), 0
    while True:
        item = q.get(timeout=60, lease=True)
        if item is None:
            break
        i, crc, a = item
        assert i == n and zlib.crc32(a.tobytes()) == crc, i
        assert not a.flags.writeable or a.nbytes < shmring.queues.OOB_MIN, i   # small buffers: in the pickle
        held.append((i, crc, a))
        del item, a
        if len(held) > 3:
            j, crc, a = held.popleft()
            assert zlib.crc32(a.tobytes()) == crc, j         # unchanged while it was held
            del a
        n += 1
    assert finish(child) == 0 and n == 60
    assert all(zlib.crc32(a.tobytes()) == crc for _, crc, a in held)
    held.clear()
    q.close()
