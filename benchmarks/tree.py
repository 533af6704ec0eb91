"""Memory of process trees, from /proc: proportional set size (shared pages divided among the
processes that share them) and private memory."""

from __future__ import annotations

from pathlib import Path


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rollup(pid: int, *fields: str) -> int:
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                total += int(value.split()[0])
    except OSError:
        return 0
    return total


def pss_kib(pid: int) -> int:
    """Proportional set size of a process and all its descendants."""
    return _rollup(pid, "Pss") + sum(pss_kib(child) for child in children_of(pid))


def private_kib(pid: int) -> int:
    """Pages of this process that no other process shares (its unique set size)."""
    return _rollup(pid, "Private_Clean", "Private_Dirty")
