"""Machine description, the markdown table, results.json and the optional plot."""
from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata

import numpy as np

WORKLOAD_ORDER = ["64B-stream", "1MiB-stream", "16MiB-stream", "pingpong-64B-median", "pingpong-64B-p99",
                  "pingpong-64B-idle-median", "pingpong-64B-idle-p99"]
COPYTO = "np.copyto (1 process)"
COPYTO_RING = "np.copyto into shm, ring-sized rotation (1 process)"


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
        f"Versions: shmring {m['shmring']}, {zmq}, faster-fifo {m['faster-fifo']}, posix_ipc {m['posix_ipc']}",
        f"Run: {run['mode']}, {run['repeats']} repeats after warm-up (median shown), "
        f"{'producer and consumer pinned to CPUs 0 and 1' if run.get('pin') else 'not pinned'}, {m['date']}"
        + (f", total {run['total_s']:.0f} s" if "total_s" in run else ""),
    ]


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


def finish_rows(rows):
    """Fill in the ratio columns and the computed notes (target checks)."""
    for r in rows:
        r["x_queue"] = _better(r, _find(rows, r["workload"], r["queue_ref"])) if r["queue_ref"] else None
        r["x_shmring"] = _better(r, _find(rows, r["workload"], r["shm_ref"])) if r["shm_ref"] else None
        notes = [r["note"]] if r.get("note") else []
        if r.get("median") is not None:
            w, t, v = r["workload"], r["transport"], r["median"]
            if w.endswith("MiB-stream") and t not in (COPYTO, COPYTO_RING) and "reserve" not in t:
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
    out = ["| transport | workload | median | unit | x mp.Queue | x shmring | notes |",
           "|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        out.append(f"| {_cell(r['transport'])} | {r['workload']} | {_num(r.get('median'))} | {r['unit']} | "
                   f"{_ratio(r.get('x_queue'))} | {_ratio(r.get('x_shmring'))} | {_cell(r.get('notes', ''))} |")
    return "\n".join(out)


LEGEND = ("Ratios: how many times *better* this row is than the reference row of the same workload "
          "(> 1 = better; for throughput median/ref, for latency ref/median). "
          "'x shmring' compares with shmring send(bytes)+recv_bytes() (64B), shmring send(arr) (arrays), "
          "shmring busy-poll (busy rows) or shmring blocking (blocking rows) in ping-pong. "
          "pingpong-64B: back-to-back round trips; pingpong-64B-idle: the client sleeps 300 us between "
          "round trips (untimed) so blocking waiters are really asleep when the ping arrives. "
          "GB/s = 1e9 bytes/s. Every row: separate producer and consumer processes, except np.copyto.")


def order_rows(rows):
    def key(r):
        w = r["workload"]
        return (WORKLOAD_ORDER.index(w) if w in WORKLOAD_ORDER else 99, r["order"])
    return sorted(rows, key=key)


def write_json(path, machine_info, run, rows):
    with open(path, "w") as f:
        json.dump({"machine": machine_info, "run": run, "results": rows}, f, indent=1, default=float)


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
        colors = ["tab:orange" if t.startswith("shmring") else "tab:gray" if t.startswith(("raw", "np."))
                  else "tab:blue" for t in labels]
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
