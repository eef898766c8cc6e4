"""Liveness the kernel keeps: open-file-description locks on a segment's file.

Every process that has a segment mapped holds, through its own open file
description (OFD) of the segment's file, a shared lock on the *attach* byte;
every role it holds (a ring's producer or consumer role, a table entry, a
SharedState writer role or reader entry) is an exclusive lock on that role's
own byte.  The bytes lie far beyond the end of the file (``LOCK_BASE`` plus
the role's offset in the header), so they never touch data; the locks are
advisory and only shmring looks at them.

The kernel drops a process's OFD locks when its last descriptor of that file
description is closed, which happens at the latest when the process exits,
however it dies, in whatever pid namespace, whichever of its threads ran
last.  So "is the holder of this role alive?" is "does another file
description hold the role's lock?" (``F_OFD_GETLK``), with no /proc lookup
and no pid (pids stay in the tables for display), and ``shmring gc`` removes
a segment only if it can lock the attach byte exclusively: nobody has it
mapped.

A role is taken by locking its byte first, then writing its owner word (by
CAS); it is given back in the opposite order.  Whoever holds the lock is the
only writer of the owner word, so a recovery that takes a dead holder's
entry over (to requeue, drop, count it dead) holds the lock while it works.

Fork: a child inherits its parent's descriptors, hence the parent's file
descriptions and locks.  Left alone, a child would keep a dead parent's roles
"alive", and its own lock tests would not see the parent's locks (a file
description never conflicts with itself).  So a forked child replaces each
inherited description with a fresh one of the same file (``/proc/self/fd``),
holding only the attach lock (the child has the mapping too), and closes the
inherited descriptor: the parent's locks stay with the parent.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import weakref

from .layout import LOCK_BASE   # 1 << 50: far beyond any segment (layout.MAX_CAPACITY is 1 << 40)
ATTACH = 0                   # the attach byte; roles use their line's offset (>= 128)
_FLOCK = struct.Struct("hhqqi4x")     # struct flock on Linux (64-bit off_t); l_pid must be 0 for OFD locks
_RD, _WR, _UN = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK

_all: "weakref.WeakSet[Locks]" = weakref.WeakSet()
_all_lock = threading.Lock()


class Locks:
    """This process's file description of one mapped segment, and the locks
    it holds there.  ``fd`` is -1 once closed."""

    def __init__(self, fd: int):
        self.fd = fd
        with _all_lock:
            _all.add(self)

    def _fcntl(self, cmd: int, typ: int, line: int) -> bytes:
        return fcntl.fcntl(self.fd, cmd, _FLOCK.pack(typ, os.SEEK_SET, LOCK_BASE + line, 1, 0))

    def _try(self, typ: int, line: int) -> bool:
        try:
            self._fcntl(fcntl.F_OFD_SETLK, typ, line)
            return True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise

    # -- attach ---------------------------------------------------------------
    def share_attach(self) -> bool:
        """Take the shared attach lock (False: someone holds it exclusively,
        i.e. ``gc`` is removing the segment right now)."""
        return self._try(_RD, ATTACH)

    def attach_exclusive(self) -> bool:
        """``gc``: the attach lock exclusively, i.e. no other file description
        has the segment attached."""
        return self._try(_WR, ATTACH)

    # -- roles ----------------------------------------------------------------
    def lock(self, line: int) -> bool:
        """The role at ``line``, exclusively (False: another file description
        holds it: a live holder).  Ours already: True."""
        return self._try(_WR, line)

    def unlock(self, line: int) -> None:
        if self.fd >= 0:
            self._fcntl(fcntl.F_OFD_SETLK, _UN, line)

    def held(self, line: int) -> bool:
        """Whether another file description (a live process, or another
        handle of this one) holds the role at ``line``.  Unknowable (this
        description is closed): True, the safe answer."""
        if self.fd < 0:
            return True
        typ = _FLOCK.unpack(self._fcntl(fcntl.F_OFD_GETLK, _WR, line))[0]
        return typ != _UN

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        # Re-doable (R50): no check for signals between taking the fd and
        # closing it (no call, no loop), so an interrupt lands before (a redo
        # closes it) or after (a redo finds -1).
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def _after_fork(self) -> None:
        """In a forked child: a fresh file description of the same file in
        place of the inherited one (see the module docstring)."""
        old = self.fd
        if old < 0:
            return
        try:
            new = os.open(f"/proc/self/fd/{old}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            new = -1                    # no /proc: this child cannot test liveness (held() says True)
        os.close(old)
        self.fd = new
        if new >= 0:
            self.share_attach()


def _after_fork_in_child() -> None:
    global _all_lock
    _all_lock = threading.Lock()        # a thread of the parent may have held it
    for locks in list(_all):
        try:
            locks._after_fork()
        except OSError:
            locks.fd = -1


os.register_at_fork(after_in_child=_after_fork_in_child)


def probe(fd: int) -> Locks:
    """A Locks over ``fd`` that is not registered for fork handling (gc's
    short-lived look at a segment)."""
    lk = Locks.__new__(Locks)
    lk.fd = fd
    return lk
