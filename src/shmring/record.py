"""Record a ring's stream into a file, and replay a file into a ring.

``record(ring, path)`` takes the ring's consumer role (a broadcast ring: a new
subscriber) and appends every message to a record file
(:mod:`shmring.recordfile`, docs/record-format.md) until the stream ends.  A
message's payload goes from the segment's file descriptor to the file in the
kernel (``copy_file_range``, else ``sendfile``, at the message's offset in the
segment), before the message is released; only the 40-byte record header is
written from user space.  ``method="write"`` writes the payload from the
mapped ring instead (the measured fallback, bench/record_cases.py), and
``"auto"`` does that for payloads under ``small`` bytes, where one ``writev``
of header and payload costs less than two system calls.

``replay(path, ring)`` sends the recorded messages again, with their recorded
timing scaled by ``speed`` (None: as fast as possible), each laid out at its
new offset (arrays realigned) and read from the file straight into the
reserved ring space (``preadv``: one kernel copy, none in user space); then
ends the stream as the recording ended (PeerGone for a recorded dead
producer, end of stream otherwise).
"""
from __future__ import annotations

import errno
import os
import time
import zlib

from . import layout as L
from . import recordfile as F
from .pausepoints import pause
from .errors import EndOfStream, MessageTooLarge, PeerGone, ShmringError, Timeout, WrongKind

FSYNC_POLICIES = ("none", "end", "every")


class RecordWriteError(ShmringError, OSError):
    """The record file could not take a message (disk full, file too large,
    I/O error): ``record`` stops; the message was given back to the ring."""

_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ESPIPE}


class _Sink:
    """The output file, and the way payloads get into it."""

    def __init__(self, fd: int, seg_fd: int, seg_size: int, method: str, small: int):
        self.fd, self.seg_fd, self.seg_size = fd, seg_fd, seg_size
        self.method, self.small = method, small
        self.kernel = method != "write" and seg_fd >= 0
        self.cfr = hasattr(os, "copy_file_range")
        self.kernel_bytes = self.user_bytes = 0

    def put(self, header: bytes, msg) -> None:
        n, off = msg.nbytes, msg._offset
        if not self.kernel or (self.method == "auto" and n < self.small) or off + n > self.seg_size:
            with memoryview(msg) as mv:
                _write_all(self.fd, [header, mv])
            self.user_bytes += n
            return
        _write_all(self.fd, [header])
        pause("record_header_written")              # (tests: a recorder killed between header and payload)
        done = 0
        while done < n:
            try:
                if self.cfr:
                    k = os.copy_file_range(self.seg_fd, self.fd, n - done, off + done)
                else:
                    k = os.sendfile(self.fd, self.seg_fd, off + done, n - done)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                if self.cfr:                        # tmpfs to another filesystem: EXDEV; try sendfile
                    self.cfr = False
                    continue
                if self.method == "kernel":
                    raise ShmringError(f"cannot copy from the segment to the file in the kernel: {e}") from None
                self.kernel = False                 # auto: the rest by write()
                with memoryview(msg) as mv:
                    _write_all(self.fd, [mv[done:]])
                self.user_bytes += n - done
                return
            if k == 0:
                raise ShmringError(f"the segment ended at offset {off + done} inside a message (truncated?)")
            done += k
        self.kernel_bytes += n


def _write_all(fd: int, bufs: list) -> None:
    total = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in bufs)
    k = os.writev(fd, bufs)
    if k == total:
        return
    flat = b"".join(bytes(b) for b in bufs)[k:]      # rare: a short write (disk full signals ENOSPC next)
    while flat:
        flat = flat[os.write(fd, flat):]


def record(ring, path, *, start: str = "oldest", fsync="end", crc: bool = False, method: str = "auto",
           small: int = 16 << 10, count: int | None = None, stop=None, overwrite: bool = False,
           poll: float = 0.2) -> dict:
    """Append every message of ``ring`` (a Ring, or the name of one) to a new
    record file at ``path`` until the stream ends, ``count`` messages were
    recorded, or ``stop`` (a ``threading.Event``-like object, checked every
    ``poll`` seconds while idle) is set.  Returns counts.

    ``fsync``: ``"none"`` (the kernel writes back when it likes: a process
    crash loses nothing, a machine crash may lose the tail), ``"end"`` (the
    default: one fsync when recording ends), ``"every"`` (fdatasync after
    every record) or a number of seconds (fdatasync at most that often).
    ``crc=True`` stores a crc32 of every payload (read from the ring; costs
    one pass over the bytes).  ``method``: ``"kernel"`` (copy_file_range /
    sendfile for every payload), ``"write"`` (writev from the mapping), or
    ``"auto"`` (kernel copy from ``small`` bytes up)."""
    from .ring import Ring
    if method not in ("auto", "kernel", "write"):
        raise ValueError(f"method must be 'auto', 'kernel' or 'write', got {method!r}")
    interval = None
    if not isinstance(fsync, str):
        interval = float(fsync)
        if interval < 0:
            raise ValueError(f"fsync interval must be >= 0 s, got {fsync}")
    elif fsync not in FSYNC_POLICIES:
        raise ValueError(f"fsync must be one of {FSYNC_POLICIES} or a number of seconds, got {fsync!r}")
    own = not isinstance(ring, Ring)
    if own:
        ring = Ring.attach(ring)
    try:
        if ring.dtype is not None:
            raise WrongKind(f"{ring._seg.label} is a record ring (dtype {ring.dtype}); record() takes message rings")
        cons = ring.subscribe(start) if ring.kind == "broadcast" else ring.consumer()
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
        fd = os.open(os.fspath(path), flags, 0o644)
        try:
            with cons:
                return _record(cons, ring, fd, fsync, interval, crc, method, small, count, stop, poll)
        finally:
            os.close(fd)
    finally:
        if own:
            ring.close()


def _record(cons, ring, fd, fsync, interval, crc, method, small, count, stop, poll) -> dict:
    seg = ring._seg
    sink = _Sink(fd, seg.locks.fd if seg.locks is not None else -1, seg.size, method, small)
    t0 = time.monotonic_ns()
    os.write(fd, F.pack_file_header(time.time_ns(), ring.capacity, ring.name or "", F.F_PAYLOAD_CRC if crc else 0))
    seq, nbytes, end = 0, 0, F.END_STOPPED
    last_sync = time.monotonic()
    header = F.pack_record_header
    while count is None or seq < count:
        if stop is not None and stop.is_set():
            break
        try:
            msg = cons.recv(timeout=poll if stop is not None else None)
        except Timeout:
            continue
        except EndOfStream:
            end = F.END_EOS
            break
        except PeerGone:
            end = F.END_PEER_GONE
            break
        good = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            n = msg.nbytes
            pcrc = 0
            if crc:
                with memoryview(msg) as mv:
                    pcrc = zlib.crc32(mv)
            sink.put(header(F.K_DATA, msg._offset % F.ALIGN, msg.type, n, pcrc,
                            time.monotonic_ns() - t0, seq), msg)
        except BaseException as e:
            # not in the file (disk full, file too large, Ctrl-C mid-copy): the
            # message is given back, not consumed, so the next consumer gets it
            # (spsc / mpsc; mpmc: requeued), and the file is cut back to its last
            # whole record (no torn tail to repair)
            msg.give_back()
            try:
                os.ftruncate(fd, good)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise RecordWriteError(f"cannot write record {seq} ({n} bytes) to the file: {e.strerror or e}; "
                                       f"{seq} messages are in it, and this one was given back to the ring "
                                       f"for the next consumer") from e
            raise
        msg.release()                                # only after its bytes are in the file
        seq += 1
        nbytes += n
        if fsync == "every" or (interval is not None and time.monotonic() - last_sync >= interval):
            os.fdatasync(fd)
            last_sync = time.monotonic()
    try:
        os.write(fd, header(F.K_END, 0, end, 0, 0, time.monotonic_ns() - t0, seq))
        if fsync != "none":
            os.fsync(fd)
    except OSError as e:
        raise RecordWriteError(f"cannot finish the record file: {e.strerror or e}; its {seq} messages are in "
                               f"it (read as unfinished: no end record)") from e
    return {"messages": seq, "bytes": nbytes, "end": F.END_NAMES[end], "kernel_bytes": sink.kernel_bytes,
            "user_bytes": sink.user_bytes}


def replay(path, ring, *, speed: float | None = 1.0, close: bool = True, timeout=None, repair: bool = True) -> dict:
    """Send the messages of the record file at ``path`` into ``ring`` (a
    Ring, or the name of one), keeping their recorded spacing divided by
    ``speed`` (``None``: as fast as possible), then (``close=True``) end the
    stream: with PeerGone if the recording ended so, else end of stream.
    ``timeout`` bounds each wait for room.  The file is scanned first (a torn
    tail truncated when ``repair`` and writable); a corrupt file raises
    :class:`~shmring.recordfile.RecordFileError` before anything is sent."""
    from .ring import CLOSED_ABORTED, CLOSED_EOS, Ring
    if speed is not None and not speed > 0:
        raise ValueError(f"speed must be > 0 (or None: as fast as possible), got {speed}")
    own = not isinstance(ring, Ring)
    with F.open_file(path, repair=repair) as rf:
        if own:
            ring = Ring.attach(ring)
        try:
            if ring.dtype is not None:
                raise WrongKind(f"{ring._seg.label} is a record ring; replay() feeds message rings")
            prod = ring.producer()
            status = CLOSED_EOS
            try:
                sent = _replay(rf, prod, speed, timeout, ring.max_message)
            except BaseException:
                status = CLOSED_ABORTED
                raise
            finally:
                if close:
                    prod.close(_status=CLOSED_ABORTED if rf.end == "peer gone" else status)
                else:
                    prod.detach()
        finally:
            if own:
                ring.close()
        return {"messages": sent, "end": rf.end, "torn_bytes": rf.torn_bytes}


def _replay(rf, prod, speed, timeout, max_message) -> int:
    t0 = time.monotonic()
    sent = 0
    wmv = prod._wmv
    for rec in rf:
        if rec.kind == "end":
            break
        if speed is not None:
            delay = t0 + rec.t_ns / 1e9 / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        n = rec.length
        if rec.type == F.T_BYTES:
            meta_len = narrays = 0
            src_area = n
            need = n
        else:
            meta_len, narrays, src_area = rec.layout(os.pread(rf.fd, F.PREFIX.size, rec.offset))
            need = n + (F.ALIGN - 1 if narrays else 0)
        if need > max_message:
            raise MessageTooLarge(f"{rf.path}: record {rec.seq} ({n} bytes) does not fit this ring "
                                  f"(largest message {max_message} bytes)")
        t = prod._reserve_blocking(need, rec.type, timeout)
        try:
            off = t.offset
            head = F.PREFIX.size + meta_len if narrays else n          # prefix and meta (or all of a bytes payload)
            dst_area = (L.align(off + head, F.ALIGN) - off) if narrays else n
            pieces = [(off, head, rec.offset)]
            if narrays:
                wmv[off + head:off + dst_area] = bytes(dst_area - head)      # the pad, zeroed
                pieces.append((off + dst_area, n - src_area, rec.offset + src_area))
            for at, size, src in pieces:
                with wmv[at:at + size] as view:
                    if size and os.preadv(rf.fd, [view], src) != size:
                        raise F.RecordFileError(f"{rf.path}: record {rec.seq}: the file ended inside its payload")
            if rf.flags & F.F_PAYLOAD_CRC:
                if narrays:
                    c = _crc_file_order(wmv, off, head, dst_area, n - src_area, rf, rec, src_area)
                else:
                    with wmv[off:off + n] as view:
                        c = zlib.crc32(view)
                if c != rec.pcrc:
                    raise F.RecordFileError(f"{rf.path}: record {rec.seq}: payload crc32 mismatch (corrupt)")
            t.commit(dst_area + n - src_area if narrays else n)
        except BaseException:
            t.abort()
            raise
        sent += 1
    return sent


def _pad_bytes(rf, rec, head, src_area) -> bytes:
    return os.pread(rf.fd, src_area - head, rec.offset + head)


def _crc_file_order(wmv, off, head, dst_area, area_len, rf, rec, src_area) -> int:
    """crc32 of the payload as recorded: head, the recorded pad, the array area."""
    with wmv[off:off + head] as v:
        c = zlib.crc32(v)
    c = zlib.crc32(_pad_bytes(rf, rec, head, src_area), c)
    with wmv[off + dst_area:off + dst_area + area_len] as v:
        return zlib.crc32(v, c)


# -- command line (registered by shmring.cli) ---------------------------------------------
def add_commands(sub, size) -> None:
    s = sub.add_parser("record", help="append every message of a ring to a record file, until its stream ends",
                       description="Take the ring's consumer role (a broadcast ring: subscribe) and append every "
                                   "message to FILE (docs/record-format.md) until the stream ends or Ctrl-C.")
    s.add_argument("name", help="the ring's segment name")
    s.add_argument("file")
    s.add_argument("--start", choices=("oldest", "newest"), default="oldest", help="broadcast: where to join")
    s.add_argument("--fsync", default="end",
                   help="none, end (default), every, or SECONDS between fdatasyncs")
    s.add_argument("--crc", action="store_true", help="store a crc32 of every payload")
    s.add_argument("--method", choices=("auto", "kernel", "write"), default="auto",
                   help="payload copy: kernel (copy_file_range/sendfile), write, auto (kernel from 16 KiB)")
    s.add_argument("--count", type=int, help="stop after N messages")
    s.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    s.set_defaults(func=_cmd_record)
    s = sub.add_parser("replay", help="send a record file's messages into a ring, then end its stream")
    s.add_argument("file")
    s.add_argument("name", help="the ring's segment name (attached; created with --create)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--speed", type=float, default=1.0, help="recorded timing divided by X (default 1)")
    g.add_argument("--as-fast-as-possible", action="store_true", help="ignore the recorded timing")
    s.add_argument("--create", action="store_true", help="create the ring (spsc) if it does not exist")
    s.add_argument("--capacity", type=size, help="with --create: capacity (default: the recorded ring's)")
    s.add_argument("--timeout", type=float, help="give up when the ring stays full this long (seconds)")
    s.set_defaults(func=_cmd_replay)


def _stop_on_signals():
    import signal
    import threading
    ev = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: ev.set())
    return ev


def _cmd_record(args) -> int:
    fsync = args.fsync
    if fsync not in FSYNC_POLICIES:
        try:
            fsync = float(fsync)
        except ValueError:
            raise ValueError(f"--fsync takes none, end, every or a number of seconds, not {fsync!r}") from None
    try:
        r = record(args.name, args.file, start=args.start, fsync=fsync, crc=args.crc, method=args.method,
                   count=args.count, stop=_stop_on_signals(), overwrite=args.overwrite)
    except FileExistsError:
        raise ValueError(f"{args.file} exists; --overwrite replaces it") from None
    print(f"recorded {r['messages']} messages ({r['bytes']} bytes; {r['kernel_bytes']} copied in the kernel) "
          f"into {args.file}; {r['end']}")
    return 0


def _cmd_replay(args) -> int:
    from .errors import SegmentNotFound
    from .ring import Ring
    try:
        ring = Ring.attach(args.name)
    except SegmentNotFound:
        if not args.create:
            raise
        with F.open_file(args.file, repair=False) as rf:
            cap = args.capacity or max(1 << 16, rf.capacity)
        ring = Ring.create(args.name, cap)
        ring._created = False                 # the name stays for the consumers: remove it with shmring rm
    with ring:
        r = replay(args.file, ring, speed=None if args.as_fast_as_possible else args.speed, timeout=args.timeout)
    torn = f" (a torn tail of {r['torn_bytes']} bytes was cut)" if r["torn_bytes"] else ""
    print(f"replayed {r['messages']} messages into {args.name}; recording ended: {r['end'] or 'unfinished'}{torn}")
    return 0
