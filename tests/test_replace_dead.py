"""A killed run does not block the next one (issue 16 case 4, R65-R66).

``create`` of a name whose every user is dead says so and names the fix;
``replace_dead=True`` replaces it; a segment a live process has attached is
never replaced, and two creators racing to replace the same dead segment
leave exactly one winner whose segment keeps the name.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import multiprocess
import pytest

import shmring

HOLD = """
import sys, time, shmring
kind = sys.argv[2]
if kind == "state":
    h = shmring.SharedState.create(sys.argv[1], 1 << 16)
    h.publish({"old": True})
else:
    h = shmring.Ring.create(sys.argv[1], 1 << 16)
    p = h.producer()
    p.send(b"old run")
print("ready", flush=True)
time.sleep(600)
"""


def _holder(name, kind="ring"):
    p = subprocess.Popen([sys.executable, "-c", HOLD, name, kind], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    return p


def _kill9(p):
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL


@pytest.mark.parametrize("kind", ["ring", "state"])
def test_create_over_a_killed_runs_segment_names_the_fix_and_replace_dead_replaces_it(kind, ring_name):
    cls = shmring.SharedState if kind == "state" else shmring.Ring
    p = _holder(ring_name, kind)
    _kill9(p)
    assert Path(f"/dev/shm/shmring.{ring_name}").exists()          # left behind by the kill
    with pytest.raises(shmring.SegmentExists) as e:
        cls.create(ring_name, 1 << 16)
    msg = str(e.value)
    assert "every process that used it is gone" in msg
    assert f"shmring gc {ring_name}" in msg and "replace_dead=True" in msg
    with cls.create(ring_name, 1 << 16, replace_dead=True) as fresh:
        if kind == "state":
            assert fresh.version == 0                              # nothing of the old run
        else:
            with fresh.producer() as prod, fresh.consumer() as cons:
                prod.send(b"new run")
                assert cons.recv_bytes(timeout=5) == b"new run"    # not the old run's message


@pytest.mark.parametrize("kind", ["ring", "state"])
def test_replace_dead_never_replaces_a_segment_a_live_process_uses(kind, ring_name):
    cls = shmring.SharedState if kind == "state" else shmring.Ring
    p = _holder(ring_name, kind)
    try:
        ino = os.stat(f"/dev/shm/shmring.{ring_name}").st_ino
        with pytest.raises(shmring.SegmentExists) as e:
            cls.create(ring_name, 1 << 16, replace_dead=True)
        assert "a live process has it attached" in str(e.value)
        with pytest.raises(shmring.SegmentExists) as e:
            cls.create(ring_name, 1 << 16)
        assert "gone" not in str(e.value) and "replace_dead" not in str(e.value)
        assert os.stat(f"/dev/shm/shmring.{ring_name}").st_ino == ino
        if kind == "ring":
            r = shmring.Ring.attach(ring_name)
            with r.consumer() as cons:
                assert cons.recv_bytes(timeout=5) == b"old run"        # the live run's data is intact
            r.close()
    finally:
        _kill9(p)


def test_a_segment_being_created_is_not_replaced(ring_name):
    # The window between the creator's O_EXCL open and its attach lock: an
    # empty, unlocked file. A replacer must leave it to its creator.
    path = Path(f"/dev/shm/shmring.{ring_name}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    with pytest.raises(shmring.SegmentExists) as e:
        shmring.Ring.create(ring_name, 1 << 16, replace_dead=True)
    assert "not initialized yet" in str(e.value)
    assert path.exists()
    old = time.time() - 60                                        # a creator that died in that window
    os.utime(path, (old, old))
    with shmring.Ring.create(ring_name, 1 << 16, replace_dead=True) as r:
        assert r.capacity == 1 << 16


def _racer(name, barrier, results, hold):
    barrier.wait()
    try:
        ring = shmring.Ring.create(name, 1 << 16, replace_dead=True)
    except shmring.SegmentExists as e:
        results.put(("exists", os.getpid(), str(e)))
        return
    results.put(("ok", os.getpid(), ring._seg.identity[1]))
    hold.wait(30)
    ring.close()


def _dead_segment(name):
    pid = os.fork()
    if pid == 0:
        try:
            shmring.Ring.create(name, 1 << 16)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_two_creators_racing_to_replace_a_dead_segment_leave_one_winner_whose_segment_stays(ring_name):
    ctx = multiprocess.get_context("fork")
    for _round in range(15):
        _dead_segment(ring_name)
        barrier, results, hold = ctx.Barrier(3), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_racer, args=(ring_name, barrier, results, hold)) for _ in range(3)]
        for p in procs:
            p.start()
        try:
            got = [results.get(timeout=30) for _ in procs]
            winners = [g for g in got if g[0] == "ok"]
            assert len(winners) == 1, got
            # the winner's segment is the one under the name (nobody removed it after it won)
            assert os.stat(f"/dev/shm/shmring.{ring_name}").st_ino == winners[0][2]
            assert shmring.Ring.attach(ring_name).close() is None
        finally:
            hold.set()
            for p in procs:
                p.join(30)
        shmring.unlink(ring_name)


def test_a_replacer_that_opened_the_dead_segment_before_another_replaced_it_leaves_the_new_one(ring_name):
    # R66, driven through its bad interleaving: L opens the dead segment and
    # stops; W replaces it and creates its own; L then gets the old file's
    # lock (nobody holds it) and must not unlink the name, which is W's now.
    import threading
    from shmring import pausepoints
    _dead_segment(ring_name)
    opened, go = threading.Event(), threading.Event()

    def hook(point):
        if point == "replace_opened" and threading.current_thread().name == "L":
            opened.set()
            assert go.wait(30)
    out = {}

    def late():
        try:
            out["L"] = shmring.Ring.create(ring_name, 1 << 16, replace_dead=True)
        except shmring.SegmentExists as e:
            out["L"] = e
    pausepoints.hook = hook
    try:
        t = threading.Thread(target=late, name="L")
        t.start()
        assert opened.wait(30)
        with shmring.Ring.create(ring_name, 1 << 16, replace_dead=True) as w:
            go.set()
            t.join(30)
            assert isinstance(out["L"], shmring.SegmentExists), out
            assert "won the race" in str(out["L"])
            assert os.stat(f"/dev/shm/shmring.{ring_name}").st_ino == w._seg.identity[1]
    finally:
        pausepoints.hook = None
        go.set()
