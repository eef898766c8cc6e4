/*
 * msgscan.c: what decoding a msgpack value would cost the reader, told
 * before decoding it (shmring.codec's decode limits).
 *
 * A message is untrusted, and msgpack is compact: one byte (0x90, an empty
 * array) becomes a list object of ~72 bytes, so a legal 16 MiB message could
 * grow a reader by more than a gigabyte.  msgpack_cost() walks the encoding
 * once, without allocating, adds up an upper bound of the memory each object
 * costs once decoded by msgpack-python into CPython objects (64-bit), and
 * stops as soon as the sum passes the caller's limit or the nesting passes
 * its depth.  It reads nothing from shared memory: the caller passes a
 * private copy of the meta bytes.
 *
 * The msgpack format is its specification (https://github.com/msgpack/msgpack
 * /blob/master/spec.md); this is a plain reading of its type bytes.
 */
#include "core.h"

/* Upper bounds, in bytes, of what one decoded object costs (CPython 3.9 to
 * 3.13, 64-bit, pymalloc rounding included); tests/test_decode_limits.py
 * checks them against tracemalloc. */
#define COST_SLOT 16        /* an object's place in its container (a list slot, half a dict entry) */
#define COST_INT 40         /* an int outside the small-int cache (-5..256) */
#define COST_FLOAT 24
#define COST_STR 80         /* + 4 per byte: UTF-8 may widen to 4-byte code units */
#define COST_BIN 48         /* + 1 per byte */
#define COST_LIST 72        /* the list object; its slots are its elements' COST_SLOT */
#define COST_MAP 248        /* the dict object and its smallest table */
#define COST_MAP_PAIR 80    /* per entry: the table grows to 2-3 entries of 24 bytes plus indices */
#define COST_EXT 512        /* an ExtType, or a numpy array view and its descriptor */
#define COST_EXT_BYTE 64    /* per byte of ext data (a dtype described in it) */
/* The most any one byte of input can cost (an empty map: COST_MAP + COST_SLOT
 * for one byte); metas below limit / this need no scan. */
#define COST_MAX_PER_BYTE (COST_MAP + COST_SLOT)
#define SCAN_MAX_DEPTH 1024  /* msgpack-python's own stack depth */

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

/* msgpack_cost(meta: bytes-like, limit: int, max_depth: int) -> (cost, depth)
 *
 * cost: the estimated bytes of the decoded objects, or some value above
 * limit once it is passed (the walk stops there); depth: the deepest
 * container nesting seen, or max_depth + 1 if it went deeper (the walk
 * stops there too).  ValueError if the encoding is malformed: truncated, a
 * reserved type byte, or a container announcing more elements than there
 * are bytes left (each element takes at least one). */
PyObject *msgpack_cost(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    unsigned long long limit;
    int max_depth;
    Py_buffer view;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "msgpack_cost(meta, limit, max_depth)");
        return NULL;
    }
    limit = PyLong_AsUnsignedLongLong(args[1]);
    if (limit == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    max_depth = PyLong_AsLong(args[2]) < 1 ? 1 : (int)PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (max_depth > SCAN_MAX_DEPTH) max_depth = SCAN_MAX_DEPTH;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;

    const uint8_t *p = view.buf, *end = p + view.len;
    uint64_t pending[SCAN_MAX_DEPTH + 1];   /* objects still to read at each level */
    int top = 0, deepest = 0;
    uint64_t cost = 0;
    const char *bad = NULL;
    pending[0] = 1;                          /* the one top-level object */
    Py_BEGIN_ALLOW_THREADS
    while (top >= 0 && cost <= limit) {
        if (pending[top] == 0) {
            top--;
            continue;
        }
        pending[top]--;
        if (p >= end) { bad = "truncated"; break; }
        uint8_t b = *p++;
        uint64_t n = 0, elems = 0;           /* payload bytes to skip; elements of a container */
        int hdr = 0, is_map = 0, container = 0;
        cost += COST_SLOT;
        if (b <= 0x7f || b >= 0xe0) {        /* positive fixint; negative fixint (-32..-1) */
            cost += b >= 0xe0 && b < 0xfb ? COST_INT : 0;
        } else if (b <= 0x8f) {
            container = is_map = 1; elems = b & 0x0f;
        } else if (b <= 0x9f) {
            container = 1; elems = b & 0x0f;
        } else if (b <= 0xbf) {
            n = b & 0x1f; cost += COST_STR + 4 * n;
        } else {
            switch (b) {
            case 0xc0: case 0xc2: case 0xc3: break;                       /* nil, false, true */
            case 0xc4: case 0xc5: case 0xc6:                              /* bin 8/16/32 */
                hdr = 1 << (b - 0xc4); break;
            case 0xc7: case 0xc8: case 0xc9:                              /* ext 8/16/32 */
                hdr = 1 << (b - 0xc7); break;
            case 0xca: n = 4; cost += COST_FLOAT; break;
            case 0xcb: n = 8; cost += COST_FLOAT; break;
            case 0xcc: n = 1; break;                                      /* uint8: cached ints */
            case 0xcd: n = 2; cost += COST_INT; break;
            case 0xce: n = 4; cost += COST_INT; break;
            case 0xcf: n = 8; cost += COST_INT; break;
            case 0xd0: n = 1; cost += COST_INT; break;
            case 0xd1: n = 2; cost += COST_INT; break;
            case 0xd2: n = 4; cost += COST_INT; break;
            case 0xd3: n = 8; cost += COST_INT; break;
            case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:        /* fixext 1..16, + type */
                n = 1 + ((uint64_t)1 << (b - 0xd4)); cost += COST_EXT + COST_EXT_BYTE * (n - 1); break;
            case 0xd9: case 0xda: case 0xdb:                              /* str 8/16/32 */
                hdr = 1 << (b - 0xd9); break;
            case 0xdc: case 0xdd:                                         /* array 16/32 */
                container = 1; hdr = b == 0xdc ? 2 : 4; break;
            case 0xde: case 0xdf:                                         /* map 16/32 */
                container = is_map = 1; hdr = b == 0xde ? 2 : 4; break;
            default: bad = "the reserved type byte 0xc1"; break;
            }
            if (bad) break;
            if (hdr) {
                if ((uint64_t)(end - p) < (uint64_t)hdr) { bad = "truncated"; break; }
                uint64_t len = be(p, hdr);
                p += hdr;
                if (container) {
                    elems = len;
                } else if (b >= 0xc4 && b <= 0xc6) {
                    n = len; cost += COST_BIN + n;
                } else if (b >= 0xc7 && b <= 0xc9) {
                    n = len + 1; cost += COST_EXT + COST_EXT_BYTE * len;  /* + its type byte */
                } else {
                    n = len; cost += COST_STR + 4 * n;
                }
            }
        }
        if (container) {
            uint64_t objs = is_map ? 2 * elems : elems;
            if (objs > (uint64_t)(end - p)) { bad = "a container announcing more elements than bytes left"; break; }
            cost += is_map ? COST_MAP + COST_MAP_PAIR * elems : COST_LIST;
            if (objs) {
                if (top + 1 > max_depth) { deepest = max_depth + 1; break; }
                pending[++top] = objs;
                if (top > deepest) deepest = top;
            }
        } else {
            if (n > (uint64_t)(end - p)) { bad = "truncated"; break; }
            p += n;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (bad) {
        PyErr_Format(PyExc_ValueError, "malformed msgpack: %s", bad);
        return NULL;
    }
    return Py_BuildValue("(Ki)", (unsigned long long)cost, deepest);
}

/* For shmring.codec: the bound of what one byte of input may cost. */
const unsigned long long msgscan_max_cost_per_byte = COST_MAX_PER_BYTE;
