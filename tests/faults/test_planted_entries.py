"""What anyone can plant in /dev/shm, and copied ring files: sparse giants,
forged headers, directories, FIFOs and symbolic links under a shmring name,
and a sparse copy of a ring file on a filesystem without room for its holes.

``shmring ls`` / ``stat`` / ``gc`` and attach read only the header page of a
segment before validating it (never map-and-populate the whole file), skip and
report what is not a regular file, and attach re-reserves the space of a
segment with holes (NoSpace now instead of SIGBUS later).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

import shmring
from shmring import layout as L

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces, tmpfs, chown)")
SHM = "/dev/shm/shmring."


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "shmring", *args], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r


# --------------------------------------------------------------------------- a planted 1 GiB sparse file

# Runs in a private mount namespace whose /dev/shm is a 64 MiB tmpfs: plants
# (as another uid) a 1 GiB sparse file of zeros and a 512 MiB sparse file
# whose header page is a forged but valid ring header, then runs the CLI and
# attach on them, and prints how much of the tmpfs each step used.
PLANTED = textwrap.dedent(r"""
    import json, os, subprocess, sys
    import shmring
    from shmring import layout as L

    def used():
        s = os.statvfs("/dev/shm")
        return (s.f_blocks - s.f_bfree) * s.f_frsize

    out = {"start": used()}
    with open("/dev/shm/shmring.zeros", "wb") as f:
        f.truncate(1 << 30)
    os.chown("/dev/shm/shmring.zeros", 65534, 65534)
    # a valid ring header claiming a 512 MiB data area, on a sparse file of that size
    cap = 1 << 29
    with shmring.Ring.create("model", 4096) as r:
        head = bytearray(r._seg.buf[:L.HEADER_SIZE])
    L.HEADER_STRUCT.pack_into(head, 0, *[{"capacity": cap, "max_message": L.max_message(cap),
                                          "segment_size": L.segment_size(cap)}.get(k, v)
                                         for k, v in zip(L.HEADER_FIELDS, L.HEADER_STRUCT.unpack_from(head, 0))])
    with open("/dev/shm/shmring.forged", "wb") as f:
        f.write(head)
        f.truncate(L.segment_size(cap))
    os.chown("/dev/shm/shmring.forged", 65534, 65534)
    out["planted"] = used()

    def cli(*a):
        r = subprocess.run([sys.executable, "-m", "shmring", *a], capture_output=True, text=True, timeout=60)
        return {"rc": r.returncode, "out": r.stdout, "err": r.stderr, "used": used()}

    out["ls"] = cli("ls")
    out["ls_json"] = cli("ls", "--json")
    out["stat_zeros"] = cli("stat", "zeros")
    out["stat_forged"] = cli("stat", "forged")
    out["gc_dry"] = cli("gc", "--dry-run")
    for name in ("zeros", "forged"):
        for kw in ({}, {"allow_foreign_owner": True}):
            for opener in (shmring.Ring.attach, shmring.SharedState.attach):
                key = f"{opener.__qualname__}({name}{', foreign ok' if kw else ''})"
                try:
                    opener(name, **kw).close()
                    out[key] = {"error": None, "used": used()}
                except Exception as e:
                    out[key] = {"error": f"{type(e).__name__}: {e}", "used": used()}
    out["gc"] = cli("gc")
    print(json.dumps(out))
""")


def _in_tiny_dev_shm(script):
    cmd = ["unshare", "-m", "sh", "-c",
           f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} -c \"$0\"", script]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode and ("unshare" in r.stderr or "mount" in r.stderr) and not r.stdout:
        pytest.skip(f"no private mount namespace with a tmpfs here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@root_only
def test_a_planted_sparse_gigabyte_is_never_allocated_by_ls_stat_gc_or_attach():
    out = _in_tiny_dev_shm(PLANTED)
    tiny = out["planted"] + (1 << 20)                   # a header page or two, never the file
    steps = {k: v for k, v in out.items() if isinstance(v, dict)}
    assert all(v["used"] <= tiny for v in steps.values()), {k: v["used"] for k, v in steps.items()}
    for k in ("ls", "ls_json", "gc_dry", "gc"):
        assert steps[k]["rc"] == 0, (k, steps[k]["err"])
    zrow = next(line for line in out["ls"]["out"].splitlines() if line.startswith("zeros"))
    assert "not initialized" in zrow                    # reported, not mapped
    rows = {r["name"]: r for r in json.loads(out["ls_json"]["out"])}
    assert rows["forged"]["capacity"] == 1 << 29 and rows["forged"]["owner_uid"] == 65534
    assert steps["stat_zeros"]["rc"] == 1 and "not initialized" in steps["stat_zeros"]["err"]
    assert steps["stat_forged"]["rc"] == 0 and "owner uid 65534" in steps["stat_forged"]["out"]
    for name in ("zeros", "forged"):                     # another uid's: refused before anything is mapped
        assert steps[f"Ring.attach({name})"]["error"].startswith("PermissionDenied")
        assert steps[f"SharedState.attach({name})"]["error"].startswith("PermissionDenied")
    assert steps["Ring.attach(zeros, foreign ok)"]["error"].startswith("CorruptSegmentError")
    # the forged ring is valid: attaching for use reserves its 512 MiB, which do not fit
    err = steps["Ring.attach(forged, foreign ok)"]["error"]
    assert err.startswith("NoSpace") and "536,875,008 bytes" in err and "/dev/shm" in err, err
    assert steps["SharedState.attach(forged, foreign ok)"]["error"].startswith("IncompatibleSegment")


# --------------------------------------------------------------------------- entries that are not files

def _plant(kind, path):
    if kind == "directory":
        os.mkdir(path)
    elif kind == "FIFO":
        os.mkfifo(path)
    else:
        os.symlink("/etc/hostname", path)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)


@pytest.fixture(params=["directory", "FIFO", "symbolic link"])
def planted_entry(request, ring_name):
    path = SHM + ring_name
    _plant(request.param, path)
    yield ring_name, request.param
    _remove(path)


def test_attaching_a_name_that_is_not_a_file_is_a_typed_error_naming_the_entry(planted_entry):
    name, kind = planted_entry
    for attach in (shmring.Ring.attach, shmring.SharedState.attach):
        with pytest.raises(shmring.ShmringError) as ei:
            attach(name, wait=0.05)
        e = ei.value
        assert isinstance(e, (shmring.CorruptSegmentError, shmring.PermissionDenied)), type(e)
        assert SHM + name in str(e) and kind in str(e), str(e)


def test_ls_and_gc_skip_and_report_entries_that_are_not_files_and_keep_working(planted_entry, ring_name):
    name, kind = planted_entry
    orphan = ring_name + "-orphan"
    shmring.Ring.create(orphan, 4096).close()           # nobody has it mapped: gc removes it
    try:
        r = cli("ls")
        assert r.returncode == 0, r.stderr
        row = next(line for line in r.stdout.splitlines() if line.startswith(name[:20] + " "))
        assert kind in row and "not a segment" in row, row
        assert any(line.startswith(orphan[:20]) and "spsc" in line for line in r.stdout.splitlines())
        rows = {x["name"]: x for x in json.loads(cli("ls", "--json").stdout)}
        assert rows[name]["skipped"] is True and rows[name]["entry"] == "a " + kind
        r = cli("gc", "--json", name, orphan)
        assert r.returncode == 0, r.stderr
        plan = {x["name"]: x for x in json.loads(r.stdout)}
        assert plan[name]["action"] == "skip" and kind in plan[name]["why"]
        assert plan[orphan]["action"] == "removed"
        assert os.path.lexists(SHM + name)                # left alone
        assert name not in shmring.list_segments()        # not a segment
    finally:
        shmring.unlink(orphan, missing_ok=True)


# --------------------------------------------------------------------------- a sparse copy of a ring file

@pytest.fixture
def tiny_tmpfs(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {r.stderr.strip() or r.returncode}")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(directory):
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\xff" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def _attach_and_send_in_child(path):
    """0: attach raised NoSpace; 1: attached and sent over every byte; 2: other error; -SIGBUS: died."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            try:
                with shmring.Ring.attach(path=path) as ring, ring.producer() as p, ring.consumer() as c:
                    assert c.recv_bytes(timeout=5) == b"kept"
                    for i in range(8):
                        p.send(bytes([i]) * 60_000)
                        assert c.recv_bytes(timeout=5) == bytes([i]) * 60_000
                code = 1
            except shmring.NoSpace as e:
                code = 0 if str(path) in str(e) and "bytes free" in str(e) else 3
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@root_only
def test_attaching_a_sparse_copy_of_a_ring_file_on_a_full_filesystem_is_no_space_not_sigbus(tmp_path, tiny_tmpfs):
    src = tmp_path / "orig.ring"
    with shmring.Ring.create(path=src, capacity=1 << 18) as ring, ring.producer() as p:
        p.send(b"kept")
        p.detach()
    copy = tiny_tmpfs / "copy.ring"
    subprocess.run(["cp", "--sparse=always", str(src), str(copy)], check=True, timeout=20)
    assert os.stat(copy).st_blocks * 512 < os.stat(copy).st_size            # the copy has holes
    _fill(tiny_tmpfs)
    code = _attach_and_send_in_child(copy)
    assert code == 0, {1: "attached with holes on a full filesystem", 2: "another error",
                       -signal.SIGBUS: "SIGBUS"}.get(code, code)
    os.unlink(tiny_tmpfs / "filler")                      # with room, attach fills the holes and works
    assert _attach_and_send_in_child(copy) == 1
    assert os.stat(copy).st_blocks * 512 >= os.stat(copy).st_size


def test_attaching_a_fully_allocated_ring_reserves_nothing_more(tmp_path):
    path = tmp_path / "r.ring"
    shutil.rmtree(path, ignore_errors=True)
    with shmring.Ring.create(path=path, capacity=1 << 16):
        blocks = os.stat(path).st_blocks
        with shmring.Ring.attach(path=path) as again:
            assert again.capacity == 1 << 16
        assert os.stat(path).st_blocks == blocks
    assert L.segment_size(1 << 16) <= blocks * 512
