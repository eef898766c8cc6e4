"""The queues' put and get in C (qfast.c): the common case there, everything
else through the Python methods.  These tests attack the edges between the
two: threads (one fast, the others not), a thread that dies and a new one
in its place, fork, close, a full ring, too large an item, hostile bytes,
objects that look plain and are not, JoinableQueue's counts."""
import enum
import gc
import multiprocessing
import os
import queue as pyqueue
import threading
import zlib

import numpy as np
import pytest

import shmring
from shmring import layout as L


class Colour(enum.IntEnum):        # an int subclass: not "plain" for the fast path
    RED = 1


def test_objects_that_look_plain_round_trip_exactly():
    q = shmring.Queue(capacity=1 << 20)
    items = [b"x" * 4095, b"y" * 4096, "s" * 10000, 2 ** 200, -1.5, True, None, 3 + 4j,
             {"a": 1, "b": "two", 3: None}, {"a": np.arange(5000)}, {f"k{i}": i for i in range(65)},
             [1, 2.5, "x"], (1, (2, 3)), [np.ones(3)], (), {}, {Colour.RED: Colour.RED}, [Colour.RED],
             bytearray(b"abc"), frozenset({1, 2})]
    for x in items:
        q.put(x)
    for x in items:
        got = q.get(timeout=5)
        assert type(got) is type(x)
        if isinstance(x, dict) and "a" in x and isinstance(x["a"], np.ndarray):
            assert (got["a"] == x["a"]).all()
        elif isinstance(x, list) and x and isinstance(x[0], np.ndarray):
            assert (got[0] == x[0]).all()
        else:
            assert got == x
    assert q.qsize() == 0
    q.put({Colour.RED: 1})
    assert type(next(iter(q.get(timeout=5)))) is Colour      # the subclass survives


def test_threads_put_and_get_concurrently_and_nothing_is_lost():
    q = shmring.Queue(capacity=1 << 16)           # small: puts wait for room
    n, putters, getters = 3000, 4, 3
    got, errors = [], []

    def put(who):
        try:
            for i in range(n):
                q.put((who, i, zlib.crc32(b"%d-%d" % (who, i))), timeout=60)
        except BaseException as e:                 # noqa: BLE001
            errors.append(e)

    def get():
        try:
            mine = []
            while True:
                item = q.get(timeout=60)
                if item is None:
                    break
                who, i, crc = item
                assert crc == zlib.crc32(b"%d-%d" % (who, i))
                mine.append((who, i))
            got.append(mine)
        except BaseException as e:                 # noqa: BLE001
            errors.append(e)

    gs = [threading.Thread(target=get) for _ in range(getters)]
    ps = [threading.Thread(target=put, args=(w,)) for w in range(putters)]
    for t in gs + ps:
        t.start()
    for t in ps:
        t.join(120)
    for _ in gs:
        q.put(None)
    for t in gs:
        t.join(120)
    assert not errors, errors
    flat = sorted(x for mine in got for x in mine)
    assert flat == [(w, i) for w in range(putters) for i in range(n)]
    for mine in got:                               # each putter's order, per getter
        for w in range(putters):
            seq = [i for who, i in mine if who == w]
            assert seq == sorted(seq)
    assert q.qsize() == 0


def test_a_thread_that_died_leaves_no_handle_to_the_next():
    q = shmring.Queue()
    for k in range(20):                             # each thread joins, puts, gets, and ends
        out = []
        t = threading.Thread(target=lambda: (q.put(k), out.append(q.get(timeout=5))))
        t.start()
        t.join(30)
        assert out == [k]
        gc.collect()
    st = q._ring.stats()
    assert len(st["producers"]) <= 1 and len(st["consumers"]) <= 1, st      # given back as each ended
    q.put("main")
    assert q.get(timeout=5) == "main" and q.qsize() == 0


def _child_uses_queue(q, out):
    q.put(("child", os.getpid()))
    out.put(q.get(timeout=10))


def test_a_forked_child_never_uses_the_parents_handles(procs):
    q = shmring.Queue()
    q.put("parent")                                # the parent's thread is the fast path's
    assert q.get() == "parent"
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_child_uses_queue, args=(q, out), daemon=True)
    p.start()
    procs.append(p)
    assert out.get(timeout=30) == ("child", p.pid)
    p.join(30)
    assert p.exitcode == 0
    q.put("again")
    assert q.get(timeout=5) == "again" and q.qsize() == 0


def test_close_turns_the_fast_path_off():
    q = shmring.Queue()
    q.put(1)
    assert q.get() == 1
    q.close()
    with pytest.raises(ValueError):
        q.put(2)
    with pytest.raises(ValueError):
        q.get(timeout=0.1)


def test_a_full_ring_raises_full_and_leaves_the_count_alone():
    q = shmring.Queue(capacity=1 << 12)
    n = 0
    with pytest.raises(pyqueue.Full):
        while True:
            q.put(b"z" * 100, timeout=0.05)
            n += 1
    assert q.qsize() == n > 0
    with pytest.raises(pyqueue.Full):
        q.put_nowait(b"z" * 100)
    assert q.qsize() == n
    for _ in range(n):
        assert q.get(timeout=5) == b"z" * 100
    assert q.qsize() == 0
    q.put("room again", timeout=5)
    assert q.get(timeout=5) == "room again"


def test_too_large_an_item_says_so_and_leaves_the_count_alone():
    q = shmring.Queue(capacity=1 << 12)
    with pytest.raises(shmring.MessageTooLarge, match="capacity="):
        q.put("s" * 10000)
    assert q.qsize() == 0
    q.put("fits")
    assert q.get(timeout=5) == "fits"


def test_hostile_bytes_are_corrupt_segment_error_and_counted_out():
    q = shmring.Queue()
    q.put(0)
    assert q.get() == 0                            # both fast paths set
    raw = q._ring.producer()
    raw.send(b"\x80\x05not really")                # looks like a pickle, is not one
    raw.send(b"XXXX")
    raw.detach()
    q._add(L.Q_OFF_ITEMS, 2)
    with pytest.raises(Exception) as e1:
        q.get(timeout=5)
    assert not isinstance(e1.value, (pyqueue.Empty, SystemError))
    with pytest.raises(shmring.CorruptSegmentError):
        q.get(timeout=5)
    assert q.qsize() == 0
    q.put("fine")
    assert q.get(timeout=5) == "fine"


def test_joinable_counts_through_the_fast_path():
    q = shmring.JoinableQueue()
    for i in range(100):
        q.put(i)
    assert [q.get(timeout=5) for _ in range(100)] == list(range(100))
    assert not q.join(timeout=0.05)                # 100 unfinished
    for _ in range(100):
        q.task_done()
    assert q.join(timeout=5)
    with pytest.raises(ValueError):
        q.task_done()


def test_bad_arguments_are_type_errors():
    q = shmring.Queue()
    with pytest.raises(TypeError):
        q.put()
    with pytest.raises(TypeError):
        q.put(1, True, None, "extra")
    with pytest.raises(TypeError):
        q.put(1, obj=2)
    with pytest.raises(TypeError):
        q.get(True, None, False)                   # lease is keyword-only
    with pytest.raises(TypeError):
        q.get(nope=1)
    q.put(obj=5, block=True, timeout=1)
    assert q.get(block=True, timeout=1) == 5
