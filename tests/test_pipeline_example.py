"""examples/pipeline and `shmring demo pipeline` run end to end, verify every
item, and leave no segment behind."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from shmring.cli import main as shmring_main
from shmring.demo import FrameChecker, blur_and_halve, ramp_frames

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "examples" / "pipeline"


def run(*args, timeout=120):
    """Run a Python command line; return (exit code, stdout, stderr, pid)."""
    p = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out, err, p.pid


def leaked(prefix):
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"shmring.{prefix}")]


def test_image_pipeline_example_checks_every_frame_in_order():
    rc, out, err, pid = run(PIPELINE / "image_pipeline.py", "--frames", "400", "--no-progress")
    assert rc == 0, out + err
    assert "checked 400 of 400 frames: 0 bad, 0 missing, 0 duplicated, 0 out of order" in out
    assert "with 4 workers" in out and "pipeline finished" not in out          # --no-progress: no bars
    assert out.rstrip().endswith("OK")
    assert not leaked(f"demo-pipeline-{pid}-")


def test_image_pipeline_example_unordered():
    rc, out, err, pid = run(PIPELINE / "image_pipeline.py", "--frames", "300", "--workers", "3", "--unordered",
                            "--no-progress", "--capacity", "4MiB")
    assert rc == 0, out + err
    assert "checked 300 of 300 frames: 0 bad, 0 missing, 0 duplicated" in out
    assert "(unordered)" in out and "4 MiB rings" in out and out.rstrip().endswith("OK")
    assert not leaked(f"demo-pipeline-{pid}-")


def run_with_terminal_stderr(*args, timeout=120):
    """Like run(), with stderr on a pseudo-terminal (progress bars are drawn only on a terminal)."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=slave, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120"))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:                                    # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out, b"".join(chunks).decode(errors="replace"), p.pid


def test_demo_pipeline_command_shows_progress_and_verifies():
    rc, out, err, pid = run_with_terminal_stderr("-m", "shmring", "demo", "pipeline", "--frames", "400")
    assert rc == 0, out + err
    assert "blur_and_halve x4" in err                                        # the tqdm bars
    assert "pipeline finished in" in out
    assert "checked 400 of 400 frames: 0 bad, 0 missing, 0 duplicated, 0 out of order" in out
    assert out.rstrip().endswith("OK")
    assert not leaked(f"demo-pipeline-{pid}-")


def test_demo_options_belong_to_their_demo(capsys):
    assert shmring_main(["demo", "pipeline", "--seconds", "1"]) == 2      # a usage error (issue 16 case 3)
    assert "--seconds: not an option of the pipeline demo" in capsys.readouterr().err
    assert shmring_main(["demo", "--frames", "10"]) == 2
    assert "--frames: not an option of the stream demo" in capsys.readouterr().err


def test_the_frame_checker_catches_wrong_missing_duplicated_and_reordered_frames():
    frames = [blur_and_halve(f) for f in ramp_frames(6)]
    good = FrameChecker(6)
    for f in frames:
        good(f)
    assert good.finish() == {"frames": 6, "bad": 0, "missing": 0, "duplicates": 0, "out_of_order": 0,
                             "max_rel_err": 0.0}

    wrong = dict(frames[2], small=frames[2]["small"] + np.float32(0.01))
    c = FrameChecker(6)
    for f in [frames[0], frames[1], wrong, frames[4], frames[3], frames[3]]:    # 5 missing
        c(f)
    r = c.finish()
    assert r["bad"] == 4 and r["missing"] == 1 and r["duplicates"] == 1 and r["out_of_order"] == 3
    assert r["max_rel_err"] > 1e-5

    unordered = FrameChecker(6, ordered=False)
    for f in reversed(frames):
        unordered(f)
    assert unordered.finish()["bad"] == 0


def test_async_consumer_example_receives_everything_with_a_free_loop():
    rc, out, err, pid = run(PIPELINE / "async_consumer.py", "--count", "400", "--rate", "4000")
    assert rc == 0, out + err
    assert "400 messages coming" in out
    assert "monitor: status version 1: producer has sent 400" in out
    assert "async consumer: 400 messages, 0 bad, checksum matches the producer's status version 1" in out
    ticks = int(out.split("the loop ticked ")[1].split()[0])
    assert ticks >= 10                          # the ticker kept running while the consumer awaited
    assert out.rstrip().endswith("OK")
    assert not leaked(f"async-example-{pid}")
