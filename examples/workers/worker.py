"""Terminal 2, 3, ...: take jobs from "workers-example.jobs", send results to "workers-example.results".

    python examples/workers/worker.py [--die-after N]

One of several consumers sharing the mpmc job ring (each job goes to one
worker) and one of the producers of the mpsc result ring.  The result is
sent before the job is released, so a worker that dies holding a job loses
nothing: the job goes to another worker.  --die-after N makes this worker
crash (os._exit) while holding its Nth job, to see that happen.
"""
import argparse
import os
import time

import numpy as np

import shmring

NAME = "workers-example"


def work(job, ms: float) -> dict:
    """The job: the sum of squares of an int32 array (read in place, zero-copy)."""
    data = job["data"].astype(np.int64)
    time.sleep(ms / 1000)                                 # stands in for heavier work
    return {"job": job["job"], "worker": os.getpid(), "sum_sq": int(np.dot(data, data))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job-ms", type=float, default=1.0, help="extra milliseconds each job takes")
    ap.add_argument("--die-after", type=int, default=0, help="crash while holding the Nth job (0: never)")
    ap.add_argument("--name", default=NAME, help="ring name prefix (NAME.jobs, NAME.results)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the dispatcher / for room")
    args = ap.parse_args(argv)
    me, done = os.getpid(), 0
    with shmring.Ring.attach(args.name + ".jobs", wait=args.wait) as jobs, shmring.Ring.attach(args.name + ".results", wait=args.wait) as results, \
            jobs.consumer() as inbox, results.producer() as outbox:
        print(f"worker {me}: ready", flush=True)
        for msg in inbox:                                 # until the dispatcher closes the job stream
            with msg:
                if done + 1 == args.die_after:
                    print(f"worker {me}: crashing while holding job {msg.value['job']}", flush=True)
                    os._exit(3)                           # no cleanup at all, like kill -9
                outbox.send(work(msg.value, args.job_ms), timeout=args.wait)
            done += 1                                     # released: done, it cannot come back
    print(f"worker {me}: {done} jobs done", flush=True)


if __name__ == "__main__":
    main()
