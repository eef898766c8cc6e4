"""Corrupt a valid multi-party ring (mpsc, broadcast, mpmc) or record ring and
read it back: the engine behind test_fuzz_multi.py (the spsc one is _fuzzing.py).

A *snapshot* is the bytes of a file-backed ring holding some 40 pending
messages of every type (bytes, arrays, msgpack objects with arrays) around a
wrap (one of them crossing the end of the data area, R60), with T_SKIP records (aborted reservations, and the
unused tail of every encoded message's reservation) among them; broadcast:
subscribers kept behind and one that read part of it; mpmc: records taken and
released out of order, one consumer still holding records, and records
requeued (state 0xfffe), as recovery does with what a dead consumer held.
``eos`` picks whether the producers closed the stream or only left it.

A *mutation* overwrites bytes in one region of a copy (see :func:`regions`),
forges a record with the right stamp (:func:`forge`), or truncates the file;
:func:`read_back` then attaches, takes the consumer role, reads everything,
tries to produce, and classifies what happens.  Allowed are valid messages
and the typed errors each touched region can explain (:func:`allowed`);
anything else raises :class:`Disallowed`.  Module level so that a child
process (capped address space, timeout) can run the same rounds.
"""
import contextlib
import faulthandler
import functools
import os
import random
import struct
import sys
import tempfile

import msgpack
import numpy as np

import shmring
from shmring import layout as L
from shmring import parties

from _fuzzing import (INTERESTING, WEIRD_DTYPES, WEIRD_SHAPES, Disallowed, apply, check_message,
                      limit_address_space, send_mixed, spans, write_meta)

CAP = 8192
MAXP = MAXC = 4
KINDS = ("mpsc", "broadcast", "mpmc")
MAX_READS = CAP // L.MREC_HDR + 2        # more records than can exist: a loop means a bug
HANG_SECONDS = 30                        # one read-back taking this long is a hang (see watchdog)
HANG_FILE = None                         # where the watchdog writes (None: sys.__stderr__); pytest's is captured

# Regions whose corruption may explain an outcome other than valid messages,
# CorruptSegmentError, EndOfStream and Timeout (see allowed()).
PEER_REGIONS = {"producers", "powners"}            # a producer counted dead / aborted: PeerGone at the end
ROLE_REGIONS = {"cowners", "powners"}              # an entry held by a live pid: RoleTaken / ResourceLimit
LAG_REGIONS = {"ctable"}                           # a broadcast pos word: Lagged


# Open bugs this fuzzer found, each pinned by an xfail(strict=True) reproducer
# in test_fuzz_multi.py: name -> re.compile(pattern of the Disallowed message).
# While one stands, a random round that runs into it returns "known:<name>"
# instead of failing, so the rounds keep looking for new ones;
# SHMRING_FUZZ_STRICT=1 makes them fail.  The five found so far are fixed and
# their reproducers are plain tests.
KNOWN_BUGS: dict = {}
STRICT = os.environ.get("SHMRING_FUZZ_STRICT") == "1"


def known_bug(e) -> str | None:
    for name, pattern in KNOWN_BUGS.items():
        if pattern.search(str(e)):
            return name
    return None


def tolerate_known(f):
    @functools.wraps(f)
    def g(*args, **kw):
        try:
            return f(*args, **kw)
        except Disallowed as e:
            bug = known_bug(e)
            if bug is None or STRICT:
                raise
            return "known:" + bug
    return g


# --------------------------------------------------------------------------- snapshots



def _abort_one(p, n=100):
    """An aborted reservation: a T_SKIP record on a multi-party ring."""
    try:
        with p.reserve(n, timeout=0):
            raise KeyError("abort")
    except KeyError:
        pass


def build_snapshot(kind: str, eos: bool = True, seed: int = 5) -> bytes:
    """Bytes of a ``kind`` ring with pending messages of every type around a wrap."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "src.ring")
        kw = dict(max_consumers=MAXC) if kind != "mpsc" else {}
        if kind != "broadcast":
            kw["max_producers"] = MAXP
        else:
            kw.update(policy="block" if eos else "evict", evict_after=3600.0)
        ring = shmring.Ring.create(path=path, capacity=CAP, kind=kind, **kw)
        r = ring._region
        cursor = lambda: r.load_u64(L.MP_OFF_CURSOR)          # noqa: E731
        held = []                                               # handles and messages kept past the snapshot
        try:
            prods = [ring.producer() for _ in range(1 if kind == "broadcast" else 2)]
            if kind == "mpsc":
                cons = [ring.consumer()]
            elif kind == "broadcast":
                cons = [ring.subscribe(), ring.subscribe()]     # slow (kept behind), mid (reads half)
            else:
                cons = [ring.consumer(), ring.consumer()]
            low = (lambda: cons[0].position) if kind != "mpmc" else (lambda: r.load_u64(L.MP_OFF_RELEASE))
            i = 0
            while i < 400 or not 512 < cursor() % CAP < 2048:
                i += 1
                while cursor() - low() > CAP - 1024:
                    if kind == "mpmc":                          # take three, release them out of order
                        ms = [cons[0].recv(timeout=0) for _ in range(3)]
                        for j in (2, 0, 1):
                            ms[j].release()
                    else:
                        cons[0].recv(timeout=0).release()
                        if kind == "broadcast":
                            while cons[1].position < cons[0].position:
                                cons[1].recv(timeout=0).release()
                p = prods[i % len(prods)]
                if i % 13 == 5:
                    _abort_one(p, rng.randrange(0, 150))
                send_mixed(p, rng, i)
            if kind == "broadcast":                             # mid reads on to about half of what is pending
                mid = (cursor() + cons[1].position) // 2
                while cons[1].position < mid:
                    cons[1].recv(timeout=0).release()
                held += cons
            elif kind == "mpmc":
                a, b = cons
                ms = [a.recv(timeout=0) for _ in range(3)]
                ms[1].release()                                 # out of order: the release word stays at ms[0]
                held += [a, ms[0], ms[2]]                       # a live consumer holding two
                for _ in range(2):                              # b takes two and hands them back: requeued
                    m = b.recv(timeout=0)
                    b._requeue(m.position, b._slot + 1)         # (what recovery does for a dead holder)
                    held.append(m)
                b.close()
            else:
                cons[0].close()
            if eos:
                for p in prods:
                    p.close()
            else:
                prods[0].detach()
                held += prods[1:]                               # mpsc / mpmc: a live producer stays joined
            with open(path, "rb") as f:
                return f.read()
        finally:
            for h in sorted(held, key=lambda h: not isinstance(h, shmring.Message)):
                h.release() if isinstance(h, shmring.Message) else h.close()   # messages, then handles
            del held
            ring.close()


def header(snap: bytes) -> dict:
    h = L.read_header(snap)
    h.update(parties.read_multi_fields(snap))
    return h


def records(snap: bytes) -> list:
    """(position, length, type, state) of every committed record from the
    release word to the claim cursor (pure-Python reader)."""
    h = header(snap)
    data, key = h["data_offset"], h["key"]
    cur, pos = L.read_u64(snap, L.MP_OFF_CURSOR), L.read_u64(snap, L.MP_OFF_RELEASE)
    out = []
    while pos < cur:
        o = data + pos % CAP
        stamp, n, t, st = struct.unpack_from("<QIHH", snap, o)
        if stamp != key ^ pos:
            break
        out.append((pos, n, t, st))
        pos += L.align(L.MREC_HDR + n, L.MREC_ALIGN)
    return out


def regions(snap: bytes) -> dict:
    """name -> list of (offset, length) byte ranges a mutation may hit."""
    h = header(snap)
    kind = L.KIND_NAMES[h["kind"]]
    recs = records(snap)
    data = h["data_offset"]
    pt, ct = h["prod_table"], h["cons_table"]
    cur = L.read_u64(snap, L.MP_OFF_CURSOR)
    cursors = [(L.MP_OFF_CURSOR, 8), (L.MP_OFF_RELEASE, 8)]
    if kind == "broadcast":
        cursors.append((L.MP_OFF_NEWEST, 8))
    if kind == "mpmc":
        cursors.append((L.MP_OFF_TAKE, 8))
    plines = [pt + i * L.MP_ENTRY for i in range(h["max_producers"])]
    clines = [ct + i * L.MP_ENTRY for i in range(h["max_consumers"])]
    if kind == "mpsc":
        cowners = [(L.OFF_CONS_ROLE + L.ROLE_OWNER, 8), (L.OFF_CONS_ROLE + L.ROLE_SESSIONS, 8)]
        ctable = [(L.OFF_CONS_ROLE + 24, 8)]
    else:
        cowners = [(c + L.CE_OWNER, 8) for c in clines]
        ctable = [(c + f, 8) for c in clines for f in (L.CE_POS, L.CE_RECEIVED, L.CE_BASE, L.CE_MISSED,
                                                       L.CE_MISSED_BYTES)]
    return {
        "cursors": cursors,
        "producers": [(L.MP_OFF_PRODUCERS + f, 8) for f in (L.MP_ENDED, L.MP_ABORTED, L.MP_SESSIONS, L.MP_DEAD,
                                                             L.MP_STATE)],
        "counters": [(L.MP_OFF_COUNTERS + 8 * k, 8) for k in range(5)] + [(L.MP_OFF_COUNTERS + 40, 4),
                                                                            (L.MP_OFF_COUNTERS + 44, 4)],
        "powners": [(p + L.PE_OWNER, 8) for p in plines],
        "ptable": [(p + f, 8) for p in plines for f in (L.PE_INTENT, L.PE_SENT, L.PE_BYTES)],
        "cowners": cowners,
        "ctable": ctable,
        "wake": [(L.OFF_DATA_WAKE, 8), (L.OFF_SPACE_WAKE, 8)],
        "stamps": [(data + pos % CAP, 8) for pos, _, _, _ in recs] + [(data + cur % CAP, 8)],
        "rec_fields": [(data + pos % CAP + 8, 8) for pos, _, _, _ in recs],
        "metas": [s for pos, n, t, _ in recs if t in (L.T_ARRAY, L.T_OBJECT)
                  for s in spans(data, pos + L.MREC_HDR, min(n, 96), CAP)],
        "payloads": [s for pos, n, t, _ in recs if n and t != L.T_SKIP
                     for s in spans(data, pos + L.MREC_HDR, n, CAP)],
        "fixed_header": [(0, L.OFF_READY), (L.OFF_READY + 4, L.HEADER_STRUCT.size - L.OFF_READY - 4)],
        "multi_header": [(L.MP_OFF_KEY, L.MP_STRUCT.size)],
    }


REGION_NAMES = ("cursors", "producers", "counters", "powners", "ptable", "cowners", "ctable", "wake",
                "stamps", "rec_fields", "metas", "payloads", "fixed_header", "multi_header")
LIVE_REGIONS = tuple(r for r in REGION_NAMES if r not in ("fixed_header", "multi_header"))
FORGE_TYPES = [L.T_BYTES, L.T_ARRAY, L.T_OBJECT, L.T_PAD, L.T_SKIP, 0, 4, 0xFFFF]
FORGE_STATES = [0, 1, 2, MAXC, MAXC + 1, L.RS_REQUEUED, L.RS_RELEASED, 0x7FFF]
FORGE_LENGTHS = [0, 1, 8, 16, 100, 1000, CAP // 2 - 16, CAP // 2, CAP - 32, CAP - 16, CAP - 15, CAP,
                 2 ** 31, 2 ** 32 - 1]


def forge(buf, snap: bytes, index: int, where: int, length: int, type_: int, state: int) -> None:
    """Write a *committed-looking* record (the right stamp for its position)
    where none should be: at the claim cursor, inside a payload, a lap ahead
    or behind, or over an existing record with other fields.  ``where`` >= 10
    chains it: record ``index`` is shrunk to end 16 * (where - 9) bytes after
    its start and the forged record is placed there, inside its old payload."""
    h = header(snap)
    recs = records(snap)
    cur = L.read_u64(snap, L.MP_OFF_CURSOR)
    base = recs[index % len(recs)][0] if recs else cur
    if where >= 10:
        j = where - 9
        struct.pack_into("<I", buf, h["data_offset"] + base % CAP + 8, 16 * j - L.MREC_HDR)
        pos = base + 16 * j
    else:
        pos = [cur, cur + 16, base, base + 16, base + 32, base + CAP, base - CAP, cur - CAP, cur + CAP,
               base + 48][where]
    pos &= ((1 << 64) - 1) & ~15
    o = h["data_offset"] + pos % CAP
    struct.pack_into("<QIHH", buf, o, h["key"] ^ pos, length & 0xFFFFFFFF, type_ & 0xFFFF, state & 0xFFFF)


def replace_meta(buf, snap: bytes, index: int, desc, narrays: int, as_object: bool) -> bool:
    """Replace the meta of an array/object record with ``desc`` (msgpack-packed)."""
    h = header(snap)
    recs = [(pos, n, t) for pos, n, t, _ in records(snap) if t in (L.T_ARRAY, L.T_OBJECT)]
    if not recs:
        return False
    pos, n, t = recs[index % len(recs)]
    return write_meta(buf, h["data_offset"] + pos % CAP + L.MREC_HDR, n, desc, narrays, as_object)


def mutate(buf, snap, regs, muts) -> set:
    """Apply mutations; return the names of the regions touched.  A mutation is
    (region, index, width, value, relative) or ("forge", index, where, length, type, state)."""
    touched = set()
    for m in muts:
        if m[0] == "forge":
            forge(buf, snap, *m[1:])
            touched |= {"stamps", "rec_fields"}
        else:
            apply(buf, regs, *m)
            touched.add(m[0])
    return touched


# --------------------------------------------------------------------------- read back

def allowed(kind: str, touched) -> dict:
    touched = set(touched)
    return {"PeerGone": bool(touched & PEER_REGIONS),         # at the end of the stream
            "PeerGoneSend": "cowners" in touched,             # a producer blocked for room: the consumer died
            "roles": bool(touched & ROLE_REGIONS),
            "Lagged": kind == "broadcast" and bool(touched & LAG_REGIONS)}


@contextlib.contextmanager
def watchdog(seconds: float = HANG_SECONDS):
    """A hang (say an endless loop in C, where no Python signal handler runs)
    dumps every thread's traceback and exits the process: a failure, not a
    stuck test run."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=HANG_FILE or sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


SPIN_SECONDS = 1.5                       # > GRACE (0.5 s), the longest a legitimate recovery spins
_recv_started = [0.0]


def _spin_guarded(eos_ready):
    """Consumer._eos_ready is the one Python call inside a C loop (mpmc_peek);
    a recv that keeps calling it for SPIN_SECONDS (GRACE is 0.5 s) spins."""
    @functools.wraps(eos_ready)
    def guarded(self):
        import time
        if _recv_started[0] and time.monotonic() - _recv_started[0] > SPIN_SECONDS:
            _recv_started[0] = 0.0
            raise Disallowed(f"recv(timeout=0) spun for more than {SPIN_SECONDS} s in mpmc_peek, calling "
                             "_eos_ready")
        return eos_ready(self)
    guarded.guard = True
    return guarded


@contextlib.contextmanager
def spin_guard():
    cls = shmring.Consumer
    old = cls.__dict__.get("_eos_ready")
    if old is None or getattr(old, "guard", False):
        yield
        return
    cls._eos_ready = _spin_guarded(old)
    try:
        yield
    finally:
        cls._eos_ready = old
        _recv_started[0] = 0.0


def _start_recv():
    import time
    _recv_started[0] = time.monotonic()


@contextlib.contextmanager
def grace(seconds):
    """Recovery (skip an abandoned claim, requeue a record nobody marked)
    waits GRACE seconds; 0 runs it on the first timeout=0 read, over the
    corrupt segment."""
    old = parties.GRACE
    parties.GRACE = seconds if seconds is not None else old
    try:
        yield
    finally:
        parties.GRACE = old


@tolerate_known
def read_back(path: str, kind: str, touched=(), *, grace0: bool = False, as_bytes: bool = False) -> str:
    """Attach to the (corrupt) ring at ``path``, read it to the end (broadcast:
    a subscriber from the oldest message, then one from the newest), try to
    produce, and take stats().  Returns the outcome's name; raises Disallowed
    for anything the contract forbids.  ``grace0``: run the recovery paths at
    once; ``as_bytes``: receive with recv_bytes() where possible."""
    ok = allowed(kind, touched)
    with watchdog(), grace(0.0 if grace0 else None), spin_guard():
        try:
            ring = shmring.Ring.attach(path=path)
        except shmring.CorruptSegmentError as e:
            return "attach:" + type(e).__name__
        except Exception as e:
            raise Disallowed(f"attach raised {type(e).__name__}: {e}") from e
        try:
            out = [consume(ring, ok, as_bytes=as_bytes)]
            if kind == "broadcast":
                out.append(consume(ring, ok, start="newest"))
            out.append(produce(ring, ok))
            stats(ring)
            return "/".join(out)
        finally:
            ring.close()


def stats(ring) -> None:
    try:
        ring.stats()
    except shmring.ShmringError:
        pass
    except Exception as e:
        raise Disallowed(f"stats() raised {type(e).__name__}: {e}") from e


def take_consumer(ring, ok, start="oldest"):
    """(consumer, None) or (None, outcome)."""
    try:
        return (ring.subscribe(start) if ring.kind == "broadcast" else ring.consumer()), None
    except shmring.CorruptSegmentError as e:
        return None, "consumer:" + type(e).__name__
    except (shmring.RoleTaken, shmring.ResourceLimit) as e:
        if ok["roles"]:
            return None, "consumer:" + type(e).__name__
        raise Disallowed(f"{type(e).__name__} although no owner word was touched: {e}") from e
    except Exception as e:
        raise Disallowed(f"taking the consumer role raised {type(e).__name__}: {e}") from e


def consume(ring, ok, start="oldest", as_bytes=False) -> str:
    c, outcome = take_consumer(ring, ok, start)
    if c is None:
        return outcome
    try:
        out = drain(ring, c, ok, as_bytes)
        try:
            shmring.wait([c], timeout=0)
        except shmring.ShmringError:
            pass
        except Exception as e:
            raise Disallowed(f"wait() raised {type(e).__name__}: {e}") from e
        return out
    finally:
        try:
            c.close()
        except shmring.CorruptSegmentError:
            pass
        except Exception as e:
            raise Disallowed(f"closing the consumer raised {type(e).__name__}: {e}") from e


def _mapping(ring):
    base = np.frombuffer(ring._seg.buf, np.uint8)
    a = base.__array_interface__["data"][0]
    return a, a + base.nbytes


def _recv(c, as_bytes):
    """A Message, or bytes (as_bytes: recv_bytes(), falling back to recv()
    for a message that is not bytes, which is documented as WrongKind, a TypeError)."""
    _start_recv()
    if as_bytes:
        try:
            return c.recv_bytes(timeout=0)
        except shmring.WrongKind:
            pass
    return c.recv(timeout=0)


def drain(ring, c, ok, as_bytes=False) -> str:
    """Receive with consumer ``c`` until an allowed end; check every message's views."""
    lo, hi = _mapping(ring)
    data_lo = lo + ring._header["data_offset"]
    data_hi = data_lo + 2 * ring.capacity       # the data area, mapped twice (R60)
    rejoined = False
    for got in range(MAX_READS):
        try:
            m = _recv(c, as_bytes)
        except (shmring.CorruptSegmentError, shmring.EndOfStream, shmring.Timeout) as e:
            return f"recv:{got}:" + type(e).__name__
        except shmring.PeerGone as e:
            if ok["PeerGone"]:
                return f"recv:{got}:PeerGone"
            raise Disallowed(f"PeerGone although no producer word was touched: {e}") from e
        except shmring.Lagged as e:
            if not ok["Lagged"]:
                raise Disallowed(f"Lagged although no subscriber position was touched: {e}") from e
            if rejoined:
                return f"recv:{got}:Lagged"
            rejoined = True
            try:
                c.rejoin(("oldest", "newest")[got % 2])     # the join position is read from the segment too
            except shmring.CorruptSegmentError:
                return f"recv:{got}:Lagged/rejoin:CorruptSegmentError"
            except Exception as e2:
                raise Disallowed(f"rejoin() raised {type(e2).__name__}: {e2}") from e2
            if c.position % L.MREC_ALIGN:
                raise Disallowed(f"rejoin() accepted an unaligned position {c.position} from the segment")
            continue
        except Exception as e:
            raise Disallowed(f"recv raised {type(e).__name__}: {e}") from e
        if isinstance(m, bytes):
            if len(m) > ring.max_message:
                raise Disallowed(f"recv_bytes() returned {len(m)} bytes")
            continue
        if m.kind not in ("bytes", "array", "object") or not 0 <= m.nbytes <= ring.max_message:
            raise Disallowed(f"impossible message {m!r}")
        msg = (lo + m._offset, lo + m._offset + m.nbytes)
        if not (data_lo <= msg[0] <= data_lo + ring.capacity and msg[1] <= data_hi):   # starts in the first map
            raise Disallowed(f"message [{msg[0] - lo}, {msg[1] - lo}) lies outside the data area "
                             f"[{data_lo - lo}, {data_hi - lo})")
        check_message(m, (lo, hi), msg)
    raise Disallowed(f"more than {MAX_READS} messages from a {CAP}-byte ring")


def produce(ring, ok) -> str:
    """Join as a producer; try_send each type, reserve (abort and commit), then
    send(timeout=0) until the ring is full (the blocking path's recovery)."""
    try:
        p = ring.producer()
    except (shmring.CorruptSegmentError, shmring.HandleClosed) as e:
        return "producer:" + type(e).__name__
    except (shmring.RoleTaken, shmring.ResourceLimit) as e:
        if ok["roles"]:
            return "producer:" + type(e).__name__
        raise Disallowed(f"{type(e).__name__} although no owner word was touched: {e}") from e
    except Exception as e:
        raise Disallowed(f"producer() raised {type(e).__name__}: {e}") from e
    sent = 0
    try:
        for step in range(40):
            try:
                if step < 3:
                    sent += bool(p.try_send((b"x" * 100, np.arange(10), {"k": np.ones(3)})[step]))
                elif step == 3:
                    _abort_one(p, 50)
                elif step == 4:
                    with p.reserve_array((4,), "<i4", timeout=0) as a:
                        a[:] = 7
                else:
                    p.send(b"y" * 300, timeout=0)
                    sent += 1
            except shmring.Timeout:
                if step < 5:
                    continue
                return f"send:{sent}:Timeout"
            except shmring.CorruptSegmentError:
                return f"send:{sent}:CorruptSegmentError"
            except shmring.PeerGone as e:
                if ok["PeerGoneSend"]:
                    return f"send:{sent}:PeerGone"
                raise Disallowed(f"send: PeerGone although no consumer owner word was touched: {e}") from e
            except Exception as e:
                raise Disallowed(f"sending (step {step}) raised {type(e).__name__}: {e}") from e
        return f"send:{sent}"
    finally:
        try:
            p.detach()
        except Exception as e:
            raise Disallowed(f"detach raised {type(e).__name__}: {e}") from e


@tolerate_known
def live_round(snap: bytes, path: str, side: str, first: int, muts, *, grace0: bool = False) -> str:
    """Corrupt a ring *while* a role is attached and has cached positions.

    ``side == "consumer"``: a consumer receives and releases ``first`` messages,
    then ``muts`` are applied to the live mapping, then it reads on to the end.
    ``side == "producer"``: a producer joins, the mapping is corrupted, it tries
    to send ``first`` messages, then a fresh consumer reads everything back."""
    from _fuzzing import _apply_live
    with open(path, "wb") as f:
        f.write(snap)
    regs = regions(snap)
    kind = L.KIND_NAMES[header(snap)["kind"]]

    def corrupt(live):
        touched = set()
        for m in muts:
            if m[0] == "forge":
                scratch = bytearray(live[:])
                forge(scratch, snap, *m[1:])
                live[:] = scratch
                touched |= {"stamps", "rec_fields"}
            else:
                _apply_live(live, regs, *m)
                touched.add(m[0])
        return touched

    with watchdog(), grace(0.0 if grace0 else None), spin_guard():
        ring = shmring.Ring.attach(path=path)
        try:
            live = ring._seg.buf
            if side == "consumer":
                c, outcome = take_consumer(ring, allowed(kind, ()))
                assert c is not None, outcome
                try:
                    for _ in range(first):
                        try:
                            _start_recv()
                            c.recv(timeout=0).release()
                        except (shmring.EndOfStream, shmring.Timeout):
                            break
                    touched = corrupt(live)
                    return "live-consumer:" + drain(ring, c, allowed(kind, touched))
                finally:
                    try:
                        c.close()
                    except shmring.CorruptSegmentError:
                        pass
                    except Exception as e:
                        raise Disallowed(f"closing the consumer raised {type(e).__name__}: {e}") from e
            try:
                p = ring.producer()
            except shmring.HandleClosed:
                return "live-producer:HandleClosed"
            try:
                touched = corrupt(live)
                sent = 0
                for i in range(first):
                    data = (b"%d" % i * (i % 50), np.arange(i % 7), {"i": i, "a": np.ones(i % 5)})[i % 3]
                    try:
                        sent += bool(p.try_send(data))
                    except shmring.CorruptSegmentError:
                        break
                    except Exception as e:
                        raise Disallowed(f"try_send on a live corrupted ring raised {type(e).__name__}: {e}") from e
            finally:
                try:
                    p.detach()
                except Exception as e:
                    raise Disallowed(f"detach raised {type(e).__name__}: {e}") from e
            return f"live-producer:{sent}/" + consume(ring, allowed(kind, touched))
        finally:
            ring.close()


# --------------------------------------------------------------------------- random rounds

def random_mutations(rng: random.Random, live: bool = False) -> list:
    out = []
    names = LIVE_REGIONS if live else REGION_NAMES
    for _ in range(rng.randrange(1, 5)):
        if rng.random() < 0.1:
            out.append(("forge", rng.randrange(1000), rng.randrange(16), rng.choice(FORGE_LENGTHS),
                        rng.choice(FORGE_TYPES), rng.choice(FORGE_STATES)))
            continue
        value = rng.choice(INTERESTING) if rng.random() < 0.5 else rng.getrandbits(64)
        out.append((rng.choice(names), rng.randrange(10 ** 6), rng.choice([1, 2, 4, 8]), value, rng.random() < 0.2))
    return out


def resize(buf: bytearray, how: int) -> bytearray:
    """A truncated (or extended) file: ``how`` picks the new length (0 to 3:
    shorter than the header page, which attach waits a second for, as for
    a file still being sized by its creator)."""
    n = len(buf)
    size = [0, 1, 100, L.HEADER_SIZE - 1, L.HEADER_SIZE, n - CAP, n - L.HEADER_SIZE, n - 16, n - 1, n + 1,
            n + L.HEADER_SIZE][how % 11]
    size = max(0, size)
    return buf[:size] if size <= n else buf + bytes(size - n)


def random_round(rng: random.Random, snap: bytes, regs: dict, path: str, kind: str) -> str:
    buf = bytearray(snap)
    if rng.random() < 0.03:
        buf, touched = resize(buf, rng.randrange(4, 11)), set()
    elif rng.random() < 0.15:
        desc = [rng.choice(WEIRD_DTYPES), rng.choice(WEIRD_SHAPES), rng.choice(["C", "F", "Z", 1]),
                rng.choice([0, 64, -64, 1, 2 ** 40]), rng.choice([0, 8, 12, 48, -8, 2 ** 64 - 1])]
        replace_meta(buf, snap, rng.randrange(1000), desc[:rng.choice([5, 5, 4, 6])],
                     rng.choice([1, 1, 0, 2, 2 ** 32 - 1]), rng.random() < 0.5)
        touched = set()
    else:
        touched = mutate(buf, snap, regs, random_mutations(rng))
    with open(path, "wb") as f:
        f.write(buf)
    return read_back(path, kind, touched, grace0=rng.random() < 0.3, as_bytes=rng.random() < 0.3)


# --------------------------------------------------------------------------- record rings

RDT = np.dtype([("seq", "<u8"), ("x", "<f4"), ("tag", "S3")])      # itemsize 15: slots do not divide evenly


def _batch(lo, hi, dt=RDT):
    a = np.zeros(hi - lo, dt)
    a["seq"] = np.arange(lo, hi)
    a["x"] = np.arange(lo, hi) * 0.5
    a["tag"] = [b"%03d" % (i % 1000) for i in range(lo, hi)]
    return a


def build_record_snapshot(eos: bool = True, seed: int = 5) -> bytes:
    """A record ring whose pending records wrap around the end of the data area,
    with received-but-unreleased batches among them."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rec.ring")
        ring = shmring.Ring.create(path=path, capacity=CAP, dtype=RDT)
        try:
            slots = ring._header["slots"]
            p, c = ring.producer(), ring.consumer()
            sent = 0
            while sent < 3 * slots or not slots // 8 < p.position % slots < slots // 3:
                k = rng.randrange(1, 60)
                while p.position + k - c.position > slots - slots // 8:
                    with c.recv_many(rng.randrange(1, 80), timeout=0):
                        pass
                p.send_many(_batch(sent, sent + k), timeout=0)
                sent += k
            b = c.recv_many(7, timeout=0)           # received, not released: stays pending
            if eos:
                p.close()
            else:
                p._role.give_back(p._region)  # the producer left without ending the stream
                p._closed = True
            c.close()                                # gives the role back; b is delivered again
            with open(path, "rb") as f:
                snap = f.read()
            b.release()
            return snap
        finally:
            ring.close()


def record_regions(snap: bytes) -> dict:
    itemsize, slots, n = L.RC_STRUCT.unpack_from(snap, L.RC_OFF_ITEMSIZE)
    wp, rp = L.read_u64(snap, L.OFF_WRITE_POS), L.read_u64(snap, L.OFF_READ_POS)
    return {
        "cursors": [(L.OFF_WRITE_POS, 8), (L.OFF_READ_POS, 8)],
        "owners": [(L.OFF_PROD_ROLE + L.ROLE_OWNER, 8), (L.OFF_CONS_ROLE + L.ROLE_OWNER, 8),
                   (L.OFF_PROD_ROLE + L.ROLE_SESSIONS, 8), (L.OFF_CONS_ROLE + L.ROLE_SESSIONS, 8)],
        "closed": [(L.OFF_PROD_ROLE + L.ROLE_CLOSED, 4)],
        "wake": [(L.OFF_DATA_WAKE, 8), (L.OFF_SPACE_WAKE, 8)],
        "record_fields": [(L.RC_OFF_ITEMSIZE, 8), (L.RC_OFF_SLOTS, 8), (L.RC_OFF_DESCR_LEN, 4)],
        "descr": [(L.RC_OFF_DESCR, n)],
        "records": [(L.HEADER_SIZE + (k % slots) * itemsize, itemsize) for k in range(rp, wp)][:64],
        "fixed_header": [(0, L.OFF_READY), (L.OFF_READY + 4, L.HEADER_STRUCT.size - L.OFF_READY - 4)],
    }


RECORD_REGIONS = ("cursors", "owners", "closed", "wake", "record_fields", "descr", "records", "fixed_header")


def replace_record_dtype(buf, spec, itemsize=None, slots=None, raw: bytes | None = None) -> bool:
    """Replace a record ring's dtype description (msgpack of ``spec``, or
    ``raw`` bytes); ``itemsize`` / ``slots`` None: consistent with the new dtype
    (when it has one), so that only the description lies."""
    try:
        descr = raw if raw is not None else msgpack.packb(spec)
    except (TypeError, ValueError, OverflowError):
        return False
    if len(descr) > L.RC_MAX_DESCR:
        return False
    cap = L.read_header(buf)["capacity"]
    try:
        from shmring import codec
        dt = codec._dtype_from_spec(spec)
        isz = dt.itemsize
    except Exception:
        isz = L.RC_STRUCT.unpack_from(buf, L.RC_OFF_ITEMSIZE)[0]
    isz = isz if itemsize is None else itemsize
    sl = (cap // isz if isz else 0) if slots is None else slots
    L.RC_STRUCT.pack_into(buf, L.RC_OFF_ITEMSIZE, isz & (2 ** 64 - 1), sl & (2 ** 64 - 1), len(descr))
    buf[L.RC_OFF_DESCR:L.RC_OFF_DESCR + len(descr)] = descr
    return True


def _record_allowed(buf, touched) -> dict:
    closed = L.read_u32(buf, L.OFF_PROD_ROLE + L.ROLE_CLOSED) if len(buf) >= L.HEADER_SIZE else 0
    return {"PeerGone": closed == 2 or "owners" in touched, "roles": "owners" in touched,
            "HandleClosed": closed != 0, "closed": closed}


@tolerate_known
def record_read_back(path: str, touched=()) -> str:
    """read_back() for a record ring: batches of in-place views, then a batch sent."""
    with open(path, "rb") as f:
        ok = _record_allowed(f.read(L.HEADER_SIZE), set(touched))
    with watchdog():
        try:
            ring = shmring.Ring.attach(path=path)
        except shmring.CorruptSegmentError as e:
            return "attach:" + type(e).__name__
        except Exception as e:
            raise Disallowed(f"attach raised {type(e).__name__}: {e}") from e
        try:
            return record_consume(ring, ok) + "/" + record_produce(ring, ok)
        finally:
            ring.close()


def _record_role(ring, ok, make, what):
    try:
        return make(), None
    except shmring.CorruptSegmentError as e:
        return None, f"{what}:" + type(e).__name__
    except shmring.HandleClosed as e:
        if what == "producer" and ok["HandleClosed"]:
            return None, "producer:HandleClosed"
        raise Disallowed(f"{what}: HandleClosed with status word {ok['closed']}: {e}") from e
    except shmring.RoleTaken as e:
        if ok["roles"]:
            return None, f"{what}:RoleTaken"
        raise Disallowed(f"RoleTaken although no owner word was touched: {e}") from e
    except Exception as e:
        raise Disallowed(f"{what}() raised {type(e).__name__}: {e}") from e


def record_consume(ring, ok) -> str:
    c, outcome = _record_role(ring, ok, ring.consumer, "consumer")
    if c is None:
        return outcome
    try:
        return record_drain(ring, c, ok)
    finally:
        c.close()


def record_drain(ring, c, ok, max_n=97) -> str:
    lo, hi = _mapping(ring)
    slots, dt = c.slots, c.dtype
    data_lo, data_hi = lo + L.HEADER_SIZE, lo + L.HEADER_SIZE + slots * dt.itemsize
    if data_hi > hi or slots * dt.itemsize > ring.capacity:
        raise Disallowed(f"record area of {slots} x {dt.itemsize} bytes exceeds the mapping or the capacity")
    got = 0
    for _ in range(slots + 2):
        try:
            b = c.recv_many(max_n, timeout=0)
        except (shmring.CorruptSegmentError, shmring.EndOfStream, shmring.Timeout) as e:
            return f"recv:{got}:" + type(e).__name__
        except shmring.PeerGone as e:
            if ok["PeerGone"]:
                return f"recv:{got}:PeerGone"
            raise Disallowed(f"PeerGone with status word {ok['closed']} and no owner touched: {e}") from e
        except Exception as e:
            raise Disallowed(f"recv_many raised {type(e).__name__}: {e}") from e
        try:
            n = 0
            if not 1 <= len(b) <= min(max_n, slots) or len(b.arrays) not in (1, 2):
                raise Disallowed(f"batch of {len(b)} records in {len(b.arrays)} views")
            for a in b.arrays:
                addr = a.__array_interface__["data"][0]
                if a.dtype != dt or a.flags.writeable or a.ndim != 1:
                    raise Disallowed(f"view of dtype {a.dtype}, writeable {a.flags.writeable}, ndim {a.ndim}")
                if not (data_lo <= addr and addr + a.nbytes <= data_hi):
                    raise Disallowed(f"view [{addr - lo}, +{a.nbytes}) outside the record area "
                                     f"[{data_lo - lo}, {data_hi - lo})")
                a.tobytes()
                n += len(a)
                del a
            if n != len(b):
                raise Disallowed(f"batch of {len(b)} records has views of {n}")
            if len(b.copy()) != n or len(b.contiguous()) != n:
                raise Disallowed("copy() / contiguous() lengths differ")
            b.release()
            got += n
        except Disallowed:
            raise
        except Exception as e:
            raise Disallowed(f"reading {b!r} raised {type(e).__name__}: {e}") from e
    raise Disallowed(f"more than {slots + 2} batches from a ring of {slots} records")


def record_produce(ring, ok) -> str:
    p, outcome = _record_role(ring, ok, ring.producer, "producer")
    if p is None:
        return outcome
    try:
        try:
            return f"send:{p.try_send_many(np.zeros(10, p.dtype))}"
        except shmring.CorruptSegmentError:
            return "send:CorruptSegmentError"
        except Exception as e:
            raise Disallowed(f"try_send_many raised {type(e).__name__}: {e}") from e
    finally:
        p._role.give_back(p._region)  # leave without ending the stream
        p._closed = True


@tolerate_known
def record_live_round(snap: bytes, path: str, side: str, first: int, muts) -> str:
    """live_round() for a record ring: ``muts`` are (region, index, width, value, relative)."""
    from _fuzzing import _apply_live
    with open(path, "wb") as f:
        f.write(snap)
    regs = record_regions(snap)
    touched = {m[0] for m in muts}
    with watchdog():
        ring = shmring.Ring.attach(path=path)
        try:
            live = ring._seg.buf
            if side == "consumer":
                with ring.consumer() as c:
                    for _ in range(first):
                        try:
                            c.recv_many(37, timeout=0).release()
                        except (shmring.EndOfStream, shmring.Timeout):
                            break
                    for m in muts:
                        _apply_live(live, regs, *m)
                    return "live-consumer:" + record_drain(ring, c, _record_allowed(live[:L.HEADER_SIZE], touched))
            try:
                p = ring.producer()
            except shmring.HandleClosed:
                return "live-producer:HandleClosed"
            sent = 0
            try:
                for m in muts:
                    _apply_live(live, regs, *m)
                for i in range(first):
                    try:
                        sent += p.try_send_many(_batch(i, i + 1 + i % 40, p.dtype))
                    except shmring.CorruptSegmentError:
                        break
                    except Exception as e:
                        raise Disallowed(f"try_send_many on a live corrupted ring raised {type(e).__name__}: "
                                         f"{e}") from e
            finally:
                p._role.give_back(p._region)
                p._closed = True
            return f"live-producer:{sent}/" + record_consume(ring, _record_allowed(live[:L.HEADER_SIZE], touched))
        finally:
            ring.close()


RECORD_LIVE_REGIONS = ("cursors", "owners", "closed", "wake", "records")


RECORD_SPECS = ["<i4", "|V0", "V99999999999", "<U0", "|S5", "O", [], None, 5, "i4,i4",
                {"base": "u1", "shape": [2 ** 40]}, {"base": "<u8", "shape": [10000]}, {"base": "u1", "shape": [0]},
                {"names": ["seq", "x"], "formats": ["<u8", "<f4"], "offsets": [0, 8], "itemsize": 15},
                {"names": ["a"], "formats": ["<u8"], "offsets": [2 ** 40], "itemsize": 15},
                {"names": [], "formats": [], "offsets": [], "itemsize": 15},
                {"names": ["a"], "formats": ["O"], "offsets": [0], "itemsize": 15},
                {"names": ["seq", "x", "tag"], "formats": ["<u8", "<f4", "|S3"], "offsets": [0, 8, 12],
                 "itemsize": 2 ** 40}]


def record_random_round(rng: random.Random, snap: bytes, regs: dict, path: str) -> str:
    buf = bytearray(snap)
    touched = set()
    if rng.random() < 0.03:
        buf = resize(buf, rng.randrange(4, 11))
    elif rng.random() < 0.2:
        replace_record_dtype(buf, rng.choice(RECORD_SPECS),
                             itemsize=rng.choice([None, None, 0, 1, 15, 16, CAP, CAP + 1, 2 ** 40, 2 ** 64 - 1]),
                             slots=rng.choice([None, None, 0, 1, CAP, CAP // 15 + 1, 2 ** 63]))
    else:
        for _ in range(rng.randrange(1, 5)):
            region = rng.choice(RECORD_REGIONS)
            touched.add(region)
            value = rng.choice(INTERESTING) if rng.random() < 0.5 else rng.getrandbits(64)
            apply(buf, regs, region, rng.randrange(10 ** 6), rng.choice([1, 2, 4, 8]), value, rng.random() < 0.2)
    with open(path, "wb") as f:
        f.write(buf)
    return record_read_back(path, touched)


# --------------------------------------------------------------------------- child process

def child_rounds(seed: int, rounds: int) -> None:
    """Process target: random rounds on every kind (and record rings) under a
    capped address space; raises (exit code 1) on a disallowed outcome."""
    limit_address_space()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fuzz.ring")
        for eos in (True, False):
            for kind in KINDS:
                snap = build_snapshot(kind, eos)
                regs = regions(snap)
                for _ in range(rounds):
                    if rng.random() < 0.15:
                        live_round(snap, path, rng.choice(["consumer", "producer"]), rng.randrange(30),
                                   random_mutations(rng, live=True), grace0=rng.random() < 0.3)
                    else:
                        random_round(rng, snap, regs, path, kind)
            snap = build_record_snapshot(eos)
            regs = record_regions(snap)
            for _ in range(rounds):
                if rng.random() < 0.15:
                    muts = [(rng.choice(RECORD_LIVE_REGIONS), rng.randrange(10 ** 6), rng.choice([1, 2, 4, 8]),
                             rng.choice(INTERESTING) if rng.random() < 0.5 else rng.getrandbits(64),
                             rng.random() < 0.2) for _ in range(rng.randrange(1, 4))]
                    record_live_round(snap, path, rng.choice(["consumer", "producer"]), rng.randrange(30), muts)
                else:
                    record_random_round(rng, snap, regs, path)
