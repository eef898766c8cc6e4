"""SIGKILL around a SharedState (copy-on-write shared state), beyond what
tests/test_snapshot_multiprocess.py covers already (a reader killed while
pinning: its pin is reclaimed; a writer killed mid-update: readers keep the
last version and a new writer takes over).  Here: a writer killed while
blocked because every spare slot is pinned, a reader blocked in wait_newer()
when the writer dies, and any process killed during create or attach."""

import numpy as np
import pytest

import shmring
from shmring import layout as L

import _fault_workers as W
from _kit import CTX, SOON, kill, spawn, wait_until


def intact(snap):
    v = np.asarray(snap.value)
    assert (v == snap.version).all(), f"version {snap.version} holds {np.unique(v)}: torn or stale"


def test_a_writer_killed_while_every_spare_slot_is_pinned_leaves_the_last_version_and_is_replaced(ring_name, kids):
    state = shmring.SharedState.create(ring_name, 8192, slots=3)
    steps, q = CTX.Queue(), CTX.Queue()
    w = spawn(kids, W.state_writer_stepwise, ring_name, steps, q)

    def publish_next(v):
        steps.put(1)
        assert q.get(timeout=SOON) == ("publishing", v)
        assert q.get(timeout=SOON) == ("published", v)

    publish_next(1)
    pin1 = state.read()
    s1 = pin1.__enter__()                  # pins version 1
    publish_next(2)
    pin2 = state.read()
    s2 = pin2.__enter__()                  # pins version 2
    publish_next(3)                        # the third slot
    steps.put(1)                           # version 4 needs a slot: none is free
    assert q.get(timeout=SOON) == ("publishing", 4)
    wait_until(lambda: state.stats()["writer_waits"] == 1, "the writer waits for a slot")
    waiters = lambda: state._load_u64(L.ST_OFF_SLOT_WAKE) >> 32     # noqa: E731
    wait_until(lambda: waiters() == 1, "the writer is asleep on the futex")   # past its spin, on a busy machine too
    kill(w)
    assert waiters() == 1                  # the dead writer's announced sleep is still counted

    st = state.stats()
    assert st["writer"] == {"pid": w.pid, "alive": False, "sessions": 1, "finished": False}   # killed: not finished (R57)
    assert st["version"] == 3 and st["slots_pinned"] == 2
    intact(s1)
    intact(s2)
    with state.read() as s3:
        assert s3.version == 3
        intact(s3)
    with pytest.raises(shmring.PeerGone, match=str(w.pid)):      # a waiting reader is told, not left hanging
        state.wait_newer(3, timeout=SOON)

    pin1.__exit__(None, None, None)
    pin2.__exit__(None, None, None)
    del s1, s2
    assert state.publish(W.state_value(4), timeout=SOON) == 4    # this process takes over as writer
    with state.read() as s4:
        intact(s4)
    assert state.stats()["writer"]["sessions"] == 2
    assert waiters() == 0                  # taking over reset it: unpins pay no futex_wake
    state.close()
    shmring.unlink(ring_name)


def test_a_state_creator_killed_before_ready_is_refused_and_collected_only_by_force(ring_name, kids):
    ready = CTX.Event()
    p = spawn(kids, W.state_create_then_stop, ring_name, ready)
    assert ready.wait(SOON)
    kill(p)
    with pytest.raises(shmring.CorruptSegmentError, match="never fully initialized|not initialized"):
        shmring.SharedState.attach(ring_name)
    from shmring.cli import gc_plan
    assert gc_plan([ring_name], grace=0)[0]["action"] == "keep"
    assert gc_plan([ring_name], grace=0, force=True)[0]["action"] == "remove"


def test_a_process_killed_while_attaching_to_a_state_disturbs_nobody(ring_name, kids):
    with shmring.SharedState.create(ring_name, 8192) as state:
        state.publish(W.state_value(1))
        with state.read() as snap:
            before = state.stats()
            ready = CTX.Event()
            p = spawn(kids, W.state_attach_then_stop, ring_name, ready)
            assert ready.wait(SOON)
            kill(p)
            assert state.stats() == before
            intact(snap)
        assert state.publish(W.state_value(2)) == 2
        with state.read() as snap:
            intact(snap)
