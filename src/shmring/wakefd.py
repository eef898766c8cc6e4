"""Wake-up descriptors: waiting on a ring, a record ring or a SharedState from
an event loop or a selector, with no thread (rules R52 to R56 of docs/design.md).

A process listens on an abstract-namespace unix datagram socket named by a
random 64-bit *word* (``"\\0shmring.%016x"``).  A waiter arms a slot of the
wake line it would otherwise futex-sleep on with that word, counts itself in
the high half of the line's ``waiters`` word, and re-checks its condition
(C: ``fd_arm``).  A waker that finds the count non-zero clears each armed slot
by one CAS and sends its word's socket one byte (``fd_fire``).  So:

* nothing is sent unless somebody armed (the waker's hot path is the same
  one load of ``waiters`` as before);
* each arm costs at most one datagram (firing clears it: one-shot);
* a dead waiter's armed slot costs the next waker one refused ``sendto``,
  then it is gone (R55);
* a full datagram queue drops a datagram but leaves the socket readable,
  and the receiver looks at every slot it armed, not at what it received.

Two users:

* asyncio: one :class:`_LoopWaker` per event loop (``loop.add_reader`` on its
  socket); :func:`sleep_async` arms, awaits a fire or the end of the slice,
  and disarms (also when cancelled).
* ``fileno()`` of a consumer handle: a :class:`HandleWaker` of its own, armed
  whenever ``try_recv`` comes back empty; readable when there is something
  to receive, or the stream ended.

An abstract socket needs no file and vanishes with its process, but it lives
in a network namespace: a waker in another one gets ECONNREFUSED (counted as
``fd_refused``); the waiter's 0.1 s slice still sees the change.
"""
from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import threading
import weakref

from . import _core
from .errors import HandleClosed, ShmringError

POLL = 0.002              # seconds between polls of a waiter that found every slot of its wake line taken
NOT_ARMED_READY = -1      # what an arm function returns when the condition already holds
NOT_ARMED_NO_SLOT = -2    # ... when every slot of the wake line is taken (poll)

stats = {"armed": 0, "fired": 0, "polls": 0}     # this process's asyncio waits (tests and bench read them)


class Waker:
    """One abstract unix datagram socket of this process, and the word that names it."""

    def __init__(self):
        for _ in range(16):
            word = int.from_bytes(os.urandom(8), "little")
            if not word:
                continue
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                sock.bind(_core.wake_address(word))
            except OSError as e:
                sock.close()
                if e.errno == errno.EADDRINUSE:       # 2**-64 per try; or a squatter: another word
                    continue
                raise
            self.word, self.sock, self.pid = word, sock, os.getpid()
            self._close = weakref.finalize(self, sock.close)
            return
        raise ShmringError("could not bind a wake-up socket: every random name was taken")

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> int:
        """Read every queued datagram (their content means nothing: R54)."""
        return _core.fd_drain(self.sock.fileno())

    def poke(self) -> None:
        """Make the socket readable from here (the condition already holds)."""
        try:
            self.sock.sendto(b"\1", _core.wake_address(self.word))
        except (BlockingIOError, InterruptedError):
            pass                                     # queue full: readable already

    def close(self) -> None:
        self._close()


def _armed(region, off, slot, word) -> bool:
    try:
        return region._fd_armed(off, slot, word)
    except (HandleClosed, ValueError):
        return False                                 # the handle went: wake its waiter, whose next call says so


def _disarm(region, off, slot, word) -> None:
    try:
        region._fd_disarm(off, slot, word)
    except (HandleClosed, ValueError):
        pass


class _LoopWaker(Waker):
    """The socket every await of one event loop arms with (one reader on the loop)."""

    def __init__(self, loop):
        super().__init__()
        self.regs = {}                              # id(future) -> [(region, wake offset, slot), ...], future
        loop.add_reader(self.sock.fileno(), self._readable)
        fd = self.sock.fileno()
        lref = weakref.ref(loop)

        def unhook(lref=lref, fd=fd):
            lp = lref()
            if lp is not None and not lp.is_closed():
                lp.remove_reader(fd)
        self._unhook = unhook

    def _readable(self):
        self.drain()
        word = self.word
        for key, (slots, fut) in list(self.regs.items()):
            if any(not _armed(r, off, k, word) for r, off, k in slots):      # fired (R54)
                del self.regs[key]
                for r, off, k in slots:
                    _disarm(r, off, k, word)            # the others of a wait on many
                stats["fired"] += 1
                if not fut.done():
                    fut.set_result(True)


_loop_wakers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _waker_for(loop) -> _LoopWaker:
    w = _loop_wakers.get(loop)
    if w is None or w.pid != os.getpid():
        if w is not None:                           # a forked child: the parent's socket is not ours (R56)
            w._unhook()
            w.close()
        w = _loop_wakers[loop] = _LoopWaker(loop)
    return w


def _wake(fut, value):
    if not fut.done():
        fut.set_result(value)


async def sleep_async(arms, seconds: float) -> bool:
    """Wait, without a thread, until one of ``arms`` fires or ``seconds`` pass.

    ``arms``: a list of ``(region, wake offset, arm)``, where ``arm(word)``
    arms a slot of that wake line and re-checks the waiter's condition (the C
    ``_arm_*`` calls): it returns the slot, -1 if the condition holds, -2 if
    no slot is free.  True: woken (or ready at once); False: the time ran out.
    Cancelling it disarms every slot it armed."""
    loop = asyncio.get_running_loop()
    w = _waker_for(loop)
    word = w.word
    end = loop.time() + seconds
    while True:
        slots, full = [], False
        for region, off, arm in arms:
            try:
                k = arm(word)
            except BaseException:
                for r, o, kk in slots:
                    _disarm(r, o, kk, word)
                raise
            if k == NOT_ARMED_READY:
                for r, o, kk in slots:
                    _disarm(r, o, kk, word)
                return True
            if k >= 0:
                slots.append((region, off, k))
            else:
                full = True
        if not full:
            break
        # a wake line with every slot taken: poll it (R55); the armed ones still fire
        for r, o, kk in slots:
            _disarm(r, o, kk, word)
        stats["polls"] += 1
        left = end - loop.time()
        if left <= 0:
            return False
        await asyncio.sleep(min(POLL, left))
    stats["armed"] += 1
    fut = loop.create_future()
    key = id(fut)
    w.regs[key] = (slots, fut)
    timer = loop.call_at(end, _wake, fut, False)
    try:
        return await fut
    finally:
        timer.cancel()
        if w.regs.pop(key, None) is not None:       # not fired: take the arms back (R54)
            for r, o, k in slots:
                _disarm(r, o, k, word)


_thread_wakers = {}


def sleep_select(arms, seconds: float) -> bool:
    """The blocking twin of :func:`sleep_async` (``shmring.wait`` with record
    consumers): arm every line, ``select`` on this thread's socket for at
    most ``seconds``, disarm.  True: woken or ready."""
    key = (os.getpid(), threading.get_ident())
    w = _thread_wakers.get(key)
    if w is None:
        w = _thread_wakers[key] = Waker()
    word, slots = w.word, []
    try:
        for region, off, arm in arms:
            k = arm(word)
            if k == NOT_ARMED_READY:
                return True
            if k >= 0:
                slots.append((region, off, k))
            else:
                seconds = min(seconds, POLL)        # a full line: poll it (R55)
        w.drain()
        if not any(not _armed(r, o, k, word) for r, o, k in slots):
            select.select([w.sock], [], [], max(seconds, 0))
        return any(not _armed(r, o, k, word) for r, o, k in slots)
    finally:
        for r, o, k in slots:
            _disarm(r, o, k, word)


class HandleWaker(Waker):
    """The descriptor behind a handle's ``fileno()``: readable when there may
    be something to receive.  ``rearm()`` after an empty try: drain, then arm
    (or, if the condition already holds or no slot is free, make it readable)."""

    def __init__(self, region, off, arm):
        super().__init__()
        self.region, self.off, self.arm, self.slot = region, off, arm, -1
        self.rearm()

    def rearm(self) -> None:
        self.drain()
        if self.slot >= 0 and _armed(self.region, self.off, self.slot, self.word):
            return                                  # still armed: a fire will make it readable
        self.slot = self.arm(self.word)
        if self.slot < 0:                           # ready now, or nowhere to arm: readable (never lost)
            self.poke()

    def close(self) -> None:
        if self.slot >= 0:
            _disarm(self.region, self.off, self.slot, self.word)
            self.slot = -1
        super().close()
