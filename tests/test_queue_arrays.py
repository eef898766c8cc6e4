"""A numpy array put on its own travels as the ring's own array message, not
as a pickle (docs/design.md, R95): these tests attack that path across
processes (fork and spawn), with many producers and consumers, a bound in
items, batches, leases, a raw producer and hostile descriptors."""
import gc
import multiprocessing
import queue as pyqueue

import msgpack
import numpy as np
import pytest

import shmring
from shmring import layout as L
from shmring import queues as Q

import _queue_workers as W
from _procs import finish, start


def used(q):
    """Bytes the queue's ring holds once a small item went through (a reservation that
    committed short leaves its tail as a skip record until the next take passes it)."""
    q.put(0)
    assert q.get(timeout=5) == 0
    return q._ring.stats()["used"]


@pytest.fixture(params=["fork", "spawn"])
def ctx(request):
    return multiprocessing.get_context(request.param)


def test_which_arrays_are_sent_as_themselves():
    zoo = W.array_zoo()
    native = [Q._native(a) for a in zoo]
    # object dtype and the uint8 array that starts like an out-of-band item are pickled
    assert [i for i, n in enumerate(native) if not n] == [6, 12]
    assert not Q._native(np.ma.masked_array([1, 2], mask=[0, 1]))                  # a subclass
    assert not Q._native(np.array(["x"], dtype=np.dtypes.StringDType()))   # pointers into a private arena


@pytest.mark.parametrize("direction", ["child puts", "child gets"])
def test_the_array_zoo_comes_back_exactly(ctx, procs, direction):
    q, out = shmring.Queue(capacity=1 << 22), ctx.Queue()
    if direction == "child puts":
        p = start(procs, ctx, W.put_array_zoo, q)
        W.get_array_zoo(q, out)
    else:
        p = start(procs, ctx, W.get_array_zoo, q, out)
        W.put_array_zoo(q)
    assert out.get(timeout=120) == []
    assert finish(p) == 0
    assert q.qsize() == 0 and used(q) == 0


def test_arrays_and_pickled_items_in_one_stream_keep_order_and_checksums(ctx, procs):
    q, out = shmring.Queue(capacity=1 << 20), ctx.Queue()      # small: the ring wraps many times
    p = start(procs, ctx, W.put_checked_arrays, q, 1, 300, 7)
    c = start(procs, ctx, W.get_checked_arrays, q, out, 300)
    res = out.get(timeout=120)
    assert finish(p) == 0 and finish(c) == 0
    assert isinstance(res, tuple) and res[0] == 300, res


def test_many_producers_and_consumers_lose_and_duplicate_nothing(ctx, procs):
    q, out = shmring.Queue(capacity=1 << 20), ctx.Queue()
    n, producers, consumers = 150, 2, 2
    ps = [start(procs, ctx, W.put_self_checking, q, who, n) for who in range(producers)]
    cs = [start(procs, ctx, W.get_self_checking, q, out) for _ in range(consumers)]
    for p in ps:
        assert finish(p) == 0
    for _ in range(consumers - producers):
        q.put(None)
    results = [out.get(timeout=120) for _ in cs]
    for c in cs:
        assert finish(c) == 0
    assert all(isinstance(r, tuple) for r in results), results
    seen = [x for r in results for x in r[0]]
    assert sorted(seen) == [(w, i) for w in range(producers) for i in range(n)]     # each once
    for r in results:                                     # each producer's order, per consumer
        for w in range(producers):
            mine = [i for who, i in r[0] if who == w]
            assert mine == sorted(mine)
    assert sum(r[1] for r in results) == producers * len(range(0, n, 5))
    assert q.qsize() == 0


def test_a_gotten_array_is_a_writable_copy():
    q = shmring.Queue(capacity=1 << 20)
    a = np.arange(1000.0)
    q.put(a)
    q.put(a)
    a[:] = -1                              # put copied it: changing it after put changes nothing
    first, second = q.get(timeout=5), q.get(timeout=5)
    first[:] = 7                           # its own memory: the second item is untouched
    assert (second == np.arange(1000.0)).all() and second.flags.writeable and second.flags.owndata
    del first, second
    gc.collect()
    assert used(q) == 0


def test_maxsize_counts_arrays_like_any_item():
    q = shmring.Queue(2, capacity=1 << 20)
    q.put(np.ones(10))
    q.put(np.ones(10))
    with pytest.raises(pyqueue.Full):
        q.put_nowait(np.ones(10))
    assert q.qsize() == 2 and q.full()
    assert q.get(timeout=5).sum() == 10
    q.put_nowait(np.zeros(3))
    assert [x.sum() for x in (q.get(timeout=5), q.get(timeout=5))] == [10, 0]
    assert q.qsize() == 0


def test_a_full_ring_in_bytes_times_out_and_counts_nothing():
    q = shmring.Queue(capacity=1 << 16)
    q.put(np.ones(6000))                                     # 48 KB of 64 KiB
    with pytest.raises(pyqueue.Full):
        q.put(np.ones(6000), timeout=0.05)
    assert q.qsize() == 1
    assert q.get(timeout=5).sum() == 6000
    q.put(np.ones(6000), timeout=5)                          # room again
    assert q.qsize() == 1


def test_an_array_too_large_for_the_ring_says_so():
    q = shmring.Queue(capacity=1 << 16)
    with pytest.raises(shmring.MessageTooLarge, match=r"an item of 80000 bytes .*capacity="):
        q.put(np.ones(10000))
    assert q.qsize() == 0
    q.put("still fine")
    assert q.get(timeout=5) == "still fine"


def test_batches_mix_arrays_and_pickled_items():
    q = shmring.Queue(capacity=1 << 20)
    items = [np.arange(i * 100, dtype=np.int32) for i in range(20)] + [("t", i) for i in range(5)]
    q.put_many(items)
    got = []
    while len(got) < len(items):
        got += q.get_many(timeout=5)
    assert [type(x) for x in got] == [type(x) for x in items]
    for a, b in zip(items, got):
        assert (a == b).all() if isinstance(a, np.ndarray) else a == b
    assert q.qsize() == 0


def test_lease_of_an_array_is_a_read_only_view_holding_its_space():
    q = shmring.Queue(capacity=1 << 16)
    q.put(np.arange(4000.0))                                 # 32 KB of 64 KiB
    v = q.get(lease=True, timeout=5)
    assert not v.flags.writeable and v.sum() == np.arange(4000.0).sum()
    with pytest.raises(ValueError):
        v[0] = 1
    q.put(np.ones(3000))                                     # fits beside the held one
    with pytest.raises(pyqueue.Full):
        q.put(np.ones(3000), timeout=0.05)                   # the lease holds the rest
    assert q.get(timeout=5).sum() == 3000
    del v
    gc.collect()
    q.put(np.ones(6000), timeout=5)                          # released: room for 48 KB
    assert q.get(timeout=5).sum() == 6000
    assert used(q) == 0


def test_an_array_message_from_a_raw_producer_is_an_item():
    q = shmring.Queue(capacity=1 << 16)
    raw = q._ring.producer()
    raw.send(np.arange(64, dtype=np.uint8))                  # not from put: still a plain array
    raw.detach()
    q._add(L.Q_OFF_ITEMS, 1)
    got = q.get(timeout=5)
    assert got.dtype == np.uint8 and (got == np.arange(64)).all()
    assert q.qsize() == 0


@pytest.mark.parametrize("meta", [
    ["<f8", [1 << 40], "C", 0, 8],               # a shape far beyond the message
    ["<f8", [4], "C", 1 << 50, 32],              # data outside the message
    ["not a dtype", [1], "C", 0, 8],
    ["|O", [1], "C", 0, 8],                      # object pointers from another process
    ["<f8", [-1], "C", 0, 8],
    ["<f8", [2], "Z", 0, 16],
])
def test_a_hostile_array_descriptor_is_corrupt_segment_error_and_counted_out(meta):
    q = shmring.Queue(capacity=1 << 16)
    raw = q._ring.producer()
    assert raw._push_array(msgpack.packb(meta), np.zeros(8), L.T_ARRAY)
    raw.detach()
    q._add(L.Q_OFF_ITEMS, 1)
    with pytest.raises(shmring.CorruptSegmentError):
        q.get(timeout=5)
    assert q.qsize() == 0                                    # taken, as an item that fails to unpickle
    gc.collect()
    assert used(q) == 0                      # and released
    q.put(np.ones(5))
    assert q.get(timeout=5).sum() == 5
