"""The bridge vs plain pyzmq PUSH/PULL vs zenoh pub/sub, same run, across a veth link.

    sudo python -m bench.bridge_cases [--repeats 3] [--loopback] [--curve]

Each transport's two ends run in two network namespaces joined by a veth pair
(the sending end in namespace A, the receiving end in namespace B, TCP over
the veth addresses); without root / iproute2 it falls back to loopback TCP and
prints why.  Every message carries its sequence number in its first 8 bytes,
the rest is a fixed random block: the receiving side checks every message's
sequence number (in order, none missing, none twice) and compares the rest byte
for byte,
and a row fails loudly otherwise.  Rates are counted from the first to the last
message at the final receiver; medians of ``--repeats`` interleaved runs.

* shmring bridge: a producer process -> spsc ring -> ``forward`` process (ns A)
  -> TCP -> ``receive`` process (ns B) -> spsc ring -> a consumer process
  (four processes, acknowledged exactly-once delivery; no CURVE unless
  ``--curve`` adds the CURVE rows).
* pyzmq PUSH/PULL: a PUSH process (ns A; ``copy=False`` for 1 MiB) -> TCP ->
  a PULL process (ns B); HWM 256 both sides.
* zenoh pub/sub (eclipse-zenoh): a publisher session (ns A, peer mode,
  connects to the subscriber's TCP endpoint, scouting off,
  ``CongestionControl.BLOCK``, reliable) -> a subscriber session (ns B,
  listens on the veth address) with a FIFO channel handler; the publisher
  starts once the subscriber is matched.
"""
import argparse
import contextlib
import ctypes
import os
import statistics
import subprocess
import time

import multiprocess
import numpy as np

import shmring

CLONE_NEWNET = 0x40000000
N = {1 << 20: 1500, 64: 60000}
WAIT = 60.0


# -- the network: two namespaces joined by a veth pair, or loopback ---------------------------------
@contextlib.contextmanager
def network(loopback: bool):
    """Yields (ns_a, ns_b, addr_b, description)."""
    if loopback:
        yield None, None, "127.0.0.1", "loopback TCP (--loopback)"
        return
    tag = f"{os.getpid() % 100000}"
    x = 100 + os.getpid() % 150
    na, nb, va, vb = f"bbA{tag}", f"bbB{tag}", f"bva{tag}", f"bvb{tag}"
    made = []

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)
    try:
        try:
            for n in (na, nb):
                ip("netns", "add", n)
                made.append(n)
            ip("link", "add", va, "type", "veth", "peer", "name", vb)
            ip("link", "set", va, "netns", na)
            ip("link", "set", vb, "netns", nb)
            ip("-n", na, "addr", "add", f"10.232.{x}.1/30", "dev", va)
            ip("-n", nb, "addr", "add", f"10.232.{x}.2/30", "dev", vb)
            for n, v in ((na, va), (nb, vb)):
                ip("-n", n, "link", "set", v, "up")
                ip("-n", n, "link", "set", "lo", "up")
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            print(f"NOTE: cannot make network namespaces ({e} {err.decode(errors='replace').strip()}); "
                  "falling back to loopback TCP", flush=True)
            for n in made:
                subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=10)
            made.clear()
            yield None, None, "127.0.0.1", "loopback TCP (namespaces could not be made)"
            return
        yield na, nb, f"10.232.{x}.2", f"veth pair between network namespaces {na} -> {nb} (MTU 1500)"
    finally:
        for n in made:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=10)


def _enter(ns):
    """Move this (forked child) process into network namespace ``ns``."""
    if ns is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({ns})")
    finally:
        os.close(fd)


# -- the payloads and their check -------------------------------------------------------------------
def _block(size):
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)


class Checker:
    """Every message: its sequence number (in order from 0), and its fixed part
    compared byte for byte with the expected block (a memcmp: cheaper than a
    crc32 of 1 MiB, 0.8 ms here, which would cap every row near 1,200 msg/s)."""

    def __init__(self, size):
        self.rest = _block(size)[8:]
        self.next = 0
        self.bad = 0

    def __call__(self, buf):
        a = np.frombuffer(buf, np.uint8)
        seq = int.from_bytes(a[:8].tobytes(), "little")
        if seq != self.next or not np.array_equal(a[8:], self.rest):
            self.bad += 1
        self.next = seq + 1


def _stamp(block, i):
    block[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)


def _finish(chk, n, got, t0, t1, name):
    if got != n or chk.bad or chk.next != n:
        raise RuntimeError(f"{name}: {got} of {n} messages, {chk.bad} out of order or damaged")
    return (n - 1) / (t1 - t0)


# -- shmring bridge ---------------------------------------------------------------------------------
def _bridge_producer(ns, name, size, n):
    _enter(ns)
    ring = shmring.Ring.attach(name)
    block = _block(size)
    with ring.producer() as p:
        for i in range(n):
            _stamp(block, i)
            p.send(block if size > 64 else block.tobytes(), timeout=WAIT)
    ring.close()


def _forward(ns, name, ep, secret, kw):
    _enter(ns)
    from shmring.bridge import forward
    forward(name, ep, secret=secret, insecure=secret is None, timeout=WAIT, **kw)


def _receive(ns, name, ep, secret, kw):
    _enter(ns)
    from shmring.bridge import receive
    receive(ep, name, secret=secret, insecure=secret is None, state_path=None, timeout=WAIT, **kw)


def _bridge_consumer(ns, name, size, n, q):
    _enter(ns)
    ring = shmring.Ring.attach(name)
    chk, got, t0 = Checker(size), 0, None
    with ring.consumer() as cons:
        for m in cons:
            with m:
                if t0 is None:
                    t0 = time.perf_counter()
                chk(m.value if size > 64 else m)
                got += 1
    q.put((chk.next, chk.bad, got, t0, time.perf_counter()))
    ring.close()


def bridge(net, size, n, port, secret=None, fkw=None, rkw=None):
    ns_a, ns_b, addr = net
    tag = f"{os.getpid()}-{port}"
    a = shmring.Ring.create(f"bba-{tag}", 1 << 24)
    b = shmring.Ring.create(f"bbb-{tag}", 1 << 24)
    ctx = multiprocess.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_receive, args=(ns_b, b.name, f"tcp://{addr}:{port}", secret, rkw or {})),
          ctx.Process(target=_forward, args=(ns_a, a.name, f"tcp://{addr}:{port}", secret, fkw or {})),
          ctx.Process(target=_bridge_consumer, args=(ns_b, b.name, size, n, q)),
          ctx.Process(target=_bridge_producer, args=(ns_a, a.name, size, n))]
    try:
        for p in ps:
            p.start()
        nxt, bad, got, t0, t1 = q.get(timeout=WAIT * 2)
        for p in ps:
            p.join(WAIT)
    finally:
        for p in ps:
            if p.is_alive():
                p.kill()
        a.close(), b.close(), a.unlink(), b.unlink()
    chk = Checker.__new__(Checker)
    chk.next, chk.bad = nxt, bad
    return _finish(chk, n, got, t0, t1, "bridge")


# -- pyzmq PUSH/PULL ----------------------------------------------------------------------------------
def _pusher(ns, ep, size, n):
    _enter(ns)
    import zmq
    s = zmq.Context().socket(zmq.PUSH)
    s.sndhwm = 256
    s.connect(ep)
    block = _block(size)
    for i in range(n):
        if size > 64:
            b = block.copy()            # a fresh buffer per zero-copy frame (libzmq may still read the last)
            _stamp(b, i)
            s.send(b, copy=False)
        else:
            _stamp(block, i)
            s.send(block.tobytes())
    s.send(b"")
    s.close(linger=-1)


def _puller(ns, ep, size, q):
    _enter(ns)
    import zmq
    s = zmq.Context().socket(zmq.PULL)
    s.rcvhwm = 256
    s.bind(ep)
    q.put("ready")
    chk, got, t0 = Checker(size), 0, None
    while True:
        f = s.recv(copy=size <= 64)
        if t0 is None:
            t0 = time.perf_counter()
        if len(f) == 0:
            break
        chk(f if size <= 64 else f.buffer)
        got += 1
    t1 = time.perf_counter()
    s.close(0)
    q.put((chk.next, chk.bad, got, t0, t1))


def _pair(rx_target, rx_args, tx_target, tx_args, n, label):
    """The receiver (it puts "ready", then its counts on the queue it is
    given last), then the sender, in forked processes; the checked row."""
    ctx = multiprocess.get_context("fork")
    q = ctx.Queue()
    rx = ctx.Process(target=rx_target, args=(*rx_args, q))
    rx.start()
    assert q.get(timeout=WAIT) == "ready"
    tx = ctx.Process(target=tx_target, args=tx_args)
    tx.start()
    try:
        nxt, bad, got, t0, t1 = q.get(timeout=WAIT * 2)
    finally:
        for p in (tx, rx):
            p.join(WAIT)
            if p.is_alive():
                p.kill()
    chk = Checker.__new__(Checker)
    chk.next, chk.bad = nxt, bad
    return _finish(chk, n, got, t0, t1, label)


def pushpull(net, size, n, port):
    ns_a, ns_b, addr = net
    ep = f"tcp://{addr}:{port}"
    return _pair(_puller, (ns_b, ep, size), _pusher, (ns_a, ep, size, n), n, "PUSH/PULL")


# -- zenoh pub/sub --------------------------------------------------------------------------------------
def _zconf(listen=None, connect=None):
    import zenoh
    c = zenoh.Config()
    c.insert_json5("mode", '"peer"')
    c.insert_json5("scouting/multicast/enabled", "false")
    c.insert_json5("scouting/gossip/enabled", "false")
    c.insert_json5("listen/endpoints", f'["{listen}"]' if listen else "[]")
    c.insert_json5("connect/endpoints", f'["{connect}"]' if connect else "[]")
    return c


def _zpub(ns, ep, size, n, key):
    _enter(ns)
    import zenoh
    with zenoh.open(_zconf(connect=ep)) as s:
        pub = s.declare_publisher(key, congestion_control=zenoh.CongestionControl.BLOCK,
                                  reliability=zenoh.Reliability.RELIABLE)
        deadline = time.monotonic() + WAIT
        while not pub.matching_status.matching:          # a put before the match would go nowhere
            if time.monotonic() > deadline:
                raise RuntimeError("zenoh: no matching subscriber")
            time.sleep(0.01)
        block = _block(size)
        for i in range(n):
            _stamp(block, i)
            pub.put(block.tobytes())
        pub.put(b"")
        time.sleep(0.5)                                   # let the session flush before closing


def _zsub(ns, ep, size, key, q):
    _enter(ns)
    import zenoh
    with zenoh.open(_zconf(listen=ep)) as s:
        sub = s.declare_subscriber(key, zenoh.handlers.FifoChannel(1024))
        q.put("ready")
        chk, got, t0 = Checker(size), 0, None
        while True:
            smp = sub.recv()
            if t0 is None:
                t0 = time.perf_counter()
            data = smp.payload.to_bytes()
            if not data:
                break
            chk(data)
            got += 1
        t1 = time.perf_counter()
        q.put((chk.next, chk.bad, got, t0, t1))


def zenoh_pubsub(net, size, n, port):
    ns_a, ns_b, addr = net
    ep = f"tcp/{addr}:{port}"
    key = f"shmring/bench/{os.getpid()}/{port}"
    return _pair(_zsub, (ns_b, ep, size, key), _zpub, (ns_a, ep, size, n, key), n, "zenoh")


def cases(args):
    c = {"shmring bridge": lambda net, size, n, port: bridge(net, size, n, port)}
    if args.compare_unbatched:
        c["shmring bridge, unbatched"] = lambda net, size, n, port: bridge(net, size, n, port,
                                                                          fkw={"batch_bytes": 0})
    if args.curve:
        c["shmring bridge + CURVE"] = lambda net, size, n, port: bridge(net, size, n, port, secret=b"bench-secret")
    c["pyzmq PUSH/PULL"] = pushpull
    try:
        import zenoh  # noqa: F401
        c["zenoh pub/sub"] = zenoh_pubsub
    except ImportError:
        print("NOTE: eclipse-zenoh not installed: no zenoh rows", flush=True)
    return c


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loopback", action="store_true", help="loopback TCP instead of a veth pair")
    ap.add_argument("--curve", action="store_true", help="also the bridge with CURVE (a shared secret)")
    ap.add_argument("--compare-unbatched", action="store_true",
                    help="also the bridge with batching off (batch_bytes=0), same run")
    ap.add_argument("--only", choices=("1m", "64"), help="one payload size only")
    a = ap.parse_args(argv)
    with network(a.loopback) as (ns_a, ns_b, addr, desc):
        net = (ns_a, ns_b, addr)
        print(f"{desc}; {os.uname().release}, {os.cpu_count()} CPUs, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; median of {a.repeats}, interleaved; "
              f"every message checked (sequence number + byte compare)\n", flush=True)
        print("| payload | transport | msg/s | MB/s | vs PUSH/PULL |\n|---|---|---:|---:|---:|", flush=True)
        port = 40000 + os.getpid() % 10000
        sizes = [s for s in ((1 << 20), 64) if a.only is None or (a.only == "1m") == (s > 64)]
        for size in sizes:
            n = N[size]
            cs = cases(a)
            res = {k: [] for k in cs}
            for _ in range(a.repeats):                    # interleaved
                for k, f in cs.items():
                    port += 1
                    res[k].append(f(net, size, n, port))
            ref = statistics.median(res["pyzmq PUSH/PULL"])
            for k, v in res.items():
                m = statistics.median(v)
                print(f"| {'1 MiB array' if size > 64 else '64 B bytes'} | {k} | {m:,.0f} | {m * size / 1e6:,.1f} "
                      f"| {m / ref:.2f} |", flush=True)
        print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
