"""SharedState across real processes, under fork and spawn: no torn reads while a
writer publishes flat out, SIGKILL of a pinning reader and of a writer mid-update,
the exclusive writer role, and wait_newer() wake-ups and Ctrl-C."""
import os
import signal
import time

import multiprocess
import numpy as np
import pytest

import shmring

import _snapshot_workers as W
from _procs import JOIN, finish, start


def get(q, **match):
    """The next report from the queue; fails on a child's error."""
    r = q.get(timeout=JOIN)
    assert r["error"] is None, r["error"]
    for k, v in match.items():
        assert r[k] == v, r
    return r


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_readers_never_see_a_torn_or_older_version_while_a_writer_publishes_flat_out(ring_name, procs, start_method):
    """One writer publishes (and copy-on-write updates) 128 KiB arrays whose every
    element is the version number, back to back for ~2 s, through only 3 slots;
    3 readers check every snapshot is uniform, equals its version, and never
    goes back.  Slots are reused thousands of times under the readers."""
    ctx = multiprocess.get_context(start_method)
    seconds = 2.0
    with shmring.SharedState.create(ring_name, W.TORN_ELEMS * 8 + 4096, slots=3) as state:
        with shmring.SharedState.attach(ring_name) as first:       # closing it gives the writer role back
            first.publish(np.full(W.TORN_ELEMS, 1, np.int64))
        q = ctx.Queue()
        readers = [start(procs, ctx, W.torn_reader, ring_name, seconds + 0.5, q) for _ in range(3)]
        writer = start(procs, ctx, W.torn_writer, ring_name, seconds, q)
        reports = [q.get(timeout=JOIN) for _ in range(4)]
        for p in readers + [writer]:
            assert finish(p) == 0
        for r in reports:
            assert r["error"] is None, r["error"]
        w = next(r for r in reports if r["role"] == "writer")
        rs = [r for r in reports if r["role"] == "reader"]
        # not vacuous: the writer went round the 3 slots many times, every reader
        # read many snapshots and saw many distinct versions
        assert w["published"] > 100, w
        assert all(r["reads"] > 100 and r["distinct"] > 20 for r in rs), rs
        assert state.version == w["published"] + 1
        assert all(r["last"] <= state.version for r in rs)
        with state.read() as snap:
            assert (snap.value == state.version).all()
        st = state.stats()
        assert st["pins"] == [0, 0, 0] and st["reclaimed_pins"] == 0


def test_a_reader_killed_while_pinning_has_its_pin_reclaimed_and_the_writer_goes_on(ring_name, procs, mp):
    """3 slots: two readers pin two versions, so every spare slot is pinned and
    publish times out.  After SIGKILL of one reader the writer reclaims its pin
    and publishes; the surviving reader's pinned version was never overwritten."""
    with shmring.SharedState.create(ring_name, 1 << 16, slots=3) as state:
        state.publish(np.full(100, 1, np.int64))
        q, q2, go = mp.Queue(), mp.Queue(), mp.Event()
        victim = start(procs, mp, W.pin_and_hold, ring_name, q)
        r1 = get(q, version=1, first=1)
        state.publish(np.full(100, 2, np.int64))
        survivor = start(procs, mp, W.pin_hold_then_check, ring_name, q2, go)
        get(q2, stage="pinned", version=2)
        assert state.publish(np.full(100, 3, np.int64)) == 3         # the one free slot
        assert state.stats()["pins"].count(1) == 2
        with pytest.raises(shmring.Timeout, match="pinned"):
            state.publish(np.full(100, 4, np.int64), timeout=0.2)
        os.kill(r1["pid"], signal.SIGKILL)
        finish(victim)
        assert state.publish(np.full(100, 4, np.int64), timeout=JOIN) == 4
        assert state.publish(np.full(100, 5, np.int64), timeout=JOIN) == 5   # and again: it goes on
        st = state.stats()
        assert st["reclaimed_pins"] == 1
        assert st["writer_waits"] >= 1
        go.set()
        r = get(q2, stage="checked", version=2)
        assert r["intact"] is True
        assert finish(survivor) == 0
        with state.read() as snap:
            assert snap.version == 5 and (snap.value == 5).all()


def test_a_writer_killed_mid_update_leaves_the_last_version_and_a_new_writer_takes_over(ring_name, procs, mp):
    with shmring.SharedState.create(ring_name, 1 << 16, slots=3) as state:
        q = mp.Queue()
        writer = start(procs, mp, W.writer_killed_mid_update, ring_name, q)
        r = get(q, stage="half written")
        # while it lives, the writer role is refused, naming its pid
        with pytest.raises(shmring.RoleTaken, match=f"live process {r['pid']}") as ei:
            state.publish(np.zeros(1000, np.int64))
        assert ei.value.pid == r["pid"]
        os.kill(r["pid"], signal.SIGKILL)
        finish(writer)
        with state.read() as snap:                      # readers keep the last published version, intact
            assert snap.version == 5
            assert (snap.value == 5).all()
        assert state.stats()["writer"]["alive"] is False
        with pytest.raises(shmring.PeerGone, match=f"writer \\(pid {r['pid']}\\) .* died"):
            state.wait_newer(than=5, timeout=JOIN)          # a dead writer is reported, not waited for
        with state.update() as draft:                   # a new writer takes over, from version 5
            assert (draft == 5).all()
            draft += 1
        with state.read() as snap:
            assert snap.version == 6 and (snap.value == 6).all()
        st = state.stats()
        assert st["writer"]["pid"] == os.getpid() and st["writer"]["sessions"] == 2


def test_wait_newer_in_another_process_wakes_on_publish(ring_name, procs, mp):
    with shmring.SharedState.create(ring_name, 1 << 12) as state:
        state.publish({"v": 1})
        q = mp.Queue()
        p = start(procs, mp, W.wait_for_version, ring_name, 1, q)
        get(q, stage="waiting")
        time.sleep(0.2)
        assert state.publish({"v": 2, "a": np.arange(3)}) == 2
        r = get(q, stage="done", result=2)
        assert r["value"]["v"] == 2 and list(r["value"]["a"]) == [0, 1, 2]
        assert finish(p) == 0


def test_ctrl_c_interrupts_wait_newer(ring_name, procs):
    ctx = multiprocess.get_context("fork")
    with shmring.SharedState.create(ring_name, 1 << 12) as state:
        q = ctx.Queue()
        p = start(procs, ctx, W.wait_for_version, ring_name, 0, q)
        get(q, stage="waiting")
        time.sleep(0.3)                                  # let it reach the futex sleep
        os.kill(p.pid, signal.SIGINT)
        get(q, stage="done", result="KeyboardInterrupt")
        assert finish(p) == 0


def test_a_state_handle_passes_to_a_child_by_inheritance_or_by_name(ring_name, procs, mp):
    with shmring.SharedState.create(ring_name, 1 << 12) as state:
        state.publish({"x": np.arange(4.0)})
        with state.read() as held:                       # a pin held by the parent does not travel
            q = mp.Queue()
            p = start(procs, mp, W.read_inherited, state, q)
            r = get(q, version=1)
            assert list(r["value"]["x"]) == [0.0, 1.0, 2.0, 3.0]
            assert finish(p) == 0
            assert held.version == 1
        assert state.stats()["pins"] == [0, 0, 0, 0]


def test_a_snapshot_inherited_through_fork_is_the_parents_pin(ring_name, procs):
    ctx = multiprocess.get_context("fork")
    with shmring.SharedState.create(ring_name, 1 << 12) as state:
        state.publish(np.arange(3))
        held = state.read()
        q = ctx.Queue()
        p = start(procs, ctx, W.release_inherited_inside_own_read, state, held, q)
        r = get(q, version=1)
        assert r["pins"] == 2                 # the parent's pin and the child's own, both still there
        assert finish(p) == 0
        assert sum(state.stats()["pins"]) == 1
        held.release()
        assert sum(state.stats()["pins"]) == 0
