"""`shmring demo` checks its options before starting anything (issue 16 case 3):
one line on stderr naming the option and what would work, exit status 2, no
traceback, no segment left, and no minute-long hang first."""
import os
import subprocess
import sys

import pytest

BAD = [
    (["--capacity", "1MiB"], "--size"),                       # a 1 MiB frame cannot fit a 1 MiB ring
    (["--capacity", "1MiB", "--size", "1100k"], "--capacity 2MiB"),   # the largest message: capacity - 8
    (["--capacity", "3000"], "power of two"),
    (["--capacity", "1k"], "power of two"),
    (["--seconds", "0"], "--seconds"),
    (["--seconds", "nan"], "--seconds"),
    (["--size", "0"], "--size"),
    (["--frames", "5"], "--frames"),                           # an option of the other demo
    (["pipeline", "--workers", "0"], "--workers"),
    (["pipeline", "--frames", "-1"], "--frames"),
    (["pipeline", "--capacity", "256k"], "--capacity 512k"),   # a 300 KiB frame cannot fit
    (["pipeline", "--seconds", "2"], "--seconds"),
]


@pytest.mark.parametrize("argv, says", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_demo_refuses_bad_options_at_once_with_one_line_and_status_2(argv, says):
    p = subprocess.Popen([sys.executable, "-m", "shmring", "demo", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2, (p.returncode, out, err)
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("shmring demo: "), err
    assert says in err and "Traceback" not in err and "Empty" not in err, err
    assert out == ""
    # its own segments only (others' demos and tests share /dev/shm)
    assert not [e for e in os.listdir("/dev/shm") if e.startswith((f"shmring.demo-{p.pid}", f"shmring.demo-pipeline-{p.pid}"))]
