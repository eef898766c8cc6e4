/*
 * state.c: copy-on-write shared state, RCU across processes (rules R19-R21;
 * layout: the state diagram in layout.py).  One writer, many readers:
 *
 *   reader pin:   c = load_acquire(current)        R19, pairs with the writer's publish exchange
 *                 exchange(pin, c)       seq_cst   \  R19, store-buffering pair with the writer's
 *                 c2 = load(current)     seq_cst   /  publish exchange + seq_cst pin scan
 *                 c2 != c: retry;  else read slot(c) in place
 *   reader unpin: exchange(pin, 0)       seq_cst   R20, after the last read of the slot
 *   writer:       scan pins (seq_cst), pick a slot != current pinned by nobody,
 *                 write it, exchange(current, version+1 << 8 | slot)   R21
 *
 * Either the reader's re-load sees the writer's newer current (and retries
 * without touching the slot), or the writer's scan sees the reader's pin (and
 * does not reuse the slot).  Every value read from the segment is untrusted.
 */
#include "core.h"

#include <sched.h>

#define ST_MAX_OWN 16        /* pins one handle can hold at once (nested reads, escaped views) */

typedef struct {
    Region r;                        /* the mapping, fork generation and closed flag; its
                                      * word accessors reach the header page and reader table */
    uint64_t len;
    uint32_t nslots, max_readers;
    uint64_t slot_size, first_slot, nbytes;
    uint64_t last_version;           /* highest version this handle saw: versions never go back */
    int n_own;
    int32_t own[ST_MAX_OWN];         /* reader table entries this handle holds */
    uint8_t busy[ST_MAX_OWN];        /* 1 while that entry holds a pin */
    uint32_t next_slot;              /* writer: where the next slot search starts */
} StateCore;

typedef struct {
    Lease l;                         /* owner: the StateCore; readonly unless a writer's draft */
    int own;                         /* index into core->own, -1 for a writer's draft */
    uint64_t version;
    uint32_t slot;
    Py_ssize_t off;                  /* payload, relative to the region base */
    int type;
    unsigned long fork_gen;          /* the process that pinned it is the one that unpins */
} Snapshot;

static inline char *st_entry(StateCore *s, uint32_t i) { return s->r.base + SHMR_HEADER_SIZE + (uint64_t)i * SHMR_ST_ENTRY; }
static inline char *st_slot(StateCore *s, uint32_t k) { return s->r.base + s->first_slot + (uint64_t)k * s->slot_size; }
static inline char *st_current(StateCore *s) { return s->r.base + SHMR_ST_OFF_CURRENT; }

static int StateCore_init(StateCore *self, PyObject *args, PyObject *kw) {
    if (region_map(&self->r, args) < 0) return -1;
    char *b = self->r.base;
    self->len = (uint64_t)self->r.view.len;
    /* Read once and cached: later corruption of the header cannot move our bounds. */
    uint32_t kind = load_relaxed32(b + SHMR_OFF_KIND);   /* R1, fixed field after ready */
    uint32_t ns = load_relaxed32(b + SHMR_ST_OFF_SLOTS);   /* R1, fixed field after ready */
    uint32_t mr = load_relaxed32(b + SHMR_ST_OFF_MAX_READERS);   /* R1, fixed field after ready */
    uint64_t ss = load_relaxed64(b + SHMR_ST_OFF_SLOT_SIZE);   /* R1, fixed field after ready */
    uint64_t tab = load_relaxed64(b + SHMR_ST_OFF_TABLE);   /* R1, fixed field after ready */
    uint64_t first = load_relaxed64(b + SHMR_ST_OFF_FIRST_SLOT);   /* R1, fixed field after ready */
    uint64_t nb = load_relaxed64(b + SHMR_OFF_MAX_MESSAGE);   /* R1, fixed field after ready */
    uint64_t tab_end = SHMR_HEADER_SIZE + (uint64_t)mr * SHMR_ST_ENTRY;
    if (kind != SHMR_KIND_STATE || ns < SHMR_ST_MIN_SLOTS || ns > SHMR_ST_MAX_SLOTS || mr < 1 ||
        mr > SHMR_ST_MAX_READERS || tab != SHMR_HEADER_SIZE || ss % 4096 || ss < SHMR_ST_SLOT_HDR ||
        ss > (1ULL << 44) || nb > ss - SHMR_ST_SLOT_HDR || first % 4096 || first < tab_end ||
        first > self->len || (self->len - first) / ss < ns) {
        PyErr_Format(CorruptSegmentError, "impossible shared-state geometry: kind %u, %u slots of %llu bytes "
                     "at %llu, %u readers, value size %llu, segment %llu bytes", kind, ns,
                     (unsigned long long)ss, (unsigned long long)first, mr, (unsigned long long)nb,
                     (unsigned long long)self->len);
        return -1;
    }
    self->nslots = ns; self->max_readers = mr; self->slot_size = ss; self->first_slot = first; self->nbytes = nb;
    self->r.words_end = first;       /* Python's word accessors: header page and reader table */
    return 0;
}

static int st_usable(StateCore *s) {
    if (s->r.closed || !s->r.has_view) return raise_closed(&s->r);
    if (truncated(&s->r)) { raise_truncated(&s->r); return -1; }
    if (s->r.fork_gen != fork_generation) {
        /* a forked child starts with none of the parent's pins or entries */
        s->n_own = 0;
        s->r.fork_gen = fork_generation;
        s->last_version = 0;
    }
    return 0;
}

/* Decode and check a current word and its slot header.  0 ok, -1 corrupt (exception set). */
static int st_check(StateCore *s, uint64_t cur, uint32_t *slot, uint64_t *version, int *type, uint64_t *len) {
    uint32_t k = (uint32_t)(cur & 0xff);
    uint64_t v = cur >> 8;
    if (k >= s->nslots) {
        PyErr_Format(CorruptSegmentError, "current word %llu names slot %u of %u",
                     (unsigned long long)cur, k, s->nslots);
        return -1;
    }
    if (v < s->last_version) {
        PyErr_Format(CorruptSegmentError, "version went backwards: current word says %llu after %llu was seen",
                     (unsigned long long)v, (unsigned long long)s->last_version);
        return -1;
    }
    char *h = st_slot(s, k);
    uint64_t hv = load_relaxed64(h + SHMR_ST_SLOT_VERSION);   /* R19, after the acquire of current */
    uint32_t t = load_relaxed32(h + SHMR_ST_SLOT_TYPE);   /* R19, after the acquire of current */
    uint64_t n = load_relaxed64(h + SHMR_ST_SLOT_LENGTH);   /* R19, after the acquire of current */
    if (hv != v || (t != SHMR_T_ARRAY && t != SHMR_T_OBJECT) || n > s->slot_size - SHMR_ST_SLOT_HDR) {
        PyErr_Format(CorruptSegmentError, "slot %u header does not match version %llu: version %llu, type %u, "
                     "length %llu (slot holds %llu)", k, (unsigned long long)v, (unsigned long long)hv, t,
                     (unsigned long long)n, (unsigned long long)(s->slot_size - SHMR_ST_SLOT_HDR));
        return -1;
    }
    *slot = k; *version = v; *type = (int)t; *len = n;
    return 0;
}

/* ------------------------------------------------------------ Snapshot */

static void snapshot_finish(Lease *l) {
    Snapshot *m = (Snapshot *)l;
    StateCore *s = (StateCore *)l->owner;
    /* A snapshot inherited by a forked child is the parent's pin: only the parent unpins it. */
    if (m->own >= 0 && m->fork_gen == fork_generation && s->r.fork_gen == fork_generation &&
        s->r.has_view && m->own < s->n_own) {
        char *e = st_entry(s, (uint32_t)s->own[m->own]);
        /* R20: after our last read of the slot; pairs with the writer's seq_cst pin scan */
        publish_and_wake(e + SHMR_ST_ENTRY_PIN, 0, s->r.base + SHMR_ST_OFF_SLOT_WAKE);
        s->busy[m->own] = 0;
    }
}

static int snapshot_warn(Lease *l) {
    Snapshot *m = (Snapshot *)l;
    if (!l->readonly) return 0;      /* a writer's draft: the writer still holds it */
    return PyErr_WarnFormat(EscapedViewWarning, 1,
        "a view of shared-state version %llu (slot %u) is still alive after its read() block; the "
        "version stays pinned until that view is garbage-collected. Keep a copy instead: "
        "snap.copy().", (unsigned long long)m->version, m->slot);
}

static const LeaseOps snapshot_ops = { "snapshot", snapshot_finish, snapshot_warn };

static Snapshot *snapshot_new(StateCore *s, int own, uint64_t v, uint32_t k, int type, uint64_t len, int writable) {
    Snapshot *m = PyObject_GC_New(Snapshot, &SnapshotType);
    if (!m) return NULL;
    m->off = (Py_ssize_t)(s->first_slot + (uint64_t)k * s->slot_size + SHMR_ST_SLOT_HDR);
    lease_init(&m->l, &snapshot_ops, (PyObject *)s, s->r.base + m->off, (Py_ssize_t)len, !writable);
    m->own = own; m->version = v; m->slot = k; m->type = type;
    m->fork_gen = fork_generation;
    PyObject_GC_Track(m);
    return m;
}

/* Pin the current version (R19) in a free entry of ours: 0 with *jp (marked
 * busy) and *cp set, 1 if nothing was published yet, -1 on error. */
static inline int st_pin(StateCore *self, int *jp, uint64_t *cp) {
    int j;
    for (;;) {
        for (j = 0; j < self->n_own && self->busy[j]; j++) ;
        if (j < self->n_own) break;
        if (self->n_own >= ST_MAX_OWN) {
            PyErr_Format(ShmringError, "this handle already holds %d pinned snapshots (nested read() blocks "
                         "or escaped views); release some, or attach another handle", ST_MAX_OWN);
            return -1;
        }
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str_claim_reader);  /* adds an entry */
        if (!r) return -1;
        Py_DECREF(r);
    }
    char *pin = st_entry(self, (uint32_t)self->own[j]) + SHMR_ST_ENTRY_PIN;
    uint64_t c;
    for (unsigned tries = 0;; tries++) {
        c = load_acquire64(st_current(self));   /* R19, pairs with the writer's publish exchange in st_publish */
        if (c == 0) return 1;
        (void)xchg_seq_cst64(pin, c);   /* R19, pairs with the writer's seq_cst pin scan in st_pinned */
        if (load_seq_cst64(st_current(self)) == c) break;   /* R19, pairs with the writer's publish exchange */
        if (tries > 1000) sched_yield();              /* a writer publishing back to back: let it run */
        else cpu_relax();
    }
    self->busy[j] = 1;
    *jp = j; *cp = c;
    return 0;
}

/* Give back a pin that read nothing of the slot but its header. */
static inline void st_unpin_unread(StateCore *self, int j) {
    store_release64(st_entry(self, (uint32_t)self->own[j]) + SHMR_ST_ENTRY_PIN, 0);   /* R20, we read nothing of the slot */
    self->busy[j] = 0;
}

/* read() -> Snapshot: pin the current version (R19). */
static PyObject *statecore_read(StateCore *self, PyObject *unused) {
    if (st_usable(self) < 0) return NULL;
    int j; uint64_t c;
    int got = st_pin(self, &j, &c);
    if (got < 0) return NULL;
    if (got > 0) {
        PyErr_SetString(ShmringError, "nothing was published to this shared state yet; "
                        "state.wait_newer(than=0) waits for the first version");
        return NULL;
    }
    uint32_t k; uint64_t v, n; int t;
    if (st_check(self, c, &k, &v, &t, &n) < 0) { st_unpin_unread(self, j); return NULL; }
    self->last_version = v;
    Snapshot *m = snapshot_new(self, j, v, k, t, n, 0);
    if (!m) { st_unpin_unread(self, j); return NULL; }
    return (PyObject *)m;
}
static PyObject *StateCore_read(StateCore *self, PyObject *unused) {
    return guard_exit(&self->r, statecore_read(self, unused));   /* the segment may have vanished under it */
}

/* _newest() -> the current version, checked under a pin (R19), or None before
 * the first publish.  wait_newer()'s check: the slot header of an unpinned
 * version may be rewritten by a writer that published twice meanwhile, so it
 * is only looked at while pinned (the writer then uses other slots). */
static PyObject *statecore_newest(StateCore *self, PyObject *unused) {
    if (st_usable(self) < 0) return NULL;
    int j; uint64_t c;
    int got = st_pin(self, &j, &c);
    if (got < 0) return NULL;
    if (got > 0) Py_RETURN_NONE;
    uint32_t k; uint64_t v, n; int t;
    if (pause_point((PyObject *)self, "newest") < 0 || st_check(self, c, &k, &v, &t, &n) < 0) { st_unpin_unread(self, j); return NULL; }
    self->last_version = v;
    /* R20: after our last read (of the header), with the wake of a writer that
     * may have gone to sleep for a slot while we pinned this one */
    publish_and_wake(st_entry(self, (uint32_t)self->own[j]) + SHMR_ST_ENTRY_PIN, 0, self->r.base + SHMR_ST_OFF_SLOT_WAKE);
    self->busy[j] = 0;
    return PyLong_FromUnsignedLongLong(v);
}
static PyObject *StateCore_newest(StateCore *self, PyObject *unused) {
    return guard_exit(&self->r, statecore_newest(self, unused));   /* the segment may have vanished under it */
}

/* Which slots are pinned by any reader: a bitmap over 256 slots. */
static void st_pinned(StateCore *s, uint8_t *pinned) {
    memset(pinned, 0, 256);
    for (uint32_t i = 0; i < s->max_readers; i++) {
        uint64_t p = load_seq_cst64(st_entry(s, i) + SHMR_ST_ENTRY_PIN);   /* R21, pairs with the reader's pin exchange */
        if (p) pinned[p & 0xff] = 1;
    }
}

/* A slot that is neither current nor pinned, or -1. */
static int st_free_slot(StateCore *s) {
    uint8_t pinned[256];
    uint64_t cur = load_seq_cst64(st_current(s));   /* R21, the writer's own last publish */
    st_pinned(s, pinned);
    uint32_t cs = cur ? (uint32_t)(cur & 0xff) : 0xffffffffu;
    for (uint32_t d = 0; d < s->nslots; d++) {
        uint32_t k = (s->next_slot + d) % s->nslots;
        if (k != cs && !pinned[k]) return (int)k;
    }
    return -1;
}

static PyObject *statecore_free_slot(StateCore *self, PyObject *unused) {
    if (st_usable(self) < 0) return NULL;
    int k = st_free_slot(self);
    if (k >= 0) self->next_slot = ((uint32_t)k + 1) % self->nslots;
    return PyLong_FromLong(k);
}
static PyObject *StateCore_free_slot(StateCore *self, PyObject *unused) {
    return guard_exit(&self->r, statecore_free_slot(self, unused));   /* the segment may have vanished under it */
}

static int slot_cond(void *ctx) { return st_free_slot((StateCore *)ctx) >= 0; }

struct newer_ctx { StateCore *s; uint64_t than; };
static int newer_cond(void *vctx) {
    struct newer_ctx *c = vctx;
    return (load_seq_cst64(st_current(c->s)) >> 8) > c->than;   /* R4, pairs with the writer's publish exchange */
}

/* _wait_slot(slice, spin) -> bool / _wait_newer(than, slice, spin) -> bool (GIL released while waiting). */
static PyObject *StateCore_wait_slot(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_wait_slot(slice, spin)"); return NULL; }
    if (st_usable(self) < 0) return NULL;
    return wait_slice(&self->r, self->r.base + SHMR_ST_OFF_SLOT_WAKE, slot_cond, self, args[0], args[1], NULL);
}

/* _arm_newer(than, word) -> slot | -1 ready | -2 no slot: a wake-up descriptor (R52). */
static PyObject *StateCore_arm_newer(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_arm_newer(than, word)"); return NULL; }
    if (st_usable(self) < 0) return NULL;
    unsigned long long than = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    unsigned long long w = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    struct newer_ctx c = { self, than };
    return guard_exit(&self->r, PyLong_FromLong(fd_arm(self->r.base + SHMR_ST_OFF_VERSION_WAKE, w, newer_cond, &c)));
}

static PyObject *StateCore_wait_newer(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_wait_newer(than, slice, spin)"); return NULL; }
    if (st_usable(self) < 0) return NULL;
    unsigned long long than = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    struct newer_ctx c = { self, than };
    /* R29: the sleep is announced in one of our reader entries too, so whoever
     * takes the entry over if we die asleep withdraws it.  No entry to be had
     * (the table is full of live readers): sleep unannounced there. */
    if (self->n_own == 0) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str_claim_reader);
        if (r) Py_DECREF(r);
        else if (PyErr_ExceptionMatches(ShmringError)) PyErr_Clear();
        else return NULL;
    }
    char *mine = self->n_own ? st_entry(self, (uint32_t)self->own[0]) + SHMR_ST_ENTRY_WAITING : NULL;
    return wait_slice(&self->r, self->r.base + SHMR_ST_OFF_VERSION_WAKE, newer_cond, &c, args[1], args[2], mine);
}

static int st_slot_arg(StateCore *s, PyObject *o, uint32_t *k) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || (unsigned long)v >= s->nslots) { PyErr_Format(PyExc_ValueError, "bad slot %ld", v); return -1; }
    *k = (uint32_t)v;
    return 0;
}

/* _current() -> (version, slot, type, length) or None; checked.  For the
 * writer (update()): only it rewrites slots, so its current slot's header is
 * stable unpinned.  Readers check under a pin (read(), _newest()). */
static PyObject *statecore_current(StateCore *self, PyObject *unused) {
    if (st_usable(self) < 0) return NULL;
    uint64_t c = load_acquire64(st_current(self));   /* R19, pairs with the writer's publish exchange */
    if (c == 0) Py_RETURN_NONE;
    uint32_t k; uint64_t v, n; int t;
    if (st_check(self, c, &k, &v, &t, &n) < 0) return NULL;
    self->last_version = v;
    return Py_BuildValue("KIiK", (unsigned long long)v, k, t, (unsigned long long)n);
}
static PyObject *StateCore_current(StateCore *self, PyObject *unused) {
    return guard_exit(&self->r, statecore_current(self, unused));   /* the segment may have vanished under it */
}

/* Make slot k (filled) the current version: the one publication store (R21).
 * Returns the version, 0 on error. */
static uint64_t st_publish(StateCore *self, uint32_t k, uint32_t t, uint64_t len) {
    uint64_t c = load_acquire64(st_current(self));   /* R21, our own last publish */
    uint64_t v = (c >> 8) + 1;
    if (c && (c & 0xff) >= self->nslots) {
        PyErr_Format(CorruptSegmentError, "current word %llu names slot %llu of %u", (unsigned long long)c,
                     (unsigned long long)(c & 0xff), self->nslots);
        return 0;
    }
    if (c && (c & 0xff) == k) { PyErr_SetString(PyExc_SystemError, "shmring: publishing into the current slot"); return 0; }
    if (v >= (1ULL << 56)) { PyErr_SetString(CorruptSegmentError, "version counter exhausted"); return 0; }
    char *h = st_slot(self, k);
    /* plain stores: no reader pins this slot (it is not current), and the
     * exchange below publishes them */
    *(uint64_t *)(h + SHMR_ST_SLOT_VERSION) = v;
    *(uint32_t *)(h + SHMR_ST_SLOT_TYPE) = (uint32_t)t;
    *(uint32_t *)(h + SHMR_ST_SLOT_TYPE + 4) = 0;
    *(uint64_t *)(h + SHMR_ST_SLOT_LENGTH) = len;
    /* R21: the one publication store; pairs with readers' load_acquire(current) and their seq_cst re-load */
    publish_and_wake(st_current(self), (v << 8) | k, self->r.base + SHMR_ST_OFF_VERSION_WAKE);
    self->last_version = v;
    return v;
}

/* _publish(slot, type, length) -> version.  The writer has filled the slot's payload. */
static PyObject *statecore_publish(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_publish(slot, type, length)"); return NULL; }
    if (st_usable(self) < 0) return NULL;
    uint32_t k;
    if (st_slot_arg(self, args[0], &k) < 0) return NULL;
    long t = PyLong_AsLong(args[1]); if (PyErr_Occurred()) return NULL;
    unsigned long long len = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    if (len > self->slot_size - SHMR_ST_SLOT_HDR) { PyErr_SetString(MessageTooLarge, "value larger than a slot"); return NULL; }
    unsigned long long v = st_publish(self, k, (uint32_t)t, len);
    return v ? PyLong_FromUnsignedLongLong(v) : NULL;
}
static PyObject *StateCore_publish(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    return guard_exit(&self->r, statecore_publish(self, args, n));   /* the segment may have vanished under it */
}

/* _publish_array(meta, array) -> version, or None when no slot is free right
 * now or the value does not fit (the Python path then waits or raises).  The
 * fast path of publish() for a contiguous array: pick a free slot, write the
 * T_ARRAY payload (prefix, meta, one memcpy of the array at the first 64-aligned
 * offset, as codec.write lays it out), publish. */
static PyObject *statecore_publish_array(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2 || !PyBytes_Check(args[0])) { PyErr_SetString(PyExc_TypeError, "_publish_array(meta: bytes, array)"); return NULL; }
    if (st_usable(self) < 0) return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(args[1], &b, PyBUF_ANY_CONTIGUOUS) < 0) return NULL;
    uint64_t ml = (uint64_t)PyBytes_GET_SIZE(args[0]);
    uint64_t area = (8 + ml + 63) & ~(uint64_t)63;   /* slot payloads start 64-aligned */
    uint64_t total = area + (uint64_t)b.len;
    int k = total <= self->slot_size - SHMR_ST_SLOT_HDR ? st_free_slot(self) : -1;
    if (k < 0) { PyBuffer_Release(&b); Py_RETURN_NONE; }
    self->next_slot = ((uint32_t)k + 1) % self->nslots;
    char *p = st_slot(self, (uint32_t)k) + SHMR_ST_SLOT_HDR;
    /* plain stores: the slot is neither current nor pinned; st_publish's exchange publishes them */
    *(uint32_t *)p = (uint32_t)ml;
    *(uint32_t *)(p + 4) = 1;
    memcpy(p + 8, PyBytes_AS_STRING(args[0]), ml);
    if (b.len > (1 << 16)) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(p + area, b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
    } else {
        memcpy(p + area, b.buf, (size_t)b.len);
    }
    PyBuffer_Release(&b);
    uint64_t v = st_publish(self, (uint32_t)k, SHMR_T_ARRAY, total);
    return v ? PyLong_FromUnsignedLongLong(v) : NULL;
}
static PyObject *StateCore_publish_array(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    return guard_exit(&self->r, statecore_publish_array(self, args, n));   /* the segment may have vanished under it */
}

/* _copy_slot(src, dst, length): the copy of copy-on-write (GIL released). */
static PyObject *statecore_copy_slot(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_copy_slot(src, dst, length)"); return NULL; }
    if (st_usable(self) < 0) return NULL;
    uint32_t a, b;
    if (st_slot_arg(self, args[0], &a) < 0 || st_slot_arg(self, args[1], &b) < 0) return NULL;
    unsigned long long len = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    if (len > self->slot_size - SHMR_ST_SLOT_HDR || a == b) { PyErr_SetString(PyExc_ValueError, "bad copy"); return NULL; }
    char *src = st_slot(self, a) + SHMR_ST_SLOT_HDR, *dst = st_slot(self, b) + SHMR_ST_SLOT_HDR;
    Py_BEGIN_ALLOW_THREADS
    memcpy(dst, src, len);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
static PyObject *StateCore_copy_slot(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    return guard_exit(&self->r, statecore_copy_slot(self, args, n));   /* the segment may have vanished under it */
}

/* _draft(slot, type, length) -> writable Snapshot of a slot the writer owns (no pin). */
static PyObject *statecore_draft(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_draft(slot, type, length)"); return NULL; }
    if (st_usable(self) < 0) return NULL;
    uint32_t k;
    if (st_slot_arg(self, args[0], &k) < 0) return NULL;
    long t = PyLong_AsLong(args[1]); if (PyErr_Occurred()) return NULL;
    unsigned long long len = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    if (len > self->slot_size - SHMR_ST_SLOT_HDR) { PyErr_SetString(PyExc_ValueError, "bad length"); return NULL; }
    uint64_t c = load_acquire64(st_current(self));   /* R21, our own last publish */
    return (PyObject *)snapshot_new(self, -1, (c >> 8) + 1, k, (int)t, len, 1);
}
static PyObject *StateCore_draft(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    return guard_exit(&self->r, statecore_draft(self, args, n));   /* the segment may have vanished under it */
}

/* _add_entry(i): the handle now owns reader table entry i (claimed by Python with a CAS). */
static PyObject *StateCore_add_entry(StateCore *self, PyObject *arg) {
    if (st_usable(self) < 0) return NULL;
    long i = PyLong_AsLong(arg); if (PyErr_Occurred()) return NULL;
    if (i < 0 || (unsigned long)i >= self->max_readers || self->n_own >= ST_MAX_OWN) {
        PyErr_Format(PyExc_ValueError, "bad reader entry %ld", i); return NULL;
    }
    self->own[self->n_own] = (int32_t)i;
    self->busy[self->n_own] = 0;
    self->n_own++;
    Py_RETURN_NONE;
}

/* _own_entries() -> [(entry, busy)] */
static PyObject *StateCore_own_entries(StateCore *self, PyObject *unused) {
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    if (self->r.fork_gen != fork_generation) return l;
    for (int j = 0; j < self->n_own; j++) {
        PyObject *t = Py_BuildValue("(ii)", self->own[j], self->busy[j]);
        if (!t || PyList_Append(l, t) < 0) { Py_XDECREF(t); Py_DECREF(l); return NULL; }
        Py_DECREF(t);
    }
    return l;
}

static PyObject *StateCore_mark_closed(StateCore *self, PyObject *unused) {
    self->r.closed = 1;
    Py_RETURN_NONE;
}
static PyObject *StateCore_get_nslots(StateCore *s, void *c) { return PyLong_FromUnsignedLong(s->nslots); }
static PyObject *StateCore_get_max_readers(StateCore *s, void *c) { return PyLong_FromUnsignedLong(s->max_readers); }
static PyObject *StateCore_get_slot_size(StateCore *s, void *c) { return PyLong_FromUnsignedLongLong(s->slot_size); }
static PyObject *StateCore_get_first_slot(StateCore *s, void *c) { return PyLong_FromUnsignedLongLong(s->first_slot); }
static PyObject *StateCore_get_nbytes(StateCore *s, void *c) { return PyLong_FromUnsignedLongLong(s->nbytes); }

static PyMethodDef StateCore_methods[] = {
    {"read", (PyCFunction)StateCore_read, METH_NOARGS,
     "read() -> Snapshot: pin the current version; use it as a context manager (unpins on exit)"},
    {"_free_slot", (PyCFunction)StateCore_free_slot, METH_NOARGS, NULL},
    {"_wait_slot", (PyCFunction)(void (*)(void))StateCore_wait_slot, METH_FASTCALL, NULL},
    {"_wait_newer", (PyCFunction)(void (*)(void))StateCore_wait_newer, METH_FASTCALL, NULL},
    {"_arm_newer", (PyCFunction)(void (*)(void))StateCore_arm_newer, METH_FASTCALL, NULL},
    {"_current", (PyCFunction)StateCore_current, METH_NOARGS, NULL},
    {"_newest", (PyCFunction)StateCore_newest, METH_NOARGS, NULL},
    {"_publish", (PyCFunction)(void (*)(void))StateCore_publish, METH_FASTCALL, NULL},
    {"_publish_array", (PyCFunction)(void (*)(void))StateCore_publish_array, METH_FASTCALL, NULL},
    {"_copy_slot", (PyCFunction)(void (*)(void))StateCore_copy_slot, METH_FASTCALL, NULL},
    {"_draft", (PyCFunction)(void (*)(void))StateCore_draft, METH_FASTCALL, NULL},
    {"_add_entry", (PyCFunction)StateCore_add_entry, METH_O, NULL},
    {"_own_entries", (PyCFunction)StateCore_own_entries, METH_NOARGS, NULL},
    {"_mark_closed", (PyCFunction)StateCore_mark_closed, METH_NOARGS, NULL},
    {NULL}
};
static PyGetSetDef StateCore_getset[] = {
    {"slots", (getter)StateCore_get_nslots, NULL, "number of version slots", NULL},
    {"max_readers", (getter)StateCore_get_max_readers, NULL, "reader table entries", NULL},
    {"_slot_size", (getter)StateCore_get_slot_size, NULL, NULL, NULL},
    {"_first_slot", (getter)StateCore_get_first_slot, NULL, NULL, NULL},
    {"nbytes", (getter)StateCore_get_nbytes, NULL, "largest value payload, in bytes", NULL},
    {"_core_closed", (getter)Region_get_closed, NULL, NULL, NULL},
    {NULL}
};

PyTypeObject StateCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.StateCore",
    .tp_basicsize = sizeof(StateCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "C half of shmring.SharedState",
    .tp_base = &RegionType,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)StateCore_init,
    .tp_methods = StateCore_methods,
    .tp_getset = StateCore_getset,
};

/* ------------------------------------------------------ Snapshot, Python */

static PyObject *Snapshot_get_value(Snapshot *m, void *c) {
    if (m->l.state != LEASE_LIVE) { PyErr_SetString(HandleClosed, "snapshot was released; keep snap.copy() to use data after release"); return NULL; }
    return lease_guard_exit(&m->l, PyObject_CallOneArg(state_decode_func ? state_decode_func : decode_func, (PyObject *)m));
}
static PyObject *Snapshot_get_state(Snapshot *m, void *c) {
    if (!m->l.owner) Py_RETURN_NONE;
    Py_INCREF(m->l.owner);
    return m->l.owner;
}
static PyObject *Snapshot_get_writable(Snapshot *m, void *c) { return PyBool_FromLong(!m->l.readonly); }
static PyObject *Snapshot_copy(Snapshot *m, PyObject *unused) {
    if (m->l.state != LEASE_LIVE) { PyErr_SetString(HandleClosed, "snapshot was released"); return NULL; }
    return lease_guard_exit(&m->l, PyObject_CallOneArg(copy_func, (PyObject *)m));
}
static PyObject *Snapshot_get_version(Snapshot *m, void *c) { return PyLong_FromUnsignedLongLong(m->version); }
static PyObject *Snapshot_get_slot(Snapshot *m, void *c) { return PyLong_FromUnsignedLong(m->slot); }
static PyObject *Snapshot_get_type(Snapshot *m, void *c) { return PyLong_FromLong(m->type); }
static PyObject *Snapshot_get_offset(Snapshot *m, void *c) { return PyLong_FromSsize_t(m->off); }
static PyObject *Snapshot_repr(Snapshot *m) {
    return PyUnicode_FromFormat("<shmring.Snapshot version %llu, %zd bytes in slot %u%s>",
                                (unsigned long long)m->version, m->l.len, m->slot,
                                m->l.state == LEASE_LIVE ? "" : m->l.state == LEASE_DEFERRED ? ", unpin deferred" : ", released");
}

static PyMethodDef Snapshot_methods[] = {
    {"release", (PyCFunction)Lease_release, METH_NOARGS,
     "release(): unpin the version. Idempotent. If a view of it is still alive the pin is held until "
     "that view is garbage-collected, and EscapedViewWarning is issued."},
    {"copy", (PyCFunction)Snapshot_copy, METH_NOARGS, "copy(): the value, detached from shared memory"},
    {NULL}
};
static PyGetSetDef Snapshot_getset[] = {
    {"value", (getter)Snapshot_get_value, NULL,
     "the value: a read-only ndarray, or the decoded object whose arrays are read-only views. "
     "Built anew on each access; valid until release().", NULL},
    {"version", (getter)Snapshot_get_version, NULL, "the version pinned (1 for the first publish)", NULL},
    {"slot", (getter)Snapshot_get_slot, NULL, "the version slot it lives in", NULL},
    {"type", (getter)Snapshot_get_type, NULL, "payload type code (shmring.layout.T_*)", NULL},
    {"nbytes", (getter)Lease_get_nbytes, NULL, "payload size in bytes", NULL},
    {"_offset", (getter)Snapshot_get_offset, NULL, "payload offset in the region", NULL},
    {"position", (getter)Snapshot_get_version, NULL, "the version (named as a Message's, for the codec)", NULL},
    {"_state", (getter)Snapshot_get_state, NULL, NULL, NULL},
    {"_writable", (getter)Snapshot_get_writable, NULL, NULL, NULL},
    {NULL}
};

PyTypeObject SnapshotType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring.Snapshot",
    .tp_basicsize = sizeof(Snapshot),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A pinned version of a SharedState: a zero-copy window on shared memory.\n\n"
              "Lifetime: snap.value and every view derived from it point into the version's slot "
              "and are valid until snap.release() (called when the `with state.read()` block "
              "exits). The writer never reuses a pinned slot; after release it may, so release() "
              "checks whether a view escaped: if one did, the pin is held until the view is "
              "garbage-collected and EscapedViewWarning is issued. To keep data, use snap.copy().",
    .tp_base = &LeaseType,
    .tp_new = NULL,
    .tp_dealloc = (destructor)Lease_dealloc,
    .tp_traverse = (traverseproc)Lease_traverse,
    .tp_clear = (inquiry)Lease_clear,
    .tp_free = PyObject_GC_Del,
    .tp_methods = Snapshot_methods,
    .tp_getset = Snapshot_getset,
    .tp_repr = (reprfunc)Snapshot_repr,
};
