"""``shmring demo``: a producer and a consumer process stream arrays through a ring.

The producer builds each frame in place in the ring (``reserve_array``: no
copy at all), stamps it with its sequence number and fills it with a pattern
derived from it; the consumer receives zero-copy read-only views, sums every
frame (so every byte really crosses) and checks the sum.  At the end the
producer sends a msgpack summary (count and checksum) and closes the stream;
the consumer compares, prints a summary, and the ring is unlinked.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time

import numpy as np

from . import EndOfStream, Ring

PATTERN_MUL = 2654435761


def _pattern(seq: int) -> int:
    return (seq * PATTERN_MUL) & 0xFFFFFFFF


def _expected_sum(seq: int, n: int) -> int:
    """Sum of a frame of n uint32 words: seq in word 0, the pattern elsewhere."""
    return (seq & 0xFFFFFFFF) + _pattern(seq) * (n - 1)


def _producer(ring: Ring, seconds: float, frame_bytes: int, ready) -> None:
    n = max(2, frame_bytes // 4)
    with ring.producer() as prod:
        ready.wait(10)
        deadline = time.monotonic() + seconds
        seq = total = 0
        while time.monotonic() < deadline:
            with prod.reserve_array((n,), np.uint32, timeout=10) as out:
                out.fill(_pattern(seq))
                out[0] = seq
            total += _expected_sum(seq, n)
            seq += 1
        prod.send({"summary": True, "count": seq, "checksum": total & 0xFFFFFFFFFFFFFFFF}, timeout=10)


def _consumer(ring: Ring, results) -> None:
    received = bad = 0
    nbytes = 0
    checksum = 0
    summary = None
    t0 = time.perf_counter()
    last = t0
    last_n = last_b = 0
    with ring.consumer() as cons:
        results.put("ready")
        while True:
            try:
                msg = cons.recv(timeout=10)
            except EndOfStream:
                break
            with msg:
                if msg.kind == "object":
                    summary = msg.value
                    continue
                frame = msg.value
                seq = int(frame[0])
                s = int(frame.sum(dtype=np.uint64))
                if seq != received or s != _expected_sum(seq, frame.size) & 0xFFFFFFFFFFFFFFFF:
                    bad += 1
                checksum += s
                nbytes += msg.nbytes
                received += 1
                del frame                      # no view may outlive the message
            now = time.perf_counter()
            if now - last >= 0.25:
                st = ring.stats()
                dt = now - last
                print(f"\r  {(received - last_n) / dt:10,.0f} msg/s  {(nbytes - last_b) / dt / 1e9:6.2f} GB/s  "
                      f"ring fill {st['fill'] * 100:5.1f} %  received {received:,}   ", end="", flush=True)
                last, last_n, last_b = now, received, nbytes
    elapsed = time.perf_counter() - t0
    results.put({"received": received, "bad": bad, "bytes": nbytes, "elapsed": elapsed,
                 "checksum": checksum & 0xFFFFFFFFFFFFFFFF, "summary": summary})


def run(seconds: float = 3.0, frame_bytes: int = 1 << 20, capacity: int = 1 << 26) -> int:
    """Run the demo; return a process exit code (0 = every frame verified)."""
    ctx = multiprocessing.get_context("spawn")
    name = f"demo-{os.getpid()}"
    print(f"shmring demo: streaming {frame_bytes / 2**20:.2f} MiB uint32 frames for {seconds:g} s "
          f"through a {capacity / 2**20:.0f} MiB ring (/dev/shm/shmring.{name})")
    print("  producer builds each frame in place (reserve_array); the consumer sums every frame")
    with Ring.create(name, capacity) as ring:
        results = ctx.Queue()
        ready = ctx.Event()
        cons = ctx.Process(target=_consumer, args=(ring, results), name="shmring-demo-consumer")
        cons.start()
        try:
            if results.get(timeout=60) != "ready":
                raise RuntimeError("consumer did not start")
            prod = ctx.Process(target=_producer, args=(ring, seconds, frame_bytes, ready),
                               name="shmring-demo-producer")
            prod.start()
            ready.set()
            prod.join(seconds + 60)
            res = results.get(timeout=60)
            cons.join(10)
        except (Exception, KeyboardInterrupt):
            for p in multiprocessing.active_children():
                p.kill()
            raise
    print()
    s = res["summary"] or {}
    ok = (res["bad"] == 0 and s.get("count") == res["received"] and s.get("checksum") == res["checksum"]
          and prod.exitcode == 0 and cons.exitcode == 0)
    print(f"  received {res['received']:,} frames, {res['bytes'] / 1e9:.2f} GB in {res['elapsed']:.2f} s: "
          f"{res['received'] / res['elapsed']:,.0f} msg/s, {res['bytes'] / res['elapsed'] / 1e9:.2f} GB/s")
    print(f"  producer sent {s.get('count', '?'):,} frames; checksums "
          f"{'match' if ok else 'DO NOT MATCH'} (bad frames: {res['bad']}); exit codes producer "
          f"{prod.exitcode}, consumer {cons.exitcode}")
    print("  OK" if ok else "  FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run())
