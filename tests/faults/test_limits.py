"""Resource limits give a clear typed error with the numbers, never a raw OSError,
a crash or a SIGBUS.  Each limit is lowered in a forked child only.

Already covered elsewhere: a full filesystem at creation
(tests/test_segment.py::test_no_space_at_creation_is_a_clear_no_space_error,
on a 1 MiB tmpfs, with the bytes asked for and free).
"""
import os
import resource
import traceback

import pytest

import shmring
from shmring.errors import ResourceLimit


def in_child(fn):
    """Run fn() in a forked child; return what it returned (a str) or its traceback."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                out = str(fn())
            except BaseException:
                out = "raised: " + traceback.format_exc()
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def _classify(call):
    try:
        call()
    except ResourceLimit as e:
        assert isinstance(e, shmring.ShmringError) and isinstance(e, OSError)
        return f"ResourceLimit|{e.limit}|{e.requested}|{e.current}|{e}"
    except BaseException as e:
        return f"other|{type(e).__name__}: {e}"
    return "no error"


def _no_more_fds(call):
    def run():
        # The next descriptor gets the lowest free number (earlier tests may
        # have left holes below the highest one): cap the limit there.
        probe = os.open(os.devnull, os.O_RDONLY)
        os.close(probe)
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        return _classify(call)
    return run


@pytest.mark.parametrize("op", ["create", "attach", "create_file", "attach_file"])
def test_the_open_files_limit_is_a_resource_limit_error_naming_it(ring_name, tmp_path, op):
    path = tmp_path / "r.ring"
    if op.startswith("attach"):
        (shmring.Ring.create(path=path, capacity=1 << 12) if op.endswith("file")
         else shmring.Ring.create(ring_name, 1 << 12)).close()
    call = {"create": lambda: shmring.Ring.create(ring_name, 1 << 12),
            "attach": lambda: shmring.Ring.attach(ring_name),
            "create_file": lambda: shmring.Ring.create(path=path, capacity=1 << 12),
            "attach_file": lambda: shmring.Ring.attach(path=path)}[op]
    out = in_child(_no_more_fds(call))
    kind, limit, requested, current, msg = out.split("|", 4)
    assert (kind, limit, requested) == ("ResourceLimit", "RLIMIT_NOFILE", "1"), out
    assert int(current) > 0 and f"soft limit {current}" in msg and "asked for 1 more file descriptor" in msg
    if op == "create":
        assert not os.path.exists(f"/dev/shm/shmring.{ring_name}")     # nothing half-made left behind


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


BIG = 1 << 26                                          # 64 MiB ring


def _little_address_space(call):
    def run():
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + (16 << 20), resource.RLIM_INFINITY))
        return _classify(call)
    return run


@pytest.mark.parametrize("op", ["create", "attach"])
def test_an_exhausted_address_space_is_a_resource_limit_error_with_the_bytes_asked(ring_name, op):
    if op == "attach":
        shmring.Ring.create(ring_name, BIG).close()
        call = lambda: shmring.Ring.attach(ring_name)          # noqa: E731
    else:
        call = lambda: shmring.Ring.create(ring_name, BIG)     # noqa: E731
    out = in_child(_little_address_space(call))
    kind, limit, requested, current, msg = out.split("|", 4)
    want = 4096 + 2 * BIG                              # the data area is mapped twice (R60): address space
    assert (kind, limit, requested) == ("ResourceLimit", "RLIMIT_AS", str(want)), out
    assert f"asked to map {want:,} bytes" in msg and f"RLIMIT_AS soft limit {int(current):,} bytes" in msg
    assert ring_name in msg
    if op == "create":
        assert not os.path.exists(f"/dev/shm/shmring.{ring_name}")
    else:
        with shmring.Ring.attach(ring_name) as r:             # the ring itself is unharmed
            assert r.capacity == BIG


def test_resource_limit_pickles_with_its_fields():
    import pickle
    e = pickle.loads(pickle.dumps(ResourceLimit("msg", "RLIMIT_AS", 10, 20)))
    assert (str(e), e.limit, e.requested, e.current) == ("msg", "RLIMIT_AS", 10, 20)
