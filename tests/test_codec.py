"""Every kind of value round-trips through a real ring, zero-copy where promised."""
import array
import gc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import shmring
from shmring import layout as L

from _workers import make_array, same_values, unique_name

SETTINGS = settings(deadline=None, max_examples=400,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Pipe:
    """A ring with its producer and consumer, shared by a module's examples."""

    def __init__(self, capacity=1 << 20):
        self.name = unique_name("codec")
        self.ring = shmring.Ring.create(self.name, capacity)
        self.prod = self.ring.producer()
        self.cons = self.ring.consumer()
        a = np.frombuffer(self.ring._seg.buf, np.uint8)
        self.lo, self.hi = a.ctypes.data, a.ctypes.data + a.nbytes
        del a

    def drain(self):
        while (m := self.cons.try_recv()) is not None:
            m.release()

    def roundtrip(self, value):
        """Send ``value`` and return the received Message (caller releases it)."""
        self.drain()
        self.prod.send(value)
        m = self.cons.try_recv()
        assert m is not None, "a sent message must be receivable at once"
        return m

    def in_ring(self, arr) -> bool:
        return self.lo <= arr.ctypes.data and arr.ctypes.data + arr.nbytes <= self.hi

    def close(self):
        self.prod.close()
        self.cons.close()
        self.ring.close()
        self.ring.unlink()


@pytest.fixture(scope="module")
def pipe():
    p = Pipe()
    yield p
    p.close()


# --------------------------------------------------------------------------- strategies

simple_dtypes = st.one_of(
    hnp.integer_dtypes(endianness="?"), hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?"), hnp.complex_number_dtypes(endianness="?"),
    hnp.boolean_dtypes(), hnp.datetime64_dtypes(endianness="?"), hnp.timedelta64_dtypes(endianness="?"),
    hnp.byte_string_dtypes(max_len=8), hnp.unicode_string_dtypes(max_len=8, endianness="?"),
)


@st.composite
def padded_struct_dtypes(draw):
    """Structured dtypes with explicit (in-order) offsets: gaps between fields and at the end."""
    n = draw(st.integers(1, 4))
    formats, offsets, off = [], [], 0
    for _ in range(n):
        f = draw(simple_dtypes)
        off += draw(st.integers(0, 9))
        formats.append(f)
        offsets.append(off)
        off += f.itemsize
    return np.dtype({"names": [f"f{i}" for i in range(n)], "formats": formats, "offsets": offsets,
                     "itemsize": off + draw(st.integers(0, 9))})


@st.composite
def aligned_struct_dtypes(draw):
    fields = draw(st.lists(simple_dtypes, min_size=1, max_size=4))
    return np.dtype([(f"x{i}", f) for i, f in enumerate(fields)], align=True)


any_dtypes = st.one_of(
    simple_dtypes,
    hnp.array_dtypes(simple_dtypes, min_size=1, max_size=4, allow_subarrays=True),
    hnp.nested_dtypes(simple_dtypes, max_leaves=6, max_itemsize=128),
    padded_struct_dtypes(), aligned_struct_dtypes(),
)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
LAYOUTS = ["C", "F", "strided", "transposed", "reversed"]


@st.composite
def arrays(draw, dtypes=any_dtypes):
    """Arrays in every memory layout: C, Fortran, strided, transposed, negative strides."""
    dt = draw(dtypes)
    shape = draw(shapes)
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "strided" and shape:
        base = draw(hnp.arrays(dt, (shape[0] * 2,) + shape[1:]))
        return base[::2]
    a = draw(hnp.arrays(dt, shape))
    if layout == "F":
        a = np.asfortranarray(a)
    elif layout == "transposed":
        a = a.T
    elif layout == "reversed" and shape:
        a = a[::-1]
    return a


small_arrays = arrays(st.one_of(hnp.integer_dtypes(endianness="?"), hnp.floating_dtypes(),
                                hnp.unicode_string_dtypes(max_len=4), padded_struct_dtypes()))

keys = st.one_of(st.text(max_size=8), st.integers(-2 ** 63, 2 ** 63 - 1))
leaves = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1),
                   st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20))
objects = st.recursive(leaves, lambda ch: st.lists(ch, max_size=5) | st.dictionaries(keys, ch, max_size=5),
                       max_leaves=30).filter(lambda v: not isinstance(v, bytes))
objects_with_arrays = st.recursive(st.one_of(leaves, small_arrays),
                                   lambda ch: st.lists(ch, max_size=4) | st.dictionaries(keys, ch, max_size=4),
                                   max_leaves=12).filter(lambda v: not isinstance(v, bytes))


def assert_ring_array(pipe, v, expect):
    """``v`` equals ``expect`` and is a read-only, 64-aligned view of the ring."""
    assert isinstance(v, np.ndarray)
    assert v.dtype == expect.dtype and v.shape == expect.shape
    assert same_values(v, expect)
    assert not v.flags.writeable
    if v.size:
        assert v.ctypes.data % 64 == 0
        assert pipe.in_ring(v), "a received array must view the ring's pages"
        with pytest.raises(ValueError):
            v.flat[0] = v.flat[0]


def assert_same_object(pipe, got, sent):
    if isinstance(sent, np.ndarray):
        assert_ring_array(pipe, got, sent)
    elif isinstance(sent, dict):
        assert isinstance(got, dict) and set(got) == set(sent)
        for k in sent:
            assert_same_object(pipe, got[k], sent[k])
    elif isinstance(sent, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(sent)
        for g, s in zip(got, sent):
            assert_same_object(pipe, g, s)
    else:
        assert type(got) is type(sent) and got == sent


def ring_arrays(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from ring_arrays(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from ring_arrays(v)


# --------------------------------------------------------------------------- bytes

@SETTINGS
@given(data=st.binary(max_size=4000), kind=st.sampled_from(["bytes", "bytearray", "memoryview", "strided", "array"]))
def test_bytes_like_values_arrive_as_read_only_memoryviews(pipe, data, kind):
    src = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data),
           "strided": memoryview(data)[::2], "array": array.array("B", data)}[kind]
    expect = bytes(memoryview(src).tobytes())
    with pipe.roundtrip(src) as m:
        assert m.kind == "bytes" and m.type == L.T_BYTES and m.nbytes == len(expect)
        v = m.value
        assert isinstance(v, memoryview) and v.readonly
        assert v.tobytes() == expect == m.tobytes() == m.copy()
        del v


def test_bytes_received_with_copy_true_are_plain_bytes(pipe):
    pipe.drain()
    pipe.prod.send(b"\x00payload\xff")
    got = pipe.cons.recv(copy=True)
    assert type(got) is bytes and got == b"\x00payload\xff"


# --------------------------------------------------------------------------- arrays

@SETTINGS
@given(a=arrays())
def test_arrays_of_any_dtype_shape_and_layout_round_trip_as_ring_views(pipe, a):
    assume(a.nbytes < 200_000)
    with pipe.roundtrip(a) as m:
        assert m.kind == "array" and m.type == L.T_ARRAY
        v = m.value
        assert_ring_array(pipe, v, a)
        if a.size:
            w = m.value                                      # a second decode: the same ring bytes
            assert np.shares_memory(v, w)
            del w
        c = m.copy()
        del v
    # the copy owns its memory: writeable, outside the ring, unchanged after release
    assert isinstance(c, np.ndarray) and same_values(c, a)
    assert c.flags.writeable
    if c.size:
        assert not pipe.in_ring(c)
    pipe.prod.send(np.zeros(max(a.nbytes, 1), np.uint8) + 0xAB)     # reuse the space
    pipe.drain()
    assert same_values(c, a)


@pytest.mark.parametrize("order", ["C", "F"])
def test_received_array_keeps_the_memory_order_it_was_sent_in(pipe, order):
    a = np.asarray(np.arange(24, dtype="<i4").reshape(2, 3, 4), order=order)
    with pipe.roundtrip(a) as m:
        v = m.value
        assert v.flags.c_contiguous == (order == "C")
        assert v.flags.f_contiguous == (order == "F")
        assert np.array_equal(v, a)
        del v


def test_non_contiguous_array_arrives_contiguous_and_equal(pipe):
    a = np.arange(100, dtype=">f8").reshape(10, 10)[::3, 1::2]
    assert not a.flags.c_contiguous and not a.flags.f_contiguous
    with pipe.roundtrip(a) as m:
        v = m.value
        assert np.array_equal(v, a) and v.dtype == np.dtype(">f8")
        assert v.flags.c_contiguous
        del v


def test_zero_dimensional_and_empty_arrays_round_trip(pipe):
    for a in (np.array(3.5), np.array(b"xy"), np.zeros((0,), "<i4"), np.zeros((3, 0, 2), ">c8"),
              np.zeros((0,), [("a", "<i4"), ("b", "S2")])):
        with pipe.roundtrip(a) as m:
            v = m.value
            assert v.shape == a.shape and v.dtype == a.dtype and same_values(v, a)
            assert not v.flags.writeable
            del v


def test_received_array_with_copy_true_is_writeable_and_owns_its_memory(pipe):
    a = make_array(11)
    pipe.drain()
    pipe.prod.send(a)
    got = pipe.cons.recv(copy=True)
    assert same_values(got, a) and got.flags.writeable
    if got.size:
        assert not pipe.in_ring(got)


def test_every_structured_dtype_in_the_stream_catalogue_round_trips(pipe):
    for seq in range(200):
        a = make_array(seq)
        with pipe.roundtrip(a) as m:
            v = m.value
            assert_ring_array(pipe, v, a)
            del v


def test_multi_field_view_of_a_structured_array_round_trips_or_is_refused_cleanly(pipe):
    # numpy's multi-field index gives a view whose fields are out of offset order;
    # dtype.descr cannot express it.  Sending it must either work or raise
    # UnsupportedType -- not leak numpy's bare ValueError.
    base = np.zeros(4, [("a", "<i4"), ("b", "<f8"), ("c", "u1")])
    base["a"], base["b"], base["c"] = [1, 2, 3, 4], [0.5, 1.5, 2.5, 3.5], [9, 8, 7, 6]
    view = base[["c", "a"]]
    assert view.dtype.names == ("c", "a")
    pipe.drain()
    try:
        pipe.prod.send(view)
    except shmring.UnsupportedType:
        return
    with pipe.cons.recv(timeout=1) as m:
        v = m.value
        assert v.dtype.names == ("c", "a")
        assert v["a"].tolist() == [1, 2, 3, 4] and v["c"].tolist() == [9, 8, 7, 6]
        del v


# --------------------------------------------------------------------------- msgpack objects

@SETTINGS
@given(obj=objects)
def test_msgpack_objects_round_trip(pipe, obj):
    with pipe.roundtrip(obj) as m:
        assert m.kind == "object" and m.type == L.T_OBJECT
        assert m.value == obj
        assert m.copy() == obj


def test_object_keys_values_and_nesting_survive_exactly(pipe):
    obj = {1: "int key", -2 ** 63: None, "ü": "ünïcödé ✓", "b": b"\x00\xff", "n": [[[], {}], {"x": [1.5, -0.0]}],
           "big": 2 ** 64 - 1, "t": True}
    with pipe.roundtrip(obj) as m:
        got = m.value
    assert got == obj
    assert type(got["b"]) is bytes and type(got["ü"]) is str and type(got[1]) is str


def test_tuples_arrive_as_lists(pipe):
    with pipe.roundtrip({"t": (1, (2, 3))}) as m:
        assert m.value == {"t": [1, [2, 3]]}


@SETTINGS
@given(obj=objects_with_arrays)
def test_objects_holding_arrays_round_trip_with_arrays_as_ring_views(pipe, obj):
    assume(sum(a.nbytes for a in ring_arrays(obj)) < 100_000)
    with pipe.roundtrip(obj) as m:
        assert m.kind == ("array" if isinstance(obj, np.ndarray) else "object")
        got = m.value
        assert_same_object(pipe, got, obj)
        copied = m.copy()
        del got
    for a in ring_arrays(copied):
        assert a.flags.writeable
        if a.size:
            assert not pipe.in_ring(a)
    pipe.prod.send(b"\xab" * 50_000)            # reuse the space
    pipe.drain()
    assert_copy_equal(copied, obj)


def assert_copy_equal(got, sent):
    if isinstance(sent, np.ndarray):
        assert same_values(got, sent)
    elif isinstance(sent, dict):
        for k in sent:
            assert_copy_equal(got[k], sent[k])
    elif isinstance(sent, list):
        for g, s in zip(got, sent, strict=True):
            assert_copy_equal(g, s)
    else:
        assert got == sent


def test_arrays_inside_an_object_each_start_64_byte_aligned(pipe):
    obj = {"a": np.arange(3, dtype="u1"), "b": [np.arange(5, dtype="<f8"), np.ones((2, 3), ">i2")],
           "c": np.array(7, "<i8")}
    with pipe.roundtrip(obj) as m:
        got = m.value
        for arr in (got["a"], got["b"][0], got["b"][1], got["c"]):
            assert arr.ctypes.data % 64 == 0 and not arr.flags.writeable and pipe.in_ring(arr)
        assert np.array_equal(got["b"][1], obj["b"][1]) and got["c"] == 7
        del got, arr


def test_numpy_scalars_inside_objects_become_python_numbers(pipe):
    with pipe.roundtrip({"i": np.int16(-3), "f": np.float32(0.5), "b": np.bool_(True)}) as m:
        assert m.value == {"i": -3, "f": 0.5, "b": True}


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("value", [
    np.array([1, "x", None], dtype=object),
    {"nested": np.array([1, 2], dtype=object)},
    np.zeros(2, [("a", "<i4"), ("o", "O")]),
], ids=["object-array", "object-array-in-dict", "struct-with-object-field"])
def test_object_dtype_is_refused_with_unsupported_type(pipe, value):
    pipe.drain()
    with pytest.raises(shmring.UnsupportedType, match="object"):
        pipe.prod.send(value)
    assert pipe.cons.try_recv() is None                 # nothing (partial) was sent
    pipe.prod.send(b"still works")
    assert pipe.cons.recv_bytes() == b"still works"


@pytest.mark.parametrize("value", [object(), {"k": {1, 2}}, [1j], 2 ** 64, -2 ** 63 - 1, {"f": len}],
                         ids=["object", "set", "complex", "int-too-big", "int-too-small", "function"])
def test_values_msgpack_cannot_encode_are_refused_with_unsupported_type(pipe, value):
    pipe.drain()
    with pytest.raises(shmring.UnsupportedType) as ei:
        pipe.prod.send(value)
    assert isinstance(ei.value, TypeError)
    assert pipe.cons.try_recv() is None
    assert pipe.prod.try_send(b"ok") is True
    assert pipe.cons.recv_bytes() == b"ok"


def test_unsupported_type_is_also_raised_by_try_send(pipe):
    with pytest.raises(shmring.UnsupportedType):
        pipe.prod.try_send({"x": object()})


def test_copies_survive_release_and_reuse_of_the_space(pipe):
    pipe.drain()
    a = np.arange(1000, dtype="<i8")
    pipe.prod.send(a)
    pipe.prod.send({"a": a, "s": "x"})
    pipe.prod.send(b"raw bytes")
    with pipe.cons.recv() as m1:
        c1 = m1.copy()
    with pipe.cons.recv() as m2:
        c2 = m2.copy()
    with pipe.cons.recv() as m3:
        c3 = m3.copy()
    for _ in range(200):                                 # overwrite the ring many times
        pipe.prod.send(np.full(1000, -1, "<i8"))
        pipe.drain()
    gc.collect()
    assert np.array_equal(c1, a) and c1.flags.writeable
    assert np.array_equal(c2["a"], a) and c2["a"].flags.writeable and c2["s"] == "x"
    assert c3 == b"raw bytes"


def test_meta_of_an_array_message_is_msgpack_describing_it(pipe):
    a = np.zeros((2, 3), ">u2")
    with pipe.roundtrip(a) as m:
        with memoryview(m) as mv:
            meta_len = int.from_bytes(mv[:4], "little")
            desc = msgpack.unpackb(bytes(mv[8:8 + meta_len]))
    assert desc[0] == ">u2" and desc[1] == [2, 3] and desc[2] == "C" and desc[4] == 12
