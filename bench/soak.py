"""Soak test: producers and consumers stream for N minutes while a chaos thread
SIGKILLs random roles and starts replacements; then every sequence is checked.

    python -m bench.soak --minutes 3            # opt-in; not part of the test suite
    python -m bench.soak --minutes 3 --joins    # also multi-party rings whose parties come and go
    python -m bench.soak --minutes 3 --sigint   # also Ctrl-C (SIGINT) storms into every spsc role

Each ring (``--rings``, POSIX segments and file-backed rings alternating) has
one producer process and one consumer process.  Message ``seq`` is
``tagged(seq)``: the sequence number then deterministic pseudo-random bytes
(0..300 bytes in all), so the consumer checks every byte by regenerating it.

How the accounting stays exact across kills (per ring, in a small shared
page the supervisor owns):

* The consumer holds up to 3 received messages before releasing them (so a
  kill often lands while it holds some), in order.  It stores
  ``last_received`` *before* it releases a message and ``last_released``
  after.  Each incarnation checks its own messages are consecutive and intact;
  its first message ``f`` must satisfy ``last_released < f <= last_received + 1``
  as left by its predecessor: ``f <= last_received + 1`` is "no loss", ``f >
  last_released`` is "only unreleased messages come again".  ``last_released``
  can be stale by one message (kill between release and store), which only
  makes the check a little weaker, never wrong.
* A replacement producer takes the role (so ``write_pos`` stops moving), walks
  the unreleased records from ``read_pos`` to ``write_pos`` with the
  pure-Python layout reader and resumes after the last one; if the ring is
  empty every committed message was released, so it resumes after
  ``last_received``.  No message is sent twice and none is skipped.
* At the end the chaos stops, dead roles are replaced, producers close the
  stream, consumers drain to EndOfStream; the last sequence received must be
  the last one committed.

``--joins`` adds an mpmc, an mpsc and a broadcast ring whose consumers,
producers and subscribers join, leave and are killed all along, with the same
exact accounting: no message lost, none torn, no duplicate beyond the counted
redeliveries of what a killed mpmc consumer held (see "--joins" below).

``--sigint`` also pelts the spsc producers and consumers with SIGINT (a
mean of ``--sigint-every`` seconds apart per process).  A child's handler
raises KeyboardInterrupt exactly where Python's default one would, but only
inside shmring's own code or the one-line wrapper (``_lib``) the soak calls it
through; in the soak's bookkeeping frames it is ignored, so the accounting
itself is never interrupted (a user's code would lose what its own code
dropped; that is not the library's to answer for).  On an interrupt the child
retries what was interrupted: a ``recv`` (a message dropped unread must come
again, R39), reading a message, a release, a send (committed or not is read
from the ring's write position, which only this producer moves: a send is
never repeated or skipped), taking a role, closing.  The accounting above then
proves nothing was lost or duplicated.

Prints messages delivered, bytes, kills survived per role, redeliveries (the
at-least-once duplicates), losses, torn messages and contract violations.
Exit status 0 only if losses, torn and violations are all zero.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import mmap
import os
import random
import select
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback

import multiprocessing as mp

import shmring
from shmring import layout as L

# --------------------------------------------------------------------------- payloads

_K = 1 << 14
_rng = random.Random(20240601)
_TAILS = [_rng.randbytes(_rng.randrange(0, 293)) for _ in range(_K)]
del _rng


def tagged(seq: int) -> bytes:
    return seq.to_bytes(8, "little") + _TAILS[seq & (_K - 1)]


# --------------------------------------------------------------------------- shared accounting

# int64 slots of a ring's accounting page (anonymous shared mmap, inherited by fork)
LAST_RECEIVED, LAST_RELEASED, COMMITTED, REDELIVERED, LOSSES, TORN, VIOLATIONS, STOP, DELIVERED, \
    BYTES, PROD_STARTS, CONS_STARTS, DONE, INTERRUPTS = range(14)
NSLOTS = 16


class Book:
    def __init__(self):
        self.buf = mmap.mmap(-1, NSLOTS * 8)
        self.set(LAST_RECEIVED, -1)
        self.set(LAST_RELEASED, -1)
        self.set(COMMITTED, -1)

    def get(self, i: int) -> int:
        return struct.unpack_from("<q", self.buf, i * 8)[0]

    def set(self, i: int, v: int) -> None:
        struct.pack_into("<q", self.buf, i * 8, v)

    def add(self, i: int, v: int = 1) -> None:   # only ever called by one process at a time per slot
        self.set(i, self.get(i) + v)


def _complain(book, kind, msg):
    book.add(kind)
    print(f"[soak pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def _dump_stuck(p, what: str) -> None:
    """A child that did not finish: print where each of its threads is (its
    faulthandler, inherited from us, dumps them to stderr on SIGUSR1)."""
    print(f"{what}: its stacks follow", file=sys.stderr, flush=True)
    try:                                          # reaped by someone else? (then is_alive() stays True forever)
        print(f"  waitpid({p.pid}, WNOHANG) -> {os.waitpid(p.pid, os.WNOHANG)}", file=sys.stderr, flush=True)
    except OSError as e:
        print(f"  waitpid({p.pid}, WNOHANG) -> {e!r}", file=sys.stderr, flush=True)
    for f in ("status", "wchan", "stack"):       # what the kernel says (a child that cannot dump)
        try:
            with open(f"/proc/{p.pid}/{f}") as fh:
                text = fh.read()
        except OSError as e:
            text = repr(e)
        if f == "status":
            text = "".join(l for l in text.splitlines(True) if l.startswith(("State", "Sig", "Shd", "Threads")))
        print(f"  /proc/{p.pid}/{f}: {text.strip()}", file=sys.stderr, flush=True)
    try:
        os.kill(p.pid, signal.SIGUSR1)
    except ProcessLookupError:
        return
    time.sleep(0.5)


def _kill(p) -> None:
    """SIGKILL child ``p`` unless it already exited and was reaped."""
    try:
        os.kill(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _attach(where):
    name, path = where
    return _retry(shmring.Ring.attach, name, path=path)


# --------------------------------------------------------------------------- --sigint

_SHMRING_DIR = os.path.dirname(shmring.__file__)
_interrupts = [None]                       # this child's Book while interrupts are armed
SIGINT_JOINS = [False]                     # --sigint with --joins: arm the multi-party consumers too


def _lib(fn, *args, **kwargs):
    """Every library call of a soak child goes through here: an interrupt may land in this frame or inside shmring."""
    return fn(*args, **kwargs)


def _arm_sigint(book) -> None:
    """Raise KeyboardInterrupt as Python's default handler does, but only in
    shmring's frames or _lib's (a C call checks signals in its caller's frame:
    _lib's); ignored in the soak's bookkeeping."""
    loud = _lib.__code__

    def on_int(sig, frame):
        if frame is not None and (frame.f_code is loud or frame.f_code.co_filename.startswith(_SHMRING_DIR)):
            raise KeyboardInterrupt
    _interrupts[0] = book
    signal.signal(signal.SIGINT, on_int)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})    # blocked since the fork (Soak.start)


def _retry(fn, *args, **kwargs):
    """_lib(fn, ...) again after each interrupt (for calls that may simply be
    repeated: attach, recv, reading a message, release, close)."""
    while True:
        try:
            return _lib(fn, *args, **kwargs)
        except KeyboardInterrupt:
            if _interrupts[0] is None:     # not ours: a real Ctrl-C
                raise
            _interrupts[0].add(INTERRUPTS)


# --------------------------------------------------------------------------- roles

def _take(ring, role):
    """Take a role, waiting while the previous (killed) holder is still being reaped."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return _retry(getattr(ring, role), spin=20e-6)
        except shmring.RoleTaken:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _resume_point(ring, book) -> int:
    r = ring._region
    cap = ring.capacity
    wp = r.load_u64(L.OFF_WRITE_POS)          # we hold the producer role: it cannot move
    rp = r.load_u64(L.OFF_READ_POS)
    if rp >= wp:
        return book.get(LAST_RECEIVED) + 1    # everything committed was released (and recorded first)
    last, pos = None, rp
    buf = ring._seg.buf
    while pos < wp:
        n, _ = L.read_record_header(buf, pos, cap)
        off = L.HEADER_SIZE + pos % cap + L.REC_HDR     # contiguous even across the wrap (R60)
        last = int.from_bytes(buf[off:off + 8], "little")
        pos += L.record_size(n)
    return last + 1


def producer_main(where, book, inject_loss=False, sigint=False):
    try:
        if sigint:
            _arm_sigint(book)
        ring = _attach(where)
        p = _take(ring, "producer")
        book.add(PROD_STARTS)
        seq = _retry(_resume_point, ring, book)      # (reads only: an interrupt in its layout calls is redone)
        c = book.get(COMMITTED)
        if seq <= c:                                  # COMMITTED is written after each commit: never ahead
            _complain(book, VIOLATIONS, f"producer resumes at {seq} but {c} was committed already")
        elif seq > c + 2:                             # one kill between commit and record: c + 2 at most
            r = ring._region
            _complain(book, VIOLATIONS, f"producer resumes at {seq} but only {c} was recorded committed "
                      f"(read_pos {r.load_u64(L.OFF_READ_POS)}, write_pos {r.load_u64(L.OFF_WRITE_POS)}, "
                      f"book {[book.get(i) for i in range(NSLOTS)]})")
        region = ring._region
        while not book.get(STOP):
            wp = region.load_u64(L.OFF_WRITE_POS)     # only this producer moves it
            try:
                _lib(p.send, tagged(seq), timeout=0.5)
            except (shmring.Timeout, shmring.PeerGone):
                continue                              # consumer slow or being replaced
            except KeyboardInterrupt:
                book.add(INTERRUPTS)
                if region.load_u64(L.OFF_WRITE_POS) == wp:
                    continue                          # interrupted before its commit: send it again
            book.set(COMMITTED, seq)
            seq += 1
            if inject_loss and seq == 1000:
                seq += 1                              # --inject-loss: prove the checker sees a gap
        _retry(p.close)
    except Exception:
        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def consumer_main(where, book, seed, sigint=False):
    rng = random.Random(seed)
    try:
        if sigint:
            _arm_sigint(book)
        ring = _attach(where)
        c = _take(ring, "consumer")
        book.add(CONS_STARTS)
        prev_recv, prev_rel = book.get(LAST_RECEIVED), book.get(LAST_RELEASED)
        expect = None
        held = []
        while True:
            try:
                m = _lib(c.recv, timeout=0.5)
            except (shmring.Timeout, shmring.PeerGone):
                continue                              # producer being replaced
            except shmring.EndOfStream:
                break
            except KeyboardInterrupt:
                book.add(INTERRUPTS)                  # a message dropped unread comes again (R39)
                continue
            data = _retry(m.tobytes)
            seq = int.from_bytes(data[:8], "little")
            if data != tagged(seq):
                _complain(book, TORN, f"message {seq} is not byte-identical")
            if expect is None:                        # first message of this incarnation
                if seq > prev_recv + 1:
                    r = ring._region
                    _complain(book, LOSSES, f"gap: previous consumer got up to {prev_recv}, this one starts at {seq} "
                              f"(ring {where}: read_pos {r.load_u64(L.OFF_READ_POS)}, write_pos "
                              f"{r.load_u64(L.OFF_WRITE_POS)}, message at {m.position}; book "
                              f"{[book.get(i) for i in range(NSLOTS)]}; this consumer's first message)")
                if seq <= prev_rel:
                    _complain(book, VIOLATIONS, f"redelivered {seq} although {prev_rel} had been released")
                if seq <= prev_recv:
                    book.add(REDELIVERED, prev_recv - seq + 1)
            elif seq != expect:
                _complain(book, LOSSES if seq > expect else VIOLATIONS, f"expected {expect}, got {seq}")
            expect = seq + 1
            if seq > book.get(LAST_RECEIVED):
                book.set(LAST_RECEIVED, seq)          # recorded before release
                book.add(BYTES, len(data))            # informational: a kill right here undercounts
            book.add(DELIVERED)                       # receipts, redeliveries included (informational)
            held.append((seq, m))
            if len(held) > rng.randrange(0, 4):
                while held:
                    s, hm = held.pop(0)
                    _retry(hm.release)
                    book.set(LAST_RELEASED, s)        # after release (may be stale by one if killed here)
        for s, hm in held:
            _retry(hm.release)
            book.set(LAST_RELEASED, s)
        _retry(c.close)
        book.set(DONE, 1)
    except Exception:
        traceback.print_exc()
        os._exit(3)
    os._exit(0)


# --------------------------------------------------------------------------- --joins: parties join, leave, die

# With --joins the soak adds three multi-party rings whose parties come and go
# for the whole run, on top of the spsc rings above:
#
# * mpmc: an anchor producer (open for the whole run) and producer sessions
#   (each sends a random number of messages under a tag of its own, then
#   closes or detaches, or is killed); 3 consumer slots, each consumer taking
#   a random number of messages before it leaves (closes), or staying, or
#   being killed, and replaced.  Every message must be delivered exactly once,
#   except the ones a killed consumer held, which must come again.
# * mpsc: an anchor producer and 2 slots of producer sessions (close, detach,
#   killed) with one consumer that checks each producer's messages arrive in
#   order from 0, no gap; all of a session's, a killed one's up to its last
#   committed message.  The stream must not end before the anchor closes.
# * broadcast: one producer, 2 subscribers from the start that must see every
#   message, 2 slots of subscribers that join at "oldest" or "newest", read a
#   while and leave, or are killed; each sees one unbroken run; every killed
#   one is dropped exactly once.
#
# Accounting.  Children report on one pipe, each report one os.write of at
# most PIPE_BUF bytes (atomic: a killed child wrote a report whole or not at
# all; no lock a killed child could take with it), synchronously.  An mpmc
# consumer reports a message (RECV) after checking its bytes and *before*
# releasing it, and RELEASED after; so the supervisor knows what each killed
# consumer may have held.  Pipe order is time order: a redelivery is reported
# after the report of the consumer that died holding it.  A second delivery of
# a message is a counted redelivery only if a consumer killed earlier had it
# unreleased (each such holding justifies one); any other is a duplicate
# beyond the counted redeliveries (a violation).  At the end, what a killed
# consumer held and nobody got again is lost, except at most one per killed
# consumer (released, killed before it could report the release).  Committed
# counts per producer tag live in a shared page (``JBook``), written after
# each send returns (a kill between the two makes it one short).

JFRAME = struct.Struct("<HHIII")          # event, 0, child id, a, b
J_RECV, J_RELEASED, J_SENT, J_LAST, J_INFO = 1, 2, 3, 4, 5
J_PIPE_BUF = 4096
J_STOP, J_TAGS = 0, 1 << 16               # JBook slot 0: stop flag; slot t: committed seq of tag t


def jmsg(tag: int, seq: int) -> bytes:
    """Message ``seq`` of producer ``tag`` on the --joins rings: 8..300 bytes."""
    return struct.pack("<II", tag, seq) + _TAILS[(seq * 31 + tag * 7919) & (_K - 1)]


def _jread(data) -> tuple[int, int, bool]:
    """(tag, seq, intact) of a received --joins message."""
    if len(data) < 8:
        return -1, -1, False
    tag, seq = struct.unpack_from("<II", data)
    return tag, seq, bytes(data) == jmsg(tag, seq)


class JBook:
    """int64 slots in an anonymous shared page, inherited by fork."""

    def __init__(self, n: int = J_TAGS + 1):
        self.buf = mmap.mmap(-1, n * 8)

    def get(self, i: int) -> int:
        return struct.unpack_from("<q", self.buf, i * 8)[0]

    def set(self, i: int, v: int) -> None:
        struct.pack_into("<q", self.buf, i * 8, v)


class _JReport:
    """A child's end of the report pipe."""

    def __init__(self, conn, cid: int):
        self.fd, self.cid = conn.fileno(), cid

    def frame(self, ev: int, a: int = 0, b: int = 0) -> None:
        os.write(self.fd, JFRAME.pack(ev, 0, self.cid, a, b))

    def info(self, **kw) -> None:
        if "error" in kw:
            kw["error"] = kw["error"][-3000:]
        body = json.dumps(kw).encode()[:J_PIPE_BUF - JFRAME.size]
        os.write(self.fd, JFRAME.pack(J_INFO, 0, self.cid, len(body), 0) + body)


def _jrun(rep, body) -> None:
    try:
        body()
    except Exception:
        rep.info(what="error", error=traceback.format_exc())
        os._exit(3)
    os._exit(0)


def j_producer(where, conn, cid, tag, n, fate, jb):
    """A producer session of tag ``tag``: send up to n messages (the anchor: until
    the stop flag), then close ("close", "anchor") or detach ("detach")."""
    rep = _JReport(conn, cid)

    def body():
        ring = _attach(where)
        p = ring.producer(spin=20e-6)
        seq = 0
        while (fate == "anchor" or seq < n) and not jb.get(J_STOP):
            try:
                p.send(jmsg(tag, seq), timeout=0.5)
            except (shmring.Timeout, shmring.PeerGone):
                continue            # not sent: no room, or no live consumer right now
            jb.set(tag, seq)        # after the send returned
            seq += 1
        if fate == "detach":
            p.detach()
        else:
            p.close()
        rep.frame(J_SENT, tag, seq)
    _jrun(rep, body)


def _start_blocked(p) -> None:
    """Start child ``p`` with SIGINT blocked (the mask is inherited through
    fork): --sigint storms reach it only once its handler is armed, which
    unblocks it (_arm_sigint)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        p.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _jtake(cons, held, rep, timeout=0.5):
    """The next message; holding some, only one that is there now (release them
    before blocking: a holder asleep would hold up the end of the stream).
    --sigint: an interrupted receive raises KeyboardInterrupt (the message, never
    seen, comes again: R39); the caller goes round again."""
    if held:
        m = _lib(cons.try_recv)
        if m is not None:
            return m
        while held:
            tag, seq, hm = held.pop(0)
            _retry(hm.release)
            if rep is not None:
                rep.frame(J_RELEASED, tag, seq)
    return _lib(cons.recv, timeout=timeout)


class _Interrupts:
    """--sigint in a --joins child: interrupts counted here, reported when it finishes."""

    def __init__(self):
        self.n = 0

    def add(self, _slot) -> None:
        self.n += 1


def _jarm(rep):
    """Arm SIGINT in a --joins consumer or subscriber (--sigint); returns the
    counter to report, or None.  Producers are not interrupted there: whether an
    interrupted multi-producer send committed cannot be read back exactly (the
    spsc rings and tests/test_interrupts.py cover interrupted sends)."""
    if not SIGINT_JOINS[0]:
        return None
    counter = _Interrupts()
    _arm_sigint(counter)
    return counter


def _jdone(rep, counter) -> None:
    if counter is not None:
        rep.info(what="interrupts", n=counter.n)


def j_mpmc_consumer(where, conn, cid, limit, seed, lose_at, jb):
    """A work-sharing consumer: ``limit`` messages (then it leaves), or to the end
    of the stream (PeerGone if producers died), which must not come before the stop flag."""
    rep = _JReport(conn, cid)
    rng = random.Random(seed)

    def body():
        counter = _jarm(rep)
        ring = _attach(where)
        c = _retry(ring.consumer, spin=20e-6)
        held, n = [], 0
        while n < limit:
            try:
                m = _jtake(c, held, rep)
            except (shmring.Timeout, KeyboardInterrupt):
                continue
            except (shmring.EndOfStream, shmring.PeerGone) as e:
                if not jb.get(J_STOP):
                    rep.info(what="violation", detail=f"mpmc: the stream ended while the anchor producer was "
                                                      f"open ({type(e).__name__}: {e})")
                break
            tag, seq, ok = _jread(_retry(m.tobytes))
            if not ok:
                rep.info(what="torn", detail=f"mpmc consumer {cid}: message {tag}/{seq} is not byte-identical")
            n += 1
            if n != lose_at:                      # --inject-loss: one message never reported
                rep.frame(J_RECV, tag, seq)       # checked, not yet released
            held.append((tag, seq, m))
            if rng.random() < 0.005:
                time.sleep(0.005)                 # "work" while holding: a kill often lands here
            if len(held) > rng.randrange(0, 4):
                while held:
                    t, s, hm = held.pop(0)
                    _retry(hm.release)
                    rep.frame(J_RELEASED, t, s)
        while held:
            t, s, hm = held.pop(0)
            _retry(hm.release)
            rep.frame(J_RELEASED, t, s)
        _retry(c.close)
        _jdone(rep, counter)
    _jrun(rep, body)


def j_mpsc_consumer(where, conn, cid, jb):
    """The one consumer of the mpsc ring: each producer's messages in order from 0."""
    rep = _JReport(conn, cid)

    def body():
        counter = _jarm(rep)
        ring = _attach(where)
        last = {}
        end = None
        c = _retry(ring.consumer, spin=20e-6)
        try:
            while end is None:
                try:
                    m = _lib(c.recv, timeout=0.5)
                except (shmring.Timeout, KeyboardInterrupt):
                    continue
                except (shmring.EndOfStream, shmring.PeerGone) as e:
                    end = f"{type(e).__name__}: {e}"
                    break
                tag, seq, ok = _jread(_retry(m.tobytes))
                _retry(m.release)
                if not ok:
                    rep.info(what="torn", detail=f"mpsc: message {tag}/{seq} is not byte-identical")
                if seq != last.get(tag, -1) + 1:
                    rep.info(what="loss" if seq > last.get(tag, -1) + 1 else "violation",
                             detail=f"mpsc: producer {tag} message {seq} arrived after {last.get(tag, -1)}")
                last[tag] = max(seq, last.get(tag, -1))
        finally:
            _retry(c.close)
        for tag, seq in last.items():
            rep.frame(J_LAST, tag, seq)
        rep.info(what="mpsc-end", end=end, early=not jb.get(J_STOP))
        _jdone(rep, counter)
    _jrun(rep, body)


def j_subscriber(where, conn, cid, start, limit, seed):
    """A broadcast subscriber: one unbroken, intact run of messages; ``limit`` of them, or to the end."""
    rep = _JReport(conn, cid)
    rng = random.Random(seed)

    def body():
        counter = _jarm(rep)
        ring = _attach(where)
        sub = _retry(ring.subscribe, start, spin=20e-6)
        rep.info(what="joined")
        held, first, last, count, end = [], None, None, 0, None
        while count < limit:
            try:
                m = _jtake(sub, held, None)
            except (shmring.Timeout, KeyboardInterrupt):
                continue
            except shmring.EndOfStream:
                end = "EndOfStream"
                break
            tag, seq, ok = _jread(_retry(m.tobytes))
            if not ok:
                rep.info(what="torn", detail=f"subscriber {cid}: message {seq} is not byte-identical")
            if last is not None and seq != last + 1:
                rep.info(what="loss" if seq > last + 1 else "violation",
                         detail=f"subscriber {cid} ({start}): message {seq} after {last}")
            first = seq if first is None else first
            last, count = seq, count + 1
            held.append((tag, seq, m))
            if len(held) > rng.randrange(0, 3):
                for _, _, hm in held:
                    _retry(hm.release)
                held.clear()
        for _, _, hm in held:
            _retry(hm.release)
        _retry(sub.close)
        rep.info(what="sub-done", first=first, last=last, count=count, end=end)
        _jdone(rep, counter)
    _jrun(rep, body)


class Joins:
    """The --joins part of the soak: three multi-party rings, their parties
    joining, leaving and being killed, and the accounting (see above)."""

    MPMC_CONSUMERS, MPSC_SESSIONS, SUB_SLOTS = 3, 2, 2

    def __init__(self, soak):
        self.soak, self.args, self.ctx = soak, soak.args, soak.ctx
        self.rng = random.Random(self.args.seed + 7)
        base = f"soakj-{os.getpid()}"
        self.where = {k: (f"{base}-{k}", None) for k in ("mpmc", "mpsc", "broadcast")}
        shmring.Ring.create(self.where["mpmc"][0], 1 << 15, kind="mpmc").close()
        shmring.Ring.create(self.where["mpsc"][0], 1 << 15, kind="mpsc").close()
        shmring.Ring.create(self.where["broadcast"][0], 1 << 14, kind="broadcast").close()
        self.jb = JBook()
        self.reader, self.writer = self.ctx.Pipe(duplex=False)
        os.set_blocking(self.reader.fileno(), False)
        self.lock = threading.RLock()
        self.procs = {}                      # cid -> (slot, role, Process)
        self.next_cid, self.next_tag = 1, 1
        self.tag_ring, self.tag_fate = {}, {}  # tag -> its ring; tag -> its fate
        self.killed = set()                  # cids marked before their SIGKILL
        self.lose_at = 500 if self.args.inject_loss else -1
        # accounting
        self.delivered = {}                  # mpmc tag -> bytearray of delivery counts
        self.holders = {}                    # mpmc (tag, seq) -> set of cids that have it unreleased
        self.dups = 0                        # counted redeliveries seen (each justified by a killed holder)
        self.sent, self.mpsc_last, self.infos, self.joined = {}, {}, [], set()
        self.problems = {"losses": [], "torn": [], "violations": []}     # what each one was
        self.nproblems = {"losses": 0, "torn": 0, "violations": 0}      # how many messages / events
        self.counts = {k: 0 for k in ("mpmc consumers joined", "mpmc consumers left", "mpmc consumers killed",
                                      "mpmc producers joined", "mpmc producers killed", "mpsc producers joined",
                                      "mpsc producers closed", "mpsc producers detached", "mpsc producers killed",
                                      "subscribers joined", "subscribers left", "subscribers killed")}
        self.stopping = False
        self.interrupts = 0                  # --sigint: landed in consumers that finished (killed ones do not report)
        self.buf = bytearray()

    # -- processes ----------------------------------------------------------------
    def _spawn(self, slot, role, target, *args) -> int:
        cid = self.next_cid
        self.next_cid += 1
        p = self.ctx.Process(target=target, args=(self.where[slot[0]], self.writer, cid) + args, daemon=True)
        _start_blocked(p)
        self.procs[cid] = (slot, role, p)
        return cid

    def _new_tag(self, ring, fate) -> int:
        tag = self.next_tag
        if tag >= J_TAGS:
            raise RuntimeError("out of producer tags")
        self.next_tag += 1
        self.jb.set(tag, -1)
        self.tag_ring[tag], self.tag_fate[tag] = ring, fate
        return tag

    def _start_slot(self, slot) -> None:
        """Start the party of ``slot`` = (ring, kind, index): a new one each time it is replaced."""
        ring, kind = slot[0], slot[1]
        r = self.rng
        if kind == "anchor":
            self._spawn(slot, "anchor", j_producer, self._new_tag(ring, "anchor"), 0, "anchor", self.jb)
        elif kind == "session":
            fate = r.choice(["close", "detach"])
            self._spawn(slot, fate, j_producer, self._new_tag(ring, fate), r.randrange(500, 20000), fate, self.jb)
            self.counts[f"{ring} producers joined"] += 1
        elif kind == "consumer" and ring == "mpmc":
            limit = float("inf") if r.random() < 0.3 else r.randrange(200, 20000)
            self._spawn(slot, "consumer", j_mpmc_consumer, limit, r.randrange(1 << 30), self.lose_at, self.jb)
            self.counts["mpmc consumers joined"] += 1
        elif kind == "consumer":
            self._spawn(slot, "consumer", j_mpsc_consumer, self.jb)
        elif kind == "full":
            self._spawn(slot, "full", j_subscriber, "oldest", float("inf"), r.randrange(1 << 30))
        else:   # a passing subscriber
            self._spawn(slot, "sub", j_subscriber, r.choice(["oldest", "newest"]), r.randrange(200, 20000),
                        r.randrange(1 << 30))
            self.counts["subscribers joined"] += 1

    def start(self) -> None:
        with self.lock:
            self.reader_thread = threading.Thread(target=self._read_loop, daemon=True)
            self.reader_thread.start()
            self._start_slot(("mpsc", "consumer", 0))
            for i in range(2):
                self._start_slot(("broadcast", "full", i))
            fulls = [c for c, (slot, role, p) in self.procs.items() if role == "full"]
        deadline = time.monotonic() + 30
        while not all(c in self.joined for c in fulls):
            if time.monotonic() > deadline:
                raise RuntimeError("the broadcast subscribers did not join within 30 s")
            time.sleep(0.01)               # they must see message 0: join before the producer starts
        with self.lock:
            for slot in [("mpmc", "consumer", i) for i in range(self.MPMC_CONSUMERS)] + \
                    [("mpmc", "anchor", 0), ("mpmc", "session", 0), ("mpsc", "anchor", 0),
                     ("broadcast", "anchor", 0)] + \
                    [("mpsc", "session", i) for i in range(self.MPSC_SESSIONS)] + \
                    [("broadcast", "sub", i) for i in range(self.SUB_SLOTS)]:
                self._start_slot(slot)
        self.stop_churn = threading.Event()
        self.churn_thread = threading.Thread(target=self._churn, daemon=True)
        self.churn_thread.start()

    def _killable(self) -> list:
        # a subscriber only once it reported having joined: then its death must be
        # counted in "dropped" (one killed while joining may leave nothing to drop)
        return [cid for cid, (slot, role, p) in self.procs.items()
                if slot is not None and role in ("consumer", "close", "detach", "sub")
                and slot[:2] != ("mpsc", "consumer") and cid not in self.killed and p.is_alive()
                and (role != "sub" or cid in self.joined)]

    def _churn(self) -> None:
        """Replace parties that left (or died), and kill one now and then."""
        next_kill = time.monotonic() + self.rng.uniform(0.3, 2 * self.args.kill_every - 0.3)
        while not self.stop_churn.wait(0.05):
            with self.lock:
                for cid, (slot, role, p) in list(self.procs.items()):
                    if p.is_alive() or slot is None:
                        continue
                    p.join()
                    self.procs[cid] = (None, role, p)
                    if cid not in self.killed and p.exitcode == 0:
                        if role == "consumer" and slot[0] == "mpmc":
                            self.counts["mpmc consumers left"] += 1
                        elif role == "sub":
                            self.counts["subscribers left"] += 1
                        elif slot[0] == "mpsc" and role == "close":
                            self.counts["mpsc producers closed"] += 1
                        elif slot[0] == "mpsc" and role == "detach":
                            self.counts["mpsc producers detached"] += 1
                    if slot[1] in ("consumer", "session", "sub") and slot[:2] != ("mpsc", "consumer"):
                        self._start_slot(slot)
                if time.monotonic() >= next_kill:
                    next_kill = time.monotonic() + self.rng.uniform(0.3, 2 * self.args.kill_every - 0.3)
                    victims = self._killable()
                    if victims:
                        cid = self.rng.choice(victims)
                        slot, role, p = self.procs[cid]
                        self.killed.add(cid)        # before the kill: its redeliveries may be read at once
                        _kill(p)
                        p.join()
                        if p.exitcode != -signal.SIGKILL:
                            self.killed.discard(cid)    # it had just left on its own (the churn counts it)
                            continue
                        what = {"consumer": "mpmc consumers killed", "sub": "subscribers killed"}.get(
                            role, f"{slot[0]} producers killed")
                        self.counts[what] += 1

    def _problem(self, kind: str, text: str, n: int = 1) -> None:
        self.problems[kind].append(text)
        self.nproblems[kind] += n

    # -- reports -----------------------------------------------------------------
    def _read_loop(self) -> None:
        fd = self.reader.fileno()
        while not getattr(self, "reader_done", False):
            select.select([fd], [], [], 0.05)
            self._drain()

    def _drain(self) -> None:
        fd = self.reader.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        with self.lock:
            self._parse()

    def _parse(self) -> None:
        buf, i, n = self.buf, 0, len(self.buf)
        while n - i >= JFRAME.size:
            ev, _, cid, a, b = JFRAME.unpack_from(buf, i)
            if ev == J_INFO:
                if n - i < JFRAME.size + a:
                    break
                info = json.loads(bytes(buf[i + JFRAME.size:i + JFRAME.size + a]))
                info["cid"] = cid
                self._on_info(info)
                i += JFRAME.size + a
                continue
            i += JFRAME.size
            if ev == J_RECV:
                self._on_recv(cid, a, b)
            elif ev == J_RELEASED:
                h = self.holders.get((a, b))
                if h is not None:
                    h.discard(cid)
                    if not h:
                        del self.holders[(a, b)]
            elif ev == J_SENT:
                self.sent[a] = b
            elif ev == J_LAST:
                self.mpsc_last[a] = b
            else:
                self._problem("violations", f"corrupt report frame {ev} from child {cid}")
        del buf[:i]

    def _on_recv(self, cid, tag, seq) -> None:
        d = self.delivered.get(tag)
        if d is None:
            d = self.delivered[tag] = bytearray()
        if seq >= len(d):
            d.extend(bytes(seq + 1 - len(d) + 4096))
        key = (tag, seq)
        h = self.holders.setdefault(key, set())
        if d[seq]:
            dead = [c for c in h if c in self.killed and c != cid]
            if dead:
                h.discard(dead[0])                # that holding is accounted for by this redelivery
                self.dups += 1
            else:
                self._problem("violations", f"mpmc message {tag}/{seq} delivered again (to consumer {cid}) "
                                            "with no killed consumer holding it")
        d[seq] = min(255, d[seq] + 1)
        h.add(cid)

    def _on_info(self, info) -> None:
        what = info.get("what")
        if what == "torn":
            self._problem("torn", info["detail"])
        elif what == "loss":
            self._problem("losses", info["detail"])
        elif what == "violation":
            self._problem("violations", info["detail"])
        elif what == "error":
            self._problem("violations", f"child {info['cid']} failed: {info['error']}")
        elif what == "interrupts":
            self.interrupts += info["n"]
        else:
            if what == "joined":
                self.joined.add(info["cid"])
            self.infos.append(info)

    def progress(self) -> str:
        with self.lock:
            c = self.counts
            pj = c["mpmc producers joined"] + c["mpsc producers joined"]
            pk = c["mpmc producers killed"] + c["mpsc producers killed"]
            return (f"joins: mpmc consumers +{c['mpmc consumers joined']} -{c['mpmc consumers left']} "
                    f"x{c['mpmc consumers killed']}, producers +{pj} x{pk}, subscribers +{c['subscribers joined']} "
                    f"-{c['subscribers left']} x{c['subscribers killed']}, redelivered {self.dups}")

    # -- the end -------------------------------------------------------------------
    def stop(self) -> int:
        """Stop the churn, let the broadcast producer pass every dead
        subscriber, end every stream, wait for every child; returns bad exits."""
        self.stop_churn.set()
        self.churn_thread.join()
        time.sleep(1.5)          # the broadcast producer goes on past (and drops) the last killed subscriber
        self.jb.set(J_STOP, 1)
        with self.lock:          # consumers that leave no longer get replaced: one that drains to the end
            self._spawn(("mpmc", "consumer", -1), "consumer", j_mpmc_consumer, float("inf"), 0, -1, self.jb)
            self.counts["mpmc consumers joined"] += 1
        bad = 0
        deadline = time.monotonic() + 60
        for cid, (slot, role, p) in list(self.procs.items()):
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                _dump_stuck(p, f"--joins: child {cid} ({role}) did not finish within 60 s of the end")
                _kill(p)
                p.join()
                bad += 1
            elif cid not in self.killed and p.exitcode != 0:
                bad += 1
                print(f"--joins: child {cid} ({role}) exited with code {p.exitcode}", file=sys.stderr)
        self.reader_done = True
        self.reader_thread.join()
        self._drain()
        return bad

    def report(self) -> dict:
        """Final accounting; prints its lines, returns totals to add to the soak's."""
        P = self.problems
        killed_consumers = {c for c in self.killed if self.procs[c][1] == "consumer"}
        # mpmc: everything each producer tag committed was delivered
        delivered = 0
        for tag, ring in self.tag_ring.items():
            if ring != "mpmc":
                continue
            d = self.delivered.get(tag, bytearray())
            was_killed = tag not in self.sent
            hi = self.jb.get(tag) + 1 if was_killed else self.sent[tag]     # 0..hi-1 were committed
            lo = hi + 1 if was_killed else hi      # a killed one's next may have been committed unrecorded
            if len(d) < lo:
                d.extend(bytes(lo - len(d)))
            nmissing = d.count(0, 0, hi)
            if nmissing:
                first = [s for s in range(hi) if not d[s]][:5] if nmissing < 1000 else f"{d.find(0, 0, hi)}..."
                self._problem("losses", f"mpmc producer {tag}: {nmissing} of {hi} messages never delivered, "
                                        f"first {first}", nmissing)
            if d.count(0, lo) != len(d) - lo:
                extra = [s for s in range(lo, len(d)) if d[s]][:5]
                self._problem("violations", f"mpmc producer {tag}: messages {extra} delivered, never committed")
            delivered += lo - d.count(0, 0, lo)
        # what killed consumers held and nobody got again (at most one each may have been released)
        left = {}
        for key, h in self.holders.items():
            for c in h:
                left.setdefault(c, []).append(key)
        for c, keys in left.items():
            if c in killed_consumers:
                if len(keys) > 1:
                    self._problem("losses", f"mpmc consumer {c} was killed holding {sorted(keys)}; "
                                            f"{len(keys) - 1} of them never came again", len(keys) - 1)
            else:
                self._problem("violations", f"mpmc consumer {c} (not killed) never released {sorted(keys)[:5]}")
        # mpsc: each producer's messages, all of them (a killed one's: up to its last commit)
        mpsc_end = [i for i in self.infos if i.get("what") == "mpsc-end"]
        if not mpsc_end or mpsc_end[0]["early"]:
            self._problem("violations", f"mpsc: the stream ended before the anchor producer closed: "
                                        f"{mpsc_end[0]['end'] if mpsc_end else 'no end reported'}")
        mpsc_msgs = 0
        for tag, ring in self.tag_ring.items():
            if ring != "mpsc":
                continue
            got = self.mpsc_last.get(tag, -1)
            if tag in self.sent:
                ok = got == self.sent[tag] - 1
            else:
                ok = self.jb.get(tag) <= got <= self.jb.get(tag) + 1
            if not ok:
                self._problem("losses", f"mpsc producer {tag} ({self.tag_fate[tag]}): sent "
                                        f"{self.sent.get(tag, 'until killed')}, committed up to {self.jb.get(tag)}, "
                                        f"received up to {got}", max(1, self.jb.get(tag) - got))
            mpsc_msgs += got + 1
        # broadcast: the subscribers from the start got everything; the dead were dropped
        btag = next(t for t, r in self.tag_ring.items() if r == "broadcast")
        bsent = self.sent.get(btag, -1)
        full_ids = [c for c, (slot, role, p) in self.procs.items() if role == "full"]
        for c in full_ids:
            d = [i for i in self.infos if i.get("what") == "sub-done" and i["cid"] == c]
            if not d or (d[0]["first"], d[0]["last"], d[0]["count"]) != (0, bsent - 1, bsent):
                self._problem("losses", f"broadcast subscriber {c} from the start: {d[0] if d else 'no report'}, "
                                        f"{bsent} sent")
        st = {k: shmring.Ring.attach(w[0]) for k, w in self.where.items()}
        stats = {k: r.stats() for k, r in st.items()}
        for r in st.values():
            r.close()
        if stats["broadcast"]["dropped"] != self.counts["subscribers killed"]:
            self._problem("violations", f"broadcast: {self.counts['subscribers killed']} subscribers killed, "
                                        f"{stats['broadcast']['dropped']} dropped")
        red = stats["mpmc"]["redelivered"]
        if red < self.dups:
            self._problem("violations", f"mpmc: {self.dups} redeliveries seen but the ring counted {red}")
        note = "" if red <= self.dups + len(killed_consumers) else \
            f" (more than the {self.dups} seen + {len(killed_consumers)} killed: a slow live taker's requeue?)"
        for w in self.where.values():
            shmring.unlink(w[0], missing_ok=True)
        c = self.counts
        print(f"  --joins rings          mpmc {delivered:,} msgs, mpsc {mpsc_msgs:,} msgs, broadcast {bsent:,} msgs "
              f"to {2 + c['subscribers joined']} subscribers")
        print(f"    mpmc consumers       {c['mpmc consumers joined']:>6,} joined, {c['mpmc consumers left']:,} left, "
              f"{c['mpmc consumers killed']:,} killed; producers {c['mpmc producers joined']:,} joined, "
              f"{c['mpmc producers killed']:,} killed")
        print(f"    mpsc producers       {c['mpsc producers joined']:>6,} joined, {c['mpsc producers closed']:,} "
              f"closed, {c['mpsc producers detached']:,} detached, {c['mpsc producers killed']:,} killed; "
              f"abandoned claims skipped {stats['mpsc']['abandoned']:,}")
        print(f"    subscribers          {c['subscribers joined']:>6,} joined, {c['subscribers left']:,} left, "
              f"{c['subscribers killed']:,} killed, {stats['broadcast']['dropped']:,} dropped")
        print(f"    mpmc redelivered     {self.dups:>6,} duplicates, each of a message a killed consumer held "
              f"(ring counter: {red:,}{note})")
        for k, v in P.items():
            for line in v[:10]:
                print(f"[--joins {k}] {line}", file=sys.stderr)
        return dict(self.nproblems)


# --------------------------------------------------------------------------- supervisor

class Soak:
    def __init__(self, args):
        self.args = args
        self.ctx = mp.get_context("fork")
        self.tmp = tempfile.TemporaryDirectory(prefix="shmring-soak-")
        self.rings, self.books, self.procs = [], [], {}
        self.kills = {"producer": 0, "consumer": 0}
        self.lock = threading.Lock()
        self.rng = random.Random(args.seed)
        for i in range(args.rings):
            if i % 2:
                where = (None, os.path.join(self.tmp.name, f"ring{i}.ring"))
            else:
                where = (f"soak-{os.getpid()}-{i}", None)
            shmring.Ring.create(where[0], args.capacity, path=where[1]).close()
            self.rings.append(where)
            self.books.append(Book())
        self.joins = Joins(self) if args.joins else None
        SIGINT_JOINS[0] = args.sigint                # inherited by the --joins children

    def start(self, i, role):
        if role == "producer":
            p = self.ctx.Process(target=producer_main, args=(self.rings[i], self.books[i], self.args.inject_loss,
                                                             self.args.sigint), daemon=True)
        else:
            p = self.ctx.Process(target=consumer_main, args=(self.rings[i], self.books[i],
                                                             self.rng.randrange(1 << 30), self.args.sigint),
                                 daemon=True)
        _start_blocked(p)
        self.procs[(i, role)] = p

    def chaos(self, stop: threading.Event):
        while not stop.wait(self.rng.uniform(0.3, 2 * self.args.kill_every - 0.3)):
            with self.lock:
                i, role = self.rng.randrange(len(self.rings)), self.rng.choice(["producer", "consumer"])
                p = self.procs[(i, role)]
                if p.is_alive():
                    _kill(p)
                    p.join()
                    self.kills[role] += 1
                self.start(i, role)

    def pelt(self, stop: threading.Event):
        """--sigint: SIGINT to a random target (spsc producers and consumers;
        with --joins also the multi-party consumers and subscribers), each
        about every sigint_every seconds."""
        rng = random.Random(self.args.seed + 11)
        while True:
            with self.lock:
                targets = list(self.procs.values())
                if self.joins:
                    with self.joins.lock:
                        targets += [p for slot, role, p in self.joins.procs.values()
                                    if role in ("consumer", "full", "sub")]
                if stop.wait(rng.uniform(0, 2 * self.args.sigint_every / len(targets))):
                    return
                p = rng.choice(targets)
                if p.exitcode is None:               # not reaped: the pid is still this child's
                    try:
                        os.kill(p.pid, signal.SIGINT)
                        self.sigints += 1
                    except ProcessLookupError:
                        pass

    def run(self) -> int:
        a = self.args
        t0 = time.monotonic()
        for i in range(len(self.rings)):
            self.start(i, "consumer")
            self.start(i, "producer")
        if self.joins:
            self.joins.start()
        stop = threading.Event()
        th = threading.Thread(target=self.chaos, args=(stop,), daemon=True)
        th.start()
        self.sigints = 0
        if a.sigint:
            pelter = threading.Thread(target=self.pelt, args=(stop,), daemon=True)
            pelter.start()
        end = t0 + a.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(a.report_every, max(0.0, end - time.monotonic())))
            with self.lock:
                for (i, role), p in list(self.procs.items()):
                    if not p.is_alive() and p.exitcode != -signal.SIGKILL:
                        print(f"ring {i} {role} exited by itself with code {p.exitcode}", file=sys.stderr)
                        self.start(i, role)
            d = sum(b.get(LAST_RECEIVED) + 1 for b in self.books)
            print(f"  {time.monotonic() - t0:6.0f} s  {d:>12,} messages  kills {self.kills}"
                  + (f"  {self.joins.progress()}" if self.joins else ""), flush=True)
        stop.set()
        th.join()
        if a.sigint:
            pelter.join()
        with self.lock:                        # replace whatever is dead, then end every stream
            for (i, role), p in list(self.procs.items()):
                if not p.is_alive():
                    self.start(i, role)
            for b in self.books:
                b.set(STOP, 1)
            bad_exit = 0
            for (i, role), p in self.procs.items():
                p.join(15)
                if p.is_alive():                  # slow: show where it is while it still is
                    _dump_stuck(p, f"ring {i} {role} has not finished 15 s after the end")
                    p.join(45)
                if p.is_alive():
                    _dump_stuck(p, f"ring {i} {role} did not finish within 60 s of the end")
                if p.is_alive() or p.exitcode != 0:
                    bad_exit += 1
                    print(f"ring {i} {role} ended with exit code {p.exitcode}", file=sys.stderr)
        if self.joins:
            bad_exit += self.joins.stop()
        return self.report(time.monotonic() - t0, bad_exit)

    def report(self, elapsed, bad_exit) -> int:
        tot = {k: 0 for k in ("delivered", "receipts", "bytes", "redelivered", "losses", "torn", "violations")}
        unfinished = 0
        for i, b in enumerate(self.books):
            committed, received = b.get(COMMITTED), b.get(LAST_RECEIVED)
            if committed != received or not b.get(DONE):
                unfinished += 1
                tot["losses"] += max(0, committed - received)
                print(f"ring {i}: committed up to {committed}, received up to {received}, "
                      f"drained={bool(b.get(DONE))}", file=sys.stderr)
            tot["delivered"] += received + 1          # distinct: 0..received, gaps are reported as losses
            tot["receipts"] += b.get(DELIVERED)
            tot["bytes"] += b.get(BYTES)
            tot["redelivered"] += b.get(REDELIVERED)
            tot["losses"] += b.get(LOSSES)
            tot["torn"] += b.get(TORN)
            tot["violations"] += b.get(VIOLATIONS)
            tot["interrupts"] = tot.get("interrupts", 0) + b.get(INTERRUPTS)
        for where in self.rings:
            shmring.unlink(where[0], path=where[1], missing_ok=True)
        self.tmp.cleanup()
        kills = self.kills["producer"] + self.kills["consumer"]
        print()
        joins = self.joins.report() if self.joins else {}
        for k, v in joins.items():
            tot[k] += v
        print(f"shmring soak: {len(self.rings)} rings ({(len(self.rings) + 1) // 2} POSIX, "
              f"{len(self.rings) // 2} file-backed), capacity {self.args.capacity:,} B, {elapsed / 60:.1f} min")
        print(f"  messages delivered   {tot['delivered']:>14,}  ({tot['bytes'] / 1e6:,.1f} MB, "
              f"{tot['delivered'] / elapsed:,.0f} msg/s)")
        print(f"  kills survived       {kills:>14,}  (producer {self.kills['producer']:,}, "
              f"consumer {self.kills['consumer']:,})")
        if self.args.sigint:
            print(f"  SIGINTs sent         {self.sigints:>14,}  (to spsc producers and consumers"
                  + (", --joins consumers and subscribers)" if self.joins else ")"))
            if self.joins:
                print(f"  --joins interrupts   {self.joins.interrupts:>14,}  (landed in consumers and subscribers "
                      "that finished; killed ones do not report)")
            print(f"  interrupts landed    {tot['interrupts']:>14,}  (KeyboardInterrupts raised in shmring calls, "
                  "each retried)")
        print(f"  redelivered          {tot['redelivered']:>14,}  (unreleased when their consumer was killed)")
        print(f"  receipts             {tot['receipts']:>14,}  (every recv, redeliveries included)")
        print(f"  losses               {tot['losses']:>14,}")
        print(f"  torn                 {tot['torn']:>14,}")
        print(f"  violations           {tot['violations']:>14,}")
        print(f"  bad exits            {bad_exit:>14,}")
        ok = not (tot["losses"] or tot["torn"] or tot["violations"] or bad_exit or unfinished)
        print("  result               " + ("OK" if ok else "FAILED"))
        return 0 if ok else 1


def main(argv=None) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)    # inherited by every child (fork)
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="how long to run (default 3)")
    ap.add_argument("--rings", type=int, default=2, help="rings, each with a producer and a consumer (default 2)")
    ap.add_argument("--capacity", type=int, default=1 << 14, help="ring capacity in bytes (default 16384)")
    ap.add_argument("--kill-every", type=float, default=1.0, help="mean seconds between kills (default 1)")
    ap.add_argument("--report-every", type=float, default=15.0, help="progress line every N seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--joins", action="store_true",
                    help="add an mpmc, an mpsc and a broadcast ring whose consumers, producers and subscribers "
                         "join, leave and are killed all along, with the same exact accounting")
    ap.add_argument("--sigint", action="store_true",
                    help="also send SIGINT (Ctrl-C) storms to the spsc producers and consumers; each "
                         "KeyboardInterrupt raised inside shmring is retried and the accounting must still be exact")
    ap.add_argument("--sigint-every", type=float, default=0.005,
                    help="mean seconds between SIGINTs to each spsc process (default 0.005)")
    ap.add_argument("--inject-loss", action="store_true",
                    help="self-test: producers skip sequence 1000 (--joins: every mpmc consumer leaves its "
                         "500th message unreported); the run must then FAIL with losses")
    args = ap.parse_args(argv)
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
