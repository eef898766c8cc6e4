"""A get whose item cannot be unpickled: the item is taken and counted out
(as ``multiprocessing.Queue`` does: its ``get`` releases the item's place
before it unpickles), and nothing else is lost.

Before the fix the failed item stayed counted: ``qsize()`` was one too high
for good, and with ``maxsize`` every such item took a place for ever, until
``put`` blocked on an empty queue.  ``get_many`` dropped the items it had
already taken when a later one failed."""
import queue as pyqueue
import signal
import time

import multiprocess
import numpy as np
import pytest

import shmring

from _queue_bad import Unloadable, put_items


@pytest.fixture
def alarm():
    """A get without a timeout that never returns fails the test after 60 s
    (the queue's waits check for signals between slices) instead of hanging."""
    def expired(signum, frame):
        raise TimeoutError("a get did not return within 60 s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _nowait(q, patience=30.0):
    """get_nowait until it returns: an item is counted from before it is sent (R70), so a
    put under way makes the queue non-empty a moment before get_nowait can take it."""
    end = time.monotonic() + patience
    while True:
        try:
            return q.get_nowait()
        except pyqueue.Empty:
            if time.monotonic() > end:
                raise
            time.sleep(0.001)


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("how", ["get", "get(timeout)", "get_nowait"])
def test_an_item_that_fails_to_unpickle_is_counted_out(method, how, alarm):
    ctx = multiprocess.get_context(method)
    q = shmring.Queue(maxsize=2)
    items = [("unloadable", "one"), 1, ("unloadable", "two"), np.arange(5000.0), 2]
    p = ctx.Process(target=put_items, args=(q, items))
    p.start()
    get = {"get": q.get, "get(timeout)": lambda: q.get(timeout=30), "get_nowait": lambda: _nowait(q)}[how]
    got = []
    try:
        for _ in items:
            try:
                got.append(get())
            except ValueError as e:
                assert "refuses to be unpickled" in str(e)
                got.append("failed")
    finally:
        p.join(40)
        if p.is_alive():
            p.kill()
            p.join()
    assert p.exitcode == 0               # with the leak, the producer's puts ran into Full
    assert got[0] == "failed" and got[1] == 1 and got[2] == "failed" and got[4] == 2
    assert np.array_equal(got[3], np.arange(5000.0))
    assert q.qsize() == 0 and q.empty()
    q.put("a")
    q.put("b")                           # both places are free again
    assert q.full() and q.get() == "a" and q.get() == "b"
    q.close()


def test_joinable_an_item_that_fails_to_unpickle_is_still_a_task():
    # as multiprocessing.JoinableQueue: the get failed, the task was put;
    # the caller marks it done
    q = shmring.JoinableQueue()
    q.put(Unloadable())
    with pytest.raises(ValueError):
        q.get()
    assert q.qsize() == 0
    assert not q.join(timeout=0.05)
    q.task_done()
    assert q.join(timeout=5)
    q.close()


def test_get_many_keeps_what_it_took_before_an_item_that_fails():
    q = shmring.Queue()
    for it in [1, 2, Unloadable(), 3, np.ones(3000)]:
        q.put(it)
    first = q.get_many(timeout=5)
    assert first == [1, 2]                     # the items before the bad one come back
    with pytest.raises(ValueError, match="refuses to be unpickled"):
        q.get_many(timeout=5)                  # then the bad one's error, once
    rest = q.get_many(timeout=5)
    assert rest[0] == 3 and np.array_equal(rest[1], np.ones(3000)) and len(rest) == 2
    assert q.qsize() == 0
    q.close()


def test_get_many_whose_first_item_fails_raises_it_and_keeps_the_rest():
    q = shmring.Queue()
    for it in [Unloadable(), 7, 8]:
        q.put(it)
    with pytest.raises(ValueError):
        q.get_many(timeout=5)
    assert q.get_many(timeout=5) == [7, 8] and q.qsize() == 0
    q.close()
