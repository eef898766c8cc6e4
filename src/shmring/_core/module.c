/*
 * module.c: the shmring._core module: its types, the layout constants, the
 * codec hooks and the Python callbacks.
 */
#include "core.h"

#include <pthread.h>

PyObject *CorruptSegmentError, *MessageTooLarge, *HandleClosed, *ShmringError, *EscapedViewWarning;
PyObject *WrongKind;
PyObject *PeerGone, *EndOfStream;
unsigned long fork_generation;
PyObject *decode_func, *copy_func, *state_decode_func;

static void at_fork_child(void) { fork_generation++; guard_after_fork(); }

/* Test-only pause points of the C slow paths (attach, wait_newer's check):
 * tests set a callable with _core._set_pause_hook(fn); pause_point calls
 * fn(handle, where) there, so a test can run another party's steps between
 * two protocol steps.  NULL in production; never on a per-message path.
 * Python's own pause points are shmring.pausepoints. */
PyObject *pause_hook;

int pause_point(PyObject *handle, const char *where) {
    if (!pause_hook) return 0;
    PyObject *r = PyObject_CallFunction(pause_hook, "Os", handle, where);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *set_pause_hook(PyObject *mod, PyObject *fn) {
    if (fn != Py_None && !PyCallable_Check(fn)) { PyErr_SetString(PyExc_TypeError, "a callable or None"); return NULL; }
    PyObject *old = pause_hook;
    if (fn != Py_None) Py_INCREF(fn);
    pause_hook = fn == Py_None ? NULL : fn;
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/*
 * The C core calls back into Python by method name in these places, and
 * only here.  Each is a slow path that needs what lives in Python (codecs,
 * roles and liveness, typed errors with context); the hot paths never call
 * back.  The Python classes that define them say so at the definition.
 */
PyObject *str_send_obj, *str_try_send_obj, *str_send_wait, *str_recv_wait, *str_recv_copy,
         *str_lagged, *str_eos_ready, *str_claim_reader;
static const struct { PyObject **name; const char *method; } callbacks[] = {
    /* Producer.send / try_send of anything but bytes: encode with shmring.codec */
    {&str_send_obj, "_send_obj"}, {&str_try_send_obj, "_try_send_obj"},
    /* Producer.send on a full ring: the deadline / slice loop (shmring.waiting), peer liveness */
    {&str_send_wait, "_send_wait"},
    /* Consumer.recv / recv_bytes on an empty ring: the same loop, abandoned claims, dead peers */
    {&str_recv_wait, "_recv_wait"},
    /* Consumer.recv(copy=True): decode and copy with shmring.codec */
    {&str_recv_copy, "_recv_copy"},
    /* broadcast: this subscriber was evicted: raise Lagged with what it missed (parties.py) */
    {&str_lagged, "_lagged"},
    /* mpmc: drained and every producer done: requeue what dead consumers held (parties.py) */
    {&str_eos_ready, "_eos_ready"},
    /* SharedState.read with every entry of this handle busy: claim a reader entry (roles.py) */
    {&str_claim_reader, "_claim_reader"},
};

static int load_errors(void) {
    PyObject *m = PyImport_ImportModule("shmring.errors");
    if (!m) return -1;
    CorruptSegmentError = PyObject_GetAttrString(m, "CorruptSegmentError");
    MessageTooLarge = PyObject_GetAttrString(m, "MessageTooLarge");
    HandleClosed = PyObject_GetAttrString(m, "HandleClosed");
    WrongKind = PyObject_GetAttrString(m, "WrongKind");
    ShmringError = PyObject_GetAttrString(m, "ShmringError");
    EscapedViewWarning = PyObject_GetAttrString(m, "EscapedViewWarning");
    SegmentTruncated = PyObject_GetAttrString(m, "SegmentTruncated");
    PeerGone = PyObject_GetAttrString(m, "PeerGone");
    EndOfStream = PyObject_GetAttrString(m, "EndOfStream");
    Py_DECREF(m);
    return (CorruptSegmentError && MessageTooLarge && HandleClosed && WrongKind && ShmringError && EscapedViewWarning &&
            SegmentTruncated && PeerGone && EndOfStream) ? 0 : -1;
}

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

/* header_ready(buffer) -> int: the ready word, loaded with acquire before the
 * caller reads any other header field (R1, for Python's header reader). */
static PyObject *header_ready(PyObject *mod, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    if (b.len < (Py_ssize_t)SHMR_HEADER_SIZE || (uintptr_t)b.buf % 8) {
        PyBuffer_Release(&b);
        PyErr_SetString(CorruptSegmentError, "region is unaligned or smaller than the header page");
        return NULL;
    }
    uint32_t ready = load_acquire32((char *)b.buf + SHMR_OFF_READY);   /* R1, pairs with the creator's store_u32(ready) */
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(ready);
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
    PUT(SHMR_ROLE_OWNER); PUT(SHMR_ROLE_CLOSED); PUT(SHMR_ROLE_SESSIONS); PUT(SHMR_ROLE_RECEIVED);
    PUT(SHMR_CLOSED_EOS); PUT(SHMR_CLOSED_ABORTED);
    PUT(SHMR_WAKE_SEQ); PUT(SHMR_WAKE_WAITERS);
    PUT(SHMR_WAKE_SLEEPERS); PUT(SHMR_WAKE_ARMED_ONE); PUT(SHMR_WAKE_FD_SLOT0); PUT(SHMR_WAKE_FD_SLOTS);
    PUT(SHMR_REC_HDR); PUT(SHMR_REC_ALIGN); PUT(SHMR_T_PAD); PUT(SHMR_T_BYTES); PUT(SHMR_T_ARRAY);
    PUT(SHMR_T_OBJECT); PUT(SHMR_KIND_SPSC); PUT(SHMR_MIN_CAPACITY); PUT(SHMR_MAX_CAPACITY);
    PUT(SHMR_MAX_MESSAGE); PUT(SHMR_KIND_RECORDS);
    PUT(SHMR_KIND_MPSC); PUT(SHMR_KIND_BROADCAST); PUT(SHMR_KIND_MPMC); PUT(SHMR_MREC_HDR); PUT(SHMR_T_SKIP);
    PUT(SHMR_MP_OFF_KEY); PUT(SHMR_MP_OFF_MAX_PRODUCERS); PUT(SHMR_MP_OFF_MAX_CONSUMERS); PUT(SHMR_MP_OFF_POLICY);
    PUT(SHMR_MP_OFF_EXPECTED); PUT(SHMR_MP_OFF_PROD_TABLE); PUT(SHMR_MP_OFF_CONS_TABLE); PUT(SHMR_MP_OFF_NEWEST);
    PUT(SHMR_MP_OFF_TAKE); PUT(SHMR_MP_OFF_COUNTERS); PUT(SHMR_MP_ENDED); PUT(SHMR_MP_ABORTED);
    PUT(SHMR_MP_SESSIONS); PUT(SHMR_MP_DEAD); PUT(SHMR_MP_STATE); PUT(SHMR_MP_STATE_ENDED); PUT(SHMR_PE_SESSION); PUT(SHMR_PE_JOINED); PUT(SHMR_LOCK_BASE); PUT(SHMR_MP_ABANDONED); PUT(SHMR_MP_REQUEUED);
    PUT(SHMR_MP_REDELIVERED); PUT(SHMR_PE_INTENT); PUT(SHMR_PE_SENT); PUT(SHMR_PE_BYTES); PUT(SHMR_CE_POS);
    PUT(SHMR_CE_RECEIVED); PUT(SHMR_MP_ENTRY); PUT(SHMR_MP_MAX_PARTIES);
    PUT(SHMR_INTENT_BIT); PUT(SHMR_POS_FREE); PUT(SHMR_POS_EVICTED); PUT(SHMR_POS_HOLD);
    PUT(SHMR_RS_FREE); PUT(SHMR_RS_REQUEUED); PUT(SHMR_RS_RELEASED); PUT(SHMR_PE_WAITING); PUT(SHMR_CE_WAITING);
    PUT(SHMR_KIND_STATE); PUT(SHMR_ST_OFF_SLOTS); PUT(SHMR_ST_OFF_MAX_READERS); PUT(SHMR_ST_OFF_SLOT_SIZE);
    PUT(SHMR_ST_OFF_TABLE); PUT(SHMR_ST_OFF_FIRST_SLOT); PUT(SHMR_ST_OFF_CURRENT); PUT(SHMR_ST_OFF_WRITER);
    PUT(SHMR_ST_OFF_VERSION_WAKE); PUT(SHMR_ST_OFF_SLOT_WAKE); PUT(SHMR_ST_OFF_COUNTERS);
    PUT(SHMR_ST_RECLAIMED); PUT(SHMR_ST_WRITER_WAITS); PUT(SHMR_ST_ENTRY); PUT(SHMR_ST_ENTRY_OWNER);
    PUT(SHMR_ST_ENTRY_PIN); PUT(SHMR_ST_ENTRY_WAITING); PUT(SHMR_ST_SLOT_HDR); PUT(SHMR_ST_SLOT_VERSION); PUT(SHMR_ST_SLOT_TYPE);
    PUT(SHMR_ST_SLOT_LENGTH); PUT(SHMR_ST_MIN_SLOTS); PUT(SHMR_ST_MAX_SLOTS); PUT(SHMR_ST_MAX_READERS);
#undef PUT
    return d;
}

/* finish(fn, *args) / finish_quietly(fn, *args): R50, an interrupted
 * clean-up is finished.  Calls fn(*args) again each time a KeyboardInterrupt
 * comes out of it (fn's steps are each re-doable), until it returns; then
 * raises one KeyboardInterrupt (finish) or delivers it again as a new SIGINT
 * (finish_quietly, for a finalizer, where Python would print and swallow it),
 * after the finalizer has returned.
 * The loop is C: no signal handler runs between two tries, so an interrupt
 * can land only inside fn (redone) or before or after this call, when the
 * clean-up has not started or is complete.  Other exceptions propagate. */
/* The interrupt a finalizer swallowed, delivered again once it has returned:
 * a pending call runs at the next check of the eval loop (still in the
 * finalizer's frame), after that check's signals, so the SIGINT it raises is
 * handled at the check after: in the code the finalizer interrupted. */
static int redeliver_interrupt(void *unused) { PyErr_SetInterrupt(); return 0; }

static PyObject *finish_impl(PyObject *const *args, Py_ssize_t n, int quietly) {
    if (n < 1) { PyErr_SetString(PyExc_TypeError, "finish(fn, *args)"); return NULL; }
    int interrupted = 0;
    for (int tries = 0;; tries++) {
        PyObject *r = PyObject_Vectorcall(args[0], args + 1, (size_t)(n - 1), NULL);
        if (r) { Py_DECREF(r); break; }
        if (!PyErr_ExceptionMatches(PyExc_KeyboardInterrupt) || tries >= 10000) return NULL;
        PyErr_Clear();
        interrupted = 1;
    }
    if (!interrupted) Py_RETURN_NONE;
    if (quietly) {
        if (Py_AddPendingCall(redeliver_interrupt, NULL) < 0) PyErr_SetInterrupt();
        Py_RETURN_NONE;
    }
    PyErr_SetNone(PyExc_KeyboardInterrupt);
    return NULL;
}
/* tp_finalize of ProducerCore and ConsumerCore: the Python class's
 * _finalize() (a handle dropped without close()), as finish_quietly runs it.
 * A Python __del__ would itself be interruptible at its first line, before
 * it could start; this is C up to the method's own steps (R50). */
static PyObject *str_finalize;
void finalize_by_method(PyObject *self) {
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
    PyObject *meth = PyObject_GetAttr(self, str_finalize);
    if (!meth) PyErr_Clear();           /* the bare C type: nothing to finalize */
    int interrupted = 0;
    for (int tries = 0; meth && tries < 10000; tries++) {
        PyObject *r = PyObject_CallNoArgs(meth);
        if (r) { Py_DECREF(r); break; }
        if (!PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) { PyErr_WriteUnraisable(self); break; }
        PyErr_Clear();
        interrupted = 1;
    }
    Py_XDECREF(meth);
    if (interrupted && Py_AddPendingCall(redeliver_interrupt, NULL) < 0) PyErr_SetInterrupt();
    PyErr_Restore(et, ev, etb);
}

static PyObject *finish(PyObject *mod, PyObject *const *args, Py_ssize_t n) { return finish_impl(args, n, 0); }
static PyObject *finish_quietly(PyObject *mod, PyObject *const *args, Py_ssize_t n) { return finish_impl(args, n, 1); }

/* fork_generation() -> int: how many forks this process is from the one that imported the core
 * (0 there); a handle that remembers another value was made before a fork (the parent's). */
static PyObject *get_fork_generation(PyObject *mod, PyObject *unused) { return PyLong_FromUnsignedLong(fork_generation); }

static PyMethodDef module_methods[] = {
    {"fork_generation", (PyCFunction)get_fork_generation, METH_NOARGS,
     "fork_generation() -> int: bumped in every forked child; handles made before a fork are the parent's"},
    {"finish", (PyCFunction)(void (*)(void))finish, METH_FASTCALL,
     "finish(fn, *args): call fn(*args) again while a KeyboardInterrupt comes out of it, then raise it (R50)"},
    {"finish_quietly", (PyCFunction)(void (*)(void))finish_quietly, METH_FASTCALL,
     "finish_quietly(fn, *args): as finish, but deliver the interrupt again as a SIGINT (for finalizers)"},
    {"wait_counters", (PyCFunction)wait_counters, METH_NOARGS,
     "wait_counters() -> {'sleeps': futex sleeps, 'late_wakeups': sleeps that timed out although "
     "their condition held (a missed wake-up if slices are long)} for this process"},
    {"_set_codec", (PyCFunction)(void (*)(void))set_codec, METH_FASTCALL, NULL},
    {"_set_pause_hook", (PyCFunction)set_pause_hook, METH_O, "tests only: fn(handle, where) at the C pause points"},
    {"_set_state_codec", (PyCFunction)set_state_codec, METH_O, NULL},
    {"header_ready", (PyCFunction)header_ready, METH_O, "header_ready(buffer) -> the ready word (acquire load)"},
    {"double_map", (PyCFunction)(void (*)(void))double_map, METH_FASTCALL,
     "double_map(reservation, fd, data_offset, capacity, populate): map a ring segment's data area twice (R60)"},
    {"layout_constants", (PyCFunction)layout_constants, METH_NOARGS, "the constants of _layout.h, by name"},
    {"wait_any", (PyCFunction)(void (*)(void))wait_any, METH_FASTCALL, "wait_any(consumers, slice) -> bool"},
    {"fd_drain", (PyCFunction)fd_drain, METH_O, "fd_drain(fd) -> int: read every queued datagram (non-blocking)"},
    {"wake_address", (PyCFunction)fd_wake_address, METH_O,
     "wake_address(word) -> bytes: the abstract unix socket address a wake-up descriptor word names (R52)"},
    {"guard_installed", (PyCFunction)guard_installed, METH_NOARGS,
     "guard_installed() -> bool: the SIGBUS handler in force is shmring's guard (guard.c)"},
    {"msgpack_cost", (PyCFunction)(void (*)(void))msgpack_cost, METH_FASTCALL,
     "msgpack_cost(meta, limit, max_depth) -> (estimated bytes once decoded, depth); see msgscan.c"},
    {NULL}
};

static struct PyModuleDef coremodule = {
    PyModuleDef_HEAD_INIT, "shmring._core",
    "shmring's C core: atomics, futex waits and the per-message hot paths.", -1, module_methods,
};

static int add_type(PyObject *m, const char *name, PyTypeObject *t) {
    Py_INCREF(t);
    if (PyModule_AddObject(m, name, (PyObject *)t) < 0) { Py_DECREF(t); return -1; }
    return 0;
}

PyMODINIT_FUNC PyInit__core(void) {
    static const struct { const char *name; PyTypeObject *type; } types[] = {
        {"Region", &RegionType}, {"ProducerCore", &ProducerType}, {"ConsumerCore", &ConsumerType},
        {"Lease", &LeaseType}, {"Message", &MessageType}, {"StateCore", &StateCoreType},
        {"Snapshot", &SnapshotType}, {"Guard", &GuardType}, {"QueueCore", &QueueCoreType},
    };
    const size_t ntypes = sizeof types / sizeof types[0];
    if (load_errors() < 0) return NULL;
    for (size_t i = 0; i < ntypes; i++)
        if (PyType_Ready(types[i].type) < 0) return NULL;
    if (lease_add_context_methods() < 0) return NULL;
    if (!(str_finalize = PyUnicode_InternFromString("_finalize"))) return NULL;
    for (size_t i = 0; i < sizeof callbacks / sizeof callbacks[0]; i++)
        if (!(*callbacks[i].name = PyUnicode_InternFromString(callbacks[i].method))) return NULL;
    if (pthread_atfork(NULL, NULL, at_fork_child) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&coremodule);
    if (!m) return NULL;
    for (size_t i = 0; i < ntypes; i++)
        if (add_type(m, types[i].name, types[i].type) < 0) { Py_DECREF(m); return NULL; }
    if (PyModule_AddObject(m, "MSGPACK_MAX_COST_PER_BYTE",
                           PyLong_FromUnsignedLongLong(msgscan_max_cost_per_byte)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
