"""Process targets of tests/test_double_map.py (module level, for spawn too).

Message ``seq`` of a stream is a deterministic function of (seed, seq): its
size (up to the ring's largest message, so many cross the end of the data
area, R60), its kind (bytes or a uint8 array) and its bytes, so the receiving
process checks every message's checksum without being told what was sent.
"""
import random
import zlib

import numpy as np

import shmring

WAIT = 60.0


def size_of(seed: int, seq: int, most: int) -> int:
    """Sizes: the largest message every 7th, small ones, and random ones up to the largest."""
    rng = random.Random(seed * 1_000_003 + seq)
    if seq % 7 == 3:
        return most
    if seq % 5 == 1:
        return rng.randrange(0, 64)
    return rng.randrange(1, most + 1)


def message(seed: int, seq: int, most: int):
    """(the value to send, its crc32): bytes, or a uint8 array (its encoding
    takes some bytes of meta, so its data is ``most - 256`` bytes at most)."""
    n = size_of(seed, seq, most)
    data = np.random.default_rng([seed, seq]).integers(0, 256, n, dtype=np.uint8)
    if n >= 8:
        data[:8] = np.frombuffer(seq.to_bytes(8, "little"), np.uint8)   # a lost or repeated message shows
    if seq % 2:
        arr = data[:max(0, n - 256)]
        return arr, zlib.crc32(arr.tobytes())
    raw = data.tobytes()
    return raw, zlib.crc32(raw)


def produce(ring, seed: int, count: int, q=None):
    """Send messages 0..count-1 of stream ``seed``, then close (the end of the stream)."""
    try:
        with ring.producer() as p:
            for seq in range(count):
                value, _ = message(seed, seq, ring.max_message)
                p.send(value, timeout=WAIT)
        if q is not None:
            q.put(None)
    except BaseException as e:                   # noqa: BLE001  reported to the test
        if q is not None:
            q.put(f"{type(e).__name__}: {e}")
        raise
    finally:
        ring.close()
