"""The README's python blocks run as shown (issue 16 case 1), so it cannot drift.

Every ```python block of README.md is either a quote of a script (the line
before it is ``<!-- file: PATH -->``: the block must be that file, byte for
byte, and the script is run below with its partner process), or runs on its
own: each in a fresh interpreter, in an empty directory, with a timeout.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- file: (?P<file>\S+) -->\n)?```python\n(?P<code>.*?)```\n", re.S)
BLOCKS = [(m.group("file"), m.group("code"), README.count("\n", 0, m.start()) + 1) for m in BLOCK.finditer(README)]
TOUR = ROOT / "examples" / "tour"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="error::ResourceWarning")


def test_readme_has_python_blocks_and_every_quoted_file_is_quoted_exactly():
    assert len(BLOCKS) >= 5
    quoted = {f for f, _, _ in BLOCKS if f}
    assert quoted == {"examples/tour/producer.py", "examples/tour/consumer.py",
                      "examples/tour/writer.py", "examples/tour/reader.py"}
    for f, code, line in BLOCKS:
        if f:
            assert (ROOT / f).read_text() == code, f"README.md line {line}: the block differs from {f}"


@pytest.mark.parametrize("code,line", [(c, n) for f, c, n in BLOCKS if not f],
                         ids=[f"line{n}" for f, _, n in BLOCKS if not f])
def test_readme_block_runs_as_shown(code, line, tmp_path):
    for mod in ("torch", "pyarrow", "pandas"):                # the optional extras' blocks
        if re.search(rf"^import .*\b{mod}\b", code, re.M):
            pytest.importorskip(mod, reason=f"README block at line {line} needs {mod} (an optional extra)")
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert r.returncode == 0, f"README.md block at line {line} failed:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr


def _pair(first, second, name):
    """Run two scripts of examples/tour/ as separate processes, ``first``
    started first (the other 0.3 s later); both must finish cleanly."""
    a = subprocess.Popen([sys.executable, str(TOUR / first), name], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        import time
        time.sleep(0.3)
        b = subprocess.run([sys.executable, str(TOUR / second), name], capture_output=True, text=True,
                           timeout=120, env=ENV)
        out_a, err_a = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    outs = {first: (a.returncode, out_a, err_a), second: (b.returncode, b.stdout, b.stderr)}
    for script, (rc, out, err) in outs.items():
        assert rc == 0 and not err, f"{script}: exit {rc}\n{out}\n{err}"
    return {k: v[1] for k, v in outs.items()}


@pytest.mark.parametrize("order", ["producer first", "consumer first"])
def test_tour_producer_and_consumer_exchange_every_message_with_its_type(order, ring_name):
    first, second = ("producer.py", "consumer.py") if order == "producer first" else ("consumer.py", "producer.py")
    out = _pair(first, second, ring_name)
    assert out["producer.py"] == "producer: sent 5 messages\n"
    assert out["consumer.py"].splitlines() == ["array 66.0", "array 307256", "bytes 1",
                                               "consumer: b'raw bytes' 7 (480, 640)"]
    assert not Path(f"/dev/shm/shmring.{ring_name}").exists()       # the consumer unlinked it


@pytest.mark.parametrize("order", ["writer first", "reader first"])
def test_tour_writer_and_reader_see_the_versions_then_the_end(order, ring_name):
    first, second = ("writer.py", "reader.py") if order == "writer first" else ("reader.py", "writer.py")
    out = _pair(first, second, ring_name)
    assert out["writer.py"] == "writer: published 6 versions\n"
    lines = out["reader.py"].splitlines()
    assert lines[-2:] == ["version 6 w[3, 0] = 5.0", "reader: last version 6"]
    seen = [int(line.split()[1]) for line in lines[:-1]]
    assert seen == sorted(set(seen)) and all(f"w[3, 0] = {v - 1}.0" in line for v, line in zip(seen, lines))
    assert not Path(f"/dev/shm/shmring.{ring_name}").exists()
