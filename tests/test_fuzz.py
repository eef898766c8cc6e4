"""A corrupt segment yields valid messages or CorruptSegmentError: never a crash,
a hang, an out-of-bounds view, or another exception type.

The random part (hypothesis) hits the cursor lines, role and wake words, record
headers, payload metas (raw bytes and well-formed but lying descriptors), and
payload bytes; the targeted tests pin down individual checks.
"""
import os
import struct
import tempfile

import multiprocess
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmring
from shmring import layout as L

import _fuzzing as F

# CI runs a fixed budget; SHMRING_FUZZ_EXAMPLES=100000 (for example) runs a long one.
EXAMPLES = int(os.environ.get("SHMRING_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(deadline=None, max_examples=EXAMPLES, suppress_health_check=list(HealthCheck))


class Corpus:
    def __init__(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "fuzz.ring")
        self.snaps = {eos: F.build_snapshot(eos) for eos in (True, False)}
        self.regs = {eos: F.regions(s) for eos, s in self.snaps.items()}

    def write(self, buf):
        with open(self.path, "wb") as f:
            f.write(buf)
        return self.path


@pytest.fixture(scope="module")
def corpus():
    c = Corpus()
    yield c
    c.dir.cleanup()


def test_the_snapshot_is_a_rich_valid_ring(corpus):
    """The fuzz tests start from a ring worth corrupting: pending messages of every
    kind, one crossing the end of the data area (R60), wrapped positions; read
    intact, it is all valid."""
    for eos, snap in corpus.snaps.items():
        recs = F.records(snap)
        types = {t for _, _, t in recs}
        assert {L.T_BYTES, L.T_ARRAY, L.T_OBJECT} <= types and L.T_PAD not in types
        assert any(pos % F.CAP + L.record_size(n) > F.CAP for pos, n, _ in recs)   # one runs over the wrap
        assert len(recs) >= 20
        assert L.read_u64(snap, L.OFF_READ_POS) > 4 * F.CAP
        outcome = F.read_back(corpus.write(snap), owners_touched=False)
        assert outcome == ("recv:EndOfStream/producer:HandleClosed" if eos else "recv:Timeout/send:ok")


mutations = st.lists(st.tuples(
    st.sampled_from(["cursors", "owners", "wake", "record_headers", "metas", "payloads", "fixed_header"]),
    st.integers(0, 10 ** 6),
    st.sampled_from([1, 2, 4, 8]),
    st.one_of(st.sampled_from(F.INTERESTING), st.integers(0, 2 ** 64 - 1)),
    st.booleans(),
), min_size=1, max_size=4)


@FUZZ
@given(eos=st.booleans(), muts=mutations)
def test_corrupted_bytes_anywhere_that_matters_give_valid_messages_or_corrupt_segment_error(corpus, eos, muts):
    buf = bytearray(corpus.snaps[eos])
    for region, index, width, value, relative in muts:
        F.apply(buf, corpus.regs[eos], region, index, width, value, relative)
    F.read_back(corpus.write(buf), owners_touched=any(m[0] == "owners" for m in muts))


@FUZZ
@given(eos=st.booleans(), muts=st.lists(st.tuples(
    st.sampled_from(["cursors", "record_headers"]), st.integers(0, 10 ** 6),
    st.sampled_from([4, 8]), st.integers(-3 * F.CAP, 3 * F.CAP).map(lambda v: v & ~7 if v % 3 else v),
), min_size=1, max_size=3))
def test_plausible_shifts_of_positions_and_lengths_are_caught(corpus, eos, muts):
    """Small, aligned changes are the hard cases: they look almost right."""
    buf = bytearray(corpus.snaps[eos])
    for region, index, width, delta in muts:
        F.apply(buf, corpus.regs[eos], region, index, width, delta, True)
    F.read_back(corpus.write(buf), owners_touched=False)


descriptors = st.lists(st.one_of(
    st.sampled_from(F.WEIRD_DTYPES),
    st.lists(st.one_of(st.integers(-2 ** 63, 2 ** 64 - 1), st.sampled_from([0, 1, 2, 2 ** 61, 2 ** 62])), max_size=6),
    st.sampled_from(["C", "F", "K", "", 0]),
    st.integers(-2 ** 63, 2 ** 64 - 1), st.sampled_from([0, 64, 128, 8, 12, 4096, 2 ** 40]),
    st.none(), st.text(max_size=5), st.binary(max_size=5),
), min_size=0, max_size=7)


@FUZZ
@given(eos=st.booleans(), index=st.integers(0, 1000), desc=descriptors,
       narrays=st.sampled_from([0, 1, 2, 3, 2 ** 32 - 1]), as_object=st.booleans())
def test_lying_array_descriptors_give_valid_arrays_inside_the_message_or_corrupt_segment_error(
        corpus, eos, index, desc, narrays, as_object):
    buf = bytearray(corpus.snaps[eos])
    F.replace_meta(buf, corpus.snaps[eos], index, desc, narrays, as_object)
    F.read_back(corpus.write(buf), owners_touched=False)


@FUZZ
@given(eos=st.booleans(), index=st.integers(0, 1000),
       dtype=st.sampled_from(["<i4", "|u1", ">f8", "<c16", "|V0", "<U0", "|S0", "|b1", "<M8[ns]"]),
       shape=st.lists(st.integers(0, 300), max_size=4),
       order=st.sampled_from(["C", "F"]), off=st.sampled_from([0, 64, 128, 192, 4096]),
       as_object=st.booleans())
def test_well_formed_descriptors_with_wrong_sizes_or_offsets_are_caught(corpus, eos, index, dtype, shape, order,
                                                                       off, as_object):
    """Structurally valid descriptors whose numbers do not fit the payload."""
    nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    buf = bytearray(corpus.snaps[eos])
    F.replace_meta(buf, corpus.snaps[eos], index, [dtype, shape, order, off, nbytes], 1, as_object)
    F.read_back(corpus.write(buf), owners_touched=False)


def test_many_random_corruptions_in_a_child_process_never_crash_it():
    """A segfault would kill pytest; here it shows as a clean non-zero exit code."""
    ctx = multiprocess.get_context("fork")
    p = ctx.Process(target=F.child_rounds, args=(20240601, 3 * EXAMPLES))
    p.start()
    p.join(300 * max(1, EXAMPLES // 1000))
    assert not p.is_alive(), "the fuzz child hung"
    assert p.exitcode == 0, f"the fuzz child died or found a disallowed outcome: exit code {p.exitcode}"


@FUZZ
@given(eos=st.booleans(), side=st.sampled_from(["consumer", "producer"]), first=st.integers(0, 30),
       muts=mutations.filter(lambda ms: all(m[0] != "fixed_header" for m in ms)))
def test_corrupting_a_live_ring_under_an_attached_role_with_cached_positions_is_caught(corpus, eos, side, first, muts):
    """The role was validated at attach and caches the other side's position;
    corruption arriving afterwards must still end in valid messages or
    CorruptSegmentError (fixed header fields are read once at attach, see
    test_corrupting_the_header_after_attach_cannot_widen_the_bounds)."""
    F.live_round(corpus.snaps[eos], corpus.path, side, first, muts)


# --------------------------------------------------------------------------- targeted corruptions

@pytest.fixture
def damaged(tmp_path):
    """Write a ring, apply edits [(offset, struct format, value)], return its path."""
    def make(edits, messages=(b"m0" * 20, np.arange(6), {"k": 1}), eos=True):
        path = tmp_path / "d.ring"
        if path.exists():
            path.unlink()
        with shmring.Ring.create(path=path, capacity=F.CAP) as ring, ring.producer() as p:
            for m in messages:
                p.send(m)
            if not eos:
                p.detach()
        with open(path, "r+b") as f:
            for off, fmt, value in edits:
                f.seek(off)
                f.write(struct.pack(fmt, value))
        return path
    return make


REC0 = L.HEADER_SIZE                    # the first record's header (positions start at 0)


@pytest.mark.parametrize("edits,match", [
    ([(L.OFF_WRITE_POS, "<Q", F.CAP + 64)], "positions out of order"),
    ([(L.OFF_WRITE_POS, "<Q", 44)], "positions out of order"),                 # not 8-aligned
    ([(L.OFF_READ_POS, "<Q", 4096)], "positions out of order"),                # beyond write_pos
    ([(L.OFF_READ_POS, "<Q", 3)], "positions out of order"),
], ids=["write-beyond-capacity", "write-unaligned", "read-beyond-write", "read-unaligned"])
def test_impossible_positions_are_refused_when_taking_a_role(damaged, edits, match):
    path = damaged(edits)
    with shmring.Ring.attach(path=path) as ring:
        with pytest.raises(shmring.CorruptSegmentError, match=match):
            ring.consumer()


@pytest.mark.parametrize("edits,match", [
    ([(REC0, "<I", F.CAP)], "record length out of bounds"),
    ([(REC0, "<I", 2 ** 32 - 1)], "record length out of bounds"),
    ([(REC0 + 4, "<H", 9)], "unknown record type"),
    ([(REC0 + 4, "<H", L.T_PAD)], "unknown record type"),      # layout 2's padding: never written now (R60)
    ([(REC0, "<I", 1000)], "record length out of bounds"),          # beyond what was published
], ids=["len-capacity", "len-max", "type-unknown", "old-padding", "len-past-write-pos"])
def test_impossible_record_headers_are_corrupt_segment_errors(damaged, edits, match):
    path = damaged(edits)
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        with pytest.raises(shmring.CorruptSegmentError, match=match):
            c.recv(timeout=0)


@pytest.mark.parametrize("meta_len,narrays,match", [
    (10_000, 1, "overruns"), (2 ** 32 - 1, 1, "overruns"), (0, 1, "undecodable meta"), (3, 7, "announces 7 arrays"),
])
def test_impossible_array_prefix_is_a_corrupt_segment_error_on_value_and_the_message_can_still_be_released(
        damaged, meta_len, narrays, match):
    pos = L.record_size(40)                      # the array message follows the 40-byte bytes message
    off = L.HEADER_SIZE + pos + L.REC_HDR
    path = damaged([(off, "<I", meta_len), (off + 4, "<I", narrays)])
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        c.recv_bytes()
        with c.recv(timeout=0) as m:
            assert m.kind == "array"
            for get in (lambda: m.value, m.copy):
                with pytest.raises(shmring.CorruptSegmentError, match=match):
                    get()
        assert c.recv(copy=True) == {"k": 1}               # the stream goes on after it
        with pytest.raises(shmring.EndOfStream):
            c.recv(timeout=0)


@pytest.mark.parametrize("dtype", ["<U0", "|S0"])
def test_a_sizeless_string_descriptor_cannot_make_the_reader_allocate_a_huge_array(damaged, dtype):
    # count * itemsize == nbytes holds with itemsize 0, but numpy turns U0/S0 into
    # U1/S1 when it allocates: 10**4 x 10**4 elements make 400 MB (or 100 MB).
    pos = L.record_size(40)
    import msgpack
    meta = msgpack.packb([dtype, [10 ** 4, 10 ** 4], "C", 0, 0])
    off = L.HEADER_SIZE + pos + L.REC_HDR
    path = damaged([(off, "<I", len(meta)), (off + 4, "<I", 1)] +
                   [(off + 8 + i, "<B", b) for i, b in enumerate(meta)],
                   messages=(b"m0" * 20, np.arange(16)))
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        c.recv_bytes()
        with c.recv(timeout=0) as m:
            for get in (lambda: m.value, m.copy):
                try:
                    v = get()
                except shmring.CorruptSegmentError:
                    continue
                assert v.nbytes <= m.nbytes, f"{m.nbytes}-byte message decoded to {v.nbytes} bytes"
                del v


def test_an_unknown_producer_status_word_is_corruption_not_a_peer_error(damaged):
    # `closed` is 0 (open), 1 (end of stream) or 2 (aborted); any other value can
    # only come from a corrupt segment and must be reported as such.
    path = damaged([(L.OFF_PROD_ROLE + L.ROLE_CLOSED, "<I", 7)], messages=[b"one"])
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        assert c.recv_bytes() == b"one"
        with pytest.raises(shmring.CorruptSegmentError):
            c.recv(timeout=0)


def test_corrupting_the_header_after_attach_cannot_widen_the_bounds(ring_name):
    with shmring.Ring.create(ring_name, F.CAP) as ring, ring.producer() as p, ring.consumer() as c:
        p.send(b"before")
        ring._region.store_u64(L.OFF_CAPACITY, 1 << 30)   # the header lies from now on
        p.send(b"after")
        assert c.recv_bytes() == b"before" and c.recv_bytes() == b"after"
        ring._region.store_u64(L.OFF_WRITE_POS, F.CAP * 2)   # published more than capacity
        with pytest.raises(shmring.CorruptSegmentError, match="producer position out of range"):
            c.recv(timeout=0)
