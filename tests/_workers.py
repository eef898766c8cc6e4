"""Process targets and deterministic test data shared by the test modules.

Everything a child process runs is a module-level function here, so it works
under the ``spawn`` start method too.  Children report through a queue (a dict
with an ``error`` key that is None on success) and through their exit code.

Payloads are deterministic functions of a sequence number, so a consumer in
another process can check every message it gets without being told what was
sent: loss, duplication, reordering and tearing all show up as a mismatch.
"""
import os
import random
import sys
import time
import traceback
import uuid
import warnings
from math import prod

import numpy as np

import shmring
from shmring import _core

WAIT = 60.0                      # generous bound on any single blocking call in a child
DEFAULT_SPIN = shmring.ring.DEFAULT_SPIN

def unique_name(tag: str = "t") -> str:
    """A segment name no other test (or test run) uses."""
    return f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------- bytes payloads

_K = 1 << 14
_rng = random.Random(20240601)
_LENS = [_rng.randrange(0, 301) for _ in range(_K)]
_LENS[0], _LENS[1], _LENS[2] = 0, 7, 300                   # always include the edges
_TAILS = [_rng.randbytes(max(0, n - 8)) for n in _LENS]
del _rng


def payload(seq: int) -> bytes:
    """The message with sequence number ``seq``: 0..300 bytes, starting with the
    little-endian sequence number (truncated when shorter than 8), then
    pseudo-random bytes.  Lengths vary per message, so a lost or duplicated
    record shifts everything after it."""
    j = seq & (_K - 1)
    n = _LENS[j]
    head = seq.to_bytes(8, "little")
    return head + _TAILS[j] if n >= 8 else head[:n]


def tagged(seq: int) -> bytes:
    """Like payload(), but always at least 8 bytes, so seq_of() can read it back."""
    return seq.to_bytes(8, "little") + _TAILS[seq & (_K - 1)]


def seq_of(data) -> int:
    """Sequence number of a tagged() message."""
    return int.from_bytes(bytes(data[:8]), "little")


# --------------------------------------------------------------------- array payloads

ARRAY_DTYPES = [
    "<i1", "<u2", "<i4", ">i4", "<i8", ">u8", "<f2", "<f4", ">f8", "<c8", ">c16", "|b1",
    "<M8[ns]", ">m8[s]", "<U5", "|S7", "|V3",
    [("a", "<i4"), ("b", ">f8"), ("c", "S3")],
    [("p", [("x", "<f4"), ("y", "<i2", (3,))]), ("q", "u1")],
    {"names": ["a", "b"], "formats": ["u1", "<f8"], "offsets": [0, 8], "itemsize": 24},
]


def make_array(seq: int) -> np.ndarray:
    """A deterministic array of random dtype, shape (0-d and empty included) and
    memory layout (C, Fortran, strided, transposed) for sequence number ``seq``."""
    rng = np.random.default_rng(seq)
    dt = np.dtype(ARRAY_DTYPES[int(rng.integers(len(ARRAY_DTYPES)))])
    ndim = int(rng.integers(0, 4))
    shape = tuple(int(s) for s in rng.integers(0, 9, ndim))
    layout = int(rng.integers(4)) if ndim else 0
    base_shape = (shape[0] * 2,) + shape[1:] if layout == 2 else shape
    raw = rng.integers(0, 256, prod(base_shape) * dt.itemsize, dtype=np.uint8).tobytes()
    a = np.frombuffer(raw, dt).reshape(base_shape)
    if layout == 1:
        a = np.asfortranarray(a)
    elif layout == 2:
        a = a[::2]
    elif layout == 3:
        a = a.T
    return a


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact equality of dtype, shape and every byte of every field (padding bytes,
    which carry no data, are ignored)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.names:
        return all(same_values(a[n], b[n]) for n in a.dtype.names)
    return a.tobytes() == b.tobytes()


def check_received_array(v, expect) -> str | None:
    """Why the received array ``v`` is wrong, or None."""
    if not isinstance(v, np.ndarray):
        return f"expected an ndarray, got {type(v).__name__}"
    if not same_values(v, expect):
        return f"array differs: got {v.dtype} {v.shape}, expected {expect.dtype} {expect.shape}"
    if v.flags.writeable:
        return "received array is writeable"
    if v.size and v.ctypes.data % 64:
        return f"received array is not 64-byte aligned (address % 64 = {v.ctypes.data % 64})"
    return None


def make_value(seq: int):
    """What the array stream sends for ``seq``: mostly arrays, every 5th one a
    msgpack object holding arrays."""
    a = make_array(seq)
    if seq % 5 == 4:
        return {"seq": seq, "arrays": [a, make_array(seq + 1_000_000)], "tag": f"s{seq}"}
    return a


def _report(q, **kw):
    kw.setdefault("error", None)
    q.put(kw)


def _strict_warnings():
    warnings.simplefilter("error", shmring.EscapedViewWarning)


# --------------------------------------------------------------------- stream workers

def _no_spin_setup(spin):
    """With spin=0 every wait is a futex sleep; long slices make a lost wake-up
    show as a sleep that timed out with its condition already true."""
    if spin == 0:
        shmring.waiting.WAIT_SLICE = 30.0


def produce_stream(ring, n, mixed, seed=1, spin=DEFAULT_SPIN):
    """Send payload(0..n-1), then close (EndOfStream).  With ``mixed`` the
    message goes through every send path in turn.  Exit code 3: a late wake-up."""
    _no_spin_setup(spin)
    try:
        _produce_stream(ring, n, mixed, seed, spin)
    finally:
        if _core.wait_counters()["late_wakeups"]:
            sys.exit(3)


def _produce_stream(ring, n, mixed, seed, spin):
    rng = random.Random(seed)
    with ring.producer(spin=spin) as p:
        if not mixed:
            send = p.send
            for s in range(n):
                send(payload(s))
            return
        for s in range(n):
            data = payload(s)
            k = rng.randrange(8)
            if k <= 2:
                p.send(data)
            elif k == 3:
                p.send(data, timeout=WAIT)
            elif k == 4:
                while not p.try_send(data):
                    os.sched_yield()
            elif k == 5:
                with p.reserve(len(data), timeout=WAIT) as mv:
                    mv[:] = data
            elif k == 6:
                p.send(bytearray(data))
            else:
                p.send(memoryview(data))


def consume_stream(ring, n, mixed, q, seed=2, spin=DEFAULT_SPIN):
    """Receive n messages and check each against payload(seq), then expect
    EndOfStream.  With ``mixed`` it uses every receive path, and holds up to 8
    messages at once, re-checking them (not overwritten while held) and
    releasing them in random order.  Held messages pin the ring from the first
    of them on, so they are let go within 12 messages (a 4 KiB ring must not
    fill up behind them: that would be a deadlock of the test's own making)."""
    _strict_warnings()
    _no_spin_setup(spin)
    rng = random.Random(seed)
    got = 0

    def let_go(held):
        rng.shuffle(held)
        for hs, hm in held:
            if hm.tobytes() != payload(hs):
                raise AssertionError(f"message {hs} changed while it was held")
            hm.release()
        held.clear()
    try:
        with ring.consumer(spin=spin) as c:
            held, limit = [], 1
            for s in range(n):
                want = payload(s)
                k = rng.randrange(8) if mixed else 0
                if k <= 2:
                    b = c.recv_bytes(timeout=WAIT)
                elif k == 3:
                    with c.recv(timeout=WAIT) as m:
                        b = bytes(m.value)
                elif k == 4:
                    b = c.recv(copy=True, timeout=WAIT)
                else:
                    m = c.try_recv()
                    while m is None:
                        os.sched_yield()
                        m = c.try_recv()
                    if m.kind != "bytes":
                        raise AssertionError(f"message {s}: kind {m.kind}")
                    b = m.tobytes()
                    if not held:
                        first_held, limit = s, rng.randrange(1, 9)
                    held.append((s, m))
                if b != want:
                    raise AssertionError(f"message {s}: got {len(b)} bytes {bytes(b[:16]).hex()}..., "
                                         f"expected {len(want)} bytes {want[:16].hex()}...")
                got += 1
                if held and (len(held) >= limit or s - first_held >= 12):
                    let_go(held)
            let_go(held)
            try:
                extra = c.recv_bytes(timeout=WAIT)
            except shmring.EndOfStream:
                end = "EndOfStream"
            else:
                end = f"an extra message of {len(extra)} bytes"
        _report(q, received=got, end=end, wait=_core.wait_counters())
    except BaseException:
        _report(q, received=got, end=None, error=traceback.format_exc())


def produce_values(ring, n):
    """Send make_value(0..n-1), every 7th array built in place with reserve_array."""
    with ring.producer() as p:
        for s in range(n):
            v = make_value(s)
            if s % 7 == 3 and isinstance(v, np.ndarray):
                order = "F" if v.flags.f_contiguous and not v.flags.c_contiguous else "C"
                with p.reserve_array(v.shape, v.dtype, order=order, timeout=WAIT) as out:
                    out[...] = v
            else:
                p.send(v, timeout=WAIT)


def consume_values(ring, n, q):
    _strict_warnings()
    got = 0
    try:
        with ring.consumer() as c:
            for s in range(n):
                expect = make_value(s)
                with c.recv(timeout=WAIT) as m:
                    v = m.value
                    if isinstance(expect, np.ndarray):
                        why = (m.kind != "array" and f"kind {m.kind}") or check_received_array(v, expect)
                    else:
                        why = ((m.kind != "object" and f"kind {m.kind}")
                               or (v["seq"], v["tag"]) != (expect["seq"], expect["tag"]) and "fields differ"
                               or check_received_array(v["arrays"][0], expect["arrays"][0])
                               or check_received_array(v["arrays"][1], expect["arrays"][1]))
                    del v
                if why:
                    raise AssertionError(f"value {s}: {why}")
                got += 1
            try:
                c.recv(timeout=WAIT)
                end = "an extra message"
            except shmring.EndOfStream:
                end = "EndOfStream"
        _report(q, received=got, end=end)
    except BaseException:
        _report(q, received=got, end=None, error=traceback.format_exc())


# --------------------------------------------------------------------- roles and faults

def hold_role(ring, role, ready, stop):
    """Take ``role`` ('producer' or 'consumer'), signal, hold it until ``stop``."""
    with getattr(ring, role)():
        ready.set()
        stop.wait(WAIT)


def take_role_and_die(ring, role):
    """Take a role and exit at once without giving it back (like a crash)."""
    h = getattr(ring, role)()
    assert h is not None
    os._exit(0)


def produce_then_hang(ring, k, ready):
    """Commit payload(0..k-1), signal, then hang with the role held (to be killed)."""
    p = ring.producer()
    for s in range(k):
        p.send(payload(s), timeout=WAIT)
    ready.set()
    time.sleep(WAIT)


def produce_forever(ring, ready):
    """Stream payload(0, 1, ...) as fast as the ring allows until killed."""
    p = ring.producer()
    ready.set()
    s = 0
    while True:
        p.send(payload(s), timeout=WAIT)
        s += 1


def consume_then_hold(ring, release_first, q):
    """Receive and release ``release_first`` tagged() messages, receive the next one and
    keep it (unreleased), receive one more with recv_bytes, report, then hang."""
    c = ring.consumer()
    for _ in range(release_first):
        c.recv_bytes(timeout=WAIT)
    m = c.recv(timeout=WAIT)
    after = c.recv_bytes(timeout=WAIT)
    _report(q, held=seq_of(m.value), after=seq_of(after))
    time.sleep(WAIT)


def consume_all(ring, q):
    """Receive tagged() messages until EndOfStream; report every sequence number
    and which payloads were not intact."""
    _strict_warnings()
    seqs, bad = [], []
    try:
        with ring.consumer() as c:
            for m in c:
                with m:
                    data = m.tobytes()
                s = seq_of(data)
                seqs.append(s)
                if data != tagged(s):
                    bad.append(s)
        _report(q, seqs=seqs, bad=bad)
    except BaseException:
        _report(q, seqs=seqs, bad=bad, error=traceback.format_exc())


def hold_consumer_role(ring, ready):
    """Attach as consumer, receive nothing, signal, hang (to be killed)."""
    c = ring.consumer()
    assert c is not None
    ready.set()
    time.sleep(WAIT)


def recv_until_interrupted(ring, ready, q):
    """Block in recv() with no timeout; exit 42 on KeyboardInterrupt (Ctrl-C)."""
    try:
        with ring.consumer() as c:
            ready.set()
            c.recv()
        q.put("returned")
    except KeyboardInterrupt:
        q.put("KeyboardInterrupt")
        sys.exit(42)
    except BaseException as e:
        q.put(f"{type(e).__name__}: {e}")
        sys.exit(1)
