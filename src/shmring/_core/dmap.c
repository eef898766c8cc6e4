/*
 * dmap.c: the double map of a ring's data area (rule R60 of docs/design.md).
 *
 * A ring segment's file is header + data (capacity bytes).  In memory it is
 * mapped as header + data + data again, back to back: the second copy of the
 * data area is the same file range (the same pages) mapped right after the
 * first, as the Linux BPF ring buffer does.  A record at offset off of the
 * data area (off < capacity) with size <= capacity is then one contiguous
 * range [off, off + size) of virtual memory even when it wraps: no wrap
 * padding, and a payload (or a view of it) never straddles anything.
 *
 * Python reserves the address space (an anonymous, never-touched mapping of
 * data_offset + 2 * capacity bytes, owned by an mmap.mmap object: its close()
 * unmaps the whole range, its buffer exports pin it, exactly as for a plain
 * mapping); double_map() then maps the file over it with MAP_FIXED, twice.
 */
#include "core.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

/* double_map(reservation, fd, data_offset, capacity, populate): map the
 * segment open at fd over the reservation (data_offset + 2 * capacity bytes):
 * file [0, data_offset + capacity) at its start, file [data_offset,
 * data_offset + capacity) right after.  Raises OSError (the caller closes the
 * reservation) or ShmringError for a geometry that cannot be double-mapped. */
PyObject *double_map(PyObject *mod, PyObject *const *args, Py_ssize_t n) {
    if (n != 5) { PyErr_SetString(PyExc_TypeError, "double_map(reservation, fd, data_offset, capacity, populate)"); return NULL; }
    long fd = PyLong_AsLong(args[1]); if (fd == -1 && PyErr_Occurred()) return NULL;
    if (fd < 0 || fd > 0x7fffffffL) { PyErr_SetString(PyExc_ValueError, "bad file descriptor"); return NULL; }
    unsigned long long doff = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL;
    unsigned long long cap = PyLong_AsUnsignedLongLong(args[3]); if (PyErr_Occurred()) return NULL;
    int populate = PyObject_IsTrue(args[4]); if (populate < 0) return NULL;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) page = 4096;
    if (doff % (unsigned long long)page || cap % (unsigned long long)page || cap == 0 || doff == 0 ||
        cap > SHMR_MAX_CAPACITY || doff > SHMR_MAX_CAPACITY) {
        PyErr_Format(ShmringError, "cannot map this ring's data area twice: data offset %llu and capacity %llu "
                     "must be multiples of the page size (%ld bytes)", doff, cap, page);
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return NULL;
    char *base = (char *)b.buf;
    if ((uint64_t)b.len != doff + 2 * cap || (uintptr_t)base % (uintptr_t)page) {
        PyBuffer_Release(&b);
        PyErr_Format(PyExc_ValueError, "reservation of %zd bytes at %p, expected %llu page-aligned bytes",
                     b.len, (void *)base, doff + 2 * cap);
        return NULL;
    }
    int flags = MAP_SHARED | MAP_FIXED | (populate ? MAP_POPULATE : 0);
    void *p = mmap(base, (size_t)(doff + cap), PROT_READ | PROT_WRITE, flags, (int)fd, 0);
    if (p != MAP_FAILED)
        p = mmap(base + doff + cap, (size_t)cap, PROT_READ | PROT_WRITE, flags, (int)fd, (off_t)doff);
    int err = errno;
    PyBuffer_Release(&b);
    if (p == MAP_FAILED) { errno = err; return PyErr_SetFromErrno(PyExc_OSError); }
    Py_RETURN_NONE;
}
