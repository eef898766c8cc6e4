"""torch tensors and Arrow data in messages (optional: ``shmring[torch]``, ``shmring[arrow]``).

Neither library is imported by shmring itself: a value is recognised as a
tensor or an Arrow object only if its module is already loaded
(``sys.modules``), and a receiver imports the library when the first such
value arrives.

Both travel inside a ``T_OBJECT`` payload (the layout of :mod:`shmring.codec`)
as a msgpack ext whose block lies in the array area, 64-byte aligned:

=====================  ======================================================
ext 2 (tensor)         ``[torch dtype name, shape, block descriptor]``; the
                       block is the tensor's bytes, C order, as raw ``u1``
ext 3 (Arrow)          ``[what, block descriptor]``; ``what`` is ``"batch"``
                       (a ``RecordBatch``), ``"table"`` or ``"pandas"`` (a
                       ``DataFrame``, sent as ``Table.from_pandas``); the
                       block is an Arrow IPC stream (schema, batches, end)
=====================  ======================================================

Received, a tensor is ``torch.frombuffer`` over the message (zero copy) and an
Arrow object is read by ``pyarrow.ipc`` from a ``pyarrow.py_buffer`` over the
message (zero copy: its buffers are slices of the ring), then validated in
full; a ``DataFrame`` is ``to_pandas()`` of that table.  Everything decoded is
untrusted: a dtype outside :data:`TORCH_DTYPES`, a shape that does not match
the block, or Arrow data that fails to read or to validate is
:class:`~shmring.errors.CorruptSegmentError`.
"""
from __future__ import annotations

import struct
import sys
import warnings
from math import prod

import numpy as np

from .errors import UnsupportedType

EXT_TENSOR = 2
EXT_ARROW = 3
RAW = np.dtype("u1")

# torch dtypes a message may name: every fixed-size, non-quantized dtype
# (bfloat16, float8 and complex32 included: they travel as raw bytes, numpy
# need not know them).  Those the installed torch lacks are skipped.
TORCH_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
                "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
                "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
ARROW_KINDS = ("batch", "table", "pandas")


def _torch():
    try:
        import torch
    except ImportError:
        raise ModuleNotFoundError("this message holds a torch tensor: install torch (pip install "
                                  "'shmring[torch]') to receive it") from None
    return torch


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError("this message holds Arrow data: install pyarrow (pip install "
                                  "'shmring[arrow]') to receive it") from None
    return pyarrow


_dtypes: dict = {}


def torch_dtype(name: str):
    """The torch dtype a message names (validated), or ValueError."""
    dt = _dtypes.get(name)
    if dt is None:
        torch = _torch()
        if name not in TORCH_DTYPES or not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"unknown torch dtype {name!r}")
        dt = _dtypes[name] = getattr(torch, name)
    return dt


def dtype_name(dtype) -> str:
    name = str(dtype).rpartition(".")[2]
    if name not in TORCH_DTYPES:
        raise UnsupportedType(f"cannot send a torch tensor of dtype {dtype}: shmring sends the fixed-size "
                              f"dtypes {', '.join(TORCH_DTYPES)}")
    return name


# -- sending ---------------------------------------------------------------------

def is_tensor(obj) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def is_torch_dtype(obj) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.dtype)


class TensorSource:
    """A CPU tensor to copy into its block (one copy, gathering any strides)."""
    __slots__ = ("t",)

    def __init__(self, t):
        if t.layout is not sys.modules["torch"].strided or t.is_quantized:
            raise UnsupportedType(f"cannot send a {t.layout} tensor{' (quantized)' if t.is_quantized else ''}: "
                                  "shmring sends dense (strided) tensors; send t.to_dense() or t.dequantize()")
        if t.device.type != "cpu":
            raise UnsupportedType(f"cannot send a tensor on device {t.device}: shmring shares host memory; "
                                  "send t.cpu() (one copy off the device)")
        self.t = t.detach().resolve_conj().resolve_neg()

    def fill(self, dst: np.ndarray) -> None:
        torch = sys.modules["torch"]
        t = self.t
        if not dst.nbytes:
            return
        if t.is_contiguous():           # its bytes as numpy bytes: one memcpy (torch's copy_ is ~3x slower)
            np.copyto(dst, t.reshape(-1).view(torch.uint8).numpy())
        else:                           # gathered by torch in the same single copy
            torch.from_numpy(dst).view(t.dtype).view(t.shape).copy_(t)


class TensorPlace:
    """A tensor to build in place (``InPlace(shape, torch_dtype)``)."""
    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype

    def view(self, dst: np.ndarray):
        torch = sys.modules["torch"]
        if not dst.nbytes:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.from_numpy(dst).view(self.dtype).view(self.shape)


_fast_meta: dict = {}


def tensor_fast(t):
    """``(meta, bytes view)`` of a contiguous, non-empty CPU tensor sent alone: the
    C core's one-memcpy array path lays it out exactly as :mod:`shmring.codec`
    would (one block at area offset 0); None for anything else (codec.encode)."""
    raw = None
    if _numpy_twin(t.dtype) is not None and not t.requires_grad:
        try:
            raw = t.numpy()         # a dense CPU tensor without conj / neg bit: a view, in one call
        except (TypeError, RuntimeError):
            pass                    # (another device or layout: the checks below say which)
    if raw is None:
        if (t.device.type != "cpu" or t.layout is not sys.modules["torch"].strided or t.is_quantized
                or t.is_conj() or t.is_neg() or not t.is_contiguous() or not t.numel()):
            return None
        raw = t.detach().reshape(-1).view(sys.modules["torch"].uint8).numpy()
    elif not raw.flags.c_contiguous or not raw.size:      # (C order: the meta says C)
        return None
    key = (t.dtype, t.shape)
    meta = _fast_meta.get(key)
    if meta is None:
        import msgpack
        nbytes = t.numel() * t.element_size()
        meta = msgpack.packb(msgpack.ExtType(EXT_TENSOR, msgpack.packb(
            [dtype_name(t.dtype), list(t.shape), ["|u1", [nbytes], "C", 0, nbytes]])))
        if len(_fast_meta) >= 512:
            _fast_meta.clear()
        _fast_meta[key] = meta
    return meta, raw


def tensor_ext(packer, src, shape, dtype) -> list:
    """The ext payload of a tensor; its block is appended to ``packer``."""
    name = dtype_name(dtype)
    nbytes = prod(shape) * dtype.itemsize
    desc = packer.descriptor(src, (nbytes,), RAW, "C")
    return [name, list(shape), desc]


def is_arrow(obj) -> str | None:
    """``"batch"``, ``"table"`` or ``"pandas"`` for what ships as Arrow IPC, else None."""
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        if isinstance(obj, pa.RecordBatch):
            return "batch"
        if isinstance(obj, pa.Table):
            return "table"
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(obj, pd.DataFrame):
        return "pandas"
    return None


class ArrowSource:
    """An Arrow object written as an IPC stream straight into its block (one copy)."""
    __slots__ = ("obj", "nbytes")

    def __init__(self, obj, what: str):
        try:
            pa = _pyarrow()
        except ModuleNotFoundError:
            raise UnsupportedType("a pandas DataFrame travels as Arrow: install pyarrow "
                                  "(pip install 'shmring[arrow]') to send one") from None
        if what == "pandas":
            obj = pa.Table.from_pandas(obj)
        self.obj = obj
        mock = pa.MockOutputStream()
        self._write(mock)
        self.nbytes = mock.size()

    def _write(self, sink) -> None:
        pa = sys.modules["pyarrow"]
        with pa.ipc.new_stream(sink, self.obj.schema) as w:
            w.write(self.obj)

    def fill(self, dst: np.ndarray) -> None:
        pa = sys.modules["pyarrow"]
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(dst))
        self._write(sink)
        if sink.tell() != self.nbytes:       # the same writer wrote a different size: never published
            raise RuntimeError(f"Arrow IPC stream of {sink.tell()} bytes, {self.nbytes} measured")


def arrow_ext(packer, obj, what: str) -> list:
    src = ArrowSource(obj, what)
    return [what, packer.descriptor(src, (src.nbytes,), RAW, "C")]


# -- receiving -------------------------------------------------------------------

def parse_tensor(payload) -> tuple:
    """Validate a tensor ext payload: (torch dtype, shape, block descriptor), or ValueError."""
    name, shape, desc = payload
    if not isinstance(name, str):
        raise ValueError(f"bad torch dtype name {name!r}")
    dt = torch_dtype(name)
    if (not isinstance(shape, list) or len(shape) > 64
            or not all(isinstance(s, int) and 0 <= s < 1 << 62 for s in shape)):
        raise ValueError(f"bad tensor shape {shape!r}")
    if not isinstance(desc, list) or len(desc) != 5 or desc[0] != "|u1" or desc[4] != prod(shape) * dt.itemsize:
        raise ValueError(f"a block descriptor {desc!r} does not hold a {name} tensor of shape {shape}")
    return dt, tuple(shape), desc


_warned = False


def make_tensor(msg, dt, shape, start: int, nbytes: int, copy: bool):
    torch = _torch()
    if nbytes == 0:
        return torch.empty(shape, dtype=dt)
    # Not torch.frombuffer: it releases the buffer export at once (keeping only
    # a reference to the message), so releasing the message would give its
    # space back under the tensor.  A numpy array holds the export until it is
    # collected, and the tensor holds the array: the message stays leased.
    npdt = _numpy_twin(dt)
    if npdt is not None:        # the array in its own dtype and shape: no torch views to build (cheaper)
        a = np.frombuffer(msg, dtype=npdt, count=nbytes // npdt.itemsize, offset=start).reshape(shape)
    else:
        a = np.frombuffer(msg, dtype=RAW, count=nbytes, offset=start)
    global _warned
    if _warned:
        t = torch.from_numpy(a)
    else:
        # "The given NumPy array is not writable": the consumer's export is
        # read-only, torch has no read-only tensors (see README, "torch
        # tensors").  torch says it once per process: silenced here, once.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
        _warned = True
    if npdt is None:
        t = t.view(dt).view(shape)
    return t.clone() if copy else t


_twins: dict = {}
_TWIN_NAMES = ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
               "float16", "float32", "float64", "complex64", "complex128")


def _numpy_twin(dt):
    """The numpy dtype (native byte order) that ``torch.from_numpy`` maps to
    ``dt``, or None (bfloat16, float8, complex32: raw bytes and views)."""
    try:
        return _twins[dt]
    except KeyError:
        pass
    name = str(dt).rpartition(".")[2]
    twin = np.dtype(name) if name in _TWIN_NAMES else None
    if twin is not None and sys.modules["torch"].from_numpy(np.zeros(1, twin)).dtype != dt:
        twin = None
    _twins[dt] = twin
    return twin


def parse_arrow(payload) -> tuple:
    what, desc = payload
    if what not in ARROW_KINDS:
        raise ValueError(f"unknown Arrow value kind {what!r}")
    if not isinstance(desc, list) or len(desc) != 5 or desc[0] != "|u1":
        raise ValueError(f"bad Arrow block descriptor {desc!r}")
    return what, desc


# Compressed IPC (R86): pyarrow allocates each compressed buffer's declared
# uncompressed length before it decompresses, so a stream may declare at most
# ARROW_INFLATE_FACTOR x its own size + ARROW_INFLATE_SLACK bytes in all
# (codec's decode limits, DECODE_FACTOR and DECODE_SLACK, for msgpack).
ARROW_INFLATE_FACTOR = 16
ARROW_INFLATE_SLACK = 4 << 20
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_HEADER_DICTIONARY_BATCH, _HEADER_RECORD_BATCH = 2, 3


def _fb_table(b: bytes, pos: int):
    """The field positions of the flatbuffer table at ``pos`` of ``b``: a
    function of the field index, None for an absent field; bounds-checked."""
    if not 0 <= pos <= len(b) - 4:
        raise ValueError(f"a flatbuffer table at {pos} lies outside its {len(b)} bytes")
    vt = pos - struct.unpack_from("<i", b, pos)[0]
    if not 0 <= vt <= len(b) - 4:
        raise ValueError(f"a flatbuffer vtable at {vt} lies outside its {len(b)} bytes")
    vsize = _U16.unpack_from(b, vt)[0]
    if vsize < 4 or vt + vsize > len(b):
        raise ValueError(f"a flatbuffer vtable of {vsize} bytes at {vt} lies outside its {len(b)} bytes")

    def field(i: int):
        o = 4 + 2 * i
        if o + 2 > vsize:
            return None
        off = _U16.unpack_from(b, vt + o)[0]
        return pos + off if off else None
    return field


def _fb_ref(b: bytes, at: int) -> int:
    return at + _U32.unpack_from(b, at)[0]


def _batch_buffers(meta: bytes):
    """``(compressed, [(offset, length)...])`` of an IPC message's flatbuffer
    metadata if it is a record or dictionary batch, else None."""
    msg = _fb_table(meta, _fb_ref(meta, 0))
    at = msg(1)
    kind = meta[at] if at is not None and at < len(meta) else 0
    if kind not in (_HEADER_RECORD_BATCH, _HEADER_DICTIONARY_BATCH) or msg(2) is None:
        return None
    batch = _fb_table(meta, _fb_ref(meta, msg(2)))
    if kind == _HEADER_DICTIONARY_BATCH:
        if batch(1) is None:
            return None
        batch = _fb_table(meta, _fb_ref(meta, batch(1)))
    compressed = batch(3) is not None
    bufs = []
    if batch(2) is not None:
        vp = _fb_ref(meta, batch(2))
        n = _U32.unpack_from(meta, vp)[0]
        if vp + 4 + 16 * n > len(meta):
            raise ValueError(f"a batch's {n} buffers lie outside its {len(meta)}-byte metadata")
        bufs = [struct.unpack_from("<qq", meta, vp + 4 + 16 * i) for i in range(n)]
    return compressed, bufs


def check_arrow_inflation(buf) -> bool:
    """Whether the IPC stream in ``buf`` (a ``pyarrow.Buffer``) has compressed
    batches; ValueError if they declare more uncompressed bytes in all than
    the bound (R86), before pyarrow allocates any of them."""
    pa = sys.modules["pyarrow"]
    reader = pa.ipc.MessageReader.open_stream(buf)
    limit = ARROW_INFLATE_FACTOR * buf.size + ARROW_INFLATE_SLACK
    declared, any_compressed = 0, False
    while True:
        try:
            m = reader.read_next_message()
        except StopIteration:
            break
        parsed = _batch_buffers(m.metadata.to_pybytes())
        if parsed is None or not parsed[0]:
            continue
        any_compressed = True
        body = m.body
        size = body.size if body is not None else 0
        with memoryview(body if body is not None else b"") as mv:
            for off, length in parsed[1]:
                if length == 0:
                    continue
                if off < 0 or length < 8 or off > size - length:
                    raise ValueError(f"a compressed buffer (offset {off}, length {length}) lies outside its "
                                     f"{size}-byte message body")
                n = _I64.unpack_from(mv, off)[0]
                if n == -1:                         # stored uncompressed: a slice, nothing allocated
                    continue
                if n < 0:
                    raise ValueError(f"a compressed buffer declares {n} uncompressed bytes")
                declared += n
                if declared > limit:
                    raise ValueError(
                        f"its compressed buffers declare {declared:,} uncompressed bytes or more (one {n:,}), "
                        f"more than the bound for a {buf.size:,}-byte stream ({limit:,} bytes: "
                        f"{ARROW_INFLATE_FACTOR} x its size + {ARROW_INFLATE_SLACK:,}); send it uncompressed")
    return any_compressed


def make_arrow(msg, what: str, start: int, nbytes: int, copy: bool):
    """Read and validate the IPC stream at ``start`` of ``msg``; any failure raises
    (the caller makes it CorruptSegmentError)."""
    pa = _pyarrow()
    if copy:
        buf = pa.py_buffer(bytes(memoryview(msg)[start:start + nbytes]))
    else:
        # the Arrow buffers hold this memoryview, which holds the message's
        # export: the message stays leased while any of them lives
        buf = pa.py_buffer(memoryview(msg)[start:start + nbytes])
    if check_arrow_inflation(buf) and not copy:
        # compressed: read from a private copy, checked again, so the shared
        # bytes cannot change between the check and the read (R86); the
        # decompressed buffers are pyarrow's own memory anyway
        buf = pa.py_buffer(bytes(memoryview(msg)[start:start + nbytes]))
        check_arrow_inflation(buf)
    reader = pa.ipc.open_stream(buf)
    if what == "batch":
        value = reader.read_next_batch()
        try:
            reader.read_next_batch()
        except StopIteration:
            pass
        else:
            raise ValueError("a record batch message holds more than one batch")
    else:
        value = reader.read_all()
    value.validate(full=True)
    if what == "pandas":
        return value.to_pandas()
    return value


# -- for shmring.Queue's pickler (pickle protocol 5, out-of-band buffers) ----------
# This module never pickles (tests/faults/test_security.py); the Queue's
# reducer wraps the parts:  raw, name, shape = tensor_parts(t);
# return rebuild_tensor, (pickle.PickleBuffer(raw), name, shape)

def tensor_parts(t) -> tuple:
    """A CPU tensor as ``(raw bytes as a u1 ndarray, dtype name, shape)``: the
    bytes to hand out of band, its dtype by name (bfloat16 too).  Refused like
    ``send``: sparse, quantized, non-CPU tensors raise UnsupportedType."""
    torch = sys.modules["torch"]
    t = TensorSource(t).t.contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, RAW)
    return raw, dtype_name(t.dtype), tuple(t.shape)


def rebuild_tensor(buf, name: str, shape, requires_grad: bool = False, parameter: bool = False):
    """The inverse of :func:`tensor_parts`: a tensor over ``buf`` (zero copy:
    it holds ``buf``'s buffer export, as a received tensor holds its message,
    R81), writable or not as torch has it (R82); with ``requires_grad``, a
    leaf that requires grad; with ``parameter``, a ``torch.nn.Parameter``
    (R85: what ``shmring.Queue`` unpickles a tensor with)."""
    torch = _torch()
    dt = torch_dtype(name)
    shape = tuple(int(s) for s in shape)
    a = np.frombuffer(buf, dtype=RAW)
    if a.nbytes != prod(shape) * dt.itemsize:
        raise ValueError(f"{a.nbytes} bytes do not hold a {name} tensor of shape {shape}")
    if not a.nbytes:
        t = torch.empty(shape, dtype=dt)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
        t = t.view(dt).view(shape)
    if parameter:
        return torch.nn.Parameter(t, requires_grad=bool(requires_grad))
    return t.requires_grad_() if requires_grad else t
