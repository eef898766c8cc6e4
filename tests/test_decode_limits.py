"""Decode limits: a received msgpack object never costs the reader more than
``DECODE_FACTOR`` x its meta's size + ``DECODE_SLACK`` bytes of Python
objects, nor nests deeper than ``MAX_DEPTH``; past that it is ``DecodeLimit``
(a ``ValueError``) naming the limit, not a memory blow-up.  The cost is told
before decoding by a C walk of the encoding whose per-object costs are
checked here against tracemalloc.
"""
import os
import resource
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest

import shmring
from shmring import _core, codec
from shmring import layout as L

META = 16 << 20                          # a 16 MiB meta
DATA = L.HEADER_SIZE + 8                 # the first record's payload in a fresh spsc ring


def _hostile(kind, n):
    """``n`` bytes of legal msgpack that decode into something expensive."""
    if kind == "nested":
        return b"\x91" * (n - 1) + b"\xc0"
    item = {"empty-lists": b"\x90", "empty-maps": b"\x80", "negative-ints": b"\xe0"}[kind]
    return b"\xdd" + struct.pack(">I", n - 5) + item * (n - 5)


def _plant(ring, prod, meta_len, meta):
    """Send an object whose meta is ``meta_len`` bytes, then overwrite its meta with ``meta``."""
    head = 1 + (5 if meta_len - 6 >= 1 << 16 else 3)  # 0x91, then bin16 / bin32 and its length
    prod.send([b"\0" * (meta_len - head)])
    assert struct.unpack_from("<I", ring._seg.buf, DATA)[0] == meta_len
    ring._seg.buf[DATA + 8:DATA + 8 + meta_len] = meta


def _decode_in_child(name, cap_bytes):
    """Fork a reader capped to ``cap_bytes`` more address space; it receives
    and decodes one message.  Returns (outcome, max RSS growth in bytes)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out = "?"
        try:
            os.close(r)
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (vm + cap_bytes, resource.RLIM_INFINITY))
            ring = shmring.Ring.attach(name)
            cons = ring.consumer()
            msg = cons.recv(timeout=5)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                msg.value
                out = "decoded"
            except getattr(shmring, "DecodeLimit", ()) as e:
                out = f"DecodeLimit|{isinstance(e, ValueError)}|{e}"
            except BaseException as e:
                out = f"{type(e).__name__}|{e}"
            grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
            out = f"{grew}|{out}"
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    grew, outcome = out.split("|", 1)
    return outcome, int(grew)


@pytest.mark.parametrize("kind", ["empty-lists", "empty-maps", "negative-ints", "nested"])
def test_a_hostile_16_mib_message_is_a_clear_error_and_costs_the_reader_little(ring_name, kind):
    with shmring.Ring.create(ring_name, 1 << 26) as ring, ring.producer() as prod:
        _plant(ring, prod, META, _hostile(kind, META))
        outcome, grew = _decode_in_child(ring_name, 512 << 20)
    assert outcome.startswith("DecodeLimit|True|"), outcome
    assert grew < 2 * META, f"the reader grew by {grew:,} bytes"       # the meta's copy, nothing more
    if kind == "nested":
        assert f"deeper than {codec.MAX_DEPTH}" in outcome
    else:
        limit = codec.DECODE_FACTOR * META + codec.DECODE_SLACK
        assert f"{limit:,}" in outcome and f"{META:,}-byte" in outcome, outcome


def test_a_short_deeply_nested_message_is_a_decode_limit_error_too(ring_name):
    n = 4096
    with shmring.Ring.create(ring_name, 1 << 16) as ring, ring.producer() as prod, ring.consumer() as cons:
        _plant(ring, prod, n, _hostile("nested", n))
        with cons.recv(timeout=5) as msg:
            with pytest.raises(shmring.DecodeLimit, match=f"deeper than {codec.MAX_DEPTH}"):
                msg.value


def test_an_object_over_the_decode_limit_is_refused_at_send(ring_name):
    with shmring.Ring.create(ring_name, 1 << 24) as ring, ring.producer() as prod:
        with pytest.raises(shmring.DecodeLimit, match="would cost a reader"):
            prod.send([[]] * (2 << 20))
        assert ring.stats()["write_pos"] == 0                # nothing was sent


def test_a_large_legit_message_still_decodes(ring_name):
    value = {"ids": list(range(300_000)), "names": [f"item-{i}" for i in range(50_000)],
             "rows": [{"x": i, "y": i / 2} for i in range(5_000)], "arr": np.arange(10.0)}
    with shmring.Ring.create(ring_name, 1 << 24) as ring, ring.producer() as prod, ring.consumer() as cons:
        prod.send(value)
        with cons.recv(timeout=5) as msg:
            got = msg.value
            assert got["ids"] == value["ids"] and got["names"] == value["names"] and got["rows"] == value["rows"]
            assert got["arr"].tolist() == value["arr"].tolist()
            del got


SHAPES = {
    "nils": [None] * 50_000, "small-ints": list(range(200)) * 250, "ints": list(range(1000, 51_000)),
    "negative-ints": [-20] * 50_000, "big-ints": [2 ** 63 + i for i in range(20_000)],
    "floats": [i / 3 for i in range(50_000)], "ascii": [f"s{i}" for i in range(30_000)],
    "wide-unicode": ["\U0001f600" + "a" * (i % 40) for i in range(10_000)],
    "bins": [bytes([i % 256]) * (i % 9) for i in range(30_000)], "empty-lists": [[]] * 50_000,
    "short-lists": [[i, None] for i in range(30_000)], "empty-maps": [{}] * 30_000,
    "one-key-maps": [{"k": i} for i in range(30_000)], "wide-map": {f"k{i}": i for i in range(30_000)},
    "nested": [[[[[i]]]] for i in range(10_000)], "ext": [msgpack.ExtType(5, b"ab")] * 20_000,
    "arrays": [np.zeros(2, np.float32)] * 2_000,
}


def _peak(fn):
    fn()                                                  # warm caches (interned keys, dtypes)
    tracemalloc.start()
    try:
        value = fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        del value


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_cost_estimate_bounds_what_decoding_really_costs(ring_name, shape):
    if shape == "arrays":
        meta = codec.encode(SHAPES[shape]).meta
    else:                                                 # (encode() would refuse the costliest shapes)
        meta = msgpack.packb(SHAPES[shape], use_bin_type=True)
    cost, depth = _core.msgpack_cost(meta, 1 << 62, codec.MAX_DEPTH)
    if shape == "arrays":                                 # arrays: decoded from a ring, as views
        with shmring.Ring.create(ring_name, 1 << 20) as ring, ring.producer() as p, ring.consumer() as c:
            p.send(SHAPES[shape])
            with c.recv(timeout=5) as msg:
                peak = _peak(lambda: msg.value)
    else:
        peak = _peak(lambda: msgpack.unpackb(meta, raw=False, strict_map_key=False,
                                             ext_hook=lambda c, d: msgpack.ExtType(c, d)))
    assert peak <= cost, f"{shape}: decoding took {peak:,} bytes, estimated {cost:,}"
    assert cost <= 8 * peak + 4096, f"{shape}: the estimate {cost:,} is far above the {peak:,} bytes it took"
    print(f"{shape}: {len(meta):,} bytes, estimated {cost:,}, took {peak:,}")


def test_small_metas_are_not_scanned_and_cannot_exceed_the_slack():
    assert codec.SCAN_ABOVE * _core.MSGPACK_MAX_COST_PER_BYTE <= codec.DECODE_SLACK
    for kind in ("empty-lists", "empty-maps"):
        meta = _hostile(kind, codec.SCAN_ABOVE)
        cost, _ = _core.msgpack_cost(meta, 1 << 62, codec.MAX_DEPTH)
        assert cost <= codec.DECODE_SLACK


@pytest.mark.parametrize("meta", [b"", b"\xc1", b"\xdd\xff\xff\xff\xff\xc0", b"\x92\xc0", b"\xc6\x00\x00\x00\x09ab"])
def test_malformed_metas_are_value_errors_of_the_scan(meta):
    with pytest.raises(ValueError, match="malformed msgpack"):
        _core.msgpack_cost(meta, 1 << 62, codec.MAX_DEPTH)
