/*
 * shmring shared-region layout, C side.
 *
 * The one source of truth is shmring/layout.py (diagrams and rationale live
 * there); this header mirrors its numbers for the C core, and
 * tests/test_layout.py proves the two agree value for value and byte for byte.
 * Change both together and bump SHMR_LAYOUT_VERSION.
 */
#ifndef SHMRING_LAYOUT_H
#define SHMRING_LAYOUT_H

#define SHMR_MAGIC            0x31474E49524D4853ULL /* "SHMRING1" little-endian */
#define SHMR_LAYOUT_VERSION   3u
#define SHMR_HEADER_SIZE      4096u                 /* data area starts here */
#define SHMR_LINE             128u                  /* one cursor per line */

/* Header page, fixed fields (written once by the creator, then read-only). */
#define SHMR_OFF_MAGIC          0   /* u64 */
#define SHMR_OFF_VERSION        8   /* u32 */
#define SHMR_OFF_KIND          12   /* u32 */
#define SHMR_OFF_LAYOUT_HASH   16   /* u64 */
#define SHMR_OFF_CAPACITY      24   /* u64, power of two */
#define SHMR_OFF_DATA_OFFSET   32   /* u64, == SHMR_HEADER_SIZE */
#define SHMR_OFF_MAX_MESSAGE   40   /* u64, largest payload accepted: capacity - record header (R60) */
#define SHMR_OFF_CREATOR_PID   48   /* u32 */
#define SHMR_OFF_READY         52   /* u32, 1 once the header is complete (release) */
#define SHMR_OFF_CREATOR_START 56   /* u64, /proc/<pid>/stat field 22 */
#define SHMR_OFF_CREATED_NS    64   /* u64, CLOCK_REALTIME ns */
#define SHMR_OFF_SEGMENT_SIZE  72   /* u64, header + capacity */

/* Cursor lines: each alone on its own 128-byte line. */
#define SHMR_OFF_WRITE_POS    128   /* u64, producer position: store_release by producer */
#define SHMR_OFF_READ_POS     256   /* u64, consumer position: store_release by consumer */
#define SHMR_OFF_PROD_ROLE    384   /* role slot of the producer */
#define SHMR_OFF_CONS_ROLE    512   /* role slot of the consumer */
#define SHMR_OFF_DATA_WAKE    640   /* wake word the consumer sleeps on */
#define SHMR_OFF_SPACE_WAKE   768   /* wake word the producer sleeps on */

/* Role slot (relative to its line).  The owner word is taken and given back
 * with one 64-bit CAS, so pid and start time always change together:
 *   owner = pid | (start_time & 0xffffffff) << 32,  0 = free. */
#define SHMR_ROLE_OWNER         0   /* u64 */
#define SHMR_ROLE_CLOSED        8   /* u32, producer slot only: SHMR_CLOSED_* */
#define SHMR_ROLE_SESSIONS     16   /* u64, times the role was taken */
#define SHMR_ROLE_RECEIVED     24   /* u64, consumer slot of spsc / mpsc: messages received */
#define SHMR_CLOSED_EOS         1u  /* closed word: the producer closed normally */
#define SHMR_CLOSED_ABORTED     2u  /* closed word: the producer's with-block raised */

/* Wake word (relative to its line). */
#define SHMR_WAKE_SEQ           0   /* u32, futex word, bumped by the waker */
#define SHMR_WAKE_WAITERS       4   /* u32, low half: sleepers announced on SEQ; high half: armed slots */
#define SHMR_WAKE_SLEEPERS      0xFFFFu   /* futex sleepers: the low half of WAITERS (R4) */
#define SHMR_WAKE_ARMED_ONE     0x10000u  /* one armed descriptor slot in WAITERS (R52) */
#define SHMR_WAKE_FD_SLOT0      8   /* u64 x SHMR_WAKE_FD_SLOTS: armed waiters' words, 0 = free (R52..R56) */
#define SHMR_WAKE_FD_SLOTS      15

/* Record header: 8 bytes, 8-aligned, in the data area.
 *   u32 length  payload bytes that follow the header (unpadded)
 *   u16 type    SHMR_T_*
 *   u16 flags   reserved, 0
 * Record size = align8(8 + length). */
#define SHMR_REC_HDR            8
#define SHMR_REC_ALIGN          8
#define SHMR_T_PAD              0x5041u  /* layout 2's wrap padding: never written since layout 3 (R60) */
#define SHMR_T_BYTES            1u
#define SHMR_T_ARRAY            2u
#define SHMR_T_OBJECT           3u

#define SHMR_KIND_SPSC          1u

/* SharedState segments: see the state diagram in layout.py. */
#define SHMR_KIND_STATE         0x53u
#define SHMR_ST_OFF_SLOTS        80   /* u32, number of version slots (3..255) */
#define SHMR_ST_OFF_MAX_READERS  84   /* u32, reader table entries */
#define SHMR_ST_OFF_SLOT_SIZE    88   /* u64, bytes per slot, multiple of 4096 */
#define SHMR_ST_OFF_TABLE        96   /* u64, reader table offset (== header size) */
#define SHMR_ST_OFF_FIRST_SLOT  104   /* u64, first slot offset, page aligned */
#define SHMR_ST_OFF_CURRENT     128   /* u64, version << 8 | slot: seq_cst exchange by the writer */
#define SHMR_ST_OFF_WRITER      256   /* role slot of the writer */
#define SHMR_ST_OFF_VERSION_WAKE 384  /* wake word wait_newer() sleeps on */
#define SHMR_ST_OFF_SLOT_WAKE   512   /* wake word a writer waiting for a free slot sleeps on */
#define SHMR_ST_OFF_COUNTERS    640
#define SHMR_ST_RECLAIMED         0   /* u64, pins of dead readers reclaimed */
#define SHMR_ST_WRITER_WAITS      8   /* u64, times the writer found every spare slot pinned */
#define SHMR_ST_ENTRY           128   /* reader table entry: one line each */
#define SHMR_ST_ENTRY_OWNER       0   /* u64 owner word, 0 = free */
#define SHMR_ST_ENTRY_PIN         8   /* u64 pinned current word, 0 = none */
#define SHMR_ST_ENTRY_WAITING    16   /* u32: the reader's share of the version wake word's waiters */
#define SHMR_ST_SLOT_HDR         64   /* slot header, payload follows */
#define SHMR_ST_SLOT_VERSION      0   /* u64 */
#define SHMR_ST_SLOT_TYPE         8   /* u32 */
#define SHMR_ST_SLOT_LENGTH      16   /* u64 payload bytes */
#define SHMR_ST_MIN_SLOTS         3
#define SHMR_ST_MAX_SLOTS       255
#define SHMR_ST_MAX_READERS    4096

/* Multi-party rings (mpsc, broadcast, mpmc): see the multi diagram in layout.py. */
#define SHMR_KIND_MPSC          2u
#define SHMR_KIND_BROADCAST     3u
#define SHMR_KIND_MPMC          4u
#define SHMR_KIND_RECORDS       5u   /* spsc of fixed-dtype records: Python only (shmring.records) */
#define SHMR_MREC_HDR          16   /* u64 stamp | u32 length | u16 type | u16 state */
#define SHMR_T_SKIP             0x4B53u
#define SHMR_MP_OFF_KEY          80   /* u64 */
#define SHMR_MP_OFF_MAX_PRODUCERS 88  /* u32 */
#define SHMR_MP_OFF_MAX_CONSUMERS 92  /* u32 */
#define SHMR_MP_OFF_POLICY       96   /* u32: 0 block, 1 evict */
#define SHMR_MP_OFF_EXPECTED    100   /* u32 */
#define SHMR_MP_OFF_PROD_TABLE  112   /* u64 */
#define SHMR_MP_OFF_CONS_TABLE  120   /* u64 */
#define SHMR_MP_OFF_NEWEST      136   /* u64, broadcast: start of the last committed record */
#define SHMR_MP_OFF_TAKE        896   /* u64, mpmc take cursor */
#define SHMR_MP_OFF_COUNTERS   1024
#define SHMR_MP_ENDED             0   /* producers line (at SHMR_OFF_PROD_ROLE) */
#define SHMR_MP_ABORTED           8
#define SHMR_MP_SESSIONS         16
#define SHMR_MP_DEAD             24
#define SHMR_MP_STATE            32   /* u64: joins counted (low bits) | ENDED (bit 63, sticky) */
#define SHMR_MP_STATE_ENDED      0x8000000000000000ULL
#define SHMR_MP_ABANDONED         0   /* counters line */
#define SHMR_MP_REQUEUED         24
#define SHMR_MP_REDELIVERED      32
#define SHMR_PE_INTENT            8   /* producer table entry */
#define SHMR_PE_SENT             16
#define SHMR_PE_BYTES            24
#define SHMR_PE_WAITING          32   /* u32: the entry's share of the space wake word's waiters */
#define SHMR_PE_SESSION          40   /* u64: sessions done here << 1 | JOINED */
#define SHMR_PE_JOINED           1u
#define SHMR_CE_POS               8   /* consumer table entry */
#define SHMR_CE_RECEIVED         16
#define SHMR_CE_WAITING          48   /* u32: the entry's share of the data wake word's waiters */
#define SHMR_MP_ENTRY           128
#define SHMR_MP_MAX_PARTIES    1024
#define SHMR_LOCK_BASE         (1ULL << 50)   /* liveness locks: byte LOCK_BASE + a role line (shmring.liveness) */
#define SHMR_INTENT_BIT         (1ULL << 63)
#define SHMR_POS_FREE           (~0ULL)
#define SHMR_POS_EVICTED        (1ULL << 63)
#define SHMR_POS_HOLD           (1ULL << 62)
#define SHMR_POS_MASK           (SHMR_POS_HOLD - 1)
/* mpmc record state (u16 at +14 of a record): owner slot + 1 while taken */
#define SHMR_RS_FREE            0u
#define SHMR_RS_REQUEUED        0xFFFEu
#define SHMR_RS_RELEASED        0xFFFFu

#define SHMR_MAX_MESSAGE        0xFFFFFF00ULL  /* record lengths are u32 */
#define SHMR_MIN_CAPACITY       4096ULL
#define SHMR_MAX_CAPACITY       (1ULL << 40)

#endif
