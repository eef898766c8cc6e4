"""Message kinds and their payload encodings.

================  =========  ==================================================
value sent        record     value received
================  =========  ==================================================
bytes-like        T_BYTES    read-only ``memoryview`` of the ring
``ndarray``       T_ARRAY    read-only ``ndarray`` viewing the ring
anything else     T_OBJECT   the msgpack-decoded object; every ``ndarray`` in it
                             travelled as a raw block and is a read-only view
================  =========  ==================================================

``T_ARRAY`` and ``T_OBJECT`` payloads share one layout::

    u32 meta length | u32 array count | meta (msgpack) | pad | array area

The array area starts at the first 64-byte-aligned address after the meta
(the data area is page-aligned, so ring offsets and addresses align alike),
and every array block inside it starts 64-aligned too.  The meta of a
``T_ARRAY`` is one array descriptor; the meta of a ``T_OBJECT`` is the object
with each array replaced by msgpack ext type 1 holding its descriptor.

An array descriptor is ``[dtype, shape, order, offset, nbytes]``: ``dtype`` is
``dtype.str`` or, for structured dtypes, ``dtype.descr``; ``order`` is ``"C"`` or
``"F"``; ``offset`` is relative to the array area.  Everything decoded is
untrusted: a descriptor that does not describe bytes inside the payload is
:class:`~shmring.errors.CorruptSegmentError`.
"""
from __future__ import annotations

import struct
from math import prod

import msgpack
import numpy as np
from numpy.lib import format as npformat

from . import layout as L
from .errors import CorruptSegmentError, UnsupportedType

EXT_ARRAY = 1
PREFIX = struct.Struct("<II")
MAX_NDIM = 64


def _dtype_spec(dtype: np.dtype):
    if dtype.hasobject:
        raise UnsupportedType(f"arrays of dtype {dtype} hold Python object pointers, which cannot be "
                              "shared between processes; convert to a fixed-size dtype first")
    if dtype.names is None and dtype.subdtype is None:
        return dtype.str
    return npformat.dtype_to_descr(dtype)


def _tuplify(descr):
    """msgpack turns the tuples of a structured ``dtype.descr`` into lists; undo that."""
    if isinstance(descr, str):
        return descr
    if not isinstance(descr, list):
        raise ValueError(f"bad dtype description {descr!r}")
    out = []
    for field in descr:
        if not isinstance(field, list) or len(field) not in (2, 3):
            raise ValueError(f"bad structured dtype field {field!r}")
        name = field[0]
        if isinstance(name, list):
            name = tuple(name)                          # (title, name)
        item = (name, _tuplify(field[1]))
        if len(field) == 3:
            item += (tuple(field[2]),)
        out.append(item)
    return out


def _dtype_from_spec(spec) -> np.dtype:
    spec = _tuplify(spec)
    dt = np.dtype(spec) if isinstance(spec, str) else npformat.descr_to_dtype(spec)
    if dt.hasobject:
        raise ValueError("object dtype")
    return dt


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
        # Fortran-ordered input keeps its order (one memcpy); anything else
        # non-contiguous is copied once into C order.
        order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        return self.descriptor(arr, arr.shape, arr.dtype, order)

    def default(self, obj):
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(EXT_ARRAY, msgpack.packb(self.array(obj)))
        if isinstance(obj, np.generic):
            return obj.item()
        raise UnsupportedType(f"cannot send an object of type {type(obj).__module__}.{type(obj).__qualname__}: "
                              "shmring sends bytes-like values, numpy arrays, and msgpack-able objects "
                              "(None, bool, int, float, str, bytes, list, tuple, dict) that may contain arrays")


def encode(value) -> Encoded:
    """Lay out an ndarray (T_ARRAY) or a msgpack-able object (T_OBJECT)."""
    p = _Packer()
    if isinstance(value, np.ndarray):
        meta = msgpack.packb(p.array(value))
        return Encoded(L.T_ARRAY, meta, p.blocks, p.area)
    try:
        meta = msgpack.packb(value, default=p.default, use_bin_type=True)
    except UnsupportedType:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise UnsupportedType(f"cannot encode {type(value).__name__} with msgpack: {e}") from None
    return Encoded(L.T_OBJECT, meta, p.blocks, p.area)


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

    Source arrays are copied in (one copy each, whatever their layout);
    blocks without a source come back as writable views to fill in place.
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
            if src is not None:
                np.copyto(dst, src, casting="no")
            views.append(dst)
        end = area + enc.area_len
    return end - payload_off, views


def _corrupt(msg, why) -> CorruptSegmentError:
    return CorruptSegmentError(f"message at ring position {msg.position}: {why}")


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

    def make(desc):
        seen[0] += 1
        if seen[0] > narrays:
            raise _corrupt(msg, f"more arrays than the {narrays} announced")
        try:
            spec, shape, order, off, nbytes = desc
            dt = _dtype_from_spec(spec)
            if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                    or not all(isinstance(s, int) and 0 <= s < 1 << 62 for s in shape)):
                raise ValueError(f"bad shape {shape!r}")
            shape = tuple(shape)
            if order not in ("C", "F") or not isinstance(off, int) or not isinstance(nbytes, int):
                raise ValueError(f"bad order/offset/size {order!r} {off!r} {nbytes!r}")
            count = prod(shape)
            if count * dt.itemsize != nbytes or off < 0 or off % L.ARRAY_ALIGN or area + off + nbytes > n:
                raise ValueError(f"{count} items of {dt.itemsize} bytes at area offset {off} do not match "
                                 f"{nbytes} bytes inside the {n - area}-byte array area")
        except CorruptSegmentError:
            raise
        except Exception as e:
            raise _corrupt(msg, f"bad array descriptor: {e}") from None
        if nbytes == 0:
            a = np.empty(shape, dt, order=order)
        else:
            a = np.frombuffer(msg, dtype=dt, count=count, offset=area + off).reshape(shape, order=order)
            if copy:
                a = a.copy(order="K")
        if not copy:
            a.flags.writeable = False
        return a

    def ext_hook(code, data):
        if code != EXT_ARRAY:
            return msgpack.ExtType(code, data)
        return make(msgpack.unpackb(data))

    try:
        if msg.type == L.T_ARRAY:
            if narrays != 1:
                raise _corrupt(msg, f"an array message announces {narrays} arrays")
            return make(msgpack.unpackb(meta))
        return msgpack.unpackb(meta, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except CorruptSegmentError:
        raise
    except Exception as e:
        raise _corrupt(msg, f"undecodable meta ({type(e).__name__}: {e})") from None


def _copy(msg):
    return _decode(msg, copy=True)
