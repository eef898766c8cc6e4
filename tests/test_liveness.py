"""Issue 13, cases 1-3: liveness the kernel keeps (shmring.liveness).

Every test here failed when liveness was "pid plus start time from /proc":
``shmring gc`` removed segments in use by processes without a role, a
process whose main thread had exited counted as dead (its role was taken by a
second consumer), and processes in another pid namespace saw each other as
dead.  Now a process holds a shared lock on the segment while it has it
mapped and an exclusive lock per role; the kernel drops them when it dies.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import shmring

CHILD = os.path.join(os.path.dirname(__file__), "_liveness_child.py")
SHM = "/dev/shm/shmring."


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True, timeout=30)
    return r.returncode == 0


UNSHARE = _unshare_works()
NAMESPACES = [False, pytest.param(True, marks=pytest.mark.skipif(not UNSHARE, reason="creating a pid namespace (unshare -p) needs root and util-linux unshare(1); CI here runs as root"))]


class Child:
    """A process holding one role of segment ``name`` (tests/_liveness_child.py),
    in its own pid namespace if ``ns``."""

    def __init__(self, name, what, *, ns=False, main_exits=False, forks=False):
        cmd = [sys.executable, CHILD, name, what] + (["main-exits"] if main_exits else []) + \
            (["forks"] if forks else [])
        if ns:
            cmd = ["unshare", "-p", "-f", "--mount-proc", "--kill-child"] + cmd
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  start_new_session=True)
        line = self.p.stdout.readline()
        if forks:
            self.grandchild = int(line)
            line = self.p.stdout.readline()
        assert line == "ready\n", (line, self.p.stderr.read() if self.p.poll() is not None else "")

    def kill(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)      # the whole session: unshare and its child
        self.p.wait(30)


@pytest.fixture
def children():
    made = []
    yield lambda *a, **k: made.append(Child(*a, **k)) or made[-1]
    for c in made:
        c.kill()


def eventually(fn, timeout=10.0):
    """fn() once it stops raising shmring errors (a process killed in another
    pid namespace exits, and its locks go, an instant after its parent)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except shmring.ShmringError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def gc(*args):
    r = subprocess.run([sys.executable, "-m", "shmring", "gc", "--json", *args], capture_output=True, text=True,
                       timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return {p["name"]: p for p in json.loads(r.stdout)}


# ------------------------------------------------------------------------ case 1: gc

@pytest.mark.parametrize("what", ["attach", "state-reader", "view"])
def test_gc_keeps_a_segment_a_process_has_attached_with_no_role(ring_name, children, what):
    """Case 1: a process attached with no role, a SharedState reader blocked in
    wait_newer(), a process holding only a view of a message: gc used to
    remove the segment (no live role), and the process was orphaned."""
    if what == "state-reader":
        creator = shmring.SharedState.create(ring_name, 1 << 12)
        creator.publish(b"v1")
    else:
        creator = shmring.Ring.create(ring_name, 1 << 12)
        if what == "view":
            p = creator.producer()
            p.send(b"held as a view" * 10)
            p.close()
            del p
    creator.close()                                   # the creator is gone; the child stays attached
    del creator
    child = children(ring_name, what)
    plan = gc(ring_name)
    assert plan[ring_name]["action"] == "keep" and "in use" in plan[ring_name]["why"], plan
    assert os.path.exists(SHM + ring_name)
    child.kill()
    plan = gc(ring_name)
    assert plan[ring_name]["action"] == "removed", plan
    assert not os.path.exists(SHM + ring_name)


def test_gc_and_an_attacher_race_and_nobody_attaches_a_removed_segment(ring_name):
    """gc decides and unlinks while it holds the attach lock exclusively; an
    attach that lost the race finds the segment removed, not a dangling copy."""
    from shmring.segment import remove_if_unused
    shmring.Ring.create(ring_name, 1 << 12).close()
    ring = shmring.Ring.attach(ring_name)
    assert remove_if_unused(ring_name) is False          # we have it attached
    ring.close()
    del ring
    assert remove_if_unused(ring_name) is True
    with pytest.raises(shmring.SegmentNotFound):
        shmring.Ring.attach(ring_name)


# ------------------------------------------------------------------------ case 2: threads

def test_a_process_whose_main_thread_exited_still_holds_its_role(ring_name, children):
    """Case 2: the main thread exits (pthread_exit) while a worker thread holds
    the consumer role: /proc showed the process as a zombie, so a second
    consumer took the role and both received every message."""
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        child = children(ring_name, "spsc-consumer", main_exits=True)
        time.sleep(1.0)                               # its main thread is gone by now
        with open(f"/proc/{child.p.pid}/stat") as f:
            assert f.read().split(") ")[1][0] == "Z"  # what /proc says of it
        with pytest.raises(shmring.RoleTaken):
            ring.consumer()
        assert ring.stats()["consumer"]["alive"]
        child.kill()
        with ring.consumer():                         # now it is gone
            pass


def test_a_forked_child_does_not_keep_its_dead_parents_role_alive(ring_name, children):
    """A forked child inherits its parent's descriptors, and with them the
    file description that holds the parent's role lock: it replaces it with
    a fresh one at fork (register_at_fork), so the parent's death frees the
    role although the child lives on."""
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        parent = children(ring_name, "spsc-consumer", forks=True)
        try:
            with pytest.raises(shmring.RoleTaken):
                ring.consumer()
            os.kill(parent.p.pid, signal.SIGKILL)
            parent.p.wait(30)
            os.kill(parent.grandchild, 0)                 # the child still runs
            eventually(ring.consumer).close()
        finally:
            os.kill(parent.grandchild, signal.SIGKILL)


# ------------------------------------------------------------------------ case 3: pid namespaces

@pytest.mark.parametrize("ns", NAMESPACES)
def test_roles_held_in_another_pid_namespace_are_live(ring_name, children, ns):
    """Case 3: a process in another pid namespace (unshare -p) holds the spsc
    consumer role, an mpmc consumer entry (the only one), a subscriber entry
    (the only one), the SharedState writer role: each is live for us (the
    role is refused, gc keeps the segment); once it is killed, each is free."""
    rings = {"spsc-consumer": shmring.Ring.create(ring_name, 1 << 12),
             "mpmc-consumer": shmring.Ring.create(ring_name + "m", 1 << 12, kind="mpmc", max_consumers=1),
             "subscriber": shmring.Ring.create(ring_name + "b", 1 << 12, kind="broadcast", max_consumers=1)}
    state = shmring.SharedState.create(ring_name + "s", 1 << 12)
    try:
        held = [children(r._seg.name, what, ns=ns) for what, r in rings.items()]
        held.append(children(ring_name + "s", "state-writer", ns=ns))
        for what, r in rings.items():
            with pytest.raises((shmring.RoleTaken, shmring.ResourceLimit)):
                r.subscribe() if what == "subscriber" else r.consumer()
        with pytest.raises(shmring.RoleTaken):
            state.publish(b"from the parent")
        plan = gc(*[r._seg.name for r in rings.values()], ring_name + "s")
        assert all(p["action"] == "keep" for p in plan.values()), plan
        for c in held:
            c.kill()
        for what, r in rings.items():
            eventually(r.subscribe if what == "subscriber" else r.consumer).close()
        eventually(lambda: state.publish(b"from the parent"))
        assert state.read().copy() == b"from the parent"
    finally:
        for r in rings.values():
            r.close()
            r.unlink()
        state.close()
        state.unlink()


@pytest.mark.parametrize("ns", NAMESPACES)
def test_a_producer_killed_in_another_pid_namespace_is_seen_dead(ring_name, children, ns):
    """Case 3: the consumer gets everything the producer in the other
    namespace committed, then PeerGone once it is killed (not before: its
    pid means nothing here)."""
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.consumer() as c:
        child = children(ring_name, "spsc-producer", ns=ns)
        assert c.recv_bytes(timeout=10) == b"from the child"
        with pytest.raises(shmring.Timeout):
            c.recv(timeout=0.3)                        # alive: a timeout, not PeerGone
        child.kill()
        with pytest.raises(shmring.PeerGone):
            c.recv(timeout=10)                         # slices of 0.1 s: it sees the death when it happens


def test_a_fork_while_another_thread_claims_a_role_leaves_the_child_able_to_claim(ring_name):
    """The mutex that serializes this process's role transitions is made anew
    in a forked child: a thread of the parent holding it at the fork would
    leave the child's copy locked, and the child's first claim would hang."""
    import threading
    from shmring import roles
    with shmring.Ring.create(ring_name, 1 << 12, kind="mpmc") as ring:
        roles._mutex.acquire()                     # "another thread" is inside a transition
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    t = threading.Thread(target=lambda: ring.consumer().close(), daemon=True)
                    t.start()
                    t.join(10)
                    code = 0 if not t.is_alive() else 2
                finally:
                    os._exit(code)
        finally:
            roles._mutex.release()
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
