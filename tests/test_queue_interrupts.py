"""Ctrl-C anywhere in a queue's put and get (tests/test_interrupts.py's
storm, aimed at shmring.Queue, whose common case runs in C, qfast.c).

A child puts (or gets) in a loop while this process pelts it with SIGINT;
its handler raises KeyboardInterrupt anywhere but in the harness's frame.
Puts: every put that returned arrived, none arrived twice, every item is
intact, and the queue stays usable.  Gets: every item taken by a get that
returned is one this process put, none twice; an interrupted get may drop
the item it had taken (as with multiprocessing), and nothing else is lost:
what the child got plus what is left in the queue is every item put, but
for at most one per interrupt that landed.  The item count (qsize) is never
low after the storm, and at most one high per interrupt that landed."""
import time
from queue import Full

import multiprocess
import numpy as np

import shmring

from test_interrupts import _arm, _outer, _storm

CTX = multiprocess.get_context("fork")
STORM = 2.5


def _item(i):
    k = i % 3
    if k == 0:
        return i
    if k == 1:
        return {"i": i, "tag": "x" * (i % 50)}
    return np.full(1000 + i % 700, i, np.int64)


def _index(item):
    if isinstance(item, int):
        return item
    if isinstance(item, dict):
        assert item["tag"] == "x" * (item["i"] % 50)
        return item["i"]
    i = int(item[0])
    assert item.shape == (1000 + i % 700,) and (item == i).all()
    return i


def _putter(q, ready, out, duration):
    state, done = {}, []
    _arm(_outer.__code__, state)
    ready.set()
    end = time.monotonic() + duration
    nxt = [0]

    def body():
        while time.monotonic() < end:
            i = nxt[0]
            nxt[0] += 1                       # a number is never put twice, even if interrupted
            q.put(_item(i), timeout=20)
            done.append(i)
    _outer(body, state)
    state["quiet"] = True
    q.put("last", timeout=20)                 # still usable
    out.put((done, nxt[0], state.get("kis", 0), state.get("error")))


def _storm_a_putter(procs, q, duration):
    """A child puts for ``duration`` s under a SIGINT storm while this process takes
    everything (marking each item done on a JoinableQueue); returns the indices taken
    and the child's (done, attempted, interrupts landed), its error checked."""
    ready, out = CTX.Event(), CTX.Queue()
    child = CTX.Process(target=_putter, args=(q, ready, out, duration))
    child.start()
    procs.append(child)
    assert ready.wait(20)
    stop, counter, t = _storm(child)
    got = []
    try:
        while True:
            item = q.get(timeout=30)
            if isinstance(q, shmring.JoinableQueue):
                q.task_done()
            if isinstance(item, str):
                break
            got.append(_index(item))
    finally:
        stop.set()
        t.join()
    done, attempted, kis, error = out.get(timeout=30)
    child.join(20)
    assert child.exitcode == 0 and error is None, error
    print(f"{attempted} puts, {len(done)} returned, {counter[0]} SIGINTs, {kis} landed")
    return got, done, attempted, kis


def test_interrupted_puts_arrive_at_most_once_and_every_returned_put_arrives(procs):
    q = shmring.Queue(capacity=1 << 18)
    got, done, attempted, kis = _storm_a_putter(procs, q, STORM)
    assert kis > 100, f"only {kis} interrupts landed"
    assert len(got) == len(set(got)), "an item arrived twice"
    assert set(done) <= set(got), f"{len(set(done) - set(got))} returned puts never arrived"
    assert set(got) <= set(range(attempted))
    assert got == sorted(got)                 # one producer: in order
    # drained: the count is exact (it went negative on main: an interrupt after the commit
    # undid a sent item's count, and qsize() then read the count as corruption); without
    # maxsize the producer counts an item in the C step that publishes it (R70)
    assert q.qsize() == 0 and q.empty()


def test_interrupted_puts_into_a_joinable_queue_leave_no_phantom_task(procs):
    q = shmring.JoinableQueue(capacity=1 << 18)
    _, _, _, kis = _storm_a_putter(procs, q, STORM / 2)
    assert kis > 50, f"only {kis} interrupts landed"
    assert q.join(timeout=10), "an interrupted put left a task that was never put"   # (R72)


def _getter(q, ready, out):
    state, got = {}, []
    _arm(_outer.__code__, state)
    ready.set()

    def body():
        while True:
            item = q.get(timeout=20)
            if isinstance(item, str):
                return
            got.append(_index(item))
    _outer(body, state)
    state["quiet"] = True
    out.put((got, state.get("kis", 0), state.get("error")))


def test_interrupted_gets_take_each_item_at_most_once_and_lose_only_what_they_held(procs):
    q, ready, out = shmring.Queue(capacity=1 << 18), CTX.Event(), CTX.Queue()
    child = CTX.Process(target=_getter, args=(q, ready, out))
    child.start()
    procs.append(child)
    assert ready.wait(20)
    stop, counter, t = _storm(child)
    n, end = 0, time.monotonic() + STORM
    try:
        while time.monotonic() < end:
            try:
                q.put(_item(n), timeout=20)
            except Full:
                st = q._ring.stats()
                raise AssertionError(f"the child stopped taking: item {n}, child alive {child.is_alive()} (exit code {child.exitcode}), "
                                     f"ring {[(k, st[k]) for k in ('write_pos', 'read_pos', 'take_pos', 'used')]}, "
                                     f"requeued {st['requeued_now']}, consumers {st['consumers']}") from None
            n += 1
    finally:
        stop.set()
        t.join()
    q.put("end", timeout=20)
    got, kis, error = out.get(timeout=60)
    child.join(20)
    assert child.exitcode == 0 and error is None, error
    print(f"{n} items, {counter[0]} SIGINTs, {kis} landed, {n - len(got)} not taken by a returned get")
    assert kis > 100, f"only {kis} interrupts landed"
    assert len(got) == len(set(got)), "an item was taken twice"
    assert set(got) <= set(range(n))
    assert n - len(got) <= kis                # only an interrupted get's own item is lost
    left = 0
    while True:                               # what the child's gets left behind (handed out again)
        try:
            got.append(_index(q.get(timeout=0.5)))
            left += 1
        except Exception:
            break
    assert len(got) == len(set(got)), "an item was taken twice"
    assert 0 <= q.qsize() <= kis              # never low; one high per interrupted get at most
