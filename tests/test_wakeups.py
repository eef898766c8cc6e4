"""The futex wake-up protocol loses no wake-up, under load, across processes.

Both sides sleep at once (spin=0) and every wait slice is 30 s long, so a lost
wake-up would stall a round trip until its slice ran out, and would be counted
by the C core as a sleep that timed out although its condition already held.
"""
import os
import threading
import time
import uuid

import pytest

import shmring
from shmring import _core
from shmring import layout as L

from _wake_workers import pingpong_echo

ROUNDS = 3000


def _count_a_late_wake_up_here():
    """Make this process count one late wake-up for real: a word changes
    while we sleep on it, and nobody wakes us (the change skips the wake)."""
    ring = shmring.Ring.anonymous(1 << 12)
    r = ring._region
    before = _core.wait_counters()["late_wakeups"]
    t = threading.Timer(0.02, r.store_u64, (L.Q_OFF_ITEMS, 1))
    t.start()
    assert r.wait_change(L.Q_OFF_ITEMS, 0, L.Q_OFF_NOTFULL_WAKE, -1, 0.2, 0.0)
    t.join()
    ring.close()
    assert _core.wait_counters()["late_wakeups"] == before + 1


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_blocking_ping_pong_never_misses_a_wake_up(method, monkeypatch):
    import multiprocess
    # A forked child inherits this process's counters: an earlier test that
    # counted a late wake-up here (on purpose or not) must not fail the child.
    _count_a_late_wake_up_here()
    ring_name = f"wake-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ctx = multiprocess.get_context(method)
    monkeypatch.setattr(shmring.waiting, "WAIT_SLICE", 30.0)
    ping = shmring.Ring.create(ring_name + "-ping", 1 << 12)
    pong = shmring.Ring.create(ring_name + "-pong", 1 << 12)
    try:
        child = ctx.Process(target=pingpong_echo, args=(ping, pong, ROUNDS))
        child.start()
        before = _core.wait_counters()
        with ping.producer(spin=0) as out, pong.consumer(spin=0) as back:
            for i in range(ROUNDS):
                payload = i.to_bytes(8, "little") * 8
                out.send(payload, timeout=60)
                assert back.recv_bytes(timeout=60) == payload[::-1]
        child.join(60)
        after = _core.wait_counters()
        assert child.exitcode == 0            # 3: the child saw a late wake-up or never slept
        assert after["sleeps"] > before["sleeps"]            # the test did exercise futex sleeps
        assert after["late_wakeups"] == before["late_wakeups"]
    finally:
        for r in (ping, pong):
            r.close()
            r.unlink()
