"""Wake-up latency of an idle receiver: a woken await against a blocking recv.

A sender process sends a 64-byte message carrying its send time
(``time.perf_counter_ns``, CLOCK_MONOTONIC, the same clock in every process)
every ``--gap`` ms, so the receiver is asleep when each one arrives; the
receiver notes the arrival time.  Receivers, each in its own process:

* ``recv (futex, spin=0)``: a blocking ``recv`` that sleeps on the futex at once;
* ``recv (default spin)``: the default hybrid wait (it sleeps too: the gap is
  longer than its 50 us spin);
* ``recv_async`` (wake-up descriptor, R52): an asyncio await, woken through
  the event loop's selector; no thread;
* ``fileno + selectors``: a selector loop on ``cons.fileno()``.

Reports median / p90 / p99 one-way latency in microseconds and the ratio of
each median to the futex ``recv``'s.  Also times the cost of one fire (the
waker's CAS + ``sendto``) against a futex wake with a sleeper.

    python -m bench.async_wake [--n 2000] [--gap 2] [--cpus 0,1]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import statistics
import time

import multiprocess as mp

import shmring


def _pin(cpu):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _sender(ring, n, gap, cpu, go):
    _pin(cpu)
    with ring.producer() as p:
        go.wait()
        time.sleep(0.2)
        for _ in range(n):
            time.sleep(gap)
            p.send(time.perf_counter_ns().to_bytes(8, "little") * 8)


def _receiver(ring, n, how, cpu, go, q):
    _pin(cpu)
    out = []
    spin = 0.0 if how == "futex" else shmring.waiting.DEFAULT_SPIN
    with ring.consumer(spin=spin) as c:
        if how in ("futex", "spin"):
            go.set()
            for _ in range(n):
                b = c.recv_bytes(timeout=30)
                out.append(time.perf_counter_ns() - int.from_bytes(b[:8], "little"))
        elif how == "async":
            async def main():
                go.set()
                for _ in range(n):
                    b = await c.recv_async(copy=True, timeout=30)
                    out.append(time.perf_counter_ns() - int.from_bytes(b[:8], "little"))
            asyncio.run(main())
        else:
            sel = selectors.DefaultSelector()
            sel.register(c.fileno(), selectors.EVENT_READ)
            go.set()
            got = 0
            while got < n:
                sel.select(30)
                while got < n:                      # then the stream ends: try_recv would raise
                    m = c.try_recv()
                    if m is None:
                        break
                    t = time.perf_counter_ns()
                    out.append(t - int.from_bytes(m.tobytes()[:8], "little"))
                    m.release()
                    got += 1
    q.put(out)


def run(how, n, gap, cpus):
    ctx = mp.get_context("fork")
    ring = shmring.Ring.anonymous(1 << 16)
    go, q = ctx.Event(), ctx.Queue()
    r = ctx.Process(target=_receiver, args=(ring, n, how, cpus[1], go, q))
    s = ctx.Process(target=_sender, args=(ring, n, gap, cpus[0], go))
    r.start(), s.start()
    out = q.get(timeout=120)
    r.join(), s.join()
    ring.close()
    out.sort()
    return [out[len(out) // 2] / 1e3, out[len(out) * 9 // 10] / 1e3, out[len(out) * 99 // 100] / 1e3]


def fire_cost(k=20000):
    """ns per signal: a producer send that fires an armed slot (CAS + sendto),
    and one that futex-wakes (no sleeper there, the syscall alone)."""
    from shmring import wakefd
    ring = shmring.Ring.anonymous(1 << 20)
    p, c = ring.producer(), ring.consumer()
    w = wakefd.Waker()
    t_fire = 0
    for _ in range(k):
        assert c._arm_data(w.word) >= 0
        t0 = time.perf_counter_ns()
        p.send(b"x")
        t_fire += time.perf_counter_ns() - t0
        w.drain()
        c.recv_bytes()
    t_plain = 0
    for _ in range(k):
        t0 = time.perf_counter_ns()
        p.send(b"x")
        t_plain += time.perf_counter_ns() - t0
        c.recv_bytes()
    p.close(), c.close(), w.close(), ring.close()
    return t_fire / k, t_plain / k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.async_wake", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="messages per receiver (default 2000)")
    ap.add_argument("--gap", type=float, default=2.0, help="ms between messages (default 2)")
    ap.add_argument("--cpus", default="0,1", help="sender,receiver CPUs ('-' for no pinning)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    a = ap.parse_args(argv)
    cpus = (None, None) if a.cpus == "-" else tuple(int(x) for x in a.cpus.split(","))
    hows = [("futex", "recv (futex, spin=0)"), ("spin", "recv (default spin)"),
            ("async", "recv_async (descriptor)"), ("fileno", "fileno + selectors")]
    res = {h: [] for h, _ in hows}
    for _ in range(a.rounds):
        for h, _ in hows:
            res[h].append(run(h, a.n, a.gap / 1e3, cpus))
    print(f"one-way wake-up latency of an idle receiver, 64 B, {a.n} messages every {a.gap} ms, "
          f"{a.rounds} rounds (median of the rounds), CPUs {a.cpus}")
    print(f"{'receiver':28} {'median us':>10} {'p90 us':>8} {'p99 us':>8} {'x futex':>8}")
    base = statistics.median(r[0] for r in res["futex"])
    for h, label in hows:
        med, p90, p99 = (statistics.median(r[i] for r in res[h]) for i in range(3))
        print(f"{label:28} {med:10.1f} {p90:8.1f} {p99:8.1f} {med / base:8.2f}")
    fire, plain = fire_cost()
    print(f"send that fires an armed slot: {fire:.0f} ns; send with nobody waiting: {plain:.0f} ns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
