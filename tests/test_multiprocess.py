"""Across processes, under both fork and spawn: long checksummed streams, roles,
crashes (SIGKILL of either side), and Ctrl-C during a blocking wait."""
import gc
import os
import signal
import threading
import time

import multiprocess
import numpy as np
import pytest

import shmring

import _workers as W
from _procs import JOIN, finish, start


def kill_later(pid, delay):
    t = threading.Timer(delay, os.kill, (pid, signal.SIGKILL))
    t.start()
    return t


# --------------------------------------------------------------------------- long streams

@pytest.mark.parametrize("start_method,n,mixed,spin,cap", [
    ("fork", 3_000_000, False, W.DEFAULT_SPIN, 1 << 16), ("spawn", 1_000_000, False, W.DEFAULT_SPIN, 1 << 16),
    ("fork", 1_000_000, True, W.DEFAULT_SPIN, 1 << 16), ("spawn", 1_000_000, True, W.DEFAULT_SPIN, 1 << 16),
    ("fork", 200_000, True, 0.0, 1 << 12),          # no spinning: both sides sleep on futexes all the time
], ids=["fork-3M", "spawn-1M", "fork-1M-mixed", "spawn-1M-mixed", "fork-200k-mixed-nospin-4KiB"])
def test_a_long_stream_arrives_complete_in_order_and_intact(ring_name, procs, start_method, n, mixed, spin, cap):
    """Producer and consumer are both child processes; 0..300-byte messages through
    a small ring: it wraps thousands of times.  Every message is checked byte for byte."""
    ctx = multiprocess.get_context(start_method)
    with shmring.Ring.create(ring_name, cap) as ring:
        q = ctx.Queue()
        cons = start(procs, ctx, W.consume_stream, ring, n, mixed, q, 2, spin)
        prod = start(procs, ctx, W.produce_stream, ring, n, mixed, 1, spin)
        report = q.get(timeout=JOIN)
        assert finish(prod) == 0
        assert finish(cons) == 0
        assert report["error"] is None, report["error"]
        assert report["received"] == n
        assert report["end"] == "EndOfStream"
        if spin == 0:
            assert report["wait"]["sleeps"] > 100                # the futex path was exercised
            assert report["wait"]["late_wakeups"] == 0           # and no wake-up was lost
        s = ring.stats()
        assert s["write_pos"] == s["read_pos"] > 1000 * ring.capacity      # wrapped > 1000 times
        assert s["closed"] == "eos"


def test_arrays_and_objects_stream_across_processes(ring_name, procs, mp):
    n = 3000
    with shmring.Ring.create(ring_name, 1 << 18) as ring:
        q = mp.Queue()
        cons = start(procs, mp, W.consume_values, ring, n, q)
        prod = start(procs, mp, W.produce_values, ring, n)
        report = q.get(timeout=JOIN)
        assert finish(prod) == 0 and finish(cons) == 0
        assert report["error"] is None, report["error"]
        assert (report["received"], report["end"]) == (n, "EndOfStream")


def test_stream_from_this_process_to_a_child_and_back(ring_name, procs, mp):
    """The parent produces into a child consumer on a file-backed ring (attach by path)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.ring")
        with shmring.Ring.create(path=path, capacity=1 << 14) as ring:
            q = mp.Queue()
            cons = start(procs, mp, W.consume_stream, ring, 20_000, True, q)
            W.produce_stream(ring, 20_000, True)
            report = q.get(timeout=JOIN)
            assert finish(cons) == 0
            assert report["error"] is None, report["error"]
            assert report["received"] == 20_000


# --------------------------------------------------------------------------- roles

@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_second_holder_of_a_role_in_another_live_process_is_refused_with_its_pid(ring_name, procs, mp, role):
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        ready, stop = mp.Event(), mp.Event()
        child = start(procs, mp, W.hold_role, ring, role, ready, stop)
        assert ready.wait(60)
        with pytest.raises(shmring.RoleTaken) as ei:
            getattr(ring, role)()
        assert ei.value.pid == child.pid
        assert str(child.pid) in str(ei.value)
        assert ring.stats()[role] == {"pid": child.pid, "alive": True, "sessions": 1}
        stop.set()
        assert finish(child) == 0
        if role == "consumer":                       # given back on exit: free for us now
            with ring.consumer():
                assert ring.stats()["consumer"]["sessions"] == 2


@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_a_dead_role_holders_role_is_taken_over_by_a_new_process(ring_name, procs, mp, role):
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        child = start(procs, mp, W.take_role_and_die, ring, role)
        assert finish(child) == 0
        s = ring.stats()[role]
        assert s["pid"] == child.pid and s["alive"] is False      # still registered, but dead
        with getattr(ring, role)():
            s = ring.stats()[role]
            assert s["pid"] == os.getpid() and s["alive"] and s["sessions"] == 2


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return False


def test_a_zombie_role_holder_counts_as_dead(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        pid = os.fork()
        if pid == 0:
            try:
                p = ring.producer()         # held (not dropped) when the process exits  # noqa: F841
            finally:
                os._exit(0)
        deadline = time.monotonic() + 30
        while not _is_zombie(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            assert _is_zombie(pid)                        # exited, not reaped yet
            assert ring.stats()["producer"]["pid"] == pid
            assert ring.stats()["producer"]["alive"] is False
            with ring.producer():
                pass
        finally:
            os.waitpid(pid, 0)


def test_a_live_process_with_the_recorded_pid_is_not_the_holder(ring_name):
    """Liveness is the role's lock (shmring.liveness), not the pid: an owner
    word naming a live process (here: our parent, with its real start time)
    whose lock nobody holds is a dead holder (the pid was reused, or the word
    was planted), taken over; a role whose lock a live process holds is not."""
    from shmring import layout as L
    from shmring._proc import start_time
    ppid = os.getppid()
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        ring._region.store_u64(L.OFF_PROD_ROLE + L.ROLE_OWNER, L.owner_word(ppid, start_time(ppid)))
        assert ring.stats()["producer"] == {"pid": ppid, "alive": False, "sessions": 0}
        with ring.consumer() as c, pytest.raises(shmring.PeerGone):
            c.recv(timeout=5)
        with ring.producer():
            assert ring.stats()["producer"]["pid"] == os.getpid()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # a live holder in another process
            try:
                with shmring.Ring.attach(ring_name).consumer():
                    os.write(w, b"x")
                    time.sleep(30)
            finally:
                os._exit(0)
        try:
            assert os.read(r, 1) == b"x"
            with pytest.raises(shmring.RoleTaken) as ei:
                ring.consumer()
            assert ei.value.pid == pid
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        with ring.consumer():                          # its lock went with it
            pass


# --------------------------------------------------------------------------- crashes

def test_killed_producer_consumer_gets_every_committed_message_then_peer_gone(ring_name, procs, mp):
    k = 500
    with shmring.Ring.create(ring_name, 1 << 17) as ring, ring.consumer() as c:
        ready = mp.Event()
        child = start(procs, mp, W.produce_then_hang, ring, k, ready)
        assert ready.wait(60)
        for s in range(k):
            assert c.recv_bytes(timeout=10) == W.payload(s)
        kill_later(child.pid, 0.3)                     # killed while we wait in recv
        with pytest.raises(shmring.PeerGone) as ei:
            c.recv(timeout=20)                         # Timeout here would mean: death not noticed
        assert str(child.pid) in str(ei.value)
        assert finish(child) == -signal.SIGKILL


def test_a_zero_timeout_recv_reports_a_dead_producer_instead_of_timing_out_forever(ring_name, procs):
    # A consumer that polls with recv(timeout=0) must learn that the producer died
    # (PeerGone), as one that waits does; otherwise it polls forever.
    mp = multiprocess.get_context("fork")
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.consumer() as c:
        child = start(procs, mp, W.take_role_and_die, ring, "producer")
        assert finish(child) == 0
        assert ring.stats()["producer"]["alive"] is False
        with pytest.raises(shmring.PeerGone):
            c.recv(timeout=0.2)                          # waiting: detected
        with pytest.raises(shmring.PeerGone):
            c.recv(timeout=0)                            # polling: must be detected too


def test_producer_killed_mid_stream_never_exposes_a_partial_message(ring_name, procs, mp):
    with shmring.Ring.create(ring_name, 1 << 14) as ring, ring.consumer() as c:
        ready = mp.Event()
        child = start(procs, mp, W.produce_forever, ring, ready)
        assert ready.wait(60)
        got = 0
        for _ in range(20_000):
            assert c.recv_bytes(timeout=10) == W.payload(got)
            got += 1
        os.kill(child.pid, signal.SIGKILL)             # mid-write, almost surely: it never stops
        try:
            while True:
                with c.recv(timeout=20) as m:
                    data = m.tobytes()
                assert data == W.payload(got), f"message {got} is torn or out of order"
                got += 1
        except shmring.PeerGone:
            pass
        assert finish(child) == -signal.SIGKILL
        s = ring.stats()
        assert s["read_pos"] == s["write_pos"]          # everything committed was delivered


def test_killed_consumer_s_unreleased_message_is_redelivered_to_the_next_consumer(ring_name, procs, mp):
    n = 200
    with shmring.Ring.create(ring_name, 1 << 16) as ring:
        with ring.producer() as p:
            for s in range(n):
                p.send(W.tagged(s))
        q = mp.Queue()
        first = start(procs, mp, W.consume_then_hold, ring, 40, q)
        r = q.get(timeout=60)
        assert (r["held"], r["after"]) == (40, 41)      # it holds 40 and has copied out 41
        os.kill(first.pid, signal.SIGKILL)
        assert finish(first) == -signal.SIGKILL
        q2 = mp.Queue()                                 # (a process killed after using a queue may hold its lock)
        second = start(procs, mp, W.consume_all, ring, q2)
        r = q2.get(timeout=60)
        assert finish(second) == 0
        assert r["error"] is None, r["error"]
        assert r["seqs"] == list(range(40, n))          # 40 again (at-least-once), and nothing lost
        assert r["bad"] == []


def test_producer_blocked_on_a_full_ring_gets_peer_gone_when_the_consumer_is_killed(ring_name, procs, mp):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as p:
        ready = mp.Event()
        child = start(procs, mp, W.hold_consumer_role, ring, ready)
        assert ready.wait(60)
        while p.try_send(b"f" * 100):
            pass
        kill_later(child.pid, 0.3)
        with pytest.raises(shmring.PeerGone) as ei:
            p.send(b"f" * 100, timeout=20)             # Timeout here would mean: death not noticed
        assert str(child.pid) in str(ei.value)
        assert finish(child) == -signal.SIGKILL
        # the unreleased messages stay for the next consumer
        with ring.consumer() as c:
            assert c.recv_bytes() == b"f" * 100


def test_ctrl_c_interrupts_a_recv_blocked_without_timeout(ring_name, procs, mp):
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        ready, q = mp.Event(), mp.Queue()
        child = start(procs, mp, W.recv_until_interrupted, ring, ready, q)
        assert ready.wait(60)
        time.sleep(0.3)                                 # let it sleep in the futex wait
        assert child.is_alive()
        os.kill(child.pid, signal.SIGINT)
        child.join(20)
        assert not child.is_alive(), "recv() ignored Ctrl-C"
        assert child.exitcode == 42
        assert q.get(timeout=5) == "KeyboardInterrupt"
        # the ring is still consistent and usable
        assert ring.stats()["consumer"]["pid"] is None    # the with-block gave the role back
        with ring.producer() as p, ring.consumer() as c:
            p.send(b"after ctrl-c")
            assert c.recv_bytes(timeout=5) == b"after ctrl-c"
            assert c.try_recv() is None


# --------------------------------------------------------------------------- fork hygiene

def _in_forked_child(fn):
    """Run fn() in a forked child; return its exit code (0 = fn returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            code = 0 if fn() else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_handle_inherited_through_fork_is_refused_in_the_child(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as p, ring.consumer() as c:
        def child():
            for call in (lambda: p.send(b"from child"), lambda: c.try_recv()):
                try:
                    call()
                    return False
                except shmring.ShmringError as e:
                    if "fork" not in str(e):
                        return False
            return True
        assert _in_forked_child(child) == 0
        assert c.try_recv() is None
        p.send(b"parent still works")
        assert c.recv_bytes() == b"parent still works"


def test_a_message_dropped_in_a_forked_child_does_not_release_the_parents_space(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as p, ring.consumer() as c:
        p.send(b"A" * 1000)
        m = c.recv()                                     # the parent holds this message

        def child():
            nonlocal m
            del m                                        # the child's copy of the Message dies
            gc.collect()
            return True
        assert _in_forked_child(child) == 0
        assert ring.stats()["read_pos"] == 0, "a forked child gave back space the parent still holds"
        while p.try_send(b"B" * 1000):
            pass
        assert m.tobytes() == b"A" * 1000                # never overwritten while held
        m.release()


def test_a_consumer_taken_in_a_forked_child_works(ring_name, procs):
    ctx = multiprocess.get_context("fork")
    with shmring.Ring.create(ring_name, 1 << 14) as ring, ring.producer() as p:
        q = ctx.Queue()
        child = start(procs, ctx, W.consume_all, ring, q)
        for s in range(1000):
            p.send(W.tagged(s), timeout=30)
        p.close()
        r = q.get(timeout=60)
        assert finish(child) == 0
        assert r["error"] is None and r["seqs"] == list(range(1000)) and r["bad"] == []


def test_numpy_arrays_cross_via_reserve_array_in_a_child(ring_name, procs, mp):
    with shmring.Ring.create(ring_name, 1 << 18) as ring:
        q = mp.Queue()
        cons = start(procs, mp, W.consume_values, ring, 50, q)
        with ring.producer() as p:
            for s in range(50):
                v = W.make_value(s)
                if isinstance(v, np.ndarray):
                    order = "F" if v.flags.f_contiguous and not v.flags.c_contiguous else "C"
                    with p.reserve_array(v.shape, v.dtype, order=order) as out:
                        out[...] = v
                else:
                    p.send(v)
        r = q.get(timeout=JOIN)
        assert finish(cons) == 0
        assert r["error"] is None, r["error"]
        assert r["received"] == 50
