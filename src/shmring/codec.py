"""Message kinds and their payload encodings.

================  =========  ==================================================
value sent        record     value received
================  =========  ==================================================
bytes-like        T_BYTES    read-only ``memoryview`` of the ring
``ndarray``       T_ARRAY    read-only ``ndarray`` viewing the ring
anything else     T_OBJECT   the msgpack-decoded object; every ``ndarray`` in it
                             travelled as a raw block and is a read-only view
torch tensor,     T_OBJECT   a tensor / Arrow object over the ring's memory
Arrow, DataFrame             (:mod:`shmring._interop`: ext types 2 and 3)
================  =========  ==================================================

``T_ARRAY`` and ``T_OBJECT`` payloads share one layout::

    u32 meta length | u32 array count | meta (msgpack) | pad | array area

The array area starts at the first 64-byte-aligned address after the meta
(the data area is page-aligned, so ring offsets and addresses align alike),
and every array block inside it starts 64-aligned too.  The meta of a
``T_ARRAY`` is one array descriptor; the meta of a ``T_OBJECT`` is the object
with each array replaced by msgpack ext type 1 holding its descriptor.

Dict keys: msgpack has no tuple, so a tuple key (a Python key is hashable:
scalars and tuples of them) arrives as a list, which no dict can hold.  Such a
meta is decoded again with every list in a key position made a tuple again:
tuple keys round-trip exactly, at no cost to messages without them (tuples
elsewhere arrive as lists, as msgpack has it).  What msgpack cannot carry is
refused at the send with :class:`~shmring.errors.UnsupportedType`: ints outside
``-2**63 .. 2**64 - 1``, and masked arrays (their mask would be lost).

An array descriptor is ``[dtype, shape, order, offset, nbytes]``: ``dtype`` is
``dtype.str`` or, for structured dtypes, a names/formats/offsets/itemsize map; ``order`` is ``"C"`` or
``"F"``; ``offset`` is relative to the array area.  Everything decoded is
untrusted: a descriptor that does not describe bytes inside the payload is
:class:`~shmring.errors.CorruptSegmentError`.
"""
from __future__ import annotations

import struct
from math import prod

import msgpack
import numpy as np

from . import _core, _interop
from . import layout as L
from .errors import CorruptSegmentError, DecodeLimit, UnsupportedType

EXT_ARRAY = 1
PREFIX = struct.Struct("<II")
MAX_NDIM = 64

# Decode limits: a msgpack meta of n bytes may cost a reader at most
# DECODE_FACTOR * n + DECODE_SLACK bytes of Python objects, and nest at most
# MAX_DEPTH containers deep (msgpack-python's own bound, made a typed error).
# The cost is estimated before decoding by the C core's walk of the encoding
# (msgscan.c), for metas over SCAN_ABOVE bytes only: below that, even the
# costliest bytes stay under DECODE_SLACK, so the hot path pays nothing.
DECODE_FACTOR = 16
DECODE_SLACK = 4 << 20
MAX_DEPTH = 1024
SCAN_ABOVE = DECODE_SLACK // _core.MSGPACK_MAX_COST_PER_BYTE


def check_decode_cost(meta: bytes, what: str) -> None:
    """Raise DecodeLimit if decoding ``meta`` could cost more than the decode limits."""
    n = len(meta)
    if n <= SCAN_ABOVE:
        return
    limit = DECODE_FACTOR * n + DECODE_SLACK
    cost, depth = _core.msgpack_cost(meta, limit, MAX_DEPTH)
    if depth > MAX_DEPTH:
        raise DecodeLimit(f"{what}: its msgpack meta nests containers deeper than {MAX_DEPTH} levels")
    if cost > limit:
        raise DecodeLimit(f"{what}: its {n:,}-byte msgpack meta would cost a reader more than {limit:,} bytes "
                          f"of Python objects once decoded (the limit is {DECODE_FACTOR} x its size + "
                          f"{DECODE_SLACK:,} bytes; many tiny objects cost ~10-100 bytes each); send bulk data "
                          "as numpy arrays (they travel raw and arrive as views), or split it")


def _unpack(meta: bytes, msg, **kw):
    """msgpack.unpackb of a message's meta within the decode limits (DecodeLimit past them)."""
    if len(meta) > SCAN_ABOVE:
        check_decode_cost(meta, _at(msg))
    try:
        return msgpack.unpackb(meta, **kw)
    except msgpack.StackError:
        raise DecodeLimit(f"{_at(msg)}: its msgpack meta nests containers deeper than {MAX_DEPTH} "
                          "levels") from None


def _at(msg) -> str:
    return f"message at ring position {msg.position}"


def _dtype_spec(dtype: np.dtype):
    """A msgpack-able description of a dtype: ``dtype.str`` for plain dtypes;
    for structured ones the names/formats/offsets/itemsize form, which (unlike
    ``dtype.descr``) also covers out-of-order and overlapping fields."""
    if dtype.hasobject:
        raise UnsupportedType(f"arrays of dtype {dtype} hold Python object pointers, which cannot be "
                              "shared between processes; convert to a fixed-size dtype first")
    if dtype.names is not None:
        fields = [dtype.fields[n] for n in dtype.names]
        spec = {"names": list(dtype.names), "formats": [_dtype_spec(f[0]) for f in fields],
                "offsets": [f[1] for f in fields], "itemsize": dtype.itemsize}
        if any(len(f) > 2 for f in fields):
            spec["titles"] = [f[2] if len(f) > 2 else None for f in fields]
        return spec
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return {"base": _dtype_spec(base), "shape": list(shape)}
    return dtype.str


MAX_DTYPE_DEPTH = 32       # nesting of subarray / structured dtype descriptions


def _dtype_from_spec(spec, depth: int = 0) -> np.dtype:
    """Inverse of _dtype_spec, for untrusted input (any failure raises)."""
    if depth > MAX_DTYPE_DEPTH:
        raise ValueError(f"dtype description nested deeper than {MAX_DTYPE_DEPTH} levels")
    if isinstance(spec, str):
        dt = np.dtype(spec)
    elif isinstance(spec, dict) and "base" in spec:
        dt = np.dtype((_dtype_from_spec(spec["base"], depth + 1), tuple(spec["shape"])))
    elif isinstance(spec, dict):
        d = {"names": spec["names"], "formats": [_dtype_from_spec(f, depth + 1) for f in spec["formats"]],
             "offsets": spec["offsets"], "itemsize": spec["itemsize"]}
        if "titles" in spec:
            d["titles"] = spec["titles"]
        dt = np.dtype(d)
    else:
        raise ValueError(f"bad dtype description {spec!r}")
    if dt.hasobject:
        raise ValueError("object dtype")
    return dt


INT_MIN, INT_MAX = -2**63, 2**64 - 1       # what a msgpack int carries


def refuse_masked(arr: np.ndarray) -> None:
    """A masked array would arrive as its bare data, the mask silently lost: refuse it."""
    if isinstance(arr, np.ma.MaskedArray):
        raise UnsupportedType("cannot send a masked array (numpy.ma.MaskedArray): only its data would "
                              "arrive, the mask would be lost; send the data and the mask as two arrays "
                              "({'data': a.data, 'mask': np.ma.getmaskarray(a)}) or a.filled(fill_value)")


def _key(k):
    """A decoded dict key as it was sent: the lists msgpack made of tuples are tuples again."""
    return tuple(_key(x) for x in k) if isinstance(k, list) else k


def _tuple_keys(pairs) -> dict:
    return {_key(k): v for k, v in pairs}


class Encoded:
    """A value laid out for the ring: meta bytes plus array blocks.

    ``blocks`` holds ``(source array or None, shape, dtype, order, area offset)``
    per array; a ``None`` source is an array to be built in place.
    """
    __slots__ = ("type", "meta", "blocks", "area_len")

    def __init__(self, type_, meta, blocks, area_len):
        self.type, self.meta, self.blocks, self.area_len = type_, meta, blocks, area_len

    @property
    def max_payload(self) -> int:
        """Payload bytes in the worst case of alignment padding before the array area."""
        n = PREFIX.size + len(self.meta)
        return n + (L.ARRAY_ALIGN - 1 + self.area_len if self.blocks else 0)


class InPlace:
    """A placeholder for an array that ``Producer.reserve_value`` builds in
    place: ``reserve_value({"id": 7, "img": InPlace((480, 640), np.uint8)})``."""
    __slots__ = ("shape", "dtype", "order")

    def __init__(self, shape, dtype, order: str = "C"):
        self.shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        # a torch dtype builds a torch tensor in place (C order)
        self.dtype = dtype if _interop.is_torch_dtype(dtype) and order == "C" else np.dtype(dtype)
        self.order = order
        if any(s < 0 for s in self.shape) or order not in ("C", "F") or getattr(self.dtype, "hasobject", False):
            raise ValueError(f"InPlace needs a non-negative shape, order 'C' or 'F' and a fixed-size dtype; "
                             f"got {self.shape}, {order!r}, {self.dtype}")

    def __repr__(self):
        return f"InPlace({self.shape}, {self.dtype})"


class _Packer:
    def __init__(self):
        self.blocks: list[tuple] = []
        self.area = 0

    def descriptor(self, arr, shape, dtype: np.dtype, order: str) -> list:
        spec = _dtype_spec(dtype)
        nbytes = prod(shape) * dtype.itemsize
        off = L.align(self.area, L.ARRAY_ALIGN)
        self.area = off + nbytes
        self.blocks.append((arr, shape, dtype, order, off))
        return [spec, list(shape), order, off, nbytes]

    def array(self, arr: np.ndarray) -> list:
        if type(arr) is not np.ndarray:
            refuse_masked(arr)
        # Fortran-ordered input keeps its order (one memcpy); anything else
        # non-contiguous is copied once into C order.
        order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        return self.descriptor(arr, arr.shape, arr.dtype, order)

    def default(self, obj):
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(EXT_ARRAY, msgpack.packb(self.array(obj)))
        if _interop.is_tensor(obj):
            return msgpack.ExtType(_interop.EXT_TENSOR, msgpack.packb(
                _interop.tensor_ext(self, _interop.TensorSource(obj), tuple(obj.shape), obj.dtype)))
        if isinstance(obj, InPlace) and not isinstance(obj.dtype, np.dtype):
            return msgpack.ExtType(_interop.EXT_TENSOR, msgpack.packb(
                _interop.tensor_ext(self, _interop.TensorPlace(obj.shape, obj.dtype), obj.shape, obj.dtype)))
        what = _interop.is_arrow(obj)
        if what is not None:
            return msgpack.ExtType(_interop.EXT_ARROW, msgpack.packb(_interop.arrow_ext(self, obj, what)))
        if isinstance(obj, InPlace):
            return msgpack.ExtType(EXT_ARRAY, msgpack.packb(self.descriptor(None, obj.shape, obj.dtype, obj.order)))
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, int) and not INT_MIN <= obj <= INT_MAX:
            raise UnsupportedType(f"cannot send the int {obj}: msgpack carries ints from -2**63 to 2**64 - 1 "
                                  "only; send a larger one as a str (str(n)) or bytes (n.to_bytes(...))")
        raise UnsupportedType(f"cannot send an object of type {type(obj).__module__}.{type(obj).__qualname__}: "
                              "shmring sends bytes-like values, numpy arrays, and msgpack-able objects "
                              "(None, bool, int, float, str, bytes, list, tuple, dict) that may contain arrays, "
                              "and, when torch / pyarrow are loaded, CPU tensors, Arrow tables and record "
                              "batches, and pandas DataFrames")


def encode(value) -> Encoded:
    """Lay out an ndarray (T_ARRAY) or a msgpack-able object (T_OBJECT)."""
    p = _Packer()
    if isinstance(value, np.ndarray):
        if type(value) is not np.ndarray:
            refuse_masked(value)
        meta = msgpack.packb(p.array(value))
        return Encoded(L.T_ARRAY, meta, p.blocks, p.area)
    try:
        meta = msgpack.packb(value, default=p.default, use_bin_type=True)
    except UnsupportedType:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise UnsupportedType(f"cannot encode {type(value).__name__} with msgpack: {e}") from None
    if len(meta) > SCAN_ABOVE:                                   # refused here, not by every reader
        check_decode_cost(meta, f"this {type(value).__name__}")
    return Encoded(L.T_OBJECT, meta, p.blocks, p.area)


_meta_cache: dict = {}
_CACHE_MAX = 512


def array_meta(arr: np.ndarray) -> bytes | None:
    """The T_ARRAY meta of a contiguous array (cached by dtype, shape and order),
    or None if the array is not contiguous and must go through :func:`encode`."""
    if type(arr) is not np.ndarray:
        refuse_masked(arr)
    if arr.flags.c_contiguous:
        order = "C"
    elif arr.flags.f_contiguous:
        order = "F"
    else:
        return None
    key = (arr.dtype, arr.shape, order)
    meta = _meta_cache.get(key)
    if meta is None:
        meta = msgpack.packb([_dtype_spec(arr.dtype), list(arr.shape), order, 0, arr.nbytes])
        if len(_meta_cache) >= _CACHE_MAX:
            _meta_cache.clear()
        _meta_cache[key] = meta
    return meta


def array_encoding(shape, dtype, order: str = "C") -> Encoded:
    """The layout of an array to be built in place (``reserve_array``)."""
    dtype = np.dtype(dtype)
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    if dtype.subdtype is not None:
        raise ValueError(f"subarray dtype {dtype}: put its shape into the array shape instead")
    p = _Packer()
    meta = msgpack.packb(p.descriptor(None, shape, dtype, order))
    return Encoded(L.T_ARRAY, meta, p.blocks, p.area)


def write(wmv: memoryview, payload_off: int, enc: Encoded) -> tuple[int, list]:
    """Write ``enc`` at ``payload_off`` of the region; return (payload length, array views).

    Source arrays are copied in (one copy each, whatever their layout), a
    tensor or Arrow source writes itself in; blocks without a source come
    back as writable views to fill in place (a TensorPlace: a tensor view).
    """
    PREFIX.pack_into(wmv, payload_off, len(enc.meta), len(enc.blocks))
    m0 = payload_off + PREFIX.size
    wmv[m0:m0 + len(enc.meta)] = enc.meta
    end = m0 + len(enc.meta)
    views = []
    if enc.blocks:
        area = L.align(end, L.ARRAY_ALIGN)
        for src, shape, dtype, order, off in enc.blocks:
            dst = np.ndarray(shape, dtype, buffer=wmv, offset=area + off, order=order)
            if isinstance(src, np.ndarray):
                np.copyto(dst, src, casting="no")
            elif isinstance(src, _interop.TensorPlace):
                dst = src.view(dst)
            elif src is not None:
                src.fill(dst)
            views.append(dst)
        end = area + enc.area_len
    return end - payload_off, views


def _corrupt(msg, why) -> CorruptSegmentError:
    return CorruptSegmentError(f"message at ring position {msg.position}: {why}")


def _parse_descriptor(desc) -> tuple:
    """Validate an array descriptor from the ring: (dtype, shape, order, offset, nbytes, count)."""
    spec, shape, order, off, nbytes = desc
    dt = _dtype_from_spec(spec)
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(s, int) and 0 <= s < 1 << 62 for s in shape)):
        raise ValueError(f"bad shape {shape!r}")
    if order not in ("C", "F") or not isinstance(off, int) or not isinstance(nbytes, int):
        raise ValueError(f"bad order/offset/size {order!r} {off!r} {nbytes!r}")
    count = prod(shape)
    if dt.itemsize == 0 and count and (dt.kind in "SU" or count > 1 << 24):
        # numpy allocates 'S0'/'U0' items as one character each: such a
        # descriptor would make the reader allocate memory the ring never held
        raise ValueError(f"{count} items of a zero-size {dt} dtype")
    if count * dt.itemsize != nbytes or off < 0 or off % L.ARRAY_ALIGN:
        raise ValueError(f"{count} items of {dt.itemsize} bytes do not make {nbytes} bytes, "
                         f"or offset {off} is not {L.ARRAY_ALIGN}-aligned")
    return dt, tuple(shape), order, off, nbytes, count


_desc_cache: dict = {}
_tensor_cache: dict = {}           # tensor ext payload bytes -> (torch dtype, shape, parsed block descriptor)


def _decode(msg, copy: bool = False):
    """Decode a T_ARRAY / T_OBJECT message; arrays are read-only views of the ring (or copies)."""
    n = msg.nbytes
    with memoryview(msg) as buf:
        if n < PREFIX.size:
            raise _corrupt(msg, f"payload of {n} bytes is shorter than its prefix")
        meta_len, narrays = PREFIX.unpack_from(buf, 0)
        if PREFIX.size + meta_len > n:
            raise _corrupt(msg, f"meta of {meta_len} bytes overruns a payload of {n} bytes")
        meta = bytes(buf[PREFIX.size:PREFIX.size + meta_len])
    base = msg._offset
    area = L.align(base + PREFIX.size + meta_len, L.ARRAY_ALIGN) - base if narrays else n
    if area > n:
        raise _corrupt(msg, f"array area at {area} lies outside a payload of {n} bytes")
    seen = [0]

    def block(parsed):
        seen[0] += 1
        if seen[0] > narrays:
            raise _corrupt(msg, f"more arrays than the {narrays} announced")
        _dt, _shape, _order, off, nbytes, _count = parsed
        if area + off + nbytes > n:
            raise _corrupt(msg, f"array of {nbytes} bytes at area offset {off} overruns the "
                                f"{n - area}-byte array area")
        return area + off

    def make(parsed):
        block(parsed)
        dt, shape, order, off, nbytes, count = parsed
        if nbytes == 0:
            a = np.empty(shape, dt, order=order)
            if copy:
                return a
        else:
            a = np.frombuffer(msg, dtype=dt, count=count, offset=area + off).reshape(shape, order=order)
            if copy:
                return a.copy(order="K")
        a.flags.writeable = False
        return a

    def parse(desc):
        try:
            return _parse_descriptor(desc)
        except Exception as e:
            raise _corrupt(msg, f"bad array descriptor: {e}") from None

    def ext_hook(code, data):
        if code == EXT_ARRAY:
            return make(parse(_unpack(data, msg)))
        if code == _interop.EXT_TENSOR:
            hit = _tensor_cache.get(data)           # (as _desc_cache: the same bytes parse the same)
            if hit is None:
                try:
                    dt, shape, desc = _interop.parse_tensor(_unpack(data, msg))
                except (ModuleNotFoundError, CorruptSegmentError, DecodeLimit):
                    raise
                except Exception as e:
                    raise _corrupt(msg, f"bad tensor descriptor: {e}") from None
                hit = dt, shape, parse(desc)
                if len(_tensor_cache) >= _CACHE_MAX:
                    _tensor_cache.clear()
                _tensor_cache[data] = hit
            dt, shape, parsed = hit
            return _interop.make_tensor(msg, dt, shape, block(parsed), parsed[4], copy)
        if code == _interop.EXT_ARROW:
            try:
                what, desc = _interop.parse_arrow(_unpack(data, msg))
            except (CorruptSegmentError, DecodeLimit):
                raise
            except Exception as e:
                raise _corrupt(msg, f"bad Arrow descriptor: {e}") from None
            parsed = parse(desc)
            start = block(parsed)
            try:
                return _interop.make_arrow(msg, what, start, parsed[4], copy)
            except ModuleNotFoundError:
                raise
            except Exception as e:
                raise _corrupt(msg, f"invalid Arrow data ({type(e).__name__}: {e})") from None
        return msgpack.ExtType(code, data)


    try:
        if msg.type == L.T_ARRAY:
            if narrays != 1:
                raise _corrupt(msg, f"an array message announces {narrays} arrays")
            parsed = _desc_cache.get(meta)
            if parsed is None:
                parsed = parse(_unpack(meta, msg))
                if len(_desc_cache) >= _CACHE_MAX:
                    _desc_cache.clear()
                _desc_cache[meta] = parsed
            return make(parsed)
        if len(meta) > SCAN_ABOVE:
            check_decode_cost(meta, _at(msg))
        try:
            return msgpack.unpackb(meta, ext_hook=ext_hook, raw=False, strict_map_key=False)
        except TypeError:
            # a tuple key arrived as a list (see the module docstring): decode
            # again, keys made tuples; anything else fails again, as corrupt
            seen[0] = 0
            return msgpack.unpackb(meta, ext_hook=ext_hook, raw=False, strict_map_key=False,
                                   object_pairs_hook=_tuple_keys)
    except (CorruptSegmentError, DecodeLimit, ModuleNotFoundError):
        raise
    except msgpack.StackError:
        raise DecodeLimit(f"{_at(msg)}: its msgpack meta nests containers deeper than {MAX_DEPTH} "
                          "levels") from None
    except Exception as e:
        raise _corrupt(msg, f"undecodable meta ({type(e).__name__}: {e})") from None


def _copy(msg):
    return _decode(msg, copy=True)


# The C core decodes message and snapshot values (.value, .copy()) with these
# two: registered once, here, where they are defined.
_core._set_codec(_decode, _copy)
