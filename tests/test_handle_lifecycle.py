"""Handle lifecycles (issue 12, cases 8b, 9 and 10).

* Case 9: the last release of a closed subscriber / mpmc consumer (or of a
  record batch) may run from a deallocator or a buffer-release hook while an
  exception is propagating: the user's exception must survive, nothing may be
  reported unraisable, and the table entry must still be left.
* Case 10: handles garbage-collected without close() give back what this
  process holds (only in the process that made them): a producer is detached
  (its role or slot is free, the stream is not ended by it), a consumer or
  subscriber is closed; a message in a reference cycle with its consumer is
  collected and its space released (or redelivered, as after close()).
* Case 8b: a handle is used by one thread at a time; another thread's call
  while one is in progress is refused with a clear error, never interleaved
  into a lost, duplicated or torn message.
"""
import contextlib
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import shmring
from shmring import layout as L

IN_USE = "in use by another thread"
REC = np.dtype([("v", "<i8"), ("pad", "<i8")])


@pytest.fixture
def unraisable(monkeypatch):
    """Exceptions reported through sys.unraisablehook during the test."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    return seen


def in_forked_child(fn):
    """Run fn() in a forked child (finalizers run there before it exits); its exit code (0: fn returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            code = 0 if fn() else 1
            gc.collect()
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@contextlib.contextmanager
def dropping():
    """Collect the warnings issued while handles are dropped."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        yield w


def warned_dropped(w) -> bool:
    return any(issubclass(x.category, ResourceWarning) and "without close" in str(x.message) for x in w)


def cons_entry(ring, slot):
    """(owner word, position word) of a consumer table entry."""
    line = ring._tables.cline(slot)
    return ring._region.load_u64(line + L.CE_OWNER), ring._region.load_u64(line + L.CE_POS)


# =========================================================================== case 9

@pytest.mark.parametrize("kind", ["broadcast", "mpmc"])
@pytest.mark.parametrize("drop", ["dealloc", "releasebuffer", "numpy", "finalizer"])
def test_last_release_of_a_closed_handle_during_an_exception_keeps_the_exception(ring_name, kind, drop, unraisable):
    with shmring.Ring.create(ring_name, 1 << 16, kind=kind) as ring, ring.producer() as p:
        c = ring.consumer()
        slot = c._slot
        p.send(np.arange(4.0) if drop == "numpy" else b"hello")
        if drop == "dealloc":
            holder = [c.recv()]
            c.close()                                   # holding a message: it leaves at the last release
            with pytest.raises(TypeError, match="not subscriptable"):
                holder.pop()[5]                         # the message dies while the TypeError propagates
        elif drop == "finalizer":
            holder = [c.recv()]
            del c                                       # dropped without close(); the message keeps it alive
            with dropping(), pytest.raises(TypeError, match="not subscriptable"):
                holder.pop()[5]                         # the message dies, then the handle: its finalizer runs
        else:
            m = c.recv()
            holder = [m.value]                          # a memoryview / ndarray of the message
            with pytest.warns(shmring.EscapedViewWarning):
                m.release()                             # deferred to the view's buffer release
            del m
            c.close()
            if drop == "releasebuffer":
                with pytest.raises(ValueError, match="invalid literal"):
                    int(holder.pop())                   # the view dies while the ValueError propagates
            else:
                with pytest.raises(IndexError, match="only integers"):
                    holder.pop()["x"]
        assert unraisable == []
        owner, pos = cons_entry(ring, slot)
        assert owner == 0, "the closed handle did not leave its table entry"
        if kind == "broadcast":
            assert pos == L.POS_FREE
        if kind == "mpmc":
            if drop == "finalizer":                     # dropped unread by a live handle: requeued (R39)
                with ring.consumer() as c2:
                    assert c2.recv_bytes(timeout=5) == b"hello"
            st = ring.stats()
            assert st["read_pos"] == st["take_pos"]   # everything taken was released


def test_last_view_of_a_record_batch_dropped_during_an_exception_keeps_the_exception(ring_name, unraisable):
    with shmring.Ring.create(ring_name, 1 << 12, dtype=REC) as ring, ring.producer() as p, ring.consumer() as c:
        p.send_many(np.zeros(5, REC))
        b = c.recv_many()
        holder = [b.arrays[0]]
        with pytest.warns(shmring.EscapedViewWarning):
            b.release()
        del b
        with pytest.raises(ValueError, match="no field of name nope"):
            holder.pop()["nope"]                        # the view dies while the ValueError propagates
        assert unraisable == []
        assert c.position == 5                          # and the batch's space was given back


@pytest.mark.parametrize("hook", ["default", "keeps the object"])
def test_a_failing_finish_in_a_deallocator_is_reported_once_without_a_crash(ring_name, hook):
    """A lease dropped unreleased whose on_finish raises: reported unraisable
    (the report takes references to the dying lease), never freed twice."""
    script = textwrap.dedent(f"""
        import gc, sys, shmring
        from shmring import _core
        ring = shmring.Ring.create({ring_name!r}, 1 << 12)
        seen = []
        if {hook == "keeps the object"}:
            sys.unraisablehook = lambda u: seen.append((u.exc_type, u.object))
        lease = _core.Lease(ring._region, 4096, 64, lambda: 1 / 0, "")
        try:
            del lease                             # finished in its deallocator: on_finish raises
            gc.collect()
            print(len(seen), seen and seen[0][0].__name__, seen and seen[0][1].released)
            fresh = [_core.Lease(ring._region, 4096, 8, int, "") for _ in range(20)]
            print(any(f is s[1] for f in fresh for s in seen))   # its memory reused while still referenced?
            seen.clear()                          # the last reference to the reported lease goes
            gc.collect()
            junk = [bytearray(64) for _ in range(100_000)]
            print("survived")
        finally:
            ring.close()
            ring.unlink()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    if hook == "default":
        assert "ZeroDivisionError" in out.stderr and out.stderr.count("Exception ignored") == 1
        assert out.stdout.split() == ["0", "[]", "[]", "False", "survived"]
    else:
        assert out.stdout.split() == ["1", "ZeroDivisionError", "True", "False", "survived"]


def test_a_message_released_at_interpreter_exit_leaves_quietly(ring_name):
    """A closed subscriber's last message alive until exit: leaving runs no Python in a torn-down interpreter."""
    script = textwrap.dedent(f"""
        import shmring
        ring = shmring.Ring.create({ring_name!r}, 1 << 16, kind="broadcast")
        prod = ring.producer()
        sub = ring.subscribe()
        prod.send(b"kept until exit")
        msg = sub.recv()
        sub.close()
        prod.close()
        ring.unlink()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "ok", "")


# =========================================================================== case 10

def _take_producer_send_and_close(ring, payload):
    with ring.producer() as p:
        p.send(payload)
    return True


@pytest.mark.parametrize("kind", ["spsc", "broadcast"])
def test_a_dropped_sole_producer_gives_its_role_back_without_ending_the_stream(ring_name, kind):
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring, ring.consumer() as c:
        p = ring.producer()
        p.send(b"one")
        with dropping() as w:
            del p
            gc.collect()
        assert ring.stats()["closed"] is None          # not ended: a successor may continue the stream
        assert c.recv_bytes(timeout=5) == b"one"
        with pytest.raises(shmring.Timeout):
            c.recv_bytes(timeout=0.2)
        # another process takes the role over and ends the stream
        assert in_forked_child(lambda: _take_producer_send_and_close(ring, b"two")) == 0
        assert c.recv_bytes(timeout=10) == b"two"
        with pytest.raises(shmring.EndOfStream):
            c.recv_bytes(timeout=10)
        assert warned_dropped(w)


@pytest.mark.parametrize("kind", ["mpsc", "mpmc"])
def test_a_dropped_multi_party_producer_frees_its_slot(ring_name, kind):
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind, max_producers=1) as ring, ring.consumer() as c:
        p = ring.producer()
        p.send(b"one")
        with dropping() as w:
            del p
            gc.collect()
        assert ring.stats()["producers"][0]["pid"] is None
        with ring.producer() as p2:                     # the one slot can be taken again
            p2.send(b"two")
        assert [c.recv_bytes(timeout=5), c.recv_bytes(timeout=5)] == [b"one", b"two"]
        with pytest.raises(shmring.EndOfStream):
            c.recv_bytes(timeout=5)                     # the producer that closed was the only one joined
        assert warned_dropped(w)


@pytest.mark.parametrize("kind", ["mpsc", "mpmc"])
def test_a_dropped_multi_party_producer_lets_the_stream_end(ring_name, kind):
    """The others close: the stream ends (a dropped producer is detached, it no longer counts as joined)."""
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring, ring.consumer() as c:
        a, b = ring.producer(), ring.producer()
        a.send(b"from a")
        b.send(b"from b")
        a.close()
        with dropping() as w:
            del b
            gc.collect()
        assert sorted(c.recv_bytes(timeout=5) for _ in range(2)) == [b"from a", b"from b"]
        with pytest.raises(shmring.EndOfStream):
            c.recv_bytes(timeout=5)
        assert warned_dropped(w)


def test_a_dropped_sole_multi_party_producer_does_not_end_the_stream(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, kind="mpsc") as ring, ring.consumer() as c:
        p = ring.producer()
        p.send(b"only")
        with dropping():
            del p
            gc.collect()
        assert c.recv_bytes(timeout=5) == b"only"
        with pytest.raises(shmring.Timeout):            # not ended: a successor may continue it
            c.recv_bytes(timeout=0.3)
        with ring.producer() as p2:
            p2.send(b"successor")
        assert c.recv_bytes(timeout=5) == b"successor"
        with pytest.raises(shmring.EndOfStream):
            c.recv_bytes(timeout=5)


@pytest.mark.parametrize("kind", ["spsc", "mpsc"])
def test_a_dropped_consumer_gives_its_role_back(ring_name, kind):
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring, ring.producer() as p:
        c = ring.consumer()
        p.send(b"for the next consumer")
        with dropping() as w:
            del c
            gc.collect()
        assert ring.stats()["consumer"]["pid"] is None

        def child():
            with ring.consumer() as c2:
                return c2.recv_bytes(timeout=10) == b"for the next consumer"
        assert in_forked_child(child) == 0
        assert warned_dropped(w)


def test_a_dropped_subscriber_stops_holding_the_producer_back(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, kind="broadcast", max_consumers=1) as ring, ring.producer() as p:
        s = ring.subscribe()
        slot = s._slot
        p.send(b"x")
        with dropping() as w:
            del s
            gc.collect()
        assert cons_entry(ring, slot) == (0, L.POS_FREE)
        assert all(p.try_send(b"y" * 100) for _ in range(200))   # 25 KB through a 4 KB ring: nobody gates it
        with ring.subscribe(start="newest") as s2:                # and its one entry can be taken
            p.send(b"z")
            assert [s2.recv_bytes(timeout=5) for _ in range(2)] == [b"y" * 100, b"z"]
        assert warned_dropped(w)


def test_a_dropped_mpmc_consumer_frees_its_entry(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, kind="mpmc", max_consumers=1) as ring, ring.producer() as p:
        c = ring.consumer()
        p.send(b"w")
        with dropping() as w:
            del c
            gc.collect()
        with ring.consumer() as c2:
            assert c2.recv_bytes(timeout=5) == b"w"
        assert warned_dropped(w)


def test_dropped_record_handles_give_their_roles_back(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, dtype=REC) as ring:
        p, c = ring.producer(), ring.consumer()
        p.send_many(np.zeros(3, REC))
        with dropping() as w:
            del p, c
            gc.collect()
        st = ring.stats()
        assert (st["producer"]["pid"], st["consumer"]["pid"], st["closed"]) == (None, None, None)

        def child():
            with ring.producer() as p2, ring.consumer() as c2:
                p2.send_many(np.ones(2, REC))
                with c2.recv_many() as b:
                    return b.copy()["v"].tolist() == [0, 0, 0, 1, 1]
        assert in_forked_child(child) == 0
        assert warned_dropped(w)


@pytest.mark.parametrize("kind", ["spsc", "broadcast", "mpmc"])
def test_handles_finalized_in_a_forked_child_release_nothing_of_the_parents(ring_name, kind):
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring:
        p, c = ring.producer(), ring.consumer()
        p.send(b"held")
        m = c.recv()

        def child():
            nonlocal p, c, m
            del p, c, m                                  # the child's copies die (and are finalized)
            gc.collect()
            return True
        assert in_forked_child(child) == 0
        st = ring.stats()
        me = os.getpid()
        if kind == "spsc":
            assert (st["producer"]["pid"], st["consumer"]["pid"], st["used"]) == (me, me, st["write_pos"])
        else:
            assert st["producers"][0]["pid"] == me and st["consumers"][0]["pid"] == me
        assert m.tobytes() == b"held"
        m.release()
        p.send(b"parent goes on")
        assert c.recv_bytes(timeout=5) == b"parent goes on"
        p.close()
        c.close()


@pytest.mark.parametrize("kind", ["spsc", "broadcast", "mpmc"])
@pytest.mark.parametrize("views", [0, 2])
def test_a_message_in_a_reference_cycle_with_its_consumer_is_collected(ring_name, kind, views):
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring, ring.producer() as p:
        c = ring.consumer()
        slot = getattr(c, "_slot", None)
        p.send(b"A" * 1000)
        msg = c.recv()
        c.keep = {"msg": msg, "views": [msg.value[i:] for i in range(views)]}   # consumer -> dict -> message -> consumer
        del c, msg
        with dropping() as w:
            gc.collect()
        if kind == "spsc":                               # closed: the unreleased message goes to the next one
            assert ring.stats()["consumer"]["pid"] is None
            with ring.consumer() as c2:
                assert c2.recv_bytes(timeout=5) == b"A" * 1000
        else:
            assert cons_entry(ring, slot)[0] == 0
            if kind == "broadcast":
                assert all(p.try_send(b"y" * 100) for _ in range(200))    # not held back any more
            else:
                assert ring.stats()["used"] == 0                        # the message was released
        assert warned_dropped(w)


def test_a_message_in_a_list_that_contains_itself_is_collected(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as p, ring.consumer() as c:
        p.send(b"B" * 1000)
        lst = [c.recv()]
        assert lst[0].tobytes() == b"B" * 1000           # read (a message dropped unread is redelivered)
        lst.append(lst)
        del lst
        gc.collect()
        assert ring.stats()["used"] == 0 and c.pending == 0


# =========================================================================== case 8b

def run_threads(*targets):
    ts = [threading.Thread(target=t) for t in targets]
    for t in ts:
        t.start()
    return ts


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


@pytest.mark.parametrize("kind", ["spsc", "mpsc"])
def test_one_producer_hammered_from_two_threads(ring_name, kind, fast_switching):
    """Object sends (reserve, encode, commit in Python) and bytes sends from two
    threads through one producer: each send is delivered exactly once or refused."""
    n = 1500
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring, ring.consumer() as c:
        p = ring.producer()
        sent, errors = {0: [], 1: []}, []

        def worker(t):
            def run():
                for i in range(n):
                    item = {"t": t, "i": i, "pad": "x" * 150} if i % 2 else np.full(40, t * 100_000 + i)
                    try:
                        p.send(item, timeout=10)
                        sent[t].append(i)
                    except shmring.ShmringError as e:
                        errors.append(str(e))
                        time.sleep(0.0001)
            return run
        ts = run_threads(worker(0), worker(1))
        got = {0: [], 1: []}
        while any(t.is_alive() for t in ts) or c._has_data():
            m = c.try_recv()
            if m is None:
                time.sleep(0.0002)
                continue
            with m:
                v = m.copy()
            t, i = (v["t"], v["i"]) if isinstance(v, dict) else divmod(int(v[0]), 100_000)
            if isinstance(v, np.ndarray):
                assert (v == v[0]).all()
            got[t].append(i)
        for t in ts:
            t.join()
        assert not [e for e in errors if IN_USE not in e], errors[:3]
        assert got == sent                              # exactly once, in order, nothing torn
        p.close()


@pytest.mark.parametrize("kind", ["spsc", "broadcast", "mpmc"])
def test_one_consumer_hammered_from_two_threads(ring_name, kind, fast_switching):
    n = 2000
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring:
        c = ring.consumer()
        p = ring.producer()
        got, errors = [], []

        def reader():
            while True:
                try:
                    if len(got) % 3:
                        with c.recv(timeout=10) as m:
                            got.append(int(m.tobytes()))
                    else:
                        got.append(int(c.recv_bytes(timeout=10)))
                except shmring.EndOfStream:
                    return
                except shmring.ShmringError as e:
                    errors.append(str(e))
                    time.sleep(0.0001)
        ts = run_threads(reader, reader)
        for i in range(n):
            p.send(b"%d" % i, timeout=10)
        p.close()
        for t in ts:
            t.join(30)
        assert not [e for e in errors if IN_USE not in e], errors[:3]
        assert sorted(got) == list(range(n))            # each message exactly once
        c.close()


def test_one_record_producer_hammered_from_two_threads(ring_name, fast_switching):
    n, batch = 1000, 7
    with shmring.Ring.create(ring_name, 1 << 12, dtype=REC) as ring, ring.consumer() as c:
        p = ring.producer()
        sent, errors = [], []

        def worker(t):
            def run():
                for i in range(n):
                    a = np.zeros(batch, REC)
                    a["v"] = (t * n + i) * batch + np.arange(batch)
                    try:
                        p.send_many(a, timeout=10)
                        sent.extend(a["v"].tolist())
                    except shmring.ShmringError as e:
                        errors.append(str(e))
                        time.sleep(0.0001)
            return run
        ts = run_threads(worker(0), worker(1))
        got = []
        while True:
            running = any(t.is_alive() for t in ts)
            b = c.try_recv_many()
            if b is None:
                if not running:
                    break
                time.sleep(0.0002)
                continue
            with b:
                got.extend(b.copy()["v"].tolist())
        for t in ts:
            t.join()
        assert not [e for e in errors if IN_USE not in e], errors[:3]
        assert sorted(got) == sorted(sent) and len(set(got)) == len(got)
        p.close()


def test_one_record_consumer_hammered_from_two_threads(ring_name, fast_switching):
    n = 20_000
    with shmring.Ring.create(ring_name, 1 << 12, dtype=REC) as ring:
        c, p = ring.consumer(), ring.producer()
        got, errors = [], []

        def reader():
            while True:
                try:
                    with c.recv_many(5, timeout=10) as b:
                        got.extend(b.copy()["v"].tolist())
                except shmring.EndOfStream:
                    return
                except shmring.ShmringError as e:
                    errors.append(str(e))
                    time.sleep(0.0001)
        ts = run_threads(reader, reader)
        a = np.zeros(n, REC)
        a["v"] = np.arange(n)
        p.send_many(a, timeout=10)
        p.close()
        for t in ts:
            t.join(30)
        assert not [e for e in errors if IN_USE not in e], errors[:3]
        assert sorted(got) == list(range(n))
        c.close()


def test_a_call_in_progress_refuses_other_threads_with_a_clear_error(ring_name):
    """A blocked recv() holds its handle: close() and recv() from another thread are refused."""
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as p:
        c = ring.consumer()
        outcome = []

        def blocked():
            try:
                c.recv(timeout=0.5)
            except BaseException as e:
                outcome.append(type(e))
        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(0.1)
        for call in (c.close, c.try_recv, lambda: c.recv_bytes(timeout=0)):
            with pytest.raises(shmring.ShmringError, match=IN_USE):
                call()
        t.join()
        assert outcome == [shmring.Timeout]
        c.close()                                        # free again once the call returned
        assert c.closed


def test_closing_a_producer_with_an_open_reservation_disarms_its_views(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, kind="mpsc") as ring, ring.consumer() as c:
        p = ring.producer()
        res = p.reserve_array((8,), np.int64)
        arr = res.__enter__()
        arr[:] = 1
        p.close()                                        # aborts the reservation
        with pytest.raises(ValueError, match="read-only"):
            arr[:] = 2                                   # a late write cannot land in space others reuse
        with pytest.raises(shmring.HandleClosed):
            res.commit()
        with pytest.raises(shmring.EndOfStream):
            c.recv_bytes(timeout=5)


@pytest.mark.parametrize("views", [0, 2])
def test_a_snapshot_in_a_reference_cycle_with_its_reader_is_collected_and_unpinned(ring_name, views):
    """Case 10: a Snapshot was not GC-tracked, so one in a reference cycle
    with its own handle (reader.last = snap: handle -> snapshot -> handle)
    kept its version pinned, and the handle mapped, for the life of the
    process: the writer could never reuse that slot."""
    with shmring.SharedState.create(ring_name, 1 << 12, slots=3) as st:
        st.publish(b"v1")
        reader = shmring.SharedState.attach(ring_name)
        snap = reader.read()
        reader.keep = {"snap": snap, "views": [snap.value[i:] for i in range(views)]}
        del snap, reader
        assert sum(st.stats()["pins"]) == 1
        with dropping():
            gc.collect()
        assert sum(st.stats()["pins"]) == 0
        for i in range(6):                                   # every slot usable again, without a wait
            st.publish(b"v%d" % (i + 2), timeout=0)


def test_handles_alive_at_interpreter_exit_print_nothing(ring_name):
    """Handles still referenced by module globals at interpreter exit (closed
    by their with blocks, or never closed): their finalizers run while the
    modules' globals are being torn down, and printed 'Exception ignored in
    __del__: TypeError: NoneType object is not callable' (record handles)."""
    import subprocess
    import sys
    script = f"""
import numpy as np, shmring
dt = np.dtype([("a", "<u8")])
with shmring.Ring.create({ring_name!r} + "r", 1 << 12, dtype=dt) as r, r.producer() as p, r.consumer() as c:
    p.send_many(np.zeros(3, dt))
rr = shmring.Ring.create({ring_name!r} + "r2", 1 << 12, dtype=dt)
p2, c2 = rr.producer(), rr.consumer()                  # never closed
with shmring.Ring.create({ring_name!r}, 1 << 12, kind="mpmc") as ring, ring.producer() as prod, ring.consumer() as cons:
    prod.send(b"x")
ring2 = shmring.Ring.create({ring_name!r} + "b", 1 << 12, kind="broadcast")
sub = ring2.subscribe()                                # never closed
shmring.unlink({ring_name!r} + "r2"); shmring.unlink({ring_name!r} + "b")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
