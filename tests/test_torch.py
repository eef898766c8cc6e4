"""torch tensors through rings and SharedState: one copy in, a tensor over the ring out (README, "torch tensors").

Skipped without torch (``pip install 'shmring[torch]'``)."""
import warnings

import numpy as np
import pytest

import shmring
from shmring import _interop

torch = pytest.importorskip("torch")

import _interop_workers as W  # noqa: E402
from _procs import finish, start  # noqa: E402

DTYPES = [n for n in _interop.TORCH_DTYPES if isinstance(getattr(torch, n, None), torch.dtype)]


def raw(t) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def payload_range(m):
    with memoryview(m) as mv:
        base = np.frombuffer(mv, np.uint8).ctypes.data
    return base, base + m.nbytes


def some(dtype, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)        # "ComplexHalf support is experimental"
        g = torch.Generator().manual_seed(7)
        t = torch.rand(shape, generator=g, dtype=torch.float64) * 200 - 100
        if dtype == torch.complex32:
            return t.to(torch.complex64).to(dtype)
        return t.to(dtype)


@pytest.fixture
def pc():
    with shmring.Ring.anonymous(1 << 22) as ring, ring.producer() as p, ring.consumer() as c:
        yield p, c


@pytest.mark.parametrize("name", DTYPES)
def test_every_fixed_size_dtype_arrives_as_a_tensor_of_that_dtype_byte_identical(pc, name):
    p, c = pc
    dt = getattr(torch, name)
    for t in (some(dt, (3, 5, 4)), some(dt, (3, 5, 4)).transpose(0, 2), some(dt, ()), some(dt, (0, 7))):
        p.send(t)
        with c.recv() as m:
            v = m.value
            assert isinstance(v, torch.Tensor) and v.dtype == dt and v.shape == t.shape
            assert raw(v) == raw(t)
            del v


def test_a_received_tensor_is_a_view_of_the_ring_and_a_copy_is_not(pc):
    p, c = pc
    t = torch.arange(1000, dtype=torch.float32)
    p.send({"w": t})
    p.send(t)
    with c.recv() as m:
        lo, hi = payload_range(m)
        v = m.value["w"]
        assert lo <= v.data_ptr() and v.data_ptr() + v.nbytes <= hi
        assert v.data_ptr() % 64 == 0
        assert torch.equal(v, t)
        del v
    with c.recv() as m:
        lo, hi = payload_range(m)
        v = m.copy()
        assert not lo <= v.data_ptr() < hi and torch.equal(v, t)
    v += 1                                                    # its own memory: fine after release


def test_a_tensor_built_in_place_costs_no_copy_and_is_disarmed_at_commit(pc):
    p, c = pc
    with p.reserve_value({"step": 3, "w": shmring.InPlace((64, 64), torch.bfloat16)}) as (w,):
        assert isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16
        w.fill_(1.5)
    assert w.numel() == 0                                     # pointed away from the ring at commit
    w.fill_(9)                                                # so a late write cannot change the message
    with c.recv() as m:
        v = m.value
        assert v["step"] == 3 and v["w"].shape == (64, 64) and bool((v["w"] == 1.5).all())
        del v


def test_a_tensor_that_requires_grad_arrives_as_its_data(pc):
    p, c = pc
    t = torch.nn.Parameter(torch.ones(5))
    p.send(t * 2)
    v = c.recv(copy=True)
    assert not v.requires_grad and torch.equal(v, torch.full((5,), 2.0))


@pytest.mark.parametrize("make, match", [
    (lambda: torch.ones(4).to_sparse(), "sparse"),
    (lambda: torch.empty(4, device="meta"), "device meta"),
    pytest.param(lambda: torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8), "quantized",
                 marks=pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")),
])
def test_tensors_without_plain_host_memory_are_refused_at_the_send(pc, make, match):
    p, c = pc
    with pytest.raises(shmring.UnsupportedType, match=match):
        p.send({"t": make()})
    p.send(b"still usable")
    assert c.recv_bytes() == b"still usable"


# --------------------------------------------------------------- writes through received tensors

def test_a_write_through_a_received_tensor_does_not_crash_the_process_and_stays_in_its_message(
        mp, procs, ring_name):
    """torch has no read-only tensors: a write lands in the message's bytes in shared
    memory (every process maps the ring read-write), without any signal."""
    with shmring.Ring.create(ring_name, 1 << 16) as ring:
        out = mp.Queue()
        child = start(procs, mp, W.write_received_tensor, ring, out)
        with ring.producer() as p:
            p.send(torch.zeros(100))
            p.send(b"after")                                  # the next message is untouched
        assert finish(child) == 0                             # no SIGSEGV / SIGBUS
        assert out.get(timeout=30) == 100.0


def test_a_tensor_kept_past_its_message_holds_its_space_so_writes_never_reach_later_messages():
    with shmring.Ring.anonymous(1 << 14) as ring, ring.producer() as p, ring.consumer() as c:
        p.send(torch.zeros(512, dtype=torch.int32))
        m = c.recv()
        t = m.value
        with pytest.warns(shmring.EscapedViewWarning):
            m.release()
        del m
        i = 0
        while p.try_send(np.full(300, i, np.int32)):          # until the held space stops the ring
            t += 1                                            # writes into the held space only
            assert bool((c.recv(copy=True, timeout=10) == i).all())
            i += 1
        assert 5 < i < 20 and bool((t == i).all())
        del t                                                 # the space is given back
        p.send(np.full(300, -1, np.int32), timeout=10)
        assert bool((c.recv(copy=True, timeout=10) == -1).all())


def test_a_write_through_a_broadcast_subscribers_tensor_is_seen_by_the_other_subscribers():
    """The hazard README names: shared readers see one set of bytes."""
    with shmring.Ring.anonymous(1 << 16, kind="broadcast") as ring, ring.producer() as p:
        a, b = ring.subscribe(), ring.subscribe()
        p.send(torch.zeros(10))
        with a.recv() as m:
            t = m.value
            t += 5
            del t
        with b.recv() as m:
            assert bool((m.value == 5).all())
        # recv(copy=True) is the safe way to get a tensor to write into
        p.send(torch.zeros(10))
        t = a.recv(copy=True)
        t += 5
        assert bool((b.recv(copy=True) == 0).all())
        a.close(), b.close()


# ------------------------------------------------------------------------- across processes

def test_tensors_cross_processes_byte_identical(mp, procs, ring_name):
    with shmring.Ring.create(ring_name, 1 << 18) as ring:
        child = start(procs, mp, W.send_tensors, ring)
        got = 0
        with ring.consumer() as c:
            for m in c:
                with m:
                    v = m.value
                    assert W.tensor_crc(v["t"]) == v["crc"], v["i"]
                    assert v["i"] == got
                    got += 1
                    del v
        assert finish(child) == 0 and got == W.N_TENSORS


def test_model_weights_reach_an_actor_through_shared_state(mp, procs):
    torch.manual_seed(0)
    trainer = torch.nn.Linear(8, 3)
    with torch.no_grad():
        trainer.weight.mul_(3)
    with shmring.SharedState.anonymous(1 << 16) as state:
        state.publish(trainer.state_dict())
        out = mp.Queue()
        assert finish(start(procs, mp, W.load_weights, state, out)) == 0
        with torch.no_grad():
            assert out.get(timeout=30) == trainer(torch.ones(1, 8)).tolist()


def test_a_reader_writing_through_a_snapshot_tensor_changes_the_published_version(mp, procs):
    """Documented, not prevented: torch cannot make the tensor read-only; snap.copy() is the safe way."""
    with shmring.SharedState.anonymous(1 << 16) as state:
        state.publish({"w": torch.ones(4)})
        assert finish(start(procs, mp, W.write_snapshot_tensor, state)) == 0
        with state.read() as snap:
            assert snap.value["w"].tolist() == [-1.0] * 4
            mine = snap.copy()["w"]
        mine += 1
        with state.read() as snap:
            assert snap.value["w"].tolist() == [-1.0] * 4


def test_a_draft_tensor_is_updated_in_place_then_disarmed(tmp_path):
    with shmring.SharedState.anonymous(1 << 16) as state:
        state.publish({"w": torch.zeros(6, dtype=torch.bfloat16), "step": 0})
        with state.update() as d:
            d["w"].add_(2)
            w = d["w"]
        assert w.numel() == 0
        with state.update() as d:                             # a changed scalar: published afresh
            d["w"].add_(1)
            d["step"] = 1
        with state.read() as snap:
            v = snap.value
            assert v["step"] == 1 and v["w"].tolist() == [3.0] * 6 and v["w"].dtype == torch.bfloat16
            del v


# ------------------------------------------------------------------------------- hostile bytes

@pytest.mark.parametrize("payload, match", [
    (["qint8", [4], ["|u1", [4], "C", 0, 4]], "unknown torch dtype"),
    (["__class__", [4], ["|u1", [4], "C", 0, 4]], "unknown torch dtype"),
    ([7, [4], ["|u1", [4], "C", 0, 4]], "dtype name"),
    (["float32", [4], ["|u1", [4], "C", 0, 4]], "does not hold"),
    (["float32", [-1], ["|u1", [4], "C", 0, 4]], "shape"),
    (["float32", [1], ["<f4", [1], "C", 0, 4]], "does not hold"),
    (["float32", [1 << 40], ["|u1", [1 << 42], "C", 0, 1 << 42]], "overruns"),
    (["float32", [16], ["|u1", [64], "C", 64, 64]], "overruns"),
    (["float32", [1], ["|u1", [4], "C", 3, 4]], "aligned"),
    (["float32", [1]], "bad tensor descriptor"),
])
def test_lying_tensor_descriptors_are_corrupt_segment_errors(pc, payload, match):
    p, c = pc
    W.send_raw_object(p, W.ext(_interop.EXT_TENSOR, payload), 1, bytes(64))
    with c.recv() as m:
        with pytest.raises(shmring.CorruptSegmentError, match=match):
            m.value
    p.send(b"next")
    assert c.recv_bytes() == b"next"


def test_tensor_parts_make_a_pickle_reducer_that_sends_tensor_bytes_out_of_band():
    """For shmring.Queue (issue 17 item 1): a tensor pickles as a PickleBuffer of its bytes."""
    import io
    import pickle

    class P(pickle.Pickler):
        def reducer_override(self, obj):
            if not _interop.is_tensor(obj):
                return NotImplemented
            raw_bytes, name, shape = _interop.tensor_parts(obj)
            return _interop.rebuild_tensor, (pickle.PickleBuffer(raw_bytes), name, shape)

    for t in (torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t(), torch.zeros(0, 3), torch.tensor(True)):
        bufs, f = [], io.BytesIO()
        P(f, protocol=5, buffer_callback=bufs.append).dump({"t": t})
        assert len(bufs) == 1 and bufs[0].raw().nbytes == t.numel() * t.element_size()
        assert len(f.getvalue()) < 300                       # the bytes are not in the pickle
        got = pickle.loads(f.getvalue(), buffers=[bytearray(b.raw()) for b in bufs])["t"]
        assert got.dtype == t.dtype and got.shape == t.shape and raw(got) == raw(t)


def test_a_receiver_without_torch_gets_module_not_found_and_can_release_the_message(ring_name):
    import subprocess
    import sys
    with shmring.Ring.create(ring_name, 1 << 16) as ring, ring.producer() as p:
        p.send(torch.ones(3))
        p.send(b"next")
        code = (f"import sys; sys.modules['torch'] = None\n"
                f"import shmring\n"
                f"with shmring.Ring.attach({ring_name!r}) as r, r.consumer() as c:\n"
                f"    with c.recv(timeout=10) as m:\n"
                f"        try:\n"
                f"            m.value\n"
                f"        except ModuleNotFoundError as e:\n"
                f"            print('ModuleNotFoundError', e)\n"
                f"    print(c.recv_bytes(timeout=10))\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ModuleNotFoundError this message holds a torch tensor: install torch" in r.stdout
    assert "b'next'" in r.stdout


def test_a_cached_tensor_descriptor_is_still_checked_against_each_message(pc):
    """The codec caches a tensor ext's parse by its bytes; the block's bounds are checked per message."""
    p, c = pc
    meta = W.ext(_interop.EXT_TENSOR, ["float32", [16], ["|u1", [64], "C", 0, 64]])
    W.send_raw_object(p, meta, 1, np.arange(16, dtype=np.float32).tobytes())
    with c.recv() as m:
        assert m.value.tolist() == list(range(16))               # parsed, and cached
    W.send_raw_object(p, meta, 1, bytes(32))                      # the same meta, a shorter area
    with c.recv() as m:
        with pytest.raises(shmring.CorruptSegmentError, match="overruns"):
            m.value
