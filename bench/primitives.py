"""``python -m bench.primitives``: the zero-copy primitives shmring stands on, measured.

Two small experiments on one file in a fresh temporary directory (a regular file on
disk, read with a warm page cache; removed at the end, also on error or Ctrl-C):

1. **read vs mmap.**  An XOR checksum of the file's uint64 words, computed
   - with ``readinto`` into a preallocated 1 MiB buffer, chunk by chunk (one copy per
     byte: page cache -> buffer, which stays in cache), and into one preallocated
     buffer of the file's size (the copy lands in DRAM and is read back from there);
   - through ``mmap`` (no copy: the page-cache pages are mapped), on a fresh mapping
     (the pass pays the page faults), with ``MAP_POPULATE`` (the kernel fills the page
     table up front, inside the timing), and again on an already-faulted mapping (a
     pure read of the page cache).
   Two decompositions are timed too: ``readinto`` alone (the copy without the
   checksum) and touching one word per 4 KiB page of a fresh mapping (the faults
   without the read).  Every checksum must equal the one computed while writing the
   file.
2. **read+send vs sendfile** over a loopback TCP socket (127.0.0.1 only): the file is
   sent to a receiver process that ``recv_into``s a 1 MiB buffer and counts bytes, with
   ``readinto`` + ``sendall`` (1 MiB chunks) and with ``os.sendfile``.  One untimed
   transfer per method has the receiver XOR the bytes and compare the checksum.  CPU
   time of both sides is reported next to the wall time.

Each measurement is repeated (median shown); the whole study is bounded by a deadline
(a measurement stops repeating when it is reached).  Needs ~3 GiB free in the temp dir
for the 1 GiB file, otherwise a smaller file is used and the output says so.

    python -m bench.primitives             # 1 GiB file, 5 repeats (~30-60 s)
    python -m bench.primitives --quick     # 3 repeats
    python -m bench.primitives --size-mib 256 --dir /var/tmp
"""
from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time

import numpy as np

GiB = 1 << 30
MiB = 1 << 20
CHUNK = 1 * MiB                  # read / send chunk: a buffer that stays in L2
PAGE = mmap.PAGESIZE
HDR = struct.Struct("<QQ")       # transfer header: mode (0 count, 1 checksum), bytes
ACK = struct.Struct("<QQdd")     # receiver's answer: bytes, xor, user s, sys s
SOCK_TIMEOUT = 60.0
xor_reduce = np.bitwise_xor.reduce


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def _xor(buf) -> int:
    return int(xor_reduce(np.frombuffer(buf, np.uint64))) if len(buf) else 0


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- the file

def make_file(path, size, log) -> int:
    """Write ``size`` bytes of uint64 words (a multiplicative pattern, so the checksum is
    not trivial) and return their XOR.  fsync'ed, so no write-back runs during timing."""
    words = 8 * MiB // 8
    acc = 0
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for start in range(0, size // 8, words):
            w = (np.arange(start, min(start + words, size // 8), dtype=np.uint64)
                 * np.uint64(0x9E3779B97F4A7C15))
            acc ^= int(xor_reduce(w))
            f.write(w.data)
        f.flush()
        os.fsync(f.fileno())
    log(f"  wrote {size / GiB:.2f} GiB to {path} in {time.perf_counter() - t0:.1f} s (fsync'ed)")
    return acc


# ----------------------------------------------------------------------------- read vs mmap

def read_chunked(path, size, buf, checksum=True):
    acc = 0
    with open(path, "rb", buffering=0) as f:
        mv = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            if checksum:
                acc ^= _xor(mv[:n])
    return acc


def read_whole(path, size, big):
    with open(path, "rb", buffering=0) as f:
        mv = memoryview(big)
        got = 0
        while got < size:
            n = f.readinto(mv[got:])
            if not n:
                break
            got += n
    return _xor(mv[:got])


def mmap_xor(path, size, populate=False, touch_only=False):
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        a = np.frombuffer(mm, np.uint64)
        r = int(xor_reduce(a[::PAGE // 8])) if touch_only else int(xor_reduce(a))
        del a
    finally:
        mm.close()
    return r


# ----------------------------------------------------------------------------- loopback TCP

def _receiver(lsock, cpu):
    """Child: accept one connection; per transfer read the header, then count (or XOR)
    exactly that many bytes through a 1 MiB recv_into buffer and answer with an ACK."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 0
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        lsock.settimeout(SOCK_TIMEOUT)
        conn, _ = lsock.accept()
        lsock.close()
        _bounded(conn)
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        hdr = bytearray(HDR.size)
        while True:
            got = 0
            while got < HDR.size:
                n = conn.recv_into(memoryview(hdr)[got:])
                if not n:
                    return
                got += n
            mode, nbytes = HDR.unpack(hdr)
            c0 = resource.getrusage(resource.RUSAGE_SELF)
            left, acc, carry = nbytes, 0, b""
            while left:
                n = conn.recv_into(mv, min(CHUNK, left))
                if not n:
                    raise EOFError("sender closed mid-transfer")
                left -= n
                if mode == 1:               # checksum: words may straddle recv boundaries
                    data = carry + bytes(mv[:n])
                    k = len(data) // 8 * 8
                    acc ^= _xor(data[:k])
                    carry = data[k:]
            c1 = resource.getrusage(resource.RUSAGE_SELF)
            conn.sendall(ACK.pack(nbytes - left, acc, c1.ru_utime - c0.ru_utime, c1.ru_stime - c0.ru_stime))
    except BaseException as e:          # noqa: BLE001 -- report through the exit code
        _stderr(f"  receiver: {type(e).__name__}: {e}")
        code = 1
    finally:
        os._exit(code)


def _recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("receiver closed the connection")
        out += chunk
    return bytes(out)


def send_read(sock, path, size, buf):
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            sock.sendall(mv[:n])


def send_sendfile(sock, path, size, buf=None):
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        out = sock.fileno()
        while off < size:
            n = os.sendfile(out, fd, off, size - off)
            if n == 0:
                raise EOFError(f"sendfile sent nothing at offset {off} of {size}")
            off += n
    finally:
        os.close(fd)


def _bounded(sock):
    """A blocking socket (so sendfile and sendall block in the kernel, as in real use) whose
    send and receive calls still fail after SOCK_TIMEOUT instead of hanging."""
    sock.settimeout(None)
    tv = struct.pack("ll", int(SOCK_TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    return sock


def transfer(sock, fn, path, size, buf, mode=0):
    """One transfer: header, the file, the receiver's ACK.  Returns
    (wall s, sender CPU s, receiver CPU s, bytes counted, xor)."""
    sock.sendall(HDR.pack(mode, size))
    c0 = _cpu()
    t0 = time.perf_counter()
    fn(sock, path, size, buf)
    got, acc, ru, rs = ACK.unpack(_recv_exact(sock, ACK.size))
    t1 = time.perf_counter()
    return t1 - t0, _cpu() - c0, ru + rs, got, acc


# ----------------------------------------------------------------------------- the study

def _median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def study(quick=False, log=_stderr, size=None, tmpdir=None, budget_s=None) -> dict:
    """Run both experiments and return a JSON-able dict (see ``markdown`` for the text)."""
    repeats = 3 if quick else 5
    budget_s = budget_s or (60.0 if quick else 150.0)
    t_start = time.monotonic()
    deadline = t_start + budget_s
    base = tmpdir or tempfile.gettempdir()
    free = shutil.disk_usage(base).free
    mem = _mem_available()
    notes = []
    if size is None:
        size = GiB
        if free < 3 * GiB:
            size = max(64 * MiB, min(256 * MiB, free // 4) // MiB * MiB)
            notes.append(f"only {free / GiB:.1f} GiB free in {base}: used a {size >> 20} MiB file instead of 1 GiB")
        if mem is not None and mem < size * 3:
            size = max(64 * MiB, mem // 4 // MiB * MiB)
            notes.append(f"only {mem / GiB:.1f} GiB of memory available: used a {size >> 20} MiB file")
    size = size // CHUNK * CHUNK
    res = {"file_bytes": size, "dir": base, "free_bytes": free, "repeats": repeats, "notes": notes,
           "read": [], "send": []}
    log(f"  temp dir {base}: {free / GiB:.1f} GiB free; file {size / GiB:.2f} GiB; {repeats} repeats; "
        f"budget {budget_s:.0f} s")
    d = tempfile.mkdtemp(prefix="shmring-primitives-", dir=base)
    path = os.path.join(d, "data.bin")
    child = lsock = sock = None
    big = None
    try:
        expect = make_file(path, size, log)
        buf = bytearray(CHUNK)
        got = read_chunked(path, size, buf)                  # warm the page cache
        if got != expect:
            raise RuntimeError(f"checksum of the warm-up read {got:#x} != {expect:#x} written")
        big = bytearray(size)
        big[::PAGE] = bytes(len(range(0, size, PAGE)))       # fault the big buffer in before timing

        def measure(label, fn, what, checked=True):
            runs = []
            for k in range(repeats):
                if runs and time.monotonic() > deadline:
                    res["notes"].append(f"time budget reached: {label} stopped after {len(runs)} repeats")
                    break
                f0 = _minflt()
                t0 = time.perf_counter()
                r = fn()
                dt = time.perf_counter() - t0
                faults = _minflt() - f0
                if checked and r != expect:
                    raise RuntimeError(f"{label}: checksum {r:#x} != {expect:#x} written")
                runs.append({"s": dt, "gbps": size / dt / 1e9, "minor_faults": faults})
            row = {"method": label, "what": what, "s": _median_of(runs, "s"), "gbps": _median_of(runs, "gbps"),
                   "minor_faults": _median_of(runs, "minor_faults"), "runs": runs}
            log(f"  {label:<52} {row['s']:.3f} s  {row['gbps']:6.2f} GB/s  {row['minor_faults']:>8.0f} faults")
            return row

        log("  read vs mmap (XOR checksum of uint64 words, warm page cache):")
        R = res["read"]
        R.append(measure("read: readinto 1 MiB buffer + XOR", lambda: read_chunked(path, size, buf),
                         "one copy per byte into a buffer that stays in cache, then a read of it"))
        R.append(measure("read: readinto 1 MiB buffer, no XOR", lambda: read_chunked(path, size, buf, False),
                         "the copy alone", checked=False))
        R.append(measure(f"read: readinto one {size >> 20} MiB buffer, then XOR",
                         lambda: read_whole(path, size, big),
                         "the copy lands in DRAM and is read back from there"))
        R.append(measure("mmap: fresh mapping + XOR", lambda: mmap_xor(path, size),
                         "no copy; pays the page faults"))
        R.append(measure("mmap: fresh mapping, one word per page", lambda: mmap_xor(path, size, touch_only=True),
                         "the page faults alone", checked=False))
        R.append(measure("mmap: MAP_POPULATE + XOR", lambda: mmap_xor(path, size, populate=True),
                         "no copy; the kernel fills the page table up front (timed)"))
        fd = os.open(path, os.O_RDONLY)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        os.close(fd)
        try:
            arr = np.frombuffer(mm, np.uint64)
            xor_reduce(arr)                                  # fault everything in, untimed
            R.append(measure("mmap: already-faulted mapping + XOR", lambda: int(xor_reduce(arr)),
                             "a pure read of the page cache: no copy, no faults"))
            del arr
        finally:
            mm.close()
        del big
        big = None

        log("  read+send vs sendfile over loopback TCP (127.0.0.1), receiver recv_into 1 MiB and counts:")
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        addr = lsock.getsockname()
        cpus = sorted(os.sched_getaffinity(0))
        pin = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
        child = mp.get_context("fork").Process(target=_receiver, args=(lsock, pin[1]), daemon=True,
                                               name="bench-primitives-receiver")
        child.start()
        lsock.close()
        lsock = None
        old_aff = os.sched_getaffinity(0)
        sock = _bounded(socket.create_connection(addr, timeout=SOCK_TIMEOUT))
        try:
            if pin[0] is not None:
                os.sched_setaffinity(0, {pin[0]})
            for label, fn, what in (
                    ("read+send: readinto 1 MiB + sendall", send_read,
                     "sender copies twice: page cache -> buffer -> socket"),
                    ("sendfile: os.sendfile", send_sendfile,
                     "sender hands page-cache pages to the socket: no copy through user space")):
                _, _, _, n, acc = transfer(sock, fn, path, size, buf, mode=1)      # verification, untimed
                if n != size or acc != expect:
                    raise RuntimeError(f"{label}: receiver got {n} bytes, XOR {acc:#x}; sent {size}, "
                                       f"XOR {expect:#x}")
                runs = []
                for k in range(repeats):
                    if runs and time.monotonic() > deadline:
                        res["notes"].append(f"time budget reached: {label} stopped after {len(runs)} repeats")
                        break
                    dt, scpu, rcpu, n, _ = transfer(sock, fn, path, size, buf)
                    if n != size:
                        raise RuntimeError(f"{label}: receiver counted {n} bytes of {size}")
                    runs.append({"s": dt, "gbps": size / dt / 1e9, "sender_cpu_s": scpu, "receiver_cpu_s": rcpu})
                row = {"method": label, "what": what, "s": _median_of(runs, "s"), "gbps": _median_of(runs, "gbps"),
                       "sender_cpu_s": _median_of(runs, "sender_cpu_s"),
                       "receiver_cpu_s": _median_of(runs, "receiver_cpu_s"), "runs": runs}
                log(f"  {label:<52} {row['s']:.3f} s  {row['gbps']:6.2f} GB/s  sender CPU {row['sender_cpu_s']:.3f} s"
                    f"  receiver CPU {row['receiver_cpu_s']:.3f} s")
                res["send"].append(row)
        finally:
            os.sched_setaffinity(0, old_aff)
        sock.close()
        sock = None
        child.join(10)
        if child.exitcode not in (0, None):
            raise RuntimeError(f"receiver exited with code {child.exitcode}")
    finally:
        if sock is not None:
            sock.close()
        if lsock is not None:
            lsock.close()
        if child is not None and child.is_alive():
            try:
                os.kill(child.pid, signal.SIGKILL)
            except OSError:
                pass
            child.join(5)
        shutil.rmtree(d, ignore_errors=True)
        res["cleaned_up"] = not os.path.exists(d)
    res["total_s"] = time.monotonic() - t_start
    res["interpretation"] = interpret(res)
    return res


# ----------------------------------------------------------------------------- what the numbers say

def _row(rows, prefix):
    for r in rows:
        if r["method"].startswith(prefix):
            return r
    return None


def interpret(res) -> list[str]:
    """A few sentences, each derived from the measured numbers of this run."""
    out = []
    R, S = res["read"], res["send"]
    rd, cp = _row(R, "read: readinto 1 MiB buffer + XOR"), _row(R, "read: readinto 1 MiB buffer, no XOR")
    whole = _row(R, "read: readinto one")
    fresh, touch = _row(R, "mmap: fresh mapping + XOR"), _row(R, "mmap: fresh mapping, one word")
    pop, warm = _row(R, "mmap: MAP_POPULATE"), _row(R, "mmap: already-faulted")
    gb = res["file_bytes"] / 1e9
    if rd and cp and warm:
        out.append(
            f"read() costs one copy per byte: the copy alone (readinto, no checksum) runs at {cp['gbps']:.1f} GB/s, "
            f"and with the checksum the pass takes {rd['s']:.3f} s ({rd['gbps']:.1f} GB/s), about the copy time "
            f"({cp['s']:.3f} s) plus a read of an in-cache buffer; the same checksum over the already-mapped page "
            f"cache, with no copy, takes {warm['s']:.3f} s ({warm['gbps']:.1f} GB/s): the copy is "
            f"{100 * (rd['s'] - warm['s']) / rd['s']:.0f}% of the read() pass.")
    if whole and rd:
        out.append(
            f"Reading the whole file into one {res['file_bytes'] >> 20} MiB buffer first ({whole['gbps']:.1f} GB/s) "
            f"is {'slower' if whole['s'] > rd['s'] else 'no slower'} than 1 MiB chunks ({rd['gbps']:.1f} GB/s): "
            "the copy then goes to DRAM and the checksum reads it back from DRAM, instead of reading a buffer "
            "that is still in cache.")
    if fresh and touch and warm:
        fault_us = 1e6 * touch["s"] / max(1, touch["minor_faults"])
        per = res["file_bytes"] / PAGE / max(1, fresh["minor_faults"])
        how = (f"~{per:.0f} pages per fault on average: most of this file's page cache is mapped in 2 MiB "
               "pieces, large folios, so faults are rare and cheap here" if per >= 64 else f"fault-around maps ~{per:.0f} pages per fault" if per > 1.5 else
               "one page per fault")
        out.append(
            f"mmap() avoids the copy but a fresh mapping pays page faults: {fresh['minor_faults']:.0f} minor "
            f"faults per pass for {res['file_bytes'] // PAGE} pages: {how}; "
            f"touching one word per page costs {touch['s']:.3f} s (~{fault_us:.1f} us per fault), and the "
            f"fresh-mapping checksum takes {fresh['s']:.3f} s ({fresh['gbps']:.1f} GB/s) against "
            f"{warm['s']:.3f} s once the mapping exists.")
    if fresh and rd:
        better = "faster" if fresh["s"] < rd["s"] else "slower"
        out.append(
            f"Net, for one pass over a {gb:.2f} GB file, a fresh mmap is {better} than read() "
            f"({fresh['gbps']:.1f} vs {rd['gbps']:.1f} GB/s); a mapping that is reused (as a shmring segment is: "
            f"mapped once, faulted once) reads at {warm['gbps']:.1f} GB/s with no per-pass cost at all. "
            "That is the case for shared memory: the setup cost (faults) is paid once, the copy is never paid.")
    if pop and fresh:
        out.append(
            f"MAP_POPULATE moves the faults into mmap() itself ({pop['minor_faults']:.0f} faults counted, "
            f"{pop['gbps']:.1f} GB/s for map+checksum vs {fresh['gbps']:.1f} GB/s faulting lazily).")
    rs, sf = _row(S, "read+send"), _row(S, "sendfile")
    if rs and sf:
        speed = rs["s"] / sf["s"]
        verdict = (f"sendfile is {speed:.2f}x as fast" if speed >= 1.1 else
                   f"about the same ({speed:.2f}x)" if speed > 0.9 else
                   f"sendfile is slower: {speed:.2f}x the speed of read+send")
        text = (f"Loopback TCP: read+send moves {rs['gbps']:.1f} GB/s and sendfile {sf['gbps']:.1f} GB/s ({verdict}). "
                "read+send copies each byte twice on the sending side (page cache -> user buffer -> socket "
                "buffer); sendfile skips both and hands page-cache pages to the socket. ")
        a, b = rs["sender_cpu_s"], sf["sender_cpu_s"]
        if b < 0.9 * a:
            text += (f"The sender's CPU time per pass drops from {a:.3f} s to {b:.3f} s: the copies it skips "
                     "were real work.")
        else:
            text += (f"Yet the sender's CPU time per pass is {a:.3f} s with read+send and {b:.3f} s with "
                     "sendfile: on loopback the copies it skips were not the expensive part (readinto's copy "
                     f"alone ran at {cp['gbps']:.0f} GB/s above), and what replaces them, handing every page "
                     "to the socket and releasing it once the receiver has copied it, costs as much or more.")
        text += (f" The receiver copies every byte out of the socket either way (its CPU time: {rs['receiver_cpu_s']:.3f} s "
                 f"vs {sf['receiver_cpu_s']:.3f} s); with sendfile it copies from the page-cache pages themselves "
                 "rather than from a socket buffer the sender has just written.")
        if max(sf["sender_cpu_s"], sf["receiver_cpu_s"]) < 0.7 * sf["s"]:
            text += (f" Neither side is busy all the time ({sf['sender_cpu_s']:.3f} s and {sf['receiver_cpu_s']:.3f} s "
                     f"of CPU in {sf['s']:.3f} s of wall time with sendfile): the rest is the two sides waiting "
                     "for each other on socket-buffer space and data.")
        text += (" A zero-copy primitive pays off when the copy it removes is the bottleneck (large transfers "
                 "to a real NIC, data not otherwise touched); it is not free.")
        out.append(text)
    out.append("Every byte a socket carries is copied at least once into the receiver's memory; a shared-memory "
               "ring skips even that: the producer's one copy (or none, writing in place) is all there is, "
               "and the consumer reads the producer's bytes where they are.")
    return out


def markdown(res) -> str:
    gib = res["file_bytes"] / GiB
    lines = [f"Zero-copy primitives (python -m bench.primitives): a {gib:.2f} GiB file in {res['dir']} "
             f"(regular file, warm page cache), {res['repeats']} repeats, median shown; total {res['total_s']:.0f} s; "
             f"temporary files {'removed' if res.get('cleaned_up') else '**NOT removed**'}.", ""]
    for n in res.get("notes", []):
        lines += [f"Note: {n}", ""]
    lines += ["| read vs mmap: XOR checksum of uint64 words | s | GB/s | minor faults | what it shows |",
              "|---|---:|---:|---:|---|"]
    for r in res["read"]:
        lines.append(f"| {r['method']} | {r['s']:.3f} | {r['gbps']:.2f} | {r['minor_faults']:.0f} | {r['what']} |")
    lines += ["", "| loopback TCP, receiver counts bytes | s | GB/s | sender CPU s | receiver CPU s | what it shows |",
              "|---|---:|---:|---:|---:|---|"]
    for r in res["send"]:
        lines.append(f"| {r['method']} | {r['s']:.3f} | {r['gbps']:.2f} | {r['sender_cpu_s']:.3f} | "
                     f"{r['receiver_cpu_s']:.3f} | {r['what']} |")
    lines += ["", "What the numbers show:", ""]
    lines += [f"- {t}" for t in res.get("interpretation", [])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.primitives", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 5, 60 s budget")
    ap.add_argument("--size-mib", type=int, help="file size in MiB (default 1024, less if disk or memory is short)")
    ap.add_argument("--dir", help="where to make the temporary directory (default: the system temp dir)")
    ap.add_argument("--budget", type=float, help="time budget in seconds (default 150, --quick 60)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    from . import report
    minfo = report.machine()
    print(f"Machine: {minfo['cpu']}, {minfo['cores']} cores ({minfo['cores_usable']} usable), {minfo['kernel']}, "
          f"Python {minfo['python']}, numpy {minfo['numpy']}, {minfo['date']}  ", flush=True)
    res = study(quick=args.quick, size=args.size_mib * MiB if args.size_mib else None, tmpdir=args.dir,
                budget_s=args.budget)
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": minfo, "primitives": res}, f, indent=1)
    return 0 if res.get("cleaned_up") else 1


if __name__ == "__main__":
    sys.exit(main())
