"""shmring's exceptions.

Every error derives from :class:`ShmringError` and also from the built-in a
caller would already catch (``TimeoutError``, ``ValueError``, ...).  Messages
say what was expected, what was found, and name the segment.  All of them
pickle, so they cross process boundaries intact.
"""
from __future__ import annotations


class ShmringError(Exception):
    """Base class of every shmring error."""


class Timeout(ShmringError, TimeoutError):
    """A blocking call did not complete within its timeout."""


class EndOfStream(ShmringError, EOFError):
    """The producer closed the ring and every message was received; or, from
    ``SharedState.wait_newer()``, the writer closed normally (or the state was
    unlinked with no writer) and no newer version is there."""


class PeerGone(ShmringError, ConnectionError):
    """The process on the other side died (its pid is gone or was reused).

    A consumer gets it only after draining every message the producer had
    committed; a producer gets it while waiting for room that a dead consumer
    will never free.
    """


class MessageTooLarge(ShmringError, ValueError):
    """The message can never fit in this ring (not "full right now")."""


class SegmentNotFound(ShmringError, FileNotFoundError):
    """No segment (or file) by that name."""


class SegmentExists(ShmringError, FileExistsError):
    """A segment (or file) by that name exists already."""


class PermissionDenied(ShmringError, PermissionError):
    """The segment exists but this process may not open it."""


class NoSpace(ShmringError, OSError):
    """There is not enough space (e.g. in /dev/shm) to create the segment."""


class ResourceLimit(ShmringError, OSError):
    """A process resource limit stopped the call: the open-files limit
    (``RLIMIT_NOFILE``) or the address space (``RLIMIT_AS``, or no room to map).

    ``limit`` names the limit, ``requested`` is what was asked for (bytes to
    map, or 1 descriptor), ``current`` the limit's value (-1 = unlimited/unknown).
    """

    def __init__(self, message: str, limit: str = "", requested: int = 0, current: int = -1):
        super().__init__(message, limit, requested, current)
        self.limit, self.requested, self.current = limit, requested, current

    def __str__(self) -> str:
        return self.args[0]


class CorruptSegmentError(ShmringError):
    """A value read from shared memory is impossible: foreign, truncated or corrupt segment."""


class SegmentTruncated(CorruptSegmentError):
    """The segment's backing was truncated (``ftruncate`` of the /dev/shm
    segment or the file) while this process had it mapped.  The pages that
    vanished would have killed the process with SIGBUS; shmring's guard
    mapped zeros over the whole mapping instead (views still held read
    zeros), and every later call on a handle of it raises this error.  What
    the segment held is lost: close its handles and create it again."""


class IncompatibleSegment(CorruptSegmentError):
    """The segment was written by another shmring layout version."""


class RoleTaken(ShmringError):
    """The role (producer or consumer) is held by another live process."""

    def __init__(self, message: str, pid: int = 0):
        super().__init__(message, pid)
        self.pid = pid

    def __str__(self) -> str:
        return self.args[0]


class Lagged(ShmringError):
    """A broadcast subscriber fell behind for longer than the ring's bound and
    was evicted (policy ``"evict"``).  ``missed`` messages (``missed_bytes``
    bytes) were sent that it never received; ``rejoin()`` starts it again."""

    def __init__(self, message: str, missed: int = 0, missed_bytes: int = 0):
        super().__init__(message, missed, missed_bytes)
        self.missed = missed
        self.missed_bytes = missed_bytes

    def __str__(self) -> str:
        return self.args[0]


class DecodeLimit(ShmringError, ValueError):
    """A msgpack object would cost a reader far more memory than its size
    (more than ``codec.DECODE_FACTOR`` x its meta + ``codec.DECODE_SLACK``
    bytes of Python objects), or nests deeper than ``codec.MAX_DEPTH``: it
    is refused, at send and at decode, rather than decoded."""


class HandleClosed(ShmringError, ValueError):
    """The handle (ring, producer, consumer or message) was closed or released."""


class WrongKind(ShmringError, TypeError):
    """The call does not take this kind of message: ``recv_bytes()`` found an
    array or object message (use ``recv()``); the message was not consumed."""


class UnsupportedType(ShmringError, TypeError):
    """The value cannot be sent: object dtype, or not msgpack-able."""


class EscapedViewWarning(UserWarning):
    """A zero-copy view outlived its message; its ring space stays held until the view dies."""
