"""Rings and their producer / consumer handles.

The contract, written once:

* A ring is a bounded byte ring in a shared segment.  ``send`` copies a value
  in exactly once; ``recv`` hands out a :class:`~shmring.Message` whose value
  is a read-only view of the ring (valid until the message is released);
  ``recv_bytes`` copies a bytes message out and releases it at once.
* A consumer sees each committed message exactly once, in commit order,
  byte-identical.  Space is given back only when a message is released, so a
  consumer that dies loses nothing: the next consumer gets every message that
  was not released (at-least-once across a crash).
* A full ring is not an error: ``try_send`` returns False, ``send`` waits (spin,
  yield, then a futex sleep) up to its timeout.  A message that can never fit
  is :class:`~shmring.errors.MessageTooLarge`, at the call.
* Every wait wakes at least every ``WAIT_SLICE`` seconds to run signal handlers
  (Ctrl-C) and check that the peer's process is alive (:mod:`shmring.waiting`).
* A role (the producer, a consumer) is held by one live process; a dead
  holder's role is taken over (:mod:`shmring.roles`).

Producer example::

    with shmring.Ring.create("frames", 1 << 26) as ring, ring.producer() as prod:
        prod.send(b"hello")                        # bytes
        prod.send(np.arange(10.0))                 # ndarray
        prod.send({"id": 1, "img": image})         # msgpack with an embedded array
        with prod.reserve_array((480, 640), np.uint8) as out:
            camera.read_into(out)                  # built in place, committed on exit

Consumer example::

    ring = shmring.Ring.attach("frames")
    with ring.consumer() as cons:
        for msg in cons:                           # until the producer closes
            with msg:
                process(msg.value)                 # zero-copy view, valid in the block
"""
from __future__ import annotations

import functools
import os
import sys
import time
import warnings
import weakref

import numpy as np

from . import _core, _interop, codec, parties, records, roles, waiting, wakefd
from . import layout as L
from .pausepoints import pause
from .errors import EndOfStream, EscapedViewWarning, HandleClosed, Lagged, PeerGone, ShmringError, Timeout
from .segment import (Segment, SegmentHandle, fd_reference, hide_word_access, open_fd_reference, validate_header,
                      write_header)
from .waiting import DEFAULT_SPIN

CLOSED_EOS = 1            # producer role "closed" word: closed normally
CLOSED_ABORTED = 2        # closed because of an exception in the producer

class Ring(SegmentHandle):
    """A shared ring buffer.  Create it once, attach to it from other processes.

    ``close()`` detaches this process; ``unlink()`` removes the name.  Used as
    a context manager, a ring made by :meth:`create` is closed and, for a
    POSIX segment, unlinked on exit; a file-backed ring's file persists until
    ``unlink()``; an attached ring is only closed.  A ring pickles by name,
    so it can be passed to a child process, which attaches on unpickling.
    """

    def __init__(self, seg: Segment = None, header: dict = None, *, created: bool = False):
        self._refuse_direct(seg)              # Ring("x"): point at create / attach
        self._seg = seg
        self._header = header
        self._created = created
        self._region = _core.Region(seg.buf)
        self._identity = seg.identity
        self._tables = (parties.Tables(self._region, header, seg.label, seg.locks)
                        if header["kind"] in L.MULTI_KINDS else None)
        if header["kind"] == L.KIND_RECORDS:
            header.update(records.read_fields(seg.buf, header, seg.label))

    # -- construction -------------------------------------------------------
    @classmethod
    def create(cls, name: str | None = None, capacity: int = 1 << 20, *, kind: str = "spsc",
               path=None, mode: int = 0o600, max_producers: int | None = None,
               max_consumers: int | None = None, producers: int | None = None,
               policy: str = "block", evict_after: float = 1.0, dtype=None,
               replace_dead: bool = False) -> "Ring":
        """Create a ring with ``capacity`` bytes of data area (a power of two, >= 4096).

        ``name`` names a POSIX segment (``/dev/shm/shmring.NAME``); with ``path``
        the ring lives in that file instead and persists until ``unlink()``.
        The largest message is ``capacity - 8`` bytes (``capacity - 16`` for
        the multi-party kinds): the data area is mapped twice, back to back,
        so every message is contiguous even when it wraps (no padding).

        ``kind``:

        * ``"spsc"``: one producer, one consumer (the fastest).
        * ``"mpsc"``: up to ``max_producers`` (64) producers, one consumer;
          delivery in claim order, per-producer order kept.
        * ``"broadcast"``: one producer, up to ``max_consumers`` (64)
          subscribers (``ring.subscribe()``), each of which sees every message.
          ``policy="block"`` gates the producer on the slowest live subscriber;
          ``policy="evict"`` evicts one that held the producer back for
          ``evict_after`` seconds (it gets :class:`~shmring.Lagged`);
          ``evict_after=math.inf`` never evicts (the producer waits, as with
          ``"block"``).
        * ``"mpmc"``: up to ``max_producers`` producers and ``max_consumers``
          consumers sharing the work: each message goes to one consumer.

        For mpsc and mpmc, the stream ends (consumers get EndOfStream once
        drained) when every producer that joined has closed, and at least
        ``producers`` of them if given (set it when producers start at
        different times, so an early finisher does not end the stream).

        ``dtype`` (spsc only) makes a record ring: ``capacity // itemsize``
        fixed-size records and no per-message framing; the producer's
        ``send_many(array)`` is one copy and the consumer's ``recv_many()``
        returns numpy views of many records at once (:mod:`shmring.records`).

        ``replace_dead=True``: if the name exists but no live process has it
        attached (every process that used it died: a killed run), replace it
        with the new ring; a segment a live process uses is never replaced
        (``SegmentExists``).  See docs/design.md R65.
        """
        if kind not in L.KINDS:
            raise ValueError(f"unknown ring kind {kind!r}; this version supports {sorted(L.KINDS)}")
        k = L.KINDS[kind]
        if k == L.KIND_SPSC and (max_producers, max_consumers, producers) != (None, None, None):
            raise ValueError("an spsc ring has one producer and one consumer; max_producers, max_consumers "
                             "and producers are for kind='mpsc', 'broadcast' or 'mpmc'")
        if policy not in L.POLICIES or (policy != "block" and k != L.KIND_BROADCAST):
            raise ValueError(f"policy must be 'block' or 'evict' (evict: broadcast rings only), got {policy!r}")
        if not (isinstance(evict_after, (int, float)) and evict_after >= 0):
            raise ValueError(f"evict_after must be a number of seconds >= 0, got {evict_after!r}")
        if producers is not None and (k not in (L.KIND_MPSC, L.KIND_MPMC) or isinstance(producers, bool)
                                      or not isinstance(producers, int) or not 1 <= producers < 1 << 31):
            raise ValueError(f"producers (the number of producers that end the stream) is a positive int, "
                             f"for mpsc and mpmc rings; got {producers!r} for {kind}")
        maxp = maxc = 0
        rec = None
        if dtype is not None:
            if k != L.KIND_SPSC:
                raise ValueError(f"a record ring (dtype=...) is spsc; kind={kind!r} carries framed messages")
        if k in L.MULTI_KINDS:
            maxp, maxc = parties.geometry_args(k, max_producers, max_consumers)
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        capacity = int(capacity)
        if capacity < L.MIN_CAPACITY or capacity > L.MAX_CAPACITY or capacity & (capacity - 1):
            hint = 1 << max(12, (max(capacity, 1) - 1).bit_length())
            raise ValueError(f"capacity must be a power of two from {L.MIN_CAPACITY} to {L.MAX_CAPACITY}, "
                             f"got {capacity}" + (f" (next power of two: {hint})" if hint <= L.MAX_CAPACITY else ""))
        if dtype is not None:
            rec = records.prepare(dtype, capacity)
            k = L.KIND_RECORDS
        geometry = L.multi_geometry(capacity, maxp, maxc) if k in L.MULTI_KINDS else None
        size = geometry["segment_size"] if geometry else L.segment_size(capacity)
        # R60: a framed ring's data area is mapped twice (a record ring's once)
        dmap = ((geometry["data_offset"] if geometry else L.HEADER_SIZE), capacity) if k in L.DOUBLE_MAPPED_KINDS else None
        seg = (Segment.create_anonymous(size, dmap) if name is None and path is None
               else Segment.create(name, size, path=path, mode=mode, replace_dead=replace_dead, dmap=dmap))
        try:
            pause("create")                       # the name exists, the header is not written
            write_header(seg.buf, kind=k, capacity=capacity, geometry=geometry)
            if geometry:
                parties.write_multi_header(seg.buf, maxp=maxp, maxc=maxc, policy=L.POLICIES[policy],
                                           expected=producers or 0, evict_after=float(evict_after))
            if rec:
                records.write_fields(seg.buf, *rec)
            region = _core.Region(seg.buf)
            region.store_u32(L.OFF_READY, 1)       # pairs with attach's read of `ready` after the header
            del region
            return cls(seg, validate_header(seg), created=True)
        except BaseException:
            seg.close()
            seg.unlink()
            raise

    @classmethod
    def attach(cls, name: str | None = None, *, path=None, allow_foreign_owner: bool = False,
               wait: float = 0.0) -> "Ring":
        """Attach to an existing ring by name (or by path for a file-backed ring).

        ``wait``: seconds to wait for a ring that does not exist yet (its
        creator may start later); then ``SegmentNotFound``.
        The segment (a POSIX name or a ring file) must be a regular file owned
        by this process's uid, reached without following a symbolic link;
        ``allow_foreign_owner=True`` accepts one owned by another user (a ring
        that user shares with you on purpose, e.g. mode 0o666 or a group
        directory): anyone can create a name in ``/dev/shm`` first.
        """
        if path is None and name is None:
            raise TypeError("Ring.attach() needs a name or path= (an anonymous ring has neither: pass the "
                            "Ring object itself to the other process, or a descriptor: Ring.from_fd)")
        return cls._attached(Segment.open(name, path=path, allow_foreign_owner=allow_foreign_owner, wait=wait))

    @classmethod
    def _attached(cls, seg: Segment) -> "Ring":
        try:
            pause("attach")                       # mapped, nothing validated or taken yet
            ring = cls(seg, validate_header(seg), created=False)
            seg.reserve()                         # validated: now its space (holes of a copy) and pages
            return ring
        except BaseException:
            seg.close()
            raise

    @classmethod
    def anonymous(cls, capacity: int = 1 << 20, **kwargs) -> "Ring":
        """``Ring.create(None, capacity, **kwargs)``: a ring with no name in
        ``/dev/shm`` or anywhere, in sealed anonymous shared memory (a memfd
        whose size the kernel keeps from changing: nobody can truncate it).
        Other processes get it by inheritance (fork) or by pickling the Ring
        (a ``multiprocessing`` / ``multiprocess`` child, a ``Pipeline``
        stage, a queue), or from a descriptor (:meth:`dup_fd`,
        :meth:`from_fd`).  The kernel frees it when the last process using
        it closes it or dies: it is never left behind after a crash, and is
        not limited by the size of ``/dev/shm`` (Docker's 64 MB)."""
        return cls.create(None, capacity, **kwargs)

    @classmethod
    def from_fd(cls, fd: int, *, allow_foreign_owner: bool = False) -> "Ring":
        """Attach the anonymous ring open at descriptor ``fd`` (a duplicate is
        taken: ``fd`` stays yours to close).  It must be a sealed anonymous
        shmring segment (IncompatibleSegment otherwise)."""
        return cls._attached(Segment.from_fd(os.dup(fd), allow_foreign_owner=allow_foreign_owner))

    def __reduce__(self):
        if self._seg.anonymous:               # by descriptor (segment.fd_reference)
            return (_attach_anonymous, (fd_reference(self._seg), self._seg.allow_foreign_owner))
        return (_attach, (self._seg.name, self._seg.path, self._seg.allow_foreign_owner))

    # -- roles --------------------------------------------------------------
    def producer(self, *, spin: float = DEFAULT_SPIN) -> "Producer":
        """Take a producer role (spsc and broadcast: the one producer; mpsc
        and mpmc: one of ``max_producers``)."""
        if self.dtype is not None:
            return records.RecordProducer(self, spin)
        return Producer(self, spin)

    def consumer(self, *, spin: float = DEFAULT_SPIN) -> "Consumer":
        """Take a consumer role (spsc and mpsc: the one consumer; mpmc: one of
        ``max_consumers`` sharing the messages; broadcast: ``subscribe()``)."""
        if self.kind == "broadcast":
            return self.subscribe(spin=spin)
        if self.dtype is not None:
            return records.RecordConsumer(self, spin)
        return Consumer(self, spin)

    def subscribe(self, start: str = "oldest", *, spin: float = DEFAULT_SPIN) -> "Consumer":
        """Join a broadcast ring as a new subscriber.

        ``start="oldest"``: begin with the oldest message the ring still
        guarantees (every message still in the ring); ``"newest"``: begin with
        the most recent message already sent (or the next one if none is in
        the ring).  Leave with ``close()``; a dead subscriber is dropped.
        """
        if self.kind != "broadcast":
            raise ValueError(f"subscribe() is for broadcast rings; this ring is {self.kind}: use consumer()")
        if start not in ("oldest", "newest"):
            raise ValueError(f"start must be 'oldest' or 'newest', got {start!r}")
        return Consumer(self, spin, start=start)

    # -- properties -----------------------------------------------------------
    @property
    def kind(self) -> str:
        return L.KIND_NAMES[self._header["kind"]]

    @property
    def capacity(self) -> int:
        return self._header["capacity"]

    @property
    def dtype(self):
        """The record dtype of a record ring, else None."""
        return self._header.get("dtype")

    @property
    def max_message(self) -> int:
        """Largest payload, in bytes, a single message may have."""
        return self._header["max_message"]

    @property
    def closed(self) -> bool:
        return self._seg.buf is None

    def _live_region(self):
        if self._seg.buf is None:
            raise HandleClosed(f"ring {self._seg.label} is closed")
        return self._region

    def stats(self) -> dict:
        """A snapshot of the ring's shared state (positions in bytes).

        Multi-party rings add the producer and consumer tables (pid, alive,
        sent / received, a subscriber's lag in bytes) and the counters:
        ``abandoned`` claims skipped, ``evicted`` and ``dropped`` (dead)
        subscribers, ``redelivered`` messages a dead consumer held.
        """
        r = self._live_region()
        r._guard_check()
        wp, rp = r.load_u64(L.OFF_WRITE_POS), r.load_u64(L.OFF_READ_POS)

        def role(line):
            w = r.load_u64(line + L.ROLE_OWNER)
            return {"pid": L.split_owner(w)[0] or None, "alive": roles.holder_alive(self._seg.locks, line, w),
                    "sessions": r.load_u64(line + L.ROLE_SESSIONS)}
        base = {"name": self.name, "path": self.path, "kind": self.kind, "capacity": self.capacity,
                "write_pos": wp, "creator_pid": self._header["creator_pid"],
                "created_ns": self._header["created_ns"]}
        if self.dtype is not None:
            slots = self._header["slots"]
            closed = r.load_u32(L.OFF_PROD_ROLE + L.ROLE_CLOSED)
            base.update({"dtype": str(self.dtype), "slots": slots, "read_pos": rp, "used": wp - rp,
                         "fill": (wp - rp) / slots, "closed": {0: None, 1: "eos", 2: "aborted"}.get(closed, closed),
                         "producer": role(L.OFF_PROD_ROLE), "consumer": role(L.OFF_CONS_ROLE)})
            return base
        if self._tables is None:
            closed = r.load_u32(L.OFF_PROD_ROLE + L.ROLE_CLOSED)
            base.update({"read_pos": rp, "used": wp - rp, "fill": (wp - rp) / self.capacity,
                         "closed": {0: None, 1: "eos", 2: "aborted"}.get(closed, closed),
                         "producer": role(L.OFF_PROD_ROLE), "consumer": role(L.OFF_CONS_ROLE)})
            return base
        st = self._tables.stats()
        if self.kind == "broadcast":
            lags = [c["lag"] for c in st["consumers"] if c.get("lag") is not None and not c["evicted"]]
            used = max(lags) if lags else 0
            base["read_pos"] = wp - used
        else:
            used = wp - rp
            base["read_pos"] = rp
        if self.kind == "mpmc":
            base["take_pos"] = r.load_u64(L.MP_OFF_TAKE)
        if self.kind == "mpsc":
            base["consumer"] = role(L.OFF_CONS_ROLE)
            base["consumer"]["received"] = r.load_u64(L.OFF_CONS_ROLE + 24)
        base.update({"used": used, "fill": used / self.capacity,
                     "closed": "eos" if self._tables.producers_done() else None,
                     "policy": "evict" if self._header["policy"] else "block",
                     "evict_after": self._tables.evict_after})
        base.update(st)
        return base

    def flush(self) -> None:
        """Write the ring's pages to its backing store (``msync``) and wait for it.

        What it guarantees, precisely:

        * Process crash (``kill -9``, segfault) of any or every process: nothing
          is needed.  Every committed store is in the shared page cache the
          moment it is made, and a file-backed ring reopened afterwards sees it.
        * Machine crash or power loss, file-backed ring: only what was committed
          before the last ``flush()`` returned is on disk (the kernel may have
          written more on its own; nothing says how much).  A flush covers the
          whole segment, so positions and records reach the disk together
          as of the call, though pages written *during* the call may land in
          either state.
        * POSIX (``/dev/shm``) ring: there is no disk; ``flush()`` is a no-op
          in effect, and the ring does not survive a reboot.
        """
        self._live_region()._guard_check()
        self._seg.buf.flush()

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Detach this process.  Never unmaps under a live handle or view: the
        mapping then lives until the last of them is gone."""
        self._region = None
        self._seg.close()

    def __repr__(self) -> str:
        return f"<shmring.Ring {self.kind} {self._seg.label} capacity={self.capacity}>"


def _attach_anonymous(ref, allow_foreign_owner=False):
    return Ring._attached(Segment.from_fd(open_fd_reference(ref), allow_foreign_owner=allow_foreign_owner))


def _attach(name, path, allow_foreign_owner=False):
    return Ring.attach(name, path=path, allow_foreign_owner=allow_foreign_owner)


def _no_pickle(handle):
    raise TypeError(f"a {type(handle).__name__} handle belongs to the process that took the role and "
                    "cannot be pickled; pass the Ring and call ring.producer() / ring.consumer() "
                    "in the other process")


def _exclusive(method):
    """A multi-step method holds its handle, as the C calls do: another
    thread's call meanwhile raises ShmringError ("in use by another thread").
    The holder before the call is read first (an attribute load: no
    interrupt can land between it and the ``try``), so a KeyboardInterrupt
    right after ``_use()`` still restores it."""
    @functools.wraps(method)
    def held(self, *args, **kwargs):
        prev = self._user
        try:
            self._use()
            return method(self, *args, **kwargs)
        finally:
            self._unuse(prev)
    return held


def _finalizable(handle, _getpid=os.getpid, _finalizing=sys.is_finalizing) -> bool:
    """Whether a handle being garbage-collected still holds something of this
    process: made here (not inherited through fork), not finished closing
    (never closed, or a close an interrupt cut short: R50), and not at
    interpreter exit (then the process is going away: its roles are
    recovered as a dead process's, with no Python run in a torn-down interpreter)."""
    d = handle.__dict__
    return not _finalizing() and d.get("_pid") == _getpid() and not d.get("_done")


def _warn_dropped(handle, what: str) -> None:
    # (no source=handle: a recorded warning would keep the handle alive, resurrecting it)
    try:
        warnings.warn(f"{handle!r} was garbage-collected without close(): {what}; use it in a with "
                      "block or call close()", ResourceWarning, stacklevel=2)
    except Exception:                     # a warnings filter set to "error": nothing to raise into
        pass


@hide_word_access
class Producer(_core.ProducerCore):
    """The producer handle of a ring (a context manager; exiting closes the stream).

    ``send(data, *, timeout=None)`` and ``try_send(data)`` are implemented in C
    for bytes and bytearray; arrays and objects go through :mod:`shmring.codec`.
    """

    _done = False                 # its close (or detach) ran to the end (R50)

    # Called from C by name (see the callback table in src/shmring/_core/module.c):
    # _send_obj, _try_send_obj, _send_wait.  Keep their names and signatures.

    def __init__(self, ring: Ring, spin: float = DEFAULT_SPIN):
        self._region = region = ring._live_region()      # ours too: it must work after ring.close()
        self._locks = ring._seg.locks
        self._tables = tables = ring._tables
        self._role = None
        self.spin = float(spin)
        self._wmv = ring._seg.view()         # reservation views keep the mapping guarded (R45)
        self._label = ring._seg.label
        self._kind = ring.kind
        self._lagging, self._policed = {}, 0.0
        held = roles.hold_interrupts()        # R51: from the claim to _pid, one step for Ctrl-C
        try:
            if tables is not None:             # multi-party: an entry of the producer table
                self._slot = tables.join_producer()
                try:
                    super().__init__(ring._seg.buf, self._slot)
                except BaseException:
                    _core.finish(tables.leave_producer, self._slot)
                    raise
            else:
                if region.load_u32(L.OFF_PROD_ROLE + L.ROLE_CLOSED):
                    raise HandleClosed(f"the stream of {ring._seg.label} was closed by its producer; "
                                       "create a new ring for a new stream")
                self._role = roles.ring_role(ring, L.OFF_PROD_ROLE)
                with self._role.claimed(region):
                    super().__init__(ring._seg.buf)
            self._pid = os.getpid()           # last: a handle whose __init__ failed is never finalized
        finally:
            roles.resume_interrupts(held)     # a Ctrl-C meanwhile is raised here: the handle is finalized

    def _finalize(self, _finalizable=_finalizable, _warn_dropped=_warn_dropped):   # (bound: globals go at exit)
        # The C core's tp_finalize calls this (there is no __del__: one could be
        # interrupted at its first line; R50), redoing it after an interrupt.
        # Dropped without close() (README, "Handles, threads and garbage
        # collection"): detached.  Its role or table slot is given back (an
        # open reservation aborted), so another producer, of any process, can
        # take over, and an mpsc / mpmc stream can end when the producers
        # still joined close; but a dropped handle never ends a stream itself:
        # that is said explicitly, by close() or a with block.
        if _finalizable(self):
            _warn_dropped(self, "it was detached (role given back, stream left open)")
            self._detach_steps()

    # -- slow paths called from C ------------------------------------------------
    def _send_obj(self, data, timeout):
        if isinstance(data, np.ndarray):
            meta = codec.array_meta(data)
            if meta is not None:              # contiguous: one memcpy in C
                if not self._push_array(meta, data, L.T_ARRAY):
                    self._block(lambda: self._push_array(meta, data, L.T_ARRAY) or None,
                                len(meta) + data.nbytes + 72, timeout)
                return None
        elif _interop.is_tensor(data) and (fast := _interop.tensor_fast(data)) is not None:
            meta, raw = fast                  # a contiguous tensor: the same one memcpy in C
            if not self._push_array(meta, raw, L.T_OBJECT):
                self._block(lambda: self._push_array(meta, raw, L.T_OBJECT) or None,
                            len(meta) + raw.nbytes + 72, timeout)
            return None
        if isinstance(data, (np.ndarray, np.generic)) or not _is_bytes_like(data):
            self._write(codec.encode(data), timeout)
            return None
        with memoryview(data) as mv:
            if not mv.c_contiguous:
                mv = memoryview(mv.tobytes())
            if not self._push(mv, L.T_BYTES):
                self._block(lambda: self._push(mv, L.T_BYTES) or None, mv.nbytes, timeout)
        return None

    def _try_send_obj(self, data) -> bool:
        if isinstance(data, np.ndarray):
            meta = codec.array_meta(data)
            if meta is not None:
                return self._push_array(meta, data, L.T_ARRAY)
        elif _interop.is_tensor(data) and (fast := _interop.tensor_fast(data)) is not None:
            return self._push_array(fast[0], fast[1], L.T_OBJECT)
        if isinstance(data, (np.ndarray, np.generic)) or not _is_bytes_like(data):
            return self._write(codec.encode(data), 0, blocking=False)
        with memoryview(data) as mv:
            return self._push(mv if mv.c_contiguous else mv.tobytes(), L.T_BYTES)

    def _send_wait(self, data, timeout):
        self._block(lambda: self.try_send(data) or None, len(data), timeout)

    # -- reserve / commit --------------------------------------------------------
    # Interrupts (KeyboardInterrupt) may land between any two Python steps,
    # even at the first line of an except clause or a __del__.  So an open
    # reservation is a C object from the C call that opens it (a Ticket):
    # whatever frame holds it, when it is dropped open (an interrupt anywhere
    # in this glue, a Reservation never entered) its deallocator aborts it, in
    # C.  The explicit aborts below only make that immediate while a handled
    # exception still keeps the frames alive.
    def _write(self, enc: codec.Encoded, timeout, blocking=True):
        t = self._reserve_blocking(enc.max_payload, enc.type, timeout, blocking)
        if t is None:
            return False
        try:
            t.commit(codec.write(self._wmv, t.offset, enc)[0])
        except BaseException:
            t.abort()
            raise
        return True

    def _reserve_open(self, enc: codec.Encoded, timeout, pick) -> "Reservation":
        """Reserve room for ``enc``, lay it out (arrays copied in, placeholders
        left to fill) and return its Reservation (``pick(views)`` the view)."""
        t = self._reserve_blocking(enc.max_payload, enc.type, timeout)
        try:
            n, views = codec.write(self._wmv, t.offset, enc)
            return Reservation(self, t, pick(views), n)
        except BaseException:
            t.abort()
            raise

    def _reserve_blocking(self, nbytes, type_, timeout, blocking=True):
        """A Ticket for ``nbytes`` of payload, or None (full, not blocking)."""
        t = self._reserve_ticket(nbytes, type_)
        if t is None and blocking:
            t = self._block(lambda: self._reserve_ticket(nbytes, type_), nbytes, timeout)
        return t

    def _block(self, attempt, nbytes, timeout):
        """Retry ``attempt`` (None = full) until it succeeds, waiting for room between tries."""
        wait = lambda t: self._wait_space(nbytes, t, self.spin)            # noqa: E731
        if self._tables is not None and self._kind == "broadcast" and self._tables.evicting:
            # a subscriber that releases a little now and then still holds the
            # producer back: police the table every slice while blocked, even
            # when each wait ends early with a little room
            inner = wait

            def wait(t):
                now = time.monotonic()
                if now - self._policed >= waiting.WAIT_SLICE:
                    self._policed = now
                    self._tables.police_subscribers(self._lagging)
                return inner(t)
        return waiting.wait_until(
            attempt, wait, self._consumers_gone, timeout,
            lambda: f"ring {self._label} stayed full for {timeout} s (a {nbytes}-byte message waited for room)"
                    + self._held_note(),
            lambda pid: f"the consumer (pid {pid}) of {self._label} died while the ring was full; "
                        "unreleased messages stay in the ring for the next consumer")

    def _held_note(self) -> str:
        """For a send's Timeout (R68): a consumer asleep waiting for data while
        the ring is full has received everything and keeps some of it."""
        if self._kind not in ("spsc", "mpsc"):
            return ""
        try:
            waiting_for_data = self._region.load_u32(L.OFF_DATA_WAKE + L.WAKE_WAITERS)
        except ShmringError:
            return ""
        if not waiting_for_data:
            return ""
        return ("; meanwhile the consumer was waiting for new data, so it has received every message and "
                "keeps some unreleased: a view of one kept past its message (e.g. msg.value stored in a list "
                "in a `for msg in cons` loop, or left in a REPL's `_` / Jupyter's `Out[]`: the consumer is "
                "warned with EscapedViewWarning), or a Message never released. The consumer should keep "
                "copies (msg.copy(), recv(copy=True)) or release what it holds")

    def _consumers_gone(self) -> int:
        """While blocked for room: the pid of a dead consumer that leaves
        nobody to make room, else 0.  Broadcast: drops dead subscribers and
        evicts laggards (policy evict) instead, which makes room."""
        if self._tables is None or self._kind == "mpsc":
            return roles.dead_holder(self._region, L.OFF_CONS_ROLE, self._locks)
        if self._kind == "broadcast":
            self._tables.police_subscribers(self._lagging)
            return 0
        live, dead = self._tables.live_consumers()
        return dead if not live else 0

    @_exclusive
    def reserve(self, nbytes: int, *, timeout=None) -> "Reservation":
        """Reserve ``nbytes`` for a bytes message and return a writable memoryview
        of them (a context manager: commits on normal exit, aborts on error)."""
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        t = self._reserve_blocking(nbytes, L.T_BYTES, timeout)
        try:
            return Reservation(self, t, self._wmv[t.offset:t.offset + nbytes], None)
        except BaseException:
            t.abort()
            raise

    @_exclusive
    def reserve_array(self, shape, dtype, *, order: str = "C", timeout=None) -> "Reservation":
        """Reserve a ``shape`` x ``dtype`` array inside the ring and return a
        reservation whose ``__enter__`` gives the writable ndarray to fill in place.

        Lifetime: the array points into the ring.  On normal exit of the
        ``with`` block the message is committed (and the array made read-only:
        writing through it after commit would change a message the consumer
        may be reading); on an exception it is aborted and nothing is sent.
        """
        return self._reserve_open(codec.array_encoding(shape, dtype, order), timeout, lambda views: views[0])

    @_exclusive
    def reserve_value(self, template, *, timeout=None) -> "Reservation":
        """Reserve a msgpack value whose :class:`~shmring.InPlace` placeholders
        are arrays built in place; ``__enter__`` gives the list of those
        writable arrays, in the order msgpack meets them (dict order)::

            with prod.reserve_value({"seq": 7, "img": shmring.InPlace((480, 640), np.uint8)}) as (img,):
                camera.read_into(img)

        The same lifetime rules as :meth:`reserve_array`."""
        enc = codec.encode(template)
        return self._reserve_open(enc, timeout, lambda views: [v for v, b in zip(views, enc.blocks)
                                                               if b[0] is None or isinstance(b[0], _interop.TensorPlace)])

    # -- lifetime ------------------------------------------------------------------
    def _abort_open(self) -> None:
        """Abort an open reservation, disarming its views first (arrays made
        read-only, a memoryview released): a late write through them must not
        land in space that is then reused."""
        ref = self.__dict__.get("_open_res")
        res = ref() if ref is not None else None
        if res is not None and not res._done:
            res._finish()
        self._abort()

    @_exclusive
    def close(self, *, _status: int = CLOSED_EOS) -> None:
        """End the stream (spsc, broadcast), or this producer's part of it
        (mpsc, mpmc: the stream ends when every producer has closed):
        consumers drain what was sent, then get EndOfStream.  Idempotent.  An
        open reservation is aborted."""
        if not self._done:
            _core.finish(self._close_steps, _status)

    def _close_steps(self, status: int) -> None:
        # R50: each step re-doable (core.finish redoes them after an interrupt)
        if not self._inherited:               # a forked child: the parent's stream; only this copy is dropped
            self._abort_open()
            if self._tables is not None:
                self._mark_closed()
                self._tables.end_producer(self._slot, aborted=status != CLOSED_EOS)
            else:
                self._region.store_u32(L.OFF_PROD_ROLE + L.ROLE_CLOSED, status)  # pairs with the consumer's acquire load in peek
                self._region.wake(L.OFF_DATA_WAKE)
                self._detach_steps()
        self._mark_closed()
        self._done = True

    @_exclusive
    def detach(self) -> None:
        """Give up the producer role without ending the stream (another
        producer may attach and continue it)."""
        if not self._done:
            _core.finish(self._detach_steps)

    def _detach_steps(self) -> None:
        # R50: each step re-doable
        if not self._inherited:               # a forked child: the role is the parent's
            self._abort_open()
            self._mark_closed()
            if self._tables is not None:
                self._tables.leave_producer(self._slot)
            else:
                self._role.give_back(self._region)
        self._mark_closed()
        self._done = True

    async def send_async(self, data, *, timeout=None) -> None:
        """``await prod.send_async(data)``: send without blocking the event loop
        and with no thread: while the ring is full the await arms a wake-up
        descriptor of the ring's space wake line, which a consumer signals
        when it makes room (R52).  Cancelling the await sends nothing."""
        size = _size_hint(data)
        await waiting.wait_until_async(
            lambda: True if self.try_send(data) else None,
            lambda: [(self, L.OFF_SPACE_WAKE, lambda w: self._arm_space(size, w))], self._consumers_gone, timeout,
            lambda: f"ring {self._label} stayed full for {timeout} s",
            lambda pid: f"the consumer (pid {pid}) of {self._label} died while the ring was full")

    def send_many(self, items, *, timeout=None) -> int:
        """Send every item of an iterable (each as by ``send``); returns the
        count.  ``timeout`` applies to each item's wait for room."""
        n = 0
        send = self.send
        if timeout is None:
            for item in items:
                send(item)
                n += 1
        else:
            for item in items:
                send(item, timeout=timeout)
                n += 1
        return n

    __reduce__ = _no_pickle

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(_status=CLOSED_EOS if exc_type is None else CLOSED_ABORTED)

    def __repr__(self) -> str:
        return f"<shmring.Producer of {self._label} at position {self.position}{' closed' if self.closed else ''}>"


class Reservation:
    """Space reserved in the ring, filled in place, then committed or aborted.

    A context manager: ``__enter__`` returns the writable view (memoryview or
    ndarray); normal exit commits, an exception aborts.  ``commit()`` and
    ``abort()`` may also be called directly, once.  A reservation dropped
    open (an interrupt before its ``with`` block began, or forgotten) is
    aborted (by its C ticket's deallocator), so the producer stays usable;
    the ticket names its reservation, so it never reaches a later one.
    """

    def __init__(self, producer: Producer, ticket, view, nbytes):
        self._producer = producer
        self._ticket = ticket
        self.view = view
        self._nbytes = nbytes
        self._done = False
        producer._open_res = weakref.ref(self)   # close() / detach() disarm it

    def __enter__(self):
        return self.view

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if self._producer._inherited:         # a forked child: the parent's reservation; drop our copy only
            self._finish()
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _finish(self):
        if self._done:
            raise HandleClosed("reservation already committed or aborted")
        self._done = True
        v, self.view = self.view, None
        for a in (v if isinstance(v, list) else ()):
            if isinstance(a, np.ndarray):
                a.flags.writeable = False
            else:                   # a torch tensor (InPlace with a torch dtype): no read-only flag,
                a.set_()            # so it is pointed away from the ring, at an empty storage
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
        elif isinstance(v, memoryview):
            try:
                v.release()
            except BufferError:
                pass

    def commit(self) -> None:
        """Publish the message."""
        pause("reserved")                         # reserved and filled, not yet published
        if self._done:
            raise HandleClosed("reservation already committed or aborted")
        # one C step (refused while another thread is inside a producer call,
        # or in a forked child); then the views are disarmed
        self._ticket.commit(self._nbytes)
        self._finish()

    def abort(self) -> None:
        """Forget the reservation: nothing is sent."""
        if self._done:
            raise HandleClosed("reservation already committed or aborted")
        self._ticket.abort()
        self._finish()


def _is_bytes_like(data) -> bool:
    try:
        memoryview(data).release()
        return True
    except TypeError:
        return False


@hide_word_access
class Consumer(_core.ConsumerCore):
    """The consumer handle of a ring (a context manager; exiting detaches).

    ``recv()`` returns a :class:`~shmring.Message`, a zero-copy window valid
    until released; ``recv_bytes()`` copies a bytes message out and releases
    it at once; iteration yields messages until the producer closes.
    """

    _done = False                 # its close (or detach) ran to the end (R50)

    # Called from C by name (see the callback table in src/shmring/_core/module.c):
    # _recv_wait, _recv_copy, _lagged, _eos_ready.  Keep their names and
    # signatures.  (_leave_table is no longer called from C: the last release
    # of a closed handle leaves the table in C, R35.)

    def __init__(self, ring: Ring, spin: float = DEFAULT_SPIN, *, start: str = "oldest"):
        self._region = region = ring._live_region()      # ours too: it must work after ring.close()
        self._locks = ring._seg.locks
        self._tables = tables = ring._tables
        self._kind = ring.kind
        self._role = None
        self._stuck_since, self._zero_seen = {}, {}
        self.spin = float(spin)
        self._label = ring._seg.label
        held = roles.hold_interrupts()        # R51: from the claim to _pid, one step for Ctrl-C
        try:
            if tables is None or self._kind == "mpsc":
                self._role = roles.ring_role(ring, L.OFF_CONS_ROLE)
                with self._role.claimed(region):
                    super().__init__(ring._seg.buf)
            else:
                broadcast = self._kind == "broadcast"
                adopted = []            # mpmc: a dead consumer's entry we took over (nothing free)
                self._slot = roles.claim_entry(region, tables.locks, [tables.cline(i) for i in range(tables.maxc)],
                                               "subscriber" if broadcast else "consumer", ring._seg.label,
                                               self._kind, tables.drop_subscriber if broadcast else (lambda i, w: False),
                                               None if broadcast else
                                               lambda i, w: tables.adopt_consumer(i, w) and not adopted.append(i))
                try:
                    if broadcast:
                        tables.join_position(self._slot, start)
                    super().__init__(ring._seg.buf, self._slot)
                    self._set_lock_fd(tables.locks.fd)     # the C leave (R35) unlocks the entry too (R38)
                    if adopted:
                        tables.requeue_adopted(self, self._slot)
                except BaseException:
                    _core.finish(self._leave_table)
                    raise
            self._pid = os.getpid()           # last: a handle whose __init__ failed is never finalized
        finally:
            roles.resume_interrupts(held)     # a Ctrl-C meanwhile is raised here: the handle is finalized

    def _finalize(self, _finalizable=_finalizable, _warn_dropped=_warn_dropped):   # (bound: globals go at exit)
        # Called by the C core's tp_finalize (R50, as Producer._finalize).
        # Dropped without close(): close it (give the role back / leave the
        # table).  In a reference cycle with messages it still holds, those are
        # collected with it and the last one's release leaves the table (C).
        if _finalizable(self):
            _warn_dropped(self, "its role was given back")
            self._close_steps()

    def _leave_table(self):
        # R35: position FREE while the entry is ours, then the owner CAS (the C
        # core takes the same steps at the last release of a closed handle)
        line = self._tables.cline(self._slot)
        if self._kind == "broadcast" and self._region.load_u64(line) == roles.my_owner_word():   # (a redo: R50)
            self._region.store_u64(line + L.CE_POS, L.POS_FREE)
            self._region.wake(L.OFF_SPACE_WAKE)
        roles.release(self._region, self._tables.locks, line)

    def _recv_copy(self, timeout):
        # _take_copy copies and releases in one C step; an interrupt before it
        # drops the message unread: it is handed out again (R39)
        return _core.ConsumerCore.recv(self, timeout=timeout)._take_copy()

    # -- slow path called from C ---------------------------------------------------------
    def _recv_wait(self, timeout, want_bytes):
        return waiting.wait_until(self._try_recv_bytes if want_bytes else self.try_recv,
                                  lambda t: self._wait_data(t, self.spin), self._producers_gone, timeout,
                                  *self._recv_messages(timeout))

    def _recv_messages(self, timeout):
        """(timeout message, dead producer message) of a wait for a message."""
        return (lambda: f"no message arrived on {self._label} within {timeout} s",
                lambda pid: f"the producer (pid {pid}) of {self._label} died without closing the stream; "
                            "every message it committed was received")

    def _producers_gone(self) -> int:
        """Between wait slices: spsc: the pid of a dead producer, else 0.
        Multi-party: recovery instead (dead producers are counted, which ends
        the stream with PeerGone once drained; abandoned claims are skipped;
        mpmc: what dead consumers held is requeued)."""
        t = self._tables
        if t is None:
            return roles.dead_holder(self._region, L.OFF_PROD_ROLE, self._locks)
        t.reap_producers()
        t.skip_abandoned(self, self._stuck_since)
        if self._kind == "mpmc":
            t.requeue_dead(self, self._zero_seen)
        return 0

    def _eos_ready(self) -> bool:
        """mpmc, drained, every producer done, records still in flight: hand
        back what dead consumers held; the end of the stream only if nothing
        is owed (everything in flight is released or held by a live consumer)."""
        return self._tables.requeue_dead(self, self._zero_seen)

    def _lagged(self):
        t, line = self._tables, self._tables.cline(self._slot)
        # what it missed up to now: sent since it joined, less what it received
        missed = max(t.total_sent() - self._region.load_u64(line + L.CE_BASE)
                     - self._region.load_u64(line + L.CE_RECEIVED), self._region.load_u64(line + L.CE_MISSED))
        nbytes = max(self._region.load_u64(L.MP_OFF_CURSOR) - (self._region.load_u64(line + L.CE_POS) & L.POS_MASK),
                     self._region.load_u64(line + L.CE_MISSED_BYTES))
        raise Lagged(f"subscriber {self._slot} of {self._label} fell behind for longer than the ring's bound "
                     f"and was evicted: it missed {missed} messages ({nbytes} bytes); call rejoin() to go on",
                     missed, nbytes)

    @_exclusive
    def rejoin(self, start: str = "newest") -> None:
        """After :class:`~shmring.Lagged`: start receiving again (broadcast),
        from the newest message or the oldest one still in the ring."""
        if self._kind != "broadcast":
            raise ValueError("rejoin() is for broadcast subscribers")
        if start not in ("oldest", "newest"):
            raise ValueError(f"start must be 'oldest' or 'newest', got {start!r}")
        if self.closed:
            raise HandleClosed("subscriber is closed")
        self._reset(self._tables.join_position(self._slot, start))

    def recv_many(self, max_n: int, *, timeout=None, copy: bool = False) -> list:
        """Up to ``max_n`` messages: waits up to ``timeout`` for the first
        (None: forever; returns [] when it expires), then takes what is
        already there without waiting.  Zero-copy ``Message`` objects (release
        each, or use them in ``with``), or their values with ``copy=True``.
        EndOfStream is raised only when nothing was received."""
        max_n = int(max_n)
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        try:
            first = self.recv(timeout=timeout, copy=copy)
        except Timeout:
            return []
        out = [first]
        try_recv = self.try_recv
        while len(out) < max_n:
            try:
                m = try_recv()
            except (EndOfStream, PeerGone):
                break
            if m is None:
                break
            if copy:
                m = m._take_copy()
            out.append(m)
        return out

    def __iter__(self):
        return self

    _iter_prev = None             # a weak reference to the message iteration handed out last (R67)

    def _release_prev(self, stacklevel: int) -> None:
        """R67: iteration releases the message it handed out before, when the
        next one is requested (a ``with msg:`` body did already: a no-op).
        A message its holder dropped is gone (the weak reference is dead) and
        took the dropped-message path (R39); one never handed to user code
        (no ``.value``, ``kind``, ...) is left to that path too.  A view of it
        still alive is an escaped view: the space waits for it, and the
        warning says what was kept and where the loop is."""
        ref, self._iter_prev = self._iter_prev, None
        prev = ref()
        if prev is None or prev.released or not prev._touched:
            return
        if not prev._exports:
            prev.release()
            return
        what = _describe_kept(prev)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EscapedViewWarning)
            prev.release()
        warnings.warn(EscapedViewWarning(
            f"iterating over the consumer of {self._label} released the previous message (kind "
            f"{prev.kind!r}) when the next one was requested, but {what} is still alive (kept past the "
            f"loop body: stored in a list or a variable, or a REPL's `_` / Jupyter's `Out[]`). Its ring "
            f"space stays held until that view is garbage-collected, so a producer may block on a full "
            f"ring. Keep a copy instead: msg.copy() or recv(copy=True)"), stacklevel=stacklevel + 1)

    def __next__(self):
        """``for msg in cons``: the next message; the one handed out before is
        released now (R67: use it, or copy it, inside the loop body)."""
        if self._iter_prev is not None:
            self._release_prev(2)
        try:
            msg = self.recv()
        except EndOfStream:
            raise StopIteration from None
        self._iter_prev = weakref.ref(msg)
        return msg

    # -- asyncio -------------------------------------------------------------------------
    async def recv_async(self, *, timeout=None, copy: bool = False):
        """``await cons.recv_async()``: the next message, without blocking the
        event loop, spinning a core or using a thread: the await arms a
        wake-up descriptor of the ring's data wake line (R52) that the event
        loop watches, and never takes a message while waiting, so cancelling
        the await (or its timeout) consumes nothing and disarms."""
        return await waiting.wait_until_async(
            lambda: self.try_recv() if not copy else _take_copy(self),
            lambda: [(self, L.OFF_DATA_WAKE, self._arm_data)], self._producers_gone, timeout,
            *self._recv_messages(timeout))

    def fileno(self) -> int:
        """A descriptor for ``select`` / ``selectors`` / ``loop.add_reader``:
        readable when there may be something to receive, or the stream ended.

        Protocol (as pyzmq's ``FD``): when it polls readable, call
        ``try_recv()`` (or ``recv(timeout=0)``) until it returns None (or
        raises EndOfStream / PeerGone); the empty ``try_recv()`` drains the
        descriptor and arms it again, so it turns readable at the next
        message.  A readable descriptor may be spurious (try_recv returns
        None at once).  A producer that dies is not signalled: give the
        select a timeout and call ``recv(timeout=0)`` after a quiet one (it
        raises PeerGone then, and runs the multi-party recovery).  The
        descriptor is the handle's own, closed by ``close()``."""
        w = self.__dict__.get("_fdw")
        if w is None or w.pid != os.getpid():
            self._usable_for_fd()
            w = self._fdw = wakefd.HandleWaker(self, L.OFF_DATA_WAKE, self._arm_data)
            ref = weakref.ref(self)
            core_try, core_try_bytes = _core.ConsumerCore.try_recv, _core.ConsumerCore._try_recv_bytes

            def rearming(core):
                def attempt():               # an empty receive re-arms the descriptor
                    s = ref()
                    m = core(s)
                    if m is None:
                        s._fdw.rearm()
                    return m
                return attempt
            self.try_recv, self._try_recv_bytes = rearming(core_try), rearming(core_try_bytes)
        return w.fileno()

    def _usable_for_fd(self):
        if self.closed:
            raise HandleClosed("consumer is closed")
        if self._inherited:
            raise ShmringError("this consumer was created before fork(); take a new one in this process")

    def _close_fd(self):
        w = self.__dict__.pop("_fdw", None)
        if w is not None:
            self.__dict__.pop("try_recv", None)
            self.__dict__.pop("_try_recv_bytes", None)
            if w.pid == os.getpid():
                w.close()

    def __aiter__(self):
        return self

    async def __anext__(self):
        """``async for msg in cons``.  While messages are waiting it yields to
        the event loop once every 32, so other tasks keep running."""
        n = getattr(self, "_async_n", 0) + 1
        self._async_n = n
        if n % 32 == 0:
            import asyncio
            await asyncio.sleep(0)
        if self._iter_prev is not None:
            self._release_prev(2)
        try:
            msg = await self.recv_async()
        except EndOfStream:
            raise StopAsyncIteration from None
        self._iter_prev = weakref.ref(msg)
        return msg

    @_exclusive
    def close(self) -> None:
        """Give up the consumer role.  spsc / mpsc: messages not released yet
        will be delivered again to the next consumer (at-least-once).
        broadcast / mpmc: messages still held stay valid and this handle
        leaves the table when the last of them is released.  Idempotent."""
        if not self._done:
            _core.finish(self._close_steps)

    def _close_steps(self) -> None:
        # R50: each step re-doable (core.finish redoes them after an interrupt)
        self._close_fd()
        if self._inherited or self._tables is None or self._kind == "mpsc":
            self._mark_closed()
            if not self._inherited:           # a forked child: the role or entry is the parent's
                self._role.give_back(self._region)
        # Messages still held keep their space (broadcast: our position gates
        # the producer; mpmc: the records stay ours) until they are released:
        # then the entry is given back (C, R35).  A holder that dies instead is
        # recovered as dead (mpmc: its records are redelivered).
        elif not self._close_later():
            self._leave_table()
        self._done = True

    __reduce__ = _no_pickle

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmring.Consumer of {self._label} at position {self.position}{' closed' if self.closed else ''}>"


def _readables(readables) -> list:
    handles = list(readables)
    if not handles:
        raise ValueError("wait() needs at least one consumer or subscriber handle")
    for h in handles:
        if not isinstance(h, (Consumer, records.RecordConsumer)):
            raise TypeError(f"wait() takes Consumer handles (ring.consumer() / ring.subscribe()) or record "
                            f"consumers, got {type(h).__name__}")
    return handles


def _data_arm(h):
    if isinstance(h, Consumer):
        return (h, L.OFF_DATA_WAKE, h._arm_data)
    return h._data_arm()


def wait(readables, timeout=None) -> list:
    """Wait until at least one of the consumer / subscriber handles (or record
    consumers) in ``readables`` has something to receive (a message, or the
    end of its stream), like ``select`` for rings; return those handles in
    the order given, or ``[]`` when ``timeout`` seconds pass first (None: no
    limit).

    Idle, it sleeps in the kernel on every ring's wake word at once
    (``futex_waitv``, Linux 5.16+; older kernels fall back to 1 ms naps), and
    wakes every ``WAIT_SLICE`` seconds to run signal handlers (Ctrl-C) and
    the multi-party recovery (dead producers, abandoned claims).  Up to 128
    handles.  With a record consumer among them it arms a wake-up
    descriptor on each ring instead (R52) and sleeps in ``select``.
    """
    handles = _readables(readables)
    if all(isinstance(h, Consumer) for h in handles):
        def sleep(t):
            # After a quiet slice, the multi-party recovery.  It runs here, not as
            # on_slice: no peer's death ends this wait, and a poll (timeout=0) never
            # sleeps, so it stays as cheap as checking the handles.
            if _core.wait_any(handles, t):
                return True
            for h in handles:
                h._producers_gone()
            return False
    else:
        if len(handles) > 128:
            raise ValueError(f"wait on 1 to 128 handles, got {len(handles)}")

        def sleep(t):
            if wakefd.sleep_select([_data_arm(h) for h in handles], t):
                return True
            for h in handles:
                if isinstance(h, Consumer):
                    h._producers_gone()
            return False

    try:
        return waiting.wait_until(lambda: [h for h in handles if h._has_data()] or None, sleep, None, timeout,
                                  lambda: "nothing to receive")
    except Timeout:
        return []


async def wait_async(readables, timeout=None) -> list:
    """``await shmring.wait_async([cons_a, sub, rec_cons], timeout=1)``:
    :func:`wait` for asyncio, with no thread: it arms a wake-up descriptor on
    every ring's data wake line (R52), which the event loop watches.  Returns
    the handles with something to receive, or ``[]`` on timeout; cancelling
    it disarms them all."""
    handles = _readables(readables)

    def quiet():
        for h in handles:
            if isinstance(h, Consumer):
                h._producers_gone()
        return 0

    try:
        return await waiting.wait_until_async(lambda: [h for h in handles if h._has_data()] or None,
                                              lambda: [_data_arm(h) for h in handles], quiet, timeout,
                                              lambda: "nothing to receive")
    except Timeout:
        return []


def _describe_kept(msg) -> str:
    """What kind of view of ``msg`` is alive, for an escaped-view warning."""
    try:
        v = msg.value
        if isinstance(v, np.ndarray):
            return f"a view of it (its {v.dtype} array of shape {v.shape}, msg.value)"
        if isinstance(v, memoryview):
            return f"a view of it (a memoryview of its {v.nbytes}-byte payload, msg.value)"
        return f"a view of it (an array inside its {type(v).__name__}, msg.value)"
    except Exception:
        return "a view"


def _take_copy(cons):
    m = cons.try_recv()
    return None if m is None else m._take_copy()


def _size_hint(data) -> int:
    """Payload bytes a value needs (what a wait for room must wait for)."""
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    if isinstance(data, np.ndarray):
        meta = codec.array_meta(data)
        if meta is not None:
            return 8 + len(meta) + 63 + data.nbytes
    if not isinstance(data, (np.ndarray, np.generic)) and _is_bytes_like(data):
        return memoryview(data).nbytes
    return codec.encode(data).max_payload
