"""A ring on one host streamed into a ring on another, over ZeroMQ (pyzmq).

``forward(ring, endpoint)`` (``shmring bridge out NAME ENDPOINT``) takes the
source ring's consumer role and sends every message, its ring-framed payload
as is (so bytes, arrays and msgpack objects arrive as the same kind), to
``receive(endpoint, ring)`` (``shmring bridge in ENDPOINT NAME``), which
commits them into the far ring, where consumers use the ordinary API.

The protocol (docs/design.md R75-R79), on a DEALER (forward, connects) and a
ROUTER (receive, binds) socket::

    forward -> receive   HELLO  [b"H", stream id u64, version u16]
                         DATA   [b"D" seq u64 prev u64 type u16 phase u8, payload]
                         BATCH  [b"B" prev u64 count u32, entries]   (version 2)
                                entries: count x (seq u64 type u16 phase u8 len u32, payload)
                         END    [b"E" seq=2**64-1 prev u64 status u16]
    receive -> forward   WELCOME [b"W" last u64 window u32 window_bytes u64]
                         ACK     [b"A" last u64 busy u8]   (also every 0.2 s as a keepalive)
                         NACK    [b"N" last u64]           (a gap: resend after last)
                         REFUSE  [b"X", reason]

A BATCH carries several small messages (each under ``ZERO_COPY_FROM``) in
one ZeroMQ message: the forward copies them once into it (the one user-space
copy of its side), and each entry is then taken exactly as a DATA would be,
its ``prev`` being the batch's ``prev`` for the first entry and the previous
entry's ``seq`` after that.  A malformed frame of any kind is answered with a
REFUSE naming what is wrong (the forward raises BridgeError) and commits
nothing.

``seq`` is the message's position in the source ring (stable when a message
is delivered again to a restarted forward), ``prev`` the seq of the message
sent before it in the stream (the receiver's ``last`` for the first one).
The receiver commits a message only if ``prev == last`` (then ``last =
seq``); ``seq <= last`` is a duplicate (dropped, acknowledged); anything else
is a gap (dropped, NACK).  It acknowledges ``last`` (cumulative) after the
commit.  The forward releases a source message only once it is acknowledged,
holds at most ``window`` messages / ``window_bytes`` unacknowledged (the
credit: a full far ring stops the acks, the window fills, the source ring
fills, its producer blocks), resends what is unacknowledged on a NACK or when
acks stop progressing while the receiver is not busy, and starts a new
connection (and a new HELLO) when it heard nothing for ``dead_after`` s.

What holds (tests/test_bridge.py attacks it): with an spsc (or mpsc) source
ring and an spsc far ring, every message committed into the source ring is
committed exactly once into the far ring, in order, across link drops, and
across a kill -9 and restart of either end, because (a) a message leaves the
source ring only after the far ring holds it (unreleased messages of a dead
consumer go to the next one), and (b) the receiver's ``last`` survives it in a
side file (see :class:`_SeqState`) that says, together with the far ring's
own write position, whether the message being committed at the crash made it.
Not covered: a broadcast source whose subscriber was dropped (messages it did
not acknowledge may be overwritten before a restart), a machine crash (the
rings are in memory), and two forwards into one receiver.

Security: CURVE (encryption and authentication) with keys derived from a
shared secret (``secret=`` / ``--secret-file`` / ``SHMRING_BRIDGE_SECRET``):
a peer that does not know the secret cannot complete the handshake (the
receiving end's own ZAP handler admits only the secret-derived client key).  Without a
secret only loopback endpoints are accepted (``insecure=True`` to override).
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import mmap
import os
import struct
import time

from . import layout as L
from .errors import EndOfStream, MessageTooLarge, PeerGone, ShmringError, Timeout, WrongKind

VERSION = 2                   # 2: BATCH frames (a version-1 forward is still served: it sends none)
VERSIONS = (1, 2)
HELLO = struct.Struct("<cQH")
DATA = struct.Struct("<cQQHB")
BATCH = struct.Struct("<cQI")
ENTRY = struct.Struct("<QHBI")
END = struct.Struct("<cQQH")
WELCOME = struct.Struct("<cQIQ")
ACK = struct.Struct("<cQB")
NACK = struct.Struct("<cQ")
END_SEQ = (1 << 64) - 1
NONE = (1 << 64) - 2          # "nothing committed yet" (a seq no message has: positions are 8-aligned)
END_EOS, END_PEER_GONE = 1, 2
ZERO_COPY_FROM = 64 << 10     # payloads from this size go to libzmq without a copy (copy=False, track=True)
BATCH_BYTES = 64 << 10        # smaller payloads are sent together, up to this many bytes per BATCH
KEEPALIVE = 0.2
SILENT_AFTER = 2.0            # a side not heard for this long is reported (a warning on the "shmring.bridge" logger)
log = logging.getLogger("shmring.bridge")
_test_hook = None             # tests: called as _test_hook(event, value) at "sent" (seq) and "committed" (seq)


class BridgeError(ShmringError, ConnectionError):
    """The bridge cannot go on: refused by the other end, misconfigured, or no peer within the timeout."""


def _zmq():
    try:
        import zmq
    except ImportError:
        raise ShmringError("the bridge needs pyzmq: pip install 'shmring[bridge]'") from None
    return zmq


# -- security -----------------------------------------------------------------------------
def _secret(secret) -> bytes | None:
    if secret is None:
        env = os.environ.get("SHMRING_BRIDGE_SECRET")
        return env.encode() if env else None
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def _keys(secret: bytes, role: str):
    """A CURVE key pair derived from the shared secret (z85 public, z85 secret)."""
    zmq = _zmq()
    from zmq.utils import z85
    sk = z85.encode(hashlib.sha256(b"shmring-bridge/" + role.encode() + b"/" + secret).digest())
    return zmq.curve_public(sk), sk


def _loopback(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _attach(how, endpoint: str, what: str) -> None:
    """``sock.bind`` / ``sock.connect``; a bad endpoint (a malformed address,
    an address in use or not on this host) is a BridgeError that says which."""
    import zmq
    try:
        how(endpoint)
    except zmq.ZMQError as e:
        raise BridgeError(f"cannot {what} {endpoint!r}: {e.strerror} (an endpoint is tcp://HOST:PORT, "
                          f"ipc://PATH or inproc://NAME)") from None


def _secure(sock, endpoint, secret, insecure, server: bool) -> None:
    secret = _secret(secret)
    if secret is None:
        if not (insecure or _loopback(endpoint)):
            raise BridgeError(f"refusing an unauthenticated bridge on {endpoint}: give a shared secret (secret=, "
                              "--secret-file, or SHMRING_BRIDGE_SECRET) to use CURVE, or insecure=True / --insecure")
        return
    zmq = _zmq()
    if not zmq.has("curve"):
        raise BridgeError("this libzmq has no CURVE support; a shared secret cannot be used")
    spub, ssec = _keys(secret, "server")
    if server:
        sock.curve_server = True
        sock.curve_secretkey = ssec
        sock.curve_publickey = spub
    else:
        cpub, csec = _keys(secret, "client")
        sock.curve_serverkey = spub
        sock.curve_publickey = cpub
        sock.curve_secretkey = csec


# -- the receiving end's sequence state --------------------------------------------------------
class _SeqState:
    """``last`` and the commit in progress, in a 64-byte file mapped shared
    (stores reach the page cache at once: a kill -9 loses none of them)::

        0 magic u64 | 8 stream id u64 | 16 far ring created ns u64 | 24 last u64
        32 pending seq u64 | 40 far write position before the pending commit u64

    Before committing message ``seq`` the receiver stores ``pending = seq``
    and the far ring's write position ``w``; after it, ``last = seq``.  On a
    restart, a pending seq is taken as committed iff the far ring's write
    position is past ``w`` (only the commit moves it: an spsc producer
    publishes its reservation, padding included, at the commit)."""
    MAGIC = 0x3153_4547_4449_5242       # "BRIDGES1"
    F = struct.Struct("<QQQQQQ")

    def __init__(self, path, ring, stream_id):
        self.path = path
        if path is None:
            self.mm = mmap.mmap(-1, 64)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size < 64:
                    os.ftruncate(fd, 64)
                self.mm = mmap.mmap(fd, 64)
            finally:
                os.close(fd)
        magic, sid, created, last, pend, wpos = self.F.unpack_from(self.mm)
        ring_id = ring._header["created_ns"]
        if magic != self.MAGIC or created != ring_id:
            sid, last, pend, wpos = stream_id, NONE, NONE, 0            # a new far ring: a new delivery
        elif sid != stream_id:
            raise BridgeError(f"{ring._seg.label} already receives stream {sid:#x} (state file {path}); this "
                              f"forward sends stream {stream_id:#x}: use another far ring, or remove the state file")
        if pend != NONE and pend != last and _write_pos(ring) > wpos:
            last = pend                      # the commit in progress at the crash made it
        self.F.pack_into(self.mm, 0, self.MAGIC, sid, ring_id, last, NONE, 0)
        self.last = last

    def pending(self, seq, wpos):
        struct.pack_into("<QQ", self.mm, 32, seq, wpos)

    def committed(self, seq):
        struct.pack_into("<Q", self.mm, 24, seq)
        self.last = seq

    def close(self):
        self.mm.close()


def _write_pos(ring) -> int:
    return ring._live_region().load_u64(L.OFF_WRITE_POS)


def default_state_path(ring) -> str | None:
    return None if ring.name is None else f"/dev/shm/shmring-bridge.{ring.name}"


def put_framed(prod, type_, phase, payload, timeout=None) -> None:
    """Commit a ring-framed payload recorded at ``phase`` (its offset mod 64
    in the source ring) into ``prod``'s ring: one copy, arrays realigned."""
    n = len(payload)
    if type_ == L.T_BYTES:
        t = prod._reserve_blocking(n, type_, timeout)
        try:
            prod._wmv[t.offset:t.offset + n] = payload
        except BaseException:
            t.abort()
            raise
        t.commit(n)
        return
    if type_ not in (L.T_ARRAY, L.T_OBJECT) or n < 8:
        raise BridgeError(f"a message of type {type_} and {n} bytes is not a shmring message")
    meta_len, narrays = struct.unpack_from("<II", payload, 0)
    head = 8 + meta_len
    src_area = (L.align(phase + head, L.ARRAY_ALIGN) - phase) if narrays else n
    if head > n or src_area > n or phase >= L.ARRAY_ALIGN:
        raise BridgeError(f"a {n}-byte message whose meta ({meta_len} bytes) or array area ({src_area}) overruns it")
    t = prod._reserve_blocking(n + (L.ARRAY_ALIGN - 1 if narrays else 0), type_, timeout)
    try:
        off, w = t.offset, prod._wmv
        if not narrays:
            w[off:off + n] = payload
            t.commit(n)
            return
        dst_area = L.align(off + head, L.ARRAY_ALIGN) - off
        w[off:off + head] = payload[:head]
        w[off + head:off + dst_area] = bytes(dst_area - head)
        w[off + dst_area:off + dst_area + n - src_area] = payload[src_area:]
    except BaseException:
        t.abort()
        raise
    t.commit(dst_area + n - src_area)


# -- receive -------------------------------------------------------------------------------------
def receive(endpoint: str, ring, *, secret=None, insecure: bool = False, state_path="default",
            window: int = 256, window_bytes: int | None = None, timeout: float | None = None,
            linger: float = 2.0, stop=None) -> dict:
    """Bind ``endpoint`` and commit what a :func:`forward` sends into ``ring``
    (an spsc Ring or the name of one; this process becomes its producer),
    until the forwarded stream ends (then the far ring's stream ends the same
    way: end of stream, or PeerGone for a dead source producer), ``stop`` is
    set, or no forward was heard for ``timeout`` seconds (BridgeError).

    ``state_path``: the side file of :class:`_SeqState` (default
    ``/dev/shm/shmring-bridge.NAME``; None: in memory only, so a restart of
    this end may duplicate the message in commit when it died)."""
    from .ring import CLOSED_ABORTED, Ring
    zmq = _zmq()
    own = not isinstance(ring, Ring)
    if own:
        ring = Ring.attach(ring)
    # with a secret: a context of our own, whose ZAP handler (below) admits only the client key derived
    # from the secret (without one, libzmq's CURVE server admits any client that knows the server key)
    zap_key = None if _secret(secret) is None else _zap_client_key(_secret(secret))
    ctx = zmq.Context.instance() if zap_key is None else zmq.Context()
    zap = None
    if zap_key is not None:
        zap = ctx.socket(zmq.REP)
        zap.linger = 0
        zap.bind("inproc://zeromq.zap.01")
    sock = ctx.socket(zmq.ROUTER)
    state = None
    try:
        if ring.kind != "spsc" or ring.dtype is not None:
            raise WrongKind(f"the far ring of a bridge is an spsc message ring; {ring._seg.label} is {ring.kind}"
                            + (" of records" if ring.dtype is not None else ""))
        window_bytes = window_bytes or max(ring.max_message, ring.capacity)
        sock.linger = 0
        sock.router_mandatory = False
        _secure(sock, endpoint, secret, insecure, server=True)
        _attach(sock.bind, endpoint, "listen on")
        prod = ring.producer()
        if state_path == "default":
            state_path = default_state_path(ring)
        stats = {"committed": 0, "duplicates": 0, "gaps": 0, "sessions": 0, "batches": 0, "malformed": 0,
                 "end": None}
        stream = None
        last_heard = time.monotonic()
        last_keep = 0.0
        peers: set = set()
        ended_at = None
        silent = False                    # the forward's silence was reported (once per silence)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
            stats["refused_keys"] = 0

        def take(peer, seq, prev, type_, phase, payload, end=False) -> bool:
            """One message (or the end) in the chain: commit it, drop a
            duplicate (True), or NACK a gap (False: the rest of a batch is moot)."""
            nonlocal ended_at
            if seq != END_SEQ and seq <= state.last and state.last != NONE or (
                    seq == END_SEQ and state.last == END_SEQ):
                stats["duplicates"] += 1
                return True
            if prev != state.last:
                stats["gaps"] += 1
                sock.send_multipart([peer, NACK.pack(b"N", state.last)])
                ack_to.discard(peer)
                return False
            if end:
                state.pending(seq, _write_pos(ring))
                prod.close(_status=CLOSED_ABORTED if type_ == END_PEER_GONE else 1)
                state.committed(END_SEQ)
                stats["end"] = "peer gone" if type_ == END_PEER_GONE else "end of stream"
                ended_at = time.monotonic()
                return True
            state.pending(seq, prod.position)
            try:
                _put_waiting(prod, type_, phase, payload, sock, peer, state)
            except (BridgeError, MessageTooLarge) as e:         # hostile or broken: nothing committed
                state.pending(NONE, 0)                         # nor taken as committed by a restart
                stats["malformed"] += 1
                ack_to.discard(peer)
                sock.send_multipart([peer, b"X", f"malformed message {seq}: {e}".encode()])
                return False
            state.committed(seq)
            stats["committed"] += 1
            if _test_hook is not None:
                _test_hook("committed", seq)
            return True

        try:
            while True:
                now = time.monotonic()
                if stop is not None and stop.is_set():
                    break
                if ended_at is not None and now - ended_at > linger:
                    break
                if timeout is not None and now - last_heard > timeout:
                    raise BridgeError(f"no forward heard on {endpoint} for {timeout} s")
                if state is not None and ended_at is None and not silent and now - last_heard > SILENT_AFTER:
                    silent = True
                    log.warning("bridge in %s: no forward heard for %.1f s; the stream into %s stays open (its "
                                "consumers wait) until a forward comes back: restart `shmring bridge out`",
                                endpoint, now - last_heard, ring._seg.label)
                if now - last_keep >= KEEPALIVE and state is not None:
                    for p in peers:
                        sock.send_multipart([p, ACK.pack(b"A", state.last, 0)])
                    last_keep = now
                if zap is None:
                    if not sock.poll(int(KEEPALIVE * 1000)):
                        continue
                else:
                    ready = dict(poller.poll(int(KEEPALIVE * 1000)))
                    if zap in ready:
                        _zap_answer(zap, zap_key, stats)
                    if sock not in ready:
                        continue
                ack_to = set()
                while True:                       # everything already here, then one ack per peer
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    last_heard = time.monotonic()
                    if silent:
                        silent = False
                        log.warning("bridge in %s: a forward is heard again", endpoint)
                    peer = frames[0].bytes
                    if len(frames) < 2:
                        continue                               # an empty message carries nothing to answer
                    head = frames[1].bytes
                    kind = head[:1]
                    bad = _malformed(kind, head, frames)
                    if bad:
                        stats["malformed"] += 1
                        sock.send_multipart([peer, b"X", f"malformed frame: {bad}".encode()])
                        continue
                    if kind == b"H":
                        _, sid, ver = HELLO.unpack(head)
                        if ver not in VERSIONS:
                            sock.send_multipart([peer, b"X", f"bridge protocol {ver}; this end speaks {VERSION}".encode()])
                            continue
                        if state is None:
                            try:
                                state = _SeqState(state_path, ring, sid)
                            except BridgeError as e:
                                sock.send_multipart([peer, b"X", str(e).encode()])
                                raise
                            stream = sid
                            if state.last == END_SEQ:
                                ended_at = time.monotonic()
                        elif sid != stream:
                            sock.send_multipart([peer, b"X", b"this receiver serves another stream"])
                            continue
                        peers = {peer}                        # one forward: the newest session
                        stats["sessions"] += 1
                        sock.send_multipart([peer, WELCOME.pack(b"W", state.last, window, window_bytes)])
                        continue
                    if state is None:
                        continue                               # data before HELLO (a stale pipe): ignored
                    ack_to.add(peer)
                    if kind == b"B":
                        _, prev, count = BATCH.unpack(head)
                        entries = _entries(frames[2].buffer, count, ring.max_message)
                        if isinstance(entries, str):
                            stats["malformed"] += 1
                            ack_to.discard(peer)
                            sock.send_multipart([peer, b"X", f"malformed batch: {entries}".encode()])
                            continue
                        stats["batches"] += 1
                        for seq, type_, phase, payload in entries:
                            if not take(peer, seq, prev, type_, phase, payload):
                                break
                            prev = seq
                        continue
                    if kind == b"D":
                        _, seq, prev, type_, phase = DATA.unpack(head)
                        payload = frames[2].buffer
                        if len(payload) > ring.max_message:
                            stats["malformed"] += 1
                            ack_to.discard(peer)
                            sock.send_multipart([peer, b"X", f"malformed frame: a {len(payload)}-byte message; "
                                                 f"{ring._seg.label} holds at most {ring.max_message}".encode()])
                            continue
                    else:
                        _, seq, prev, type_ = END.unpack(head)
                        payload = None
                    take(peer, seq, prev, type_, phase if kind == b"D" else 0, payload, kind == b"E")
                for p in ack_to:
                    sock.send_multipart([p, ACK.pack(b"A", state.last, 0)])
        finally:
            if stats["end"] is None:
                prod.detach()                # stopped: the stream stays open for the next receive
        return stats
    finally:
        sock.close(0)
        if zap is not None:
            zap.close(0)
            ctx.term()
        if state is not None:
            state.close()
        if own:
            ring.close()


def _zap_client_key(secret: bytes) -> bytes:
    from zmq.utils import z85
    return z85.decode(_keys(secret, "client")[0])


def _zap_answer(zap, client_key: bytes, stats) -> None:
    """Answer the pending ZAP requests (RFC 27): admit a CURVE client only
    if its long-term public key is the one derived from the shared secret."""
    zmq = _zmq()
    while True:
        try:
            req = zap.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        if len(req) < 6:
            continue                                    # not a ZAP request: nothing to answer
        rid, mechanism, creds = req[1], req[5], req[6:]
        ok = mechanism == b"CURVE" and len(creds) == 1 and creds[0] == client_key
        if not ok:
            stats["refused_keys"] += 1
        zap.send_multipart([b"1.0", rid, b"200" if ok else b"400",
                            b"OK" if ok else b"client key not derived from the shared secret", b"", b""])


def _malformed(kind, head, frames) -> str | None:
    """What is wrong with the shape of a frame (None: well formed)."""
    shapes = {b"H": (HELLO, 2), b"D": (DATA, 3), b"B": (BATCH, 3), b"E": (END, 2)}
    if kind not in shapes:
        return f"unknown kind {kind!r}"
    st, nframes = shapes[kind]
    if len(head) != st.size:
        return f"a {kind.decode()} header of {len(head)} bytes, not {st.size}"
    if len(frames) != nframes:
        return f"a {kind.decode()} message of {len(frames) - 1} parts, not {nframes - 1}"
    if kind == b"D" and struct.unpack_from("<Q", head, 1)[0] >= NONE:
        return "a DATA with a reserved sequence number"
    if kind == b"E" and (END.unpack(head)[1] != END_SEQ or END.unpack(head)[3] not in (END_EOS, END_PEER_GONE)):
        return "an END with another sequence number than 2**64-1 or an unknown status"
    return None


def _entries(buf, count, max_message):
    """The (seq, type, phase, payload) entries of a BATCH, or what is wrong with it (a str)."""
    mv = memoryview(buf).cast("B")
    out, pos, n, last = [], 0, len(mv), None
    if count == 0 or count > n // ENTRY.size:
        return f"{count} entries in {n} bytes"
    for i in range(count):
        if pos + ENTRY.size > n:
            return f"entry {i} of {count} starts past the end ({pos} of {n} bytes)"
        seq, type_, phase, ln = ENTRY.unpack_from(mv, pos)
        pos += ENTRY.size
        if ln > n - pos or ln > max_message:
            return f"entry {i} ({ln} bytes) overruns the batch ({n - pos} left) or the far ring ({max_message})"
        if seq >= NONE or (last is not None and seq <= last):
            return f"entry {i}: sequence number {seq} after {last}"
        out.append((seq, type_, phase, mv[pos:pos + ln]))
        pos += ln
        last = seq
    if pos != n:
        return f"{n - pos} bytes after the last of {count} entries"
    return out


def _put_waiting(prod, type_, phase, payload, sock, peer, state) -> None:
    """put_framed, waiting for room in slices; meanwhile tell the forward
    we are busy (so it waits instead of resending)."""
    while True:
        try:
            put_framed(prod, type_, phase, payload, timeout=KEEPALIVE)
            return
        except Timeout:
            sock.send_multipart([peer, ACK.pack(b"A", state.last, 1)])


# -- forward ---------------------------------------------------------------------------------------
class _Out:
    __slots__ = ("seq", "prev", "msg", "tracker", "nbytes")

    def __init__(self, seq, prev, msg, nbytes):
        self.seq, self.prev, self.msg, self.nbytes, self.tracker = seq, prev, msg, nbytes, None


def _stream_id(ring) -> int:
    h = hashlib.sha256(f"{ring.name}/{ring._header['created_ns']}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def forward(ring, endpoint: str, *, secret=None, insecure: bool = False, start: str = "oldest",
            resend_after: float = 1.0, dead_after: float = 2.0, timeout: float | None = None,
            stop=None, batch_bytes: int = BATCH_BYTES) -> dict:
    """Send every message of ``ring`` (a Ring or the name of one; this
    process takes its consumer role, or subscribes to a broadcast ring) to
    the :func:`receive` bound at ``endpoint``, until the stream ended and the
    end was acknowledged.  ``timeout``: give up (BridgeError) when no
    receiver was heard for that long.  ``batch_bytes``: consecutive messages
    under ``ZERO_COPY_FROM`` are sent together in BATCH frames of up to this
    many bytes (0: one DATA per message)."""
    from .ring import Ring
    zmq = _zmq()
    own = not isinstance(ring, Ring)
    if own:
        ring = Ring.attach(ring)
    ctx = zmq.Context.instance()
    sock = None
    stats = {"sent": 0, "resent": 0, "sessions": 0, "batches": 0, "end": None}
    try:
        if ring.dtype is not None:
            raise WrongKind(f"{ring._seg.label} is a record ring; the bridge forwards message rings")
        cons = ring.subscribe(start) if ring.kind == "broadcast" else ring.consumer()
        sid = _stream_id(ring)
        out: collections.deque = collections.deque()   # unacknowledged, in order
        nxt = 0                                        # index in out of the next to send
        inflight_bytes = 0
        end_status = None                              # set once the source ended
        welcomed = False
        last = NONE                                    # the receiver's last (acknowledged)
        chain = NONE                                   # seq of the newest message queued
        window, window_bytes = 1, 1 << 20
        heard = progress = time.monotonic()
        busy = False
        hello_at = 0.0
        first_heard = None
        silent = False

        def connect():
            nonlocal sock, welcomed, nxt, hello_at
            if sock is not None:
                sock.close(0)                         # queued frames dropped: their trackers finish
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.sndhwm = sock.rcvhwm = 0
            _secure(sock, endpoint, secret, insecure, server=False)
            _attach(sock.connect, endpoint, "connect to")
            welcomed, nxt, hello_at = False, 0, 0.0
            stats["sessions"] += 1

        def release_upto(s):
            nonlocal inflight_bytes, nxt
            while out and out[0].seq != END_SEQ and out[0].seq <= s:
                o = out.popleft()
                nxt = max(0, nxt - 1)
                inflight_bytes -= o.nbytes
                _release(o)

        def send_batch(i) -> int:
            """Send out[i:j] (small messages) as one BATCH; returns j - i (0: not batchable)."""
            j, size, parts = i, 0, []
            while j < len(out):
                o = out[j]
                if o.seq == END_SEQ or o.nbytes >= ZERO_COPY_FROM or (j > i and size + ENTRY.size + o.nbytes
                                                                      > batch_bytes):
                    break
                size += ENTRY.size + o.nbytes
                j += 1
            if j - i < 2:
                return 0
            views = []
            for o in itertools.islice(out, i, j):
                parts.append(ENTRY.pack(o.seq, o.msg.type, o.msg._offset % L.ARRAY_ALIGN, o.nbytes))
                views.append(memoryview(o.msg))
                parts.append(views[-1])
            try:
                frame = b"".join(parts)                  # the one copy of this side
            finally:
                for v in views:
                    v.release()
            sock.send(BATCH.pack(b"B", out[i].prev, j - i), zmq.SNDMORE | zmq.NOBLOCK)
            sock.send(frame, zmq.NOBLOCK, copy=False)
            stats["batches"] += 1
            return j - i

        def send(o):
            if o.seq == END_SEQ:
                sock.send(END.pack(b"E", END_SEQ, o.prev, end_status), zmq.NOBLOCK)
                return
            with memoryview(o.msg) as mv:
                sock.send(DATA.pack(b"D", o.seq, o.prev, o.msg.type, o.msg._offset % L.ARRAY_ALIGN),
                          zmq.SNDMORE | zmq.NOBLOCK)
                if o.nbytes >= ZERO_COPY_FROM:
                    if o.tracker is not None and not o.tracker.done:
                        o.tracker.wait(5)
                    o.tracker = sock.send(mv, zmq.NOBLOCK, copy=False, track=True)
                else:
                    sock.send(mv, zmq.NOBLOCK, copy=True)

        connect()
        poller_fd = cons.fileno()
        while True:
            now = time.monotonic()
            if stop is not None and stop.is_set():
                break
            if timeout is not None and now - heard > timeout:
                raise BridgeError(f"no receiver heard at {endpoint} for {timeout} s")
            if not welcomed:
                if now - hello_at > 0.25:
                    sock.send(HELLO.pack(b"H", sid, VERSION), zmq.NOBLOCK)
                    hello_at = now
            # take from the source ring within the credit
            while (end_status is None and welcomed and len(out) < window and inflight_bytes < window_bytes):
                try:
                    m = cons.try_recv()
                except EndOfStream:
                    end_status = END_EOS
                except PeerGone:
                    end_status = END_PEER_GONE
                else:
                    if m is None:
                        break
                    if last != NONE and last != END_SEQ and m.position <= last:
                        m.release()                   # delivered before a restart of this end
                        continue
                    o = _Out(m.position, chain, m, m.nbytes)
                    chain = m.position
                    out.append(o)
                    inflight_bytes += o.nbytes
                if end_status is not None:
                    out.append(_Out(END_SEQ, chain, None, 0))
            if welcomed:
                while nxt < len(out):
                    try:
                        k = send_batch(nxt) if batch_bytes else 0
                        if not k:
                            send(out[nxt])
                    except zmq.Again:
                        break
                    if k:
                        stats["sent"] += k
                        nxt += k
                        if _test_hook is not None:
                            _test_hook("sent", out[nxt - 1].seq)
                        continue
                    stats["sent"] += out[nxt].seq != END_SEQ
                    if _test_hook is not None:
                        _test_hook("sent", out[nxt].seq)
                    nxt += 1
            wait_ring = welcomed and end_status is None and len(out) < window and inflight_bytes < window_bytes
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            if wait_ring:
                poller.register(poller_fd, zmq.POLLIN)
            events = dict(poller.poll(int(KEEPALIVE * 1000) if wait_ring else 100))
            if wait_ring and poller_fd not in events:
                try:                                  # a quiet select: a dead producer signals nothing
                    m = cons.recv(timeout=0)
                except Timeout:
                    pass
                except EndOfStream:
                    end_status = END_EOS
                    out.append(_Out(END_SEQ, chain, None, 0))
                except PeerGone:
                    end_status = END_PEER_GONE
                    out.append(_Out(END_SEQ, chain, None, 0))
                else:
                    if last != NONE and last != END_SEQ and m.position <= last:
                        m.release()
                    else:
                        o = _Out(m.position, chain, m, m.nbytes)
                        chain = m.position
                        out.append(o)
                        inflight_bytes += o.nbytes
            while sock in events or sock.poll(0):
                events.pop(sock, None)
                try:
                    head = sock.recv(zmq.NOBLOCK)
                    more = sock.rcvmore
                    reason = sock.recv(zmq.NOBLOCK) if more else b""
                except zmq.Again:
                    break
                heard = time.monotonic()
                if silent:
                    silent = False
                    log.warning("bridge out %s: the receiver is heard again", endpoint)
                if first_heard is None:
                    first_heard = heard
                k = head[:1]
                if k == b"X":
                    raise BridgeError(f"the receiver at {endpoint} refused: {reason.decode(errors='replace')}")
                if k == b"W" and len(head) == WELCOME.size:
                    _, last, window, window_bytes = WELCOME.unpack(head)
                    welcomed, progress, busy = True, heard, False
                    if last == END_SEQ:
                        stats["end"] = "acknowledged"
                        _drop_all(out)
                        return stats
                    if last != NONE:
                        release_upto(last)
                    nxt = 0
                    if out:
                        out[0].prev = last                 # the chain resumes at the receiver's last
                        stats["resent"] += len(out)
                    else:
                        chain = last
                elif k in (b"A", b"N") and welcomed:
                    s = struct.unpack_from("<Q", head, 1)[0]
                    if k == b"A":
                        busy = bool(head[9]) if len(head) > 9 else False
                    if s == END_SEQ:
                        stats["end"] = {END_EOS: "end of stream", END_PEER_GONE: "peer gone"}[end_status]
                        _drop_all(out)
                        return stats
                    if s != NONE and (last == NONE or s > last):
                        last, progress = s, heard
                        release_upto(s)
                    if k == b"N":
                        nxt = 0                        # resend everything after last
                        stats["resent"] += len(out)
            now = time.monotonic()
            if now - heard > dead_after:
                if not silent:
                    silent = True
                    log.warning("bridge out %s: no receiver heard for %.1f s; reconnecting (%d messages wait "
                                "for an acknowledgement%s)", endpoint, now - heard, len(out),
                                ", the end of stream among them" if end_status is not None else "")
                connect()                              # nothing heard: a new connection, a new HELLO
                heard = now
            elif welcomed and out and nxt > 0 and not busy and now - progress > resend_after:
                nxt = 0                                # acks stopped progressing: resend
                progress = now
                stats["resent"] += len(out)
        return stats
    finally:
        if sock is not None:
            sock.close(0)
        try:
            _drop_all(out)
        except NameError:
            pass
        if own:
            ring.close()


def _release(o) -> None:
    if o.msg is None:
        return
    if o.tracker is not None and not o.tracker.done:
        o.tracker.wait(5)                     # libzmq still reads the ring memory
    o.tracker = None
    deadline = time.monotonic() + 1.0
    while o.msg._exports and time.monotonic() < deadline:
        time.sleep(0.0002)                    # pyzmq's gc thread drops its view of a zero-copy frame
    o.msg.release()
    o.msg = None


def _drop_all(out) -> None:
    while out:
        o = out.popleft()
        if o.msg is not None:
            o.tracker = None
            o.msg = None                       # unreleased: the next consumer gets it again


# -- command line ------------------------------------------------------------------------------------
def add_commands(sub) -> None:
    b = sub.add_parser("bridge", help="stream a ring to another host over ZeroMQ (out) or into a ring (in)",
                       description="shmring bridge out NAME tcp://HOST:PORT sends ring NAME to a "
                                   "'shmring bridge in tcp://*:PORT NAME' on the other host, which commits every "
                                   "message into its spsc ring NAME; acknowledged, resent, deduplicated.")
    bs = b.add_subparsers(dest="direction", required=True)
    o = bs.add_parser("out", help="forward ring NAME to ENDPOINT")
    o.add_argument("name")
    o.add_argument("endpoint")
    i = bs.add_parser("in", help="receive at ENDPOINT into ring NAME")
    i.add_argument("endpoint")
    i.add_argument("name")
    i.add_argument("--create", type=int, metavar="CAPACITY", help="create ring NAME (spsc) if it does not exist")
    i.add_argument("--state", help="the sequence state file (default /dev/shm/shmring-bridge.NAME)")
    for p in (o, i):
        p.add_argument("--secret-file", help="a file holding the shared secret (CURVE); or SHMRING_BRIDGE_SECRET")
        p.add_argument("--insecure", action="store_true", help="allow a non-loopback endpoint without a secret")
        p.add_argument("--timeout", type=float, help="give up when the other end is not heard for this long")
    o.set_defaults(func=_cmd_bridge)
    i.set_defaults(func=_cmd_bridge)


def _cmd_bridge(args) -> int:
    from .errors import SegmentNotFound
    from .record import _stop_on_signals
    from .ring import Ring
    secret = None
    if args.secret_file:
        with open(args.secret_file, "rb") as f:
            secret = f.read().strip()
    stop = _stop_on_signals()
    if args.direction == "out":
        r = forward(args.name, args.endpoint, secret=secret, insecure=args.insecure, timeout=args.timeout, stop=stop)
        print(f"bridge out: {r['sent']} sent ({r['resent']} resent, {r['sessions']} sessions); end: {r['end']}",
              flush=True)
        return 0
    try:
        ring = Ring.attach(args.name)
    except SegmentNotFound:
        if not args.create:
            raise
        ring = Ring.create(args.name, args.create)
        ring._created = False            # the name stays for the consumers
    with ring:
        r = receive(args.endpoint, ring, secret=secret, insecure=args.insecure, timeout=args.timeout, stop=stop,
                    state_path=args.state or "default")
    print(f"bridge in: {r['committed']} committed ({r['duplicates']} duplicates dropped, {r['gaps']} gaps); "
          f"end: {r['end']}", flush=True)
    return 0
