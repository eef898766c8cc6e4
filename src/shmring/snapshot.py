"""Copy-on-write shared state: readers hold consistent snapshots while a writer publishes.

RCU across processes.  A :class:`SharedState` segment holds ``slots`` (>= 3)
version slots of ``nbytes`` each, a *current* word naming the newest version
and its slot, and a reader table where each reading process pins the version
it is reading.  The contract:

* ``publish(value)`` copies the value once into a slot that is neither
  current nor pinned, then makes it current with one atomic store.  Readers
  never block the writer while such a slot exists; the writer waits (up to its
  timeout) only when every spare slot is pinned.
* ``with state.read() as snap`` pins the current version: ``snap.value`` is a
  read-only zero-copy view of it, consistent (never torn) for the whole block,
  however many versions the writer publishes meanwhile.
* ``with state.update() as draft`` gives a writable copy of the current value
  in a free slot; it is published on normal exit and discarded on an exception.
* One writer at a time: a second live writer gets :class:`~shmring.errors.RoleTaken`
  naming the holder's pid; a dead writer's role is taken over (the same
  :class:`~shmring.roles.Role` as a ring's producer).  A writer killed
  mid-update never published its slot: readers keep the last version.
* Pins of dead readers (pid gone or reused, see :mod:`shmring._proc`) are
  reclaimed by the writer when it needs their slot, and counted in ``stats()``.

Example::

    with shmring.SharedState.create("weights", 32 << 20) as state:
        state.publish({"step": 0, "w": np.zeros((1000, 1000), np.float32)})
        with state.update() as draft:
            draft["w"][3] += 1.0             # published on exit

    state = shmring.SharedState.attach("weights")     # in another process
    with state.read() as snap:
        act(snap.version, snap.value["w"])  # read-only view, valid in the block

Lifetime of a snapshot's views: they point into the pinned slot and are valid
until the ``read()`` block exits.  A view kept past the block is detected when
the snapshot is released: the version stays pinned until the view is
garbage-collected, and :class:`~shmring.errors.EscapedViewWarning` is issued
(``snap.copy()`` detaches a value).  The layout is drawn in
:mod:`shmring.layout`; the protocol and its memory ordering are in
``docs/design.md``.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from contextlib import contextmanager

import numpy as np

from . import _core, _interop, codec, roles, waiting
from . import layout as L
from ._proc import my_start_time
from .errors import (CorruptSegmentError, EndOfStream, HandleClosed, IncompatibleSegment, MessageTooLarge, SegmentTruncated,
                     ShmringError, Timeout)
from .segment import (Segment, SegmentHandle, fd_reference, hide_word_access, open_fd_reference,
                      read_common_header)
from .waiting import DEFAULT_SPIN

MAX_SLOT_BYTES = 1 << 44
# R57-R59: the writer role's "closed" word (unused by the writer role otherwise)
# says the last writer finished: set by a writer handle's close(), cleared by the
# next writer's claim.  Waits in wait_newer() end on it with EndOfStream.
OFF_WRITER_FINISHED = L.ST_OFF_WRITER + L.ROLE_CLOSED


def _decode(snap):
    """``snap.value``: :func:`shmring.codec._decode`, plus, for an array value, a
    one-entry cache per handle keyed by (slot, version).  A version's bytes never
    change while it is pinned, and a (slot, version) pair is never reused (versions
    only grow), so the descriptor parsed and bounds-checked on the first read of a
    version stays valid for every later read of it: then a read is one np.ndarray call."""
    if snap.type != L.T_ARRAY or snap._writable:
        return codec._decode(snap)
    st = snap._state
    key = (snap.slot, snap.version)
    c = st._array_cache
    if c is None or c[0] != key:
        a = codec._decode(snap)                        # validates the payload
        n = snap.nbytes
        with memoryview(snap) as mv:                   # (the handle may be closed; the snapshot is not)
            meta_len = codec.PREFIX.unpack_from(mv, 0)[0]
            meta = bytes(mv[codec.PREFIX.size:codec.PREFIX.size + meta_len])
        base = snap._offset
        area = L.align(base + codec.PREFIX.size + meta_len, L.ARRAY_ALIGN) - base
        _dt, shape, order, off, nbytes, _count = codec._parse_descriptor(codec.msgpack.unpackb(meta))
        if area + off + nbytes > n or a.shape != shape or a.dtype != _dt:
            return a
        st._array_cache = (key, a.dtype, shape, area + off, order) if nbytes else None
        return a
    a = np.ndarray(c[2], c[1], buffer=snap, offset=c[3], order=c[4])   # read-only: snap exports read-only
    return a


_core._set_state_codec(_decode)


def _write_state_header(buf, *, nbytes: int, slots: int, max_readers: int) -> None:
    g = L.state_geometry(nbytes, slots, max_readers)
    buf[:L.HEADER_STRUCT.size] = L.HEADER_STRUCT.pack(
        L.MAGIC, L.LAYOUT_VERSION, L.KIND_STATE, L.LAYOUT_HASH, g["capacity"], g["first_slot"], nbytes,
        os.getpid(), 0, my_start_time(), time.time_ns(), g["segment_size"])
    L.ST_STRUCT.pack_into(buf, L.ST_OFF_SLOTS, slots, max_readers, g["slot_size"], g["table_offset"],
                          g["first_slot"])


def _validate_state_header(seg: Segment, wait_ready: float = 1.0) -> dict:
    """Check a mapped segment is a SharedState and its fields are consistent.  Every field is untrusted."""
    what = seg.label
    h = read_common_header(seg, wait_ready=wait_ready)
    if h["kind"] != L.KIND_STATE:
        if h["kind"] in L.KIND_NAMES:
            raise IncompatibleSegment(f"{what} is a shmring {L.KIND_NAMES[h['kind']]} ring, not a "
                                      "SharedState; open it with shmring.Ring.attach()")
        raise CorruptSegmentError(f"{what} has unknown segment kind {h['kind']}")
    h.update(zip(L.ST_FIELDS, L.ST_STRUCT.unpack_from(seg.buf, L.ST_OFF_SLOTS)))
    slots, readers, nbytes = h["slots"], h["max_readers"], h["max_message"]
    if not (L.ST_MIN_SLOTS <= slots <= L.ST_MAX_SLOTS and 1 <= readers <= L.ST_MAX_READERS
            and nbytes <= MAX_SLOT_BYTES):
        raise CorruptSegmentError(f"{what} has impossible geometry: {slots} slots, {readers} readers, "
                                  f"values of {nbytes} bytes")
    g = L.state_geometry(nbytes, slots, readers)
    for k in ("slot_size", "table_offset", "first_slot", "segment_size"):
        if h[k] != g[k]:
            raise CorruptSegmentError(f"{what} has inconsistent header field {k}: {h[k]}, expected {g[k]} "
                                      f"for {slots} slots of {nbytes} bytes and {readers} readers")
    if h["capacity"] == g["capacity"] and h["data_offset"] == g["first_slot"] and seg.size < g["segment_size"]:
        raise SegmentTruncated(f"{what} is {seg.size:,} bytes but its header says {h['segment_size']:,}: "
                               "it was truncated")
    if h["capacity"] != g["capacity"] or h["data_offset"] != g["first_slot"] or seg.size < g["segment_size"]:
        raise CorruptSegmentError(f"{what} is {seg.size:,} bytes but its header says {h['segment_size']:,}: "
                                  "truncated or corrupt")
    return h


def _slot_bytes(enc: codec.Encoded) -> int:
    """Exact payload bytes of ``enc`` in a slot (a slot payload starts 64-aligned,
    so the padding before the array area is known, unlike in a ring)."""
    n = codec.PREFIX.size + len(enc.meta)
    return L.align(n, L.ARRAY_ALIGN) + enc.area_len if enc.blocks else n


def _writable(obj):
    """Make the arrays of a decoded draft writable (their buffer is the writer's slot)."""
    if isinstance(obj, np.ndarray):
        obj.flags.writeable = True
    elif isinstance(obj, dict):
        for v in obj.values():
            _writable(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _writable(v)
    return obj


def _detached(obj):
    """A copy of a decoded value whose arrays (and tensors) own their memory."""
    if isinstance(obj, np.ndarray):
        return obj.copy(order="K")
    if _interop.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_detached(v) for v in obj]
    return obj


def _readonly(obj):
    if isinstance(obj, np.ndarray):
        obj.flags.writeable = False
    elif _interop.is_tensor(obj):
        obj.set_()            # torch has no read-only flag: the draft's tensor is pointed away from the slot
    elif isinstance(obj, dict):
        for v in obj.values():
            _readonly(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _readonly(v)


@hide_word_access
class SharedState(_core.StateCore, SegmentHandle):
    """The latest version of a value, shared by one writer and many readers.

    ``create`` makes the segment (``nbytes`` is the largest encoded value, a
    slot's payload); ``attach`` maps an existing one.  ``close()`` detaches
    (and gives back the writer role and reader entries); ``unlink()`` removes
    the name.  Used as a context manager, a state made by :meth:`create` is
    closed and, for a POSIX segment, unlinked on exit.  A SharedState pickles
    by name, so a child process attaches on unpickling.

    ``read()`` is implemented in C (pin and unpin are one C call each), and so
    is ``publish()`` of a contiguous array once this handle holds the writer role.
    """

    # Called from C by name (see the callback table in src/shmring/_core/module.c):
    # _claim_reader.  Keep its name and signature.

    def __init__(self, seg: Segment = None, header: dict = None, *, created: bool = False):
        self._refuse_direct(seg)              # SharedState("x"): point at create / attach
        super().__init__(seg.buf)
        self._seg = seg
        self._header = header
        self._created = created
        self._wmv = seg.view()                # drafts' views keep the mapping guarded (R45)
        # A writer that takes over a dead one's role clears the waiters count of
        # the slot wake word, where only the writer sleeps.  The version wake
        # word is shared by all readers: each announces its sleeps in its
        # reader entry too (R29), and whoever takes a dead reader's entry over
        # (a reader claiming it, the writer reclaiming pins, a handle
        # attaching) withdraws them.
        self._writer = roles.Role(seg.identity, L.ST_OFF_WRITER, L.ST_OFF_SLOT_WAKE, seg.label, "writer",
                                  "a shared state has one writer", seg.locks, here="is held")
        self._array_cache = None
        self.spin = DEFAULT_SPIN
        # One writing thread at a time per handle (publish / update): the slot a
        # thread chose is free only until it publishes, so two threads choosing
        # at once could pick the same slot.  Made anew in a forked child (a lock
        # held by another thread of the parent would stay held there).
        self._wlock, self._wlock_thread = threading.Lock(), 0    # the thread inside an update() block
        _handles.add(self)

    @property
    def _label(self) -> str:        # named in errors (HandleClosed, from C)
        return self._seg.label

    # -- construction ---------------------------------------------------------
    @classmethod
    def create(cls, name: str | None = None, nbytes: int = 1 << 20, *, slots: int = 4, mode: int = 0o600,
               path=None, max_readers: int = 64, replace_dead: bool = False) -> "SharedState":
        """Create a shared state whose values may be up to ``nbytes`` bytes encoded
        (an array's ``nbytes`` plus ~100 bytes of descriptor), with ``slots`` versions.

        ``name`` names a POSIX segment (``/dev/shm/shmring.NAME``); with ``path``
        the state lives in that file and persists until ``unlink()``.
        ``max_readers`` bounds the reader table (each reading handle takes one
        entry per concurrently pinned snapshot).
        ``replace_dead=True`` replaces a segment of that name that no live
        process has attached, as for :meth:`Ring.create`.
        """
        for arg, v in (("nbytes", nbytes), ("slots", slots), ("max_readers", max_readers)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{arg} must be an int, got {type(v).__name__}")
        nbytes, slots, max_readers = int(nbytes), int(slots), int(max_readers)
        if not 0 < nbytes <= MAX_SLOT_BYTES:
            raise ValueError(f"nbytes must be from 1 to {MAX_SLOT_BYTES}, got {nbytes}")
        if not L.ST_MIN_SLOTS <= slots <= L.ST_MAX_SLOTS:
            raise ValueError(f"slots must be from {L.ST_MIN_SLOTS} to {L.ST_MAX_SLOTS}, got {slots} "
                             "(the writer needs a slot that is neither current nor pinned)")
        if not 1 <= max_readers <= L.ST_MAX_READERS:
            raise ValueError(f"max_readers must be from 1 to {L.ST_MAX_READERS}, got {max_readers}")
        g = L.state_geometry(nbytes, slots, max_readers)
        seg = (Segment.create_anonymous(g["segment_size"]) if name is None and path is None
               else Segment.create(name, g["segment_size"], path=path, mode=mode, replace_dead=replace_dead))
        try:
            _write_state_header(seg.buf, nbytes=nbytes, slots=slots, max_readers=max_readers)
            core = _core.StateCore(seg.buf)
            # `ready` (the high half of the word at 48) last, by a seq_cst CAS:
            # pairs with attach's read of `ready` before the other fields
            pid_word = L.read_u64(seg.buf, L.OFF_CREATOR_PID)
            core.cas_u64(L.OFF_CREATOR_PID, pid_word, pid_word | (1 << 32))
            del core
            return cls(seg, _validate_state_header(seg), created=True)
        except BaseException:
            seg.close()
            seg.unlink()
            raise

    @classmethod
    def attach(cls, name: str | None = None, *, path=None, allow_foreign_owner: bool = False,
               wait: float = 0.0) -> "SharedState":
        """Attach to an existing shared state by name (or by path); ``wait``:
        seconds to wait for one that does not exist yet.  As for
        :meth:`Ring.attach`, the segment must be owned by this process's uid
        unless ``allow_foreign_owner=True``."""
        if path is None and name is None:
            raise TypeError("SharedState.attach() needs a name or path= (an anonymous state has neither: "
                            "pass the SharedState object to the other process, or a descriptor: from_fd)")
        return cls._attached(Segment.open(name, path=path, allow_foreign_owner=allow_foreign_owner, wait=wait))

    @classmethod
    def anonymous(cls, nbytes: int = 1 << 20, **kwargs) -> "SharedState":
        """``SharedState.create(None, nbytes, **kwargs)``: in sealed anonymous
        shared memory, as :meth:`shmring.Ring.anonymous`."""
        return cls.create(None, nbytes, **kwargs)

    @classmethod
    def from_fd(cls, fd: int, *, allow_foreign_owner: bool = False) -> "SharedState":
        """Attach the anonymous state open at descriptor ``fd`` (duplicated: ``fd`` stays yours)."""
        return cls._attached(Segment.from_fd(os.dup(fd), allow_foreign_owner=allow_foreign_owner))

    @classmethod
    def _attached(cls, seg: Segment) -> "SharedState":
        try:
            st = cls(seg, _validate_state_header(seg), created=False)
            seg.reserve()                    # validated: now its space (holes of a copy) and pages
        except BaseException:
            seg.close()
            raise
        st._free_dead_readers()          # what readers that died (asleep, pinned) left behind
        return st

    def __reduce__(self):
        if self._seg.anonymous:               # by descriptor (segment.fd_reference)
            return (_attach_anonymous, (fd_reference(self._seg), self._seg.allow_foreign_owner))
        return (_attach, (self._seg.name, self._seg.path, self._seg.allow_foreign_owner))

    # -- properties -------------------------------------------------------------
    @property
    def version(self) -> int:
        """The newest published version (0 before the first publish)."""
        return self._load_u64(L.ST_OFF_CURRENT) >> 8

    @property
    def closed(self) -> bool:
        return self._seg.buf is None

    def _live(self):
        if self._seg.buf is None:
            raise HandleClosed(f"shared state {self._seg.label} is closed")

    # -- readers ----------------------------------------------------------------
    def _claim_reader(self) -> None:
        """Called from C when this handle needs one more reader table entry."""
        self._live()
        mine = {i for i, _ in self._own_entries()}
        locks = self._seg.locks
        for i in range(self.max_readers):
            if i in mine:
                continue
            off = L.HEADER_SIZE + i * L.ST_ENTRY
            cur = self._load_u64(off + L.ST_ENTRY_OWNER)
            if not roles.holder_alive(locks, off, cur) and self._take_over_reader(off, cur):
                self._add_entry(i)
                return
        raise ShmringError(f"all {self.max_readers} reader entries of {self._seg.label} are held by live "
                           "processes; create the state with a larger max_readers")

    def _take_over_reader(self, off: int, owner: int) -> bool:
        """Take reader entry ``off`` from ``owner`` (0: free, else a dead
        reader): R30, its lock and the one deciding CAS from the word we
        judged (R38), then, the entry ours (no reader can claim it meanwhile),
        a dead reader's announced sleeps (R29) and its pin are cleared.  False
        if that failed: the entry is held or changed hands, leave it."""
        if not roles.take_over(_Words(self), self._seg.locks, off, owner):
            return False
        roles.withdraw_waits(_Words(self), off + L.ST_ENTRY_WAITING, L.ST_OFF_VERSION_WAKE)
        if self._load_u64(off + L.ST_ENTRY_PIN):
            self._store_u64(off + L.ST_ENTRY_PIN, 0)       # R30: a dead reader's (or garbage) pin goes
            if owner:
                self._fetch_add_u64(L.ST_OFF_COUNTERS + L.ST_RECLAIMED, 1)
        return True

    def _free_dead_readers(self, *, pinned_only: bool = False) -> int:
        """Free the entries of readers whose process is gone (each taken over
        first, R30); ``pinned_only``: only those holding a pin or a sleep.
        Returns how many held a pin."""
        locks, n = self._seg.locks, 0
        for i in range(self.max_readers):
            off = L.HEADER_SIZE + i * L.ST_ENTRY
            pinned = self._load_u64(off + L.ST_ENTRY_PIN)                     # R30, R22: seq_cst load
            if pinned_only and not pinned and not self._load_u32(off + L.ST_ENTRY_WAITING):
                continue
            owner = self._load_u64(off + L.ST_ENTRY_OWNER)                    # R30, R22: seq_cst load
            # R30: only a dead owner's entry is ours to take.  Owner 0 is a free
            # entry: its pin is garbage that a reader claiming the entry clears
            # (it can only make the writer avoid a slot); clearing it here could
            # erase the pin of a reader that claims the entry meanwhile.
            if owner == 0 or roles.holder_alive(locks, off, owner):
                continue
            if self._take_over_reader(off, owner):
                roles.give_back(_Words(self), locks, off)                            # R30: free it
                n += bool(pinned)
        return n

    def wait_newer(self, than: int = 0, *, timeout=None) -> int:
        """Wait until a version newer than ``than`` is published; return the newest version.

        Sleeps on a futex (no spinning when idle, after a short spin), wakes at
        least every 0.1 s to run signal handlers (Ctrl-C) and to check the
        writer: a writer that died holding the role raises
        :class:`~shmring.errors.PeerGone` (a new writer may take over later).
        A writer that finished (closed its handle normally: R57), or a named
        state unlinked while no writer holds the role, raises
        :class:`~shmring.errors.EndOfStream` once nothing newer than ``than``
        is there: a wait without a timeout does not outlive the writer.  A
        later writer clears the mark (R58), and waits go on as before.
        The version returned is checked under a brief pin (taking a reader
        entry, as :meth:`read` does), so a writer publishing meanwhile cannot
        make it look corrupt.
        """
        self._live()
        return self._await_version(waiting.wait_until, than, timeout)

    async def wait_newer_async(self, than: int = 0, *, timeout=None) -> int:
        """``await state.wait_newer_async(v)``: :meth:`wait_newer` without
        blocking the event loop and with no thread: the await arms a wake-up
        descriptor of the version wake line, which the writer's publish
        signals (R52); cancelling it disarms."""
        self._live()
        return await self._await_version(waiting.wait_until_async, than, timeout, asynchronous=True)

    def _await_version(self, wait_until, than, timeout, asynchronous=False):
        """Both wait_newer()s: ``wait_until`` is :func:`shmring.waiting.wait_until` or its async twin."""
        than = int(than)

        def newer():
            if self.version > than:
                # The slot header is checked only under a pin (a version found
                # current but not pinned may be overwritten by the time its
                # header is read): the version returned is the one checked.
                return self._newest()
            ended = self._writer_ended()
            if ended:
                # R59: published before it finished: still counts.  A zero-length
                # slice first: it probes the mapping (R48), so a truncated backing
                # is SegmentTruncated, never an end read from a stale header
                if self._wait_newer(than, 0.0, 0.0) or self.version > than:
                    return self._newest()
                raise EndOfStream(f"{ended}; the last version is {self.version}, none is newer than {than}")
            return None
        sleep = ((lambda: [(self, L.ST_OFF_VERSION_WAKE, lambda w: self._arm_newer(than, w))]) if asynchronous
                 else (lambda t: self._wait_newer(than, t, self.spin)))
        return wait_until(
            newer, sleep, lambda: roles.dead_holder(_Words(self), L.ST_OFF_WRITER, self._seg.locks),
            timeout, lambda: f"no version newer than {than} was published to {self._seg.label} within {timeout} s",
            lambda pid: f"the writer (pid {pid}) of {self._seg.label} died; the last version is {self.version}. "
                        "A new writer may take over.")

    def _writer_ended(self) -> str:
        """R59: why no more versions will come ('' while one may): the writer
        finished (R57) or the name is gone, and no writer holds the role now."""
        if self._load_u64(L.ST_OFF_WRITER + L.ROLE_OWNER):                  # R59: seq_cst, before the mark
            return ""                          # a writer holds the role (a dead one: PeerGone, on_slice)
        if self._load_u32(OFF_WRITER_FINISHED):                             # R59, pairs with R57's store
            return (f"the writer of {self._seg.label} closed (finished normally); a new writer would "
                    "clear this")
        seg = self._seg
        if not seg.anonymous and seg.locks is not None and seg.locks.fd >= 0:
            try:
                if os.fstat(seg.locks.fd).st_nlink == 0:
                    return (f"{seg.label} was unlinked and has no writer: no process can attach it "
                            "to publish")
            except OSError:
                pass
        return ""

    # -- the writer ---------------------------------------------------------------
    def _claim_writer(self) -> None:
        self._live()
        if not self._writer.held():
            self._writer.claim(_Words(self))
            # R58: the role is ours (owner word stored by the claim's CAS): a
            # finished writer's mark goes, so waits go on for our versions
            if self._load_u32(OFF_WRITER_FINISHED):
                self._store_u32(OFF_WRITER_FINISHED, 0)

    def _reclaim_dead_pins(self) -> int:
        """The writer: clear the pins (and announced sleeps) of readers whose
        process is gone; return how many pins (R30)."""
        if not self._writer.held():
            return 0
        return self._free_dead_readers(pinned_only=True)

    def _acquire_slot(self, timeout) -> int:
        """A slot that is neither current nor pinned by a live reader, waiting if every spare one is."""
        k = self._free_slot()
        if k >= 0:
            return k
        self._fetch_add_u64(L.ST_OFF_COUNTERS + L.ST_WRITER_WAITS, 1)

        def free_slot():
            k = self._free_slot()
            if k < 0 and self._reclaim_dead_pins():
                k = self._free_slot()
            return k if k >= 0 else None
        return waiting.wait_until(
            free_slot, lambda t: self._wait_slot(t, self.spin), None, timeout,
            lambda: f"every spare version slot of {self._seg.label} stayed pinned by live readers "
                    f"for {timeout} s ({self.slots} slots); readers hold read() blocks or escaped views")

    def _wait_writer_lock(self, lock, deadline) -> None:
        """``lock`` (this handle's writer lock) is taken: wait for it until
        ``deadline`` (GIL released), unless this thread is the one holding it."""
        if self._wlock_thread == threading.get_ident():
            raise ShmringError(f"publish() or update() of {self._seg.label} inside this thread's own update() "
                               "block: the draft's slot is not published yet; publish after the block")
        if deadline is None:
            lock.acquire()
        elif not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Timeout(f"another thread of this process kept publishing through this writer handle of "
                          f"{self._seg.label} (publish() or an update() block) past the timeout")

    @staticmethod
    def _left(deadline):
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _check_size(self, need: int) -> None:
        if need > self.nbytes:
            raise MessageTooLarge(f"the value needs up to {need:,} bytes but a version slot of "
                                  f"{self._seg.label} holds {self.nbytes:,}; create the state with a larger nbytes")

    def publish(self, value, *, timeout=None) -> int:
        """Publish ``value`` (an ndarray, or a msgpack-able object containing
        ndarrays) as the new version; return its version number.

        Copies the value once into a free slot.  Waits (up to ``timeout``) only
        when every slot but the current one is pinned by a live reader, or
        while another thread publishes through this handle (one at a time).
        """
        deadline = waiting.check_timeout(timeout)        # checked even when the call does not wait
        lock = self._wlock
        if not lock.acquire(False):
            self._wait_writer_lock(lock, deadline)
        try:
            return self._publish_locked(value, deadline)
        finally:
            lock.release()

    def _publish_locked(self, value, deadline) -> int:
        if isinstance(value, np.ndarray) and (meta := codec.array_meta(value)) is not None:
            if self._writer.held():
                v = self._publish_array(meta, value)      # C: free slot, one memcpy, publish
                if v is not None:
                    return v
            self._live()
            order = "C" if value.flags.c_contiguous else "F"
            enc = codec.Encoded(L.T_ARRAY, meta, [(value, value.shape, value.dtype, order, 0)], value.nbytes)
        else:
            self._live()
            enc = codec.encode(value)
        self._check_size(_slot_bytes(enc))
        self._claim_writer()
        k = self._acquire_slot(self._left(deadline))
        n, _ = codec.write(self._wmv, self._first_slot + k * self._slot_size + L.ST_SLOT_HDR, enc)
        return self._publish(k, enc.type, n)

    @contextmanager
    def update(self, *, timeout=None):
        """Copy-on-write: yield a writable copy of the current value, built in a
        free slot; publish it on normal exit, discard it on an exception.

        The copy is one memcpy of the current version.  Arrays are changed in
        place; if anything else in an object value changed (a scalar, a key, a
        replaced array) the draft is published afresh with :meth:`publish`.
        Lifetime: the draft's arrays point into the new slot; they are made
        read-only at publish, so a draft kept past the block cannot change a
        published version.  Other threads publishing through this handle wait
        for the block to end; this thread may not publish inside it.
        """
        self._live()
        deadline = waiting.check_timeout(timeout)
        lock = self._wlock
        if not lock.acquire(False):
            self._wait_writer_lock(lock, deadline)
        self._wlock_thread = threading.get_ident()
        try:
            self._claim_writer()
            cur = self._current()        # the writer's own last publish: nobody else rewrites its slot
            if cur is None:
                raise ShmringError(f"{self._seg.label} has no published version to update; publish() one first")
            _version, src, type_, length = cur
            k = self._acquire_slot(self._left(deadline))
            self._copy_slot(src, k, length)
            draft = self._draft(k, type_, length)
            value = _writable(draft.value)
            try:
                yield value
            except BaseException:
                _readonly(value)
                draft.release()
                raise
            # Arrays were changed in place, in the slot.  Anything else in the draft
            # (a scalar, a replaced array, a new key) lives in the meta: if it
            # changed, the slot's layout no longer describes the value, so the
            # value is published afresh (one more copy) instead of silently
            # dropping the change.
            meta = bytes(self._wmv[draft._offset + codec.PREFIX.size:][:codec.PREFIX.unpack_from(
                self._wmv, draft._offset)[0]])
            enc = codec.encode(value) if type_ == L.T_OBJECT else None
            if enc is not None and enc.meta != meta:
                try:
                    # detach first: publishing may pick the draft's own slot
                    self._publish_locked(_detached(value), waiting.check_timeout(timeout))
                finally:
                    _readonly(value)
                    draft.release()
                return
            _readonly(value)
            draft.release()
            del value, draft
            self._publish(k, type_, length)
        finally:
            self._wlock_thread = 0
            lock.release()

    # -- introspection and lifetime --------------------------------------------
    def stats(self) -> dict:
        """Versions published, pins per slot, reclaimed pins, readers, writer."""
        self._live()
        cur = self._load_u64(L.ST_OFF_CURRENT)
        pinned = [0] * self.slots
        readers = 0
        for i in range(self.max_readers):
            off = L.HEADER_SIZE + i * L.ST_ENTRY
            owner = self._load_u64(off + L.ST_ENTRY_OWNER)
            if roles.holder_alive(self._seg.locks, off, owner):
                readers += 1
            pin = self._load_u64(off + L.ST_ENTRY_PIN)
            if pin and (pin & 0xFF) < self.slots:
                pinned[pin & 0xFF] += 1
        w = self._load_u64(L.ST_OFF_WRITER + L.ROLE_OWNER)
        pid = L.split_owner(w)[0]
        return {"name": self.name, "path": self.path, "slots": self.slots, "nbytes": self.nbytes,
                "version": cur >> 8, "versions_published": cur >> 8,
                "current_slot": (cur & 0xFF) if cur else None,
                "pins": pinned, "slots_pinned": sum(1 for p in pinned if p),
                "reclaimed_pins": self._load_u64(L.ST_OFF_COUNTERS + L.ST_RECLAIMED),
                "writer_waits": self._load_u64(L.ST_OFF_COUNTERS + L.ST_WRITER_WAITS),
                "readers": readers, "max_readers": self.max_readers,
                "writer": {"pid": pid or None, "alive": roles.holder_alive(self._seg.locks, L.ST_OFF_WRITER, w),
                           "sessions": self._load_u64(L.ST_OFF_WRITER + L.ROLE_SESSIONS),
                           "finished": bool(self._load_u32(OFF_WRITER_FINISHED))},
                "creator_pid": self._header["creator_pid"], "created_ns": self._header["created_ns"]}

    def close(self) -> None:
        """Give back the writer role and the reader entries, and detach.  Never
        unmaps under a live snapshot or view.  Idempotent."""
        if self._seg.buf is not None:
            _core.finish(self._close_steps)

    def _close_steps(self) -> None:
        # R50: each step re-doable (core.finish redoes them after an interrupt)
        if self._writer.held():
            # R57: "finished" before the owner word goes to 0 (give_back), so a
            # waiter that sees the role free sees the mark; then wake the waiters
            self._store_u32(OFF_WRITER_FINISHED, 1)
            self._writer.give_back(_Words(self))
            self.wake(L.ST_OFF_VERSION_WAKE)
        self._writer.give_back(_Words(self))
        for i, busy in self._own_entries():    # empty in a forked child: the entries are the parent's
            if not busy:                       # a busy entry stays ours until its snapshot is released
                roles.give_back(_Words(self), self._seg.locks, L.HEADER_SIZE + i * L.ST_ENTRY)
        self._mark_closed()
        try:
            self._wmv.release()
        except BufferError:
            pass
        self._seg.close()

    def __repr__(self) -> str:
        return (f"<shmring.SharedState {self._seg.label} {self.slots} slots of {self.nbytes} bytes"
                f"{' closed' if self.closed else f' version {self.version}'}>")


# Every open handle, so that a forked child starts with fresh writer locks.
_handles: "weakref.WeakSet[SharedState]" = weakref.WeakSet()


class _Words:
    """The raw word accessors of a SharedState, for the shared role code
    (roles.py), which calls them by their plain names: they are private on
    the handle itself (issue 16 case 10)."""
    __slots__ = ("load_u32", "load_u64", "store_u32", "store_u64", "cas_u64", "fetch_add_u64")

    def __init__(self, h):
        for name in self.__slots__:
            setattr(self, name, getattr(h, "_" + name))


def _after_fork_in_child() -> None:
    for h in list(_handles):
        h._wlock, h._wlock_thread = threading.Lock(), 0


os.register_at_fork(after_in_child=_after_fork_in_child)


def _attach_anonymous(ref, allow_foreign_owner=False):
    return SharedState._attached(Segment.from_fd(open_fd_reference(ref), allow_foreign_owner=allow_foreign_owner))


def _attach(name, path, allow_foreign_owner=False):
    return SharedState.attach(name, path=path, allow_foreign_owner=allow_foreign_owner)
