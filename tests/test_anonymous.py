"""Sealed anonymous segments (issue 14, part 2): rings and shared states with
no name anywhere, in a memfd sealed against resizing, passed to other
processes by descriptor and freed by the kernel with their last process."""
import fcntl
import hashlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import multiprocess
import numpy as np
import pytest

import shmring

N = 300


def in_memfd(handle) -> bool:
    """The segment is a memfd (not a file in /dev/shm or anywhere)."""
    fd = handle.dup_fd()
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:shmring")
    finally:
        os.close(fd)


def payload(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, 1000 + i % 97, dtype=np.uint8)


def consume(ring, q):
    """Receive N arrays; report their digest (every byte, in order)."""
    h = hashlib.sha256()
    with ring.consumer() as c:
        for _ in range(N):
            with c.recv(timeout=20) as m:
                h.update(np.ascontiguousarray(m.value).tobytes())
        try:
            c.recv(timeout=20)
            q.put("no end of stream")
        except shmring.EndOfStream:
            q.put(h.hexdigest())


def expected_digest() -> str:
    h = hashlib.sha256()
    for i in range(N):
        h.update(payload(i).tobytes())
    return h.hexdigest()


def test_an_anonymous_ring_has_no_name_and_its_size_is_sealed():
    with shmring.Ring.anonymous(1 << 16) as ring:
        assert ring.is_anonymous and ring.name is None and ring.path is None
        assert in_memfd(ring)                               # nothing in /dev/shm
        fd = ring.dup_fd()
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) == \
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            for size in (0, 4096, os.fstat(fd).st_size * 2):
                with pytest.raises(PermissionError):        # the kernel refuses any truncation
                    os.ftruncate(fd, size)
            with pytest.raises(PermissionError):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)       # and the seals cannot change
            with shmring.Ring.from_fd(fd) as other, ring.producer() as p, other.consumer() as c:
                p.send(b"through a descriptor")
                assert c.recv_bytes(timeout=5) == b"through a descriptor"
        finally:
            os.close(fd)
        ring.unlink()                                       # nothing to remove: no error either
    with shmring.SharedState.anonymous(1 << 12) as st:
        assert st.is_anonymous and in_memfd(st)


@pytest.mark.parametrize("lib", [multiprocessing, multiprocess], ids=["multiprocessing", "multiprocess"])
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("kind", ["spsc", "mpmc"])
def test_an_anonymous_ring_reaches_a_child_of_every_start_method(lib, method, kind, procs):
    ctx = lib.get_context(method)
    with shmring.Ring.anonymous(1 << 16, kind=kind) as ring:
        q = ctx.Queue()
        child = ctx.Process(target=consume, args=(ring, q))
        child.start()
        procs.append(child)
        with ring.producer() as p:
            for i in range(N):
                p.send(payload(i), timeout=20)
        assert q.get(timeout=30) == expected_digest()
        child.join(20)
        assert child.exitcode == 0


def _state_reader(state, q):
    state.wait_newer(0, timeout=20)
    with state.read() as snap:
        q.put(int(np.asarray(snap.value["w"]).sum()))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_an_anonymous_shared_state_reaches_a_child(method, procs):
    ctx = multiprocess.get_context(method)
    with shmring.SharedState.anonymous(1 << 14) as st:
        q = ctx.Queue()
        child = ctx.Process(target=_state_reader, args=(st, q))
        child.start()
        procs.append(child)
        st.publish({"w": np.arange(100)})
        assert q.get(timeout=30) == sum(range(100))
        child.join(20)
        assert child.exitcode == 0


def _hand_over(q):
    """Pickle an anonymous ring and exit: its only process is gone."""
    ring = shmring.Ring.anonymous(1 << 12)
    q.put(pickle.dumps(ring))


def _receive_later(q, out):
    ring = pickle.loads(q.get(timeout=20))              # not at spawn: by /proc/PID/fd
    with ring.consumer() as c:
        out.put(c.recv_bytes(timeout=20))


def test_an_anonymous_ring_passed_through_a_queue(procs):
    ctx = multiprocessing.get_context("spawn")
    q, out = ctx.Queue(), ctx.Queue()
    with shmring.Ring.anonymous(1 << 12) as ring:
        child = ctx.Process(target=_receive_later, args=(q, out))
        child.start()
        procs.append(child)
        q.put(pickle.dumps(ring))
        with ring.producer() as p:
            p.send(b"via a queue")
        assert out.get(timeout=30) == b"via a queue"
        child.join(20)
        assert child.exitcode == 0
    # the sender gone before the receiver attached: a clear error, not a hang
    sender = ctx.Process(target=_hand_over, args=(q,))
    sender.start()
    data = q.get(timeout=20)
    sender.join(20)
    with pytest.raises(shmring.SegmentNotFound, match="gone"):
        pickle.loads(data)


def test_from_fd_refuses_what_is_not_a_sealed_anonymous_segment(tmp_path, ring_name):
    f = tmp_path / "plain"
    f.write_bytes(b"\0" * 8192)
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(shmring.IncompatibleSegment, match="not a sealed"):
            shmring.Ring.from_fd(fd)
    finally:
        os.close(fd)
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 16)
        with pytest.raises(shmring.IncompatibleSegment):
            shmring.Ring.from_fd(fd)
    finally:
        os.close(fd)
    with shmring.Ring.create(ring_name, 1 << 12) as named:   # a named ring's descriptor: refused too
        with pytest.raises(shmring.IncompatibleSegment):
            shmring.Ring.from_fd(named._seg.locks.fd)
    with pytest.raises(TypeError, match="anonymous"):
        shmring.Ring.attach()


def _shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise RuntimeError("no Shmem in /proc/meminfo")


def _hold_big(ready):
    ring = shmring.Ring.anonymous(1 << 26)                # 64 MiB, reserved (fallocate) at creation
    ready.set()
    time.sleep(60)


def test_the_kernel_frees_an_anonymous_ring_when_its_last_process_is_killed(procs):
    ctx = multiprocessing.get_context("fork")
    base = _shmem_kib()
    ready = ctx.Event()
    child = ctx.Process(target=_hold_big, args=(ready,))
    child.start()
    procs.append(child)
    assert ready.wait(20)
    held = _shmem_kib()
    assert held - base > 48 * 1024, (base, held)            # the 64 MiB is there while it lives
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    deadline = time.monotonic() + 10
    while _shmem_kib() - base > 16 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _shmem_kib() - base < 16 * 1024, "the killed process's anonymous ring was not freed"


TINY = textwrap.dedent("""
    import os, subprocess, sys
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/dev/shm"], check=True)
    import numpy as np, shmring
    try:
        shmring.Ring.create("tiny-named", 1 << 22)
        print("named: created")
    except shmring.NoSpace as e:
        print("named: NoSpace")
    with shmring.Ring.anonymous(1 << 22) as ring, ring.producer() as p, ring.consumer() as c:
        p.send(np.ones(1 << 20, np.uint8))
        print("anonymous:", int(c.recv(timeout=5).copy().sum()))
    class Sum:
        def __init__(self):
            self.total = 0
        def __call__(self, a):
            self.total += int(a[0])
        def finish(self):
            return self.total
    with shmring.Pipeline("tiny", capacity=1 << 22) as pl:
        s = pl.source(range(50))
        s = pl.map(lambda i: np.full(1 << 18, i, np.uint8), s)
        pl.sink(Sum(), s)
        print("pipeline:", pl.run(timeout=60)["result"])
    print("entries:", sorted(os.listdir("/dev/shm")))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace (unshare -m)")
def test_a_tiny_dev_shm_refuses_named_rings_and_anonymous_ones_work(tmp_path):
    """Docker's /dev/shm is 64 MB by default; here 1 MiB, in a private mount
    namespace: a 4 MiB named ring is NoSpace at create, anonymous rings and
    a Pipeline (anonymous by default) work and leave nothing there."""
    script = tmp_path / "tiny.py"
    script.write_text(TINY)
    out = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:4] == ["named: NoSpace", f"anonymous: {1 << 20}",
                                          f"pipeline: {sum(range(50))}", "entries: []"], out.stdout
