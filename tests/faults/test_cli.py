"""The operations CLI, run as users run it: ``python -m shmring ...`` in a subprocess."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import multiprocess
import pytest

import shmring

SHM = "/dev/shm/shmring."
CTX = multiprocess.get_context("fork")


def run(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "shmring", *args], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    if check:
        assert r.returncode == 0, r.stderr
    return r


def fits_80(text):
    return all(len(line) <= 80 for line in text.splitlines())


def _make_and_die(name, send):
    """Create a ring, take the producer role, send, and die without cleaning up."""
    r = shmring.Ring.create(name, 1 << 12)
    p = r.producer()
    for _ in range(send):
        p.send(b"x" * 100)
    os._exit(0)


def orphan(name, send=3):
    p = CTX.Process(target=_make_and_die, args=(name, send))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    return p.pid


@pytest.fixture
def names():
    made = []

    def new(tag):
        n = f"{tag}-{uuid.uuid4().hex[:8]}"               # short: ls prints 22 characters of a name
        made.append(n)
        return n
    yield new
    for n in made:
        shmring.unlink(n, missing_ok=True)


def test_ls_shows_kind_size_fill_live_and_dead_pids_and_full_names(names):
    # a long name is shown in full (issue 16 case 7: a cut name cannot be pasted into stat)
    live, dead = names("live"), names("dead" + "x" * 25)
    dead_pid = orphan(dead, send=4)
    with shmring.Ring.create(live, 1 << 12) as ring, ring.consumer():
        out = run("ls").stdout
        rows = {line.split()[0]: line for line in out.splitlines()[1:]}
        row = rows[live]
        assert row.split()[1:5] == ["spsc", "8K", "0.0%", "-"] and row.split()[5] == str(os.getpid())
        drow = rows[dead]
        assert f"{dead_pid}(dead)" in drow and "10.9%" in drow       # 4 records of 112 bytes in 4 KiB
        data = {r["name"]: r for r in json.loads(run("ls", "--json").stdout)}
        assert data[live]["consumer"] == {"pid": os.getpid(), "alive": True, "sessions": 1}
        assert data[live]["live_users"] == [os.getpid()]
        assert data[dead]["producer"]["pid"] == dead_pid and data[dead]["live_users"] == []
        assert data[dead]["used"] == 4 * 112 and data[dead]["age_s"] >= 0


def test_ls_reports_a_foreign_segment_without_failing(names):
    bad = names("foreign")
    with open(SHM + bad, "wb") as f:
        f.write(b"NOTARING" * 1000)
    out = run("ls").stdout
    line = next(line for line in out.splitlines() if line.split()[0] == bad)
    assert "not a shmring segment" in line
    row = next(r for r in json.loads(run("ls", "--json").stdout) if r["name"] == bad)
    assert row["kind"] == "?" and "magic 0x474e495241544f4e" in row["error"]


def test_stat_shows_positions_roles_and_counters(names):
    n = names("stat")
    with shmring.Ring.create(n, 1 << 12) as ring, ring.producer() as prod:
        prod.send(b"y" * 56)                          # one 64-byte record
        out = run("stat", n).stdout
        assert fits_80(out) and "write 64  read 0" in out and f"producer     {os.getpid()}  sessions 1" in out
        st = json.loads(run("stat", n, "--json").stdout)
        assert (st["write_pos"], st["read_pos"], st["closed"]) == (64, 0, None)


def test_stat_of_a_missing_segment_is_a_one_line_error():
    r = run("stat", "no-such-ring-here", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_stat_watch_reports_rates_from_position_deltas(names):
    n = names("watch")
    with shmring.Ring.create(n, 1 << 12) as ring, ring.producer() as prod, ring.consumer() as cons:
        proc = subprocess.Popen([sys.executable, "-m", "shmring", "stat", n, "--watch", "--json",
                                 "--interval", "0.05", "--count", "3"], stdout=subprocess.PIPE, text=True)
        first = json.loads(proc.stdout.readline())
        assert "rate_in_Bps" not in first                   # no delta yet
        for _ in range(30):                                  # move both positions before the next sample
            prod.send(b"z" * 56)
            assert cons.recv_bytes(timeout=5)
        second = json.loads(proc.stdout.readline())
        rest = [json.loads(line) for line in proc.stdout]
        assert proc.wait(30) == 0 and len(rest) == 1
    assert second["write_pos"] - first["write_pos"] >= 0
    assert second["rate_in_Bps"] >= 0 and second["rate_out_Bps"] >= 0
    moved = [s for s in (second, rest[0]) if s["rate_in_Bps"] > 0]
    assert moved, "30 messages were sent between samples 1 and 3, so some delta is positive"


def test_stat_watch_refreshes_until_ctrl_c_and_exits_cleanly(names):
    n = names("ctrlc")
    with shmring.Ring.create(n, 1 << 12):
        proc = subprocess.Popen([sys.executable, "-m", "shmring", "stat", n, "--watch", "--interval", "0.05"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        while sum("Ctrl-C" in line for line in lines) < 2:    # two refreshes seen
            lines.append(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err
    assert fits_80("".join(lines) + out)


def test_gc_removes_only_segments_whose_processes_and_creator_are_all_dead(names):
    dead, used, mine, foreign = names("gcdead"), names("gcused"), names("gcmine"), names("gcforeign")
    orphan(dead)
    orphan(used)
    with open(SHM + foreign, "wb") as f:
        f.write(b"\xff" * 8192)
    os.utime(SHM + foreign, (time.time() - 3600, time.time() - 3600))    # old: not being created
    ring_used = shmring.Ring.attach(used)
    cons = ring_used.consumer()                             # a live user: this process
    ring_mine = shmring.Ring.create(mine, 1 << 12)          # no roles, but its creator (us) is alive
    try:
        todo = [dead, used, mine, foreign]
        plan = {p["name"]: p for p in json.loads(run("gc", "--dry-run", "--json", *todo).stdout)}
        assert {k: v["action"] for k, v in plan.items()} == {
            dead: "remove", used: "keep", mine: "keep", foreign: "keep"}
        assert str(os.getpid()) in plan[used]["why"] and "--force" in plan[foreign]["why"]
        assert all(os.path.exists(SHM + n) for n in todo)  # a dry run removes nothing

        out = run("gc", *todo).stdout
        assert f"removed      {dead}" in out            # reasons are not cut at 80 columns
        assert not os.path.exists(SHM + dead)
        assert all(os.path.exists(SHM + n) for n in (used, mine, foreign))
        cons.recv_bytes(timeout=5)                          # the kept ring still works

        run("gc", "--force", *todo)
        assert not os.path.exists(SHM + foreign) and os.path.exists(SHM + used) and os.path.exists(SHM + mine)
    finally:
        cons.close()
        ring_used.close()
        ring_mine.close()


def test_gc_leaves_a_segment_being_created_alone_even_with_force(names):
    young = names("gcyoung")
    with open(SHM + young, "wb") as f:                     # what a creator has right after shm_open
        f.write(b"\0" * 100)
    plan = json.loads(run("gc", "--force", "--json", young).stdout)
    assert plan[0]["action"] == "keep" and "younger" in plan[0]["why"] and os.path.exists(SHM + young)


def test_rm_removes_a_segment_and_reports_a_missing_one(names):
    n = names("rm")
    shmring.Ring.create(n, 1 << 12).close()
    assert run("rm", n).stdout.strip() == f"removed {n}"
    r = run("rm", n, check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_ls_and_stat_show_multi_party_and_record_rings():
    import numpy as np
    ring_name = f"m{uuid.uuid4().hex[:8]}"             # short: ls shows 22 characters of a name
    rings = [shmring.Ring.create(f"{ring_name}-{k}", 1 << 14, kind=k) for k in ("mpsc", "broadcast", "mpmc")]
    rings.append(shmring.Ring.create(f"{ring_name}-rec", 1 << 14, dtype=np.dtype([("a", "<u8"), ("b", "<f8")])))
    try:
        handles = []
        for r in rings:
            p, c = r.producer(), r.consumer()
            handles += [p, c]
            p.send_many([(1, 2.0)] if r.dtype is not None else [b"abc", b"de"])
        ls = subprocess.run([sys.executable, "-m", "shmring", "ls"], capture_output=True, text=True, timeout=60)
        assert ls.returncode == 0, ls.stderr
        for k in ("mpsc", "broadcast", "mpmc"):
            row = next(line for line in ls.stdout.splitlines() if line.startswith(f"{ring_name}-{k} "))
            assert k in row and "1 live" in row
        for k, want in (("mpsc", "consumer"), ("broadcast", "subscribers"), ("mpmc", "consumers"), ("rec", "records")):
            st = subprocess.run([sys.executable, "-m", "shmring", "stat", f"{ring_name}-{k}"],
                                capture_output=True, text=True, timeout=60)
            assert st.returncode == 0, st.stderr
            assert want in st.stdout
            if k != "rec":
                assert "sent 2" in st.stdout and f"[0] {os.getpid():>14}" in st.stdout
        for h in handles:
            h.close()
    finally:
        for r in rings:
            r.close()
            r.unlink()
