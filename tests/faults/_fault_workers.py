"""Process targets for the fault-injection suite: each one stops at a named
point and waits there to be SIGKILLed by the test.

A target stops either at a plain ``ready.set(); hang()`` in its own code, or
inside shmring at a test-only pause point (``shmring.pausepoints.hook``, a
no-op unless set).  Payloads are ``tagged(seq)`` from
``tests/_workers.py``: the sequence number followed by deterministic
pseudo-random bytes, so a survivor can check every byte of every message
(a checksum by regeneration) and spot loss, duplication or tearing.
"""
import time
import traceback

import shmring
from shmring import pausepoints

from _workers import WAIT, tagged

HANG = 120.0                 # a paused child sleeps this long; the test kills it long before


def hang():
    time.sleep(HANG)


def pause_at(point, ready):
    """Make shmring stop at pause point ``point`` (signal ``ready``, then hang)."""
    def hook(p):
        if p == point:
            ready.set()
            hang()
    pausepoints.hook = hook


def produce(name, first, count, path=None, close=True):
    """Take the producer role and send tagged(first .. first+count-1); close the stream or detach."""
    ring = shmring.Ring.attach(name, path=path)
    p = ring.producer()
    for s in range(first, first + count):
        p.send(tagged(s), timeout=WAIT)
    if close:
        p.close()
    else:
        p.detach()


def produce_then_stop(name, k, where, ready, q, path=None):
    """Send tagged(0..k-1), then stop at ``where``:

    * ``before_claim``: role held, nothing reserved for message k;
    * ``reserved``: message k reserved and half written, not committed
      (stopped at the ``reserved`` pause point inside Reservation.commit);
    * ``full``: fill the ring, report how many were committed, then block in
      send() of one more (the test waits until we are asleep on the futex).
    """
    ring = shmring.Ring.attach(name, path=path)
    p = ring.producer()
    for s in range(k):
        p.send(tagged(s), timeout=WAIT)
    if where == "before_claim":
        q.put(k)
        ready.set()
        hang()
    elif where == "reserved":
        q.put(k)
        pause_at("reserved", ready)
        data = tagged(k)
        with p.reserve(len(data)) as mv:
            mv[: len(data) // 2] = data[: len(data) // 2]
            mv[len(data) // 2:] = b"\xee" * (len(data) - len(data) // 2)   # garbage a torn read would show
    elif where == "full":
        n = k
        while p.try_send(tagged(n)):
            n += 1
        q.put(n)
        ready.set()
        p.send(tagged(n), timeout=HANG)       # blocks: the consumer is not reading
    raise AssertionError("not killed in time")


def consume_blocked(name, ready, path=None):
    """Take the consumer role and block in recv() on an empty ring."""
    ring = shmring.Ring.attach(name, path=path)
    c = ring.consumer()
    ready.set()
    c.recv(timeout=HANG)
    raise AssertionError("a message arrived on a ring that should stay empty")


def consume_and_hold(name, release, hold, q, path=None):
    """Receive and release ``release`` messages, then receive ``hold`` more and keep
    them unreleased; report the held sequence numbers and hang with them held."""
    try:
        ring = shmring.Ring.attach(name, path=path)
        c = ring.consumer()
        for _ in range(release):
            c.recv_bytes(timeout=WAIT)
        held = [c.recv(timeout=WAIT) for _ in range(hold)]
        q.put([int.from_bytes(bytes(m.value[:8]), "little") for m in held])
    except BaseException:
        q.put(traceback.format_exc())
        raise
    hang()


def create_then_stop(name, ready, path=None):
    """Create a ring but stop after the name exists and before the header is written."""
    pause_at("create", ready)
    shmring.Ring.create(name, 1 << 12, path=path)
    raise AssertionError("not killed in time")


def attach_then_stop(name, ready, path=None):
    """Stop inside Ring.attach, after mapping and before validating anything."""
    pause_at("attach", ready)
    shmring.Ring.attach(name, path=path)
    raise AssertionError("not killed in time")


def consume_all_from(name, q, path=None):
    """Take the consumer role and receive until EndOfStream; report each message's
    sequence number and whether it was byte-identical to what was sent."""
    seqs, bad = [], []
    try:
        ring = shmring.Ring.attach(name, path=path)
        with ring.consumer() as c:
            for m in c:
                with m:
                    data = m.tobytes()
                s = int.from_bytes(data[:8], "little")
                seqs.append(s)
                if data != tagged(s):
                    bad.append(s)
        q.put({"seqs": seqs, "bad": bad, "error": None})
    except BaseException:
        q.put({"seqs": seqs, "bad": bad, "error": traceback.format_exc()})


# ----------------------------------------------------------------------------- SharedState

def state_value(v):
    """Version v's value: every element is v, so a torn or stale read shows."""
    import numpy as np
    return np.full(512, v, np.int64)


def state_writer_stepwise(name, steps, q):
    """Publish versions 1, 2, ... one per token taken from ``steps`` (a queue);
    report each published version; the last publish may block (every spare
    slot pinned) until killed."""
    state = shmring.SharedState.attach(name)
    v = 0
    while True:
        steps.get(timeout=HANG)
        v += 1
        q.put(("publishing", v))
        state.publish(state_value(v), timeout=HANG)
        q.put(("published", v))


def state_create_then_stop(name, ready):
    """Create a SharedState but stop before its header is written."""
    from shmring import snapshot

    def stop(*a, **k):
        ready.set()
        hang()
    snapshot._write_state_header = stop
    shmring.SharedState.create(name, 4096)
    raise AssertionError("not killed in time")


def state_attach_then_stop(name, ready):
    """Stop inside SharedState.attach, after mapping, before validating."""
    from shmring import snapshot

    def stop(*a, **k):
        ready.set()
        hang()
    snapshot._validate_state_header = stop
    shmring.SharedState.attach(name)
    raise AssertionError("not killed in time")
