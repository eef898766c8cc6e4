"""The double map (issue 15 item 1, docs/design.md R60 to R64).

A framed ring's data area is mapped twice, back to back, so a record that
crosses the end of the area is contiguous in memory: no wrap padding is
written, and the largest message is ``capacity - header`` (8 bytes for spsc,
16 for the multi-party kinds) instead of ``capacity // 2 - header``.  Attacked
here: messages that wrap arrive whole (checksums) across real processes for
every kind, the new limit and one byte more, zero-copy views and
reservations across the wrap, truncation faulting in the second mapping, an
old-layout segment, and a stress of many wraps with random sizes.
"""
import os
import pickle
import random
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

import shmring
from shmring import layout as L

import _dmap_workers as W
from _procs import finish, start

KINDS = ("spsc", "mpsc", "mpmc", "broadcast")
HDR = {"spsc": L.REC_HDR, "mpsc": L.MREC_HDR, "mpmc": L.MREC_HDR, "broadcast": L.MREC_HDR}


def _consumer(ring):
    return ring.subscribe("oldest") if ring.kind == "broadcast" else ring.consumer()


def _data_range(ring):
    """[start, end) addresses of the first mapping of the data area, and the end of the second."""
    base = np.frombuffer(ring._seg.buf, np.uint8).__array_interface__["data"][0]
    d = base + ring._header["data_offset"]
    return d, d + ring.capacity, d + 2 * ring.capacity


def _crosses(ring, m) -> bool:
    """The message's payload starts in the first mapping and ends in the second."""
    first_end = ring._header["data_offset"] + ring.capacity       # m._offset: from the region's start
    return m._offset < first_end < m._offset + m.nbytes


# ----------------------------------------------------------------------------- the mapping itself

@pytest.mark.parametrize("kind", KINDS)
def test_the_file_is_header_plus_capacity_and_the_data_area_is_mapped_twice(ring_name, kind):
    cap = 1 << 14
    with shmring.Ring.create(ring_name, cap, kind=kind) as ring:
        doff = ring._header["data_offset"]
        assert os.stat(f"/dev/shm/shmring.{ring_name}").st_size == doff + cap        # no bigger on disk
        assert len(ring._seg.buf) == doff + 2 * cap                                   # twice in memory
        buf = ring._seg.buf
        buf[doff + 100:doff + 108] = b"ABCDEFGH"                                      # the same pages
        assert bytes(buf[doff + cap + 100:doff + cap + 108]) == b"ABCDEFGH"
        buf[doff + cap + 200:doff + cap + 204] = b"wxyz"
        assert bytes(buf[doff + 200:doff + 204]) == b"wxyz"
        with open("/proc/self/maps") as f:
            maps = [line.split() for line in f if f"shmring.{ring_name}" in line]
        sizes = sorted(int(a.split("-")[1], 16) - int(a.split("-")[0], 16) for a, *_ in maps)
        offsets = sorted(int(m[2], 16) for m in maps)
        assert sizes == sorted([doff + cap, cap]) and offsets == [0, doff], maps


def test_a_record_ring_is_mapped_once(ring_name):
    """Record rings (dtype=...) keep one mapping: their batches are slot
    arrays copied in one or two slices, and no message limit depends on it."""
    with shmring.Ring.create(ring_name, 1 << 14, dtype=np.float64) as ring:
        assert len(ring._seg.buf) == L.HEADER_SIZE + (1 << 14)


# ----------------------------------------------------------------------------- the largest message

@pytest.mark.parametrize("kind", KINDS)
def test_the_largest_message_is_capacity_minus_header_wherever_the_positions_stand(ring_name, kind):
    cap = 1 << 13
    with shmring.Ring.create(ring_name, cap, kind=kind) as ring, ring.producer() as p, _consumer(ring) as c:
        most = ring.max_message
        assert most == cap - HDR[kind] == ring._header["max_message"]
        rng = random.Random(kind)
        for step in range(12):                          # at many offsets of the ring, wrapping each time
            filler = rng.randrange(0, cap // 2)
            p.send(b"f" * filler)
            assert c.recv_bytes(timeout=1) == b"f" * filler
            big = rng.randbytes(most)
            p.send(big, timeout=1)
            with c.recv(timeout=1) as m:
                assert m.nbytes == most and zlib.crc32(m.tobytes()) == zlib.crc32(big)
        for too_big in (lambda: p.send(b"x" * (most + 1)), lambda: p.try_send(b"x" * (most + 1)),
                        lambda: p.send(bytearray(most + 1)), lambda: p.reserve(most + 1),
                        lambda: p.send(np.zeros(most + 1, np.uint8))):
            with pytest.raises(shmring.MessageTooLarge, match=str(most)):
                too_big()
        assert c.try_recv() is None


def test_a_16_mib_array_fits_a_32_mib_ring(ring_name):
    """The issue's case: with capacity // 2 a 16 MiB array needed a 64 MiB ring."""
    arr = np.arange(1 << 21, dtype=np.float64)          # 16 MiB
    with shmring.Ring.create(ring_name, 1 << 25) as ring, ring.producer() as p, ring.consumer() as c:
        assert ring.max_message > arr.nbytes + 256
        crossed = 0
        for i in range(5):                              # 5 x 16 MiB through 32 MiB: most of them wrap
            arr[0] = i
            p.send(arr, timeout=5)
            with c.recv(timeout=5) as m:
                v = m.value
                assert v[0] == i and np.array_equal(v[1:], arr[1:])
                crossed += _crosses(ring, m)
                del v
        assert crossed >= 2


# ----------------------------------------------------------------------------- across processes

@pytest.mark.parametrize("kind", KINDS)
def test_wrapping_messages_arrive_whole_across_processes(ring_name, kind, mp, start_method, procs, tmp_path):
    """A producer process sends messages of random sizes up to the largest;
    this process checks every checksum, and that messages crossed the wrap
    (and were contiguous: one view each).  The backing varies: a named
    segment, an anonymous (memfd) one passed by pickling, a file."""
    backing = {"spsc": "name", "mpsc": "anonymous", "mpmc": "path", "broadcast": "anonymous"}[kind]
    cap, count, seed = 1 << 14, 240, 11
    if backing == "name":
        ring = shmring.Ring.create(ring_name, cap, kind=kind)
    elif backing == "path":
        ring = shmring.Ring.create(path=str(tmp_path / "r.ring"), capacity=cap, kind=kind)
    else:
        ring = shmring.Ring.anonymous(cap, kind=kind)
    try:
        c = _consumer(ring)
        q = mp.Queue()
        child = start(procs, mp, W.produce, ring, seed, count, q)
        lo, first_end, hi = _data_range(ring)
        crossed = 0
        for seq in range(count):
            want, crc = W.message(seed, seq, ring.max_message)
            with c.recv(timeout=W.WAIT) as m:
                v = m.value
                if isinstance(want, np.ndarray):
                    assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.shape == want.shape, seq
                    a = v.__array_interface__["data"][0] if v.nbytes else lo
                    assert v.flags.c_contiguous and lo <= a and a + v.nbytes <= hi, seq   # one view, in the map
                    got = zlib.crc32(v.tobytes())
                else:
                    got = zlib.crc32(bytes(v))
                assert got == crc, f"message {seq} of {m.nbytes} bytes is damaged"
                crossed += _crosses(ring, m)
                del v
        with pytest.raises(shmring.EndOfStream):
            c.recv(timeout=W.WAIT)
        assert q.get(timeout=W.WAIT) is None
        assert finish(child) == 0
        assert crossed >= 10, crossed                   # the wrap was crossed, not avoided
        c.close()
    finally:
        ring.close()
        if backing == "name":
            ring.unlink()


# ----------------------------------------------------------------------------- views and reservations

def _to_wrap(p, c, cap, before):
    """Move both positions to ``before`` bytes before the end of the data area (spsc)."""
    while (cap - p.position % cap) % cap != before:
        gap = (p.position % cap + before) % cap
        need = (cap - gap) if gap else cap
        n = min(need, cap // 2) - L.REC_HDR
        p.send(b"." * n)
        c.recv_bytes()


def test_a_zero_copy_view_across_the_wrap_is_contiguous_and_right(ring_name):
    cap = 1 << 14
    with shmring.Ring.create(ring_name, cap) as ring, ring.producer() as p, ring.consumer() as c:
        _to_wrap(p, c, cap, 1000)
        arr = np.arange(1500, dtype=np.float64)        # 12000 bytes: ~1000 before the end, the rest after
        p.send(arr)
        lo, first_end, hi = _data_range(ring)
        m = c.recv()
        v = m.value
        a = v.__array_interface__["data"][0]
        assert a < first_end < a + v.nbytes <= hi       # one view, running on into the second mapping
        assert np.array_equal(v, arr)
        tail = np.frombuffer(ring._seg.buf, np.float64, count=(a + v.nbytes - first_end) // 8,
                             offset=ring._header["data_offset"])   # the alias: the start of the area
        assert np.array_equal(tail, arr[-len(tail):])
        del v
        m.release()


def test_an_escaped_view_across_the_wrap_stays_valid_after_close(ring_name):
    """A view kept past its message and past close() keeps the whole double
    mapping alive (it is one mapping object), and still reads the data."""
    cap = 1 << 14
    ring = shmring.Ring.create(ring_name, cap)
    p, c = ring.producer(), ring.consumer()
    _to_wrap(p, c, cap, 512)
    arr = np.arange(2000, dtype=np.int32)
    p.send(arr)
    m = c.recv()
    with pytest.warns(shmring.EscapedViewWarning):
        v = m.value
        m.release()
    p.close()
    c.close()
    ring.close()
    ring.unlink()
    assert np.array_equal(v, arr)                       # both halves still mapped
    with open("/proc/self/maps") as f:
        assert sum(f"shmring.{ring_name}" in line for line in f) == 2
    del v, m


def test_a_reservation_across_the_wrap_is_one_writable_view(ring_name):
    cap = 1 << 14
    with shmring.Ring.create(ring_name, cap) as ring, ring.producer() as p, ring.consumer() as c:
        _to_wrap(p, c, cap, 256)
        with p.reserve_array((3000,), np.int16) as a:   # 6000 bytes, most of them past the end
            a[:] = np.arange(3000, dtype=np.int16)
        with p.reserve(5000) as mv:
            mv[:] = bytes(range(250)) * 20
        assert np.array_equal(c.recv(copy=True), np.arange(3000, dtype=np.int16))
        assert c.recv_bytes() == bytes(range(250)) * 20


@pytest.mark.parametrize("kind", KINDS)
def test_a_ring_pickled_to_a_spawned_process_is_double_mapped_there(ring_name, kind):
    """Attach (by name) maps the data area twice too; the largest message crosses."""
    with shmring.Ring.create(ring_name, 1 << 13, kind=kind) as ring:
        code = textwrap.dedent(f"""
            import pickle, sys, shmring
            ring = pickle.loads({pickle.dumps(ring)!r})
            print(len(ring._seg.buf), ring.max_message)
            ring.close()
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(ring._header["data_offset"] + 2 * ring.capacity), str(ring.max_message)]


# ----------------------------------------------------------------------------- truncation

TRUNCATE = """
import os, numpy as np, shmring
from shmring import layout as L
cap = 1 << 16
ring = shmring.Ring.create({name!r}, cap, path={path!r})
p, c = ring.producer(), ring.consumer()
p.send(b"." * (cap - 2048 - 8)); c.recv_bytes()        # 2048 bytes before the end of the data area
arr = np.arange(4096, dtype=np.float64)                 # 32 KiB: ~2 KiB before the end, ~30 KiB after
p.send(arr)
m = c.recv()
v = m.value
base = np.frombuffer(ring._seg.buf, np.uint8).__array_interface__["data"][0]
first_end = base + L.HEADER_SIZE + cap
a = v.__array_interface__["data"][0]
print("crosses", a < first_end < a + v.nbytes)
print("before", v[-1] == 4095.0)
os.truncate({file!r}, L.HEADER_SIZE + 4096)             # keeps the header and the first data page
print("last", v[-1])                                    # in the second mapping: the fault lands there
print("sum", v.sum())
try:
    c.try_recv()
except shmring.SegmentTruncated:
    print("SegmentTruncated")
"""


@pytest.mark.parametrize("backing", ["posix", "file"])
def test_truncation_faulting_in_the_second_mapping_is_segment_truncated_not_a_crash(ring_name, tmp_path, backing):
    name, path = (ring_name, None) if backing == "posix" else (None, str(tmp_path / "t.ring"))
    file = f"/dev/shm/shmring.{ring_name}" if backing == "posix" else path
    code = TRUNCATE.format(name=name, path=path, file=file)
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-W", "ignore", "-c", code],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.split("\n")[:5] == ["crosses True", "before True", "last 0.0", "sum 0.0", "SegmentTruncated"], \
        r.stdout + r.stderr


# ----------------------------------------------------------------------------- old layouts

def test_an_old_layout_segment_is_refused_clearly(tmp_path):
    path = str(tmp_path / "old.ring")
    shmring.Ring.create(path=path, capacity=1 << 13).close()
    with open(path, "r+b") as f:
        f.seek(L.OFF_VERSION)
        f.write(struct.pack("<I", 2))                   # what a layout-2 shmring wrote
    with pytest.raises(shmring.IncompatibleSegment, match=r"layout version 2.*reads version 3.*twice"):
        shmring.Ring.attach(path=path)
    with open(path, "r+b") as f:
        f.seek(L.OFF_VERSION)
        f.write(struct.pack("<I", 3))
        f.seek(L.OFF_MAX_MESSAGE)
        f.write(struct.pack("<Q", (1 << 12) - 8))        # layout 2's capacity // 2 - 8, under version 3
    with pytest.raises(shmring.CorruptSegmentError, match="max message"):
        shmring.Ring.attach(path=path)


def test_a_header_whose_geometry_cannot_be_double_mapped_is_corrupt_not_mapped(tmp_path):
    path = str(tmp_path / "bad.ring")
    shmring.Ring.create(path=path, capacity=1 << 13).close()
    with open(path, "r+b") as f:
        f.seek(L.OFF_DATA_OFFSET)
        f.write(struct.pack("<Q", 100))                 # not page aligned
    with pytest.raises(shmring.CorruptSegmentError):
        shmring.Ring.attach(path=path)


# ----------------------------------------------------------------------------- stress

@pytest.mark.parametrize("kind", KINDS)
def test_stress_many_wraps_with_random_sizes_up_to_the_maximum(ring_name, kind):
    """In one process, producer and consumer interleaved at random so the ring
    is anywhere from empty to full: every message checked by checksum."""
    cap = 1 << 12
    rng = random.Random(kind)
    with shmring.Ring.create(ring_name, cap, kind=kind) as ring, ring.producer() as p, _consumer(ring) as c:
        most = ring.max_message
        sent = []
        got = crossed = 0
        while got < 4000:
            for _ in range(rng.randrange(1, 4)):
                n = rng.choice([most, rng.randrange(0, 64), rng.randrange(0, most + 1)])
                data = rng.randbytes(n)
                if not p.try_send(data):
                    break
                sent.append(zlib.crc32(data))
            for _ in range(rng.randrange(1, 4)):
                m = c.try_recv()
                if m is None:
                    break
                with m:
                    assert zlib.crc32(m.tobytes()) == sent[got], got
                    crossed += _crosses(ring, m)
                got += 1
        assert crossed > 200                            # hundreds of messages ran over the wrap, whole
