/*
 * shmring._core: the atomics, futex waits and per-message hot paths.
 *
 * Everything else (segments, naming, codecs, roles, errors, the public
 * classes) is Python.  The protocol is described in shmring/layout.py and
 * docs/design.md; the numbers come from _layout.h.
 *
 * Shared words are touched only through the load_acquire / store_release /
 * cas / fetch_add helpers below, each call commented with the access it pairs
 * with.  Plain accesses are used only for record bytes that the other side
 * cannot see yet (producer, before its release store of write_pos) or that
 * the other side will not touch again (consumer, below write_pos and above
 * read_pos).
 *
 * Every value read from shared memory is untrusted: positions are checked
 * against the invariant read_pos <= write_pos <= read_pos + capacity, and
 * record lengths/types against the published window before any byte of the
 * payload is touched.  A violation raises CorruptSegmentError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <sched.h>
#include <limits.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#include "_layout.h"

/* ---------------------------------------------------------------- atomics */

static inline uint64_t load_acquire64(const void *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE); }
static inline uint32_t load_acquire32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
static inline uint64_t load_seqcst64(const void *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_SEQ_CST); }
static inline uint32_t load_seqcst32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_SEQ_CST); }
static inline uint32_t load_relaxed32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED); }
static inline uint64_t load_relaxed64(const void *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED); }
static inline uint16_t load_acquire16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
static inline uint16_t load_relaxed16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED); }
static inline void store_release16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
static inline void store_relaxed64(void *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELAXED); }
static inline void store_seqcst64(void *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_SEQ_CST); }
static inline void store_release64(void *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE); }
static inline void store_release32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }
static inline uint32_t fetch_add32(void *p, uint32_t v) { return __atomic_fetch_add((uint32_t *)p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t fetch_add64(void *p, uint64_t v) { return __atomic_fetch_add((uint64_t *)p, v, __ATOMIC_SEQ_CST); }
static inline int cas64(void *p, uint64_t expect, uint64_t desired) {
    return __atomic_compare_exchange_n((uint64_t *)p, &expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int cas32(void *p, uint32_t expect, uint32_t desired) {
    return __atomic_compare_exchange_n((uint32_t *)p, &expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int cas16(void *p, uint16_t expect, uint16_t desired) {
    return __atomic_compare_exchange_n((uint16_t *)p, &expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }
static inline uint64_t align16(uint64_t n) { return (n + 15u) & ~(uint64_t)15u; }

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ futex */

/* Shared (not private) futex: the word lives in a MAP_SHARED mapping that
 * other processes map at other addresses. */
static int futex_wait(uint32_t *addr, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
    ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
    long r = syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    return r == 0 ? 0 : errno;
}

static void futex_wake_all(uint32_t *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/*
 * The wake-up protocol (no lost wake-ups).
 *
 *   sleeper                                   waker
 *   s = load_acquire(seq)                     exchange(position)   [seq_cst]
 *   fetch_add(waiters, 1)      [seq_cst]
 *   if condition(): leave      [seq_cst load] if load(waiters) > 0: [seq_cst]
 *   futex_wait(seq, s)                            fetch_add(seq, 1); futex_wake(seq)
 *   fetch_sub(waiters, 1)
 *
 * The waiters increment and the condition load on one side, the position
 * store and the waiters load on the other, are the store-buffering pattern:
 * with seq_cst on both sides at least one of them sees the other's store.
 * Either the sleeper sees the new position and does not sleep, or the waker
 * sees waiters > 0 and bumps seq; the bump lands either before futex_wait
 * compares seq with s (it returns EAGAIN at once) or after it has queued the
 * sleeper (the wake reaches it).  The waker pays one locked exchange and one
 * load per message; the syscall happens only while somebody has announced a
 * sleep.
 */
/* Publish a position (the waker's side of the protocol above).  The seq_cst
 * exchange is the store and the full barrier in one instruction (xchg on
 * x86, cheaper than a plain store followed by mfence); the seq_cst load of
 * waiters cannot move above it. */
static inline void publish_and_wake(void *pos, uint64_t value, char *wake_line) {
    (void)__atomic_exchange_n((uint64_t *)pos, value, __ATOMIC_SEQ_CST); /* pairs with the other side's acquire load of pos */
    if (__atomic_load_n((uint32_t *)(wake_line + SHMR_WAKE_WAITERS), __ATOMIC_SEQ_CST)) { /* pairs with the sleeper's fetch_add(waiters) */
        fetch_add32(wake_line + SHMR_WAKE_SEQ, 1); /* seen by the sleeper's futex_wait compare */
        futex_wake_all((uint32_t *)(wake_line + SHMR_WAKE_SEQ));
    }
}

static inline void wake_always(char *wake_line) {
    fetch_add32(wake_line + SHMR_WAKE_SEQ, 1);
    futex_wake_all((uint32_t *)(wake_line + SHMR_WAKE_SEQ));
}

typedef int (*cond_fn)(void *ctx);

/* Process-local wait counters (tests use them to prove no wake-up is lost:
 * with long slices, a sleep that ends by timeout with the condition already
 * true would be a missed wake-up). */
static uint64_t n_sleeps, n_late_wakeups;

/* Wait until cond(ctx) holds or slice_ns elapses: spin for spin_ns, then
 * yield, then sleep on the futex.  Called with the GIL released.
 * Returns 1 (condition holds), 0 (slice elapsed) or -1 (interrupted). */
static int wait_for(char *wake_line, cond_fn cond, void *ctx, uint64_t slice_ns, uint64_t spin_ns) {
    uint64_t start = now_ns();
    uint64_t deadline = start + slice_ns;
    uint64_t spin_end = start + (spin_ns < slice_ns ? spin_ns : slice_ns);
    if (cond(ctx)) return 1;
    /* Spin, giving the CPU away every ~2 us: on a machine with fewer cores
     * than busy processes, the peer we wait for may need this very CPU
     * (sched_yield returns at once when nobody else is runnable here). */
    if (spin_ns) {
        for (;;) {
            for (int i = 0; i < 64; i++) {
                if (cond(ctx)) return 1;
                cpu_relax();
            }
            if (now_ns() >= spin_end) break;
            sched_yield();
        }
    }
    uint32_t *seq = (uint32_t *)(wake_line + SHMR_WAKE_SEQ);
    uint32_t *waiters = (uint32_t *)(wake_line + SHMR_WAKE_WAITERS);
    for (;;) {
        uint32_t s = load_acquire32(seq);
        fetch_add32(waiters, 1);          /* pairs with the waker's seq_cst load(waiters) */
        if (cond(ctx)) { fetch_add32(waiters, (uint32_t)-1); return 1; }
        uint64_t t = now_ns();
        if (t >= deadline) { fetch_add32(waiters, (uint32_t)-1); return cond(ctx) ? 1 : 0; }
        int err = futex_wait(seq, s, deadline - t);
        fetch_add32(waiters, (uint32_t)-1);
        __atomic_fetch_add(&n_sleeps, 1, __ATOMIC_RELAXED);
        if (cond(ctx)) {
            if (err == ETIMEDOUT) __atomic_fetch_add(&n_late_wakeups, 1, __ATOMIC_RELAXED);
            return 1;
        }
        if (err == EINTR) return -1;
        if (now_ns() >= deadline) return 0;
    }
}

/* ------------------------------------------------------------- exceptions */

static PyObject *CorruptSegmentError, *MessageTooLarge, *HandleClosed, *ShmringError, *EscapedViewWarning;
static PyObject *decode_func;          /* shmring.codec._decode(msg) */
static unsigned long fork_generation;  /* bumped in every forked child */

static void at_fork_child(void) { fork_generation++; }

static int load_errors(void) {
    PyObject *m = PyImport_ImportModule("shmring.errors");
    if (!m) return -1;
    CorruptSegmentError = PyObject_GetAttrString(m, "CorruptSegmentError");
    MessageTooLarge = PyObject_GetAttrString(m, "MessageTooLarge");
    HandleClosed = PyObject_GetAttrString(m, "HandleClosed");
    ShmringError = PyObject_GetAttrString(m, "ShmringError");
    EscapedViewWarning = PyObject_GetAttrString(m, "EscapedViewWarning");
    Py_DECREF(m);
    return (CorruptSegmentError && MessageTooLarge && HandleClosed && ShmringError && EscapedViewWarning) ? 0 : -1;
}

/* ----------------------------------------------------------------- Region */

/* A mapped region: holds a buffer export of the mapping for its lifetime, so
 * the mapping cannot be unmapped (mmap.close() raises BufferError) while any
 * handle or message still points into it. */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    char *base;
    char *data;
    uint64_t capacity, mask, max_message;
    unsigned long fork_gen;
    int closed;
    double spin;            /* seconds a blocked call busy-polls before it sleeps */
    uint64_t words_end;     /* Python's word accessors reach [0, words_end) */
    /* ring geometry, read once at init (later corruption cannot move it) */
    unsigned kind;          /* SHMR_KIND_* */
    uint64_t hdr;           /* record header bytes: 8 (spsc) or 16 (multi-party) */
    uint64_t data_off;      /* data area offset in the region */
    uint64_t key;           /* multi-party: stamp key */
    char *ptab, *ctab;      /* multi-party: producer and consumer tables */
    uint32_t maxp, maxc, policy;
    int slot;               /* this handle's table entry (-1: none) */
} Region;

/* Take a writable export of the mapping passed as the one argument. */
static int region_map(Region *self, PyObject *args) {
    PyObject *buf;
    int slot = -1;
    if (!PyArg_ParseTuple(args, "O|i", &buf, &slot)) return -1;
    self->slot = slot;
    if (self->has_view) { PyErr_SetString(PyExc_RuntimeError, "already initialized"); return -1; }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return -1;
    self->has_view = 1;
    self->base = (char *)self->view.buf;
    self->fork_gen = fork_generation;
    self->words_end = SHMR_HEADER_SIZE;
    if ((uintptr_t)self->base % 4096 != 0 || self->view.len < (Py_ssize_t)SHMR_HEADER_SIZE) {
        PyErr_SetString(CorruptSegmentError, "region is unaligned or smaller than the header page");
        return -1;
    }
    return 0;
}

/* A ring region: the mapping plus the ring's geometry. */
static int Region_init(Region *self, PyObject *args, PyObject *kw) {
    if (region_map(self, args) < 0) return -1;
    /* Read once and cached: later corruption of the header cannot move our bounds. */
    uint64_t cap = load_acquire64(self->base + SHMR_OFF_CAPACITY);
    if (cap < SHMR_MIN_CAPACITY || cap > SHMR_MAX_CAPACITY || (cap & (cap - 1)) != 0 ||
        (uint64_t)self->view.len < SHMR_HEADER_SIZE + cap) {
        PyErr_Format(CorruptSegmentError, "capacity %llu does not fit a region of %zd bytes",
                     (unsigned long long)cap, self->view.len);
        return -1;
    }
    self->capacity = cap;
    self->mask = cap - 1;
    self->kind = load_acquire32(self->base + SHMR_OFF_KIND);
    self->hdr = SHMR_REC_HDR;
    self->data_off = SHMR_HEADER_SIZE;
    if (self->kind == SHMR_KIND_MPSC || self->kind == SHMR_KIND_BROADCAST || self->kind == SHMR_KIND_MPMC) {
        char *b = self->base;
        uint64_t doff = load_acquire64(b + SHMR_OFF_DATA_OFFSET);
        uint64_t pt = load_acquire64(b + SHMR_MP_OFF_PROD_TABLE), ct = load_acquire64(b + SHMR_MP_OFF_CONS_TABLE);
        uint32_t mp = load_acquire32(b + SHMR_MP_OFF_MAX_PRODUCERS), mc = load_acquire32(b + SHMR_MP_OFF_MAX_CONSUMERS);
        if (mp < 1 || mp > SHMR_MP_MAX_PARTIES || mc < 1 || mc > SHMR_MP_MAX_PARTIES || pt != SHMR_HEADER_SIZE ||
            ct != pt + (uint64_t)mp * SHMR_MP_ENTRY || doff != ((ct + (uint64_t)mc * SHMR_MP_ENTRY + 4095) & ~4095ull) ||
            (uint64_t)self->view.len < doff + cap) {
            PyErr_Format(CorruptSegmentError, "multi-party ring tables do not fit: %u producers, %u consumers, "
                         "data at %llu, region of %zd bytes", mp, mc, (unsigned long long)doff, self->view.len);
            return -1;
        }
        self->hdr = SHMR_MREC_HDR;
        self->data_off = doff;
        self->key = load_acquire64(b + SHMR_MP_OFF_KEY);
        self->ptab = b + pt; self->ctab = b + ct;
        self->maxp = mp; self->maxc = mc;
        self->policy = load_acquire32(b + SHMR_MP_OFF_POLICY);
        self->words_end = doff;          /* the tables are reachable from Python */
    } else if (self->kind != SHMR_KIND_SPSC && self->kind != SHMR_KIND_RECORDS) {
        PyErr_Format(CorruptSegmentError, "unknown ring kind %u", self->kind);
        return -1;
    }
    self->max_message = cap / 2 - self->hdr;
    if (self->max_message > SHMR_MAX_MESSAGE) self->max_message = SHMR_MAX_MESSAGE;  /* lengths are u32 */
    self->data = self->base + self->data_off;
    return 0;
}

static inline int is_multi(Region *r) { return r->kind != SHMR_KIND_SPSC; }

static void Region_dealloc(Region *self) {
    if (self->has_view) { PyBuffer_Release(&self->view); self->has_view = 0; }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Offsets passed from Python must be aligned and inside the header page. */
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
    return PyLong_FromUnsignedLong(load_seqcst32(p));
}
static PyObject *Region_load_u64(Region *self, PyObject *off) {
    char *p = header_word(self, off, 8); if (!p) return NULL;
    return PyLong_FromUnsignedLongLong(load_seqcst64(p));
}
static PyObject *Region_store_u32(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "store_u32(offset, value)"); return NULL; }
    char *p = header_word(self, args[0], 4); if (!p) return NULL;
    unsigned long v = PyLong_AsUnsignedLong(args[1]); if (PyErr_Occurred()) return NULL;
    store_release32(p, (uint32_t)v);
    Py_RETURN_NONE;
}
static PyObject *Region_store_u64(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "store_u64(offset, value)"); return NULL; }
    char *p = header_word(self, args[0], 8); if (!p) return NULL;
    unsigned long long v = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    (void)__atomic_exchange_n((uint64_t *)p, (uint64_t)v, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}
static PyObject *Region_cas_u64(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "cas_u64(offset, expected, desired)"); return NULL; }
    char *p = header_word(self, args[0], 8); if (!p) return NULL;
    unsigned long long e = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    unsigned long long d = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(cas64(p, e, d));
}
static PyObject *Region_fetch_add_u64(Region *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "fetch_add_u64(offset, delta)"); return NULL; }
    char *p = header_word(self, args[0], 8); if (!p) return NULL;
    unsigned long long v = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLongLong(fetch_add64(p, v));
}
/* Wake every sleeper on the wake line at `offset` (used for end of stream). */
static PyObject *Region_wake(Region *self, PyObject *off) {
    char *p = header_word(self, off, 8); if (!p) return NULL;
    wake_always(p);
    Py_RETURN_NONE;
}

static int check_usable(Region *r);

/* publish_u64(offset, value, wake_offset): store a position and wake its
 * sleepers (the waker's side of the wake-up protocol). */
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
    struct change_ctx *c = vctx;   /* pairs with publish_u64's exchange / the stop word's store */
    return load_seqcst64(c->word) != c->value || (c->stop && load_seqcst32(c->stop) != 0);
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
    double slice = PyFloat_AsDouble(args[4]); if (PyErr_Occurred()) return NULL;
    double spin = PyFloat_AsDouble(args[5]); if (PyErr_Occurred()) return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = wait_for(w, change_cond, &c, slice > 0 ? (uint64_t)(slice * 1e9) : 0, spin > 0 ? (uint64_t)(spin * 1e9) : 0);
    Py_END_ALLOW_THREADS
    if (PyErr_CheckSignals() < 0) return NULL;
    return PyBool_FromLong(r == 1);
}

static PyMethodDef Region_methods[] = {
    {"publish_u64", (PyCFunction)(void (*)(void))Region_publish_u64, METH_FASTCALL, "publish_u64(offset, value, wake_offset)"},
    {"wait_change", (PyCFunction)(void (*)(void))Region_wait_change, METH_FASTCALL, "wait_change(offset, value, wake_offset, stop_offset, slice, spin) -> bool"},
    {"load_u32", (PyCFunction)Region_load_u32, METH_O, "load_u32(offset): seq_cst load of a header word"},
    {"load_u64", (PyCFunction)Region_load_u64, METH_O, "load_u64(offset): seq_cst load of a header word"},
    {"store_u32", (PyCFunction)(void (*)(void))Region_store_u32, METH_FASTCALL, "store_u32(offset, value): release store"},
    {"store_u64", (PyCFunction)(void (*)(void))Region_store_u64, METH_FASTCALL, "store_u64(offset, value): seq_cst store"},
    {"cas_u64", (PyCFunction)(void (*)(void))Region_cas_u64, METH_FASTCALL, "cas_u64(offset, expected, desired) -> bool"},
    {"fetch_add_u64", (PyCFunction)(void (*)(void))Region_fetch_add_u64, METH_FASTCALL, "fetch_add_u64(offset, delta) -> old"},
    {"wake", (PyCFunction)Region_wake, METH_O, "wake(offset): wake every sleeper on that wake word"},
    {NULL}
};


static PyMemberDef Region_members[] = {
    {"spin", T_DOUBLE, offsetof(Region, spin), 0,
     "seconds a blocked call busy-polls (yielding the CPU every ~1.5 us) before it sleeps on the futex; 0: sleep at once"},
    {NULL}
};

static PyTypeObject RegionType = {
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
};

static int check_usable(Region *r) {
    if (r->closed || !r->has_view) { PyErr_SetString(HandleClosed, "handle is closed"); return -1; }
    if (r->fork_gen != fork_generation) {
        PyErr_SetString(ShmringError, "this handle was created before fork(); a forked child must "
                                      "take its own handle (ring.producer() / ring.consumer())");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ ProducerCore */

typedef struct {
    Region r;
    uint64_t write_pos;     /* spsc: ours, mirrors the shared write_pos after each commit */
    uint64_t cached_read;   /* last release position (gate) we loaded */
    int reserved;           /* a reservation is open */
    uint64_t res_start;     /* position of its record header */
    uint64_t res_len;       /* payload bytes reserved */
    uint64_t res_prev;      /* spsc: write_pos before it (padding included), for abort */
    unsigned res_type;
    char *entry;            /* multi-party: our producer table line */
} Producer;

/* A timeout is None or a number >= 0; checked even when the call would not block. */
static int check_timeout(PyObject *timeout) {
    if (timeout == Py_None) return 0;
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred()) return -1;
    if (!(t >= 0)) {
        PyErr_Format(PyExc_ValueError, "timeout must be None or >= 0 seconds, got %R", timeout);
        return -1;
    }
    return 0;
}

static PyObject *str_send_obj, *str_try_send_obj, *str_send_wait, *str_recv_wait;

static int not_for_records(Region *r) {
    if (r->kind != SHMR_KIND_RECORDS) return 0;
    PyErr_SetString(PyExc_TypeError, "a record ring has its own handles (shmring.records)");
    return -1;
}

static int Producer_init(Producer *self, PyObject *args, PyObject *kw) {
    if (Region_init(&self->r, args, kw) < 0 || not_for_records(&self->r) < 0) return -1;
    uint64_t wp = load_acquire64(self->r.base + SHMR_OFF_WRITE_POS);
    uint64_t rp = load_acquire64(self->r.base + SHMR_OFF_READ_POS); /* pairs with consumer's store_release(read_pos) */
    uint64_t al = self->r.hdr - 1;
    if (rp > wp || wp - rp > self->r.capacity || (wp & al) || (rp & al)) {
        PyErr_Format(CorruptSegmentError, "positions out of order: read %llu, write %llu, capacity %llu",
                     (unsigned long long)rp, (unsigned long long)wp, (unsigned long long)self->r.capacity);
        return -1;
    }
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

/* ---- multi-party producers (mpsc, broadcast, mpmc): claim by CAS, commit by stamp
 *
 *   producer                                       consumer
 *   intent = c | INTENT_BIT           [seq_cst]
 *   CAS(cursor, c, c + size)          [seq_cst]
 *   write header fields and payload   [plain]
 *   exchange(stamp, key ^ c)          [seq_cst]    s = load_acquire(stamp); s == key ^ pos: read
 *   load(data waiters) > 0: wake      [seq_cst]    (the spsc wake-up protocol, stamp for write_pos)
 *   intent = 0                        [release]
 *
 * Delivery follows claim order: a consumer stops at the first unstamped
 * record.  The stamp key is random per ring, so bytes left over from earlier
 * laps (old stamps, payloads) do not pass for a committed record.
 */

/* The position below which a producer may overwrite (gate + capacity). */
static uint64_t mp_min_subscriber(Region *r, uint64_t upto) {
    uint64_t m = upto;
    for (uint32_t i = 0; i < r->maxc; i++) {
        uint64_t w = load_seqcst64(r->ctab + (uint64_t)i * SHMR_MP_ENTRY + SHMR_CE_POS); /* pairs with the subscriber's pos stores */
        if (w == SHMR_POS_FREE || (w & SHMR_POS_EVICTED)) continue;
        w &= SHMR_POS_MASK;
        if (w < m) m = w;
    }
    return m;
}

static uint64_t mp_gate(Region *r, uint64_t wp) {
    if (r->kind != SHMR_KIND_BROADCAST)
        return load_seqcst64(r->base + SHMR_OFF_READ_POS);  /* pairs with the consumers' release of read_pos */
    /* Broadcast: scan, advertise the new oldest-intact position, scan again.
     * A subscriber joining at "oldest" stores its pos, then re-loads that
     * word: either our second scan sees its pos, or it sees the new value and
     * moves up (store-buffering pair, seq_cst on both sides). */
    uint64_t m1 = mp_min_subscriber(r, wp);
    char *tail = r->base + SHMR_OFF_READ_POS;
    if (m1 > load_seqcst64(tail)) store_seqcst64(tail, m1);
    uint64_t m2 = mp_min_subscriber(r, wp);
    return m2 < m1 ? m2 : m1;
}

static int corrupt_pos(const char *what, uint64_t a, uint64_t b) {
    PyErr_Format(CorruptSegmentError, "%s (%llu, %llu)", what, (unsigned long long)a, (unsigned long long)b);
    return -1;
}

/* Claim room for a record of payload_len bytes: 1 claimed (intent held), 0 full, -1 corrupt. */
static int mp_claim(Producer *p, uint64_t payload_len, uint64_t *rec_start) {
    Region *r = &p->r;
    uint64_t cap = r->capacity, need = align16(SHMR_MREC_HDR + payload_len), wp, tail;
    char *cursor = r->base + SHMR_OFF_WRITE_POS, *intent = p->entry + SHMR_PE_INTENT;
    for (int spins = 0;; spins++) {
        wp = load_acquire64(cursor);
        if (wp & 15) return corrupt_pos("claim cursor is not 16-aligned", wp, 0);
        tail = cap - (wp & r->mask);
        uint64_t total = need <= tail ? need : tail + need;
        if (wp + total - p->cached_read > cap) {
            uint64_t g = mp_gate(r, wp);
            if (g > wp) {                       /* our cursor load is stale, or the gate is corrupt */
                if (g > load_acquire64(cursor)) return corrupt_pos("release position beyond the claim cursor", g, wp);
                continue;
            }
            if (wp - g > cap) return corrupt_pos("claim cursor more than a capacity ahead of the release position", wp, g);
            p->cached_read = g;
            if (wp + total - g > cap) {
                /* Full: we hold no claim, so no intent either.  A CAS we lost
                 * earlier in this loop may have left one naming the winner's
                 * record; kept while we block, it would make that record look
                 * live-owned forever if its winner died (abandoned-claim check). */
                store_release64(intent, 0);
                return 0;
            }
        }
        store_seqcst64(intent, wp | SHMR_INTENT_BIT);     /* before the CAS: read by a consumer that sees the cursor move */
        if (cas64(cursor, wp, wp + total)) break;
        if (spins > 64) sched_yield(); else cpu_relax();
    }
    if (need > tail) {                          /* padding to the end of the data area, committed at once */
        char *h = r->data + (wp & r->mask);
        *(uint32_t *)(h + 8) = (uint32_t)(tail - SHMR_MREC_HDR);
        *(uint16_t *)(h + 12) = SHMR_T_PAD;
        *(uint16_t *)(h + 14) = SHMR_ST_RELEASED;
        store_seqcst64(intent, (wp + tail) | SHMR_INTENT_BIT);  /* the record we still owe starts after the pad */
        store_release64(h, r->key ^ wp);        /* pairs with the consumer's load_acquire(stamp) */
        wp += tail;
    }
    *rec_start = wp;
    return 1;
}

static inline void mp_stamp(Region *r, uint64_t pos, uint32_t len, unsigned type, unsigned state) {
    char *h = r->data + (pos & r->mask);
    *(uint32_t *)(h + 8) = len;
    *(uint16_t *)(h + 12) = (uint16_t)type;
    *(uint16_t *)(h + 14) = (uint16_t)state;
    /* seq_cst: the release of the record and the store half of the wake-up protocol */
    (void)__atomic_exchange_n((uint64_t *)h, r->key ^ pos, __ATOMIC_SEQ_CST);
}

static inline void wake_if_waiters(char *wake_line) {
    if (__atomic_load_n((uint32_t *)(wake_line + SHMR_WAKE_WAITERS), __ATOMIC_SEQ_CST)) /* pairs with the sleeper's fetch_add(waiters) */
        wake_always(wake_line);
}

/* Commit the record claimed at start for claimed_len payload bytes, holding
 * len of them (len <= claimed_len); what is left becomes a T_SKIP record. */
static void mp_commit(Producer *p, uint64_t start, uint64_t claimed_len, uint64_t len, unsigned type) {
    Region *r = &p->r;
    uint64_t size = align16(SHMR_MREC_HDR + len), claimed = align16(SHMR_MREC_HDR + claimed_len);
    if (size < claimed)
        mp_stamp(r, start + size, (uint32_t)(claimed - size - SHMR_MREC_HDR), SHMR_T_SKIP, SHMR_ST_RELEASED);
    mp_stamp(r, start, (uint32_t)len, type, type == SHMR_T_SKIP ? SHMR_ST_RELEASED : 0);
    wake_if_waiters(r->base + SHMR_OFF_DATA_WAKE);
    if (r->kind == SHMR_KIND_BROADCAST && type != SHMR_T_SKIP)
        store_release64(r->base + SHMR_MP_OFF_NEWEST, start);   /* where a subscriber joining at "newest" starts */
    store_release64(p->entry + SHMR_PE_INTENT, 0);             /* after the stamp: see the abandoned-claim check */
    if (type != SHMR_T_SKIP) {
        store_relaxed64(p->entry + SHMR_PE_SENT, load_relaxed64(p->entry + SHMR_PE_SENT) + 1);
        store_relaxed64(p->entry + SHMR_PE_BYTES, load_relaxed64(p->entry + SHMR_PE_BYTES) + len);
    }
}

/* Claim room for a record of payload_len bytes at write_pos (writing a padding
 * record first when it would cross the end of the data area).  Nothing is
 * visible to the consumer until publish().  Returns 1 and the record start,
 * 0 when the ring is full right now, -1 on corruption (exception set). */
static int producer_claim(Producer *p, uint64_t payload_len, uint64_t *rec_start) {
    if (is_multi(&p->r)) return mp_claim(p, payload_len, rec_start);
    uint64_t cap = p->r.capacity;
    uint64_t need = align8(SHMR_REC_HDR + payload_len);
    uint64_t wp = p->write_pos;
    uint64_t tail = cap - (wp & p->r.mask);
    uint64_t total = need <= tail ? need : tail + need;
    if (wp + total - p->cached_read > cap) {
        uint64_t rp = load_acquire64(p->r.base + SHMR_OFF_READ_POS); /* pairs with consumer's store_release(read_pos) */
        if (rp > wp || wp - rp > cap || (rp & 7)) {
            PyErr_Format(CorruptSegmentError, "consumer position %llu is outside [%llu - capacity, %llu]",
                         (unsigned long long)rp, (unsigned long long)wp, (unsigned long long)wp);
            return -1;
        }
        p->cached_read = rp;
        if (wp + total - rp > cap) return 0;
    }
    if (need > tail) {
        char *h = p->r.data + (wp & p->r.mask);   /* not yet visible: plain stores */
        *(uint32_t *)h = (uint32_t)(tail - SHMR_REC_HDR);
        *(uint16_t *)(h + 4) = SHMR_T_PAD;
        *(uint16_t *)(h + 6) = 0;
        wp += tail;
    }
    *rec_start = wp;
    return 1;
}

/* Write the header of the record claimed at start and publish it (claimed_len:
 * the payload bytes claimed, len: those used). */
static void producer_finish(Producer *p, uint64_t start, uint64_t claimed_len, uint64_t len, unsigned type) {
    if (is_multi(&p->r)) { mp_commit(p, start, claimed_len, len, type); return; }
    char *h = p->r.data + (start & p->r.mask);
    *(uint32_t *)h = (uint32_t)len;
    *(uint16_t *)(h + 4) = (uint16_t)type;
    *(uint16_t *)(h + 6) = 0;
    uint64_t new_wp = start + align8(SHMR_REC_HDR + len);
    p->write_pos = new_wp;
    /* after the record's plain stores; pairs with consumer's load_acquire(write_pos) in peek */
    publish_and_wake(p->r.base + SHMR_OFF_WRITE_POS, new_wp, p->r.base + SHMR_OFF_DATA_WAKE);
}

static inline uint64_t payload_offset(Region *r, uint64_t start) {
    return r->data_off + (start & r->mask) + r->hdr;   /* relative to the region base */
}

static int too_large(Producer *p, uint64_t len) {
    PyErr_Format(MessageTooLarge, "message of %llu bytes can never fit: this ring's largest "
                 "message is %llu bytes (capacity %llu / 2 - %llu)", (unsigned long long)len,
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
    if (r <= 0) return r;
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

static PyObject *Producer_send(Producer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
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

static PyObject *Producer_try_send(Producer *self, PyObject *data) {
    if (check_usable(&self->r) < 0) return NULL;
    int r = producer_push_fast(self, data);
    if (r == 1) Py_RETURN_TRUE;
    if (r == 0) Py_RETURN_FALSE;
    if (r < 0) return NULL;
    return PyObject_CallMethodObjArgs((PyObject *)self, str_try_send_obj, data, NULL);
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
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
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
    if (r < 0) goto done;
    if (r == 0) { result = (Py_INCREF(Py_False), Py_False); goto done; }
    uint64_t payload = payload_offset(&self->r, start);  /* region offsets */
    char *pl = self->r.base + payload;
    *(uint32_t *)pl = (uint32_t)meta_len;
    *(uint32_t *)(pl + 4) = 1;
    memcpy(pl + 8, PyBytes_AS_STRING(args[0]), meta_len);
    uint64_t area = (payload + 8 + meta_len + 63) & ~(uint64_t)63;
    memcpy(self->r.base + area, b.buf, (size_t)b.len);
    uint64_t len = area + (uint64_t)b.len - payload;
    producer_finish(self, start, worst, len, (unsigned)type);
    result = (Py_INCREF(Py_True), Py_True);
done:
    PyBuffer_Release(&b);
    return result;
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
    if (r < 0) return NULL;
    if (r == 0) Py_RETURN_NONE;
    self->reserved = 1;
    self->res_start = start;
    self->res_len = len;
    self->res_prev = prev;
    self->res_type = (unsigned)type;
    /* spsc: the claim may have written a padding record: write_pos stays
     * before it until commit, so abort forgets both. */
    return PyLong_FromUnsignedLongLong(payload_offset(&self->r, start));
}

/* _commit(nbytes=-1): publish the open reservation, optionally shrunk to nbytes. */
static PyObject *Producer_commit(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (!self->reserved) { PyErr_SetString(ShmringError, "no open reservation"); return NULL; }
    uint64_t len = self->res_len;
    if (n >= 1 && args[0] != Py_None) {
        unsigned long long l = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
        if (l > len) { PyErr_Format(PyExc_ValueError, "cannot commit %llu bytes of a %llu-byte reservation", l, (unsigned long long)len); return NULL; }
        len = l;
    }
    self->reserved = 0;
    producer_finish(self, self->res_start, self->res_len, len, self->res_type);
    Py_RETURN_NONE;
}

/* Forget an open reservation.  spsc: nothing was published, rewind.  Multi-
 * party: others may have claimed after it, so it is committed as a T_SKIP. */
static PyObject *Producer_abort(Producer *self, PyObject *unused) {
    if (!self->reserved) Py_RETURN_NONE;
    self->reserved = 0;
    if (is_multi(&self->r)) mp_commit(self, self->res_start, self->res_len, self->res_len, SHMR_T_SKIP);
    else self->write_pos = self->res_prev;
    Py_RETURN_NONE;
}

struct space_ctx { char *base; uint64_t wp, total, cap; Producer *p; uint64_t len; };
static int space_cond(void *vctx) {
    struct space_ctx *c = vctx;
    if (c->p) {                        /* multi-party: room at the current cursor */
        Region *r = &c->p->r;
        uint64_t wp = load_seqcst64(r->base + SHMR_OFF_WRITE_POS);
        uint64_t need = align16(SHMR_MREC_HDR + c->len), tail = r->capacity - (wp & r->mask);
        uint64_t g = mp_gate(r, wp);
        if (g > wp) return 1;          /* stale or corrupt: let the claim decide */
        return wp + (need <= tail ? need : tail + need) - g <= r->capacity;
    }
    uint64_t rp = load_seqcst64(c->base + SHMR_OFF_READ_POS); /* pairs with consumer's store_release(read_pos) */
    if (rp > c->wp) return 1;          /* corrupt: let the caller's claim report it */
    return c->wp + c->total - rp <= c->cap;
}

/* _wait_space(payload_len, slice_s, spin_s) -> bool (GIL released while waiting). */
static PyObject *Producer_wait_space(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_wait_space(nbytes, slice, spin)"); return NULL; }
    if (check_usable(&self->r) < 0) return NULL;
    unsigned long long len = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    double slice = PyFloat_AsDouble(args[1]); if (PyErr_Occurred()) return NULL;
    double spin = PyFloat_AsDouble(args[2]); if (PyErr_Occurred()) return NULL;
    struct space_ctx c;
    uint64_t need = align8(SHMR_REC_HDR + len);
    uint64_t tail = self->r.capacity - (self->write_pos & self->r.mask);
    c.base = self->r.base; c.wp = self->write_pos; c.cap = self->r.capacity;
    c.total = need <= tail ? need : tail + need;
    c.p = is_multi(&self->r) ? self : NULL;
    c.len = len;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = wait_for(self->r.base + SHMR_OFF_SPACE_WAKE, space_cond, &c,
                 slice > 0 ? (uint64_t)(slice * 1e9) : 0, spin > 0 ? (uint64_t)(spin * 1e9) : 0);
    Py_END_ALLOW_THREADS
    if (PyErr_CheckSignals() < 0) return NULL;
    return PyBool_FromLong(r == 1);
}

static PyObject *Producer_mark_closed(Producer *self, PyObject *unused) {
    self->r.closed = 1;
    Py_RETURN_NONE;
}

static PyObject *Producer_get_write_pos(Producer *self, void *c) {
    if (is_multi(&self->r) && self->r.has_view)     /* shared by the producers: the claim cursor */
        return PyLong_FromUnsignedLongLong(load_acquire64(self->r.base + SHMR_OFF_WRITE_POS));
    return PyLong_FromUnsignedLongLong(self->write_pos);
}
static PyObject *Producer_get_reserved(Producer *self, void *c) { return PyBool_FromLong(self->reserved); }
static PyObject *Region_get_closed(Region *self, void *c) { return PyBool_FromLong(self->closed); }

static PyMethodDef Producer_methods[] = {
    {"send", (PyCFunction)(void (*)(void))Producer_send, METH_FASTCALL | METH_KEYWORDS,
     "send(data, *, timeout=None): send bytes, an ndarray or a msgpack-able object; "
     "block up to timeout seconds (None: forever) while the ring is full"},
    {"try_send", (PyCFunction)Producer_try_send, METH_O, "try_send(data) -> bool: send if there is room now"},
    {"_push", (PyCFunction)(void (*)(void))Producer_push, METH_FASTCALL, NULL},
    {"_reserve", (PyCFunction)(void (*)(void))Producer_reserve, METH_FASTCALL, NULL},
    {"_push_array", (PyCFunction)(void (*)(void))Producer_push_array, METH_FASTCALL, NULL},
    {"_commit", (PyCFunction)(void (*)(void))Producer_commit, METH_FASTCALL, NULL},
    {"_abort", (PyCFunction)Producer_abort, METH_NOARGS, NULL},
    {"_wait_space", (PyCFunction)(void (*)(void))Producer_wait_space, METH_FASTCALL, NULL},
    {"_mark_closed", (PyCFunction)Producer_mark_closed, METH_NOARGS, NULL},
    {NULL}
};
static PyGetSetDef Producer_getset[] = {
    {"position", (getter)Producer_get_write_pos, NULL, "bytes committed so far (the write position)", NULL},
    {"_reserved", (getter)Producer_get_reserved, NULL, NULL, NULL},
    {"closed", (getter)Region_get_closed, NULL, "True once close() was called", NULL},
    {NULL}
};

static PyTypeObject ProducerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.ProducerCore",
    .tp_basicsize = sizeof(Producer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "C half of shmring.Producer",
    .tp_base = &RegionType,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Producer_init,
    .tp_methods = Producer_methods,
    .tp_getset = Producer_getset,
};

/* ------------------------------------------------------------ ConsumerCore */

/* Records handed out and not yet released, in position order.  Space is
 * given back (read_pos advanced) only over a prefix of released records. */
typedef struct { uint64_t start, end; int done; } Entry;

typedef struct {
    Region r;
    uint64_t next_pos;      /* next record to hand out (mpmc: unused) */
    uint64_t read_pos;      /* last value stored to our release position */
    uint64_t cached_write;  /* spsc: last write_pos we loaded */
    Entry *q; size_t qhead, qlen, qcap;   /* circular queue of outstanding records */
    int detached;           /* role given up: never store read_pos again */
    uint64_t received;
    char *entry;            /* broadcast / mpmc: our consumer table line */
    char *posword;          /* spsc / mpsc: read_pos; broadcast: our table pos word */
    char *recvword;         /* shared "received" counter of this role, or NULL */
    int holding;            /* broadcast, evict policy: our pos word carries HOLD */
    uint64_t nheld;         /* mpmc: messages taken and not released */
    int leave_pending;      /* broadcast / mpmc closed while holding messages: leave the table once they are released */
} Consumer;

typedef struct {
    PyObject_HEAD
    Consumer *cons;         /* strong reference while not released */
    uint64_t start, end;
    Py_ssize_t off, len;    /* payload, relative to the region base */
    int type;
    int exports;            /* live buffer exports of this message */
    int state;              /* 0 live, 1 release deferred until exports == 0, 2 released */
} Message;

static PyTypeObject MessageType;

static int Consumer_init(Consumer *self, PyObject *args, PyObject *kw) {
    if (Region_init(&self->r, args, kw) < 0 || not_for_records(&self->r) < 0) return -1;
    Region *r = &self->r;
    uint64_t wp = load_acquire64(r->base + SHMR_OFF_WRITE_POS); /* pairs with producer's store_release(write_pos) */
    uint64_t rp = load_acquire64(r->base + SHMR_OFF_READ_POS);
    self->posword = r->base + SHMR_OFF_READ_POS;
    self->recvword = NULL;
    if (r->kind == SHMR_KIND_MPSC) self->recvword = r->base + SHMR_OFF_CONS_ROLE + 24;
    if (r->kind == SHMR_KIND_BROADCAST || r->kind == SHMR_KIND_MPMC) {
        if (r->slot < 0 || (uint32_t)r->slot >= r->maxc) {
            PyErr_Format(PyExc_ValueError, "consumer slot %d outside the table of %u", r->slot, r->maxc);
            return -1;
        }
        self->entry = r->ctab + (uint64_t)r->slot * SHMR_MP_ENTRY;
        self->recvword = self->entry + SHMR_CE_RECEIVED;
    }
    if (r->kind == SHMR_KIND_BROADCAST) {
        self->posword = self->entry + SHMR_CE_POS;
        rp = load_acquire64(self->posword);
        if (rp & (SHMR_POS_HOLD | SHMR_POS_EVICTED)) {
            char msg[120];
            snprintf(msg, sizeof msg, "subscriber entry %d holds position word %#llx, not a joined position",
                     r->slot, (unsigned long long)rp);
            PyErr_SetString(CorruptSegmentError, msg);
            return -1;
        }
    }
    uint64_t al = r->hdr - 1;
    if (r->kind == SHMR_KIND_MPMC) {
        rp = wp = 0;
    } else if (rp > wp || wp - rp > r->capacity || (wp & al) || (rp & al)) {
        PyErr_Format(CorruptSegmentError, "positions out of order: read %llu, write %llu, capacity %llu",
                     (unsigned long long)rp, (unsigned long long)wp, (unsigned long long)r->capacity);
        return -1;
    }
    self->read_pos = self->next_pos = rp;
    self->cached_write = wp;
    return 0;
}

static void Consumer_dealloc(Consumer *self) {
    PyMem_Free(self->q);
    self->q = NULL;
    Region_dealloc(&self->r);
}

static inline int evict_policy(Region *r) { return r->kind == SHMR_KIND_BROADCAST && r->policy == 1; }

static inline void consumer_store_read(Consumer *c, uint64_t rp) {
    c->read_pos = rp;
    if (c->detached) return;
    /* after the last read of the released bytes; pairs with the producer's
     * load of our position in its claim (spsc: load_acquire, multi: seq_cst) */
    publish_and_wake(c->posword, rp | (c->holding ? SHMR_POS_HOLD : 0), c->r.base + SHMR_OFF_SPACE_WAKE);
}

/* Broadcast, evict policy: while our pos word carries HOLD the producer does
 * not evict us, so the records at and after it stay intact.  Taken (CAS from
 * our plain position: fails only if the producer evicted us first) before we
 * read a record; dropped once nothing is outstanding.  3 = we were evicted. */
static int bc_hold(Consumer *c) {
    if (c->holding || c->detached) return 0;
    if (cas64(c->posword, c->read_pos, c->read_pos | SHMR_POS_HOLD)) { c->holding = 1; return 0; }
    uint64_t w = load_seqcst64(c->posword);
    if (w & SHMR_POS_EVICTED) return 3;
    char msg[120];
    snprintf(msg, sizeof msg, "subscriber position word %#llx, expected %#llx",
             (unsigned long long)w, (unsigned long long)c->read_pos);
    PyErr_SetString(CorruptSegmentError, msg);
    return -1;
}

static void bc_unhold_if_idle(Consumer *c) {
    if (!c->holding || c->qlen || c->next_pos != c->read_pos) return;
    c->holding = 0;
    consumer_store_read(c, c->read_pos);
}

static void mpmc_reclaim(Consumer *c);
static PyObject *str_leave_table;

/* A broadcast subscriber or mpmc consumer closed while it held messages kept
 * its table entry (its position gates the producer; its records stay taken),
 * so nothing it can still see is overwritten; the last release leaves. */
static int consumer_leave_if_done(Consumer *c) {
    if (!c->leave_pending || c->nheld || c->qlen || c->next_pos != c->read_pos) return 0;
    c->leave_pending = 0;
    c->detached = 1;
    PyObject *r = PyObject_CallMethodNoArgs((PyObject *)c, str_leave_table);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

/* Record [start, end) is finished with. */
static int consumer_finish(Consumer *c, uint64_t start, uint64_t end) {
    if (c->r.kind == SHMR_KIND_MPMC) {
        char *h = c->r.data + (start & c->r.mask);
        /* only if it is still ours (a recovery that wrongly took us for dead may have requeued it) */
        if (!c->detached) cas16(h + 14, (uint16_t)(c->r.slot + 1), SHMR_ST_RELEASED);
        c->nheld--;
        if (!c->detached) mpmc_reclaim(c);
        return consumer_leave_if_done(c);
    }
    size_t i;
    for (i = 0; i < c->qlen; i++) {
        Entry *e = &c->q[(c->qhead + i) % c->qcap];
        if (e->start == start) { e->done = 1; break; }
    }
    if (i == c->qlen) { PyErr_SetString(PyExc_SystemError, "shmring: release of an unknown record"); return -1; }
    uint64_t rp = c->read_pos;
    while (c->qlen && c->q[c->qhead].done) {
        rp = c->q[c->qhead].end;
        c->qhead = (c->qhead + 1) % c->qcap;
        c->qlen--;
    }
    if (rp != c->read_pos) consumer_store_read(c, rp);
    bc_unhold_if_idle(c);
    return consumer_leave_if_done(c);
}

static int consumer_track(Consumer *c, uint64_t start, uint64_t end, int done) {
    if (c->qlen == c->qcap) {
        size_t ncap = c->qcap ? c->qcap * 2 : 16;
        Entry *nq = PyMem_Malloc(ncap * sizeof(Entry));
        if (!nq) { PyErr_NoMemory(); return -1; }
        for (size_t i = 0; i < c->qlen; i++) nq[i] = c->q[(c->qhead + i) % c->qcap];
        PyMem_Free(c->q);
        c->q = nq; c->qcap = ncap; c->qhead = 0;
    }
    Entry *e = &c->q[(c->qhead + c->qlen) % c->qcap];
    e->start = start; e->end = end; e->done = done;
    c->qlen++;
    return 0;
}

/* A record at [start, end) needs nothing more from us (padding, or copied out). */
static int consumer_skip(Consumer *c, uint64_t start, uint64_t end) {
    c->next_pos = end;
    if (c->qlen == 0 && c->read_pos == start) { consumer_store_read(c, end); return 0; }
    return consumer_track(c, start, end, 1);
}

typedef struct { uint64_t start, end; Py_ssize_t off, len; int type; } Rec;

static int corrupt(Consumer *c, const char *what, uint64_t pos, uint64_t a, uint64_t b) {
    PyErr_Format(CorruptSegmentError, "%s at position %llu (%llu, %llu)", what,
                 (unsigned long long)pos, (unsigned long long)a, (unsigned long long)b);
    return -1;
}

/* Find the next record of an spsc ring.  1 found, 0 empty, 2 empty and end of stream, -1 corrupt. */
static int spsc_peek(Consumer *c, Rec *out) {
    for (;;) {
        uint64_t pos = c->next_pos;
        if (pos == c->cached_write) {
            uint64_t wp = load_acquire64(c->r.base + SHMR_OFF_WRITE_POS); /* pairs with producer's store_release(write_pos) */
            if (wp < pos || wp - c->read_pos > c->r.capacity || (wp & 7))
                return corrupt(c, "producer position out of range", pos, wp, c->read_pos);
            c->cached_write = wp;
            if (wp == pos) {
                /* pairs with the producer's store_release(closed) made after its last write_pos store */
                if (!load_acquire32(c->r.base + SHMR_OFF_PROD_ROLE + SHMR_ROLE_CLOSED)) return 0;
                wp = load_acquire64(c->r.base + SHMR_OFF_WRITE_POS);
                if (wp == pos) return 2;
                if (wp < pos || wp - c->read_pos > c->r.capacity || (wp & 7))
                    return corrupt(c, "producer position out of range", pos, wp, c->read_pos);
                c->cached_write = wp;
            }
        }
        uint64_t off = pos & c->r.mask;
        uint64_t avail = c->cached_write - pos;
        uint64_t tail = c->r.capacity - off;
        if (avail < SHMR_REC_HDR) return corrupt(c, "truncated record header", pos, avail, tail);
        const char *h = c->r.data + off;
        uint64_t len = *(const uint32_t *)h;
        unsigned type = *(const uint16_t *)(h + 4);
        uint64_t need = align8(SHMR_REC_HDR + len);
        if (type == SHMR_T_PAD) {
            if (need != tail || tail > avail) return corrupt(c, "bad padding record", pos, len, tail);
            if (consumer_skip(c, pos, pos + tail) < 0) return -1;
            continue;
        }
        if (type != SHMR_T_BYTES && type != SHMR_T_ARRAY && type != SHMR_T_OBJECT)
            return corrupt(c, "unknown record type", pos, type, len);
        if (len > c->r.max_message || need > tail || need > avail)
            return corrupt(c, "record length out of bounds", pos, len, avail);
        out->start = pos;
        out->end = pos + need;
        out->off = (Py_ssize_t)(SHMR_HEADER_SIZE + off + SHMR_REC_HDR);
        out->len = (Py_ssize_t)len;
        out->type = (int)type;
        return 1;
    }
}

/* ---- multi-party consumers */

/* Every producer that joined has ended or died, and as many as expected did. */
static int mp_ended(Region *r) {
    uint64_t st = load_acquire64(r->base + SHMR_OFF_PROD_ROLE + SHMR_MP_STATE);  /* pairs with the producers' RMWs */
    uint64_t joined = st & 0xFFFFFFFFu, done = st >> 32;
    return joined >= 1 && done >= joined && done >= load_acquire32(r->base + SHMR_MP_OFF_EXPECTED);
}

static inline char *mp_rec(Region *r, uint64_t pos) { return r->data + (pos & r->mask); }
static inline int mp_committed(Region *r, uint64_t pos) {
    return load_acquire64(mp_rec(r, pos)) == (r->key ^ pos);   /* pairs with the producer's stamp exchange */
}

/* Nothing committed at pos: 0 empty, 2 end of stream, 3 evicted, 4 stale
 * (mpmc: another consumer moved the take cursor on; look again), -1 corrupt. */
static int mp_empty(Consumer *c, uint64_t pos) {
    Region *r = &c->r;
    if (r->kind == SHMR_KIND_BROADCAST && (load_seqcst64(c->posword) & SHMR_POS_EVICTED)) return 3;
    uint64_t cur = load_acquire64(r->base + SHMR_OFF_WRITE_POS);
    if (cur < pos || cur - pos > r->capacity) {
        /* mpmc: pos is the shared take cursor as we read it; while we were
         * preempted the others may have taken, released and reused a lap */
        if (r->kind == SHMR_KIND_MPMC && load_acquire64(r->base + SHMR_MP_OFF_TAKE) != pos) return 4;
        return corrupt(c, "claim cursor out of range", pos, cur, r->capacity);
    }
    if (cur == pos && mp_ended(r) && !mp_committed(r, pos) && load_acquire64(r->base + SHMR_OFF_WRITE_POS) == pos)
        return 2;
    return 0;
}

/* Size of the committed record at pos (header fields loaded after its stamp),
 * with type and length checked; 0 if they do not make sense. */
static uint64_t mp_size(Region *r, uint64_t pos, uint64_t cursor, uint64_t *len, unsigned *type) {
    char *h = mp_rec(r, pos);
    *len = load_relaxed32(h + 8);
    *type = load_relaxed16(h + 12);
    uint64_t tail = r->capacity - (pos & r->mask), need = align16(SHMR_MREC_HDR + *len);
    if (*type == SHMR_T_PAD) return need == tail && pos + tail <= cursor ? tail : 0;
    if (*type == SHMR_T_SKIP) return pos + need <= cursor ? need : 0;
    if (*type != SHMR_T_BYTES && *type != SHMR_T_ARRAY && *type != SHMR_T_OBJECT) return 0;
    return *len <= r->max_message && need <= tail && pos + need <= cursor ? need : 0;
}

static void fill_rec(Region *r, Rec *out, uint64_t pos, uint64_t size, uint64_t len, unsigned type) {
    out->start = pos;
    out->end = pos + size;
    out->off = (Py_ssize_t)payload_offset(r, pos);
    out->len = (Py_ssize_t)len;
    out->type = (int)type;
}

/* mpsc / broadcast: the reader's own position walks the records. */
static int mp_peek_seq(Consumer *c, Rec *out) {
    Region *r = &c->r;
    if (evict_policy(r)) { int s = bc_hold(c); if (s) return s; }
    for (;;) {
        uint64_t pos = c->next_pos;
        if (!mp_committed(r, pos)) return mp_empty(c, pos);
        uint64_t len, cur = load_acquire64(r->base + SHMR_OFF_WRITE_POS);
        unsigned type;
        uint64_t size = mp_size(r, pos, cur, &len, &type);
        if (!size) return corrupt(c, "bad record header", pos, len, type);
        if (type == SHMR_T_PAD || type == SHMR_T_SKIP) {
            if (consumer_skip(c, pos, pos + size) < 0) return -1;
            continue;
        }
        fill_rec(r, out, pos, size, len, type);
        return 1;
    }
}

/* mpmc: advance the shared release position over released records (any
 * consumer may; the CAS decides), waking producers waiting for room. */
static void mpmc_reclaim(Consumer *c) {
    Region *r = &c->r;
    char *rel = r->base + SHMR_OFF_READ_POS;
    for (;;) {
        uint64_t rp = load_acquire64(rel), t = load_acquire64(r->base + SHMR_MP_OFF_TAKE), len;
        unsigned type;
        if (rp >= t || !mp_committed(r, rp)) return;
        if (load_acquire16(mp_rec(r, rp) + 14) != SHMR_ST_RELEASED) return;  /* pairs with the releaser's store */
        uint64_t size = mp_size(r, rp, t, &len, &type);
        if (!size) return;
        if (cas64(rel, rp, rp + size))     /* seq_cst: the store half of the wake-up protocol */
            wake_if_waiters(r->base + SHMR_OFF_SPACE_WAKE);
    }
}

/* The in-flight walks (below) follow record sizes from the release position
 * while other consumers release and producers reuse space: once the release
 * position has passed pos, the bytes there may belong to a newer record (or
 * its payload), so what was read at pos is stale. */
static inline int mpmc_behind(Region *r, uint64_t pos) {
    return load_seqcst64(r->base + SHMR_OFF_READ_POS) > pos;
}

/* mpmc: take a record that a recovery requeued (its consumer died holding it). */
static int mpmc_take_requeued(Consumer *c, Rec *out) {
    Region *r = &c->r;
    uint64_t pos = load_acquire64(r->base + SHMR_OFF_READ_POS), t = load_acquire64(r->base + SHMR_MP_OFF_TAKE);
    for (uint64_t n = 0; pos < t && n < r->capacity / 16; n++) {
        uint64_t len;
        unsigned type;
        if (!mp_committed(r, pos)) return 0;      /* reclaimed under us: try again later */
        uint64_t size = mp_size(r, pos, t, &len, &type);
        if (!size) return 0;
        char *st = mp_rec(r, pos) + 14;
        if (mpmc_behind(r, pos)) return 0;        /* a REQUEUED record is never released: it is not here */
        if (type != SHMR_T_PAD && type != SHMR_T_SKIP && load_acquire16(st) == SHMR_ST_REQUEUED &&
            cas16(st, SHMR_ST_REQUEUED, (uint16_t)(r->slot + 1))) {
            fetch_add64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED, (uint64_t)-1);
            fetch_add64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REDELIVERED, 1);
            fill_rec(r, out, pos, size, len, type);
            return 1;
        }
        pos += size;
    }
    return 0;
}

static PyObject *str_eos_ready;

/* mpmc, drained and every producer done: the end of the stream only if no
 * record in flight is lost with a dead consumer (Python's _eos_ready requeues
 * what the dead held and says whether anything is still owed).  2 or 0. */
static int mpmc_end(Consumer *c, uint64_t take) {
    if (load_acquire64(c->r.base + SHMR_OFF_READ_POS) == take) return 2;
    PyObject *ok = PyObject_CallMethodNoArgs((PyObject *)c, str_eos_ready);
    if (!ok) return -1;
    int t = PyObject_IsTrue(ok);
    Py_DECREF(ok);
    return t < 0 ? -1 : t ? 2 : 0;
}

/* mpmc: take the record at the shared take cursor (CAS), then mark it ours. */
static int mpmc_peek(Consumer *c, Rec *out) {
    Region *r = &c->r;
    char *take = r->base + SHMR_MP_OFF_TAKE;
    for (;;) {
        if (load_relaxed64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED) && mpmc_take_requeued(c, out)) return 1;
        uint64_t pos = load_acquire64(take), len;
        unsigned type;
        if (pos & 15) return corrupt(c, "take cursor is not 16-aligned", pos, 0, 0);
        if (!mp_committed(r, pos)) {
            if (load_acquire64(take) != pos) continue;
            int s = mp_empty(c, pos);
            if (s == 4) continue;
            if (s != 2) return s;
            s = mpmc_end(c, pos);              /* may have requeued what dead consumers held: take it */
            if (s == 0 && load_relaxed64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED) &&
                mpmc_take_requeued(c, out)) return 1;
            return s;
        }
        uint64_t size = mp_size(r, pos, load_acquire64(r->base + SHMR_OFF_WRITE_POS), &len, &type);
        if (!size) {
            if (load_acquire64(take) != pos) continue;   /* taken and reused while we looked */
            return corrupt(c, "bad record header", pos, len, type);
        }
        if (!cas64(take, pos, pos + size)) continue;
        if (type == SHMR_T_PAD || type == SHMR_T_SKIP) { mpmc_reclaim(c); continue; }
        /* fails only if a recovery requeued it because we were too slow to get here */
        if (!cas16(mp_rec(r, pos) + 14, 0, (uint16_t)(r->slot + 1))) continue;
        fill_rec(r, out, pos, size, len, type);
        return 1;
    }
}

/* Find the next record.  1 found, 0 empty, 2 empty and end of stream,
 * 3 evicted (broadcast), -1 corrupt. */
static int consumer_peek(Consumer *c, Rec *out) {
    switch (c->r.kind) {
    case SHMR_KIND_SPSC: return spsc_peek(c, out);
    case SHMR_KIND_MPMC: return mpmc_peek(c, out);
    default: return mp_peek_seq(c, out);
    }
}

static PyObject *str_lagged;

/* The ring is drained and the producer side has ended: 1 is a normal end of
 * stream, anything else means a producer stopped on an error or died. */
static PyObject *raise_eos(Consumer *c) {
    const char *cls_name = NULL, *msg = NULL;
    char buf[300];
    if (is_multi(&c->r)) {
        char *pl = c->r.base + SHMR_OFF_PROD_ROLE;
        unsigned long long aborted = load_acquire64(pl + SHMR_MP_ABORTED), dead = load_acquire64(pl + SHMR_MP_DEAD);
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
        uint32_t how = load_acquire32(c->r.base + SHMR_OFF_PROD_ROLE + SHMR_ROLE_CLOSED);
        if (how != 1 && how != 2) {
            PyErr_Format(CorruptSegmentError, "producer status word is %u (expected 0, 1 or 2)", how);
            return NULL;
        }
        cls_name = how == 1 ? "EndOfStream" : "PeerGone";
        msg = how == 1 ? "end of stream: the producer closed the ring and every message was received"
                       : "the producer stopped on an error (its with-block raised); every message "
                         "it committed was received";
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

/* A peek status other than 1 as a Python result: None (empty), or the error. */
static PyObject *peek_status(Consumer *c, int s) {
    if (s == 0) Py_RETURN_NONE;
    if (s == 2) return raise_eos(c);
    if (s == 3) return PyObject_CallMethodNoArgs((PyObject *)c, str_lagged);
    return NULL;
}

static inline void count_received(Consumer *c) {
    c->received++;
    if (c->recvword) store_relaxed64(c->recvword, load_relaxed64(c->recvword) + 1);
}

/* Every message handed out is tracked until released; records finished at
 * once (copied bytes, padding) are tracked only when something before them
 * is still outstanding.  With nothing outstanding, next_pos == read_pos.
 * mpmc records are tracked in the ring itself (their state field). */
static PyObject *make_message(Consumer *c, Rec *r) {
    Message *m = PyObject_New(Message, &MessageType);
    if (!m) return NULL;
    if (c->r.kind == SHMR_KIND_MPMC) c->nheld++;
    else {
        if (consumer_track(c, r->start, r->end, 0) < 0) { PyObject_Free(m); return NULL; }
        c->next_pos = r->end;
    }
    Py_INCREF(c);
    m->cons = c;
    m->start = r->start; m->end = r->end;
    m->off = r->off; m->len = r->len; m->type = r->type;
    m->exports = 0; m->state = 0;
    count_received(c);
    return (PyObject *)m;
}

/* try_recv() -> Message | None; raises EndOfStream once drained after close. */
static PyObject *Consumer_try_recv(Consumer *self, PyObject *unused) {
    if (check_usable(&self->r) < 0) return NULL;
    Rec r;
    int s = consumer_peek(self, &r);
    PyObject *res = s == 1 ? make_message(self, &r) : peek_status(self, s);
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

static PyObject *str_recv_copy;

/* Whether a wait for data should end: something to read, end of stream,
 * eviction, a requeued record (never consumes anything). */
static int consumer_ready(Consumer *c) {
    Region *r = &c->r;
    if (r->kind == SHMR_KIND_SPSC)       /* pairs with producer's store_release(write_pos) / store_release(closed) */
        return load_seqcst64(r->base + SHMR_OFF_WRITE_POS) != c->next_pos ||
               load_seqcst32(r->base + SHMR_OFF_PROD_ROLE + SHMR_ROLE_CLOSED) != 0;
    uint64_t pos = r->kind == SHMR_KIND_MPMC ? load_seqcst64(r->base + SHMR_MP_OFF_TAKE) : c->next_pos;
    if (load_seqcst64(mp_rec(r, pos)) == (r->key ^ pos)) return 1;    /* pairs with the stamp exchange */
    if (r->kind == SHMR_KIND_MPMC && load_seqcst64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED)) return 1;
    if (r->kind == SHMR_KIND_BROADCAST && (load_seqcst64(c->posword) & SHMR_POS_EVICTED)) return 1;
    if (load_seqcst64(r->base + SHMR_OFF_WRITE_POS) != pos || !mp_ended(r)) return 0;
    /* mpmc: with records still in flight the end is decided between wait slices (mpmc_end) */
    return r->kind != SHMR_KIND_MPMC || load_seqcst64(r->base + SHMR_OFF_READ_POS) == pos;
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

/* recv(*, timeout=None, copy=False) -> Message; the blocking part lives in Python (_recv_wait). */
static PyObject *Consumer_recv(Consumer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
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
    if (s == 0 && consumer_spin_for_data(self)) s = consumer_peek(self, &r);
    if (s == 1) return make_message(self, &r);
    bc_unhold_if_idle(self);
    if (s != 0) return peek_status(self, s);
    return PyObject_CallMethodObjArgs((PyObject *)self, str_recv_wait, timeout, Py_False, NULL);
bad:
    PyErr_SetString(PyExc_TypeError, "recv(*, timeout=None, copy=False)");
    return NULL;
}

/* Copy out a bytes record and release it at once.  1 done, else a peek status. */
static int consumer_take_bytes(Consumer *self, PyObject **out) {
    Rec r;
    int s = consumer_peek(self, &r);
    if (s != 1) return s;
    if (r.type != SHMR_T_BYTES) {
        if (self->r.kind == SHMR_KIND_MPMC)     /* taken from the shared cursor: hand it back */
            PyErr_SetString(PyExc_TypeError, "the next message is not bytes (it is an array or an object); "
                            "use recv() for it. It was taken and is given back for redelivery.");
        else
            PyErr_SetString(PyExc_TypeError, "the next message is not bytes (it is an array or an object); "
                            "use recv() for it. It was not consumed.");
        if (self->r.kind == SHMR_KIND_MPMC) {
            char *st = mp_rec(&self->r, r.start) + 14;
            if (cas16(st, (uint16_t)(self->r.slot + 1), SHMR_ST_REQUEUED)) {
                fetch_add64(self->r.base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED, 1);
                wake_always(self->r.base + SHMR_OFF_DATA_WAKE);
            }
        }
        return -1;
    }
    PyObject *b = PyBytes_FromStringAndSize(self->r.base + r.off, r.len);
    if (!b) return -1;
    count_received(self);
    if (self->r.kind == SHMR_KIND_MPMC) {
        self->nheld++;
        consumer_finish(self, r.start, r.end);
    } else if (consumer_skip(self, r.start, r.end) < 0) { Py_DECREF(b); return -1; }
    *out = b;
    return 1;
}

static PyObject *Consumer_recv_bytes(Consumer *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *timeout;
    if (parse_timeout_kw(args, nargs, kwnames, &timeout, "recv_bytes(*, timeout=None)") < 0) return NULL;
    if (check_usable(&self->r) < 0 || check_timeout(timeout) < 0) return NULL;
    PyObject *b = NULL;
    int s = consumer_take_bytes(self, &b);
    if (s == 0 && consumer_spin_for_data(self)) s = consumer_take_bytes(self, &b);
    bc_unhold_if_idle(self);
    if (s == 1) return b;
    if (s != 0) return peek_status(self, s);
    return PyObject_CallMethodObjArgs((PyObject *)self, str_recv_wait, timeout, Py_True, NULL);
}

/* _try_recv_bytes() -> bytes | None */
static PyObject *Consumer_try_recv_bytes(Consumer *self, PyObject *unused) {
    if (check_usable(&self->r) < 0) return NULL;
    PyObject *b = NULL;
    int s = consumer_take_bytes(self, &b);
    bc_unhold_if_idle(self);
    if (s == 1) return b;
    return peek_status(self, s);
}

static int data_cond(void *vctx) { return consumer_ready((Consumer *)vctx); }

/* _wait_data(slice_s, spin_s) -> bool (GIL released while waiting). */
static PyObject *Consumer_wait_data(Consumer *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_wait_data(slice, spin)"); return NULL; }
    if (check_usable(&self->r) < 0) return NULL;
    double slice = PyFloat_AsDouble(args[0]); if (PyErr_Occurred()) return NULL;
    double spin = PyFloat_AsDouble(args[1]); if (PyErr_Occurred()) return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = wait_for(self->r.base + SHMR_OFF_DATA_WAKE, data_cond, self,
                 slice > 0 ? (uint64_t)(slice * 1e9) : 0, spin > 0 ? (uint64_t)(spin * 1e9) : 0);
    Py_END_ALLOW_THREADS
    if (PyErr_CheckSignals() < 0) return NULL;
    return PyBool_FromLong(r == 1);
}

static PyObject *Consumer_has_data(Consumer *self, PyObject *unused) {
    if (check_usable(&self->r) < 0) return NULL;
    return PyBool_FromLong(consumer_ready(self));
}

/* ---- multi-party recovery (called from the Python slow path) */

/* _stuck() -> position | None: the reader waits at an unstamped record while
 * the claim cursor is past it (its producer is writing it, or died doing so). */
static PyObject *Consumer_stuck(Consumer *self, PyObject *unused) {
    Region *r = &self->r;
    if (check_usable(r) < 0) return NULL;
    if (!is_multi(r)) Py_RETURN_NONE;
    uint64_t pos = r->kind == SHMR_KIND_MPMC ? load_acquire64(r->base + SHMR_MP_OFF_TAKE) : self->next_pos;
    if (mp_committed(r, pos) || load_acquire64(r->base + SHMR_OFF_WRITE_POS) <= pos) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(pos);
}

/* _skip_abandoned(pos, next_intent) -> bytes skipped (0: nothing to do).
 * The caller checked that no live producer's intent is pos.  The claim ends
 * at the first later stamped record, the lowest other intent, or the cursor
 * (claims are contiguous, so each is a claim boundary; a dead producer whose
 * intent is lost merges with this skip, which is as correct).  One writer
 * wins the skip by CAS on the stamp word (to a value no stamp can have). */
static PyObject *Consumer_skip_abandoned(Consumer *self, PyObject *const *args, Py_ssize_t n) {
    Region *r = &self->r;
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_skip_abandoned(pos, next_intent)"); return NULL; }
    if (check_usable(r) < 0) return NULL;
    unsigned long long pos = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    unsigned long long nxt = PyLong_AsUnsignedLongLong(args[1]); if (PyErr_Occurred()) return NULL;
    if (!is_multi(r) || (pos & 15)) { PyErr_SetString(PyExc_ValueError, "bad position"); return NULL; }
    char *h = mp_rec(r, pos);
    uint64_t old = load_acquire64(h), cur = load_acquire64(r->base + SHMR_OFF_WRITE_POS);
    if (old == (r->key ^ pos) || cur <= pos) return PyLong_FromLong(0);
    /* mpmc: the others may have moved the take cursor on since the caller saw it stuck there */
    if (r->kind == SHMR_KIND_MPMC && load_acquire64(r->base + SHMR_MP_OFF_TAKE) != pos) return PyLong_FromLong(0);
    if (cur - pos > r->capacity) { corrupt(self, "claim cursor out of range", pos, cur, 0); return NULL; }
    uint64_t limit = cur;
    if (nxt > pos && nxt < limit) limit = nxt;
    if (limit - pos > (1ull << 31)) limit = pos + (1ull << 31);    /* a u32 length; the rest is skipped next */
    uint64_t end = limit;
    for (uint64_t q = pos + 16; q < limit; q += 16)
        if (mp_committed(r, q)) { end = q; break; }
    if (old == ((r->key ^ pos) ^ 1) || !cas64(h, old, (r->key ^ pos) ^ 1)) return PyLong_FromLong(0);
    *(uint32_t *)(h + 8) = (uint32_t)(end - pos - SHMR_MREC_HDR);
    *(uint16_t *)(h + 12) = SHMR_T_SKIP;
    *(uint16_t *)(h + 14) = SHMR_ST_RELEASED;
    store_seqcst64(h, r->key ^ pos);
    fetch_add64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_ABANDONED, 1);
    wake_always(r->base + SHMR_OFF_DATA_WAKE);
    return PyLong_FromUnsignedLongLong(end - pos);
}

/* _inflight() -> [(pos, state), ...]: mpmc records taken and not reclaimed. */
static PyObject *Consumer_inflight(Consumer *self, PyObject *unused) {
    Region *r = &self->r;
    if (check_usable(r) < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (!out || r->kind != SHMR_KIND_MPMC) return out;
    uint64_t pos = load_acquire64(r->base + SHMR_OFF_READ_POS), t = load_acquire64(r->base + SHMR_MP_OFF_TAKE);
    for (uint64_t k = 0; pos < t && k < r->capacity / 16; k++) {
        uint64_t len;
        unsigned type;
        if (!mp_committed(r, pos)) break;
        uint64_t size = mp_size(r, pos, t, &len, &type);
        if (!size) break;
        if (type != SHMR_T_PAD && type != SHMR_T_SKIP) {
            unsigned state = load_acquire16(mp_rec(r, pos) + 14);
            if (mpmc_behind(r, pos)) break;       /* reclaimed while we looked: what we read may be stale */
            PyObject *item = Py_BuildValue("(KI)", (unsigned long long)pos, state);
            if (!item || PyList_Append(out, item) < 0) { Py_XDECREF(item); Py_DECREF(out); return NULL; }
            Py_DECREF(item);
        }
        pos += size;
    }
    return out;
}

/* _requeue(pos, state) -> bool: hand an mpmc record held as `state` back for redelivery. */
static PyObject *Consumer_requeue(Consumer *self, PyObject *const *args, Py_ssize_t n) {
    Region *r = &self->r;
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_requeue(pos, state)"); return NULL; }
    if (check_usable(r) < 0) return NULL;
    unsigned long long pos = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    long st = PyLong_AsLong(args[1]); if (PyErr_Occurred()) return NULL;
    if (r->kind != SHMR_KIND_MPMC || (pos & 15) || st < 0 || st >= SHMR_ST_REQUEUED) {
        PyErr_SetString(PyExc_ValueError, "bad requeue");
        return NULL;
    }
    if (!mp_committed(r, pos) || !cas16(mp_rec(r, pos) + 14, (uint16_t)st, SHMR_ST_REQUEUED)) Py_RETURN_FALSE;
    fetch_add64(r->base + SHMR_MP_OFF_COUNTERS + SHMR_MP_REQUEUED, 1);
    wake_always(r->base + SHMR_OFF_DATA_WAKE);
    Py_RETURN_TRUE;
}

/* _reset(pos): start over at pos (a broadcast subscriber re-joining). */
static PyObject *Consumer_reset(Consumer *self, PyObject *arg) {
    unsigned long long pos = PyLong_AsUnsignedLongLong(arg); if (PyErr_Occurred()) return NULL;
    if (self->qlen || self->next_pos != self->read_pos) {
        PyErr_SetString(ShmringError, "release every message first");
        return NULL;
    }
    uint64_t cur = load_acquire64(self->r.base + SHMR_OFF_WRITE_POS);   /* the position came from the segment */
    if ((pos & (self->r.hdr - 1)) || pos > cur || cur - pos > self->r.capacity) {
        corrupt(self, "re-join position out of range", pos, cur, self->r.capacity);
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
        for (size_t i = 0; i < self->qlen; i++) if (!self->q[(self->qhead + i) % self->qcap].done) n++;
        return PyLong_FromSize_t(n);
    }
    return PyLong_FromLong(self->next_pos != self->read_pos);
}
static PyObject *Consumer_get_read_pos(Consumer *self, void *c) { return PyLong_FromUnsignedLongLong(self->read_pos); }
static PyObject *Consumer_get_received(Consumer *self, void *c) { return PyLong_FromUnsignedLongLong(self->received); }

static PyMethodDef Consumer_methods[] = {
    {"recv", (PyCFunction)(void (*)(void))Consumer_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv(*, timeout=None) -> Message: the next message, zero-copy; use it as a context manager"},
    {"try_recv", (PyCFunction)Consumer_try_recv, METH_NOARGS, "try_recv() -> Message | None: never blocks"},
    {"recv_bytes", (PyCFunction)(void (*)(void))Consumer_recv_bytes, METH_FASTCALL | METH_KEYWORDS,
     "recv_bytes(*, timeout=None) -> bytes: copy out the next bytes message and release it at once"},
    {"_try_recv_bytes", (PyCFunction)Consumer_try_recv_bytes, METH_NOARGS, NULL},
    {"_wait_data", (PyCFunction)(void (*)(void))Consumer_wait_data, METH_FASTCALL, NULL},
    {"_has_data", (PyCFunction)Consumer_has_data, METH_NOARGS, NULL},
    {"_stuck", (PyCFunction)Consumer_stuck, METH_NOARGS, NULL},
    {"_skip_abandoned", (PyCFunction)(void (*)(void))Consumer_skip_abandoned, METH_FASTCALL, NULL},
    {"_inflight", (PyCFunction)Consumer_inflight, METH_NOARGS, NULL},
    {"_requeue", (PyCFunction)(void (*)(void))Consumer_requeue, METH_FASTCALL, NULL},
    {"_reset", (PyCFunction)Consumer_reset, METH_O, NULL},
    {"_mark_closed", (PyCFunction)Consumer_mark_closed, METH_NOARGS, NULL},
    {"_close_later", (PyCFunction)Consumer_close_later, METH_NOARGS, NULL},
    {NULL}
};
static PyGetSetDef Consumer_getset[] = {
    {"pending", (getter)Consumer_get_pending, NULL, "messages received and not yet released", NULL},
    {"position", (getter)Consumer_get_read_pos, NULL, "bytes released so far (the read position)", NULL},
    {"received", (getter)Consumer_get_received, NULL, "messages received through this handle", NULL},
    {"closed", (getter)Region_get_closed, NULL, "True once close() was called", NULL},
    {NULL}
};

static PyTypeObject ConsumerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.ConsumerCore",
    .tp_basicsize = sizeof(Consumer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "C half of shmring.Consumer",
    .tp_base = &RegionType,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Consumer_init,
    .tp_dealloc = (destructor)Consumer_dealloc,
    .tp_methods = Consumer_methods,
    .tp_getset = Consumer_getset,
};

/* ---------------------------------------------------------------- Message */

static const char *kind_names[] = {"?", "bytes", "array", "object"};

static void message_finish(Message *m) {
    Consumer *c = m->cons;
    m->state = 2;
    m->cons = NULL;
    if (!c) return;
    /* A message inherited by a forked child is the parent's: only the parent releases it. */
    if (c->r.fork_gen == fork_generation && consumer_finish(c, m->start, m->end) < 0)
        PyErr_WriteUnraisable((PyObject *)m);
    Py_DECREF(c);
}

static int Message_getbuffer(Message *m, Py_buffer *view, int flags) {
    if (m->state != 0 || !m->cons) {
        PyErr_SetString(PyExc_BufferError, "message was released; its bytes may already be overwritten");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)m, m->cons->r.base + m->off, m->len, 1, flags) < 0) return -1;
    m->exports++;
    return 0;
}

static void Message_releasebuffer(Message *m, Py_buffer *view) {
    m->exports--;
    if (m->exports == 0 && m->state == 1) message_finish(m);
}

static PyBufferProcs Message_as_buffer = {
    (getbufferproc)Message_getbuffer,
    (releasebufferproc)Message_releasebuffer,
};

static PyObject *Message_release(Message *m, PyObject *unused) {
    if (m->state != 0) Py_RETURN_NONE;
    /* The message keeps no view of its own (value is built on each access),
     * so any live export is a view the caller kept: it escaped. */
    if (m->exports > 0) {
        m->state = 1;
        if (PyErr_WarnFormat(EscapedViewWarning, 1,
                "a view of a received %s message (%zd bytes at ring position %llu) is still alive after "
                "release; its ring space stays held until that view is garbage-collected. Keep a copy "
                "instead: msg.copy() or recv(copy=True).", kind_names[m->type], m->len,
                (unsigned long long)m->start) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    message_finish(m);
    Py_RETURN_NONE;
}

static PyObject *Message_enter(PyObject *m, PyObject *unused) { Py_INCREF(m); return m; }
static PyObject *Message_exit(Message *m, PyObject *const *args, Py_ssize_t n) {
    PyObject *r = Message_release(m, NULL);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyObject *Message_get_value(Message *m, void *c) {
    if (m->state != 0) { PyErr_SetString(HandleClosed, "message was released; keep msg.copy() to use data after release"); return NULL; }
    if (m->type == SHMR_T_BYTES) return PyMemoryView_FromObject((PyObject *)m);
    return PyObject_CallOneArg(decode_func, (PyObject *)m);
}

static PyObject *Message_tobytes(Message *m, PyObject *unused) {
    if (m->state != 0) { PyErr_SetString(HandleClosed, "message was released"); return NULL; }
    return PyBytes_FromStringAndSize(m->cons->r.base + m->off, m->len);
}

static void Message_dealloc(Message *m) {
    /* exports hold references to m, so here exports == 0: a dropped message
     * that was never released is released now */
    if (m->state == 0) message_finish(m);
    else Py_CLEAR(m->cons);
    PyObject_Free(m);
}

static PyObject *Message_get_kind(Message *m, void *c) { return PyUnicode_FromString(kind_names[m->type]); }
static PyObject *Message_get_type(Message *m, void *c) { return PyLong_FromLong(m->type); }
static PyObject *Message_get_nbytes(Message *m, void *c) { return PyLong_FromSsize_t(m->len); }
static PyObject *Message_get_offset(Message *m, void *c) { return PyLong_FromSsize_t(m->off); }
static PyObject *Message_get_position(Message *m, void *c) { return PyLong_FromUnsignedLongLong(m->start); }
static PyObject *Message_get_released(Message *m, void *c) { return PyBool_FromLong(m->state != 0); }
static PyObject *Message_get_exports(Message *m, void *c) { return PyLong_FromLong(m->exports); }

static PyObject *Message_repr(Message *m) {
    return PyUnicode_FromFormat("<shmring.Message %s, %zd bytes at position %llu%s>", kind_names[m->type],
                                m->len, (unsigned long long)m->start,
                                m->state == 0 ? "" : m->state == 1 ? ", release deferred" : ", released");
}

static PyObject *Message_copy(Message *m, PyObject *unused);

static PyMethodDef Message_methods[] = {
    {"release", (PyCFunction)Message_release, METH_NOARGS,
     "release(): give the message's ring space back. Idempotent. If a view of it is still alive the "
     "space is held until that view is garbage-collected, and EscapedViewWarning is issued."},
    {"copy", (PyCFunction)Message_copy, METH_NOARGS, "copy(): the value, detached from the ring (owns its memory)"},
    {"tobytes", (PyCFunction)Message_tobytes, METH_NOARGS, "tobytes(): a copy of the raw payload bytes"},
    {"__enter__", (PyCFunction)Message_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Message_exit, METH_FASTCALL, NULL},
    {NULL}
};
static PyGetSetDef Message_getset[] = {
    {"value", (getter)Message_get_value, NULL,
     "the payload: a read-only memoryview (bytes), a read-only ndarray (array), or the decoded object "
     "(msgpack, arrays inside are read-only views). Built anew on each access; valid until release().", NULL},
    {"kind", (getter)Message_get_kind, NULL, "'bytes', 'array' or 'object'", NULL},
    {"type", (getter)Message_get_type, NULL, "record type code (shmring.layout.T_*)", NULL},
    {"nbytes", (getter)Message_get_nbytes, NULL, "payload size in bytes", NULL},
    {"_offset", (getter)Message_get_offset, NULL, "payload offset in the region", NULL},
    {"position", (getter)Message_get_position, NULL, "ring position of the record", NULL},
    {"released", (getter)Message_get_released, NULL, "True once release() was called", NULL},
    {"_exports", (getter)Message_get_exports, NULL, NULL, NULL},
    {NULL}
};

static PyTypeObject MessageType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring.Message",
    .tp_basicsize = sizeof(Message),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A received message: a zero-copy window on ring memory.\n\n"
              "Lifetime: msg.value and every view derived from it (slices, numpy views, "
              "memoryviews) point into the shared ring and are valid until msg.release() "
              "(called when a `with` block exits). After that the producer may overwrite the "
              "space, so release() checks whether a view escaped: if one did, the space is held "
              "until the view is garbage-collected and EscapedViewWarning is issued. To keep data, "
              "use msg.copy() or recv(copy=True).",
    .tp_new = NULL,
    .tp_dealloc = (destructor)Message_dealloc,
    .tp_as_buffer = &Message_as_buffer,
    .tp_methods = Message_methods,
    .tp_getset = Message_getset,
    .tp_repr = (reprfunc)Message_repr,
};

static PyObject *copy_func;
static PyObject *Message_copy(Message *m, PyObject *unused) {
    if (m->state != 0) { PyErr_SetString(HandleClosed, "message was released"); return NULL; }
    if (m->type == SHMR_T_BYTES) return Message_tobytes(m, NULL);
    return PyObject_CallOneArg(copy_func, (PyObject *)m);
}

/* ===================================================== SharedState (snapshots)
 *
 * Copy-on-write shared state, RCU across processes (layout: the state diagram
 * in layout.py; protocol and memory-ordering argument: docs/design.md,
 * "Shared state").  One writer, many readers:
 *
 *   reader pin:   c = load_acquire(current)        pairs with the writer's publish exchange
 *                 exchange(pin, c)       seq_cst   \  store-buffering pair with the writer's
 *                 c2 = load(current)     seq_cst   /  publish exchange + seq_cst pin scan
 *                 c2 != c: retry;  else read slot(c) in place
 *   reader unpin: exchange(pin, 0)       seq_cst   pairs with the writer's scan (it must not
 *                                                  see 0 before our last read of the slot)
 *   writer:       scan pins (seq_cst), pick a slot != current pinned by nobody,
 *                 write it, exchange(current, version+1 << 8 | slot) (seq_cst)
 *
 * Either the reader's re-load sees the writer's newer current (and retries
 * without touching the slot), or the writer's scan sees the reader's pin (and
 * does not reuse the slot).  Every value read from the segment is untrusted.
 */

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
    PyObject_HEAD
    StateCore *core;                 /* strong reference while not released */
    int own;                         /* index into core->own, -1 for a writer's draft */
    uint64_t version;
    uint32_t slot;
    Py_ssize_t off, len;             /* payload, relative to the region base */
    int type;
    int exports;
    int state;                       /* 0 live, 1 release deferred until exports == 0, 2 released */
    int writable;                    /* a writer's draft: exported writable */
    unsigned long fork_gen;          /* the process that pinned it is the one that unpins */
} Snapshot;

static PyTypeObject SnapshotType;
static PyObject *str_claim_reader;

static inline char *st_entry(StateCore *s, uint32_t i) { return s->r.base + SHMR_HEADER_SIZE + (uint64_t)i * SHMR_ST_ENTRY; }
static inline char *st_slot(StateCore *s, uint32_t k) { return s->r.base + s->first_slot + (uint64_t)k * s->slot_size; }

static int StateCore_init(StateCore *self, PyObject *args, PyObject *kw) {
    if (region_map(&self->r, args) < 0) return -1;
    self->len = (uint64_t)self->r.view.len;
    /* Read once and cached: later corruption of the header cannot move our bounds. */
    uint32_t kind = load_acquire32(self->r.base + SHMR_OFF_KIND);
    uint32_t ns = load_acquire32(self->r.base + SHMR_ST_OFF_SLOTS);
    uint32_t mr = load_acquire32(self->r.base + SHMR_ST_OFF_MAX_READERS);
    uint64_t ss = load_acquire64(self->r.base + SHMR_ST_OFF_SLOT_SIZE);
    uint64_t tab = load_acquire64(self->r.base + SHMR_ST_OFF_TABLE);
    uint64_t first = load_acquire64(self->r.base + SHMR_ST_OFF_FIRST_SLOT);
    uint64_t nb = load_acquire64(self->r.base + SHMR_OFF_MAX_MESSAGE);
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
    if (s->r.closed || !s->r.has_view) { PyErr_SetString(HandleClosed, "shared state handle is closed"); return -1; }
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
    uint64_t hv = *(volatile uint64_t *)(h + SHMR_ST_SLOT_VERSION);
    uint32_t t = *(volatile uint32_t *)(h + SHMR_ST_SLOT_TYPE);
    uint64_t n = *(volatile uint64_t *)(h + SHMR_ST_SLOT_LENGTH);
    if (hv != v || (t != SHMR_T_ARRAY && t != SHMR_T_OBJECT) || n > s->slot_size - SHMR_ST_SLOT_HDR) {
        PyErr_Format(CorruptSegmentError, "slot %u header does not match version %llu: version %llu, type %u, "
                     "length %llu (slot holds %llu)", k, (unsigned long long)v, (unsigned long long)hv, t,
                     (unsigned long long)n, (unsigned long long)(s->slot_size - SHMR_ST_SLOT_HDR));
        return -1;
    }
    *slot = k; *version = v; *type = (int)t; *len = n;
    return 0;
}

static Snapshot *snapshot_new(StateCore *s, int own, uint64_t v, uint32_t k, int type, uint64_t len, int writable) {
    Snapshot *m = PyObject_New(Snapshot, &SnapshotType);
    if (!m) return NULL;
    Py_INCREF(s);
    m->core = s; m->own = own; m->version = v; m->slot = k;
    m->off = (Py_ssize_t)(s->first_slot + (uint64_t)k * s->slot_size + SHMR_ST_SLOT_HDR);
    m->len = (Py_ssize_t)len; m->type = type; m->exports = 0; m->state = 0; m->writable = writable;
    m->fork_gen = fork_generation;
    return m;
}

/* read() -> Snapshot: pin the current version (see the protocol above). */
static PyObject *StateCore_read(StateCore *self, PyObject *unused) {
    if (st_usable(self) < 0) return NULL;
    int j;
    for (;;) {
        for (j = 0; j < self->n_own && self->busy[j]; j++) ;
        if (j < self->n_own) break;
        if (self->n_own >= ST_MAX_OWN) {
            PyErr_Format(ShmringError, "this handle already holds %d pinned snapshots (nested read() blocks "
                         "or escaped views); release some, or attach another handle", ST_MAX_OWN);
            return NULL;
        }
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str_claim_reader);  /* adds an entry */
        if (!r) return NULL;
        Py_DECREF(r);
    }
    char *pin = st_entry(self, (uint32_t)self->own[j]) + SHMR_ST_ENTRY_PIN;
    char *curp = self->r.base + SHMR_ST_OFF_CURRENT;
    uint64_t c;
    for (unsigned tries = 0;; tries++) {
        c = load_acquire64(curp);                     /* pairs with the writer's publish exchange */
        if (c == 0) {
            PyErr_SetString(ShmringError, "nothing was published to this shared state yet; "
                            "state.wait_newer(than=0) waits for the first version");
            return NULL;
        }
        (void)__atomic_exchange_n((uint64_t *)pin, c, __ATOMIC_SEQ_CST);  /* pairs with the writer's seq_cst pin scan */
        if (load_seqcst64(curp) == c) break;          /* pairs with the writer's seq_cst publish exchange */
        if (tries > 1000) sched_yield();              /* a writer publishing back to back: let it run */
        else cpu_relax();
    }
    self->busy[j] = 1;
    uint32_t k; uint64_t v, n; int t;
    if (st_check(self, c, &k, &v, &t, &n) < 0) {
        store_release64(pin, 0);
        self->busy[j] = 0;
        return NULL;
    }
    self->last_version = v;
    Snapshot *m = snapshot_new(self, j, v, k, t, n, 0);
    if (!m) { store_release64(pin, 0); self->busy[j] = 0; return NULL; }
    return (PyObject *)m;
}

static void snapshot_finish(Snapshot *m) {
    StateCore *s = m->core;
    m->state = 2;
    m->core = NULL;
    if (!s) return;
    /* A snapshot inherited by a forked child is the parent's pin: only the parent unpins it. */
    if (m->own >= 0 && m->fork_gen == fork_generation && s->r.fork_gen == fork_generation &&
        s->r.has_view && m->own < s->n_own) {
        char *e = st_entry(s, (uint32_t)s->own[m->own]);
        /* after our last read of the slot; pairs with the writer's seq_cst pin scan */
        publish_and_wake(e + SHMR_ST_ENTRY_PIN, 0, s->r.base + SHMR_ST_OFF_SLOT_WAKE);
        s->busy[m->own] = 0;
    }
    Py_DECREF(s);
}

/* Which slots are pinned by any reader: a bitmap over 256 slots.  seq_cst loads. */
static void st_pinned(StateCore *s, uint8_t *pinned) {
    memset(pinned, 0, 256);
    for (uint32_t i = 0; i < s->max_readers; i++) {
        uint64_t p = load_seqcst64(st_entry(s, i) + SHMR_ST_ENTRY_PIN); /* pairs with the reader's pin exchange */
        if (p) pinned[p & 0xff] = 1;
    }
}

/* A slot that is neither current nor pinned, or -1. */
static int st_free_slot(StateCore *s) {
    uint8_t pinned[256];
    uint64_t cur = load_seqcst64(s->r.base + SHMR_ST_OFF_CURRENT);
    st_pinned(s, pinned);
    uint32_t cs = cur ? (uint32_t)(cur & 0xff) : 0xffffffffu;
    for (uint32_t d = 0; d < s->nslots; d++) {
        uint32_t k = (s->next_slot + d) % s->nslots;
        if (k != cs && !pinned[k]) return (int)k;
    }
    return -1;
}

static PyObject *StateCore_free_slot(StateCore *self, PyObject *unused) {
    if (st_usable(self) < 0) return NULL;
    int k = st_free_slot(self);
    if (k >= 0) self->next_slot = ((uint32_t)k + 1) % self->nslots;
    return PyLong_FromLong(k);
}

static int slot_cond(void *ctx) { return st_free_slot((StateCore *)ctx) >= 0; }

struct newer_ctx { char *base; uint64_t than; };
static int newer_cond(void *vctx) {
    struct newer_ctx *c = vctx;
    return (load_seqcst64(c->base + SHMR_ST_OFF_CURRENT) >> 8) > c->than; /* pairs with the writer's publish exchange */
}

/* _wait_slot(slice, spin) -> bool / _wait_newer(than, slice, spin) -> bool (GIL released while waiting). */
static PyObject *StateCore_wait_slot(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_wait_slot(slice, spin)"); return NULL; }
    if (st_usable(self) < 0) return NULL;
    double slice = PyFloat_AsDouble(args[0]); if (PyErr_Occurred()) return NULL;
    double spin = PyFloat_AsDouble(args[1]); if (PyErr_Occurred()) return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = wait_for(self->r.base + SHMR_ST_OFF_SLOT_WAKE, slot_cond, self,
                 slice > 0 ? (uint64_t)(slice * 1e9) : 0, spin > 0 ? (uint64_t)(spin * 1e9) : 0);
    Py_END_ALLOW_THREADS
    if (PyErr_CheckSignals() < 0) return NULL;
    return PyBool_FromLong(r == 1);
}

static PyObject *StateCore_wait_newer(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_wait_newer(than, slice, spin)"); return NULL; }
    if (st_usable(self) < 0) return NULL;
    unsigned long long than = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
    double slice = PyFloat_AsDouble(args[1]); if (PyErr_Occurred()) return NULL;
    double spin = PyFloat_AsDouble(args[2]); if (PyErr_Occurred()) return NULL;
    struct newer_ctx c = { self->r.base, than };
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = wait_for(self->r.base + SHMR_ST_OFF_VERSION_WAKE, newer_cond, &c,
                 slice > 0 ? (uint64_t)(slice * 1e9) : 0, spin > 0 ? (uint64_t)(spin * 1e9) : 0);
    Py_END_ALLOW_THREADS
    if (PyErr_CheckSignals() < 0) return NULL;
    return PyBool_FromLong(r == 1);
}

static int st_slot_arg(StateCore *s, PyObject *o, uint32_t *k) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || (unsigned long)v >= s->nslots) { PyErr_Format(PyExc_ValueError, "bad slot %ld", v); return -1; }
    *k = (uint32_t)v;
    return 0;
}

/* _current() -> (version, slot, type, length) or None; checked. */
static PyObject *StateCore_current(StateCore *self, PyObject *unused) {
    if (st_usable(self) < 0) return NULL;
    uint64_t c = load_acquire64(self->r.base + SHMR_ST_OFF_CURRENT);   /* pairs with the writer's publish exchange */
    if (c == 0) Py_RETURN_NONE;
    uint32_t k; uint64_t v, n; int t;
    if (st_check(self, c, &k, &v, &t, &n) < 0) return NULL;
    self->last_version = v;
    return Py_BuildValue("KIiK", (unsigned long long)v, k, t, (unsigned long long)n);
}

static uint64_t st_publish(StateCore *self, uint32_t k, uint32_t t, uint64_t len);

/* _publish(slot, type, length) -> version.  The writer has filled the slot's payload. */
static PyObject *StateCore_publish(StateCore *self, PyObject *const *args, Py_ssize_t n) {
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

/* Make slot k (filled) the current version: the one publication store.  Returns the version, 0 on error. */
static uint64_t st_publish(StateCore *self, uint32_t k, uint32_t t, uint64_t len) {
    uint64_t c = load_acquire64(self->r.base + SHMR_ST_OFF_CURRENT);
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
    /* the one publication store; pairs with readers' load_acquire(current) and their seq_cst re-load */
    publish_and_wake(self->r.base + SHMR_ST_OFF_CURRENT, (v << 8) | k, self->r.base + SHMR_ST_OFF_VERSION_WAKE);
    self->last_version = v;
    return v;
}

/* _publish_array(meta, array) -> version, or None when no slot is free right
 * now or the value does not fit (the Python path then waits or raises).  The
 * fast path of publish() for a contiguous array: pick a free slot, write the
 * T_ARRAY payload (prefix, meta, one memcpy of the array at the first 64-aligned
 * offset, as codec.write lays it out), publish. */
static PyObject *StateCore_publish_array(StateCore *self, PyObject *const *args, Py_ssize_t n) {
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

/* _copy_slot(src, dst, length): the copy of copy-on-write (GIL released). */
static PyObject *StateCore_copy_slot(StateCore *self, PyObject *const *args, Py_ssize_t n) {
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

/* _draft(slot, type, length) -> writable Snapshot of a slot the writer owns (no pin). */
static PyObject *StateCore_draft(StateCore *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3) { PyErr_SetString(PyExc_TypeError, "_draft(slot, type, length)"); return NULL; }
    if (st_usable(self) < 0) return NULL;
    uint32_t k;
    if (st_slot_arg(self, args[0], &k) < 0) return NULL;
    long t = PyLong_AsLong(args[1]); if (PyErr_Occurred()) return NULL;
    unsigned long long len = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    if (len > self->slot_size - SHMR_ST_SLOT_HDR) { PyErr_SetString(PyExc_ValueError, "bad length"); return NULL; }
    uint64_t c = load_acquire64(self->r.base + SHMR_ST_OFF_CURRENT);
    return (PyObject *)snapshot_new(self, -1, (c >> 8) + 1, k, (int)t, len, 1);
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
    {"_current", (PyCFunction)StateCore_current, METH_NOARGS, NULL},
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

static PyTypeObject StateCoreType = {
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

/* ---------------------------------------------------------------- Snapshot */

static int Snapshot_getbuffer(Snapshot *m, Py_buffer *view, int flags) {
    if (m->state != 0 || !m->core) {
        PyErr_SetString(PyExc_BufferError, "snapshot was released; its slot may already be overwritten");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)m, m->core->r.base + m->off, m->len, !m->writable, flags) < 0) return -1;
    m->exports++;
    return 0;
}

static void Snapshot_releasebuffer(Snapshot *m, Py_buffer *view) {
    m->exports--;
    if (m->exports == 0 && m->state == 1) snapshot_finish(m);
}

static PyBufferProcs Snapshot_as_buffer = {
    (getbufferproc)Snapshot_getbuffer,
    (releasebufferproc)Snapshot_releasebuffer,
};

/* The same escaped-view mechanism as Message_release: a live export after the
 * block means a view escaped; the pin is kept until it dies. */
static PyObject *Snapshot_release(Snapshot *m, PyObject *unused) {
    if (m->state != 0) Py_RETURN_NONE;
    if (m->exports > 0) {
        m->state = 1;
        if (!m->writable && PyErr_WarnFormat(EscapedViewWarning, 1,
                "a view of shared-state version %llu (slot %u) is still alive after its read() block; the "
                "version stays pinned until that view is garbage-collected. Keep a copy instead: "
                "snap.copy().", (unsigned long long)m->version, m->slot) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    snapshot_finish(m);
    Py_RETURN_NONE;
}

static PyObject *Snapshot_enter(PyObject *m, PyObject *unused) { Py_INCREF(m); return m; }
static PyObject *Snapshot_exit(Snapshot *m, PyObject *const *args, Py_ssize_t n) {
    PyObject *r = Snapshot_release(m, NULL);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyObject *state_decode_func;     /* shmring.snapshot._decode(snap): decode_func plus a per-handle cache */
static PyObject *Snapshot_get_value(Snapshot *m, void *c) {
    if (m->state != 0) { PyErr_SetString(HandleClosed, "snapshot was released; keep snap.copy() to use data after release"); return NULL; }
    return PyObject_CallOneArg(state_decode_func ? state_decode_func : decode_func, (PyObject *)m);
}
static PyObject *Snapshot_get_state(Snapshot *m, void *c) {
    if (!m->core) Py_RETURN_NONE;
    Py_INCREF(m->core);
    return (PyObject *)m->core;
}
static PyObject *Snapshot_get_writable(Snapshot *m, void *c) { return PyBool_FromLong(m->writable); }
static PyObject *Snapshot_copy(Snapshot *m, PyObject *unused) {
    if (m->state != 0) { PyErr_SetString(HandleClosed, "snapshot was released"); return NULL; }
    return PyObject_CallOneArg(copy_func, (PyObject *)m);
}
static void Snapshot_dealloc(Snapshot *m) {
    if (m->state == 0) snapshot_finish(m);
    else Py_CLEAR(m->core);
    PyObject_Free(m);
}
static PyObject *Snapshot_get_version(Snapshot *m, void *c) { return PyLong_FromUnsignedLongLong(m->version); }
static PyObject *Snapshot_get_slot(Snapshot *m, void *c) { return PyLong_FromUnsignedLong(m->slot); }
static PyObject *Snapshot_get_type(Snapshot *m, void *c) { return PyLong_FromLong(m->type); }
static PyObject *Snapshot_get_nbytes(Snapshot *m, void *c) { return PyLong_FromSsize_t(m->len); }
static PyObject *Snapshot_get_offset(Snapshot *m, void *c) { return PyLong_FromSsize_t(m->off); }
static PyObject *Snapshot_get_released(Snapshot *m, void *c) { return PyBool_FromLong(m->state != 0); }
static PyObject *Snapshot_get_exports(Snapshot *m, void *c) { return PyLong_FromLong(m->exports); }
static PyObject *Snapshot_repr(Snapshot *m) {
    return PyUnicode_FromFormat("<shmring.Snapshot version %llu, %zd bytes in slot %u%s>",
                                (unsigned long long)m->version, m->len, m->slot,
                                m->state == 0 ? "" : m->state == 1 ? ", unpin deferred" : ", released");
}

static PyMethodDef Snapshot_methods[] = {
    {"release", (PyCFunction)Snapshot_release, METH_NOARGS,
     "release(): unpin the version. Idempotent. If a view of it is still alive the pin is held until "
     "that view is garbage-collected, and EscapedViewWarning is issued."},
    {"copy", (PyCFunction)Snapshot_copy, METH_NOARGS, "copy(): the value, detached from shared memory"},
    {"__enter__", (PyCFunction)Snapshot_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Snapshot_exit, METH_FASTCALL, NULL},
    {NULL}
};
static PyGetSetDef Snapshot_getset[] = {
    {"value", (getter)Snapshot_get_value, NULL,
     "the value: a read-only ndarray, or the decoded object whose arrays are read-only views. "
     "Built anew on each access; valid until release().", NULL},
    {"version", (getter)Snapshot_get_version, NULL, "the version pinned (1 for the first publish)", NULL},
    {"slot", (getter)Snapshot_get_slot, NULL, "the version slot it lives in", NULL},
    {"type", (getter)Snapshot_get_type, NULL, "payload type code (shmring.layout.T_*)", NULL},
    {"nbytes", (getter)Snapshot_get_nbytes, NULL, "payload size in bytes", NULL},
    {"_offset", (getter)Snapshot_get_offset, NULL, "payload offset in the region", NULL},
    {"position", (getter)Snapshot_get_version, NULL, "the version (named as a Message's, for the codec)", NULL},
    {"released", (getter)Snapshot_get_released, NULL, "True once release() was called", NULL},
    {"_exports", (getter)Snapshot_get_exports, NULL, NULL, NULL},
    {"_state", (getter)Snapshot_get_state, NULL, NULL, NULL},
    {"_writable", (getter)Snapshot_get_writable, NULL, NULL, NULL},
    {NULL}
};

static PyTypeObject SnapshotType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring.Snapshot",
    .tp_basicsize = sizeof(Snapshot),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A pinned version of a SharedState: a zero-copy window on shared memory.\n\n"
              "Lifetime: snap.value and every view derived from it point into the version's slot "
              "and are valid until snap.release() (called when the `with state.read()` block "
              "exits). The writer never reuses a pinned slot; after release it may, so release() "
              "checks whether a view escaped: if one did, the pin is held until the view is "
              "garbage-collected and EscapedViewWarning is issued. To keep data, use snap.copy().",
    .tp_new = NULL,
    .tp_dealloc = (destructor)Snapshot_dealloc,
    .tp_as_buffer = &Snapshot_as_buffer,
    .tp_methods = Snapshot_methods,
    .tp_getset = Snapshot_getset,
    .tp_repr = (reprfunc)Snapshot_repr,
};

/* ----------------------------------------------------------------- module */

static PyObject *set_codec(PyObject *mod, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_set_codec(decode, copy)"); return NULL; }
    Py_INCREF(args[0]); Py_XSETREF(decode_func, args[0]);
    Py_INCREF(args[1]); Py_XSETREF(copy_func, args[1]);
    Py_RETURN_NONE;
}

static PyObject *set_state_codec(PyObject *mod, PyObject *arg) {
    Py_INCREF(arg); Py_XSETREF(state_decode_func, arg);
    Py_RETURN_NONE;
}

static PyObject *layout_constants(PyObject *mod, PyObject *unused) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
#define PUT(name) do { PyObject *v = PyLong_FromUnsignedLongLong((unsigned long long)(name)); \
        if (!v || PyDict_SetItemString(d, #name, v) < 0) { Py_XDECREF(v); Py_DECREF(d); return NULL; } Py_DECREF(v); } while (0)
    PUT(SHMR_MAGIC); PUT(SHMR_LAYOUT_VERSION); PUT(SHMR_HEADER_SIZE); PUT(SHMR_LINE);
    PUT(SHMR_OFF_MAGIC); PUT(SHMR_OFF_VERSION); PUT(SHMR_OFF_KIND); PUT(SHMR_OFF_LAYOUT_HASH);
    PUT(SHMR_OFF_CAPACITY); PUT(SHMR_OFF_DATA_OFFSET); PUT(SHMR_OFF_MAX_MESSAGE);
    PUT(SHMR_OFF_CREATOR_PID); PUT(SHMR_OFF_READY); PUT(SHMR_OFF_CREATOR_START);
    PUT(SHMR_OFF_CREATED_NS); PUT(SHMR_OFF_SEGMENT_SIZE);
    PUT(SHMR_OFF_WRITE_POS); PUT(SHMR_OFF_READ_POS); PUT(SHMR_OFF_PROD_ROLE); PUT(SHMR_OFF_CONS_ROLE);
    PUT(SHMR_OFF_DATA_WAKE); PUT(SHMR_OFF_SPACE_WAKE);
    PUT(SHMR_ROLE_OWNER); PUT(SHMR_ROLE_CLOSED); PUT(SHMR_ROLE_SESSIONS);
    PUT(SHMR_WAKE_SEQ); PUT(SHMR_WAKE_WAITERS);
    PUT(SHMR_REC_HDR); PUT(SHMR_REC_ALIGN); PUT(SHMR_T_PAD); PUT(SHMR_T_BYTES); PUT(SHMR_T_ARRAY);
    PUT(SHMR_T_OBJECT); PUT(SHMR_KIND_SPSC); PUT(SHMR_MIN_CAPACITY); PUT(SHMR_MAX_CAPACITY);
    PUT(SHMR_MAX_MESSAGE); PUT(SHMR_KIND_RECORDS);
    PUT(SHMR_KIND_MPSC); PUT(SHMR_KIND_BROADCAST); PUT(SHMR_KIND_MPMC); PUT(SHMR_MREC_HDR); PUT(SHMR_T_SKIP);
    PUT(SHMR_MP_OFF_KEY); PUT(SHMR_MP_OFF_MAX_PRODUCERS); PUT(SHMR_MP_OFF_MAX_CONSUMERS); PUT(SHMR_MP_OFF_POLICY);
    PUT(SHMR_MP_OFF_EXPECTED); PUT(SHMR_MP_OFF_PROD_TABLE); PUT(SHMR_MP_OFF_CONS_TABLE); PUT(SHMR_MP_OFF_NEWEST);
    PUT(SHMR_MP_OFF_TAKE); PUT(SHMR_MP_OFF_COUNTERS); PUT(SHMR_MP_ENDED); PUT(SHMR_MP_ABORTED);
    PUT(SHMR_MP_SESSIONS); PUT(SHMR_MP_DEAD); PUT(SHMR_MP_STATE); PUT(SHMR_MP_ABANDONED); PUT(SHMR_MP_REQUEUED);
    PUT(SHMR_MP_REDELIVERED); PUT(SHMR_PE_INTENT); PUT(SHMR_PE_SENT); PUT(SHMR_PE_BYTES); PUT(SHMR_CE_POS);
    PUT(SHMR_CE_RECEIVED); PUT(SHMR_MP_ENTRY); PUT(SHMR_MP_MAX_PARTIES);
    PUT(SHMR_KIND_STATE); PUT(SHMR_ST_OFF_SLOTS); PUT(SHMR_ST_OFF_MAX_READERS); PUT(SHMR_ST_OFF_SLOT_SIZE);
    PUT(SHMR_ST_OFF_TABLE); PUT(SHMR_ST_OFF_FIRST_SLOT); PUT(SHMR_ST_OFF_CURRENT); PUT(SHMR_ST_OFF_WRITER);
    PUT(SHMR_ST_OFF_VERSION_WAKE); PUT(SHMR_ST_OFF_SLOT_WAKE); PUT(SHMR_ST_OFF_COUNTERS);
    PUT(SHMR_ST_RECLAIMED); PUT(SHMR_ST_WRITER_WAITS); PUT(SHMR_ST_ENTRY); PUT(SHMR_ST_ENTRY_OWNER);
    PUT(SHMR_ST_ENTRY_PIN); PUT(SHMR_ST_SLOT_HDR); PUT(SHMR_ST_SLOT_VERSION); PUT(SHMR_ST_SLOT_TYPE);
    PUT(SHMR_ST_SLOT_LENGTH); PUT(SHMR_ST_MIN_SLOTS); PUT(SHMR_ST_MAX_SLOTS); PUT(SHMR_ST_MAX_READERS);
#undef PUT
    return d;
}

/* ---------------------------------------------------------- waiting on many */

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
struct shmr_futex_waitv { uint64_t val; uint64_t uaddr; uint32_t flags; uint32_t reserved; };
#define SHMR_FUTEX_32 2u
#define SHMR_WAIT_MAX 128

/* wait_any(consumers, slice_s) -> bool: sleep (GIL released) until one of the
 * consumers has something to read (data, end of stream, eviction), for at
 * most one slice.  The wake-up protocol of wait_for, on every wake word at
 * once, through futex_waitv (Linux >= 5.16); without it, 1 ms naps. */
static PyObject *wait_any(PyObject *mod, PyObject *const *args, Py_ssize_t n) {
    if (n != 2 || !PyList_Check(args[0])) { PyErr_SetString(PyExc_TypeError, "wait_any(consumers: list, slice)"); return NULL; }
    Py_ssize_t k = PyList_GET_SIZE(args[0]);
    if (k < 1 || k > SHMR_WAIT_MAX) { PyErr_Format(PyExc_ValueError, "wait on 1 to %d consumers, got %zd", SHMR_WAIT_MAX, k); return NULL; }
    double slice = PyFloat_AsDouble(args[1]); if (PyErr_Occurred()) return NULL;
    Consumer *cs[SHMR_WAIT_MAX];
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *o = PyList_GET_ITEM(args[0], i);
        if (!PyObject_TypeCheck(o, &ConsumerType)) { PyErr_SetString(PyExc_TypeError, "wait() takes consumer / subscriber handles"); return NULL; }
        cs[i] = (Consumer *)o;
        if (check_usable(&cs[i]->r) < 0) return NULL;
    }
    for (Py_ssize_t i = 0; i < k; i++) Py_INCREF(cs[i]);   /* the list may change while we sleep */
    static int have_waitv = 1;
    int ready = 0;
    Py_BEGIN_ALLOW_THREADS
    uint64_t deadline = now_ns() + (slice > 0 ? (uint64_t)(slice * 1e9) : 0);
    struct shmr_futex_waitv wv[SHMR_WAIT_MAX];
    for (;;) {
        for (Py_ssize_t i = 0; i < k && !ready; i++) ready = consumer_ready(cs[i]);
        if (ready) break;
        uint64_t t = now_ns();
        if (t >= deadline) break;
        for (Py_ssize_t i = 0; i < k; i++) {
            char *line = cs[i]->r.base + SHMR_OFF_DATA_WAKE;
            wv[i].val = load_acquire32(line + SHMR_WAKE_SEQ);
            wv[i].uaddr = (uint64_t)(uintptr_t)(line + SHMR_WAKE_SEQ);
            wv[i].flags = SHMR_FUTEX_32;          /* shared: no FUTEX_PRIVATE_FLAG */
            wv[i].reserved = 0;
            fetch_add32(line + SHMR_WAKE_WAITERS, 1);   /* pairs with the waker's seq_cst load(waiters) */
        }
        for (Py_ssize_t i = 0; i < k && !ready; i++) ready = consumer_ready(cs[i]);
        if (!ready) {
            int err = 0;
            if (have_waitv) {
                struct timespec ts;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                uint64_t abs_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec + (deadline - t);
                ts.tv_sec = (time_t)(abs_ns / 1000000000ull);
                ts.tv_nsec = (long)(abs_ns % 1000000000ull);
                long r = syscall(SYS_futex_waitv, wv, (unsigned)k, 0, &ts, CLOCK_MONOTONIC);
                err = r < 0 ? errno : 0;
                if (err == ENOSYS) have_waitv = 0;
            }
            if (!have_waitv) {
                struct timespec nap = {0, 1000000};
                nanosleep(&nap, NULL);
            }
            __atomic_fetch_add(&n_sleeps, 1, __ATOMIC_RELAXED);
            if (err == EINTR) { for (Py_ssize_t i = 0; i < k; i++) fetch_add32(cs[i]->r.base + SHMR_OFF_DATA_WAKE + SHMR_WAKE_WAITERS, (uint32_t)-1); break; }
        }
        for (Py_ssize_t i = 0; i < k; i++) fetch_add32(cs[i]->r.base + SHMR_OFF_DATA_WAKE + SHMR_WAKE_WAITERS, (uint32_t)-1);
    }
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < k; i++) Py_DECREF(cs[i]);
    if (PyErr_CheckSignals() < 0) return NULL;
    return PyBool_FromLong(ready);
}

static PyObject *wait_counters(PyObject *mod, PyObject *unused) {
    return Py_BuildValue("{sKsK}", "sleeps", (unsigned long long)n_sleeps,
                         "late_wakeups", (unsigned long long)n_late_wakeups);
}

static PyMethodDef module_methods[] = {
    {"wait_counters", (PyCFunction)wait_counters, METH_NOARGS,
     "wait_counters() -> {'sleeps': futex sleeps, 'late_wakeups': sleeps that timed out although "
     "their condition held (a missed wake-up if slices are long)} for this process"},
    {"_set_codec", (PyCFunction)(void (*)(void))set_codec, METH_FASTCALL, NULL},
    {"_set_state_codec", (PyCFunction)set_state_codec, METH_O, NULL},
    {"layout_constants", (PyCFunction)layout_constants, METH_NOARGS, "the constants of _layout.h, by name"},
    {"wait_any", (PyCFunction)(void (*)(void))wait_any, METH_FASTCALL, "wait_any(consumers, slice) -> bool"},
    {NULL}
};

static struct PyModuleDef coremodule = {
    PyModuleDef_HEAD_INIT, "shmring._core",
    "shmring's C core: atomics, futex waits and the per-message hot paths.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__core(void) {
    if (load_errors() < 0) return NULL;
    if (PyType_Ready(&RegionType) < 0 || PyType_Ready(&ProducerType) < 0 ||
        PyType_Ready(&ConsumerType) < 0 || PyType_Ready(&MessageType) < 0 ||
        PyType_Ready(&StateCoreType) < 0 || PyType_Ready(&SnapshotType) < 0)
        return NULL;
    str_claim_reader = PyUnicode_InternFromString("_claim_reader");
    if (!str_claim_reader) return NULL;
    str_send_obj = PyUnicode_InternFromString("_send_obj");
    str_try_send_obj = PyUnicode_InternFromString("_try_send_obj");
    str_send_wait = PyUnicode_InternFromString("_send_wait");
    str_recv_wait = PyUnicode_InternFromString("_recv_wait");
    str_recv_copy = PyUnicode_InternFromString("_recv_copy");
    str_lagged = PyUnicode_InternFromString("_lagged");
    str_eos_ready = PyUnicode_InternFromString("_eos_ready");
    str_leave_table = PyUnicode_InternFromString("_leave_table");
    if (!str_leave_table) return NULL;
    if (!str_lagged || !str_eos_ready) return NULL;
    if (!str_recv_copy || !str_send_obj || !str_try_send_obj || !str_send_wait || !str_recv_wait) return NULL;
    pthread_atfork(NULL, NULL, at_fork_child);
    PyObject *m = PyModule_Create(&coremodule);
    if (!m) return NULL;
    Py_INCREF(&RegionType); PyModule_AddObject(m, "Region", (PyObject *)&RegionType);
    Py_INCREF(&ProducerType); PyModule_AddObject(m, "ProducerCore", (PyObject *)&ProducerType);
    Py_INCREF(&ConsumerType); PyModule_AddObject(m, "ConsumerCore", (PyObject *)&ConsumerType);
    Py_INCREF(&MessageType); PyModule_AddObject(m, "Message", (PyObject *)&MessageType);
    Py_INCREF(&StateCoreType); PyModule_AddObject(m, "StateCore", (PyObject *)&StateCoreType);
    Py_INCREF(&SnapshotType); PyModule_AddObject(m, "Snapshot", (PyObject *)&SnapshotType);
    return m;
}
