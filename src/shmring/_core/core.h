/*
 * core.h: what the rooms of the C core share.
 *
 *   atomics.h  the ordered accesses (the only file spelling the builtins)
 *   wait.c     futex, futex_waitv, the one spin / sleep / slice loop
 *   region.c   a mapped region: geometry read once, Python's word accessors
 *   spsc.c     the single-producer ring: claim, publish, peek
 *   multi.c    multi-party rings: claim, commit, stamp, take, requeue, skip
 *   producer.c ProducerCore: send, reserve, commit, abort
 *   consumer.c ConsumerCore: recv, recv_bytes, release tracking
 *   lease.c    Lease: the one buffer exporter with the escaped-view check,
 *              under Message, Snapshot and record batches
 *   state.c    StateCore: copy-on-write shared state
 *   guard.c    the SIGBUS guard: a truncated backing reads zeros, never kills
 *   dmap.c     the double map: a ring's data area mapped twice, back to back
 *   msgscan.c  what decoding a msgpack meta would cost, told before decoding
 *   module.c   the module, its constants and the Python callbacks
 *
 * The protocol these files obey is docs/design.md, "The protocol as rules":
 * every ordered access cites its rule (R1, R2, ...) and its partner.
 */
#ifndef SHMRING_CORE_H
#define SHMRING_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <fcntl.h>

#include "../_layout.h"
#include "atomics.h"

/* ------------------------------------------------------------ status codes */

/* What a non-blocking step found (the C half of each call returns one). */
enum peek_status {
    PEEK_CORRUPT = -1,    /* exception set */
    PEEK_EMPTY = 0,       /* nothing now */
    PEEK_FOUND = 1,       /* a record (or room) */
    PEEK_END = 2,         /* drained and the producer side has ended */
    PEEK_EVICTED = 3,     /* broadcast: the producer evicted this subscriber */
    PEEK_STALE = 4,       /* mpmc: the take cursor moved on while we looked; look again */
};

/* What a wait ended on (wait_for). */
enum wait_status { WAIT_INTERRUPTED = -1, WAIT_SLICE_OVER = 0, WAIT_READY = 1 };

static inline uint64_t align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }
static inline uint64_t align16(uint64_t n) { return (n + 15u) & ~(uint64_t)15u; }

/* ------------------------------------------------------------- the module */

extern PyObject *SegmentTruncated;
extern PyObject *CorruptSegmentError, *MessageTooLarge, *HandleClosed, *ShmringError, *EscapedViewWarning;
extern PyObject *WrongKind;
extern PyObject *PeerGone, *EndOfStream;
extern unsigned long fork_generation;      /* bumped in every forked child */

void finalize_by_method(PyObject *self);   /* tp_finalize: the class's _finalize(), interrupt-proof (R50) */
int pause_point(PyObject *handle, const char *where);   /* tests only; 0 (or -1: the hook raised) */
extern PyObject *pause_hook;
/* A pause point on a per-message path: one predicted branch on a global. */
static inline int pause_at(PyObject *handle, const char *where) {
    return __builtin_expect(pause_hook != NULL, 0) ? pause_point(handle, where) : 0;
}

/* Python callbacks by method name (module.c lists them with why). */
extern PyObject *str_send_obj, *str_try_send_obj, *str_send_wait, *str_recv_wait, *str_recv_copy,
                *str_lagged, *str_eos_ready, *str_claim_reader;
extern PyObject *decode_func, *copy_func, *state_decode_func;

/* --------------------------------------------------------------- region.c */

typedef struct {
    PyObject_HEAD
    Py_buffer view;         /* an export of the mapping, held for the handle's life */
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
    int dmapped;            /* the data area is mapped twice, back to back (R60) */
    uint64_t key;           /* multi-party: stamp key */
    char *ptab, *ctab;      /* multi-party: producer and consumer tables */
    uint32_t maxp, maxc, policy;
    int slot;               /* this handle's table entry (-1: none) */
    int guard_slot;         /* our entry in the SIGBUS guard's table (guard.c), -1: unguarded */
    const uint32_t *trunc;  /* that entry's flag: non-zero once the backing was truncated (R47) */
} Region;

extern PyTypeObject RegionType;
int region_map(Region *self, PyObject *args);
int Region_init(Region *self, PyObject *args, PyObject *kw);
void Region_dealloc(Region *self);
PyObject *Region_get_closed(Region *self, void *c);
int check_unusable(Region *r);
int raise_closed(Region *r);
int check_owner(Region *r);
/* A handle made before a fork() is the parent's (the one ownership test of the
 * C core): in the child it may only be dropped, never change shared state. */
static inline int inherited(Region *r) { return r->fork_gen != fork_generation; }
int check_positions(Region *r, uint64_t rp, uint64_t wp);
int read_positions(Region *r, uint64_t *rp, uint64_t *wp);
int check_timeout(PyObject *timeout);
/* Which thread is inside a call of a handle: its thread state (one load, unlike
 * PyThread_get_thread_ident's pthread_self call; unique among live threads). */
static inline unsigned long this_thread(void) { return (unsigned long)(uintptr_t)PyThreadState_Get(); }
int use_busy(unsigned long user, const char *what, const char *also);
/* A call takes its handle: another thread inside a call of it is an error. */
static inline int use_begin(unsigned long *user, unsigned long *prev, const char *what, const char *also) {
    unsigned long me = this_thread();
    *prev = *user;
    if (__builtin_expect(*prev && *prev != me, 0)) return use_busy(*prev, what, also);
    *user = me;
    return 0;
}
int corrupt(const char *what, uint64_t pos, uint64_t a, uint64_t b);
static inline int is_multi(Region *r) { return r->kind != SHMR_KIND_SPSC; }
static inline uint64_t payload_offset(Region *r, uint64_t start) {
    return r->data_off + (start & r->mask) + r->hdr;   /* relative to the region base */
}

/* ----------------------------------------------------------------- dmap.c */

PyObject *double_map(PyObject *mod, PyObject *const *args, Py_ssize_t n);

/* ---------------------------------------------------------------- guard.c */

extern PyTypeObject GuardType;
int guard_hold(char *base, Py_ssize_t len, PyObject *label);
void guard_release(int slot);
const uint32_t *guard_flag(int slot);
void guard_after_fork(void);
int guard_probe(Region *r);
PyObject *raise_truncated(Region *r);
PyObject *guard_installed(PyObject *mod, PyObject *unused);
/* Was this region's backing truncated under it?  One relaxed load: the flag
 * is written by the SIGBUS handler of this process, maybe in another thread,
 * and only ever set (R47). */
static inline int truncated(Region *r) {
    return __builtin_expect(r->trunc != NULL && load_relaxed32(r->trunc) != 0, 0);   /* R47, pairs with the handler's store_release */
}
/* Open, mapped, not truncated, not inherited through fork: 0, else the error
 * (check_unusable says which).  Inline: every call of a handle starts here. */
static inline int check_usable(Region *r) {
    if (__builtin_expect(!r->closed && r->has_view && !truncated(r) && !inherited(r), 1)) return 0;
    return check_unusable(r);
}
/* The end of a C call that touched the segment: if a page of it vanished
 * meanwhile (here or in another thread), its result is not to be trusted:
 * SegmentTruncated instead (R47; an interrupt's exception is kept). */
static inline PyObject *guard_exit(Region *r, PyObject *res) {
    if (__builtin_expect(!truncated(r), 1)) return res;
    Py_XDECREF(res);
    return raise_truncated(r);
}

/* ----------------------------------------------------------------- wait.c */

typedef int (*cond_fn)(void *ctx);
void futex_wake_all(uint32_t *addr);
void publish_and_wake(void *pos, uint64_t value, char *wake_line);
void wake_always(char *wake_line);
void wake_if_waiters(char *wake_line);
int wait_for(char *wake_line, cond_fn cond, void *ctx, uint64_t slice_ns, uint64_t spin_ns, char *mine);
PyObject *wait_slice(Region *r, char *wake_line, cond_fn cond, void *ctx, PyObject *slice, PyObject *spin, char *mine);
uint64_t seconds_to_ns(double s);
PyObject *wait_any(PyObject *mod, PyObject *const *args, Py_ssize_t n);
PyObject *wait_counters(PyObject *mod, PyObject *unused);
/* wake-up descriptors (R52..R56): fd_arm returns the slot armed, or one of these */
enum { FD_READY = -1, FD_NO_SLOT = -2 };
int fd_arm(char *wake_line, uint64_t word, cond_fn cond, void *ctx);
int fd_disarm(char *wake_line, int k, uint64_t word);
int fd_is_armed(char *wake_line, int k, uint64_t word);
PyObject *fd_wake_address(PyObject *mod, PyObject *arg);
PyObject *fd_drain(PyObject *mod, PyObject *arg);

/* ------------------------------------------------------------- producer.c */

typedef struct {
    Region r;
    uint64_t write_pos;     /* spsc: ours, mirrors the shared write_pos after each commit */
    uint64_t cached_read;   /* last release position (gate) we loaded */
    int reserved;           /* a reservation is open */
    uint64_t res_start;     /* position of its record header */
    uint64_t res_len;       /* payload bytes reserved */
    uint64_t res_prev;      /* spsc: write_pos before it, for abort */
    unsigned res_type;
    char *entry;            /* multi-party: our producer table line */
    unsigned long user;     /* the thread inside a call of this handle, 0: none (one thread at a time) */
    uint64_t res_seq;       /* reservations opened so far: names the open one, so a stale abort misses */
    uint64_t commits;       /* messages this handle published: a caller interrupted mid-send asks it */
    uint64_t count_items, count_unfinished;   /* a queue's counts (header offsets, 0: none), R70 R72 */
} Producer;

extern PyTypeObject ProducerType;
PyObject *Producer_try_send(Producer *self, PyObject *data);

/* ------------------------------------------------------------- consumer.c */

/* Records handed out and not yet released, in position order.  Space is
 * given back (read_pos advanced) only over a prefix of released records. */
typedef struct { uint64_t start, end; Py_ssize_t off, len; int done, type; } Entry;
enum entry_state { ENTRY_HELD = 0, ENTRY_DONE = 1, ENTRY_RETURNED = 2 };   /* Entry.done */

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
    uint64_t requeued_seen; /* mpmc: the requeued counter when a whole walk of ours last found nothing */
    unsigned long user;     /* the thread inside a call of this handle, 0: none (one thread at a time) */
    uint64_t own_word;      /* broadcast / mpmc: our table entry's owner word, for leaving it (R35) */
    int lock_fd;            /* the file description holding our entry's lock (shmring.liveness), -1: none */
    size_t nreturned;       /* spsc / mpsc / broadcast: entries given back unread, handed out again first (R39) */
    unsigned unread_drops;  /* messages dropped unread and given back since one was released after use (R39) */
} Consumer;

/* A record found by a peek. */
typedef struct { uint64_t start, end; Py_ssize_t off, len; int type; int again; } Rec;   /* again: a returned record handed out again */

extern PyTypeObject ConsumerType;
PyObject *Consumer_take_item(Consumer *self, PyObject *unused);
extern PyTypeObject QueueCoreType;
int consumer_skip(Consumer *c, uint64_t start, uint64_t end);
int consumer_finish(Consumer *c, uint64_t start, uint64_t end);
int consumer_return(Consumer *c, uint64_t start, uint64_t end);
void consumer_store_read(Consumer *c, uint64_t rp);
int consumer_ready(Consumer *c);

/* ----------------------------------------------------------------- spsc.c */

int spsc_claim(Producer *p, uint64_t payload_len, uint64_t *rec_start);
void spsc_publish(Producer *p, uint64_t start, uint64_t len, unsigned type);
int spsc_peek(Consumer *c, Rec *out);

/* ---------------------------------------------------------------- multi.c */

int mp_claim(Producer *p, uint64_t payload_len, uint64_t *rec_start);
void mp_commit(Producer *p, uint64_t start, uint64_t claimed_len, uint64_t len, unsigned type);
uint64_t mp_gate(Region *r, uint64_t wp);
int mp_ended(Region *r);
int mp_ended_ex(Region *r, int seal);
int mp_peek_seq(Consumer *c, Rec *out);
int mpmc_peek(Consumer *c, Rec *out);
void mpmc_release(Consumer *c, uint64_t start);
int mpmc_give_back(Consumer *c, uint64_t start);
int mp_ready(Consumer *c);
int bc_hold(Consumer *c);
void bc_unhold_if_idle(Consumer *c);
static inline char *mp_rec(Region *r, uint64_t pos) { return r->data + (pos & r->mask); }
static inline int mp_committed(Region *r, uint64_t pos) {
    return load_acquire64(mp_rec(r, pos)) == (r->key ^ pos);   /* R7, pairs with the stamp exchange in mp_stamp */
}
/* recovery calls of the Python slow path (ConsumerCore methods) */
PyObject *Consumer_stuck(Consumer *self, PyObject *unused);
PyObject *Consumer_skip_abandoned(Consumer *self, PyObject *const *args, Py_ssize_t n);
PyObject *Consumer_inflight(Consumer *self, PyObject *unused);
PyObject *Consumer_requeue(Consumer *self, PyObject *const *args, Py_ssize_t n);

/* ---------------------------------------------------------------- lease.c */

/* A zero-copy window on shared memory, exported as a buffer: the one
 * escaped-view mechanism.  It counts its live exports; release() with an
 * export still alive means a view escaped: finishing (giving the space or
 * pin back) is deferred until the last export goes, with a warning. */
typedef struct Lease Lease;
typedef struct {
    const char *what;                           /* "message", "snapshot", ... for errors */
    void (*finish)(Lease *l);                   /* give the space back (called once, owner still set);
                                                 * l->give_back: dropped unread, hand it out again (R39) */
    int (*warn)(Lease *l);                      /* EscapedViewWarning; -1 if it raised */
} LeaseOps;

enum lease_state { LEASE_LIVE = 0, LEASE_DEFERRED = 1, LEASE_RELEASED = 2 };
/* Lease.give_back (R39): why an unread message is given back instead of released */
enum { GIVE_NO = 0, GIVE_DROPPED = 1, GIVE_INTERRUPTED = 2 };
/* Drops of unread messages given back in a row before a drop releases again: a loop
 * that drops every message unread (`for msg in cons: pass`) must still make progress. */
#define UNREAD_DROPS_MAX 64

struct Lease {
    PyObject_HEAD
    const LeaseOps *ops;
    PyObject *owner;        /* strong reference while not released: keeps the mapping alive */
    char *ptr;              /* the window */
    Py_ssize_t len;
    int readonly;
    int exports;            /* live buffer exports */
    int state;              /* enum lease_state */
    PyObject *on_finish;    /* plain leases made in Python: called to give the window back */
    PyObject *warning;      /* plain leases: the EscapedViewWarning text */
    unsigned long fork_gen; /* fork_generation when made: a lease inherited through fork is the parent's */
    int touched;            /* the payload was handed to user code (value, copy, tobytes, a buffer export) */
    int give_back;          /* set just before finishing: GIVE_DROPPED / GIVE_INTERRUPTED: redeliver, not release */
};

extern PyTypeObject LeaseType, MessageType;

typedef struct {
    Lease l;                /* owner: the Consumer */
    uint64_t start, end;
    Py_ssize_t off;         /* payload, relative to the region base */
    int type;
    PyObject *weakrefs;     /* iteration keeps a weak reference to the message it handed out last (R67) */
} Message;

void lease_init(Lease *l, const LeaseOps *ops, PyObject *owner, char *ptr, Py_ssize_t len, int readonly);
void lease_finish(Lease *l);
void lease_forget(Lease *l);
int lease_add_context_methods(void);   /* __enter__ / __exit__ without a bound method per with block */
PyObject *Lease_release(Lease *l, PyObject *unused);
void Lease_dealloc(Lease *l);
int Lease_traverse(Lease *l, visitproc visit, void *arg);
int Lease_clear(Lease *l);
PyObject *Lease_get_nbytes(Lease *l, void *c);
PyObject *make_message(Consumer *c, Rec *r);
PyObject *lease_guard_exit(Lease *l, PyObject *res);

/* msgscan.c */
PyObject *msgpack_cost(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
extern const unsigned long long msgscan_max_cost_per_byte;

/* ---------------------------------------------------------------- state.c */

extern PyTypeObject StateCoreType, SnapshotType;

#endif
