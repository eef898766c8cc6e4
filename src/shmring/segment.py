"""Shared-memory segments: create, attach, close, unlink.

A segment is either a named POSIX shared-memory object (``/dev/shm/shmring.NAME``,
through ``posix_ipc``) or a regular file at a path (a persistent ring).  This
module knows nothing of rings: it maps bytes, validates the fixed header of
:mod:`shmring.layout`, and turns OS errors into shmring errors.

Lifetimes, as in ``multiprocessing.shared_memory``: :meth:`Segment.close`
detaches this process; :meth:`Segment.unlink` removes the name.  Nothing here
registers with ``multiprocessing.resource_tracker``.

Space is reserved at creation with ``posix_fallocate``, so a full ``/dev/shm``
is a :class:`~shmring.errors.NoSpace` error at create time, never a SIGBUS on
a later write.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import stat
import sys
import time
import weakref

import resource

import posix_ipc

from . import _core
from . import layout as L
from ._proc import my_start_time
from .liveness import Locks, probe
from .pausepoints import pause
from .errors import (CorruptSegmentError, HandleClosed, IncompatibleSegment, NoSpace, PermissionDenied,
                     ResourceLimit, SegmentExists, SegmentNotFound, SegmentTruncated, ShmringError)

PREFIX = "shmring."
SHM_DIR = "/dev/shm"
MAX_NAME = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)     # Linux 5.14+


SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW   # an anonymous segment's size can never change


def fd_reference(seg: "Segment"):
    """How a pickled anonymous segment reaches another process: while
    ``multiprocessing`` (or ``multiprocess``) is starting a process by spawn or
    forkserver, its own descriptor passing (the child gets a duplicate);
    otherwise this process's pid and descriptor number, which the receiver
    opens as /proc/PID/fd/N (the same file; this process must still be alive
    then, and the receiver of the same uid), checked against the file's
    identity."""
    fd = seg.locks.fd if seg.locks is not None else -1
    if fd < 0:
        raise ShmringError(f"{seg.label} is closed in this process: it cannot be passed on")
    for modname in ("multiprocessing.context", "multiprocess.context"):
        ctx = sys.modules.get(modname)
        popen = ctx.get_spawning_popen() if ctx is not None else None
        if popen is not None and hasattr(popen, "DupFd"):
            return ("dup", popen.DupFd(popen.duplicate_for_child(fd)), seg.identity)
    return ("proc", os.getpid(), fd, seg.identity)


def open_fd_reference(ref) -> int:
    """The descriptor a fd_reference stands for, in this process (ours to close)."""
    if ref[0] == "dup":
        fd, ident = ref[1].detach(), ref[2]
    else:
        _, pid, num, ident = ref
        try:
            fd = os.open(f"/proc/{pid}/fd/{num}", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SegmentNotFound(f"the anonymous segment passed by process {pid} is gone: that process "
                                  "exited (or closed it) before this one attached; keep it alive until "
                                  "the receiver has attached, or pass the ring to a process it starts") from None
        except PermissionError:
            raise PermissionDenied(f"cannot open the anonymous segment of process {pid} through /proc/{pid}/fd "
                                   "(another user, or ptrace restrictions)") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != tuple(ident):
        os.close(fd)
        raise SegmentNotFound("the anonymous segment passed on is gone: its descriptor number in the sending "
                              "process now names another file")
    return fd


def validate_name(name) -> str:
    """Return ``name`` if it is a valid segment name, else raise ValueError saying why."""
    if not isinstance(name, str):
        raise TypeError(f"segment name must be a str, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME:
        raise ValueError(f"segment name must be 1 to {MAX_NAME} characters, got {len(name)}: {name!r}")
    if not _NAME_RE.match(name):
        raise ValueError(f"segment name {name!r} may hold only letters, digits, '.', '_' and '-', "
                         "and must start with a letter or digit (no slashes)")
    return name


def posix_name(name: str) -> str:
    return "/" + PREFIX + name


def _label(name, path) -> str:
    if path is not None:
        return f"file {path!r}"
    return f"segment {name!r}" if name is not None else "an anonymous segment"


def _rlimit(which) -> int:
    try:
        return resource.getrlimit(which)[0]
    except (OSError, ValueError):
        return -1


def _fd_limit_error(what: str, exc) -> ResourceLimit:
    soft = _rlimit(resource.RLIMIT_NOFILE)
    if getattr(exc, "errno", None) == errno.ENFILE:
        return ResourceLimit(f"cannot open {what}: the system-wide open-files limit is reached (ENFILE, "
                             "/proc/sys/fs/file-max); asked for 1 more file descriptor", "ENFILE", 1, -1)
    # Counted without opening anything (listing /proc/self/fd needs a descriptor too)
    probe = min(soft, 1 << 16) if soft >= 0 else 1 << 16
    used = sum(1 for fd in range(probe) if _fd_open(fd))
    shown = f"{used} descriptors open" + ("" if probe == soft else f" below {probe}")
    return ResourceLimit(f"cannot open {what}: the open-files limit is reached (RLIMIT_NOFILE soft limit "
                         f"{soft}, {shown}); asked for 1 more file descriptor; "
                         "raise it with `ulimit -n` or resource.setrlimit", "RLIMIT_NOFILE", 1, soft)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _map(fd: int, size: int, what: str, populate: bool = True) -> mmap.mmap:
    """mmap ``size`` bytes of the segment; an exhausted address space becomes ResourceLimit."""
    try:
        return mmap.mmap(fd, size, flags=_MAP_FLAGS if populate else mmap.MAP_SHARED,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        if e.errno != errno.ENOMEM:
            raise _os_error(e, what) from None
        raise _map_enomem(size, what) from None


_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)    # Linux's value (Python 3.10+ names it)


def _map_double(fd: int, data_offset: int, capacity: int, what: str, populate: bool = True) -> mmap.mmap:
    """Map a ring segment with its data area twice, back to back (R60):
    ``data_offset + 2 * capacity`` bytes of address space, of which the last
    ``capacity`` alias the data area.  The reservation is an anonymous private
    mapping nothing ever touches (MAP_NORESERVE: no memory is committed for
    it), owned by the returned mmap object, whose close() unmaps the whole
    range; the C core maps the file over it (MAP_FIXED, twice)."""
    size = L.mapped_size(data_offset, capacity)
    try:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        if e.errno != errno.ENOMEM:
            raise _os_error(e, what) from None
        raise _map_enomem(size, what) from None
    try:
        _core.double_map(buf, fd, data_offset, capacity, populate)
    except OSError as e:
        buf.close()
        if e.errno != errno.ENOMEM:
            raise _os_error(e, what) from None
        raise _map_enomem(size, what) from None
    except BaseException:
        buf.close()
        raise
    return buf


def _double_geometry(h: dict, file_size: int):
    """(data offset, capacity) to double-map a ring whose header page reads
    ``h`` (R60), or None: not a framed ring, or fields that do not add up to
    ``file_size`` (then it is mapped once and the header checks say what is
    wrong).  Every field is untrusted."""
    doff, cap = h["data_offset"], h["capacity"]
    if (h["kind"] not in L.DOUBLE_MAPPED_KINDS or not L.MIN_CAPACITY <= cap <= L.MAX_CAPACITY
            or cap & (cap - 1) or doff % L.HEADER_SIZE or not L.HEADER_SIZE <= doff <= L.MAX_CAPACITY
            or doff + cap != file_size):
        return None
    return doff, cap


def _proc_number(path: str, field: str | None = None) -> int | None:
    """An integer from a /proc file: its whole text, or a ``Field: N kB`` line in bytes."""
    try:
        with open(path) as f:
            if field is None:
                return int(f.read())
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _map_enomem(size: int, what: str) -> ResourceLimit:
    """Which limit an ENOMEM from mmap hit: the address space (RLIMIT_AS), the
    kernel's count of mappings per process (vm.max_map_count), or memory."""
    lim = _rlimit(resource.RLIMIT_AS)
    mapped = _proc_number("/proc/self/status", "VmSize")
    if lim != resource.RLIM_INFINITY and lim >= 0 and (mapped is None or mapped + size > lim):
        return ResourceLimit(f"cannot map {what}: asked to map {size:,} bytes but the address space is "
                             f"exhausted (RLIMIT_AS soft limit {lim:,} bytes; ENOMEM from mmap); raise it "
                             "with `ulimit -v` or resource.setrlimit(RLIMIT_AS)", "RLIMIT_AS", size, lim)
    max_maps = _proc_number("/proc/sys/vm/max_map_count")
    try:
        with open("/proc/self/maps", "rb") as f:
            maps = sum(1 for _ in f)
    except OSError:
        maps = None
    if max_maps is not None and maps is not None and maps >= max_maps - 2:
        return ResourceLimit(f"cannot map {what}: this process has {maps:,} memory mappings, the kernel's "
                             f"limit per process (vm.max_map_count {max_maps:,}; ENOMEM from mmap); close rings "
                             "and other mappings it no longer needs, or raise the limit "
                             "(sysctl -w vm.max_map_count=N)", "vm.max_map_count", 1, max_maps)
    shown = "unlimited" if lim == resource.RLIM_INFINITY else f"{lim:,} bytes"
    return ResourceLimit(f"cannot map {what}: the kernel refused to map {size:,} bytes (ENOMEM from mmap) "
                         f"although neither RLIMIT_AS ({shown}) nor vm.max_map_count ({maps} of {max_maps} "
                         "mappings) is reached: the machine is short of memory, or overcommit "
                         "(vm.overcommit_memory) refused it", "ENOMEM", size, -1)


def _reserve_space(fd: int, size: int, doing: str, name, path) -> None:
    """posix_fallocate the first ``size`` bytes; ``doing`` starts the message."""
    fsize = _rlimit(resource.RLIMIT_FSIZE)
    if fsize != resource.RLIM_INFINITY and 0 <= fsize < size and os.fstat(fd).st_size < size:
        # Checked first: growing a file past RLIMIT_FSIZE raises SIGXFSZ,
        # which kills a process that did not ignore it (Python ignores it).
        raise ResourceLimit(f"{doing} it needs a file of {size:,} bytes but this process may write files "
                            f"of at most {fsize:,} bytes (RLIMIT_FSIZE soft limit); raise it with `ulimit -f` "
                            "or resource.setrlimit(RLIMIT_FSIZE)", "RLIMIT_FSIZE", size, fsize)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if name is None and path is None and e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise NoSpace(f"{doing} the kernel refused {size:,} bytes of anonymous shared memory "
                          f"({errno.errorcode.get(e.errno, e.errno)}): the machine is short of memory "
                          "(anonymous segments are memory, not files in /dev/shm)") from None
        if e.errno == errno.EFBIG:
            raise NoSpace(f"{doing} it needs a file of {size:,} bytes, larger than the file system at "
                          f"{SHM_DIR if path is None else os.path.abspath(path)} allows (EFBIG)") from None
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM):
            where = SHM_DIR if path is None else os.path.dirname(os.path.abspath(path))
            free = _free_bytes(where)
            raise NoSpace(f"{doing} it needs {size:,} bytes but {where} has {free:,} bytes free") from None
        raise _os_error(e, _label(name, path)) from None


def _claimed_size(hdr, wait_ready: float) -> tuple[bool, int | None, dict]:
    """(ready, the segment size the header page claims, the header): ready
    once its creator marked it so; the size only if it is this layout version
    too.  Not ready: not a shmring segment, or never initialized (the header
    validators say which)."""
    deadline = time.monotonic() + wait_ready
    while True:
        ready = _core.header_ready(hdr)    # R1: acquire, before any other field
        h = L.read_header(hdr)
        if ready == 1 and h["magic"] == L.MAGIC:
            return True, (h["segment_size"] if h["version"] == L.LAYOUT_VERSION else None), h
        if h["magic"] not in (0, L.MAGIC) or time.monotonic() >= deadline:
            return False, None, h
        time.sleep(0.005)


_ENTRY_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file"))


def entry_kind(mode: int) -> str:
    """What a file mode says an entry is ("a directory", "a FIFO", ...)."""
    return next((kind for test, kind in _ENTRY_KINDS if test(mode)), "an unknown kind of file")


def _not_a_file(name, path, mode=None) -> ShmringError:
    """The error for a name or path that is not a regular file: it says what it is."""
    entry = path if path is not None else os.path.join(SHM_DIR, PREFIX + name)
    if mode is None:
        try:
            mode = os.lstat(entry).st_mode
        except OSError:
            return SegmentNotFound(f"{_label(name, path)} does not exist")
    kind = entry_kind(mode)
    if stat.S_ISLNK(mode):
        return PermissionDenied(f"{_label(name, path)}: {entry} is a symbolic link; shmring refuses to follow it")
    return CorruptSegmentError(f"{_label(name, path)}: {entry} is {kind}, not a shared-memory segment (a "
                               "regular file); shmring leaves it alone: remove it if it is not wanted, or "
                               "use another name")


def _os_error(exc: OSError, what: str) -> ShmringError:
    if exc.errno in (errno.EMFILE, errno.ENFILE) or (
            exc.errno is None and "maximum number of files" in str(exc)):   # posix_ipc's EMFILE has no errno
        return _fd_limit_error(what, exc)
    if exc.errno == errno.ENOENT:
        return SegmentNotFound(f"{what} does not exist")
    if exc.errno == errno.EEXIST:
        return SegmentExists(f"{what} exists already")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{what}: permission denied ({exc.strerror})")
    if exc.errno == errno.ELOOP:
        return PermissionDenied(f"{what} is a symbolic link; shmring refuses to follow it")
    if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
        return NoSpace(f"{what}: no space ({exc.strerror})")
    return ShmringError(f"{what}: {exc}")


class Segment:
    """A mapped segment.  ``buf`` is the writable mmap of the whole segment."""

    allow_foreign_owner = False   # as opened (open() sets it): handed on when a ring pickles
    owner_uid = None              # the file's owner at open time (shown by the CLI)
    unready = False               # open() waited for its header in vain: only its page is mapped

    def __init__(self, name: str | None, path: str | None, buf: mmap.mmap, size: int, identity=None,
                 locks: Locks | None = None):
        self.identity = identity          # (st_dev, st_ino): the same object under any name
        self.name = name
        self.path = path
        self.buf = buf
        self.size = size
        self.gen = _core.fork_generation()   # a segment mapped before a fork is the parent's to unlink
        # This process's file description of the segment, holding the attach
        # lock and its roles' locks (shmring.liveness), for as long as the
        # mapping lives: views may outlive close(), and so does the lock.
        self.locks = locks
        if locks is not None:
            weakref.finalize(buf, _core.finish_quietly, locks.close)   # R50: interrupted, it is finished
        # The SIGBUS guard (docs/design.md, R45): registered from here until
        # close(), and while any view made by view() lives.
        self.guard = _core.Guard(buf, self.label)

    def view(self) -> memoryview:
        """A writable memoryview of the whole mapping that keeps it guarded
        (R45) for as long as it, or anything made from it, lives."""
        return memoryview(self.guard)

    @property
    def label(self) -> str:
        return _label(self.name, self.path)

    # -- create -------------------------------------------------------------
    @classmethod
    def create(cls, name: str | None, size: int, *, path=None, mode: int = 0o600,
               replace_dead: bool = False, dmap=None) -> "Segment":
        """Create a segment of ``size`` bytes (all zero), reserving its space now.

        ``replace_dead``: if the name exists but no live process has it
        attached (every user died, e.g. a killed run), remove it and create
        afresh (R65); one a live process has attached is never replaced.
        ``dmap``: (data offset, capacity) of a ring whose data area is mapped
        twice (R60)."""
        if path is None:
            validate_name(name)
        else:
            path = os.fspath(path)
        what = _label(name, path)
        if not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be a permission mask like 0o600, got {mode!r}")
        replaced = None
        while True:
            try:
                if path is None:
                    shm = posix_ipc.SharedMemory(posix_name(name), posix_ipc.O_CREX, mode=mode, size=0)
                    fd = shm.fd
                else:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
                break
            except (posix_ipc.ExistentialError, FileExistsError):
                if replace_dead and replaced is None:
                    replaced = remove_if_dead(name, path=path)
                    if replaced is True:
                        continue               # once: a creator that beat us to the name keeps it
                    raise SegmentExists(f"{what} exists already and was not replaced: {replaced}") from None
                if replaced is True:
                    raise SegmentExists(f"{what} exists already: another process created it right after "
                                        "the dead one was removed (it won the race)") from None
                raise SegmentExists(f"{what} exists already; attach to it, or unlink it first"
                                    + (_foreign_owner_note(name) or _dead_note(name, path))) from None
            except posix_ipc.PermissionsError as e:
                raise PermissionDenied(f"{what}: permission denied ({e})") from None
            except OSError as e:
                raise _os_error(e, what) from None
        try:
            os.fchmod(fd, mode)           # exactly the mode asked for, whatever the umask
        except BaseException:
            os.close(fd)
            _unlink(name, path)
            raise
        return cls._made(fd, size, name, path, what, dmap=dmap)

    @classmethod
    def _made(cls, fd: int, size: int, name, path, what, seal: bool = False, dmap=None) -> "Segment":
        """The rest of a create, from the new segment open at ``fd`` (closed
        here): its liveness locks, its space reserved, sealed (anonymous),
        mapped.  On failure a named segment is unlinked again."""
        locks = None
        try:
            locks = _attach_lock(fd, what)
            _reserve_space(fd, size, f"cannot create {what}:", name, path)
            if seal:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
            buf = _map(fd, size, what) if dmap is None else _map_double(fd, *dmap, what)
            st = os.fstat(fd)
        except BaseException:
            if locks is not None:
                locks.close()
            if not (name is None and path is None):
                _unlink(name, path)
            raise
        finally:
            os.close(fd)                  # the mapping and the locks' description keep what they need
        return cls(name, path, buf, size, (st.st_dev, st.st_ino), locks)

    @classmethod
    def create_anonymous(cls, size: int, dmap=None) -> "Segment":
        """A segment with no name anywhere: a ``memfd`` (anonymous shared
        memory), its space reserved, then sealed against any change of size
        (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL: the kernel refuses
        ftruncate, so nobody can make its pages vanish), handed to other
        processes by descriptor (fork, or pickling: see fd_reference) and
        freed by the kernel when the last process closes or dies."""
        what = _label(None, None)
        try:
            fd = os.memfd_create("shmring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise _os_error(e, what) from None
        return cls._made(fd, size, None, None, what, seal=True, dmap=dmap)

    @property
    def anonymous(self) -> bool:
        return self.name is None and self.path is None

    # -- attach -------------------------------------------------------------
    @classmethod
    def from_fd(cls, fd: int, *, allow_foreign_owner: bool = False, wait_ready: float = 1.0) -> "Segment":
        """Map the anonymous segment open at ``fd`` (received from another
        process; this takes it over and closes it).  It must be sealed
        against shrinking (a memfd made by create_anonymous): a descriptor of
        anything else is refused, since its pages could vanish under us."""
        what = _label(None, None)
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & SEALS != SEALS:
            os.close(fd)
            raise IncompatibleSegment(f"descriptor {fd} is not a sealed anonymous shmring segment (a memfd "
                                      "sealed against resizing); attach named rings by name or path")
        return cls._open_fd(fd, None, None, what, wait_ready, allow_foreign_owner)

    @classmethod
    def open(cls, name: str | None, *, path=None, wait_ready: float = 1.0,
             allow_foreign_owner: bool = False, wait: float = 0.0) -> "Segment":
        """Map an existing segment (no validation beyond its size; see validate_header).

        ``wait``: seconds to keep retrying while it does not exist yet.
        A segment (a POSIX name or a ``path``) must be a regular file, not a
        symbolic link, and owned by this process's effective uid unless
        ``allow_foreign_owner`` is true: a segment another user planted could
        otherwise read what we send, or feed us data they control.
        """
        deadline = time.monotonic() + float(wait)
        while True:
            try:
                return cls._open(name, path=path, wait_ready=wait_ready, allow_foreign_owner=allow_foreign_owner)
            except SegmentNotFound:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    @classmethod
    def _open(cls, name, *, path, wait_ready, allow_foreign_owner) -> "Segment":
        if path is None:
            validate_name(name)
        else:
            path = os.fspath(path)
        what = _label(name, path)
        try:
            if path is None:
                fd = posix_ipc.SharedMemory(posix_name(name), 0).fd
            else:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except posix_ipc.ExistentialError:
            raise SegmentNotFound(f"{what} does not exist") from None
        except posix_ipc.PermissionsError as e:
            raise PermissionDenied(f"{what}: permission denied ({e})") from None
        except (OSError, ValueError) as e:     # posix_ipc: ValueError for a directory (EISDIR)
            if isinstance(e, ValueError) or e.errno in (errno.EISDIR, errno.ELOOP, errno.ENXIO):
                raise _not_a_file(name, path) from None
            raise _os_error(e, what) from None
        return cls._open_fd(fd, name, path, what, wait_ready, allow_foreign_owner)

    @classmethod
    def _open_fd(cls, fd, name, path, what, wait_ready, allow_foreign_owner) -> "Segment":
        """The rest of an attach, from the segment open at ``fd`` (closed here)."""
        locks = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # a FIFO or a device; checked before we lock or map it
                raise _not_a_file(name, path, st.st_mode)
            locks = _attach_lock(fd, what)
            st = os.fstat(fd)
            if st.st_nlink == 0 and not (name is None and path is None):   # (a memfd never has a link)
                raise SegmentNotFound(f"{what} was removed (by shmring gc or an unlink) while attaching")
            if st.st_uid != os.geteuid() and not allow_foreign_owner:
                # A POSIX name is as open to planting as a path: anyone may
                # create /dev/shm/shmring.NAME first (squatting), then read
                # what we send or feed us values.  Trust only our own.
                raise PermissionDenied(f"{what} is owned by uid {st.st_uid}, not by this process's uid "
                                       f"{os.geteuid()}: another user created it; pass "
                                       "allow_foreign_owner=True to attach anyway if you trust that user")
            # A creator sizes the segment right after creating it: give it a moment.
            deadline = time.monotonic() + wait_ready
            while st.st_size < L.HEADER_SIZE and time.monotonic() < deadline:
                time.sleep(0.005)
                st = os.fstat(fd)
            size = st.st_size
            if size < L.HEADER_SIZE:
                raise CorruptSegmentError(f"{what} is {size} bytes, smaller than the {L.HEADER_SIZE}-byte "
                                          "shmring header: truncated, still being created, or not a shmring segment")
            # The header page first, validated, then only the size it claims
            # (never the whole file, never prefaulted: a planted sparse giant
            # is not allocated by looking at it).  Prefaulting and reserving
            # space are reserve()'s, once the caller validated the header.
            buf = _map(fd, L.HEADER_SIZE, what, populate=False)
            ready, claim, h = _claimed_size(buf, wait_ready)
            if claim is not None and claim > size:
                buf.close()
                raise SegmentTruncated(f"{what} is {size:,} bytes but its header says {claim:,}: "
                                       "truncated (or a corrupt header)")
            if claim is not None and claim > L.HEADER_SIZE:
                buf.close()
                dmap = _double_geometry(h, claim)
                buf = _map(fd, claim, what, populate=False) if dmap is None else \
                    _map_double(fd, *dmap, what, populate=False)
                size = claim
            else:
                size = len(buf)
        except BaseException:
            if locks is not None:
                locks.close()
            raise
        finally:
            os.close(fd)                  # the mapping keeps its own descriptor (no locks on it)
        seg = cls(name, path, buf, size, (st.st_dev, st.st_ino), locks)
        seg.allow_foreign_owner, seg.owner_uid, seg.unready = allow_foreign_owner, st.st_uid, not ready
        return seg

    def reserve(self) -> None:
        """Make the segment ready for use, after its header was validated:
        reserve its space again if its file has holes (a sparse copy or a
        restored backup: ``posix_fallocate``, so a full filesystem is
        :class:`NoSpace` now, never a SIGBUS on a later write; nothing is done
        when it is fully allocated), then prefault the mapping."""
        fd = self.locks.fd
        try:
            holes = os.lseek(fd, 0, os.SEEK_HOLE) < self.size or os.fstat(fd).st_blocks * 512 < self.size
        except OSError:
            holes = True
        if holes:
            _reserve_space(fd, self.size, f"cannot attach to {self.label}: its file has holes (a sparse copy "
                                          "or restore?) and", self.name, self.path)
        try:
            self.buf.madvise(_MADV_POPULATE_WRITE)      # what MAP_POPULATE does at create
        except (OSError, ValueError, AttributeError):
            pass                                        # before Linux 5.14: pages fault in on first use

    # -- lifetime -----------------------------------------------------------
    def close(self) -> None:
        """Detach.  If views of the mapping are still alive it stays mapped
        until they are gone (it is never unmapped under a live view)."""
        buf, self.buf = self.buf, None
        if buf is not None:
            self.guard.close()            # R45: unregistered before any munmap (now, or after the last view)
            try:
                buf.close()
            except BufferError:
                return            # exported to a handle or a view: unmapped (and unlocked) when the last one dies
            if self.locks is not None:
                self.locks.close()

    def unlink(self) -> None:
        """Remove the name (or file).  Mappings stay valid until closed.
        An anonymous segment has none: nothing to do (the kernel frees it
        when the last process closes it)."""
        if not self.anonymous:
            _unlink(self.name, self.path, missing_ok=False)


def _attach_lock(fd: int, what: str) -> Locks:
    """The shared attach lock on a new file description of the segment open
    at ``fd`` (shmring.liveness).  A description of its own: the mapping
    keeps a duplicate of ``fd`` for its lifetime, which a forked child
    inherits, and a lock on that description would outlive us there.  ``gc``
    holds the attach lock exclusively only while it removes the segment: wait
    a little for that, never forever."""
    try:
        lfd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error(e, f"{what} (a second descriptor for its liveness locks, via /proc/self/fd)") from None
    locks = Locks(lfd)
    deadline = time.monotonic() + 2.0
    while not locks.share_attach():
        if time.monotonic() >= deadline:
            locks.close()
            raise ShmringError(f"{what} is locked exclusively by another process (shmring gc removing it?)")
        time.sleep(0.005)
    return locks


def _foreign_owner_note(name) -> str:
    """For SegmentExists on create: who owns an existing POSIX name, if not us."""
    if name is None:
        return ""
    try:
        uid = os.stat(os.path.join(SHM_DIR, PREFIX + name), follow_symlinks=False).st_uid
    except OSError:
        return ""
    if uid == os.geteuid():
        return ""
    try:
        import pwd
        who = f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        who = f"uid {uid}"
    return (f". It is owned by {who}, not by this process's uid {os.geteuid()}: another user "
            f"created the name first (squatting, or a ring of theirs). Pick another name, or if it is "
            f"not legitimately theirs, remove it (`shmring rm {name}`, as root or as its owner)")


def _unlink(name, path, missing_ok=True) -> None:
    try:
        if path is not None:
            os.unlink(path)
        else:
            posix_ipc.unlink_shared_memory(posix_name(name))
    except (posix_ipc.ExistentialError, FileNotFoundError):
        if not missing_ok:
            raise SegmentNotFound(f"{_label(name, path)} does not exist (already unlinked?)") from None
    except posix_ipc.PermissionsError as e:
        raise PermissionDenied(f"{_label(name, path)}: permission denied ({e})") from None


def _open_for_probe(name, path):
    where = path if path is not None else os.path.join(SHM_DIR, PREFIX + validate_name(name))
    return os.open(where, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)


def in_use(name: str | None = None, *, path=None) -> bool | None:
    """Whether any process has the segment mapped (holds its attach lock,
    :mod:`shmring.liveness`); None if it cannot be told (no write access)."""
    try:
        fd = _open_for_probe(name, path)
    except OSError:
        return None
    try:
        return not probe(fd).attach_exclusive()
    finally:
        os.close(fd)


def remove_if_unused(name: str | None = None, *, path=None) -> bool | None:
    """Unlink the segment if no process has it mapped, deciding and
    unlinking while holding its attach lock exclusively, so nobody can attach
    in between (an attacher that raced us finds it removed).  True: removed;
    False: in use; None: it cannot be told (no write access) or it is gone."""
    try:
        fd = _open_for_probe(name, path)
    except OSError:
        return None
    try:
        if not probe(fd).attach_exclusive():
            return False
        if os.fstat(fd).st_nlink == 0:
            return None        # R66: removed (and maybe created afresh) between our open and our lock
        try:
            _unlink(name, path, missing_ok=False)
        except SegmentNotFound:
            return None
        return True
    finally:
        os.close(fd)


REPLACE_GRACE = 10.0     # seconds an uninitialized segment is presumed to be under construction (= gc's)


def remove_if_dead(name: str | None = None, *, path=None, grace: float = REPLACE_GRACE):
    """``create(..., replace_dead=True)``: unlink an existing segment that no
    live process has attached (R65, R66).  Decided and unlinked under its
    attach lock held exclusively, as ``gc`` does; a segment whose header is
    not complete is left alone while younger than ``grace`` seconds (its
    creator may be between creating the name and taking its attach lock), as
    is one owned by another uid or that is not a shmring segment.  True:
    removed (or gone already); otherwise a string saying why not."""
    try:
        fd = _open_for_probe(name, path)
    except FileNotFoundError:
        return True
    except OSError as e:
        return f"cannot open it to tell whether it is in use ({e.strerror})"
    try:
        pause("replace_opened")           # opened, not locked: another replacer may finish first (R66)
        if not probe(fd).attach_exclusive():
            return "a live process has it attached (`shmring ls` shows which)"
        st = os.fstat(fd)
        if st.st_nlink == 0:
            return True                 # another replacer (or gc) removed it between our open and our lock
        if st.st_uid != os.geteuid():
            return f"it is owned by uid {st.st_uid}, not by this process's uid {os.geteuid()}"
        head = os.pread(fd, L.HEADER_SIZE, 0)
        h = L.read_header(head) if len(head) >= L.HEADER_STRUCT.size else None
        if h is None or h["magic"] != L.MAGIC or h["ready"] != 1:
            if h is not None and h["magic"] not in (0, L.MAGIC):
                return "it is not a shmring segment (remove it by hand if it is yours)"
            if time.time() - st.st_mtime < grace:
                return f"it is not initialized yet and younger than {grace:g} s (being created?)"
        _unlink(name, path, missing_ok=True)
        return True
    finally:
        os.close(fd)


def _dead_note(name, path) -> str:
    """For SegmentExists on create: say so when every user of it is gone."""
    if in_use(name, path=path) is not False:
        return ""
    fix = f"`shmring gc {name}`" if path is None else f"`rm {path}`"
    return (". No live process has it attached: every process that used it is gone (killed?), "
            f"so it is left over. Remove it ({fix}), or pass replace_dead=True to create(), "
            "which replaces a segment only when no live process uses it")


def unlink(name: str | None = None, *, path=None, missing_ok: bool = False) -> None:
    """Remove a segment by name (or a ring file by path) without attaching to it."""
    if path is None:
        validate_name(name)
    _unlink(name, None if path is None else os.fspath(path), missing_ok=missing_ok)


def _free_bytes(where: str) -> int:
    try:
        s = os.statvfs(where)
        return s.f_bavail * s.f_frsize
    except OSError:
        return 0


def write_header(buf, *, kind: int, capacity: int, geometry: dict | None = None) -> None:
    """Fill a fresh (zeroed) segment's fixed header; ``ready`` is stored last by the caller."""
    buf[:L.HEADER_STRUCT.size] = L.pack_header(kind=kind, capacity=capacity, creator_pid=os.getpid(),
                                               creator_start=my_start_time(), created_ns=time.time_ns(),
                                               geometry=geometry)


def read_common_header(seg: Segment, *, wait_ready: float = 1.0) -> dict:
    """The fixed header of a mapped segment of any kind, once its creator has
    finished it, with magic, layout version and layout hash checked."""
    what = seg.label
    # open() already gave an unready header its grace (and mapped only its page)
    deadline = time.monotonic() + (0 if seg.unready else wait_ready)
    while True:
        # R1 (docs/design.md): ready with acquire ordering before any other field
        ready = _core.header_ready(seg.buf) if len(seg.buf) >= L.HEADER_SIZE else 0
        h = L.read_header(seg.buf)
        if h["magic"] == L.MAGIC and ready == 1 and not seg.unready:   # (ready only since: still too late)
            break
        if h["magic"] not in (0, L.MAGIC):
            raise CorruptSegmentError(f"{what} is not a shmring segment: magic {h['magic']:#018x}, "
                                      f"expected {L.MAGIC:#018x} ('SHMRING1')")
        if time.monotonic() >= deadline:
            raise CorruptSegmentError(f"{what} was never fully initialized (ready flag {h['ready']}, "
                                      f"magic {h['magic']:#x}); its creator may have died while creating it")
        time.sleep(0.005)
    if h["version"] != L.LAYOUT_VERSION:
        old = (f" (layout {h['version']} framed rings padded the wrap and took messages up to capacity // 2; "
               f"layout {L.LAYOUT_VERSION} maps the data area twice)" if h["version"] < L.LAYOUT_VERSION else "")
        raise IncompatibleSegment(f"{what} uses shmring layout version {h['version']}; this shmring "
                                  f"reads version {L.LAYOUT_VERSION}{old}: it was made by another shmring "
                                  "version; use that version with it, or remove it and create it again")
    if h["layout_hash"] != L.LAYOUT_HASH:
        raise IncompatibleSegment(f"{what} has layout hash {h['layout_hash']:#x}, expected "
                                  f"{L.LAYOUT_HASH:#x}: written by an incompatible shmring build")
    return h


def validate_header(seg: Segment, *, wait_ready: float = 1.0) -> dict:
    """Check a mapped ring segment's fixed header; return its fields.  Every field is untrusted."""
    what = seg.label
    h = read_common_header(seg, wait_ready=wait_ready)
    if h["kind"] == L.KIND_STATE:
        raise IncompatibleSegment(f"{what} is a shmring SharedState segment, not a ring; "
                                  "open it with shmring.SharedState.attach()")
    if h["kind"] not in L.KIND_NAMES:
        raise CorruptSegmentError(f"{what} has unknown ring kind {h['kind']}")
    cap = h["capacity"]
    if not (L.MIN_CAPACITY <= cap <= L.MAX_CAPACITY) or cap & (cap - 1):
        raise CorruptSegmentError(f"{what} has impossible capacity {cap}")
    if h["kind"] in L.MULTI_KINDS:
        from .parties import check_multi_header
        check_multi_header(h, seg.buf, what)
        if seg.size < h["segment_size"]:
            raise SegmentTruncated(f"{what} is {seg.size:,} bytes but its header says {h['segment_size']:,}: "
                                   "it was truncated")
        _check_double_map(seg, h)
        return h
    if h["data_offset"] != L.HEADER_SIZE or h["max_message"] != L.max_message(cap):
        raise CorruptSegmentError(f"{what} has inconsistent header fields: data offset "
                                  f"{h['data_offset']}, max message {h['max_message']} for capacity {cap}")
    expect = L.segment_size(cap)
    if h["segment_size"] == expect and seg.size < expect:
        raise SegmentTruncated(f"{what} is {seg.size:,} bytes but its header says {h['segment_size']:,} "
                               f"(capacity {cap:,} needs {expect:,}): it was truncated")
    if h["segment_size"] != expect or seg.size < expect:
        raise CorruptSegmentError(f"{what} is {seg.size:,} bytes but its header says {h['segment_size']:,} "
                                  f"(capacity {cap:,} needs {expect:,}): truncated or corrupt")
    _check_double_map(seg, h)
    return h


_RAW_WORD_METHODS = ("load_u32", "load_u64", "store_u32", "store_u64", "cas_u64", "fetch_add_u64")


class _InternalWordAccess:
    """Hides a raw shared-memory word accessor of the C base class on a public
    handle (issue 16 case 10): a store or CAS at a wrong offset corrupts a live
    ring for every process.  shmring's own code calls the ``_``-prefixed
    aliases (``_load_u64`` ...)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        raise AttributeError(f"{(objtype or type(obj)).__name__}.{self.name} is not public: raw access to "
                             "shared-memory words could corrupt a live ring or state for every process "
                             "(shmring uses it internally as _" + self.name + ")")


def hide_word_access(cls):
    """Class decorator: the raw word accessors of a C base class become
    private on ``cls`` (``_load_u64`` ...), the public names raise."""
    from . import _core
    for name in _RAW_WORD_METHODS:
        setattr(cls, "_" + name, getattr(_core.Region, name))
        hidden = _InternalWordAccess()
        hidden.__set_name__(cls, name)
        setattr(cls, name, hidden)
    return cls


def _check_double_map(seg: Segment, h: dict) -> None:
    """A framed ring is mapped with its data area twice (R60); open() does
    it when the header page adds up, so a mapping of another size means the
    header did not."""
    if h["kind"] in L.DOUBLE_MAPPED_KINDS and len(seg.buf) != L.mapped_size(h["data_offset"], h["capacity"]):
        raise CorruptSegmentError(f"{seg.label}: its header fields (data offset {h['data_offset']:,}, capacity "
                                  f"{h['capacity']:,}, segment size {h['segment_size']:,}) do not describe "
                                  "a ring whose data area can be mapped twice")


class SegmentHandle:
    """What Ring and SharedState share: ``unlink()`` and the context manager
    (a handle made by ``create`` unlinks its POSIX segment on exit; a
    file-backed one persists; an attached one is only closed)."""

    _seg: Segment
    _created: bool

    @classmethod
    def _refuse_direct(cls, seg) -> None:
        """``Ring("x")``: handles are made by create / attach (they map the
        segment and check its header), never by calling the class."""
        if not isinstance(seg, Segment):
            base = next(c.__name__ for c in cls.__mro__ if c.__module__.startswith("shmring."))
            raise TypeError(f"shmring.{base} is not constructed directly: use shmring.{base}.create(name, ...) "
                            f"to make one, shmring.{base}.attach(name) to open an existing one "
                            f"(or shmring.{base}.anonymous(...) for one without a name)")

    @property
    def name(self) -> str | None:
        """The segment name (None for a file-backed handle made without one)."""
        return self._seg.name

    @property
    def path(self) -> str | None:
        """The file of a file-backed handle, else None."""
        return self._seg.path

    @property
    def is_anonymous(self) -> bool:
        """True for an anonymous (memfd, sealed) segment: no name anywhere."""
        return self._seg.anonymous

    def dup_fd(self) -> int:
        """A new descriptor of this segment, yours to close: hand it to
        another process yourself (``socket.send_fds``, a pidfd...), which
        attaches with ``from_fd``.  Pickling does this for you."""
        fd = self._seg.locks.fd if self._seg.locks is not None else -1
        if fd < 0:
            raise HandleClosed(f"{self._seg.label} is closed in this process")
        return os.dup(fd)

    def unlink(self) -> None:
        """Remove the name (or file).  Attached processes keep working.
        An anonymous segment has no name: nothing to do."""
        self._seg.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        # A forked child leaving the parent's `with ...create(...)` block only
        # detaches its own mapping: the name is the creator's to remove.
        if self._created and self._seg.path is None and self._seg.gen == _core.fork_generation():
            try:
                self.unlink()
            except ShmringError:
                pass


def list_entries() -> list[tuple[str, str | None]]:
    """``(name, None)`` for each ``shmring.*`` regular file in /dev/shm, and
    ``(name, "a directory")`` (or a FIFO, a symbolic link...) for each entry
    under the prefix that is not one, for ``shmring ls`` / ``gc`` to report."""
    try:
        with os.scandir(SHM_DIR) as it:
            found = []
            for e in it:
                if not e.name.startswith(PREFIX):
                    continue
                try:
                    mode = e.stat(follow_symlinks=False).st_mode
                except OSError:
                    continue                       # gone meanwhile
                found.append((e.name[len(PREFIX):], None if stat.S_ISREG(mode) else entry_kind(mode)))
    except OSError:
        return []
    return sorted(found)


def list_segments() -> list[str]:
    """Names of the POSIX segments shmring created on this machine (by file
    name; entries under the prefix that are not regular files are not segments)."""
    return [name for name, odd in list_entries() if odd is None]
