"""Bench rows of issue 17 item 4 for torch tensors and pandas DataFrames (same run as every other row).

* ``shmring send(tensor)``: the numpy row's workload (a float32 array of N bytes) sent as
  ``torch.from_numpy(src)``; the consumer gets a tensor over the ring (``msg.value``) and
  reads its first / last element (or sums it).  Compared with ``shmring send(arr)`` (same
  GB/s is the target) and the ``torch.mp Queue`` peers of peer_cases.py.
* A 1 M-row DataFrame (4 numeric columns, 28 MB): ``shmring send(df)`` (Arrow IPC into the
  ring; the consumer gets a DataFrame, ``to_pandas()`` of the zero-copy table),
  ``shmring send(Table)`` (consumer gets the zero-copy ``pyarrow.Table``), against
  ``mp.Queue put(df)`` (pickled).
"""
from __future__ import annotations

import numpy as np

from .cases import CTX, LargeStream, ShmLargeSend, next_pow2


class ShmTorchLarge(ShmLargeSend):
    transport = "shmring send(tensor)"
    requires = ("shmring", "torch")

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        self.note = ("torch.from_numpy(arr) sent: one copy (producer), consumer " + ("sums" if summing else
                     "reads t[0], t[-1] (via t.numpy()) of") + " a zero-copy tensor (msg.value); one intra-op thread each side")

    def open(self, role, res):
        import torch
        torch.set_num_threads(1)
        ep = super().open(role, res)
        ep["torch"] = torch
        return ep

    def produce(self, ep, n):
        send = ep["h"].send
        src = self.src(ep)
        t = ep["torch"].from_numpy(src)
        for i in range(n):
            src[0] = i
            src[-1] = i
            send(t)

    def consume(self, ep, n):
        recv = ep["h"].recv
        bad = 0
        for i in range(n):
            with recv() as m:
                t = m.value
                # the check reads t's first and last element through t.numpy() (a view of the
                # same memory, as the array row reads a[0], a[-1]): torch's own scalar indexing
                # costs 42-48 us per message on the bench VM, the bench's check, not the transport
                a = t.numpy()
                if a[0] != i or a[-1] != i or (self.summing and t.sum() != self.count - 2 + 2 * i):
                    bad += 1
                del t, a
        return bad


ROWS = 1_000_000


def frame(rows: int = ROWS):
    import pandas as pd
    rng = np.random.default_rng(1)
    return pd.DataFrame({"i": np.zeros(rows, np.int64), "x": rng.random(rows), "y": rng.random(rows),
                         "k": rng.integers(0, 100, rows).astype(np.int32)})


class _Frames(LargeStream):
    """A DataFrame per message; the consumer checks column ``i``'s first and last row."""
    requires = ("pandas", "pyarrow")
    queue_ref = "mp.Queue put(df) (pickle)"
    shm_ref = "shmring send(df) -> DataFrame"

    def __init__(self):
        super().__init__(ROWS * 28)
        self.workload = "1M-row-DataFrame"
        self.n_warm, self.n_min = 2, 2

    def src_frame(self, ep):
        if "df" not in ep:
            ep["df"] = frame()
        return ep["df"]

    def bad_frame(self, df, i) -> bool:
        col = df["i"]
        return col.iloc[0] != i or col.iloc[-1] != i


class _ShmFrames(_Frames):
    capacity = next_pow2(4 * ROWS * 28)

    def setup(self):
        return ShmLargeSend._create(self.capacity)

    def cleanup(self, res):
        ShmLargeSend._destroy(res)

    def open(self, role, res):
        import pyarrow  # noqa: F401  (loaded: a Table / DataFrame is recognised when its module is)
        return ShmLargeSend.open(self, role, res)

    finish = ShmLargeSend.finish
    abandon = ShmLargeSend.abandon
    check_final = ShmLargeSend.check_final
    spin = ShmLargeSend.spin


class ShmFrameSend(_ShmFrames):
    transport = "shmring send(df) -> DataFrame"
    note = ("Table.from_pandas + IPC written into the ring (2 copies), consumer to_pandas() of the "
            "zero-copy table (1 copy)")

    def produce(self, ep, n):
        send, df = ep["h"].send, self.src_frame(ep)
        for i in range(n):
            df.iloc[[0, -1], 0] = i
            send(df)

    def consume(self, ep, n):
        recv = ep["h"].recv
        bad = 0
        for i in range(n):
            with recv() as m:
                bad += self.bad_value(m.value, i)      # the value is dropped before the block ends
        return bad

    def bad_value(self, df, i) -> bool:
        return self.bad_frame(df, i)


class ShmTableSend(ShmFrameSend):
    transport = "shmring send(Table.from_pandas(df)) -> Table"
    note = "Table.from_pandas + IPC written into the ring (2 copies), consumer reads the zero-copy Table"

    def produce(self, ep, n):
        import pyarrow as pa
        send, df = ep["h"].send, self.src_frame(ep)
        for i in range(n):
            df.iloc[[0, -1], 0] = i
            send(pa.Table.from_pandas(df, preserve_index=False))

    def bad_value(self, t, i) -> bool:
        col = t.column("i")
        return col[0].as_py() != i or col[-1].as_py() != i


class QueueFrame(_Frames):
    transport = "mp.Queue put(df) (pickle)"
    note = "pickled in a feeder thread, through a pipe, unpickled; pool of 8 frames, maxsize=4"
    requires = ("pandas",)

    def setup(self):
        return {"q": CTX.Queue(maxsize=4)}

    def cleanup(self, res):
        res["q"].close()

    def open(self, role, res):
        ep = {"q": res["q"]}
        if role == "a":                     # the feeder thread pickles later: as QueueLarge, a pool
            ep["pool"] = [frame() for _ in range(8)]   # of 8 frames, reused only after being received
        return ep

    def produce(self, ep, n):
        put, pool = ep["q"].put, ep["pool"]
        for i in range(n):
            df = pool[i % 8]
            df.iloc[[0, -1], 0] = i
            put(df)

    def consume(self, ep, n):
        get = ep["q"].get
        return sum(self.bad_frame(get(), i) for i in range(n))

    def abandon(self, role, ep):
        ep["q"].cancel_join_thread()


def large_cases(nbytes, summing):
    return [ShmTorchLarge(nbytes, summing)]


def frame_cases():
    return [ShmFrameSend(), ShmTableSend(), QueueFrame()]
