"""Multi-process pipelines: stages wired by shmring rings, started, watched
and stopped together.

::

    with shmring.Pipeline("video", capacity=1 << 26) as p:
        frames = p.source(read_frames)                    # a generator (function) -> ring
        small = p.map(resize, frames, workers=4)          # work-sharing over 4 processes
        p.sink(write, small)                              # one consumer
        summary = p.run(progress=True)                    # live rates and ring fill

Every hop is a ring: one consumer process -> an ``mpsc`` ring, several
workers -> an ``mpmc`` ring (each item to one worker).  Items travel as
msgpack ``[seq, value]`` pairs, so arrays (also inside dicts and lists) reach
the next stage as zero-copy read-only views; a stage function must not keep
them past its return (copy what it keeps).  ``ordered=True`` on a ``map``
delivers its results to the next stage in source order, however many workers
it has (an item that arrives early is copied aside until its turn); a later
map with several workers reorders again only if it is ordered too.  A map
function returning None drops the item (a placeholder keeps its place in the
order, so nothing waits for it).

Lifecycle: the end of the source's iterator flows downstream as end of
stream and every process exits; an exception in any stage, a stage process
that dies (SIGKILL, a segfault) or Ctrl-C stops every process within about a
second, unlinks every ring, and ``run()`` raises :class:`PipelineError` (with
the stage name and the remote traceback) or ``KeyboardInterrupt``.  Stage
processes die with the parent (``PR_SET_PDEATHSIG``).  Processes come from the
``multiprocess`` package, so stages may be lambdas and closures.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback

import multiprocess
import multiprocess.connection

from . import codec
from . import layout as L
from .errors import EndOfStream, PeerGone, ShmringError, Timeout
from .ring import Ring

DEFAULT_CAPACITY = 1 << 24


def _check_capacity(capacity) -> int:
    """A ring capacity, checked when the pipeline is built rather than when it runs."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < L.MIN_CAPACITY \
            or capacity > L.MAX_CAPACITY or capacity & (capacity - 1):
        raise ValueError(f"capacity must be a power of two from {L.MIN_CAPACITY} to {L.MAX_CAPACITY}, got {capacity!r}")
    return capacity


class PipelineError(ShmringError):
    """A stage raised or died.  ``stage`` names it, ``remote_traceback`` is the
    stage process's formatted traceback (None if the process was killed)."""

    def __init__(self, message: str, stage: str = "", remote_traceback: str | None = None):
        super().__init__(message, stage, remote_traceback)
        self.stage = stage
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return self.args[0]


class Stream:
    """The output of a stage: the ring between it and the stage that reads it."""

    def __init__(self, pipeline: "Pipeline", producer: "_Stage", capacity: int):
        self.pipeline, self.producer, self.capacity = pipeline, producer, capacity
        self.consumer: _Stage | None = None
        self.ring: Ring | None = None

    def __repr__(self):
        return f"<shmring.pipeline.Stream from {self.producer.name}>"


class _Stage:
    def __init__(self, role, name, fn, inp, workers, ordered, out):
        self.role, self.name, self.fn, self.inp = role, name, fn, inp
        self.workers, self.ordered, self.out = workers, ordered, out
        self.output: Stream | None = None
        self.procs: list = []


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:                                          # it died before prctl
        os._exit(1)


def _fn_site(fn):
    """(filename, line) of a stage function, for warnings that point at it."""
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)
    return (code.co_filename, code.co_firstlineno) if code else ("<stage>", 0)


def _kept_what(value) -> str:
    import numpy as np
    if isinstance(value, np.ndarray):
        return f"its input array ({value.dtype}, shape {value.shape})"
    if isinstance(value, memoryview):
        return f"a memoryview of its {value.nbytes}-byte input"
    return f"an array inside its input {type(value).__name__}"


def _release_checked(msg, stage: "_Stage", what: str) -> None:
    """Release a stage's input message; if the stage function kept a view of
    it (its export count is above zero), warn naming the stage, what it kept
    and where the function is, instead of the generic warning from C (which
    points at this module and suggests msg.copy(), which a stage cannot call).
    The space waits for the view either way (R67's deferral)."""
    if msg.released:
        return
    if not msg._exports:
        msg.release()
        return
    import warnings
    from .errors import EscapedViewWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EscapedViewWarning)
        msg.release()
    filename, line = _fn_site(stage.fn)
    warnings.warn_explicit(
        f"stage {stage.name!r} kept a view of {what} after it returned (in a global, a closure, an "
        f"attribute of the function object...). Stage inputs are zero-copy views of the ring, valid only "
        f"during the call: the ring space stays held until that view is garbage-collected, which stalls "
        f"the upstream stage once the ring is full. Keep a copy instead (np.array(value), value.copy(), "
        f"bytes(view)).", EscapedViewWarning, filename, line)


def _inputs(cons, ordered: bool, stage: "_Stage | None" = None):
    """The values of a stage's input, in source order if ``ordered`` (items
    that arrive early are copied aside; in-order ones stay zero-copy).  A None
    value (a dropped item's placeholder) is skipped.  Every map forwards one
    message per source item, so the sequence has no holes; an item left
    waiting at the end of the stream is an error, never a silent loss."""
    early, want = {}, 0
    for msg in cons:
        what = "its input"
        try:
            seq, value = msg.value
            what = _kept_what(value)
            if not ordered or seq == want:
                if value is not None:
                    yield value
                del value
                want = seq + 1
            else:
                del value
                early[seq] = msg.copy()[1]
                continue
        finally:
            if stage is not None:
                _release_checked(msg, stage, what)
            else:
                msg.release()
        while want in early:
            value = early.pop(want)
            if value is not None:
                yield value
            want += 1
    if early:
        raise ShmringError(f"the stream ended with {len(early)} items waiting for item {want}, which never "
                           "came: an upstream stage lost it")


def _map_one(msg, fn, prod, out) -> str:
    """One item through a map function (a function of its own, so that no
    view of the message outlives it).  Exactly one message goes out per item:
    a dropped item (None) is forwarded as a placeholder."""
    seq, value = msg.value
    what = _kept_what(value)
    if value is None:
        prod.send([seq, None])
        return what
    if out is not None:                              # built in place in the output ring
        with prod.reserve_value([seq, codec.InPlace(*out)]) as (arr,):
            fn(value, arr)
        return what
    prod.send([seq, fn(value)])
    return what


def _stage_main(stage: _Stage, worker: int, parent: int, errors) -> None:
    """A stage process: read its input ring, call the function, write its output ring."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the parent decides how Ctrl-C ends the run
    prod = cons = None
    try:
        if stage.output is not None:
            prod = stage.output.ring.producer()
        if stage.inp is not None:
            cons = stage.inp.ring.consumer()
        fn = stage.fn
        if stage.role == "source":
            items = fn() if callable(fn) else fn
            for seq, item in enumerate(items):
                prod.send([seq, item])
        elif stage.role == "map":
            for msg in cons:
                what = "its input"
                try:
                    what = _map_one(msg, fn, prod, stage.out)
                finally:
                    _release_checked(msg, stage, what)
                del msg
        else:
            for value in _inputs(cons, stage.inp.producer.ordered, stage):
                fn(value)
                del value
            finish = getattr(fn, "finish", None)
            if callable(finish):                     # the sink's result, for run()'s summary
                errors.put(("result", stage.name, finish()))
                errors.close()
                errors.join_thread()
        if prod is not None:
            prod.close()
        if cons is not None:
            cons.close()
    except BaseException as e:
        if prod is not None:
            prod.close(_status=2)
        errors.put(("error", stage.name, worker, os.getpid(), f"{type(e).__name__}: {e}", traceback.format_exc()))
        errors.close()
        errors.join_thread()                    # the report is in the pipe before we go
        sys.stdout.flush()
        os._exit(1)


class Pipeline:
    """A graph of stages (one source, any number of maps, one sink, in a
    chain), each stage one or more processes, every hop a ring.  A context
    manager: on exit every process still running is stopped and every ring
    unlinked, whatever happened."""

    def __init__(self, name: str = "pipeline", *, capacity: int = DEFAULT_CAPACITY,
                 start_method: str | None = None):
        self.name = name
        self.capacity = _check_capacity(capacity)
        self._ctx = multiprocess.get_context(start_method)
        self._stages: list[_Stage] = []
        self._rings: list[Ring] = []
        self._ran = False
        self._result = None
        self.summary = None          # what run() returned, or results() left once exhausted

    # -- building ------------------------------------------------------------
    def _add(self, role, fn, inp, workers, ordered, out, name, capacity) -> Stream | None:
        if self._ran:
            raise ShmringError("this pipeline has already run; build a new one")
        if inp is not None:
            if not isinstance(inp, Stream) or inp.pipeline is not self:
                raise TypeError(f"the input of a {role} must be a Stream of this pipeline, got {inp!r}")
            if inp.consumer is not None:
                raise ValueError(f"stream from {inp.producer.name!r} is already read by {inp.consumer.name!r}; "
                                 "a stream has one reading stage")
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
            raise ValueError(f"workers must be an int from 1 to 256, got {workers!r}")
        if not (callable(fn) or (role == "source" and hasattr(fn, "__iter__"))):
            raise TypeError(f"a {role} needs a function{' or an iterable' if role == 'source' else ''}, got {fn!r}")
        name = name or f"{role}{len(self._stages)}:{getattr(fn, '__name__', type(fn).__name__)}"
        if any(s.name == name for s in self._stages):
            raise ValueError(f"two stages named {name!r}")
        st = _Stage(role, name, fn, inp, workers, ordered, out)
        if inp is not None:
            inp.consumer = st
        self._stages.append(st)
        if role != "sink":
            st.output = Stream(self, st, _check_capacity(capacity) if capacity else self.capacity)
        return st.output

    def source(self, fn, *, name: str | None = None, capacity: int | None = None) -> Stream:
        """A source stage: ``fn`` is a generator function (called in the stage
        process) or an iterable; every item it yields becomes a message."""
        return self._add("source", fn, None, 1, False, None, name, capacity)

    def map(self, fn, stream: Stream, *, workers: int = 1, ordered: bool = False, out=None,
            name: str | None = None, capacity: int | None = None) -> Stream:
        """A transform stage over ``workers`` processes: ``fn(value) -> result``
        (None drops the item).  ``ordered=True`` delivers results in source
        order.  ``out=(shape, dtype)`` builds each result in place in the output
        ring: ``fn(value, out_array)`` fills the writable array and returns None."""
        if out is not None:
            shape, dtype = out
            out = (tuple(shape) if not isinstance(shape, int) else (shape,), dtype)
        return self._add("map", fn, stream, workers, bool(ordered), out, name, capacity)

    def sink(self, fn, stream: Stream, *, name: str | None = None) -> None:
        """The final stage: ``fn(value)`` for every item (one process).  If
        ``fn`` has a ``finish()`` method (e.g. a callable object), its return
        value (picklable) comes back as ``run()["result"]``: ``fn`` runs in
        the sink process on its own copy, so the parent's object is not
        updated."""
        self._add("sink", fn, stream, 1, False, None, name, None)

    # -- running -------------------------------------------------------------
    def results(self, stream: Stream, *, copy: bool = True, progress: bool = False,
                timeout: float | None = None):
        """Run the pipeline with ``stream`` (the output of its last stage)
        coming back to this process: an iterator over its items, as
        ``Pool.imap`` gives (``for out in p.results(small): ...``; in source
        order if the stage feeding it is ``ordered``).  It takes the place of
        ``sink`` and ``run()``: the stages start at the first ``next()``, and
        when the iterator is exhausted every stage has finished and
        ``p.summary`` holds what ``run()`` returns.  Leaving the loop early
        (``break``, an exception) or dropping the iterator stops every stage.
        A stage that raised or died raises :class:`PipelineError` here.

        ``copy=True`` (default): each item is the parent's own copy, safe to
        keep (``list(p.results(s))`` works).  ``copy=False``: zero-copy, each
        item's arrays are read-only views of the ring, valid until the next
        item is requested (R69): use or copy them in the loop body; a view
        kept past it holds its ring space (EscapedViewWarning at your loop)
        and, once the ring is full, stalls the stages upstream.  Items that
        arrive ahead of their turn (``ordered``) are copies either way."""
        if self._ran:
            raise ShmringError("this pipeline has already run; build a new one")
        if not isinstance(stream, Stream) or stream.pipeline is not self:
            raise TypeError(f"results() needs a Stream of this pipeline, got {stream!r}")
        if stream.consumer is not None:
            raise ValueError(f"stream from {stream.producer.name!r} is already read by {stream.consumer.name!r}")
        if any(s.role == "sink" for s in self._stages):
            raise ValueError("this pipeline has a sink; results() takes the sink's place (build it without one)")
        st = _Stage("results", "results", None, stream, 1, False, None)
        stream.consumer = st
        self._stages.append(st)
        self._check_graph()
        self._ran = True
        return self._results(st, bool(copy), progress, timeout)

    def _results(self, st, copy, progress, timeout):
        self._make_rings()
        errors = self._ctx.Queue()
        bars = _Progress(self._stages) if progress and sys.stderr.isatty() else None
        t0 = time.monotonic()
        cons = held = None
        try:
            self._start(errors)
            cons = st.inp.ring.consumer()
            ordered = st.inp.producer.ordered
            early, want, held = {}, 0, None
            while True:
                try:
                    msg = cons.recv(timeout=0.05)
                except Timeout:
                    self._check_running(errors, t0, timeout)
                    if bars:
                        bars.update()
                    continue
                except EndOfStream:
                    break
                except PeerGone:
                    time.sleep(0.1)                 # let the stage's report arrive
                    raise self._failure(errors) or PipelineError(
                        f"pipeline {self.name!r}: the stage feeding results() stopped on an error", "results") \
                        from None
                try:
                    seq, value = msg.value
                    if ordered and seq != want:
                        del value
                        early[seq] = msg.copy()[1]
                        continue
                    want = seq + 1
                    if value is not None:
                        if copy:
                            del value
                            value = msg.copy()[1]
                            msg.release()
                            yield value
                        else:
                            what = _kept_what(value)
                            yield value
                            del value
                            # the loop variable still holds this item while the next is
                            # requested: check it one item later (R69)
                            if held is not None:
                                _release_results(*held)
                            held = (msg, what) if msg._exports else None
                        value = None
                finally:
                    if held is None or held[0] is not msg:
                        msg.release()
                del msg
                while want in early:
                    value = early.pop(want)
                    want += 1
                    if value is not None:
                        yield value
                    value = None
                if bars:
                    bars.update()
            if early:
                raise ShmringError(f"the stream ended with {len(early)} items waiting for item {want}, which "
                                   "never came: an upstream stage lost it")
            while not all(p.exitcode == 0 for s in self._stages for p in s.procs):
                self._check_running(errors, t0, timeout)
                pending = [p.sentinel for s in self._stages for p in s.procs if p.exitcode is None]
                multiprocess.connection.wait(pending + [errors._reader], timeout=0.05)
            self._failure(errors)
            self.summary = self._summary(time.monotonic() - t0)
            if bars:
                bars.close(self.summary)
                bars = None
            if progress:
                _print_summary(self.summary)
        except BaseException:
            if bars:
                bars.abandon()
            raise
        finally:
            if held is not None:                    # the last item: the loop variable may still hold it
                import warnings
                from .errors import EscapedViewWarning
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", EscapedViewWarning)
                    held[0].release()
            if cons is not None:
                cons.close()
            self._stop()
            errors.close()

    def _check_results_free(self):
        if any(s.role == "results" for s in self._stages):
            raise ValueError("this pipeline's output goes to results(): iterate over that instead of run()")

    def _start(self, errors) -> None:
        for s in self._stages:
            if s.role == "results":
                continue                            # read in this process
            for w in range(s.workers):
                p = self._ctx.Process(target=_stage_main, args=(s, w, os.getpid(), errors),
                                      name=f"{self.name}:{s.name}:{w}", daemon=True)
                p.start()
                s.procs.append(p)

    def _check_running(self, errors, t0, timeout) -> None:
        failure = self._failure(errors)
        if failure is not None:
            raise failure
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise Timeout(f"pipeline {self.name!r} did not finish within {timeout} s")

    def _check_graph(self):
        roles = [s.role for s in self._stages]
        if roles.count("source") != 1 or roles.count("sink") + roles.count("results") != 1:
            raise ValueError(f"a pipeline needs one source and one sink (or results()), got stages {roles}")
        for s in self._stages:
            if s.output is not None and s.output.consumer is None:
                raise ValueError(f"the output of stage {s.name!r} is not read by any stage")

    def _make_rings(self):
        # Anonymous (sealed memfd) rings: nothing in /dev/shm to leave behind
        # if the whole process tree is killed, and not bounded by its size;
        # the stages get them by fork or by pickling (descriptor passing).
        for s in self._stages:
            if s.output is None:
                continue
            readers = s.output.consumer.workers
            kind = "mpsc" if readers == 1 else "mpmc"
            ring = Ring.create(None, s.output.capacity, kind=kind, producers=s.workers,
                               max_producers=max(s.workers, 1),
                               **({} if kind == "mpsc" else {"max_consumers": readers}))
            s.output.ring = ring
            self._rings.append(ring)

    def run(self, *, progress: bool = False, timeout: float | None = None) -> dict:
        """Start every stage, wait until the sink has seen the end of the
        stream, and return a summary: ``elapsed`` seconds, per stage the
        items it produced (the sink: consumed) and items/s over the run, and
        the sink's ``result``.  ``progress=True`` shows a live bar per stage
        on a terminal (tqdm, on stderr) and prints the summary.

        Raises :class:`PipelineError` if a stage raised or died, Timeout after
        ``timeout`` seconds, and KeyboardInterrupt on Ctrl-C; in every case
        all stage processes are stopped and every ring is unlinked first."""
        self._check_results_free()
        self._check_graph()
        self._ran = True
        self._make_rings()
        errors = self._ctx.Queue()
        bars = _Progress(self._stages) if progress and sys.stderr.isatty() else None
        t0 = time.monotonic()
        try:
            self._start(errors)
            while True:
                failure = self._failure(errors)
                if failure is not None:
                    raise failure
                if all(p.exitcode == 0 for s in self._stages for p in s.procs):
                    self._failure(errors)                # collects the sink's result, if any
                    break
                if timeout is not None and time.monotonic() - t0 > timeout:
                    raise Timeout(f"pipeline {self.name!r} did not finish within {timeout} s")
                if bars:
                    bars.update()
                # sleep until a stage process exits or an error report arrives (at most 50 ms)
                pending = [p.sentinel for s in self._stages for p in s.procs if p.exitcode is None]
                multiprocess.connection.wait(pending + [errors._reader], timeout=0.05)
            summary = self.summary = self._summary(time.monotonic() - t0)
            if bars:
                bars.close(summary)
            if progress:
                _print_summary(summary)
            return summary
        except BaseException:
            if bars:
                bars.abandon()
            self._stop()
            raise
        finally:
            self._stop()
            errors.close()

    def _failure(self, errors) -> PipelineError | None:
        """The first failure's root cause, or None.  One failure makes others
        (a stage whose neighbour died gets PeerGone), so once something failed
        we collect for a moment and report, in this order: an exception that
        is not PeerGone, a process killed by a signal, anything else."""
        def drain(out):
            while True:
                try:
                    r = errors.get(timeout=0.01) if out else errors.get_nowait()
                except Exception:
                    return out
                if r[0] == "result":
                    self._result = r[2]
                else:
                    out.append(r[1:])

        def bad_exits():
            return [(s, w, p) for s in self._stages for w, p in enumerate(s.procs)
                    if p.exitcode is not None and p.exitcode != 0]
        reports = drain([])
        if not reports and not bad_exits():
            return None
        time.sleep(0.2)
        reports = drain(reports)
        reported = {r[2] for r in reports}
        killed = [(s, w, p) for s, w, p in bad_exits() if p.pid not in reported]
        for stage, worker, pid, what, tb in reports:
            if not what.startswith(("PeerGone", "EndOfStream")):
                return PipelineError(f"stage {stage!r} (worker {worker}, pid {pid}) raised {what}\n\n"
                                     f"remote traceback:\n{tb}", stage, tb)
        for s, w, p in sorted(killed, key=lambda k: k[2].exitcode >= 0):
            code = p.exitcode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            return PipelineError(f"stage {s.name!r} (worker {w}, pid {p.pid}) {how}", s.name, None)
        stage, worker, pid, what, tb = reports[0]
        return PipelineError(f"stage {stage!r} (worker {worker}, pid {pid}) raised {what}\n\n"
                             f"remote traceback:\n{tb}", stage, tb)

    def _stop(self) -> None:
        """Stop every stage process (SIGTERM, then SIGKILL after 0.5 s) and unlink every ring."""
        procs = [p for s in self._stages for p in s.procs]
        for p in procs:
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except (ProcessLookupError, TypeError):
                    pass
        deadline = time.monotonic() + 0.5
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.join(1.0)
        for r in self._rings:
            try:
                r.close()
                r.unlink()
            except ShmringError:
                pass
        self._rings = []

    def _summary(self, elapsed: float) -> dict:
        out = {"elapsed": elapsed, "stages": {}, "result": self._result}
        for s in self._stages:
            n, b = _stage_count(s), _stage_bytes(s)
            out["stages"][s.name] = {"workers": s.workers, "items": n, "items_per_s": n / elapsed if elapsed else 0.0}
            if b is not None:           # a stage with an output ring: what it wrote there
                out["stages"][s.name].update({"bytes_out": b, "mb_per_s_out": b / elapsed / 1e6 if elapsed else 0.0})
        return out

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self._stop()


def _stage_count(s: _Stage) -> int:
    """Items a stage has produced (source, map) or consumed (sink), from ring stats."""
    try:
        if s.output is not None and s.output.ring is not None:
            return s.output.ring.stats()["sent"]
        if s.inp is not None and s.inp.ring is not None:
            st = s.inp.ring.stats()
            return st["consumer"]["received"] if "consumer" in st else sum(c["received"] for c in st["consumers"])
    except ShmringError:
        pass
    return 0


def _stage_bytes(s: _Stage) -> int | None:
    """Bytes a stage wrote to its output ring (None: it has none)."""
    try:
        if s.output is not None and s.output.ring is not None:
            return sum(p["bytes"] for p in s.output.ring.stats()["producers"])
    except ShmringError:
        pass
    return None


def _print_summary(summary: dict) -> None:
    print(f"pipeline finished in {summary['elapsed']:.2f} s")
    for name, st in summary["stages"].items():
        rate = f"  {st['mb_per_s_out']:>10,.1f} MB/s out" if "mb_per_s_out" in st else ""
        print(f"  {name:30} x{st['workers']:<3} {st['items']:>10,} items  {st['items_per_s']:>12,.0f} items/s{rate}")


def _release_results(msg, what: str) -> None:
    """results(copy=False): the previous item is released when the next is
    requested (R69); a view of it kept past the loop body is named."""
    if msg.released or not msg._exports:
        msg.release()
        return
    import warnings
    from .errors import EscapedViewWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EscapedViewWarning)
        msg.release()
    warnings.warn(EscapedViewWarning(
        f"results(copy=False): an earlier item ({what[4:]}) was released when the next ones were requested, "
        "but a view of it is still alive (kept past the loop body). Its ring space stays held until that view "
        "is garbage-collected, which stalls the pipeline once the ring is full. Keep a copy (value.copy()), or "
        "use results() with its default copy=True"), stacklevel=3)


class _Progress:
    """One tqdm bar per stage: items, items/s, bytes/s out and the fill of the ring it reads."""

    def __init__(self, stages):
        from tqdm import tqdm
        self.stages = stages
        import shutil
        # a terminal that reports a size of 0 x 0 (tqdm would then draw nothing): 100 x 20
        size = shutil.get_terminal_size((100, 20))
        self.bars = [tqdm(desc=f"{s.name} x{s.workers}", unit="it", position=i, leave=True,
                          ncols=size.columns, nrows=max(size.lines, len(stages) + 1))
                     for i, s in enumerate(stages)]
        self.last = [0] * len(stages)
        self.t = time.monotonic()
        self.bytes = [0] * len(stages)

    def update(self, force: bool = False):
        now = time.monotonic()
        if now - self.t < 0.25 and not force:
            return
        dt, self.t = now - self.t, now
        for i, s in enumerate(self.stages):
            n = _stage_count(s)
            info = []
            try:
                if s.output is not None and s.output.ring is not None:
                    st = s.output.ring.stats()
                    b = sum(p["bytes"] for p in st["producers"])
                    info.append(f"{(b - self.bytes[i]) / dt / 1e6:,.1f} MB/s out")
                    self.bytes[i] = b
                if s.inp is not None and s.inp.ring is not None:
                    info.append(f"in-ring {s.inp.ring.stats()['fill'] * 100:3.0f}% full")
            except ShmringError:
                pass
            self.last[i], delta = n, n - self.last[i]
            self.bars[i].set_postfix_str(", ".join(info), refresh=False)
            self.bars[i].update(delta)              # one redraw per tick

    def close(self, summary: dict | None = None):
        """The last redraw: counts brought up to date, and each bar's MB/s out
        the whole run's average from ``summary`` (the figures run() prints),
        not the rate of the last tick (0 once a stage has finished)."""
        self.update(force=True)
        if summary is not None:
            for i, s in enumerate(self.stages):
                st = summary["stages"].get(s.name, {})
                info = [f"{st['mb_per_s_out']:,.1f} MB/s out"] if "mb_per_s_out" in st else []
                self.bars[i].set_postfix_str(", ".join(info), refresh=True)
        for b in self.bars:
            b.close()

    def abandon(self):
        for b in self.bars:
            b.close()
