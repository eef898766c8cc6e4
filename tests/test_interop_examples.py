"""examples/torch and examples/arrow run end to end (each skipped without its library)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args],
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_torch_example_actors_act_on_the_trainers_final_weights():
    pytest.importorskip("torch")
    out = run("torch/weights_to_actors.py", "--actors", "2", "--steps", "60")
    assert "trainer: step 50" in out
    assert out.count("output matches the trainer") == 2
    assert out.rstrip().endswith("2 of 2 actors match the final weights")


def test_arrow_example_aggregates_every_frame_in_place():
    pytest.importorskip("pyarrow")
    pytest.importorskip("pandas")
    out = run("arrow/dataframes.py", "--frames", "4", "--rows", "20000")
    assert "received 4 frames, 80,000 rows; group sums match pandas in 4 of 4" in out
    assert out.rstrip().endswith("last message: a DataFrame of 20,000 rows")
