"""examples/weights runs end to end: a trainer and two actors as separate processes."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "examples" / "weights"


def test_weights_example_actors_read_consistent_versions_while_the_trainer_publishes():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    actors = [subprocess.Popen([sys.executable, str(WEIGHTS / "actor.py"), "--seconds", "2", "--wait", "60"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
              for _ in range(2)]
    try:
        trainer = subprocess.run([sys.executable, str(WEIGHTS / "trainer.py"), "--seconds", "3", "--mb", "8"],
                                 capture_output=True, text=True, timeout=120, env=env)
        outs = [a.communicate(timeout=120)[0] for a in actors]
    finally:
        for a in actors:
            if a.poll() is None:
                a.kill()
    assert trainer.returncode == 0, trainer.stdout + trainer.stderr
    assert "'weights-example' created" in trainer.stdout
    m = re.search(r"done after (\d+) steps, last version (\d+)", trainer.stdout)
    assert m and int(m.group(2)) == int(m.group(1)) + 1 and int(m.group(1)) >= 10, trainer.stdout
    for out, a in zip(outs, actors):
        assert a.returncode == 0, out
        assert re.search(r"acting on version \d+ \(step \d+\)", out), out
        m = re.search(r"(\d+) actions on (\d+) versions, (\d+) inconsistent", out)
        assert m, out
        assert int(m.group(2)) >= 5 and int(m.group(3)) == 0, out
    assert not Path("/dev/shm/shmring.weights-example").exists()
