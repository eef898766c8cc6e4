"""Each limit or impossible value gets a typed error naming the real cause and
what to do: the kernel's map count, the file-size limit (and SIGXFSZ never
kills), the open-files count, an infinite eviction bound, a record dtype numpy
cannot make arrays of, and forged positions in ``ls`` / ``stat``.  Limits are
lowered in forked children only.
"""
import json
import math
import mmap
import os
import resource
import signal
import struct
import subprocess
import sys

import msgpack
import numpy as np
import pytest

import shmring
from shmring import layout as L
from shmring.errors import ResourceLimit

from test_limits import _classify, _no_more_fds, in_child


# --------------------------------------------------------------------------- the kernel's map count

def _no_more_mappings(call, warm):
    def run():
        keep = [bytearray(64) for _ in range(20000)]        # room in the allocator's pools for the call
        warm()                                               # the same call once, while it still fits
        maps = []
        try:
            while True:                                      # shared anonymous mappings never merge
                maps.append(mmap.mmap(-1, mmap.PAGESIZE))
        except OSError:
            pass
        del keep
        out = _classify(call)
        maps.clear()
        return out
    return run


@pytest.mark.parametrize("op", ["create", "attach"])
def test_the_kernels_map_count_limit_is_named_not_the_address_space(ring_name, op):
    other = ring_name + "-a"
    shmring.Ring.create(other, 1 << 12).close()
    try:
        if op == "create":
            def call():
                shmring.Ring.create(ring_name, 1 << 12).close()
                shmring.unlink(ring_name)
            warm = call
        else:
            def call():
                shmring.Ring.attach(other).close()
            warm = call
        out = in_child(_no_more_mappings(call, warm))
    finally:
        shmring.unlink(other, missing_ok=True)
    kind, limit, requested, current, msg = out.split("|", 4)
    with open("/proc/sys/vm/max_map_count") as f:
        max_maps = int(f.read())
    assert (kind, limit, current) == ("ResourceLimit", "vm.max_map_count", str(max_maps)), out
    assert "RLIMIT_AS" not in msg and f"vm.max_map_count {max_maps:,}" in msg and "sysctl" in msg, msg
    assert not os.path.exists(f"/dev/shm/shmring.{ring_name}")


# --------------------------------------------------------------------------- the file-size limit

def _small_file_size_limit(call, sigxfsz):
    def run():
        signal.signal(signal.SIGXFSZ, sigxfsz)             # SIG_DFL: the signal would kill us
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        return _classify(call)
    return run


@pytest.mark.parametrize("sigxfsz", [signal.SIG_IGN, signal.SIG_DFL], ids=["python-default", "sig-dfl"])
@pytest.mark.parametrize("where", ["posix", "file"])
def test_a_file_over_the_file_size_limit_is_named_and_sigxfsz_never_kills(ring_name, tmp_path, where, sigxfsz):
    path = tmp_path / "big.ring"
    call = ((lambda: shmring.Ring.create(ring_name, 1 << 22)) if where == "posix"      # noqa: E731
            else (lambda: shmring.Ring.create(path=path, capacity=1 << 22)))
    out = in_child(_small_file_size_limit(call, sigxfsz))
    assert out, "the child died (SIGXFSZ?)"
    kind, limit, requested, current, msg = out.split("|", 4)
    want = L.segment_size(1 << 22)
    assert (kind, limit, requested, current) == ("ResourceLimit", "RLIMIT_FSIZE", str(want), str(1 << 20)), out
    assert f"{want:,}" in msg and "1,048,576" in msg and "ulimit -f" in msg and "free" not in msg, msg
    assert not path.exists() and not os.path.exists(f"/dev/shm/shmring.{ring_name}")


# --------------------------------------------------------------------------- open files

def test_the_open_files_error_counts_the_descriptors_really_open(ring_name):
    shmring.Ring.create(ring_name, 1 << 12).close()
    out = in_child(_no_more_fds(lambda: shmring.Ring.attach(ring_name)))
    kind, limit, requested, current, msg = out.split("|", 4)
    assert (kind, limit) == ("ResourceLimit", "RLIMIT_NOFILE"), out
    assert "-1 descriptors" not in msg and f"{current} descriptors open" in msg, msg


# --------------------------------------------------------------------------- evict_after=inf

def test_evict_after_infinity_means_never_evict(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12, kind="broadcast", policy="evict",
                             evict_after=math.inf) as ring:
        assert ring.stats()["evict_after"] == math.inf
        sub = ring.subscribe("oldest")
        with ring.producer() as p:
            sent = 0
            while p.try_send(b"x" * 500):
                sent += 1
            with pytest.raises(shmring.Timeout):           # blocked by the subscriber, never evicting it
                p.send(b"x" * 500, timeout=0.3)
        for _ in range(sent):                              # no Lagged: it was never evicted
            sub.recv_bytes(timeout=5)
        with pytest.raises(shmring.EndOfStream):
            sub.recv_bytes(timeout=5)
        sub.close()
        with shmring.Ring.attach(ring_name) as again:
            assert again.stats()["evict_after"] == math.inf
    with pytest.raises(ValueError, match="evict_after"):
        shmring.Ring.create(ring_name, 1 << 12, kind="broadcast", policy="evict", evict_after=math.nan)


# --------------------------------------------------------------------------- record dtypes numpy cannot use

def _nested(levels):
    spec = "<f8"
    for _ in range(levels):
        spec = {"base": spec, "shape": [1]}
    return msgpack.packb(spec)


@pytest.mark.parametrize("levels", [70, 140])
def test_a_record_ring_whose_dtype_numpy_cannot_use_is_refused_at_attach(ring_name, levels):
    descr = _nested(levels)
    with shmring.Ring.create(ring_name, 1 << 12, dtype="<f8") as ring:
        if len(descr) > L.RC_MAX_DESCR:
            pytest.skip("this nesting depth makes a dtype description longer than the header holds "
                        "(RC_MAX_DESCR): create refuses it, so there is nothing to attach")
        L.RC_STRUCT.pack_into(ring._seg.buf, L.RC_OFF_ITEMSIZE, 8, 512, len(descr))
        ring._seg.buf[L.RC_OFF_DESCR:L.RC_OFF_DESCR + len(descr)] = descr
        with pytest.raises(shmring.CorruptSegmentError, match=ring_name) as ei:
            shmring.Ring.attach(ring_name)
        assert "dtype" in str(ei.value)


def test_a_record_ring_with_a_subarray_field_still_works(ring_name):
    dt = np.dtype([("t", "<f8"), ("v", "<f4", (3,))])
    recs = np.zeros(4, dt)
    recs["v"] = np.arange(12).reshape(4, 3)
    with shmring.Ring.create(ring_name, 1 << 12, dtype=dt) as ring:
        with shmring.Ring.attach(ring_name) as again, again.producer() as p, ring.consumer() as c:
            p.send_many(recs)
            with c.recv_many(10, timeout=5) as batch:
                assert batch.contiguous()["v"].tolist() == recs["v"].tolist()


# --------------------------------------------------------------------------- forged positions in ls / stat

def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "shmring", *args], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r


@pytest.mark.parametrize("kind", ["spsc", "records", "mpsc"])
def test_ls_and_stat_show_forged_positions_as_invalid_not_as_a_fill(ring_name, kind):
    kw = {"records": {"dtype": "<f8"}, "mpsc": {"kind": "mpsc"}}.get(kind, {})
    with shmring.Ring.create(ring_name, 1 << 12, **kw) as ring:
        struct.pack_into("<Q", ring._seg.buf, L.OFF_READ_POS, 26843545600 * 41)   # read far ahead of write
        r = _cli("ls")
        row = next(line for line in r.stdout.splitlines() if line.startswith(ring_name[:20] + " "))
        assert r.returncode == 0 and "%" not in row and "invalid" in row, row
        st = json.loads(_cli("stat", ring_name, "--json").stdout)
        assert st["fill"] is None and "impossible" in st["invalid"]
        r = _cli("stat", ring_name)
        assert "invalid" in r.stdout and "-" + "26843545600" not in r.stdout and "%" not in r.stdout.split("fill")[1].split("\n")[0], r.stdout
