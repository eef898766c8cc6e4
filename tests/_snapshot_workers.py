"""Process targets of the SharedState tests (module level, so they work under ``spawn``).

Children report through a queue: a dict whose ``error`` key is None on success.
The torn-read workers publish arrays whose every element equals the version
number, so a reader can check each snapshot without being told what was sent:
a torn read shows up as a non-uniform array, a stale or reordered one as a
version that went backwards or that does not match the array's contents.
"""
import os
import time
import traceback

import numpy as np

import shmring

WAIT = 30.0
TORN_ELEMS = 1 << 14             # 128 KiB of int64 per version: a long copy, a wide window for tearing


def _report(q, **kw):
    kw.setdefault("error", None)
    q.put(kw)


def torn_writer(name, seconds, q):
    """Publish as fast as possible for ``seconds``: every element of version v is v.
    Every third version goes through update() (copy-on-write of the previous one)."""
    try:
        state = shmring.SharedState.attach(name)
        buf = np.empty(TORN_ELEMS, np.int64)
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            nxt = state.version + 1
            if n % 3 == 2:
                with state.update(timeout=WAIT) as draft:
                    assert draft[0] == nxt - 1, (draft[0], nxt)
                    draft[:] = nxt                    # in place, in the new slot
                got = state.version
            else:
                buf.fill(nxt)
                got = state.publish(buf, timeout=WAIT)
            if got != nxt:
                raise AssertionError(f"published version {got}, expected {nxt}")
            n += 1
        stats = state.stats()
        state.close()
        _report(q, role="writer", published=n, stats=stats)
    except BaseException:
        _report(q, role="writer", error=traceback.format_exc())


def torn_reader(name, seconds, q):
    """Read the latest version in a loop; check each snapshot is uniform, equals
    its version, and that versions never go backwards."""
    try:
        state = shmring.SharedState.attach(name)
        state.wait_newer(than=0, timeout=WAIT)
        end = time.monotonic() + seconds
        last, reads, distinct, waits = 0, 0, 0, 0
        while time.monotonic() < end:
            with state.read() as snap:
                v = snap.version
                a = snap.value
                lo, hi = int(a.min()), int(a.max())
                if not (lo == hi == v):
                    raise AssertionError(f"torn or wrong snapshot: version {v}, elements {lo}..{hi}")
                del a
            if v < last:
                raise AssertionError(f"version went backwards: {v} after {last}")
            distinct += v != last
            last = v
            reads += 1
            if reads % 50 == 0:                       # sometimes sleep until the next version instead
                try:
                    state.wait_newer(than=last, timeout=0.5)
                    waits += 1
                except (shmring.Timeout, shmring.EndOfStream):    # EndOfStream: the writer finished (R57)
                    pass
        state.close()
        _report(q, role="reader", reads=reads, distinct=distinct, last=last, waits=waits)
    except BaseException:
        _report(q, role="reader", error=traceback.format_exc())


def pin_and_hold(name, q):
    """Pin the current version, report it, and hold the pin until killed."""
    try:
        state = shmring.SharedState.attach(name)
        snap = state.read()
        _report(q, pid=os.getpid(), version=snap.version, first=int(snap.value[0]))
        time.sleep(WAIT)
        _report(q, error="was not killed")
    except BaseException:
        _report(q, error=traceback.format_exc())


def pin_hold_then_check(name, q, go):
    """Pin the current version, report, wait for ``go``, then check the pinned
    data is still intact (the writer never reused the slot under the pin)."""
    try:
        state = shmring.SharedState.attach(name)
        with state.read() as snap:
            v = snap.version
            _report(q, stage="pinned", version=v)
            go.wait(WAIT)
            a = snap.value
            ok = bool((a == v).all())
            del a
        _report(q, stage="checked", version=v, intact=ok)
        state.close()
    except BaseException:
        _report(q, error=traceback.format_exc())


def writer_killed_mid_update(name, q):
    """Publish versions 1..5 (all elements = version), then start an update,
    overwrite half of the draft, report, and wait to be SIGKILLed."""
    try:
        state = shmring.SharedState.attach(name)
        for v in range(1, 6):
            assert state.publish(np.full(1000, v, np.int64)) == v
        with state.update() as draft:
            draft[:500] = -1
            _report(q, pid=os.getpid(), stage="half written")
            time.sleep(WAIT)
        _report(q, error="was not killed")
    except BaseException:
        _report(q, error=traceback.format_exc())


def wait_for_version(name, than, q):
    """Block in wait_newer(); report the version or the exception's type."""
    try:
        state = shmring.SharedState.attach(name)
        _report(q, stage="waiting")
        try:
            v = state.wait_newer(than=than, timeout=WAIT)
        except KeyboardInterrupt:
            _report(q, stage="done", result="KeyboardInterrupt")
            return
        with state.read() as snap:
            value = snap.copy()
        _report(q, stage="done", result=v, value=value)
    except BaseException:
        _report(q, stage="done", error=traceback.format_exc())


def read_inherited(state, q):
    """Read through a SharedState handle passed from the parent (inherited or pickled by name)."""
    try:
        with state.read() as snap:
            _report(q, version=snap.version, value=snap.copy())
    except BaseException:
        _report(q, error=traceback.format_exc())


def release_inherited_inside_own_read(state, inherited, q):
    """(fork) Pin through the inherited handle, then release the snapshot inherited
    from the parent inside that block: it must not touch the child's pin (nor the parent's)."""
    try:
        with state.read() as mine:
            inherited.release()
            pins = sum(state.stats()["pins"])
            _report(q, pins=pins, version=mine.version)
    except BaseException:
        _report(q, error=traceback.format_exc())
