"""SharedState races of issue 12, each driven into its bad interleaving directly.

* (6c) The writer reclaiming dead readers' pins: a step of another party is run
  between the writer's load of an entry's owner word and what it does next
  (``SharedState._load_u64`` is wrapped for the writer handle only).
* (7b) ``wait_newer()`` while the writer publishes: the writer publishes
  between wait_newer's load of ``current`` and its check of that version's
  slot header (the C core's test-only pause hook, ``_core._set_pause_hook``).
* (8) One writer handle used from two threads: one thread is held after it
  chose a slot (``codec.write`` is wrapped) while the other publishes; and a
  free-running stress of two writer threads with reader threads checking that
  every version is untorn.
"""
import os
import struct
import threading
import time

import numpy as np
import pytest

import shmring
from shmring import _core, codec
from shmring import layout as L
from shmring._proc import my_start_time
from shmring.roles import my_owner_word


def _entry(i):
    return L.HEADER_SIZE + i * L.ST_ENTRY


def _dead_word():
    """An owner word naming no live process: our pid with another start time."""
    import os
    return L.owner_word(os.getpid(), (my_start_time() ^ 1) & 0xFFFFFFFF)


# ------------------------------------------------------------------ (6c) reclaiming pins

def _during_owner_load(monkeypatch, writer, entry, action):
    """Run ``action()`` once, right after ``writer`` loads the owner word of
    ``entry`` (the value it loaded is returned unchanged to it)."""
    real = shmring.SharedState._load_u64
    done = []

    def load_u64(self, off):
        v = real(self, off)
        if self is writer and off == _entry(entry) + L.ST_ENTRY_OWNER and not done:
            done.append(action())
        return v
    monkeypatch.setattr(shmring.SharedState, "_load_u64", load_u64)
    return done


@pytest.mark.parametrize("owner", ["zero", "dead"])
def test_reclaim_never_clears_the_pin_of_a_reader_that_claimed_the_entry_meanwhile(ring_name, monkeypatch, owner):
    """Entry 0 holds a pin left behind (under owner 0: garbage; under a dead
    owner: a dead reader's).  Between the writer's load of the owner word and
    its next step, a reader claims entry 0 and pins version 1 there.  The
    writer must leave that pin alone, and never reuse version 1's slot."""
    with shmring.SharedState.create(ring_name, 1 << 12, slots=3) as w:
        w.publish(np.full(64, 1))
        cur = w._load_u64(L.ST_OFF_CURRENT)
        r = shmring.SharedState.attach(ring_name)      # first: attaching frees dead readers' entries
        w._store_u64(_entry(0) + L.ST_ENTRY_OWNER, 0 if owner == "zero" else _dead_word())
        w._store_u64(_entry(0) + L.ST_ENTRY_PIN, cur)
        snaps = _during_owner_load(monkeypatch, w, 0, r.read)   # claims entry 0 (the lowest free/dead one)
        w._reclaim_dead_pins()
        monkeypatch.undo()
        assert len(snaps) == 1
        snap = snaps[0]
        assert r._own_entries() == [(0, 1)]
        assert w._load_u64(_entry(0) + L.ST_ENTRY_OWNER) == my_owner_word()
        assert w._load_u64(_entry(0) + L.ST_ENTRY_PIN) == cur, "the writer cleared a live reader's pin"
        for v in range(2, 9):
            w.publish(np.full(64, v))
        a = snap.value
        assert snap.version == 1 and (a == 1).all(), f"pinned version 1 was overwritten: {a[:4]}..."
        del a
        snap.release()
        r.close()


def test_a_pin_under_owner_0_is_left_to_the_next_reader_that_claims_the_entry(state):
    """Owner 0 with a pin is garbage (no step of the protocol leaves one): the
    writer does not touch it (it can only make the writer avoid that slot); a
    reader claiming the free entry clears it first."""
    state.publish(np.full(8, 1))
    garbage = (77 << 8) | 2
    state._store_u64(_entry(0) + L.ST_ENTRY_PIN, garbage)
    assert state._reclaim_dead_pins() == 0
    assert state._load_u64(_entry(0) + L.ST_ENTRY_PIN) == garbage
    assert state.stats()["reclaimed_pins"] == 0
    with state.read() as snap:                                # claims entry 0, clears the garbage, pins
        assert state._load_u64(_entry(0) + L.ST_ENTRY_PIN) == state._load_u64(L.ST_OFF_CURRENT)
        assert snap.version == 1
    assert state.stats()["pins"] == [0, 0, 0]


def test_a_dead_readers_pin_is_reclaimed_and_the_entry_freed(state):
    state.publish(np.full(8, 1))
    cur = state._load_u64(L.ST_OFF_CURRENT)
    state._store_u64(_entry(5) + L.ST_ENTRY_OWNER, _dead_word())
    state._store_u64(_entry(5) + L.ST_ENTRY_PIN, cur)
    live = my_owner_word()
    state._store_u64(_entry(6) + L.ST_ENTRY_OWNER, live)        # a live owner's pin stays
    state._store_u64(_entry(6) + L.ST_ENTRY_PIN, cur)
    assert state._reclaim_dead_pins() == 1
    assert state._load_u64(_entry(5) + L.ST_ENTRY_PIN) == 0
    assert state._load_u64(_entry(5) + L.ST_ENTRY_OWNER) == 0
    assert state._load_u64(_entry(6) + L.ST_ENTRY_PIN) == cur
    assert state.stats()["reclaimed_pins"] == 1
    state._store_u64(_entry(6) + L.ST_ENTRY_PIN, 0)
    state._store_u64(_entry(6) + L.ST_ENTRY_OWNER, 0)


# ------------------------------------------------------------------ (7b) wait_newer

@pytest.fixture
def pause_hook():
    """``pause_hook(fn)``: fn(handle, where) runs at the C core's test-only pause points."""
    yield _core._set_pause_hook
    _core._set_pause_hook(None)


def test_wait_newer_is_not_fooled_by_a_writer_publishing_while_it_checks_the_version(ring_name, pause_hook):
    """wait_newer() found version 1 (slot s) current; before it looks at slot s's
    header the writer publishes three more versions, the last of which may
    reuse slot s if nobody pins it.  No CorruptSegmentError: the header is
    checked only under a pin (and so slot s is not reused meanwhile)."""
    with shmring.SharedState.create(ring_name, 1 << 12, slots=3) as w:
        w.publish(np.full(64, 1))
        r = shmring.SharedState.attach(ring_name)
        fired = []

        def hook(handle, where):
            if handle is r and not fired:
                fired.append(where)
                for v in (2, 3, 4):                          # every slot but a pinned one is rewritten
                    w.publish(np.full(64, v))
        pause_hook(hook)
        v = r.wait_newer(than=0, timeout=5)
        pause_hook(None)
        assert fired, "the pause point was not reached"
        assert 1 <= v <= 4
        with r.read() as snap:
            assert snap.version == 4 and (snap.value == 4).all()
        assert r.wait_newer(than=3, timeout=0) == 4
        assert w.stats()["pins"] == [0, 0, 0]
        r.close()


def test_wait_newer_still_reports_a_real_corruption_and_read_too(state):
    state.publish(np.zeros(4))
    slot = state._first_slot + (state._load_u64(L.ST_OFF_CURRENT) & 0xFF) * state._slot_size
    struct.pack_into("<Q", state._seg.buf, slot + L.ST_SLOT_VERSION, 99)   # (beyond the word accessors' reach)
    with pytest.raises(shmring.CorruptSegmentError, match="does not match version 1"):
        state.read()
    with pytest.raises(shmring.CorruptSegmentError, match="does not match version 1"):
        state.wait_newer(than=0, timeout=0)
    assert state.stats()["pins"] == [0, 0, 0]


# ------------------------------------------------------------------ (8) one writer handle, two threads

def _tagged(tag):
    return {"tag": tag, "a": np.full(256, tag, np.int64)}


def _check_tagged(value, tag=None):
    a = value["a"]
    assert (a == value["tag"]).all(), f"torn version: tag {value['tag']}, elements {a.min()}..{a.max()}"
    assert tag is None or value["tag"] == tag, f"version holds tag {value['tag']}, published with tag {tag}"


def test_a_thread_held_after_choosing_its_slot_does_not_share_it_with_another_thread(ring_name, monkeypatch):
    """Thread A publishes through the writer handle and is held after it chose
    its slot (in codec.write) while thread B publishes three versions through
    the same handle: B must not pick A's slot (with 3 slots, B's third publish
    would), and A must not write into a published slot."""
    with shmring.SharedState.create(ring_name, 1 << 14, slots=3) as w:
        w.publish(_tagged(0))
        real_write = codec.write
        a_ident = threading.get_ident()
        b_may_go, b_done = threading.Event(), threading.Event()
        held = []

        def write(buf, off, enc):
            if threading.get_ident() == a_ident and not held:
                held.append(off)
                b_may_go.set()
                b_done.wait(0.5)             # B publishes meanwhile, or is kept out until A is done
            return real_write(buf, off, enc)
        monkeypatch.setattr(codec, "write", write)
        published, errors = {}, []

        def b():
            b_may_go.wait(10)
            try:
                for tag in (21, 22, 23):
                    published[w.publish(_tagged(tag), timeout=10)] = tag
            except BaseException as e:   # noqa: BLE001 (reported below)
                errors.append(e)
            finally:
                b_done.set()
        t = threading.Thread(target=b)
        t.start()
        try:
            published[w.publish(_tagged(1), timeout=10)] = 1
        finally:
            t.join(10)
        monkeypatch.undo()
        assert not errors, errors
        assert sorted(published) == [2, 3, 4, 5] and held
        with w.read() as snap:
            assert snap.version == 5
            _check_tagged(snap.value, published[5])


def test_two_threads_publishing_through_one_writer_handle_never_tear_a_version(ring_name):
    """Two threads publish flat out through one writer handle (the C array path,
    which copies with the GIL released; the Python codec path; update()) while
    reader threads check that every version they pin is uniform and that
    versions never go back; every publish gets its own version number."""
    import sys
    import time
    n = 1 << 15                                          # 256 KiB: C copies it with the GIL released
    with shmring.SharedState.create(ring_name, 2 * n * 8 + 4096, slots=3) as w:
        w.publish(np.zeros(n, np.int64))
        stop = threading.Event()
        errors, counts, versions = [], [], []

        def writer(base):
            flat, strided = np.empty(n, np.int64), np.empty(2 * n, np.int64)
            i, mine = 0, []
            try:
                while not stop.is_set():
                    i += 1
                    tag = base + i
                    if i % 4 == 0:
                        with w.update(timeout=10) as draft:
                            draft[:] = tag
                    elif i % 4 == 1:
                        strided.fill(tag)                 # not contiguous: the Python codec path
                        mine.append(w.publish(strided[::2], timeout=10))
                    else:
                        flat.fill(tag)
                        mine.append(w.publish(flat, timeout=10))
            except BaseException as e:   # noqa: BLE001 (reported below)
                errors.append(e)
                stop.set()
            counts.append(i)
            versions.extend(mine)

        def reader():
            r = shmring.SharedState.attach(ring_name)
            last = 0
            try:
                while not stop.is_set():
                    with r.read() as snap:
                        v = snap.version
                        a = snap.value
                        lo, hi = int(a.min()), int(a.max())
                        del a
                    if lo != hi:
                        raise AssertionError(f"torn version {v}: elements {lo}..{hi}")
                    if v < last:
                        raise AssertionError(f"version went back: {v} after {last}")
                    last = v
            except BaseException as e:   # noqa: BLE001 (reported below)
                errors.append(e)
                stop.set()
            finally:
                r.close()
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)                        # switch threads as often as possible
        threads = [threading.Thread(target=writer, args=(k << 32,)) for k in (1, 2)]
        threads += [threading.Thread(target=reader) for _ in range(2)]
        try:
            for t in threads:
                t.start()
            stop.wait(2.0)
            stop.set()
            for t in threads:
                t.join(30)
        finally:
            sys.setswitchinterval(old)
        assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"
        assert len(versions) == len(set(versions)), "two publishes got the same version"
        assert w.version == 1 + sum(counts) and sum(counts) > 20
        with w.read() as snap:
            a = snap.value
            assert a.min() == a.max()
            del a


def test_a_thread_inside_an_update_block_keeps_other_threads_out_and_may_not_publish_itself(state):
    state.publish(np.zeros(4))
    with state.update() as draft:
        draft[:] = 1
        got = []
        t = threading.Thread(target=lambda: got.append(pytest.raises(shmring.Timeout, state.publish,
                                                                     np.ones(4), timeout=0.05)))
        t.start()
        t.join(10)
        assert got and "another thread" in str(got[0].value)
        with pytest.raises(shmring.ShmringError, match="inside this thread's own update"):
            state.publish(np.ones(4))
    assert state.version == 2
    assert state.publish(np.full(4, 3), timeout=0) == 3           # the lock was given back


def test_a_forked_child_does_not_inherit_a_held_writer_lock(state):
    import os
    state.publish(np.zeros(4))
    with state.update() as draft:                                  # this thread holds the handle's writer lock
        draft[:] = 1
        pid = os.fork()
        if pid == 0:                                               # the child: a fresh, free lock
            os._exit(0 if state._wlock.acquire(False) and state._wlock_thread == 0 else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert state.version == 2


@pytest.fixture
def state(ring_name):
    with shmring.SharedState.create(ring_name, 1 << 16, slots=3) as s:
        yield s


def _wait_newer_forever(name):
    st = shmring.SharedState.attach(name)
    st.spin = 0
    st.wait_newer(10 ** 9, timeout=60)


@pytest.mark.parametrize("recovery", ["attach", "claim", "writer"])
def test_a_reader_killed_asleep_in_wait_newer_leaves_no_waiter_count_behind(ring_name, recovery):
    """Issue 12, case 12 for SharedState: a reader SIGKILLed asleep in
    wait_newer() left the version wake word's waiter count raised forever, so
    every later publish paid a spare futex_wake.  Its sleep is now announced
    in its reader entry too (R29), and whoever takes the dead reader's entry
    over withdraws it: a handle attaching, a reader claiming an entry, or the
    writer reclaiming dead pins."""
    import multiprocess
    import signal
    with shmring.SharedState.create(ring_name, 1 << 12, max_readers=1) as st:
        st.publish(b"v1")
        child = multiprocess.get_context("fork").Process(target=_wait_newer_forever, args=(ring_name,))
        child.start()
        try:
            deadline = time.monotonic() + 10
            while st._load_u32(L.ST_OFF_VERSION_WAKE + L.WAKE_WAITERS) != 1:
                assert time.monotonic() < deadline, "the child never went to sleep"
                time.sleep(0.01)
            time.sleep(0.05)
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
            if recovery == "attach":
                shmring.SharedState.attach(ring_name).close()
            elif recovery == "claim":
                with st.read() as snap:              # the only entry is the dead reader's: taken over
                    assert snap.value == b"v1"
            else:
                st._reclaim_dead_pins()
            assert st._load_u32(L.ST_OFF_VERSION_WAKE + L.WAKE_WAITERS) == 0
        finally:
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
            child.join(10)
