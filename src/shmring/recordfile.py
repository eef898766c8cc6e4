"""The shmring record file format (``shmring record`` / ``replay``): constants,
packing, and a small reader that needs neither shmring's C core nor the rest of
the package (numpy and msgpack only, and only to decode arrays and objects).

This file is self-contained on purpose: copy it next to your analysis code, or
run it, ``python recordfile.py FILE`` (a summary; ``--list`` one line per
record).  The format is documented in docs/record-format.md; a file, all
little-endian::

    file header (64 bytes)
      0  magic      8 bytes  b"SHMRREC\\n"
      8  version    u16      1
     10  hdr size   u16      64
     12  rec hdr    u16      40 (size of a record header)
     14  flags      u16      bit 0: every data record carries a payload crc32
     16  created    u64      wall clock at the start, ns since the epoch
     24  capacity   u64      the source ring's capacity (informational)
     32  source     24 bytes the source ring's name, UTF-8, NUL padded
     56  reserved   u32      0
     60  crc        u32      zlib.crc32 of bytes 0..60

    then records, back to back, each a 40-byte header and its payload:
      0  sync       u16      0x5352 ("RS")
      2  kind       u8       1 = data, 2 = end
      3  phase      u8       data: the payload's offset in the source ring mod 64
      4  type       u16      data: the ring's record type (1 bytes, 2 array,
                             3 msgpack object); end: its status (below)
      6  reserved   u16      0
      8  length     u32      payload bytes (0 for an end record)
     12  pcrc       u32      zlib.crc32 of the payload (0 unless flag bit 0)
     16  t_ns       u64      ns since ``created`` (monotonic clock), non-decreasing
     24  seq        u64      0, 1, 2, ... (every record, the end record too)
     32  reserved   u32      0
     36  hcrc       u32      zlib.crc32 of header bytes 0..36

The payload is the ring's own framed payload, byte for byte: a bytes message
as is, an array or msgpack message as ``u32 meta length | u32 array count |
msgpack meta | pad | array area`` where the array area starts at the first
64-aligned *ring* offset after the meta; ``phase`` says where that was, so a
reader (and ``replay``, which lays the message out again at its new offset)
finds the arrays: ``area = align(phase + 8 + meta_len, 64) - phase``.

End statuses: 1 end of stream (the producer closed), 2 peer gone (the
producer died or raised; consumers got PeerGone), 3 stopped (the recorder was
stopped before the stream ended).  A file without an end record is
unfinished (a recorder that was killed).

A torn tail (a crash in the middle of appending a record) is a suffix, at a
record boundary, that is shorter than a header, or all zero bytes, or one
record whose payload runs past the end of the file (or, last in the file, fails
its payload crc).  :func:`open_file` detects it and, with ``repair=True``,
truncates the file there.  Anything else that does not follow the format is
:class:`RecordFileError` naming the offset.
"""
from __future__ import annotations

import os
import struct
import sys
import zlib

try:                                                # inside the package: also a ShmringError
    from .errors import ShmringError as _Base
except ImportError:                                 # run or copied standalone
    class _Base(Exception):
        pass

MAGIC = b"SHMRREC\n"
VERSION = 1
FILE_HDR = struct.Struct("<8sHHHHQQ24sI")           # without its crc
FILE_HDR_SIZE = 64
REC_HDR = struct.Struct("<HBBHHIIQQI")              # without its crc
REC_HDR_SIZE = 40
SYNC = 0x5352
K_DATA, K_END = 1, 2
T_BYTES, T_ARRAY, T_OBJECT = 1, 2, 3
KINDS = {T_BYTES: "bytes", T_ARRAY: "array", T_OBJECT: "object"}
END_EOS, END_PEER_GONE, END_STOPPED = 1, 2, 3
END_NAMES = {END_EOS: "end of stream", END_PEER_GONE: "peer gone", END_STOPPED: "stopped"}
F_PAYLOAD_CRC = 1
ALIGN = 64
PREFIX = struct.Struct("<II")
MAX_NDIM = 64
MAX_META = 64 << 20                                 # a meta larger than this is refused, not decoded

assert FILE_HDR.size + 4 == FILE_HDR_SIZE and REC_HDR.size + 4 == REC_HDR_SIZE


class RecordFileError(_Base, ValueError):
    """A record file that does not follow the format (not a torn tail)."""


def pack_file_header(created_ns: int, capacity: int, source: str, flags: int) -> bytes:
    src = (source or "").encode()[:24]
    head = FILE_HDR.pack(MAGIC, VERSION, FILE_HDR_SIZE, REC_HDR_SIZE, flags, created_ns, capacity, src, 0)
    return head + struct.pack("<I", zlib.crc32(head))


def pack_record_header(kind: int, phase: int, type_: int, length: int, pcrc: int, t_ns: int, seq: int) -> bytes:
    head = REC_HDR.pack(SYNC, kind, phase, type_, 0, length, pcrc, t_ns, seq, 0)
    return head + struct.pack("<I", zlib.crc32(head))


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) & ~(a - 1)


class Record:
    """One record: ``kind`` ('bytes' / 'array' / 'object' / 'end'), ``type``
    (ring type code, or the end status), ``t_ns``, ``seq``, ``phase``,
    ``length``, ``offset`` (of the payload in the file); ``payload`` reads
    its bytes, ``value()`` decodes them."""
    __slots__ = ("file", "kind", "type", "phase", "length", "pcrc", "t_ns", "seq", "offset")

    def __init__(self, file, kind, type_, phase, length, pcrc, t_ns, seq, offset):
        self.file, self.type, self.phase, self.length = file, type_, phase, length
        self.pcrc, self.t_ns, self.seq, self.offset = pcrc, t_ns, seq, offset
        self.kind = "end" if kind == K_END else KINDS.get(type_, f"type {type_}")

    @property
    def end_status(self) -> str | None:
        return END_NAMES.get(self.type) if self.kind == "end" else None

    @property
    def payload(self) -> bytes:
        data = os.pread(self.file.fd, self.length, self.offset)
        if len(data) != self.length:
            raise RecordFileError(f"{self.file.path}: record {self.seq} at offset {self.offset - REC_HDR_SIZE}: "
                                  f"the file ended inside its payload (it shrank while open?)")
        if self.file.flags & F_PAYLOAD_CRC and zlib.crc32(data) != self.pcrc:
            raise RecordFileError(f"{self.file.path}: record {self.seq} at offset {self.offset - REC_HDR_SIZE}: "
                                  "payload crc32 mismatch (corrupt)")
        return data

    def layout(self, data: bytes | None = None) -> tuple[int, int, int]:
        """(meta length, array count, array area offset) of an array / object
        payload, checked against its length."""
        n = self.length
        data = self.payload[:PREFIX.size] if data is None else data
        if n < PREFIX.size:
            raise self._bad(f"a {self.kind} payload of {n} bytes is shorter than its 8-byte prefix")
        meta_len, narrays = PREFIX.unpack_from(data, 0)
        if PREFIX.size + meta_len > n or meta_len > MAX_META:
            raise self._bad(f"meta of {meta_len} bytes does not fit a payload of {n} bytes")
        area = _align(self.phase + PREFIX.size + meta_len) - self.phase if narrays else n
        if area > n:
            raise self._bad(f"array area at {area} lies outside the {n}-byte payload")
        return meta_len, narrays, area

    def _bad(self, why) -> RecordFileError:
        return RecordFileError(f"{self.file.path}: record {self.seq} at offset {self.offset - REC_HDR_SIZE}: {why}")

    def value(self):
        """bytes, a (writable, copied) ndarray, or the msgpack object with its arrays."""
        data = self.payload
        if self.kind == "end":
            return None
        if self.type == T_BYTES:
            return data
        import msgpack
        import numpy as np
        meta_len, narrays, area = self.layout(data)
        meta = data[PREFIX.size:PREFIX.size + meta_len]
        seen = [0]

        def array(desc):
            seen[0] += 1
            if seen[0] > narrays:
                raise self._bad(f"more arrays than the {narrays} announced")
            try:
                spec, shape, order, off, nbytes = desc
                dt = _dtype(spec, np)
                if (not isinstance(shape, list) or len(shape) > MAX_NDIM or order not in ("C", "F")
                        or not all(isinstance(s, int) and 0 <= s < 1 << 62 for s in shape)):
                    raise ValueError(f"shape {shape!r} order {order!r}")
                count = 1
                for s in shape:
                    count *= s
                if (not isinstance(off, int) or not isinstance(nbytes, int) or count * dt.itemsize != nbytes
                        or off < 0 or off % ALIGN or area + off + nbytes > self.length
                        or (dt.itemsize == 0 and count)):
                    raise ValueError(f"{count} x {dt} at area offset {off} ({nbytes} bytes)")
            except Exception as e:
                raise self._bad(f"bad array descriptor: {e}") from None
            a = np.frombuffer(data, dt, count, area + off) if nbytes else np.empty(0, dt)
            return a.reshape(shape, order=order).copy(order="K")

        def ext(code, raw):
            if code != 1:
                return msgpack.ExtType(code, raw)
            return array(msgpack.unpackb(raw))
        try:
            if self.type == T_ARRAY:
                if narrays != 1:
                    raise self._bad(f"an array message announces {narrays} arrays")
                return array(msgpack.unpackb(meta))
            if self.type == T_OBJECT:
                return msgpack.unpackb(meta, ext_hook=ext, raw=False, strict_map_key=False)
        except RecordFileError:
            raise
        except Exception as e:
            raise self._bad(f"undecodable meta ({type(e).__name__}: {e})") from None
        raise self._bad(f"unknown record type {self.type}")

    def __repr__(self):
        what = self.end_status if self.kind == "end" else f"{self.kind}, {self.length} bytes"
        return f"<Record {self.seq} at {self.t_ns / 1e9:.6f} s: {what}>"


def _dtype(spec, np, depth=0):
    # The same decoding as shmring.codec._dtype_from_spec, kept here on purpose:
    # this file must run on its own (no shmring package, no C core).
    if depth > 32:
        raise ValueError("dtype nested too deep")
    if isinstance(spec, str):
        dt = np.dtype(spec)
    elif isinstance(spec, dict) and "base" in spec:
        dt = np.dtype((_dtype(spec["base"], np, depth + 1), tuple(spec["shape"])))
    elif isinstance(spec, dict):
        d = {"names": spec["names"], "formats": [_dtype(f, np, depth + 1) for f in spec["formats"]],
             "offsets": spec["offsets"], "itemsize": spec["itemsize"]}
        if "titles" in spec:
            d["titles"] = spec["titles"]
        dt = np.dtype(d)
    else:
        raise ValueError(f"bad dtype description {spec!r}")
    if dt.hasobject:
        raise ValueError("object dtype")
    return dt


class RecordFile:
    """An open record file, scanned (see :func:`open_file`).  Iterate it for
    its records; ``end`` is the end status name or None (unfinished);
    ``torn_bytes`` what was found torn at the tail (truncated with repair)."""

    def __init__(self, path, *, repair: bool = True):
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, (os.O_RDWR if repair else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (13, 30) and repair:          # EACCES / EROFS: read only, no repair
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                repair = False
            else:
                raise
        try:
            self._scan(repair)
        except BaseException:
            os.close(self.fd)
            raise

    def _scan(self, repair):
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, FILE_HDR_SIZE, 0)
        if len(head) < FILE_HDR_SIZE or head[:8] != MAGIC:
            found = head[:8]
            raise RecordFileError(f"{self.path} is not a shmring record file: it starts with {found!r}, "
                                  f"expected {MAGIC!r} (and is {size} bytes)")
        magic, ver, hsize, rsize, flags, created, cap, src, _ = FILE_HDR.unpack_from(head)
        if ver != VERSION:
            raise RecordFileError(f"{self.path}: record file version {ver}; this reader reads version {VERSION}")
        if (hsize, rsize) != (FILE_HDR_SIZE, REC_HDR_SIZE) or struct.unpack_from("<I", head, 60)[0] != zlib.crc32(head[:60]):
            raise RecordFileError(f"{self.path}: corrupt file header (sizes {hsize}/{rsize}, or crc mismatch)")
        if flags & ~F_PAYLOAD_CRC:
            raise RecordFileError(f"{self.path}: unknown flags {flags:#x} in the file header")
        self.version, self.flags, self.created_ns, self.capacity = ver, flags, created, cap
        self.source = src.rstrip(b"\0").decode(errors="replace")
        self.index: list[Record] = []
        self.end: str | None = None
        self.torn_bytes = 0
        off, t_prev = FILE_HDR_SIZE, 0
        while off < size:
            h = os.pread(self.fd, REC_HDR_SIZE, off)
            if len(h) < REC_HDR_SIZE:
                self._torn(off, size, repair, f"{len(h)} bytes, shorter than a record header")
                break
            sync, kind, phase, type_, _r, length, pcrc, t_ns, seq, _r2 = REC_HDR.unpack_from(h)
            valid = sync == SYNC and struct.unpack_from("<I", h, 36)[0] == zlib.crc32(h[:36])
            if not valid:
                if not any(os.pread(self.fd, min(size - off, 1 << 20), off)) and size - off <= 1 << 20:
                    self._torn(off, size, repair, "zero bytes (space allocated, never written)")
                    break
                raise RecordFileError(f"{self.path}: corrupt record header at offset {off} (sync {sync:#06x}, "
                                      "or header crc mismatch); it is not at the tail, so not a torn write")
            why = None
            if kind not in (K_DATA, K_END) or phase >= ALIGN:
                why = f"kind {kind}, phase {phase}"
            elif kind == K_DATA and type_ not in KINDS:
                why = f"unknown message type {type_}"
            elif kind == K_END and (type_ not in END_NAMES or length):
                why = f"end status {type_}, length {length}"
            elif seq != len(self.index):
                why = f"sequence number {seq}, expected {len(self.index)}"
            elif t_ns < t_prev:
                why = f"time goes backwards ({t_ns} ns after {t_prev} ns)"
            elif self.end is not None:
                why = "a record after the end record"
            if why:
                raise RecordFileError(f"{self.path}: bad record at offset {off}: {why}")
            end = off + REC_HDR_SIZE + length
            if end > size:
                self._torn(off, size, repair, f"a {length}-byte payload cut at {size - off - REC_HDR_SIZE} bytes")
                break
            rec = Record(self, kind, type_, phase, length, pcrc, t_ns, seq, off + REC_HDR_SIZE)
            if end == size and flags & F_PAYLOAD_CRC and kind == K_DATA:
                data = os.pread(self.fd, length, off + REC_HDR_SIZE)
                if zlib.crc32(data) != pcrc:
                    self._torn(off, size, repair, "the last payload fails its crc32")
                    break
            self.index.append(rec)
            if kind == K_END:
                self.end = END_NAMES[type_]
            off, t_prev = end, t_ns
        self.size = off

    def _torn(self, off, size, repair, why):
        self.torn_bytes = size - off
        self.torn_why = why
        if repair:
            os.ftruncate(self.fd, off)

    @property
    def records(self) -> int:
        """Data records (the end record not counted)."""
        return sum(1 for r in self.index if r.kind != "end")

    def __iter__(self):
        return iter(self.index)

    def __len__(self):
        return len(self.index)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def summary(self) -> str:
        kinds: dict = {}
        nbytes = 0
        for r in self.index:
            if r.kind != "end":
                kinds[r.kind] = kinds.get(r.kind, 0) + 1
                nbytes += r.length
        dur = self.index[-1].t_ns / 1e9 if self.index else 0.0
        parts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no messages"
        torn = f"; torn tail of {self.torn_bytes} bytes ({self.torn_why})" if self.torn_bytes else ""
        return (f"{self.path}: version {self.version}, from {self.source or '?'!r}, {self.records} messages "
                f"({parts}; {nbytes} payload bytes) over {dur:.3f} s; "
                f"{'ended: ' + self.end if self.end else 'unfinished (no end record)'}{torn}")


def open_file(path, *, repair: bool = True) -> RecordFile:
    """Open and scan a record file.  A torn tail is detected and, with
    ``repair`` (and write access), truncated; bytes that do not follow the
    format raise :class:`RecordFileError`."""
    return RecordFile(path, repair=repair)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-h"):
        print("usage: python recordfile.py FILE [--list] [--no-repair]")
        return 2
    try:
        with open_file(argv[0], repair="--no-repair" not in argv) as f:
            print(f.summary())
            if "--list" in argv:
                for r in f:
                    print(repr(r))
    except (OSError, RecordFileError) as e:
        print(f"recordfile: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
