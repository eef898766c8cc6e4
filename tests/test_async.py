"""asyncio: awaiting messages, room and versions neither blocks the event loop
nor spins a core, and cancelling an await leaves the ring as it was."""
import asyncio
import time

import numpy as np
import pytest

import shmring

from _procs import finish, start


def produce(ring, n, delay):
    time.sleep(delay)
    with ring.producer() as p:
        for i in range(n):
            p.send(i.to_bytes(8, "little") * (1 + i % 20))


@pytest.mark.parametrize("kind", ["spsc", "mpsc", "mpmc"])
def test_async_for_receives_everything_under_load(ring_name, procs, mp, kind):
    n = 30_000

    async def main(ring):
        got = 0
        async for msg in ring.consumer():
            with msg:
                b = msg.tobytes()
            assert b == got.to_bytes(8, "little") * (1 + got % 20)
            got += 1
        return got

    with shmring.Ring.create(ring_name, 1 << 14, kind=kind) as ring:
        prod = start(procs, mp, produce, ring, n, 0.2)
        assert asyncio.run(main(ring)) == n
        assert finish(prod) == 0


def test_an_idle_await_leaves_the_loop_free_and_the_cpu_idle(ring_name):
    async def main(cons):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        t = asyncio.create_task(ticker())
        c0 = time.process_time()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cons.recv_async(), 0.5)
        cpu = time.process_time() - c0
        t.cancel()
        return ticks, cpu

    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.consumer() as cons:
        ticks, cpu = asyncio.run(main(cons))
    assert ticks >= 25                 # the loop kept running (about 50 ticks in 0.5 s)
    assert cpu < 0.1                   # asleep on the futex, not spinning


def test_a_cancelled_receive_consumes_nothing(ring_name):
    async def main(ring, prod, cons):
        task = asyncio.create_task(cons.recv_async(copy=True))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        prod.send(b"after")
        await asyncio.sleep(0.15)                    # the cancelled waiter's slice ends
        return await cons.recv_async(copy=True, timeout=1)

    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as prod, ring.consumer() as cons:
        assert asyncio.run(main(ring, prod, cons)) == b"after"
        assert cons.try_recv() is None


def test_send_async_waits_for_room_and_times_out(ring_name):
    async def main(prod, cons):
        while prod.try_send(b"x" * 500):
            pass

        async def drain():
            await asyncio.sleep(0.2)
            cons.recv().release()
        asyncio.create_task(drain())
        t0 = time.monotonic()
        await prod.send_async(b"y" * 500, timeout=5)
        waited = time.monotonic() - t0
        with pytest.raises(shmring.Timeout):
            await prod.send_async(np.zeros(100), timeout=0.2)
        return waited

    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as prod, ring.consumer() as cons:
        assert 0.15 < asyncio.run(main(prod, cons)) < 5


def test_wait_newer_async(ring_name):
    async def main(state):
        async def publish():
            await asyncio.sleep(0.2)
            state.publish(b"two")
        asyncio.create_task(publish())
        v = await state.wait_newer_async(1, timeout=5)
        with pytest.raises(shmring.Timeout):
            await state.wait_newer_async(v, timeout=0.15)
        return v

    with shmring.SharedState.create(ring_name, 1 << 12) as state:
        state.publish(b"one")
        assert asyncio.run(main(state)) == 2
