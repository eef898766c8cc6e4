/*
 * qfast.c: the common case of shmring.Queue's put and get, in C (the base
 * class QueueCore of shmring.queues._Base).
 *
 * A queue's put pickles, counts the item in (R70) and sends; its get takes
 * the next message, counts it out and unpickles.  In Python those bodies cost
 * more than the ring and pickle together (about 100 bytecodes a pair), so the
 * case that needs no decision is done here: the thread that joined first
 * (its handle set by _fast_put / _fast_get), no bound in items, an object
 * pickled whole (no out-of-band buffer), a ring with room / a message there.
 * Everything else, and every error, goes to the Python methods that decide
 * (_put, _get, _take, _send_counted): one mechanism, this is only its
 * shortcut.  Nothing here waits.
 */
#include "core.h"

typedef struct {
    PyObject_HEAD
    PyObject *fput, *fget;          /* the fast thread's ProducerCore / ConsumerCore, or NULL */
    PyObject *region;               /* the queue's own Region (its _r): the counts go through it */
    unsigned long put_tid, get_tid; /* ... and that thread (this_thread()) */
    uint64_t items_off;             /* the item count (R70), a header word: get counts out through region */
} QueueCore;

static PyObject *pickle_dumps, *pickle_loads, *int_5, *str_buffer_callback, *str_put, *str_get, *str_take,
                *str_send_counted, *str_not_pickle, *str_torch, *str_append, *kw_callback;
static PyObject *modules_dict;

#define OOB_MIN 4096                /* queues.OOB_MIN: bytes this large travel out of band */

static int qfast_init_globals(void) {
    if (pickle_dumps) return 0;
    PyObject *m = PyImport_ImportModule("pickle");
    if (!m) return -1;
    pickle_dumps = PyObject_GetAttrString(m, "dumps");
    pickle_loads = PyObject_GetAttrString(m, "loads");
    Py_DECREF(m);
    int_5 = PyLong_FromLong(5);
    str_buffer_callback = PyUnicode_InternFromString("buffer_callback");
    str_put = PyUnicode_InternFromString("_put");
    str_get = PyUnicode_InternFromString("_get");
    str_take = PyUnicode_InternFromString("_take");
    str_send_counted = PyUnicode_InternFromString("_send_rest");
    str_not_pickle = PyUnicode_InternFromString("_bad_stream");
    str_torch = PyUnicode_InternFromString("torch");
    str_append = PyUnicode_InternFromString("append");
    kw_callback = str_buffer_callback ? PyTuple_Pack(1, str_buffer_callback) : NULL;
    modules_dict = PySys_GetObject("modules");      /* borrowed; sys.modules lives as long as we do */
    return (pickle_dumps && pickle_loads && int_5 && str_buffer_callback && str_put && str_get && str_take &&
            str_send_counted && str_not_pickle && str_torch && str_append && kw_callback && modules_dict) ? 0 : -1;
}

/* The handle's region if the fast path may use it now, else NULL (no error set). */
static inline Region *usable(PyObject *h, unsigned long tid) {
    if (!h || tid != this_thread()) return NULL;
    Region *r = (Region *)h;
    if (r->closed || !r->has_view || truncated(r) || inherited(r)) return NULL;
    return r;
}

/* Add delta to a count of the queue's header (R70, R72) through the queue's own Region,
 * which stays mapped while the queue lives; 0, or -1 with an error if it cannot. */
static int count(QueueCore *self, uint64_t off, uint64_t delta) {
    Region *q = (Region *)self->region;
    if (!q || q->closed || !q->has_view || truncated(q)) {
        PyErr_SetString(HandleClosed, "the queue's region is closed");
        return -1;
    }
    (void)fetch_add_seq_cst64(q->base + off, delta);   /* R70 R72, a shared counter (as Region.fetch_add_u64) */
    return 0;
}

/* put(obj, block=True, timeout=None) and get(block=True, timeout=None, *, lease=False):
 * the arguments as the Python methods take them (positional or keyword). */
static int parse(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *const *names,
                 int npos, int nall, PyObject **out, const char *sig) {
    if (nargs > npos) goto bad;
    for (Py_ssize_t i = 0; i < nargs; i++) out[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int i = 0;
        while (i < nall && PyUnicode_CompareWithASCIIString(key, names[i]) != 0) i++;
        if (i == nall || i < nargs || out[i]) goto bad;
        out[i] = args[nargs + k];
    }
    return 0;
bad:
    PyErr_Format(PyExc_TypeError, "%s", sig);
    return -1;
}

/* An object whose pickle can hold no out-of-band buffer: exact bytes under OOB_MIN, str,
 * int, float, bool, complex, None. */
static inline int plain(PyObject *o) {
    PyTypeObject *t = Py_TYPE(o);
    return (t == &PyBytes_Type && PyBytes_GET_SIZE(o) < OOB_MIN) || t == &PyUnicode_Type || t == &PyLong_Type ||
           t == &PyFloat_Type || t == &PyBool_Type || o == Py_None || t == &PyComplex_Type;
}

/* A dict, list or tuple of plain objects only (one level: a record), up to 64 of them. */
static int flat(PyObject *o) {
    PyTypeObject *t = Py_TYPE(o);
    if (t == &PyDict_Type) {
        if (PyDict_GET_SIZE(o) > 64) return 0;
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(o, &pos, &k, &v))
            if (!plain(k) || !plain(v)) return 0;
        return 1;
    }
    if (t == &PyList_Type || t == &PyTuple_Type) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
        if (n > 64) return 0;
        PyObject **items = PySequence_Fast_ITEMS(o);
        for (Py_ssize_t i = 0; i < n; i++)
            if (!plain(items[i])) return 0;
        return 1;
    }
    return 0;
}

/* pickle.dumps(obj, 5) of an object that hands out no out-of-band buffer (plain, a
 * record, or a dict / list / tuple whose pickling handed none out while torch is not
 * loaded, R85), or NULL: not such an object (no error set), or its pickling error. */
static PyObject *pickled_whole(PyObject *obj) {
    PyTypeObject *t = Py_TYPE(obj);
    PyObject *stream;
    if (plain(obj) || flat(obj)) {
        PyObject *cargs[2] = {obj, int_5};
        stream = PyObject_Vectorcall(pickle_dumps, cargs, 2, NULL);
    } else if (t == &PyDict_Type || t == &PyList_Type || t == &PyTuple_Type) {
        PyObject *torch = PyDict_GetItemWithError(modules_dict, str_torch);
        if (torch || PyErr_Occurred()) return NULL;
        PyObject *bufs = PyList_New(0);
        if (!bufs) return NULL;
        PyObject *append = PyObject_GetAttr(bufs, str_append);
        if (!append) { Py_DECREF(bufs); return NULL; }
        PyObject *cargs[3] = {obj, int_5, append};
        stream = PyObject_Vectorcall(pickle_dumps, cargs, 2, kw_callback);
        Py_DECREF(append);
        Py_ssize_t n = PyList_GET_SIZE(bufs);
        Py_DECREF(bufs);
        if (stream && n) Py_CLEAR(stream);          /* out-of-band buffers: Python lays them out */
    } else {
        return NULL;
    }
    if (stream && !PyBytes_Check(stream)) Py_CLEAR(stream);
    return stream;
}

/* _pickled_whole(obj) -> bytes | None: the same for put_many (None: the general path). */
static PyObject *QueueCore_pickled_whole(PyObject *self, PyObject *obj) {
    if (qfast_init_globals() < 0) return NULL;
    PyObject *stream = pickled_whole(obj);
    if (stream) return stream;
    PyErr_Clear();
    Py_RETURN_NONE;
}

static PyObject *QueueCore_put(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const names[] = {"obj", "block", "timeout"};
    PyObject *a[3] = {NULL, NULL, NULL};
    if (parse(args, nargs, kwnames, names, 3, 3, a, "put(obj, block=True, timeout=None)") < 0) return NULL;
    if (!a[0]) { PyErr_SetString(PyExc_TypeError, "put(obj, block=True, timeout=None)"); return NULL; }
    if (!a[1]) a[1] = Py_True;
    if (!a[2]) a[2] = Py_None;
    PyObject *obj = a[0], *stream = NULL;
    if (qfast_init_globals() < 0) return NULL;
    Region *r = usable(self->fput, self->put_tid);
    if (!r) goto slow;
    stream = pickled_whole(obj);
    if (!stream) { PyErr_Clear(); goto slow; }      /* not one (or its error): from Python */
    /* counted in by the producer, in the C step that publishes it (R70, R72) */
    PyObject *prod = Py_NewRef(self->fput);         /* ours for the call: close() may drop the slot's */
    PyObject *ok = Producer_try_send((Producer *)prod, stream);
    if (ok == Py_True) {
        Py_DECREF(ok);
        Py_DECREF(stream);
        Py_DECREF(prod);
        Py_RETURN_NONE;
    }
    if (!ok) {
        if (!PyErr_ExceptionMatches(PeerGone) && !PyErr_ExceptionMatches(MessageTooLarge)) {
            Py_DECREF(stream);                      /* not sent, so not counted: the error */
            Py_DECREF(prod);
            return NULL;
        }
        PyErr_Clear();                              /* _send says which (and waits for a consumer) */
    } else {
        Py_DECREF(ok);                              /* full: _send waits, up to the timeout */
    }
    PyObject *cargs[5] = {(PyObject *)self, prod, stream, a[1], a[2]};
    PyObject *res = PyObject_VectorcallMethod(str_send_counted, cargs, 5, NULL);
    Py_DECREF(stream);
    Py_DECREF(prod);
    return res;
slow:;
    PyObject *sargs[4] = {(PyObject *)self, obj, a[1], a[2]};
    return PyObject_VectorcallMethod(str_put, sargs, 4, NULL);
}

static PyObject *QueueCore_get(QueueCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *const names[] = {"block", "timeout", "lease"};
    PyObject *a[3] = {NULL, NULL, NULL};
    if (parse(args, nargs, kwnames, names, 2, 3, a, "get(block=True, timeout=None, *, lease=False)") < 0)
        return NULL;
    if (!a[0]) a[0] = Py_True;
    if (!a[1]) a[1] = Py_None;
    if (!a[2]) a[2] = Py_False;
    int lease = PyObject_IsTrue(a[2]);
    if (lease < 0) return NULL;
    if (qfast_init_globals() < 0) return NULL;
    if (!usable(self->fget, self->get_tid) || lease) goto slow;
    PyObject *cons = Py_NewRef(self->fget);
    PyObject *got = Consumer_take_item((Consumer *)cons, NULL);   /* a bytes message: copied out and released */
    Py_DECREF(cons);
    if (!got) {
        if (!PyErr_ExceptionMatches(EndOfStream) && !PyErr_ExceptionMatches(PeerGone)) return NULL;
        PyErr_Clear();                              /* _get says what it means (corruption, R73) */
        goto slow;
    }
    if (got == Py_None) { Py_DECREF(got); goto slow; }   /* _get waits, up to the timeout */
    if (PyBytes_CheckExact(got)) {
        if (count(self, self->items_off, (uint64_t)-1) < 0) { Py_DECREF(got); return NULL; }   /* R70: -1, once taken */
        PyObject *res;
        if (PyBytes_GET_SIZE(got) && (unsigned char)PyBytes_AS_STRING(got)[0] == 0x80)
            res = PyObject_Vectorcall(pickle_loads, &got, 1, NULL);
        else {
            PyObject *cargs[2] = {(PyObject *)self, got};
            res = PyObject_VectorcallMethod(str_not_pickle, cargs, 2, NULL);
        }
        Py_DECREF(got);
        return res;
    }
    /* a message: _take decodes, releases and counts it out (once consumed: an interrupt
     * before that has it handed out again, R39) */
    PyObject *cargs[2] = {(PyObject *)self, got};
    PyObject *res = PyObject_VectorcallMethod(str_take, cargs, 2, NULL);
    Py_DECREF(got);
    return res;
slow:;
    PyObject *sargs[4] = {(PyObject *)self, a[0], a[1], a[2]};
    return PyObject_VectorcallMethod(str_get, sargs, 4, NULL);
}

/* _fast_put(producer, region, items_off) / _fast_get(consumer, region, items_off): this
 * thread's handle becomes the fast path's (a get counts out through region, the queue's
 * own; a put's producer counts in by itself, _count_into), unless another thread's still
 * usable one is; _fast_put(None, ...) / _fast_get(None, ...) turn it off. */
static int set_fast(QueueCore *self, PyObject *const *args, Py_ssize_t n, PyObject **slot, unsigned long *tid,
                    PyTypeObject *type) {
    if (n != 3) {
        PyErr_SetString(PyExc_TypeError, "_fast_put / _fast_get(handle, region, items_off)");
        return -1;
    }
    if (args[0] == Py_None) { Py_CLEAR(*slot); return 0; }
    Region *held = (Region *)*slot;                 /* the first thread keeps it while its handle is usable */
    if (held && !held->closed && held->has_view && !truncated(held) && !inherited(held)) return 0;
    if (!PyObject_TypeCheck(args[0], type) || !PyObject_TypeCheck(args[1], &RegionType)) {
        PyErr_SetString(PyExc_TypeError, "not a handle of the right kind, or not a Region");
        return -1;
    }
    long long items = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return -1;
    Region *r = (Region *)args[1];
    if (items <= 0 || (uint64_t)items + 8 > r->words_end || items % 8) {
        PyErr_SetString(PyExc_ValueError, "bad header offset for a queue's count");
        return -1;
    }
    self->items_off = (uint64_t)items;
    Py_INCREF(args[1]);
    Py_XSETREF(self->region, args[1]);
    Py_INCREF(args[0]);
    Py_XSETREF(*slot, args[0]);
    *tid = this_thread();
    return 0;
}
static PyObject *QueueCore_fast_put(QueueCore *self, PyObject *const *args, Py_ssize_t n) {
    return set_fast(self, args, n, &self->fput, &self->put_tid, &ProducerType) < 0 ? NULL : Py_NewRef(Py_None);
}
static PyObject *QueueCore_fast_get(QueueCore *self, PyObject *const *args, Py_ssize_t n) {
    return set_fast(self, args, n, &self->fget, &self->get_tid, &ConsumerType) < 0 ? NULL : Py_NewRef(Py_None);
}
/* _fast_getter() -> bool: the calling thread is the fast path's getter. */
static PyObject *QueueCore_fast_getter(QueueCore *self, PyObject *unused) {
    return PyBool_FromLong(self->fget && self->get_tid == this_thread());
}

static int QueueCore_traverse(QueueCore *self, visitproc visit, void *arg) {
    Py_VISIT(self->fput);
    Py_VISIT(self->fget);
    Py_VISIT(self->region);
    return 0;
}
static int QueueCore_clear(QueueCore *self) {
    Py_CLEAR(self->fput);
    Py_CLEAR(self->fget);
    Py_CLEAR(self->region);
    return 0;
}
static void QueueCore_dealloc(QueueCore *self) {
    PyObject_GC_UnTrack(self);
    QueueCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef QueueCore_methods[] = {
    {"put", (PyCFunction)(void (*)(void))QueueCore_put, METH_FASTCALL | METH_KEYWORDS,
     "put($self, obj, block=True, timeout=None)\n--\n\nPut ``obj``; with ``block`` wait up to ``timeout`` s (None: no\n"
     "limit) for room, else ``queue.Full``."},
    {"get", (PyCFunction)(void (*)(void))QueueCore_get, METH_FASTCALL | METH_KEYWORDS,
     "get($self, block=True, timeout=None, *, lease=False)\n--\n\nTake the next item; with ``block`` wait up to ``timeout`` s "
     "(None:\nno limit), else ``queue.Empty``.\n\n``lease=True`` (an extension; R87): the item's out-of-band buffers\n"
     "(numpy arrays, torch tensors, ...) come back as read-only views of\nthe ring instead of copies, and the item's "
     "ring space stays held\nuntil the last of them is garbage-collected: no receive copy, but\nkeep such objects "
     "briefly (space comes back in ring order: one kept\nfor good stops every producer once the ring wraps around to "
     "it).\nItems without buffers are unaffected."},
    {"_fast_put", (PyCFunction)(void (*)(void))QueueCore_fast_put, METH_FASTCALL, NULL},
    {"_fast_get", (PyCFunction)(void (*)(void))QueueCore_fast_get, METH_FASTCALL, NULL},
    {"_pickled_whole", (PyCFunction)QueueCore_pickled_whole, METH_O, NULL},
    {"_fast_getter", (PyCFunction)QueueCore_fast_getter, METH_NOARGS, NULL},
    {NULL}
};

PyTypeObject QueueCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmring._core.QueueCore",
    .tp_basicsize = sizeof(QueueCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "C half of shmring's queues: the common case of put and get",
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)QueueCore_traverse,
    .tp_clear = (inquiry)QueueCore_clear,
    .tp_dealloc = (destructor)QueueCore_dealloc,
    .tp_methods = QueueCore_methods,
};
