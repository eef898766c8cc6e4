/*
 * spsc.c: the single-producer, single-consumer ring (rules R2, R3, R5).
 *
 * The producer owns write_pos, the consumer read_pos; both only grow.  A
 * record is written with plain stores (nobody can see it yet) and published
 * by the exchange of write_pos; the consumer reads below the write_pos it
 * loaded with acquire, and gives space back by publishing read_pos after its
 * last read of it.  Record: u32 length | u16 type | u16 flags | payload,
 * 8-aligned.  The data area is mapped twice, back to back (R60): a record
 * that crosses the end of the area continues, contiguous, into the second
 * mapping (the start of the area); nothing pads the wrap.
 */
#include "core.h"

/* Claim room for a record of payload_len bytes (<= max_message, so at most a
 * capacity) at write_pos: contiguous even when it wraps (R60).  Nothing is
 * visible to the consumer until spsc_publish.  PEEK_FOUND and the record
 * start, PEEK_EMPTY when the ring is full right now, PEEK_CORRUPT. */
int spsc_claim(Producer *p, uint64_t payload_len, uint64_t *rec_start) {
    Region *r = &p->r;
    uint64_t cap = r->capacity;
    uint64_t total = align8(SHMR_REC_HDR + payload_len);
    uint64_t wp = p->write_pos;
    if (wp + total - p->cached_read > cap) {
        uint64_t rp = load_acquire64(r->base + SHMR_OFF_READ_POS);   /* R3, pairs with the consumer's exchange in consumer_store_read */
        if (rp > wp || wp - rp > cap || (rp & 7)) {
            PyErr_Format(CorruptSegmentError, "consumer position %llu is outside [%llu - capacity, %llu]",
                         (unsigned long long)rp, (unsigned long long)wp, (unsigned long long)wp);
            return PEEK_CORRUPT;
        }
        p->cached_read = rp;
        if (wp + total - rp > cap) return PEEK_EMPTY;
    }
    *rec_start = wp;
    return PEEK_FOUND;
}

/* Write the header of the record claimed at start and publish it. */
void spsc_publish(Producer *p, uint64_t start, uint64_t len, unsigned type) {
    char *h = p->r.data + (start & p->r.mask);
    *(uint32_t *)h = (uint32_t)len;
    *(uint16_t *)(h + 4) = (uint16_t)type;
    *(uint16_t *)(h + 6) = 0;
    uint64_t new_wp = start + align8(SHMR_REC_HDR + len);
    p->write_pos = new_wp;
    /* R2: after the record's plain stores; pairs with the acquire of write_pos in spsc_peek */
    publish_and_wake(p->r.base + SHMR_OFF_WRITE_POS, new_wp, p->r.base + SHMR_OFF_DATA_WAKE);
}

/* Load write_pos for a consumer at pos and check it.  0 ok, -1 corrupt. */
static int spsc_load_write(Consumer *c, uint64_t pos) {
    uint64_t wp = load_acquire64(c->r.base + SHMR_OFF_WRITE_POS);   /* R2, pairs with the exchange in spsc_publish */
    if (wp < pos || wp - c->read_pos > c->r.capacity || (wp & 7))
        return corrupt("producer position out of range", pos, wp, c->read_pos);
    c->cached_write = wp;
    return 0;
}

/* Find the next record.  PEEK_FOUND, PEEK_EMPTY, PEEK_END or PEEK_CORRUPT. */
int spsc_peek(Consumer *c, Rec *out) {
    for (;;) {
        uint64_t pos = c->next_pos;
        if (pos == c->cached_write) {
            if (spsc_load_write(c, pos) < 0) return PEEK_CORRUPT;
            if (c->cached_write == pos) {
                /* R5: closed is stored after the producer's last write_pos exchange */
                if (!load_acquire32(c->r.base + SHMR_OFF_PROD_ROLE + SHMR_ROLE_CLOSED)) return PEEK_EMPTY;   /* R5, pairs with the producer's store_u32(closed) */
                if (spsc_load_write(c, pos) < 0) return PEEK_CORRUPT;
                if (c->cached_write == pos) return PEEK_END;
            }
        }
        uint64_t off = pos & c->r.mask;
        uint64_t avail = c->cached_write - pos;
        if (avail < SHMR_REC_HDR) return corrupt("truncated record header", pos, avail, off);
        /* plain reads: below the acquired write_pos the producer no longer writes (R2).
         * The header is 8-aligned below the end of the area: never split (R60). */
        const char *h = c->r.data + off;
        uint64_t len = *(const uint32_t *)h;
        unsigned type = *(const uint16_t *)(h + 4);
        uint64_t need = align8(SHMR_REC_HDR + len);
        if (type != SHMR_T_BYTES && type != SHMR_T_ARRAY && type != SHMR_T_OBJECT)
            return corrupt("unknown record type", pos, type, len);
        /* len <= max_message bounds the record by a capacity: [off, off + need)
         * lies inside the two mappings of the data area (R60) */
        if (len > c->r.max_message || need > avail)
            return corrupt("record length out of bounds", pos, len, avail);
        out->start = pos;
        out->end = pos + need;
        out->off = (Py_ssize_t)(SHMR_HEADER_SIZE + off + SHMR_REC_HDR);
        out->len = (Py_ssize_t)len;
        out->type = (int)type;
        return PEEK_FOUND;
    }
}
