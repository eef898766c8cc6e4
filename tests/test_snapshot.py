"""SharedState in one process: values, copy-on-write updates, pins and escaped
views, the layout as C writes it, and every error path (names, sizes, timeouts,
wrong segment kinds, corrupt words read from shared memory)."""
import gc
import os
import pickle
import struct

import numpy as np
import pytest

import shmring
from shmring import _core
from shmring import layout as L
from shmring._proc import my_start_time
from shmring.roles import my_owner_word


@pytest.fixture
def state(ring_name):
    with shmring.SharedState.create(ring_name, 1 << 16, slots=3) as s:
        yield s


def test_published_arrays_and_objects_read_back_as_read_only_zero_copy_views(state):
    assert state.publish(np.arange(10.0)) == 1
    with state.read() as snap:
        a = snap.value
        assert snap.version == 1 and a.tolist() == list(map(float, range(10)))
        assert not a.flags.writeable
        assert a.ctypes.data % L.ARRAY_ALIGN == 0
        with pytest.raises(ValueError):
            a[0] = 1
        del a
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert state.publish({"step": 7, "w": w, "names": ["a", "b"], "f": np.asfortranarray(w)}) == 2
    with state.read() as snap:
        v = snap.value
        assert v["step"] == 7 and v["names"] == ["a", "b"]
        assert np.array_equal(v["w"], w) and np.array_equal(v["f"], w) and v["f"].flags.f_contiguous
        del v
        c = snap.copy()
    assert np.array_equal(c["w"], w) and c["w"].flags.writeable


def test_update_copies_the_current_version_and_publishes_it_on_exit(state):
    state.publish({"w": np.zeros(4), "step": 0})
    with state.read() as old:
        with state.update() as draft:
            draft["w"][3] += 1.0
            assert old.value["w"][3] == 0.0        # readers of the old version see no change
        assert old.version == 1 and old.value["w"][3] == 0.0
    with state.read() as snap:
        assert snap.version == 2 and snap.value["w"].tolist() == [0, 0, 0, 1.0]
    assert not draft["w"].flags.writeable          # a kept draft cannot change a published version


def test_update_of_a_non_array_field_is_published_not_dropped(state):
    state.publish({"w": np.ones(3), "step": 1})
    with state.update() as draft:
        draft["step"] = 2
        draft["w"][0] = 5
    with state.read() as snap:
        assert snap.version == 2 and snap.value["step"] == 2 and snap.value["w"].tolist() == [5, 1, 1]


def test_update_is_discarded_on_an_exception(state):
    state.publish(np.zeros(3))
    with pytest.raises(KeyError):
        with state.update() as draft:
            draft[:] = 9
            raise KeyError("boom")
    with state.read() as snap:
        assert snap.version == 1 and snap.value.tolist() == [0, 0, 0]
    assert state.publish(np.ones(3)) == 2            # the writer goes on


def test_a_pinned_version_survives_any_number_of_later_publishes(state):
    state.publish(np.full(100, 1))
    with state.read() as snap:
        for v in range(2, 50):
            assert state.publish(np.full(100, v)) == v   # 3 slots: the other two take turns
        assert snap.version == 1 and (snap.value == 1).all()
    assert state.stats()["pins"] == [0, 0, 0]


def test_publish_waits_only_when_every_spare_slot_is_pinned_and_times_out(state):
    state.publish(np.full(10, 1))
    s1 = state.read()
    state.publish(np.full(10, 2))
    s2 = shmring.SharedState.attach(state.name).read()   # another handle, another reader entry
    state.publish(np.full(10, 3))
    with pytest.raises(shmring.Timeout, match="pinned by live readers"):
        state.publish(np.full(10, 4), timeout=0.05)
    with pytest.raises(shmring.Timeout):
        with state.update(timeout=0):
            pass
    assert state.stats()["writer_waits"] >= 2
    s1.release()
    assert state.publish(np.full(10, 4), timeout=0) == 4
    assert (s2.value == 2).all()
    s2.release()


def test_a_view_escaping_a_read_block_warns_and_keeps_the_version_pinned(state):
    state.publish(np.arange(5))
    with pytest.warns(shmring.EscapedViewWarning, match="version 1"):
        with state.read() as snap:
            kept = snap.value[1:]                          # a derived view counts too
    assert state.stats()["pins"].count(1) == 1
    for v in range(2, 10):
        state.publish(np.full(5, v))
    assert kept.tolist() == [1, 2, 3, 4]                   # never overwritten
    del kept
    gc.collect()
    assert state.stats()["pins"] == [0, 0, 0]
    with state.read() as snap:
        assert snap.version == 9


def test_pin_and_unpin_are_c_calls_and_nested_reads_take_separate_pins(state):
    state.publish(np.arange(3))
    assert type(state).read is _core.StateCore.read
    with state.read() as a, state.read() as b:
        assert a.version == b.version == 1
        assert sum(state.stats()["pins"]) == 2 and a.slot == b.slot
    assert sum(state.stats()["pins"]) == 0
    snap = state.read()
    snap.release()
    snap.release()                                          # idempotent
    with pytest.raises(shmring.HandleClosed):
        snap.value


def test_wait_newer_returns_at_once_for_an_older_version_and_times_out_otherwise(state):
    state.publish(np.zeros(1))
    assert state.wait_newer(than=0, timeout=0) == 1
    with pytest.raises(shmring.Timeout, match="newer than 1"):
        state.wait_newer(than=1, timeout=0.05)
    with pytest.raises(ValueError):
        state.wait_newer(than=1, timeout=-1)


def test_read_and_update_before_the_first_publish_say_so(state):
    with pytest.raises(shmring.ShmringError, match="nothing was published"):
        state.read()
    with pytest.raises(shmring.ShmringError, match="no published version"):
        with state.update():
            pass


def test_a_value_larger_than_a_slot_is_message_too_large(state):
    with pytest.raises(shmring.MessageTooLarge, match="holds 65,536"):
        state.publish(np.zeros(1 << 14))                        # 128 KiB
    with pytest.raises(shmring.MessageTooLarge):
        state.publish({"a": np.zeros(1 << 13), "b": np.zeros(1 << 13)})
    state.publish(np.zeros((1 << 13) - 8))                      # just fits: 64 bytes of prefix and meta
    with pytest.raises(shmring.UnsupportedType):
        state.publish({"x": object()})
    with pytest.raises(shmring.UnsupportedType):
        state.publish(np.array([object()]))


def test_create_refuses_bad_arguments_and_attach_refuses_bad_names(ring_name):
    with pytest.raises(ValueError, match="slots must be from 3"):
        shmring.SharedState.create(ring_name, 100, slots=2)
    with pytest.raises(ValueError, match="nbytes"):
        shmring.SharedState.create(ring_name, 0)
    with pytest.raises(ValueError, match="max_readers"):
        shmring.SharedState.create(ring_name, 100, max_readers=0)
    with pytest.raises(TypeError):
        shmring.SharedState.create(ring_name, 1.5)
    with pytest.raises(shmring.SegmentNotFound):
        shmring.SharedState.attach(ring_name)
    with pytest.raises(ValueError, match="slashes"):
        shmring.SharedState.attach("a/b")
    with shmring.SharedState.create(ring_name, 100):
        with pytest.raises(shmring.SegmentExists):
            shmring.SharedState.create(ring_name, 100)
    assert not os.path.exists(f"/dev/shm/shmring.{ring_name}")      # the with block unlinked it


def test_a_ring_attached_as_state_and_a_state_attached_as_ring_are_refused_by_name(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12):
        with pytest.raises(shmring.IncompatibleSegment, match="spsc ring, not a SharedState"):
            shmring.SharedState.attach(ring_name)
    with shmring.SharedState.create(ring_name, 1 << 12):
        with pytest.raises(shmring.IncompatibleSegment, match="SharedState segment, not a ring"):
            shmring.Ring.attach(ring_name)


def test_a_second_writer_handle_is_refused_and_closing_gives_the_role_back(state):
    other = shmring.SharedState.attach(state.name)
    state.publish(np.zeros(1))
    with pytest.raises(shmring.RoleTaken, match=f"pid {os.getpid()}"):
        other.publish(np.zeros(1))
    with other.read() as snap:                                 # reading needs no role
        assert snap.version == 1
    state.close()
    assert other.publish(np.ones(1)) == 2
    other.close()


def test_the_reader_table_has_max_readers_entries(ring_name):
    with shmring.SharedState.create(ring_name, 100, max_readers=1) as s:
        s.publish(np.zeros(1))
        with s.read():
            with pytest.raises(shmring.ShmringError, match="all 1 reader entries"):
                s.read()
        with s.read():                                         # the entry is free again
            pass


def test_a_state_pickles_by_name_and_a_file_backed_state_persists(ring_name, tmp_path):
    with shmring.SharedState.create(ring_name, 100) as s:
        s.publish({"k": 1})
        t = pickle.loads(pickle.dumps(s))
        with t.read() as snap:
            assert snap.value == {"k": 1}
        t.close()
    path = tmp_path / "state.shm"
    with shmring.SharedState.create(None, 100, path=path) as s:
        s.publish(np.arange(3))
    with shmring.SharedState.attach(path=path) as s:
        with s.read() as snap:
            assert snap.version == 1 and snap.value.tolist() == [0, 1, 2]
        s.unlink()
    assert not path.exists()


def test_a_closed_handle_raises_handle_closed(state):
    state.publish(np.zeros(1))
    other = shmring.SharedState.attach(state.name)
    other.close()
    other.close()
    for call in (other.read, lambda: other.publish(np.zeros(1)), other.stats, other.wait_newer):
        with pytest.raises(shmring.HandleClosed):
            call()


def test_the_header_and_slots_written_by_c_decode_with_the_python_reader(ring_name):
    with shmring.SharedState.create(ring_name, 5000, slots=5, max_readers=40) as s:
        buf = s._seg.buf
        h = L.read_header(buf)
        g = L.state_geometry(5000, 5, 40)
        assert h["magic"] == L.MAGIC and h["kind"] == L.KIND_STATE and h["ready"] == 1
        assert h["creator_pid"] == os.getpid() and h["creator_start"] == my_start_time()
        assert h["max_message"] == 5000 == s.nbytes and h["data_offset"] == g["first_slot"] == 4096 + 8192   # 40 lines of 128
        assert g["slot_size"] == 8192 and h["capacity"] == 5 * 8192
        assert h["segment_size"] == os.stat(f"/dev/shm/shmring.{ring_name}").st_size
        assert L.ST_STRUCT.unpack_from(buf, L.ST_OFF_SLOTS) == (5, 40, 8192, L.HEADER_SIZE, 12288)
        s.publish(np.arange(4, dtype=np.int32))
        s.publish(np.arange(4, dtype=np.int32))
        cur = L.read_u64(buf, L.ST_OFF_CURRENT)
        assert cur >> 8 == 2
        slot = g["first_slot"] + (cur & 0xFF) * g["slot_size"]
        assert struct.unpack_from("<QIIQ", buf, slot) == (2, L.T_ARRAY, 0, s._current()[3])
        with s.read() as snap:
            assert L.read_u64(buf, L.HEADER_SIZE + L.ST_ENTRY_PIN) == cur
            assert L.read_u64(buf, L.HEADER_SIZE + L.ST_ENTRY_OWNER) == my_owner_word()
            assert snap._offset == slot + L.ST_SLOT_HDR
        assert L.read_u64(buf, L.HEADER_SIZE + L.ST_ENTRY_PIN) == 0
        assert L.read_u64(buf, L.ST_OFF_WRITER + L.ROLE_OWNER) == my_owner_word()


# ------------------------------------------------------------------ corrupt shared memory

def _poke(state, off, fmt, value):
    struct.pack_into(fmt, state._seg.buf, off, value)


@pytest.mark.parametrize("word,match", [
    ((1 << 8) | 200, "names slot 200 of 3"),            # slot index out of range
    ((7 << 8) | 0, "does not match version 7"),         # slot header disagrees
], ids=["slot-out-of-range", "header-mismatch"])
def test_a_corrupt_current_word_is_corrupt_segment_error(state, word, match):
    state.publish(np.zeros(4))
    _poke(state, L.ST_OFF_CURRENT, "<Q", word)
    with pytest.raises(shmring.CorruptSegmentError, match=match):
        state.read()
    with pytest.raises(shmring.CorruptSegmentError):
        state.wait_newer(than=0)
    assert sum(state.stats()["pins"]) == 0                # the failed read did not leave a pin


def test_a_version_going_backwards_is_corrupt_segment_error(state):
    for v in range(1, 4):
        state.publish(np.full(4, v))
    reader = shmring.SharedState.attach(state.name)
    with reader.read() as snap:
        assert snap.version == 3
    _poke(state, L.ST_OFF_CURRENT, "<Q", (2 << 8) | 1)   # an older version word (slot header says 2 too)
    _poke(state, state._first_slot + state._slot_size + L.ST_SLOT_VERSION, "<Q", 2)
    with pytest.raises(shmring.CorruptSegmentError, match="went backwards"):
        reader.read()
    reader.close()


@pytest.mark.parametrize("field,value,match", [
    ("length", 1 << 40, "length"), ("type", 9, "type 9"),
])
def test_a_corrupt_slot_header_is_corrupt_segment_error(state, field, value, match):
    state.publish(np.zeros(4))
    slot = state._first_slot + (state._load_u64(L.ST_OFF_CURRENT) & 0xFF) * state._slot_size
    if field == "length":
        _poke(state, slot + L.ST_SLOT_LENGTH, "<Q", value)
    else:
        _poke(state, slot + L.ST_SLOT_TYPE, "<I", value)
    with pytest.raises(shmring.CorruptSegmentError, match=match):
        state.read()


def test_a_corrupt_payload_is_corrupt_segment_error_on_decode(state):
    state.publish({"a": np.zeros(4)})
    slot = state._first_slot + (state._load_u64(L.ST_OFF_CURRENT) & 0xFF) * state._slot_size
    _poke(state, slot + L.ST_SLOT_HDR, "<I", 1 << 30)       # meta length overruns the payload
    with state.read() as snap:
        with pytest.raises(shmring.CorruptSegmentError, match="overruns"):
            snap.value


@pytest.mark.parametrize("off,fmt,value,match", [
    (L.ST_OFF_SLOTS, "<I", 2, "impossible geometry"),
    (L.ST_OFF_SLOT_SIZE, "<Q", 12345, "inconsistent header field slot_size"),
    (L.OFF_SEGMENT_SIZE, "<Q", 1 << 40, "header says 1,099,511,627,776: truncated"),   # checked before mapping it
    (L.OFF_SEGMENT_SIZE, "<Q", 8192, "inconsistent header field segment_size"),
    (L.OFF_MAGIC, "<Q", 0x1234, "not a shmring segment"),
])
def test_a_corrupt_state_header_is_refused_at_attach(ring_name, off, fmt, value, match):
    with shmring.SharedState.create(ring_name, 1000) as s:
        _poke(s, off, fmt, value)
        with pytest.raises(shmring.CorruptSegmentError, match=match):
            shmring.SharedState.attach(ring_name)


def test_the_c_core_refuses_an_impossible_geometry_even_if_python_did_not_check(ring_name):
    with shmring.SharedState.create(ring_name, 1000) as s:
        _poke(s, L.ST_OFF_FIRST_SLOT, "<Q", 1 << 50)
        with pytest.raises(shmring.CorruptSegmentError, match="geometry"):
            _core.StateCore(s._seg.buf)


def test_a_writer_waiting_for_a_slot_is_woken_by_an_unpin(state):
    import threading
    state.publish(np.full(10, 1))
    s1 = state.read()
    state.publish(np.full(10, 2))
    s2 = state.read()
    state.publish(np.full(10, 3))                            # now both spare slots are pinned
    t = threading.Timer(0.2, s1.release)                     # the wait releases the GIL: a thread can unpin
    t.start()
    try:
        assert state.publish(np.full(10, 4), timeout=30) == 4
    finally:
        t.join()
    assert state.stats()["writer_waits"] == 1
    assert (s2.value == 2).all()
    s2.release()


def test_ctrl_c_interrupts_a_writer_waiting_for_a_slot(state):
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt
    state.publish(np.full(10, 1))
    s1 = state.read()
    state.publish(np.full(10, 2))
    s2 = state.read()
    state.publish(np.full(10, 3))
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            state.publish(np.full(10, 4))                    # no timeout: only the signal ends it
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    s1.release()
    s2.release()
    assert state.publish(np.full(10, 4), timeout=0) == 4


def test_a_snapshot_outlives_the_close_of_its_handle(ring_name):
    with shmring.SharedState.create(ring_name, 1 << 12) as s:
        s.publish(np.arange(4))
        r = shmring.SharedState.attach(ring_name)
        snap = r.read()
        r.close()
        assert snap.value.tolist() == [0, 1, 2, 3]           # the mapping lives while the snapshot does
        assert sum(s.stats()["pins"]) == 1
        snap.release()
        assert sum(s.stats()["pins"]) == 0


@pytest.mark.parametrize("arr", [
    np.arange(12.0).reshape(3, 4), np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
    np.zeros((0, 5), np.float32), np.array(7, dtype=">u8"),
    np.zeros(3, dtype=[("a", "<i4"), ("b", "S3")]),
], ids=["C", "F", "empty", "0-d", "structured"])
def test_the_c_publish_path_of_arrays_lays_them_out_as_the_codec_does(state, arr):
    state.publish(np.zeros(1))                        # takes the writer role: later array publishes go through C
    for v in (2, 3, 4):                               # more than once round the slots
        assert state.publish(arr) == v
        with state.read() as snap:
            got = snap.value
            assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)
            assert got.flags.f_contiguous == arr.flags.f_contiguous and not got.flags.writeable
            del got
    with pytest.raises(ValueError):
        state.publish(arr, timeout=-1)
