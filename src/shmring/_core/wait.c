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

/* ------------------------------------------------ wake-up descriptors (R52..R56)
 *
 * An asyncio waiter (or a handle's fileno()) cannot sleep in futex_wait: it
 * arms a slot of the wake line with its word (a random 64-bit id naming the
 * abstract unix datagram socket "\0shmring.%016x" it listens on), counts
 * itself in the high half of `waiters`, and re-checks its condition:
 *
 *   waiter (R52)                              waker (R53)
 *   CAS(slot, 0, word)          [seq_cst]     store / RMW of the condition     [seq_cst]
 *   fetch_add(waiters, ARMED_ONE) [seq_cst]   w = load(waiters)                [seq_cst]
 *   if condition(): disarm, leave [seq_cst]   if w >> 16: for each slot s != 0:
 *   return to the event loop                      CAS(slot, s, 0) won: waiters -= ARMED_ONE,
 *                                                 sendto("\0shmring.<s>", 1 byte, MSG_DONTWAIT)
 *
 * The same store-buffering pair as the futex path (the one `waiters` load
 * covers both halves, so the waker's hot path is unchanged: one load, one
 * predicted branch).  Firing is one-shot: one CAS decides who clears a slot,
 * and only that one sends, so a registration costs at most one datagram, and
 * the registration of a waiter that died (or listens in another network
 * namespace) costs its first waker one refused sendto, once (R55).
 */
#include <sys/socket.h>
#include <sys/un.h>
#include <stddef.h>
#include <stdio.h>

static int send_sock = -1;                 /* process-local: one unbound datagram socket to send with */
static uint64_t n_fd_signals, n_fd_refused, n_fd_arms;

/* The abstract address a word names (the waiter binds the same, R52). */
static socklen_t wake_address(struct sockaddr_un *a, uint64_t word) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    int n = snprintf(a->sun_path + 1, sizeof a->sun_path - 1, "shmring.%016llx", (unsigned long long)word);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

static int sender(void) {
    int fd = (int)load_acquire32(&send_sock);   /* R56, pairs with the CAS below (process-local) */
    if (fd >= 0) return fd;
    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (!cas_seq_cst32(&send_sock, (uint32_t)-1, (uint32_t)fd)) {   /* R56: one socket per process (threads race here) */
        close(fd);
        fd = (int)load_acquire32(&send_sock);   /* R56, the winner's */
    }
    return fd;
}

/* One datagram to the waiter a word names; every error is ignored (R53, R55:
 * a full queue already makes the socket readable, a refused one has nobody
 * or nobody reachable listening; the waiter's slices cover both). */
static void signal_word(uint64_t word) {
    int fd = sender();
    count_relaxed(&n_fd_signals);   /* R23, process-local */
    if (fd < 0) return;
    struct sockaddr_un a;
    socklen_t len = wake_address(&a, word);
    char b = 1;
    if (sendto(fd, &b, 1, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&a, len) < 0 && errno == ECONNREFUSED)
        count_relaxed(&n_fd_refused);   /* R23, process-local */
}

static inline char *fd_slot(char *wake_line, int k) { return wake_line + SHMR_WAKE_FD_SLOT0 + 8 * k; }

/* Fire every armed slot of the line (R53). */
static void fd_fire(char *wake_line) {
    for (int k = 0; k < SHMR_WAKE_FD_SLOTS; k++) {
        uint64_t w = load_seq_cst64(fd_slot(wake_line, k));   /* R53, pairs with the waiter's arming CAS (R52) */
        if (w && cas_seq_cst64(fd_slot(wake_line, k), w, 0)) {   /* R53: one CAS decides who fires it */
            (void)fetch_add_seq_cst32(wake_line + SHMR_WAKE_WAITERS, (uint32_t)-SHMR_WAKE_ARMED_ONE);   /* R53, the winner's count */
            signal_word(w);
        }
    }
}

/* Disarm our slot k if it still holds our word: 1 if we cleared it, 0 if it
 * fired (a waker cleared it and sent, or is about to send, R54). */
int fd_disarm(char *wake_line, int k, uint64_t word) {
    if (k < 0 || k >= SHMR_WAKE_FD_SLOTS) return 0;
    if (!cas_seq_cst64(fd_slot(wake_line, k), word, 0)) return 0;   /* R54: one CAS decides, as the waker's */
    (void)fetch_add_seq_cst32(wake_line + SHMR_WAKE_WAITERS, (uint32_t)-SHMR_WAKE_ARMED_ONE);   /* R54, the winner's count */
    return 1;
}

/* Is our slot k still armed with our word?  Only we store our word, so a
 * slot that no longer holds it has fired (no ABA, R54). */
int fd_is_armed(char *wake_line, int k, uint64_t word) {
    if (k < 0 || k >= SHMR_WAKE_FD_SLOTS) return 0;
    return load_seq_cst64(fd_slot(wake_line, k)) == word;   /* R54, pairs with the waker's firing CAS */
}

/* Arm a slot with `word`, then re-check the condition (R52).  Returns the
 * slot (armed, the condition was false after arming), FD_READY (the
 * condition holds: not armed) or FD_NO_SLOT (every slot is taken and the
 * condition is false: poll). */
int fd_arm(char *wake_line, uint64_t word, cond_fn cond, void *ctx) {
    if (word == 0) return FD_NO_SLOT;
    if (cond(ctx)) return FD_READY;
    int k = -1;
    for (int i = 0; i < SHMR_WAKE_FD_SLOTS && k < 0; i++)
        if (load_relaxed64(fd_slot(wake_line, i)) == 0 &&   /* R52, a hint: the CAS decides */
            cas_seq_cst64(fd_slot(wake_line, i), 0, word)) k = i;   /* R52, the slot before the count */
    if (k < 0) return cond(ctx) ? FD_READY : FD_NO_SLOT;
    (void)fetch_add_seq_cst32(wake_line + SHMR_WAKE_WAITERS, SHMR_WAKE_ARMED_ONE);   /* R52, pairs with the waker's seq_cst load(waiters) */
    count_relaxed(&n_fd_arms);   /* R23, process-local */
    if (cond(ctx)) {              /* R52: the condition's seq_cst loads, after the count */
        fd_disarm(wake_line, k, word);
        return FD_READY;
    }
    return k;
}

/* fd_drain(fd) -> int: read every queued datagram of a wake-up socket
 * (non-blocking, no exception per call: the event loop's reader runs this
 * on every wake-up, R54). */
PyObject *fd_drain(PyObject *mod, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    char buf[64];
    long n = 0;
    for (;;) {
        ssize_t r = recv((int)fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r >= 0) { n++; continue; }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(n);
}

PyObject *fd_wake_address(PyObject *mod, PyObject *arg) {
    unsigned long long w = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    struct sockaddr_un a;
    socklen_t len = wake_address(&a, w);
    return PyBytes_FromStringAndSize(a.sun_path, (Py_ssize_t)(len - offsetof(struct sockaddr_un, sun_path)));
}

/* ------------------------------------------------------------------ wakers */

static void futex_side(char *wake_line) {
    (void)fetch_add_seq_cst32(wake_line + SHMR_WAKE_SEQ, 1);   /* R4, seen by the sleeper's futex_wait compare */
    futex_wake_all((uint32_t *)(wake_line + SHMR_WAKE_SEQ));
}

/* Wake every sleeper of the line, announced or not (end of stream, recovery),
 * and fire every armed descriptor slot (R53: after a full fence, since the
 * condition store before it may be only a release). */
void wake_always(char *wake_line) {
    futex_side(wake_line);
    fence_seq_cst();   /* R53, pairs with the arming waiter's seq_cst count RMW and condition loads */
    if (load_seq_cst32(wake_line + SHMR_WAKE_WAITERS) >> 16)   /* R53, pairs with the waiter's fetch_add(ARMED_ONE) */
        fd_fire(wake_line);
}

/* Somebody waits: futex sleepers (low half) and / or armed slots (high half). */
static __attribute__((noinline)) void wake_slow(char *wake_line, uint32_t w) {
    if (w & SHMR_WAKE_SLEEPERS) futex_side(wake_line);
    if (w >> 16) fd_fire(wake_line);
}

/* The waker's second half, after its own seq_cst store of the condition word. */
void wake_if_waiters(char *wake_line) {
    uint32_t w = load_seq_cst32(wake_line + SHMR_WAKE_WAITERS);   /* R4 R53, pairs with the sleeper's fetch_add(waiters) in wait_for and the arming fetch_add (R52) */
    if (__builtin_expect(w != 0, 0)) wake_slow(wake_line, w);
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
    return Py_BuildValue("{sKsKsKsKsK}", "sleeps", (unsigned long long)load_relaxed64(&n_sleeps),   /* R23 */
                         "late_wakeups", (unsigned long long)load_relaxed64(&n_late_wakeups),   /* R23 */
                         "fd_arms", (unsigned long long)load_relaxed64(&n_fd_arms),   /* R23 */
                         "fd_signals", (unsigned long long)load_relaxed64(&n_fd_signals),   /* R23 */
                         "fd_refused", (unsigned long long)load_relaxed64(&n_fd_refused));   /* R23 */
}
