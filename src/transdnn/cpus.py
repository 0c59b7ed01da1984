"""The CPUs this process may keep busy: those it may run on, bounded by its cgroup's CPU quota.

A container's CPU limit (Docker's `--cpus`, a Kubernetes limit) is a time quota that leaves every host core
visible, so a pool sized by the visible cores is throttled. Both of transdnn's pools are sized here: torch's
threads (`hardware.fit_cpu_threads`) and the loader's gather threads. No torch import: `transdnn validate`
loads data without it."""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs the process may keep busy: those it may run on, bounded by its cgroup's CPU quota (whole CPUs,
    rounded down: one thread more than the quota gets the whole pool throttled; at least one)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota = cpu_quota(proc.read_text(), root) if proc.is_file() else None
    except (OSError, ValueError):  # a cgroup layout this reading does not know costs the cap, not the run
        quota = None
    return cpus if quota is None else max(1, min(cpus, math.floor(quota)))


def cpu_quota(proc_cgroup: str, root: Path) -> float | None:
    """CPUs' worth of time per period that the cgroup in `proc_cgroup` (the text of /proc/self/cgroup) and its
    ancestors allow, the tightest of them (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`); None without a quota.
    A folder missing under `root` is skipped: inside a container its own cgroup is mounted at the root."""
    quotas = []
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            quotas += [_v2_quota(folder) for folder in _ancestors(root, path)]
        elif "cpu" in controllers.split(","):
            mounts = dict.fromkeys([root / controllers, root / "cpu"])  # one folder when the controller is `cpu` alone
            quotas += [_v1_quota(folder) for mount in mounts for folder in _ancestors(mount, path)]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    parts = [p for p in path.split("/") if p]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(folder: Path) -> float | None:
    limit = folder / "cpu.max"
    if not limit.is_file():
        return None
    quota, period = limit.read_text().split()
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    quota, period = folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"
    if not (quota.is_file() and period.is_file()):
        return None
    microseconds = int(quota.read_text())
    return None if microseconds <= 0 else microseconds / int(period.read_text())
