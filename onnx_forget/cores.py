"""How many cores this process may really use: its CPU affinity, capped by the CPU quota
of its cgroup (a Kubernetes CPU limit, `docker run --cpus`). onnxruntime's default is
every core of the machine, which oversubscribes a limited container."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


@functools.cache
def usable_cores() -> int:
    """The cores the scheduler lets this process run on, at most its cgroup's quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(CGROUP)
    return max(1, min(cores, math.ceil(quota))) if quota else max(1, cores)


def cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time per period the cgroup under `root` allows, or None when it sets
    no limit (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`)."""
    version_2 = _numbers(root / "cpu.max")
    if version_2 is not None:
        return version_2[0] / version_2[1] if len(version_2) == 2 else None
    quota = _numbers(root / "cpu" / "cpu.cfs_quota_us")
    period = _numbers(root / "cpu" / "cpu.cfs_period_us")
    if quota and period and quota[0] > 0 and period[0] > 0:
        return quota[0] / period[0]
    return None


def _numbers(path: Path) -> list[int] | None:
    """The integers of a one-line control file (`max` is none); None if it is unreadable."""
    try:
        return [int(field) for field in path.read_text().split() if field != "max"]
    except (OSError, ValueError):
        return None
