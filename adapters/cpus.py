"""How many CPUs this process may really use: its affinity mask, capped by the CPU quota of its own cgroup.

``os.cpu_count()`` reports the host's CPUs, which oversubscribes thread pools inside containers and in systemd
services with ``CPUQuota=``. The quota that applies is the one of the cgroup the process is in (``/proc/self/cgroup``)
and of every cgroup above it, not the root's: systemd puts a service's quota on ``system.slice/inferd.service``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_quota(cgroup_root, self_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, int(quota + 0.999)))
    return max(1, cpus)


def cgroup_quota(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) on the process's cgroup and its ancestors, v2 or v1; None without one."""
    try:
        lines = self_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    v2_path, v1_path = None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    if (cgroup_root / "cgroup.controllers").exists():  # a cgroup v2 mount
        return _tightest(cgroup_root, v2_path or "/", _v2_quota)
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (cgroup_root / mount / "cpu.cfs_quota_us").exists():
            return _tightest(cgroup_root / mount, v1_path or "/", _v1_quota)
    return None


def _tightest(mount: Path, path: str, read: Callable[[Path], float | None]) -> float | None:
    """Walk from the process's cgroup up to the mount's root; a path that is not visible (another cgroup namespace,
    as in a container) starts at the root, which is then the container's own."""
    node = mount / path.lstrip("/")
    if not node.is_dir():
        node = mount
    best: float | None = None
    while True:
        quota = read(node)
        if quota is not None and (best is None or quota < best):
            best = quota
        if node == mount:
            return best
        node = node.parent


def _v2_quota(node: Path) -> float | None:
    try:
        quota, period = (node / "cpu.max").read_text(encoding="ascii").split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(node: Path) -> float | None:
    try:
        q = int((node / "cpu.cfs_quota_us").read_text(encoding="ascii"))
        p = int((node / "cpu.cfs_period_us").read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None
