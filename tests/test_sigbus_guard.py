"""A segment truncated under live processes kills nobody (issue 14, case 1).

Another process with write access can ``ftruncate`` a ring's or a state's
backing (the POSIX segment in /dev/shm or the ``path=`` file) to 0 or to a
few KiB while it is in use.  Every touch of a vanished page then raises
SIGBUS.  shmring's guard (docs/design.md, R45 to R49) maps zero pages over
its own mapping instead, so every role survives: its next shmring call raises
``SegmentTruncated``, a blocked wait ends within a slice, and a numpy view
still held reads zeros.  A SIGBUS outside shmring's mappings still kills,
with faulthandler's traceback.

Each case runs its roles in forked children of this pytest process, so they
inherit pytest's faulthandler (enabled before shmring installed its
handler, which chains to it); exit codes are checked first.  The test
process itself has nothing mapped when it truncates.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import multiprocess
import pytest

import shmring

import _sigbus_workers as W

# scenario -> (what to create, capacity or state size, [targets]); the first target is the one
# whose `ready` says "truncate now"
RING = {"spsc": {}, "mpmc": {"kind": "mpmc"}, "records": {"dtype": W.DT}}
SCENARIOS = {
    **{f"stream-{k}": (k, 1 << 16, [W.consumer, W.producer]) for k in RING},
    **{f"blocked-recv-{k}": (k, 1 << 16, [W.blocked_consumer]) for k in RING},
    **{f"numpy-view-{k}": (k, 1 << 23, [W.view_holder, W.view_sender]) for k in ("spsc", "mpmc")},
    "state-writer": ("state", 1 << 20, [W.state_writer]),
    "state-snapshot-reader": ("state", 1 << 20, [W.state_reader, W.state_publish_once]),
    "state-wait-newer": ("state", 1 << 20, [W.state_waiter, W.state_publish_once]),
}


def _backing(ring_name, tmp_path, backing):
    if backing == "posix":
        return ring_name, None, f"/dev/shm/shmring.{ring_name}"
    path = str(tmp_path / "seg.ring")
    return None, path, path


def _create(kind, size, name, path):
    if kind == "state":
        shmring.SharedState.create(name, size, slots=3, path=path).close()
    else:
        shmring.Ring.create(name, size, path=path, **RING[kind]).close()


@pytest.mark.parametrize("to", [0, 8192], ids=["to-0", "to-8KiB"])
@pytest.mark.parametrize("backing", ["posix", "file"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_truncating_a_live_backing_kills_no_process_and_the_next_call_raises_segment_truncated(
        scenario, backing, to, ring_name, tmp_path, procs):
    kind, size, targets = SCENARIOS[scenario]
    name, path, file = _backing(ring_name, tmp_path, backing)
    _create(kind, size, name, path)                  # and closed: this process maps nothing
    ctx = multiprocess.get_context("fork")
    ready = ctx.Event()
    queues = []
    for target in targets:
        q = ctx.Queue()
        p = ctx.Process(target=target, args=(q, ready, kind, name, path))
        p.start()
        procs.append(p)
        queues.append(q)
    assert ready.wait(20), "the roles never got going"
    time.sleep(0.3 if "blocked" in scenario or "wait" in scenario else 0.05)   # asleep in the futex by now
    os.truncate(file, to)
    for p in procs:
        p.join(20)
    codes = [p.exitcode for p in procs]
    assert codes == [0] * len(procs), f"a role died: exit codes {codes} (-{int(signal.SIGBUS)} is SIGBUS)"
    results = [q.get(timeout=5) for q in queues]
    main_outcome, detail = results[0]

    if scenario.startswith("stream"):
        for outcome, d in results:
            assert outcome == "SegmentTruncated", results
            assert "truncated" in d["message"] and (name or path) in d["message"], d
        assert detail["wrong"] == 0 and detail["received"] >= 256, detail
        assert detail["after_close"] == "SegmentTruncated", detail
    elif scenario.startswith("blocked") or scenario == "state-wait-newer":
        assert main_outcome == "SegmentTruncated", results
        assert detail["waited"] < 2.0, f"the wait noticed only after {detail['waited']:.2f} s"
    elif scenario == "state-writer":
        assert main_outcome == "SegmentTruncated" and detail["after"] == "SegmentTruncated", results
    else:                                           # a view held through the truncation
        assert main_outcome == "no error", results
        assert detail["sums"][0] > 0 and detail["sums"][-1] == 0.0 and detail["zeros"], detail
        assert detail["after"] == "SegmentTruncated", detail
    for outcome, _ in results[1:]:
        assert outcome in ("no error", "SegmentTruncated"), results


def test_segment_truncated_is_a_corrupt_segment_error_exported_from_shmring():
    assert issubclass(shmring.SegmentTruncated, shmring.CorruptSegmentError)
    assert shmring.errors.SegmentTruncated is shmring.SegmentTruncated


def test_attaching_a_truncated_ring_raises_segment_truncated(ring_name):
    shmring.Ring.create(ring_name, 1 << 16).close()
    os.truncate(f"/dev/shm/shmring.{ring_name}", 8192)
    with pytest.raises(shmring.SegmentTruncated, match="truncated"):
        shmring.Ring.attach(ring_name)


def test_a_truncation_seen_by_one_thread_ends_another_threads_wait(ring_name):
    """Two threads, one mapping: the one that notices (here by receiving)
    marks the mapping for both; the other, blocked in recv, ends in a slice."""
    code = textwrap.dedent(f"""
        import os, threading, time, shmring
        ring = shmring.Ring.create({ring_name!r}, 1 << 16, kind="mpmc")
        a, b = ring.consumer(), ring.consumer()
        out = {{}}
        def wait():
            t = time.monotonic()
            try:
                b.recv(timeout=5)
            except Exception as e:
                out["b"] = (type(e).__name__, time.monotonic() - t)
        th = threading.Thread(target=wait); th.start(); time.sleep(0.3)
        os.truncate("/dev/shm/shmring.{ring_name}", 0)
        try:
            a.try_recv()
        except Exception as e:
            out["a"] = type(e).__name__
        th.join()
        print(out["a"], out["b"][0], out["b"][1] < 1.0)
    """)
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["SegmentTruncated", "SegmentTruncated", "True"], r.stdout + r.stderr


FOREIGN = """
import faulthandler, mmap, os, sys, shmring
ring = shmring.Ring.create(path={ring!r}, capacity=1 << 16)   # shmring's guard is installed, a ring mapped
if {late_faulthandler}:
    faulthandler.enable()                               # in front of shmring's handler now...
    print("guard in front", shmring._core.guard_installed())
    shmring.Ring.create(path={ring!r} + "2", capacity=1 << 12).close()   # ...until shmring maps again
print("guard in front", shmring._core.guard_installed())
cons = ring.consumer()
os.truncate({ring!r}, 0)                                # our own ring: survived
try:
    cons.try_recv()
except shmring.SegmentTruncated:
    print("SegmentTruncated", flush=True)
fd = os.open({file!r}, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 1 << 16)
m = mmap.mmap(fd, 1 << 16)                              # a mapping of our own, not shmring's
m[40000] = 1
os.ftruncate(fd, 0)
print("faulthandler", faulthandler.is_enabled(), flush=True)
m[40000]                                                # SIGBUS: must still kill this process
print("survived", flush=True)
"""


@pytest.mark.parametrize("how", ["-X faulthandler", "faulthandler enabled after shmring", "no faulthandler"])
def test_a_sigbus_outside_shmring_mappings_still_kills_and_faulthandler_still_reports_it(how, tmp_path):
    late = how.endswith("shmring")
    code = FOREIGN.format(ring=str(tmp_path / "r.ring"), file=str(tmp_path / "own.bin"), late_faulthandler=late)
    args = [sys.executable] + (["-X", "faulthandler"] if how.startswith("-X") else []) + ["-c", code]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert "survived" not in lines and "SegmentTruncated" in lines, r.stdout
    fronts = [x for x in lines if x.startswith("guard in front")]
    assert fronts == (["guard in front False", "guard in front True"] if late else ["guard in front True"]), lines
    if how == "no faulthandler":
        assert "faulthandler False" in lines and "Fatal Python error" not in r.stderr
    else:
        assert "faulthandler True" in lines
        line = code.splitlines().index(next(x for x in code.splitlines() if x.startswith("m[40000]  "))) + 1
        assert "Fatal Python error: Bus error" in r.stderr and f"line {line}" in r.stderr, r.stderr
