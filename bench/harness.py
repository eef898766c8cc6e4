"""Run one case as two forked processes (side "a" and side "b") driven by the parent.

Protocol, per case:

* The parent calls ``case.setup()`` (shared resources: rings, queues, semaphores),
  then forks the two children.  Each child opens its endpoint (``case.open``)
  and reports ``ready``.
* Each round the parent sends ``("run", n)`` to both; both meet at a barrier,
  run ``n`` messages / round trips, and send back a dict of timestamps and
  verification data.  The first rounds are warm-up (and calibrate ``n`` so a
  round lasts about the target time); then ``repeats`` measured rounds.
* By default side "a" is pinned to the first usable CPU and side "b" to the second
  (``--no-pin`` leaves placement to the scheduler; a case may opt out with ``pin = False``).
* ``("stop",)`` lets each side close (a shmring consumer then checks that it
  gets EndOfStream, i.e. nothing extra was sent) and the children exit.

Every wait has a deadline: the parent waits on its pipes with a timeout, and on
any timeout or child error it kills both children (SIGKILL) and calls
``case.cleanup()`` (unlinking segments, semaphores, sockets) in a ``finally``.
The children's hot loops use each transport's plain blocking calls (a
per-call timeout would change what is measured, e.g. Queue.get(timeout=)
polls first); the parent's deadline is what keeps anything from hanging.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from multiprocessing.connection import wait as mp_wait

CTX = mp.get_context("fork")

BARRIER_TIMEOUT = 30.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class CaseFailed(Exception):
    """A case could not be measured; the message says why (shown in the table)."""


def _child(case, role, res, conn, others, barrier, cpu):
    ep = None
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent handles Ctrl-C and kills us
        for c in others:                            # so the parent sees EOF when a side dies
            c.close()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        ep = case.open(role, res)
        conn.send(("ready", os.getpid()))
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                conn.send(("final", case.finish(role, ep)))
                ep = None
                break
            _, n = cmd
            barrier.wait(BARRIER_TIMEOUT)
            out = case.run(role, ep, n)
            conn.send(("result", out))
    except BaseException as e:                      # report, then die: the parent kills the peer
        try:
            conn.send(("error", f"{role}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
        except BaseException:
            pass
    finally:
        if ep is not None:
            try:
                case.abandon(role, ep)
            except BaseException:
                pass
        os._exit(0)                                 # no atexit joins (Queue feeder, zmq) that could hang


def _kill(procs):
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
    for p in procs:
        p.join(5)


class Pair:
    """The two children of one case and the parent's ends of their pipes."""

    def __init__(self, case, pin=True):
        self.case = case
        self.procs, self.conns = [], []
        cpus = sorted(os.sched_getaffinity(0))
        self.cpus = (cpus[0], cpus[1]) if pin and len(cpus) >= 2 else (None, None)

    def start(self, res):
        barrier = CTX.Barrier(2)
        pipes = [CTX.Pipe() for _ in range(2)]
        self.conns = [p[0] for p in pipes]
        for i, role in enumerate("ab"):
            others = [c for j, pp in enumerate(pipes) for c in pp if not (j == i and c is pp[1])]
            p = CTX.Process(target=_child, args=(self.case, role, res, pipes[i][1], others, barrier, self.cpus[i]),
                            name=f"bench-{self.case.key}-{role}", daemon=True)
            p.start()
            self.procs.append(p)
        for _, child_end in pipes:
            child_end.close()
        self._collect("ready", READY_TIMEOUT)

    def _collect(self, want, timeout):
        return collect(self.conns, self.procs, want, timeout)

    def round(self, n, timeout):
        for c in self.conns:
            c.send(("run", n))
        return self._collect("result", timeout)

    def stop(self):
        for c in self.conns:
            c.send(("stop",))
        finals = self._collect("final", STOP_TIMEOUT)
        for p in self.procs:
            p.join(STOP_TIMEOUT)
        return finals

    def kill(self):
        _kill(self.procs)
        for c in self.conns:
            c.close()


def measure(case, cfg, log):
    """Warm up, calibrate, repeat.  Returns {metric: [values per repeat]} plus details."""
    res = None
    pair = None
    try:
        res = case.setup()
        pair = Pair(case, pin=cfg.pin if case.pin is None else case.pin)
        pair.start(res)
        # Warm-up: grow n until a round lasts cfg.warm_s (at least one round, at most 6).
        n = case.n_warm
        t_warm = time.monotonic()
        for _ in range(6):
            a, b = pair.round(n, cfg.warm_timeout)
            case.check(a, b, n)
            el = case.elapsed(a, b)
            if el >= cfg.warm_s or n >= case.n_max:
                break
            n = min(case.n_max, max(n * 2, int(n * cfg.warm_s / max(el, 1e-6) * 1.2)))
        per_item = el / n
        n_run = int(cfg.target_s(case) / max(per_item, 1e-9))
        n_run = max(case.n_min, min(case.n_max, n_run))
        round_timeout = max(cfg.min_round_timeout, 20 * n_run * per_item)
        log(f"    warm-up {time.monotonic() - t_warm:.2f} s; {n_run} per round")
        values: dict[str, list[float]] = {}
        rounds = []
        for _ in range(cfg.repeats):
            a, b = pair.round(n_run, round_timeout)
            case.check(a, b, n_run)
            for k, v in case.metrics(a, b, n_run).items():
                values.setdefault(k, []).append(v)
            rounds.append({"elapsed_s": case.elapsed(a, b), **case.details(a, b, n_run)})
        finals = pair.stop()
        case.check_final(*finals)
        return {"values": values, "n": n_run, "rounds": rounds}
    finally:
        if pair is not None:
            pair.kill()
        if res is not None:
            try:
                case.cleanup(res)
            except Exception as e:           # a leak is worth a line, not a crash
                log(f"    cleanup of {case.key} failed: {e!r}")


def write_study(out: str, stem: str, res: dict, md: str) -> None:
    """Print a study's markdown and write ``stem``.md / ``stem``.json under ``out``."""
    import json
    print(md)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)


def collect(conns, procs, want, timeout):
    """One ``(want, payload)`` reply from every child (conns[i] belongs to procs[i]),
    in order; a child's error report, death, wrong reply or silence is CaseFailed."""
    deadline = time.monotonic() + timeout
    got = [None] * len(conns)
    pending = set(range(len(conns)))
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CaseFailed(f"timeout: no '{want}' from {', '.join(procs[i].name for i in sorted(pending))} "
                             f"within {timeout:.0f} s")
        for c in mp_wait([conns[i] for i in pending], timeout=left):
            i = conns.index(c)
            try:
                kind, payload = c.recv()
            except (EOFError, OSError):
                raise CaseFailed(f"{procs[i].name} died (exit code {procs[i].exitcode})") from None
            if kind == "error":
                raise CaseFailed(payload.strip())
            if kind != want:
                raise CaseFailed(f"{procs[i].name} sent {kind!r}, expected {want!r}")
            got[i] = payload
            pending.discard(i)
    return got
