"""Errors a new user meets say what went wrong, with a typed error (issue 16 case 9)."""
import numpy as np
import pytest

import shmring


def test_record_ring_send_of_bytes_is_a_typed_error_naming_the_dtype(ring_name):
    with shmring.Ring.create(ring_name, 1 << 16, dtype=[("t", "f8"), ("v", "i4")]) as ring:
        with ring.producer() as prod:
            for bad in (b"abc", "abc", {"t": 1.0}, object()):
                with pytest.raises(shmring.UnsupportedType) as ei:
                    prod.send(bad)
                msg = str(ei.value)
                assert "could not convert" not in msg
                assert "record" in msg and "t" in msg and "f8" in msg and type(bad).__name__ in msg, msg
                assert isinstance(ei.value, TypeError)
            with pytest.raises(shmring.UnsupportedType):
                prod.send_many([b"abc", b"def"])
            prod.send((1.5, 2))                        # what it takes still works
            assert prod.position == 1


@pytest.mark.parametrize("cls, hint", [(shmring.Ring, "Ring.create"), (shmring.SharedState, "SharedState.create")])
@pytest.mark.parametrize("args", [("x",), (), ("x", 4096)])
def test_direct_construction_is_refused_with_a_pointer_to_create_and_attach(cls, hint, args):
    with pytest.raises(TypeError) as ei:
        cls(*args)
    msg = str(ei.value)
    assert hint in msg and ".attach" in msg and "header" not in msg, msg


@pytest.mark.parametrize("which", ["producer", "consumer"])
def test_handle_closed_names_the_handle_and_the_segment(ring_name, which):
    with shmring.Ring.create(ring_name, 1 << 16) as ring:
        h = getattr(ring, which)()
        h.close()
        call = (lambda: h.send(b"x")) if which == "producer" else (lambda: h.recv(timeout=0))
        with pytest.raises(shmring.HandleClosed) as ei:
            call()
        msg = str(ei.value)
        assert which in msg.lower() and ring_name in msg, msg


def test_handle_closed_of_a_shared_state_names_it(ring_name):
    with shmring.SharedState.create(ring_name, 4096) as st:
        other = shmring.SharedState.attach(ring_name)
        other.close()
        with pytest.raises(shmring.HandleClosed) as ei:
            other.read()
        assert ring_name in str(ei.value) and "SharedState" in str(ei.value)


def test_handle_closed_of_a_record_handle_names_its_kind(ring_name):
    with shmring.Ring.create(ring_name, 1 << 16, dtype="f8") as ring:
        prod = ring.producer()
        prod.close()
        with pytest.raises(shmring.HandleClosed, match=rf"producer .*{ring_name}"):
            prod.send(1.0)


@pytest.mark.parametrize("value, kind", [(np.arange(3), "array"), ({"a": 1}, "object")])
def test_recv_bytes_of_a_non_bytes_message_is_a_typed_error_and_leaves_it(ring_name, value, kind):
    with shmring.Ring.create(ring_name, 1 << 16) as ring:
        with ring.producer() as prod, ring.consumer() as cons:
            prod.send(value)
            with pytest.raises(shmring.WrongKind) as ei:
                cons.recv_bytes(timeout=1)
            assert isinstance(ei.value, TypeError) and isinstance(ei.value, shmring.ShmringError)
            assert kind in str(ei.value) and "recv()" in str(ei.value)
            with cons.recv(timeout=1) as msg:          # not consumed
                assert msg.kind == kind
