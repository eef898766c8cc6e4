"""Record rings: an spsc ring of fixed-dtype records, moved in batches.

``Ring.create(name, capacity, dtype=np.dtype([...]))`` makes a ring whose data
area is an array of ``capacity // itemsize`` records with no per-record
header (layout: the record-ring diagram in :mod:`shmring.layout`).

* ``producer.send_many(records)``: one copy of the whole batch into the ring
  (two slices when it wraps), then one release store of the position.
* ``consumer.recv_many(max_n)``: a :class:`RecordBatch`, read-only numpy views
  of up to ``max_n`` records in place (one view, or two when the batch wraps;
  ``batch.contiguous()`` copies only in that case), valid until released.

Python drives it: per batch it is a handful of calls, the copy is numpy's,
and positions and waits go through the C core's atomics and futex (Region);
the roles and the wait loop are those of every ring (:mod:`shmring.roles`,
:mod:`shmring.waiting`).
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import warnings

import msgpack
import numpy as np

from . import _core, codec, roles, waiting, wakefd
from . import layout as L
from .errors import CorruptSegmentError, EndOfStream, HandleClosed, PeerGone, ShmringError, UnsupportedType

CLOSED_EOS, CLOSED_ABORTED = 1, 2

def _inherited(handle) -> bool:
    """Made before a fork (the C core's fork generation, the one ownership
    test of every handle): in a forked child it is the parent's, and may only
    be dropped there, never change the parent's shared state."""
    return handle._gen != _core.fork_generation()


def _exclusive(method):
    """One thread at a time: a call holds its handle to its end (waits
    included); another thread's call meanwhile raises ShmringError instead of
    interleaving with it (the positions are plain Python attributes)."""
    @functools.wraps(method)
    def held(self, *args, **kwargs):
        lock = self._use_lock
        if not lock.acquire(False):              # (positional: the keyword costs ~0.35 us per call)
            raise ShmringError(f"this {type(self).__name__} of {self._label} is in use by another thread "
                               "inside a call of it; a handle is not thread-safe: give each thread its own "
                               "handle, or serialize its calls with a lock (releasing a batch from any "
                               "thread is fine)")
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release()
    return held


def _dropped(handle, what: str, _finalizing=sys.is_finalizing) -> bool:
    """A handle being garbage-collected without close(): True (after a
    ResourceWarning) if it still holds something of this process: open (or
    its close cut short by an interrupt: R50),
    made in this process (not inherited through fork), and not at
    interpreter exit (the process's roles are then recovered as a dead one's)."""
    if _finalizing() or handle.__dict__.get("_done", True) or _inherited(handle):
        return False
    try:
        warnings.warn(f"{handle!r} was garbage-collected without close(): {what}; use it in a with block "
                      "or call close()", ResourceWarning, stacklevel=2)
    except Exception:
        pass
    return True


def prepare(dtype, capacity: int) -> tuple[np.dtype, bytes, int]:
    """(dtype, its description, slots) for a new record ring."""
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects; a record ring needs a fixed-size dtype")
    if dt.itemsize == 0:
        raise ValueError(f"dtype {dt} has itemsize 0")
    np.empty(0, dt)             # what attach checks: numpy can make arrays of it
    descr = msgpack.packb(codec._dtype_spec(dt))
    if len(descr) > L.RC_MAX_DESCR:
        raise ValueError(f"dtype {dt} takes {len(descr)} bytes to describe; a record ring holds up to "
                         f"{L.RC_MAX_DESCR}")
    slots = capacity // dt.itemsize
    if slots < 2:
        raise ValueError(f"capacity {capacity} holds fewer than 2 records of {dt.itemsize} bytes")
    return dt, descr, slots


def write_fields(buf, dt: np.dtype, descr: bytes, slots: int) -> None:
    L.RC_STRUCT.pack_into(buf, L.RC_OFF_ITEMSIZE, dt.itemsize, slots, len(descr))
    buf[L.RC_OFF_DESCR:L.RC_OFF_DESCR + len(descr)] = descr


def read_fields(buf, h: dict, what: str) -> dict:
    """The record fields of a header, checked (every field is untrusted)."""
    itemsize, slots, n = L.RC_STRUCT.unpack_from(buf, L.RC_OFF_ITEMSIZE)
    try:
        if not (0 < n <= L.RC_MAX_DESCR):
            raise ValueError(f"description length {n}")
        dt = codec._dtype_from_spec(msgpack.unpackb(bytes(buf[L.RC_OFF_DESCR:L.RC_OFF_DESCR + n])))
        np.empty(0, dt)         # numpy can make arrays of it (a subarray nested past 64 dimensions cannot)
    except Exception as e:
        raise CorruptSegmentError(f"{what} has a bad record dtype description: {e}") from None
    if dt.itemsize != itemsize or itemsize == 0 or slots != h["capacity"] // itemsize:
        raise CorruptSegmentError(f"{what}: record geometry {itemsize} x {slots} does not match "
                                  f"dtype {dt} and capacity {h['capacity']}")
    return {"dtype": dt, "slots": slots}


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


class _Handle:
    """What both record handles share: the array over the data area, positions, fork check."""

    def _setup(self, ring, spin):
        h = ring._header
        self.dtype, self.slots = h["dtype"], h["slots"]
        self._arr = np.frombuffer(ring._seg.view(), self.dtype, count=self.slots, offset=L.HEADER_SIZE)
        self.spin = float(spin)
        self._label = ring._seg.label
        self._pid, self._gen = os.getpid(), _core.fork_generation()
        self._use_lock = threading.RLock()          # held by the thread inside a call (_exclusive)
        self._closed = self._done = False       # _done: its close ran to the end (R50)

    def _usable(self):
        if self._closed:
            raise HandleClosed(f"this record {'producer' if isinstance(self, RecordProducer) else 'consumer'} "
                               f"of {self._label} is closed")
        if _inherited(self):
            raise ShmringError("this handle was created before fork(); a forked child must take its own "
                               "handle (ring.producer() / ring.consumer())")
        self._region._guard_check()                 # R47: a truncated backing

    def _positions(self):
        r = self._region
        wp, rp = r.load_u64(L.OFF_WRITE_POS), r.load_u64(L.OFF_READ_POS)
        r._guard_check()                            # R47: zeros from a vanished page are not positions
        if rp > wp or wp - rp > self.slots:
            raise CorruptSegmentError(f"{self._label}: record positions out of order (read {rp}, write {wp}, "
                                      f"{self.slots} slots)")
        return wp, rp

    @property
    def closed(self) -> bool:
        return self._closed


class RecordProducer(_Handle):
    """The producer of a record ring (a context manager; exiting closes the stream)."""

    def __init__(self, ring, spin):
        region = ring._live_region()
        if region.load_u32(L.OFF_PROD_ROLE + L.ROLE_CLOSED):
            raise HandleClosed(f"the stream of {ring._seg.label} was closed by its producer")
        self._role = roles.ring_role(ring, L.OFF_PROD_ROLE)
        held = roles.hold_interrupts()        # R51: the claim and the handle that records it, one step
        try:
            self._role.claim(region)
            self._region = _core.Region(ring._seg.buf)     # our own: usable after a fork made the ring's stale
            self._setup(ring, spin)
        finally:
            roles.resume_interrupts(held)
        self._wp, self._rp = self._positions()
        # copies go through bytes: numpy copies a structured dtype field by field (~15x slower)
        self._bytes = np.frombuffer(ring._seg.view(), np.uint8, count=self.slots * self.dtype.itemsize,
                                    offset=L.HEADER_SIZE)

    def _as_records(self, records) -> np.ndarray:
        a = records if isinstance(records, np.ndarray) else self._convert(records)
        if a.dtype != self.dtype:
            raise TypeError(f"records of dtype {a.dtype} sent to a ring of dtype {self.dtype}; "
                            f"convert them first (e.g. arr.astype(ring.dtype))")
        if a.ndim == 0:
            a = a.reshape(1)
        if a.ndim != 1:
            raise ValueError(f"send_many takes a 1-D array of records, got shape {a.shape}")
        return a

    def _room(self) -> int:
        free = self.slots - (self._wp - self._rp)
        if free == 0:
            wp, rp = self._positions()
            if wp != self._wp:
                raise CorruptSegmentError(f"{self._label}: the write position moved under its producer")
            self._rp = rp
            free = self.slots - (wp - rp)
        return free

    def _put(self, a: np.ndarray) -> None:
        """Copy a (len <= room) in and publish it."""
        n, o = len(a), self._wp % self.slots
        first = min(n, self.slots - o)
        if a.flags.c_contiguous:
            isz = self.dtype.itemsize
            raw = a.view(np.uint8).reshape(-1)
            self._bytes[o * isz:(o + first) * isz] = raw[:first * isz]
            if first < n:
                self._bytes[:(n - first) * isz] = raw[first * isz:]
        else:
            self._arr[o:o + first] = a[:first]
            if first < n:
                self._arr[:n - first] = a[first:]
        self._wp += n
        self._region.publish_u64(L.OFF_WRITE_POS, self._wp, L.OFF_DATA_WAKE)  # after the copy

    @_exclusive
    def try_send_many(self, records) -> int:
        """Send as many records as fit now; returns how many."""
        self._usable()
        a = self._as_records(records)
        k = min(len(a), self._room())
        if k:
            self._put(a[:k])
        return k

    @_exclusive
    def send_many(self, records, *, timeout=None) -> int:
        """Send a 1-D array (or a sequence) of records, waiting for room as needed
        (each wait up to ``timeout`` seconds); returns the count."""
        self._usable()
        a = self._as_records(records)
        done = 0
        while done < len(a):
            k = min(len(a) - done, self._room())
            if k == 0:
                k = waiting.wait_until(
                    lambda: self._room() or None,
                    lambda t: self._region.wait_change(L.OFF_READ_POS, self._rp, L.OFF_SPACE_WAKE, -1, t, self.spin),
                    lambda: roles.dead_holder(self._region, L.OFF_CONS_ROLE, self._role._locks), timeout,
                    lambda: f"record ring {self._label} stayed full for {timeout} s",
                    lambda pid: f"the consumer (pid {pid}) of {self._label} died while the ring was full")
                k = min(len(a) - done, k)
            self._put(a[done:done + k])
            done += k
        return done

    async def send_many_async(self, records, *, timeout=None) -> int:
        """``await prod.send_many_async(arr)``: :meth:`send_many` without
        blocking the event loop and with no thread (a wake-up descriptor of
        the space wake line, R52); cancelling it while it waits sends no more
        (the records sent before stay sent).  Returns the count."""
        self._usable()
        a = self._as_records(records)
        done = 0
        while done < len(a):
            k = await waiting.wait_until_async(
                lambda: self._room() or None,
                lambda: [(self._region, L.OFF_SPACE_WAKE,
                          lambda w: self._region.arm_change(w, L.OFF_READ_POS, self._rp, L.OFF_SPACE_WAKE, -1))],
                lambda: roles.dead_holder(self._region, L.OFF_CONS_ROLE, self._role._locks), timeout,
                lambda: f"record ring {self._label} stayed full for {timeout} s",
                lambda pid: f"the consumer (pid {pid}) of {self._label} died while the ring was full")
            self._usable()
            k = min(len(a) - done, k)
            self._put(a[done:done + k])
            done += k
        return done

    def _convert(self, records) -> np.ndarray:
        """Records as an array of this ring's dtype; anything numpy cannot
        read as such (bytes, str, dicts, ...) is UnsupportedType."""
        try:
            if isinstance(records, (bytes, bytearray, memoryview, str, dict)):
                raise TypeError("not a record")
            return np.array(records, dtype=self.dtype)
        except (TypeError, ValueError) as e:
            raise UnsupportedType(
                f"a record ring of {self._label} takes records of dtype {self.dtype} (a tuple of field values, "
                f"a numpy void or an array of that dtype), not {type(records).__name__} "
                f"{_short(records)} ({e}); a ring of messages (Ring.create without kind='records') "
                "takes bytes and objects") from None

    @_exclusive
    def send(self, record, *, timeout=None) -> None:
        """Send one record (a numpy void / 0-d array or a tuple of field values)."""
        self.send_many(record if isinstance(record, np.ndarray) else self._convert(record), timeout=timeout)

    @property
    def position(self) -> int:
        return self._wp

    @_exclusive
    def close(self, *, _status: int = CLOSED_EOS) -> None:
        """End the stream: the consumer drains what was sent, then gets EndOfStream."""
        if not self._done:
            _core.finish(self._close_steps, _status)

    def _close_steps(self, status: int) -> None:
        # R50: each step re-doable (core.finish redoes them after an interrupt)
        if not _inherited(self):      # a forked child: the parent's stream; only this copy is dropped
            self._region.store_u32(L.OFF_PROD_ROLE + L.ROLE_CLOSED, status)
            self._region.wake(L.OFF_DATA_WAKE)
        self._detach_steps()

    @_exclusive
    def detach(self) -> None:
        """Give up the producer role without ending the stream (another
        producer may attach and continue it)."""
        if not self._done:
            _core.finish(self._detach_steps)

    def _detach_steps(self) -> None:
        self._closed = True
        if not _inherited(self):
            self._role.give_back(self._region)
        self._done = True

    def __del__(self, _dropped=_dropped):      # (bound now: at interpreter exit the module's globals are gone)
        # Dropped without close(): give the role back, leave the stream open (as Producer)
        if _dropped(self, "it was detached (role given back, stream left open)"):
            _core.finish_quietly(self._detach_steps)   # R50: an interrupt in here is delivered again, after

    def __repr__(self):
        return f"<shmring.RecordProducer of {self._label} at record {self._wp}{' closed' if self._closed else ''}>"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(_status=CLOSED_EOS if exc_type is None else CLOSED_ABORTED)

    def __reduce__(self):
        raise TypeError("a producer handle cannot be pickled; pass the Ring")


class RecordBatch:
    """Records received in place: ``arrays`` holds one read-only view, or two
    when the batch wraps around the end of the ring.  Valid until released
    (``release()`` or the end of a ``with`` block); a view kept past release
    holds the ring space until it is garbage-collected (EscapedViewWarning).

    The views are numpy arrays over one ``_core.Lease`` of the batch's space,
    the same escaped-view mechanism as ``Message`` and ``Snapshot``."""

    def __init__(self, lease, n: int, arrays: list):
        self._lease = lease
        self.arrays = arrays
        self._n = n

    def __len__(self) -> int:
        return self._n

    def contiguous(self) -> np.ndarray:
        """The records as one array: the view itself, or a copy if the batch wraps."""
        if self.arrays is None:
            raise HandleClosed("batch was released")
        return self.arrays[0] if len(self.arrays) == 1 else np.concatenate(self.arrays)

    def copy(self) -> np.ndarray:
        """A detached copy of the records."""
        if self.arrays is None:
            raise HandleClosed("batch was released")
        return np.concatenate(self.arrays) if len(self.arrays) > 1 else self.arrays[0].copy()

    def release(self) -> None:
        lease, self._lease, self.arrays = self._lease, None, None   # our own views go first
        if lease is not None:
            lease.release()        # a view still alive now escaped: the space waits for it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        if self._lease is not None:
            self.release()

    def __repr__(self):
        return f"<shmring.RecordBatch of {self._n} records{' released' if self._lease is None else ''}>"


_ESCAPED = ("a view of a record batch outlived the batch; the ring space is held until the view is "
            "garbage-collected (use batch.copy() to keep records)")


class RecordConsumer(_Handle):
    """The consumer of a record ring (a context manager; exiting detaches)."""

    def __init__(self, ring, spin):
        self._role = roles.ring_role(ring, L.OFF_CONS_ROLE)
        held = roles.hold_interrupts()        # R51: the claim and the handle that records it, one step
        try:
            self._role.claim(ring._live_region())
            self._region = _core.Region(ring._seg.buf)
            self._setup(ring, spin)
        finally:
            roles.resume_interrupts(held)
        wp, rp = self._positions()
        self._next = self._rp = rp
        self._wp = wp
        self._out = []          # [start, end, done] of batches handed out, in order
        self._book = threading.RLock()   # _out and _rp: a batch may be released from any thread
        self.received = 0

    def _finish(self, start: int, _finalizing=sys.is_finalizing) -> None:   # (bound: globals go at exit)
        if _finalizing():
            return          # interpreter exit: module globals are gone; the process's roles go with it
        with self._book:        # reentrant: the collector may release another batch in here
            for e in self._out:
                if e[0] == start:
                    e[2] = True
                    break
            rp = self._rp
            while self._out and self._out[0][2]:
                rp = self._out.pop(0)[1]
            if rp > self._rp and not self._closed and not _inherited(self):
                self._rp = rp
                self._region.publish_u64(L.OFF_READ_POS, rp, L.OFF_SPACE_WAKE)   # after our last read

    def _available(self) -> int:
        wp = self._region.load_u64(L.OFF_WRITE_POS)    # pairs with the producer's publish_u64
        self._region._guard_check()                     # R47: zeros from a vanished page are no position
        if wp < self._next or wp - self._rp > self.slots:
            raise CorruptSegmentError(f"{self._label}: producer position {wp} out of range")
        self._wp = wp
        return wp - self._next

    def _take(self, max_n):
        """A batch of what is there now, or None; EndOfStream once drained after close."""
        n = self._available()
        if n == 0:
            how = self._region.load_u32(L.OFF_PROD_ROLE + L.ROLE_CLOSED)
            if how not in (0, CLOSED_EOS, CLOSED_ABORTED):
                raise CorruptSegmentError(f"{self._label}: producer status word is {how} (expected 0, 1 or 2)")
            if how and self._available() == 0:
                if how == CLOSED_EOS:
                    raise EndOfStream(f"end of stream: the producer closed {self._label}")
                raise PeerGone(f"the producer of {self._label} stopped on an error; every record it sent "
                               "was received")
            return None
        if max_n is not None:
            n = min(n, max_n)
        start, o = self._next, self._next % self.slots
        first = min(n, self.slots - o)
        dt, isz = self.dtype, self.dtype.itemsize
        lease = _core.Lease(self._region, L.HEADER_SIZE, self.slots * isz, functools.partial(self._finish, start),
                            _ESCAPED)
        arrays = [np.frombuffer(lease, dt, first, o * isz)]
        if first < n:
            arrays.append(np.frombuffer(lease, dt, n - first, 0))
        self._next += n
        self._out.append([start, start + n, False])
        self.received += n
        return RecordBatch(lease, n, arrays)

    @_exclusive
    def try_recv_many(self, max_n: int | None = None):
        """A :class:`RecordBatch` of up to ``max_n`` records (None: all there are), or None."""
        self._usable()
        b = self._take(max_n)
        if b is None and self._fdw is not None:
            self._fdw.rearm()                       # fileno(): empty, so drain and arm again
        return b

    def _data_arm(self):
        """(region, wake offset, arm): the wake-up descriptor of new records (R52)."""
        r = self._region
        return (r, L.OFF_DATA_WAKE,
                lambda w: r.arm_change(w, L.OFF_WRITE_POS, self._next, L.OFF_DATA_WAKE, L.OFF_PROD_ROLE + L.ROLE_CLOSED))

    def _has_data(self) -> bool:
        """Records to take, or the end of the stream (``shmring.wait``)."""
        self._usable()
        return self._available() > 0 or self._region.load_u32(L.OFF_PROD_ROLE + L.ROLE_CLOSED) != 0

    def _producers_gone(self) -> int:
        return roles.dead_holder(self._region, L.OFF_PROD_ROLE, self._role._locks)

    _fdw = None

    def fileno(self) -> int:
        """A descriptor for ``select`` / ``selectors``: readable when there may
        be records to take, or the stream ended.  When it polls readable,
        call ``try_recv_many()`` until it returns None (which drains and
        re-arms the descriptor) or raises EndOfStream / PeerGone; as for
        :meth:`shmring.Consumer.fileno`, a dead producer is noticed by
        ``recv_many(timeout=0)`` after a quiet select timeout."""
        w = self._fdw
        if w is None or w.pid != os.getpid():
            self._usable()
            w = self._fdw = wakefd.HandleWaker(*self._data_arm())
        return w.fileno()

    async def recv_many_async(self, max_n: int | None = None, *, timeout=None, copy: bool = False):
        """``await cons.recv_many_async()``: :meth:`recv_many` without blocking
        the event loop and with no thread (a wake-up descriptor of the data
        wake line, R52); cancelling it takes nothing."""
        self._usable()
        if max_n is not None and int(max_n) < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        b = await waiting.wait_until_async(
            lambda: self._take(max_n), lambda: [self._data_arm()], self._producers_gone, timeout,
            lambda: f"no records arrived on {self._label} within {timeout} s",
            lambda pid: f"the producer (pid {pid}) of {self._label} died without closing the stream; "
                        "every record it sent was received")
        if copy:
            with b:
                out = b.copy()
            self._region._guard_check()
            return out
        return b

    @_exclusive
    def recv_many(self, max_n: int | None = None, *, timeout=None, copy: bool = False):
        """Wait up to ``timeout`` seconds (None: forever) for records, then return
        a :class:`RecordBatch` of up to ``max_n`` of them (or, with
        ``copy=True``, one detached ndarray).  Raises Timeout or EndOfStream."""
        self._usable()
        if max_n is not None and int(max_n) < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        b = self._take(max_n)
        if b is None:
            b = waiting.wait_until(
                lambda: self._take(max_n),
                lambda t: self._region.wait_change(L.OFF_WRITE_POS, self._next, L.OFF_DATA_WAKE,
                                                   L.OFF_PROD_ROLE + L.ROLE_CLOSED, t, self.spin),
                lambda: roles.dead_holder(self._region, L.OFF_PROD_ROLE, self._role._locks), timeout,
                lambda: f"no records arrived on {self._label} within {timeout} s",
                lambda pid: f"the producer (pid {pid}) of {self._label} died without closing the stream; "
                            "every record it sent was received")
        if copy:
            with b:
                out = b.copy()
            self._region._guard_check()                 # R47: a copy of vanished pages is zeros, not records
            return out
        return b

    def __iter__(self):
        while True:
            try:
                yield self.recv_many()
            except EndOfStream:
                return

    @property
    def pending(self) -> int:
        return sum(1 for e in self._out if not e[2])

    @property
    def position(self) -> int:
        return self._rp

    @_exclusive
    def close(self) -> None:
        """Give up the consumer role (records not released are delivered again)."""
        if not self._done:
            _core.finish(self._close_steps)

    def _close_steps(self) -> None:
        # R50: each step re-doable (core.finish redoes them after an interrupt)
        self._closed = True
        w, self._fdw = self._fdw, None
        if w is not None and not _inherited(self):
            w.close()                               # disarm (R54) and close the descriptor
        if not _inherited(self):
            self._role.give_back(self._region)
        self._done = True

    def __del__(self, _dropped=_dropped):      # (bound now: at interpreter exit the module's globals are gone)
        if _dropped(self, "its role was given back"):
            _core.finish_quietly(self._close_steps)    # R50: an interrupt in here is delivered again, after

    def __repr__(self):
        return f"<shmring.RecordConsumer of {self._label} at record {self._rp}{' closed' if self._closed else ''}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        raise TypeError("a consumer handle cannot be pickled; pass the Ring")
