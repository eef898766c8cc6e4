/*
 * consumer.c: ConsumerCore, the C half of shmring.Consumer: recv (a zero-copy
 * Message), recv_bytes (a copy, released at once), the wait for data, and the
 * bookkeeping that gives space back over the released prefix only.  The ring
 * protocol itself is in spsc.c and multi.c.
 */
#include "core.h"

static int Consumer_init(Consumer *self, PyObject *args, PyObject *kw) {
    self->lock_fd = -1;
    if (Region_init(&self->r, args, kw) < 0) return -1;
    Region *r = &self->r;
    if (r->kind == SHMR_KIND_RECORDS) {
        PyErr_SetString(PyExc_TypeError, "a record ring has its own handles (shmring.records)");
        return -1;
    }
    uint64_t wp = load_acquire64(r->base + SHMR_OFF_WRITE_POS);   /* R2, pairs with the producer's exchange of write_pos */
    uint64_t rp = load_acquire64(r->base + SHMR_OFF_READ_POS);   /* R3, our role's release position */
    self->posword = r->base + SHMR_OFF_READ_POS;
    self->recvword = NULL;
    if (r->kind == SHMR_KIND_MPSC) self->recvword = r->base + SHMR_OFF_CONS_ROLE + SHMR_ROLE_RECEIVED;
    if (r->kind == SHMR_KIND_BROADCAST || r->kind == SHMR_KIND_MPMC) {
        if (r->slot < 0 || (uint32_t)r->slot >= r->maxc) {
            PyErr_Format(PyExc_ValueError, "consumer slot %d outside the table of %u", r->slot, r->maxc);
            return -1;
        }
        self->entry = r->ctab + (uint64_t)r->slot * SHMR_MP_ENTRY;
        self->recvword = self->entry + SHMR_CE_RECEIVED;
        self->own_word = load_relaxed64(self->entry);   /* R35, the owner word (+0) we joined with */
    }
    if (r->kind == SHMR_KIND_BROADCAST) {
        self->posword = self->entry + SHMR_CE_POS;
        rp = load_acquire64(self->posword);   /* R10, our joined position (stored by parties.py) */
        if (rp & (SHMR_POS_HOLD | SHMR_POS_EVICTED)) {
            char msg[120];   /* PyErr_Format has no %#llx */
            snprintf(msg, sizeof msg, "subscriber entry %d holds position word %#llx, not a joined position",
                     r->slot, (unsigned long long)rp);
            PyErr_SetString(CorruptSegmentError, msg);
            return -1;
        }
    }
    if (r->kind == SHMR_KIND_MPMC) rp = wp = 0;
    else if (check_positions(r, rp, wp) < 0) return -1;
    self->read_pos = self->next_pos = rp;
    self->cached_write = wp;
    return 0;
}

static void Consumer_dealloc(Consumer *self) {
    PyMem_Free(self->q);
    self->q = NULL;
    Region_dealloc(&self->r);
}

void consumer_store_read(Consumer *c, uint64_t rp) {
    c->read_pos = rp;
    if (c->detached) return;
    /* R3: after the last read of the released bytes; pairs with the
     * producer's load of our position in its claim */
    publish_and_wake(c->posword, rp | (c->holding ? SHMR_POS_HOLD : 0), c->r.base + SHMR_OFF_SPACE_WAKE);
}

/* A broadcast subscriber or mpmc consumer closed while it held messages kept
 * its table entry (its position gates the producer; its records stay taken),
 * so nothing it can still see is overwritten; the last release leaves.
 *
 * That release may run in a deallocator, a buffer-release hook or the
 * garbage collector (the handle itself being collected, its __dict__ already
 * cleared), or at interpreter exit: so leaving calls no Python.  It takes the
 * steps of Consumer._leave_table (ring.py) in C (R35). */
static int consumer_leave_if_done(Consumer *c) {
    if (!c->leave_pending || c->nheld || c->qlen || c->next_pos != c->read_pos) return 0;
    c->leave_pending = 0;
    c->detached = 1;
    if (c->r.kind == SHMR_KIND_BROADCAST) {
        (void)xchg_seq_cst64(c->entry + SHMR_CE_POS, SHMR_POS_FREE);   /* R35, while the entry is still ours */
        wake_always(c->r.base + SHMR_OFF_SPACE_WAKE);
    }
    (void)cas_seq_cst64(c->entry, c->own_word, 0);   /* R35, gives the entry back (owner word at +0) */
    /* R38: then its lock, with the GIL held throughout (no other handle of this
     * process can claim the entry between the two steps) */
    if (c->lock_fd >= 0 && c->r.fork_gen == fork_generation) {
        struct flock fl = { .l_type = F_UNLCK, .l_whence = SEEK_SET,
                            .l_start = (off_t)(SHMR_LOCK_BASE + (uint64_t)(c->entry - c->r.base)), .l_len = 1 };
        (void)fcntl(c->lock_fd, F_OFD_SETLK, &fl);
    }
    return 0;
}

/* _set_lock_fd(fd): the file description that holds our table entry's lock
 * (shmring.liveness); the C leave (R35) gives the lock back after the entry. */
static PyObject *Consumer_set_lock_fd(Consumer *self, PyObject *fd) {
    long v = PyLong_AsLong(fd);
    if (v == -1 && PyErr_Occurred()) return NULL;
    if (v < -1 || v > INT32_MAX) { PyErr_SetString(PyExc_ValueError, "bad lock fd"); return NULL; }
    self->lock_fd = (int)v;
    Py_RETURN_NONE;
}

static int consumer_track(Consumer *c, Rec *r, int done) {
    if (c->qlen == c->qcap) {
        size_t ncap = c->qcap ? c->qcap * 2 : 16;
        Entry *nq = PyMem_Malloc(ncap * sizeof(Entry));
        if (!nq) { PyErr_NoMemory(); return -1; }
        for (size_t i = 0; i < c->qlen; i++) nq[i] = c->q[(c->qhead + i) % c->qcap];
        PyMem_Free(c->q);
        c->q = nq; c->qcap = ncap; c->qhead = 0;
    }
    Entry *e = &c->q[(c->qhead + c->qlen) % c->qcap];
    e->start = r->start; e->end = r->end; e->done = done;
    e->off = r->off; e->len = r->len; e->type = r->type;
    c->qlen++;
    return 0;
}

/* Give space back over the finished prefix of the outstanding records. */
static void consumer_advance(Consumer *c) {
    uint64_t rp = c->read_pos;
    while (c->qlen && c->q[c->qhead].done == ENTRY_DONE) {
        rp = c->q[c->qhead].end;
        c->qhead = (c->qhead + 1) % c->qcap;
        c->qlen--;
    }
    if (rp != c->read_pos) consumer_store_read(c, rp);
}

static Entry *consumer_entry(Consumer *c, uint64_t start) {
    for (size_t i = 0; i < c->qlen; i++) {
        Entry *e = &c->q[(c->qhead + i) % c->qcap];
        if (e->start == start) return e;
    }
    PyErr_SetString(PyExc_SystemError, "shmring: release of an unknown record");
    return NULL;
}

static inline void uncount_received(Consumer *c) {
    c->received--;
    if (c->recvword) store_relaxed64(c->recvword, load_relaxed64(c->recvword) - 1);   /* R18, our own counter */
}

/* R39: a message dropped unread (never handed to user code) is handed out
 * again: spsc / mpsc / broadcast keep its entry outstanding (the release
 * position stays before it) and the next receive returns it first; mpmc
 * requeues it (R16), for this or any consumer.  A closed handle receives
 * nothing more: then it is released (spsc / mpsc: the next consumer gets it,
 * as everything after the release position). */
int consumer_return(Consumer *c, uint64_t start, uint64_t end) {
    if (c->r.closed || c->detached) return consumer_finish(c, start, end);
    if (c->r.kind == SHMR_KIND_MPMC) {
        c->nheld--;
        uncount_received(c);
        if (!mpmc_give_back(c, start)) {   /* no longer marked ours: released as usual */
            c->nheld++;
            return consumer_finish(c, start, end);
        }
        return 0;
    }
    Entry *e = consumer_entry(c, start);
    if (!e) return -1;
    e->done = ENTRY_RETURNED;
    c->nreturned++;
    uncount_received(c);
    return 0;
}

/* Entries given back are not waited for any more (the handle leaves or starts over). */
static void consumer_drop_returned(Consumer *c) {
    if (!c->nreturned) return;
    for (size_t i = 0; i < c->qlen; i++) {
        Entry *e = &c->q[(c->qhead + i) % c->qcap];
        if (e->done == ENTRY_RETURNED) e->done = ENTRY_DONE;
    }
    c->nreturned = 0;
    consumer_advance(c);
}

/* The first entry given back, handed out again (R39): PEEK_FOUND. */
static int consumer_redeliver(Consumer *c, Rec *out) {
    for (size_t i = 0; i < c->qlen; i++) {
        Entry *e = &c->q[(c->qhead + i) % c->qcap];
        if (e->done != ENTRY_RETURNED) continue;
        out->start = e->start; out->end = e->end; out->off = e->off; out->len = e->len; out->type = e->type;
        out->again = 1;
        return PEEK_FOUND;
    }
    c->nreturned = 0;                  /* (not reached: the count says one is there) */
    return PEEK_EMPTY;
}

/* Record [start, end) is finished with. */
int consumer_finish(Consumer *c, uint64_t start, uint64_t end) {
    if (c->r.kind == SHMR_KIND_MPMC) {
        mpmc_release(c, start);
        c->nheld--;
        return consumer_leave_if_done(c);
    }
    Entry *e = consumer_entry(c, start);
    if (!e) return -1;
    if (e->done == ENTRY_RETURNED) c->nreturned--;
    e->done = ENTRY_DONE;
    consumer_advance(c);
    bc_unhold_if_idle(c);
    return consumer_leave_if_done(c);
}

/* A record at [start, end) needs nothing more from us (a skip, or copied out). */
int consumer_skip(Consumer *c, uint64_t start, uint64_t end) {
    c->next_pos = end;
    if (c->qlen == 0 && c->read_pos == start) { consumer_store_read(c, end); return 0; }
    Rec r = { start, end, 0, 0, 0, 0 };
    return consumer_track(c, &r, 1);
}

/* Find the next record: a peek_status. */
static int consumer_peek(Consumer *c, Rec *out) {
    out->again = 0;
    if (__builtin_expect(c->nreturned != 0, 0)) return consumer_redeliver(c, out);
    switch (c->r.kind) {
    case SHMR_KIND_SPSC: return spsc_peek(c, out);
    case SHMR_KIND_MPMC: return mpmc_peek(c, out);
    default: return mp_peek_seq(c, out);
    }
}

/* The ring is drained and the producer side has ended: a normal end of
 * stream, or a producer that stopped on an error or died. */
static PyObject *raise_eos(Consumer *c) {
    const char *cls_name = NULL, *msg = NULL;
    char buf[300];
    if (is_multi(&c->r)) {
        char *pl = c->r.base + SHMR_OFF_PROD_ROLE;
        unsigned long long aborted = load_acquire64(pl + SHMR_MP_ABORTED);   /* R11, counted before the end (R36) */
        unsigned long long dead = load_acquire64(pl + SHMR_MP_DEAD);   /* R11, counted before the end (R36) */
        if (!aborted && !dead) {
            cls_name = "EndOfStream";
            msg = "end of stream: every producer closed the ring and every message was received";
        } else {
            cls_name = "PeerGone";
            snprintf(buf, sizeof buf, "end of stream with losses upstream: %llu producer(s) died and %llu stopped "
                     "on an error; every message they committed was received", dead, aborted);
            msg = buf;
        }
    } else {
        uint32_t how = load_acquire32(c->r.base + SHMR_OFF_PROD_ROLE + SHMR_ROLE_CLOSED);   /* R5, pairs with the producer's store_u32(closed) */
        if (how != SHMR_CLOSED_EOS && how != SHMR_CLOSED_ABORTED) {
            PyErr_Format(CorruptSegmentError, "producer status word is %u (expected 0, 1 or 2)", how);
            return NULL;
        }
        cls_name = how == SHMR_CLOSED_EOS ? "EndOfStream" : "PeerGone";
        msg = how == SHMR_CLOSED_EOS
            ? "end of stream: the producer closed the ring and every message was received"
            : "the producer stopped on an error (its with-block raised); every message it committed was received";
    }
    PyObject *m = PyImport_ImportModule("shmring.errors");
    if (!m) return NULL;
    PyObject *cls = PyObject_GetAttrString(m, cls_name);
    Py_DECREF(m);
    if (!cls) return NULL;
    PyErr_SetString(cls, msg);
    Py_DECREF(cls);
    return NULL;
}

/* A peek status other than PEEK_FOUND as a Python result: None (empty), or the error. */
static PyObject *peek_status(Consumer *c, int s) {
    if (s == PEEK_EMPTY) Py_RETURN_NONE;
    if (s == PEEK_END) return raise_eos(c);
    if (s == PEEK_EVICTED) return PyObject_CallMethodNoArgs((PyObject *)c, str_lagged);
    return NULL;
}

static inline void count_received(Consumer *c) {
    c->received++;
    if (c->recvword) store_relaxed64(c->recvword, load_relaxed64(c->recvword) + 1);   /* R18, our own counter */
}

/* Every message handed out is tracked until released; records finished at
 * once (copied bytes, skips) are tracked only when something before them
 * is still outstanding.  With nothing outstanding, next_pos == read_pos.
 * mpmc records are tracked in the ring itself (their state field). */
static PyObject *consumer_message(Consumer *c, Rec *r) {
    PyObject *m = make_message(c, r);
    if (!m) return NULL;
    if (c->r.kind == SHMR_KIND_MPMC) c->nheld++;
    else if (r->again) {               /* R39: its entry is outstanding again */
        Entry *e = consumer_entry(c, r->start);
        if (!e) { lease_forget((Lease *)m); Py_DECREF(m); return NULL; }
        e->done = ENTRY_HELD;
        c->nreturned--;
    } else {
        if (consumer_track(c, r, 0) < 0) { lease_forget((Lease *)m); Py_DECREF(m); return NULL; }
        c->next_pos = r->end;
    }
    count_received(c);
    return m;
}

#define CONSUMER_HINT " (releasing a message from any thread is fine)"

/* _use() -> token: hold the handle for a multi-step call made in Python; _unuse(token) ends it. */
static PyObject *Consumer_use(Consumer *self, PyObject *unused) {
    unsigned long prev;
    if (use_begin(&self->user, &prev, "consumer", CONSUMER_HINT) < 0) return NULL;
    return PyLong_FromUnsignedLong(prev);
}
static PyObject *Consumer_unuse(Consumer *self, PyObject *token) {
    unsigned long prev = PyLong_AsUnsignedLong(token);
    if (PyErr_Occurred()) return NULL;
    if (self->user == this_thread()) self->user = prev;   /* only if the _use() was ours */
    Py_RETURN_NONE;
}

/* try_recv() -> Message | None; raises EndOfStream once drained after close. */
static PyObject *consumer_try_recv(Consumer *self) {
    if (check_usable(&self->r) < 0) return NULL;
    Rec r;
    int s = consumer_peek(self, &r);
    PyObject *res = s == PEEK_FOUND ? consumer_message(self, &r) : peek_status(self, s);
    bc_unhold_if_idle(self);
    return res;
}

static int parse_timeout_kw(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **timeout, const char *sig) {
    *timeout = Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw == 0) return 0;
    if (nargs + nkw > 1) goto bad;
    if (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0) goto bad;
    *timeout = args[0];
    return 0;
bad:
    PyErr_Format(PyExc_TypeError, "%s", sig);
    return -1;
}

/* Whether a wait for data should end: something to read, end of stream,
 * eviction, a requeued record (never consumes anything).  The seq_cst
 * condition loads of R4. */
int consumer_ready(Consumer *c) {
    Region *r = &c->r;
    if (c->nreturned || truncated(r)) return 1;   /* R39: a message given back is there to take; R47: the call raises */
    if (r->kind != SHMR_KIND_SPSC) return mp_ready(c);
    return load_seq_cst64(r->base + SHMR_OFF_WRITE_POS) != c->next_pos ||   /* R4, pairs with the producer's exchange of write_pos */
           load_seq_cst32(r->base + SHMR_OFF_PROD_ROLE + SHMR_ROLE_CLOSED) != 0;   /* R5, pairs with the producer's store_u32(closed) */
}

/* The ring looked empty: poll for up to ~4 us before taking the Python slow
 * path.  Polling every few pauses rather than back to back lets the producer
 * publish several records per cache-line transfer when the consumer runs
 * right behind it. */
static int consumer_spin_for_data(Consumer *c) {
    if (c->r.spin <= 0) return 0;
    for (int i = 0; i < 64; i++) {
        cpu_relax(); cpu_relax(); cpu_relax();
        if (consumer_ready(c)) return 1;
    }
    return 0;
}

static PyObject *Consumer_try_recv(Consumer *self, PyObject *unused) {
    unsigned long prev;
    if (use_begin(&self->user, &prev, "consumer", CONSUMER_HINT) < 0) return NULL;
    PyObject *res = guard_exit(&self->r, consumer_try_recv(self));
    self->user = prev;
    return res;
}

/* recv(*, timeout=None, copy=False) -> Message; the blocking part lives in Python (_recv_wait). */
static PyObject *consumer_recv(Consumer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *timeout = Py_None, *copy = Py_False;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs) goto bad;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(k, "timeout") == 0) timeout = args[i];
        else if (PyUnicode_CompareWithASCIIString(k, "copy") == 0) copy = args[i];
        else goto bad;
    }
    if (check_usable(&self->r) < 0 || check_timeout(timeout) < 0) return NULL;
    int want_copy = PyObject_IsTrue(copy);
    if (want_copy < 0) return NULL;
    if (want_copy) return PyObject_CallMethodObjArgs((PyObject *)self, str_recv_copy, timeout, NULL);
    Rec r;
    int s = consumer_peek(self, &r);
    if (s == PEEK_EMPTY && consumer_spin_for_data(self)) s = consumer_peek(self, &r);
    if (s == PEEK_FOUND) return consumer_message(self, &r);
    bc_unhold_if_idle(self);
    if (s != PEEK_EMPTY) return peek_status(self, s);
    return PyObject_CallMethodObjArgs((PyObject *)self, str_recv_wait, timeout, Py_False, NULL);
bad:
    PyErr_SetString(PyExc_TypeError, "recv(*, timeout=None, copy=False)");
    return NULL;
}

static PyObject *Consumer_recv(Consumer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    unsigned long prev;
    if (use_begin(&self->user, &prev, "consumer", CONSUMER_HINT) < 0) return NULL;
    PyObject *res = guard_exit(&self->r, consumer_recv(self, args, nargs, kwnames));
    self->user = prev;
    return res;
}

static int bytes_out(Consumer *self, Rec *rp, PyObject **out);

/* Copy out a bytes record and release it at once.  PEEK_FOUND (*out set), else a peek status. */
static int consumer_take_bytes(Consumer *self, PyObject **out) {
    Rec r;
    int s = consumer_peek(self, &r);
    if (s != PEEK_FOUND) return s;
    if (r.type != SHMR_T_BYTES) {
        const char *what = r.type == SHMR_T_ARRAY ? "an array" : r.type == SHMR_T_OBJECT ? "an object"
                                                                                          : "of an unknown type";
        if (r.again) {                           /* still given back: it stays first in line */
            PyErr_Format(WrongKind, "recv_bytes(): the next message is %s, not bytes; use recv() for it. "
                         "It was not consumed.", what);
        } else if (self->r.kind == SHMR_KIND_MPMC) {     /* taken from the shared cursor: hand it back */
            PyErr_Format(WrongKind, "recv_bytes(): the next message is %s, not bytes; use recv() for it. "
                         "It was taken and is given back for redelivery.", what);
            mpmc_give_back(self, r.start);
        } else {
            PyErr_Format(WrongKind, "recv_bytes(): the next message is %s, not bytes; use recv() for it. "
                         "It was not consumed.", what);
        }
        return PEEK_CORRUPT;
    }
    return bytes_out(self, &r, out);
}

/* Copy out the bytes record r (just peeked) and release it at once. */
static int bytes_out(Consumer *self, Rec *rp, PyObject **out) {
    Rec r = *rp;
    PyObject *b = PyBytes_FromStringAndSize(self->r.base + r.off, r.len);
    if (!b) return PEEK_CORRUPT;
    count_received(self);
    if (self->r.kind == SHMR_KIND_MPMC) {
        self->nheld++;
        consumer_finish(self, r.start, r.end);
    } else if (r.again) {
        if (consumer_finish(self, r.start, r.end) < 0) { Py_DECREF(b); return PEEK_CORRUPT; }
    } else if (consumer_skip(self, r.start, r.end) < 0) { Py_DECREF(b); return PEEK_CORRUPT; }
    *out = b;
    return PEEK_FOUND;
}

static PyObject *consumer_recv_bytes(Consumer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *timeout;
    if (parse_timeout_kw(args, nargs, kwnames, &timeout, "recv_bytes(*, timeout=None)") < 0) return NULL;
    if (check_usable(&self->r) < 0 || check_timeout(timeout) < 0) return NULL;
    PyObject *b = NULL;
    int s = consumer_take_bytes(self, &b);
    if (s == PEEK_EMPTY && consumer_spin_for_data(self)) s = consumer_take_bytes(self, &b);
    bc_unhold_if_idle(self);
    if (s == PEEK_FOUND) return b;
    if (s != PEEK_EMPTY) return peek_status(self, s);
    return PyObject_CallMethodObjArgs((PyObject *)self, str_recv_wait, timeout, Py_True, NULL);
}

static PyObject *Consumer_recv_bytes(Consumer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    unsigned long prev;
    if (use_begin(&self->user, &prev, "consumer", CONSUMER_HINT) < 0) return NULL;
    PyObject *res = guard_exit(&self->r, consumer_recv_bytes(self, args, nargs, kwnames));
    self->user = prev;
    return res;
}

/* _try_recv_bytes() -> bytes | None */
static PyObject *Consumer_try_recv_bytes(Consumer *self, PyObject *unused) {
    if (check_usable(&self->r) < 0) return NULL;
    PyObject *b = NULL;
    int s = consumer_take_bytes(self, &b);
    bc_unhold_if_idle(self);
    return guard_exit(&self->r, s == PEEK_FOUND ? b : peek_status(self, s));
}

/* _take_item() -> bytes | Message | None: a queue's get (R74) in one call: a bytes
 * message copied out and released at once, any other message as try_recv gives it
 * (nothing is given back, unlike recv_bytes on an mpmc ring). */
static PyObject *consumer_take_item(Consumer *self) {
    if (check_usable(&self->r) < 0) return NULL;
    Rec r;
    PyObject *res = NULL;
    int s = consumer_peek(self, &r);
    if (s == PEEK_FOUND && r.type == SHMR_T_BYTES) s = bytes_out(self, &r, &res);
    else if (s == PEEK_FOUND) res = consumer_message(self, &r);
    if (s != PEEK_FOUND) res = peek_status(self, s);
    bc_unhold_if_idle(self);
    return res;
}

PyObject *Consumer_take_item(Consumer *self, PyObject *unused) {
    unsigned long prev;
    if (use_begin(&self->user, &prev, "consumer", CONSUMER_HINT) < 0) return NULL;
    PyObject *res = guard_exit(&self->r, consumer_take_item(self));
    self->user = prev;
    return res;
}

static int data_cond(void *vctx) { return consumer_ready((Consumer *)vctx); }

/* _wait_data(slice_s, spin_s) -> bool (GIL released while waiting). */
static PyObject *Consumer_wait_data(Consumer *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_wait_data(slice, spin)"); return NULL; }
    if (check_usable(&self->r) < 0) return NULL;
    return wait_slice(&self->r, self->r.base + SHMR_OFF_DATA_WAKE, data_cond, self, args[0], args[1],
                      self->entry ? self->entry + SHMR_CE_WAITING : NULL);
}

/* _arm_data(word) -> slot | -1 ready | -2 no slot: a wake-up descriptor (R52). */
static PyObject *Consumer_arm_data(Consumer *self, PyObject *word) {
    if (check_usable(&self->r) < 0) return NULL;
    unsigned long long w = PyLong_AsUnsignedLongLong(word); if (PyErr_Occurred()) return NULL;
    return guard_exit(&self->r, PyLong_FromLong(fd_arm(self->r.base + SHMR_OFF_DATA_WAKE, w, data_cond, self)));
}

static PyObject *Consumer_has_data(Consumer *self, PyObject *unused) {
    if (check_usable(&self->r) < 0) return NULL;
    return PyBool_FromLong(consumer_ready(self));
}

/* _reset(pos): start over at pos (a broadcast subscriber re-joining). */
static PyObject *Consumer_reset(Consumer *self, PyObject *arg) {
    if (check_owner(&self->r) < 0) return NULL;
    unsigned long long pos = PyLong_AsUnsignedLongLong(arg); if (PyErr_Occurred()) return NULL;
    consumer_drop_returned(self);
    if (self->qlen || self->next_pos != self->read_pos) {
        PyErr_SetString(ShmringError, "release every message first");
        return NULL;
    }
    uint64_t cur = load_acquire64(self->r.base + SHMR_OFF_WRITE_POS);   /* R6, the position came from the segment */
    if ((pos & (self->r.hdr - 1)) || pos > cur || cur - pos > self->r.capacity) {
        corrupt("re-join position out of range", pos, cur, self->r.capacity);
        return NULL;
    }
    self->read_pos = self->next_pos = pos;
    self->holding = 0;
    Py_RETURN_NONE;
}

static PyObject *Consumer_mark_closed(Consumer *self, PyObject *unused) {
    self->r.closed = 1;
    self->detached = 1;
    Py_RETURN_NONE;
}

/* _close_later() -> bool: closed now if nothing is held (False); else the
 * handle is closed for receiving and leaves the table at the last release (True). */
static PyObject *Consumer_close_later(Consumer *self, PyObject *unused) {
    self->r.closed = 1;
    consumer_drop_returned(self);      /* nothing is handed out again to a closed handle */
    if (self->nheld || self->qlen || self->next_pos != self->read_pos) {
        self->leave_pending = 1;
        Py_RETURN_TRUE;
    }
    self->detached = 1;
    Py_RETURN_FALSE;
}

static PyObject *Consumer_get_pending(Consumer *self, void *c) {
    /* messages handed out and not released yet (tracked or the single untracked one) */
    if (self->r.kind == SHMR_KIND_MPMC) return PyLong_FromUnsignedLongLong(self->nheld);
    if (self->qlen) {
        size_t n = 0;
        for (size_t i = 0; i < self->qlen; i++) if (self->q[(self->qhead + i) % self->qcap].done == ENTRY_HELD) n++;
        return PyLong_FromSize_t(n);
    }
    return PyLong_FromLong(self->next_pos != self->read_pos);
}
static PyObject *Consumer_get_user(Consumer *self, void *c) { return PyLong_FromUnsignedLong(self->user); }
static PyObject *Consumer_get_read_pos(Consumer *self, void *c) { return PyLong_FromUnsignedLongLong(self->read_pos); }
static PyObject *Consumer_get_received(Consumer *self, void *c) { return PyLong_FromUnsignedLongLong(self->received); }

static PyMethodDef Consumer_methods[] = {
    {"_set_lock_fd", (PyCFunction)Consumer_set_lock_fd, METH_O, NULL},
    {"recv", (PyCFunction)(void (*)(void))Consumer_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv(*, timeout=None) -> Message: the next message, zero-copy; use it as a context manager"},
    {"try_recv", (PyCFunction)Consumer_try_recv, METH_NOARGS, "try_recv() -> Message | None: never blocks"},
    {"recv_bytes", (PyCFunction)(void (*)(void))Consumer_recv_bytes, METH_FASTCALL | METH_KEYWORDS,
     "recv_bytes(*, timeout=None) -> bytes: copy out the next bytes message and release it at once"},
    {"_try_recv_bytes", (PyCFunction)Consumer_try_recv_bytes, METH_NOARGS, NULL},
    {"_take_item", (PyCFunction)Consumer_take_item, METH_NOARGS, NULL},
    {"_wait_data", (PyCFunction)(void (*)(void))Consumer_wait_data, METH_FASTCALL, NULL},
    {"_arm_data", (PyCFunction)Consumer_arm_data, METH_O, NULL},
    {"_has_data", (PyCFunction)Consumer_has_data, METH_NOARGS, NULL},
    {"_stuck", (PyCFunction)Consumer_stuck, METH_NOARGS, NULL},
    {"_skip_abandoned", (PyCFunction)(void (*)(void))Consumer_skip_abandoned, METH_FASTCALL, NULL},
    {"_inflight", (PyCFunction)Consumer_inflight, METH_NOARGS, NULL},
    {"_requeue", (PyCFunction)(void (*)(void))Consumer_requeue, METH_FASTCALL, NULL},
    {"_reset", (PyCFunction)Consumer_reset, METH_O, NULL},
    {"_mark_closed", (PyCFunction)Consumer_mark_closed, METH_NOARGS, NULL},
    {"_close_later", (PyCFunction)Consumer_close_later, METH_NOARGS, NULL},
    {"_use", (PyCFunction)Consumer_use, METH_NOARGS, NULL},
    {"_unuse", (PyCFunction)Consumer_unuse, METH_O, NULL},
    {NULL}
};
static PyGetSetDef Consumer_getset[] = {
    {"pending", (getter)Consumer_get_pending, NULL, "messages received and not yet released", NULL},
    {"position", (getter)Consumer_get_read_pos, NULL, "bytes released so far (the read position)", NULL},
    {"received", (getter)Consumer_get_received, NULL, "messages received through this handle", NULL},
    {"closed", (getter)Region_get_closed, NULL, "True once close() was called", NULL},
    {"_user", (getter)Consumer_get_user, NULL, NULL, NULL},
    {NULL}
};

PyTypeObject ConsumerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.ConsumerCore",
    .tp_basicsize = sizeof(Consumer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "C half of shmring.Consumer",
    .tp_base = &RegionType,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Consumer_init,
    .tp_finalize = finalize_by_method,
    .tp_dealloc = (destructor)Consumer_dealloc,
    .tp_methods = Consumer_methods,
    .tp_getset = Consumer_getset,
};
