"""asyncio and fileno() without threads: an await arms a wake-up descriptor
slot of the wake line (R52), the other process fires it only when armed
(R53), a cancelled or finished await disarms (R54), and a waiter killed while
armed costs its waker one refused datagram, once (R55)."""
import asyncio
import os
import resource
import selectors
import signal
import threading
import time

import numpy as np
import pytest

import shmring
from shmring import _core, wakefd
from shmring import layout as L

from _procs import finish, start
import _async_workers as W


@pytest.fixture
def fd_only(monkeypatch):
    """Slices of 20 s instead of 0.1: within a test's seconds only the wake-up
    descriptor can end an await, so "woken by the other process" is checked
    without racing the slice's own re-check on a loaded machine."""
    from shmring import waiting
    monkeypatch.setattr(waiting, "WAIT_SLICE", 20.0)

KINDS = ["spsc", "mpsc", "broadcast", "mpmc"]


def armed(region, wake=L.OFF_DATA_WAKE) -> int:
    """Descriptor slots armed on a wake line (the high half of its waiters word)."""
    load = getattr(region, "_load_u32", None) or region.load_u32     # private on handles (issue 16 case 10)
    return load(wake + L.WAKE_WAITERS) >> 16


def wait_for(cond, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def run(coro, timeout=60):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def test_a_thousand_awaits_on_a_thousand_rings_use_no_thread_and_all_complete(ring_name, procs, mp):
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * n), hard))
    rings = [shmring.Ring.create(f"{ring_name}-{i}", 4096) for i in range(n)]
    try:
        conses = [r.consumer() for r in rings]

        async def main():
            before = threading.active_count()
            tasks = [asyncio.create_task(c.recv_async(copy=True, timeout=60)) for c in conses]
            await asyncio.sleep(0.3)
            assert threading.active_count() == before          # main: the default executor's threads
            assert sum(armed(c) for c in conses) == n          # every await armed its ring
            child = start(procs, mp, W.send_one_to_each, rings, 0.5)
            during = []
            while not all(t.done() for t in tasks):
                during.append(threading.active_count())
                await asyncio.sleep(0.01)
            got = await asyncio.gather(*tasks)
            assert finish(child) == 0
            return before, during, got, asyncio.get_running_loop()._default_executor

        f0 = wakefd.stats["fired"]
        before, during, got, executor = run(main())
        assert got == [i.to_bytes(4, "little") for i in range(n)]
        assert executor is None                                # run_in_executor was never called
        assert set(during) == {before}, (before, sorted(set(during)))
        # woken by their descriptors, not by slices (an await whose 0.1 s slice
        # ended just then finds its message at its next try instead: not all)
        assert wakefd.stats["fired"] - f0 >= n // 2
        assert all(armed(c) == 0 for c in conses)
        for c in conses:
            c.close()
    finally:
        for r in rings:
            r.close()
            r.unlink()


@pytest.mark.parametrize("kind", KINDS)
def test_an_awaiting_consumer_is_woken_by_another_process(ring_name, procs, mp, fd_only, kind):
    with shmring.Ring.create(ring_name, 1 << 14, kind=kind) as ring, ring.consumer() as cons:
        async def main():
            t0 = time.monotonic()
            first = await cons.recv_async(copy=True, timeout=30)
            rest = [await cons.recv_async(copy=True, timeout=30) for _ in range(2)]
            with pytest.raises(shmring.EndOfStream):
                await cons.recv_async(timeout=30)
            return first, rest, time.monotonic() - t0
        child = start(procs, mp, W.send_after, ring, 0.5, [b"a", b"b", b"c"])
        f0 = wakefd.stats["fired"]
        first, rest, took = run(main())
        assert (first, rest) == (b"a", [b"b", b"c"])
        assert took < 20
        assert wakefd.stats["fired"] > f0
        assert finish(child) == 0
        assert armed(cons) == 0


def test_an_awaiting_record_consumer_is_woken_and_sees_the_end(ring_name, procs, mp, fd_only):
    dt = np.dtype([("i", "<i8")])
    with shmring.Ring.create(ring_name, 1 << 14, dtype=dt) as ring, ring.consumer() as cons:
        async def main():
            got = []
            while True:
                try:
                    got.append(await cons.recv_many_async(timeout=30, copy=True))
                except shmring.EndOfStream:
                    return np.concatenate(got)
        child = start(procs, mp, W.send_records_after, ring, 0.5, 100)
        f0 = wakefd.stats["fired"]
        got = run(main())
        assert got["i"].tolist() == list(range(100))
        assert wakefd.stats["fired"] > f0
        assert finish(child) == 0


@pytest.mark.parametrize("kind", ["spsc", "mpsc", "mpmc", "records"])
def test_an_awaiting_producer_on_a_full_ring_is_woken_when_another_process_makes_room(ring_name, procs, mp, fd_only, kind):
    records = kind == "records"
    kw = {"dtype": np.dtype([("i", "<i8")])} if records else {"kind": kind}
    with shmring.Ring.create(ring_name, 4096, **kw) as ring, ring.producer() as prod:
        if records:
            assert prod.try_send_many(np.zeros(512, ring.dtype)) == 512
        else:
            while prod.try_send(b"x" * 200):
                pass

        async def main():
            if records:
                return await prod.send_many_async(np.ones(10, ring.dtype), timeout=30)
            await prod.send_async(b"y" * 200, timeout=30)
            return 1
        if records:
            child = start(procs, mp, _records_drain, ring, 0.5)
        else:
            child = start(procs, mp, W.recv_after, ring, 0.5, 3)
        f0 = wakefd.stats["fired"]
        assert run(main()) >= 1
        assert wakefd.stats["fired"] > f0
        assert armed(prod._region if records else prod, L.OFF_SPACE_WAKE) == 0
        prod.detach()
        assert finish(child) == 0


def _records_drain(ring, delay):
    with ring.consumer() as c:
        time.sleep(delay)
        c.recv_many(100, timeout=30).release()


def test_a_wait_newer_async_waiter_is_woken_by_another_process(ring_name, procs, mp, fd_only):
    with shmring.SharedState.create(ring_name, 1 << 12) as state:
        child = start(procs, mp, W.publish_after, state, 0.5, b"one")    # the child is the writer
        f0 = wakefd.stats["fired"]
        assert run(state.wait_newer_async(0, timeout=30)) == 1
        assert wakefd.stats["fired"] > f0
        assert armed(state, L.ST_OFF_VERSION_WAKE) == 0
        assert finish(child) == 0


@pytest.mark.parametrize("kind", KINDS + ["records"])
def test_fileno_works_with_selectors_across_processes(ring_name, procs, mp, kind):
    records = kind == "records"
    kw = {"dtype": np.dtype([("i", "<i8")])} if records else {"kind": kind}
    with shmring.Ring.create(ring_name, 1 << 14, **kw) as ring, ring.consumer() as cons:
        take = (lambda: cons.try_recv_many()) if records else cons.try_recv
        sel = selectors.DefaultSelector()
        sel.register(cons.fileno(), selectors.EVENT_READ)
        assert sel.select(0.2) == []                          # nothing yet: not readable
        if records:
            child = start(procs, mp, W.send_records_after, ring, 0.3, 3)
        else:
            child = start(procs, mp, W.send_after, ring, 0.3, [b"1", b"2", b"3"])
        got, ended = 0, False
        deadline = time.monotonic() + 30
        while not ended:
            assert time.monotonic() < deadline
            if not sel.select(5):
                continue
            while True:                                        # the protocol: drain until None
                try:
                    m = take()
                except shmring.EndOfStream:
                    ended = True
                    break
                if m is None:
                    break
                got += len(m) if records else 1
                m.release()
        assert got == 3
        assert finish(child) == 0
        sel.close()


def test_fileno_is_not_readable_after_draining_and_turns_readable_at_the_next_message(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as p, ring.consumer() as c:
        sel = selectors.DefaultSelector()
        sel.register(c.fileno(), selectors.EVENT_READ)
        p.send(b"x")
        assert sel.select(1)
        m = c.try_recv()
        assert m.tobytes() == b"x"
        m.release()
        assert c.try_recv() is None                           # drains and re-arms
        assert sel.select(0.1) == []
        p.send(b"y")
        assert sel.select(1)
        c.close()
        sel.close()


def test_a_waiter_killed_while_armed_costs_its_waker_one_datagram_once(ring_name, procs, mp):
    with shmring.Ring.create(ring_name, 1 << 16) as ring:
        child = start(procs, mp, W.await_and_hang, ring)
        wait_for(lambda: armed(ring._region) == 1, what="the child's await to arm")
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert armed(ring._region) == 1                       # the registration outlives it
        c0 = _core.wait_counters()
        with ring.producer() as p:
            for i in range(200):
                p.send(b"m%d" % i)
            c1 = _core.wait_counters()
            assert c1["fd_signals"] - c0["fd_signals"] == 1     # fired once, never again
            assert c1["fd_refused"] - c0["fd_refused"] == 1
            assert armed(ring._region) == 0
            with ring.consumer() as cons:                     # the dead consumer's role is taken over
                assert [cons.recv_bytes(timeout=5) for _ in range(200)] == [b"m%d" % i for i in range(200)]


def test_a_cancelled_await_takes_nothing_and_disarms(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as prod, ring.consumer() as cons:
        async def main():
            task = asyncio.create_task(cons.recv_async(copy=True))
            await asyncio.sleep(0.05)
            assert armed(cons) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert armed(cons) == 0                           # disarmed at once, no slice to wait for
            c0 = _core.wait_counters()["fd_signals"]
            prod.send(b"after")
            assert _core.wait_counters()["fd_signals"] == c0   # nobody armed: nothing sent
            return await cons.recv_async(copy=True, timeout=1)
        assert run(main()) == b"after"
        assert cons.try_recv() is None


def test_a_timed_out_await_disarms(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.consumer() as cons:
        with pytest.raises(shmring.Timeout):
            run(cons.recv_async(timeout=0.15))
        assert armed(cons) == 0


def test_peergone_reaches_an_awaiting_consumer(ring_name, procs, mp):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.consumer() as cons:
        child = start(procs, mp, W.send_after, ring, 0.3, [b"last"], "kill")

        async def main():
            assert await cons.recv_async(copy=True, timeout=30) == b"last"
            with pytest.raises(shmring.PeerGone):
                await cons.recv_async(timeout=30)
        run(main())
        finish(child)


def test_wait_async_returns_the_ready_handles_of_rings_and_record_rings(ring_name, procs, mp):
    dt = np.dtype([("i", "<i8")])
    with shmring.Ring.create(ring_name, 1 << 12) as a, shmring.Ring.create(ring_name + "-r", 1 << 12, dtype=dt) as b:
        try:
            ca, cb = a.consumer(), b.consumer()
            assert run(shmring.wait_async([ca, cb], timeout=0.2)) == []
            assert armed(ca) == 0 and armed(cb._region) == 0
            child = start(procs, mp, W.send_records_after, b, 0.3, 5)
            before = threading.active_count()
            assert run(shmring.wait_async([ca, cb], timeout=30)) == [cb]
            assert threading.active_count() == before
            assert shmring.wait([ca, cb], timeout=1) == [cb]          # the blocking wait takes record consumers too
            cb.try_recv_many().release()
            assert finish(child) == 0
            assert shmring.wait([ca, cb], timeout=1) == [cb]          # end of stream
            ca.close()
            cb.close()
        finally:
            b.unlink()


def test_a_forked_child_makes_its_own_socket(ring_name):
    async def word():
        return wakefd._waker_for(asyncio.get_running_loop()).word
    loop = asyncio.new_event_loop()
    try:
        parent = loop.run_until_complete(word())
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                child = loop.run_until_complete(word())
                os.write(w, b"1" if child != parent else b"0")
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.waitpid(pid, 0)
        assert loop.run_until_complete(word()) == parent
    finally:
        loop.close()


def test_the_hot_path_sends_nothing_while_nobody_waits(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as p, ring.consumer() as c:
        c0 = _core.wait_counters()
        for _ in range(1000):
            p.send(b"x" * 64)
            assert c.recv_bytes() == b"x" * 64
        c1 = _core.wait_counters()
        assert c1["fd_signals"] == c0["fd_signals"]
        assert c1["fd_arms"] == c0["fd_arms"]
