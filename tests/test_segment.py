"""Segments: names, capacities, modes, file-backed rings, foreign and damaged files,
permissions, lifetimes and space."""
import gc
import os
import pickle
import signal
import stat
import struct
import subprocess
import threading

import numpy as np
import pytest

import shmring
from shmring import errors
from shmring import layout as L

SHM = "/dev/shm/shmring."


def shm_path(name):
    return SHM + name


def make_file_ring(path, capacity=1 << 12, messages=()):
    """A closed file-backed ring holding ``messages``; returns its bytes."""
    with shmring.Ring.create(path=path, capacity=capacity) as ring, ring.producer() as p:
        for m in messages:
            p.send(m)
        p.detach()
    with open(path, "rb") as f:
        return f.read()


def patch(path, off, fmt, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


# --------------------------------------------------------------------------- names and capacities

@pytest.mark.parametrize("bad,why", [
    ("a" * 65, "1 to 64 characters"), ("", "1 to 64 characters"), ("a/b", "no slashes"),
    ("/abs", "no slashes"), (".hidden", "start with a letter or digit"), ("-dash", "start with"),
    ("_under", "start with"), ("sp ace", "letters, digits"), ("naïve", "letters, digits"),
    ("nul\0", "letters, digits"), ("tab\t", "letters, digits"), ("x\n", "letters, digits"),
])
def test_bad_names_are_value_errors_saying_what_is_allowed(bad, why):
    for call in (lambda: shmring.Ring.create(bad, 4096), lambda: shmring.Ring.attach(bad),
                 lambda: shmring.unlink(bad)):
        with pytest.raises(ValueError, match=why):
            call()
    assert not any(e.startswith("shmring.") and bad and bad in e for e in os.listdir("/dev/shm"))


@pytest.mark.parametrize("bad", [123, b"bytes-name", 1.5, ["x"]])
def test_non_string_names_are_type_errors(bad):
    with pytest.raises(TypeError, match="str"):
        shmring.Ring.create(bad, 4096)
    with pytest.raises(TypeError, match="str"):
        shmring.Ring.attach(bad)


def test_missing_name_and_path_is_a_type_error_for_attach_and_anonymous_for_create():
    with shmring.Ring.create(None, 4096) as ring:            # no name, no path: an anonymous ring
        assert ring.is_anonymous
    with pytest.raises(TypeError, match="name"):
        shmring.Ring.attach()


def test_longest_and_odd_but_valid_names_work():
    for name in ("a" * 64, "0.x_y-z", "Z"):
        shmring.unlink(name, missing_ok=True)
        try:
            with shmring.Ring.create(name, 4096) as ring:
                assert os.path.exists(shm_path(name)) and ring.name == name
        finally:
            shmring.unlink(name, missing_ok=True)


@pytest.mark.parametrize("cap,match", [
    (5000, "power of two.*got 5000.*next power of two: 8192"), (4095, "power of two.*4096"),
    (2048, "from 4096"), (0, "got 0"), (-4096, "got -4096"), (1 << 41, "to 1099511627776"),
    (3 << 20, "next power of two: 4194304"),
])
def test_bad_capacity_is_a_value_error_with_a_hint(ring_name, cap, match):
    with pytest.raises(ValueError, match=match):
        shmring.Ring.create(ring_name, cap)
    assert not os.path.exists(shm_path(ring_name))


@pytest.mark.parametrize("cap", [4096.0, "4096", True, None])
def test_non_integer_capacity_is_a_type_error(ring_name, cap):
    with pytest.raises(TypeError, match="capacity"):
        shmring.Ring.create(ring_name, cap)


def test_numpy_integer_capacity_is_accepted(ring_name):
    with shmring.Ring.create(ring_name, np.int64(8192)) as ring:
        assert ring.capacity == 8192 and ring.max_message == 8184


def test_unknown_ring_kind_is_a_value_error(ring_name):
    with pytest.raises(ValueError, match="kind"):
        shmring.Ring.create(ring_name, 4096, kind="multicast")


# --------------------------------------------------------------------------- create, attach, unlink

def test_creating_an_existing_segment_is_segment_exists(ring_name):
    with shmring.Ring.create(ring_name, 4096):
        with pytest.raises(shmring.SegmentExists) as ei:
            shmring.Ring.create(ring_name, 4096)
        assert isinstance(ei.value, FileExistsError) and ring_name in str(ei.value)
        assert os.path.exists(shm_path(ring_name))           # the failed create removed nothing


def test_attaching_a_missing_segment_is_segment_not_found(ring_name):
    with pytest.raises(shmring.SegmentNotFound) as ei:
        shmring.Ring.attach(ring_name)
    assert isinstance(ei.value, FileNotFoundError) and ring_name in str(ei.value)


def test_unlink_of_a_missing_segment(ring_name):
    with pytest.raises(shmring.SegmentNotFound):
        shmring.unlink(ring_name)
    shmring.unlink(ring_name, missing_ok=True)


def test_segments_are_created_mode_0600_by_default(ring_name):
    old = os.umask(0)
    try:
        with shmring.Ring.create(ring_name, 4096):
            assert os.stat(shm_path(ring_name)).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [0o640, 0o666, 0o400, 0o000])
def test_an_explicit_mode_is_respected_whatever_the_umask(ring_name, mode):
    old = os.umask(0o077)
    try:
        with shmring.Ring.create(ring_name, 4096, mode=mode):
            assert os.stat(shm_path(ring_name)).st_mode & 0o777 == mode
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [0o1000, -1, "0600", 0o4755])
def test_bad_mode_is_a_value_error(ring_name, mode):
    with pytest.raises(ValueError, match="mode"):
        shmring.Ring.create(ring_name, 4096, mode=mode)
    assert not os.path.exists(shm_path(ring_name))


def test_context_manager_of_a_created_ring_unlinks_its_segment(ring_name):
    with shmring.Ring.create(ring_name, 4096) as ring:
        assert ring_name in shmring.list_segments()
        with shmring.Ring.attach(ring_name) as attached:
            assert attached.capacity == 4096
        assert os.path.exists(shm_path(ring_name))          # an attached ring only closes
    assert not os.path.exists(shm_path(ring_name))
    assert ring_name not in shmring.list_segments()
    assert ring.closed


def test_unlink_removes_the_name_but_attached_handles_keep_working(ring_name):
    ring = shmring.Ring.create(ring_name, 4096)
    p, c = ring.producer(), ring.consumer()
    ring.unlink()
    assert not os.path.exists(shm_path(ring_name))
    with pytest.raises(shmring.SegmentNotFound):
        shmring.Ring.attach(ring_name)
    with pytest.raises(shmring.SegmentNotFound):
        ring.unlink()
    p.send(b"after unlink")
    assert c.recv_bytes() == b"after unlink"
    p.close()
    c.close()
    ring.close()


def test_close_is_idempotent_and_a_closed_ring_reports_it(ring_name):
    ring = shmring.Ring.create(ring_name, 4096)
    assert not ring.closed
    ring.close()
    ring.close()
    assert ring.closed
    ring.unlink()


def test_close_with_a_live_view_keeps_the_view_valid(ring_name):
    ring = shmring.Ring.create(ring_name, 4096)
    with ring.producer() as p:
        p.send(np.arange(100, dtype="<i8"))
        p.send(b"bytes view")
    c = ring.consumer()
    m1, m2 = c.recv(), c.recv()
    arr, mv = m1.value, m2.value
    ring.close()
    ring.unlink()
    assert ring.closed
    assert arr.sum() == 4950 and arr[99] == 99
    assert mv.tobytes() == b"bytes view"
    with pytest.warns(shmring.EscapedViewWarning):
        m1.release()
    del arr, mv, m1, m2, c
    gc.collect()


def test_mapping_is_unmapped_once_the_last_handle_and_view_are_gone(ring_name):
    def mapped():
        with open("/proc/self/maps") as f:
            return sum(shm_path(ring_name) in line for line in f)
    ring = shmring.Ring.create(ring_name, 1 << 16)
    p, c = ring.producer(), ring.consumer()
    p.send(np.ones(10))
    m = c.recv()
    assert mapped() == 2                                    # the data area twice (R60): two mappings
    ring.close()
    assert mapped() == 2                                    # handles keep it mapped
    p.close()
    c.close()
    del p, c
    assert mapped() == 2                                    # the message still does
    del m
    gc.collect()
    assert mapped() == 0
    shmring.unlink(ring_name)


def test_create_attach_and_close_leak_no_file_descriptors(ring_name, tmp_path):
    def fds():
        return len(os.listdir("/proc/self/fd"))
    before = fds()
    for i in range(20):
        with shmring.Ring.create(ring_name, 4096) as r:
            shmring.Ring.attach(ring_name).close()
            with pytest.raises(shmring.SegmentExists):
                shmring.Ring.create(ring_name, 4096)
        path = tmp_path / f"r{i}"
        with shmring.Ring.create(path=path, capacity=4096):
            shmring.Ring.attach(path=path).close()
        os.unlink(path)
    with pytest.raises(shmring.SegmentNotFound):
        shmring.Ring.attach(ring_name)
    assert fds() == before
    assert r.closed


def test_list_segments_lists_this_rings_name(ring_name):
    with shmring.Ring.create(ring_name, 4096):
        assert ring_name in shmring.list_segments()
        assert all(isinstance(n, str) for n in shmring.list_segments())


def test_a_ring_pickles_by_name_and_attaches_on_unpickling(ring_name):
    with shmring.Ring.create(ring_name, 4096) as ring:
        blob = pickle.dumps(ring)
        assert len(blob) < 300                              # a name, not the data
        other = pickle.loads(blob)
        try:
            assert other.name == ring_name and other.capacity == 4096
            with ring.producer() as p, other.consumer() as c:
                p.send(b"through the pickled ring")
                assert c.recv_bytes() == b"through the pickled ring"
        finally:
            other.close()


def test_attach_waits_for_a_creator_that_is_still_initializing(ring_name):
    with shmring.Ring.create(ring_name, 4096) as ring:
        ring._region.store_u32(L.OFF_READY, 0)            # as if the creator had not finished
        t = threading.Timer(0.2, ring._region.store_u32, (L.OFF_READY, 1))
        t.start()
        with shmring.Ring.attach(ring_name) as other:
            assert other.capacity == 4096
        t.join()


# --------------------------------------------------------------------------- file-backed rings

def test_file_backed_ring_persists_after_close_and_reattach_sees_the_data(tmp_path):
    path = tmp_path / "persistent.ring"
    with shmring.Ring.create(path=path, capacity=1 << 13) as ring:
        assert ring.path == str(path) and ring.name is None
        with ring.producer() as p:
            p.send(b"kept on disk")
            p.send(np.arange(5))
            p.send({"k": "v"})
    assert path.exists() and path.stat().st_size == L.HEADER_SIZE + (1 << 13)
    assert path.stat().st_mode & 0o777 == 0o600
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        assert c.recv_bytes() == b"kept on disk"
        assert c.recv(copy=True).tolist() == [0, 1, 2, 3, 4]
        assert c.recv(copy=True) == {"k": "v"}
        with pytest.raises(shmring.EndOfStream):
            c.recv()
    assert path.exists()
    with shmring.Ring.attach(path=str(path)) as ring:
        ring.unlink()
    assert not path.exists()


def test_file_backed_ring_can_be_unlinked_by_path(tmp_path):
    path = tmp_path / "r.ring"
    shmring.Ring.create(path=path, capacity=4096).close()
    shmring.unlink(path=path)
    assert not path.exists()
    with pytest.raises(shmring.SegmentNotFound):
        shmring.unlink(path=path)
    shmring.unlink(path=path, missing_ok=True)


def test_creating_a_file_ring_over_an_existing_file_is_refused(tmp_path):
    path = tmp_path / "exists"
    path.write_bytes(b"precious")
    with pytest.raises(shmring.SegmentExists):
        shmring.Ring.create(path=path, capacity=4096)
    assert path.read_bytes() == b"precious"


def test_attaching_through_a_symlink_is_refused(tmp_path):
    real = tmp_path / "real.ring"
    shmring.Ring.create(path=real, capacity=4096).close()
    link = tmp_path / "link.ring"
    link.symlink_to(real)
    with pytest.raises(shmring.PermissionDenied, match="symbolic link"):
        shmring.Ring.attach(path=link)


def test_creating_at_a_symlink_does_not_follow_it(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"do not touch")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(shmring.ShmringError):
        shmring.Ring.create(path=link, capacity=4096)
    assert target.read_bytes() == b"do not touch"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(shmring.ShmringError):
        shmring.Ring.create(path=dangling, capacity=4096)
    assert not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------- foreign and damaged segments

@pytest.mark.parametrize("content,match", [
    (os.urandom(8192), "not a shmring segment.*magic"),
    (b"\0" * 8192, "never fully initialized"),
    (os.urandom(100), "100 bytes, smaller than the 4096-byte"),
    (b"", "0 bytes, smaller than"),
    (b"SHMRING1" + b"\0" * 92, "100 bytes"),
], ids=["random", "zeros", "size-100", "empty", "magic-only"])
def test_foreign_file_is_a_corrupt_segment_error_with_a_clear_message(tmp_path, content, match):
    path = tmp_path / "foreign"
    path.write_bytes(content)
    with pytest.raises(shmring.CorruptSegmentError, match=match):
        shmring.Ring.attach(path=path)
    assert path.read_bytes() == content                     # attach never writes to it


def test_foreign_posix_segment_is_a_corrupt_segment_error(ring_name):
    with open(shm_path(ring_name), "wb") as f:
        f.write(b"JPEG" + os.urandom(8188))
    with pytest.raises(shmring.CorruptSegmentError, match=f"'{ring_name}'.*not a shmring segment"):
        shmring.Ring.attach(ring_name)


def test_a_directory_is_not_a_ring(tmp_path):
    with pytest.raises(shmring.ShmringError):
        shmring.Ring.attach(path=tmp_path)


def test_wrong_layout_version_is_an_incompatible_segment(tmp_path):
    path = tmp_path / "v2.ring"
    make_file_ring(path, messages=[b"x"])
    patch(path, L.OFF_VERSION, "<I", L.LAYOUT_VERSION + 1)
    with pytest.raises(shmring.IncompatibleSegment, match=f"version {L.LAYOUT_VERSION + 1}.*reads version {L.LAYOUT_VERSION}"):
        shmring.Ring.attach(path=path)
    assert issubclass(shmring.IncompatibleSegment, shmring.CorruptSegmentError)


def test_wrong_layout_hash_is_an_incompatible_segment(tmp_path):
    path = tmp_path / "h.ring"
    make_file_ring(path)
    patch(path, L.OFF_LAYOUT_HASH, "<Q", L.LAYOUT_HASH ^ 1)
    with pytest.raises(shmring.IncompatibleSegment, match="layout hash"):
        shmring.Ring.attach(path=path)


@pytest.mark.parametrize("field,fmt,value,match", [
    (L.OFF_KIND, "<I", 99, "unknown ring kind 99"),
    (L.OFF_CAPACITY, "<Q", 5000, "impossible capacity 5000"),
    (L.OFF_CAPACITY, "<Q", 2048, "impossible capacity"),
    (L.OFF_CAPACITY, "<Q", 1 << 50, "impossible capacity"),
    (L.OFF_DATA_OFFSET, "<Q", 0, "inconsistent header"),
    (L.OFF_MAX_MESSAGE, "<Q", 4096, "inconsistent header"),
    (L.OFF_SEGMENT_SIZE, "<Q", 1 << 30, "header says"),
    (L.OFF_MAGIC, "<Q", 0x31474E49524D4854, "not a shmring segment"),
])
def test_impossible_header_fields_are_corrupt_segment_errors(tmp_path, field, fmt, value, match):
    path = tmp_path / "bad.ring"
    make_file_ring(path)
    patch(path, field, fmt, value)
    with pytest.raises(shmring.CorruptSegmentError, match=match):
        shmring.Ring.attach(path=path)


def test_truncated_file_is_a_corrupt_segment_error(tmp_path):
    path = tmp_path / "trunc.ring"
    make_file_ring(path, capacity=1 << 14, messages=[b"y" * 100])
    os.truncate(path, L.HEADER_SIZE + (1 << 13))
    with pytest.raises(shmring.CorruptSegmentError, match="truncated"):
        shmring.Ring.attach(path=path)


def test_capacity_larger_than_the_file_is_a_corrupt_segment_error(tmp_path):
    path = tmp_path / "big.ring"
    make_file_ring(path, capacity=1 << 12)
    cap = 1 << 16                                            # consistent header, but the file is small
    patch(path, L.OFF_CAPACITY, "<Q", cap)
    patch(path, L.OFF_MAX_MESSAGE, "<Q", L.max_message(cap))
    patch(path, L.OFF_SEGMENT_SIZE, "<Q", L.segment_size(cap))
    with pytest.raises(shmring.CorruptSegmentError, match="8,192 bytes but its header says 69,632"):
        shmring.Ring.attach(path=path)


def test_a_grown_file_with_an_intact_header_still_attaches(tmp_path):
    path = tmp_path / "grown.ring"
    make_file_ring(path, messages=[b"still here"])
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        assert c.recv_bytes() == b"still here"


# --------------------------------------------------------------------------- permissions and space

def _attach_as_nobody(name, **kw):
    """Exit code of a forked child that drops to uid 65534 and attaches: 0 =
    PermissionDenied (a PermissionError), 1 = attached, 2 = setuid failed, 3+ = other."""
    pid = os.fork()
    if pid == 0:
        code = 9
        try:
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            except OSError:
                code = 2
            else:
                try:
                    shmring.Ring.attach(name, **kw)
                    code = 1
                except shmring.PermissionDenied as e:
                    code = 0 if isinstance(e, PermissionError) and name in str(e) else 3
                except BaseException:
                    code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("mode", [0o000, 0o600])
def test_attaching_without_permission_is_permission_denied(ring_name, mode):
    with shmring.Ring.create(ring_name, 4096, mode=mode):
        code = _attach_as_nobody(ring_name)
    if code == 2:
        pytest.skip("cannot drop privileges to uid 65534 here (setuid failed)")
    assert code == 0, {1: "a non-owner attached", 3: "wrong error text/type", 4: "another exception"}.get(code, code)


def test_a_world_readable_and_writable_ring_is_attachable_by_another_user_who_opts_in(ring_name):
    with shmring.Ring.create(ring_name, 4096, mode=0o666):
        code = _attach_as_nobody(ring_name, allow_foreign_owner=True)
        refused = _attach_as_nobody(ring_name)
    if code == 2:
        pytest.skip("cannot drop privileges to uid 65534 here (setuid failed)")
    assert code == 1                       # the control case: the mode lets them in once they opt in
    assert refused == 0                    # without the opt-in the owner check refuses (squatting)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {r.stderr.strip() or r.returncode}")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_no_space_at_creation_is_a_clear_no_space_error(tiny_tmpfs):
    path = tiny_tmpfs / "big.ring"
    with pytest.raises(shmring.NoSpace) as ei:
        shmring.Ring.create(path=path, capacity=1 << 21)
    msg = str(ei.value)
    assert isinstance(ei.value, OSError)
    assert f"{L.segment_size(1 << 21):,}" in msg and "1,048,576" in msg and str(tiny_tmpfs) in msg
    assert not path.exists()                                 # nothing left behind
    with shmring.Ring.create(path=path, capacity=1 << 16) as ring, ring.producer() as p, ring.consumer() as c:
        p.send(b"fits")                                      # a ring that fits works
        assert c.recv_bytes() == b"fits"


def test_space_is_reserved_at_creation(tiny_tmpfs):
    # Two rings of 600 KiB cannot both live in 1 MiB: the second fails at create
    # time (NoSpace) instead of with SIGBUS on a later write.
    with shmring.Ring.create(path=tiny_tmpfs / "a", capacity=1 << 19):
        with pytest.raises(shmring.NoSpace):
            shmring.Ring.create(path=tiny_tmpfs / "b", capacity=1 << 19)
        assert not (tiny_tmpfs / "b").exists()


def test_a_ring_on_a_filesystem_that_then_fills_up_never_faults(tiny_tmpfs):
    # Space reserved at creation stays reserved: after the filesystem fills up,
    # writing every byte of the ring (many times over) must not SIGBUS.  The
    # writes run in a forked child so that a fault shows as its exit status.
    path = tiny_tmpfs / "r.ring"
    with shmring.Ring.create(path=path, capacity=1 << 18) as ring:
        fd = os.open(tiny_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\xff" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        assert os.statvfs(tiny_tmpfs).f_bavail == 0
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with ring.producer() as p, ring.consumer() as c:
                    for i in range(4 * 16):
                        p.send(bytes([i]) * 60_000)
                        assert c.recv_bytes() == bytes([i]) * 60_000
                code = 0
            finally:
                os._exit(code)
        status = os.waitpid(pid, 0)[1]
        assert os.waitstatus_to_exitcode(status) == 0, f"child status {status} (SIGBUS = {-signal.SIGBUS})"


# --------------------------------------------------------------------------- errors

def test_every_error_derives_from_shmring_error_and_its_builtin():
    pairs = {"Timeout": TimeoutError, "EndOfStream": EOFError, "PeerGone": ConnectionError,
             "MessageTooLarge": ValueError, "SegmentNotFound": FileNotFoundError,
             "SegmentExists": FileExistsError, "PermissionDenied": PermissionError, "NoSpace": OSError,
             "HandleClosed": ValueError, "UnsupportedType": TypeError, "WrongKind": TypeError}
    for name, builtin in pairs.items():
        cls = getattr(shmring, name)
        assert issubclass(cls, shmring.ShmringError) and issubclass(cls, builtin), name
    assert issubclass(shmring.IncompatibleSegment, shmring.CorruptSegmentError)
    assert issubclass(shmring.EscapedViewWarning, UserWarning)


def test_every_error_pickles_with_its_message_and_fields():
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, shmring.ShmringError):
            e = cls("what happened") if cls is not shmring.RoleTaken else cls("held by 42", 42)
            e2 = pickle.loads(pickle.dumps(e))
            assert type(e2) is cls and str(e2) == str(e), name
    e = pickle.loads(pickle.dumps(shmring.RoleTaken("held by 42", 42)))
    assert e.pid == 42 and str(e) == "held by 42"


def test_file_ring_mode_is_respected(tmp_path):
    path = tmp_path / "m.ring"
    with shmring.Ring.create(path=path, capacity=4096, mode=0o640):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_attach_can_wait_for_a_ring_created_later(ring_name):
    import threading
    t = threading.Timer(0.3, lambda: shmring.Ring.create(ring_name, 4096).close())
    t.start()
    try:
        with pytest.raises(shmring.SegmentNotFound):
            shmring.Ring.attach(ring_name, wait=0.05)
        ring = shmring.Ring.attach(ring_name, wait=10)
        assert ring.capacity == 4096
        ring.close()
    finally:
        t.join()
    with pytest.raises(shmring.SegmentNotFound):
        shmring.SharedState.attach(ring_name + "-state", wait=0.05)
