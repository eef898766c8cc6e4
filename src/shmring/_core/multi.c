/*
 * multi.c: multi-party rings (mpsc, broadcast, mpmc): claim by CAS, commit by
 * stamp, take, release, requeue, skip (rules R6 to R18 of docs/design.md).
 *
 *   producer                                       consumer
 *   intent = c | INTENT_BIT           [seq_cst]    R6
 *   CAS(cursor, c, c + size)          [seq_cst]    R6
 *   write header fields and payload   [plain]
 *   exchange(stamp, key ^ c)          [seq_cst]    s = load_acquire(stamp); s == key ^ pos: read   R7
 *   load(data waiters) > 0: wake      [seq_cst]    (R4, the stamp for write_pos)
 *   intent = 0                        [release]    R8
 *
 * Record: u64 stamp | u32 length | u16 type | u16 state | payload, 16-aligned.
 * Delivery follows claim order: a consumer stops at the first unstamped
 * record.  The stamp key is random per ring, so bytes left over from earlier
 * laps (old stamps, payloads) do not pass for a committed record.
 */
#include "core.h"

#include <sched.h>

#define REC_LEN(h)   ((h) + 8)    /* u32 */
#define REC_TYPE(h)  ((h) + 12)   /* u16 */
#define REC_STATE(h) ((h) + 14)   /* u16: mpmc owner slot + 1, SHMR_RS_REQUEUED or SHMR_RS_RELEASED */

/* ------------------------------------------------------------- producers */

/* The lowest live subscriber position, at most upto. */
static uint64_t mp_min_subscriber(Region *r, uint64_t upto) {
    uint64_t m = upto;
    for (uint32_t i = 0; i < r->maxc; i++) {
        uint64_t w = load_seq_cst64(r->ctab + (uint64_t)i * SHMR_MP_ENTRY + SHMR_CE_POS);   /* R10, pairs with the subscriber's position stores */
        if (w == SHMR_POS_FREE || (w & SHMR_POS_EVICTED)) continue;
        w &= SHMR_POS_MASK;
        /* R10: more than a capacity behind is a joiner's stale store of the
         * oldest position (it re-loads it and moves up before reading), not
         * a gate: no live subscriber can fall that far behind. */
        if (w < upto && upto - w > r->capacity) continue;
        if (w < m) m = w;
    }
    return m;
}

/* The position below which a producer may overwrite (gate + capacity). */
uint64_t mp_gate(Region *r, uint64_t wp) {
    if (r->kind != SHMR_KIND_BROADCAST)
        return load_seq_cst64(r->base + SHMR_OFF_READ_POS);   /* R10, pairs with the release-position CAS in mpmc_reclaim / exchange in consumer_store_read */
    /* Broadcast: scan, advertise the new oldest-intact position, scan again.
     * A subscriber joining at "oldest" stores its pos, then re-loads that
     * word: either our second scan sees its pos, or it sees the new value and
     * moves up (store-buffering pair, seq_cst on both sides). */
    uint64_t m1 = mp_min_subscriber(r, wp);
    char *tail = r->base + SHMR_OFF_READ_POS;
    if (m1 > load_seq_cst64(tail)) store_seq_cst64(tail, m1);   /* R10, pairs with the joiner's re-load of the oldest position (parties.py) */
    uint64_t m2 = mp_min_subscriber(r, wp);
    return m2 < m1 ? m2 : m1;
}

/* Claim room for a record of payload_len bytes: PEEK_FOUND (claimed, intent
 * held), PEEK_EMPTY (full) or PEEK_CORRUPT. */
int mp_claim(Producer *p, uint64_t payload_len, uint64_t *rec_start) {
    Region *r = &p->r;
    uint64_t cap = r->capacity, total = align16(SHMR_MREC_HDR + payload_len), wp;
    char *cursor = r->base + SHMR_OFF_WRITE_POS, *intent = p->entry + SHMR_PE_INTENT;
    for (int spins = 0;; spins++) {
        wp = load_acquire64(cursor);   /* R6, pairs with the other producers' cursor CAS */
        if (wp & 15) return corrupt("claim cursor is not 16-aligned", wp, wp, 0);
        if (wp + total - p->cached_read > cap) {   /* contiguous even when it wraps (R60): no padding */
            uint64_t g = mp_gate(r, wp);
            if (g > wp) {                       /* our cursor load is stale, or the gate is corrupt */
                if (g > load_acquire64(cursor))   /* R6, a fresh cursor decides which */
                    return corrupt("release position beyond the claim cursor", wp, g, wp);
                continue;
            }
            if (wp - g > cap) return corrupt("claim cursor more than a capacity ahead of the release position", wp, wp, g);
            p->cached_read = g;
            if (wp + total - g > cap) {
                /* Full: we hold no claim, so no intent either.  A CAS we lost
                 * earlier in this loop may have left one naming the winner's
                 * record; kept while we block, it would make that record look
                 * live-owned forever if its winner died (abandoned-claim check). */
                store_release64(intent, 0);   /* R8, pairs with the intent scan of the abandoned-claim check */
                return PEEK_EMPTY;
            }
        }
        store_seq_cst64(intent, wp | SHMR_INTENT_BIT);   /* R6, before the CAS: read by a consumer that sees the cursor move */
        if (cas_seq_cst64(cursor, wp, wp + total)) break;   /* R6, pairs with the consumers' cursor loads */
        if (spins > 64) sched_yield(); else cpu_relax();
    }
    *rec_start = wp;
    return PEEK_FOUND;
}

static inline void mp_stamp(Region *r, uint64_t pos, uint32_t len, unsigned type, unsigned state) {
    char *h = mp_rec(r, pos);
    *(uint32_t *)REC_LEN(h) = len;
    *(uint16_t *)REC_TYPE(h) = (uint16_t)type;
    *(uint16_t *)REC_STATE(h) = (uint16_t)state;
    /* the release of the record and the store half of the wake-up protocol */
    (void)xchg_seq_cst64(h, r->key ^ pos);   /* R7, pairs with the acquire of the stamp in mp_committed */
}

/* Commit the record claimed at start for claimed_len payload bytes, holding
 * len of them (len <= claimed_len); what is left becomes a T_SKIP record. */
void mp_commit(Producer *p, uint64_t start, uint64_t claimed_len, uint64_t len, unsigned type) {
    Region *r = &p->r;
    uint64_t size = align16(SHMR_MREC_HDR + len), claimed = align16(SHMR_MREC_HDR + claimed_len);
    if (size < claimed)
        mp_stamp(r, start + size, (uint32_t)(claimed - size - SHMR_MREC_HDR), SHMR_T_SKIP, SHMR_RS_RELEASED);
    mp_stamp(r, start, (uint32_t)len, type, type == SHMR_T_SKIP ? SHMR_RS_RELEASED : SHMR_RS_FREE);
    wake_if_waiters(r->base + SHMR_OFF_DATA_WAKE);   /* R4, after the stamp exchange */
    if (r->kind == SHMR_KIND_BROADCAST && type != SHMR_T_SKIP)
        store_release64(r->base + SHMR_MP_OFF_NEWEST, start);   /* R13, where a subscriber joining at "newest" starts */
    store_release64(p->entry + SHMR_PE_INTENT, 0);   /* R8, after the stamp: pairs with the intent scan of the abandoned-claim check */
    if (type != SHMR_T_SKIP) {
        store_relaxed64(p->entry + SHMR_PE_SENT, load_relaxed64(p->entry + SHMR_PE_SENT) + 1);   /* R18, our own counter */
        store_relaxed64(p->entry + SHMR_PE_BYTES, load_relaxed64(p->entry + SHMR_PE_BYTES) + len);   /* R18, our own counter */
    }
}

/* ------------------------------------------------------------- consumers */

/* Every producer that joined has ended or died, and as many as expected did.
 * The truth is in the producer entries (R36): none is joined, and the
 * sessions they count as done reach max(1, expected).  Deciding "ended" seals
 * the state word (R37) by a CAS from the value loaded before the scan, so a
 * producer joining meanwhile makes the seal fail (it is joined: not ended),
 * and none can join after it.  seal = 0 only looks (stats, read-only maps). */
int mp_ended_ex(Region *r, int seal) {
    char *word = r->base + SHMR_OFF_PROD_ROLE + SHMR_MP_STATE;
    uint64_t g = load_seq_cst64(word);   /* R37, before the scan: pairs with the joiners' CAS */
    if (g & SHMR_MP_STATE_ENDED) return 1;
    uint64_t done = 0;
    for (uint32_t i = 0; i < r->maxp; i++) {
        uint64_t s = load_seq_cst64(r->ptab + (uint64_t)i * SHMR_MP_ENTRY + SHMR_PE_SESSION);   /* R36, pairs with the holder's store */
        if (s & SHMR_PE_JOINED) return 0;
        done += s >> 1;
    }
    uint32_t expected = load_relaxed32(r->base + SHMR_MP_OFF_EXPECTED);   /* R1, fixed field after ready */
    if (done < (expected ? expected : 1)) return 0;
    if (!seal) return 1;
    if (pause_at((PyObject *)r, "end_scanned") < 0) PyErr_WriteUnraisable(NULL);   /* tests only */
    if (cas_seq_cst64(word, g, g | SHMR_MP_STATE_ENDED)) return 1;   /* R37 */
    return (load_seq_cst64(word) & SHMR_MP_STATE_ENDED) != 0;   /* R37, another consumer sealed it (else a join came) */
}

int mp_ended(Region *r) { return mp_ended_ex(r, 1); }

/* Nothing committed at pos: PEEK_EMPTY, PEEK_END, PEEK_EVICTED, PEEK_STALE
 * (mpmc: another consumer moved the take cursor on) or PEEK_CORRUPT. */
static int mp_empty(Consumer *c, uint64_t pos) {
    Region *r = &c->r;
    if (r->kind == SHMR_KIND_BROADCAST &&
        (load_seq_cst64(c->posword) & SHMR_POS_EVICTED))   /* R12, pairs with the producer's evicting CAS */
        return PEEK_EVICTED;
    uint64_t cur = load_acquire64(r->base + SHMR_OFF_WRITE_POS);   /* R6, pairs with the producers' cursor CAS */
    if (cur < pos || cur - pos > r->capacity) {
        /* mpmc: pos is the shared take cursor as we read it; while we were
         * preempted the others may have taken, released and reused a lap */
        if (r->kind == SHMR_KIND_MPMC &&
            load_acquire64(r->base + SHMR_MP_OFF_TAKE) != pos)   /* R14, pairs with the take CAS */
            return PEEK_STALE;
        return corrupt("claim cursor out of range", pos, cur, r->capacity);
    }
    if (cur == pos && mp_ended(r) && !mp_committed(r, pos) &&
        load_acquire64(r->base + SHMR_OFF_WRITE_POS) == pos)   /* R11, no claim after the end */
        return PEEK_END;
    return PEEK_EMPTY;
}

/* Size of the committed record at pos (header fields loaded after its stamp),
 * with type and length checked; 0 if they do not make sense. */
static uint64_t mp_size(Region *r, uint64_t pos, uint64_t cursor, uint64_t *len, unsigned *type) {
    char *h = mp_rec(r, pos);
    *len = load_relaxed32(REC_LEN(h));   /* R7, after the acquire of the stamp */
    *type = load_relaxed16(REC_TYPE(h));   /* R7, after the acquire of the stamp */
    uint64_t need = align16(SHMR_MREC_HDR + *len);
    if (*type == SHMR_T_SKIP) return pos + need <= cursor ? need : 0;   /* never read past its header */
    if (*type != SHMR_T_BYTES && *type != SHMR_T_ARRAY && *type != SHMR_T_OBJECT) return 0;
    /* len <= max_message: the record lies inside the two mappings of the data area (R60) */
    return *len <= r->max_message && pos + need <= cursor ? need : 0;
}

static void fill_rec(Region *r, Rec *out, uint64_t pos, uint64_t size, uint64_t len, unsigned type) {
    out->start = pos;
    out->end = pos + size;
    out->off = (Py_ssize_t)payload_offset(r, pos);
    out->len = (Py_ssize_t)len;
    out->type = (int)type;
}

/* ------------------------------------------------------------- broadcast */

static inline int evict_policy(Region *r) { return r->kind == SHMR_KIND_BROADCAST && r->policy == 1; }

/* Broadcast, evict policy: while our pos word carries HOLD the producer does
 * not evict us, so the records at and after it stay intact.  Taken (CAS from
 * our plain position: fails only if the producer evicted us first) before we
 * read a record; dropped once nothing is outstanding. */
int bc_hold(Consumer *c) {
    if (c->holding || c->detached) return 0;
    if (cas_seq_cst64(c->posword, c->read_pos, c->read_pos | SHMR_POS_HOLD)) {   /* R12, against the producer's evicting CAS */
        c->holding = 1;
        return 0;
    }
    uint64_t w = load_seq_cst64(c->posword);   /* R12, what beat our CAS */
    if (w & SHMR_POS_EVICTED) return PEEK_EVICTED;
    char msg[120];   /* PyErr_Format has no %#llx */
    snprintf(msg, sizeof msg, "subscriber position word %#llx, expected %#llx",
             (unsigned long long)w, (unsigned long long)c->read_pos);
    PyErr_SetString(CorruptSegmentError, msg);
    return PEEK_CORRUPT;
}

void bc_unhold_if_idle(Consumer *c) {
    if (!c->holding || c->qlen || c->next_pos != c->read_pos) return;
    c->holding = 0;
    consumer_store_read(c, c->read_pos);
}

/* mpsc / broadcast: the reader's own position walks the records. */
int mp_peek_seq(Consumer *c, Rec *out) {
    Region *r = &c->r;
    if (evict_policy(r)) { int s = bc_hold(c); if (s) return s; }
    for (;;) {
        uint64_t pos = c->next_pos;
        if (!mp_committed(r, pos)) return mp_empty(c, pos);
        uint64_t len, cur = load_acquire64(r->base + SHMR_OFF_WRITE_POS);   /* R6, pairs with the producers' cursor CAS */
        unsigned type;
        uint64_t size = mp_size(r, pos, cur, &len, &type);
        if (!size) return corrupt("bad record header", pos, len, type);
        if (type == SHMR_T_SKIP) {
            if (consumer_skip(c, pos, pos + size) < 0) return PEEK_CORRUPT;
            continue;
        }
        fill_rec(r, out, pos, size, len, type);
        return PEEK_FOUND;
    }
}

/* ------------------------------------------------------------------ mpmc */

/* Advance the shared release position over released records (any consumer
 * may; the CAS decides), waking producers waiting for room. */
static void mpmc_reclaim(Consumer *c) {
    Region *r = &c->r;
    char *rel = r->base + SHMR_OFF_READ_POS;
    for (;;) {
        uint64_t rp = load_acquire64(rel);   /* R15, pairs with the other reclaimers' CAS */
        uint64_t t = load_acquire64(r->base + SHMR_MP_OFF_TAKE), len;   /* R14, pairs with the take CAS */
        unsigned type;
        if (rp >= t || !mp_committed(r, rp)) return;
        if (load_acquire16(REC_STATE(mp_rec(r, rp))) != SHMR_RS_RELEASED) return;   /* R15, pairs with the releaser's CAS in mpmc_release */
        uint64_t size = mp_size(r, rp, t, &len, &type);
        if (!size) return;
        if (cas_seq_cst64(rel, rp, rp + size))   /* R15, also the store half of R4 */
            wake_if_waiters(r->base + SHMR_OFF_SPACE_WAKE);
    }
}

/* The record at start is finished with: mark it released (only if it is
 * still ours: a recovery that took us for dead may have requeued it). */
void mpmc_release(Consumer *c, uint64_t start) {
    if (c->detached) return;
    (void)cas_seq_cst16(REC_STATE(mp_rec(&c->r, start)), (uint16_t)(c->r.slot + 1), SHMR_RS_RELEASED);   /* R15, pairs with the reclaimer's acquire of the state */
    mpmc_reclaim(c);
}

/* Hand a record we took (and have not shown to anybody) back for redelivery. */
int mpmc_give_back(Consumer *c, uint64_t start) {
    if (cas_seq_cst16(REC_STATE(mp_rec(&c->r, start)), (uint16_t)(c->r.slot + 1), SHMR_RS_REQUEUED)) {   /* R16 */
        (void)fetch_add_seq_cst64(c->r.base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED, 1);   /* R16, after the state CAS */
        wake_always(c->r.base + SHMR_OFF_DATA_WAKE);
        return 1;
    }
    return 0;
}

/* The in-flight walks follow record sizes from the release position while
 * other consumers release and producers reuse space: once the release
 * position has passed pos, the bytes there may belong to a newer record (or
 * its payload), so what was read at pos is stale. */
static inline int mpmc_behind(Region *r, uint64_t pos) {
    fence_acquire();   /* R17, orders the record reads above before the re-check below */
    return load_seq_cst64(r->base + SHMR_OFF_READ_POS) > pos;   /* R17, pairs with the reclaimer's CAS */
}

/* The requeued counter is a hint (R16): worth a walk only if it changed since
 * a whole walk of ours found nothing at that value.  A stale non-zero counter
 * (a hostile write, or a consumer killed between a requeue's two steps) then
 * costs one walk, not a walk per call and a wait that never sleeps. */
static inline int mpmc_requeued_hint(Consumer *c) {
    uint64_t v = load_relaxed64(c->r.base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED);   /* R16, a hint: the state CAS decides */
    return v != 0 && v != c->requeued_seen;
}

/* Mark the record at pos ours: CAS its state from `from` to our slot + 1.
 * The state is 16 bits with no lap in it, so a taker stalled longer than a
 * recovery plus a lap would mark a newer record at the same address (ABA):
 * after the CAS the stamp must still be this lap's, else the mark is undone
 * (the newer record goes back to whoever takes it) (R31). */
static int mpmc_mark(Consumer *c, uint64_t pos, uint16_t from) {
    Region *r = &c->r;
    char *h = mp_rec(r, pos);
    uint16_t mine = (uint16_t)(r->slot + 1);
    if (!cas_seq_cst16(REC_STATE(h), from, mine)) return 0;   /* R14 / R16, one taker wins */
    if (load_acquire64(h) == (r->key ^ pos)) return 1;   /* R31, still this lap's record: it cannot be reused while marked */
    (void)cas_seq_cst16(REC_STATE(h), mine, from);   /* R31, a newer lap's: undo */
    return 0;
}

/* Take a record that a recovery requeued (its consumer died holding it). */
static int mpmc_take_requeued(Consumer *c, Rec *out) {
    Region *r = &c->r;
    uint64_t hint = load_acquire64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED);   /* R16, before the walk: a requeue after it changes it */
    uint64_t pos = load_acquire64(r->base + SHMR_OFF_READ_POS);   /* R15, pairs with the reclaimer's CAS */
    uint64_t t = load_acquire64(r->base + SHMR_MP_OFF_TAKE);   /* R14, pairs with the take CAS */
    for (uint64_t n = 0; pos < t && n < r->capacity / 16; n++) {
        uint64_t len;
        unsigned type;
        if (!mp_committed(r, pos)) return 0;      /* reclaimed under us: try again later */
        uint64_t size = mp_size(r, pos, t, &len, &type);
        if (!size) return 0;
        char *st = REC_STATE(mp_rec(r, pos));
        if (mpmc_behind(r, pos)) return 0;        /* a REQUEUED record is never released: it is not here */
        if (type != SHMR_T_SKIP &&
            load_acquire16(st) == SHMR_RS_REQUEUED &&   /* R16, pairs with the requeuing CAS */
            mpmc_mark(c, pos, SHMR_RS_REQUEUED)) {
            (void)fetch_add_seq_cst64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED, (uint64_t)-1);   /* R16 */
            (void)fetch_add_seq_cst64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REDELIVERED, 1);   /* R16 */
            fill_rec(r, out, pos, size, len, type);
            return 1;
        }
        pos += size;
    }
    c->requeued_seen = hint;                  /* a whole walk found nothing for this value */
    return 0;
}

/* Drained and every producer done: the end of the stream only if no record
 * in flight is lost with a dead consumer (Python's _eos_ready requeues what
 * the dead held and says whether anything is still owed).  PEEK_END or
 * PEEK_EMPTY. */
static int mpmc_end(Consumer *c, uint64_t take) {
    if (load_acquire64(c->r.base + SHMR_OFF_READ_POS) == take) return PEEK_END;   /* R15, pairs with the reclaimer's CAS */
    PyObject *ok = PyObject_CallMethodNoArgs((PyObject *)c, str_eos_ready);
    if (!ok) return PEEK_CORRUPT;
    int t = PyObject_IsTrue(ok);
    Py_DECREF(ok);
    return t < 0 ? PEEK_CORRUPT : t ? PEEK_END : PEEK_EMPTY;
}

/* Take the record at the shared take cursor (CAS), then mark it ours. */
int mpmc_peek(Consumer *c, Rec *out) {
    Region *r = &c->r;
    char *take = r->base + SHMR_MP_OFF_TAKE;
    for (;;) {
        if (mpmc_requeued_hint(c) && mpmc_take_requeued(c, out)) return PEEK_FOUND;
        uint64_t pos = load_acquire64(take), len;   /* R14, pairs with the other takers' CAS */
        unsigned type;
        if (pos & 15) return corrupt("take cursor is not 16-aligned", pos, 0, 0);
        if (!mp_committed(r, pos)) {
            if (load_acquire64(take) != pos) continue;   /* R14, moved on while we looked */
            int s = mp_empty(c, pos);
            if (s == PEEK_STALE) continue;
            if (s != PEEK_END) return s;
            s = mpmc_end(c, pos);              /* may have requeued what dead consumers held: take it */
            if (s == PEEK_EMPTY && mpmc_requeued_hint(c) && mpmc_take_requeued(c, out)) return PEEK_FOUND;
            return s;
        }
        uint64_t cur = load_acquire64(r->base + SHMR_OFF_WRITE_POS);   /* R6, pairs with the producers' cursor CAS */
        uint64_t size = mp_size(r, pos, cur, &len, &type);
        if (!size) {
            if (load_acquire64(take) != pos) continue;   /* R14, taken and reused while we looked */
            return corrupt("bad record header", pos, len, type);
        }
        if (!cas_seq_cst64(take, pos, pos + size)) continue;   /* R14, one taker wins */
        if (type == SHMR_T_SKIP) { mpmc_reclaim(c); continue; }
        if (pause_at((PyObject *)c, "mpmc_taken") < 0) return PEEK_CORRUPT;
        /* fails if a recovery requeued it because we were too slow to get here */
        if (!mpmc_mark(c, pos, SHMR_RS_FREE)) continue;
        fill_rec(r, out, pos, size, len, type);
        return PEEK_FOUND;
    }
}

/* Whether a wait for data should end (never consumes anything): the seq_cst
 * condition loads of R4. */
int mp_ready(Consumer *c) {
    Region *r = &c->r;
    uint64_t pos = r->kind == SHMR_KIND_MPMC ? load_seq_cst64(r->base + SHMR_MP_OFF_TAKE) : c->next_pos;   /* R4 */
    /* Committed skips (an aborted or shrunk reservation, an abandoned
     * claim) are not messages: look past a few of them. */
    for (int n = 0; n < 64; n++) {
        if (load_seq_cst64(mp_rec(r, pos)) != (r->key ^ pos)) break;   /* R4, pairs with the stamp exchange */
        uint64_t len, cur = load_acquire64(r->base + SHMR_OFF_WRITE_POS);   /* R6, pairs with the producers' cursor CAS */
        unsigned type;
        uint64_t size = mp_size(r, pos, cur, &len, &type);
        if (!size || (type != SHMR_T_SKIP) || n == 63) return 1;   /* a message (or corruption: the peek says which) */
        pos += size;
    }
    if (r->kind == SHMR_KIND_MPMC) {
        uint64_t q = load_seq_cst64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED);   /* R16, pairs with the requeue's fetch_add */
        if (q && q != c->requeued_seen) return 1;
    }
    if (r->kind == SHMR_KIND_BROADCAST &&
        (load_seq_cst64(c->posword) & SHMR_POS_EVICTED)) return 1;   /* R12, pairs with the evicting CAS */
    if (load_seq_cst64(r->base + SHMR_OFF_WRITE_POS) != pos || !mp_ended(r)) return 0;   /* R4 */
    /* mpmc: with records still in flight the end is decided between wait slices (mpmc_end) */
    return r->kind != SHMR_KIND_MPMC ||
           load_seq_cst64(r->base + SHMR_OFF_READ_POS) == pos;   /* R4, pairs with the reclaimer's CAS */
}

/* ------------------------------------------- recovery (Python slow path) */

/* _stuck() -> position | None: the reader waits at an unstamped record while
 * the claim cursor is past it (its producer is writing it, or died doing so). */
PyObject *Consumer_stuck(Consumer *self, PyObject *unused) {
    Region *r = &self->r;
    if (check_usable(r) < 0) return NULL;
    if (!is_multi(r)) Py_RETURN_NONE;
    uint64_t pos = r->kind == SHMR_KIND_MPMC ? load_acquire64(r->base + SHMR_MP_OFF_TAKE) : self->next_pos;   /* R14 */
    if (mp_committed(r, pos) || load_acquire64(r->base + SHMR_OFF_WRITE_POS) <= pos) Py_RETURN_NONE;   /* R6 */
    return PyLong_FromUnsignedLongLong(pos);
}

/* _skip_abandoned(pos, next_intent, cursor) -> bytes skipped (0: nothing to
 * do).  The caller loaded the claim cursor, then checked that no live
 * producer's intent is pos.  The claim ends at the first later stamped
 * record, the lowest other intent, or that cursor (claims are contiguous, so
 * each is a claim boundary; a dead producer whose intent is lost merges with
 * this skip, which is as correct).  Never beyond the cursor the caller loaded
 * before its scan: a claim made since is not in the scan (R9).  One writer
 * wins the skip by CAS on the stamp word (to a value no stamp can have). */
PyObject *Consumer_skip_abandoned(Consumer *self, PyObject *const *args, Py_ssize_t n) {
    Region *r = &self->r;
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_skip_abandoned(pos, next_intent, cursor)"); return NULL; }
    if (check_usable(r) < 0) return NULL;
    unsigned long long pos = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    unsigned long long nxt = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    unsigned long long scanned = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    if (!is_multi(r) || (pos & 15)) { PyErr_SetString(PyExc_ValueError, "bad position"); return NULL; }
    char *h = mp_rec(r, pos);
    uint64_t old = load_acquire64(h);   /* R9, the value the CAS below is decided from */
    uint64_t cur = load_acquire64(r->base + SHMR_OFF_WRITE_POS);   /* R6, pairs with the producers' cursor CAS */
    if (old == (r->key ^ pos) || cur <= pos) return PyLong_FromLong(0);
    /* mpmc: the others may have moved the take cursor on since the caller saw it stuck there */
    if (r->kind == SHMR_KIND_MPMC && load_acquire64(r->base + SHMR_MP_OFF_TAKE) != pos)   /* R14 */
        return PyLong_FromLong(0);
    if (cur - pos > r->capacity) { corrupt("claim cursor out of range", pos, cur, 0); return NULL; }
    uint64_t limit = scanned < cur ? scanned : cur;
    if (limit <= pos) return PyLong_FromLong(0);
    if (nxt > pos && nxt < limit) limit = nxt;
    if (limit - pos > (1ull << 31)) limit = pos + (1ull << 31);    /* a u32 length; the rest is skipped next */
    uint64_t end = limit;
    for (uint64_t q = pos + 16; q < limit; q += 16)
        if (mp_committed(r, q)) { end = q; break; }
    if (old == ((r->key ^ pos) ^ 1) || !cas_seq_cst64(h, old, (r->key ^ pos) ^ 1)) return PyLong_FromLong(0);   /* R9, one writer wins */
    *(uint32_t *)REC_LEN(h) = (uint32_t)(end - pos - SHMR_MREC_HDR);
    *(uint16_t *)REC_TYPE(h) = SHMR_T_SKIP;
    *(uint16_t *)REC_STATE(h) = SHMR_RS_RELEASED;
    store_seq_cst64(h, r->key ^ pos);   /* R9, commits the skip: pairs with the acquire of the stamp in mp_committed */
    (void)fetch_add_seq_cst64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_ABANDONED, 1);   /* R9, a shared counter */
    wake_always(r->base + SHMR_OFF_DATA_WAKE);
    return PyLong_FromUnsignedLongLong(end - pos);
}

/* _inflight() -> ([(pos, state), ...], complete): mpmc records taken and not
 * reclaimed; complete is False if the walk stopped early (records moved
 * under it: walk again later). */
PyObject *Consumer_inflight(Consumer *self, PyObject *unused) {
    Region *r = &self->r;
    if (check_usable(r) < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    int complete = 0;
    if (r->kind != SHMR_KIND_MPMC) { complete = 1; goto done; }
    uint64_t pos = load_acquire64(r->base + SHMR_OFF_READ_POS);   /* R15, pairs with the reclaimer's CAS */
    uint64_t t = load_acquire64(r->base + SHMR_MP_OFF_TAKE);   /* R14, pairs with the take CAS */
    for (uint64_t k = 0; k <= r->capacity / 16; k++) {
        if (pos >= t) { complete = 1; break; }
        uint64_t len;
        unsigned type;
        if (!mp_committed(r, pos)) break;
        uint64_t size = mp_size(r, pos, t, &len, &type);
        if (!size) break;
        if (type != SHMR_T_SKIP) {
            unsigned state = load_acquire16(REC_STATE(mp_rec(r, pos)));   /* R16, pairs with the state CASes */
            if (mpmc_behind(r, pos)) break;       /* reclaimed while we looked: what we read may be stale */
            PyObject *item = Py_BuildValue("(KI)", (unsigned long long)pos, state);
            if (!item || PyList_Append(out, item) < 0) { Py_XDECREF(item); Py_DECREF(out); return NULL; }
            Py_DECREF(item);
        }
        pos += size;
    }
done:;
    PyObject *res = Py_BuildValue("(NO)", out, complete ? Py_True : Py_False);
    return res;
}

/* _requeue(pos, state) -> bool: hand an mpmc record held as `state` back for redelivery. */
PyObject *Consumer_requeue(Consumer *self, PyObject *const *args, Py_ssize_t n) {
    Region *r = &self->r;
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_requeue(pos, state)"); return NULL; }
    if (check_usable(r) < 0) return NULL;
    unsigned long long pos = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    long st = PyLong_AsLong(args[1]); if (PyErr_Occurred()) return NULL;
    if (r->kind != SHMR_KIND_MPMC || (pos & 15) || st < 0 || st >= SHMR_RS_REQUEUED) {
        PyErr_SetString(PyExc_ValueError, "bad requeue");
        return NULL;
    }
    if (!mp_committed(r, pos) ||
        !cas_seq_cst16(REC_STATE(mp_rec(r, pos)), (uint16_t)st, SHMR_RS_REQUEUED))   /* R16, decided from the state it swaps */
        Py_RETURN_FALSE;
    (void)fetch_add_seq_cst64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED, 1);   /* R16, after the state CAS */
    wake_always(r->base + SHMR_OFF_DATA_WAKE);
    Py_RETURN_TRUE;
}
