"""Views that stall silently (issue 16 case 5, R67-R68).

``for msg in cons`` releases the message it handed out before when the next
one is requested, and warns (EscapedViewWarning naming the loop and what
was kept) when a view of it escaped; a producer that then times out on the
full ring says the consumer is holding what it received.
"""
import subprocess
import sys
import warnings

import numpy as np
import pytest

import shmring

PRODUCER = """
import sys, numpy as np, shmring
ring = shmring.Ring.attach(sys.argv[1])
try:
    with ring.producer() as prod:
        for i in range(200):
            prod.send(np.full(500, i), timeout=float(sys.argv[2]))
except shmring.Timeout as e:
    print("TIMEOUT", e, flush=True)
    sys.exit(3)
"""


def test_iteration_releases_the_previous_message_when_the_next_is_requested(ring_name):
    with shmring.Ring.create(ring_name, 1 << 16) as ring, ring.producer() as prod, ring.consumer() as cons:
        for i in range(3):
            prod.send(bytes([i]) * 10)
        it = iter(cons)
        m1 = next(it)
        assert bytes(m1.value) == b"\0" * 10            # used, view dropped
        m2 = next(it)
        assert m1.released and not m2.released          # m1 is still referenced here, but released
        with m2:
            pass
        m3 = next(it)                                   # m2 was released by its with block: nothing more
        assert bytes(m3.value) == b"\2" * 10
        prod.close()
        assert list(it) == []
        assert m3.released


def test_a_message_never_looked_at_in_a_loop_is_left_to_the_dropped_message_rule(ring_name):
    # R39 unchanged: iteration does not release a message nobody looked at;
    # a message dropped unread is handed out again.
    with shmring.Ring.create(ring_name, 1 << 16) as ring, ring.producer() as prod, ring.consumer() as cons:
        prod.send(b"first")
        prod.send(b"second")
        it = iter(cons)
        m = next(it)
        del m                                           # dropped unread: handed out again
        m = next(it)
        assert bytes(m.value) == b"first"


@pytest.mark.parametrize("how", ["list", "last"])
def test_a_view_kept_past_the_loop_body_warns_naming_the_loop_and_the_array(how, ring_name):
    with shmring.Ring.create(ring_name, 1 << 16) as ring, ring.producer() as prod, ring.consumer() as cons:
        for i in range(3):
            prod.send(np.full((4, 5), i, np.float32))
        prod.close()
        kept = []
        with pytest.warns(shmring.EscapedViewWarning) as rec:
            for msg in cons:                            # the fan-in pattern of the issue
                if how == "list":
                    kept.append(msg.value)
                else:
                    last = msg.value                    # noqa: F841 (kept until the next item)
        text = str(rec[0].message)
        assert "iterating over the consumer" in text and "float32 array of shape (4, 5)" in text
        assert "msg.copy()" in text
        assert rec[0].filename == __file__              # points at the user's loop, not at shmring
        assert [int(a[0, 0]) for a in kept] == ([0, 1, 2] if how == "list" else [])
        del kept, msg
        last = None


def test_a_producer_timing_out_because_the_consumer_keeps_views_says_so(ring_name):
    ring = shmring.Ring.create(ring_name, 1 << 14)
    try:
        prod = subprocess.Popen([sys.executable, "-c", PRODUCER, ring_name, "2"], stdout=subprocess.PIPE, text=True)
        kept = []
        with warnings.catch_warnings(record=True) as rec, ring.consumer() as cons:
            warnings.simplefilter("always", shmring.EscapedViewWarning)
            with pytest.raises(shmring.PeerGone):      # the producer gives up, its stream aborted
                for msg in cons:
                    kept.append(msg.value)              # never released: the ring fills and stalls
        out, _ = prod.communicate(timeout=60)
        assert prod.returncode == 3, out
        assert "stayed full" in out and "the consumer was waiting for new data" in out
        assert "EscapedViewWarning" in out and "msg.copy()" in out
        assert any("iterating over the consumer" in str(w.message) for w in rec)
        assert 0 < len(kept) < 200
        del kept, msg
    finally:
        ring.close()


def test_a_producer_timing_out_on_a_slow_consumer_does_not_blame_kept_views(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as prod, ring.consumer():
        with pytest.raises(shmring.Timeout) as e:
            for _ in range(10):
                prod.send(b"x" * 1000, timeout=0.2)     # nobody is receiving
        assert "stayed full" in str(e.value) and "waiting for new data" not in str(e.value)
