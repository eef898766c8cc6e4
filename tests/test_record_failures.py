"""A recorder that cannot write loses nothing.

The recorder runs as ``shmring record`` in its own process with a file-size
limit (RLIMIT_FSIZE; SIGXFSZ ignored, so a write past it fails with EFBIG
like a full disk fails with ENOSPC).  It must stop with one clear line (no
traceback), leave a file that ends at a whole record, and give the message it
could not write back to the ring: a second recorder started afterwards gets
it, so the two files together hold every message exactly once, in order.
Before the fix the recorder released that message anyway (lost) and died
with a traceback, leaving a torn record at the end of the file."""
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

import shmring
from shmring import recordfile as F

N, SIZE = 40, 16384          # float32 arrays of 64 KiB: 2.5 MiB in all, the limit is 1 MiB


def _limited(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("method", ["kernel", "write"])
@pytest.mark.parametrize("kind", ["spsc", "mpsc", "mpmc"])
def test_a_recorder_that_cannot_write_gives_the_message_back(ring_name, tmp_path, method, kind):
    ring = shmring.Ring.create(ring_name, 1 << 22, kind=kind)
    p = ring.producer()
    for i in range(N):
        p.send(np.full(SIZE, i, np.float32), timeout=10)
    p.close()
    first, second = tmp_path / "first.rec", tmp_path / "second.rec"
    cmd = [sys.executable, "-m", "shmring", "record", ring_name]
    r1 = subprocess.run(cmd + [str(first), "--method", method], preexec_fn=_limited(1 << 20),
                        capture_output=True, text=True, timeout=60)
    assert r1.returncode == 1, r1.stderr
    lines = r1.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmring record: cannot write record "), r1.stderr
    assert "given back to the ring" in lines[0]
    r2 = subprocess.run(cmd + [str(second), "--method", method], capture_output=True, text=True, timeout=60)
    assert r2.returncode == 0, r2.stderr
    ring.close()
    ring.unlink()

    got = []
    for path, ends in ((first, None), (second, "end of stream")):
        with F.open_file(path, repair=False) as rf:      # repair=False: a torn tail is reported, not cut
            assert rf.torn_bytes == 0, rf.summary()
            for rec in rf:
                if rec.kind != "end":
                    a = rec.value()
                    assert a.shape == (SIZE,) and (a == a[0]).all()
                    got.append(int(a[0]))
            assert rf.end == ends, rf.summary()
    assert got == list(range(N))         # every message once, in order, across the two files
