"""Terminal 1: hand out jobs on the mpmc ring "workers-example.jobs", collect results on "workers-example.results".

    python examples/workers/dispatcher.py [--jobs 2000] [--workers 3]     # then start 3 workers
    python examples/workers/dispatcher.py --spawn [--die-after 10]        # or start them from here

Jobs are int32 arrays; a worker answers each with its sum of squares, which
the dispatcher checks against its own.  Every job must get exactly one
correct result.  A worker killed while holding a job does not lose it: a
surviving worker that is waiting for work notices within ~0.5 s and the job
is delivered again (counted in stats()["redelivered"]).  Exit status 1 if a
job is missing, answered twice or answered wrongly.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import shmring

NAME = "workers-example"


def live_workers(job_ring) -> int:
    return sum(c["alive"] for c in job_ring.stats()["consumers"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000, help="jobs to hand out")
    ap.add_argument("--workers", type=int, default=3, help="workers that end the result stream")
    ap.add_argument("--spawn", action="store_true", help="start the workers as subprocesses")
    ap.add_argument("--die-after", type=int, default=0, help="with --spawn: worker 0 crashes holding its Nth job")
    ap.add_argument("--name", default=NAME, help="ring name prefix (NAME.jobs, NAME.results)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a result")
    args = ap.parse_args(argv)
    rng = np.random.default_rng()
    jobs = [rng.integers(-1000, 1000, int(rng.integers(1, 20_000)), dtype=np.int32) for _ in range(args.jobs)]
    expect = [int(np.dot(a.astype(np.int64), a.astype(np.int64))) for a in jobs]
    got, per_worker, problems = {}, {}, []
    with shmring.Ring.create(f"{args.name}.jobs", 1 << 20, kind="mpmc", replace_dead=True) as job_ring, \
            shmring.Ring.create(f"{args.name}.results", 1 << 20, kind="mpsc", producers=args.workers,
                                replace_dead=True) as res_ring, \
            job_ring.producer() as outbox, res_ring.consumer() as inbox:
        print(f"dispatcher: rings {args.name}.jobs and {args.name}.results created; "
              f"waiting for {args.workers} workers", flush=True)
        kids = []
        if args.spawn:
            worker = [sys.executable, str(Path(__file__).with_name("worker.py")), "--name", args.name]
            kids = [subprocess.Popen(worker + (["--die-after", str(args.die_after)] if k == 0 else []))
                    for k in range(args.workers)]
        deadline = time.monotonic() + args.wait           # start when every worker is there
        while live_workers(job_ring) < args.workers and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = last_result = time.monotonic()
        j = 0
        try:
            while len(got) < args.jobs and time.monotonic() - last_result < args.wait:
                # Fill the job ring as far as it goes, then take whatever results are in.
                while j < args.jobs and outbox.try_send({"job": j, "data": jobs[j]}):
                    j += 1
                for r in inbox.recv_many(256, timeout=0.05, copy=True):
                    last_result = time.monotonic()
                    if r["job"] in got:
                        problems.append(f"job {r['job']} answered twice")
                    elif r["sum_sq"] != expect[r["job"]]:
                        problems.append(f"job {r['job']}: wrong result {r['sum_sq']}")
                    got[r["job"]] = r["worker"]
                    per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + 1
            # Close the job stream only now: workers waiting for more work are
            # what notices a dead worker and hands its job to another.
            outbox.close()
            while True:                                   # the result stream ends when every worker left
                with inbox.recv(timeout=args.wait) as msg:
                    problems.append(f"job {msg.value['job']} answered twice")
        except shmring.EndOfStream:
            pass
        except shmring.PeerGone:                          # raised once every result sent was received
            print("dispatcher: a worker died (the result stream ended with PeerGone)", flush=True)
        except shmring.Timeout:
            problems.append(f"the result stream did not end: fewer than {args.workers} workers came?")
        elapsed = last_result - t0
        redelivered = job_ring.stats()["redelivered"]
        for kid in kids:
            kid.wait()
    missing = args.jobs - len(got)
    if missing:
        problems.append(f"{missing} jobs got no result")
    counts = ", ".join(f"{pid}: {n}" for pid, n in sorted(per_worker.items()))
    print(f"dispatcher: {len(got)} of {args.jobs} jobs answered by {len(per_worker)} workers ({counts})")
    print(f"dispatcher: {len(got) / max(elapsed, 1e-9):,.0f} jobs/s, redelivered: {redelivered}")
    for p in problems[:10]:
        print(f"dispatcher: BAD {p}")
    print(f"dispatcher: {'OK' if not problems else 'FAILED'}, {len(problems)} problems")
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
