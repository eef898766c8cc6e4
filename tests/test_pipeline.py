"""shmring.Pipeline: stages in processes, wired by rings.  Every item is
checked at the sink; failures (an exception, a killed or crashing stage,
Ctrl-C) end the run quickly and leave no process and no segment behind."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import multiprocess
import numpy as np
import pytest

import shmring

N = 3000


def items():
    for i in range(N):
        yield {"i": i, "img": np.full((16, 16), i % 251, np.uint8)}


def segments(prefix):
    """/dev/shm entries under a pipeline's name (its rings are anonymous now:
    none; before, a killed tree left its named rings there)."""
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"shmring.{prefix}")]


def no_children_left():
    deadline = time.monotonic() + 5
    while multiprocess.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocess.active_children()


@pytest.mark.parametrize("ordered", [True, False])
def test_a_worker_pool_delivers_every_item_exactly_once(start_method, ordered):
    ctx = multiprocess.get_context(start_method)
    q = ctx.Queue()

    def half(v):
        assert not v["img"].flags.writeable                     # a zero-copy view of the ring
        return {"i": v["i"], "small": v["img"][::2, ::2].copy()}

    def check(v, seen=[]):
        if not np.array_equal(v["small"], np.full((8, 8), v["i"] % 251, np.uint8)):
            q.put(("torn", v["i"]))
        seen.append(v["i"])
        if len(seen) == N:
            q.put(("done", seen))

    name = f"pl{os.getpid()}"
    with shmring.Pipeline(name, capacity=1 << 16, start_method=start_method) as p:
        small = p.map(half, p.source(items), workers=4, ordered=ordered)
        p.sink(check, small)
        summary = p.run(timeout=120)
    what, seen = q.get(timeout=10)
    assert what == "done"
    if ordered:
        assert seen == list(range(N))
    else:
        assert sorted(seen) == list(range(N))
    assert all(st["items"] == N for st in summary["stages"].values())
    assert no_children_left() and segments(name) == []


def test_in_place_outputs_and_dropped_items():
    q = multiprocess.Queue()

    def fill(v, out):
        out[:] = v
        out[0] = -1

    def sink(v, acc={"n": 0, "sum": 0.0}):
        acc["n"] += 1
        acc["sum"] += float(v[1:].sum())
        if acc["n"] == 500:
            q.put(acc)

    with shmring.Pipeline(f"pi{os.getpid()}", capacity=1 << 16) as p:
        evens = p.map(lambda v: v if v[0] % 2 == 0 else None, p.source(np.arange(1000.0).reshape(-1, 1).repeat(4, 1)),
                      workers=2, ordered=True)
        p.sink(sink, p.map(fill, evens, out=((4,), np.float64), workers=2))
        p.run(timeout=60)
    acc = q.get(timeout=5)
    assert acc["sum"] == sum(3 * i for i in range(0, 1000, 2))


def test_an_exception_in_a_worker_surfaces_with_its_traceback(start_method):
    name = f"pe{os.getpid()}"

    def boom(v):
        if v["i"] == 700:
            raise ZeroDivisionError("worker says no")
        return v

    t0 = time.monotonic()
    with pytest.raises(shmring.PipelineError) as ei:
        with shmring.Pipeline(name, capacity=1 << 16, start_method=start_method) as p:
            p.sink(lambda v: None, p.map(boom, p.source(items), workers=3, name="boom"))
            p.run(timeout=60)
    assert time.monotonic() - t0 < 30
    assert ei.value.stage == "boom"
    assert "ZeroDivisionError: worker says no" in str(ei.value)
    assert "in boom" in ei.value.remote_traceback
    assert no_children_left() and segments(name) == []


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSEGV"])
def test_a_stage_that_dies_is_reported(how):
    name = f"pk{os.getpid()}"

    def die(v):
        if v["i"] == 300:
            if how == "SIGKILL":
                os.kill(os.getpid(), signal.SIGKILL)
            import ctypes
            ctypes.string_at(0)                          # a segfault in user code
        return v

    with pytest.raises(shmring.PipelineError, match=f"killed by {how}") as ei:
        with shmring.Pipeline(name, capacity=1 << 16) as p:
            p.sink(lambda v: None, p.map(die, p.source(items), workers=2, name="fragile"))
            p.run(timeout=60)
    assert ei.value.stage == "fragile" and ei.value.remote_traceback is None
    assert no_children_left() and segments(name) == []


SCRIPT = textwrap.dedent("""
    import itertools, os, sys, time
    import numpy as np, shmring

    def say_pid():
        os.write(1, f"PID {os.getpid()}\\n".encode())    # one write: lines of several processes never mix

    def endless():
        say_pid()
        for i in itertools.count():
            yield np.full(1000, i)

    def work(v, said=[]):
        if not said:
            said.append(say_pid())
        time.sleep(0.001)
        return v

    with shmring.Pipeline(sys.argv[1], capacity=1 << 16) as p:
        p.sink(work, p.map(work, p.source(endless), workers=2))
        print("RUNNING", flush=True)
        try:
            p.run()
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
            raise
""")


def stage_pids(proc, n=4, timeout=60):
    """The pids the SCRIPT's stage processes print, read with a deadline (never a hang)."""
    import select
    pids, deadline = [], time.monotonic() + timeout
    while len(pids) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(pids)} of {n} stage pids within {timeout} s"
        if select.select([proc.stdout], [], [], left)[0]:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            if line.startswith("PID "):
                pids.append(int(line.split()[1]))
    return pids


def test_ctrl_c_stops_everything_within_a_second(tmp_path):
    name = f"pc{os.getpid()}"
    script = tmp_path / "endless.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        pids = stage_pids(proc)                    # source, 2 workers, sink
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - t0
        assert "INTERRUPTED" in out and "KeyboardInterrupt" in err
        assert elapsed < 1.0, elapsed
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert segments(name) == []
    finally:
        _kill_session(proc)


def _kill_session(proc):
    """A failed test leaves no endless pipeline behind (its stages share its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def test_the_graph_is_checked_before_anything_starts():
    with shmring.Pipeline("pg") as p:
        src = p.source(range(3))
        with pytest.raises(ValueError, match="one source and one sink"):
            p.run()
        p.sink(print, src)
        with pytest.raises(ValueError, match="already read"):
            p.sink(print, src)
        with pytest.raises(TypeError, match="Stream"):
            p.map(abs, [1, 2])
    with shmring.Pipeline("pg1") as p:
        with pytest.raises(ValueError, match="workers"):
            p.map(abs, p.source(range(3)), workers=0)
    with shmring.Pipeline("pg2") as p:
        p.source(range(3))
        p.sink(print, p.source(range(2), name="second"))
        with pytest.raises(ValueError, match="one source"):
            p.run()


class Totals:
    """A sink object: called per item in the sink process; finish() goes back to run()."""

    def __init__(self):
        self.n, self.total = 0, 0

    def __call__(self, v):
        self.n += 1
        self.total += int(v)

    def finish(self):
        return {"n": self.n, "total": self.total}


def test_the_sink_result_comes_back_from_run(start_method):
    with shmring.Pipeline(f"pr{os.getpid()}", capacity=1 << 14, start_method=start_method) as p:
        p.sink(Totals(), p.map(lambda x: x * 2, p.source(range(1000)), workers=2))
        summary = p.run(timeout=60)
    assert summary["result"] == {"n": 1000, "total": 999 * 1000}


def test_stage_processes_die_with_a_killed_parent(tmp_path):
    """SIGKILL gives the parent no chance to clean up: the stages must not be orphaned."""
    name = f"pd{os.getpid()}"
    script = tmp_path / "endless.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        pids = stage_pids(proc)
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 5
        alive = list(pids)
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if shmring._proc.alive(p)]           # zombies count as dead
        assert not alive
    finally:
        _kill_session(proc)
    assert segments(name) == []                       # nothing named was left behind by the killed tree


def test_a_pipeline_makes_only_anonymous_rings(monkeypatch):
    """Its hops are sealed anonymous rings: nothing in /dev/shm to leave behind
    or to fill (checked by recording every segment the parent creates)."""
    made = []
    real = shmring.segment.Segment.create

    def create(*a, **kw):
        made.append((a, kw))
        return real(*a, **kw)
    monkeypatch.setattr(shmring.segment.Segment, "create", create)
    with shmring.Pipeline(f"pa{os.getpid()}", capacity=1 << 14) as p:
        s = p.source(range(20))
        s = p.map(lambda i: i * 2, s, workers=2)
        p.sink(lambda v: None, s)
        p.run(timeout=60)
    assert made == []


def test_dropped_items_never_stall_an_ordered_stage_and_capacity_is_checked_early():
    """An unordered map that drops items, then an ordered one: the placeholder of
    each dropped item keeps its place, so the sink gets every kept item in order."""
    with shmring.Pipeline(f"po{os.getpid()}", capacity=1 << 14) as p:
        odd = p.map(lambda x: x if x % 3 else None, p.source(range(600)), workers=2)
        sink = Totals()
        p.sink(sink, p.map(lambda x: x * 10, odd, workers=3, ordered=True))
        summary = p.run(timeout=60)
    kept = [x for x in range(600) if x % 3]
    assert summary["result"] == {"n": len(kept), "total": 10 * sum(kept)}
    with pytest.raises(ValueError, match="power of two"):
        shmring.Pipeline("bad", capacity=5000)
    with pytest.raises(ValueError, match="power of two"):
        shmring.Pipeline("bad2").source(range(3), capacity=100)


def test_async_for_lets_other_tasks_run_while_messages_wait(ring_name):
    import asyncio

    async def main(ring):
        with ring.producer() as p:
            for i in range(2000):
                p.send(b"%d" % i)
        turns = 0

        async def other():
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)
        t = asyncio.create_task(other())
        n = 0
        async for msg in ring.consumer():
            msg.release()
            n += 1
        t.cancel()
        return n, turns

    with shmring.Ring.create(ring_name, 1 << 16) as ring:
        n, turns = asyncio.run(main(ring))
    assert n == 2000 and turns >= 2000 // 32 - 1
