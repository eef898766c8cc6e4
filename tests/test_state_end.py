"""A finished writer ends wait_newer() (issue 16 case 6; docs/design.md R57-R59).

A writer that closed its handle normally, or a state that was unlinked while
no writer holds the role, ends a wait with EndOfStream, as a dead writer ends
it with PeerGone; a later writer clears the mark and waits go on as before.
"""
import asyncio
import time

import pytest

import shmring

import _state_end_workers as W
from _procs import JOIN, finish, start

QUICK = 2.0        # a wait must end well within this once the writer finished (a wait slice is 0.1 s)


@pytest.fixture
def state(ring_name):
    with shmring.SharedState.create(ring_name, 1 << 16) as st:
        yield st


def test_wait_newer_ends_with_end_of_stream_once_the_writer_closed(ring_name, state):
    with shmring.SharedState.attach(ring_name) as writer:
        writer.publish({"v": 1})
    t0 = time.monotonic()
    with pytest.raises(shmring.EndOfStream, match=rf"writer of .*{ring_name}.* closed.*version is 1"):
        state.wait_newer(than=1, timeout=10)
    assert time.monotonic() - t0 < QUICK


def test_a_version_published_before_the_close_is_still_returned(ring_name, state):
    with shmring.SharedState.attach(ring_name) as writer:
        writer.publish(1)
        writer.publish(2)
    assert state.wait_newer(than=0, timeout=1) == 2
    assert state.wait_newer(than=1, timeout=1) == 2
    with pytest.raises(shmring.EndOfStream):
        state.wait_newer(than=2, timeout=1)


def test_a_new_writer_clears_the_finished_mark(ring_name, state):
    with shmring.SharedState.attach(ring_name) as writer:
        writer.publish(1)
    assert state.stats()["writer"]["finished"] is True
    with shmring.SharedState.attach(ring_name) as writer2:
        writer2.publish(2)
        assert state.stats()["writer"]["finished"] is False
        assert state.wait_newer(than=1, timeout=1) == 2
        with pytest.raises(shmring.Timeout):          # a live writer: the wait goes on
            state.wait_newer(than=2, timeout=0.3)


def test_a_state_whose_writer_never_came_still_waits(state):
    assert state.stats()["writer"]["finished"] is False
    with pytest.raises(shmring.Timeout):
        state.wait_newer(than=0, timeout=0.3)


def test_wait_newer_ends_once_the_state_is_unlinked_with_no_writer(ring_name):
    st = shmring.SharedState.create(ring_name, 1 << 16)
    try:
        reader = shmring.SharedState.attach(ring_name)
        st.unlink()
        with pytest.raises(shmring.EndOfStream, match="unlinked"):
            reader.wait_newer(than=0, timeout=10)
        reader.close()
    finally:
        st.close()


def test_wait_newer_async_ends_with_end_of_stream_too(ring_name, state):
    with shmring.SharedState.attach(ring_name) as writer:
        writer.publish(1)

    async def main():
        return await state.wait_newer_async(1, timeout=10)
    with pytest.raises(shmring.EndOfStream):
        asyncio.run(main())


def test_a_waiter_in_another_process_ends_when_the_writer_closes(ring_name, procs, mp):
    """A waiter blocked with no timeout in another process (fork and spawn) gets
    EndOfStream when the writer, in a third process, closes normally."""
    with shmring.SharedState.create(ring_name, 1 << 16):
        q = mp.Queue()
        waiter = start(procs, mp, W.wait_without_timeout, ring_name, 3, q)
        assert q.get(timeout=JOIN) == ("waiting", None)
        writer = start(procs, mp, W.write_then_close, ring_name, 3, q)
        got = [q.get(timeout=30) for _ in range(2)]
        assert finish(waiter, timeout=30) == 0 and finish(writer) == 0
        kinds = {k for k, _ in got}
        assert kinds == {"closed", "EndOfStream"}, got


def test_a_waiter_in_another_process_gets_the_last_version_then_end_of_stream(ring_name, procs, mp):
    with shmring.SharedState.create(ring_name, 1 << 16):
        q = mp.Queue()
        waiter = start(procs, mp, W.wait_without_timeout, ring_name, 0, q)
        assert q.get(timeout=JOIN) == ("waiting", None)
        writer = start(procs, mp, W.write_then_close, ring_name, 2, q)
        got = sorted(q.get(timeout=JOIN) for _ in range(2))
        assert finish(waiter, timeout=30) == 0 and finish(writer) == 0
        assert got == [("closed", 2), ("version", 1)] or got == [("closed", 2), ("version", 2)], got
