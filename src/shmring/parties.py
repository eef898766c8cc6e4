"""Multi-party rings (kinds ``mpsc``, ``broadcast``, ``mpmc``): the Python half.

The per-message protocol (claim by CAS, commit by stamp, take by CAS) is in
``_core.c``; the layout is the multi-party diagram in :mod:`shmring.layout`.
This module holds what runs rarely and needs ``/proc``: joining and leaving
the producer table (an entry is claimed and given back with
:mod:`shmring.roles`), reclaiming the entries of dead processes, turning
abandoned claims into skips, requeueing what a dead work-sharing consumer
held, evicting a lagging subscriber, and the ``stats()`` of these rings.
"""
from __future__ import annotations

import math
import secrets
import struct
import time

from . import layout as L
from .errors import CorruptSegmentError, HandleClosed
from .pausepoints import pause
from .roles import claim_entry, give_back, holder_alive, release, take_over, withdraw_waits

GRACE = 0.5        # seconds a claim stays unstamped (its producer dead) before it is skipped
DEFAULT_PARTIES = 64


def geometry_args(kind: int, max_producers, max_consumers) -> tuple[int, int]:
    """Validated table sizes for a new ring of ``kind``."""
    def check(v, what, default):
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= L.MP_MAX_PARTIES:
            raise ValueError(f"{what} must be an int from 1 to {L.MP_MAX_PARTIES}, got {v!r}")
        return v
    if kind == L.KIND_MPSC:
        if max_consumers not in (None, 1):
            raise ValueError("an mpsc ring has exactly one consumer (max_consumers=1)")
        return check(max_producers, "max_producers", DEFAULT_PARTIES), 1
    if kind == L.KIND_BROADCAST:
        if max_producers not in (None, 1):
            raise ValueError("a broadcast ring has exactly one producer (max_producers=1)")
        return 1, check(max_consumers, "max_consumers", DEFAULT_PARTIES)
    return (check(max_producers, "max_producers", DEFAULT_PARTIES),
            check(max_consumers, "max_consumers", DEFAULT_PARTIES))


NEVER_NS = (1 << 64) - 1       # evict_after_ns meaning "never" (evict_after=math.inf)


def evict_after_ns(seconds: float) -> int:
    """``evict_after`` in the header's u64 nanoseconds: inf, or anything past
    what a u64 holds (584 years), is NEVER_NS."""
    return NEVER_NS if seconds * 1e9 >= NEVER_NS else int(seconds * 1e9)


def write_multi_header(buf, *, maxp: int, maxc: int, policy: int, expected: int, evict_after: float) -> None:
    """The multi-party fields of a fresh ring, written before anyone can attach
    (``ready`` is stored after them)."""
    key = secrets.randbits(64) & ~0xF or 0x5EED0
    g = L.multi_geometry(0, maxp, maxc)
    L.MP_STRUCT.pack_into(buf, L.MP_OFF_KEY, key, maxp, maxc, policy, expected, evict_after_ns(evict_after),
                          g["prod_table"], g["cons_table"])
    for i in range(maxc):
        struct.pack_into("<Q", buf, g["cons_table"] + i * L.MP_ENTRY + L.CE_POS, L.POS_FREE)


def read_multi_fields(buf) -> dict:
    return dict(zip(L.MP_FIELDS, L.MP_STRUCT.unpack_from(buf, L.MP_OFF_KEY)))


def check_multi_header(h: dict, buf, what: str) -> dict:
    """The multi-party fields of a header, checked against its geometry."""
    m = read_multi_fields(buf)
    maxp, maxc = m["max_producers"], m["max_consumers"]
    if not (1 <= maxp <= L.MP_MAX_PARTIES and 1 <= maxc <= L.MP_MAX_PARTIES) or m["policy"] > 1:
        raise CorruptSegmentError(f"{what} has impossible table sizes {maxp} / {maxc} or policy {m['policy']}")
    g = L.multi_geometry(h["capacity"], maxp, maxc)
    if (h["data_offset"], h["max_message"], h["segment_size"], m["prod_table"], m["cons_table"]) != \
            (g["data_offset"], g["max_message"], g["segment_size"], g["prod_table"], g["cons_table"]):
        raise CorruptSegmentError(f"{what} has inconsistent multi-party header fields")
    h.update(m)
    h["geometry"] = g
    return h


class Tables:
    """The producer and consumer tables of one mapped multi-party ring."""

    def __init__(self, region, header: dict, label: str, locks):
        self.region = region
        self.locks = locks                  # this process's liveness locks on the segment
        self.kind = header["kind"]
        self.maxp = header["max_producers"]
        self.maxc = header["max_consumers"]
        self.ptab = header["prod_table"]
        self.ctab = header["cons_table"]
        self.label = label
        ns = header["evict_after_ns"]
        self.evict_after = math.inf if ns == NEVER_NS else ns / 1e9
        self.capacity = header["capacity"]
        self.evicting = header["policy"] == L.POLICIES["evict"]

    def alive(self, line: int, word: int) -> bool:
        """Whether ``word``, the owner of the entry at ``line``, is a live holder."""
        return holder_alive(self.locks, line, word)

    def take(self, line: int, word: int) -> bool:
        """Take the entry at ``line`` over from ``word`` (its lock, then its owner word)."""
        return take_over(self.region, self.locks, line, word)

    def give(self, line: int) -> None:
        give_back(self.region, self.locks, line)

    def pline(self, i: int) -> int:
        return self.ptab + i * L.MP_ENTRY

    def cline(self, i: int) -> int:
        return self.ctab + i * L.MP_ENTRY

    # -- producers --------------------------------------------------------------
    # Whether the stream has ended is decided on the producer entries' session
    # words (R36): each says whether its holder is joined and counts the
    # sessions that ended or died in it, so every join, end, leave and death
    # is one store to one word that whoever holds the entry owns.  The state
    # word orders joins against the consumer that decides the end (R37).
    def producers_done(self) -> bool:
        """Whether the stream has ended (looks only: never seals)."""
        return self.region.producers_ended(False)

    def _session(self, slot: int, joined: bool, done: int = 0) -> None:
        """R36: our entry's session word: JOINED set or cleared, ``done``
        sessions more counted.  Only the entry's holder writes it."""
        word = self.pline(slot) + L.PE_SESSION
        s = self.region.load_u64(word)
        self.region.store_u64(word, ((s & ~L.PE_JOINED) + (done << 1)) | (L.PE_JOINED if joined else 0))

    def join_producer(self) -> int:
        r, pline = self.region, self.pline
        pause("producer_claim")
        slot = claim_entry(r, self.locks, [pline(i) for i in range(self.maxp)], "producer", self.label,
                           L.KIND_NAMES[self.kind], self.reclaim_producer)
        # R25: the entry is ours now; an intent left in it by a dead holder would
        # make that holder's abandoned claim look live forever.
        r.store_u64(pline(slot) + L.PE_INTENT, 0)
        pause("producer_claimed")
        self._session(slot, True)                          # R36: joined in our entry first ...
        word = L.MP_OFF_PRODUCERS + L.MP_STATE
        while True:
            st = r.load_u64(word)                          # R37: ... then counted, unless sealed
            if st & L.MP_STATE_ENDED:
                self._session(slot, False)
                release(r, self.locks, pline(slot))
                raise HandleClosed(f"the stream of {self.label} has ended (every producer closed it); "
                                   "create a new ring for a new stream")
            if r.cas_u64(word, st, st + 1):
                break
        r.fetch_add_u64(L.MP_OFF_PRODUCERS + L.MP_SESSIONS, 1)
        return slot

    def reclaim_producer(self, i: int, word: int) -> bool:
        """A dead producer's entry: take it over (one CAS from ``word``), take
        its announced sleeps off the space wake word (R29), count its session
        dead if it was joined (R36), free it.  Its claim, if it held one, is
        skipped by the consumer that reaches it."""
        r, line = self.region, self.pline(i)
        if not self.take(line, word):
            return False
        withdraw_waits(self.region, line + L.PE_WAITING, L.OFF_SPACE_WAKE)
        if r.load_u64(line + L.PE_SESSION) & L.PE_JOINED:
            r.fetch_add_u64(L.MP_OFF_PRODUCERS + L.MP_DEAD, 1)     # R11: before the end it makes
            self._session(i, False, 1)
            r.wake(L.OFF_DATA_WAKE)
        self.give(line)
        return True

    def reap_producers(self) -> None:
        for i in range(self.maxp):
            w = self.region.load_u64(self.pline(i))
            if w and not self.alive(self.pline(i), w):
                self.reclaim_producer(i, w)

    def end_producer(self, slot: int, aborted: bool) -> None:
        # R50: re-doable.  A redo after an interrupt finds the session ended
        # (JOINED clear) and only gives the entry back; one interrupted
        # between the counters and the end counts them twice (only the
        # "aborted" count has a meaning, and it was already non-zero).
        r = self.region
        if r.load_u64(self.pline(slot) + L.PE_SESSION) & L.PE_JOINED:
            if aborted:
                r.fetch_add_u64(L.MP_OFF_PRODUCERS + L.MP_ABORTED, 1)   # R11: before the end it makes
            r.fetch_add_u64(L.MP_OFF_PRODUCERS + L.MP_ENDED, 1)
            pause("producer_ended")
            self._session(slot, False, 1)                  # R36: the end, one store
        r.wake(L.OFF_DATA_WAKE)
        pause("producer_counted")
        release(r, self.locks, self.pline(slot))

    def leave_producer(self, slot: int) -> None:
        r = self.region                                    # R50: re-doable, as end_producer
        if r.load_u64(self.pline(slot) + L.PE_SESSION) & L.PE_JOINED:
            r.fetch_add_u64(L.MP_OFF_PRODUCERS + L.MP_SESSIONS, (1 << 64) - 1)
            self._session(slot, False)                     # R36: no longer joined, nothing counted
        r.wake(L.OFF_DATA_WAKE)
        pause("producer_counted")
        release(r, self.locks, self.pline(slot))

    def skip_abandoned(self, consumer, stuck_since: dict) -> None:
        """If the reader has waited at one unstamped claim for GRACE seconds
        and no live producer holds it, skip it (C writes a T_SKIP record)."""
        pos = consumer._stuck()
        now = time.monotonic()
        if pos is None:
            stuck_since.clear()
            return
        first = stuck_since.setdefault(pos, now)
        if len(stuck_since) > 1:
            stuck_since.clear()
            stuck_since[pos] = now
            return
        if now - first < GRACE:
            return
        r, nxt = self.region, 0
        # R9: the skip is bounded by the cursor as it was *before* the scan: a
        # claim made after this load is beyond it, and every claim below it
        # stored its intent before its CAS (R6), so the scan sees it.
        cursor = r.load_u64(L.MP_OFF_CURSOR)
        for i in range(self.maxp):
            intent = r.load_u64(self.pline(i) + L.PE_INTENT)
            if not intent & L.INTENT_BIT:
                continue
            at = intent & ~L.INTENT_BIT
            if at == pos and self.alive(self.pline(i), r.load_u64(self.pline(i))):
                return                              # a live producer is writing it
            if at > pos and (nxt == 0 or at < nxt):
                nxt = at
        pause("skip_scanned")
        consumer._skip_abandoned(pos, nxt, cursor)
        stuck_since.clear()

    # -- broadcast subscribers --------------------------------------------------------
    def drop_subscriber(self, i: int, word: int) -> bool:
        """Free the entry of a dead subscriber whose owner word is ``word``.

        R27: one CAS from ``word`` to our own word decides it; the position
        word is freed only while the entry is ours (nobody can join it), then
        the entry is given back.  A dropper that loses the CAS touches nothing."""
        r, line = self.region, self.cline(i)
        if not self.take(line, word):
            return False
        pause("drop_subscriber")
        withdraw_waits(self.region, line + L.CE_WAITING, L.OFF_DATA_WAKE)
        r.store_u64(line + L.CE_POS, L.POS_FREE)
        self.give(line)
        r.fetch_add_u64(L.MP_OFF_COUNTERS + L.MP_DROPPED, 1)
        r.wake(L.OFF_SPACE_WAKE)
        return True

    def join_position(self, slot: int, start: str) -> int:
        """Store a safe starting position in our entry (see mp_gate in _core.c)."""
        r, line = self.region, self.cline(slot)
        for _ in range(100_000):
            t = r.load_u64(L.MP_OFF_RELEASE)
            cursor = r.load_u64(L.MP_OFF_CURSOR)
            if t % L.MREC_ALIGN or t > cursor:
                self._check_position(t, "oldest-intact position")       # raises
            if cursor - t > self.capacity:
                continue        # R10: the producer lapped it since we read it: look again, not corruption
            r.store_u64(line + L.CE_POS, t)
            if r.load_u64(L.MP_OFF_RELEASE) == t:
                break
        else:
            raise CorruptSegmentError(f"{self.label}: the oldest-intact position never settled while joining")
        pos = t
        if start == "newest":
            newest = r.load_u64(L.MP_OFF_NEWEST)
            if t <= newest < r.load_u64(L.MP_OFF_CURSOR):
                pos = self._check_position(newest, "newest-record position")
            r.store_u64(line + L.CE_POS, pos)
        r.store_u64(line + L.CE_BASE, self.total_sent())
        r.store_u64(line + L.CE_RECEIVED, 0)
        return pos

    def _check_position(self, pos: int, what: str) -> int:
        """A position read from the segment: 16-aligned, within a capacity behind the cursor."""
        cursor = self.region.load_u64(L.MP_OFF_CURSOR)
        if pos % L.MREC_ALIGN or pos > cursor or cursor - pos > self.capacity:
            raise CorruptSegmentError(f"{self.label}: {what} {pos:#x} is not a record position "
                                      f"(claim cursor {cursor:#x}, capacity {self.capacity})")
        return pos

    def total_sent(self) -> int:
        return sum(self.region.load_u64(self.pline(i) + L.PE_SENT) for i in range(self.maxp))

    def police_subscribers(self, lagging: dict) -> None:
        """Producer side, while blocked: drop dead subscribers; with the evict
        policy, evict one that has held the ring back for ``evict_after`` s."""
        r = self.region
        cursor = r.load_u64(L.MP_OFF_CURSOR)
        positions = {}
        for i in range(self.maxc):
            line = self.cline(i)
            owner = r.load_u64(line + L.CE_OWNER)
            w = r.load_u64(line + L.CE_POS)
            if w == L.POS_FREE or w & L.POS_EVICTED:
                continue
            if owner and not self.alive(line, owner):
                self.drop_subscriber(i, owner)
                continue
            positions[i] = w
        if r.load_u32(L.MP_OFF_POLICY) != L.POLICIES["evict"] or not positions:
            lagging.clear()
            return
        low = min(w & L.POS_MASK for w in positions.values())
        now = time.monotonic()
        for i, w in positions.items():
            p = w & L.POS_MASK
            if p != low:
                lagging.pop(i, None)
                continue
            # (since, last seen): held back by it since `since`, continuously
            # (seen at every policing while blocked), even if it crept forward
            since, seen = lagging.get(i, (now, now))
            if now - seen > 0.5:
                since = now
            lagging[i] = (since, now)
            if now - since < self.evict_after or w & L.POS_HOLD:
                continue
            line = self.cline(i)
            missed = max(0, self.total_sent() - r.load_u64(line + L.CE_BASE) - r.load_u64(line + L.CE_RECEIVED))
            r.store_u64(line + L.CE_MISSED, missed)
            r.store_u64(line + L.CE_MISSED_BYTES, cursor - p)
            if r.cas_u64(line + L.CE_POS, w, w | L.POS_EVICTED):
                r.fetch_add_u64(L.MP_OFF_COUNTERS + L.MP_EVICTED, 1)
                r.wake(L.OFF_DATA_WAKE)
            lagging.pop(i, None)

    # -- work-sharing consumers ----------------------------------------------------------
    def requeue_dead(self, consumer, zero_seen: dict) -> bool:
        """Hand back what dead consumers held, then free their entries; also
        records taken but never marked (the taker died between its two CASes).
        True if nothing in flight is owed: every record is released or held
        by a live consumer.

        R26: an entry is first taken over, by a CAS from the very value that
        showed it orphaned (a dead holder's word, or 0 for a free entry that
        records still name), and only then are the records naming it requeued.
        While the entry is ours nobody can join it, so a record naming it is
        never a newcomer's.  It is freed after a whole walk."""
        r = self.region
        taken = set()

        def take(i, word):
            if self.take(self.cline(i), word):
                taken.add(i)
                withdraw_waits(self.region, self.cline(i) + L.CE_WAITING, L.OFF_DATA_WAKE)

        for i in range(self.maxc):
            w = r.load_u64(self.cline(i) + L.CE_OWNER)
            if w and not self.alive(self.cline(i), w):
                take(i, w)
        records, complete = consumer._inflight()
        orphans = {s - 1 for _, s in records if 1 <= s <= self.maxc and s - 1 not in taken}
        for i in orphans:
            if r.load_u64(self.cline(i) + L.CE_OWNER) == 0:
                take(i, 0)
        pause("requeue_walked")
        for _ in range(3):
            if taken:                                  # walk again: what names our entries is an orphan
                records, complete = consumer._inflight()
            settled = self._requeue_walked(consumer, records, taken, zero_seen)
            if complete or not taken:
                break
        for i in taken:
            self.give(self.cline(i))
        return settled

    def adopt_consumer(self, i: int, word: int) -> bool:
        """mpmc join with no free entry: take dead holder ``word``'s entry for
        ourselves (one CAS, R26), its announced sleeps withdrawn (R29).  The
        joiner then hands back what the dead one held (requeue_adopted)
        before it takes anything, so no record naming the entry is ours."""
        if not self.take(self.cline(i), word):
            return False
        withdraw_waits(self.region, self.cline(i) + L.CE_WAITING, L.OFF_DATA_WAKE)
        return True

    def requeue_adopted(self, consumer, slot: int) -> None:
        """Requeue every record in flight that names ``slot`` (adopted from a
        dead holder, nothing taken by us yet): one whole walk after the
        take-over finds them all (R26)."""
        deadline = time.monotonic() + 10
        while True:
            records, complete = consumer._inflight()
            for pos, state in records:
                if state == slot + 1:
                    consumer._requeue(pos, state)
            if complete:
                return
            if time.monotonic() > deadline:
                raise CorruptSegmentError(f"{self.label}: the records in flight never settled for a whole walk")
            time.sleep(0.001)

    def _requeue_walked(self, consumer, records, taken, zero_seen) -> bool:
        now = time.monotonic()
        seen_zero = {}
        settled = True
        for pos, state in records:
            if state == L.RS_RELEASED:
                continue
            if state == 0:
                first = zero_seen.get(pos, now)
                seen_zero[pos] = first
                if now - first >= GRACE:
                    consumer._requeue(pos, 0)
                settled = False
            elif 1 <= state <= self.maxc and state - 1 in taken:
                consumer._requeue(pos, state)
                settled = False
            elif state == L.RS_REQUEUED:
                settled = False
            elif not 1 <= state <= self.maxc:
                raise CorruptSegmentError(f"{self.label}: record at {pos:#x} has state {state:#x} "
                                          f"(expected 0, 1..{self.maxc}, 0xfffe or 0xffff)")
        zero_seen.clear()
        zero_seen.update(seen_zero)
        return settled

    def live_consumers(self) -> tuple[int, int]:
        """(live, dead pid or 0) over the consumer table."""
        live, dead = 0, 0
        for i in range(self.maxc):
            w = self.region.load_u64(self.cline(i))
            if w:
                if self.alive(self.cline(i), w):
                    live += 1
                else:
                    dead = L.split_owner(w)[0]
        return live, dead

    # -- stats ---------------------------------------------------------------------------
    def stats(self) -> dict:
        r = self.region
        pl, cl = L.MP_OFF_PRODUCERS, L.MP_OFF_COUNTERS
        producers = []
        for i in range(self.maxp):
            line = self.pline(i)
            w, sent = r.load_u64(line), r.load_u64(line + L.PE_SENT)
            if w or sent:
                pid = L.split_owner(w)[0]
                producers.append({"slot": i, "pid": pid or None, "alive": self.alive(line, w),
                                  "sent": sent, "bytes": r.load_u64(line + L.PE_BYTES)})
        cursor = r.load_u64(L.MP_OFF_CURSOR)
        consumers = []
        if self.kind != L.KIND_MPSC:
            for i in range(self.maxc):
                line = self.cline(i)
                w = r.load_u64(line)
                pos = r.load_u64(line + L.CE_POS)
                received = r.load_u64(line + L.CE_RECEIVED)
                if not w and not received:
                    continue
                c = {"slot": i, "pid": L.split_owner(w)[0] or None, "alive": self.alive(line, w), "received": received}
                if self.kind == L.KIND_BROADCAST:
                    c["evicted"] = bool(pos != L.POS_FREE and pos & L.POS_EVICTED)
                    c["lag"] = cursor - (pos & L.POS_MASK) if pos != L.POS_FREE else None
                consumers.append(c)
        return {
            "producers": producers, "consumers": consumers,
            "sent": sum(p["sent"] for p in producers),
            "producer_sessions": r.load_u64(pl + L.MP_SESSIONS), "producers_ended": r.load_u64(pl + L.MP_ENDED),
            "producers_aborted": r.load_u64(pl + L.MP_ABORTED), "producers_dead": r.load_u64(pl + L.MP_DEAD),
            "abandoned": r.load_u64(cl + L.MP_ABANDONED), "evicted": r.load_u64(cl + L.MP_EVICTED),
            "dropped": r.load_u64(cl + L.MP_DROPPED), "requeued_now": r.load_u64(cl + L.MP_REQUEUED),
            "redelivered": r.load_u64(cl + L.MP_REDELIVERED),
        }
