"""The C core and the pure-Python layout module agree on every number and byte."""
import os
import struct
import time

import numpy as np

import shmring
from shmring import _core
from shmring import layout as L
from shmring._proc import my_start_time
from shmring.roles import my_owner_word


def test_c_constants_equal_python_constants_exactly():
    c = _core.layout_constants()
    assert c == {**L.C_CONSTANTS, **L.C_CONSTANTS_UNHASHED}
    assert len(c) == len(L.C_CONSTANTS) + len(L.C_CONSTANTS_UNHASHED) > 40
    assert not set(L.C_CONSTANTS) & set(L.C_CONSTANTS_UNHASHED)


def test_layout_hash_covers_the_constants_and_the_version():
    assert L.LAYOUT_HASH >> 32 == L.LAYOUT_VERSION
    assert L.MAGIC.to_bytes(8, "little") == b"SHMRING1"


def test_cursor_lines_do_not_share_a_line():
    offs = [L.OFF_WRITE_POS, L.OFF_READ_POS, L.OFF_PROD_ROLE, L.OFF_CONS_ROLE,
            L.OFF_DATA_WAKE, L.OFF_SPACE_WAKE]
    assert all(o % L.LINE == 0 for o in offs)
    assert len({o // L.LINE for o in offs}) == len(offs)
    assert min(offs) >= L.HEADER_STRUCT.size
    assert max(offs) + L.LINE <= L.HEADER_SIZE


def test_header_written_by_create_decodes_with_the_python_reader(ring_name):
    before = time.time_ns()
    with shmring.Ring.create(ring_name, 1 << 16) as ring:
        after = time.time_ns()
        h = L.read_header(ring._seg.buf)
        assert h["magic"] == L.MAGIC
        assert h["version"] == L.LAYOUT_VERSION
        assert h["kind"] == L.KIND_SPSC
        assert h["layout_hash"] == L.LAYOUT_HASH
        assert h["capacity"] == 1 << 16
        assert h["data_offset"] == L.HEADER_SIZE
        assert h["max_message"] == (1 << 16) - 8 == ring.max_message   # capacity - header (R60)
        assert h["creator_pid"] == os.getpid()
        assert h["ready"] == 1
        assert h["creator_start"] == my_start_time() != 0
        assert before <= h["created_ns"] <= after
        assert h["segment_size"] == L.HEADER_SIZE + (1 << 16) == os.stat(f"/dev/shm/shmring.{ring_name}").st_size


def test_cursors_and_roles_written_by_c_decode_with_the_python_reader(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as p, ring.consumer() as c:
        buf = ring._seg.buf
        me = my_owner_word()
        assert L.read_u64(buf, L.OFF_PROD_ROLE + L.ROLE_OWNER) == me
        assert L.read_u64(buf, L.OFF_CONS_ROLE + L.ROLE_OWNER) == me
        assert L.read_u64(buf, L.OFF_PROD_ROLE + L.ROLE_SESSIONS) == 1
        p.send(b"abc")
        assert L.read_u64(buf, L.OFF_WRITE_POS) == p.position == L.record_size(3) == 16
        assert L.read_u64(buf, L.OFF_READ_POS) == 0
        assert c.recv_bytes() == b"abc"
        assert L.read_u64(buf, L.OFF_READ_POS) == c.position == 16
        p.close()
        assert L.read_u32(buf, L.OFF_PROD_ROLE + L.ROLE_CLOSED) == 1
        assert L.read_u64(buf, L.OFF_PROD_ROLE + L.ROLE_OWNER) == 0


def test_bytes_record_written_by_c_decodes_with_the_python_reader(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as p:
        buf = ring._seg.buf
        p.send(b"hello, world")
        p.send(b"")
        assert L.read_record_header(buf, 0, ring.capacity) == (12, L.T_BYTES)
        assert bytes(buf[L.HEADER_SIZE + 8:L.HEADER_SIZE + 20]) == b"hello, world"
        assert bytes(buf[L.HEADER_SIZE + 20:L.HEADER_SIZE + 24]) == b"\0" * 4      # zero padding to 8
        assert L.read_record_header(buf, 24, ring.capacity) == (0, L.T_BYTES)
        assert struct.unpack_from("<H", buf, L.HEADER_SIZE + 6)[0] == 0              # flags
        assert p.position == 32


def test_array_and_object_records_carry_their_type_and_prefix(ring_name):
    with shmring.Ring.create(ring_name, 1 << 12) as ring, ring.producer() as p:
        buf = ring._seg.buf
        p.send(np.arange(3, dtype="<i4"))
        n, t = L.read_record_header(buf, 0, ring.capacity)
        assert t == L.T_ARRAY
        meta_len, narrays = struct.unpack_from("<II", buf, L.HEADER_SIZE + 8)
        assert narrays == 1 and 0 < meta_len < n
        area = L.align(L.HEADER_SIZE + 16 + meta_len, L.ARRAY_ALIGN)
        assert bytes(buf[area:area + 12]) == np.arange(3, dtype="<i4").tobytes()
        pos = L.record_size(n)
        p.send({"k": [1, 2]})
        assert L.read_record_header(buf, pos, ring.capacity)[1] == L.T_OBJECT


def test_a_record_at_the_wrap_runs_on_into_the_second_mapping_without_padding(ring_name):
    cap = 1 << 12
    with shmring.Ring.create(ring_name, cap) as ring, ring.producer() as p, ring.consumer() as c:
        buf = ring._seg.buf
        assert len(buf) == L.HEADER_SIZE + 2 * cap and ring._seg.size == L.HEADER_SIZE + cap   # R60
        for _ in range(2):
            p.send(b"a" * 1500)                        # records of 1512 bytes: 1072 left before the end
            assert c.recv_bytes() == b"a" * 1500
        second = bytes(range(256)) * 4 + b"b" * 176    # 1208 bytes: crosses the end of the area
        p.send(second)
        assert L.read_record_header(buf, 3024, cap) == (1200, L.T_BYTES)   # no T_PAD: the record itself
        start = L.HEADER_SIZE + 3024 + L.REC_HDR
        assert bytes(buf[start:start + 1200]) == second          # contiguous, through the second mapping
        first_part = L.HEADER_SIZE + cap - start
        assert bytes(buf[L.HEADER_SIZE:L.HEADER_SIZE + 1200 - first_part]) == second[first_part:]   # the alias
        assert p.position == 3024 + 1208
        assert c.recv_bytes() == second
        assert L.read_u64(buf, L.OFF_READ_POS) == 3024 + 1208


def test_record_size_and_max_message_helpers():
    assert L.record_size(0) == 8 and L.record_size(1) == 16 and L.record_size(8) == 16
    assert L.max_message(4096) == 4088
    assert L.record_size(L.max_message(1 << 20)) == 1 << 20
    assert L.split_owner(L.owner_word(1234, 0x1_2345_6789)) == (1234, 0x2345_6789)


def test_shared_state_lines_do_not_share_a_line_and_the_reader_table_follows_the_header():
    offs = [L.ST_OFF_CURRENT, L.ST_OFF_WRITER, L.ST_OFF_VERSION_WAKE, L.ST_OFF_SLOT_WAKE, L.ST_OFF_COUNTERS]
    assert all(o % L.LINE == 0 for o in offs)
    assert len({o // L.LINE for o in offs}) == len(offs)
    assert L.ST_OFF_SLOTS + L.ST_STRUCT.size <= min(offs)
    assert max(offs) + L.LINE <= L.HEADER_SIZE
    assert L.ST_ENTRY == L.LINE and L.ST_ENTRY_PIN + 8 <= L.ST_ENTRY
    assert L.ST_SLOT_HDR % L.ARRAY_ALIGN == 0 and L.ST_SLOT_LENGTH + 8 <= L.ST_SLOT_HDR
    assert L.KIND_STATE not in L.KIND_NAMES                 # never mistaken for a ring kind
    g = L.state_geometry(1, L.ST_MIN_SLOTS, 64)
    assert g["first_slot"] == L.HEADER_SIZE + 64 * L.ST_ENTRY and g["slot_size"] == 4096
