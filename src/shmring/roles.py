"""Roles: claiming, taking over and giving back who holds what in a segment.

A role is a 64-bit owner word in the segment: 0 when free, else the holder's
pid and start time (:func:`shmring.layout.owner_word`; a pid alone can be
reused, see :mod:`shmring._proc`).  Taking one is a CAS from 0 to our word.
This module owns every such claim, take-over and release:

* :class:`Role`: a one-holder role word (a ring's producer or consumer role,
  including record rings and the consumer of an mpsc ring, and the writer
  role of a SharedState).  A second live holder gets
  :class:`~shmring.errors.RoleTaken` naming its pid; a dead holder's role is
  taken over; a role whose handle this process dropped without closing is
  taken back.
* :func:`claim_entry` / :func:`release`: one entry of a table of owner words
  (the producer and consumer tables of multi-party rings).  Freeing a dead
  holder's entry is the table's ``reclaim`` callback, which keeps its counters.
* :func:`dead_holder`, :func:`holder_alive`, :func:`my_owner_word`: the
  liveness checks that waits and recovery make between slices.
"""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

from . import layout as L
from ._proc import alive, my_start_time
from .errors import ResourceLimit, RoleTaken

# Roles held by live handles in this process, by (segment identity, role
# line): lets a process take back a role whose handle it dropped without closing.
_held: "weakref.WeakValueDictionary[tuple, Role]" = weakref.WeakValueDictionary()


def my_owner_word() -> int:
    """This process's owner word: its pid and start time."""
    return L.owner_word(os.getpid(), my_start_time())


def holder_alive(word: int) -> bool:
    """True if ``word`` names a process that is still running (0: nobody)."""
    pid, start = L.split_owner(word)
    return bool(pid) and alive(pid, start)


def dead_holder(mem, line: int) -> int:
    """The pid of the holder of the role at ``line`` if it is registered and dead, else 0."""
    pid, start = L.split_owner(mem.load_u64(line + L.ROLE_OWNER))
    return pid if pid and not alive(pid, start) else 0


class Role:
    """A one-holder role word at ``line``: a handle claims it when it opens and
    gives it back when it closes.

    The handle passes its mapping (``mem``: a Region, or the SharedState
    itself) to each call; the Role keeps none, so it makes no reference cycle
    with its handle, and a dropped handle frees its entry in ``_held`` at once.
    ``wake`` is the wake word only this role's holder sleeps on.
    """

    def __init__(self, identity, line: int, wake: int, label: str, name: str, sole: str,
                 here: str = "is already held"):
        self._key = (identity, line)
        self._line, self._wake = line, wake
        self._label, self._name, self._sole, self._here = label, name, sole, here
        self.owner = 0          # our owner word while we hold the role
        self.pid = 0            # the process that claimed it (a forked child does not hold it)

    def held(self) -> bool:
        return bool(self.owner) and self.pid == os.getpid()

    def claim(self, mem) -> None:
        """Take the role: a free one, ours from a handle dropped without
        closing, or a dead holder's; else RoleTaken."""
        word = self._line + L.ROLE_OWNER
        me = my_owner_word()
        while True:
            cur = mem.load_u64(word)
            if cur == 0:
                if mem.cas_u64(word, 0, me):
                    break
                continue
            pid, start = L.split_owner(cur)
            if cur == me and self._key not in _held:
                break                   # our own handle was dropped without closing: take it back
            if cur == me:
                raise RoleTaken(f"the {self._name} role of {self._label} {self._here} by another handle "
                                f"in this process (pid {pid}); close it first", pid)
            if alive(pid, start):
                raise RoleTaken(f"the {self._name} role of {self._label} is held by live process {pid}; "
                                f"{self._sole}", pid)
            if mem.cas_u64(word, cur, me):
                # The holder died: take over.  If it died asleep in a wait, its
                # "waiters" count was never taken back, and every wake of that
                # word would pay a futex_wake syscall forever.  Only this role's
                # holder sleeps on it, and it is dead, so zero is exact (the
                # seq half of the word is kept).
                mem.store_u32(self._wake + L.WAKE_WAITERS, 0)
                break
        mem.fetch_add_u64(self._line + L.ROLE_SESSIONS, 1)
        _held[self._key] = self
        self.owner, self.pid = me, os.getpid()

    @contextmanager
    def claimed(self, mem):
        """``with role.claimed(mem):`` set the handle up; if that fails, the
        role is given back."""
        self.claim(mem)
        try:
            yield
        except BaseException:
            self.give_back(mem)
            raise

    def give_back(self, mem) -> None:
        """Free the role if this process holds it.  Idempotent."""
        if self.held():
            mem.cas_u64(self._line + L.ROLE_OWNER, self.owner, 0)
            if _held.get(self._key) is self:
                del _held[self._key]
        self.owner = 0


def ring_role(ring, line: int) -> Role:
    """The producer (``line`` = OFF_PROD_ROLE) or consumer role of a ring."""
    name, wake = (("producer", L.OFF_SPACE_WAKE) if line == L.OFF_PROD_ROLE      # sleeps for room
                  else ("consumer", L.OFF_DATA_WAKE))                            # sleeps for data
    return Role(ring._identity, line, wake, ring._seg.label, name, f"an {ring.kind} ring has one {name}")


def claim_entry(mem, lines, what: str, label: str, kind: str, reclaim, adopt=None) -> int:
    """CAS a free entry among ``lines`` to this process and return its index;
    ``reclaim(i, word)`` frees the entry of a dead holder (True if it did).
    If none is free and ``adopt(i, word)`` is given, it may take a dead
    holder's entry over for us (True if it did: the entry is ours).
    All held by live processes: RoleTaken for a one-entry table, else ResourceLimit."""
    me = my_owner_word()
    for _ in range(3):                  # a lost CAS race on a free entry: look again
        holders, dead = [], []
        for i, line in enumerate(lines):
            cur = mem.load_u64(line + L.CE_OWNER)
            if cur and not holder_alive(cur):
                if reclaim(i, cur):
                    cur = 0
                else:
                    dead.append((i, cur))
            if cur == 0 and mem.cas_u64(line + L.CE_OWNER, 0, me):
                return i
            if cur:
                holders.append(L.split_owner(cur)[0])
        if adopt is not None:
            for i, cur in dead:
                if adopt(i, cur):
                    return i
        if len(holders) == len(lines):
            break
    if len(lines) == 1:
        raise RoleTaken(f"the {what} role of {label} is held by live process {holders[0]}; "
                        f"a {kind} ring has one {what}", holders[0])
    raise ResourceLimit(f"all {len(lines)} {what} entries of {label} are held by live processes "
                        f"(pids {sorted(set(holders))[:8]}...); create the ring with a larger max_{what}s",
                        f"max_{what}s", len(lines) + 1, len(lines))


def withdraw_waits(mem, waiting: int, wake: int) -> None:
    """R29: an entry taken over from a dead holder (the caller holds it now):
    take the sleeps it had announced in its ``waiting`` share (u32) off the
    shared wake word at ``wake`` (a holder killed asleep left them there, and
    every wake of that word would pay a futex_wake for it forever), then
    clear the share."""
    n = min(mem.load_u32(waiting), mem.load_u32(wake + L.WAKE_WAITERS))
    if n:
        # waiters is the high half of the wake line's first u64 (seq the low half)
        mem.fetch_add_u64(wake + L.WAKE_SEQ, (-(n << 32)) & 0xFFFFFFFFFFFFFFFF)
    mem.store_u32(waiting, 0)


def release(mem, line: int) -> None:
    """Give back a table entry this process holds."""
    mem.cas_u64(line + L.CE_OWNER, my_owner_word(), 0)
