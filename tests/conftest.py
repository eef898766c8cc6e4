"""Shared fixtures: unique segment names, start methods, child-process hygiene.

Process targets live in ``_workers.py`` (module level), so they also work
under the ``spawn`` start method.
"""
import os
import signal

import multiprocess
import pytest

import shmring

from _workers import unique_name


def pytest_configure(config):
    # A view kept past its message by accident in a test is a test bug: fail on it.
    # Tests that provoke the warning on purpose use pytest.warns, which overrides this.
    config.addinivalue_line("filterwarnings", "error::shmring.errors.EscapedViewWarning")


@pytest.fixture
def ring_name():
    """A segment name no other test uses; any segment left under it is unlinked afterwards."""
    name = unique_name()
    yield name
    shmring.unlink(name, missing_ok=True)


@pytest.fixture(params=["fork", "spawn"])
def start_method(request):
    return request.param


@pytest.fixture
def mp(start_method):
    """A ``multiprocess`` context for the start method under test."""
    return multiprocess.get_context(start_method)


@pytest.fixture
def procs():
    """Collects child processes; any still running at teardown is killed and reaped."""
    started = []
    yield started
    for p in started:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.join(10)
