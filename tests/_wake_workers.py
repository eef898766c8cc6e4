"""Process targets for test_wakeups (module level, so they work under spawn)."""
import sys


def pingpong_echo(ping, pong, rounds):
    import shmring
    from shmring import _core
    shmring.waiting.WAIT_SLICE = 30.0
    with ping.consumer(spin=0) as inp, pong.producer(spin=0) as out:
        for _ in range(rounds):
            out.send(inp.recv_bytes(timeout=60)[::-1], timeout=60)
    c = _core.wait_counters()
    sys.exit(3 if c["late_wakeups"] or not c["sleeps"] else 0)
