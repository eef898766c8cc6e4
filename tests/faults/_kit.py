"""What the fault tests share: spawning children, SIGKILL, bounded waits (the `kids` fixture is in conftest.py)."""
import os
import signal
import time

import multiprocess

CTX = multiprocess.get_context("fork")
SOON = 30.0            # bound on any wait in the test itself (never reached when things work)


def spawn(kids, target, *args):
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    kids.append(p)
    return p


def kill(p):
    os.kill(p.pid, signal.SIGKILL)
    p.join(SOON)
    assert p.exitcode == -signal.SIGKILL


def wait_until(cond, what):
    deadline = time.monotonic() + SOON
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)
