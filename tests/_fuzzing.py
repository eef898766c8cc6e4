"""Corrupt a valid ring and read it back: the engine behind test_fuzz.py.

A *snapshot* is the bytes of a closed, file-backed ring holding a mix of
pending bytes, array and object messages (one of them crossing the end of
the data area, R60, and positions that have wrapped).  A *mutation* overwrites bytes in one region
of a copy; :func:`read_back` then attaches, takes the consumer role and reads
everything, classifying what happens.  Allowed outcomes are valid messages and
the typed errors listed in :data:`ALLOWED_END`; anything else raises
:class:`Disallowed` (a crash would take the process down, a hang never ends).
Module level so a child process can run it too.
"""
import os
import random
import struct
import tempfile

import msgpack
import numpy as np

import shmring
from shmring import layout as L

CAP = 8192
MAX_READS = CAP // L.REC_HDR + 2          # more records than can exist: a loop means a bug
ALLOWED_END = (shmring.CorruptSegmentError, shmring.EndOfStream, shmring.Timeout)


class Disallowed(AssertionError):
    pass


def send_mixed(p, rng, i: int) -> None:
    """Message ``i`` of a snapshot: bytes, an array, an object with arrays, or a plain object."""
    k = i % 4
    if k == 0:
        p.send(rng.randbytes(rng.randrange(0, 200)))
    elif k == 1:
        p.send(np.arange(rng.randrange(0, 30), dtype=rng.choice(["<i4", ">f8", "u1", "<c8"])))
    elif k == 2:
        p.send({"i": i, "s": "x" * rng.randrange(10), "a": np.ones((2, rng.randrange(3)), ">i2"),
                "r": np.zeros(3, [("a", "<i4"), ("b", "S2")])})
    else:
        p.send([i, b"b" * rng.randrange(50), {"k": None, 7: [1.5]}])


def build_snapshot(eos: bool = True, seed: int = 5) -> bytes:
    """Bytes of a ring with ~25 pending messages of every kind around a wrap."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "src.ring")
        with shmring.Ring.create(path=path, capacity=CAP) as ring:
            p, c = ring.producer(), ring.consumer()
            i = 0
            # keep the ring nearly full, and stop just after a wrap: the pending records span it
            while i < 400 or not 512 < p.position % CAP < 2048:
                i += 1
                while p.position - c.position > CAP - 1024:
                    c.recv().release()
                send_mixed(p, rng, i)
            if eos:
                p.close()
            else:
                p.detach()
            c.close()
        with open(path, "rb") as f:
            return f.read()


def records(snap: bytes) -> list:
    """(position, length, type) of every published, unreleased record (pure-Python reader)."""
    rp, wp = L.read_u64(snap, L.OFF_READ_POS), L.read_u64(snap, L.OFF_WRITE_POS)
    out, pos = [], rp
    while pos < wp:
        n, t = L.read_record_header(snap, pos, CAP)
        out.append((pos, n, t))
        pos += L.record_size(n)
    return out


def spans(data: int, pos: int, n: int, cap: int = CAP) -> list:
    """The file ranges of ``n`` bytes at ring position ``pos`` of a data area at
    ``data``: two when they cross its end (mapped twice in memory, R60, but
    once in the file)."""
    off = pos % cap
    first = min(n, cap - off)
    return [(data + off, first)] + ([(data, n - first)] if n > first else [])


def regions(snap: bytes) -> dict:
    """name -> list of (offset, length) byte ranges a mutation may hit."""
    recs = records(snap)
    data = L.HEADER_SIZE
    fixed = [(0, L.OFF_READY), (L.OFF_READY + 4, L.HEADER_STRUCT.size - L.OFF_READY - 4)]   # all but `ready`
    return {
        "cursors": [(L.OFF_WRITE_POS, 8), (L.OFF_READ_POS, 8)],
        "owners": [(L.OFF_PROD_ROLE + L.ROLE_OWNER, 8), (L.OFF_CONS_ROLE + L.ROLE_OWNER, 8),
                   (L.OFF_PROD_ROLE + L.ROLE_SESSIONS, 8), (L.OFF_CONS_ROLE + L.ROLE_SESSIONS, 8)],
        "wake": [(L.OFF_DATA_WAKE, 8), (L.OFF_SPACE_WAKE, 8)],
        "record_headers": [(data + pos % CAP, L.REC_HDR) for pos, _, _ in recs],
        "metas": [s for pos, n, t in recs if t in (L.T_ARRAY, L.T_OBJECT)
                  for s in spans(data, pos + L.REC_HDR, min(n, 96))],
        "payloads": [s for pos, n, t in recs if n for s in spans(data, pos + L.REC_HDR, n)],
        "fixed_header": fixed,
    }


INTERESTING = [0, 1, 7, 8, 9, 63, 64, 255, 4096, CAP - 8, CAP - 1, CAP, CAP + 8, 2 * CAP, 0x5041,
               2 ** 15, 2 ** 16 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 2 ** 64 - 8]


def apply(buf: bytearray, regs: dict, region: str, index: int, width: int, value: int, relative: bool) -> bool:
    """Overwrite ``width`` (1, 2, 4 or 8) bytes at a spot chosen by ``index`` in ``region``
    with ``value`` (or add it, when ``relative``).  False if the region is empty."""
    spans = [s for s in regs[region] if s[1] > 0]
    if not spans:
        return False
    off, length = spans[index % len(spans)]
    width = min(width, length)
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[1 << (width.bit_length() - 1)]
    width = struct.calcsize(fmt)
    at = off + (index // len(spans)) % (length - width + 1)
    mask = (1 << (8 * width)) - 1
    old = struct.unpack_from(fmt, buf, at)[0]
    struct.pack_into(fmt, buf, at, ((old + value) if relative else value) & mask)
    return True


def replace_meta(buf: bytearray, snap: bytes, index: int, desc, narrays: int, as_object: bool) -> bool:
    """Replace the meta of an array/object record with ``desc`` (msgpack-packed)."""
    recs = [(pos, n, t) for pos, n, t in records(snap) if t in (L.T_ARRAY, L.T_OBJECT)]
    if not recs:
        return False
    pos, n, t = recs[index % len(recs)]
    return write_meta(buf, L.HEADER_SIZE + pos % CAP + L.REC_HDR, n, desc, narrays, as_object)


def write_meta(buf: bytearray, po: int, n: int, desc, narrays: int, as_object: bool) -> bool:
    """Overwrite the payload at ``po`` (``n`` bytes) with a meta of ``desc``, and the
    record's type (the u16 4 bytes before the payload) to match.  False if it does not fit."""
    try:
        meta = msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(desc))} if as_object else desc)
    except (TypeError, ValueError, OverflowError):
        return False
    if 8 + len(meta) > n or po + 8 + len(meta) > len(buf):     # (a meta crossing the wrap is left alone)
        return False
    struct.pack_into("<II", buf, po, len(meta), narrays & 0xFFFFFFFF)
    buf[po + 8:po + 8 + len(meta)] = meta
    struct.pack_into("<H", buf, po - 4, L.T_OBJECT if as_object else L.T_ARRAY)
    return True


def _walk(v, mapping, msg, depth=0):
    """Touch every byte of a decoded value.  No array may hold more bytes than
    the message's payload, and one that views the ring's mapping must lie
    inside that payload (``msg``, a [lo, hi) range)."""
    if depth > 200:
        raise Disallowed("value nested implausibly deep")
    if isinstance(v, memoryview):
        v.tobytes()
    elif isinstance(v, np.ndarray):
        if v.nbytes > msg[1] - msg[0]:
            raise Disallowed(f"a {msg[1] - msg[0]}-byte message decoded to a {v.dtype} array of "
                             f"shape {v.shape} holding {v.nbytes} bytes")
        if v.nbytes:
            a = v.__array_interface__["data"][0]
            if mapping[0] <= a < mapping[1] or mapping[0] < a + v.nbytes <= mapping[1]:
                if not (msg[0] <= a and a + v.nbytes <= msg[1]):
                    raise Disallowed(f"array [{a:#x}, +{v.nbytes}) outside its message [{msg[0]:#x}, {msg[1]:#x})")
            v.tobytes()
    elif isinstance(v, dict):
        for k, x in v.items():
            _walk(k, mapping, msg, depth + 1)
            _walk(x, mapping, msg, depth + 1)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _walk(x, mapping, msg, depth + 1)


def read_back(path: str, owners_touched: bool) -> str:
    """Attach to the (corrupt) ring at ``path`` and read it to the end.  Returns
    the outcome's name; raises Disallowed for anything the contract forbids."""
    try:
        ring = shmring.Ring.attach(path=path)
    except shmring.CorruptSegmentError:
        return "attach:CorruptSegmentError"
    except Exception as e:
        raise Disallowed(f"attach raised {type(e).__name__}: {e}") from e
    try:
        return _consume(ring, owners_touched) + "/" + _produce(ring, owners_touched)
    finally:
        ring.close()


def _consume(ring, owners_touched):
    try:
        c = ring.consumer()
    except shmring.CorruptSegmentError:
        return "consumer:CorruptSegmentError"
    except shmring.RoleTaken:
        if owners_touched:
            return "consumer:RoleTaken"
        raise Disallowed("RoleTaken although no owner word was touched")
    except Exception as e:
        raise Disallowed(f"consumer() raised {type(e).__name__}: {e}") from e
    try:
        return _drain(ring, c, owners_touched)
    finally:
        c.close()


def _drain(ring, c, owners_touched):
    """Receive with consumer ``c`` until an allowed end; check every message's views."""
    base = np.frombuffer(ring._seg.buf, np.uint8)
    base_addr = base.__array_interface__["data"][0]
    mapping = (base_addr, base_addr + base.nbytes)
    del base
    for _ in range(MAX_READS):
        try:
            m = c.recv(timeout=0)
        except ALLOWED_END as e:
            return "recv:" + type(e).__name__
        except shmring.PeerGone:
            if owners_touched:                       # the producer's owner word now names a dead pid
                return "recv:PeerGone"
            raise Disallowed("PeerGone although no owner word was touched")
        except Exception as e:
            raise Disallowed(f"recv raised {type(e).__name__}: {e}") from e
        if m.kind not in ("bytes", "array", "object") or m.nbytes > ring.max_message:
            raise Disallowed(f"impossible message {m!r}")
        check_message(m, mapping, (base_addr + m._offset, base_addr + m._offset + m.nbytes))
    raise Disallowed(f"more than {MAX_READS} messages from a {CAP}-byte ring")


def check_message(m, mapping, msg) -> None:
    """Read a received message every way (value, copy, tobytes), checking its views
    lie inside ``msg`` within ``mapping``; then release it.  Disallowed otherwise."""
    try:
        for how in ("value", "copy"):
            try:
                v = m.value if how == "value" else m.copy()
            except shmring.CorruptSegmentError:
                continue
            _walk(v, mapping if how == "value" else (0, 0), msg)   # copies live elsewhere
            del v
        if len(m.tobytes()) != m.nbytes:
            raise Disallowed("tobytes() length differs from nbytes")
        m.release()
    except Disallowed:
        raise
    except Exception as e:
        raise Disallowed(f"reading {m!r} raised {type(e).__name__}: {e}") from e


def _produce(ring, owners_touched):
    try:
        p = ring.producer()
    except (shmring.CorruptSegmentError, shmring.HandleClosed) as e:
        return "producer:" + type(e).__name__
    except shmring.RoleTaken:
        if owners_touched:
            return "producer:RoleTaken"
        raise Disallowed("RoleTaken although no owner word was touched")
    except Exception as e:
        raise Disallowed(f"producer() raised {type(e).__name__}: {e}") from e
    try:
        for data in (b"x" * 100, np.arange(10)):
            try:
                p.try_send(data)
            except shmring.CorruptSegmentError:
                return "send:CorruptSegmentError"
            except Exception as e:
                raise Disallowed(f"try_send raised {type(e).__name__}: {e}") from e
        return "send:ok"
    finally:
        p.detach()


WEIRD_DTYPES = ["<i4", "|u1", ">f8", "|V0", "<U0", "|S0", "O", "|O", "<M8[xx]", "V99999999999", "<f16",
                [["a", "<i4"]], [["", "|V4"]], [["a", "O"]], [[1, 2, 3, 4]], [], 5, None, b"<i4", "i4,i4",
                {"base": "<i4", "shape": [2 ** 40]}, {"base": "<U0", "shape": [3]}, {"base": {"base": "u1"}},
                {"names": ["a"], "formats": ["<U0"], "offsets": [0], "itemsize": 0},
                {"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [0, 2 ** 62], "itemsize": 8},
                {"names": ["a", "a"], "formats": ["<i4", "<i4"], "offsets": [0, 4], "itemsize": 8},
                {"names": [], "formats": [], "offsets": [], "itemsize": 2 ** 40},
                {"names": ["a"], "formats": ["O"], "offsets": [0], "itemsize": 8},
                {"names": [1], "formats": [None], "offsets": ["x"], "itemsize": -1},
                {"names": ["a"], "formats": ["<f8"], "offsets": [0], "itemsize": 8, "titles": [["t"]]}]
WEIRD_SHAPES = [[], [0], [1], [3, 4], [2 ** 62], [2 ** 61, 2 ** 61], [-1], [1] * 65, "x", [2 ** 61] * 3, [2, "a"]]


def random_round(rng: random.Random, snap: bytes, regs: dict, path: str) -> str:
    """One random corruption and read-back (used by the child-process round)."""
    buf = bytearray(snap)
    touched = False
    for _ in range(rng.randrange(1, 5)):
        if rng.random() < 0.2:
            desc = [rng.choice(WEIRD_DTYPES), rng.choice(WEIRD_SHAPES), rng.choice(["C", "F", "Z", 1]),
                    rng.choice([0, 64, -64, 1, 2 ** 40]), rng.choice([0, 8, 12, 48, -8, 2 ** 64 - 1])]
            replace_meta(buf, snap, rng.randrange(1000), desc[:rng.choice([5, 5, 4, 6])],
                         rng.choice([1, 1, 0, 2, 2 ** 32 - 1]), rng.random() < 0.5)
            continue
        region = rng.choice(sorted(regs))
        touched |= region == "owners"
        value = rng.choice(INTERESTING) if rng.random() < 0.5 else rng.getrandbits(64)
        apply(buf, regs, region, rng.randrange(10 ** 6), rng.choice([1, 2, 4, 8]), value, rng.random() < 0.2)
    with open(path, "wb") as f:
        f.write(buf)
    return read_back(path, touched)


def live_round(snap: bytes, path: str, side: str, first: int, muts) -> str:
    """Corrupt a ring *while* a role is attached and has cached positions.

    ``side == "consumer"``: a consumer receives and releases ``first`` messages,
    then ``muts`` are applied to the live mapping, then it reads on to the end.
    ``side == "producer"``: a producer (whose cached read position is now
    stale) is attached, the mapping is corrupted, it tries to send ``first``
    more messages, then a fresh consumer reads everything back.  Returns the
    outcome; raises Disallowed for anything the contract forbids."""
    with open(path, "wb") as f:
        f.write(snap)
    regs = regions(snap)
    ring = shmring.Ring.attach(path=path)
    try:
        live = ring._seg.buf
        if side == "consumer":
            c = ring.consumer()
            try:
                for _ in range(first):
                    try:
                        c.recv(timeout=0).release()
                    except (shmring.EndOfStream, shmring.Timeout):
                        break
                for region, index, width, value, relative in muts:
                    _apply_live(live, regs, region, index, width, value, relative)
                return "live-consumer:" + _drain(ring, c, any(m[0] == "owners" for m in muts))
            finally:
                c.close()
        try:
            p = ring.producer()
        except shmring.HandleClosed:
            return "live-producer:HandleClosed"
        try:
            for region, index, width, value, relative in muts:
                _apply_live(live, regs, region, index, width, value, relative)
            sent = 0
            for i in range(first):
                try:
                    sent += bool(p.try_send(b"%d" % i * (i % 50)))
                except shmring.CorruptSegmentError:
                    break
                except Exception as e:
                    raise Disallowed(f"try_send on a live corrupted ring raised {type(e).__name__}: {e}") from e
        finally:
            p.detach()
        return f"live-producer:{sent}/" + _consume(ring, any(m[0] == "owners" for m in muts))
    finally:
        ring.close()


def _apply_live(live, regs, region, index, width, value, relative):
    """apply() on a live mapping (through a bytearray copy of the spot's 8 bytes)."""
    spans = [s for s in regs[region] if s[1] > 0]
    if not spans:
        return
    scratch = bytearray(len(live))
    scratch[:] = live[:]
    apply(scratch, regs, region, index, width, value, relative)
    for off, length in spans:                  # copy back only what apply() may have changed
        live[off:off + length] = scratch[off:off + length]


def limit_address_space(extra: int = 1 << 30) -> None:
    """Cap this process's address space a little above what it uses, so that a
    giant allocation provoked by a corrupt length fails loudly (MemoryError, a
    Disallowed outcome) instead of quietly succeeding on a large machine."""
    import resource
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, resource.RLIM_INFINITY))


def child_rounds(seed: int, rounds: int) -> None:
    """Process target: many random rounds under a capped address space; raises
    (exit code 1) on a disallowed outcome."""
    limit_address_space()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fuzz.ring")
        for eos in (True, False):
            snap = build_snapshot(eos)
            regs = regions(snap)
            for _ in range(rounds):
                random_round(rng, snap, regs, path)
