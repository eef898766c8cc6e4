"""Process targets and the report channel of the multi-party stress tests
(``tests/test_multi_stress.py``).

Messages are those of ``_multi_workers``: producer ``tag``, number ``seq``,
bytes (or an array) that are a deterministic function of the two, so every
receiver checks every byte by regenerating them, and the parent checks the
CRC-32 each receiver reports against the regenerated message too.

**The report channel.**  Children report to the parent through one pipe
shared by all of them.  Each report is a single ``os.write`` of at most
``PIPE_BUF`` bytes, which the kernel makes atomic: a child SIGKILLed at any
instant has written a report whole or not at all, and reports of different
children never interleave.  The write is synchronous (no feeder thread, no
lock shared between processes, unlike ``multiprocess.Queue``, whose lock a
killed child could take with it), so "reported" means "in the pipe" before
the child's next step.  That is what makes the accounting exact:

* an mpmc consumer reports ``RECV`` (tag, seq, crc) after checking a message
  and *before* releasing it, and ``RELEASED`` after releasing it; what a
  killed consumer may have held is therefore known: every ``RECV`` without a
  ``RELEASED``, of which at most the oldest (released, killed before the
  report) was not in its hands, plus at most one message taken but not yet
  reported;
* the order of reports in the pipe is the order of the writes in time, so a
  redelivery is reported after the report of the consumer that died with it.

Frames: ``FRAME`` = (event, child id, a, b, c); ``INFO`` is followed by ``a``
bytes of JSON (``{"what": ..., ...}``: joined, holding, stalled, done, error).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import select
import struct
import time
import traceback
import zlib
from collections import deque

import shmring

from _multi_workers import identify, marr, mmsg

CALL = 30.0                  # bound on any one blocking call in a child: a hang becomes an error report
PIPE_BUF = 4096              # os.write of at most this many bytes to a pipe is atomic (POSIX)

FRAME = struct.Struct("<HHIII")
RECV, RELEASED, INFO = 1, 2, 3


# --------------------------------------------------------------------------- messages

def expected_crc(tag: int, seq: int) -> int:
    """CRC-32 of the payload bytes of message (tag, seq) as _multi_workers' send paths send it."""
    if seq % 10 == 3:
        return zlib.crc32(marr(tag, seq))
    return zlib.crc32(mmsg(tag, seq))


def check_value(v, tags=None) -> tuple[int, int, int]:
    """(tag, seq, crc) of a received value; AssertionError if it is torn or foreign."""
    tag, seq, why = identify(v)
    if why:
        raise AssertionError(f"torn or foreign message: {why}")
    if tags is not None and tag not in tags:
        raise AssertionError(f"message {tag}/{seq} from an unknown producer")
    return tag, seq, zlib.crc32(v)


def send_one(prod, tag: int, seq: int) -> None:
    """Message (tag, seq) by one of three send paths: bytes, an array, a reservation filled in place."""
    k = seq % 10
    if k == 3:
        prod.send(marr(tag, seq), timeout=CALL)
    elif k == 7:
        m = mmsg(tag, seq)
        with prod.reserve(len(m), timeout=CALL) as mv:
            mv[:] = m
    else:
        prod.send(mmsg(tag, seq), timeout=CALL)


# --------------------------------------------------------------------------- the report channel

class Reporter:
    """Child side: atomic, synchronous frames on the shared pipe."""

    def __init__(self, conn, cid: int):
        self.fd = conn.fileno()
        self.cid = cid

    def frame(self, ev: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        os.write(self.fd, FRAME.pack(ev, self.cid, a, b, c))

    def info(self, what: str, **kw) -> None:
        kw["what"] = what
        kw.setdefault("pid", os.getpid())
        body = json.dumps(kw).encode()
        if len(body) > PIPE_BUF - FRAME.size and "error" in kw:      # keep the end of a traceback
            kw["error"] = "..." + kw["error"][-(PIPE_BUF - 600):]
            body = json.dumps(kw).encode()
        assert len(body) <= PIPE_BUF - FRAME.size, body[:200]
        os.write(self.fd, FRAME.pack(INFO, self.cid, len(body), 0, 0) + body)

    def error(self) -> None:
        self.info("error", error=traceback.format_exc())


class Collector:
    """Parent side: the read end of the shared pipe, made 1 MiB deep and non-blocking.

    ``frames`` holds every report in pipe order: (event, cid, a, b, c) for
    RECV / RELEASED, (INFO, cid, dict) for INFO."""

    def __init__(self, ctx):
        self.reader, self.writer = ctx.Pipe(duplex=False)
        self.fd = self.reader.fileno()
        try:
            fcntl.fcntl(self.fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except OSError:
            pass                                    # a smaller pipe only makes children wait for the parent
        os.set_blocking(self.fd, False)
        self.buf = bytearray()
        self.frames: list = []

    def poll(self, timeout: float = 0.0) -> int:
        """Read whatever is in the pipe (waiting up to ``timeout`` for the first byte); new frame count."""
        if timeout > 0:
            select.select([self.fd], [], [], timeout)
        while True:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not chunk:
                break
            self.buf += chunk
        return self._parse()

    def _parse(self) -> int:
        buf, out, i, n = self.buf, self.frames, 0, len(self.buf)
        start = len(out)
        unpack = FRAME.unpack_from
        while n - i >= FRAME.size:
            ev, cid, a, b, c = unpack(buf, i)
            if ev == INFO:
                if n - i < FRAME.size + a:
                    break
                out.append((INFO, cid, json.loads(bytes(buf[i + FRAME.size:i + FRAME.size + a]))))
                i += FRAME.size + a
            elif ev in (RECV, RELEASED):
                out.append((ev, cid, a, b, c))
                i += FRAME.size
            else:
                raise AssertionError(f"corrupt report frame {ev} from child {cid} at byte {i}")
        del buf[:i]
        return len(out) - start

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _release_all(held: deque, rep: Reporter | None) -> None:
    """Release held messages oldest first; report each *after* its release."""
    while held:
        tag, seq, m = held.popleft()
        m.release()
        if rep is not None:
            rep.frame(RELEASED, tag, seq)


def _next(cons, held: deque, rep: Reporter | None, timeout: float = CALL):
    """The next message.  Holding messages, only take one that is there now;
    release them before blocking: a consumer asleep on messages it holds would
    keep the end of an mpmc stream (and a broadcast producer) waiting for it."""
    if held:
        m = cons.try_recv()
        if m is not None:
            return m
        _release_all(held, rep)
    return cons.recv(timeout=timeout)


def wait_budget(budget, seq: int) -> None:
    """Pacing: wait until the parent allows message ``seq`` (budget[0] > seq)."""
    deadline = time.monotonic() + CALL
    while budget[0] <= seq:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the parent's budget stayed at {budget[0]} (<= {seq}) for {CALL} s")
        time.sleep(0.002)


# --------------------------------------------------------------------------- mpmc

def mpmc_producer(ring, conn, cid, tag, n, budget, committed, slot=None):
    """Send (tag, 0..n-1), paced by ``budget``; committed[slot] (default: [tag]) =
    the last seq whose send returned."""
    slot = tag if slot is None else slot
    rep = Reporter(conn, cid)
    try:
        with ring.producer() as prod:
            rep.info("joined")
            for seq in range(n):
                if budget[0] <= seq:
                    wait_budget(budget, seq)
                send_one(prod, tag, seq)
                committed[slot] = seq
        rep.info("done", sent=n)
    except BaseException:
        rep.error()
        os._exit(3)


def die_at(point: str, when=lambda: True) -> None:
    """SIGKILL this process at the pause point ``point`` (shmring.pausepoints)
    if ``when()`` says so there."""
    from shmring import pausepoints

    def hook(p):
        if p == point and when():
            os.kill(os.getpid(), 9)
    pausepoints.hook = hook


def _holds_another_entry(ring):
    """True while this process owns a consumer-table entry besides its own: an
    mpmc recovery that took a dead consumer's entry over (R26)."""
    from shmring.roles import my_owner_word
    t, me = ring._tables, my_owner_word()
    return sum(t.region.load_u64(t.cline(i)) == me for i in range(t.maxc)) > 1


def mpmc_consumer(ring, conn, cid, fate, limit, hold_max, seed, tags):
    """A work-sharing consumer.  Every message is checked, reported (RECV),
    held with up to ``hold_max`` others for a while, released (then RELEASED).

    fate: "anchor", "kill" and "snipe" run to the end of the stream (the
    parent kills a "kill" consumer after some messages, a "snipe" one at a
    random time, whatever it is doing); "close" closes after ``limit``
    messages while still holding some, then releases them; "recoverer" is a
    "close" one that kills itself if it gets to the middle of a recovery
    first: at the pause point where it has taken a dead consumer's entry over
    and walked the records in flight, before it requeues them; "hold" takes
    ``limit`` messages, then keeps a few more unreleased, reports "holding"
    and waits to be killed."""
    if fate == "recoverer":
        die_at("requeue_walked", lambda: _holds_another_entry(ring))
    rep = Reporter(conn, cid)
    rng = random.Random(seed)
    tags = set(tags)
    held: deque = deque()
    n = 0
    end = None

    def take(msg):
        nonlocal n
        v = msg.value
        tag, seq, crc = check_value(v, tags)
        del v                                   # no view may outlive the message
        rep.frame(RECV, tag, seq, crc)          # after processing, before release
        n += 1
        held.append((tag, seq, msg))

    def take_more(k):
        """Up to k more messages, kept (waiting briefly: holding, we must not sleep long)."""
        for _ in range(k):
            try:
                take(cons.recv(timeout=0.3))
            except (shmring.Timeout, shmring.EndOfStream):
                return

    try:
        cons = ring.consumer()
        rep.info("joined")
        closing = fate in ("close", "recoverer")
        while not ((closing or fate == "hold") and n >= limit):
            try:
                take(_next(cons, held, rep))
            except shmring.EndOfStream:
                end = "EndOfStream"
                break
            if len(held) > rng.randrange(hold_max + 1):
                _release_all(held, rep)
        if fate == "hold" and end is None:
            take_more(rng.randrange(1, hold_max + 2))
            if held:
                rep.info("holding", held=[[t, s] for t, s, _ in held])
                time.sleep(CALL)
                raise AssertionError(f"consumer {cid} held {len(held)} messages for {CALL} s and was not killed")
        if closing and end is None:
            if not held:
                take_more(1)                    # close while holding one, if one comes
            holding = len(held)
            cons.close()                        # what it holds stays its own until released
            rep.info("closed", holding=holding)
            _release_all(held, rep)
        else:
            _release_all(held, rep)
            cons.close()
        rep.info("done", end=end, n=n)
    except BaseException:
        rep.error()
        os._exit(3)


def check_mpmc(frames, tags, n_each, killed: set, hold_killed: dict) -> dict:
    """Exact accounting of an mpmc run from its reports (see the module docstring).

    ``killed``: child ids that died by SIGKILL; ``hold_killed``: for those
    killed while asleep holding messages, the (tag, seq) list they reported
    holding.  Returns the counts; raises AssertionError naming the first
    violations."""
    deliveries: dict = {}                  # (tag, seq) -> [(frame index, cid), ...]
    received: dict = {}                    # cid -> [(tag, seq), ...] in order
    released: dict = {}                    # cid -> {(tag, seq), ...}
    problems = []
    crc_cache = {}
    for i, f in enumerate(frames):
        ev, cid = f[0], f[1]
        if ev == RECV:
            key = (f[2], f[3])
            want = crc_cache.get(key)
            if want is None:
                want = crc_cache[key] = expected_crc(*key)
            if f[4] != want:
                problems.append(f"consumer {cid} reported {key} with crc {f[4]:#x}, expected {want:#x} (torn)")
            deliveries.setdefault(key, []).append((i, cid))
            received.setdefault(cid, []).append(key)
        elif ev == RELEASED:
            released.setdefault(cid, set()).add((f[2], f[3]))
        elif ev == INFO and f[2]["what"] == "error":
            problems.append(f"child {cid} failed:\n{f[2]['error']}")
    expect = {(t, s) for t in tags for s in range(n_each)}
    got = set(deliveries)
    lost, foreign = sorted(expect - got), sorted(got - expect)
    if lost:
        problems.append(f"{len(lost)} messages never delivered (lost), first {lost[:10]}")
    if foreign:
        problems.append(f"{len(foreign)} unexpected messages, first {foreign[:10]}")
    # What each killed consumer held when it died, as far as its reports tell.
    held_by = {}
    for cid in killed:
        rel = released.get(cid, set())
        held_by[cid] = [k for k in received.get(cid, []) if k not in rel]
    for cid, keys in received.items():
        if cid not in killed:
            unreleased = [k for k in keys if k not in released.get(cid, set())]
            if unreleased:
                problems.append(f"consumer {cid} (not killed) never reported releasing {unreleased[:5]}")
            if len(set(keys)) != len(keys):
                problems.append(f"consumer {cid} received a message twice")
    need = {}
    for cid, keys in held_by.items():
        for k in keys:
            need[k] = need.get(k, 0) + 1
    dups = 0
    for key, ds in deliveries.items():
        extra = len(ds) - 1
        dups += extra
        if extra > need.get(key, 0):
            problems.append(f"message {key} delivered {len(ds)} times (to consumers {[c for _, c in ds]}), "
                            f"but only {need.get(key, 0)} killed consumer(s) held it")
    # Everything a killed consumer held must come again after its report,
    # except perhaps its oldest unreleased one (released, killed before reporting it).
    not_again = 0
    for cid, keys in held_by.items():
        for j, key in enumerate(keys):
            ds = deliveries[key]
            mine = [i for i, c in ds if c == cid]
            if any(i > mine[0] and c != cid for i, c in ds):
                continue
            if j == 0 and cid not in hold_killed:
                not_again += 1
                continue
            problems.append(f"message {key} was in the hands of killed consumer {cid} "
                            f"(unreleased #{j} of {len(keys)}) and was never delivered again (lost)")
    for cid, lst in hold_killed.items():
        if sorted(map(tuple, lst)) != sorted(held_by.get(cid, [])):
            problems.append(f"consumer {cid} reported holding {lst} but its receipts say {held_by.get(cid)}")
    need_total = sum(len(v) for v in held_by.values())
    if problems:
        raise AssertionError(f"{len(problems)} accounting violations:\n" + "\n".join(problems[:20]))
    return {"receipts": sum(len(d) for d in deliveries.values()), "dups": dups, "held_by_killed": need_total,
            "released_unreported": not_again, "killed": len(killed)}


# --------------------------------------------------------------------------- mpsc

def mpsc_producer(ring, conn, cid, tag, fate, n, committed, stop, pace):
    """A producer session of an mpsc stream.

    fate "close" / "detach": send (tag, 0..n-1), then close / detach.
    "kill": send until SIGKILLed (n is only a bound).  "stall": send n, then
    claim space, write part of it, report "stalled" and wait to be killed.
    "anchor": send until stop[0] is set (``pace`` messages per ms at most),
    then close.  committed[tag] = the last seq whose send returned."""
    rep = Reporter(conn, cid)
    try:
        prod = ring.producer()
        rep.info("joined")
        seq = 0
        t0 = time.monotonic()
        while seq < n:
            if fate == "anchor":
                if stop[0]:
                    break
                if seq > pace * (time.monotonic() - t0) * 1000:
                    time.sleep(0.001)
                    continue
            send_one(prod, tag, seq)
            committed[tag] = seq
            seq += 1
        if fate == "kill":
            raise AssertionError(f"producer {tag} sent all {n} messages and was not killed")
        if fate == "stall":
            res = prod.reserve(100, timeout=CALL)
            res.view[:8] = mmsg(tag, seq)[:8]
            rep.info("stalled", sent=seq)
            time.sleep(CALL)
            raise AssertionError(f"producer {tag} stalled in a claim for {CALL} s and was not killed")
        if fate == "detach":
            prod.detach()
        else:
            prod.close()
        rep.info("done", sent=seq)
    except BaseException:
        rep.error()
        os._exit(3)


def mpsc_dying_producer(ring, conn, cid, tag, point, n, committed):
    """A producer session SIGKILLed at a step of joining or leaving the stream,
    at a pause point of ``shmring.parties`` (in this child only):
    "before_claim": before it touched the table (a control: nothing to
    recover); "after_claim": right after its producer-table entry was claimed,
    before it joined the stream; after sending n messages, in close():
    "close_before_end": its counters bumped, its end not yet stored in its
    entry; "close_before_release" / "detach_before_release": in close() /
    detach() after its end (or its leave) was stored, before it gave its
    entry back."""
    from shmring import pausepoints
    rep = Reporter(conn, cid)
    at = {"before_claim": "producer_claim", "after_claim": "producer_claimed",
          "close_before_end": "producer_ended", "close_before_release": "producer_counted",
          "detach_before_release": "producer_counted"}[point]

    def die(where):
        if where == at:
            os.kill(os.getpid(), 9)

    try:
        if point in ("before_claim", "after_claim"):
            pausepoints.hook = die
            ring.producer()
            raise AssertionError(f"not killed at {point}")
        prod = ring.producer()
        rep.info("joined")
        for seq in range(n):
            send_one(prod, tag, seq)
            committed[tag] = seq
        pausepoints.hook = die
        prod.close() if point.startswith("close") else prod.detach()
        raise AssertionError(f"not killed at {point}")
    except BaseException:
        rep.error()
        os._exit(3)


def mpsc_consumer(ring, conn, cid, hold_max, seed):
    """The one consumer: every message checked, each producer's in order from 0
    with no gap; reports {tag: [count, last]} and how the stream ended."""
    rep = Reporter(conn, cid)
    rng = random.Random(seed)
    last: dict = {}
    held: deque = deque()
    end = None
    try:
        with ring.consumer() as cons:
            rep.info("joined")
            while True:
                try:
                    msg = _next(cons, held, None)
                except shmring.EndOfStream as e:
                    end = f"EndOfStream: {e}"
                    break
                except shmring.PeerGone as e:
                    end = f"PeerGone: {e}"
                    break
                v = msg.value
                tag, seq, _ = check_value(v)
                del v
                if seq != last.get(tag, -1) + 1:
                    raise AssertionError(f"producer {tag}: message {seq} arrived after {last.get(tag, -1)} "
                                         f"({'a gap' if seq > last.get(tag, -1) else 'a duplicate or reorder'})")
                last[tag] = seq
                held.append((tag, seq, msg))
                if len(held) > rng.randrange(hold_max + 1):
                    _release_all(held, None)
            _release_all(held, None)
        rep.info("done", end=end, last={str(t): s for t, s in last.items()})
    except BaseException:
        rep.error()
        os._exit(3)


# --------------------------------------------------------------------------- broadcast

def bc_producer(ring, conn, cid, tag, n, budget, committed):
    """The broadcast producer: (tag, 0..n-1) paced by ``budget``, then close; committed[0] as above."""
    mpmc_producer(ring, conn, cid, tag, n, budget, committed, 0)


def bc_subscriber(ring, conn, cid, tag, fate, start, limit, hold_max, seed, committed, progress):
    """A subscriber: checks that what it gets is one run (tag, f), (tag, f+1), ...
    untorn; progress[cid] = messages received so far.

    fate "full" / "late" / "kill": to the end of the stream (a "kill" one is
    SIGKILLed by the parent at some point); "close": close after ``limit``
    messages while holding one, then release it; "hold": after ``limit``
    messages keep one unreleased, report "holding" and wait to be killed;
    "dropper": a "close" one that kills itself if, while joining, it takes a
    dead subscriber's entry over to drop it (at the pause point where the
    entry is its own and the dead one's position not yet freed, R27).
    Reports the committed count seen before and after subscribe() returned."""
    if fate == "dropper":
        die_at("drop_subscriber")
    rep = Reporter(conn, cid)
    rng = random.Random(seed)
    held: deque = deque()
    first = last = None
    count = 0
    end = None
    try:
        before = committed[0]
        sub = ring.subscribe(start)
        after = committed[0]
        rep.info("joined", before=before, after=after, start=start)

        def take(m):
            nonlocal first, last, count
            v = m.value
            t, seq, _ = check_value(v, {tag})
            del v
            if last is not None and seq != last + 1:
                raise AssertionError(f"subscriber {cid} ({start}): message {seq} after {last}")
            if first is None:
                first = seq
            last = seq
            count += 1
            progress[cid] = count
            held.append((t, seq, m))

        if fate == "dropper":
            fate = "close"                  # joined without dying
        while not (fate in ("close", "hold") and count >= limit):
            try:
                take(_next(sub, held, None))
            except shmring.EndOfStream:
                end = "EndOfStream"
                break
            if len(held) > rng.randrange(hold_max + 1):
                _release_all(held, None)
        if fate in ("close", "hold") and end is None:
            if not held:
                try:
                    take(sub.recv(timeout=CALL))
                except shmring.EndOfStream:
                    end = "EndOfStream"
            if fate == "hold" and held:
                rep.info("holding", last=last)
                time.sleep(CALL)
                raise AssertionError(f"subscriber {cid} held a message for {CALL} s and was not killed")
            holding = len(held)
            sub.close()               # what it holds stays intact (and gates the producer) until released
            _release_all(held, None)
            rep.info("done", first=first, last=last, count=count, end=end or "closed", holding=holding)
            return
        _release_all(held, None)
        sub.close()
        rep.info("done", first=first, last=last, count=count, end=end)
    except BaseException:
        rep.error()
        os._exit(3)


def bc_storm_producer(ring, conn, cid, tag, stop, committed):
    """Broadcast producer as fast as the subscribers allow (bytes messages), until stop[0]."""
    rep = Reporter(conn, cid)
    try:
        with ring.producer() as prod:
            rep.info("joined")
            seq = 0
            while not stop[0]:
                prod.send(mmsg(tag, seq), timeout=CALL)
                committed[0] = seq
                seq += 1
        rep.info("done", sent=seq)
    except BaseException:
        rep.error()
        os._exit(3)


def bc_joiner(ring, conn, cid, tag, seconds, seed):
    """Join at "oldest" (every 10th at "newest"), mostly leave at once, now and
    then after reading 1 or 2 messages (one unbroken intact run); again and
    again for ``seconds``.  A joiner at "oldest" holds the producer back until
    it leaves; then the producer laps the ring in one go."""
    rep = Reporter(conn, cid)
    rng = random.Random(seed)
    joins = got = 0
    try:
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            sub = ring.subscribe("newest" if joins % 10 == 9 else "oldest")
            joins += 1
            last = None
            for _ in range(rng.choice((0, 0, 0, 0, 0, 0, 0, 0, 1, 2))):
                try:
                    with sub.recv(timeout=CALL) as m:
                        v = m.value
                        t, seq, _ = check_value(v, {tag})
                        del v
                except shmring.EndOfStream:
                    break
                if last is not None and seq != last + 1:
                    raise AssertionError(f"joiner {cid}: message {seq} after {last}")
                last = seq
                got += 1
            sub.close()
        rep.info("done", joins=joins, got=got)
    except BaseException:
        rep.info("error", error=f"after {joins} joins: " + traceback.format_exc())
        os._exit(3)


def bc_fast_reader(ring, conn, cid, tag):
    """A subscriber from the start that reads every message as fast as it can
    (recv_bytes), each compared with the regenerated bytes, in order."""
    rep = Reporter(conn, cid)
    seq = 0
    try:
        with ring.subscribe("oldest") as sub:
            rep.info("joined")
            while True:
                try:
                    b = sub.recv_bytes(timeout=CALL)
                except shmring.EndOfStream:
                    break
                if b != mmsg(tag, seq):
                    tag2, seq2, why = identify(b)
                    raise AssertionError(f"expected message {tag}/{seq}, got {tag2}/{seq2} ({why or 'intact'})")
                seq += 1
        rep.info("done", first=0, last=seq - 1, count=seq, end="EndOfStream")
    except BaseException:
        rep.info("error", error=f"after {seq} messages: " + traceback.format_exc())
        os._exit(3)
