"""Process targets for test_wakeups (module level, so they work under spawn)."""
import sys


def pingpong_echo(ping, pong, rounds):
    import shmring
    from shmring import _core
    shmring.waiting.WAIT_SLICE = 30.0
    c0 = _core.wait_counters()        # under fork: the parent's counts, inherited; count only ours
    with ping.consumer(spin=0) as inp, pong.producer(spin=0) as out:
        for _ in range(rounds):
            out.send(inp.recv_bytes(timeout=60)[::-1], timeout=60)
    c = _core.wait_counters()
    sys.exit(3 if c["late_wakeups"] != c0["late_wakeups"] or c["sleeps"] == c0["sleeps"] else 0)
