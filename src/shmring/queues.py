"""``shmring.Queue``, ``SimpleQueue`` and ``JoinableQueue``: the
``multiprocessing`` queues, over an mpmc ring.

Migration is one line::

    from shmring import Queue          # instead of: from multiprocessing import Queue

A queue is an anonymous mpmc ring (:meth:`shmring.Ring.anonymous`): no name
anywhere, freed by the kernel when the last process holding it exits.  It is
passed to other processes the way a ``multiprocessing`` queue is (inherited by
``fork``, pickled into ``Process`` / ``Pool(initializer=...)`` arguments under
``spawn`` and ``forkserver``, with ``multiprocessing`` or ``multiprocess``),
and, unlike one, may also be pickled at any other time (into another queue, a
``Pool.map`` argument): the receiver then opens the sender's descriptor
through ``/proc``, so the sender must still be alive (see
:func:`shmring.segment.fd_reference`).  A process joins the ring as a
producer on its first ``put`` and as a consumer on its first ``get``
(lazily, R73), each at most once, and leaves when the queue is closed or
garbage-collected, or when it exits.

**Items** are any picklable object, pickled with protocol 5.  Out-of-band
buffers (numpy arrays, ``bytearray``, a top-level ``bytes`` of 4 KiB or more,
anything that gives ``pickle.PickleBuffer``) are not copied into the pickle
stream: ``put`` reserves the whole message in the ring and writes the pickle
stream and each buffer into it (one copy per buffer, R74).  ``get`` copies
each buffer out once into memory of its own (a ``bytearray``, or ``bytes``
for a read-only buffer) and releases the message before it returns, so the
object it returns owns its memory and is writable as with
``multiprocessing``; the ring space is free for the next ``put`` at once.  (A
lease, where the object keeps the message held until it dies, saves that copy
but lets a consumer that keeps results block every producer: opt-in only,
``get(lease=True)``; see ``docs/design.md``, R74 and R87.)  Once torch is
loaded, a dense CPU tensor pickles as its bytes out of band, like a numpy
array, and comes back as a tensor owning its memory (R85).  A numpy array
put on its own (``put(arr)``, an exact ``np.ndarray`` of a fixed-size dtype)
is not pickled at all: it travels as the ring's own array message (one
``memcpy`` in C, its dtype, shape and order in the message's descriptor) and
``get`` returns a writable copy of it (R95).

**Trust**: unpickling runs code chosen by whoever pickled.  That is the
``multiprocessing`` trust model: the queue's memory is reachable only by
processes of the same user that were handed it (an anonymous segment, mode
0600).  The rings' own ``send`` / ``recv`` never unpickle (msgpack only).

Sizes: ``maxsize`` bounds the items in the queue (0: no bound), ``capacity``
the bytes (a power of two, the ring's data area; default 16 MiB).  One item
(pickle stream plus buffers plus a small header) must fit in
``capacity - 16`` bytes (the ring's ``max_message``), else ``put`` raises
:class:`~shmring.MessageTooLarge` (a ``ValueError``): pass a larger
``capacity``.  A full ring in bytes blocks ``put`` like ``maxsize`` does
(``queue.Full`` once the timeout passes).
"""
from __future__ import annotations

import copyreg
import io
import os
import pickle
import queue as _pyqueue
import struct
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.reduction import ForkingPickler

import numpy as np

from . import _core, _interop, codec
from . import layout as L
from .errors import (CorruptSegmentError, EndOfStream, IncompatibleSegment, MessageTooLarge, PeerGone, Timeout,
                     UnsupportedType)
from .ring import Producer, Ring
from .waiting import DEFAULT_SPIN, WAIT_SLICE

Empty = _pyqueue.Empty
Full = _pyqueue.Full

DEFAULT_CAPACITY = 1 << 24
MAX_PARTIES = 256                  # producer and consumer table entries of a queue's ring
OOB_MIN = 4096                     # buffers smaller than this travel inside the pickle stream
_NEVER_ENDS = (1 << 31) - 1        # expected producers: a queue's stream never ends (R73)

# The out-of-band message layout (R74).  A plain message is the pickle stream
# itself, which always starts with PROTO (0x80); an out-of-band one starts
# with the magic, whose first byte is not 0x80:
#
#     0   magic "SHQB" | buffers u32 | pickle length u64
#     16  per buffer: offset u64 | length u64 (bit 63: read-only)
#     H   pickle stream (H = 16 + 16 * buffers)
#     ... each buffer at its offset, 64-aligned from the payload start
OOB_MAGIC = b"SHQB"
_OOB_HDR = struct.Struct("<4sIQ")
_OOB_BUF = struct.Struct("<QQ")
_RO = 1 << 63
_M64 = (1 << 64) - 1
_MAX_WORD = 1 << 62               # a count above this in a queue word is corruption


_forks = 0


_queues = weakref.WeakSet()         # this process's queue objects, for the fork hook


def _after_fork_in_child():
    global _forks
    _forks += 1
    for q in list(_queues):            # the parent's handles are the parent's: the fast paths go
        q._local = threading.local()
        q._fast_off()


os.register_at_fork(after_in_child=_after_fork_in_child)


_TORCH = "torch"
_modules = sys.modules


def _reduce_tensor(t, _module=_modules):
    """A dense CPU tensor as its bytes, out of band (R85): rebuilt by
    :func:`shmring._interop.rebuild_tensor` over the buffer ``get`` copied
    out (a tensor owning its memory, C-contiguous, same dtype, shape and
    ``requires_grad``; a ``Parameter`` stays one).  Anything else (CUDA,
    sparse, quantized, meta, named, another Tensor subclass, a tensor with
    attributes of its own, an exotic dtype): torch's own pickling."""
    torch = _module["torch"]
    if (t.device.type == "cpu" and t.layout is torch.strided and not t.is_quantized
            and not any(getattr(t, "names", None) or ()) and not getattr(t, "__dict__", None)):
        try:
            raw, name, shape = _interop.tensor_parts(t)
        except UnsupportedType:
            pass
        else:
            return _interop.rebuild_tensor, (pickle.PickleBuffer(raw), name, shape, t.requires_grad,
                                             type(t) is not torch.Tensor)
    return t.__reduce_ex__(5)


class _TensorTable(dict):
    """The dispatch table of a queue's pickler once torch is loaded: the two
    exact tensor types (``Tensor``, ``Parameter``) to :func:`_reduce_tensor`,
    every other type to ``copyreg``'s table (looked up when asked, so later
    ``copyreg.pickle`` registrations count).  Other Tensor subclasses keep
    torch's own pickling (they may carry state of their own)."""

    def __missing__(self, cls):
        return copyreg.dispatch_table[cls]


_tensor_table = _TensorTable()


def _tensor_types():
    if not _tensor_table:
        torch = _modules["torch"]
        _tensor_table[torch.Tensor] = _tensor_table[torch.nn.Parameter] = _reduce_tensor
    return _tensor_table


class _TPickler(pickle.Pickler):
    """Plain pickling, but torch tensors by :func:`_reduce_tensor`."""

    def __init__(self, f, protocol, buffer_callback):
        super().__init__(f, protocol, buffer_callback=buffer_callback)
        self.dispatch_table = _tensor_types()


class _FPickler(ForkingPickler):
    """multiprocessing's pickler (its extra reducers: connections, sockets, ...)
    with a buffer callback; used only when plain pickling refuses.  Tensors
    still go by :func:`_reduce_tensor` (not torch.multiprocessing's reducers,
    which share the tensor's storage through its own shared memory)."""

    def __init__(self, f, protocol, buffer_callback):
        pickle.Pickler.__init__(self, f, protocol, buffer_callback=buffer_callback)
        self.dispatch_table = self._copyreg_dispatch_table.copy()
        self.dispatch_table.update(self._extra_reducers)
        if _modules.get(_TORCH) is not None:
            self.dispatch_table.update(_tensor_types())


_tls = threading.local()
_REUSE_BELOW = 1 << 20              # a thread keeps its tensor pickler while its streams stay this small


def _tdumps(obj):
    """(pickle stream, out-of-band PickleBuffers) of ``obj`` by a
    :class:`_TPickler`, reused by its thread (making one costs about as much
    as pickling a small object)."""
    st = getattr(_tls, "tp", None)
    if st is None or st[3]:                        # none yet, or in use (a reducer that puts)
        f, bufs = io.BytesIO(), []

        def callback(pb, _append=bufs.append):
            # True: in-band (small); None: out-of-band (pickle's convention)
            return memoryview(pb).nbytes < OOB_MIN or _append(pb)
        st = [_TPickler(f, 5, callback), f, bufs, False]
        if getattr(_tls, "tp", None) is None:
            _tls.tp = st
    p, f, bufs, _ = st
    st[3] = True
    try:
        p.dump(obj)
        out = f.getvalue(), bufs[:]
        if f.tell() >= _REUSE_BELOW:
            _tls.tp = None
        return out
    finally:
        st[3] = False
        f.seek(0)
        f.truncate()
        p.clear_memo()
        bufs.clear()


def _dumps(obj):
    """(pickle stream, out-of-band PickleBuffers) of ``obj``."""
    bufs = []

    def callback(pb, _append=bufs.append):
        # True: in-band (small); None: out-of-band (pickle's convention)
        return memoryview(pb).nbytes < OOB_MIN or _append(pb)
    if type(obj) in (bytes, bytearray) and len(obj) >= OOB_MIN:
        obj = pickle.PickleBuffer(obj)        # comes back as the buffer object itself: bytes / bytearray
    torch = _modules.get(_TORCH) is not None
    try:
        if torch:
            return _tdumps(obj)
        return pickle.dumps(obj, 5, buffer_callback=callback), bufs
    except Exception:
        bufs.clear()
        f = io.BytesIO()
        try:
            _FPickler(f, 5, callback).dump(obj)
        except Exception:
            pass                               # raise the plain pickle error, not the fallback's
        else:
            return f.getvalue(), bufs
        bufs.clear()
        if torch:
            return _tdumps(obj)
        return pickle.dumps(obj, 5, buffer_callback=callback), bufs


def _oob_layout(stream, bufs):
    raws = [b.raw() for b in bufs]
    hdr = _OOB_HDR.size + _OOB_BUF.size * len(raws)
    pos = hdr + len(stream)
    offs = []
    for r in raws:
        pos = (pos + 63) & ~63
        offs.append(pos)
        pos += r.nbytes
    return raws, hdr, offs, pos


def _write_oob(mv, stream, raws, hdr, offs):
    _OOB_HDR.pack_into(mv, 0, OOB_MAGIC, len(raws), len(stream))
    for i, (o, r) in enumerate(zip(offs, raws)):
        _OOB_BUF.pack_into(mv, _OOB_HDR.size + _OOB_BUF.size * i, o, r.nbytes | (_RO if r.readonly else 0))
    mv[hdr:hdr + len(stream)] = stream
    for o, r in zip(offs, raws):
        mv[o:o + r.nbytes] = r


def _not_pickle(data, label):
    raise CorruptSegmentError(f"a bytes message of the queue on {label} is not a pickle stream "
                              f"(starts with {bytes(data[:4])!r}, {len(data)} bytes)")


def _unpickle(data, label):
    """The object of a bytes message taken from a queue: a pickle stream (it
    starts with PROTO), else CorruptSegmentError."""
    return pickle.loads(data) if data[:1] == b"\x80" else _not_pickle(data, label)


_native_dtypes: dict = {}


def _native(obj) -> bool:
    """R95: ``obj`` is put as the ring's own array message instead of a
    pickle: an exact ``np.ndarray`` whose dtype the message's descriptor
    carries exactly (fixed-size, and read back as the same dtype: not an
    extension dtype that would come back as raw bytes), and that cannot be
    taken for an out-of-band item (a 1-D ``uint8`` array starting with the
    R74 magic is pickled instead)."""
    if type(obj) is not np.ndarray:
        return False
    dt = obj.dtype
    ok = _native_dtypes.get(dt)
    if ok is None:
        try:
            back = codec._dtype_from_spec(codec._dtype_spec(dt))
            ok = type(back) is type(dt) and back == dt and dt.metadata is None
        except Exception:                  # noqa: BLE001 -- not describable: pickled instead
            ok = False
        if len(_native_dtypes) < 256:
            _native_dtypes[dt] = ok
    if ok and obj.ndim == 1 and dt == np.uint8 and obj.size >= _OOB_HDR.size:
        return bytes(obj[:4]) != OOB_MAGIC
    return ok


def _encode(obj):
    """(item, buffers) of ``obj``: ``(obj, None)`` for an array sent as
    itself (R95), else the pickle stream and its out-of-band buffers."""
    return (obj, None) if _native(obj) else _dumps(obj)


def _decode(mv, label, lease=False):
    """The object in a message payload ``mv`` (a view of the ring): read
    into memory of its own, so the message may be released after; with
    ``lease``, its out-of-band buffers are read-only views of ``mv`` (R87)."""
    n = mv.nbytes
    if n < _OOB_HDR.size or bytes(mv[:4]) != OOB_MAGIC:
        raise CorruptSegmentError(f"an array message of the queue on {label} is not an out-of-band item "
                                  f"(starts with {bytes(mv[:4])!r}, {n} bytes)")
    _, nbuf, plen = _OOB_HDR.unpack_from(mv, 0)
    hdr = _OOB_HDR.size + _OOB_BUF.size * nbuf
    if hdr > n or plen > n - hdr:
        raise CorruptSegmentError(f"an out-of-band message of the queue on {label} claims {nbuf} buffers and a "
                                  f"{plen}-byte pickle in {n} bytes")
    buffers = []
    for i in range(nbuf):
        off, length = _OOB_BUF.unpack_from(mv, _OOB_HDR.size + _OOB_BUF.size * i)
        ro, length = length & _RO, length & ~_RO
        if off < hdr + plen or off > n or length > n - off:
            raise CorruptSegmentError(f"buffer {i} of an out-of-band message of the queue on {label} lies "
                                      f"outside its {n} bytes (offset {off}, length {length})")
        part = mv[off:off + length]
        buffers.append(part if lease else bytes(part) if ro else bytearray(part))  # the one copy of a get
    return pickle.loads(mv[hdr:hdr + plen], buffers=buffers)


def _deadline(block, timeout):
    """None (forever) or a monotonic deadline; non-blocking calls: now."""
    if not block:
        return time.monotonic()
    if timeout is None:
        return None
    timeout = float(timeout)
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds or None, got nan")
    return time.monotonic() + max(timeout, 0.0)


def _left(deadline):
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class _Held:
    """Holds one thread's producer or consumer handle of a queue: gives it
    back quietly when the thread ends (its thread-local dies), when the queue
    is closed or garbage-collected; never in a forked child (the parent's)."""

    __slots__ = ("h", "gen", "__weakref__")

    def __init__(self, h):
        self.h, self.gen = h, _forks

    def close(self, _finalizing=sys.is_finalizing):
        h, self.h = self.h, None
        if h is None or _finalizing() or self.gen != _forks:   # at exit: recovered as a dead process's
            return
        try:
            if isinstance(h, Producer):
                h.detach()                     # leave the table; a queue's stream never ends (R73)
            else:
                h.close()
        except Exception:
            pass

    __del__ = close


def _close_all(holders):
    for held in list(holders):
        held.close()


class _Base(_core.QueueCore):
    """What the three queues share: the ring, the shared words, lazy joining.
    ``put`` and ``get`` are the C base's (qfast.c): the common case there,
    everything else through ``_put`` / ``_get`` / ``_take`` below."""

    _joinable = False

    def __init__(self, maxsize=0, *, capacity: int = DEFAULT_CAPACITY, ctx=None, spin: float = DEFAULT_SPIN):
        # ctx: accepted (and ignored) for multiprocessing.queues.Queue(maxsize, *, ctx) compatibility
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int (0: no bound), got {type(maxsize).__name__}")
        maxsize = max(int(maxsize), 0)          # as multiprocessing: <= 0 means no bound
        if maxsize >= _MAX_WORD:
            raise ValueError(f"maxsize must be below 2**62, got {maxsize}")
        ring = Ring.anonymous(capacity, kind="mpmc", max_producers=MAX_PARTIES, max_consumers=MAX_PARTIES,
                              producers=_NEVER_ENDS)
        r = ring._region
        r.store_u64(L.Q_OFF_MAXSIZE, maxsize)
        r.store_u64(L.Q_OFF_FLAGS, L.Q_FLAG_JOINABLE if self._joinable else 0)
        r.store_u64(L.Q_OFF_TAG, L.Q_TAG)      # last; the ring reaches others only after this returns
        self._setup(ring, float(spin))

    def _setup(self, ring, spin):
        r = ring._region
        if r.load_u64(L.Q_OFF_TAG) != L.Q_TAG or ring.kind != "mpmc":
            raise IncompatibleSegment(f"{ring._seg.label} is not the ring of a shmring queue")
        maxsize = r.load_u64(L.Q_OFF_MAXSIZE)
        if maxsize >= _MAX_WORD:
            raise CorruptSegmentError(f"the queue on {ring._seg.label} has maxsize {maxsize}")
        if bool(r.load_u64(L.Q_OFF_FLAGS) & L.Q_FLAG_JOINABLE) != self._joinable:
            raise IncompatibleSegment(f"the queue on {ring._seg.label} is {'not ' * self._joinable}a "
                                      f"JoinableQueue, but was unpickled as a {type(self).__name__}")
        self._ring, self._r, self._maxsize, self._spin = ring, r, int(maxsize), spin
        self._label = ring._seg.label
        self._closed = False
        self._fresh()
        _queues.add(self)

    def _fresh(self):
        """This process's part: no handles yet (after a fork: the parent's
        handles are the parent's).  Each thread takes its own handles (R73):
        a handle is used by one thread at a time, and threads of one process
        then put and get concurrently, with no lock between them."""
        if getattr(self, "_gen", _forks) != _forks:       # a forked child: the parent's Region refuses waits
            self._r = _core.Region(self._ring._seg.buf)
        self._gen = _forks
        self._local = threading.local()
        self._fast_off()
        self._holders = weakref.WeakSet()
        weakref.finalize(self, _close_all, self._holders).atexit = False   # at exit: recovered as dead

    # -- pickling: by the ring's descriptor (fd_reference) ---------------------
    def __reduce__(self):
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        return (_rebuild, (type(self), self._ring, self._spin))

    # -- this thread's handles (R73) -------------------------------------------
    def _producer(self):
        if self._gen != _forks:
            self._fresh()
        local = self._local
        p = getattr(local, "prod", None)
        if p is None:
            self._check_open()
            p = self._ring.producer(spin=self._spin)
            local.prod, local.held_prod = p, _Held(p)
            self._holders.add(local.held_prod)
            if not self._maxsize:
                # no bound in items: the producer counts each item in as it publishes it (R70,
                # R72); put's fast path (qfast.c) is this thread's, if none is yet
                p._count_into(L.Q_OFF_ITEMS, L.Q_OFF_UNFINISHED if self._joinable else 0)
                self._fast_put(p, self._r, L.Q_OFF_ITEMS)
        return p

    def _consumer(self):
        if self._gen != _forks:
            self._fresh()
        local = self._local
        c = getattr(local, "cons", None)
        if c is None:
            self._check_open()
            c = self._ring.consumer(spin=self._spin)
            local.cons, local.held_cons, local.pending = c, _Held(c), None
            self._holders.add(local.held_cons)
            if not self._maxsize:       # get's fast path (qfast.c): this thread's, if none is yet
                self._fast_get(c, self._r, L.Q_OFF_ITEMS)
        return c

    def _check_open(self):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if self._gen != _forks:
            self._fresh()

    # -- the item count (R70, R71) ---------------------------------------------
    def _add(self, off, n):
        # R70: a seq_cst RMW, then (R71) the sleepers of its wake word
        return self._r.fetch_add_u64(off, n & _M64)

    def _count_in(self, n, deadline):
        """Count ``n`` items in before they are sent; with maxsize, wait until
        they fit (R71), else queue.Full."""
        r, maxsize = self._r, self._maxsize
        if self._joinable:
            self._add(L.Q_OFF_UNFINISHED, n)
        if not maxsize:
            self._add(L.Q_OFF_ITEMS, n)
            return
        if n > maxsize:
            if self._joinable:
                self._count_out_unfinished(n)
            raise ValueError(f"{n} items can never fit in a queue of maxsize {maxsize}")
        while True:
            have = r.load_u64(L.Q_OFF_ITEMS)
            if have + n <= maxsize:
                if r.cas_u64(L.Q_OFF_ITEMS, have, have + n):     # R71: one CAS decides who got the room
                    return
                continue
            if have >= _MAX_WORD:
                raise CorruptSegmentError(f"the queue on {self._label} counts {have} items")
            left = _left(deadline)
            if left is not None and left <= 0:
                if self._joinable:
                    self._count_out_unfinished(n)
                raise Full
            # R71: sleeps until the count changes (a get's decrement wakes it)
            r.wait_change(L.Q_OFF_ITEMS, have, L.Q_OFF_NOTFULL_WAKE, -1,
                          WAIT_SLICE if left is None else min(left, WAIT_SLICE), self._spin)

    def _count_out(self, n):
        """``n`` items left the queue (taken by a get, or a put that failed)."""
        self._add(L.Q_OFF_ITEMS, -n)
        if self._maxsize and self._r.load_u32(L.Q_OFF_NOTFULL_WAKE + L.WAKE_WAITERS):   # R71, after the RMW
            self._r.wake(L.Q_OFF_NOTFULL_WAKE)

    def _count_out_unfinished(self, n):
        if self._add(L.Q_OFF_UNFINISHED, -n) == n:
            self._r.wake(L.Q_OFF_JOIN_WAKE)

    def _undo(self, n):
        if n:
            self._count_out(n)
            if self._joinable:
                self._count_out_unfinished(n)

    # -- put ------------------------------------------------------------------
    def _put(self, obj, block, timeout):
        self._check_open()
        stream, bufs = _encode(obj)               # a pickling error raises here: nothing counted
        deadline = _deadline(block, timeout)
        prod = self._producer()
        if not self._maxsize:
            self._send(prod, stream, bufs, deadline)      # the producer counts it in as it publishes it
            return
        self._count_in(1, deadline)
        sent = prod._commits
        try:
            self._send(prod, stream, bufs, deadline)
        except BaseException:
            if prod._commits == sent:      # not sent: out again (an interrupt after the commit: it stays)
                self._undo(1)
            raise

    def _fast_off(self):
        """No fast path (qfast.c) until a thread of this process joins again."""
        self._fast_put(None, None, 0)
        self._fast_get(None, None, 0)

    def _send_rest(self, prod, stream, block, timeout):
        """put's fast path found no room, a dead consumer or too large an item:
        wait, or say why (nothing was counted: the producer counts as it
        publishes, R70)."""
        self._send(prod, stream, (), _deadline(block, timeout))

    def _bad_stream(self, data):
        _not_pickle(data, self._label)

    def _send(self, prod, stream, bufs, deadline):
        """Send one item (a pickle stream and its out-of-band buffers; with
        ``bufs`` None an array sent as itself, R95); queue.Full when the ring
        stays full (in bytes) past the deadline."""
        while True:
            try:
                if not bufs:
                    if deadline is None:
                        prod.send(stream)
                        return
                    if prod.try_send(stream):
                        return
                    left = _left(deadline)
                    if left <= 0:
                        raise Full
                    prod.send(stream, timeout=left)
                    return
                raws, hdr, offs, total = _oob_layout(stream, bufs)
                # an array message (T_ARRAY) of bytes: its type tells get it from a plain
                # pickle stream (a bytes message, R74)
                with prod.reserve_array((total,), np.uint8, timeout=_left(deadline)) as arr:
                    _write_oob(memoryview(arr), stream, raws, hdr, offs)
                return
            except Timeout:
                raise Full from None
            except MessageTooLarge as e:
                size = stream.nbytes if bufs is None else len(stream) + sum(memoryview(b).nbytes for b in bufs)
                raise MessageTooLarge(f"an item of {size} "
                                      f"bytes does not fit in the queue's ring ({self._ring.capacity} bytes: "
                                      f"items up to about {self._ring.max_message - 16 * len(bufs or ()) - 160}); "
                                      f"make the queue with a larger capacity=") from e
            except PeerGone:
                # every consumer that held the ring full died: wait on for a new one
                if deadline is not None and time.monotonic() >= deadline:
                    raise Full from None

    # -- get ------------------------------------------------------------------
    def _take(self, msg, lease=False):
        """The item in a message taken with ``recv`` / ``try_recv``, released
        before it returns: a bytes message is a pickle stream (copied out
        and released in one C step), an array message an out-of-band item
        (R74).  (Not ``recv_bytes``: on an array message of an mpmc ring it
        gives the message back for redelivery, which may reorder it.)

        It counts the item out (R70) once the message is consumed, and only
        then: an interrupt that lands before (the message dropped unread) has
        it handed out again (R39), to be counted out by the get that takes it."""
        if msg.type == L.T_BYTES:
            data = msg._take_copy()                  # copied out and released in one step
            self._count_out(1)
            return _unpickle(data, self._label)
        try:
            if msg.kind != "array":
                raise CorruptSegmentError(f"a {msg.kind} message in the queue on {self._label}")
            value = None
            value = msg.value                       # a read-only view of the message (checked by the codec)
            # R95: an array sent as itself, unless an out-of-band item (R74; inline: no other
            # frame may hold the view when an interrupt lands, see the except clause)
            if not (value.ndim == 1 and value.dtype == np.uint8 and value.size >= _OOB_HDR.size
                    and bytes(value[:4]) == OOB_MAGIC):
                if lease:
                    return value                    # R87: the view holds the message until it dies
                out = np.array(value)               # the one copy of a get: writable, its own memory
                value = None                        # no view left: the release below is complete
                return out
            if lease:
                # R87: not released here; the views in the object hold the message (its
                # exports), and dropping the last one releases it (R39: it was handed over)
                return _decode(memoryview(value), self._label, True)
            with memoryview(value) as mv:
                value = None
                return _decode(mv, self._label)
        except BaseException as e:
            # this frame's view first (no call before it: no interrupt can land in between),
            # then the traceback's frames' (their locals; the lines stay), so the release
            # below is complete
            lease = value = None
            traceback.clear_frames(e.__traceback__)
            raise
        finally:
            if not lease:
                msg.release()
            self._count_out(1)      # consumed (or leased): out, even if it failed to decode (as multiprocessing)

    def _raise_pending(self):
        """Raise the error of an item that failed to unpickle in this thread's
        last ``get_many`` after it had taken others (they were returned)."""
        local = self._local
        err = getattr(local, "pending", None)
        if err is not None:
            local.pending = None
            if not self._maxsize:       # get's fast path again (get_many turned it off)
                self._fast_get(local.cons, self._r, L.Q_OFF_ITEMS)
            raise err

    def _get(self, block, timeout, lease=False):
        self._check_open()
        self._raise_pending()
        deadline = _deadline(block, timeout)
        cons = self._consumer()
        try:
            if deadline is None:
                msg = cons.recv()
            else:
                msg = cons.try_recv()
                if msg is None:
                    left = _left(deadline)
                    if left <= 0:
                        raise Empty
                    try:
                        msg = cons.recv(timeout=left)
                    except Timeout:
                        raise Empty from None
        except (EndOfStream, PeerGone):            # a queue's stream never ends (R73): corruption
            raise CorruptSegmentError(f"the queue on {self._label} ended its stream") from None
        return self._take(msg, lease)                # (counts it out, R70)

    # -- sizes ----------------------------------------------------------------
    def qsize(self) -> int:
        """Items put and not yet taken (R70): exact when no put or get is
        under way; a put under way is counted from before its item can be
        taken, a get under way until after its item was taken, so it may be
        one too high per call in progress (never too low)."""
        self._check_open()
        n = self._r.load_u64(L.Q_OFF_ITEMS)
        if n >= _MAX_WORD:
            raise CorruptSegmentError(f"the queue on {self._label} counts {n} items")
        return n

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return bool(self._maxsize) and self.qsize() >= self._maxsize

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """This process will neither put nor get on this queue object any
        more: its producer and consumer roles (every thread's) are given back
        (the ring stays for the other processes).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fast_off()
        if self._gen == _forks:
            _close_all(self._holders)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<shmring.{type(self).__name__} on {getattr(self, '_label', '?')}" + \
            f"{' closed' if getattr(self, '_closed', False) else ''}>"


def _rebuild(cls, ring, spin):
    q = cls.__new__(cls)
    q._setup(ring, spin)
    return q


class Queue(_Base):
    """``multiprocessing.Queue`` over an mpmc ring; see :mod:`shmring.queues`.

    ``Queue(maxsize=0, *, capacity=16 MiB)``: ``maxsize`` bounds the items
    (0: no bound), ``capacity`` the bytes of the ring.  Differences from
    ``multiprocessing.Queue``: no feeder thread (``put`` writes the item into
    shared memory before it returns, so a pickling error raises from ``put``
    and a process may exit right after it), ``put`` blocks (up to its
    timeout, then ``queue.Full``) when the ring is full in bytes too, and
    ``qsize()`` works on every platform (R70)."""

    def put_nowait(self, obj) -> None:
        self.put(obj, False)

    def get_nowait(self):
        return self._get(False, None)

    def put_many(self, objs, block: bool = True, timeout=None) -> None:
        """Put every item of ``objs`` (faster-fifo style); ``timeout`` covers
        the whole batch.  With ``maxsize`` the batch is counted in at once
        (it waits until all of it fits; more than ``maxsize`` items is a
        ``ValueError``).  ``queue.Full`` when the deadline passes: the items
        before the one that did not fit were put, that one and the rest not
        (``e.args[1]`` is how many were put)."""
        self._check_open()
        whole = self._pickled_whole                  # (qfast.c: an object pickled whole, else None)
        encoded = [(stream, ()) if (stream := whole(o)) is not None else _encode(o) for o in objs]
        if not encoded:
            return
        deadline = _deadline(block, timeout)
        prod = self._producer()
        n = len(encoded)
        first = prod._commits                        # one commit per item: what was sent, even if interrupted
        counted = bool(self._maxsize)                # (without maxsize the producer counts as it publishes)
        if counted:
            self._count_in(n, deadline)
        try_send = prod.try_send
        try:
            for stream, bufs in encoded:
                try:                                 # a pickle stream that fits now: one C call
                    sent = not bufs and try_send(stream)
                except (PeerGone, MessageTooLarge):
                    sent = False                     # _send says which (and waits for a consumer)
                if not sent:
                    self._send(prod, stream, bufs, deadline)
        except Full:
            done = prod._commits - first
            if counted:
                self._undo(n - done)
            raise Full("queue full", done) from None
        except BaseException:
            if counted:
                self._undo(n - (prod._commits - first))
            raise

    def get_many(self, block: bool = True, timeout=None, max_messages_to_get: int = 1 << 30) -> list:
        """Up to ``max_messages_to_get`` items (faster-fifo style): waits (per
        ``block`` / ``timeout``) for the first, then takes what is already
        there without waiting; ``queue.Empty`` if nothing came."""
        if max_messages_to_get < 1:
            raise ValueError(f"max_messages_to_get must be >= 1, got {max_messages_to_get}")
        out = [self.get(block, timeout)]             # (the C fast path when it can: qfast.c)
        cons = self._consumer()
        take, append = cons._take_item, out.append
        n, streams = 1, 0
        try:
            while n < max_messages_to_get:
                got = take()
                if got is None:
                    break
                n += 1
                if type(got) is bytes:               # a pickle stream (as get's fast path), taken:
                    streams += 1                     # counted out below, whatever follows
                    append(_unpickle(got, self._label))
                else:
                    append(self._take(got))          # (counts it out itself)
        except Exception as e:
            # an item failed to unpickle after others were taken: they are returned, and
            # the next get / get_many of this thread raises its error (get's fast path is
            # off until then: _raise_pending turns it back on)
            self._local.pending = e.with_traceback(None)
            if self._fast_getter():
                self._fast_get(None, None, 0)        # (_raise_pending gives it back)
        finally:
            if streams:
                self._count_out(streams)
        return out

    def join_thread(self) -> None:
        """After ``close()``: returns at once (there is no feeder thread to
        join: every ``put`` has written its item when it returned)."""
        if not self._closed:
            raise AssertionError(f"Queue {self!r} not closed")

    def cancel_join_thread(self) -> None:
        """Nothing to cancel (no feeder thread); kept for compatibility."""


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue``: ``task_done()`` and ``join()`` over
    an unfinished-tasks count in shared memory (R72)."""

    _joinable = True

    def task_done(self) -> None:
        """One item taken earlier is finished; ``ValueError`` if more are
        marked done than were put."""
        self._check_open()
        r = self._r
        while True:
            n = r.load_u64(L.Q_OFF_UNFINISHED)
            if n == 0:
                raise ValueError("task_done() called too many times")
            if n >= _MAX_WORD:
                raise CorruptSegmentError(f"the queue on {self._label} counts {n} unfinished tasks")
            if r.cas_u64(L.Q_OFF_UNFINISHED, n, n - 1):       # R72: one CAS, never below zero
                if n == 1:
                    r.wake(L.Q_OFF_JOIN_WAKE)
                return

    def join(self, timeout=None) -> bool:
        """Block until every item put was marked done (``task_done()``).
        ``timeout`` (an extension; None: no limit): returns False if it
        passed first, True otherwise."""
        self._check_open()
        r, deadline = self._r, _deadline(True, timeout)
        while True:
            n = r.load_u64(L.Q_OFF_UNFINISHED)
            if n == 0:
                return True
            left = _left(deadline)
            if left is not None and left <= 0:
                return False
            r.wait_change(L.Q_OFF_UNFINISHED, n, L.Q_OFF_JOIN_WAKE, -1,
                          WAIT_SLICE if left is None else min(left, WAIT_SLICE), self._spin)


class SimpleQueue(_Base):
    """``multiprocessing.SimpleQueue``: ``put``, ``get``, ``empty``, ``close``
    (no bound, no timeout)."""

    def put(self, obj) -> None:
        self._put(obj, True, None)

    def get(self):
        return self._get(True, None)
