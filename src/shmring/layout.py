"""Every offset and constant of a shmring shared region, in one place.

The C core mirrors these numbers in ``_layout.h``; ``tests/test_layout.py``
checks that the two agree, value for value, and that a header written by C
decodes with the pure-Python :func:`read_header` below.

The region::

    0                                   4096                       4096 + capacity
    +-----------------------------------+--------------------------------------+
    | header page                       | data area (capacity bytes, 2**k)     |
    +-----------------------------------+--------------------------------------+

    in memory (R60: the segment file stays header + capacity bytes; its data
    area is mapped twice, back to back, so a record crossing the end of the
    area continues, contiguous, into the second mapping):

    base                 base + 4096            base + 4096 + capacity      + 2 capacity
    +--------------------+----------------------+---------------------------+
    | header page        | data area            | data area again (alias)   |
    | file [0, 4096)     | file [4096, 4096+cap)| file [4096, 4096+cap)     |
    +--------------------+----------------------+---------------------------+

    header page (each cursor alone on its own 128-byte line, so the producer's
    and the consumer's stores never share a cache line or an adjacent-line pair
    pulled in by the spatial prefetcher):

      0   magic "SHMRING1" u64 | version u32 | kind u32 | layout hash u64
          capacity u64 | data offset u64 | max message u64
          creator pid u32 | ready u32 | creator start time u64
          created ns u64 | segment size u64
    128   write_pos u64    producer position, bytes ever committed
    256   read_pos  u64    consumer position, bytes ever released
    384   producer role    owner u64 | closed u32 | pad u32 | sessions u64
    512   consumer role    owner u64 | (unused) u32 | pad u32 | sessions u64
          owner = pid | (start time & 0xffffffff) << 32, taken and given
          back by one 64-bit CAS so pid and start time change together
    640   data wake word   seq u32 | waiters u32     consumer sleeps here
                           | 15 wake-up descriptor slots u64 (at +8)
    768   space wake word  seq u32 | waiters u32     producer sleeps here
                           | 15 wake-up descriptor slots u64 (at +8)

    a wake line (every wake word of every kind, SharedState's too):
      0   seq u32          the futex word, bumped by a waker that saw sleepers
      4   waiters u32      low 16 bits: futex sleepers announced (R4);
                           high 16 bits: descriptor slots armed (R52), in
                           units of WAKE_ARMED_ONE, so a waker's one load
                           tells it whether anybody at all waits
      8   slot u64 x 15    0 = free; else the word of an armed waiter: a
                           random 64-bit id naming the abstract unix
                           datagram socket "\0shmring.%016x" it listens on
                           (R52 to R56); fired (cleared) by one CAS

Positions are 64-bit and only grow; the byte offset of a position in the data
area is ``pos & (capacity - 1)``.  ``read_pos <= write_pos <= read_pos +
capacity`` always holds; anything else read from a segment is corruption.

A record (8-byte aligned; its header never straddles the end of the data area,
its payload may run on into the second mapping)::

     0               1               2               3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +---------------------------------------------------------------+
    |                 length: payload bytes (u32)                   |
    +-------------------------------+-------------------------------+
    |           type (u16)          |        flags (u16) = 0        |
    +-------------------------------+-------------------------------+
    |                   payload (length bytes) ...                  |
    |                   ... zero padding to 8 bytes                 |
    +---------------------------------------------------------------+

A record that crosses the end of the data area is contiguous all the same:
its bytes past the end land in the second mapping, which is the start of the
area (R60).  No wrap padding is written (layout version 2 wrote a ``T_PAD``
record there; version 3 never does, and a reader takes one for corruption).
The one publication rule: the producer
writes the record, then stores ``write_pos`` with release ordering; the
consumer loads ``write_pos`` with acquire ordering before it reads a record.
The consumer stores ``read_pos`` with release ordering only after it is done
with every byte below it (its views are gone), and the producer loads it with
acquire ordering before reusing that space.

Payload of ``T_ARRAY`` / ``T_OBJECT`` (see :mod:`shmring.codec`)::

    u32 meta length | u32 0 | msgpack meta ... | pad | array bytes (64-aligned) ...

The largest payload is ``capacity - REC_HDR`` (``capacity - MREC_HDR`` for the
multi-party kinds): such a record fills an empty ring exactly, wherever the
positions stand, and is still contiguous thanks to the double map.
"""
from __future__ import annotations

import struct
import zlib

MAGIC = 0x31474E49524D4853          # b"SHMRING1" read as a little-endian u64
LAYOUT_VERSION = 3                   # 2: wake-up descriptor slots in every wake line (R52); 3: the double map (R60)
HEADER_SIZE = 4096
LINE = 128

# Fixed header fields: (offset, struct format).
OFF_MAGIC = 0
OFF_VERSION = 8
OFF_KIND = 12
OFF_LAYOUT_HASH = 16
OFF_CAPACITY = 24
OFF_DATA_OFFSET = 32
OFF_MAX_MESSAGE = 40
OFF_CREATOR_PID = 48
OFF_READY = 52
OFF_CREATOR_START = 56
OFF_CREATED_NS = 64
OFF_SEGMENT_SIZE = 72

# Cursor lines.
OFF_WRITE_POS = 128
OFF_READ_POS = 256
OFF_PROD_ROLE = 384
OFF_CONS_ROLE = 512
OFF_DATA_WAKE = 640
OFF_SPACE_WAKE = 768

# Role slot, relative to its line.
ROLE_OWNER = 0
ROLE_CLOSED = 8
ROLE_SESSIONS = 16
ROLE_RECEIVED = 24                   # consumer slot of spsc / mpsc: messages received
CLOSED_EOS = 1                       # producer "closed" word: closed normally
CLOSED_ABORTED = 2                   # closed because of an exception in the producer's with-block

# Wake word, relative to its line.
WAKE_SEQ = 0
WAKE_WAITERS = 4
WAKE_SLEEPERS = 0xFFFF               # futex sleepers: the low half of the waiters word
WAKE_ARMED_ONE = 1 << 16             # one armed descriptor slot: the high half
WAKE_FD_SLOT0 = 8                    # first descriptor slot (u64) of a wake line
WAKE_FD_SLOTS = 15                   # slots per wake line (8 + 15 * 8 = 128: the line)

# Records.
REC_HDR = 8
REC_ALIGN = 8
T_PAD = 0x5041                       # layout 2's wrap padding; never written since layout 3 (R60)
T_BYTES = 1
T_ARRAY = 2
T_OBJECT = 3

ARRAY_ALIGN = 64                     # array payload bytes start 64-aligned

KIND_SPSC = 1
KIND_MPSC = 2
KIND_BROADCAST = 3
KIND_MPMC = 4
KINDS = {"spsc": KIND_SPSC, "mpsc": KIND_MPSC, "broadcast": KIND_BROADCAST, "mpmc": KIND_MPMC}
MULTI_KINDS = (KIND_MPSC, KIND_BROADCAST, KIND_MPMC)
KIND_RECORDS = 5                # an spsc ring of fixed-dtype records (Ring.create(..., dtype=...))
KIND_NAMES = {v: k for k, v in KINDS.items()}
KIND_NAMES[KIND_RECORDS] = "spsc"
KIND_STATE = 0x53               # a SharedState segment (see the state diagram below), never a ring kind

MIN_CAPACITY = 4096
MAX_CAPACITY = 1 << 40
MAX_MESSAGE = 0xFFFFFF00             # record lengths are u32

HEADER_STRUCT = struct.Struct("<QIIQQQQIIQQQ")   # fields at offsets 0..79, in order
HEADER_FIELDS = ("magic", "version", "kind", "layout_hash", "capacity",
                 "data_offset", "max_message", "creator_pid", "ready",
                 "creator_start", "created_ns", "segment_size")
assert HEADER_STRUCT.size == OFF_SEGMENT_SIZE + 8

# The constants C must agree with; their hash is stored in every header so a
# segment written by a different layout is refused even if the version was
# not bumped.
C_CONSTANTS = {
    "SHMR_MAGIC": MAGIC, "SHMR_LAYOUT_VERSION": LAYOUT_VERSION,
    "SHMR_HEADER_SIZE": HEADER_SIZE, "SHMR_LINE": LINE,
    "SHMR_OFF_MAGIC": OFF_MAGIC, "SHMR_OFF_VERSION": OFF_VERSION,
    "SHMR_OFF_KIND": OFF_KIND, "SHMR_OFF_LAYOUT_HASH": OFF_LAYOUT_HASH,
    "SHMR_OFF_CAPACITY": OFF_CAPACITY, "SHMR_OFF_DATA_OFFSET": OFF_DATA_OFFSET,
    "SHMR_OFF_MAX_MESSAGE": OFF_MAX_MESSAGE, "SHMR_OFF_CREATOR_PID": OFF_CREATOR_PID,
    "SHMR_OFF_READY": OFF_READY, "SHMR_OFF_CREATOR_START": OFF_CREATOR_START,
    "SHMR_OFF_CREATED_NS": OFF_CREATED_NS, "SHMR_OFF_SEGMENT_SIZE": OFF_SEGMENT_SIZE,
    "SHMR_OFF_WRITE_POS": OFF_WRITE_POS, "SHMR_OFF_READ_POS": OFF_READ_POS,
    "SHMR_OFF_PROD_ROLE": OFF_PROD_ROLE, "SHMR_OFF_CONS_ROLE": OFF_CONS_ROLE,
    "SHMR_OFF_DATA_WAKE": OFF_DATA_WAKE, "SHMR_OFF_SPACE_WAKE": OFF_SPACE_WAKE,
    "SHMR_ROLE_OWNER": ROLE_OWNER, "SHMR_ROLE_CLOSED": ROLE_CLOSED,
    "SHMR_ROLE_SESSIONS": ROLE_SESSIONS,
    "SHMR_WAKE_SEQ": WAKE_SEQ, "SHMR_WAKE_WAITERS": WAKE_WAITERS,
    "SHMR_WAKE_SLEEPERS": WAKE_SLEEPERS, "SHMR_WAKE_ARMED_ONE": WAKE_ARMED_ONE,
    "SHMR_WAKE_FD_SLOT0": WAKE_FD_SLOT0, "SHMR_WAKE_FD_SLOTS": WAKE_FD_SLOTS,
    "SHMR_REC_HDR": REC_HDR, "SHMR_REC_ALIGN": REC_ALIGN,
    "SHMR_T_PAD": T_PAD, "SHMR_T_BYTES": T_BYTES, "SHMR_T_ARRAY": T_ARRAY,
    "SHMR_T_OBJECT": T_OBJECT, "SHMR_KIND_SPSC": KIND_SPSC,
    "SHMR_MIN_CAPACITY": MIN_CAPACITY, "SHMR_MAX_CAPACITY": MAX_CAPACITY,
    "SHMR_MAX_MESSAGE": MAX_MESSAGE,
}

# --------------------------------------------------------------------------
# SharedState segments (copy-on-write shared state, shmring.snapshot)
#
# Same fixed header fields 0..79 as a ring (magic, version, layout hash, ...),
# with kind = KIND_STATE; ``capacity`` is the bytes of all version slots,
# ``data_offset`` the first slot, ``max_message`` the largest value payload
# (the ``nbytes`` asked for at creation).  Then::
#
#     0     fixed header (as a ring) | 80 slots u32 | 84 max readers u32
#           88 slot size u64 | 96 reader table offset u64 | 104 first slot offset u64
#     128   current u64       version << 8 | slot; 0 = nothing published yet.
#                             Stored only by the writer, with one seq_cst exchange
#                             (release + the fence the wake-up protocol needs).
#     256   writer role       owner u64 | finished u32 (R57-R59) + 0 u32 | sessions u64
#     384   version wake      seq u32 | waiters u32   wait_newer() sleeps here
#     512   slot wake         seq u32 | waiters u32   a writer with every spare slot pinned sleeps here
#     640   counters          reclaimed pins u64 | writer waits u64
#     4096  reader table      max_readers entries, each alone on a 128-byte line:
#                               owner u64 (pid | start << 32, as a role; 0 = free)
#                               pin   u64 (the current word it pinned; 0 = none)
#     T     version slots     ``slots`` x slot size (a multiple of 4096), T page aligned
#
#   a version slot:
#     0     version u64 | type u32 (T_ARRAY / T_OBJECT) | 0 u32 | length u64
#     64    payload: the T_ARRAY / T_OBJECT layout of shmring.codec (length bytes)
#
# Versions start at 1 and only grow, so a current word (and a pin) is never 0
# once something was published; the slot is the low 8 bits (3..255 slots).
# One entry per 128-byte line (not packed 16-byte entries): every pin and
# unpin is a store by a different reader, and packed entries would bounce one
# line between all of them on every read; the writer's scan of max_readers
# lines per publish is small next to copying the value.
ST_OFF_SLOTS = 80
ST_OFF_MAX_READERS = 84
ST_OFF_SLOT_SIZE = 88
ST_OFF_TABLE = 96
ST_OFF_FIRST_SLOT = 104
ST_OFF_CURRENT = 128
ST_OFF_WRITER = 256
ST_OFF_VERSION_WAKE = 384
ST_OFF_SLOT_WAKE = 512
ST_OFF_COUNTERS = 640
ST_RECLAIMED = 0
ST_WRITER_WAITS = 8
ST_ENTRY = 128
ST_ENTRY_OWNER = 0
ST_ENTRY_PIN = 8
ST_ENTRY_WAITING = 16            # u32: this reader's share of the version wake word's waiters (R29)
ST_SLOT_HDR = 64
ST_SLOT_VERSION = 0
ST_SLOT_TYPE = 8
ST_SLOT_LENGTH = 16
ST_MIN_SLOTS = 3
ST_MAX_SLOTS = 255
ST_MAX_READERS = 4096
ST_STRUCT = struct.Struct("<IIQQQ")          # fields at offsets 80..111
ST_FIELDS = ("slots", "max_readers", "slot_size", "table_offset", "first_slot")

C_CONSTANTS.update({
    "SHMR_KIND_STATE": KIND_STATE,
    "SHMR_ST_OFF_SLOTS": ST_OFF_SLOTS, "SHMR_ST_OFF_MAX_READERS": ST_OFF_MAX_READERS,
    "SHMR_ST_OFF_SLOT_SIZE": ST_OFF_SLOT_SIZE, "SHMR_ST_OFF_TABLE": ST_OFF_TABLE,
    "SHMR_ST_OFF_FIRST_SLOT": ST_OFF_FIRST_SLOT, "SHMR_ST_OFF_CURRENT": ST_OFF_CURRENT,
    "SHMR_ST_OFF_WRITER": ST_OFF_WRITER, "SHMR_ST_OFF_VERSION_WAKE": ST_OFF_VERSION_WAKE,
    "SHMR_ST_OFF_SLOT_WAKE": ST_OFF_SLOT_WAKE, "SHMR_ST_OFF_COUNTERS": ST_OFF_COUNTERS,
    "SHMR_ST_RECLAIMED": ST_RECLAIMED, "SHMR_ST_WRITER_WAITS": ST_WRITER_WAITS,
    "SHMR_ST_ENTRY": ST_ENTRY, "SHMR_ST_ENTRY_OWNER": ST_ENTRY_OWNER, "SHMR_ST_ENTRY_PIN": ST_ENTRY_PIN,
    "SHMR_ST_ENTRY_WAITING": ST_ENTRY_WAITING,
    "SHMR_ST_SLOT_HDR": ST_SLOT_HDR, "SHMR_ST_SLOT_VERSION": ST_SLOT_VERSION,
    "SHMR_ST_SLOT_TYPE": ST_SLOT_TYPE, "SHMR_ST_SLOT_LENGTH": ST_SLOT_LENGTH,
    "SHMR_ST_MIN_SLOTS": ST_MIN_SLOTS, "SHMR_ST_MAX_SLOTS": ST_MAX_SLOTS,
    "SHMR_ST_MAX_READERS": ST_MAX_READERS,
})


def state_geometry(nbytes: int, slots: int, max_readers: int) -> dict:
    """Offsets and sizes of a SharedState segment (see the diagram above)."""
    slot_size = align(ST_SLOT_HDR + nbytes, 4096)
    first = HEADER_SIZE + align(max_readers * ST_ENTRY, 4096)
    return {"slot_size": slot_size, "table_offset": HEADER_SIZE, "first_slot": first,
            "capacity": slots * slot_size, "segment_size": first + slots * slot_size}

# --------------------------------------------------------------------------
# Multi-party rings: kinds mpsc, broadcast, mpmc (shmring.ring, one layout)
#
# Same fixed header 0..79 as an spsc ring; ``data_offset`` is past the party
# tables, ``max_message`` is ``capacity - MREC_HDR``.  Then::
#
#     80    key u64              random per ring: a record at position p is
#                                committed iff its stamp == key ^ p
#     88    max producers u32 | 92 max consumers u32 | 96 policy u32 (0 block,
#           1 evict) | 100 expected producers u32 (0 = any)
#     104   evict after ns u64 | 112 producer table offset u64
#     120   consumer table offset u64
#     128   claim cursor u64     producers claim [c, c + size) by CAS from c
#           newest u64 (at +8)   broadcast: start of the last committed record
#     256   release u64          mpsc / mpmc: every byte below it is released;
#                                broadcast: the oldest position the producer
#                                guarantees intact (where "oldest" joins start)
#     384   producers            ended u64 | aborted u64 | sessions u64 | dead u64
#                                (statistics) | state u64 = joins (low bits) |
#                                ENDED (bit 63): a join is a CAS of it, and the
#                                consumer that decides the end seals it by CAS
#                                from the value it read before its scan (R37)
#     512   consumer role        mpsc only: owner | - | sessions (as spsc)
#     640   data wake word       consumers sleep here
#     768   space wake word      producers sleep here
#     896   take cursor u64      mpmc: the next record nobody has taken
#     1024  counters             abandoned | evicted | dropped | requeued (now)
#                                | redelivered | u32 producer / consumer high water
#     3584  queue words          mpmc rings of shmring.Queue only (Python, never C;
#                                zero in every other ring): tag u64 "SHMQUEUE" |
#                                maxsize u64 (0 = none) | items u64 (R70) |
#                                unfinished u64 (JoinableQueue, R72) | flags u64
#     3712  queue not-full wake  put() waiting for maxsize sleeps here (R71)
#     3840  queue join wake      JoinableQueue.join() sleeps here (R72)
#     4096  producer table       max producers lines: owner | intent | sent | bytes
#                                | waiting u32 (its sleeps announced on the space wake word)
#                                | session u64 = sessions done here << 1 | JOINED (R36):
#                                the truth the end of the stream is decided on
#     P     consumer table       max consumers lines: owner | pos | received |
#                                sent at join | missed messages | missed bytes
#                                | waiting u32 (its sleeps announced on the data wake word)
#     D     data area (page aligned), mapped twice back to back (R60)
#
#   a record (16-byte aligned; positions are multiples of 16):
#     0     stamp u64            key ^ position, stored last (seq_cst)
#     8     length u32 | type u16 | state u16   (mpmc: 0 free, k + 1 taken by
#                                consumer slot k, 0xfffe requeued, 0xffff released)
#     16    payload, zero padding to 16 bytes
#
# Producer intent: before its CAS on the cursor a producer stores the cursor
# value it tries | INTENT_BIT in its table line, and clears it after the
# stamp of its record is stored.  A record that stays unstamped while no live
# producer has it as intent was abandoned (its producer died mid-claim): a
# consumer writes a committed T_SKIP record over it and counts it.
# Broadcast subscriber pos word: position | HOLD (it holds messages: cannot be
# evicted) | EVICTED; FREE (all ones) = not a subscriber.
MREC_HDR = 16
MREC_ALIGN = 16
T_SKIP = 0x4B53                 # "SK": a range to skip (abandoned claim, shrunk or aborted reservation)
MP_OFF_KEY = 80
MP_OFF_MAX_PRODUCERS = 88
MP_OFF_MAX_CONSUMERS = 92
MP_OFF_POLICY = 96
MP_OFF_EXPECTED = 100
MP_OFF_EVICT_AFTER = 104
MP_OFF_PROD_TABLE = 112
MP_OFF_CONS_TABLE = 120
MP_OFF_CURSOR = OFF_WRITE_POS
MP_OFF_NEWEST = OFF_WRITE_POS + 8
MP_OFF_RELEASE = OFF_READ_POS
MP_OFF_PRODUCERS = OFF_PROD_ROLE
MP_ENDED = 0
MP_ABORTED = 8
MP_SESSIONS = 16
MP_DEAD = 24
MP_STATE = 32                   # u64: joins counted (low bits) | MP_STATE_ENDED (sticky, R37)
MP_STATE_ENDED = 1 << 63
MP_OFF_TAKE = 896
MP_OFF_COUNTERS = 1024
# shmring.Queue's words in the header page of its mpmc ring (R70-R74; the C
# core never touches them, so they are not in C_CONSTANTS)
Q_OFF = 3584
Q_TAG = 0x45554555514D4853           # b"SHMQUEUE" read as a little-endian u64
Q_OFF_TAG = Q_OFF
Q_OFF_MAXSIZE = Q_OFF + 8
Q_OFF_ITEMS = Q_OFF + 16
Q_OFF_UNFINISHED = Q_OFF + 24
Q_OFF_FLAGS = Q_OFF + 32
Q_FLAG_JOINABLE = 1
Q_OFF_NOTFULL_WAKE = 3712
Q_OFF_JOIN_WAKE = 3840
MP_ABANDONED = 0
MP_EVICTED = 8
MP_DROPPED = 16
MP_REQUEUED = 24
MP_REDELIVERED = 32
MP_HW_PRODUCERS = 40
MP_HW_CONSUMERS = 44
PE_OWNER = 0
PE_INTENT = 8
PE_SENT = 16
PE_BYTES = 24
PE_WAITING = 32                 # u32: this entry's share of the space wake word's waiters
PE_SESSION = 40                 # u64: sessions done in this entry << 1 | PE_JOINED (R36)
PE_JOINED = 1
CE_OWNER = 0
CE_POS = 8
CE_RECEIVED = 16
CE_BASE = 24
CE_MISSED = 32
CE_MISSED_BYTES = 40
CE_WAITING = 48                 # u32: this entry's share of the data wake word's waiters
MP_ENTRY = 128
MP_MAX_PARTIES = 1024
LOCK_BASE = 1 << 50             # liveness: a role's lock is byte LOCK_BASE + its line (shmring.liveness)
INTENT_BIT = 1 << 63
POS_FREE = (1 << 64) - 1
POS_EVICTED = 1 << 63
POS_HOLD = 1 << 62
POS_MASK = POS_HOLD - 1
RS_FREE = 0                     # mpmc record states (u16 at +14): owner slot + 1 while taken
RS_REQUEUED = 0xFFFE
RS_RELEASED = 0xFFFF
POLICIES = {"block": 0, "evict": 1}
MP_STRUCT = struct.Struct("<QIIIIQQQ")        # fields at offsets 80..127
MP_FIELDS = ("key", "max_producers", "max_consumers", "policy", "expected_producers",
             "evict_after_ns", "prod_table", "cons_table")

C_CONSTANTS.update({
    "SHMR_KIND_MPSC": KIND_MPSC, "SHMR_KIND_BROADCAST": KIND_BROADCAST, "SHMR_KIND_MPMC": KIND_MPMC,
    "SHMR_MREC_HDR": MREC_HDR, "SHMR_T_SKIP": T_SKIP,
    "SHMR_MP_OFF_KEY": MP_OFF_KEY, "SHMR_MP_OFF_MAX_PRODUCERS": MP_OFF_MAX_PRODUCERS,
    "SHMR_MP_OFF_MAX_CONSUMERS": MP_OFF_MAX_CONSUMERS, "SHMR_MP_OFF_POLICY": MP_OFF_POLICY,
    "SHMR_MP_OFF_EXPECTED": MP_OFF_EXPECTED, "SHMR_MP_OFF_PROD_TABLE": MP_OFF_PROD_TABLE,
    "SHMR_MP_OFF_CONS_TABLE": MP_OFF_CONS_TABLE, "SHMR_MP_OFF_NEWEST": MP_OFF_NEWEST,
    "SHMR_MP_OFF_TAKE": MP_OFF_TAKE, "SHMR_MP_OFF_COUNTERS": MP_OFF_COUNTERS,
    "SHMR_MP_ENDED": MP_ENDED, "SHMR_MP_ABORTED": MP_ABORTED, "SHMR_MP_SESSIONS": MP_SESSIONS,
    "SHMR_MP_DEAD": MP_DEAD, "SHMR_MP_STATE": MP_STATE, "SHMR_MP_ABANDONED": MP_ABANDONED, "SHMR_MP_REQUEUED": MP_REQUEUED,
    "SHMR_MP_REDELIVERED": MP_REDELIVERED, "SHMR_PE_INTENT": PE_INTENT, "SHMR_PE_SENT": PE_SENT,
    "SHMR_PE_BYTES": PE_BYTES, "SHMR_CE_POS": CE_POS, "SHMR_CE_RECEIVED": CE_RECEIVED,
    "SHMR_MP_ENTRY": MP_ENTRY, "SHMR_MP_MAX_PARTIES": MP_MAX_PARTIES,
    "SHMR_LOCK_BASE": LOCK_BASE, "SHMR_MP_STATE_ENDED": MP_STATE_ENDED, "SHMR_PE_SESSION": PE_SESSION, "SHMR_PE_JOINED": PE_JOINED,
})


def multi_geometry(capacity: int, max_producers: int, max_consumers: int) -> dict:
    """Offsets of a multi-party ring's tables and data area (see the diagram above)."""
    prod = HEADER_SIZE
    cons = prod + max_producers * MP_ENTRY
    data = align(cons + max_consumers * MP_ENTRY, 4096)
    return {"prod_table": prod, "cons_table": cons, "data_offset": data,
            "segment_size": data + capacity, "max_message": min(capacity - MREC_HDR, MAX_MESSAGE)}


# --------------------------------------------------------------------------
# Record rings (kind KIND_RECORDS: spsc, fixed dtype; shmring.records)
#
# The spsc header, lines and roles, but positions count records, not bytes,
# and the data area is ``slots`` records of ``itemsize`` bytes with no record
# headers: a batch is one contiguous copy (two when it wraps; a record ring
# is mapped once, not twice: R60 is for framed rings).  ``slots`` =
# capacity // itemsize.  Record k lives at data + (k % slots) * itemsize.
#
#     80    itemsize u64 | 88 slots u64 | 96 dtype description length u32
#     2048  dtype description: msgpack of shmring.codec's dtype spec
RC_OFF_ITEMSIZE = 80
RC_OFF_SLOTS = 88
RC_OFF_DESCR_LEN = 96
RC_OFF_DESCR = 2048
RC_MAX_DESCR = HEADER_SIZE - RC_OFF_DESCR
RC_STRUCT = struct.Struct("<QQI")
C_CONSTANTS["SHMR_KIND_RECORDS"] = KIND_RECORDS


LAYOUT_HASH = zlib.crc32(repr(sorted(C_CONSTANTS.items())).encode()) | (LAYOUT_VERSION << 32)

# Constants _layout.h names too, added after the hash above was fixed for
# layout version 1 (they name values version 1 already had, so the hash, which
# every segment stores, stays the same); tests/test_layout.py checks them
# against C with the rest.
C_CONSTANTS_UNHASHED = {
    "SHMR_ROLE_RECEIVED": ROLE_RECEIVED, "SHMR_CLOSED_EOS": CLOSED_EOS, "SHMR_CLOSED_ABORTED": CLOSED_ABORTED,
    "SHMR_INTENT_BIT": INTENT_BIT, "SHMR_POS_FREE": POS_FREE, "SHMR_POS_EVICTED": POS_EVICTED,
    "SHMR_POS_HOLD": POS_HOLD, "SHMR_RS_FREE": RS_FREE, "SHMR_RS_REQUEUED": RS_REQUEUED,
    "SHMR_RS_RELEASED": RS_RELEASED, "SHMR_PE_WAITING": PE_WAITING, "SHMR_CE_WAITING": CE_WAITING,
}


def align(n: int, a: int) -> int:
    """Round ``n`` up to a multiple of ``a`` (a power of two)."""
    return (n + a - 1) & ~(a - 1)


def record_size(payload_len: int) -> int:
    """Bytes a record with ``payload_len`` payload bytes occupies in the ring."""
    return align(REC_HDR + payload_len, REC_ALIGN)


def max_message(capacity: int) -> int:
    """Largest payload a ring of ``capacity`` accepts (see the module docstring)."""
    return min(capacity - REC_HDR, MAX_MESSAGE)


DOUBLE_MAPPED_KINDS = (KIND_SPSC, KIND_MPSC, KIND_BROADCAST, KIND_MPMC)   # R60


def mapped_size(data_offset: int, capacity: int) -> int:
    """Address space a double-mapped ring takes (R60): its header and tables,
    then its data area twice.  The file is ``data_offset + capacity`` bytes."""
    return data_offset + 2 * capacity


def owner_word(pid: int, start_time: int) -> int:
    """The role owner word for a process (see the diagram)."""
    return (pid & 0xFFFFFFFF) | ((start_time & 0xFFFFFFFF) << 32)


def split_owner(word: int) -> tuple[int, int]:
    """(pid, low 32 bits of start time) of an owner word."""
    return word & 0xFFFFFFFF, word >> 32


def segment_size(capacity: int) -> int:
    return HEADER_SIZE + capacity


def pack_header(*, kind: int, capacity: int, creator_pid: int, creator_start: int,
                created_ns: int, ready: int = 0, geometry: dict | None = None) -> bytes:
    """The fixed header fields, as the creator writes them (``geometry``: a
    multi-party ring's :func:`multi_geometry`)."""
    g = geometry or {"data_offset": HEADER_SIZE, "max_message": max_message(capacity),
                     "segment_size": segment_size(capacity)}
    return HEADER_STRUCT.pack(MAGIC, LAYOUT_VERSION, kind, LAYOUT_HASH, capacity,
                              g["data_offset"], g["max_message"], creator_pid, ready,
                              creator_start, created_ns, g["segment_size"])


def read_header(buf) -> dict:
    """Decode the fixed header fields of a region (pure Python, no validation)."""
    return dict(zip(HEADER_FIELDS, HEADER_STRUCT.unpack_from(buf, 0)))


def read_u32(buf, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


def read_u64(buf, off: int) -> int:
    return struct.unpack_from("<Q", buf, off)[0]


def read_record_header(buf, pos: int, capacity: int) -> tuple[int, int]:
    """(length, type) of the record at position ``pos`` (pure Python reader)."""
    off = HEADER_SIZE + (pos & (capacity - 1))
    length, rtype, _flags = struct.unpack_from("<IHH", buf, off)
    return length, rtype
