"""The ``shmring`` command (also ``python -m shmring``)."""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time

from . import layout as L
from ._proc import alive
from .errors import ShmringError
from .segment import PREFIX, SHM_DIR, entry_kind, in_use, list_entries


def _size(text: str) -> int:
    t = text.strip().lower()
    for suffix, mul in (("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30), ("k", 1 << 10),
                        ("m", 1 << 20), ("g", 1 << 30), ("", 1)):
        if t.endswith(suffix):
            num = t[: len(t) - len(suffix)] if suffix else t
            try:
                return int(float(num) * mul)
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64k, 1MiB)")


GRACE = 10.0        # seconds a not-yet-ready segment is presumed to be under construction


def _where(name, path) -> str:
    """The file behind a segment name, or the file-backed ring's own path."""
    return os.fspath(path) if path is not None else os.path.join(SHM_DIR, PREFIX + name)


def _raw_header(name: str | None, path=None) -> tuple[dict | None, float | None, str | None]:
    """(fixed header fields, age in seconds from the file's mtime, error) read
    without validating anything and without waiting for a creator."""
    from .segment import Segment
    try:
        seg = Segment.open(name, path=path, wait_ready=0, allow_foreign_owner=True)    # read to report, any owner
    except ShmringError as e:
        try:
            mtime = os.stat(_where(name, path), follow_symlinks=False).st_mtime
        except OSError:
            mtime = None
        return None, None if mtime is None else time.time() - mtime, str(e)
    try:
        return L.read_header(seg.buf), None, None
    finally:
        seg.close()


def _creator(h: dict | None) -> dict:
    if not h or not h.get("creator_pid"):
        return {"pid": None, "alive": False}
    pid = h["creator_pid"]
    return {"pid": pid, "alive": alive(pid, h["creator_start"] & 0xFFFFFFFF)}


def _describe(name: str | None, path=None) -> dict:
    """One segment (or, with ``path``, a file-backed ring or state) as a dict:
    a ring's or a shared state's stats(), normalized with kind, size, fill,
    the live pids that use it and its age; or an error."""
    h, age, err = _raw_header(name, path)
    label = name if path is None else os.fspath(path)
    if h is None:
        return {"name": label, "kind": "?", "error": err, "age_s": age, "creator": _creator(None)}
    if h["magic"] != L.MAGIC or h["ready"] != 1:      # attach would wait a second, then refuse it
        if h["magic"] == L.MAGIC or h["magic"] == 0:
            err = (f"segment {name!r} is not initialized (ready flag {h['ready']}); its creator "
                   f"{'(pid %d) ' % h['creator_pid'] if h['creator_pid'] else ''}may have died creating it")
        else:
            err = f"segment {name!r} is not a shmring segment: magic {h['magic']:#018x}"
        return {"name": label, "kind": "?", "error": err, "age_s": _seg_age(name, path),
                "creator": _creator(h if h["magic"] == L.MAGIC else None)}
    try:
        obj = _inspect(name, h["kind"], path)
    except ShmringError as e:
        return {"name": label, "kind": "?", "error": str(e), "age_s": _seg_age(name, path),
                "creator": _creator(h if h["magic"] == L.MAGIC else None)}
    try:
        st = obj.stats()
        st["owner_uid"] = obj._seg.owner_uid
    finally:
        obj.close()
        del obj                 # its mapping, and with it its attach lock, goes now (gc tests the lock)
    st["creator"] = _creator(h)
    st["age_s"] = round(time.time() - st["created_ns"] / 1e9, 1)
    st["size"] = h["segment_size"]
    if "producers" in st:                       # a multi-party ring
        users = [r["pid"] for r in st["producers"] + st["consumers"] + [st.get("consumer") or {}]
                 if r.get("pid") and r.get("alive")]
    elif "write_pos" in st:                     # a ring
        users = [r["pid"] for r in (st["producer"], st["consumer"]) if r["pid"] and r["alive"]]
    else:                                       # a shared state
        st["kind"] = "state"
        st["fill"] = st["slots_pinned"] / max(1, st["slots"])
        users = [st["writer"]["pid"]] if st["writer"]["pid"] and st["writer"]["alive"] else []
    st["live_users"] = users
    if "write_pos" in st:
        room = st.get("slots", st["capacity"])
        if not 0 <= st["used"] <= room:         # positions are untrusted: never print them as a fill
            st["fill"] = None
            st["invalid"] = (f"positions write {st['write_pos']:,}, read {st['read_pos']:,} are impossible "
                             f"for {room:,} {'records' if 'slots' in st else 'bytes'} (corrupt or forged header)")
    return st


def _fill(st: dict) -> str:
    unit = "records" if "dtype" in st else "bytes"
    if st["fill"] is None:
        return f"  fill         invalid: {st['invalid']}"
    return f"  fill         {st['fill'] * 100:5.1f}%  ({st['used']:,} of {st.get('slots', st['capacity']):,} {unit})"


def _inspect(name: str | None, kind: int, path=None):
    """A Ring or SharedState over the segment, validated but not made ready
    for use: any owner's (shown as owner_uid), no space reserved, nothing
    prefaulted, nothing recovered: looking at a segment never allocates it."""
    from .segment import Segment, validate_header
    seg = Segment.open(name, path=path, allow_foreign_owner=True)
    try:
        if kind == L.KIND_STATE:
            from .snapshot import SharedState, _validate_state_header
            return SharedState(seg, _validate_state_header(seg), created=False)
        from .ring import Ring
        return Ring(seg, validate_header(seg), created=False)
    except BaseException:
        seg.close()
        raise


def _skipped(name: str, entry: str) -> dict:
    return {"name": name, "kind": "?", "skipped": True, "entry": entry, "age_s": _seg_age(name),
            "error": f"{entry}, not a segment: skipped ({os.path.join(SHM_DIR, PREFIX + name)})"}


def _seg_age(name, path=None):
    try:
        return round(time.time() - os.stat(_where(name, path), follow_symlinks=False).st_mtime, 1)
    except OSError:
        return None


def _human(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or n == int(n) else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _age(s) -> str:
    if s is None:
        return "-"
    s = max(0, int(s))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h" if s < 172800 else f"{s // 86400}d"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _pid(role: dict) -> str:
    if not role or not role.get("pid"):
        return "-"
    return f"{role['pid']}" + ("" if role["alive"] else "(dead)")


def _ls_head(w: int = 22) -> str:
    return f"{'NAME':{w}} {'KIND':9} {'SIZE':>7} {'FILL':>6} {'PRODUCER':>12} {'CONSUMER':>12} {'AGE':>6}"


LS_HEAD = _ls_head()


def _ls_row(r: dict, w: int = 22) -> str:
    """One line of ``ls``: the name in full (the column is as wide as the
    longest), so it can be pasted into ``stat``; an error's reason in full."""
    name = r["name"]
    if "error" in r:
        err = r["error"].replace(f"segment {r['name']!r} ", "")
        return f"{name:{w}} {'?':9} " + err
    if r["kind"] == "state":
        prod, cons = _pid(r["writer"]), f"{r['readers']} readers"
    elif "producers" in r:
        live = lambda rows: sum(1 for x in rows if x.get("alive"))      # noqa: E731
        prod = f"{live(r['producers'])} live"
        cons = _pid(r["consumer"]) if r["kind"] == "mpsc" else f"{live(r['consumers'])} live"
    else:
        prod, cons = _pid(r["producer"]), _pid(r["consumer"])
    if r.get("fill", 0) is None:
        return f"{name:{w}} {r['kind']:9} {_human(r['size']):>7} invalid positions: corrupt or forged"
    return (f"{name:{w}} {r['kind']:9} {_human(r['size']):>7} {r['fill'] * 100:5.1f}% "
            f"{_fit(prod, 12):>12} {_fit(cons, 12):>12} {_age(r['age_s']):>6}")


def _gone(row: dict, name: str) -> bool:
    """A segment unlinked between the directory listing and our look at it
    (a ring's `with` block ending, gc): not an error to report, just gone."""
    return "error" in row and not os.path.lexists(_where(name, None))


def cmd_ls(args) -> int:
    rows = [_describe(n) if odd is None else _skipped(n, odd) for n, odd in list_entries()]
    rows = [r for r in rows if not _gone(r, r["name"])]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no shmring segments in {SHM_DIR}")
        return 0
    w = max(22, *(len(r["name"]) for r in rows))
    print(_ls_head(w))
    for r in rows:
        print(_ls_row(r, w))
    return 0


def _owner(st: dict) -> str:
    """', owner uid N' for a segment another user owns."""
    uid = st.get("owner_uid")
    return "" if uid is None or uid == os.geteuid() else f", owner uid {uid}"


def _stat_lines(st: dict, prev: dict | None, dt: float) -> list[str]:
    if st["kind"] == "state":
        lines = [f"{st['name']}  shared state, {st['slots']} slots of {_human(st['nbytes'])}, "
                 f"age {_age(st['age_s'])}{_owner(st)}",
                 f"  version      {st['version']:,}",
                 f"  pinned slots {st['slots_pinned']}/{st['slots']}  pins {st['pins']}",
                 f"  writer       {_pid(st['writer'])}  sessions {st['writer']['sessions']}",
                 f"  readers      {st['readers']} live of {st['max_readers']}",
                 f"  reclaimed    {st['reclaimed_pins']} dead pins; writer waited {st['writer_waits']} times"]
        if prev is not None and dt > 0:
            lines.append(f"  rate         {(st['version'] - prev['version']) / dt:,.1f} versions/s")
        return lines
    if "producers" in st:
        return _multi_stat_lines(st, prev, dt)
    lines = [f"{st['name'] or st['path']}  {st['kind']} ring, capacity {_human(st['capacity'])}, "
             f"age {_age(st['age_s'])}{_owner(st)}" + (f", records of {st['dtype']}" if "dtype" in st else ""),
             _fill(st),
             f"  positions    write {st['write_pos']:,}  read {st['read_pos']:,}",
             f"  producer     {_pid(st['producer'])}  sessions {st['producer']['sessions']}",
             f"  consumer     {_pid(st['consumer'])}  sessions {st['consumer']['sessions']}",
             f"  stream       {st['closed'] or 'open'}"]
    if prev is not None and dt > 0:
        win = (st["write_pos"] - prev["write_pos"]) / dt
        rout = (st["read_pos"] - prev["read_pos"]) / dt
        if "dtype" in st:
            lines.append(f"  rates        in {win:,.0f} records/s  out {rout:,.0f} records/s")
        else:
            lines.append(f"  rates        in {win / 1e6:,.2f} MB/s  out {rout / 1e6:,.2f} MB/s")
    return lines


def _multi_stat_lines(st: dict, prev: dict | None, dt: float) -> list[str]:
    """stat of an mpsc / broadcast / mpmc ring: tables and counters."""
    lines = [f"{st['name'] or st['path']}  {st['kind']} ring, capacity {_human(st['capacity'])}, "
             f"age {_age(st['age_s'])}{_owner(st)}" + (f", policy {st['policy']}" if st["kind"] == "broadcast" else ""),
             _fill(st),
             f"  positions    claimed {st['write_pos']:,}  released {st['read_pos']:,}"
             + (f"  taken {st['take_pos']:,}" if "take_pos" in st else ""),
             f"  producers    {st['producer_sessions']} joined, {st['producers_ended']} ended "
             f"({st['producers_aborted']} on an error), {st['producers_dead']} died; sent {st['sent']:,}"]
    for p in st["producers"]:
        lines.append(f"    [{p['slot']}] {_pid(p):>14}  sent {p['sent']:,}  ({_human(p['bytes'])})")
    if st["kind"] == "mpsc":
        lines.append(f"  consumer     {_pid(st['consumer'])}  received {st['consumer']['received']:,}")
    else:
        what = "subscribers " if st["kind"] == "broadcast" else "consumers   "
        lines.append(f"  {what} {sum(1 for c in st['consumers'] if c['alive'])} live")
        for c in st["consumers"]:
            extra = ""
            if st["kind"] == "broadcast":
                extra = "  evicted" if c["evicted"] else f"  lag {_human(c['lag'] or 0)}"
            lines.append(f"    [{c['slot']}] {_pid(c):>14}  received {c['received']:,}{extra}")
    lines.append(f"  counters     abandoned claims {st['abandoned']}  evicted {st['evicted']}  dropped "
                 f"{st['dropped']}  redelivered {st['redelivered']}")
    lines.append(f"  stream       {st['closed'] or 'open'}")
    if prev is not None and dt > 0:
        lines.append(f"  rates        in {(st['write_pos'] - prev['write_pos']) / dt / 1e6:,.2f} MB/s  "
                     f"sent {(st['sent'] - prev['sent']) / dt:,.0f} msg/s")
    return lines


def cmd_stat(args) -> int:
    if (args.name is None) == (args.path is None):
        args.parser.error("give a segment NAME or --path FILE (a file-backed ring or state), one of them")
    st = _describe(args.name, args.path)
    if "error" in st:
        print(f"shmring stat: {st['error']}", file=sys.stderr)
        return 1
    if not args.watch:
        print(json.dumps(st, indent=2) if args.json else "\n".join(_stat_lines(st, None, 0)))
        return 0
    tty = sys.stdout.isatty() and not args.json
    prev, t_prev, n = None, None, 0
    try:
        while True:
            t = time.monotonic()
            st = _describe(args.name, args.path)
            if "error" in st:
                print(f"shmring stat: {st['error']}", file=sys.stderr)
                return 1
            if args.json:
                if prev is not None:
                    dt = t - t_prev
                    if "write_pos" in st:
                        st["rate_in_Bps"] = (st["write_pos"] - prev["write_pos"]) / dt
                        st["rate_out_Bps"] = (st["read_pos"] - prev["read_pos"]) / dt
                    else:
                        st["versions_per_s"] = (st["version"] - prev["version"]) / dt
                print(json.dumps(st), flush=True)
            else:
                lines = _stat_lines(st, prev, (t - t_prev) if t_prev else 0)
                if tty:
                    sys.stdout.write("\x1b[H\x1b[J")     # home, clear: refresh in place
                print("\n".join(lines + ["", f"every {args.interval:g} s; Ctrl-C to stop"]), flush=True)
            prev, t_prev, n = st, t, n + 1
            if args.count and n >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def gc_plan(names=None, *, force=False, grace=GRACE) -> list[dict]:
    """What ``shmring gc`` would do: one dict per segment with ``action``
    (``remove`` / ``keep``) and ``why``."""
    plan = []
    for name in ([n for n, _ in list_entries()] if names is None else names):
        try:
            mode = os.lstat(os.path.join(SHM_DIR, PREFIX + name)).st_mode
        except OSError:
            plan.append({"name": name, "kind": "?", "action": "missing", "why": "no such segment"})
            continue
        if not stat.S_ISREG(mode):              # a directory, FIFO, link...: not ours to judge or remove
            plan.append({"name": name, "kind": "?", "action": "skip",
                         "why": f"{entry_kind(mode)}, not a segment: left alone (remove it by hand if unwanted)"})
            continue
        used = in_use(name)
        r = _describe(name)
        if used:
            pids = r.get("live_users") or []
            act, why = "keep", ("in use: attached by live process(es)"
                                + (" incl. pid(s) " + ", ".join(map(str, pids)) if pids else ""))
        elif used is None:
            act, why = "keep", "cannot tell whether it is in use (no write access to it)"
        elif "error" in r:
            if r.get("age_s") is not None and r["age_s"] < grace:
                act, why = "keep", f"unreadable and younger than {grace:g} s (may be being created): {r['error']}"
            elif force:
                act, why = "remove", f"foreign or corrupt, attached by nobody (--force): {r['error']}"
            else:
                act, why = "keep", f"foreign or corrupt; remove with --force: {r['error']}"
        else:
            act, why = "remove", "no process has it attached"
        plan.append({"name": name, "kind": r.get("kind", "?"), "action": act, "why": why})
    return plan


def cmd_gc(args) -> int:
    from .segment import remove_if_unused
    plan = gc_plan(args.names or None, force=args.force, grace=args.grace)
    rc = 0
    for i, item in enumerate(plan):
        if item["action"] == "remove" and not args.dry_run:
            # Decided again, and removed, under the attach lock: a process that
            # attached meanwhile keeps it (shmring.liveness).
            try:
                done = remove_if_unused(item["name"])
            except ShmringError as e:
                done, item["why"] = "failed", str(e)
            if done is True:
                item["action"] = "removed"
            elif done is False:
                item["action"], item["why"] = "keep", "in use: a process attached meanwhile"
            else:
                item["action"] = "failed"
                item["why"] = item["why"] if done == "failed" else "it vanished, or cannot be locked"
                rc = 1
    if args.json:
        print(json.dumps(plan, indent=2))
        return rc
    if not plan:
        print(f"no shmring segments in {SHM_DIR}")
    verb = {"remove": "would remove" if args.dry_run else "remove", "removed": "removed", "keep": "kept",
            "failed": "FAILED", "missing": "missing", "skip": "skipped"}
    for item in plan:
        print(f"{verb[item['action']]:12} {item['name']}: {item['why']}")      # the reason in full
    return rc


def cmd_rm(args) -> int:
    """Remove segments by name.  One that a live process has attached is
    refused unless --force (decided and removed under its attach lock, as gc
    does, so a process attaching meanwhile keeps it)."""
    from .segment import remove_if_unused, unlink, validate_name
    rc, rows = 0, []
    for name in args.names:
        try:
            validate_name(name)
            if args.force:
                unlink(name)
                done = True
            else:
                done = remove_if_unused(name)
                if done is None and os.path.lexists(_where(name, None)):
                    raise ShmringError(f"cannot tell whether segment {name!r} is in use (no write access to it); "
                                       "rm --force removes it anyway")
                if done is None:
                    unlink(name)             # gone: says "does not exist"
                if done is False:
                    pids = [str(p) for p in (_describe(name).get("live_users") or [])]
                    raise ShmringError(f"segment {name!r} is in use: attached by live process(es)"
                                       + (f" incl. pid(s) {', '.join(pids)}" if pids else "")
                                       + "; close them first, or rm --force removes it (they keep their "
                                         "mapping; new processes can no longer attach)")
            rows.append({"name": name, "action": "removed"})
            if not args.json:
                print(f"removed {name}")
        except ShmringError as e:
            rows.append({"name": name, "action": "failed", "why": str(e)})
            if not args.json:
                print(f"shmring rm: {e}", file=sys.stderr)
            rc = 1
    if args.json:
        print(json.dumps(rows, indent=2))
    return rc


def cmd_demo(args) -> int:
    from . import demo
    try:      # every option checked before anything starts: one line, status 2 (a usage error)
        demo.check_options(args.which, seconds=args.seconds, size=args.size, frames=args.frames,
                           workers=args.workers, capacity=args.capacity)
    except ValueError as e:
        print(f"shmring demo: {e}", file=sys.stderr)
        return 2
    opt = lambda v, default: default if v is None else v       # noqa: E731
    if args.which == "pipeline":
        return demo.run_pipeline(frames=opt(args.frames, 5000), workers=opt(args.workers, 4),
                                 capacity=opt(args.capacity, 1 << 24), progress=True)
    return demo.run(seconds=opt(args.seconds, 3.0), frame_bytes=opt(args.size, 1 << 20),
                    capacity=opt(args.capacity, 1 << 26))


def main(argv=None) -> int:
    from ._version import __version__
    ap = argparse.ArgumentParser(prog="shmring", description="zero-copy IPC rings over shared memory")
    ap.add_argument("--version", action="version", version=f"shmring {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="a self-checking demo: stream (default) or pipeline",
                       description="stream: a producer process streams arrays to a consumer process. "
                                   "pipeline: a source, 4 worker processes and a sink (shmring.Pipeline) "
                                   "blur and check image frames, with live progress bars.")
    d.add_argument("which", nargs="?", choices=("stream", "pipeline"), default="stream",
                   help="which demo (default stream)")
    d.add_argument("--seconds", type=float, help="stream: how long the producer sends (default 3)")
    d.add_argument("--size", type=_size, help="stream: frame size (default 1MiB)")
    d.add_argument("--frames", type=int, help="pipeline: frames the source sends (default 5000)")
    d.add_argument("--workers", type=int, help="pipeline: blur_and_halve worker processes (default 4)")
    d.add_argument("--capacity", type=_size,
                   help="ring capacity, a power of two (default: stream 64MiB, pipeline 16MiB per ring)")
    d.set_defaults(func=cmd_demo)
    s = sub.add_parser("ls", help="list shmring segments")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ls)
    s = sub.add_parser("stat", help="show one segment's state (--watch: live, with rates)")
    s.add_argument("name", nargs="?", help="the segment name, as ls shows it")
    s.add_argument("--path", help="a file-backed ring or state (Ring.create(path=...)) instead of a name")
    s.set_defaults(parser=s)
    s.add_argument("--json", action="store_true", help="JSON (one object per line with --watch)")
    s.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    s.add_argument("--count", type=int, default=0, help="with --watch: stop after N refreshes")
    s.set_defaults(func=cmd_stat)
    s = sub.add_parser("gc", help="remove segments whose processes are all dead")
    s.add_argument("names", nargs="*", help="only these segments (default: every shmring segment)")
    s.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    s.add_argument("--force", action="store_true", help="also remove foreign or corrupt shmring.* segments")
    s.add_argument("--grace", type=float, default=GRACE,
                   help=f"leave unreadable segments younger than this alone (default {GRACE:g} s)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_gc)
    s = sub.add_parser("rm", help="remove segments by name (not one in use, unless --force)")
    s.add_argument("names", nargs="+")
    s.add_argument("--force", action="store_true", help="also remove segments live processes have attached")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_rm)
    from . import bridge, record              # issue 18: record / replay / bridge
    record.add_commands(sub, _size)
    bridge.add_commands(sub)
    args = ap.parse_args(argv)
    try:
        rc = args.func(args)
        sys.stdout.flush()            # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        # `shmring ls --json | head -1`: the reader left; end quietly, as ls or
        # cat would (128 + SIGPIPE), and keep the exit-time flush from failing again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ShmringError, ValueError, OSError) as e:
        # (OSError: a file that cannot be opened or written, a full disk: the
        # system's message says which)
        print(f"shmring {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
