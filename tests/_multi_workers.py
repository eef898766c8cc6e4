"""Process targets for the multi-party ring tests (mpsc, broadcast, mpmc).

Every message names its producer and sequence number and its bytes are a
deterministic function of the two, so a consumer can check each message it
gets: loss, duplication, reordering within a producer and tearing all show.
Three send paths are mixed (send(bytes), send(ndarray), reserve in place) so
the stream has records of many sizes and kinds.
"""
import os
import struct
import time
import traceback

import numpy as np

import shmring
from shmring import _core

from _workers import _TAILS, _LENS, _K, WAIT

HEAD = struct.Struct("<II")


def mmsg(tag: int, seq: int) -> bytes:
    """The bytes message of producer ``tag`` number ``seq``: 8..308 bytes."""
    j = (seq * 31 + tag * 7919) & (_K - 1)
    return HEAD.pack(tag, seq) + _TAILS[j][:_LENS[j]]


def marr(tag: int, seq: int) -> np.ndarray:
    """The array message: 1..64 uint64 values, each (tag << 32 | seq)."""
    return np.full(seq % 64 + 1, (tag << 32) | seq, dtype=np.uint64)


def identify(value) -> tuple[int, int, str | None]:
    """(tag, seq, why it is wrong or None) of a received value."""
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint64 or value.ndim != 1 or value.size == 0:
            return -1, -1, f"bad array {value.dtype} {value.shape}"
        v = int(value[0])
        tag, seq = v >> 32, v & 0xFFFFFFFF
        if not np.array_equal(value, marr(tag, seq)):
            return tag, seq, f"array of {tag}/{seq} is torn"
        return tag, seq, None
    b = bytes(value)
    if len(b) < 8:
        return -1, -1, f"short message {b!r}"
    tag, seq = HEAD.unpack_from(b)
    if b != mmsg(tag, seq):
        return tag, seq, f"bytes of {tag}/{seq} differ"
    return tag, seq, None


def send_one(prod, tag: int, seq: int) -> None:
    k = seq % 10
    if k == 3:
        prod.send(marr(tag, seq), timeout=WAIT)
    elif k == 7:
        m = mmsg(tag, seq)
        with prod.reserve(len(m), timeout=WAIT) as mv:
            mv[:] = m
    else:
        prod.send(mmsg(tag, seq), timeout=WAIT)


def produce(ring, tag: int, n: int, start_delay: float = 0.0) -> None:
    """Send n messages as producer ``tag``; exit code 0 on success."""
    time.sleep(start_delay)
    with ring.producer() as prod:
        for seq in range(n):
            send_one(prod, tag, seq)


def _receive(cons, q, expect_tags, n_each, check_order=True, stop_after=None):
    """Receive until the end of the stream; report counts per tag, or the first error."""
    last = {}
    counts = {t: 0 for t in expect_tags}
    seen = []
    error = None
    end = None
    try:
        while stop_after is None or sum(counts.values()) < stop_after:
            try:
                with cons.recv(timeout=WAIT) as msg:
                    tag, seq, why = identify(msg.value)
            except shmring.EndOfStream:
                end = "EndOfStream"
                break
            except shmring.PeerGone as e:
                end = f"PeerGone: {e}"
                break
            if why:
                error = why
                break
            if tag not in counts or seq >= n_each:
                error = f"unexpected message {tag}/{seq}"
                break
            if check_order and seq != last.get(tag, -1) + 1:
                error = f"producer {tag}: got {seq} after {last.get(tag, -1)}"
                break
            if check_order is False and seq <= last.get(tag, -1):
                error = f"producer {tag}: got {seq} after {last.get(tag, -1)} (order within a consumer)"
                break
            last[tag] = seq
            counts[tag] += 1
            seen.append((tag << 32) | seq)
    except BaseException:
        error = traceback.format_exc()
    q.put({"pid": os.getpid(), "error": error, "counts": counts, "end": end, "wait": _core.wait_counters(),
           "seen": np.array(seen, dtype=np.uint64).tobytes()})


def consume_all(ring, q, tags, n_each, spin=None) -> None:
    """mpsc consumer / broadcast subscriber: every message of every producer, in order."""
    kw = {} if spin is None else {"spin": spin}
    if ring.kind == "broadcast":
        cons = ring.subscribe("oldest", **kw)
    else:
        cons = ring.consumer(**kw)
    with cons:
        _receive(cons, q, tags, n_each)


def subscribe_then_report(ring, q, tags, n_each, ready) -> None:
    with ring.subscribe("oldest") as sub:
        ready.set()
        _receive(sub, q, tags, n_each)


def share_work(ring, q, tags, n_each, ordered: bool = True) -> None:
    """mpmc consumer: whatever it gets, each in order per producer (unless
    ``ordered`` is False: a redelivered message comes after later ones)."""
    with ring.consumer() as cons:
        _receive(cons, q, tags, n_each, check_order=False if ordered else None)


def take_and_hang(ring, ready, n: int) -> None:
    """mpmc consumer that takes n messages, keeps them unreleased and waits to be killed."""
    cons = ring.consumer()
    held = [cons.recv(timeout=WAIT) for _ in range(n)]
    ready.set()
    time.sleep(600)
    del held


def stall_in_claim(ring, ready, tag: int) -> None:
    """mpsc producer that sends one message, then claims space and waits to be killed there."""
    prod = ring.producer()
    send_one(prod, tag, 0)
    res = prod.reserve(100, timeout=WAIT)
    res.view[:8] = HEAD.pack(tag, 1)
    ready.set()
    time.sleep(600)


def slow_subscriber(ring, ready, q) -> None:
    """Broadcast subscriber that reads one message, then stops reading; reports Lagged."""
    with ring.subscribe("oldest") as sub:
        sub.recv_bytes(timeout=WAIT)
        ready.set()
        time.sleep(3.0)
        try:
            sub.recv_bytes(timeout=WAIT)
            q.put({"error": "no Lagged"})
        except shmring.Lagged as e:
            sub.rejoin("newest")
            try:
                b = sub.recv_bytes(timeout=WAIT)
                q.put({"error": None, "missed": e.missed, "missed_bytes": e.missed_bytes, "after": identify(b)})
            except BaseException:
                q.put({"error": traceback.format_exc()})
