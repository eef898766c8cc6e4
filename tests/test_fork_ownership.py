"""A handle belongs to the process that made it (issue 13, case 4).

A forked child that leaves a ``with`` block of an inherited handle (normally,
by ``sys.exit()``, or by an exception), or drops it, changes nothing of the
parent's shared state: no stream ended, no role or table entry given back, no
name unlinked, no message or batch released, no reservation committed or
aborted.  The parent's stream goes on intact.  Each scenario runs in a child
made by ``os.fork`` and by ``multiprocess`` (fork).
"""
import gc
import os
import sys

import multiprocess
import numpy as np
import pytest

import shmring
from shmring import layout as L

REC = np.dtype([("v", "<i8")])
EXITS = ["normal", "sys.exit", "exception"]


def _leave(how):
    if how == "sys.exit":
        sys.exit(0)
    if how == "exception":
        raise RuntimeError("the child's with block fails")


def _child_body(enter, how):
    """What the child runs: a with block of the inherited handle, left as ``how`` says."""
    try:
        with enter():
            _leave(how)
    finally:
        gc.collect()                      # the child's finalizers run too


def run_child(method, enter, how):
    if method == "os.fork":
        pid = os.fork()
        if pid == 0:                      # child: never returns into pytest
            code = 0
            try:
                _child_body(enter, how)
            except SystemExit:
                pass
            except RuntimeError:
                code = 0
            except BaseException:
                code = 5
            finally:
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        assert code == 0, f"child exit code {code}"
        return
    p = multiprocess.get_context("fork").Process(target=_child_body, args=(enter, how))
    p.start()
    p.join(30)
    assert p.exitcode is not None and p.exitcode >= 0, f"child ended by signal {p.exitcode}"


def held_by_me(ring, what):
    st = ring.stats()
    return st[what]["pid"] == os.getpid()


def ring_block(name, go):
    with shmring.Ring.create(name, 1 << 12) as ring, ring.producer() as p, ring.consumer() as c:
        go(lambda: ring)
        again = shmring.Ring.attach(name)             # the name still exists
        again.close()
        p.send(b"after")
        assert c.recv_bytes(timeout=5) == b"after"


def state_block(name, go):
    """A SharedState made with `with SharedState.create(...)`: a child leaving
    the inherited block neither unlinks the name nor gives the writer role back."""
    with shmring.SharedState.create(name, 1 << 12) as st:
        st.publish(b"v1")
        go(lambda: st)
        again = shmring.SharedState.attach(name)       # the name still exists
        with pytest.raises(shmring.RoleTaken):
            again.publish(b"not the writer")           # the role is still ours
        again.close()
        st.publish(b"v2")
        assert st.read().copy() == b"v2"


def spsc_producer(name, go):
    with shmring.Ring.create(name, 1 << 12) as ring, ring.producer() as p, ring.consumer() as c:
        p.send(b"before")
        go(lambda: p)
        assert ring.stats()["closed"] is None, "the child ended the parent's stream"
        assert held_by_me(ring, "producer")
        p.send(b"after")
        assert [c.recv_bytes(timeout=5) for _ in range(2)] == [b"before", b"after"]
        assert c.try_recv() is None


def multi_producer(kind):
    def scenario(name, go):
        with shmring.Ring.create(name, 1 << 12, kind=kind) as ring, ring.producer() as p, ring.consumer() as c:
            p.send(b"before")
            go(lambda: p)
            st = ring.stats()
            assert st["closed"] is None, "the child ended the parent's stream"
            assert st["producers"][0]["pid"] == os.getpid()
            p.send(b"after")
            assert [c.recv_bytes(timeout=5) for _ in range(2)] == [b"before", b"after"]
            assert c.try_recv() is None
    return scenario


def role_consumer(kind):
    def scenario(name, go):
        with shmring.Ring.create(name, 1 << 12, kind=kind) as ring, ring.producer() as p, ring.consumer() as c:
            p.send(b"one")
            go(lambda: c)
            assert held_by_me(ring, "consumer")
            with pytest.raises(shmring.RoleTaken):
                ring.consumer()
            p.send(b"two")
            assert [c.recv_bytes(timeout=5) for _ in range(2)] == [b"one", b"two"]
    return scenario


def mpmc_consumer(name, go):
    with shmring.Ring.create(name, 1 << 12, kind="mpmc", max_consumers=1) as ring, ring.producer() as p, \
            ring.consumer() as c:
        p.send(b"one")
        m = c.recv(timeout=5)
        go(lambda: c)
        assert ring.stats()["consumers"][0]["pid"] == os.getpid()
        with pytest.raises((shmring.RoleTaken, shmring.ResourceLimit)):
            ring.consumer()
        assert m.tobytes() == b"one"
        m.release()
        p.send(b"two")
        assert c.recv_bytes(timeout=5) == b"two"


def subscriber(name, go):
    with shmring.Ring.create(name, 1 << 12, kind="broadcast") as ring, ring.producer() as p, \
            ring.subscribe() as s:
        go(lambda: s)
        line = ring._tables.cline(s._slot)
        assert ring._region.load_u64(line + L.CE_POS) != L.POS_FREE, "the child freed the subscriber's position"
        sent = 0
        while p.try_send(b"%06d" % sent + b"x" * 200):   # block policy: the subscriber gates the producer
            sent += 1
        assert 0 < sent < 30
        got = [s.recv_bytes(timeout=5)[:6] for _ in range(sent)]
        assert got == [b"%06d" % i for i in range(sent)]


def message(name, go):
    with shmring.Ring.create(name, 1 << 12) as ring, ring.producer() as p, ring.consumer() as c:
        p.send(b"A" * 1000)
        m = c.recv()
        go(lambda: m)
        assert ring.stats()["read_pos"] == 0, "the child released the parent's message"
        while p.try_send(b"B" * 1000):
            pass
        assert m.tobytes() == b"A" * 1000
        m.release()


def records_producer(name, go):
    with shmring.Ring.create(name, 1 << 12, dtype=REC) as ring, ring.producer() as p, ring.consumer() as c:
        p.send_many(np.arange(3, dtype=REC.base).view(REC) if False else np.array([(1,), (2,)], REC))
        go(lambda: p)
        assert ring.stats()["closed"] is None, "the child ended the parent's record stream"
        assert held_by_me(ring, "producer")
        p.send_many(np.array([(3,)], REC))
        with c.recv_many(timeout=5) as b:
            assert b.copy()["v"].tolist() == [1, 2, 3]
        assert c.try_recv_many() is None


def records_consumer(name, go):
    with shmring.Ring.create(name, 1 << 12, dtype=REC) as ring, ring.producer() as p, ring.consumer() as c:
        go(lambda: c)
        assert held_by_me(ring, "consumer")
        p.send_many(np.array([(7,)], REC))
        with c.recv_many(timeout=5) as b:
            assert b.copy()["v"].tolist() == [7]


def record_batch(name, go):
    with shmring.Ring.create(name, 1 << 12, dtype=REC) as ring, ring.producer() as p, ring.consumer() as c:
        p.send_many(np.array([(5,), (6,)], REC))
        b = c.recv_many(timeout=5)
        go(lambda: b)
        assert ring.stats()["read_pos"] == 0, "the child released the parent's batch"
        assert b.copy()["v"].tolist() == [5, 6]
        b.release()
        assert ring.stats()["read_pos"] == 2


def reservation(kind):
    def scenario(name, go):
        with shmring.Ring.create(name, 1 << 12, kind=kind) as ring, ring.producer() as p, ring.consumer() as c:
            r = p.reserve(5)
            r.view[:] = b"paren"

            go(lambda: r)                  # (the child's view is the shared space: it writes nothing)
            assert c.try_recv() is None, "the child committed the parent's reservation"
            assert p._reserved, "the child aborted the parent's reservation"
            r.commit()
            assert c.recv_bytes(timeout=5) == b"paren"
            p.send(b"next")
            assert c.recv_bytes(timeout=5) == b"next"
    return scenario


SCENARIOS = {
    "ring": ring_block, "state": state_block, "producer-spsc": spsc_producer, "producer-mpsc": multi_producer("mpsc"),
    "producer-mpmc": multi_producer("mpmc"), "producer-broadcast": multi_producer("broadcast"),
    "consumer-spsc": role_consumer("spsc"), "consumer-mpsc": role_consumer("mpsc"),
    "consumer-mpmc": mpmc_consumer, "subscriber": subscriber, "message": message,
    "records-producer": records_producer, "records-consumer": records_consumer, "record-batch": record_batch,
    "reservation-spsc": reservation("spsc"), "reservation-mpsc": reservation("mpsc"),
}


@pytest.mark.parametrize("method", ["os.fork", "multiprocess"])
@pytest.mark.parametrize("how", EXITS)
@pytest.mark.parametrize("handle", list(SCENARIOS))
def test_a_forked_child_leaving_a_handle_block_leaves_the_parents_stream_intact(ring_name, handle, how, method):
    SCENARIOS[handle](ring_name, lambda enter: run_child(method, enter, how))


@pytest.mark.parametrize("kind", ["spsc", "mpsc"])
def test_explicit_effects_in_a_forked_child_raise(ring_name, kind):
    """What cannot happen in a child is refused: a send, a commit, a recv."""
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring, ring.producer() as p, ring.consumer() as c:
        r = p.reserve(3)

        def child():
            out = []
            for call in (lambda: p.send(b"x"), r.commit, lambda: c.recv(timeout=0)):
                try:
                    call()
                    out.append("no error")
                except shmring.ShmringError as e:
                    out.append("fork" in str(e))
            return out == [True, True, True]
        pid = os.fork()
        if pid == 0:
            ok = False
            try:
                ok = child()
            finally:
                os._exit(0 if ok else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        r.view[:] = b"abc"
        r.commit()
        assert c.recv_bytes(timeout=5) == b"abc"
