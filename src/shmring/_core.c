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
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }

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
} Region;

/* Take a writable export of the mapping passed as the one argument. */
static int region_map(Region *self, PyObject *args) {
    PyObject *buf;
    if (!PyArg_ParseTuple(args, "O", &buf)) return -1;
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
    self->max_message = cap / 2 - SHMR_REC_HDR;
    self->data = self->base + SHMR_HEADER_SIZE;
    return 0;
}

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

static PyMethodDef Region_methods[] = {
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
    uint64_t write_pos;     /* ours; mirrors the shared write_pos after each commit */
    uint64_t cached_read;   /* last read_pos we loaded */
    int reserved;           /* a reservation is open */
    uint64_t res_start;     /* position of its record header */
    uint64_t res_len;       /* payload bytes reserved */
    uint64_t res_prev;      /* write_pos before it (padding included), for abort */
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

static int Producer_init(Producer *self, PyObject *args, PyObject *kw) {
    if (Region_init(&self->r, args, kw) < 0) return -1;
    uint64_t wp = load_acquire64(self->r.base + SHMR_OFF_WRITE_POS);
    uint64_t rp = load_acquire64(self->r.base + SHMR_OFF_READ_POS); /* pairs with consumer's store_release(read_pos) */
    if (rp > wp || wp - rp > self->r.capacity || (wp & 7) || (rp & 7)) {
        PyErr_Format(CorruptSegmentError, "positions out of order: read %llu, write %llu, capacity %llu",
                     (unsigned long long)rp, (unsigned long long)wp, (unsigned long long)self->r.capacity);
        return -1;
    }
    self->write_pos = wp;
    self->cached_read = rp;
    return 0;
}

/* Claim room for a record of payload_len bytes at write_pos (writing a padding
 * record first when it would cross the end of the data area).  Nothing is
 * visible to the consumer until publish().  Returns 1 and the record start,
 * 0 when the ring is full right now, -1 on corruption (exception set). */
static int producer_claim(Producer *p, uint64_t payload_len, uint64_t *rec_start) {
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

static inline void producer_write_header(Producer *p, uint64_t start, uint64_t len, unsigned type) {
    char *h = p->r.data + (start & p->r.mask);
    *(uint32_t *)h = (uint32_t)len;
    *(uint16_t *)(h + 4) = (uint16_t)type;
    *(uint16_t *)(h + 6) = 0;
}

static inline void producer_publish(Producer *p, uint64_t new_wp) {
    p->write_pos = new_wp;
    /* after the record's plain stores; pairs with consumer's load_acquire(write_pos) in peek */
    publish_and_wake(p->r.base + SHMR_OFF_WRITE_POS, new_wp, p->r.base + SHMR_OFF_DATA_WAKE);
}

/* Copy one payload in and publish it. 1 sent, 0 full, -1 error. */
static int producer_push(Producer *p, const char *buf, uint64_t len, unsigned type) {
    if (len > p->r.max_message) {
        PyErr_Format(MessageTooLarge, "message of %llu bytes can never fit: this ring's largest "
                     "message is %llu bytes (capacity %llu / 2 - %u)", (unsigned long long)len,
                     (unsigned long long)p->r.max_message, (unsigned long long)p->r.capacity, SHMR_REC_HDR);
        return -1;
    }
    if (p->reserved) { PyErr_SetString(ShmringError, "a reservation is open; commit or abort it first"); return -1; }
    uint64_t start;
    int r = producer_claim(p, len, &start);
    if (r <= 0) return r;
    producer_write_header(p, start, len, type);
    memcpy(p->r.data + (start & p->r.mask) + SHMR_REC_HDR, buf, len);
    producer_publish(p, start + align8(SHMR_REC_HDR + len));
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
    uint64_t payload = SHMR_HEADER_SIZE + (start & self->r.mask) + SHMR_REC_HDR;  /* region offsets */
    char *pl = self->r.base + payload;
    *(uint32_t *)pl = (uint32_t)meta_len;
    *(uint32_t *)(pl + 4) = 1;
    memcpy(pl + 8, PyBytes_AS_STRING(args[0]), meta_len);
    uint64_t area = (payload + 8 + meta_len + 63) & ~(uint64_t)63;
    memcpy(self->r.base + area, b.buf, (size_t)b.len);
    uint64_t len = area + (uint64_t)b.len - payload;
    producer_write_header(self, start, len, (unsigned)type);
    producer_publish(self, start + align8(SHMR_REC_HDR + len));
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
    producer_write_header(self, start, len, (unsigned)type);
    /* The claim may have written a padding record: keep write_pos before it
     * until commit, so abort forgets both. */
    return PyLong_FromUnsignedLongLong(SHMR_HEADER_SIZE + (start & self->r.mask) + SHMR_REC_HDR);
}

/* _commit(nbytes=-1): publish the open reservation, optionally shrunk to nbytes. */
static PyObject *Producer_commit(Producer *self, PyObject *const *args, Py_ssize_t n) {
    if (!self->reserved) { PyErr_SetString(ShmringError, "no open reservation"); return NULL; }
    uint64_t len = self->res_len;
    if (n >= 1 && args[0] != Py_None) {
        unsigned long long l = PyLong_AsUnsignedLongLong(args[0]); if (PyErr_Occurred()) return NULL;
        if (l > len) { PyErr_Format(PyExc_ValueError, "cannot commit %llu bytes of a %llu-byte reservation", l, (unsigned long long)len); return NULL; }
        len = l;
        *(uint32_t *)(self->r.data + (self->res_start & self->r.mask)) = (uint32_t)len;
    }
    self->reserved = 0;
    producer_publish(self, self->res_start + align8(SHMR_REC_HDR + len));
    Py_RETURN_NONE;
}

static PyObject *Producer_abort(Producer *self, PyObject *unused) {
    if (self->reserved) { self->reserved = 0; self->write_pos = self->res_prev; }
    Py_RETURN_NONE;
}

struct space_ctx { char *base; uint64_t wp, total, cap; };
static int space_cond(void *vctx) {
    struct space_ctx *c = vctx;
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

static PyObject *Producer_get_write_pos(Producer *self, void *c) { return PyLong_FromUnsignedLongLong(self->write_pos); }
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
    uint64_t next_pos;      /* next record to hand out */
    uint64_t read_pos;      /* last value stored to the shared read_pos */
    uint64_t cached_write;  /* last write_pos we loaded */
    Entry *q; size_t qhead, qlen, qcap;   /* circular queue of outstanding records */
    int detached;           /* role given up: never store read_pos again */
    uint64_t received;
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
    if (Region_init(&self->r, args, kw) < 0) return -1;
    uint64_t rp = load_acquire64(self->r.base + SHMR_OFF_READ_POS);
    uint64_t wp = load_acquire64(self->r.base + SHMR_OFF_WRITE_POS); /* pairs with producer's store_release(write_pos) */
    if (rp > wp || wp - rp > self->r.capacity || (wp & 7) || (rp & 7)) {
        PyErr_Format(CorruptSegmentError, "positions out of order: read %llu, write %llu, capacity %llu",
                     (unsigned long long)rp, (unsigned long long)wp, (unsigned long long)self->r.capacity);
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

static inline void consumer_store_read(Consumer *c, uint64_t rp) {
    c->read_pos = rp;
    if (c->detached) return;
    /* after the last read of the released bytes; pairs with producer's load_acquire(read_pos) in claim */
    publish_and_wake(c->r.base + SHMR_OFF_READ_POS, rp, c->r.base + SHMR_OFF_SPACE_WAKE);
}

/* Record [start, end) is finished with. */
static int consumer_finish(Consumer *c, uint64_t start, uint64_t end) {
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
    return 0;
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

typedef struct { uint64_t start, end; Py_ssize_t off, len; int type; } Rec;

static int corrupt(Consumer *c, const char *what, uint64_t pos, uint64_t a, uint64_t b) {
    PyErr_Format(CorruptSegmentError, "%s at position %llu (%llu, %llu)", what,
                 (unsigned long long)pos, (unsigned long long)a, (unsigned long long)b);
    return -1;
}

/* Find the next record.  1 found, 0 empty, 2 empty and end of stream, -1 corrupt. */
static int consumer_peek(Consumer *c, Rec *out) {
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
            c->next_pos = pos + tail;
            if (c->qlen == 0 && c->read_pos == pos) consumer_store_read(c, pos + tail);
            else if (consumer_track(c, pos, pos + tail, 1) < 0) return -1;
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

/* The ring is drained and the producer's closed word is set: 1 is a normal
 * end of stream, anything else means the producer stopped on an error. */
static PyObject *raise_eos(Consumer *c) {
    uint32_t how = load_acquire32(c->r.base + SHMR_OFF_PROD_ROLE + SHMR_ROLE_CLOSED);
    if (how != 1 && how != 2) {
        PyErr_Format(CorruptSegmentError, "producer status word is %u (expected 0, 1 or 2)", how);
        return NULL;
    }
    PyObject *m = PyImport_ImportModule("shmring.errors");
    if (!m) return NULL;
    PyObject *cls = PyObject_GetAttrString(m, how == 1 ? "EndOfStream" : "PeerGone");
    Py_DECREF(m);
    if (!cls) return NULL;
    if (how == 1)
        PyErr_SetString(cls, "end of stream: the producer closed the ring and every message was received");
    else
        PyErr_SetString(cls, "the producer stopped on an error (its with-block raised); every message "
                             "it committed was received");
    Py_DECREF(cls);
    return NULL;
}

/* Every message handed out is tracked until released; records finished at
 * once (copied bytes, padding) are tracked only when something before them
 * is still outstanding.  With nothing outstanding, next_pos == read_pos. */
static PyObject *make_message(Consumer *c, Rec *r) {
    Message *m = PyObject_New(Message, &MessageType);
    if (!m) return NULL;
    if (consumer_track(c, r->start, r->end, 0) < 0) { PyObject_Free(m); return NULL; }
    Py_INCREF(c);
    m->cons = c;
    m->start = r->start; m->end = r->end;
    m->off = r->off; m->len = r->len; m->type = r->type;
    m->exports = 0; m->state = 0;
    c->next_pos = r->end;
    c->received++;
    return (PyObject *)m;
}

/* try_recv() -> Message | None; raises EndOfStream once drained after close. */
static PyObject *Consumer_try_recv(Consumer *self, PyObject *unused) {
    if (check_usable(&self->r) < 0) return NULL;
    Rec r;
    int s = consumer_peek(self, &r);
    if (s == 1) return make_message(self, &r);
    if (s == 0) Py_RETURN_NONE;
    if (s == 2) return raise_eos(self);
    return NULL;
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

/* The ring looked empty: poll write_pos (and the closed word) for up to ~4 us
 * before taking the Python slow path.  Polling every few pauses rather than
 * back to back lets the producer publish several records per cache-line
 * transfer when the consumer runs right behind it. */
static int consumer_spin_for_data(Consumer *c) {
    if (c->r.spin <= 0) return 0;
    for (int i = 0; i < 64; i++) {
        cpu_relax(); cpu_relax(); cpu_relax();
        if (load_acquire64(c->r.base + SHMR_OFF_WRITE_POS) != c->next_pos ||  /* pairs with producer's publish */
            load_acquire32(c->r.base + SHMR_OFF_PROD_ROLE + SHMR_ROLE_CLOSED))
            return 1;
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
    if (s < 0) return NULL;
    if (s == 2) return raise_eos(self);
    return PyObject_CallMethodObjArgs((PyObject *)self, str_recv_wait, timeout, Py_False, NULL);
bad:
    PyErr_SetString(PyExc_TypeError, "recv(*, timeout=None, copy=False)");
    return NULL;
}

/* Copy out a bytes record and release it at once.  1 done, 0 empty, 2 eos, -1 error. */
static int consumer_take_bytes(Consumer *self, PyObject **out) {
    Rec r;
    int s = consumer_peek(self, &r);
    if (s != 1) return s;
    if (r.type != SHMR_T_BYTES) {
        PyErr_SetString(PyExc_TypeError, "the next message is not bytes (it is an array or an object); "
                        "use recv() for it. It was not consumed.");
        return -1;
    }
    PyObject *b = PyBytes_FromStringAndSize(self->r.base + r.off, r.len);
    if (!b) return -1;
    self->next_pos = r.end;
    self->received++;
    if (self->qlen == 0 && self->read_pos == r.start) consumer_store_read(self, r.end);
    else if (consumer_track(self, r.start, r.end, 1) < 0) { Py_DECREF(b); return -1; }
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
    if (s == 1) return b;
    if (s < 0) return NULL;
    if (s == 2) return raise_eos(self);
    return PyObject_CallMethodObjArgs((PyObject *)self, str_recv_wait, timeout, Py_True, NULL);
}

/* _try_recv_bytes() -> bytes | None */
static PyObject *Consumer_try_recv_bytes(Consumer *self, PyObject *unused) {
    if (check_usable(&self->r) < 0) return NULL;
    PyObject *b = NULL;
    int s = consumer_take_bytes(self, &b);
    if (s == 1) return b;
    if (s == 0) Py_RETURN_NONE;
    if (s == 2) return raise_eos(self);
    return NULL;
}

struct data_ctx { char *base; uint64_t pos; };
static int data_cond(void *vctx) {
    struct data_ctx *c = vctx;
    /* pairs with producer's store_release(write_pos) / store_release(closed) */
    return load_seqcst64(c->base + SHMR_OFF_WRITE_POS) != c->pos ||
           load_seqcst32(c->base + SHMR_OFF_PROD_ROLE + SHMR_ROLE_CLOSED) != 0;
}

/* _wait_data(slice_s, spin_s) -> bool (GIL released while waiting). */
static PyObject *Consumer_wait_data(Consumer *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) { PyErr_SetString(PyExc_TypeError, "_wait_data(slice, spin)"); return NULL; }
    if (check_usable(&self->r) < 0) return NULL;
    double slice = PyFloat_AsDouble(args[0]); if (PyErr_Occurred()) return NULL;
    double spin = PyFloat_AsDouble(args[1]); if (PyErr_Occurred()) return NULL;
    struct data_ctx c = { self->r.base, self->next_pos };
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = wait_for(self->r.base + SHMR_OFF_DATA_WAKE, data_cond, &c,
                 slice > 0 ? (uint64_t)(slice * 1e9) : 0, spin > 0 ? (uint64_t)(spin * 1e9) : 0);
    Py_END_ALLOW_THREADS
    if (PyErr_CheckSignals() < 0) return NULL;
    return PyBool_FromLong(r == 1);
}

static PyObject *Consumer_mark_closed(Consumer *self, PyObject *unused) {
    self->r.closed = 1;
    self->detached = 1;
    Py_RETURN_NONE;
}

static PyObject *Consumer_get_pending(Consumer *self, void *c) {
    /* messages handed out and not released yet (tracked or the single untracked one) */
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
    {"_mark_closed", (PyCFunction)Consumer_mark_closed, METH_NOARGS, NULL},
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
    PUT(SHMR_KIND_STATE); PUT(SHMR_ST_OFF_SLOTS); PUT(SHMR_ST_OFF_MAX_READERS); PUT(SHMR_ST_OFF_SLOT_SIZE);
    PUT(SHMR_ST_OFF_TABLE); PUT(SHMR_ST_OFF_FIRST_SLOT); PUT(SHMR_ST_OFF_CURRENT); PUT(SHMR_ST_OFF_WRITER);
    PUT(SHMR_ST_OFF_VERSION_WAKE); PUT(SHMR_ST_OFF_SLOT_WAKE); PUT(SHMR_ST_OFF_COUNTERS);
    PUT(SHMR_ST_RECLAIMED); PUT(SHMR_ST_WRITER_WAITS); PUT(SHMR_ST_ENTRY); PUT(SHMR_ST_ENTRY_OWNER);
    PUT(SHMR_ST_ENTRY_PIN); PUT(SHMR_ST_SLOT_HDR); PUT(SHMR_ST_SLOT_VERSION); PUT(SHMR_ST_SLOT_TYPE);
    PUT(SHMR_ST_SLOT_LENGTH); PUT(SHMR_ST_MIN_SLOTS); PUT(SHMR_ST_MAX_SLOTS); PUT(SHMR_ST_MAX_READERS);
#undef PUT
    return d;
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
