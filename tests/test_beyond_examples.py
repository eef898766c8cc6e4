"""Smoke tests of examples/record and examples/bridge (run as separate processes)."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_record_example_replays_every_frame():
    r = subprocess.run([sys.executable, str(ROOT / "examples/record/record_and_replay.py"), "--frames", "60"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "recorded 60 messages" in r.stdout and "replayed 60 frames, checksums match" in r.stdout


def test_bridge_example_views_every_camera_frame_on_the_far_side():
    pytest.importorskip("zmq")
    tag = f"{os.getpid()}"
    cam, far = f"camera-{tag}", f"camera-b-{tag}"
    ep = f"tcp://127.0.0.1:{random.randint(20000, 60000)}"
    py = [sys.executable]
    procs = []
    try:
        procs.append(subprocess.Popen(py + ["-m", "shmring", "bridge", "in", ep, far, "--create", str(1 << 24)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        viewer = subprocess.Popen(py + [str(ROOT / "examples/bridge/viewer.py"), "--name", far],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(viewer)
        camera = subprocess.Popen(py + [str(ROOT / "examples/bridge/camera.py"), "--name", cam, "--frames", "60",
                                        "--fps", "200"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(camera)
        assert "ready" in camera.stdout.readline()          # its ring is made and initialized
        procs.append(subprocess.Popen(py + ["-m", "shmring", "bridge", "out", cam, ep],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        try:
            out, _ = viewer.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("viewer hung: " + " | ".join(p.communicate(timeout=30)[0] for p in procs))
        assert viewer.returncode == 0, out
        assert "end of stream after 60 frames, 0 bad" in out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)
        for f in (f"/dev/shm/shmring.{far}", f"/dev/shm/shmring-bridge.{far}", f"/dev/shm/shmring.{cam}"):
            if os.path.exists(f):
                os.unlink(f)
