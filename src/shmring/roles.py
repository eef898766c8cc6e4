"""Roles: claiming, taking over and giving back who holds what in a segment.

A role is a 64-bit owner word in the segment, 0 when free, else the holder's
pid and a random per-process nonce (:func:`shmring.layout.owner_word`; the pid
is for display and error messages), *and* an exclusive lock on the role's
byte of the segment's file (:mod:`shmring.liveness`), which the kernel drops
when the holder dies.  Whether a holder is alive is whether its lock is held:
no /proc, no pids, any pid namespace.

Taking a role: lock its byte, then CAS the owner word (from 0, or from a dead
holder's word).  Giving it back: the owner word to 0, then unlock.  So only a
lock holder writes an owner word, and a recovery that takes a dead holder's
entry over (to count it dead, requeue what it held, drop it) holds the lock
while it works (R38).  Within one process, role transitions on one file
description are serialized by a mutex (two handles of a process share a
description, and a description never conflicts with itself).

This module owns every such claim, take-over and release:

* :class:`Role`: a one-holder role word (a ring's producer or consumer role,
  including record rings and the consumer of an mpsc ring, and the writer
  role of a SharedState).  A second live holder gets
  :class:`~shmring.errors.RoleTaken` naming its pid; a dead holder's role is
  taken over; a role whose handle this process dropped without closing is
  taken back.
* :func:`claim_entry` / :func:`release` / :func:`take_over` / :func:`give_back`:
  one entry of a table of owner words (the producer and consumer tables of
  multi-party rings, SharedState reader entries).
* :func:`dead_holder`, :func:`holder_alive`, :func:`my_owner_word`: the
  liveness checks that waits and recovery make between slices.
"""
from __future__ import annotations

import os
import secrets
import signal
import threading
import time
import weakref
from contextlib import contextmanager

from . import layout as L
from .errors import ResourceLimit, RoleTaken

# Roles held by live handles in this process, by (segment identity, role
# line): lets a process take back a role whose handle it dropped without closing.
_held: "weakref.WeakValueDictionary[tuple, Role]" = weakref.WeakValueDictionary()

_me = (0, 0)                    # (pid, owner word): a fresh nonce in every process, forked children too
_mutex = threading.RLock()      # role transitions of this process (see the module docstring)


def _fresh_mutex_after_fork() -> None:
    # a thread of the parent may have held it at the fork: the child's copy would stay locked
    global _mutex
    _mutex = threading.RLock()


os.register_at_fork(after_in_child=_fresh_mutex_after_fork)


def hold_interrupts():
    """R51: from here to resume_interrupts(token), a SIGINT in this (main)
    thread is recorded, not raised, so taking a role and making the handle
    that records it is one step for Ctrl-C.  Python runs signal handlers only
    in the main thread, so elsewhere there is nothing to hold (None); nor
    when SIGINT has no Python handler (SIG_DFL, SIG_IGN, or one set from C)."""
    if threading.get_ident() != threading.main_thread().ident:
        return None
    old = signal.getsignal(signal.SIGINT)
    if not callable(old):
        return None
    hit = []
    try:
        signal.signal(signal.SIGINT, lambda sig, frame: hit.append(sig))
    except ValueError:                  # not the main interpreter
        return None
    return old, hit


def resume_interrupts(token) -> None:
    """The end of hold_interrupts(): the handler is put back, and a SIGINT
    that came meanwhile is raised again now (its handler runs at once)."""
    if token is not None:
        old, hit = token
        signal.signal(signal.SIGINT, old)
        if hit:
            signal.raise_signal(signal.SIGINT)


def my_owner_word() -> int:
    """This process's owner word: its pid and a random nonce (per process)."""
    global _me
    pid = os.getpid()
    if _me[0] != pid:
        _me = (pid, L.owner_word(pid, secrets.randbits(32) | 1))
    return _me[1]


def holder_alive(locks, line: int, word: int) -> bool:
    """True if ``word``, the owner word of the role at ``line``, names a live
    holder: this process, or one whose lock on the role is held."""
    return bool(word) and (word == my_owner_word() or locks.held(line))


def dead_holder(mem, line: int, locks) -> int:
    """The pid of the holder of the role at ``line`` if it is registered and dead, else 0."""
    w = mem.load_u64(line + L.ROLE_OWNER)
    return L.split_owner(w)[0] or -1 if w and not holder_alive(locks, line, w) else 0


def take_over(mem, locks, line: int, word: int) -> bool:
    """Make the entry at ``line`` ours: its lock, then one CAS of its owner
    word from ``word`` (0: free, else a dead holder's word).  False if either
    fails: a live process holds or is claiming it, or it changed hands."""
    me = my_owner_word()
    with _mutex:
        if mem.load_u64(line) == me or not locks.lock(line):
            return False
        if mem.cas_u64(line, word, me):
            return True
        if mem.load_u64(line) != me:        # not another handle of ours that got it meanwhile
            locks.unlock(line)
        return False


def give_back(mem, locks, line: int) -> None:
    """Give back an entry this process holds: owner word 0, then the lock.
    Re-doable (R50): a redo after an interrupt between the two finds the word
    0 and gives the lock back."""
    with _mutex:
        w = mem.load_u64(line)
        if w == 0 or (w == my_owner_word() and mem.cas_u64(line, w, 0)):
            locks.unlock(line)          # (a lock this process does not hold: nothing happens)


class Role:
    """A one-holder role word at ``line``: a handle claims it when it opens and
    gives it back when it closes.

    The handle passes its mapping (``mem``: a Region, or the SharedState
    itself) to each call; the Role keeps none, so it makes no reference cycle
    with its handle, and a dropped handle frees its entry in ``_held`` at once.
    ``wake`` is the wake word only this role's holder sleeps on.
    """

    def __init__(self, identity, line: int, wake: int, label: str, name: str, sole: str, locks,
                 here: str = "is already held"):
        self._key = (identity, line)
        self._line, self._wake, self._locks = line, wake, locks
        self._label, self._name, self._sole, self._here = label, name, sole, here
        self.owner = 0          # our owner word while we hold the role
        self.pid = 0            # the process that claimed it (a forked child does not hold it)

    def held(self) -> bool:
        return bool(self.owner) and self.pid == os.getpid()

    def claim(self, mem) -> None:
        """Take the role: a free one, ours from a handle dropped without
        closing, or a dead holder's; else RoleTaken."""
        line, locks = self._line, self._locks
        me = my_owner_word()
        deadline = time.monotonic() + 2.0
        while True:
            cur = mem.load_u64(line + L.ROLE_OWNER)
            pid = L.split_owner(cur)[0]
            if cur == me and self._key not in _held:
                with _mutex:            # our own handle was dropped without closing: take it back
                    if locks.lock(line):
                        break
            if cur == me:
                raise RoleTaken(f"the {self._name} role of {self._label} {self._here} by another handle "
                                f"in this process (pid {pid}); close it first", pid)
            if cur and locks.held(line):
                raise RoleTaken(f"the {self._name} role of {self._label} is held by live process {pid}; "
                                f"{self._sole}", pid)
            if take_over(mem, locks, line, cur):
                if cur:
                    # The holder died: take over.  If it died asleep in a wait, its
                    # "waiters" count was never taken back, and every wake of that
                    # word would pay a futex_wake syscall forever.  Only this role's
                    # holder sleeps on it, and it is dead, so zero sleepers is exact.
                    # Only the sleepers' half (R4) is taken back: the armed half
                    # (R52) belongs to descriptor slots, which the next wake fires
                    # and counts down itself (R55); the seq half is kept.
                    n = mem.load_u32(self._wake + L.WAKE_WAITERS) & L.WAKE_SLEEPERS
                    if n:
                        mem.fetch_add_u64(self._wake + L.WAKE_SEQ, (-(n << 32)) & 0xFFFFFFFFFFFFFFFF)
                break
            if time.monotonic() > deadline:     # a live process is between its lock and its owner word
                raise RoleTaken(f"the {self._name} role of {self._label} is being claimed by another "
                                f"process; {self._sole}", pid)
            time.sleep(0.001)
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
            give_back(mem, self._locks, self._line)
            if _held.get(self._key) is self:
                del _held[self._key]
        self.owner = 0


def ring_role(ring, line: int) -> Role:
    """The producer (``line`` = OFF_PROD_ROLE) or consumer role of a ring."""
    name, wake = (("producer", L.OFF_SPACE_WAKE) if line == L.OFF_PROD_ROLE      # sleeps for room
                  else ("consumer", L.OFF_DATA_WAKE))                            # sleeps for data
    return Role(ring._identity, line, wake, ring._seg.label, name, f"an {ring.kind} ring has one {name}",
                ring._seg.locks)


def claim_entry(mem, locks, lines, what: str, label: str, kind: str, reclaim, adopt=None) -> int:
    """Take a free entry among ``lines`` (its lock, then its owner word) and
    return its index; ``reclaim(i, word)`` frees the entry of a dead holder
    (True if it did).  If none is free and ``adopt(i, word)`` is given, it may
    take a dead holder's entry over for us (True if it did: the entry is ours).
    All held by live processes: RoleTaken for a one-entry table, else ResourceLimit."""
    for _ in range(5):                  # a lost race on a free entry: look again
        holders, dead = [], []
        for i, line in enumerate(lines):
            cur = mem.load_u64(line + L.CE_OWNER)
            if cur and not holder_alive(locks, line, cur):
                if reclaim(i, cur):
                    cur = 0
                else:
                    dead.append((i, cur))
                    continue
            if cur == 0 and take_over(mem, locks, line, 0):
                return i
            holders.append(L.split_owner(cur)[0])
        if adopt is not None:
            for i, cur in dead:
                if adopt(i, cur):
                    return i
        if len(holders) == len(lines):
            break
        time.sleep(0.001)
    if len(lines) == 1:
        raise RoleTaken(f"the {what} role of {label} is held by live process {holders[0]}; "
                        f"a {kind} ring has one {what}", holders[0])
    raise ResourceLimit(f"all {len(lines)} {what} entries of {label} are held by live processes "
                        f"(pids {sorted(set(p for p in holders if p))[:8]}...); create the ring with a larger "
                        f"max_{what}s", f"max_{what}s", len(lines) + 1, len(lines))


def withdraw_waits(mem, waiting: int, wake: int) -> None:
    """R29: an entry taken over from a dead holder (the caller holds it now):
    take the sleeps it had announced in its ``waiting`` share (u32) off the
    shared wake word at ``wake`` (a holder killed asleep left them there, and
    every wake of that word would pay a futex_wake for it forever), then
    clear the share."""
    n = min(mem.load_u32(waiting), mem.load_u32(wake + L.WAKE_WAITERS) & L.WAKE_SLEEPERS)   # R52: not the armed half
    if n:
        # waiters is the high half of the wake line's first u64 (seq the low half)
        mem.fetch_add_u64(wake + L.WAKE_SEQ, (-(n << 32)) & 0xFFFFFFFFFFFFFFFF)
    mem.store_u32(waiting, 0)


def release(mem, locks, line: int) -> None:
    """Give back a table entry this process holds."""
    give_back(mem, locks, line)

