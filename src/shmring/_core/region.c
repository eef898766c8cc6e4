/*
 * region.c: a mapped region.  Holds a buffer export of the mapping for its
 * lifetime, so the mapping cannot be unmapped (mmap.close() raises
 * BufferError) while any handle or message still points into it.  Reads the
 * ring geometry once (R1) and gives Python ordered word accessors (R22).
 */
#include "core.h"

#include <structmember.h>

/* Take a writable export of the mapping passed as the first argument. */
int region_map(Region *self, PyObject *args) {
    PyObject *buf;
    int slot = -1;
    if (!PyArg_ParseTuple(args, "O|i", &buf, &slot)) return -1;
    self->slot = slot;
    if (self->has_view) { PyErr_SetString(PyExc_RuntimeError, "already initialized"); return -1; }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return -1;
    self->has_view = 1;
    self->base = (char *)self->view.buf;
    /* R45: held while we hold the export; a mapping already truncated takes no new handle */
    self->guard_slot = guard_hold(self->base, self->view.len, NULL);
    self->trunc = guard_flag(self->guard_slot);
    if (truncated(self)) { raise_truncated(self); return -1; }
    self->fork_gen = fork_generation;
    self->words_end = SHMR_HEADER_SIZE;
    if ((uintptr_t)self->base % 4096 != 0 || self->view.len < (Py_ssize_t)SHMR_HEADER_SIZE) {
        PyErr_SetString(CorruptSegmentError, "region is unaligned or smaller than the header page");
        return -1;
    }
    /* R1: ready before any other header field (pairs with the creator's
     * store_release of ready).  The creator itself maps the region before it
     * stores ready, so 0 is not an error here; Python attach waited for 1. */
    (void)load_acquire32(self->base + SHMR_OFF_READY);   /* R1, pairs with the creator's store_u32(ready) */
    return 0;
}

/* A ring region: the mapping plus the ring's geometry. */
int Region_init(Region *self, PyObject *args, PyObject *kw) {
    if (region_map(self, args) < 0) return -1;
    char *b = self->base;
    /* Read once and cached: later corruption of the header cannot move our bounds. */
    uint64_t cap = load_relaxed64(b + SHMR_OFF_CAPACITY);   /* R1, fixed field after ready */
    if (cap < SHMR_MIN_CAPACITY || cap > SHMR_MAX_CAPACITY || (cap & (cap - 1)) != 0 ||
        (uint64_t)self->view.len < SHMR_HEADER_SIZE + cap) {
        PyErr_Format(CorruptSegmentError, "capacity %llu does not fit a region of %zd bytes",
                     (unsigned long long)cap, self->view.len);
        return -1;
    }
    self->capacity = cap;
    self->mask = cap - 1;
    self->kind = load_relaxed32(b + SHMR_OFF_KIND);   /* R1, fixed field after ready */
    self->hdr = SHMR_REC_HDR;
    self->data_off = SHMR_HEADER_SIZE;
    if (self->kind == SHMR_KIND_MPSC || self->kind == SHMR_KIND_BROADCAST || self->kind == SHMR_KIND_MPMC) {
        uint64_t doff = load_relaxed64(b + SHMR_OFF_DATA_OFFSET);   /* R1, fixed field after ready */
        uint64_t pt = load_relaxed64(b + SHMR_MP_OFF_PROD_TABLE);   /* R1, fixed field after ready */
        uint64_t ct = load_relaxed64(b + SHMR_MP_OFF_CONS_TABLE);   /* R1, fixed field after ready */
        uint32_t mp = load_relaxed32(b + SHMR_MP_OFF_MAX_PRODUCERS);   /* R1, fixed field after ready */
        uint32_t mc = load_relaxed32(b + SHMR_MP_OFF_MAX_CONSUMERS);   /* R1, fixed field after ready */
        if (mp < 1 || mp > SHMR_MP_MAX_PARTIES || mc < 1 || mc > SHMR_MP_MAX_PARTIES || pt != SHMR_HEADER_SIZE ||
            ct != pt + (uint64_t)mp * SHMR_MP_ENTRY || doff != ((ct + (uint64_t)mc * SHMR_MP_ENTRY + 4095) & ~4095ull) ||
            (uint64_t)self->view.len < doff + cap) {
            PyErr_Format(CorruptSegmentError, "multi-party ring tables do not fit: %u producers, %u consumers, "
                         "data at %llu, region of %zd bytes", mp, mc, (unsigned long long)doff, self->view.len);
            return -1;
        }
        self->hdr = SHMR_MREC_HDR;
        self->data_off = doff;
        self->key = load_relaxed64(b + SHMR_MP_OFF_KEY);   /* R1, fixed field after ready */
        self->ptab = b + pt; self->ctab = b + ct;
        self->maxp = mp; self->maxc = mc;
        self->policy = load_relaxed32(b + SHMR_MP_OFF_POLICY);   /* R1, fixed field after ready */
        self->words_end = doff;          /* the tables are reachable from Python */
    } else if (self->kind != SHMR_KIND_SPSC && self->kind != SHMR_KIND_RECORDS) {
        PyErr_Format(CorruptSegmentError, "unknown ring kind %u", self->kind);
        return -1;
    }
    /* R60: every framed ring's data area is mapped twice, back to back, so a
     * record of up to a capacity is contiguous wherever it starts; a record
     * ring (Python only) is mapped once. */
    self->dmapped = self->kind != SHMR_KIND_RECORDS;
    if (self->dmapped && (uint64_t)self->view.len < self->data_off + 2 * cap) {
        PyErr_Format(CorruptSegmentError, "ring data area of %llu bytes at %llu is not mapped twice "
                     "(region of %zd bytes)", (unsigned long long)cap, (unsigned long long)self->data_off,
                     self->view.len);
        return -1;
    }
    self->max_message = cap - self->hdr;       /* R60: a record fills at most the whole data area */
    if (self->max_message > SHMR_MAX_MESSAGE) self->max_message = SHMR_MAX_MESSAGE;  /* lengths are u32 */
    self->data = self->base + self->data_off;
    return 0;
}

void Region_dealloc(Region *self) {
    if (self->has_view) {
        guard_release(self->guard_slot);         /* R45: before the export goes, so before any munmap */
        self->guard_slot = -1;
        self->trunc = NULL;
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The refusal of an explicit effect on a handle inherited through fork. */
int check_owner(Region *r) {
    if (!inherited(r)) return 0;
    PyErr_SetString(ShmringError, "this handle was created before fork(); a forked child must "
                                  "take its own handle (ring.producer() / ring.consumer())");
    return -1;
}

/* HandleClosed naming the handle and its segment: "this Producer of segment
 * 'x' is closed".  A slow path: the label is the Python handle's _label. */
int raise_closed(Region *r) {
    const char *kind = Py_TYPE(r)->tp_name, *dot = strrchr(kind, '.');
    if (dot) kind = dot + 1;
    PyObject *label = PyObject_GetAttrString((PyObject *)r, "_label");
    if (label && PyUnicode_Check(label))
        PyErr_Format(HandleClosed, "this %s of %U is closed", kind, label);
    else {
        PyErr_Clear();
        PyErr_Format(HandleClosed, "this %s handle is closed", kind);
    }
    Py_XDECREF(label);
    return -1;
}

int check_unusable(Region *r) {
    if (r->closed || !r->has_view) return raise_closed(r);
    if (truncated(r)) { raise_truncated(r); return -1; }
    return check_owner(r);
}

/* The position invariant: rp <= wp <= rp + capacity, both aligned to the
 * record alignment.  0 holds, -1 CorruptSegmentError. */
int check_positions(Region *r, uint64_t rp, uint64_t wp) {
    uint64_t al = r->hdr - 1;
    if (rp > wp || wp - rp > r->capacity || (wp & al) || (rp & al)) {
        PyErr_Format(CorruptSegmentError, "positions out of order: read %llu, write %llu, capacity %llu",
                     (unsigned long long)rp, (unsigned long long)wp, (unsigned long long)r->capacity);
        return -1;
    }
    return 0;
}

/* The release and write positions of a ring, consistent although other
 * processes move both (R28): the release position is read before and after
 * the write position; both only grow, so if it did not move, rp <= wp <=
 * rp + capacity held when wp was read.  0, or -1 with CorruptSegmentError. */
int read_positions(Region *r, uint64_t *rp, uint64_t *wp) {
    uint64_t a, b, w;
    for (int tries = 0;; tries++) {
        a = load_acquire64(r->base + SHMR_OFF_READ_POS);   /* R28, pairs with the consumers' release of read_pos */
        if (pause_point((PyObject *)r, "positions") < 0) return -1;
        w = load_acquire64(r->base + SHMR_OFF_WRITE_POS);   /* R28, pairs with the producers' publish / claim CAS */
        b = load_acquire64(r->base + SHMR_OFF_READ_POS);   /* R28, unchanged: the pair was consistent */
        if (a == b || tries >= 1000) break;
    }
    *rp = b;
    *wp = w;
    return check_positions(r, b, w);
}

/* CorruptSegmentError naming what was wrong where; returns PEEK_CORRUPT. */
int corrupt(const char *what, uint64_t pos, uint64_t a, uint64_t b) {
    PyErr_Format(CorruptSegmentError, "%s at position %llu (%llu, %llu)", what,
                 (unsigned long long)pos, (unsigned long long)a, (unsigned long long)b);
    return PEEK_CORRUPT;
}

/* One thread at a time (README, "Handles, threads and garbage collection"),
 * for producer and consumer handles alike: each public call records its
 * thread in *user for its whole duration, including the Python slow paths and
 * the waits, which let other threads run; another thread's call meanwhile is
 * refused instead of interleaving with it.  The slow paths call the handle's
 * own methods: the same thread passes.  `also` ends the error message. */
/* The slow path of use_begin: another thread is inside a call of this handle. */
int use_busy(unsigned long user, const char *what, const char *also) {
    PyErr_Format(ShmringError, "this %s handle is in use by another thread (ident %lu) inside a call "
                 "of it; a handle is not thread-safe: give each thread its own handle, or serialize "
                 "its calls with a lock%s", what, ((PyThreadState *)user)->thread_id, also);
    return -1;
}

/* A timeout is None or a number >= 0; checked even when the call would not block. */
int check_timeout(PyObject *timeout) {
    if (timeout == Py_None) return 0;
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred()) return -1;
    if (!(t >= 0)) {
        PyErr_Format(PyExc_ValueError, "timeout must be None or >= 0 seconds, got %R", timeout);
        return -1;
    }
    return 0;
}

/* ------------------------------------------- Python's word accessors (R22) */

/* Offsets passed from Python must be aligned and inside the words Python may touch. */
static char *header_word(Region *self, PyObject *arg, unsigned size) {
    if (!self->has_view) { PyErr_SetString(HandleClosed, "region is detached"); return NULL; }
    long long off = PyLong_AsLongLong(arg);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (off < 0 || (uint64_t)off + size > self->words_end || off % size != 0) {
        PyErr_Format(PyExc_ValueError, "bad header offset %lld for a %u-byte word", off, size);
        return NULL;
    }
    return self->base + off;
}

static PyObject *Region_load_u32(Region *self, PyObject *off) {
    char *p = header_word(self, off, 4); if (!p) return NULL;
    return PyLong_FromUnsignedLong(load_seq_cst32(p));   /* R22, pairs with the store the caller's rule names */
}
static PyObject *Region_load_u64(Region *self, PyObject *off) {
    char *p = header_word(self, off, 8); if (!p) return NULL;
    return PyLong_FromUnsignedLongLong(load_seq_cst64(p));   /* R22, pairs with the store the caller's rule names */
}
static PyObject *Region_store_u32(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "store_u32(offset, value)"); return NULL; }
    char *p = header_word(self, args[0], 4); if (!p) return NULL;
    unsigned long v = PyLong_AsUnsignedLong(args[1]); if (PyErr_Occurred()) return NULL;
    store_release32(p, (uint32_t)v);   /* R22, pairs with the acquire the caller's rule names */
    Py_RETURN_NONE;
}
static PyObject *Region_store_u64(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "store_u64(offset, value)"); return NULL; }
    char *p = header_word(self, args[0], 8); if (!p) return NULL;
    unsigned long long v = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    (void)xchg_seq_cst64(p, (uint64_t)v);   /* R22, pairs with the load the caller's rule names */
    Py_RETURN_NONE;
}
static PyObject *Region_cas_u64(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "cas_u64(offset, expected, desired)"); return NULL; }
    char *p = header_word(self, args[0], 8); if (!p) return NULL;
    unsigned long long e = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    unsigned long long d = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(cas_seq_cst64(p, e, d));   /* R22, decided from the value it swaps */
}
static PyObject *Region_fetch_add_u64(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "fetch_add_u64(offset, delta)"); return NULL; }
    char *p = header_word(self, args[0], 8); if (!p) return NULL;
    unsigned long long v = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLongLong(fetch_add_seq_cst64(p, v));   /* R22, a shared counter */
}
/* Wake every sleeper on the wake line at `offset` (used for end of stream). */
static PyObject *Region_wake(Region *self, PyObject *off) {
    char *p = header_word(self, off, 8); if (!p) return NULL;
    wake_always(p);
    Py_RETURN_NONE;
}

/* publish_u64(offset, value, wake_offset): store a position and wake its
 * sleepers (the waker's side of R4). */
static PyObject *Region_publish_u64(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "publish_u64(offset, value, wake_offset)"); return NULL; }
    char *p = header_word(self, args[0], 8); if (!p) return NULL;
    char *w = header_word(self, args[2], 8); if (!w) return NULL;
    unsigned long long v = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    publish_and_wake(p, v, w);
    Py_RETURN_NONE;
}

struct change_ctx { char *word, *stop; uint64_t value; };
static int change_cond(void *vctx) {
    struct change_ctx *c = vctx;
    return load_seq_cst64(c->word) != c->value ||                /* R4, pairs with publish_u64's exchange */
           (c->stop && load_seq_cst32(c->stop) != 0);            /* R5, pairs with the producer's store_u32(closed) */
}

/* wait_change(offset, value, wake_offset, stop_offset, slice, spin) -> bool:
 * sleep (GIL released) until the u64 at offset differs from value or the u32
 * at stop_offset (-1: none) is non-zero, for at most one slice. */
static PyObject *Region_wait_change(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 6) { PyErr_SetString(PyExc_TypeError, "wait_change(offset, value, wake_offset, stop_offset, slice, spin)"); return NULL; }
    if (check_usable(self) < 0) return NULL;
    struct change_ctx c;
    c.word = header_word(self, args[0], 8); if (!c.word) return NULL;
    char *w = header_word(self, args[2], 8); if (!w) return NULL;
    c.value = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    c.stop = NULL;
    if (PyLong_AsLong(args[3]) >= 0) { c.stop = header_word(self, args[3], 4); if (!c.stop) return NULL; }
    if (PyErr_Occurred()) return NULL;
    return wait_slice(self, w, change_cond, &c, args[4], args[5], NULL);
}

/* arm_change(word, offset, value, wake_offset, stop_offset) -> slot | -1 ready | -2 no slot:
 * wait_change's condition, for a wake-up descriptor (R52). */
static PyObject *Region_arm_change(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 5) { PyErr_SetString(PyExc_TypeError, "arm_change(word, offset, value, wake_offset, stop_offset)"); return NULL; }
    if (check_usable(self) < 0) return NULL;
    unsigned long long word = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    struct change_ctx c;
    c.word = header_word(self, args[1], 8); if (!c.word) return NULL;
    c.value = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    char *w = header_word(self, args[3], SHMR_LINE); if (!w) return NULL;
    c.stop = NULL;
    if (PyLong_AsLong(args[4]) >= 0) { c.stop = header_word(self, args[4], 4); if (!c.stop) return NULL; }
    if (PyErr_Occurred()) return NULL;
    return guard_exit(self, PyLong_FromLong(fd_arm(w, word, change_cond, &c)));
}

/* _fd_disarm(wake_offset, slot, word) -> bool: cleared our slot (False: it fired, R54). */
static PyObject *Region_fd_disarm(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_fd_disarm(wake_offset, slot, word)"); return NULL; }
    char *w = header_word(self, args[0], SHMR_LINE); if (!w) return NULL;
    long k = PyLong_AsLong(args[1]); if (PyErr_Occurred()) return NULL;
    unsigned long long word = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(fd_disarm(w, (int)k, word));
}

/* _fd_armed(wake_offset, slot, word) -> bool: our slot still holds our word (R54). */
static PyObject *Region_fd_armed(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_fd_armed(wake_offset, slot, word)"); return NULL; }
    char *w = header_word(self, args[0], SHMR_LINE); if (!w) return NULL;
    long k = PyLong_AsLong(args[1]); if (PyErr_Occurred()) return NULL;
    unsigned long long word = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(fd_is_armed(w, (int)k, word));
}

/* producers_ended(seal) -> bool: multi-party: has the stream ended (mp_ended_ex)? */
static PyObject *Region_producers_ended(Region *self, PyObject *seal) {
    if (check_usable(self) < 0) return NULL;
    if (!is_multi(self)) { PyErr_SetString(PyExc_ValueError, "not a multi-party ring"); return NULL; }
    int s = PyObject_IsTrue(seal); if (s < 0) return NULL;
    return PyBool_FromLong(mp_ended_ex(self, s));
}

/* _guard_check(): SegmentTruncated if the backing was truncated under this
 * mapping (R47), for the Python paths (record rings, stats, flush). */
static PyObject *Region_guard_check(Region *self, PyObject *unused) {
    if (truncated(self)) return raise_truncated(self);
    Py_RETURN_NONE;
}

PyObject *Region_get_closed(Region *self, void *c) { return PyBool_FromLong(self->closed); }
static PyObject *Region_get_truncated(Region *self, void *c) { return PyBool_FromLong(truncated(self)); }
PyObject *Region_get_inherited(Region *self, void *c) { return PyBool_FromLong(inherited(self)); }

static PyGetSetDef Region_getset[] = {
    {"_inherited", (getter)Region_get_inherited, NULL,
     "True in a forked child for a handle made before the fork (the parent's: only dropped here)", NULL},
    {"truncated", (getter)Region_get_truncated, NULL,
     "the backing was truncated under this mapping (it reads zeros now; calls raise SegmentTruncated)", NULL},
    {NULL}
};

static PyMethodDef Region_methods[] = {
    {"publish_u64", (PyCFunction)(void (*)(void))Region_publish_u64, METH_FASTCALL, "publish_u64(offset, value, wake_offset)"},
    {"wait_change", (PyCFunction)(void (*)(void))Region_wait_change, METH_FASTCALL, "wait_change(offset, value, wake_offset, stop_offset, slice, spin) -> bool"},
    {"arm_change", (PyCFunction)(void (*)(void))Region_arm_change, METH_FASTCALL,
     "arm_change(word, offset, value, wake_offset, stop_offset) -> slot, -1 (ready) or -2 (no free slot)"},
    {"_fd_disarm", (PyCFunction)(void (*)(void))Region_fd_disarm, METH_FASTCALL, "_fd_disarm(wake_offset, slot, word) -> bool"},
    {"_fd_armed", (PyCFunction)(void (*)(void))Region_fd_armed, METH_FASTCALL, "_fd_armed(wake_offset, slot, word) -> bool"},
    {"load_u32", (PyCFunction)Region_load_u32, METH_O, "load_u32(offset): seq_cst load of a header word"},
    {"load_u64", (PyCFunction)Region_load_u64, METH_O, "load_u64(offset): seq_cst load of a header word"},
    {"store_u32", (PyCFunction)(void (*)(void))Region_store_u32, METH_FASTCALL, "store_u32(offset, value): release store"},
    {"store_u64", (PyCFunction)(void (*)(void))Region_store_u64, METH_FASTCALL, "store_u64(offset, value): seq_cst store"},
    {"cas_u64", (PyCFunction)(void (*)(void))Region_cas_u64, METH_FASTCALL, "cas_u64(offset, expected, desired) -> bool"},
    {"fetch_add_u64", (PyCFunction)(void (*)(void))Region_fetch_add_u64, METH_FASTCALL, "fetch_add_u64(offset, delta) -> old"},
    {"_guard_check", (PyCFunction)Region_guard_check, METH_NOARGS, "raise SegmentTruncated if truncated"},
    {"wake", (PyCFunction)Region_wake, METH_O, "wake(offset): wake every sleeper on that wake word"},
    {"producers_ended", (PyCFunction)Region_producers_ended, METH_O,
     "producers_ended(seal) -> bool: every producer ended or died (seal: record it, R37)"},
    {NULL}
};

static PyMemberDef Region_members[] = {
    {"spin", T_DOUBLE, offsetof(Region, spin), 0,
     "seconds a blocked call busy-polls (yielding the CPU every ~1.5 us) before it sleeps on the futex; 0: sleep at once"},
    {NULL}
};

PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.Region",
    .tp_basicsize = sizeof(Region),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Region(buffer): atomics on the header of a mapped shmring region",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Region_init,
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_methods = Region_methods,
    .tp_members = Region_members,
    .tp_getset = Region_getset,
};
