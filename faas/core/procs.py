"""Telling processes apart by more than their pid: a pid is reused once its process is gone.

``proc_stat`` reads a process's state and start time (clock ticks since boot) from ``/proc``; a pid
recorded with its start time names exactly one process for ever, so whoever stops or adopts a
recorded process never signals a stranger that got the same pid later.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc, or None where /proc is unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ("X", -1) if Path("/proc/self/stat").exists() else None
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def proc_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds used, user and system, by all its threads; resident bytes) of a process, from
    /proc, or None when it is gone or /proc is unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S, int(statm[1]) * _PAGE_BYTES


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc's ``children`` lists; [pid] where there are none)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 1024:
        current = todo.pop()
        out.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if ``start_ticks`` is given, is that same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: a recycled pid, not one we started
    stat = proc_stat(pid)
    if stat is None:
        return True
    state, ticks = stat
    if state in ("Z", "X"):
        return False
    return start_ticks is None or ticks == start_ticks


def processes_matching(match: Callable[[list[str]], bool]) -> list[tuple[int, list[str]]]:
    """(pid, argv) of every live process of this machine whose argv ``match`` accepts."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
        if argv and match(argv):
            found.append((int(entry.name), argv))
    return found
