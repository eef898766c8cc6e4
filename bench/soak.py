"""Soak test: producers and consumers stream for N minutes while a chaos thread
SIGKILLs random roles and starts replacements; then every sequence is checked.

    python -m bench.soak --minutes 3            # opt-in; not part of the test suite

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

Prints messages delivered, bytes, kills survived per role, redeliveries (the
at-least-once duplicates), losses, torn messages and contract violations.
Exit status 0 only if losses, torn and violations are all zero.
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
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
    BYTES, PROD_STARTS, CONS_STARTS, DONE = range(13)
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


def _attach(where):
    name, path = where
    return shmring.Ring.attach(name, path=path)


# --------------------------------------------------------------------------- roles

def _take(ring, role):
    """Take a role, waiting while the previous (killed) holder is still being reaped."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return getattr(ring, role)(spin=20e-6)
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
        n, t = L.read_record_header(buf, pos, cap)
        if t == L.T_PAD:
            pos += cap - pos % cap
            continue
        off = L.HEADER_SIZE + pos % cap + L.REC_HDR
        last = int.from_bytes(buf[off:off + 8], "little")
        pos += L.record_size(n)
    return last + 1


def producer_main(where, book, inject_loss=False):
    try:
        ring = _attach(where)
        p = _take(ring, "producer")
        book.add(PROD_STARTS)
        seq = _resume_point(ring, book)
        c = book.get(COMMITTED)
        if seq <= c:                                  # COMMITTED is written after each commit: never ahead
            _complain(book, VIOLATIONS, f"producer resumes at {seq} but {c} was committed already")
        while not book.get(STOP):
            try:
                p.send(tagged(seq), timeout=0.5)
            except (shmring.Timeout, shmring.PeerGone):
                continue                              # consumer slow or being replaced
            book.set(COMMITTED, seq)
            seq += 1
            if inject_loss and seq == 1000:
                seq += 1                              # --inject-loss: prove the checker sees a gap
        p.close()
    except Exception:
        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def consumer_main(where, book, seed):
    rng = random.Random(seed)
    try:
        ring = _attach(where)
        c = _take(ring, "consumer")
        book.add(CONS_STARTS)
        prev_recv, prev_rel = book.get(LAST_RECEIVED), book.get(LAST_RELEASED)
        expect = None
        held = []
        while True:
            try:
                m = c.recv(timeout=0.5)
            except (shmring.Timeout, shmring.PeerGone):
                continue                              # producer being replaced
            except shmring.EndOfStream:
                break
            data = m.tobytes()
            seq = int.from_bytes(data[:8], "little")
            if data != tagged(seq):
                _complain(book, TORN, f"message {seq} is not byte-identical")
            if expect is None:                        # first message of this incarnation
                if seq > prev_recv + 1:
                    _complain(book, LOSSES, f"gap: previous consumer got up to {prev_recv}, this one starts at {seq}")
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
                    hm.release()
                    book.set(LAST_RELEASED, s)        # after release (may be stale by one if killed here)
        for s, hm in held:
            hm.release()
            book.set(LAST_RELEASED, s)
        c.close()
        book.set(DONE, 1)
    except Exception:
        traceback.print_exc()
        os._exit(3)
    os._exit(0)


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

    def start(self, i, role):
        if role == "producer":
            p = self.ctx.Process(target=producer_main, args=(self.rings[i], self.books[i], self.args.inject_loss),
                                 daemon=True)
        else:
            p = self.ctx.Process(target=consumer_main, args=(self.rings[i], self.books[i],
                                                             self.rng.randrange(1 << 30)), daemon=True)
        p.start()
        self.procs[(i, role)] = p

    def chaos(self, stop: threading.Event):
        while not stop.wait(self.rng.uniform(0.3, 2 * self.args.kill_every - 0.3)):
            with self.lock:
                i, role = self.rng.randrange(len(self.rings)), self.rng.choice(["producer", "consumer"])
                p = self.procs[(i, role)]
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
                    p.join()
                    self.kills[role] += 1
                self.start(i, role)

    def run(self) -> int:
        a = self.args
        t0 = time.monotonic()
        for i in range(len(self.rings)):
            self.start(i, "consumer")
            self.start(i, "producer")
        stop = threading.Event()
        th = threading.Thread(target=self.chaos, args=(stop,), daemon=True)
        th.start()
        end = t0 + a.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(a.report_every, max(0.0, end - time.monotonic())))
            with self.lock:
                for (i, role), p in list(self.procs.items()):
                    if not p.is_alive() and p.exitcode != -signal.SIGKILL:
                        print(f"ring {i} {role} exited by itself with code {p.exitcode}", file=sys.stderr)
                        self.start(i, role)
            d = sum(b.get(LAST_RECEIVED) + 1 for b in self.books)
            print(f"  {time.monotonic() - t0:6.0f} s  {d:>12,} messages  kills {self.kills}", flush=True)
        stop.set()
        th.join()
        with self.lock:                        # replace whatever is dead, then end every stream
            for (i, role), p in list(self.procs.items()):
                if not p.is_alive():
                    self.start(i, role)
            for b in self.books:
                b.set(STOP, 1)
            bad_exit = 0
            for (i, role), p in self.procs.items():
                p.join(60)
                if p.is_alive() or p.exitcode != 0:
                    bad_exit += 1
                    print(f"ring {i} {role} ended with exit code {p.exitcode}", file=sys.stderr)
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
        for where in self.rings:
            shmring.unlink(where[0], path=where[1], missing_ok=True)
        self.tmp.cleanup()
        kills = self.kills["producer"] + self.kills["consumer"]
        print()
        print(f"shmring soak: {len(self.rings)} rings ({(len(self.rings) + 1) // 2} POSIX, "
              f"{len(self.rings) // 2} file-backed), capacity {self.args.capacity:,} B, {elapsed / 60:.1f} min")
        print(f"  messages delivered   {tot['delivered']:>14,}  ({tot['bytes'] / 1e6:,.1f} MB, "
              f"{tot['delivered'] / elapsed:,.0f} msg/s)")
        print(f"  kills survived       {kills:>14,}  (producer {self.kills['producer']:,}, "
              f"consumer {self.kills['consumer']:,})")
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
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="how long to run (default 3)")
    ap.add_argument("--rings", type=int, default=2, help="rings, each with a producer and a consumer (default 2)")
    ap.add_argument("--capacity", type=int, default=1 << 14, help="ring capacity in bytes (default 16384)")
    ap.add_argument("--kill-every", type=float, default=1.0, help="mean seconds between kills (default 1)")
    ap.add_argument("--report-every", type=float, default=15.0, help="progress line every N seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--inject-loss", action="store_true",
                    help="self-test: producers skip sequence 1000; the run must then FAIL with losses")
    args = ap.parse_args(argv)
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
