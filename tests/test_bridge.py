"""The ZeroMQ bridge (shmring.bridge): what crosses, what propagates, and no
loss or duplication across link drops and kill -9 of either end, between two
network namespaces joined by a veth pair."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

import shmring
from shmring import bridge as B

from _procs import finish, start
from _record_workers import array_ok, digest, mixed, produce_arrays, produce_mixed

PY = sys.executable


def _port():
    return random.randint(20000, 60000)


def _run(target, *args, **kw):
    out = {}

    def go():
        try:
            out["result"] = target(*args, **kw)
        except BaseException as e:
            out["error"] = e
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def test_bytes_arrays_and_msgpack_cross_with_their_kinds_and_the_end_of_stream(ring_name, mp, procs):
    a = shmring.Ring.create(ring_name, 1 << 18)
    b = shmring.Ring.create(ring_name + "-b", 1 << 18)
    ep = f"tcp://127.0.0.1:{_port()}"
    rt, rx = _run(B.receive, ep, b, state_path=None, timeout=30)
    ft, fx = _run(B.forward, a, ep, timeout=30)
    p = start(procs, mp, produce_mixed, ring_name, 300)
    got, kinds = [], []
    with b.consumer() as c:
        for m in c:
            with m:
                got.append(digest(m.value))
                kinds.append(m.kind)
    assert finish(p) == 0
    ft.join(30), rt.join(30)
    assert got == [digest(mixed(i)) for i in range(300)]
    assert kinds[:3] == ["bytes", "array", "object"]
    assert fx["result"]["end"] == "end of stream" and rx["result"]["end"] == "end of stream"
    a.close(), b.close(), b.unlink()


def test_a_dead_source_producer_arrives_as_peer_gone(ring_name, mp, procs):
    a = shmring.Ring.create(ring_name, 1 << 18)
    b = shmring.Ring.create(ring_name + "-b", 1 << 18)
    ep = f"tcp://127.0.0.1:{_port()}"
    rt, rx = _run(B.receive, ep, b, state_path=None, timeout=30)
    ft, fx = _run(B.forward, a, ep, timeout=30)
    p = start(procs, mp, produce_mixed, ring_name, 25, 0.0, True)      # dies without closing
    n = 0
    with b.consumer() as c:
        with pytest.raises(shmring.PeerGone):
            while True:
                c.recv(timeout=30).release()
                n += 1
    finish(p), ft.join(30), rt.join(30)
    assert n == 25 and rx["result"]["end"] == "peer gone"
    a.close(), b.close(), b.unlink()


def test_a_full_far_ring_holds_the_source_producer_back_with_bounded_memory(ring_name):
    a = shmring.Ring.create(ring_name, 1 << 16)
    b = shmring.Ring.create(ring_name + "-b", 1 << 16)
    ep = f"tcp://127.0.0.1:{_port()}"
    stop = threading.Event()
    rt, rx = _run(B.receive, ep, b, state_path=None, stop=stop, window=16)
    fw = subprocess.Popen([PY, "-m", "shmring", "bridge", "out", ring_name, ep], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)      # another process: the source's consumer
    sent = 0
    with a.producer() as prod:
        while True:
            item = np.full(1000, sent, np.int32)
            if not prod.try_send(item):
                try:                                   # full: the bridge may still take some
                    prod.send(item, timeout=1.0)
                except shmring.Timeout:
                    break                              # held back: nobody reads on the far side
            sent += 1
            assert sent < 10_000, "the producer was never held back"
        # both rings full, plus at most the window in flight
        assert sent * 4000 < 2 * (1 << 16) + 16 * 4100
        with b.consumer() as c:                                        # reading the far ring lets it go on
            for i in range(sent):
                with c.recv(timeout=30) as m:
                    assert m.value[0] == i
        stop.set()
    fw.send_signal(signal.SIGTERM)
    fw.communicate(timeout=30)
    rt.join(10)
    a.close(), b.close(), b.unlink()


def test_no_secret_on_a_non_loopback_endpoint_is_refused_and_a_wrong_secret_never_connects(ring_name):
    b = shmring.Ring.create(ring_name, 1 << 16)
    with pytest.raises(B.BridgeError, match="unauthenticated"):
        B.receive("tcp://10.231.255.1:5555", b, state_path=None)
    ep = f"tcp://127.0.0.1:{_port()}"
    a = shmring.Ring.anonymous(1 << 16)
    rt, rx = _run(B.receive, ep, b, state_path=None, secret=b"right", timeout=3)
    with pytest.raises(B.BridgeError, match="no receiver heard"):
        B.forward(a, ep, secret=b"wrong", timeout=1.5)
    rt.join(10)
    assert isinstance(rx.get("error"), B.BridgeError)
    a.close(), b.close()


# -- two network namespaces joined by a veth pair ------------------------------------------------
@pytest.fixture
def veth():
    tag = f"{os.getpid() % 100000}"
    x = os.getpid() % 250
    na, nb, va, vb = f"shmrA{tag}", f"shmrB{tag}", f"shva{tag}", f"shvb{tag}"
    made = []

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)
    try:
        for n in (na, nb):
            ip("netns", "add", n)
            made.append(n)
        ip("link", "add", va, "type", "veth", "peer", "name", vb)
        ip("link", "set", va, "netns", na)
        ip("link", "set", vb, "netns", nb)
        ip("-n", na, "addr", "add", f"10.231.{x}.1/30", "dev", va)
        ip("-n", nb, "addr", "add", f"10.231.{x}.2/30", "dev", vb)
        for n, v in ((na, va), (nb, vb)):
            ip("-n", n, "link", "set", v, "up")
            ip("-n", n, "link", "set", "lo", "up")
    except (OSError, subprocess.SubprocessError) as e:
        for n in made:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        pytest.skip(f"cannot make network namespaces here (ip netns / veth need root and iproute2): {e}")
    yield {"a": na, "b": nb, "link_a": va, "addr_b": f"10.231.{x}.2", "ip": ip}
    for n in made:
        subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=10)


def _in_ns(ns, *args, **kw):
    return subprocess.Popen(["ip", "netns", "exec", ns, PY, "-m", "shmring", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_across_a_veth_link_drop_and_kill_9_of_each_end_nothing_is_lost_or_duplicated(veth, ring_name, mp,
                                                                                    procs, tmp_path):
    n, size = 1500, 20_000
    a = shmring.Ring.create(ring_name, 1 << 20)
    name_b = ring_name + "-b"
    b = shmring.Ring.create(name_b, 1 << 18)
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    ep_in, ep_out = "tcp://0.0.0.0:5555", f"tcp://{veth['addr_b']}:5555"
    rx_args = ("bridge", "in", ep_in, name_b, "--secret-file", str(secret))
    fw_args = ("bridge", "out", ring_name, ep_out, "--secret-file", str(secret))
    ends = {"in": _in_ns(veth["b"], *rx_args), "out": _in_ns(veth["a"], *fw_args)}
    outputs = []
    p = start(procs, mp, produce_arrays, ring_name, n, size)
    got, gone = [], 0
    plan = {150: "link", 500: "out", 850: "in", 1200: "both"}
    chaos = []

    def disrupt(what):
        if what == "link":
            veth["ip"]("-n", veth["a"], "link", "set", veth["link_a"], "down")
            time.sleep(1.0)
            veth["ip"]("-n", veth["a"], "link", "set", veth["link_a"], "up")
        for end in (("out", "in") if what == "both" else (what,) if what in ("out", "in") else ()):
            ends[end].send_signal(signal.SIGKILL)
            outputs.append(ends[end].communicate(timeout=30)[0])
            ends[end] = _in_ns(veth["a"], *fw_args) if end == "out" else _in_ns(veth["b"], *rx_args)
    try:
        deadline = time.monotonic() + 60
        with b.consumer() as c:
            while time.monotonic() < deadline:
                if len(got) in plan and not (chaos and chaos[-1][0] == len(got)):
                    t = threading.Thread(target=disrupt, args=(plan[len(got)],))
                    t.start()
                    chaos.append((len(got), t))
                try:
                    with c.recv(timeout=5) as m:
                        got.append(int.from_bytes(bytes(m.value[:8]), "little"))
                        assert array_ok(got[-1], m.value), f"array {got[-1]} damaged"
                    time.sleep(0.001)                     # a paced consumer: the stream outlives the chaos
                except shmring.PeerGone:
                    gone += 1                             # the receiving end (its producer) was killed
                    time.sleep(0.05)
                except shmring.Timeout:
                    pass
                except shmring.EndOfStream:
                    break
        for _, t in chaos:
            t.join(30)
        for end in ends.values():
            outputs.append(end.communicate(timeout=30)[0])
    finally:
        for end in ends.values():
            if end.poll() is None:
                end.kill()
    assert finish(p) == 0
    dups = len(got) - len(set(got))
    lost = sorted(set(range(n)) - set(got))
    assert (len(lost), dups) == (0, 0), (lost[:10], dups, outputs)
    assert got == list(range(n))
    assert gone >= 1 and [c for c, _ in chaos] == sorted(plan)
    assert "end: end of stream" in outputs[-1] + outputs[-2], outputs
    a.close(), b.close(), b.unlink()
    for f in (f"/dev/shm/shmring-bridge.{name_b}",):
        if os.path.exists(f):
            os.unlink(f)
