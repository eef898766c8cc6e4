/*
 * producer.c: ProducerCore, the C half of shmring.Producer: send of bytes and
 * contiguous arrays in one call, reserve / commit / abort, and the wait for
 * room.  The ring protocol itself is in spsc.c and multi.c.
 */
#include "core.h"

static int not_for_records(Region *r) {
    if (r->kind != SHMR_KIND_RECORDS) return 0;
    PyErr_SetString(PyExc_TypeError, "a record ring has its own handles (shmring.records)");
    return -1;
}

static int Producer_init(Producer *self, PyObject *args, PyObject *kw) {
    if (Region_init(&self->r, args, kw) < 0 || not_for_records(&self->r) < 0) return -1;
    uint64_t wp, rp;
    if (read_positions(&self->r, &rp, &wp) < 0) return -1;
    if (is_multi(&self->r)) {
        if (self->r.slot < 0 || (uint32_t)self->r.slot >= self->r.maxp) {
            PyErr_Format(PyExc_ValueError, "producer slot %d outside the table of %u", self->r.slot, self->r.maxp);
            return -1;
        }
        self->entry = self->r.ptab + (uint64_t)self->r.slot * SHMR_MP_ENTRY;
    }
    self->write_pos = wp;
    self->cached_read = rp;
    return 0;
}

static inline int producer_claim(Producer *p, uint64_t payload_len, uint64_t *rec_start) {
    return is_multi(&p->r) ? mp_claim(p, payload_len, rec_start) : spsc_claim(p, payload_len, rec_start);
}

/* Publish the record claimed at start (claimed_len payload bytes claimed, len used). */
static inline void producer_finish(Producer *p, uint64_t start, uint64_t claimed_len, uint64_t len, unsigned type) {
    if (p->count_items) {            /* a queue's producer: the item is counted in the step that publishes it */
        if (p->count_unfinished)
            (void)fetch_add_seq_cst64(p->r.base + p->count_unfinished, 1);   /* R72, before the publish below */
        (void)fetch_add_seq_cst64(p->r.base + p->count_items, 1);   /* R70, before the publish below: counted before it can be taken */
    }
    if (is_multi(&p->r)) mp_commit(p, start, claimed_len, len, type);
    else spsc_publish(p, start, len, type);
    p->commits++;
}

static int too_large(Producer *p, uint64_t len) {
    PyErr_Format(MessageTooLarge, "message of %llu bytes can never fit: this ring's largest "
                 "message is %llu bytes (capacity %llu - %llu)", (unsigned long long)len,
                 (unsigned long long)p->r.max_message, (unsigned long long)p->r.capacity,
                 (unsigned long long)p->r.hdr);
    return -1;
}

/* Copy one payload in and publish it. 1 sent, 0 full, -1 error. */
static int producer_push(Producer *p, const char *buf, uint64_t len, unsigned type) {
    if (len > p->r.max_message) return too_large(p, len);
    if (p->reserved) { PyErr_SetString(ShmringError, "a reservation is open; commit or abort it first"); return -1; }
    uint64_t start;
    int r = producer_claim(p, len, &start);
    if (r != PEEK_FOUND) return r;
    memcpy(p->r.base + payload_offset(&p->r, start), buf, len);
    producer_finish(p, start, len, len, type);
    return 1;
}

/* Fast path for bytes / bytearray: 1 sent, 0 full, -1 error, 2 not a fast type. */
static int producer_push_fast(Producer *p, PyObject *data) {
    if (PyBytes_CheckExact(data))
        return producer_push(p, PyBytes_AS_STRING(data), (uint64_t)PyBytes_GET_SIZE(data), SHMR_T_BYTES);
    if (PyByteArray_CheckExact(data))
        return producer_push(p, PyByteArray_AS_STRING(data), (uint64_t)PyByteArray_GET_SIZE(data), SHMR_T_BYTES);
    return 2;
}

/* _use() -> token: hold the handle for a multi-step call made in Python; _unuse(token) ends it. */
static PyObject *Producer_use(Producer *self, PyObject *unused) {
    unsigned long prev;
    if (use_begin(&self->user, &prev, "producer", "") < 0) return NULL;
    return PyLong_FromUnsignedLong(prev);
}
static PyObject *Producer_unuse(Producer *self, PyObject *token) {
    unsigned long prev = PyLong_AsUnsignedLong(token);
    if (PyErr_Occurred()) return NULL;
    if (self->user == this_thread()) self->user = prev;   /* only if the _use() was ours */
    Py_RETURN_NONE;
}

static PyObject *producer_send(Producer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (nargs < 1) { PyErr_SetString(PyExc_TypeError, "send(data, *, timeout=None)"); return NULL; }
    if (check_usable(&self->r) < 0) return NULL;
    PyObject *timeout = Py_None;
    if (nargs > 1 || (kwnames && PyTuple_GET_SIZE(kwnames) > 0)) {
        if (nargs > 1 || PyTuple_GET_SIZE(kwnames) != 1 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) ||
            PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0) {
            PyErr_SetString(PyExc_TypeError, "send(data, *, timeout=None)");
            return NULL;
        }
        timeout = args[1];
        if (check_timeout(timeout) < 0) return NULL;
    }
    int r = producer_push_fast(self, args[0]);
    if (r == 1) Py_RETURN_NONE;
    if (r < 0) return NULL;
    if (r == 0) return PyObject_CallMethodObjArgs((PyObject *)self, str_send_wait, args[0], timeout, NULL);
    return PyObject_CallMethodObjArgs((PyObject *)self, str_send_obj, args[0], timeout, NULL);
}

static PyObject *Producer_send(Producer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    unsigned long prev;
    if (use_begin(&self->user, &prev, "producer", "") < 0) return NULL;
    PyObject *res = guard_exit(&self->r, producer_send(self, args, nargs, kwnames));
    self->user = prev;
    return res;
}

static PyObject *producer_try_send(Producer *self, PyObject *data) {
    if (check_usable(&self->r) < 0) return NULL;
    int r = producer_push_fast(self, data);
    if (r == 1) Py_RETURN_TRUE;
    if (r == 0) Py_RETURN_FALSE;
    if (r < 0) return NULL;
    return PyObject_CallMethodObjArgs((PyObject *)self, str_try_send_obj, data, NULL);
}

PyObject *Producer_try_send(Producer *self, PyObject *data) {
    unsigned long prev;
    if (use_begin(&self->user, &prev, "producer", "") < 0) return NULL;
    PyObject *res = guard_exit(&self->r, producer_try_send(self, data));
    self->user = prev;
    return res;
}

/* _push(buffer, type) -> bool: try to send any contiguous buffer as one record. */
static PyObject *Producer_push(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_push(buffer, type)"); return NULL; }
    if (check_usable(&self->r) < 0) return NULL;
    long type = PyLong_AsLong(args[1]); if (PyErr_Occurred()) return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    int r = producer_push(self, (const char *)b.buf, (uint64_t)b.len, (unsigned)type);
    PyBuffer_Release(&b);
    return guard_exit(&self->r, r < 0 ? NULL : PyBool_FromLong(r));
}

/* _push_array(meta, data, type) -> bool: one record holding
 *   u32 meta_len | u32 1 | meta | pad to 64 | data
 * (the T_ARRAY layout of shmring.codec) with one memcpy of a contiguous buffer. */
static PyObject *Producer_push_array(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3 || !PyBytes_Check(args[0])) { PyErr_SetString(PyExc_TypeError, "_push_array(meta: bytes, data, type)"); return NULL; }
    if (check_usable(&self->r) < 0) return NULL;
    long type = PyLong_AsLong(args[2]); if (PyErr_Occurred()) return NULL;
    if (self->reserved) { PyErr_SetString(ShmringError, "a reservation is open; commit or abort it first"); return NULL; }
    Py_buffer b;
    if (PyObject_GetBuffer(args[1], &b, PyBUF_ANY_CONTIGUOUS) < 0) return NULL;
    uint64_t meta_len = (uint64_t)PyBytes_GET_SIZE(args[0]);
    uint64_t worst = 8 + meta_len + 63 + (uint64_t)b.len;
    PyObject *result = NULL;
    if (worst > self->r.max_message) {
        PyErr_Format(MessageTooLarge, "array of %zd bytes can never fit: this ring's largest message is "
                     "%llu bytes including %llu bytes of descriptor and alignment", b.len,
                     (unsigned long long)self->r.max_message, (unsigned long long)(worst - (uint64_t)b.len));
        goto done;
    }
    uint64_t start;
    int r = producer_claim(self, worst, &start);
    if (r == PEEK_CORRUPT) goto done;
    if (r == PEEK_EMPTY) { Py_INCREF(Py_False); result = Py_False; goto done; }
    uint64_t payload = payload_offset(&self->r, start);  /* region offsets */
    char *pl = self->r.base + payload;
    *(uint32_t *)pl = (uint32_t)meta_len;
    *(uint32_t *)(pl + 4) = 1;
    memcpy(pl + 8, PyBytes_AS_STRING(args[0]), meta_len);
    uint64_t area = (payload + 8 + meta_len + 63) & ~(uint64_t)63;
    memcpy(self->r.base + area, b.buf, (size_t)b.len);
    uint64_t len = area + (uint64_t)b.len - payload;
    producer_finish(self, start, worst, len, (unsigned)type);
    Py_INCREF(Py_True); result = Py_True;
done:
    PyBuffer_Release(&b);
    return guard_exit(&self->r, result);
}

/* _reserve(payload_len, type) -> offset of the payload in the region, or None if full. */
static PyObject *Producer_reserve(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_reserve(nbytes, type)"); return NULL; }
    if (check_usable(&self->r) < 0) return NULL;
    unsigned long long len = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    long type = PyLong_AsLong(args[1]); if (PyErr_Occurred()) return NULL;
    if (len > self->r.max_message) {
        PyErr_Format(MessageTooLarge, "reservation of %llu bytes can never fit: this ring's largest "
                     "message is %llu bytes", len, (unsigned long long)self->r.max_message);
        return NULL;
    }
    if (self->reserved) { PyErr_SetString(ShmringError, "a reservation is already open; commit or abort it first"); return NULL; }
    uint64_t prev = self->write_pos, start;
    int r = producer_claim(self, len, &start);
    if (r == PEEK_CORRUPT) return NULL;
    if (r == PEEK_EMPTY) Py_RETURN_NONE;
    self->reserved = 1;
    self->res_seq++;
    self->res_start = start;
    self->res_len = len;
    self->res_prev = prev;
    self->res_type = (unsigned)type;
    /* spsc: write_pos stays where it was until commit, so abort forgets the
     * claim.  A reservation on a truncated ring is aborted at once (nothing
     * can be sent there). */
    if (truncated(&self->r)) { self->reserved = 0; self->write_pos = prev; return raise_truncated(&self->r); }
    return PyLong_FromUnsignedLongLong(payload_offset(&self->r, start));
}

/* Is reservation number `seq` (None: whichever) the open one? */
static int res_open(Producer *p, PyObject *seq) {
    if (!p->reserved) return 0;
    if (seq == NULL || seq == Py_None) return 1;
    unsigned long long v = PyLong_AsUnsignedLongLong(seq);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    return v == p->res_seq;
}

/* _commit(nbytes=None, seq=None): publish the open reservation (number seq),
 * optionally shrunk to nbytes.  One C step: an interrupt cannot split it. */
static PyObject *Producer_commit(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (check_owner(&self->r) < 0) return NULL;
    int open = res_open(self, n >= 2 ? args[1] : NULL);
    if (open < 0) return NULL;
    if (!open) { PyErr_SetString(ShmringError, "no open reservation (it was committed, aborted, or aborted by close())"); return NULL; }
    uint64_t len = self->res_len;
    if (n >= 1 && args[0] != Py_None) {
        unsigned long long l = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
        if (l > len) { PyErr_Format(PyExc_ValueError, "cannot commit %llu bytes of a %llu-byte reservation", l, (unsigned long long)len); return NULL; }
        len = l;
    }
    unsigned long prev;
    if (use_begin(&self->user, &prev, "producer", "") < 0) return NULL;
    self->reserved = 0;
    producer_finish(self, self->res_start, self->res_len, len, self->res_type);
    self->user = prev;
    return guard_exit(&self->r, Py_NewRef(Py_None));
}

/* _abort(seq=None): forget the open reservation (number seq; another one is
 * left alone).  spsc: nothing was published, rewind.  Multi-party: others may
 * have claimed after it, so it is committed as a T_SKIP.  In a forked child
 * the reservation is the parent's: only this copy of the handle forgets it. */
static PyObject *Producer_abort(Producer *self, PyObject *const *args, Py_ssize_t n) {
    int open = res_open(self, n >= 1 ? args[0] : NULL);
    if (open <= 0) return open < 0 ? NULL : Py_NewRef(Py_None);
    unsigned long prev;
    if (use_begin(&self->user, &prev, "producer", "") < 0) return NULL;
    self->reserved = 0;
    if (inherited(&self->r)) ;
    else if (is_multi(&self->r)) mp_commit(self, self->res_start, self->res_len, self->res_len, SHMR_T_SKIP);
    else self->write_pos = self->res_prev;
    self->user = prev;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------ Ticket
 * The open reservation as an object: made by the same C call that reserves,
 * so from the first instant some object stands for it; when the last
 * reference goes (a with block never entered, an interrupt anywhere in the
 * Python glue, a reservation forgotten) its deallocator aborts the
 * reservation, in C, where no signal handler can run in between.  It names
 * its reservation by number: it never touches a later one. */
typedef struct {
    PyObject_HEAD
    Producer *p;
    uint64_t seq, offset;
} Ticket;

static PyTypeObject TicketType;

static void ticket_abort(Ticket *t) {
    Producer *p = t->p;
    if (!p || !p->reserved || p->res_seq != t->seq) return;
    if (p->r.closed) return;           /* close() / detach() aborted what they meant to; a handle marked
                                        * closed by other means stands for a gone process: leave its claim */
    if (p->user && p->user != this_thread()) return;   /* another thread is inside a call: close() aborts it */
    p->reserved = 0;
    if (inherited(&p->r)) return;      /* a forked child: the parent's reservation */
    if (is_multi(&p->r)) mp_commit(p, p->res_start, p->res_len, p->res_len, SHMR_T_SKIP);
    else p->write_pos = p->res_prev;
}

static void Ticket_dealloc(Ticket *t) {
    ticket_abort(t);
    Py_CLEAR(t->p);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *Ticket_commit(Ticket *t, PyObject *const *args, Py_ssize_t n) {
    if (n > 1) { PyErr_SetString(PyExc_TypeError, "commit(nbytes=None)"); return NULL; }
    PyObject *seq = PyLong_FromUnsignedLongLong(t->seq);
    if (!seq) return NULL;
    PyObject *a[2] = { n ? args[0] : Py_None, seq };
    PyObject *r = Producer_commit(t->p, a, 2);
    Py_DECREF(seq);
    return r;
}

static PyObject *Ticket_abort(Ticket *t, PyObject *unused) {
    if (t->p->user && t->p->user != this_thread()) {
        PyErr_SetString(ShmringError, "this producer handle is in use by another thread inside a call of it");
        return NULL;
    }
    ticket_abort(t);
    Py_RETURN_NONE;
}

static PyObject *Ticket_get_offset(Ticket *t, void *c) { return PyLong_FromUnsignedLongLong(t->offset); }
static PyObject *Ticket_get_open(Ticket *t, void *c) {
    return PyBool_FromLong(t->p->reserved && t->p->res_seq == t->seq);
}

static PyMethodDef Ticket_methods[] = {
    {"commit", (PyCFunction)(void (*)(void))Ticket_commit, METH_FASTCALL, "commit(nbytes=None): publish this reservation"},
    {"abort", (PyCFunction)Ticket_abort, METH_NOARGS, "abort(): forget this reservation (a no-op once it is not open)"},
    {NULL}
};
static PyGetSetDef Ticket_getset[] = {
    {"offset", (getter)Ticket_get_offset, NULL, "payload offset in the region", NULL},
    {"open", (getter)Ticket_get_open, NULL, "this reservation is still open", NULL},
    {NULL}
};
static PyTypeObject TicketType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.Ticket",
    .tp_basicsize = sizeof(Ticket),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "an open reservation of a producer; aborted when dropped open",
    .tp_dealloc = (destructor)Ticket_dealloc,
    .tp_methods = Ticket_methods,
    .tp_getset = Ticket_getset,
};

/* _reserve_ticket(payload_len, type) -> Ticket, or None if full. */
static PyObject *Producer_reserve_ticket(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (PyType_Ready(&TicketType) < 0) return NULL;
    Ticket *t = PyObject_New(Ticket, &TicketType);     /* first: no failure after the claim */
    if (!t) return NULL;
    t->p = NULL;
    PyObject *off = Producer_reserve(self, args, n);
    if (!off || off == Py_None) { Py_DECREF(t); return off; }
    t->offset = PyLong_AsUnsignedLongLong(off);
    Py_DECREF(off);
    Py_INCREF(self);
    t->p = self;
    t->seq = self->res_seq;
    return (PyObject *)t;
}

struct space_ctx { Producer *p; uint64_t len, total; };

/* Room for the record now (the seq_cst condition loads of R4). */
static int space_cond(void *vctx) {
    struct space_ctx *c = vctx;
    Region *r = &c->p->r;
    if (is_multi(r)) {                 /* room at the current cursor */
        uint64_t wp = load_seq_cst64(r->base + SHMR_OFF_WRITE_POS);   /* R4, pairs with the producers' cursor CAS */
        uint64_t need = align16(SHMR_MREC_HDR + c->len);
        uint64_t g = mp_gate(r, wp);
        if (g > wp) return 1;          /* stale or corrupt: let the claim decide */
        return wp + need - g <= r->capacity;   /* no wrap padding (R60) */
    }
    uint64_t rp = load_seq_cst64(r->base + SHMR_OFF_READ_POS);   /* R4, pairs with the consumer's exchange of read_pos */
    uint64_t wp = c->p->write_pos;
    if (rp > wp) return 1;             /* corrupt: let the caller's claim report it */
    return wp + c->total - rp <= r->capacity;
}

/* _wait_space(payload_len, slice_s, spin_s) -> bool (GIL released while waiting). */
static PyObject *Producer_wait_space(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_wait_space(nbytes, slice, spin)"); return NULL; }
    if (check_usable(&self->r) < 0) return NULL;
    unsigned long long len = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    struct space_ctx c = { self, len, align8(SHMR_REC_HDR + len) };   /* no wrap padding (R60) */
    return wait_slice(&self->r, self->r.base + SHMR_OFF_SPACE_WAKE, space_cond, &c, args[1], args[2],
                      is_multi(&self->r) ? self->entry + SHMR_PE_WAITING : NULL);
}

/* _arm_space(payload_len, word) -> slot | -1 ready | -2 no slot: a wake-up descriptor (R52). */
static PyObject *Producer_arm_space(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_arm_space(nbytes, word)"); return NULL; }
    if (check_usable(&self->r) < 0) return NULL;
    unsigned long long len = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    unsigned long long w = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    struct space_ctx c = { self, len, align8(SHMR_REC_HDR + len) };   /* no wrap padding (R60) */
    return guard_exit(&self->r, PyLong_FromLong(fd_arm(self->r.base + SHMR_OFF_SPACE_WAKE, w, space_cond, &c)));
}

static PyObject *Producer_mark_closed(Producer *self, PyObject *unused) {
    self->r.closed = 1;
    Py_RETURN_NONE;
}

static PyObject *Producer_get_write_pos(Producer *self, void *c) {
    if (is_multi(&self->r) && self->r.has_view)     /* shared by the producers: the claim cursor */
        return PyLong_FromUnsignedLongLong(load_acquire64(self->r.base + SHMR_OFF_WRITE_POS));   /* R6, statistics */
    return PyLong_FromUnsignedLongLong(self->write_pos);
}
static PyObject *Producer_get_reserved(Producer *self, void *c) { return PyBool_FromLong(self->reserved); }
static PyObject *Producer_get_res_seq(Producer *self, void *c) { return PyLong_FromUnsignedLongLong(self->res_seq); }
static PyObject *Producer_get_user(Producer *self, void *c) { return PyLong_FromUnsignedLong(self->user); }
static PyObject *Producer_get_commits(Producer *self, void *c) { return PyLong_FromUnsignedLongLong(self->commits); }

/* _count_into(items_off, unfinished_off or 0): a queue's producer (R70, R72) counts each
 * message it publishes into these header words, in the C step that publishes it. */
static PyObject *Producer_count_into(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_count_into(items_off, unfinished_off)"); return NULL; }
    unsigned long long items = PyLong_AsUnsignedLongLong(args[0]), unfinished = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (!items || items % 8 || items + 8 > self->r.words_end || unfinished % 8 ||
        (unfinished && unfinished + 8 > self->r.words_end)) {
        PyErr_SetString(PyExc_ValueError, "bad header offset for a queue's count");
        return NULL;
    }
    self->count_items = items;
    self->count_unfinished = unfinished;
    Py_RETURN_NONE;
}

static PyMethodDef Producer_methods[] = {
    {"send", (PyCFunction)(void (*)(void))Producer_send, METH_FASTCALL | METH_KEYWORDS,
     "send(data, *, timeout=None): send bytes, an ndarray or a msgpack-able object; "
     "block up to timeout seconds (None: forever) while the ring is full"},
    {"try_send", (PyCFunction)Producer_try_send, METH_O, "try_send(data) -> bool: send if there is room now"},
    {"_push", (PyCFunction)(void (*)(void))Producer_push, METH_FASTCALL, NULL},
    {"_reserve", (PyCFunction)(void (*)(void))Producer_reserve, METH_FASTCALL, NULL},
    {"_reserve_ticket", (PyCFunction)(void (*)(void))Producer_reserve_ticket, METH_FASTCALL, NULL},
    {"_push_array", (PyCFunction)(void (*)(void))Producer_push_array, METH_FASTCALL, NULL},
    {"_commit", (PyCFunction)(void (*)(void))Producer_commit, METH_FASTCALL, NULL},
    {"_abort", (PyCFunction)(void (*)(void))Producer_abort, METH_FASTCALL, NULL},
    {"_wait_space", (PyCFunction)(void (*)(void))Producer_wait_space, METH_FASTCALL, NULL},
    {"_arm_space", (PyCFunction)(void (*)(void))Producer_arm_space, METH_FASTCALL, NULL},
    {"_mark_closed", (PyCFunction)Producer_mark_closed, METH_NOARGS, NULL},
    {"_use", (PyCFunction)Producer_use, METH_NOARGS, NULL},
    {"_count_into", (PyCFunction)(void (*)(void))Producer_count_into, METH_FASTCALL, NULL},
    {"_unuse", (PyCFunction)Producer_unuse, METH_O, NULL},
    {NULL}
};
static PyGetSetDef Producer_getset[] = {
    {"position", (getter)Producer_get_write_pos, NULL, "bytes committed so far (the write position)", NULL},
    {"_reserved", (getter)Producer_get_reserved, NULL, NULL, NULL},
    {"_res_seq", (getter)Producer_get_res_seq, NULL, "reservations opened so far (the open one's number)", NULL},
    {"_user", (getter)Producer_get_user, NULL, NULL, NULL},
    {"_commits", (getter)Producer_get_commits, NULL, "messages this handle published (process-local)", NULL},
    {"closed", (getter)Region_get_closed, NULL, "True once close() was called", NULL},
    {NULL}
};

PyTypeObject ProducerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.ProducerCore",
    .tp_basicsize = sizeof(Producer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "C half of shmring.Producer",
    .tp_base = &RegionType,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Producer_init,
    .tp_finalize = finalize_by_method,
    .tp_methods = Producer_methods,
    .tp_getset = Producer_getset,
};
