"""Machine description, the markdown table, results.json and the optional plot."""
from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata

import numpy as np

WORKLOAD_ORDER = ["limits", "64B-stream", "4KiB-stream", "1MiB-stream", "16MiB-stream", "1MiB-stream-sum",
                  "16MiB-stream-sum", "pingpong-64B-median", "pingpong-64B-p99",
                  "pingpong-64B-idle-median", "pingpong-64B-idle-p99"]
COPYTO = "np.copyto (1 process)"
COPYTO_RING = "np.copyto into shm, ring-sized rotation (1 process)"
COPYTO_RING_PRIVATE = "np.copyto, ring-sized rotation in private memory (1 process)"
SUM_REF = "np.sum (1 process)"
LIMIT_COPY_BIG = "memcpy: np.copyto 256 MiB (> L3)"
LIMIT_READ_1M = "read: XOR-reduce uint64, 1 MiB (in cache)"
LIMIT_READ_BIG = "read: XOR-reduce uint64, 256 MiB (> L3)"
LIMIT_SUM_BIG = "read+add: np.sum float32, 256 MiB (> L3)"
LIMIT_LABELS = (LIMIT_COPY_BIG, LIMIT_READ_1M, LIMIT_READ_BIG, LIMIT_SUM_BIG)
LOOPS = "the bench's loops alone, no IPC (1 process)"      # the message rows' own Python, no transport
REFERENCES = (COPYTO, COPYTO_RING, COPYTO_RING_PRIVATE, SUM_REF, LOOPS) + LIMIT_LABELS
SPIN_FLOOR = "raw shm word spin (Python)"
SEM_FLOOR = "raw posix_ipc.Semaphore pair"
PEER_DISTS = ("iceoryx2", "eclipse-zenoh", "ray", "torch", "pyarrow")     # optional peers: versions in the header


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "shmring": _version("shmring"),
        "pyzmq": _version("pyzmq"),
        "faster-fifo": _version("faster-fifo"),
        "posix_ipc": _version("posix_ipc"),
        "peers": {d: _version(d) for d in PEER_DISTS},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        import zmq
        info["libzmq"] = zmq.zmq_version()
    except Exception:       # noqa: BLE001
        pass
    return info


def machine_lines(m: dict, run: dict) -> list[str]:
    zmq = f"pyzmq {m['pyzmq']}" + (f" (libzmq {m['libzmq']})" if "libzmq" in m else "")
    return [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['kernel']}, "
        f"Python {m['python']}, numpy {m['numpy']}",
        f"Versions: shmring {m['shmring']}, {zmq}, faster-fifo {m['faster-fifo']}, posix_ipc {m['posix_ipc']}"
        + "".join(f", {d} {v}" for d, v in m.get("peers", {}).items()),
        f"Run: {run['mode']}, {run['repeats']} repeats after warm-up (median shown), "
        f"{'producer and consumer pinned to CPUs 0 and 1' if run.get('pin') else 'not pinned'}, {m['date']}"
        + (f", total {run['total_s']:.0f} s" if "total_s" in run else ""),
    ] + ([run["memory"]["line"]] if run.get("memory") else [])


# ----------------------------------------------------------------------------- ratios and notes

def _better(row, ref):
    """How many times better ``row`` is than ``ref`` (> 1: better), or None."""
    if ref is None or row.get("median") is None or ref.get("median") is None:
        return None
    a, b = row["median"], ref["median"]
    if a <= 0 or b <= 0:
        return None
    return a / b if row["higher_better"] else b / a


def _find(rows, workload, transport):
    for r in rows:
        if r["workload"] == workload and r["transport"] == transport and r.get("median") is not None:
            return r
    return None


def _is_msg(workload):
    """A message-stream workload ("64B-stream", "4KiB-stream"), not an array one."""
    return workload.endswith("B-stream") and not workload.endswith("MiB-stream")


def _msg_bytes(workload):
    """Payload bytes per message of a message-stream workload ("64B-stream", "4KiB-stream")."""
    n = workload.split("-", 1)[0]
    return int(n[:-3]) << 10 if n.endswith("KiB") else int(n[:-1])


def limit_of(rows, r):
    """The physical limit a row is measured against: (percent, short label) or None.

    Arrays: the single-core np.copyto of the same size (the send copy) for the stream
    workloads, np.sum of the same size (the consumer's read) for the -sum workloads.
    Messages: payload bytes/s against np.copyto of 1 MiB (a copy in cache: what the bytes
    alone would cost).  Ping-pong: the raw floor of the same kind (higher % = closer)."""
    w, t, v = r["workload"], r["transport"], r.get("median")
    if v is None or t in REFERENCES:
        return None
    if w.endswith("MiB-stream"):
        if "reserve" in t:
            return None            # no copy at all: not comparable with the copy limit
        ref, label = _find(rows, w, COPYTO), "copy"
    elif w.endswith("MiB-stream-sum"):
        ref, label = _find(rows, w, SUM_REF), "sum"
    elif _is_msg(w):
        ref, label = _find(rows, "1MiB-stream", COPYTO), "copy (1 MiB)"
        if ref:
            return 100 * v * 1e6 * _msg_bytes(w) / 1e9 / ref["median"], label
        return None
    elif w.startswith("pingpong"):
        busy = r["shm_ref"] == "shmring busy-poll (spin=1 s)"
        if t in (SPIN_FLOOR, SEM_FLOOR):
            return None
        ref, label = _find(rows, w, SPIN_FLOOR if busy else SEM_FLOOR), "spin floor" if busy else "sem floor"
        if ref:
            return 100 * ref["median"] / v, label
        return None
    else:
        return None
    return (100 * v / ref["median"], label) if ref else None


def finish_rows(rows):
    """Fill in the ratio columns, the fraction of the physical limit and the computed notes
    (target checks)."""
    for r in rows:
        lim = limit_of(rows, r)
        if lim:
            r["pct_of_limit"], r["limit"] = lim
        r["x_queue"] = _better(r, _find(rows, r["workload"], r["queue_ref"])) if r["queue_ref"] else None
        r["x_shmring"] = _better(r, _find(rows, r["workload"], r["shm_ref"])) if r["shm_ref"] else None
        notes = [r["note"]] if r.get("note") else []
        if r.get("median") is not None:
            w, t, v = r["workload"], r["transport"], r["median"]
            if w.endswith("MiB-stream") and t not in REFERENCES and "reserve" not in t:
                c = _find(rows, w, COPYTO)
                c2 = _find(rows, w, COPYTO_RING)
                pcts = []
                if c:
                    r["pct_of_copyto"] = 100 * v / c["median"]
                    pcts.append(f"{r['pct_of_copyto']:.0f}% of np.copyto")
                if c2:
                    r["pct_of_copyto_ring"] = 100 * v / c2["median"]
                    pcts.append(f"{r['pct_of_copyto_ring']:.0f}% of ring-sized copyto")
                if pcts and t == "shmring send(arr)":
                    pcts[0] = f"**{pcts[0]}** (target >= 90%)"
                if pcts and (t.startswith("shmring") or r.get("pct_of_copyto", 0) >= 20):
                    notes.insert(0, ", ".join(pcts))
            if w == "64B-stream" and t.startswith("shmring"):
                target = 5.0 if "recv_bytes" in t else 3.0
                notes.insert(0, f"target >= {target:g} M/s: {'met' if v >= target else '**missed**'}")
            if _is_msg(w) and t not in REFERENCES:
                loops = _find(rows, w, LOOPS)
                if loops:
                    r["pct_of_loops"] = 100 * v / loops["median"]
                    if t.startswith("shmring"):
                        notes.insert(0, f"{r['pct_of_loops']:.0f}% of the bench's loops alone "
                                        f"({_num(loops['median'])} M/s)")
            if _is_msg(w) and t != LOOPS:
                r["payload_gbps"] = v * 1e6 * _msg_bytes(w) / 1e9
                if w != "64B-stream" or t.startswith("shmring"):
                    notes.append(f"{_num(r['payload_gbps'])} GB/s of payload")
            if w.endswith("MiB-stream-sum") and t not in REFERENCES:
                c = _find(rows, w[:-len("-sum")], COPYTO)
                sref = _find(rows, w, SUM_REF)
                if c and sref and "reserve" not in t and (t.startswith("shmring") or v >= 0.2 * sref["median"]):
                    bound = min(c["median"], sref["median"])
                    r["pct_of_pipeline_bound"] = 100 * v / bound
                    notes.insert(0, f"{r['pct_of_pipeline_bound']:.0f}% of min(np.copyto, np.sum) = "
                                    f"{_num(bound)} GB/s (copy and sum on two cores in parallel)")
            if w == "pingpong-64B-median" and t == "shmring busy-poll (spin=1 s)":
                notes.insert(0, f"target <= 2 us: {'met' if v <= 2 else '**missed**'}")
            if w.startswith("pingpong-64B") and t.startswith("shmring") and "busy" not in t:
                floor = _find(rows, w, "raw posix_ipc.Semaphore pair")
                if floor:
                    x = v / floor["median"]
                    r["x_floor"] = x
                    target = ""
                    if w == "pingpong-64B-idle-median" and "spin=0" in t:
                        target = f" (target <= 1.2x: {'met' if x <= 1.2 else '**missed**'})"
                    notes.insert(0, f"{x:.2f}x the raw semaphore floor{target}")
                    if w == "pingpong-64B-median" and x < 0.2:
                        notes.insert(1, "no futex sleep happened: the waits were caught while polling")
        vals = r.get("values") or []
        if len(vals) >= 2 and min(vals) > 0 and max(vals) / min(vals) > 1.5:
            notes.insert(0, f"**unstable: repeats ranged {_num(min(vals))} to {_num(max(vals))}**")
        if r.get("error"):
            notes = [r["error"]]
        r["notes"] = "; ".join(notes)
    return rows


# ----------------------------------------------------------------------------- formatting

def _num(v):
    if v is None:
        return "n/a"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _ratio(x):
    return "" if x is None else f"{_num(x)}x"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def table(rows) -> str:
    out = ["| transport | workload | median | unit | x mp.Queue | x shmring | of limit | notes |",
           "|---|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        lim = f"{r['pct_of_limit']:.0f}% {r['limit']}" if r.get("pct_of_limit") is not None else ""
        if r.get("pct_of_limit") is not None and r["pct_of_limit"] < 1:
            lim = f"{r['pct_of_limit']:.2f}% {r['limit']}"
        out.append(f"| {_cell(r['transport'])} | {r['workload']} | {_num(r.get('median'))} | {r['unit']} | "
                   f"{_ratio(r.get('x_queue'))} | {_ratio(r.get('x_shmring'))} | {lim} | "
                   f"{_cell(r.get('notes', ''))} |")
    return "\n".join(out)


LEGEND = ("Ratios: how many times *better* this row is than the reference row of the same workload "
          "(> 1 = better; for throughput median/ref, for latency ref/median). "
          "'x shmring' compares with shmring send(bytes)+recv_bytes() (64B), shmring send(arr) (arrays), "
          "shmring busy-poll (busy rows) or shmring blocking (blocking rows) in ping-pong. "
          "pingpong-64B: back-to-back round trips; pingpong-64B-idle: the client sleeps 300 us between "
          "round trips (untimed) so blocking waiters are really asleep when the ping arrives. "
          "'of limit': the row as a percentage of the single-core physical limit that bounds it, measured "
          "in this run: 'copy' = np.copyto of the same size (arrays; for messages, payload bytes/s against "
          "np.copyto of 1 MiB), 'sum' = np.sum of the same size (the -sum workloads, where the consumer "
          "sums every array), 'spin floor' / 'sem floor' = the raw ping-pong floors (floor/row). "
          "-sum workloads: the consumer sums the whole array instead of touching two elements. "
          "GB/s = 1e9 bytes/s. Every row: separate producer and consumer processes, except the "
          "'(1 process)' references and the limits.")


def order_rows(rows):
    def key(r):
        w = r["workload"]
        return (WORKLOAD_ORDER.index(w) if w in WORKLOAD_ORDER else 99, r["order"])
    return sorted(rows, key=key)


def write_json(path, machine_info, run, rows, primitives=None):
    doc = {"machine": machine_info, "run": run, "results": rows}
    if primitives is not None:
        doc["primitives"] = primitives
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)


def plot(path, rows) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:       # noqa: BLE001
        return f"plot skipped: matplotlib not importable ({type(e).__name__}: {e})"
    groups = {}
    for r in rows:
        if r.get("median") is not None:
            groups.setdefault(r["workload"], []).append(r)
    if not groups:
        return "plot skipped: no results"
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.2 + sum(0.32 * len(g) + 0.8 for g in groups.values())),
                             squeeze=False)
    for ax, (w, g) in zip(axes[:, 0], groups.items()):
        labels = [r["transport"] for r in g]
        med = np.array([r["median"] for r in g])
        lo = med - np.array([min(r["values"]) for r in g])
        hi = np.array([max(r["values"]) for r in g]) - med
        colors = ["tab:orange" if t.startswith("shmring") else "tab:gray" if t.startswith(("raw", "np.")) or
                  t in REFERENCES else "tab:blue" for t in labels]
        y = np.arange(len(g))
        ax.barh(y, med, xerr=[lo, hi], color=colors, capsize=2)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(f"{w} ({g[0]['unit']}, {'higher' if g[0]['higher_better'] else 'lower'} is better)",
                     fontsize=9)
        for yi, v in zip(y, med):
            ax.text(v, yi, f" {_num(v)}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
