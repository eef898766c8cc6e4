"""The `shmring` command as a new user meets it (issue 16 case 7): full names in
`ls`, quiet under a closed pipe, `rm` that refuses segments in use without
--force, --version, and `stat --path` for file-backed rings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shmring
from shmring import cli


def run(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "shmring", *argv], capture_output=True, text=True, timeout=timeout)


def test_ls_shows_long_names_in_full(ring_name, capsys):
    long = ring_name + "-a-rather-long-pipeline-stage-name-0"
    other = ring_name + "-a-rather-long-pipeline-stage-name-1"
    with shmring.Ring.create(long, 1 << 12), shmring.Ring.create(other, 1 << 12):
        assert cli.main(["ls"]) == 0
        out = capsys.readouterr().out
        assert long in out.split() and other in out.split(), out
        assert cli.main(["stat", long]) == 0            # what ls shows can be pasted into stat


def test_ls_json_into_a_closed_pipe_exits_quietly(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12):
        p = subprocess.Popen([sys.executable, "-m", "shmring", "ls", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        p.stdout.close()                                # as `| head -0` would
        err = p.stderr.read().decode()
        p.wait(60)
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
        assert p.returncode == 141                      # 128 + SIGPIPE, as ls or cat would end


def test_ls_json_piped_into_head_prints_no_error(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12):
        r = subprocess.run(f"{sys.executable} -m shmring ls --json | head -1", shell=True, capture_output=True,
                           text=True, timeout=60)
        assert r.stdout.strip() == "[" and r.stderr == "", r.stderr


def test_rm_refuses_a_segment_in_use_unless_forced(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring:
        with ring.producer():
            r = run("rm", ring_name)
            assert r.returncode == 1
            assert "in use" in r.stderr and "--force" in r.stderr and ring_name in r.stderr, r.stderr
            assert Path(f"/dev/shm/shmring.{ring_name}").exists()
            r = run("rm", "--force", ring_name)
            assert r.returncode == 0 and f"removed {ring_name}" in r.stdout
            assert not Path(f"/dev/shm/shmring.{ring_name}").exists()


def test_rm_removes_an_unused_segment_without_force(ring_name):
    shmring.Ring.create(ring_name, 1 << 12).close()
    r = run("rm", ring_name)
    assert r.returncode == 0 and not Path(f"/dev/shm/shmring.{ring_name}").exists()


def test_rm_json_reports_each_name(ring_name):
    shmring.Ring.create(ring_name, 1 << 12).close()
    r = run("rm", "--json", ring_name, ring_name + "-missing")
    assert r.returncode == 1
    rows = json.loads(r.stdout)
    assert [(x["name"], x["action"]) for x in rows] == [(ring_name, "removed"), (ring_name + "-missing", "failed")]


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"shmring {shmring.__version__}"


def test_stat_path_inspects_a_file_backed_ring(tmp_path, capsys):
    path = tmp_path / "ring.shm"
    with shmring.Ring.create(path=path, capacity=1 << 12) as ring:
        with ring.producer() as prod:
            prod.send(b"x" * 100)
            assert cli.main(["stat", "--path", str(path), "--json"]) == 0
            st = json.loads(capsys.readouterr().out)
            assert st["used"] == 112 and st["path"] == str(path)
            assert cli.main(["stat", "--path", str(path)]) == 0
            assert str(path) in capsys.readouterr().out
    assert cli.main(["stat", "--path", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err


def test_stat_needs_a_name_or_a_path(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["stat"])
    assert ei.value.code == 2


def test_ls_leaves_out_a_segment_that_vanishes_mid_listing(monkeypatch, capsys):
    # issue 16 case 7 leftover: a segment unlinked between the directory listing
    # and ls's look at it is gone, not "does not exist" in the listing.
    import shmring
    from shmring import cli
    keep, vanish = f"lsv-keep-{os.getpid()}", f"lsv-gone-{os.getpid()}"
    a = shmring.Ring.create(keep, 1 << 16)
    b = shmring.Ring.create(vanish, 1 << 16)
    b.close()
    real = cli._raw_header

    def racing(name, path=None):
        if name == vanish:
            shmring.unlink(vanish, missing_ok=True)     # another process removes it right now
        return real(name, path)
    monkeypatch.setattr(cli, "_raw_header", racing)
    try:
        for argv in (["ls"], ["ls", "--json"]):
            b2 = shmring.Ring.create(vanish, 1 << 16, replace_dead=True)
            b2.close()
            assert cli.main(argv) == 0
            out = capsys.readouterr().out
            assert keep in out and vanish not in out and "does not exist" not in out
    finally:
        a.close()
        shmring.unlink(keep, missing_ok=True)
        shmring.unlink(vanish, missing_ok=True)
