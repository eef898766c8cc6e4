"""Process targets of tests/test_sigbus_guard.py: each plays one role on a
ring or shared state whose backing the test process truncates under it.

Every target reports ``(outcome, detail)`` on its queue: ``outcome`` is the
name of the exception that ended it (``"SegmentTruncated"`` is the goal) or
``"no error"``; ``detail`` holds what it saw (messages checked, sums of a
view).  Progress goes through ``ready`` (an Event set when the role is in the
state the test wants to truncate in).  A process that dies shows in its exit
code, which the test checks first.
"""
import time

import numpy as np

import shmring

BOUND = 5.0                     # no call may block longer than this in these tests
DT = np.dtype([("seq", "<u8"), ("x", "<f8")])


def _open(kind, name, path):
    if kind == "state":
        return shmring.SharedState.attach(name, path=path)
    return shmring.Ring.attach(name, path=path)


def _payload(seq: int) -> bytes:
    return seq.to_bytes(8, "little") * 16          # 128 bytes, a function of seq


def _finish(q, detail, fn, then=None):
    """Run fn(), then ``then()`` (a call made once the guard noticed), then report."""
    try:
        fn()
        outcome = ("no error", detail)
    except BaseException as e:                     # noqa: BLE001  the outcome is what the test checks
        outcome = (type(e).__name__, {**detail, "message": str(e)})
    if then is not None:
        then()
    outcome[1].update(detail)
    q.put(outcome)


def _after(call, detail, key="after"):
    """The call made once the guard noticed: it must raise SegmentTruncated too."""
    try:
        call()
        detail[key] = "no error"
    except BaseException as e:                     # noqa: BLE001
        detail[key] = type(e).__name__


def producer(q, ready, kind, name, path):
    """Send numbered messages (or records) until a call raises (the consumer says when to truncate)."""
    ring = _open(kind, name, path)
    detail = {"sent": 0}

    def run():
        with ring.producer() as prod:
            seq = 0
            while True:
                if ring.dtype is not None:
                    batch = np.zeros(64, DT)
                    batch["seq"] = np.arange(seq, seq + 64)
                    prod.send_many(batch, timeout=BOUND)
                    seq += 64
                else:
                    prod.send(_payload(seq), timeout=BOUND)
                    seq += 1
                detail["sent"] = seq
    try:
        _finish(q, detail, run)
    finally:
        ring.close()


def consumer(q, ready, kind, name, path):
    """Receive and check numbered messages until a call raises: a message
    that is not what was sent (zeros read from a vanished page) is a failure."""
    ring = _open(kind, name, path)
    detail = {"received": 0, "wrong": 0}

    def run():
        with ring.consumer() as cons:
            seq = 0
            while True:
                if ring.dtype is not None:
                    got = cons.recv_many(1000, timeout=BOUND, copy=True)["seq"]   # a copy is never zeros
                    if len(got) == 0:
                        raise TimeoutError("no records")
                    if not np.array_equal(got, np.arange(seq, seq + len(got))):
                        detail["wrong"] += 1
                    seq += len(got)
                else:
                    b = cons.recv_bytes(timeout=BOUND)
                    if b != _payload(seq):
                        detail["wrong"] += 1
                    seq += 1
                detail["received"] = seq
                if seq >= 256:
                    ready.set()
    try:
        _finish(q, detail, run, lambda: _after(lambda: ring.consumer(), detail, "after_close"))
    finally:
        ring.close()


def blocked_consumer(q, ready, kind, name, path):
    """Block in recv on an empty ring; time how long the truncation takes to end it."""
    ring = _open(kind, name, path)
    detail = {}

    def run():
        with ring.consumer() as cons:
            ready.set()
            t = time.monotonic()
            try:
                if ring.dtype is not None:
                    cons.recv_many(10, timeout=BOUND)
                else:
                    cons.recv(timeout=BOUND)
            finally:
                detail["waited"] = time.monotonic() - t
            detail["after"] = "not reached"
    try:
        _finish(q, detail, run)
    finally:
        ring.close()


def view_sender(q, ready, kind, name, path):
    """Send one array of ones and stay (the consumer holds it)."""
    ring = _open(kind, name, path)
    try:
        prod = ring.producer()
        prod.send(np.ones(256 * 1024))             # 2 MiB of float64
        ready.wait(BOUND)
        q.put(("no error", {}))
    finally:
        time.sleep(0.2)


def view_holder(q, ready, kind, name, path):
    """Hold a zero-copy numpy view of a message and sum it with numpy over
    and over: the truncation lands during a sum.  After it the view reads
    zeros, and the next shmring call raises SegmentTruncated."""
    ring = _open(kind, name, path)
    detail = {"sums": []}

    def run():
        cons = ring.consumer()
        with cons.recv(timeout=BOUND) as msg:
            v = msg.value
            detail["sums"].append(float(v.sum()))
            ready.set()
            t = time.monotonic()
            while time.monotonic() - t < BOUND:
                s = float(np.sum(v))
                if s != detail["sums"][-1]:
                    detail["sums"].append(s)
                if s == 0.0:
                    break
            detail["zeros"] = bool((v == 0).all())
            del v
        _after(lambda: cons.recv(timeout=BOUND), detail)
        cons.close()
    try:
        _finish(q, detail, run)
    finally:
        ring.close()


def state_writer(q, ready, kind, name, path):
    """Publish arrays in a loop until a call raises."""
    st = _open("state", name, path)
    detail = {"published": 0}

    def run():
        i = 0
        while True:
            st.publish(np.full(8192, i, np.float64), timeout=BOUND)
            i += 1
            detail["published"] = i
            if i >= 50:
                ready.set()
    try:
        _finish(q, detail, run, lambda: _after(lambda: st.publish(np.zeros(4)), detail))
    finally:
        st.close()


def state_publish_once(q, ready, kind, name, path):
    st = _open("state", name, path)
    try:
        st.publish(np.ones(64 * 1024))              # 512 KiB
        ready.wait(BOUND)
        q.put(("no error", {}))
    finally:
        time.sleep(0.2)
        st.close()


def state_reader(q, ready, kind, name, path):
    """Hold a snapshot's array and sum it; then read() again."""
    st = _open("state", name, path)
    detail = {"sums": []}

    def run():
        st.wait_newer(0, timeout=BOUND)
        with st.read() as snap:
            v = snap.value
            detail["sums"].append(float(v.sum()))
            ready.set()
            t = time.monotonic()
            while time.monotonic() - t < BOUND:
                s = float(np.sum(v))
                if s != detail["sums"][-1]:
                    detail["sums"].append(s)
                if s == 0.0:
                    break
            detail["zeros"] = bool((v == 0).all())
            del v
        _after(lambda: st.read(), detail)
    try:
        _finish(q, detail, run)
    finally:
        st.close()


def state_waiter(q, ready, kind, name, path):
    """Block in wait_newer; the truncation must end it well within its timeout."""
    st = _open("state", name, path)
    detail = {}

    def run():
        v = st.wait_newer(0, timeout=BOUND)
        ready.set()
        t = time.monotonic()
        try:
            # The publisher closes after its one version: that ends a wait with
            # EndOfStream (R57); this waiter waits on, as one expecting a next
            # writer would, until the truncation ends it.
            while True:
                try:
                    st.wait_newer(v, timeout=max(0.0, BOUND - (time.monotonic() - t)))
                    break
                except shmring.EndOfStream:
                    time.sleep(0.01)
        finally:
            detail["waited"] = time.monotonic() - t
    try:
        _finish(q, detail, run)
    finally:
        st.close()
