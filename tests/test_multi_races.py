"""Issue 12: the multi-party recovery paths, driven through their bad interleavings.

Each test stops one party between two protocol steps and runs another party's
step there, in one process: a proxy on the tables' word accessors
(``Interleave``) runs the other party's step right after a chosen load, or a
``shmring.pausepoints`` hook does at a named point.  Every test asserts the
right outcome (nothing lost, duplicated or refused wrongly); each failed on
the code before its fix (the docstring says how).
"""
import os
import subprocess
import sys
import time

import pytest

import shmring
from shmring import layout as L


def dead_owner_word() -> int:
    """An owner word naming a process that has exited (pid reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return L.owner_word(p.pid, 12345)


class Interleave:
    """Stands in for a Tables' region: at the ``nth`` access of word ``off``,
    run ``step()`` once: right after a load (the value already read), or
    right before a CAS or a store (the other party got there first)."""

    def __init__(self, region, off: int, step, nth: int = 1):
        self._r, self._off, self._step, self._left = region, off, step, nth
        self.ran = False

    def _touch(self, off):
        if off == self._off and not self.ran:
            self._left -= 1
            if self._left == 0:
                self.ran = True
                self._step()

    def load_u64(self, off):
        v = self._r.load_u64(off)
        self._touch(off)
        return v

    def cas_u64(self, off, expected, desired):
        self._touch(off)
        return self._r.cas_u64(off, expected, desired)

    def store_u64(self, off, value):
        self._touch(off)
        return self._r.store_u64(off, value)

    def __getattr__(self, name):
        return getattr(self._r, name)


def test_a_producer_cannot_join_after_a_consumer_saw_the_end(ring_name):
    """Case 4.  Before: join_producer decided "not ended" from one load of the
    state word and CASed a value loaded later, so a producer whose join
    straddled the end joined a finished stream and its messages were lost.
    Here the last producer closes and the consumer sees the end while a
    joiner holds its entry, not yet joined: the joiner is refused."""
    from shmring import pausepoints
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpsc") as ring:
        p1, c = ring.producer(), ring.consumer()
        p1.send(b"last")
        seen = []

        def the_end(where):
            if where != "producer_claimed" or seen:
                return
            p1.close()
            seen.append(c.recv_bytes(timeout=1))
            with pytest.raises(shmring.EndOfStream):
                c.recv_bytes(timeout=0)
            seen.append("end")
        pausepoints.hook = the_end
        try:
            with pytest.raises(shmring.HandleClosed, match="has ended"):
                ring.producer()
        finally:
            pausepoints.hook = None
        assert seen == [b"last", "end"]
        with pytest.raises(shmring.EndOfStream):
            c.recv_bytes(timeout=0)
        assert ring.stats()["producer_sessions"] == 1
        assert all(p["pid"] is None for p in ring.stats()["producers"])   # the refused joiner gave its entry back


def test_the_end_is_not_seen_while_a_producer_is_between_its_entry_and_its_join(ring_name):
    """Case 4, R37: a joiner has marked its entry joined (R36) and read the
    state word; the last other producer closes then.  The consumer must not
    see the end (the joiner's messages would be lost): the join goes
    through, its message arrives, and the end comes when it closes."""
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpsc") as ring:
        p1, c = ring.producer(), ring.consumer()
        p1.send(b"last")
        t = ring._tables
        seen = []

        def the_last_one_closes():
            t.region = real
            p1.close()
            seen.append(c.recv_bytes(timeout=1))
            with pytest.raises(shmring.Timeout):
                c.recv_bytes(timeout=0.05)
            seen.append("no end")
        real = t.region
        t.region = proxy = Interleave(real, L.MP_OFF_PRODUCERS + L.MP_STATE, the_last_one_closes)
        try:
            p2 = ring.producer()
        finally:
            t.region = real
        assert proxy.ran and seen == [b"last", "no end"]
        p2.send(b"late")
        assert c.recv_bytes(timeout=1) == b"late"
        p2.close()
        with pytest.raises(shmring.EndOfStream):
            c.recv_bytes(timeout=1)
        assert ring.stats()["producer_sessions"] == 2


def test_a_join_between_the_consumers_end_scan_and_its_seal_makes_the_seal_fail(ring_name):
    """R37: the consumer has scanned the producer entries (none joined, the
    session done) and is about to seal the end; a producer joins right then.
    The seal's CAS fails (the join moved the word it was loaded from), so the
    consumer does not report the end, and the new producer's message arrives."""
    from shmring import _core
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpsc") as ring:
        p1, c = ring.producer(), ring.consumer()
        p1.close()
        late = []

        def join_now(handle, where):
            if where == "end_scanned" and handle is c and not late:
                late.append(ring.producer())
        _core._set_pause_hook(join_now)
        try:
            with pytest.raises(shmring.Timeout):
                c.recv_bytes(timeout=0.05)
        finally:
            _core._set_pause_hook(None)
        assert len(late) == 1
        assert not ring.stats()["closed"]
        late[0].send(b"after the scan")
        assert c.recv_bytes(timeout=1) == b"after the scan"
        late[0].close()
        with pytest.raises(shmring.EndOfStream):
            c.recv_bytes(timeout=1)


def _abandon(ring, p):
    """Make producer handle p look like a producer that died holding its claim."""
    line = ring._tables.pline(p._slot)
    ring._region.store_u64(line + L.PE_OWNER, dead_owner_word())


def test_an_abandoned_claim_skip_never_covers_a_claim_made_during_the_scan(ring_name):
    """Case 2.  Before: the consumer scanned the producers' intents, then C
    re-loaded the claim cursor to bound the skip; a claim made in between was
    inside the skip and its committed message was lost."""
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpsc", producers=2) as ring:
        c = ring.consumer()
        dead = ring.producer()
        hole = dead.reserve(40)                 # claimed, never committed: its producer "dies"
        live = ring.producer()
        _abandon(ring, dead)
        t = ring._tables
        late = []

        def claim_now():
            late.append(live.reserve(8))        # a claim after the intents were scanned
        real = t.region
        last_intent = t.pline(t.maxp - 1) + L.PE_INTENT
        t.region = proxy = Interleave(real, last_intent, claim_now)
        try:
            assert c.try_recv() is None
            t.skip_abandoned(c, {c._stuck(): time.monotonic() - 10})
        finally:
            t.region = real
        assert proxy.ran
        late[0].view[:] = b"survives"
        late[0].commit()
        assert c.recv_bytes(timeout=1) == b"survives"
        assert ring.stats()["abandoned"] == 1
        del hole


def test_a_dead_producers_intent_does_not_outlive_its_entry(ring_name):
    """Case 3.  Before: a live process that took over a dead producer's table
    entry kept the dead one's intent word, so the hole it left looked "being
    written" by a live producer and was never skipped."""
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpsc", max_producers=1, producers=2) as ring:
        c = ring.consumer()
        dead = ring.producer()
        hole = dead.reserve(40)                 # kept: a reservation dropped open is aborted  # noqa: F841
        _abandon(ring, dead)
        dead._mark_closed()                     # this handle is "gone" with its process
        heir = ring.producer()                  # takes over the one entry
        assert heir._slot == dead._slot
        assert c.try_recv() is None
        ring._tables.skip_abandoned(c, {c._stuck(): time.monotonic() - 10})
        assert ring.stats()["abandoned"] == 1          # skipped without waiting for the heir to send
        heir.send(b"after the hole")
        assert c.recv_bytes(timeout=1) == b"after the hole"
        assert ring.stats()["abandoned"] == 1


@pytest.mark.parametrize("kind", ["mpsc", "broadcast", "mpmc"])
def test_wait_is_not_ready_for_an_aborted_reservation(ring_name, kind):
    """Case 11.  Before: the T_SKIP record an abort leaves counted as a
    message: wait([c], 0) said ready while try_recv() returned None."""
    with shmring.Ring.create(ring_name, 1 << 14, kind=kind) as ring:
        c = ring.subscribe() if kind == "broadcast" else ring.consumer()
        p = ring.producer()
        p.reserve(16).abort()
        assert shmring.wait([c], timeout=0) == []
        assert c.try_recv() is None
        p.send(b"real")
        assert shmring.wait([c], timeout=0) == [c]
        assert c.recv_bytes(timeout=0) == b"real"


def test_an_idle_mpmc_recv_sleeps_on_a_stale_requeued_counter(ring_name):
    """Case 13.  Before: a non-zero "requeued" counter with nothing requeued
    (a hostile write, or a consumer killed between its two steps) made every
    wait return at once: an idle recv() spun at 100% CPU."""
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpmc") as ring:
        c = ring.consumer()
        ring.producer()
        ring._region.store_u64(L.MP_OFF_COUNTERS + L.MP_REQUEUED, 3)
        cpu0, t0 = time.process_time(), time.monotonic()
        with pytest.raises(shmring.Timeout):
            c.recv(timeout=0.6)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        assert wall >= 0.55 and cpu < 0.25, (cpu, wall)


def test_an_mpmc_requeue_never_takes_a_record_from_a_consumer_that_joined_during_it(ring_name):
    """Cases 1 and 6b.  Before: the requeue of dead consumers' records read the
    consumer table, then walked the records in flight; a consumer that joined
    a free entry in between and took a record looked like a departed owner, so
    its record was requeued and delivered twice (seen as redelivered=1 with
    nobody dead, 5 runs of 6, with 20 consumers on 2 cores)."""
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpmc", max_consumers=4) as ring:
        p = ring.producer()
        a = ring.consumer()                             # entry 0: the one that recovers
        for m in (b"m0", b"m1", b"m2"):
            p.send(m)
        t = ring._tables
        held = []

        def join_and_take():
            t.region = real
            c2 = ring.consumer()                        # the free entry 1
            assert c2._slot == 1
            held.append(c2)
            held.append(c2.recv(timeout=1))             # takes m0 and holds it
        real = t.region
        t.region = proxy = Interleave(real, t.cline(1) + L.CE_OWNER, join_and_take)
        try:
            a._eos_ready()                              # the requeue pass
        finally:
            t.region = real
        assert proxy.ran
        c2, msg = held
        assert msg.tobytes() == b"m0"
        assert [a.recv_bytes(timeout=1), a.recv_bytes(timeout=1)] == [b"m1", b"m2"]
        assert a.try_recv() is None                     # m0 was not handed to anybody else
        msg.release()
        assert ring.stats()["redelivered"] == 0
        c2.close()


def test_dropping_a_dead_subscriber_never_touches_a_new_subscribers_position(ring_name):
    """Case 6a.  Before: drop_subscriber checked the owner word, then stored
    FREE into the position word, then CASed the owner; a second dropper and a
    new subscriber in between got the new subscriber's position overwritten
    (FREE, then the dead one's old position), so the producer stopped gating
    on it and could overwrite records it was reading."""
    with shmring.Ring.create(ring_name, 1 << 14, kind="broadcast") as ring:
        p = ring.producer()
        gone = ring.subscribe()
        i, dead = gone._slot, dead_owner_word()
        t = ring._tables
        line = t.cline(i)
        ring._region.store_u64(line + L.CE_OWNER, dead)
        gone._mark_closed()
        for m in (b"a", b"b", b"c"):
            p.send(m)
        newcomer = []

        def other_dropper_then_join():
            t.region = real
            assert t.drop_subscriber(i, dead)
            newcomer.append(ring.subscribe("newest"))
        real = t.region
        t.region = proxy = Interleave(real, line + L.CE_OWNER, other_dropper_then_join)
        try:
            assert not t.drop_subscriber(i, dead)
        finally:
            t.region = real
        assert proxy.ran
        (s,) = newcomer
        assert s._slot == i
        assert ring._region.load_u64(line + L.CE_POS) & L.POS_MASK == s.position > 0
        assert s.recv_bytes(timeout=1) == b"c"
        assert ring.stats()["dropped"] == 1


@pytest.mark.parametrize("kind", ["mpsc", "mpmc"])
def test_attaching_a_producer_to_a_ring_others_keep_moving_is_not_corruption(ring_name, kind):
    """Case 7a.  Before: a producer attaching read the claim cursor, then the
    release position; producers and consumers moving both in between made a
    consistent ring look corrupt ("positions out of order").  The C pause point
    "positions" runs here between the attach's first and second position
    reads: the other parties send and receive a whole ring's worth.  (Shown
    failing by placing the same pause point between the old code's two loads.)"""
    from shmring import _core
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind) as ring:
        p, c = ring.producer(), ring.consumer()
        moved = []

        def others_move(handle, where):
            if where == "positions" and not moved:
                moved.append(True)
                for _ in range(3):
                    for _ in range(ring.capacity // 64):
                        p.send(b"x" * 16)
                    while c._try_recv_bytes() is not None:
                        pass
        _core._set_pause_hook(others_move)
        try:
            second = ring.producer()
        finally:
            _core._set_pause_hook(None)
        assert moved
        second.send(b"fine")
        assert c.recv_bytes(timeout=1) == b"fine"


def _sleep_forever(name, kind):
    """A child: take a table entry and sleep on the ring's futex (spin=0)."""
    ring = shmring.Ring.attach(name)
    if kind == "mpsc":                          # a producer asleep on a full ring
        p = ring.producer(spin=0)
        while p.try_send(b"x" * 100):
            pass
        p.send(b"x" * 100, timeout=60)
    else:                                       # a subscriber / consumer asleep on an empty ring
        c = ring.subscribe(spin=0) if kind == "broadcast" else ring.consumer(spin=0)
        c.recv(timeout=60)


@pytest.mark.parametrize("kind", ["mpsc", "broadcast", "mpmc"])
def test_a_party_killed_asleep_leaves_no_waiter_count_behind(ring_name, kind):
    """Case 12.  Before: a party SIGKILLed while asleep on the futex left the
    shared waiter count raised forever, so every later commit (or release)
    paid a spare futex_wake syscall."""
    import multiprocess
    import signal
    with shmring.Ring.create(ring_name, 1 << 12, kind=kind, producers=2 if kind == "mpsc" else None) as ring:
        keep = ring.consumer() if kind == "mpsc" else ring.producer()
        wake = L.OFF_SPACE_WAKE if kind == "mpsc" else L.OFF_DATA_WAKE
        child = multiprocess.get_context("fork").Process(target=_sleep_forever, args=(ring_name, kind))
        child.start()
        try:
            deadline = time.monotonic() + 10
            while ring._region.load_u32(wake + L.WAKE_WAITERS) != 1:
                assert time.monotonic() < deadline, "the child never went to sleep"
                time.sleep(0.01)
            time.sleep(0.05)
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
            t = ring._tables
            if kind == "mpsc":
                t.reap_producers()
            elif kind == "broadcast":
                t.police_subscribers({})
            else:
                keep2 = ring.consumer()
                keep2._eos_ready()
            assert ring._region.load_u32(wake + L.WAKE_WAITERS) == 0
        finally:
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
            child.join(10)


def test_an_mpmc_taker_stalled_past_a_requeue_and_a_lap_does_not_mark_the_newer_record(ring_name):
    """Case 5.  Before: the 16-bit record state has no lap in it; a taker
    stalled between its take CAS and its state CAS for longer than the grace
    period plus a lap (its take requeued and redelivered, the ring gone round)
    marked the next lap's record at the same address: that record was lost,
    and the taker got it with the old record's length.  The C pause point
    "mpmc_taken" stalls the taker there while the others do all that."""
    from shmring import _core
    with shmring.Ring.create(ring_name, 1 << 12, kind="mpmc", producers=1) as ring:
        p = ring.producer()
        stalled, other = ring.consumer(), ring.consumer()
        a, filler, b = b"A" * 48, b"f" * 48, b"B" * 32          # 64-byte records; 64 make a lap
        p.send(a)                                                # position 0
        log = []

        def the_world_moves_on(handle, where):
            if where != "mpmc_taken" or handle is not stalled or log:
                return
            log.append("stalled")
            t = ring._tables
            t.requeue_dead(other, {0: time.monotonic() - 10})    # its take looks abandoned: requeued
            log.append(other.recv_bytes(timeout=1))              # ... and redelivered
            for _ in range(63):                                  # a lap of fillers, all consumed
                p.send(filler)
                assert other.recv_bytes(timeout=1) == filler
            p.send(b)                                            # position 4096: the same address as A
        _core._set_pause_hook(the_world_moves_on)
        try:
            got = stalled.recv_bytes(timeout=1)
        finally:
            _core._set_pause_hook(None)
        assert log == ["stalled", a]
        assert got == b                                          # B itself, not A's length over B's bytes
        assert other.try_recv() is None
        s = ring.stats()
        assert s["redelivered"] == 1 and s["consumers"][0]["received"] + s["consumers"][1]["received"] == 65


def _take_one_and_die(name, ready):
    ring = shmring.Ring.attach(name)
    c = ring.consumer()
    msg = c.recv(timeout=5)            # held, never released
    ready.send(bytes(msg.value))      # a pipe: written before the kill
    os.kill(os.getpid(), 9)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_an_mpmc_consumer_joins_when_every_entry_names_a_dead_process(ring_name, procs, start_method):
    """Issue 12: with every consumer entry held by a dead consumer and no live
    consumer left to recover them, a new consumer was refused ("all 2
    consumer entries ... are held by live processes").  The joiner takes a
    dead entry over itself, and what the dead held is handed back (R26):
    every message arrives exactly once."""
    import multiprocess
    ctx = multiprocess.get_context(start_method)
    with shmring.Ring.create(ring_name, 1 << 14, kind="mpmc", max_consumers=2) as ring:
        p = ring.producer()
        for i in range(6):
            p.send(b"m%d" % i)
        p.close()
        taken = []
        for _ in range(2):
            here, there = ctx.Pipe(duplex=False)
            child = ctx.Process(target=_take_one_and_die, args=(ring_name, there))
            child.start()
            procs.append(child)
            assert here.poll(30)
            taken.append(here.recv())
            child.join(30)
            assert child.exitcode == -9
        c = ring.consumer()
        got = []
        with pytest.raises(shmring.EndOfStream):
            while True:
                got.append(c.recv_bytes(timeout=5))
        assert sorted(got) == [b"m%d" % i for i in range(6)]
        assert sorted(taken) == [b"m0", b"m1"]
        assert ring.stats()["redelivered"] == 2
