"""Record rings (Ring.create(..., dtype=...)): batches of fixed-dtype records,
one copy in, numpy views out; across processes under fork and spawn."""
import os

import numpy as np
import pytest

import shmring

from _procs import JOIN, finish, start

DT = np.dtype([("seq", "<u8"), ("x", "<f4"), ("tag", "S3")])     # itemsize 15: not a power of two


def batch(lo, hi):
    a = np.zeros(hi - lo, DT)
    a["seq"] = np.arange(lo, hi)
    a["x"] = np.arange(lo, hi) * 0.5
    a["tag"] = [b"%03d" % (i % 1000) for i in range(lo, hi)]
    return a


def produce_records(ring, n, chunk):
    with ring.producer() as p:
        i = 0
        while i < n:
            k = min(chunk + i % 7, n - i)
            assert p.send_many(batch(i, i + k), timeout=60) == k
            i += k


def check_batch(b, got):
    """Records after the first ``got``: how many, or None if one differs."""
    for a in b.arrays:
        if a.flags.writeable or not np.array_equal(a, batch(got, got + len(a))):
            return None
        got += len(a)
    return got


def consume_records(ring, q, max_n):
    got, wraps, err = 0, 0, None
    try:
        with ring.consumer() as c:
            for b in iter(lambda: c.recv_many(max_n, timeout=60), None):
                with b:
                    wraps += len(b.arrays) == 2
                    ok = check_batch(b, got)
                if ok is None:
                    err = f"batch at {got} differs"
                    break
                got = ok
    except shmring.EndOfStream:
        pass
    except BaseException as e:
        err = repr(e)
    q.put({"got": got, "wraps": wraps, "error": err})


@pytest.mark.parametrize("max_n", [None, 1000])
def test_records_stream_across_processes(ring_name, procs, mp, max_n):
    n = 400_000
    with shmring.Ring.create(ring_name, 1 << 16, dtype=DT) as ring:
        assert ring.dtype == DT and ring.kind == "spsc"
        q = mp.Queue()
        cons = start(procs, mp, consume_records, ring, q, max_n)
        prod = start(procs, mp, produce_records, ring, n, 3000)
        rep = q.get(timeout=JOIN)
        assert rep["error"] is None, rep["error"]
        assert rep["got"] == n
        if max_n:   # batches of 1000 of 4369 slots cross the end on most laps (whole-ring batches may not)
            assert rep["wraps"] > 10
        assert finish(prod) == 0 and finish(cons) == 0
        s = ring.stats()
        assert s["write_pos"] == s["read_pos"] == n and s["closed"] == "eos"


def test_attach_reads_the_dtype_and_foreign_dtypes_are_refused(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, dtype=DT) as ring:
        other = shmring.Ring.attach(ring_name)
        assert other.dtype == DT and other.stats()["slots"] == 4096 // DT.itemsize
        with other.producer() as p:
            with pytest.raises(TypeError, match="dtype"):
                p.send_many(np.zeros(3, "<f8"))
            with pytest.raises(ValueError, match="1-D"):
                p.send_many(np.zeros((2, 2), DT))
            p.send((5, 1.0, b"abc"))
            p.send_many([(6, 2.0, b"d"), (7, 3.0, b"e")])
        with ring.consumer() as c:
            r = c.recv_many(copy=True)
            assert r["seq"].tolist() == [5, 6, 7]
            with pytest.raises(shmring.EndOfStream):
                c.recv_many(timeout=0)
        other.close()


def test_record_ring_arguments(ring_name):
    with pytest.raises(ValueError, match="spsc"):
        shmring.Ring.create(ring_name, 1 << 12, kind="mpsc", dtype=DT)
    with pytest.raises(TypeError, match="object"):
        shmring.Ring.create(ring_name, 1 << 12, dtype=object)
    with pytest.raises(ValueError, match="fewer than 2"):
        shmring.Ring.create(ring_name, 4096, dtype=np.dtype(("u1", 4000)))
    assert not os.path.exists(f"/dev/shm/shmring.{ring_name}")


def test_a_full_ring_times_out_and_a_wrapping_batch_is_two_views(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, dtype=DT) as ring, ring.producer() as p, ring.consumer() as c:
        slots = ring.stats()["slots"]
        assert p.try_send_many(batch(0, slots + 10)) == slots
        with pytest.raises(shmring.Timeout):
            p.send_many(batch(0, 1), timeout=0.05)
        c.recv_many(slots - 5).release()
        p.send_many(batch(slots, slots + 20), timeout=1)       # wraps
        with c.recv_many() as b:
            assert len(b) == 25 and [len(a) for a in b.arrays] == [5, 20]
            whole = b.contiguous()
            assert whole["seq"].tolist() == list(range(slots - 5, slots + 20))
        with pytest.raises(shmring.Timeout):
            c.recv_many(timeout=0.05)


def test_an_escaped_view_holds_its_space_until_collected(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, dtype=DT) as ring, ring.producer() as p, ring.consumer() as c:
        slots = ring.stats()["slots"]
        p.send_many(batch(0, slots))
        b = c.recv_many()
        kept = b.arrays[0][10:20]                # a derived view
        with pytest.warns(shmring.EscapedViewWarning):
            b.release()
        assert p.try_send_many(batch(0, 1)) == 0     # still held
        assert kept["seq"][0] == 10
        del kept
        assert p.try_send_many(batch(0, 1)) == 1
        with c.recv_many() as b2:                   # copy() detaches without a warning
            keep = b2.copy()
        assert keep["seq"][0] == 0
