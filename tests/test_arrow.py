"""Arrow record batches / tables and pandas DataFrames as Arrow IPC in messages (README, "Arrow and pandas").

Skipped without pyarrow (``pip install 'shmring[arrow]'``); the DataFrame tests also without pandas."""
import numpy as np
import pytest

import shmring
from shmring import _interop

pa = pytest.importorskip("pyarrow")

import _interop_workers as W  # noqa: E402
from _procs import finish, start  # noqa: E402


@pytest.fixture
def pc():
    with shmring.Ring.anonymous(1 << 22) as ring, ring.producer() as p, ring.consumer() as c:
        yield p, c


def table():
    return pa.table({"i": pa.array(range(1000), pa.int64()), "x": np.linspace(0, 1, 1000),
                     "s": [None if k % 9 == 0 else f"s{k}" for k in range(1000)],
                     "l": [[k, k + 1] if k % 2 else [] for k in range(1000)],
                     "d": pa.array(["a", "b", None, "c"] * 250).dictionary_encode()})


def test_tables_and_record_batches_arrive_as_what_was_sent(pc):
    p, c = pc
    t = table()
    for v in (t, t.to_batches()[0], t.slice(0, 0), pa.Table.from_batches([t.to_batches()[0]] * 3),
              {"meta": 1, "t": t}):
        p.send(v)
        with c.recv() as m:
            got = m.value
            if isinstance(v, dict):
                assert got["meta"] == 1 and got["t"].equals(t)
            else:
                assert type(got) is type(v) and got.equals(v) and got.schema.equals(v.schema)
            del got


def test_received_arrow_buffers_are_the_rings_memory_and_keep_the_message_leased():
    with shmring.Ring.anonymous(1 << 16) as ring, ring.producer() as p, ring.consumer() as c:
        t = pa.table({"i": np.arange(1000, dtype=np.int64)})
        p.send(t)
        m = c.recv()
        with memoryview(m) as mv:
            lo = np.frombuffer(mv, np.uint8).ctypes.data
        got = m.value
        addr = got.column("i").chunk(0).buffers()[1].address
        assert lo <= addr and addr + 8000 <= lo + m.nbytes
        with pytest.warns(shmring.EscapedViewWarning):
            m.release()
        del m
        i = 0
        while p.try_send(np.full(1000, i)):                   # the held space stops the ring
            assert bool((c.recv(copy=True, timeout=10) == i).all())
            i += 1
        assert i > 3 and got.equals(t)                        # never overwritten
        del got, addr
        p.send(b"room again", timeout=10)
        assert c.recv_bytes(timeout=10) == b"room again"


def test_recv_copy_gives_arrow_data_of_its_own(pc):
    p, c = pc
    t = table()
    p.send(t)
    got = c.recv(copy=True)                                   # released at once: no lease, no warning
    p.send(b"x")
    assert c.recv_bytes() == b"x" and got.equals(t)


def test_a_dataframe_arrives_as_an_equal_dataframe(pc):
    pytest.importorskip("pandas")
    p, c = pc
    df = W.frame(500)
    p.send(df)
    with c.recv() as m:
        got = m.value
        assert got.equals(df) and list(got.index) == list(df.index)
        del got


def test_a_dataframe_and_a_table_cross_processes(mp, procs, ring_name):
    pytest.importorskip("pandas")
    with shmring.Ring.create(ring_name, 1 << 20) as ring:
        child = start(procs, mp, W.send_frame, ring, 2000)
        with ring.consumer() as c:
            df = c.recv(copy=True, timeout=60)
            t = c.recv(copy=True, timeout=60)
        assert finish(child) == 0
        want = W.frame(2000)
        assert df.equals(want) and t.equals(pa.Table.from_pandas(want, preserve_index=False))


# ------------------------------------------------------------------------------- hostile bytes

@pytest.mark.parametrize("payload, area, match", [
    (["table", ["|u1", [64], "C", 0, 64]], bytes(64), "invalid Arrow data"),
    (["table", ["|u1", [64], "C", 0, 64]], b"\xff" * 64, "invalid Arrow data"),
    (["object", ["|u1", [64], "C", 0, 64]], bytes(64), "unknown Arrow value kind"),
    (["table", ["<i8", [8], "C", 0, 64]], bytes(64), "bad Arrow block"),
    (["table", ["|u1", [1 << 40], "C", 0, 1 << 40]], bytes(64), "overruns"),
    (["table"], bytes(64), "bad Arrow descriptor"),
])
def test_lying_arrow_descriptors_and_garbage_streams_are_corrupt_segment_errors(pc, payload, area, match):
    p, c = pc
    W.send_raw_object(p, W.ext(_interop.EXT_ARROW, payload), 1, area)
    with c.recv() as m:
        with pytest.raises(shmring.CorruptSegmentError, match=match):
            m.value
    p.send(b"next")
    assert c.recv_bytes() == b"next"


def test_truncated_streams_and_two_batches_for_one_are_corrupt_segment_errors(pc):
    p, c = pc
    b = table().to_batches()[0]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, b.schema) as w:
        w.write(b)
        w.write(b)
    two = sink.getvalue().to_pybytes()
    n = len(two)
    for what, area, match in [("batch", two, "more than one batch"), ("table", two[:n // 2], "invalid Arrow"),
                              ("table", two[:100], "invalid Arrow")]:
        W.send_raw_object(p, W.ext(_interop.EXT_ARROW, [what, ["|u1", [len(area)], "C", 0, len(area)]]), 1, area)
        with c.recv() as m:
            with pytest.raises(shmring.CorruptSegmentError, match=match):
                m.value


def test_random_corruption_of_arrow_ipc_bytes_never_crashes_a_reader(mp, procs):
    """Each mutated stream reads as valid Arrow data or is CorruptSegmentError; the child survives."""
    out = mp.Queue()
    child = start(procs, mp, W.fuzz_in_child, 17, 1500, out)
    seen = out.get(timeout=170)
    assert finish(child) == 0
    assert seen["corrupt"] > 100 and seen["ok"] + seen["corrupt"] == 1500


# ------------------------------------------------------- compressed IPC: bounded before pyarrow allocates

def compressed_stream(t, codec="zstd"):
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as w:
        w.write(t)
    return sink.getvalue().to_pybytes()


def send_stream(p, what, area):
    W.send_raw_object(p, W.ext(_interop.EXT_ARROW, [what, ["|u1", [len(area)], "C", 0, len(area)]]), 1, area)


def test_a_compressed_buffer_claiming_64_gib_fails_fast_without_allocating(ring_name):
    """A hostile record declares a 64 GiB uncompressed buffer: CorruptSegmentError naming
    the bound, in a child whose address space is capped (so a regression cannot take the
    machine down: there, the allocation fails or is refused, and the message differs)."""
    import subprocess
    import sys
    code = f"""
import resource, struct, sys
sys.path.insert(0, {str(W.__file__.rpartition('/')[0])!r})
import pyarrow as pa, shmring
import _interop_workers as W
from shmring import _interop
from test_arrow import compressed_stream, send_stream
t = pa.table({{"x": pa.array(range(1000), pa.int64())}})
for codec in ("zstd", "lz4"):
    area = compressed_stream(t, codec)
    true_len = struct.pack("<q", 8000)
    assert area.count(true_len) == 1, area.count(true_len)
    area = area.replace(true_len, struct.pack("<q", 64 << 30))
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    with shmring.Ring.anonymous(1 << 16) as ring, ring.producer() as p, ring.consumer() as c:
        send_stream(p, "table", area)
        with c.recv(timeout=10) as m:
            try:
                m.value
                print("read")
            except shmring.CorruptSegmentError as e:
                print("CorruptSegmentError", e)
        p.send(b"next")
        print(c.recv_bytes(timeout=10))
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
"""
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(   # this shmring, wherever it was imported from
        [os.path.dirname(os.path.dirname(shmring.__file__)), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=W.__file__.rpartition('/')[0], env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4, r.stdout
    for line in lines[0::2]:
        assert line.startswith("CorruptSegmentError") and "uncompressed" in line and "68,719,476,736" in line, line
    assert lines[1] == lines[3] == "b'next'"


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compressed_streams_within_the_bound_are_read_and_past_it_refused(pc, codec):
    p, c = pc
    t = table()
    send_stream(p, "table", compressed_stream(t, codec))
    with c.recv() as m:
        got = m.value
        assert got.equals(t)
        del got
    zeros = pa.table({"z": np.zeros(1 << 20, np.int64)})          # 8 MiB of zeros: compresses to almost nothing
    area = compressed_stream(zeros, codec)
    assert len(area) * _interop.ARROW_INFLATE_FACTOR + _interop.ARROW_INFLATE_SLACK < zeros.nbytes
    send_stream(p, "table", area)
    with c.recv() as m:
        with pytest.raises(shmring.CorruptSegmentError, match="uncompressed"):
            m.value
    p.send(b"next")
    assert c.recv_bytes() == b"next"
