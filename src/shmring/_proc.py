"""Process liveness: a pid plus its start time, as the kernel reports them.

A pid alone can be reused, so every role records the start time (field 22 of
``/proc/<pid>/stat``, clock ticks since boot) beside the pid; a mismatch, a
missing process or a zombie counts as dead.
"""
from __future__ import annotations

import os

_my_start: dict[int, int] = {}


def start_time(pid: int) -> int | None:
    """Start time of a live (non-zombie) process, or None if it is gone."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    # comm (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    rest = stat[stat.rfind(b")") + 2:].split()
    if len(rest) < 20 or rest[0] in (b"Z", b"X", b"x"):
        return None
    return int(rest[19])                 # field 22: field 3 is rest[0]


def my_start_time() -> int:
    pid = os.getpid()
    st = _my_start.get(pid)
    if st is None:
        st = start_time(pid) or 0
        _my_start.clear()
        _my_start[pid] = st
    return st


def alive(pid: int, start_low32: int | None = None) -> bool:
    """True if ``pid`` runs and (when given) started at ``start_low32`` (low 32 bits)."""
    if pid <= 0:
        return False
    st = start_time(pid)
    if st is None:
        return False
    return start_low32 is None or (st & 0xFFFFFFFF) == start_low32
