"""shmring record / replay and the record file format (docs/record-format.md)."""
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import shmring
from shmring import recordfile as F
from shmring.record import record, replay

from _procs import finish, start
from _record_workers import digest, mixed, produce_mixed, record_until_killed

N = 240


def _replayed(path, name, **kw):
    """Replay ``path`` into a new ring; the digests received and how the stream ended."""
    ring = shmring.Ring.create(name, 1 << 20)
    got, end = [], None
    try:
        cons = ring.consumer()
        err = []

        def run():
            try:
                replay(path, ring, **kw)
            except BaseException as e:        # raised here, after the consumer saw the stream end
                err.append(e)
        t = threading.Thread(target=run)
        t.start()
        try:
            while True:
                with cons.recv(timeout=30) as m:
                    got.append(digest(m.value))
        except (shmring.EndOfStream, shmring.PeerGone) as e:
            end = type(e).__name__
        t.join(30)
        cons.close()
    finally:
        ring.close()
        ring.unlink()
    if err:
        assert end == "PeerGone"              # a replay that failed aborts the stream: consumers are told
        raise err[0]
    return got, end


def test_a_mixed_stream_from_another_process_is_recorded_by_the_command_and_replayed_exactly(ring_name, mp, procs,
                                                                                         tmp_path):
    ring = shmring.Ring.create(ring_name, 1 << 18)
    path = tmp_path / "s.rec"
    rec = subprocess.Popen([sys.executable, "-m", "shmring", "record", ring_name, str(path), "--crc"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        p = start(procs, mp, produce_mixed, ring_name, N)
        out, _ = rec.communicate(timeout=60)
    finally:
        if rec.poll() is None:
            rec.kill()
    assert finish(p) == 0
    assert rec.returncode == 0, out
    assert f"recorded {N} messages" in out and "end of stream" in out
    want = [digest(mixed(i)) for i in range(N)]
    with F.open_file(path) as f:                       # the pure-Python reader
        assert f.end == "end of stream" and f.records == N and f.torn_bytes == 0
        assert [digest(r.value()) for r in f if r.kind != "end"] == want
        assert [r.kind for r in list(f)[:3]] == ["bytes", "array", "object"]
    got, end = _replayed(path, ring_name + "-r", speed=None)
    assert got == want and end == "EndOfStream"
    ring.close()


@pytest.mark.parametrize("method", ["kernel", "write"])
def test_payloads_go_through_the_kernel_copy_or_the_write_fallback_as_asked(ring_name, tmp_path, method):
    ring = shmring.Ring.create(ring_name, 1 << 20)
    with ring.producer() as prod:
        for i in range(30):
            prod.send(mixed(i))
    r = record(ring, tmp_path / "k.rec", method=method)
    total = r["bytes"]
    assert r["messages"] == 30 and r["end"] == "end of stream"
    assert (r["kernel_bytes"], r["user_bytes"]) == ((total, 0) if method == "kernel" else (0, total))
    with F.open_file(tmp_path / "k.rec") as f:
        assert [digest(x.value()) for x in f if x.kind != "end"] == [digest(mixed(i)) for i in range(30)]
    ring.close()


def test_a_recorder_killed_mid_record_leaves_a_torn_tail_that_open_truncates(ring_name, mp, procs, tmp_path):
    ring = shmring.Ring.create(ring_name, 1 << 20)
    path = tmp_path / "torn.rec"
    with ring.producer() as prod:
        for i in range(N):
            prod.send(mixed(i))
    kill_at = 101
    r = start(procs, mp, record_until_killed, ring_name, str(path), kill_at)
    assert finish(r) == -signal.SIGKILL
    size = path.stat().st_size
    with F.open_file(path, repair=False) as f:          # detected, file left alone
        assert f.records == kill_at and f.end is None and f.torn_bytes == F.REC_HDR_SIZE
    assert path.stat().st_size == size
    with F.open_file(path) as f:                        # detected and truncated
        assert f.torn_bytes == F.REC_HDR_SIZE
    assert path.stat().st_size == size - F.REC_HDR_SIZE
    got, end = _replayed(path, ring_name + "-r", speed=None)
    assert got == [digest(mixed(i)) for i in range(kill_at)] and end == "EndOfStream"
    # the killed recorder never released message kill_at: a new recorder starts there
    r2 = record(ring, tmp_path / "rest.rec")
    assert r2["messages"] == N - kill_at
    ring.close()


def test_a_recorder_killed_at_a_random_moment_leaves_a_readable_prefix(ring_name, mp, procs, tmp_path):
    ring = shmring.Ring.create(ring_name, 1 << 16)
    path = tmp_path / "k9.rec"
    rec = subprocess.Popen([sys.executable, "-m", "shmring", "record", ring_name, str(path), "--method", "kernel"])
    start(procs, mp, produce_mixed, ring_name, 100000)
    deadline = time.monotonic() + 30
    while (not path.exists() or path.stat().st_size < 200_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    rec.send_signal(signal.SIGKILL)
    rec.wait(30)
    with F.open_file(path) as f:
        n = f.records
        assert f.end is None and n > 10
        assert [digest(r.value()) for r in f] == [digest(mixed(i)) for i in range(n)]
    for p in procs:
        p.kill()
    ring.close()


def test_a_dead_producer_is_recorded_and_replayed_as_peer_gone(ring_name, mp, procs, tmp_path):
    ring = shmring.Ring.create(ring_name, 1 << 18)
    p = start(procs, mp, produce_mixed, ring_name, 20, 0.0, True)
    r = record(ring, tmp_path / "pg.rec")
    finish(p)
    assert r["end"] == "peer gone" and r["messages"] == 20
    got, end = _replayed(tmp_path / "pg.rec", ring_name + "-r", speed=None)
    assert len(got) == 20 and end == "PeerGone"
    ring.close()


def test_replay_keeps_the_recorded_spacing_scaled_by_speed(ring_name, tmp_path):
    ring = shmring.Ring.create(ring_name, 1 << 16)
    out = {}
    t = threading.Thread(target=lambda: out.update(record(ring, tmp_path / "t.rec")))
    t.start()
    with shmring.Ring.attach(ring_name) as r2, r2.producer() as prod:
        for i in range(3):
            prod.send(b"tick")
            time.sleep(0.2)
    t.join(10)
    with F.open_file(tmp_path / "t.rec") as f:
        ts = [r.t_ns for r in f if r.kind != "end"]
    span = (ts[-1] - ts[0]) / 1e9                     # receipt times: about 0.4 s, less on a loaded machine
    assert ts == sorted(ts) and span > 0
    t0 = time.monotonic()
    got, _ = _replayed(tmp_path / "t.rec", ring_name + "-r", speed=2.0)
    assert len(got) == 3 and time.monotonic() - t0 >= span / 2        # the span, at speed 2
    ring.close()


def _good_file(tmp_path, n=12) -> Path:
    ring = shmring.Ring.anonymous(1 << 18)
    with ring.producer() as prod:
        for i in range(n):
            prod.send(mixed(i))
    path = tmp_path / "good.rec"
    record(ring, path, crc=True)
    ring.close()
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"NOTAREC!" + b[8:], "is not a shmring record file"),
    (lambda b: b[:8] + struct.pack("<H", 9) + b[10:], "version 9"),
    (lambda b: b[:64] + b"\xff" + b[65:], "corrupt record header at offset 64"),
    (lambda b: b[:20] + b"\x01" + b[21:], "corrupt file header"),
])
def test_hostile_file_bytes_are_a_clear_error(tmp_path, damage, message):
    path = _good_file(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(F.RecordFileError, match=message) as e:
        F.open_file(path)
    assert isinstance(e.value, shmring.ShmringError) and isinstance(e.value, ValueError)


def test_a_corrupt_payload_is_found_by_its_crc_on_read_and_on_replay(tmp_path, ring_name):
    path = _good_file(tmp_path)
    data = bytearray(path.read_bytes())
    with F.open_file(path) as f:
        victim = list(f)[4]
    data[victim.offset + victim.length - 1] ^= 0xFF
    path.write_bytes(bytes(data))
    with F.open_file(path) as f:
        with pytest.raises(F.RecordFileError, match="crc32 mismatch"):
            list(f)[4].value()
    with pytest.raises(F.RecordFileError, match="crc32 mismatch"):
        _replayed(path, ring_name)


def test_random_damage_is_a_record_file_error_or_a_consistent_file(tmp_path):
    path = _good_file(tmp_path)
    good = path.read_bytes()
    rng = np.random.default_rng(7)
    for trial in range(300):
        b = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        if trial % 5 == 0:
            b = b[: int(rng.integers(0, len(b)))]
        path.write_bytes(bytes(b))
        try:
            with F.open_file(path, repair=False) as f:
                for r in f:
                    r.value()
        except F.RecordFileError:
            pass


def test_the_reader_works_without_shmring_or_its_c_core(tmp_path):
    path = _good_file(tmp_path)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(F.__file__, alone / "recordfile.py")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import recordfile, zlib;"
            "f = recordfile.open_file(sys.argv[2]); print(f.summary());"
            "print(len([r.value() for r in f]));"
            "assert not [m for m in sys.modules if m.startswith('shmring')], 'shmring imported'")
    r = subprocess.run([sys.executable, "-c", code, str(alone), str(path)], capture_output=True, text=True,
                       timeout=60, cwd=alone)
    assert r.returncode == 0, r.stderr
    assert "12 messages" in r.stdout and "ended: end of stream" in r.stdout
    r = subprocess.run([sys.executable, str(alone / "recordfile.py"), str(path), "--list"], capture_output=True,
                       text=True, timeout=60, cwd=alone)
    assert r.returncode == 0 and "<Record 12" in r.stdout


def test_replay_command_creates_the_ring_and_refuses_a_bad_file(tmp_path, ring_name):
    path = _good_file(tmp_path)
    bad = tmp_path / "bad.rec"
    bad.write_bytes(b"garbage" * 10)
    r = subprocess.run([sys.executable, "-m", "shmring", "replay", str(bad), ring_name, "--create"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is not a shmring record file" in r.stderr
    got = []

    def consume():
        deadline = time.monotonic() + 30
        while True:
            try:
                ring = shmring.Ring.attach(ring_name)
                break
            except shmring.SegmentNotFound:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        with ring, ring.consumer() as c:
            for m in c:
                with m:
                    got.append(digest(m.value))
    t = threading.Thread(target=consume)
    t.start()
    r = subprocess.run([sys.executable, "-m", "shmring", "replay", str(path), ring_name, "--create",
                        "--as-fast-as-possible"], capture_output=True, text=True, timeout=60)
    t.join(30)
    assert r.returncode == 0, r.stderr
    assert "replayed 12 messages" in r.stdout
    assert got == [digest(mixed(i)) for i in range(12)]
