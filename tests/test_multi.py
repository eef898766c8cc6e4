"""Multi-party rings across processes, under fork and spawn: mpsc fan-in,
broadcast fan-out and mpmc work-sharing with more processes than cores, so
producers and consumers are preempted mid-claim.  Every message is checked
(producer, sequence number, bytes): nothing lost, duplicated, reordered within
a producer, or torn."""
import os
import signal
import time

import numpy as np
import pytest

import shmring
from shmring import layout as L

import _multi_workers as M
from _procs import JOIN, finish, start

SIZES = {"fork": 60_000, "spawn": 25_000}


def reports(q, n):
    return [q.get(timeout=JOIN) for _ in range(n)]


def test_mpsc_fan_in_from_four_producers(ring_name, procs, mp, start_method):
    n, tags = SIZES[start_method], [1, 2, 3, 4]
    with shmring.Ring.create(ring_name, 1 << 16, kind="mpsc", producers=4) as ring:
        q = mp.Queue()
        cons = start(procs, mp, M.consume_all, ring, q, tags, n)
        prods = [start(procs, mp, M.produce, ring, t, n, 0.05 * t) for t in tags]
        (rep,) = reports(q, 1)
        assert rep["error"] is None, rep["error"]
        assert rep["counts"] == {t: n for t in tags}
        assert rep["end"] == "EndOfStream"
        assert all(finish(p) == 0 for p in prods + [cons])
        s = ring.stats()
        assert s["sent"] == 4 * n and s["consumer"]["received"] == 4 * n
        assert (s["producer_sessions"], s["producers_ended"], s["producers_dead"], s["abandoned"]) == (4, 4, 0, 0)
        assert s["write_pos"] == s["read_pos"] > 100 * ring.capacity       # wrapped many times


def test_mpsc_no_lost_wakeup_when_everybody_sleeps(ring_name, procs, mp):
    """spin=0: the consumer sleeps on the futex whenever the ring is empty."""
    n, tags = 20_000, [1, 2, 3, 4]
    with shmring.Ring.create(ring_name, 1 << 13, kind="mpsc", producers=4) as ring:
        q = mp.Queue()
        cons = start(procs, mp, M.consume_all, ring, q, tags, n, 0.0)
        prods = [start(procs, mp, M.produce, ring, t, n) for t in tags]
        (rep,) = reports(q, 1)
        assert rep["error"] is None, rep["error"]
        assert rep["counts"] == {t: n for t in tags} and rep["end"] == "EndOfStream"
        assert all(finish(p) == 0 for p in prods + [cons])
        assert rep["wait"]["sleeps"] > 10 and rep["wait"]["late_wakeups"] == 0


def test_broadcast_every_subscriber_sees_every_message(ring_name, procs, mp, start_method):
    n, subs = SIZES[start_method], 4
    with shmring.Ring.create(ring_name, 1 << 16, kind="broadcast") as ring:
        q = mp.Queue()
        readies = [mp.Event() for _ in range(subs)]
        cons = [start(procs, mp, M.subscribe_then_report, ring, q, [9], n, e) for e in readies]
        assert all(e.wait(JOIN) for e in readies)
        prod = start(procs, mp, M.produce, ring, 9, n)
        reps = reports(q, subs)
        for rep in reps:
            assert rep["error"] is None, rep["error"]
            assert rep["counts"] == {9: n} and rep["end"] == "EndOfStream"
        assert all(finish(p) == 0 for p in cons + [prod])
        s = ring.stats()
        assert s["sent"] == n and s["dropped"] == s["evicted"] == 0


def test_mpmc_work_sharing_delivers_each_message_exactly_once(ring_name, procs, mp, start_method):
    n, tags = SIZES[start_method] // 2, [1, 2, 3, 4]
    with shmring.Ring.create(ring_name, 1 << 16, kind="mpmc", producers=4) as ring:
        q = mp.Queue()
        cons = [start(procs, mp, M.share_work, ring, q, tags, n) for _ in range(4)]
        prods = [start(procs, mp, M.produce, ring, t, n) for t in tags]
        reps = reports(q, 4)
        seen = np.concatenate([np.frombuffer(r["seen"], np.uint64) for r in reps])
        for rep in reps:
            assert rep["error"] is None, rep["error"]
            assert rep["end"] == "EndOfStream"
        expect = np.array(sorted((t << 32) | s for t in tags for s in range(n)), np.uint64)
        assert len(seen) == len(expect)
        assert np.array_equal(np.sort(seen), expect)          # exactly once
        assert sum(1 for r in reps if sum(r["counts"].values()) > 0) >= 2   # the work was shared
        assert all(finish(p) == 0 for p in prods + cons)
        s = ring.stats()
        assert s["sent"] == 4 * n and sum(c["received"] for c in s["consumers"]) == 4 * n


# --------------------------------------------------------------------------- faults

def test_mpsc_producer_killed_between_claim_and_commit_is_skipped(ring_name, procs, mp):
    n, tags = 20_000, [1, 2, 3]
    with shmring.Ring.create(ring_name, 1 << 16, kind="mpsc", producers=4) as ring:
        q = mp.Queue()
        ready = mp.Event()
        staller = start(procs, mp, M.stall_in_claim, ring, ready, 7)
        assert ready.wait(JOIN)
        cons = start(procs, mp, M.consume_all, ring, q, tags + [7], n)
        prods = [start(procs, mp, M.produce, ring, t, n) for t in tags]
        time.sleep(0.2)
        os.kill(staller.pid, signal.SIGKILL)            # it holds a claim: everything after it waits
        (rep,) = reports(q, 1)
        assert rep["error"] is None, rep["error"]
        assert rep["counts"] == {1: n, 2: n, 3: n, 7: 1}     # its committed message arrived, the claim did not
        assert rep["end"].startswith("PeerGone") and "1 producer(s) died" in rep["end"]
        assert all(finish(p) == 0 for p in prods + [cons])
        s = ring.stats()
        assert s["abandoned"] == 1 and s["producers_dead"] == 1 and s["producers_ended"] == 3


def test_broadcast_killed_subscriber_is_dropped_and_the_rest_go_on(ring_name, procs, mp):
    n = 30_000
    with shmring.Ring.create(ring_name, 1 << 14, kind="broadcast") as ring:
        q = mp.Queue()
        hang_ready, readies = mp.Event(), [mp.Event(), mp.Event()]
        victim = start(procs, mp, M.take_and_hang, ring, hang_ready, 1)
        cons = [start(procs, mp, M.subscribe_then_report, ring, q, [5], n, e) for e in readies]
        assert all(e.wait(JOIN) for e in readies)
        prod = start(procs, mp, M.produce, ring, 5, n)
        assert hang_ready.wait(JOIN)
        time.sleep(0.3)                                  # the ring fills: the producer waits for the victim
        os.kill(victim.pid, signal.SIGKILL)
        for rep in reports(q, 2):
            assert rep["error"] is None, rep["error"]
            assert rep["counts"] == {5: n} and rep["end"] == "EndOfStream"
        assert all(finish(p) == 0 for p in cons + [prod])
        assert ring.stats()["dropped"] == 1


def test_broadcast_evicts_a_subscriber_that_stays_behind(ring_name, procs, mp):
    n = 20_000
    with shmring.Ring.create(ring_name, 1 << 14, kind="broadcast", policy="evict", evict_after=1.0) as ring:   # the slow one stalls 3 s
        q, slow_q = mp.Queue(), mp.Queue()
        slow_ready, fast_ready = mp.Event(), mp.Event()
        fast = start(procs, mp, M.subscribe_then_report, ring, q, [3], n, fast_ready)
        assert fast_ready.wait(JOIN)
        slow = start(procs, mp, M.slow_subscriber, ring, slow_ready, slow_q)
        prod = start(procs, mp, M.produce, ring, 3, n, 0.5)
        assert slow_ready.wait(JOIN)
        (rep,) = reports(q, 1)
        assert rep["error"] is None, rep["error"]
        assert rep["counts"] == {3: n}
        slow_rep = slow_q.get(timeout=JOIN)
        assert slow_rep["error"] is None, slow_rep["error"]
        assert slow_rep["missed"] > 0 and slow_rep["missed_bytes"] > 0
        assert slow_rep["after"][0] == 3 and slow_rep["after"][2] is None     # re-joined and reads intact data
        assert all(finish(p) == 0 for p in (fast, slow, prod))
        assert ring.stats()["evicted"] == 1


def test_mpmc_consumer_killed_holding_messages_loses_none(ring_name, procs, mp):
    n, tags = 20_000, [1, 2]
    with shmring.Ring.create(ring_name, 1 << 16, kind="mpmc", producers=2) as ring:
        q = mp.Queue()
        ready = mp.Event()
        victim = start(procs, mp, M.take_and_hang, ring, ready, 3)
        prods = [start(procs, mp, M.produce, ring, t, n) for t in tags]
        assert ready.wait(JOIN)
        cons = [start(procs, mp, M.share_work, ring, q, tags, n, False) for _ in range(2)]
        # with no live consumer left a blocked producer gets PeerGone (as on an spsc
        # ring), so kill the victim only once the survivors have joined
        deadline = time.monotonic() + JOIN
        while sum(c["alive"] for c in ring.stats()["consumers"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        reps = reports(q, 2)
        for rep in reps:
            assert rep["error"] is None, rep["error"]
        seen = np.sort(np.concatenate([np.frombuffer(r["seen"], np.uint64) for r in reps]))
        expect = np.array(sorted((t << 32) | s for t in tags for s in range(n)), np.uint64)
        assert np.array_equal(seen, expect)
        assert all(finish(p) == 0 for p in prods + cons)
        assert ring.stats()["redelivered"] == 3


# --------------------------------------------------------------------------- roles and limits

def test_role_rules_per_kind(ring_name):
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpsc") as ring:
        c = ring.consumer()
        with pytest.raises(shmring.RoleTaken, match=str(os.getpid())) as ei:
            ring.consumer()
        assert ei.value.pid == os.getpid()
        c.close()
    with shmring.Ring.create(ring_name + "b", 1 << 14, kind="broadcast") as ring:
        p = ring.producer()
        with pytest.raises(shmring.RoleTaken, match="one producer") as ei:
            ring.producer()
        assert ei.value.pid == os.getpid()
        p.close()
    with shmring.Ring.create(ring_name + "c", 1 << 14, kind="mpmc", max_producers=2, max_consumers=1) as ring:
        a, b = ring.producer(), ring.producer()
        with pytest.raises(shmring.ResourceLimit, match="max_producers"):
            ring.producer()
        c = ring.consumer()
        with pytest.raises(shmring.RoleTaken):
            ring.consumer()
        for h in (a, b, c):
            h.close()


def test_create_arguments_are_checked(ring_name):
    with pytest.raises(ValueError, match="one consumer"):
        shmring.Ring.create(ring_name, 1 << 14, kind="mpsc", max_consumers=3)
    with pytest.raises(ValueError, match="one producer"):
        shmring.Ring.create(ring_name, 1 << 14, kind="broadcast", max_producers=2)
    with pytest.raises(ValueError, match="policy"):
        shmring.Ring.create(ring_name, 1 << 14, kind="mpsc", policy="evict")
    with pytest.raises(ValueError, match="max_consumers"):
        shmring.Ring.create(ring_name, 1 << 14, kind="mpmc", max_consumers=0)
    with pytest.raises(ValueError, match="spsc"):
        shmring.Ring.create(ring_name, 1 << 14, max_producers=2)
    with pytest.raises(ValueError, match="producers"):
        shmring.Ring.create(ring_name, 1 << 14, kind="broadcast", producers=2)
    assert not os.path.exists(f"/dev/shm/shmring.{ring_name}")


def test_subscribe_oldest_and_newest(ring_name):
    with shmring.Ring.create(ring_name, 1 << 14, kind="broadcast") as ring, ring.producer() as p:
        early = ring.subscribe()                   # keeps the first messages in the ring
        for i in range(5):
            p.send(b"m%d" % i)
        old, new = ring.subscribe("oldest"), ring.subscribe("newest")
        assert old.recv_bytes(timeout=0) == b"m0"
        assert new.recv_bytes(timeout=0) == b"m4"
        assert new.try_recv() is None
        p.send(b"m5")
        assert new.recv_bytes(timeout=0) == b"m5"
        assert [early.recv_bytes(timeout=0) for _ in range(6)] == [b"m%d" % i for i in range(6)]
        with pytest.raises(ValueError):
            ring.subscribe("middle")
        for s in (early, old, new):
            s.close()
        with pytest.raises(ValueError, match="broadcast"):
            shmring.Ring.create(ring_name + "x", 1 << 14, kind="mpsc").subscribe()
        shmring.unlink(ring_name + "x")


def test_a_subscriber_that_left_no_longer_gates_the_producer(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, kind="broadcast") as ring, ring.producer() as p:
        s = ring.subscribe()
        n = 0
        while p.try_send(b"x" * 100):
            n += 1
        assert 0 < n < 50
        s.close()
        for _ in range(500):
            assert p.try_send(b"x" * 100)           # nobody to wait for


def test_a_closed_mpmc_consumer_keeps_what_it_holds_until_released(ring_name):
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpmc") as ring, ring.producer() as p:
        a, b = ring.consumer(), ring.consumer()
        p.send_many([b"one", b"two"])
        m = a.recv(timeout=0)
        a.close()
        assert a.closed and bytes(m.value) == b"one"          # still ours: nobody else gets it
        assert b.recv_bytes(timeout=0) == b"two"
        assert b.try_recv() is None
        assert sum(c["pid"] is not None for c in ring.stats()["consumers"]) == 2
        m.release()                                            # the last release gives the entry back
        assert sum(c["pid"] is not None for c in ring.stats()["consumers"]) == 1
        assert ring.stats()["redelivered"] == 0 and ring.stats()["used"] == 0
        b.close()


def test_a_closed_subscriber_holds_the_producer_back_until_its_messages_are_released(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, kind="broadcast") as ring, ring.producer() as p:
        s = ring.subscribe()
        p.send(b"keep" * 10)
        m = s.recv(timeout=0)
        s.close()
        while p.try_send(b"x" * 100):
            pass
        assert bytes(m.value) == b"keep" * 10                  # not overwritten
        m.release()
        for _ in range(200):
            assert p.try_send(b"x" * 100)                      # nobody to wait for any more


def test_the_stream_of_an_mpsc_ring_ends_after_every_producer_closed(ring_name):
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpsc", producers=2) as ring, ring.consumer() as c:
        p1 = ring.producer()
        p1.send(b"a")
        p1.close()
        assert c.recv_bytes(timeout=0) == b"a"
        assert c.try_recv() is None                 # one of two expected producers closed: not the end
        with ring.producer() as p2:
            p2.send(b"b")
        assert c.recv_bytes(timeout=0) == b"b"
        with pytest.raises(shmring.EndOfStream):
            c.recv(timeout=0)
        with pytest.raises(shmring.HandleClosed, match="ended"):
            ring.producer()


def test_an_aborted_producer_ends_the_stream_with_peer_gone(ring_name):
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpmc") as ring, ring.consumer() as c:
        with pytest.raises(KeyError):
            with ring.producer() as p:
                p.send(b"x")
                raise KeyError
        assert c.recv_bytes(timeout=0) == b"x"
        with pytest.raises(shmring.PeerGone, match="stopped on an error"):
            c.recv(timeout=0)


# --------------------------------------------------------------------------- batches

@pytest.mark.parametrize("kind", ["spsc", "mpsc", "broadcast", "mpmc"])
def test_send_many_and_recv_many_on_every_kind(ring_name, kind):
    with shmring.Ring.create(ring_name, 1 << 16, kind=kind) as ring, ring.producer() as p, ring.consumer() as c:
        assert p.send_many(b"%d" % i for i in range(100)) == 100
        msgs = c.recv_many(40, timeout=1)
        assert [bytes(m.value) for m in msgs] == [b"%d" % i for i in range(40)]
        for m in msgs:
            m.release()
        vals = c.recv_many(1000, timeout=1, copy=True)
        assert vals == [b"%d" % i for i in range(40, 100)]
        assert c.recv_many(10, timeout=0.05) == []
        p.send_many([np.arange(3), {"k": 1}])
        got = c.recv_many(5, timeout=1, copy=True)
        assert np.array_equal(got[0], np.arange(3)) and got[1] == {"k": 1}
        with pytest.raises(ValueError):
            c.recv_many(0)


# --------------------------------------------------------------------------- wait on many

def test_wait_returns_the_rings_with_data(ring_name):
    rings = [shmring.Ring.create(f"{ring_name}-{i}", 1 << 12, kind=k)
             for i, k in enumerate(["spsc", "mpsc", "broadcast", "mpmc"])]
    try:
        prods = [r.producer() for r in rings]
        cons = [r.consumer() for r in rings]
        assert shmring.wait(cons, timeout=0.05) == []
        prods[1].send(b"x")
        prods[3].send(b"y")
        assert shmring.wait(cons, timeout=1) == [cons[1], cons[3]]
        prods[0].close()                                   # end of stream counts as readable
        assert shmring.wait([cons[0], cons[2]], timeout=1) == [cons[0]]
        with pytest.raises(TypeError):
            shmring.wait([rings[0]])
        with pytest.raises(ValueError):
            shmring.wait([])
        for h in prods + cons:
            h.close()
    finally:
        for r in rings:
            r.close()
            r.unlink()


def test_wait_sleeps_without_spinning_and_wakes_on_a_send_from_another_process(ring_name, procs, mp):
    with shmring.Ring.create(ring_name, 1 << 12, kind="mpsc") as a, \
            shmring.Ring.create(ring_name + "b", 1 << 12) as b:
        ca, cb = a.consumer(), b.consumer()
        t0, c0 = time.monotonic(), time.process_time()
        assert shmring.wait([ca, cb], timeout=0.5) == []
        assert time.monotonic() - t0 >= 0.5
        assert time.process_time() - c0 < 0.05          # idle: asleep in the kernel, not spinning
        start(procs, mp, M.produce, b, 1, 1, 0.3)
        t0 = time.monotonic()
        assert shmring.wait([ca, cb], timeout=JOIN) == [cb]
        assert time.monotonic() - t0 < JOIN
        ca.close()
        cb.close()


@pytest.mark.parametrize("kind", ["mpsc", "broadcast", "mpmc"])
def test_reservations_limits_and_skips_on_multi_party_kinds(ring_name, kind):
    with shmring.Ring.create(ring_name, 1 << 13, kind=kind) as ring, ring.producer() as p, ring.consumer() as c:
        assert ring.max_message == (1 << 13) - 16
        with pytest.raises(shmring.MessageTooLarge):
            p.send(b"x" * (ring.max_message + 1))
        p.send(b"y" * ring.max_message)                       # the largest fits
        assert c.recv_bytes(timeout=0) == b"y" * ring.max_message
        with pytest.raises(RuntimeError):
            with p.reserve(200) as mv:                      # aborted: a T_SKIP the consumer passes over
                mv[:3] = b"bad"
                raise RuntimeError
        r = p.reserve(300)
        r.view[:5] = b"short"
        r._nbytes = 5                                       # commit fewer bytes than reserved
        r.commit()
        with p.reserve_array((3,), np.int16) as a:
            a[:] = [1, 2, 3]
        assert c.recv_bytes(timeout=0) == b"short"
        assert np.array_equal(c.recv(timeout=0, copy=True), [1, 2, 3])
        for i in range(200):                                # wrap a few times
            p.send(b"%d" % i)
            assert c.recv_bytes(timeout=0) == b"%d" % i
        assert c.try_recv() is None
        assert p.position == ring.stats()["write_pos"] > ring.capacity


def test_mpmc_a_message_held_by_a_dead_consumer_arrives_before_the_end_of_stream(ring_name, procs, mp):
    """The producer has closed and the survivor drains without ever waiting:
    the end of the stream must still wait for what the dead consumer held."""
    with shmring.Ring.create(ring_name, 1 << 16, kind="mpmc") as ring:
        ready = mp.Event()
        with ring.producer() as p:
            p.send_many(M.mmsg(1, i) for i in range(50))
            victim = start(procs, mp, M.take_and_hang, ring, ready, 2)
            assert ready.wait(JOIN)
        os.kill(victim.pid, signal.SIGKILL)
        finish(victim)
        got = []
        with ring.consumer() as c:
            for msg in c:
                with msg:
                    got.append(M.identify(msg.value)[1])
        assert sorted(got) == list(range(50))
        assert ring.stats()["redelivered"] == 2


def test_a_producer_that_finds_the_ring_full_holds_no_intent(ring_name):
    """A producer that lost a claim race (its intent still names the winner's
    record) and then found the ring full must not keep that intent while it
    waits: if the winner died, the consumer would take the record for one a
    live producer is still writing and never skip it."""
    with shmring.Ring.create(ring_name, 1 << 12, kind="mpsc") as ring:
        a, b = ring.producer(), ring.producer()
        while a.try_send(b"x" * 100):
            pass
        t = ring._tables
        intent = t.pline(b._slot) + L.PE_INTENT
        ring._region.store_u64(intent, ring.stats()["write_pos"] | L.INTENT_BIT)   # a lost race's leftover
        assert not b.try_send(b"y" * 100)
        assert ring._region.load_u64(intent) == 0
        a.close()
        b.close()
