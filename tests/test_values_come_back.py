"""Every value send() / publish() accepts comes back as it was sent, or is refused at the send (issue 16 case 2).

A value that passes the send and then fails every read would blame the reader
(in a Pipeline: the downstream stage) for the sender's value.
"""
import numpy as np
import pytest

import shmring


@pytest.fixture
def pipe(ring_name):
    with shmring.Ring.create(ring_name, 1 << 16) as ring:
        with ring.producer() as prod, ring.consumer() as cons:
            yield prod, cons


def roundtrip(pipe, value):
    prod, cons = pipe
    prod.send(value)
    with cons.recv(timeout=5) as msg:
        return msg.copy()


@pytest.mark.parametrize("value, expected", [
    ({(1, 2): "a", ("x", (3, b"y")): 4}, {(1, 2): "a", ("x", (3, b"y")): 4}),
    ({"outer": {(0, 0): [1, 2], (0, 1): None}}, {"outer": {(0, 0): [1, 2], (0, 1): None}}),
    ([{(): 1}], [{(): 1}]),
])
def test_dict_with_tuple_keys_round_trips_through_a_ring(pipe, value, expected):
    assert roundtrip(pipe, value) == expected


def test_dict_with_tuple_keys_keeps_its_arrays_zero_copy(pipe):
    prod, cons = pipe
    prod.send({(1, "a"): np.arange(5.0)})
    with cons.recv(timeout=5) as msg:
        v = msg.value
        assert list(v) == [(1, "a")]
        assert np.array_equal(v[(1, "a")], np.arange(5.0)) and not v[(1, "a")].flags.owndata
        del v


def test_dict_with_tuple_keys_round_trips_through_a_shared_state(ring_name):
    with shmring.SharedState.create(ring_name, 1 << 16) as st:
        st.publish({(1, 2): np.ones(3), "k": {(3,): "v"}})
        with st.read() as snap:
            v = snap.copy()
    assert list(v) == [(1, 2), "k"] and v["k"] == {(3,): "v"}
    assert np.array_equal(v[(1, 2)], np.ones(3))


@pytest.mark.parametrize("wrap", [lambda a: a, lambda a: {"m": a}, lambda a: a[::2]], ids=["bare", "nested", "strided"])
def test_masked_array_is_refused_at_send_not_unmasked(pipe, wrap):
    prod, cons = pipe
    m = np.ma.array(np.arange(6.0), mask=[0, 1, 0, 0, 1, 0])
    with pytest.raises(shmring.UnsupportedType, match="masked array.*mask"):
        prod.send(wrap(m))
    with pytest.raises(shmring.UnsupportedType, match="masked array"):
        prod.try_send(wrap(m))
    assert cons.try_recv() is None            # nothing was sent


def test_masked_array_is_refused_at_publish(ring_name):
    with shmring.SharedState.create(ring_name, 1 << 16) as st:
        with pytest.raises(shmring.UnsupportedType, match="masked array"):
            st.publish(np.ma.array([1, 2, 3], mask=[0, 1, 0]))
        assert st.version == 0


@pytest.mark.parametrize("big", [2**64, -2**63 - 1, 10**30])
def test_int_out_of_range_error_says_the_range(pipe, big):
    prod, _ = pipe
    with pytest.raises(shmring.UnsupportedType) as ei:
        prod.send({"n": [1, big]})
    msg = str(ei.value)
    assert str(big) in msg and "-2**63" in msg and "2**64 - 1" in msg
    assert "(None, bool, int" not in msg          # not the "int is supported" list


@pytest.mark.parametrize("edge", [2**64 - 1, -2**63])
def test_ints_at_the_edges_of_the_range_round_trip(pipe, edge):
    assert roundtrip(pipe, [edge]) == [edge]
