"""Re-attach and restart: processes that died are replaced by new ones that
attach by name (or path) and continue; a file-backed ring outlives every
process and resumes with nothing lost.  Also what Ring.flush() does."""
import os

import pytest

import shmring

from _workers import tagged
import _fault_workers as W
from _kit import CTX, SOON, kill, spawn


def _crash_both_roles(kids, name, path, k, release, hold):
    """A producer process commits tagged(0..k-1); a consumer process releases
    ``release`` of them and holds ``hold``; both are SIGKILLed."""
    ready, pq, cq = CTX.Event(), CTX.Queue(), CTX.Queue()
    prod = spawn(kids, W.produce_then_stop, name, k, "before_claim", ready, pq, path)
    assert ready.wait(SOON) and pq.get(timeout=SOON) == k
    cons = spawn(kids, W.consume_and_hold, name, release, hold, cq, path)
    assert cq.get(timeout=SOON) == list(range(release, release + hold))
    kill(prod)
    kill(cons)


def _resume(kids, name, path, first, count):
    """New consumer and producer processes attach and finish the stream."""
    q = CTX.Queue()
    c = spawn(kids, W.consume_all_from, name, q, path)
    p = spawn(kids, W.produce, name, first, count, path)
    res = q.get(timeout=SOON)
    p.join(SOON)
    c.join(SOON)
    assert p.exitcode == 0 and c.exitcode == 0
    assert res["error"] is None, res["error"]
    assert res["bad"] == []
    return res["seqs"]


def test_a_file_ring_survives_the_death_of_every_process_and_resumes_with_no_loss(tmp_path, kids):
    path = str(tmp_path / "durable.ring")
    shmring.Ring.create(path=path, capacity=1 << 12).close()     # this process never attaches again
    _crash_both_roles(kids, None, path, k=10, release=4, hold=2)
    assert os.path.exists(path)                                  # nothing attached now: only the file
    seqs = _resume(kids, None, path, first=10, count=300)
    # every unreleased message (the 2 held, then the 4 never received) comes again, nothing released does
    assert seqs == list(range(4, 310))
    with shmring.Ring.attach(path=path) as ring:
        st = ring.stats()
        assert st["producer"]["sessions"] == 2 and st["consumer"]["sessions"] == 2
        assert st["closed"] == "eos" and st["read_pos"] == st["write_pos"]
    shmring.unlink(path=path)


def test_a_posix_ring_is_continued_by_replacement_processes_attaching_by_name(ring_name, kids):
    shmring.Ring.create(ring_name, 1 << 12).close()              # created and left: it has no owner
    _crash_both_roles(kids, ring_name, None, k=8, release=8, hold=0)
    assert _resume(kids, ring_name, None, first=8, count=200) == list(range(8, 208))


def test_flush_writes_the_file_and_is_harmless_on_a_posix_ring(tmp_path, ring_name):
    path = tmp_path / "f.ring"
    with shmring.Ring.create(path=path, capacity=1 << 12) as ring, ring.producer() as prod:
        prod.send(tagged(7))
        ring.flush()
        with open(path, "rb") as f:                  # read(2) goes through the same page cache
            assert tagged(7) in f.read()
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        ring.flush()
    with pytest.raises(shmring.HandleClosed):
        ring.flush()
