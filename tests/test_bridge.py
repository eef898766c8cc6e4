"""The ZeroMQ bridge (shmring.bridge): what crosses, what propagates, and no
loss or duplication across link drops and kill -9 of either end, between two
network namespaces joined by a veth pair."""
import os
import random
import signal
import struct
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


# -- batches of small messages (protocol version 2) --------------------------------------------------
def _small(i):
    return bytes([i % 251]) * (i % 500) + i.to_bytes(4, "little")


def _item(i):
    """Message i of a stream mixing small bytes (batched) with 100 kB arrays (sent zero-copy, alone)."""
    return np.full(100_000, i % 256, np.uint8) if i % 7 == 3 else _small(i)


def _item_ok(i, m):
    if i % 7 == 3:
        return m.kind == "array" and m.value.size == 100_000 and bool((m.value == i % 256).all())
    return m.kind == "bytes" and bytes(memoryview(m)) == _small(i)


def _fill(ring, n):
    with ring.producer() as p:
        for i in range(n):
            p.send(_item(i), timeout=30)


def _fill_named(name, n):
    ring = shmring.Ring.attach(name)
    _fill(ring, n)
    ring.close()


def test_small_messages_travel_in_batches_mixed_with_large_ones_exactly_once_in_order(ring_name, mp, procs):
    n = 2000
    a = shmring.Ring.create(ring_name, 1 << 20)
    b = shmring.Ring.create(ring_name + "-b", 1 << 20)
    ep = f"tcp://127.0.0.1:{_port()}"
    rt, rx = _run(B.receive, ep, b, state_path=None, timeout=30)
    ft, fx = _run(B.forward, a, ep, timeout=30)
    p = start(procs, mp, _fill_named, ring_name, n)      # another process: the forward thread's ring peer
    got = 0
    with b.consumer() as c:
        for i, m in enumerate(c):
            with m:
                assert _item_ok(i, m), f"message {i} damaged or out of order"
            got += 1
    assert finish(p) == 0
    ft.join(30), rt.join(30)
    assert got == n
    assert fx["result"]["end"] == "end of stream" and rx["result"]["end"] == "end of stream"
    assert fx["result"]["batches"] > 0 and rx["result"]["batches"] == fx["result"]["batches"]
    assert rx["result"]["committed"] == n and rx["result"]["duplicates"] == 0
    a.close(), b.close(), b.unlink()


def _receive_dying_at(ep, name, state_path, kill_after):
    """receive(), SIGKILLed right after its ``kill_after``-th commit (in the middle of a batch)."""
    seen = [0]

    def hook(event, value):
        if event == "committed":
            seen[0] += 1
            if seen[0] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    B._test_hook = hook
    B.receive(ep, name, state_path=state_path, timeout=60)


def test_a_batch_torn_by_a_kill_9_of_the_receiving_end_is_completed_exactly_once_after_its_restart(
        ring_name, mp, procs, tmp_path):
    n = 600
    a = shmring.Ring.create(ring_name, 1 << 24)         # room for the whole stream, queued before the bridge starts
    name_b = ring_name + "-b"
    b = shmring.Ring.create(name_b, 1 << 24)
    state = str(tmp_path / "state")
    _fill(a, n)                                     # all queued: the first batches are full ones
    ep = f"tcp://127.0.0.1:{_port()}"
    child = start(procs, mp, _receive_dying_at, ep, name_b, state, 37)
    ft, fx = _run(B.forward, a, ep, timeout=60)
    got, gone = [], 0
    restarted = None
    with b.consumer() as c:
        while True:
            try:
                with c.recv(timeout=30) as m:
                    assert _item_ok(len(got), m), f"message {len(got)} damaged, duplicated or out of order"
                    got.append(len(got))
            except shmring.PeerGone:
                gone += 1
                assert restarted is None, "the restarted receiving end died too"
                assert finish(child) == -signal.SIGKILL
                restarted = _run(B.receive, ep, b, state_path=state, timeout=60)
            except shmring.EndOfStream:
                break
    ft.join(30), restarted[0].join(30)
    assert len(got) == n and gone == 1
    assert got[36] == 36                           # the kill came after the 37th commit, inside a batch
    assert fx["result"]["batches"] > 0 and fx["result"]["end"] == "end of stream"
    rstats = restarted[1]["result"]
    assert rstats["committed"] == n - 37 and rstats["end"] == "end of stream"
    a.close(), b.close(), b.unlink()


class _RawForward:
    """A hand-driven DEALER speaking the bridge protocol (to send what a real forward never would)."""

    def __init__(self, ep):
        self.s = zmq.Context.instance().socket(zmq.DEALER)
        self.s.linger = 0
        self.s.connect(ep)

    def send(self, *frames):
        self.s.send_multipart(list(frames))

    def expect(self, kind, timeout=10.0, last=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.s.poll(100):
                continue
            fr = self.s.recv_multipart()
            if fr[0][:1] != kind:
                continue                          # keepalive acks
            if last is not None and struct.unpack_from("<Q", fr[0], 1)[0] != last:
                continue
            return fr
        raise AssertionError(f"no {kind!r} (last={last}) from the receiving end within {timeout} s")

    def close(self):
        self.s.close(0)


def _batch(prev, entries):
    body = b"".join(B.ENTRY.pack(seq, 1, 0, len(p)) + p for seq, p in entries)
    return B.BATCH.pack(b"B", prev, len(entries)), body


def test_hostile_frames_get_a_clear_refusal_and_commit_nothing_and_duplicates_in_a_batch_are_dropped(ring_name):
    from shmring import layout as L
    assert L.T_BYTES == 1
    b = shmring.Ring.create(ring_name, 1 << 16)
    ep = f"tcp://127.0.0.1:{_port()}"
    rt, rx = _run(B.receive, ep, b, state_path=None, timeout=30)
    f = _RawForward(ep)
    try:
        f.send(B.HELLO.pack(b"H", 77, 9))
        assert b"bridge protocol 9" in f.expect(b"X")[1]
        f.send(B.HELLO.pack(b"H", 77, 1))                 # a version-1 forward is served
        f.expect(b"W")
        f.send(B.HELLO.pack(b"H", 77, B.VERSION))
        f.expect(b"W")
        f.send(*_batch(B.NONE, [(8, b"a"), (16, b"bb"), (24, b"ccc")]))
        f.expect(b"A", last=24)
        f.send(*_batch(B.NONE, [(8, b"a"), (16, b"bb"), (24, b"ccc"), (32, b"dddd"), (40, b"")]))  # a resend
        f.expect(b"A", last=40)
        hostile = [
            ([b"Z" + bytes(8)], b"unknown kind"),
            ([b"B" + bytes(4), b"x"], b"header of 5 bytes"),
            ([B.BATCH.pack(b"B", 40, 3)], b"of 1 parts"),
            (list(_batch(40, [(48, b"x")]))[:1] + [_batch(40, [(48, b"x")])[1] + b"tail"], b"after the last"),
            ([B.BATCH.pack(b"B", 40, 2), _batch(40, [(48, b"x")])[1]], b"2 entries in 16 bytes"),
            ([B.BATCH.pack(b"B", 40, 2), _batch(40, [(48, b"x" * 15)])[1]], b"past the end"),
            ([B.BATCH.pack(b"B", 40, 1), B.ENTRY.pack(48, 1, 0, 1 << 30) + b"x"], b"overruns"),
            ([B.BATCH.pack(b"B", 40, 2), _batch(40, [(48, b"x"), (48, b"y")])[1]], b"sequence number 48 after 48"),
            ([B.BATCH.pack(b"B", 40, 10 ** 9), b"x" * 30], b"entries in 30 bytes"),
            ([B.DATA.pack(b"D", 48, 40, 99, 0), b"x" * 16], b"not a shmring message"),
            ([B.DATA.pack(b"D", 48, 40, 2, 0), b"\xff" * 16], b"overrun"),
            ([B.DATA.pack(b"D", B.NONE, 40, 1, 0), b"x"], b"reserved sequence number"),
            ([B.END.pack(b"E", 48, 40, 1)], b"END with another sequence number"),
            ([B.END.pack(b"E", B.END_SEQ, 40, 9)], b"unknown status"),
        ]
        for frames, why in hostile:
            f.send(*frames)
            reply = f.expect(b"X")
            assert why in reply[1], (frames, reply)
        f.send(B.END.pack(b"E", B.END_SEQ, 40, B.END_EOS))
        f.expect(b"A", last=B.END_SEQ)
    finally:
        f.close()
    rt.join(30)
    st = rx["result"]
    assert st["end"] == "end of stream" and st["committed"] == 5 and st["duplicates"] == 3
    assert st["malformed"] == len(hostile)
    with b.consumer() as c:
        assert [bytes(memoryview(m)) for m in c] == [b"a", b"bb", b"ccc", b"dddd", b""]
    b.close()


# -- a forwarding end killed at the end of the stream ----------------------------------------------------
def _forward_dying_at(name, ep, when):
    """forward(), SIGKILLed right after sending the END ("end") or the last message, the END not yet sent
    ("last": one DATA per message, killed at the 40th)."""
    seen = [0]

    def hook(event, value):
        if event != "sent":
            return
        seen[0] += value != B.END_SEQ
        if (when == "end" and value == B.END_SEQ) or (when == "last" and seen[0] == 40):
            os.kill(os.getpid(), signal.SIGKILL)
    B._test_hook = hook
    B.forward(name, ep, timeout=60, batch_bytes=0 if when == "last" else B.BATCH_BYTES)


@pytest.mark.parametrize("when", ["end", "last"])
def test_a_forward_killed_at_the_end_of_the_stream_still_ends_the_far_stream(ring_name, procs, when, caplog):
    import multiprocess
    n = 40
    a = shmring.Ring.create(ring_name, 1 << 20)
    b = shmring.Ring.create(ring_name + "-b", 1 << 20)
    with a.producer() as p:                          # the whole stream, ended, before the bridge starts
        for i in range(n):
            p.send(_small(i))
    ep = f"tcp://127.0.0.1:{_port()}"
    caplog.set_level("WARNING", logger="shmring.bridge")
    rt, rx = _run(B.receive, ep, b, state_path=None, timeout=60)
    child = start(procs, multiprocess.get_context("fork"), _forward_dying_at, ring_name, ep, when)
    assert finish(child) == -signal.SIGKILL
    got, restarted = [], None
    with b.consumer() as c:
        while True:
            try:
                with c.recv(timeout=3.0) as m:
                    got.append(bytes(memoryview(m)))
            except shmring.EndOfStream:
                break
            except shmring.Timeout:                  # what the dead forward had sent did not all arrive:
                assert restarted is None, "the far stream did not end after the forward was restarted"
                deadline = time.monotonic() + 10          # the receiving end says why the stream waits
                while not any("no forward heard" in r.getMessage() for r in caplog.records):
                    assert time.monotonic() < deadline, "the receiving end waits silently for its dead forward"
                    time.sleep(0.1)
                restarted = _run(B.forward, a, ep, timeout=30)      # a restarted forward sends the rest
    if restarted is not None:
        restarted[0].join(30)
        assert restarted[1]["result"]["end"] in ("end of stream", "acknowledged"), restarted[1]
    assert got == [_small(i) for i in range(n)]
    rt.join(60)
    assert rx["result"]["end"] == "end of stream" and rx["result"]["committed"] == n
    a.close(), b.close(), b.unlink()


def test_a_client_that_knows_the_server_key_but_not_the_secret_is_refused(ring_name):
    """CURVE alone admits any client holding the server's public key; the
    receiving end's ZAP handler admits only the client key derived from the secret."""
    b = shmring.Ring.create(ring_name, 1 << 16)
    ep = f"tcp://127.0.0.1:{_port()}"
    rt, rx = _run(B.receive, ep, b, state_path=None, secret=b"right", timeout=15)
    spub, _ = B._keys(b"right", "server")
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.curve_serverkey = spub
    s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
    s.connect(ep)
    s.send(B.HELLO.pack(b"H", 5, B.VERSION))
    assert not s.poll(2500), "a client without the secret got an answer"
    s.close(0)
    a = shmring.Ring.anonymous(1 << 16)                 # the right secret is admitted by the same receiver
    with a.producer() as p:
        p.send(b"ok")
    fx = B.forward(a, ep, secret=b"right", timeout=10)
    rt.join(10)
    assert fx["end"] == "end of stream"
    assert rx["result"]["refused_keys"] >= 1 and rx["result"]["committed"] == 1
    a.close(), b.close()


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:notaport", "tcp://", "bogus://x"])
def test_a_bad_endpoint_is_one_clear_line_from_the_command(ring_name, side, endpoint):
    ring = shmring.Ring.create(ring_name, 1 << 16)
    try:
        args = ["in", endpoint, ring_name] if side == "in" else ["out", ring_name, endpoint]
        r = subprocess.run([sys.executable, "-m", "shmring", "bridge", *args, "--insecure"],
                           capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert lines[0].startswith("shmring bridge: cannot ") and endpoint in lines[0], r.stderr
    finally:
        ring.close()
        ring.unlink()
