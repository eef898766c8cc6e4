"""Process targets of test_torch.py and test_arrow.py (module level: they run under spawn too).

torch and pyarrow are imported inside the targets, so this module imports
without them (the tests that use it skip first)."""
import random
import zlib

import numpy as np
import msgpack

import shmring
from shmring import codec
from shmring import layout as L

N_TENSORS = 40


def tensor_of(i: int):
    """Tensor ``i`` of a stream: mixed dtypes and shapes, some non-contiguous."""
    import torch
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.bool, torch.uint8, torch.complex64]
    g = torch.Generator().manual_seed(i)
    t = (torch.rand((i % 5 + 1, 37 * (i % 7) + 3), generator=g) * 100).to(dtypes[i % len(dtypes)])
    return t.t() if i % 3 == 0 else t


def tensor_crc(t) -> int:
    import torch
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return zlib.crc32(raw, zlib.crc32(repr((str(t.dtype), tuple(t.shape))).encode()))


def send_tensors(ring):
    """Send N_TENSORS tensors, each inside a dict with its checksum, then end the stream."""
    with ring.producer() as p:
        for i in range(N_TENSORS):
            t = tensor_of(i)
            p.send({"i": i, "crc": tensor_crc(t), "t": t}, timeout=60)
    ring.close()


def write_received_tensor(ring, out):
    """Receive a tensor and write through it inside the message's block; report what was read."""
    with ring.consumer() as c, c.recv(timeout=60) as m:
        t = m.value
        t += 1                      # no read-only flag in torch: this writes the shared pages
        out.put(float(t.sum()))
        del t
    ring.close()


def write_snapshot_tensor(state):
    """A reader that writes through a received tensor of a SharedState snapshot."""
    with state.read() as snap:
        w = snap.value["w"]
        w.mul_(-1)
        del w
    state.close()


def load_weights(state, out):
    """An actor: load the published state_dict into its own model and report its output."""
    import torch
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    with state.read() as snap:
        model.load_state_dict(snap.value)      # copies the weights into the model's own parameters
    with torch.no_grad():
        out.put(model(torch.ones(1, 8)).tolist())
    state.close()


def send_frame(ring, rows: int):
    """Send a pandas DataFrame (via Arrow) and a Table, then end the stream."""
    import pandas as pd
    import pyarrow as pa
    df = frame(rows)
    with ring.producer() as p:
        p.send(df, timeout=60)
        p.send(pa.Table.from_pandas(df, preserve_index=False), timeout=60)
    ring.close()


def frame(rows: int):
    import pandas as pd
    rng = np.random.default_rng(rows)
    return pd.DataFrame({"x": rng.random(rows), "i": np.arange(rows),
                         "s": [f"row {k}" for k in range(rows)],
                         "maybe": [None if k % 7 == 0 else k * 0.5 for k in range(rows)]},
                        index=pd.RangeIndex(10, 10 + rows))


def fuzz_arrow_ipc(seed: int, rounds: int) -> dict:
    """Corrupt the IPC bytes of Arrow messages in place and read them back.

    Allowed: a value that validates, or CorruptSegmentError.  Anything else
    raises; a crash kills the (child) process, which the test sees."""
    import pyarrow as pa
    rnd = random.Random(seed)
    batch = pa.record_batch({"i": pa.array(range(20), pa.int32()), "s": [f"v{k}" * (k % 4) for k in range(20)],
                             "l": [[k] * (k % 3) for k in range(20)],
                             "d": pa.array(["a", "b", None, "a"] * 5).dictionary_encode()})
    seen = {"ok": 0, "corrupt": 0}
    with shmring.Ring.anonymous(1 << 16) as ring, ring.producer() as p, ring.consumer() as c:
        for r in range(rounds):
            p.send(batch if r % 2 else pa.Table.from_batches([batch, batch]))
            m = c.recv()
            start, n = ipc_block(m)
            for _ in range(rnd.choice([1, 1, 2, 8])):
                k = rnd.randrange(n)
                p._wmv[m._offset + start + k] = rnd.randrange(256) if rnd.random() < .7 else rnd.choice([0, 0xFF, 0x7F, 0x80])
            try:
                v = m.value
            except shmring.CorruptSegmentError:
                seen["corrupt"] += 1
            else:
                v.validate(full=True)
                seen["ok"] += 1
                del v
            m.release()
    return seen


def ipc_block(m) -> tuple:
    """(start in the payload, length) of the one block of an object message."""
    with memoryview(m) as mv:
        meta_len, narrays = codec.PREFIX.unpack_from(mv, 0)
        ext = msgpack.unpackb(bytes(mv[8:8 + meta_len]), ext_hook=lambda code, data: msgpack.unpackb(data))
    area = L.align(m._offset + codec.PREFIX.size + meta_len, L.ARRAY_ALIGN) - m._offset
    desc = ext[-1]
    return area + desc[3], desc[4]


def fuzz_in_child(seed, rounds, out):
    out.put(fuzz_arrow_ipc(seed, rounds))


def send_raw_object(p, meta: bytes, narrays: int, area: bytes) -> None:
    """Commit a hand-made T_OBJECT payload: prefix, ``meta``, padding, ``area`` (for lying descriptors)."""
    n = codec.PREFIX.size + len(meta) + L.ARRAY_ALIGN - 1 + len(area)
    t = p._reserve_ticket(n, L.T_OBJECT)
    codec.PREFIX.pack_into(p._wmv, t.offset, len(meta), narrays)
    m0 = t.offset + codec.PREFIX.size
    p._wmv[m0:m0 + len(meta)] = meta
    a0 = L.align(m0 + len(meta), L.ARRAY_ALIGN)
    p._wmv[a0:a0 + len(area)] = area
    t.commit(a0 + len(area) - t.offset)


def ext(code: int, payload) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, msgpack.packb(payload)))


# ---------------------------------------------------------------- torch tensors through shmring.Queue

def queue_tensors_out(q, n):
    """Put ``n`` items, each a dict of a tensor and its checksum, plus a state_dict; then None."""
    import torch
    for i in range(n):
        t = tensor_of(i)
        q.put({"i": i, "crc": tensor_crc(t), "t": t})
    torch.manual_seed(1)
    q.put(torch.nn.Linear(4, 2).state_dict())
    q.put(None)


def queue_tensors_echo(q_in, q_out):
    """Take tensors until None; put back each one's checksum and what it arrived as."""
    import torch
    while True:
        t = q_in.get(timeout=60)
        if t is None:
            break
        t.detach().copy_(t.detach())        # writable: it owns its memory
        q_out.put((tensor_crc(t), str(t.dtype), tuple(t.shape), t.requires_grad,
                   isinstance(t, torch.nn.Parameter), t.is_contiguous()))
    q_out.put("done")
