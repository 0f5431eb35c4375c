"""The checks an update passes before it may switch: room in memory for two versions at once, and inputs/outputs
compatible with what callers of the active version send and read.

Both are pure functions of what they are given (plus /proc and the cgroup files for memory), so each is tested on its
own; :mod:`daemon.updater` decides what to do with the answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from adapters.base import TensorSpec

#: a version's memory in the runtime, as a multiple of its artifact's size, when nothing better is known: the decrypted
#: model is held once by the runtime, and ONNX Runtime's optimised graph and arenas roughly double it
ARTIFACT_FACTOR = 3
PROC_MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryRoom:
    """Bytes this process may still take: the lower of the system's MemAvailable and its cgroup's room."""

    available: int
    source: str  # what bounded it, for the refusal's message


def mem_available(meminfo: Path = PROC_MEMINFO) -> int | None:
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_room(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or None without a limit."""
    try:
        lines = proc_cgroup.read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            folder = root / line[3:].lstrip("/")
            try:
                limit = (folder / "memory.max").read_text(encoding="ascii").strip()
                current = int((folder / "memory.current").read_text(encoding="ascii").strip())
            except (OSError, ValueError):
                return None
            if limit == "max":
                return None
            return max(0, int(limit) - current)
    return None


def memory_room() -> MemoryRoom | None:
    """What this process may still allocate, or None when neither source can be read (not Linux)."""
    found = [(v, s) for v, s in ((mem_available(), "MemAvailable"), (cgroup_room(), "the cgroup's memory.max"))
             if v is not None]
    if not found:
        return None
    value, source = min(found)
    return MemoryRoom(value, source)


def rss_bytes() -> int:
    """This process's resident set, for the cost of a load measured as the difference around it."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def estimate_need(artifact_bytes: int, active_cost: int | None) -> int:
    """Bytes a new version will take: what the active version was measured to cost, scaled by the artifacts' sizes
    when that is known, else a multiple of the artifact's size; never less than the artifact itself."""
    guess = artifact_bytes * ARTIFACT_FACTOR
    if active_cost:
        guess = max(guess, active_cost)
    return max(guess, artifact_bytes)


def memory_refusal(need: int, headroom: int, room: MemoryRoom | None) -> str | None:
    """Why loading ``need`` more bytes must be refused, or None when it fits with ``headroom`` left."""
    if room is None:
        return None
    if need + headroom <= room.available:
        return None
    mib = 1024 * 1024
    return (f"not enough memory to load it beside the active version: it needs about {need // mib} MiB plus "
            f"{headroom // mib} MiB of headroom (updates.memory_headroom_bytes), and {room.available // mib} MiB are "
            f"available ({room.source}); free memory or raise the limit, then offer it again")


def _dims_compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x < 0 or y < 0 for x, y in zip(a, b))


def incompatibilities(old_in: list[TensorSpec], old_out: list[TensorSpec], new_in: list[TensorSpec],
                      new_out: list[TensorSpec]) -> list[str]:
    """What a caller of the old version would see break with the new one: an input or output gone, added (an input
    the caller does not send), or of another datatype or shape. Empty: compatible."""
    problems: list[str] = []
    for kind, old, new in (("input", old_in, new_in), ("output", old_out, new_out)):
        before = {s.name: s for s in old}
        after = {s.name: s for s in new}
        for name in sorted(before.keys() - after.keys()):
            problems.append(f"{kind} {name!r} is gone")
        if kind == "input":
            for name in sorted(after.keys() - before.keys()):
                problems.append(f"input {name!r} is new (callers do not send it)")
        for name in sorted(before.keys() & after.keys()):
            o, n = before[name], after[name]
            if o.datatype != n.datatype:
                problems.append(f"{kind} {name!r} changes datatype {o.datatype} -> {n.datatype}")
            if not _dims_compatible(tuple(o.shape), tuple(n.shape)):
                problems.append(f"{kind} {name!r} changes shape {list(o.shape)} -> {list(n.shape)}")
    return problems
