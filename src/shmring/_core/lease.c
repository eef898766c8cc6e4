/*
 * lease.c: Lease, the one zero-copy buffer exporter, and Message.
 *
 * A lease is a window on shared memory that some protocol step must give
 * back (a ring record's space, a shared-state pin, a batch of records).  It
 * exports the window through the buffer protocol and counts its live
 * exports.  It caches no view of its own, so an export alive at release() is
 * a view the caller kept: it escaped.  Then giving back is deferred until the
 * last export goes (the buffer release hook finishes the lease), and
 * EscapedViewWarning is issued, instead of letting a producer or writer
 * overwrite live data.  Every derived view (numpy slices, np.frombuffer,
 * memoryview slices) keeps its export alive through its base chain, so views
 * of views are covered too.
 *
 * Subtypes (struct embedding Lease first): Message (here), Snapshot
 * (state.c).  Python builds plain leases for record batches:
 * Lease(region, offset, length, on_finish, warning).
 */
#include "core.h"
#include <stddef.h>

void lease_init(Lease *l, const LeaseOps *ops, PyObject *owner, char *ptr, Py_ssize_t len, int readonly) {
    l->ops = ops;
    Py_INCREF(owner);
    l->owner = owner;
    l->ptr = ptr;
    l->len = len;
    l->readonly = readonly;
    l->exports = 0;
    l->state = LEASE_LIVE;
    l->on_finish = NULL;
    l->warning = NULL;
    l->fork_gen = fork_generation;
    l->touched = 0;
    l->give_back = 0;
}

/* The caller's exception, kept aside while a lease is finished. */
#if PY_VERSION_HEX >= 0x030C0000
typedef struct { PyObject *exc; } saved_exc;
static inline saved_exc exc_save(void) { saved_exc s = { PyErr_GetRaisedException() }; return s; }
static inline void exc_restore(saved_exc s) { PyErr_SetRaisedException(s.exc); }
#else
typedef struct { PyObject *type, *value, *tb; } saved_exc;
static inline saved_exc exc_save(void) { saved_exc s; PyErr_Fetch(&s.type, &s.value, &s.tb); return s; }
static inline void exc_restore(saved_exc s) { PyErr_Restore(s.type, s.value, s.tb); }
#endif

/* Give the window back, once.  This runs from release(), but also from a
 * deallocator, a buffer-release hook (the last view of a deferred lease) and
 * the garbage collector, any of which may run while an exception is
 * propagating.  So the caller's exception is kept aside while the owner gives
 * the window back and drops its reference (which may run Python: a record
 * batch's on_finish, the owner's finalizer); a failure in there is reported
 * unraisable and never replaces or clears the caller's exception. */
void lease_finish(Lease *l) {
    l->state = LEASE_RELEASED;
    if (!l->owner) return;
    if (l->fork_gen != fork_generation) {   /* made before a fork: the parent's to give back, not ours */
        Py_CLEAR(l->owner);
        return;
    }
    int pending = PyErr_Occurred() != NULL;     /* (the common case, none, costs no fetch / restore) */
    saved_exc saved;
    if (pending) saved = exc_save();
    l->ops->finish(l);
    Py_CLEAR(l->owner);
    if (PyErr_Occurred()) PyErr_WriteUnraisable((PyObject *)l);
    if (pending) exc_restore(saved);
}

/* Drop a lease that was never handed out (nothing to give back). */
void lease_forget(Lease *l) {
    l->state = LEASE_RELEASED;
    Py_CLEAR(l->owner);
}

static int Lease_getbuffer(Lease *l, Py_buffer *view, int flags) {
    if (l->state != LEASE_LIVE || !l->owner) {
        PyErr_Format(PyExc_BufferError, "%s was released; its bytes may already be overwritten", l->ops->what);
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)l, l->ptr, l->len, l->readonly, flags) < 0) return -1;
    l->exports++;
    l->touched = 1;             /* a view of the payload is in user code's hands */
    return 0;
}

static void Lease_releasebuffer(Lease *l, Py_buffer *view) {
    l->exports--;
    if (l->exports == 0 && l->state == LEASE_DEFERRED) lease_finish(l);
}

static PyBufferProcs Lease_as_buffer = {
    (getbufferproc)Lease_getbuffer,
    (releasebufferproc)Lease_releasebuffer,
};

PyObject *Lease_release(Lease *l, PyObject *unused) {
    if (l->state != LEASE_LIVE) Py_RETURN_NONE;
    if (l->exports > 0) {
        l->state = LEASE_DEFERRED;
        if (l->ops->warn(l) < 0) return NULL;
        Py_RETURN_NONE;
    }
    lease_finish(l);
    Py_RETURN_NONE;
}

static PyObject *Lease_enter(PyObject *l, PyObject *unused) { Py_INCREF(l); return l; }
/* R39: a with block left by an exception that is not an Exception (KeyboardInterrupt,
 * SystemExit, a cancellation: an interrupt, not the body's verdict on the message)
 * before the payload was read gives the message back for redelivery. */
static PyObject *Lease_exit(Lease *l, PyObject *const *args, Py_ssize_t n) {
    if (n >= 1 && args[0] != Py_None && !l->touched && l->state == LEASE_LIVE && PyType_Check(args[0]) &&
        !PyType_IsSubtype((PyTypeObject *)args[0], (PyTypeObject *)PyExc_Exception)) {
        l->give_back = GIVE_INTERRUPTED;
        lease_finish(l);
        Py_RETURN_FALSE;
    }
    PyObject *r = Lease_release(l, NULL);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

int message_freelist_put(Message *m);

void Lease_dealloc(Lease *l) {
    int gc = PyType_IS_GC(Py_TYPE(l));
    if (gc) PyObject_GC_UnTrack(l);
    if (Py_TYPE(l) == &MessageType && ((Message *)l)->weakrefs) PyObject_ClearWeakRefs((PyObject *)l);
    /* exports hold references to l, so here exports == 0: a lease dropped
     * without release() is released now.  Resurrected meanwhile (as CPython
     * does around a finalizer): reporting a failure unraisable takes
     * references to it, whose release must not deallocate it again. */
    if (l->state == LEASE_LIVE) {
        Py_SET_REFCNT(l, 1);
        l->give_back = l->touched ? GIVE_NO : GIVE_DROPPED;     /* R39: dropped unread: handed out again */
        lease_finish(l);
        Py_SET_REFCNT(l, Py_REFCNT(l) - 1);
        if (Py_REFCNT(l) > 0) {        /* something kept it (an unraisable hook): it lives on, released */
            if (Py_TYPE(l)->tp_flags & Py_TPFLAGS_HEAPTYPE)
                Py_INCREF(Py_TYPE(l));   /* a Python subclass's dealloc drops the type's reference after us */
            if (gc) PyObject_GC_Track(l);
            return;
        }
    }
    else Py_CLEAR(l->owner);
    Py_CLEAR(l->on_finish);
    Py_CLEAR(l->warning);
    if (Py_TYPE(l) == &MessageType && message_freelist_put((Message *)l)) return;
    Py_TYPE(l)->tp_free((PyObject *)l);
}

/* ------------------------------------------------ __enter__ / __exit__
 *
 * A `with` statement looks both methods up on the type and binds them: with
 * ordinary method descriptors that is two new bound-method objects per block,
 * about a third of a zero-copy receive's cost (issue 15).  Instead the type
 * holds two LeaseMethod descriptors whose binding (a LeaseBound: the lease
 * and which method, a strong reference like a bound method's) comes from a
 * small freelist.  Called on the type (contextlib.ExitStack does
 * type(cm).__exit__(cm, ...)) a descriptor takes the lease as its first
 * argument, as a method descriptor does. */
typedef struct { PyObject_HEAD int exit; vectorcallfunc vectorcall; } LeaseMethod;
typedef struct { PyObject_HEAD Lease *l; int exit; vectorcallfunc vectorcall; } LeaseBound;

static PyObject *lease_call(Lease *l, int exit, PyObject *const *args, Py_ssize_t n) {
    if (!exit) {
        if (n != 0) { PyErr_Format(PyExc_TypeError, "__enter__() takes no arguments (%zd given)", n); return NULL; }
        return Lease_enter((PyObject *)l, NULL);
    }
    if (n != 3) { PyErr_Format(PyExc_TypeError, "__exit__() takes 3 arguments (%zd given)", n); return NULL; }
    return Lease_exit(l, args, n);
}

#define LEASE_BOUND_FREELIST 16
static LeaseBound *bound_free[LEASE_BOUND_FREELIST];
static int bound_nfree;

static PyObject *LeaseBound_vectorcall(LeaseBound *b, PyObject *const *args, size_t nargsf, PyObject *kw) {
    if (kw && PyTuple_GET_SIZE(kw)) { PyErr_SetString(PyExc_TypeError, "no keyword arguments"); return NULL; }
    return lease_call(b->l, b->exit, args, PyVectorcall_NARGS(nargsf));
}
static void LeaseBound_dealloc(LeaseBound *b) {
    PyObject_GC_UnTrack(b);
    Py_CLEAR(b->l);
    if (bound_nfree < LEASE_BOUND_FREELIST) { bound_free[bound_nfree++] = b; return; }
    PyObject_GC_Del(b);
}
static int LeaseBound_traverse(LeaseBound *b, visitproc visit, void *arg) { Py_VISIT(b->l); return 0; }
static int LeaseBound_clear(LeaseBound *b) { Py_CLEAR(b->l); return 0; }
static PyObject *LeaseBound_repr(LeaseBound *b) {
    return PyUnicode_FromFormat("<bound method %s of %R>", b->exit ? "__exit__" : "__enter__", b->l ? (PyObject *)b->l : Py_None);
}

static PyTypeObject LeaseBoundType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.lease_method",
    .tp_basicsize = sizeof(LeaseBound),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(LeaseBound, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = (destructor)LeaseBound_dealloc,
    .tp_traverse = (traverseproc)LeaseBound_traverse,
    .tp_clear = (inquiry)LeaseBound_clear,
    .tp_repr = (reprfunc)LeaseBound_repr,
};

static PyObject *LeaseMethod_get(LeaseMethod *d, PyObject *obj, PyObject *type) {
    if (!obj || obj == Py_None) return Py_NewRef(d);
    LeaseBound *b;
    if (bound_nfree > 0) {
        b = bound_free[--bound_nfree];
        PyObject_Init((PyObject *)b, &LeaseBoundType);
    }
    else if (!(b = PyObject_GC_New(LeaseBound, &LeaseBoundType))) return NULL;
    b->l = (Lease *)Py_NewRef(obj);
    b->exit = d->exit;
    b->vectorcall = (vectorcallfunc)LeaseBound_vectorcall;
    PyObject_GC_Track(b);
    return (PyObject *)b;
}
static PyObject *LeaseMethod_vectorcall(LeaseMethod *d, PyObject *const *args, size_t nargsf, PyObject *kw) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (kw && PyTuple_GET_SIZE(kw)) { PyErr_SetString(PyExc_TypeError, "no keyword arguments"); return NULL; }
    if (n < 1 || !PyObject_TypeCheck(args[0], &LeaseType)) {
        PyErr_Format(PyExc_TypeError, "%s() needs a lease (a message, snapshot or batch) as its first argument",
                     d->exit ? "__exit__" : "__enter__");
        return NULL;
    }
    return lease_call((Lease *)args[0], d->exit, args + 1, n - 1);
}
static PyObject *LeaseMethod_repr(LeaseMethod *d) {
    return PyUnicode_FromFormat("<method '%s' of shmring leases>", d->exit ? "__exit__" : "__enter__");
}

static PyTypeObject LeaseMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.lease_method_descriptor",
    .tp_basicsize = sizeof(LeaseMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(LeaseMethod, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = (descrgetfunc)LeaseMethod_get,
    .tp_repr = (reprfunc)LeaseMethod_repr,
};

/* After PyType_Ready(&LeaseType): put the two descriptors in its dict. */
int lease_add_context_methods(void) {
    if (PyType_Ready(&LeaseBoundType) < 0 || PyType_Ready(&LeaseMethodType) < 0) return -1;
    for (int exit = 0; exit < 2; exit++) {
        LeaseMethod *d = PyObject_New(LeaseMethod, &LeaseMethodType);
        if (!d) return -1;
        d->exit = exit;
        d->vectorcall = (vectorcallfunc)LeaseMethod_vectorcall;
        int r = PyDict_SetItemString(LeaseType.tp_dict, exit ? "__exit__" : "__enter__", (PyObject *)d);
        Py_DECREF(d);
        if (r < 0) return -1;
    }
    PyType_Modified(&LeaseType);
    return 0;
}

static PyObject *Lease_get_released(Lease *l, void *c) { return PyBool_FromLong(l->state != LEASE_LIVE); }
static PyObject *Lease_get_exports(Lease *l, void *c) { return PyLong_FromLong(l->exports); }
PyObject *Lease_get_nbytes(Lease *l, void *c) { return PyLong_FromSsize_t(l->len); }

static PyMethodDef Lease_methods[] = {
    {"release", (PyCFunction)Lease_release, METH_NOARGS,
     "release(): give the window back. Idempotent. If a view of it is still alive, that is deferred "
     "until the view is garbage-collected, and EscapedViewWarning is issued."},
    {NULL}
};
static PyGetSetDef Lease_getset[] = {
    {"released", (getter)Lease_get_released, NULL, "True once release() was called", NULL},
    {"nbytes", (getter)Lease_get_nbytes, NULL, "size of the window in bytes", NULL},
    {"_exports", (getter)Lease_get_exports, NULL, NULL, NULL},
    {NULL}
};

/* -------------------------------------------- plain leases, made in Python */

/* finish: call on_finish() (a record consumer gives the batch's space back) */
static void py_lease_finish(Lease *l) {
    if (!l->on_finish) return;
    PyObject *r = PyObject_CallNoArgs(l->on_finish);
    if (!r) PyErr_WriteUnraisable((PyObject *)l);
    Py_XDECREF(r);
}
static int py_lease_warn(Lease *l) {
    return PyErr_WarnEx(EscapedViewWarning, l->warning ? PyUnicode_AsUTF8(l->warning) : "a view outlived its lease", 2);
}
static const LeaseOps py_lease_ops = { "lease", py_lease_finish, py_lease_warn };

/* Lease(region, offset, length, on_finish, warning, readonly=True) */
static int Lease_init(Lease *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"region", "offset", "length", "on_finish", "warning", "readonly", NULL};
    PyObject *region, *on_finish, *warning;
    Py_ssize_t off, len;
    int readonly = 1;
    if (self->owner) { PyErr_SetString(PyExc_RuntimeError, "already initialized"); return -1; }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!nnOU|p", kwlist, &RegionType, &region, &off, &len,
                                     &on_finish, &warning, &readonly))
        return -1;
    Region *r = (Region *)region;
    if (!r->has_view || off < 0 || len < 0 || off > r->view.len || len > r->view.len - off) {
        PyErr_Format(PyExc_ValueError, "lease of %zd bytes at %zd outside the region", len, off);
        return -1;
    }
    if (!PyCallable_Check(on_finish)) { PyErr_SetString(PyExc_TypeError, "on_finish must be callable"); return -1; }
    lease_init(self, &py_lease_ops, region, r->base + off, len, readonly);
    Py_INCREF(on_finish); self->on_finish = on_finish;
    Py_INCREF(warning); self->warning = warning;
    return 0;
}

PyTypeObject LeaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.Lease",
    .tp_basicsize = sizeof(Lease),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Lease(region, offset, length, on_finish, warning, readonly=True): a zero-copy window on a "
              "region, exported as a buffer.\n\nLifetime: views of it are valid until release(); a view "
              "alive at release() defers on_finish() until it is garbage-collected (EscapedViewWarning).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lease_init,
    .tp_dealloc = (destructor)Lease_dealloc,
    .tp_as_buffer = &Lease_as_buffer,
    .tp_methods = Lease_methods,
    .tp_getset = Lease_getset,
};

/* ---------------------------------------------------------------- Message */

static const char *kind_names[] = {"?", "bytes", "array", "object"};

static void message_finish(Lease *l) {
    Message *m = (Message *)l;
    Consumer *c = (Consumer *)l->owner;
    int give = l->give_back;
    if (give == GIVE_DROPPED && c->unread_drops >= UNREAD_DROPS_MAX) give = GIVE_NO;   /* R39's bound: release */
    else if (give == GIVE_DROPPED) c->unread_drops++;
    else if (give == GIVE_NO && l->touched) c->unread_drops = 0;
    if ((give ? consumer_return(c, m->start, m->end) : consumer_finish(c, m->start, m->end)) < 0)
        PyErr_WriteUnraisable((PyObject *)m);
}

static int message_warn(Lease *l) {
    Message *m = (Message *)l;
    return PyErr_WarnFormat(EscapedViewWarning, 1,
        "a view of a received %s message (%zd bytes at ring position %llu) is still alive after "
        "release; its ring space stays held until that view is garbage-collected. Keep a copy "
        "instead: msg.copy() or recv(copy=True).", kind_names[m->type], l->len, (unsigned long long)m->start);
}

static const LeaseOps message_ops = { "message", message_finish, message_warn };

/* A freelist of Message objects (the type is final): a receive reuses the
 * memory of a message already deallocated (untracked, its references
 * cleared) instead of a malloc and a garbage-collector link, which also
 * counted towards the next collection.  Only with the GIL held. */
#define MESSAGE_FREELIST 64
static Message *message_free[MESSAGE_FREELIST];
static int message_nfree;

int message_freelist_put(Message *m) {
    if (message_nfree >= MESSAGE_FREELIST) return 0;
    message_free[message_nfree++] = m;
    return 1;
}

/* A Message for the record r of consumer c (tracking is the caller's). */
PyObject *make_message(Consumer *c, Rec *r) {
    Message *m;
    if (message_nfree > 0) {
        m = message_free[--message_nfree];
        PyObject_Init((PyObject *)m, &MessageType);
    }
    else if (!(m = PyObject_GC_New(Message, &MessageType))) return NULL;
    lease_init(&m->l, &message_ops, (PyObject *)c, c->r.base + r->off, r->len, 1);
    m->start = r->start; m->end = r->end;
    m->off = r->off; m->type = r->type;
    m->weakrefs = NULL;
    PyObject_GC_Track(m);
    return (PyObject *)m;
}

/* Garbage collection.  Messages and Snapshots are GC-tracked: one kept in a
 * reference cycle with its handle (cons.last = msg, reader.last = snap) is
 * collected and its ring space or pin given back.  (Plain leases, made from
 * Python for record batches, are not tracked.) */
int Lease_traverse(Lease *l, visitproc visit, void *arg) {
    Py_VISIT(l->owner);
    Py_VISIT(l->on_finish);
    Py_VISIT(l->warning);
    return 0;
}

/* The collector found the lease unreachable: give the window back now.  A
 * live export (a view in the same cycle) keeps the owner, so the window stays
 * mapped until that view is cleared; its buffer release then finishes. */
int Lease_clear(Lease *l) {
    if (l->exports == 0) {
        if (l->state == LEASE_LIVE) l->give_back = l->touched ? GIVE_NO : GIVE_DROPPED;   /* R39: collected unread */
        if (l->state != LEASE_RELEASED) lease_finish(l);
        else Py_CLEAR(l->owner);
        Py_CLEAR(l->on_finish);
        Py_CLEAR(l->warning);
    }
    return 0;
}

/* A lease's owner is always a Region (a consumer, a state handle, a record ring's region). */
PyObject *lease_guard_exit(Lease *l, PyObject *res) {
    return l->owner ? guard_exit((Region *)l->owner, res) : res;
}

static PyObject *Message_get_value(Message *m, void *c) {
    if (m->l.state != LEASE_LIVE) { PyErr_SetString(HandleClosed, "message was released; keep msg.copy() to use data after release"); return NULL; }
    PyObject *v = m->type == SHMR_T_BYTES ? PyMemoryView_FromObject((PyObject *)m)
                                          : PyObject_CallOneArg(decode_func, (PyObject *)m);
    m->l.touched = v != NULL;       /* handed to user code only if it got the value */
    return lease_guard_exit(&m->l, v);
}

static PyObject *Message_tobytes(Message *m, PyObject *unused) {
    if (m->l.state != LEASE_LIVE) { PyErr_SetString(HandleClosed, "message was released"); return NULL; }
    PyObject *b = PyBytes_FromStringAndSize(m->l.ptr, m->l.len);
    if (b) m->l.touched = 1;
    return lease_guard_exit(&m->l, b);
}

static PyObject *Message_copy(Message *m, PyObject *unused) {
    if (m->l.state != LEASE_LIVE) { PyErr_SetString(HandleClosed, "message was released"); return NULL; }
    if (m->type == SHMR_T_BYTES) return Message_tobytes(m, NULL);
    int was = m->l.touched;
    PyObject *v = PyObject_CallOneArg(copy_func, (PyObject *)m);
    m->l.touched = v ? 1 : was;     /* the codec's own views of it do not count: only a value returned */
    return lease_guard_exit(&m->l, v);
}

/* _take_copy() -> the value copied out, then the message released, in one C step: an
 * interrupt (KeyboardInterrupt) while copying, or pending when the copy is done, gives
 * the message back for redelivery instead (R39).  recv(copy=True) is built on it. */
static PyObject *Message_take_copy(Message *m, PyObject *unused) {
    if (m->l.state != LEASE_LIVE) { PyErr_SetString(HandleClosed, "message was released"); return NULL; }
    PyObject *v = m->type == SHMR_T_BYTES ? PyBytes_FromStringAndSize(m->l.ptr, m->l.len)
                                          : PyObject_CallOneArg(copy_func, (PyObject *)m);
    if (v && PyErr_CheckSignals() < 0) Py_CLEAR(v);
    if (!v) {
        if (m->l.state == LEASE_LIVE && m->l.exports == 0) { m->l.give_back = GIVE_INTERRUPTED; lease_finish(&m->l); }
        return NULL;
    }
    PyObject *owner = Py_NewRef(m->l.owner);     /* the release lets go of it */
    PyObject *r = Lease_release(&m->l, NULL);
    if (!r) { Py_DECREF(v); Py_DECREF(owner); return NULL; }
    Py_DECREF(r);
    v = guard_exit((Region *)owner, v);       /* a copy of vanished pages is zeros: not a value */
    Py_DECREF(owner);
    return v;
}

/* give_back() -> bool: done with the message without consuming it (R39's
 * RETURNED entry, whatever was looked at): this handle's next receive hands it
 * out again, and if the handle closes first the next consumer gets it (spsc /
 * mpsc: the release position stays before it; mpmc: requeued for any
 * consumer).  For a consumer that failed to pass it on (a recorder whose write
 * failed).  False if a view of it is alive or it was released: then it is
 * released as by release(). */
static PyObject *Message_give_back(Message *m, PyObject *unused) {
    if (m->l.state == LEASE_LIVE && m->l.exports == 0) {
        m->l.give_back = GIVE_INTERRUPTED;
        lease_finish(&m->l);
        Py_RETURN_TRUE;
    }
    PyObject *r = Lease_release(&m->l, NULL);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

/* Looking at a message's metadata hands it to user code too (R39): code that
 * skips messages by kind or size has seen them. */
static PyObject *Message_get_kind(Message *m, void *c) { m->l.touched = 1; return PyUnicode_FromString(kind_names[m->type]); }
static PyObject *Message_get_type(Message *m, void *c) { m->l.touched = 1; return PyLong_FromLong(m->type); }
static PyObject *Message_get_nbytes(Message *m, void *c) { m->l.touched = 1; return PyLong_FromSsize_t(m->l.len); }
static PyObject *Message_get_offset(Message *m, void *c) { return PyLong_FromSsize_t(m->off); }
static PyObject *Message_get_touched(Message *m, void *c) { return PyBool_FromLong(m->l.touched); }
static PyObject *Message_get_position(Message *m, void *c) { m->l.touched = 1; return PyLong_FromUnsignedLongLong(m->start); }

static PyObject *Message_repr(Message *m) {
    return PyUnicode_FromFormat("<shmring.Message %s, %zd bytes at position %llu%s>", kind_names[m->type],
                                m->l.len, (unsigned long long)m->start,
                                m->l.state == LEASE_LIVE ? "" : m->l.state == LEASE_DEFERRED ? ", release deferred" : ", released");
}

static PyMethodDef Message_methods[] = {
    {"release", (PyCFunction)Lease_release, METH_NOARGS,
     "release(): give the message's ring space back. Idempotent. If a view of it is still alive the "
     "space is held until that view is garbage-collected, and EscapedViewWarning is issued."},
    {"copy", (PyCFunction)Message_copy, METH_NOARGS, "copy(): the value, detached from the ring (owns its memory)"},
    {"tobytes", (PyCFunction)Message_tobytes, METH_NOARGS, "tobytes(): a copy of the raw payload bytes"},
    {"_take_copy", (PyCFunction)Message_take_copy, METH_NOARGS, NULL},
    {"give_back", (PyCFunction)Message_give_back, METH_NOARGS,
     "give_back() -> bool: done with the message without consuming it: this handle's next receive hands it "
     "out again, or the next consumer if the handle closes first (mpmc: any consumer). False (and released "
     "as by release()) if a view of it is still alive or it was released already."},
    {NULL}
};
static PyGetSetDef Message_getset[] = {
    {"value", (getter)Message_get_value, NULL,
     "the payload: a read-only memoryview (bytes), a read-only ndarray (array), or the decoded object "
     "(msgpack, arrays inside are read-only views). Built anew on each access; valid until release().", NULL},
    {"kind", (getter)Message_get_kind, NULL, "'bytes', 'array' or 'object'", NULL},
    {"type", (getter)Message_get_type, NULL, "record type code (shmring.layout.T_*)", NULL},
    {"nbytes", (getter)Message_get_nbytes, NULL, "the message's size in the ring as encoded (bytes: their "
     "length; an array: its data plus its descriptor; the data alone: msg.value.nbytes)", NULL},
    {"_offset", (getter)Message_get_offset, NULL, "payload offset in the region", NULL},
    {"_touched", (getter)Message_get_touched, NULL, "handed to user code (R39)", NULL},
    {"position", (getter)Message_get_position, NULL, "ring position of the record", NULL},
    {NULL}
};

PyTypeObject MessageType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring.Message",
    .tp_basicsize = sizeof(Message),
    .tp_weaklistoffset = offsetof(Message, weakrefs),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A received message: a zero-copy window on ring memory.\n\n"
              "Lifetime: msg.value and every view derived from it (slices, numpy views, "
              "memoryviews) point into the shared ring and are valid until msg.release() "
              "(called when a `with` block exits). After that the producer may overwrite the "
              "space, so release() checks whether a view escaped: if one did, the space is held "
              "until the view is garbage-collected and EscapedViewWarning is issued. To keep data, "
              "use msg.copy() or recv(copy=True).",
    .tp_base = &LeaseType,
    .tp_new = NULL,
    .tp_dealloc = (destructor)Lease_dealloc,
    .tp_traverse = (traverseproc)Lease_traverse,
    .tp_clear = (inquiry)Lease_clear,
    .tp_free = PyObject_GC_Del,
    .tp_methods = Message_methods,
    .tp_getset = Message_getset,
    .tp_repr = (reprfunc)Message_repr,
};
