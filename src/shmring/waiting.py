"""Waiting: the one deadline / slice / retry loop behind every blocking call.

Every call that may block (``send``, ``recv``, their record-ring and asyncio
forms, ``shmring.wait``, ``wait_newer``, a writer waiting for a free slot) is
:func:`wait_until` or :func:`wait_until_async` with its own three callables:

* ``attempt()``: one non-blocking try; not None ends the wait with that value.
* ``sleep(seconds)``: block (in C, GIL released) for at most one slice; True
  if woken by the other side, False if the slice ran out.
* ``on_slice()`` (or None): after a slice that ran out, and at the deadline:
  recovery work, and the pid of a dead peer that ends the wait (else 0).

The loop owns the rest, the same for both twins: the deadline, slices of at
most ``WAIT_SLICE`` seconds (signal handlers such as Ctrl-C run between them),
one more attempt after a dead peer is found or the deadline passes (what the
peer committed before dying still counts), and :class:`~shmring.errors.PeerGone`
/ :class:`~shmring.errors.Timeout`.  The asyncio twin calls ``attempt`` and
``on_slice`` on the event loop like the blocking loop, but takes ``arms``
instead of ``sleep``: the wake-up descriptors to arm (:mod:`shmring.wakefd`,
R52 to R56), awaited on the event loop itself, with no thread.  Arming never
takes anything, and a cancelled await disarms, so it leaves the ring as it
was.
"""
from __future__ import annotations

import time

from . import wakefd
from .errors import PeerGone, Timeout

WAIT_SLICE = 0.1          # seconds between liveness / signal checks while blocked
DEFAULT_SPIN = 50e-6      # seconds to busy-poll before yielding, then sleeping


def check_timeout(timeout) -> float | None:
    """The deadline (``time.monotonic()`` clock) of a ``timeout`` argument: None
    waits forever; anything else must be a number of seconds >= 0."""
    if timeout is None:
        return None
    timeout = float(timeout)
    if timeout < 0 or timeout != timeout:
        raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout}")
    return time.monotonic() + timeout


def _next_slice(deadline) -> float:
    """Seconds to sleep next: one slice, or less if the deadline is nearer (<= 0: it has passed)."""
    return WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())


def _after_quiet_slice(attempt, on_slice, left, timeout_message, gone_message):
    """A slice ran out without a wake-up, or the deadline has passed
    (``left`` <= 0): check on the peer; a dead peer or the deadline ends the
    wait, with the result of one last attempt, else PeerGone / Timeout.
    None: go on waiting."""
    pid = on_slice() if on_slice is not None else 0
    if pid or left <= 0:
        r = attempt()                       # what a dead peer committed still counts
        if r is not None:
            return r
        if pid:
            raise PeerGone(gone_message(pid))
        raise Timeout(timeout_message())
    return None


def wait_until(attempt, sleep, on_slice, timeout, timeout_message, gone_message=None):
    """Retry ``attempt()`` until it returns non-None and return that, sleeping
    between tries with ``sleep(seconds)``; see the module docstring.
    ``timeout_message()`` and ``gone_message(pid)`` build the error messages."""
    deadline = check_timeout(timeout)
    while True:
        r = attempt()
        if r is not None:
            return r
        left = _next_slice(deadline)
        if left > 0 and sleep(left):
            continue                        # woken: try again
        r = _after_quiet_slice(attempt, on_slice, left, timeout_message, gone_message)
        if r is not None:
            return r


async def wait_until_async(attempt, arms, on_slice, timeout, timeout_message, gone_message=None):
    """The asyncio twin of :func:`wait_until`, line for line: only the sleep
    differs.  ``arms()`` gives the ``(region, wake offset, arm)`` list of
    :func:`shmring.wakefd.sleep_async` (called each time: a condition may
    depend on state that moved); the event loop watches the descriptor."""
    deadline = check_timeout(timeout)
    while True:
        r = attempt()
        if r is not None:
            return r
        left = _next_slice(deadline)
        if left > 0 and await wakefd.sleep_async(arms(), left):
            continue
        r = _after_quiet_slice(attempt, on_slice, left, timeout_message, gone_message)
        if r is not None:
            return r
