"""The bundled examples and the demo run end to end as separate processes."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STREAM = ROOT / "examples" / "stream"


def test_stream_example_producer_and_consumer_exchange_every_frame():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cons = subprocess.Popen([sys.executable, str(STREAM / "consumer.py"), "--wait", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        prod = subprocess.run([sys.executable, str(STREAM / "producer.py"), "--count", "120", "--wait", "60"],
                              capture_output=True, text=True, timeout=120, env=env)
        out, _ = cons.communicate(timeout=120)
    finally:
        if cons.poll() is None:
            cons.kill()
    assert prod.returncode == 0, prod.stdout + prod.stderr
    assert "sent 120 frames and 121 messages" in prod.stdout
    assert cons.returncode == 0, out
    assert "producer says hello, 120 frames coming" in out
    assert "seq 100, stats [100, 10000]" in out
    assert "end of stream after 120 frames, 0 bad" in out
    assert not Path("/dev/shm/shmring.stream-example").exists()


def test_demo_command_verifies_every_frame_and_cleans_up():
    p = subprocess.Popen([sys.executable, "-m", "shmring", "demo", "--seconds", "1", "--size", "256k",
                          "--capacity", "4MiB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, out + err
    assert "checksums match (bad frames: 0)" in out
    assert out.rstrip().endswith("OK")
    # only this demo's own segments (other runs' demos share /dev/shm)
    leaked = [e for e in os.listdir("/dev/shm") if e.startswith(f"shmring.demo-{p.pid}")]
    assert not leaked


def test_cli_ls_stat_rm_report_and_remove_a_ring():
    import shmring
    name = f"cli-{os.getpid()}"
    ring = shmring.Ring.create(name, 1 << 16)
    try:
        prod = ring.producer()
        prod.send(b"x" * 100)
        ls = subprocess.run([sys.executable, "-m", "shmring", "ls"], capture_output=True, text=True, timeout=60)
        assert ls.returncode == 0 and name in ls.stdout and str(os.getpid()) in ls.stdout
        st = subprocess.run([sys.executable, "-m", "shmring", "stat", name, "--json"],
                            capture_output=True, text=True, timeout=60)
        assert st.returncode == 0 and '"used": 112' in st.stdout
        rm = subprocess.run([sys.executable, "-m", "shmring", "rm", name], capture_output=True, text=True, timeout=60)
        assert rm.returncode == 1 and "in use" in rm.stderr                 # this process has it attached
        rm = subprocess.run([sys.executable, "-m", "shmring", "rm", "--force", name], capture_output=True,
                            text=True, timeout=60)
        assert rm.returncode == 0 and not Path(f"/dev/shm/shmring.{name}").exists()
        again = subprocess.run([sys.executable, "-m", "shmring", "rm", name], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "does not exist" in again.stderr
        prod.close()
    finally:
        ring.close()
        shmring.unlink(name, missing_ok=True)
