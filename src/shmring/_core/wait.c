/*
 * wait.c: futex sleeps and wake-ups, and the one spin / yield / sleep loop
 * behind every blocking call (rule R4 of docs/design.md).
 *
 *   sleeper                                   waker
 *   s = load_acquire(seq)                     xchg / CAS of the condition word  [seq_cst]
 *   fetch_add(waiters, 1)      [seq_cst]
 *   if condition(): leave      [seq_cst load] if load(waiters) > 0:            [seq_cst]
 *   futex_wait(seq, s)                            fetch_add(seq, 1); futex_wake(seq)
 *   fetch_sub(waiters, 1)
 *
 * The waiters increment and the condition load on one side, the condition
 * store and the waiters load on the other, are the store-buffering pattern:
 * with seq_cst on both sides at least one of them sees the other's store.
 * Either the sleeper sees the new condition and does not sleep, or the waker
 * sees waiters > 0 and bumps seq; the bump lands either before futex_wait
 * compares seq with s (it returns EAGAIN at once) or after it has queued the
 * sleeper (the wake reaches it).  The waker pays one locked exchange and one
 * load per message; the syscall happens only while somebody has announced a
 * sleep.
 */
#include "core.h"

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Seconds as nanoseconds, clamped: converting inf, nan or a huge double to
 * an integer is undefined behaviour, and now + ns must not overflow. */
uint64_t seconds_to_ns(double s) {
    if (!(s > 0)) return 0;                       /* also nan */
    if (s >= 4.0e9) return 4000000000ull * 1000000000ull;   /* ~127 years */
    return (uint64_t)(s * 1e9);
}

/* Shared (not private) futex: the word lives in a MAP_SHARED mapping that
 * other processes map at other addresses. */
static int futex_wait(uint32_t *addr, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
    ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
    long r = syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    return r == 0 ? 0 : errno;
}

void futex_wake_all(uint32_t *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Wake every sleeper of the line, announced or not (end of stream, recovery). */
void wake_always(char *wake_line) {
    (void)fetch_add_seq_cst32(wake_line + SHMR_WAKE_SEQ, 1);   /* R4, seen by the sleeper's futex_wait compare */
    futex_wake_all((uint32_t *)(wake_line + SHMR_WAKE_SEQ));
}

/* The waker's second half, after its own seq_cst store of the condition word. */
void wake_if_waiters(char *wake_line) {
    if (load_seq_cst32(wake_line + SHMR_WAKE_WAITERS))   /* R4, pairs with the sleeper's fetch_add(waiters) in wait_for */
        wake_always(wake_line);
}

/* Publish a position and wake its sleepers: the waker's whole side. */
void publish_and_wake(void *pos, uint64_t value, char *wake_line) {
    (void)xchg_seq_cst64(pos, value);   /* R4, pairs with the condition's seq_cst load in the sleeper's wait_for */
    wake_if_waiters(wake_line);
}

/* Announce a sleep on a wake word (R4), and, for a table entry's holder, in
 * the entry's own share of it (R29: never more than its true share, so a
 * recovery that subtracts a dead entry's share never takes a live one's). */
static inline void announce(char *waiters, char *mine) {
    (void)fetch_add_seq_cst32(waiters, 1);   /* R4, pairs with the waker's seq_cst load(waiters) in wake_if_waiters */
    if (mine) (void)fetch_add_seq_cst32(mine, 1);   /* R29, after the shared count */
}
static inline void withdraw(char *waiters, char *mine) {
    if (mine) (void)fetch_add_seq_cst32(mine, (uint32_t)-1);   /* R29, before the shared count */
    (void)fetch_add_seq_cst32(waiters, (uint32_t)-1);   /* R4, leaves the announcement */
}

/* Process-local wait counters (tests use them to prove no wake-up is lost:
 * a sleep that ends by timeout with the condition true and no wake-up issued
 * for it, see late_wakeup, is a missed wake-up). */
static uint64_t n_sleeps, n_late_wakeups;

/* The sleep timed out and the condition holds, while we are still counted
 * in waiters: whoever made it true did so after our announcement (we had
 * checked it false since), so it saw us (R4) and bumps seq, perhaps an instant
 * after our timeout.  A wake-up was lost only if seq does not move: wait up to
 * 10 ms for it (this path is rare: a whole slice slept without a wake). */
static int late_wakeup(uint32_t *seq, uint32_t s) {
    uint64_t until = now_ns() + 10000000ull;
    while (load_acquire32(seq) == s) {   /* R4, pairs with the waker's fetch_add(seq) */
        if (now_ns() >= until) return 1;
        sched_yield();
    }
    return 0;
}

/* Wait until cond(ctx) holds or slice_ns elapses: spin for spin_ns, then
 * yield, then sleep on the futex.  Called with the GIL released.
 * cond() makes the seq_cst loads of R4. */
int wait_for(char *wake_line, cond_fn cond, void *ctx, uint64_t slice_ns, uint64_t spin_ns, char *mine) {
    uint64_t start = now_ns();
    uint64_t deadline = start + slice_ns;
    uint64_t spin_end = start + (spin_ns < slice_ns ? spin_ns : slice_ns);
    if (cond(ctx)) return WAIT_READY;
    /* Spin, giving the CPU away every ~2 us: on a machine with fewer cores
     * than busy processes, the peer we wait for may need this very CPU
     * (sched_yield returns at once when nobody else is runnable here). */
    if (spin_ns) {
        for (;;) {
            for (int i = 0; i < 64; i++) {
                if (cond(ctx)) return WAIT_READY;
                cpu_relax();
            }
            if (now_ns() >= spin_end) break;
            sched_yield();
        }
    }
    uint32_t *seq = (uint32_t *)(wake_line + SHMR_WAKE_SEQ);
    char *waiters = wake_line + SHMR_WAKE_WAITERS;
    for (;;) {
        uint32_t s = load_acquire32(seq);         /* R4, pairs with the waker's fetch_add(seq) in wake_always */
        announce(waiters, mine);
        if (cond(ctx)) { withdraw(waiters, mine); return WAIT_READY; }
        uint64_t t = now_ns();
        if (t >= deadline) {
            withdraw(waiters, mine);
            return cond(ctx) ? WAIT_READY : WAIT_SLICE_OVER;
        }
        int err = futex_wait(seq, s, deadline - t);
        count_relaxed(&n_sleeps);                                /* R23, process-local */
        if (cond(ctx)) {
            if (err == ETIMEDOUT && late_wakeup(seq, s)) count_relaxed(&n_late_wakeups);   /* R23, process-local */
            withdraw(waiters, mine);
            return WAIT_READY;
        }
        withdraw(waiters, mine);
        if (err == EINTR) return WAIT_INTERRUPTED;
        if (now_ns() >= deadline) return WAIT_SLICE_OVER;
    }
}

/* The one wrapper of every blocking C call: one slice of wait_for with the
 * GIL released, then the signal check (Ctrl-C raises here).  The Python
 * side (shmring.waiting) loops over slices, checking its deadline and the
 * peers between them.  Returns True (condition holds) or False. */
PyObject *wait_slice(Region *reg, char *wake_line, cond_fn cond, void *ctx, PyObject *slice_obj, PyObject *spin_obj, char *mine) {
    double slice = PyFloat_AsDouble(slice_obj); if (PyErr_Occurred()) return NULL;
    double spin = PyFloat_AsDouble(spin_obj); if (PyErr_Occurred()) return NULL;
    uint64_t slice_ns = seconds_to_ns(slice), spin_ns = seconds_to_ns(spin);
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = wait_for(wake_line, cond, ctx, slice_ns, spin_ns, mine);
    /* R48: a slice that ended without its condition may have slept on a word
     * that vanished (nobody can wake it there): touch the mapping's last page,
     * which faults (and marks it) if the backing shrank */
    if (r != WAIT_READY) (void)guard_probe(reg);
    Py_END_ALLOW_THREADS
    if (PyErr_CheckSignals() < 0) return NULL;
    if (truncated(reg)) return raise_truncated(reg);
    return PyBool_FromLong(r == WAIT_READY);
}

/* ---------------------------------------------------------- waiting on many */

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
struct shmr_futex_waitv { uint64_t val; uint64_t uaddr; uint32_t flags; uint32_t reserved; };
#define SHMR_FUTEX_32 2u
#define SHMR_WAIT_MAX 128

static inline char *entry_waiting(Consumer *c) { return c->entry ? c->entry + SHMR_CE_WAITING : NULL; }

static void leave_all(Consumer **cs, Py_ssize_t k) {
    for (Py_ssize_t i = 0; i < k; i++)
        withdraw(cs[i]->r.base + SHMR_OFF_DATA_WAKE + SHMR_WAKE_WAITERS, entry_waiting(cs[i]));
}

/* wait_any(consumers, slice_s) -> bool: sleep (GIL released) until one of the
 * consumers has something to read (data, end of stream, eviction), for at
 * most one slice.  The wake-up protocol of wait_for, on every wake word at
 * once, through futex_waitv (Linux >= 5.16); without it, 1 ms naps. */
PyObject *wait_any(PyObject *mod, PyObject *const *args, Py_ssize_t n) {
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
    uint64_t slice_ns = seconds_to_ns(slice);
    Py_BEGIN_ALLOW_THREADS
    uint64_t deadline = now_ns() + slice_ns;
    struct shmr_futex_waitv wv[SHMR_WAIT_MAX];
    for (;;) {
        for (Py_ssize_t i = 0; i < k && !ready; i++) ready = consumer_ready(cs[i]);
        if (ready) break;
        uint64_t t = now_ns();
        if (t >= deadline) break;
        for (Py_ssize_t i = 0; i < k; i++) {
            char *line = cs[i]->r.base + SHMR_OFF_DATA_WAKE;
            wv[i].val = load_acquire32(line + SHMR_WAKE_SEQ);   /* R4, pairs with the waker's fetch_add(seq) in wake_always */
            wv[i].uaddr = (uint64_t)(uintptr_t)(line + SHMR_WAKE_SEQ);
            wv[i].flags = SHMR_FUTEX_32;          /* shared: no FUTEX_PRIVATE_FLAG */
            wv[i].reserved = 0;
            announce(line + SHMR_WAKE_WAITERS, entry_waiting(cs[i]));
        }
        for (Py_ssize_t i = 0; i < k && !ready; i++) ready = consumer_ready(cs[i]);
        int err = 0;
        if (!ready) {
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
            count_relaxed(&n_sleeps);   /* R23, process-local */
        }
        leave_all(cs, k);
        if (err == EINTR) break;
    }
    /* R48: a quiet slice probes every mapping; a truncated one is "ready" (its call raises) */
    for (Py_ssize_t i = 0; i < k && !ready; i++) ready = guard_probe(&cs[i]->r);
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < k; i++) Py_DECREF(cs[i]);
    if (PyErr_CheckSignals() < 0) return NULL;
    return PyBool_FromLong(ready);
}

PyObject *wait_counters(PyObject *mod, PyObject *unused) {
    return Py_BuildValue("{sKsK}", "sleeps", (unsigned long long)load_relaxed64(&n_sleeps),   /* R23 */
                         "late_wakeups", (unsigned long long)load_relaxed64(&n_late_wakeups));   /* R23 */
}
