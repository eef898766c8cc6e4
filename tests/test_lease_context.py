"""``with`` on a message, a snapshot or a record batch: the type's own
``__enter__`` / ``__exit__`` descriptors (lease.c) bind without a new bound
method per block (issue 15 item 2).  They must behave exactly like methods."""
import contextlib
import gc

import numpy as np
import pytest

import shmring


@pytest.fixture
def ring(ring_name):
    with shmring.Ring.create(ring_name, 1 << 16) as r, r.producer() as p, r.consumer() as c:
        yield p, c


def test_a_with_block_without_as_still_consumes_the_message(ring):
    p, c = ring
    p.send(b"one")
    p.send(b"two")
    with c.recv(timeout=1):                   # the bound __exit__ keeps the message alive to the end
        gc.collect()
    assert c.recv_bytes(timeout=1) == b"two"  # "one" was released, not handed out again
    assert c.try_recv() is None


def test_enter_returns_the_message_and_exit_releases_it(ring):
    p, c = ring
    p.send(b"abc")
    m = c.recv(timeout=1)
    assert m.__enter__() is m
    exit_ = m.__exit__
    assert "__exit__" in repr(exit_)
    del m
    gc.collect()                               # the bound method holds the message, as a bound method does
    assert exit_(None, None, None) is False
    assert c.try_recv() is None                 # released by that exit, not dropped and redelivered


def test_exit_stack_calls_the_methods_through_the_type(ring):
    p, c = ring
    p.send(b"x")
    p.send(b"y")
    with contextlib.ExitStack() as stack:
        m = stack.enter_context(c.recv(timeout=1))
        assert bytes(m.value) == b"x"
    assert m.released
    assert type(m).__exit__(c.recv(timeout=1), None, None, None) is False
    assert c.try_recv() is None


def test_wrong_calls_are_type_errors_not_crashes(ring):
    p, c = ring
    p.send(b"x")
    m = c.recv(timeout=1)
    with pytest.raises(TypeError, match="takes no arguments"):
        m.__enter__(1)
    with pytest.raises(TypeError, match="takes 3 arguments"):
        m.__exit__(None)
    with pytest.raises(TypeError, match="no keyword arguments"):
        m.__exit__(None, None, tb=None)
    with pytest.raises(TypeError, match="needs a lease"):
        type(m).__enter__(42)
    with pytest.raises(TypeError, match="needs a lease"):
        type(m).__exit__()
    assert not m.released
    m.release()


def test_an_interrupt_in_the_block_before_reading_gives_the_message_back(ring):
    # R39 goes through the new __exit__ too
    p, c = ring
    p.send(b"again")
    with pytest.raises(KeyboardInterrupt):
        with c.recv(timeout=1):
            raise KeyboardInterrupt
    assert c.recv_bytes(timeout=1) == b"again"


def test_snapshots_use_them_too_and_record_batches_still_work(ring_name):
    with shmring.SharedState.create(ring_name, 4096) as st:
        st.publish({"a": 1})
        with st.read() as snap:
            assert snap.value == {"a": 1}
        assert snap.released
    dt = np.dtype([("i", "<i8")])
    with shmring.Ring.create(ring_name + "r", 4096, dtype=dt) as r, r.producer() as p, r.consumer() as c:
        p.send_many(np.arange(3).astype(dt))
        with c.recv_many(timeout=1) as batch:
            assert batch.copy()["i"].tolist() == [0, 1, 2]


def test_many_nested_blocks_reuse_bindings_safely(ring):
    p, c = ring
    for i in range(200):                        # more than the freelist holds, all alive at once
        p.send(i.to_bytes(2, "little"))
    with contextlib.ExitStack() as stack:
        ms = [stack.enter_context(c.recv(timeout=1)) for _ in range(200)]
        assert [int.from_bytes(bytes(m.value), "little") for m in ms] == list(range(200))
    assert all(m.released for m in ms)
