/*
 * guard.c: the SIGBUS guard (rules R45 to R49 of docs/design.md).
 *
 * Anyone with write access to a segment can ftruncate its backing while
 * processes have it mapped; every later touch of a page past the new end
 * raises SIGBUS, which kills the process by default.  The guard turns that
 * into an error:
 *
 *   registry   a fixed table of this process's shmring mappings [start, end),
 *              each entry held (refs) by objects that hold a buffer export of
 *              the mapping, so an entry exists only while the mapping does
 *              (R45: registered => mapped; the last holder unregisters before
 *              it releases its export, and so before any munmap)
 *   handler    SIGBUS with si_code BUS_ADRERR at an address inside an entry:
 *              map anonymous zero pages over the whole entry (MAP_FIXED), mark
 *              it truncated, return: the faulting instruction reads zeros (R46).
 *              Anything else goes to the previous handler (faulthandler's,
 *              say) or the default action: a genuine crash still crashes.
 *   noticing   every C call on a handle checks its entry's flag (one relaxed
 *              load) on entry and after touching the segment, and every wait
 *              slice that ends quietly touches the mapping's last page, which
 *              faults if anything vanished (R47, R48): SegmentTruncated.
 *
 * The handler takes no lock, allocates nothing and calls only mmap,
 * sched_yield and sigaction (system calls); it reads the table through a
 * per-entry sequence word (R45).  Writers of the table (registration, always
 * with the GIL held) serialize on a mutex the handler never takes.
 */
#include "core.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>

#define GUARD_MAX 1024             /* mappings one process can guard at once */
#define GUARD_LABEL 160

enum { GUARD_OK = 0, GUARD_REMAPPING = 1, GUARD_TRUNCATED = 2 };   /* guard_range.state */

struct guard_range {
    uint64_t seq;                  /* odd while start / end change (R45) */
    uint64_t start, end;           /* the mapping */
    uint32_t refs;                 /* holders; 0: a free entry */
    uint32_t state;                /* GUARD_*: what a Region's truncated() reads */
    char label[GUARD_LABEL];       /* "segment 'x'" / "file '/p'" for the error; never read by the handler */
};

static struct guard_range ranges[GUARD_MAX];
static uint32_t n_ranges;          /* entries ever used: the handler scans [0, n_ranges) */
static pthread_mutex_t guard_mu = PTHREAD_MUTEX_INITIALIZER;
const uint32_t guard_unguarded = GUARD_OK;   /* the flag of a region the table had no room for */

/* The handler we chain to, double-buffered so a handler running while another
 * thread re-installs never reads a half-written struct. */
static struct sigaction previous[2];
static uint32_t previous_ix;

PyObject *SegmentTruncated;

/* ------------------------------------------------------------ the handler */

/* Run the previous disposition, as if we were not there. */
static void chain(int sig, siginfo_t *si, void *uc) {
    const struct sigaction *p = &previous[load_acquire32(&previous_ix)];   /* R49, pairs with the store in guard_install */
    int fault = si && si->si_code > 0;          /* from the kernel (a fault), not kill() / raise() */
    if (fault && (p->sa_flags & SA_SIGINFO) && p->sa_sigaction) {
        p->sa_sigaction(sig, si, uc);
        return;
    }
    if (fault && !(p->sa_flags & SA_SIGINFO) && p->sa_handler != SIG_DFL && p->sa_handler != SIG_IGN) {
        p->sa_handler(sig);                      /* faulthandler: prints, restores its previous, raises */
        return;
    }
    if (!fault && !(p->sa_flags & SA_SIGINFO) && p->sa_handler == SIG_IGN) return;
    /* The default action.  A handler function is not called for a signal
     * sent by kill() or raise(): faulthandler re-raises what it handled, and
     * calling it again would print and re-raise for ever. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    if (!fault) raise(sig);                     /* blocked in this handler: delivered when it returns */
    /* a fault: returning re-runs the instruction, which now dies by default */
}

/* Is `a` inside a registered mapping?  Then make its whole range zeros, once. */
static int guard_fix(uint64_t a) {
    uint32_t n = load_acquire32(&n_ranges);   /* R45, pairs with the store_release in guard_attach */
    for (uint32_t i = 0; i < n && i < GUARD_MAX; i++) {
        struct guard_range *g = &ranges[i];
        uint64_t s1 = load_acquire64(&g->seq);   /* R45, pairs with the store_release of seq in guard_attach / guard_detach */
        if (s1 & 1) continue;
        uint64_t start = load_relaxed64(&g->start);   /* R45, read between two seq loads */
        uint64_t end = load_relaxed64(&g->end);   /* R45, read between two seq loads */
        uint32_t refs = load_relaxed32(&g->refs);   /* R45, read between two seq loads */
        fence_acquire();   /* R45, orders the reads above before the second seq load */
        if (load_relaxed64(&g->seq) != s1 || !refs || a < start || a >= end) continue;   /* R45, unchanged: a consistent entry */
        for (;;) {
            uint32_t st = load_acquire32(&g->state);   /* R46, pairs with the store_release after the remap */
            if (st == GUARD_TRUNCATED) return 1;     /* remapped meanwhile: the access can run again */
            if (st == GUARD_REMAPPING) { sched_yield(); continue; }   /* another thread is at it */
            if (cas_seq_cst32(&g->state, GUARD_OK, GUARD_REMAPPING)) break;   /* R46, one thread remaps */
        }
        void *p = mmap((void *)(uintptr_t)start, (size_t)(end - start), PROT_READ | PROT_WRITE,
                       MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        store_release32(&g->state, p == MAP_FAILED ? GUARD_OK : GUARD_TRUNCATED);   /* R46, after the remap: the flag R47 reads */
        return p != MAP_FAILED;
    }
    return 0;
}

static void guard_handler(int sig, siginfo_t *si, void *uc) {
    int saved = errno;
    if (si && si->si_code == BUS_ADRERR && guard_fix((uint64_t)(uintptr_t)si->si_addr)) {
        errno = saved;
        return;                                  /* the faulting access reads zeros now */
    }
    chain(sig, si, uc);
    errno = saved;
}

/* Install the handler if SIGBUS is not ours (first use, or someone, e.g.
 * faulthandler.enable(), put another handler in front since): ours goes in
 * front and chains to whatever was there (R49).  Under guard_mu. */
static void guard_install(void) {
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0) return;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == guard_handler) return;
    uint32_t ix = load_relaxed32(&previous_ix) ^ 1u;   /* R49, only guard_install writes it, under guard_mu */
    previous[ix] = cur;
    store_release32(&previous_ix, ix);   /* R49, pairs with the acquire in chain */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, NULL);
}

/* ------------------------------------------------------------ the registry */

static void guard_label(struct guard_range *g, PyObject *label) {
    const char *s = label ? PyUnicode_AsUTF8(label) : NULL;
    if (!s) { PyErr_Clear(); s = "a shmring segment"; }
    snprintf(g->label, sizeof g->label, "%s", s);
}

/* Register [start, end) (or take one more reference on the entry holding it):
 * the slot, or -1 with no room (the mapping is then unguarded, as before).
 * The caller holds a buffer export of the mapping until guard_release. */
int guard_hold(char *base, Py_ssize_t len, PyObject *label) {
    uint64_t start = (uint64_t)(uintptr_t)base, end = start + (uint64_t)len;
    int slot = -1, free_slot = -1;
    pthread_mutex_lock(&guard_mu);
    guard_install();
    uint32_t n = load_relaxed32(&n_ranges);   /* R45, only writers under guard_mu store it */
    for (uint32_t i = 0; i < n; i++) {
        struct guard_range *g = &ranges[i];
        uint32_t refs = load_relaxed32(&g->refs);   /* R45, written under guard_mu only */
        if (!refs) { if (free_slot < 0) free_slot = (int)i; continue; }
        if (load_relaxed64(&g->start) <= start && end <= load_relaxed64(&g->end)) {   /* R45, under guard_mu */
            store_relaxed32(&g->refs, refs + 1);   /* R45, a live entry: start and end do not change */
            slot = (int)i;
            if (label && !g->label[0]) guard_label(g, label);
            break;
        }
    }
    if (slot < 0) {
        if (free_slot < 0 && n < GUARD_MAX) free_slot = (int)n;
        if (free_slot >= 0) {
            struct guard_range *g = &ranges[free_slot];
            uint64_t s = load_relaxed64(&g->seq);   /* R45, only writers under guard_mu store it */
            (void)xchg_seq_cst64(&g->seq, s + 1);   /* R45, odd: the handler skips the entry while it changes */
            store_relaxed64(&g->start, start);   /* R45, inside the odd seq */
            store_relaxed64(&g->end, end);   /* R45, inside the odd seq */
            store_relaxed32(&g->state, GUARD_OK);   /* R46, a fresh mapping */
            store_relaxed32(&g->refs, 1);   /* R45, inside the odd seq */
            g->label[0] = 0;
            if (label) guard_label(g, label);
            store_release64(&g->seq, s + 2);   /* R45, pairs with the handler's acquire of seq */
            if ((uint32_t)free_slot == n) store_release32(&n_ranges, n + 1);   /* R45, pairs with the handler's acquire */
            slot = free_slot;
        }
    }
    pthread_mutex_unlock(&guard_mu);
    return slot;
}

/* Drop one reference; the last one frees the entry.  Before the caller
 * releases its buffer export (R45). */
void guard_release(int slot) {
    if (slot < 0 || slot >= GUARD_MAX) return;
    pthread_mutex_lock(&guard_mu);
    struct guard_range *g = &ranges[slot];
    uint32_t refs = load_relaxed32(&g->refs);   /* R45, written under guard_mu only */
    if (refs > 1) store_relaxed32(&g->refs, refs - 1);   /* R45, still held: the handler may act on it */
    else if (refs == 1) {
        uint64_t s = load_relaxed64(&g->seq);   /* R45, only writers under guard_mu store it */
        (void)xchg_seq_cst64(&g->seq, s + 1);   /* R45, odd while it changes */
        store_relaxed32(&g->refs, 0);   /* R45, free: the handler ignores it from now on */
        store_relaxed64(&g->start, 0);   /* R45, inside the odd seq */
        store_relaxed64(&g->end, 0);   /* R45, inside the odd seq */
        store_release64(&g->seq, s + 2);   /* R45, pairs with the handler's acquire of seq */
    }
    pthread_mutex_unlock(&guard_mu);
}

const uint32_t *guard_flag(int slot) {
    return slot >= 0 && slot < GUARD_MAX ? &ranges[slot].state : &guard_unguarded;
}

/* A forked child: the table (and its mappings) are inherited as they are; only
 * the mutex is made anew (another thread of the parent may have held it). */
void guard_after_fork(void) { pthread_mutex_init(&guard_mu, NULL); }

/* ------------------------------------------------------------ noticing */

/* SegmentTruncated for the mapping of `slot`.  A pending exception that is
 * not an Exception (KeyboardInterrupt, SystemExit) is kept. */
PyObject *raise_truncated_slot(int slot) {
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
    const char *label = slot >= 0 && slot < GUARD_MAX && ranges[slot].label[0] ? ranges[slot].label : "a shmring segment";
    PyErr_Format(SegmentTruncated,
                 "%s was truncated while mapped: another process shrank its backing (an ftruncate of the "
                 "/dev/shm segment or the file), and the pages past the new end vanished. In this process "
                 "the whole mapping now reads as zeros (views still held read zeros); what it held is lost. "
                 "Close every handle of it and create it again (find who truncates it: check its mode and "
                 "who may write to it)", label);
    return NULL;
}

PyObject *raise_truncated(Region *r) { return raise_truncated_slot(r->guard_slot); }

/* Touch the mapping's last word: if the backing shrank below it, the fault
 * marks and zero-fills the mapping (R47).  Then the flag.  With the GIL held
 * or not; also re-installs the handler if something was put in front of it. */
int guard_probe(Region *r) {
    if (!r->has_view || r->guard_slot < 0) return 0;
    (void)load_relaxed32(r->base + (((uint64_t)r->view.len - 4) & ~(uint64_t)3));   /* R47, a probe: faults if the page vanished */
    return truncated(r);
}

/* The SIGBUS handler is ours (tests; R49). */
PyObject *guard_installed(PyObject *mod, PyObject *unused) {
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == guard_handler);
}

/* ------------------------------------------------------------ Guard
 * The segment's own hold on the registry, from mapping to close() (Python's
 * segment.Segment): the header checks of attach and the CLI read the mapping
 * before any Region exists.  It re-exports the mapping as a buffer, so views
 * made from it (a producer's reservation views, the record arrays) keep the
 * entry held as long as they live; close() lets go once none is left. */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    int slot;
    int exports;
    int closing;
} Guard;

static void guard_let_go(Guard *g) {
    if (!g->has_view) return;
    guard_release(g->slot);                      /* R45: before the export is released */
    g->slot = -1;
    g->has_view = 0;
    PyBuffer_Release(&g->view);
}

static int Guard_init(Guard *self, PyObject *args, PyObject *kw) {
    PyObject *buf, *label = NULL;
    if (!PyArg_ParseTuple(args, "O|U", &buf, &label)) return -1;
    if (self->has_view) { PyErr_SetString(PyExc_RuntimeError, "already initialized"); return -1; }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return -1;
    self->has_view = 1;
    self->slot = guard_hold((char *)self->view.buf, self->view.len, label);
    return 0;
}

static void Guard_dealloc(Guard *self) {
    guard_let_go(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Guard_getbuffer(Guard *g, Py_buffer *view, int flags) {
    if (!g->has_view || g->closing) { PyErr_SetString(PyExc_BufferError, "the segment is closed"); return -1; }
    if (PyBuffer_FillInfo(view, (PyObject *)g, g->view.buf, g->view.len, 0, flags) < 0) return -1;
    g->exports++;
    return 0;
}

static void Guard_releasebuffer(Guard *g, Py_buffer *view) {
    if (--g->exports == 0 && g->closing) guard_let_go(g);
}

static PyBufferProcs Guard_as_buffer = { (getbufferproc)Guard_getbuffer, (releasebufferproc)Guard_releasebuffer };

/* close(): let go of the mapping now, or when the last view of it is gone. */
static PyObject *Guard_close(Guard *self, PyObject *unused) {
    self->closing = 1;
    if (self->exports == 0) guard_let_go(self);
    Py_RETURN_NONE;
}

static PyObject *Guard_get_truncated(Guard *self, void *c) {
    return PyBool_FromLong(self->has_view && load_relaxed32(guard_flag(self->slot)) != GUARD_OK);   /* R47 */
}

static PyMethodDef Guard_methods[] = {
    {"close", (PyCFunction)Guard_close, METH_NOARGS, "close(): let go of the mapping (once no view of it is left)"},
    {NULL}
};
static PyGetSetDef Guard_getset[] = {
    {"truncated", (getter)Guard_get_truncated, NULL, "the mapping's backing was truncated (its pages read zeros now)", NULL},
    {NULL}
};

PyTypeObject GuardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.Guard",
    .tp_basicsize = sizeof(Guard),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Guard(mapping, label): registers a mapping with the SIGBUS guard for as long as it "
              "lives; its buffer is the mapping's (views of it keep the registration)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Guard_init,
    .tp_dealloc = (destructor)Guard_dealloc,
    .tp_as_buffer = &Guard_as_buffer,
    .tp_methods = Guard_methods,
    .tp_getset = Guard_getset,
};
