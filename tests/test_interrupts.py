"""Ctrl-C anywhere (issue 13, cases 5 and 6).

A child process runs a receive or send loop while this process pelts it with
SIGINT at random intervals (thousands of interrupts).  The child's SIGINT
handler raises KeyboardInterrupt exactly as Python's default one does, except
in the harness's own outer frame (``_outer``), whose only job is to catch it
and go round again: so every interrupt lands in the library or the loop body.

* Receiving (``with cons.recv() as msg`` and ``recv_many``): a message never
  read (no ``.value`` yet) when the interrupt lands is handed out again; the
  log of what was read is every sequence number exactly once (in order but
  for mpmc, whose redelivery is a requeue).
* Sending (bytes, arrays, objects through the codec, reserve / reserve_array /
  reserve_value): each message arrives at most once and intact, every send
  that returned arrived, and the producer stays usable (no reservation left
  open); its final message after the storm arrives.
"""
import random
import signal
import sys
import threading
import time

import multiprocess
import numpy as np
import pytest

import shmring

CTX = multiprocess.get_context("fork")
STORM = 2.5                      # seconds of interrupts per test


def _arm(outer_code, state):
    def on_int(sig, frame):
        # not in the harness's frame, nor in this handler's (a second SIGINT
        # while the first one's handler runs, called from the harness's frame)
        if (not state.get("armed") or state.get("quiet") or frame is None
                or frame.f_code in (outer_code, on_int.__code__)):
            return
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, on_int)


def _outer(body, state):
    """Run body() to its end, counting the interrupts it raised."""
    state["armed"] = True                        # interrupts land from here on, only inside body()
    while True:
        try:
            body()
            return
        except KeyboardInterrupt:
            state["kis"] = state.get("kis", 0) + 1
        except BaseException as e:
            state["quiet"] = True
            state["error"] = repr(e)
            return


def _consume(ring, ready, q, seed):
    state, log = {}, bytearray()
    _arm(_outer.__code__, state)
    rng = random.Random(seed)
    cons = ring.consumer()
    ready.set()

    def body():
        while True:
            try:
                if rng.random() < 0.5:
                    with cons.recv(timeout=20) as msg:
                        log.extend(msg.value)           # one C call reads and records
                else:
                    for m in cons.recv_many(8, timeout=20):
                        with m:
                            log.extend(m.value)
            except shmring.EndOfStream:
                return
    _outer(body, state)
    state["quiet"] = True
    q.put((bytes(log), state.get("kis", 0), state.get("error") or cons.pending))
    cons.close()


def _pelt(pid, stop, counter):
    rng = random.Random()
    while not stop.is_set():
        try:
            import os
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        counter[0] += 1
        time.sleep(rng.uniform(0, 0.0012))


def _storm(proc):
    stop, counter = threading.Event(), [0]
    t = threading.Thread(target=_pelt, args=(proc.pid, stop, counter), daemon=True)
    t.start()
    return stop, counter, t


@pytest.mark.parametrize("kind", ["spsc", "mpsc", "broadcast", "mpmc"])
def test_interrupted_receives_lose_no_message(ring_name, kind, procs):
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring, ring.producer() as p:
        ready, q = CTX.Event(), CTX.Queue()
        child = CTX.Process(target=_consume, args=(ring, ready, q, 1234))
        child.start()
        procs.append(child)
        assert ready.wait(20)
        stop, counter, t = _storm(child)
        n, end = 0, time.monotonic() + STORM
        try:
            while time.monotonic() < end:
                p.send(n.to_bytes(8, "little"), timeout=20)
                n += 1
        finally:
            stop.set()
            t.join()
        p.close()
        log, kis, pending = q.get(timeout=30)
        child.join(20)
        assert child.exitcode == 0
    got = np.frombuffer(log, "<u8").tolist()
    print(f"{kind}: {n} messages, {counter[0]} SIGINTs sent, {kis} KeyboardInterrupts in the loop")
    assert kis > 150, f"only {kis} interrupts landed"
    if kind == "mpmc":
        assert len(got) == len(set(got)), "a message was read twice"
        assert sorted(got) == list(range(n)), f"{n - len(set(got))} messages lost"
    else:
        missing = sorted(set(range(n)) - set(got))
        assert got == list(range(n)), f"{len(missing)} lost (e.g. {missing[:5]}), {len(got) - len(set(got))} twice"
    assert pending == 0


OPS = ["bytes", "object", "array", "reserve", "reserve_array", "reserve_value"]


def _payload(s):
    return s.to_bytes(8, "little") + bytes([s % 251]) * 56


def _send_one(p, s):
    op = OPS[s % len(OPS)]
    a = np.arange(s, s + 16, dtype=np.int64)
    if op == "bytes":
        p.send(_payload(s))
    elif op == "object":
        p.send({"seq": s, "a": a})
    elif op == "array":
        p.send(a)
    elif op == "reserve":
        with p.reserve(64) as mv:
            mv[:] = _payload(s)
    elif op == "reserve_array":
        with p.reserve_array((16,), np.int64) as out:
            out[:] = a
    else:
        with p.reserve_value({"seq": s, "a": shmring.InPlace((16,), np.int64)}) as (out,):
            out[:] = a


def _produce(ring, ready, q, duration):
    state, sure = {"seq": 0}, []
    _arm(_outer.__code__, state)
    p = ring.producer()
    ready.set()
    end = time.monotonic() + duration

    def body():
        while time.monotonic() < end:
            s = state["seq"]
            state["seq"] = s + 1                # an interrupted send is "maybe": never retried
            _send_one(p, s)
            sure.append(s)
    _outer(body, state)
    state["quiet"] = True
    if state.get("error"):
        q.put((sure, state.get("kis", 0), state["error"]))
        return
    try:
        _send_one(p, 10**9)                     # still usable: a send (of each kind) after the storm
        p.send(b"END")
        p.close()
        q.put((sure, state.get("kis", 0), None))
    except BaseException as e:
        q.put((sure, state.get("kis", 0), repr(e)))


def _decode(v):
    """(seq, intact) of a received value."""
    if isinstance(v, bytes):
        s = int.from_bytes(v[:8], "little")
        return s, v == _payload(s)
    if isinstance(v, dict):
        s = v["seq"]
        return s, np.array_equal(v["a"], np.arange(s, s + 16))
    s = int(v[0])
    return s, np.array_equal(v, np.arange(s, s + 16))


@pytest.mark.parametrize("kind", ["spsc", "mpsc", "broadcast", "mpmc"])
def test_interrupted_sends_never_wedge_the_producer(ring_name, kind, procs):
    with shmring.Ring.create(ring_name, 1 << 14, kind=kind) as ring, ring.consumer() as c:
        ready, q = CTX.Event(), CTX.Queue()
        child = CTX.Process(target=_produce, args=(ring, ready, q, STORM))
        child.start()
        procs.append(child)
        assert ready.wait(20)
        stop, counter, t = _storm(child)
        seqs, torn = [], []
        try:
            while True:
                with c.recv(timeout=30) as msg:
                    v = msg.copy()
                if isinstance(v, bytes) and v == b"END":
                    break
                s, ok = _decode(v)
                seqs.append(s)
                if not ok:
                    torn.append(s)
        finally:
            stop.set()
            t.join()
        sure, kis, err = q.get(timeout=30)
        child.join(20)
    print(f"{kind}: {len(seqs)} messages, {counter[0]} SIGINTs sent, {kis} KeyboardInterrupts in the loop")
    assert err is None, f"the producer was left unusable: {err}"
    assert child.exitcode == 0
    assert kis > 150, f"only {kis} interrupts landed"
    assert torn == [], f"torn messages {torn[:5]}"
    assert seqs[-1] == 10**9
    seqs = seqs[:-1]
    assert seqs == sorted(set(seqs)), "a message arrived twice or out of order"
    assert set(sure) <= set(seqs), f"sends that returned never arrived: {sorted(set(sure) - set(seqs))[:5]}"


# ------------------------------------------------------------- R39, deterministically

@pytest.mark.parametrize("kind", ["spsc", "mpsc", "broadcast", "mpmc"])
def test_the_redelivery_rule(ring_name, kind):
    """Dropped unread, or its with block left by KeyboardInterrupt / SystemExit
    unread: handed out again.  Read, released, or left by an ordinary
    exception: gone."""
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring, ring.producer() as p, ring.consumer() as c:
        for i in range(6):
            p.send(b"m%d" % i)
        c.recv()                                         # dropped unread
        for exc in (KeyboardInterrupt, SystemExit):
            with pytest.raises(exc):
                with c.recv():
                    raise exc                            # interrupted before the body read it
        m = c.recv()
        assert m.tobytes() == b"m0"                      # the same message, all three times
        del m                                            # read, then dropped: released
        with pytest.raises(ValueError):
            with c.recv() as m:
                raise ValueError                         # the body's own error: released
        m = c.recv()
        assert m.kind == "bytes"                         # metadata seen: handed over
        del m
        with c.recv() as m:
            assert bytes(m.value) == b"m3"
        msgs = c.recv_many(8, timeout=1)                 # m4, m5
        del msgs                                         # dropped unread: both again, in order
        assert [c.recv_bytes(timeout=1) for _ in range(2)] == [b"m4", b"m5"]
        assert c.try_recv() is None and c.pending == 0
        assert c.received == 6
        p.send(b"after")
        with c.recv() as m:
            assert m.tobytes() == b"after"


@pytest.mark.parametrize("kind", ["spsc", "mpmc"])
def test_a_loop_that_drops_every_message_unread_still_ends(ring_name, kind):
    """`for msg in cons: pass` reads nothing: after a bounded number of
    redeliveries a drop releases, so the loop ends."""
    with shmring.Ring.create(ring_name, 1 << 14, kind=kind) as ring, ring.consumer() as c:
        with ring.producer() as p:
            for i in range(200):
                p.send(b"%d" % i)
        t = time.monotonic()
        n = sum(1 for _ in c)
        assert time.monotonic() - t < 10
        assert 200 <= n <= 200 + 64 + 1


# ------------------------------------------------------------- R50: an interrupted clean-up is finished

class _InterruptOnce:
    """Raise KeyboardInterrupt the first ``times`` times ``point`` is reached
    (as a Ctrl-C landing exactly there would), then let it go on."""

    def __init__(self, monkeypatch, target, attr, times=1):
        self.left, real = times, getattr(target, attr)

        def hit(*a, **kw):
            if self.left:
                self.left -= 1
                raise KeyboardInterrupt
            return real(*a, **kw)
        monkeypatch.setattr(target, attr, hit)


def _role_is_free(ring, role):
    h = getattr(ring, role)()
    h.detach() if role == "producer" else h.close()
    return True


@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_an_interrupt_inside_close_is_finished_and_reraised(ring_name, role, monkeypatch):
    """KeyboardInterrupt lands inside close() (a producer: detach()), after the
    handle stopped taking calls and before the role was given back: the call
    finishes the give-back, then raises the KeyboardInterrupt; the role is
    free at once."""
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        h = getattr(ring, role)()
        _InterruptOnce(monkeypatch, shmring.roles, "give_back")
        with pytest.raises(KeyboardInterrupt):
            h.detach() if role == "producer" else h.close()
        assert h.closed
        monkeypatch.undo()
        assert _role_is_free(ring, role)


@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_an_interrupt_inside_a_dropped_handles_finalizer_is_finished(ring_name, role, monkeypatch):
    """A handle dropped without close() gives its role back in __del__; a
    KeyboardInterrupt landing in there (which Python would print and swallow)
    does not leave the role held by this live process; the interrupt is
    delivered again afterwards, not lost."""
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        h = getattr(ring, role)()
        _InterruptOnce(monkeypatch, shmring.roles, "give_back")
        with pytest.warns(ResourceWarning):
            with pytest.raises(KeyboardInterrupt):
                del h
                for _ in range(1000):           # the re-delivered interrupt lands at the next check
                    time.sleep(0)
        monkeypatch.undo()
        assert _role_is_free(ring, role)


@pytest.mark.parametrize("kind", ["mpsc", "mpmc"])
def test_an_interrupt_inside_a_multi_producer_close_still_ends_its_part(ring_name, kind, monkeypatch):
    """KeyboardInterrupt lands inside a producer's close() after its counters
    moved and before its end was stored (pause point producer_ended): the
    close is finished, so the stream ends (EndOfStream, not a wait forever)
    and the table entry is free."""
    from shmring import pausepoints

    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring, ring.consumer() as c:
        p = ring.producer()
        p.send(b"last")
        hits = []

        def hook(point):
            if point == "producer_ended" and not hits:
                hits.append(point)
                raise KeyboardInterrupt
        monkeypatch.setattr(pausepoints, "hook", hook)
        with pytest.raises(KeyboardInterrupt):
            p.close()
        monkeypatch.setattr(pausepoints, "hook", None)
        assert hits and p.closed
        assert c.recv_bytes(timeout=5) == b"last"
        with pytest.raises(shmring.EndOfStream):
            c.recv(timeout=5)
        st = ring.stats()
        assert [e["pid"] for e in st["producers"]] == [None]          # the entry is free
        assert st["producers_ended"] == 2      # counted again by the redo (a statistic only: R50)


DT = np.dtype([("seq", "<u8"), ("x", "<f4")])


@pytest.mark.parametrize("role", ["producer", "consumer"])
@pytest.mark.parametrize("how", ["close", "finalizer"])
def test_an_interrupted_record_ring_close_is_finished(ring_name, role, how, monkeypatch):
    with shmring.Ring.create(ring_name, 1 << 12, dtype=DT) as ring:
        h = getattr(ring, role)()
        _InterruptOnce(monkeypatch, shmring.roles, "give_back")
        with pytest.raises(KeyboardInterrupt):
            if how == "close":
                h.detach() if role == "producer" else h.close()
            else:
                with pytest.warns(ResourceWarning):
                    del h
                    for _ in range(1000):
                        time.sleep(0)
        monkeypatch.undo()
        assert _role_is_free(ring, role)


def test_an_interrupted_shared_state_close_gives_the_writer_role_back(ring_name, monkeypatch):
    with shmring.SharedState.create(ring_name, 1 << 12, slots=3) as s:
        s.publish(1)
        _InterruptOnce(monkeypatch, shmring.roles, "give_back")
        with pytest.raises(KeyboardInterrupt):
            s.close()
        monkeypatch.undo()
        assert s.closed
        with shmring.SharedState.attach(ring_name) as other:
            assert other.publish(2) == 2                  # the writer role was given back


# ------------------------------------------------------------- R51: taking a role is one step for Ctrl-C

@pytest.mark.parametrize("kind,role", [("spsc", "producer"), ("spsc", "consumer"), ("mpsc", "producer"),
                                       ("mpmc", "producer"), ("mpmc", "consumer"), ("broadcast", "consumer")])
def test_ctrl_c_while_a_role_is_taken_leaves_nothing_held(ring_name, kind, role, monkeypatch):
    """A real SIGINT arrives right after the role's owner word was written
    (inside roles.take_over), before the handle that records it exists: the
    call raises KeyboardInterrupt and the role or table entry is free again
    (not held by this live process until it exits)."""
    real = shmring.roles.take_over

    def take_over(*a, **kw):
        got = real(*a, **kw)
        if got:
            signal.raise_signal(signal.SIGINT)     # Ctrl-C, now: its handler runs at the next check
        return got
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring:
        monkeypatch.setattr(shmring.roles, "take_over", take_over)
        with pytest.raises(KeyboardInterrupt):
            getattr(ring, role)()
        monkeypatch.undo()
        st = ring.stats()
        if kind == "spsc":
            assert st[role]["pid"] is None
        else:
            table = st["producers" if role == "producer" else "consumers"]
            assert all(e["pid"] is None for e in table), table
        h = getattr(ring, role)()                  # and it can be taken again
        h.close()
        if role == "producer" and kind != "spsc":
            with ring.consumer() if kind == "mpsc" else ring.consumer() as c:
                with pytest.raises(shmring.EndOfStream):
                    c.recv(timeout=5)               # both sessions ended: the stream is over
