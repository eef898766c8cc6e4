"""Ring semantics in one process: order, wrap, limits, reservations, lifetimes, end of stream."""
import collections
import gc
import random
import threading
import time

import numpy as np
import pytest

import shmring
from shmring import layout as L

from _workers import payload, same_values

CAP = 1 << 12              # max message 4088 (capacity - 8: R60)


@pytest.fixture
def ring(ring_name):
    with shmring.Ring.create(ring_name, CAP) as r:
        yield r


@pytest.fixture
def pc(ring):
    """(producer, consumer) of a small ring."""
    with ring.producer() as p, ring.consumer() as c:
        yield p, c


def used(ring):
    return ring.stats()["used"]


def fill(p, size=100):
    """Fill the ring with ``size``-byte messages; return how many fit."""
    n = 0
    while p.try_send(bytes([n % 256]) * size):
        n += 1
    return n


# --------------------------------------------------------------------------- order, integrity, wrap

def test_messages_of_every_kind_arrive_in_order_and_intact(pc):
    p, c = pc
    sent = []
    for i in range(300):
        v = [payload(i), np.arange(i % 17, dtype="<i4") * i, {"i": i, "b": payload(i)[:5]}][i % 3]
        p.send(v)
        sent.append(v)
        if i % 5 == 4:
            for _ in range(5):
                want = sent.pop(0)
                with c.recv(timeout=1) as m:
                    v = m.value
                    if isinstance(want, bytes):
                        assert m.kind == "bytes" and bytes(v) == want
                    elif isinstance(want, np.ndarray):
                        assert m.kind == "array" and same_values(v, want)
                    else:
                        assert m.kind == "object" and v == want
                    del v
    assert c.try_recv() is None


def test_wrap_around_with_random_sizes_keeps_every_message_whole(pc, ring):
    p, c = pc
    rng = random.Random(7)
    pending = collections.deque()
    recvd = wraps = last_end = 0
    while recvd < 5000:
        for _ in range(rng.randrange(1, 12)):
            data = payload(len(pending) + recvd)[:rng.randrange(0, 301)] + rng.randbytes(rng.randrange(0, 1500))
            if not p.try_send(data):
                break
            pending.append(data)
        for _ in range(rng.randrange(1, 12)):
            m = c.try_recv()
            if m is None:
                break
            with m:
                assert m.position == last_end      # back to back: no padding record (R60)
                last_end = m.position + L.record_size(m.nbytes)
                if m.position // CAP != (last_end - 1) // CAP:
                    wraps += 1                     # this one ran over the end of the data area, whole
                assert m.tobytes() == pending.popleft()
            recvd += 1
    assert ring.stats()["write_pos"] > 100 * CAP          # wrapped many times
    assert wraps > 50                                     # and records crossed the wrap


def test_exact_contents_survive_wrap_with_messages_up_to_the_maximum(pc, ring):
    p, c = pc
    rng = random.Random(3)
    for i in range(2000):
        data = rng.randbytes(rng.choice([0, 1, 7, 8, 9, 63, 64, 65, 1000, ring.max_message]))
        p.send(data, timeout=1)
        assert c.recv_bytes(timeout=1) == data
    assert used(ring) == 0


# --------------------------------------------------------------------------- full ring and limits

def test_try_send_is_false_when_full_and_true_after_a_release(pc, ring):
    p, c = pc
    n = fill(p)
    assert n == CAP // 112                          # 112-byte records: 36 fit, 64 bytes stay free
    assert p.try_send(b"x" * 100) is False
    assert sum(p.try_send(b"") for _ in range(20)) == 8   # exactly eight 8-byte records fill those 64
    assert used(ring) == CAP
    with c.recv() as m:
        assert bytes(m.value) == bytes([0]) * 100
    assert p.try_send(b"y" * 100) is True
    got = [c.recv_bytes() for _ in range(n - 1 + 8 + 1)]
    assert got[:n - 1] == [bytes([i]) * 100 for i in range(1, n)]
    assert got[n - 1:] == [b""] * 8 + [b"y" * 100]
    assert c.try_recv() is None


def test_try_send_of_an_array_is_false_when_full(pc):
    p, c = pc
    fill(p)
    assert p.try_send(np.zeros(50, "u1")) is False
    c.recv_bytes()
    c.recv_bytes()
    assert p.try_send(np.zeros(50, "u1")) is True


def test_largest_message_fits_and_one_byte_more_is_message_too_large(pc, ring):
    p, c = pc
    assert ring.max_message == CAP - 8 == 4088
    big = bytes(range(256)) * 15 + bytes(248)
    assert len(big) == 4088
    for off in (0, 8, 1000, 2048, 3000, 4088):      # wherever in the ring the positions stand
        target = p.position + (off - p.position) % CAP
        while p.position < target:
            p.send(bytes(min(target - p.position, 2048, CAP - p.position % CAP) - 8))   # no padding
            c.recv_bytes()
        assert p.position % CAP == off and used(ring) == 0
        p.send(big, timeout=1)
        assert c.recv_bytes(timeout=1) == big
    with pytest.raises(shmring.MessageTooLarge) as ei:
        p.send(b"x" * 4089)
    assert isinstance(ei.value, ValueError) and "4088" in str(ei.value)
    with pytest.raises(shmring.MessageTooLarge):
        p.try_send(b"x" * 4089)
    with pytest.raises(shmring.MessageTooLarge):
        p.send(bytearray(4089))
    with pytest.raises(shmring.MessageTooLarge):
        p.send(memoryview(bytes(4089)))
    assert c.try_recv() is None                     # nothing was sent


def test_message_too_large_even_when_the_ring_is_empty_not_a_timeout(pc):
    p, _ = pc
    with pytest.raises(shmring.MessageTooLarge):
        p.send(b"x" * 5000, timeout=0.01)
    with pytest.raises(shmring.MessageTooLarge):
        p.send(np.zeros(5000, "u1"))
    with pytest.raises(shmring.MessageTooLarge):
        p.reserve(4089)
    with pytest.raises(shmring.MessageTooLarge):
        p.reserve_array((5000,), "u1")


def test_reserve_of_exactly_the_maximum_succeeds(pc, ring):
    p, c = pc
    with p.reserve(ring.max_message) as mv:
        mv[:] = b"m" * ring.max_message
    assert c.recv_bytes() == b"m" * ring.max_message


# --------------------------------------------------------------------------- reservations

def test_reserve_builds_a_bytes_message_in_place(pc):
    p, c = pc
    with p.reserve(10) as mv:
        assert isinstance(mv, memoryview) and not mv.readonly and len(mv) == 10
        mv[:5] = b"hello"
        mv[5:] = b", you"
        assert c.try_recv() is None                   # not visible before commit
    assert c.recv_bytes() == b"hello, you"
    with p.reserve(0):
        pass
    assert c.recv_bytes() == b""


def test_reserve_array_builds_an_array_in_place_and_freezes_it_on_commit(pc):
    p, c = pc
    with p.reserve_array((3, 4), "<f4") as out:
        assert out.flags.writeable and out.ctypes.data % 64 == 0
        out[...] = np.arange(12, dtype="<f4").reshape(3, 4)
        assert c.try_recv() is None
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0, 0] = 99
    with c.recv() as m:
        v = m.value
        assert v.dtype == np.dtype("<f4") and np.array_equal(v, np.arange(12).reshape(3, 4))
        del v


def test_reserve_array_in_fortran_order(pc):
    p, c = pc
    with p.reserve_array((2, 3), ">i8", order="F") as out:
        out[...] = [[1, 2, 3], [4, 5, 6]]
    with c.recv() as m:
        v = m.value
        assert v.flags.f_contiguous and not v.flags.c_contiguous and v.dtype == np.dtype(">i8")
        assert v.tolist() == [[1, 2, 3], [4, 5, 6]]
        del v


@pytest.mark.parametrize("how", ["reserve", "reserve_array"])
def test_exception_inside_a_reservation_aborts_it_and_sends_nothing(pc, ring, how):
    p, c = pc
    p.send(b"before")
    with pytest.raises(RuntimeError, match="boom"):
        if how == "reserve":
            with p.reserve(100) as mv:
                mv[:4] = b"junk"
                raise RuntimeError("boom")
        else:
            with p.reserve_array((10,), "<i8") as out:
                out[:] = 7
                raise RuntimeError("boom")
    p.send(b"after")
    assert c.recv_bytes() == b"before"
    assert c.recv_bytes() == b"after"
    assert c.try_recv() is None
    assert used(ring) == 0


def test_explicit_abort_sends_nothing_and_commit_after_abort_is_refused(pc):
    p, c = pc
    r = p.reserve(10)
    r.view[:] = b"0123456789"
    r.abort()
    with pytest.raises(shmring.HandleClosed):
        r.commit()
    assert c.try_recv() is None
    p.send(b"x")
    assert c.recv_bytes() == b"x"


def test_aborted_reservation_across_the_wrap_leaves_the_ring_consistent(pc, ring):
    p, c = pc
    for _ in range(2):
        p.send(b"a" * 1500)
        assert c.recv_bytes() == b"a" * 1500
    # 1072 bytes left before the end: a 1200-byte reservation runs over it (R60)
    with pytest.raises(KeyError):
        with p.reserve(1200) as mv:
            mv[:] = b"r" * 1200
            raise KeyError
    p.send(b"s" * 500)                              # where the aborted reservation was
    p.send(b"t" * 1200)                             # crosses the end of the data area
    assert c.recv_bytes() == b"s" * 500
    with c.recv() as m:
        assert m.position == 3024 + 512 and m.tobytes() == b"t" * 1200


def test_bad_reservation_arguments_are_value_errors(pc):
    p, c = pc
    for call in (lambda: p.reserve(-1), lambda: p.reserve_array((2, -1), "u1"),
                 lambda: p.reserve_array((2,), "u1", order="K"),
                 lambda: p.reserve_array((2,), np.dtype(("<f4", (3,))))):
        with pytest.raises(ValueError):
            call()
    p.send(b"ok")                                   # no reservation was left open
    assert c.recv_bytes() == b"ok"


def test_a_reservation_commits_once(pc):
    p, c = pc
    r = p.reserve(2)
    r.view[:] = b"hi"
    r.commit()
    with pytest.raises(shmring.HandleClosed):
        r.commit()
    with pytest.raises(shmring.HandleClosed):
        r.abort()
    assert c.recv_bytes() == b"hi" and c.try_recv() is None


def test_send_while_a_reservation_is_open_is_refused(pc):
    p, c = pc
    with p.reserve(4) as mv:
        mv[:] = b"resv"
        with pytest.raises(shmring.ShmringError):
            p.send(b"other")
        with pytest.raises(shmring.ShmringError):
            p.reserve(4)
    assert c.recv_bytes() == b"resv"
    assert c.try_recv() is None


def test_closing_the_producer_aborts_an_open_reservation(ring):
    p = ring.producer()
    with ring.consumer() as c:
        r = p.reserve(5)
        r.view[:] = b"never"
        p.close()
        with pytest.raises(shmring.EndOfStream):
            c.recv(timeout=1)


# --------------------------------------------------------------------------- end of stream

def test_consumer_drains_then_gets_end_of_stream(ring):
    with ring.consumer() as c:
        with ring.producer() as p:
            for i in range(3):
                p.send(payload(i + 8))
        assert [c.recv_bytes(timeout=1) for _ in range(3)] == [payload(i + 8) for i in range(3)]
        for call in (c.recv, c.recv_bytes, c.try_recv, lambda: c.recv(copy=True)):
            with pytest.raises(shmring.EndOfStream) as ei:
                call()
            assert isinstance(ei.value, EOFError)
        assert ring.stats()["closed"] == "eos"


def test_iteration_yields_every_message_then_stops_at_end_of_stream(ring):
    with ring.producer() as p:
        for i in range(20):
            p.send(i) if i % 2 else p.send(payload(i + 20))
    with ring.consumer() as c:
        got = []
        for m in c:
            with m:
                got.append(m.value if m.kind == "object" else m.tobytes())
    assert got == [i if i % 2 else payload(i + 20) for i in range(20)]


def test_end_of_stream_wakes_a_consumer_blocked_in_recv(ring):
    p = ring.producer()
    threading.Timer(0.2, p.close).start()
    with ring.consumer() as c, pytest.raises(shmring.EndOfStream):
        c.recv(timeout=30)


def test_producer_leaving_by_exception_makes_the_consumer_drain_then_get_peer_gone(ring):
    with ring.consumer() as c:
        with pytest.raises(ZeroDivisionError):
            with ring.producer() as p:
                p.send(b"one")
                p.send(b"two")
                1 / 0
        assert ring.stats()["closed"] == "aborted"
        assert c.recv_bytes() == b"one"
        assert c.recv_bytes() == b"two"
        with pytest.raises(shmring.PeerGone) as ei:
            c.recv(timeout=1)
        assert isinstance(ei.value, ConnectionError)


def test_iteration_ends_in_peer_gone_when_the_producer_aborted(ring):
    with pytest.raises(KeyError):
        with ring.producer() as p:
            p.send(b"only")
            raise KeyError
    got = []
    with ring.consumer() as c, pytest.raises(shmring.PeerGone):
        for m in c:
            got.append(m.tobytes())
    assert got == [b"only"]


def test_a_new_producer_on_a_closed_stream_is_refused(ring):
    ring.producer().close()
    with pytest.raises(shmring.HandleClosed, match="closed"):
        ring.producer()


def test_a_new_producer_on_an_aborted_stream_is_refused(ring):
    with pytest.raises(ValueError):
        with ring.producer():
            raise ValueError
    with pytest.raises(shmring.HandleClosed):
        ring.producer()


def test_detach_gives_up_the_role_without_ending_the_stream(ring):
    with ring.consumer() as c:
        p1 = ring.producer()
        p1.send(b"from p1")
        p1.detach()
        with pytest.raises(shmring.HandleClosed):
            p1.send(b"late")
        assert c.recv_bytes() == b"from p1"
        with pytest.raises(shmring.Timeout):               # no end of stream: only a detach
            c.recv(timeout=0.05)
        with ring.producer() as p2:
            p2.send(b"from p2")
        assert c.recv_bytes() == b"from p2"
        with pytest.raises(shmring.EndOfStream):
            c.recv()


# --------------------------------------------------------------------------- receive paths

def test_recv_bytes_on_an_array_raises_type_error_and_does_not_consume_it(pc):
    p, c = pc
    p.send(np.arange(4, dtype="u1"))
    p.send(b"next")
    with pytest.raises(TypeError, match="not bytes"):
        c.recv_bytes()
    with pytest.raises(TypeError):
        c.recv_bytes(timeout=1)
    with c.recv() as m:
        assert m.kind == "array"
        v = m.value
        assert v.tolist() == [0, 1, 2, 3]
        del v
    assert c.recv_bytes() == b"next"


def test_recv_bytes_on_an_object_message_does_not_consume_it(pc):
    p, c = pc
    p.send({"k": 1})
    with pytest.raises(TypeError):
        c.recv_bytes()
    assert c.recv(copy=True) == {"k": 1}


def test_message_metadata_describes_the_payload(pc):
    p, c = pc
    p.send(b"12345")
    with c.recv() as m:
        assert (m.kind, m.nbytes, m.tobytes(), m.released) == ("bytes", 5, b"12345", False)
    assert m.released


def test_recv_copy_true_releases_at_once(pc, ring):
    p, c = pc
    p.send(np.ones(100))
    got = c.recv(copy=True)
    assert used(ring) == 0 and got.flags.writeable and got.sum() == 100


# --------------------------------------------------------------------------- release and lifetimes

def test_out_of_order_release_advances_space_only_over_the_released_prefix(pc, ring):
    p, c = pc
    for i in range(3):
        p.send(bytes([i]) * 100)
    m0, m1, m2 = c.recv(), c.recv(), c.recv()
    assert ring.stats()["read_pos"] == 0
    m2.release()
    m1.release()
    assert ring.stats()["read_pos"] == 0                   # m0 still holds the prefix
    assert used(ring) == 3 * 112
    assert m0.tobytes() == bytes([0]) * 100
    m0.release()
    assert ring.stats()["read_pos"] == 3 * 112 and used(ring) == 0


def test_out_of_order_release_keeps_the_producer_waiting_until_the_prefix_is_free(pc, ring):
    p, c = pc
    n = fill(p, 200)
    held = [c.recv() for _ in range(n)]
    for m in held[1:]:
        m.release()
    assert p.try_send(b"z" * 200) is False              # the first message still pins the ring
    assert held[0].tobytes() == bytes([0]) * 200        # and its bytes are intact
    held[0].release()
    assert p.try_send(b"z" * 200) is True


def test_recv_bytes_behind_an_outstanding_message_does_not_free_its_space(pc, ring):
    p, c = pc
    p.send(b"a" * 100)
    p.send(b"b" * 100)
    m = c.recv()
    assert c.recv_bytes() == b"b" * 100
    assert ring.stats()["read_pos"] == 0
    m.release()
    assert used(ring) == 0


def test_a_dropped_message_is_released_automatically_once_read(pc, ring):
    p, c = pc
    p.send(b"x" * 100)
    c.recv()                                            # never bound, never read: handed out again (R39)
    assert used(ring) == 112 and c.pending == 0
    m = c.recv()
    assert m.tobytes() == b"x" * 100                    # read: now a drop releases it
    del m
    assert used(ring) == 0
    p.send(b"y" * 100)
    m = c.recv()
    assert used(ring) == 112
    assert bytes(m.value) == b"y" * 100
    del m
    assert used(ring) == 0


def test_iteration_without_with_releases_each_previous_message(ring):
    with ring.producer() as p:
        for i in range(30):
            p.send(bytes([i]) * 100)
    with ring.consumer() as c:
        n = 0
        for m in c:
            assert m.tobytes() == bytes([n]) * 100
            n += 1
        del m
    assert n == 30 and used(ring) == 0


def test_value_after_release_raises_handle_closed(pc):
    p, c = pc
    p.send(b"abc")
    p.send(np.arange(3))
    for _ in range(2):
        with c.recv() as m:
            pass
        for access in (lambda: m.value, m.copy, m.tobytes):
            with pytest.raises(shmring.HandleClosed):
                access()
        with pytest.raises(BufferError):
            memoryview(m)
        m.release()                                      # idempotent


@pytest.mark.parametrize("escape", ["memoryview", "frombuffer", "array", "array-slice", "object-array"])
def test_escaped_view_warns_and_holds_the_space_until_it_is_collected(ring, escape):
    with ring.producer() as p, ring.consumer() as c:
        value = {"memoryview": b"e" * 1000, "frombuffer": b"f" * 1000,
                 "array": np.full(125, 7, "<i8"), "array-slice": np.full(125, 7, "<i8"),
                 "object-array": {"a": np.full(125, 7, "<i8")}}[escape]
        p.send(value)
        with pytest.warns(shmring.EscapedViewWarning, match="still alive"):
            with c.recv() as m:
                v = m.value
                view = {"memoryview": lambda: v, "frombuffer": lambda: np.frombuffer(v, np.uint8),
                        "array": lambda: v, "array-slice": lambda: v[10:20],
                        "object-array": lambda: v["a"]}[escape]()
                del v
        assert m.released
        held = used(ring)
        assert held > 1000
        held_fill = fill(p, 500)                           # 504-byte records
        pinned = used(ring)
        snapshot = bytes(memoryview(view).cast("B"))
        while (x := c.try_recv()) is not None:           # drain what fill() sent
            x.release()
        assert used(ring) == pinned                        # nothing freed behind the live view
        assert bytes(memoryview(view).cast("B")) == snapshot   # and never overwritten
        del view
        gc.collect()
        assert used(ring) == 0                             # released once the view died
        assert fill(p, 500) >= 7 > held_fill               # the producer reuses the space


def test_keeping_only_a_copy_does_not_warn(pc, ring):
    p, c = pc
    p.send(np.arange(10))
    with c.recv() as m:
        kept = m.copy()
    assert used(ring) == 0 and kept.sum() == 45


def test_consumer_closed_with_unreleased_messages_hands_them_to_the_next_consumer(ring):
    with ring.producer() as p:
        for i in range(5):
            p.send(payload(100 + i))
    c1 = ring.consumer()
    assert c1.recv_bytes() == payload(100)
    m = c1.recv()                                        # received, not released
    assert m.tobytes() == payload(101)
    c1.close()
    with ring.consumer() as c2:
        assert [c2.recv_bytes() for _ in range(4)] == [payload(100 + i) for i in range(1, 5)]
        m.release()                                      # the old handle's release changes nothing
        with pytest.raises(shmring.EndOfStream):
            c2.recv()


# --------------------------------------------------------------------------- closed handles

def test_send_after_close_raises_handle_closed(ring):
    p = ring.producer()
    p.close()
    p.close()                                             # idempotent
    for call in (lambda: p.send(b"x"), lambda: p.try_send(b"x"), lambda: p.send(np.zeros(2)),
                 lambda: p.reserve(3), lambda: p.reserve_array((2,), "u1")):
        with pytest.raises(shmring.HandleClosed):
            call()


def test_recv_after_consumer_close_raises_handle_closed(ring):
    c = ring.consumer()
    c.close()
    c.close()
    for call in (c.recv, c.try_recv, c.recv_bytes):
        with pytest.raises(shmring.HandleClosed):
            call()


def test_stats_and_handles_of_a_closed_ring(ring_name):
    ring = shmring.Ring.create(ring_name, CAP)
    ring.close()
    assert ring.closed
    with pytest.raises(shmring.HandleClosed):
        ring.stats()
    with pytest.raises(shmring.HandleClosed):
        ring.producer()
    with pytest.raises(shmring.HandleClosed):
        ring.consumer()


def test_handles_keep_working_after_the_ring_object_is_closed(ring_name):
    ring = shmring.Ring.create(ring_name, CAP)
    p, c = ring.producer(), ring.consumer()
    ring.close()
    p.send(b"still mapped")
    assert c.recv_bytes(timeout=1) == b"still mapped"
    p.close()
    c.close()


def test_blocking_calls_after_the_ring_object_is_closed_time_out_instead_of_crashing(ring_name):
    # Handles outlive ring.close() (the mapping stays while they live), so a wait
    # longer than one liveness slice (0.1 s) must end in Timeout, not AttributeError.
    ring = shmring.Ring.create(ring_name, CAP)
    p, c = ring.producer(), ring.consumer()
    ring.close()
    with pytest.raises((shmring.Timeout, shmring.HandleClosed)):
        c.recv(timeout=0.3)
    fill(p)
    with pytest.raises((shmring.Timeout, shmring.HandleClosed)):
        p.send(b"x" * 100, timeout=0.3)


def test_producer_close_after_the_ring_object_is_closed_still_ends_the_stream(ring_name):
    ring = shmring.Ring.create(ring_name, CAP)
    p = ring.producer()
    p.send(b"last")
    ring.close()
    p.close()
    with shmring.Ring.attach(ring_name) as other:
        s = other.stats()
        assert s["producer"]["pid"] is None                # role given back
        assert s["closed"] == "eos"                        # and end of stream recorded
        with other.consumer() as c:
            assert c.recv_bytes() == b"last"
            with pytest.raises(shmring.EndOfStream):
                c.recv(timeout=1)


# --------------------------------------------------------------------------- roles in one process

def test_role_handles_refuse_to_be_pickled_but_the_ring_pickles(ring):
    import pickle
    with ring.producer() as p, ring.consumer() as c:
        for h in (p, c):
            with pytest.raises(TypeError, match="pickle"):
                pickle.dumps(h)
    assert pickle.loads(pickle.dumps(ring)).capacity == CAP


def test_second_producer_in_the_same_process_is_refused_with_holder_pid(ring):
    import os
    with ring.producer():
        with pytest.raises(shmring.RoleTaken) as ei:
            ring.producer()
        assert ei.value.pid == os.getpid()
        assert str(os.getpid()) in str(ei.value)
    with ring.consumer():
        with pytest.raises(shmring.RoleTaken):
            ring.consumer()


def test_a_dropped_producer_handle_can_be_taken_back_by_the_same_process(ring):
    with ring.consumer() as c:
        p = ring.producer()
        p.send(b"first")
        del p
        gc.collect()
        with ring.producer() as p2:
            p2.send(b"second")
        assert c.recv_bytes() == b"first" and c.recv_bytes() == b"second"
        assert ring.stats()["producer"]["sessions"] == 2


def test_role_handles_used_from_another_attachment_share_one_ring(ring):
    other = shmring.Ring.attach(ring.name)
    try:
        with ring.producer() as p, other.consumer() as c:
            with pytest.raises(shmring.RoleTaken):
                other.producer()
            p.send(b"across attachments")
            assert c.recv_bytes() == b"across attachments"
    finally:
        other.close()


# --------------------------------------------------------------------------- blocking and timeouts

def test_recv_on_an_empty_ring_times_out(pc):
    _, c = pc
    for call in (lambda: c.recv(timeout=0.05), lambda: c.recv_bytes(timeout=0.05),
                 lambda: c.recv(timeout=0), lambda: c.recv(copy=True, timeout=0.05)):
        with pytest.raises(shmring.Timeout) as ei:
            call()
        assert isinstance(ei.value, TimeoutError)


def test_send_on_a_full_ring_times_out_and_sends_nothing(pc, ring):
    p, c = pc
    n = fill(p)
    for call in (lambda: p.send(b"x" * 100, timeout=0.05), lambda: p.send(np.zeros(100, "u1"), timeout=0.05),
                 lambda: p.send(memoryview(b"x" * 100), timeout=0), lambda: p.reserve(100, timeout=0.05),
                 lambda: p.reserve_array((100,), "u1", timeout=0.05)):
        with pytest.raises(shmring.Timeout):
            call()
    assert [c.recv_bytes() for _ in range(n)] == [bytes([i % 256]) * 100 for i in range(n)]
    assert c.try_recv() is None


@pytest.mark.parametrize("bad", [-1, -0.001, float("nan")])
def test_negative_or_nan_timeout_is_a_value_error_when_the_call_would_block(pc, bad):
    p, c = pc
    with pytest.raises(ValueError):
        c.recv(timeout=bad)
    with pytest.raises(ValueError):
        c.recv_bytes(timeout=bad)
    fill(p)
    with pytest.raises(ValueError):
        p.send(b"x" * 100, timeout=bad)


def test_negative_timeout_is_a_value_error_even_when_the_call_would_not_block(pc):
    # Argument checking must not depend on the ring's state: otherwise code that
    # passes a bad timeout works while messages flow and fails when the ring runs dry.
    p, c = pc
    with pytest.raises(ValueError):
        p.send(b"x", timeout=-1)
    assert c.try_recv() is None
    p.send(b"y")
    with pytest.raises(ValueError):
        c.recv(timeout=-1)
    with pytest.raises(ValueError):
        c.recv_bytes(timeout=-1)
    assert c.recv_bytes() == b"y"


def test_blocked_send_resumes_when_another_thread_releases_space(pc):
    p, c = pc
    n = fill(p, 200)

    def drain_later():
        time.sleep(0.2)
        for _ in range(3):
            c.recv_bytes(timeout=5)
    t = threading.Thread(target=drain_later)
    t.start()
    p.send(b"w" * 200, timeout=30)
    t.join()
    got = [c.recv_bytes(timeout=1) for _ in range(n - 3 + 1)]
    assert got[-1] == b"w" * 200 and got[0] == bytes([3]) * 200


def test_blocked_recv_resumes_when_another_thread_sends(pc):
    p, c = pc
    threading.Timer(0.2, lambda: p.send(b"late")).start()
    assert c.recv_bytes(timeout=30) == b"late"


def test_stats_report_positions_roles_and_state(ring):
    import os
    with ring.producer() as p, ring.consumer() as c:
        p.send(b"x" * 8)
        s = ring.stats()
        assert (s["name"], s["kind"], s["capacity"]) == (ring.name, "spsc", CAP)
        assert (s["write_pos"], s["read_pos"], s["used"], s["closed"]) == (16, 0, 16, None)
        assert s["fill"] == 16 / CAP
        assert s["producer"] == {"pid": os.getpid(), "alive": True, "sessions": 1}
        assert s["consumer"]["pid"] == os.getpid()
        c.recv_bytes()
    s = ring.stats()
    assert s["producer"]["pid"] is None and s["consumer"]["pid"] is None and s["closed"] == "eos"
