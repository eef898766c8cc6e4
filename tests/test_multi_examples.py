"""examples/fanin, examples/broadcast and examples/workers run end to end as separate processes.

Every run uses its own segment names (``--name``), so these tests can run
next to each other and next to someone using the examples' default names.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shmring

from _workers import unique_name

ROOT = Path(__file__).resolve().parent.parent
FANIN = ROOT / "examples" / "fanin"
BROADCAST = ROOT / "examples" / "broadcast"
WORKERS = ROOT / "examples" / "workers"
ENV = dict(os.environ, PYTHONUNBUFFERED="1")
TIMEOUT = 120        # seconds for any one process: generous, the machine may be busy


@pytest.fixture
def names():
    """Makes unique segment names; unlinks whatever is left under them afterwards."""
    made = []

    def make(tag):
        made.append(unique_name(tag))
        return made[-1]
    yield make
    for name in made:
        for n in (name, name + ".jobs", name + ".results"):
            shmring.unlink(n, missing_ok=True)


@pytest.fixture
def kids():
    """Started processes; any still running at teardown is killed and reaped."""
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(30)


def start(kids, script, *args):
    p = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV)
    kids.append(p)
    return p


def finish(p) -> str:
    """Output of a process once it exited (stdout and stderr together)."""
    return p.communicate(timeout=TIMEOUT)[0]


def wait_until(cond, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ring_stats(name):
    try:
        with shmring.Ring.attach(name) as ring:
            return ring.stats()
    except shmring.SegmentNotFound:
        return None


def gone(*names):
    return not any(Path(f"/dev/shm/shmring.{n}").exists() for n in names)


# --------------------------------------------------------------------------- fanin (mpsc)

def test_fanin_collector_gets_every_message_of_every_worker_in_order(names, kids):
    name = names("fanin")
    workers = [start(kids, FANIN / "worker.py", "--id", k, "--count", 400, "--name", name) for k in range(2)]
    collector = start(kids, FANIN / "collector.py", "--workers", 3, "--name", name)
    workers.append(start(kids, FANIN / "worker.py", "--id", 2, "--count", 400, "--name", name))
    outs = [finish(w) for w in workers]
    out = finish(collector)
    for k, (w, wout) in enumerate(zip(workers, outs)):
        assert w.returncode == 0, wout
        assert f"worker {k}: sent 400 messages" in wout
    assert collector.returncode == 0, out
    assert "collector: 1200 messages from 3 workers (0: 400, 1: 400, 2: 400)" in out
    assert re.search(r"collector: [\d.]+ MB in [\d.]+ s, [\d,]+ messages/s", out), out
    assert "collector: OK, 0 problems" in out
    assert "Warning" not in out + "".join(outs)
    assert gone(name)


def test_fanin_spawn_runs_the_whole_demo_from_one_command(names, kids):
    name = names("fanin")
    collector = start(kids, FANIN / "collector.py", "--workers", 2, "--spawn", "--count", 300, "--name", name)
    out = finish(collector)
    assert collector.returncode == 0, out
    assert "worker 0: sent 300 messages" in out and "worker 1: sent 300 messages" in out
    assert "collector: 600 messages from 2 workers (0: 300, 1: 300)" in out
    assert "collector: OK, 0 problems" in out
    assert gone(name)


def test_fanin_collector_fails_when_a_worker_dies(names, kids):
    name = names("fanin")
    collector = start(kids, FANIN / "collector.py", "--workers", 2, "--name", name, "--wait", 60)
    ok = start(kids, FANIN / "worker.py", "--id", 0, "--count", 200, "--name", name)
    doomed = start(kids, FANIN / "worker.py", "--id", 1, "--count", 10**8, "--name", name)

    def doomed_is_sending():
        st = ring_stats(name)
        return st is not None and any(p["pid"] == doomed.pid and p["sent"] > 0 for p in st["producers"])
    wait_until(doomed_is_sending, "the second worker to send")
    doomed.kill()
    out = finish(collector)
    assert finish(ok) and ok.returncode == 0
    assert collector.returncode == 1, out
    assert "BAD stream ended early" in out and "1 producer(s) died" in out
    assert "1 of 2 workers finished" in out
    assert re.search(r"collector: \d+ messages from 2 workers \(0: 200, 1: \d+\)", out), out
    assert "collector: FAILED" in out
    assert gone(name)


# --------------------------------------------------------------------------- broadcast

def test_broadcast_viewers_join_at_run_time_and_a_slow_one_is_evicted_and_rejoins(names, kids):
    name = names("bcast")
    frames = 250
    first = start(kids, BROADCAST / "viewer.py", "--start", "oldest", "--name", name)
    slow = start(kids, BROADCAST / "viewer.py", "--slow", 1.0, "--name", name)
    camera = start(kids, BROADCAST / "camera.py", "--frames", frames, "--fps", 50, "--policy", "evict",
                   "--evict-after", 0.5, "--viewers", 2, "--name", name)

    def sent(n):
        st = ring_stats(name)
        return st is not None and st["sent"] >= n
    wait_until(lambda: sent(40), "the camera's first 40 frames")
    late = start(kids, BROADCAST / "viewer.py", "--start", "newest", "--name", name)
    cam_out = finish(camera)
    outs = {p: finish(p) for p in (first, late, slow)}
    assert camera.returncode == 0, cam_out
    assert "policy evict" in cam_out
    m = re.search(rf"camera: sent {frames} frames in [\d.]+ s \(\d+ fps\); (\d+) viewers joined, (\d+) evictions",
                  cam_out)
    assert m and int(m.group(1)) == 3 and int(m.group(2)) >= 1, cam_out
    for p, out in outs.items():
        assert p.returncode == 0, out
        assert "0 bad, 0 gaps" in out, out
        assert "Warning" not in out
    # the first viewer joined before frame 0 and kept up: every frame, in order
    assert f"{frames} frames (0..{frames - 1}), 0 bad, 0 gaps, lagged 0 times (0 frames missed)" in outs[first]
    # the late one joined at the newest frame while the camera ran, then saw every later frame
    m = re.search(r"(\d+) frames \((\d+)\.\.(\d+)\), 0 bad, 0 gaps, lagged 0 times", outs[late])
    assert m, outs[late]
    n, lo, hi = map(int, m.groups())
    assert lo >= 40 and hi == frames - 1 and n == hi - lo + 1, outs[late]
    # the slow one was evicted, was told so, and rejoined
    assert re.search(r"Lagged after frame \d+: evicted \d+ frames \([\d.]+ MB\) behind", outs[slow]), outs[slow]
    assert re.search(r"rejoined at frame \d+, \d+ frames skipped", outs[slow]), outs[slow]
    m = re.search(r"lagged (\d+) times \((\d+) frames missed\)", outs[slow])
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) >= 1, outs[slow]
    assert gone(name)


# --------------------------------------------------------------------------- workers (mpmc + mpsc)

def test_workers_every_job_gets_exactly_one_result(names, kids):
    name = names("work")
    dispatcher = start(kids, WORKERS / "dispatcher.py", "--jobs", 600, "--workers", 2, "--name", name)
    workers = [start(kids, WORKERS / "worker.py", "--name", name) for _ in range(2)]
    out = finish(dispatcher)
    wouts = [finish(w) for w in workers]
    assert dispatcher.returncode == 0, out
    assert re.search(r"dispatcher: 600 of 600 jobs answered by 2 workers \(\d+: \d+, \d+: \d+\)", out), out
    assert "redelivered: 0" in out and "dispatcher: OK, 0 problems" in out
    done = 0
    for w, wout in zip(workers, wouts):
        assert w.returncode == 0, wout
        m = re.search(rf"worker {w.pid}: (\d+) jobs done", wout)
        assert m, wout
        done += int(m.group(1))
    assert done == 600
    assert "Warning" not in out + "".join(wouts)
    assert gone(name + ".jobs", name + ".results")


def test_workers_a_job_held_by_a_crashed_worker_is_redelivered(names, kids):
    name = names("work")
    dispatcher = start(kids, WORKERS / "dispatcher.py", "--jobs", 1000, "--workers", 3, "--spawn",
                       "--die-after", 2, "--name", name)
    out = finish(dispatcher)
    assert dispatcher.returncode == 0, out
    m = re.search(r"worker (\d+): crashing while holding job (\d+)", out)
    assert m, out
    assert f"{m.group(1)}: 1," in out or f"{m.group(1)}: 1)" in out     # it finished one job before
    assert "a worker died (the result stream ended with PeerGone)" in out
    assert "dispatcher: 1000 of 1000 jobs answered by 3 workers" in out
    assert "redelivered: 1" in out and "dispatcher: OK, 0 problems" in out
    assert gone(name + ".jobs", name + ".results")
