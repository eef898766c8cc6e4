"""torch tensors through ``shmring.Queue``: a dense CPU tensor travels as its
bytes, one out-of-band buffer written once into the ring, and comes back as a
tensor owning its memory (README, "multiprocessing queues"; R85).

Skipped without torch (``pip install 'shmring[torch]'``)."""
import copy
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

import shmring
from shmring import _interop, queues

torch = pytest.importorskip("torch")

import _interop_workers as W  # noqa: E402
from _procs import finish, start  # noqa: E402

DTYPES = [n for n in _interop.TORCH_DTYPES if isinstance(getattr(torch, n, None), torch.dtype)]


def raw(t) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def some(dtype, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)        # "ComplexHalf support is experimental"
        g = torch.Generator().manual_seed(3)
        t = torch.rand(shape, generator=g, dtype=torch.float64) * 200 - 100
        return (t.to(torch.complex64) if dtype == torch.complex32 else t).to(dtype)


@pytest.fixture
def q():
    q = shmring.Queue(capacity=1 << 22)
    yield q
    q.close()


def roundtrip(q, obj, **kw):
    q.put(obj, **kw)                   # the inlined common path
    first = q.get()
    q.put(obj, timeout=10)             # the general path (_put / _dumps)
    second = q.get(timeout=10)
    return first, second


@pytest.mark.parametrize("name", DTYPES)
def test_every_fixed_size_dtype_comes_back_byte_identical_contiguous_and_its_own(q, name):
    dt = getattr(torch, name)
    for t in (some(dt, (3, 5, 40)), some(dt, (3, 5, 40)).transpose(0, 2)[1:], some(dt, ()), some(dt, (0, 7))):
        for got in roundtrip(q, t):
            assert type(got) is torch.Tensor and got.dtype == dt and got.shape == t.shape
            assert raw(got) == raw(t) and got.is_contiguous()
            assert not got.requires_grad
            if got.numel():
                assert got.data_ptr() != t.data_ptr()
                before = raw(t)
                got.reshape(-1).view(torch.uint8).fill_(0)   # its own memory, writable
                assert raw(t) == before and not any(raw(got))


def test_a_tensors_bytes_are_out_of_band_not_in_the_pickle_stream():
    pattern = np.frombuffer(b"shmring-queue17!" * 4096, np.uint8)         # 64 KiB, easy to spot
    t = torch.from_numpy(pattern.copy()).view(torch.float32)
    for obj in (t, {"w": t, "step": 3}, [t, t[1:]], some(torch.bfloat16, (256, 300))):
        want = sum(x.numel() * x.element_size() for x in (obj.values() if isinstance(obj, dict) else
                   obj if isinstance(obj, list) else [obj]) if isinstance(x, torch.Tensor))
        for stream, bufs in (queues._dumps(obj), queues._tdumps(obj)):
            assert len(stream) < 600, len(stream)
            assert b"shmring-queue17!" not in stream
            assert sum(b.raw().nbytes for b in bufs) == want
    # torch's own pickling puts the bytes in the stream: what the queue no longer does
    assert b"shmring-queue17!" in pickle.dumps(t, 5)


def test_a_tensor_is_written_into_the_ring_once_as_an_out_of_band_message(q):
    t = torch.arange(100_000, dtype=torch.int32)
    q.put({"t": t})
    cons = q._consumer()
    msg = cons.recv(timeout=10)
    try:
        assert msg.type == shmring.layout.T_ARRAY and msg.nbytes >= t.nbytes
        with memoryview(msg.value) as mv:
            assert bytes(mv[:4]) == queues.OOB_MAGIC
            assert raw(t) in bytes(mv)                                   # the bytes, raw, in the ring
            nbuf, plen = queues._OOB_HDR.unpack_from(mv, 0)[1:]
            assert nbuf == 1 and plen < 600
    finally:
        msg.release()
    q._count_out(1)


def test_requires_grad_and_parameters_come_back_as_torch_pickles_them(q):
    leaf = torch.ones(5, requires_grad=True)
    nonleaf = leaf * 2
    p = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    for got in roundtrip(q, {"leaf": leaf, "nonleaf": nonleaf, "p": p, "frozen": frozen}):
        theirs = pickle.loads(pickle.dumps({"leaf": leaf, "nonleaf": nonleaf, "p": p, "frozen": frozen}))
        for k, v in got.items():
            assert type(v) is type(theirs[k]), k
            assert v.requires_grad == theirs[k].requires_grad and v.is_leaf, k
            assert torch.equal(v.detach(), theirs[k].detach()), k


def test_a_state_dict_and_a_module_come_back_equal(q):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    sd = model.state_dict()
    for got in roundtrip(q, sd):
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    for m in roundtrip(q, model):
        x = torch.ones(3, 8)
        assert torch.equal(m(x), model(x))
        assert all(type(a) is torch.nn.Parameter for a in m.parameters())


class Tagged(torch.Tensor):
    pass


@pytest.mark.parametrize("make", [
    lambda: torch.ones(4).to_sparse(),
    lambda: torch.empty(4, device="meta"),
    pytest.param(lambda: torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8),
                 marks=[pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
                        pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")]),
    lambda: torch.ones(3).as_subclass(Tagged),
    lambda: setattr(t := torch.ones(3), "note", "kept") or t,
], ids=["sparse", "meta", "quantized", "subclass", "attribute"])
def test_tensors_without_plain_host_memory_go_by_torchs_own_pickling(q, make):
    t = make()
    theirs = pickle.loads(pickle.dumps(t))
    for got in roundtrip(q, {"t": t}):
        got = got["t"]
        assert type(got) is type(theirs) and got.layout == theirs.layout and got.device == theirs.device
        assert got.dtype == theirs.dtype and got.shape == theirs.shape
        assert getattr(got, "note", None) == getattr(t, "note", None)
        if got.device.type == "cpu":
            assert torch.equal(got.to_dense().dequantize() if got.is_quantized else got.to_dense(),
                               t.to_dense().dequantize() if t.is_quantized else t.to_dense())


def test_tensors_put_many_and_get_many(q):
    ts = [some(torch.float16, (i + 1, 50)) for i in range(20)]
    q.put_many(ts)
    got = q.get_many(timeout=10)
    while len(got) < 20:
        got += q.get_many(timeout=10)
    assert [raw(a) for a in got] == [raw(b) for b in ts]


def test_a_queue_of_other_objects_never_imports_torch():
    code = ("import sys, numpy as np, shmring\n"
            "q = shmring.Queue()\n"
            "for o in ({'a': np.arange(10000)}, [1, 'x'], b'b' * 5000, np.ones(3)):\n"
            "    q.put(o); q.get(timeout=10)\n"
            "q.put_many([{'a': 1}] * 3); q.get_many(timeout=10)\n"
            "print('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_a_copy_of_a_received_tensor_is_unaffected_by_later_items(q):
    a = torch.zeros(50_000)
    q.put(a)
    got = q.get()
    keep = copy.deepcopy(got)
    for i in range(40):                                            # the ring's space is reused
        q.put(torch.full((50_000,), float(i)))
        assert bool((q.get() == i).all())
    assert bool((got == 0).all()) and torch.equal(got, keep)


# ------------------------------------------------------------------------- across processes

def test_tensors_and_a_state_dict_cross_processes_from_a_child(mp, procs):
    q = shmring.Queue(capacity=1 << 20)
    child = start(procs, mp, W.queue_tensors_out, q, W.N_TENSORS)
    for i in range(W.N_TENSORS):
        v = q.get(timeout=60)
        assert v["i"] == i and W.tensor_crc(v["t"]) == v["crc"], i
        assert v["t"].is_contiguous()
    sd = q.get(timeout=60)
    torch.manual_seed(1)
    want = torch.nn.Linear(4, 2).state_dict()
    assert list(sd) == list(want) and all(torch.equal(sd[k], want[k]) for k in want)
    assert q.get(timeout=60) is None
    assert finish(child) == 0


def test_tensors_cross_processes_to_a_child_and_back(mp, procs):
    q_in, q_out = shmring.Queue(capacity=1 << 20), shmring.Queue()
    child = start(procs, mp, W.queue_tensors_echo, q_in, q_out)
    sent = [W.tensor_of(i) for i in range(W.N_TENSORS)]
    sent.append(torch.nn.Parameter(torch.ones(3, 3)))
    sent.append((torch.ones(4, requires_grad=True) * 3).detach().requires_grad_())
    for t in sent:
        q_in.put(t, timeout=60)
    q_in.put(None)
    for t in sent:
        crc, dtype, shape, rg, param, contiguous = q_out.get(timeout=60)
        assert crc == W.tensor_crc(t) and dtype == str(t.dtype) and shape == tuple(t.shape)
        assert rg == t.requires_grad and param == isinstance(t, torch.nn.Parameter) and contiguous
    assert q_out.get(timeout=60) == "done"
    assert finish(child) == 0


def test_a_leased_tensor_is_a_view_of_the_ring_that_holds_its_item(q):
    t = torch.arange(50_000, dtype=torch.float32)
    q.put({"t": t, "k": 1})
    cons = q._consumer()
    got = q.get(lease=True, timeout=10)["t"]
    assert torch.equal(got, t) and got.data_ptr() != t.data_ptr()
    assert cons.pending == 1                                    # its message is held by the view
    del got
    assert cons.pending == 0                                    # and released when the view dies
    for i in range(30):                                         # the ring's space is reused
        q.put(torch.full((50_000,), float(i)))
        assert bool((q.get(lease=True) == i).all())
