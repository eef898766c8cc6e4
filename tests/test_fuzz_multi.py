"""A corrupt multi-party ring (mpsc, broadcast, mpmc) or record ring yields valid
messages or a typed, explainable shmring error: never a crash, a hang, an
out-of-bounds view, or another exception type.  (test_fuzz.py does the same
for spsc rings; the engine is _fuzzing_multi.py.)

The random part (hypothesis, in-process under a hang watchdog) hits the
cursor / release / take / newest words, the producer and consumer tables, the
producers line and counters, record stamps and fields (and records forged
with the right stamp where none should be), metas, payloads and the header;
a child process runs random rounds of every kind under a capped address
space and a timeout.  The targeted tests pin down individual checks, among
them the reproducers of the bugs this fuzzer found (fixed; while a new one is
open, _fuzzing_multi.KNOWN_BUGS lets the random rounds count it as
"known:<name>" and go on; SHMRING_FUZZ_STRICT=1 makes them fail).
"""
import os
import struct

import multiprocess
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmring
from shmring import layout as L

import _fuzzing_multi as M

# CI runs a fixed budget; SHMRING_FUZZ_EXAMPLES=20000 (for example) runs a long one.
EXAMPLES = int(os.environ.get("SHMRING_FUZZ_EXAMPLES", "300"))
FUZZ = settings(deadline=None, max_examples=EXAMPLES, suppress_health_check=list(HealthCheck))
HALF = settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
CAP = M.CAP


class Corpus:
    def __init__(self, tmp):
        self.path = os.path.join(tmp, "fuzz.ring")
        self.snaps = {(k, eos): M.build_snapshot(k, eos) for k in M.KINDS for eos in (True, False)}
        self.regs = {key: M.regions(s) for key, s in self.snaps.items()}
        self.rsnaps = {eos: M.build_record_snapshot(eos) for eos in (True, False)}
        self.rregs = {eos: M.record_regions(s) for eos, s in self.rsnaps.items()}

    def write(self, buf):
        with open(self.path, "wb") as f:
            f.write(buf)
        return self.path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return Corpus(str(tmp_path_factory.mktemp("fuzz_multi")))


@pytest.fixture(scope="module", autouse=True)
def hang_reports_reach_the_terminal(request):
    """A read-back that hangs makes the watchdog dump every traceback and exit
    the process: send the dump where pytest's own fault handler writes (the
    terminal), not to the captured stderr."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key
        M.HANG_FILE = request.config.stash[fault_handler_stderr_fd_key]
    except Exception:
        pass
    yield
    M.HANG_FILE = None


def expected_messages(kind, snap):
    """Messages a new consumer (subscriber) gets from an intact snapshot."""
    recs = M.records(snap)
    if kind == "mpmc":
        take = L.read_u64(snap, L.MP_OFF_TAKE)
        return sum(t in (L.T_BYTES, L.T_ARRAY, L.T_OBJECT) and (s == L.RS_REQUEUED or (s == 0 and p >= take))
                   for p, _, t, s in recs)
    return sum(t in (L.T_BYTES, L.T_ARRAY, L.T_OBJECT) for _, _, t, _ in recs)


@pytest.mark.parametrize("kind", M.KINDS)
def test_the_snapshots_are_rich_valid_rings(corpus, kind):
    """The fuzz tests start from rings worth corrupting: pending messages of every
    type with skip records among them, one crossing the end of the data area
    (R60), wrapped positions, (mpmc)
    records released out of order, held by a live consumer, and requeued; read
    intact, everything is valid and the stream ends as it should."""
    for eos in (True, False):
        snap = corpus.snaps[kind, eos]
        recs = M.records(snap)
        assert {L.T_BYTES, L.T_ARRAY, L.T_OBJECT, L.T_SKIP} <= {t for _, _, t, _ in recs}
        assert L.T_PAD not in {t for _, _, t, _ in recs}
        assert any(pos % CAP + L.align(L.MREC_HDR + n, 16) > CAP for pos, n, _, _ in recs)   # over the wrap
        n = expected_messages(kind, snap)
        assert 20 <= n <= 60
        assert L.read_u64(snap, L.MP_OFF_RELEASE) > 4 * CAP
        if kind == "mpmc":
            states = {s for _, _, t, s in recs if t != L.T_SKIP}
            assert {0, 1, L.RS_REQUEUED, L.RS_RELEASED} <= states
        out = M.read_back(corpus.write(snap), kind).split("/")
        assert out[0] == f"recv:{n}:" + ("EndOfStream" if eos else "Timeout")
        if kind == "broadcast":
            assert out[1] == "recv:1:" + ("EndOfStream" if eos else "Timeout")      # joined at the newest
        if eos:
            assert out[-1] == "producer:HandleClosed"
        else:
            assert out[-1].startswith("send:") and out[-1].endswith(":Timeout") and int(out[-1].split(":")[1]) >= 3


def test_the_record_snapshot_is_a_rich_valid_ring(corpus):
    for eos in (True, False):
        snap = corpus.rsnaps[eos]
        slots = L.RC_STRUCT.unpack_from(snap, L.RC_OFF_ITEMSIZE)[1]
        wp, rp = L.read_u64(snap, L.OFF_WRITE_POS), L.read_u64(snap, L.OFF_READ_POS)
        assert rp > 2 * slots and slots // 2 < wp - rp < slots and wp % slots < rp % slots    # pending, wrapped
        out = M.record_read_back(corpus.write(snap))
        assert out == f"recv:{wp - rp}:" + ("EndOfStream/producer:HandleClosed" if eos else "Timeout/send:10")


# --------------------------------------------------------------------------- random corruption

VALUES = st.one_of(st.sampled_from(M.INTERESTING + [16, CAP - 16, L.POS_HOLD, L.POS_EVICTED, L.INTENT_BIT,
                                                    L.RS_REQUEUED, L.RS_RELEASED, L.T_SKIP, L.MP_MAX_PARTIES]),
                   st.integers(0, 2 ** 64 - 1))


def plain(regions):
    return st.tuples(st.sampled_from(regions), st.integers(0, 10 ** 6), st.sampled_from([1, 2, 4, 8]), VALUES,
                     st.booleans())


forged = st.tuples(st.just("forge"), st.integers(0, 1000), st.integers(0, 15),
                   st.one_of(st.sampled_from(M.FORGE_LENGTHS), st.integers(0, 2 ** 32 - 1)),
                   st.sampled_from(M.FORGE_TYPES), st.sampled_from(M.FORGE_STATES))
mutations = st.lists(st.one_of(plain(M.REGION_NAMES), forged), min_size=1, max_size=4)
live_mutations = st.lists(st.one_of(plain(M.LIVE_REGIONS), forged), min_size=1, max_size=4)


@pytest.mark.parametrize("kind", M.KINDS)
@FUZZ
@given(eos=st.booleans(), muts=mutations, grace0=st.booleans(), as_bytes=st.booleans())
def test_corrupted_bytes_anywhere_that_matters_give_valid_messages_or_typed_errors(corpus, kind, eos, muts, grace0,
                                                                                  as_bytes):
    """grace0: the recovery paths (skip an abandoned claim, requeue what a dead
    consumer held) run at once, over the corrupt segment."""
    snap = corpus.snaps[kind, eos]
    buf = bytearray(snap)
    touched = M.mutate(buf, snap, corpus.regs[kind, eos], muts)
    M.read_back(corpus.write(buf), kind, touched, grace0=grace0, as_bytes=as_bytes)


@pytest.mark.parametrize("kind", M.KINDS)
@HALF
@given(eos=st.booleans(), muts=st.lists(st.tuples(
    st.sampled_from(["cursors", "rec_fields", "ctable", "stamps", "ptable"]), st.integers(0, 10 ** 6),
    st.sampled_from([4, 8]), st.integers(-3 * CAP, 3 * CAP).map(lambda v: v & ~15 if v % 3 else v),
), min_size=1, max_size=3), grace0=st.booleans())
def test_plausible_shifts_of_positions_and_lengths_are_caught(corpus, kind, eos, muts, grace0):
    """Small, aligned changes are the hard cases: they look almost right."""
    snap = corpus.snaps[kind, eos]
    buf = bytearray(snap)
    for region, index, width, delta in muts:
        M.apply(buf, corpus.regs[kind, eos], region, index, width, delta, True)
    M.read_back(corpus.write(buf), kind, {m[0] for m in muts}, grace0=grace0)


@pytest.mark.parametrize("kind", M.KINDS)
@HALF
@given(eos=st.booleans(), muts=st.lists(forged, min_size=1, max_size=3), grace0=st.booleans())
def test_records_forged_with_the_right_stamp_are_bounded_by_the_cursor_and_the_data_area(corpus, kind, eos, muts,
                                                                                         grace0):
    """The stamp key is in the segment, so a corrupt (or hostile) segment can
    commit any record anywhere: its length and type must still be checked."""
    snap = corpus.snaps[kind, eos]
    buf = bytearray(snap)
    touched = M.mutate(buf, snap, corpus.regs[kind, eos], muts)
    M.read_back(corpus.write(buf), kind, touched, grace0=grace0)


descriptors = st.lists(st.one_of(
    st.sampled_from(M.WEIRD_DTYPES),
    st.lists(st.one_of(st.integers(-2 ** 63, 2 ** 64 - 1), st.sampled_from([0, 1, 2, 2 ** 61, 2 ** 62])), max_size=6),
    st.sampled_from(["C", "F", "K", "", 0]),
    st.integers(-2 ** 63, 2 ** 64 - 1), st.sampled_from([0, 64, 128, 8, 12, 4096, 2 ** 40]),
    st.none(), st.text(max_size=5), st.binary(max_size=5),
), min_size=0, max_size=7)


@pytest.mark.parametrize("kind", M.KINDS)
@HALF
@given(eos=st.booleans(), index=st.integers(0, 1000), desc=descriptors,
       narrays=st.sampled_from([0, 1, 2, 3, 2 ** 32 - 1]), as_object=st.booleans())
def test_lying_array_descriptors_give_valid_arrays_inside_the_message_or_corrupt_segment_error(
        corpus, kind, eos, index, desc, narrays, as_object):
    snap = corpus.snaps[kind, eos]
    buf = bytearray(snap)
    M.replace_meta(buf, snap, index, desc, narrays, as_object)
    M.read_back(corpus.write(buf), kind)


@pytest.mark.parametrize("kind", M.KINDS)
@FUZZ
@given(eos=st.booleans(), side=st.sampled_from(["consumer", "producer"]), first=st.integers(0, 40),
       muts=live_mutations, grace0=st.booleans())
def test_corrupting_a_live_ring_under_attached_roles_is_caught(corpus, kind, eos, side, first, muts, grace0):
    """A role validated at attach caches positions and its table entry;
    corruption arriving afterwards (the header's geometry is read once at
    attach and excluded) must still end in valid messages or typed errors."""
    M.live_round(corpus.snaps[kind, eos], corpus.path, side, first, muts, grace0=grace0)


# --------------------------------------------------------------------------- record rings

record_mutations = st.lists(st.tuples(
    st.sampled_from(M.RECORD_REGIONS), st.integers(0, 10 ** 6), st.sampled_from([1, 2, 4, 8]),
    st.one_of(st.sampled_from(M.INTERESTING + [15, 546, 547]), st.integers(0, 2 ** 64 - 1)), st.booleans(),
), min_size=1, max_size=4)


@FUZZ
@given(eos=st.booleans(), muts=record_mutations)
def test_corrupted_record_rings_give_valid_batches_or_typed_errors(corpus, eos, muts):
    buf = bytearray(corpus.rsnaps[eos])
    for m in muts:
        M.apply(buf, corpus.rregs[eos], *m)
    M.record_read_back(corpus.write(buf), {m[0] for m in muts})


@HALF
@given(eos=st.booleans(), spec=st.one_of(st.sampled_from(M.RECORD_SPECS), st.sampled_from(M.WEIRD_DTYPES)),
       itemsize=st.one_of(st.none(), st.sampled_from([0, 1, 15, 16, CAP, CAP + 1, 2 ** 40, 2 ** 64 - 1])),
       slots=st.one_of(st.none(), st.sampled_from([0, 1, 2, 546, 547, CAP, 2 ** 63])),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_record_dtype_descriptions_that_lie_are_corrupt_segment_errors(corpus, eos, spec, itemsize, slots, raw):
    """None for itemsize / slots: consistent with the (new) dtype, so only the description is wrong."""
    buf = bytearray(corpus.rsnaps[eos])
    M.replace_record_dtype(buf, spec, itemsize, slots, raw)
    M.record_read_back(corpus.write(buf))


@HALF
@given(eos=st.booleans(), side=st.sampled_from(["consumer", "producer"]), first=st.integers(0, 30),
       muts=st.lists(st.tuples(st.sampled_from(M.RECORD_LIVE_REGIONS), st.integers(0, 10 ** 6),
                               st.sampled_from([1, 2, 4, 8]), VALUES, st.booleans()), min_size=1, max_size=3))
def test_corrupting_a_live_record_ring_is_caught(corpus, eos, side, first, muts):
    M.record_live_round(corpus.rsnaps[eos], corpus.path, side, first, muts)


# --------------------------------------------------------------------------- child process

def test_many_random_corruptions_of_every_kind_in_a_child_process_never_crash_it():
    """A segfault would kill pytest, a hang would stall it; here they show as a
    non-zero exit code or a timeout.  The child caps its address space, so a
    giant allocation provoked by a corrupt length fails loudly."""
    ctx = multiprocess.get_context("fork")
    rounds = max(20, EXAMPLES // 2)
    p = ctx.Process(target=M.child_rounds, args=(20240717, rounds))
    p.start()
    p.join(120 + rounds // 10)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail("the fuzz child hung")
    assert p.exitcode == 0, f"the fuzz child died or found a disallowed outcome: exit code {p.exitcode}"


# --------------------------------------------------------------------------- targeted corruptions

@pytest.fixture
def ring_file(tmp_path):
    """A file-backed ring of ``kind`` with messages sent (and the producer closed);
    returns (path, header)."""
    def make(kind, messages=(b"m0" * 20, np.arange(6), {"k": 1}), policy="block", close=True):
        path = tmp_path / f"{kind}.ring"
        if path.exists():
            path.unlink()
        kw = {} if kind == "mpsc" else {"max_consumers": 4}
        ring = shmring.Ring.create(path=path, capacity=CAP, kind=kind, policy=policy, **kw)
        p = ring.producer()
        for m in messages:
            p.send(m)
        if close:
            p.close()
        else:
            p.detach()
        h = dict(ring._header)
        ring.close()
        return path, h
    return make


def poke(path, edits):
    with open(path, "r+b") as f:
        for off, fmt, value in edits:
            f.seek(off)
            f.write(struct.pack(fmt, value))


@pytest.mark.parametrize("kind", M.KINDS)
@pytest.mark.parametrize("length,type_,match", [
    (CAP, L.T_BYTES, "bad record header"), (2 ** 32 - 1, L.T_BYTES, "bad record header"),
    (40, 9, "bad record header"), (40, L.T_PAD, "bad record header"), (1000, L.T_BYTES, "bad record header"),
    (CAP, L.T_SKIP, "bad record header"),
], ids=["len-capacity", "len-max", "type-unknown", "old-padding", "len-past-the-cursor", "skip-past-the-cursor"])
def test_impossible_record_headers_are_corrupt_segment_errors(ring_file, kind, length, type_, match):
    path, h = ring_file(kind)
    rec0 = h["data_offset"]                 # the first record (positions start at 0)
    poke(path, [(rec0 + 8, "<I", length), (rec0 + 12, "<H", type_)])
    with shmring.Ring.attach(path=path) as ring:
        c = ring.subscribe("oldest") if kind == "broadcast" else ring.consumer()
        with c, pytest.raises(shmring.CorruptSegmentError, match=match):
            c.recv(timeout=0)


@pytest.mark.parametrize("kind", M.KINDS)
def test_a_record_forged_beyond_the_claim_cursor_is_never_delivered(ring_file, kind):
    """The stamp of the next position is right (the key is in the segment), but
    nothing was claimed there: the consumer stops at the cursor."""
    path, h = ring_file(kind, close=False)
    with open(path, "rb") as f:
        snap = f.read()
    cur = L.read_u64(snap, L.MP_OFF_CURSOR)
    with open(path, "r+b") as f:
        f.seek(h["data_offset"] + cur)
        f.write(struct.pack("<QIHH", h["key"] ^ cur, 3, L.T_BYTES, 0) + b"abc")
    with shmring.Ring.attach(path=path) as ring:
        c = ring.subscribe("oldest") if kind == "broadcast" else ring.consumer()
        with c:
            got = [c.recv(copy=True, timeout=0) for _ in range(3)]
            assert got[0] == b"m0" * 20 and got[2] == {"k": 1}
            with pytest.raises(shmring.CorruptSegmentError, match="bad record header"):
                c.recv(timeout=0)


@pytest.mark.parametrize("word,value", [
    (L.MP_OFF_TAKE, 8), (L.MP_OFF_TAKE, 2 * CAP), (L.MP_OFF_CURSOR, 2 * CAP), (L.MP_OFF_TAKE, 2 ** 64 - 16),
], ids=["take-unaligned", "take-beyond-cursor", "cursor-beyond-capacity", "take-near-wrap"])
def test_impossible_mpmc_cursors_are_corrupt_segment_errors(ring_file, word, value):
    path, _ = ring_file("mpmc")
    poke(path, [(word, "<Q", value)])
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        with pytest.raises(shmring.CorruptSegmentError):
            for _ in range(4):
                c.recv(timeout=0).release()


def test_a_requeued_counter_that_lies_costs_a_bounded_scan(ring_file):
    """mpmc scans for requeued records while the counter is non-zero: a huge
    counter with nothing requeued must not loop or stall delivery."""
    path, _ = ring_file("mpmc")
    poke(path, [(L.MP_OFF_COUNTERS + L.MP_REQUEUED, "<Q", 2 ** 64 - 1)])
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        assert c.recv(copy=True, timeout=0) == b"m0" * 20
        assert c.recv(copy=True, timeout=0).tolist() == list(range(6))
        assert c.recv(copy=True, timeout=0) == {"k": 1}
        with pytest.raises(shmring.EndOfStream):
            c.recv(timeout=0)


@pytest.mark.parametrize("kind", ["mpsc", "mpmc"])
def test_dead_producers_counted_by_a_corrupt_line_end_the_stream_with_peer_gone(ring_file, kind):
    path, _ = ring_file(kind)
    poke(path, [(L.MP_OFF_PRODUCERS + L.MP_DEAD, "<Q", 1)])
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        for _ in range(3):
            c.recv(timeout=0).release()
        with pytest.raises(shmring.PeerGone, match="1 producer"):
            c.recv(timeout=0)


def test_an_unaligned_newest_word_is_refused_when_a_subscriber_joins(ring_file):
    path, _ = ring_file("broadcast")
    poke(path, [(L.MP_OFF_NEWEST, "<Q", 8)])
    with shmring.Ring.attach(path=path) as ring:
        with pytest.raises(shmring.CorruptSegmentError, match="not a record position"):
            ring.subscribe("newest")
        with ring.subscribe("oldest") as s:                  # the entry was given back; oldest is fine
            assert s.recv(copy=True, timeout=0) == b"m0" * 20


@pytest.mark.parametrize("kind", M.KINDS + ("records",))
@pytest.mark.parametrize("how", [0] + list(range(4, 11)))         # 1 to 3 are short too: attach waits 1 s
def test_a_truncated_or_extended_ring_file_is_refused_or_read_normally(corpus, kind, how):
    if kind == "records":
        out = M.record_read_back(corpus.write(M.resize(bytearray(corpus.rsnaps[False]), how)))
    else:
        out = M.read_back(corpus.write(M.resize(bytearray(corpus.snaps[kind, False]), how)), kind)
    # shorter than its header says: SegmentTruncated (a CorruptSegmentError), or what the header check finds first
    short = out.startswith(("attach:CorruptSegmentError", "attach:SegmentTruncated"))
    assert short if how < 9 else "Corrupt" not in out and "Truncated" not in out, out


# --------------------------------------------------------------------------- bugs this fuzzer found, fixed (their reproducers)

@pytest.mark.parametrize("start", ["oldest", "newest"])
@pytest.mark.parametrize("release", [L.POS_HOLD, L.POS_EVICTED, L.POS_FREE, L.POS_HOLD | 4096])
def test_a_release_word_with_flag_bits_is_corruption_when_a_subscriber_joins(ring_file, start, release):
    path, _ = ring_file("broadcast")
    poke(path, [(L.MP_OFF_RELEASE, "<Q", release)])
    with shmring.Ring.attach(path=path) as ring:
        with pytest.raises(shmring.CorruptSegmentError):
            ring.subscribe(start)


@pytest.mark.parametrize("start", ["oldest", "newest"])
def test_rejoin_checks_the_position_it_reads_from_the_segment(ring_file, start):
    path, h = ring_file("broadcast", close=False)
    with shmring.Ring.attach(path=path) as ring, ring.subscribe("oldest") as s:
        for _ in range(3):
            s.recv(timeout=0).release()
        buf = ring._seg.buf
        cur = struct.unpack_from("<Q", buf, L.MP_OFF_CURSOR)[0]
        x = CAP - 8                                              # unaligned: the last 8 bytes of the data area
        if start == "oldest":
            struct.pack_into("<Q", buf, L.MP_OFF_RELEASE, x)
        else:
            struct.pack_into("<Q", buf, L.MP_OFF_NEWEST, cur - 8)   # release <= newest < cursor, unaligned
            x = cur - 8
        struct.pack_into("<Q", buf, h["data_offset"] + x % CAP, h["key"] ^ x)   # a stamp right for x
        line = h["cons_table"] + s._slot * L.MP_ENTRY + L.CE_POS
        struct.pack_into("<Q", buf, line, struct.unpack_from("<Q", buf, line)[0] | L.POS_EVICTED)
        with pytest.raises(shmring.Lagged):
            s.recv(timeout=0)
        try:
            s.rejoin(start)
        except shmring.CorruptSegmentError:
            return                                               # refused: fine
        assert s.position % L.MREC_ALIGN == 0 and s.position <= cur, \
            f"rejoin() accepted position {s.position} (cursor {cur})"


def _recv_once_then_exit(path):
    """Child: one recv(timeout=0) with a new mpmc consumer; exit 0 on an allowed outcome."""
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        try:
            c.recv(timeout=0)
        except (shmring.Timeout, shmring.EndOfStream, shmring.CorruptSegmentError):
            pass
    os._exit(0)


@pytest.mark.parametrize("state", [0x7FFF, M.MAXC + 1])
def test_a_lying_requeued_counter_and_record_state_cannot_make_mpmc_recv_spin(tmp_path, state):
    path = tmp_path / "m.ring"
    ring = shmring.Ring.create(path=path, capacity=CAP, kind="mpmc", max_producers=M.MAXP, max_consumers=M.MAXC)
    try:
        with ring.producer() as p:
            p.send(b"one")
        with ring.consumer() as c1:
            m = c1.recv(timeout=0)                     # in flight, held by a live consumer (state 1)
            buf = ring._seg.buf
            struct.pack_into("<H", buf, ring._header["data_offset"] + 14, state)          # an impossible state
            struct.pack_into("<Q", buf, L.MP_OFF_COUNTERS + L.MP_REQUEUED, 1)              # "one is requeued"
            child = multiprocess.get_context("fork").Process(target=_recv_once_then_exit, args=(str(path),))
            child.start()
            child.join(2)                              # it answers in milliseconds
            hung = child.is_alive()
            if hung:
                child.kill()
                child.join()
            m.release()
        assert not hung, "recv(timeout=0) on the mpmc ring did not return within 2 s"
        assert child.exitcode == 0
    finally:
        ring.close()


@pytest.mark.parametrize("status", [3, 7, 2 ** 32 - 1])
def test_an_unknown_status_word_of_a_record_ring_is_corruption_not_a_peer_error(tmp_path, status):
    path = tmp_path / "r.ring"
    with shmring.Ring.create(path=path, capacity=CAP, dtype=M.RDT) as ring, ring.producer() as p:
        p.send_many(M._batch(0, 10))
    poke(path, [(L.OFF_PROD_ROLE + L.ROLE_CLOSED, "<I", status)])
    with shmring.Ring.attach(path=path) as ring, ring.consumer() as c:
        with c.recv_many(100, timeout=0) as b:
            assert len(b) == 10
        with pytest.raises(shmring.CorruptSegmentError):
            c.recv_many(100, timeout=0)


def test_a_corrupt_subscriber_position_word_is_reported_with_its_value(tmp_path):
    path = tmp_path / "b.ring"
    ring = shmring.Ring.create(path=path, capacity=CAP, kind="broadcast", policy="evict")
    try:
        with ring.producer() as p, ring.subscribe() as s:
            p.send(b"a")
            line = ring._header["cons_table"] + s._slot * L.MP_ENTRY + L.CE_POS
            struct.pack_into("<Q", ring._seg.buf, line, 4096 + 16)
            with pytest.raises(shmring.CorruptSegmentError) as ei:
                s.recv(timeout=0)
            assert "%" not in str(ei.value) and ("0x1010" in str(ei.value) or "4112" in str(ei.value))
    finally:
        ring.close()
