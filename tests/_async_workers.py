"""Process targets of tests/test_async_fd.py (module level, so they run under spawn)."""
import os
import signal
import time

import numpy as np

import shmring


def send_after(ring, delay, payloads, end="close"):
    """Take the producer, wait ``delay`` s, send ``payloads``; then close
    (end of stream), ``detach`` or ``kill`` itself (SIGKILL: PeerGone)."""
    with ring.producer() as p:
        time.sleep(delay)
        for b in payloads:
            p.send(b)
        if end == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if end == "detach":
            p.detach()


def send_records_after(ring, delay, n):
    with ring.producer() as p:
        time.sleep(delay)
        a = np.zeros(n, ring.dtype)
        a["i"] = np.arange(n)
        p.send_many(a)


def recv_after(ring, delay, n):
    """Take the consumer, wait, then receive and release ``n`` messages (makes room)."""
    with ring.consumer() as c:
        time.sleep(delay)
        for _ in range(n):
            c.recv(timeout=30).release()


def publish_after(state, delay, value):
    time.sleep(delay)
    state.publish(value)


def send_one_to_each(rings, delay):
    """Attach every ring, wait, then send one message to each."""
    prods = [r.producer() for r in rings]
    time.sleep(delay)
    for i, p in enumerate(prods):
        p.send(i.to_bytes(4, "little"))
    for p in prods:
        p.close()


def await_and_hang(ring):
    """Arm a recv_async on the ring and wait there forever (the test kills us)."""
    import asyncio

    async def main():
        with ring.consumer() as c:
            await c.recv_async()
    asyncio.run(main())
