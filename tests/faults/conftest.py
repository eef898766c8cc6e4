"""Fixtures of the fault tests."""
import os
import signal

import pytest


@pytest.fixture
def kids():
    """Processes started with spawn(kids, ...); any still alive are SIGKILLed and reaped."""
    started = []
    yield started
    for p in started:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(10)
