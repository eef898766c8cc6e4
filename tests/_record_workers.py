"""Process targets and deterministic data for tests/test_record.py and
tests/test_bridge.py (module level, so they run under ``spawn`` too).

``mixed(i)`` is message i of a deterministic mixed stream (bytes, an array,
a msgpack dict with arrays); ``digest(value)`` is a checksum of a received
value that does not depend on how it was received (view, copy, pure-Python
reader), so two sides compare digests, not objects."""
import os
import signal
import time
import zlib

import numpy as np

import shmring

WAIT = 60.0


def mixed(i: int):
    rng = np.random.default_rng(i)
    k = i % 3
    if k == 0:
        return rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
    if k == 1:
        shape = tuple(int(s) for s in rng.integers(1, 24, int(rng.integers(1, 4))))
        return rng.standard_normal(shape).astype(np.float32)
    return {"seq": i, "name": f"msg-{i}", "img": rng.integers(0, 255, (int(rng.integers(1, 64)), 3), dtype=np.uint8),
            "more": [rng.standard_normal(int(rng.integers(0, 20))), {"t": float(i) / 7}]}


def digest(v, c: int = 0) -> int:
    if isinstance(v, np.ndarray):
        c = zlib.crc32(f"{v.dtype.str}{v.shape}".encode(), c)
        return zlib.crc32(np.ascontiguousarray(v).tobytes(), c)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return zlib.crc32(b"B" + bytes(v), c)
    if isinstance(v, dict):
        for key in v:
            c = digest(v[key], zlib.crc32(repr(key).encode(), c))
        return c
    if isinstance(v, (list, tuple)):
        for x in v:
            c = digest(x, zlib.crc32(b"L", c))
        return c
    return zlib.crc32(repr(v).encode(), c)


def produce_mixed(name, n, gap=0.0, die=False):
    """Send mixed(0..n-1) into ring ``name``; end the stream (or die without closing it)."""
    ring = shmring.Ring.attach(name)
    prod = ring.producer()
    for i in range(n):
        prod.send(mixed(i), timeout=WAIT)
        if gap:
            time.sleep(gap)
    if die:
        os._exit(0)
    prod.close()
    ring.close()


def produce_arrays(name, n, size, start=0):
    """Send n uint8 arrays of ``size`` bytes, array i filled from seed i, its first 8 bytes the index."""
    ring = shmring.Ring.attach(name)
    with ring.producer() as prod:
        for i in range(start, start + n):
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    res = prod.reserve_array((size,), np.uint8, timeout=WAIT)
                    break
                except shmring.PeerGone:       # the consumer (a bridge end) was killed: wait for its restart
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            with res as a:
                a[:] = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)
                a[:8] = np.frombuffer(int(i).to_bytes(8, "little"), np.uint8)
    ring.close()


def array_ok(i, a) -> bool:
    exp = np.random.default_rng(i).integers(0, 256, a.size, dtype=np.uint8)
    exp[:8] = np.frombuffer(int(i).to_bytes(8, "little"), np.uint8)
    return bool(np.array_equal(a, exp))


def record_until_killed(name, path, kill_at):
    """Record ring ``name`` and SIGKILL this process between the header and
    the payload of message ``kill_at`` (a torn tail)."""
    from shmring import pausepoints
    from shmring.record import record
    seen = [0]

    def hook(point):
        if point == "record_header_written":
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            seen[0] += 1
    pausepoints.hook = hook
    record(name, path, method="kernel")
