"""``shmring demo``: self-checking demos.

``shmring demo`` (``stream``): a producer and a consumer process stream arrays
through a ring.  The producer builds each frame in place in the ring
(``reserve_array``: no copy at all), stamps it with its sequence number and
fills it with a pattern derived from it; the consumer receives zero-copy
read-only views, sums every frame (so every byte really crosses) and checks
the sum.  At the end the producer sends a msgpack summary (count and
checksum) and closes the stream; the consumer compares, prints a summary, and
the ring is unlinked.

``shmring demo pipeline``: :func:`run_pipeline`, a :class:`shmring.Pipeline`
source -> ``map(blur_and_halve, workers=4, ordered=True)`` -> sink whose
answer is known analytically, so the sink checks every frame
(``examples/pipeline/image_pipeline.py`` is the same code with more flags).
"""
from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time

import numpy as np

from . import codec
from . import layout as L
from .errors import EndOfStream
from .pipeline import Pipeline
from .ring import Ring

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


def _human(n: int) -> str:
    """A size as the CLI reads it back: 4MiB, 512k, 3000."""
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "k")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name}"
    return str(n)


def _capacity_for(need: int) -> int:
    """The smallest ring capacity whose largest message holds ``need`` bytes."""
    c = L.MIN_CAPACITY
    while L.max_message(c) < need:
        c *= 2
    return c


def check_options(which: str, *, seconds=None, size=None, frames=None, workers=None, capacity=None) -> None:
    """Refuse options ``run`` / ``run_pipeline`` could not work with, before
    anything starts (ValueError, one line naming the option and what would
    do).  ``None``: the option was not given (its default is used)."""
    other = ("frames", "workers") if which == "stream" else ("seconds", "size")
    given = {"seconds": seconds, "size": size, "frames": frames, "workers": workers}
    wrong = [f"--{o}" for o in other if given[o] is not None]
    if wrong:
        raise ValueError(f"{' and '.join(wrong)}: not an option of the {which} demo")
    default_cap = 1 << 26 if which == "stream" else 1 << 24
    cap = default_cap if capacity is None else capacity
    if cap < L.MIN_CAPACITY or cap > L.MAX_CAPACITY or cap & (cap - 1):
        hint = 1 << max(cap - 1, 1).bit_length()
        raise ValueError(f"--capacity {_human(cap)}: a ring's capacity is a power of two from "
                         f"{_human(L.MIN_CAPACITY)} to {_human(L.MAX_CAPACITY)}"
                         + (f" (next power of two: {_human(hint)})" if L.MIN_CAPACITY <= hint <= L.MAX_CAPACITY
                            else ""))
    if which == "stream":
        if seconds is not None and not 0 < seconds < math.inf:
            raise ValueError(f"--seconds {seconds}: how long the producer sends, a number of seconds > 0")
        frame = 1 << 20 if size is None else size
        if frame <= 0:
            raise ValueError(f"--size {frame}: the frame size must be at least 1 byte")
        n = max(2, frame // 4)
        what = f"a --size {_human(frame)} frame"
    else:
        if frames is not None and frames < 1:
            raise ValueError(f"--frames {frames}: the number of frames the source sends must be at least 1")
        if workers is not None and not 1 <= workers <= 256:
            raise ValueError(f"--workers {workers}: the number of blur_and_halve processes must be from 1 to 256")
        n = FRAME[0] * FRAME[1]
        what = f"a {FRAME[0]}x{FRAME[1]} float32 frame"
    # what the largest message carries: the frame, with the descriptor (and a
    # pipeline's sequence number) around it, in the worst case of alignment
    need = codec.encode([2**63, codec.InPlace((n,), np.uint32)]).max_payload
    if need > L.max_message(cap):
        fit = _capacity_for(need)
        hint = f"use --capacity {_human(fit)} or more"
        if which == "stream":
            most = (L.max_message(cap) - (need - 4 * n)) // 1024 * 1024
            hint += f", or --size {_human(most)} or less" if most >= 1024 else ""
        raise ValueError(f"{what} needs {need:,} bytes but the largest message of a --capacity {_human(cap)} "
                         f"ring is {L.max_message(cap):,} bytes: {hint}")


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


# -- shmring demo pipeline ------------------------------------------------------------

FRAME = (240, 320)                                   # float32 frames, 300 KiB each
SMALL = ((FRAME[0] - 1) // 2, (FRAME[1] - 1) // 2)   # blurred (valid region: -2), every other pixel


def ramp_frames(n: int):
    """The source: frame i is the linear ramp f[y, x] = i + 0.5*x + 0.25*y.
    A 3x3 box blur leaves a linear ramp unchanged, so the expected output is
    known without computing it."""
    y, x = np.mgrid[0:FRAME[0], 0:FRAME[1]]
    ramp = (0.5 * x + 0.25 * y).astype(np.float32)
    for i in range(n):
        yield {"i": i, "img": ramp + np.float32(i)}


def blur_and_halve(frame: dict) -> dict:
    """The map (in each worker): 3x3 box blur (valid region), then every other
    pixel.  ``frame["img"]`` is a read-only view of the ring; the result is new."""
    img = frame["img"]
    rows = img[:-2] + img[1:-1] + img[2:]
    blur = (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / np.float32(9)
    return {"i": frame["i"], "small": blur[::2, ::2]}


class FrameChecker:
    """The sink: checks every small frame against the analytic answer
    (blurred ramp at (2v+1, 2u+1): i + u + 0.5*v + 0.75) within a float32
    tolerance, and that frame numbers arrive strictly in order (``ordered``)
    or exactly once each.  ``finish()`` (called in the sink process at the
    end of the stream) returns the counts: ``run()["result"]``."""

    def __init__(self, frames: int, ordered: bool = True, rtol: float = 1e-5):
        self.n, self.ordered, self.rtol = frames, ordered, rtol
        v, u = np.mgrid[0:SMALL[0], 0:SMALL[1]]
        self.ramp = u + 0.5 * v + 0.75               # the answer for frame 0 (float64)
        self.seen = np.zeros(frames, bool)
        self.frames = self.bad = self.out_of_order = self.duplicates = 0
        self.last, self.max_err = -1, 0.0

    def __call__(self, item: dict) -> None:
        i, small = item["i"], item["small"]          # views: use them here, keep nothing
        ok = 0 <= i < self.n and small.shape == SMALL and small.dtype == np.float32
        if ok:
            want = self.ramp + i
            err = float(np.max(np.abs(small - want) / want))
            self.max_err = max(self.max_err, err)
            ok = err <= self.rtol and not self.seen[i]
            self.duplicates += bool(self.seen[i])
            self.seen[i] = True
        if i != self.last + 1:
            self.out_of_order += 1
            ok = ok and not self.ordered
        self.last = i
        self.frames += 1
        self.bad += not ok

    def finish(self) -> dict:
        return {"frames": self.frames, "bad": self.bad, "missing": int(self.n - self.seen.sum()),
                "duplicates": self.duplicates, "out_of_order": self.out_of_order, "max_rel_err": self.max_err}


def run_pipeline(frames: int = 5000, workers: int = 4, ordered: bool = True, progress: bool = True,
                 capacity: int = 1 << 24) -> int:
    """Run the image pipeline; print a summary; return a process exit code
    (0 = every frame arrived once, correct, and in order if ``ordered``)."""
    print(f"shmring demo pipeline: {frames:,} {FRAME[0]}x{FRAME[1]} float32 frames -> blur_and_halve "
          f"x{workers} ({'ordered' if ordered else 'unordered'}) -> a sink that checks every frame; "
          f"{capacity / 2**20:g} MiB rings", flush=True)
    with Pipeline("demo-pipeline", capacity=capacity) as p:
        raw = p.source(lambda: ramp_frames(frames), name="frames")
        small = p.map(blur_and_halve, raw, workers=workers, ordered=ordered, name="blur_and_halve")
        p.sink(FrameChecker(frames, ordered), small, name="check")
        summary = p.run(progress=progress)
    r, t = summary["result"], summary["elapsed"]
    print(f"  checked {r['frames']:,} of {frames:,} frames: {r['bad']} bad, {r['missing']} missing, "
          f"{r['duplicates']} duplicated, {r['out_of_order']} out of order; "
          f"max relative error {r['max_rel_err']:.1e}")
    print(f"  {frames / t:,.0f} frames/s ({frames * 4 * FRAME[0] * FRAME[1] / t / 1e6:,.0f} MB/s of input "
          f"frames) in {t:.2f} s with {workers} worker{'s' if workers > 1 else ''}")
    ok = r["bad"] == 0 and r["missing"] == 0 and r["frames"] == frames
    print("  OK" if ok else "  FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run())
