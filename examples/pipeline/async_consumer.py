"""An asyncio program consumes a ring fed by another process, and its event loop stays free.

    python examples/pipeline/async_consumer.py [--count 2000] [--rate 2000]

A producer process sends --count messages {"seq", "samples"} at --rate
messages/s and publishes its running totals in a SharedState every 500
messages.  The asyncio side runs three coroutines at once:

* the consumer: `await cons.recv_async(timeout=...)` for the producer's hello,
  then `async for msg in cons` until the producer closes the stream, checking
  every message;
* a monitor: `await status.wait_newer_async(v)` for each new version of the
  producer's totals;
* a ticker: `await asyncio.sleep(0.01)` in a loop, measuring how late it wakes.

Waiting for a message or a version arms a wake-up descriptor that the event
loop watches (no thread), so the ticker keeps ticking.  A message already in the ring is returned without
suspending, so the consumer yields every 100 messages (a long backlog would
otherwise hold the loop).  At the end the consumer's totals must equal the
producer's final status.
"""
import argparse
import asyncio
import multiprocessing
import os
import sys
import time

import numpy as np

import shmring

N = 256                                   # samples per message: seq, seq+1, ..., seq+255
EVERY = 500                               # the producer publishes its totals every EVERY messages


def produce(ring, status, count, rate):
    """The producer process: paced messages into the ring, running totals into the shared state."""
    with ring.producer() as prod:
        time.sleep(0.3)                   # meanwhile the consumer awaits recv_async(timeout=...)
        prod.send({"hello": os.getpid(), "count": count})
        t0, total = time.monotonic(), 0
        for i in range(count):
            samples = np.arange(i, i + N, dtype=np.int64)
            prod.send({"seq": i, "samples": samples})
            total += int(samples.sum())
            if (i + 1) % EVERY == 0 or i + 1 == count:
                status.publish({"sent": i + 1, "checksum": total, "done": i + 1 == count})
            time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
    # leaving the with block closes the stream: the consumer's `async for` ends


async def ticker(loop_stats, stop):
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(0.01)
        loop_stats["ticks"] += 1
        loop_stats["late"] = max(loop_stats["late"], time.monotonic() - t - 0.01)


async def monitor(status, wait):
    """Print each new version of the producer's totals; return the final one."""
    v, totals = 0, {"done": False}
    while not totals["done"]:
        v = await status.wait_newer_async(v, timeout=wait)
        with status.read() as snap:
            totals, v = snap.copy(), snap.version
        print(f"monitor: status version {v}: producer has sent {totals['sent']}", flush=True)
    return v, totals


async def consume(ring, status, wait):
    loop_stats, stop = {"ticks": 0, "late": 0.0}, asyncio.Event()
    tick = asyncio.create_task(ticker(loop_stats, stop))
    watch = asyncio.create_task(monitor(status, wait))
    got = bad = checksum = 0
    with ring.consumer() as cons:
        t0 = time.monotonic()
        with await cons.recv_async(timeout=wait) as msg:      # the hello
            hello = msg.copy()
        print(f"consumer: hello from pid {hello['hello']} after {time.monotonic() - t0:.2f} s "
              f"({loop_stats['ticks']} ticks meanwhile), {hello['count']} messages coming", flush=True)
        async for msg in cons:                               # until the producer closes the stream
            with msg:
                m = msg.value                                # zero-copy: samples is a view of the ring
                ok = m["seq"] == got and (m["samples"] == np.arange(got, got + N)).all()
                checksum += int(m["samples"].sum())
                del m                                        # no view may outlive the message
            bad += not ok
            got += 1
            if got % 100 == 0:       # a backlog is received without suspending: let the other tasks run
                await asyncio.sleep(0)
    version, final = await watch
    stop.set()
    await tick
    return {"received": got, "bad": bad, "checksum": checksum, "version": version, "final": final, **loop_stats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000, help="messages the producer sends (default 2000)")
    ap.add_argument("--rate", type=float, default=2000.0, help="messages per second (default 2000)")
    ap.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a message or a status")
    args = ap.parse_args(argv)
    name = f"async-example-{os.getpid()}"
    with shmring.Ring.create(name, 1 << 20, replace_dead=True) as ring, \
            shmring.SharedState.create(f"{name}-status", 4096, replace_dead=True) as status:   # both unlinked on exit
        proc = multiprocessing.get_context("spawn").Process(target=produce,
                                                            args=(ring, status, args.count, args.rate))
        proc.start()
        try:
            r = asyncio.run(consume(ring, status, args.wait))
        finally:
            proc.join(10)
            if proc.exitcode is None:
                proc.kill()
    ok = (r["bad"] == 0 and r["received"] == r["final"]["sent"] == args.count
          and r["checksum"] == r["final"]["checksum"] and proc.exitcode == 0)
    print(f"async consumer: {r['received']} messages, {r['bad']} bad, checksum "
          f"{'matches' if r['checksum'] == r['final']['checksum'] else 'DOES NOT MATCH'} the producer's "
          f"status version {r['version']}; the loop ticked {r['ticks']} times, at most "
          f"{r['late'] * 1e3:.1f} ms late; {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
