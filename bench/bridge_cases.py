"""The bridge vs plain pyzmq PUSH/PULL, same run, over loopback TCP.

    python -m bench.bridge_cases [--seconds 1]

Bridge: a producer process -> spsc ring -> `forward` process -> TCP -> `receive`
process -> spsc ring -> this process (consumer).  PUSH/PULL: a producer process
PUSHes (copy=False for 1 MiB) -> TCP -> this process PULLs.  Median of 3.
"""
import argparse
import os
import statistics
import time

import multiprocess
import numpy as np

import shmring


def _bridge_producer(name, size, n):
    ring = shmring.Ring.attach(name)
    data = np.zeros(size, np.uint8)
    with ring.producer() as p:
        for _ in range(n):
            p.send(data if size > 64 else data.tobytes())
    ring.close()


def _forward(name, ep):
    from shmring.bridge import forward
    forward(name, ep)


def _receive(name, ep):
    from shmring.bridge import receive
    receive(ep, name, state_path=None)


def bridge(size, n, port):
    tag = f"{os.getpid()}-{port}"
    a = shmring.Ring.create(f"bba-{tag}", 1 << 24)
    b = shmring.Ring.create(f"bbb-{tag}", 1 << 24)
    ep = f"tcp://127.0.0.1:{port}"
    ctx = multiprocess.get_context("fork")
    ps = [ctx.Process(target=_receive, args=(b.name, ep)), ctx.Process(target=_forward, args=(a.name, ep))]
    for p in ps:
        p.start()
    cons = b.consumer()
    t0 = None
    prod = ctx.Process(target=_bridge_producer, args=(a.name, size, n))
    prod.start()
    got = 0
    for m in cons:
        if t0 is None:
            t0 = time.perf_counter()
        m.release()
        got += 1
    dt = time.perf_counter() - t0
    cons.close()
    for p in ps + [prod]:
        p.join(30)
    a.close(), b.close(), a.unlink(), b.unlink()
    return (got - 1) / dt


def _pusher(ep, size, n):
    import zmq
    s = zmq.Context().socket(zmq.PUSH)
    s.sndhwm = 256
    s.connect(ep)
    data = np.zeros(size, np.uint8)
    for _ in range(n):
        s.send(data if size > 64 else data.tobytes(), copy=size <= 64)
    s.send(b"")
    s.close(linger=-1)


def pushpull(size, n, port):
    import zmq
    s = zmq.Context.instance().socket(zmq.PULL)
    s.rcvhwm = 256
    s.bind(f"tcp://127.0.0.1:{port}")
    p = multiprocess.get_context("fork").Process(target=_pusher, args=(f"tcp://127.0.0.1:{port}", size, n))
    p.start()
    s.recv(copy=size <= 64)
    t0 = time.perf_counter()
    got = 1
    while True:
        f = s.recv(copy=size <= 64)
        if len(f) == 0:
            break
        got += 1
    dt = time.perf_counter() - t0
    p.join()
    s.close(0)
    return (got - 1) / dt


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"loopback TCP, {os.uname().release}, {os.cpu_count()} CPUs; median of {a.repeats}\n")
    print("| payload | transport | msg/s | MB/s |\n|---|---|---:|---:|")
    port = 40000 + os.getpid() % 10000
    for size, n in ((1 << 20, 1500), (64, 60000)):
        res = {"shmring bridge": [], "pyzmq PUSH/PULL": []}
        for _ in range(a.repeats):                    # interleaved
            port += 1
            res["shmring bridge"].append(bridge(size, n, port))
            port += 1
            res["pyzmq PUSH/PULL"].append(pushpull(size, n, port))
        for k, v in res.items():
            m = statistics.median(v)
            print(f"| {'1 MiB array' if size > 64 else '64 B bytes'} | {k} | {m:,.0f} | {m * size / 1e6:,.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
