"""SIGKILL each role of an spsc ring at each interesting point, then check the
survivors: every wait ends (PeerGone or a result, never a hang), no committed
message is lost, none is torn, a replacement process continues the stream,
and ``Ring.stats()`` says what happened (dead pid, sessions, positions).

Kill points: producer before it claims space, between reserve and commit,
while blocked on a full ring; consumer while blocked on an empty ring, while
holding received messages; any process during create and during attach.
Processes pause at test-only hooks (``shmring.pausepoints.hook``) or in their
own code, and are killed only once they are known to be there.
"""
import os
import signal

import pytest

import shmring
from shmring import layout as L

from _workers import tagged
import _fault_workers as W
from _kit import CTX, SOON, kill, spawn, wait_until


def used_by(seqs):
    return sum(L.record_size(len(tagged(s))) for s in seqs)


def recv_checked(cons, expect_seqs, timeout=SOON):
    """Receive len(expect_seqs) messages; each must be exactly tagged(seq) in order."""
    for s in expect_seqs:
        data = cons.recv_bytes(timeout=timeout)
        assert data == tagged(s), f"message {s}: torn, lost or out of order (got seq {int.from_bytes(data[:8], 'little')})"


def continue_with_a_new_producer(kids, ring_name, cons, first, count):
    """A replacement producer process attaches by name, sends first..first+count-1 and
    closes; the surviving consumer gets exactly those, then EndOfStream."""
    p = spawn(kids, W.produce, ring_name, first, count)
    recv_checked(cons, range(first, first + count))
    with pytest.raises(shmring.EndOfStream):
        cons.recv_bytes(timeout=SOON)
    p.join(SOON)
    assert p.exitcode == 0


# ----------------------------------------------------------------------------- producer

@pytest.mark.parametrize("where", ["before_claim", "reserved", "full"])
def test_a_killed_producer_loses_no_committed_message_exposes_no_partial_one_and_can_be_replaced(
        ring_name, kids, where):
    ring = shmring.Ring.create(ring_name, 1 << 12)
    cons = ring.consumer(spin=0)
    ready, q = CTX.Event(), CTX.Queue()
    p = spawn(kids, W.produce_then_stop, ring_name, 5, where, ready, q)
    assert ready.wait(SOON)
    committed = q.get(timeout=SOON)
    if where == "full":
        assert committed > 5                                   # it really filled the ring
        wait_until(lambda: ring._region.load_u32(L.OFF_SPACE_WAKE + L.WAKE_WAITERS) == 1,
                   "the producer sleeps on the full ring")
    kill(p)

    st = ring.stats()
    assert st["producer"] == {"pid": p.pid, "alive": False, "sessions": 1}
    assert st["closed"] is None                                # died: never closed the stream
    assert st["write_pos"] == used_by(range(committed))        # the half-written record is not published

    recv_checked(cons, range(committed))                       # every committed message, intact, in order
    with pytest.raises(shmring.PeerGone, match=str(p.pid)):   # then the wait ends: no hang, no Timeout
        cons.recv_bytes(timeout=SOON)

    continue_with_a_new_producer(kids, ring_name, cons, committed, 40)
    assert ring.stats()["producer"]["sessions"] == 2
    cons.close()
    ring.close()


def test_a_blocked_consumer_wakes_with_peer_gone_when_the_producer_is_killed_mid_reservation(ring_name, kids):
    ring = shmring.Ring.create(ring_name, 1 << 12)
    cons = ring.consumer(spin=0)
    ready, q = CTX.Event(), CTX.Queue()
    p = spawn(kids, W.produce_then_stop, ring_name, 0, "reserved", ready, q)
    assert ready.wait(SOON) and q.get(timeout=SOON) == 0
    os.kill(p.pid, signal.SIGKILL)            # while we block below
    with pytest.raises(shmring.PeerGone):
        cons.recv(timeout=SOON)
    assert ring.stats()["write_pos"] == 0
    cons.close()
    ring.close()


# ----------------------------------------------------------------------------- consumer

def test_a_consumer_killed_while_blocked_on_an_empty_ring_is_replaced_and_nothing_is_lost(ring_name, kids):
    ring = shmring.Ring.create(ring_name, 1 << 12)
    ready = CTX.Event()
    c = spawn(kids, W.consume_blocked, ring_name, ready)
    assert ready.wait(SOON)
    wait_until(lambda: ring._region.load_u32(L.OFF_DATA_WAKE + L.WAKE_WAITERS) == 1,
               "the consumer sleeps on the empty ring")
    kill(c)
    st = ring.stats()
    assert st["consumer"] == {"pid": c.pid, "alive": False, "sessions": 1}

    with ring.producer() as prod:
        for s in range(10):
            assert prod.try_send(tagged(s))                   # room, and no error for a dead consumer
        q = CTX.Queue()
        c2 = spawn(kids, W.consume_all_from, ring_name, q)
        try:
            for s in range(10, 200):                          # many laps of a 4 KiB ring
                prod.send(tagged(s), timeout=SOON)
        except shmring.Timeout:
            raise AssertionError(f"the replacement consumer stopped: {q.get(timeout=1)}")
    res = q.get(timeout=SOON)
    assert res["error"] is None, res["error"]
    assert res["seqs"] == list(range(200)) and res["bad"] == []
    c2.join(SOON)
    st = ring.stats()
    assert st["consumer"]["sessions"] == 2 and st["read_pos"] == st["write_pos"] > 8 * (1 << 12)
    # the dead sleeper's "I am waiting" count was reset when its role was taken over
    assert ring._region.load_u32(L.OFF_DATA_WAKE + L.WAKE_WAITERS) == 0
    ring.close()


@pytest.mark.parametrize("release,hold", [(0, 1), (5, 3), (20, 4)])
def test_a_consumer_killed_holding_messages_has_every_unreleased_one_redelivered(ring_name, kids, release, hold):
    n = 40
    ring = shmring.Ring.create(ring_name, 1 << 12)
    prod = ring.producer()
    q = CTX.Queue()
    c = spawn(kids, W.consume_and_hold, ring_name, release, hold, q)
    sent = 0
    while sent < release + hold:                              # feed it what it will release and hold
        prod.send(tagged(sent), timeout=SOON)
        sent += 1
    held = q.get(timeout=SOON)
    assert held == list(range(release, release + hold)), held
    kill(c)
    assert ring.stats()["read_pos"] == used_by(range(release))   # held space was not given back

    with ring.consumer(spin=0) as cons:                          # the replacement
        recv_checked(cons, range(release, release + hold))       # at-least-once: the held ones again
        for s in range(sent, n):
            prod.send(tagged(s), timeout=SOON)
            recv_checked(cons, [s])
        prod.close()
        with pytest.raises(shmring.EndOfStream):
            cons.recv_bytes(timeout=SOON)
    st = ring.stats()
    assert st["consumer"]["sessions"] == 2 and st["closed"] == "eos"
    ring.close()


# ----------------------------------------------------------------------------- create / attach

def test_a_creator_killed_before_the_ring_is_ready_leaves_a_segment_that_is_refused_not_trusted(ring_name, kids):
    ready = CTX.Event()
    p = spawn(kids, W.create_then_stop, ring_name, ready)
    assert ready.wait(SOON)
    kill(p)
    assert os.path.exists(f"/dev/shm/shmring.{ring_name}")
    with pytest.raises(shmring.CorruptSegmentError, match="never fully initialized"):
        shmring.Ring.attach(ring_name)                    # ends after its 1 s grace, does not hang
    with pytest.raises(shmring.SegmentExists):
        shmring.Ring.create(ring_name, 1 << 12)
    shmring.unlink(ring_name)                             # what `shmring rm` / `gc --force` do
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as prod, ring.consumer() as cons:
        prod.send(tagged(0))
        assert cons.recv_bytes(timeout=SOON) == tagged(0)


def test_a_file_ring_creator_killed_before_ready_is_refused_too(tmp_path, kids):
    path = str(tmp_path / "half.ring")
    ready = CTX.Event()
    p = spawn(kids, W.create_then_stop, None, ready, path)
    assert ready.wait(SOON)
    kill(p)
    with pytest.raises(shmring.CorruptSegmentError, match="never fully initialized"):
        shmring.Ring.attach(path=path)


def test_a_process_killed_while_attaching_disturbs_nobody(ring_name, kids):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as prod, ring.consumer() as cons:
        prod.send(tagged(0))
        before = ring.stats()
        ready = CTX.Event()
        p = spawn(kids, W.attach_then_stop, ring_name, ready)
        assert ready.wait(SOON)
        kill(p)
        after = ring.stats()
        assert after == before                               # no role taken, no position moved
        assert after["producer"]["pid"] == after["consumer"]["pid"] == os.getpid()
        for s in range(1, 100):
            prod.send(tagged(s), timeout=SOON)
            assert cons.recv_bytes(timeout=SOON) == tagged(s - 1) or s == 0
        assert cons.recv_bytes(timeout=SOON) == tagged(99)
