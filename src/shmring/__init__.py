"""shmring: zero-copy inter-process communication over shared memory.

Processes on one machine exchange numpy arrays and msgpack messages through a
lock-free ring buffer in a shared segment (a consumer's array is a read-only
view of the shared pages), and share state through copy-on-write snapshots
(readers pin a version in place while a writer publishes the next).  See README.md for a tour and docs/design.md for the
protocol.
"""
from ._core import Message, Snapshot
from .errors import (CorruptSegmentError, DecodeLimit, EndOfStream, EscapedViewWarning, HandleClosed,
                     IncompatibleSegment, Lagged, MessageTooLarge, NoSpace, PeerGone, PermissionDenied,
                     ResourceLimit, RoleTaken, SegmentExists, SegmentNotFound, SegmentTruncated, ShmringError,
                     Timeout, UnsupportedType, WrongKind)
from .codec import InPlace
from .pipeline import Pipeline, PipelineError
from .queues import JoinableQueue, Queue, SimpleQueue
from .ring import Consumer, Producer, Reservation, Ring, wait, wait_async
from .segment import list_segments, unlink
from .snapshot import SharedState

from ._version import __version__  # noqa: E402  (one place: shmring._version)

__all__ = [
    "Ring", "Producer", "Consumer", "Message", "Reservation", "list_segments", "unlink", "wait", "wait_async", "Lagged", "InPlace",
    "Pipeline", "PipelineError",
    "Queue", "SimpleQueue", "JoinableQueue",
    "SharedState", "Snapshot",
    "ShmringError", "Timeout", "EndOfStream", "PeerGone", "MessageTooLarge", "SegmentNotFound",
    "SegmentExists", "PermissionDenied", "NoSpace", "ResourceLimit", "CorruptSegmentError", "IncompatibleSegment",
    "SegmentTruncated",
    "RoleTaken", "HandleClosed", "UnsupportedType", "WrongKind", "EscapedViewWarning", "DecodeLimit",
]
