"""How many CPU cores this process may really use: its affinity mask and its cgroup's CPU quota.

`os.cpu_count()` reports the host's cores; in a container limited to 2 CPUs on a 64-core node
sizing thread pools by it oversubscribes the quota 32 times (and the kernel throttles the pod).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_quota_cores(v2: Path = _CGROUP_V2, v1_quota: Path = _CGROUP_V1_QUOTA,
                       v1_period: Path = _CGROUP_V1_PERIOD) -> float | None:
    """The cgroup's CPU limit in cores (quota / period), or None when there is none or it cannot be read."""
    try:
        quota, period = v2.read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(v1_quota.read_text())
        period_us = int(v1_period.read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cores() -> int:
    """Cores this process may run on: the affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_quota_cores()
    if quota is not None and quota > 0:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


# A service that may run several processes on its port (the inference service's frontends, the
# gateway's processes) starts one per available core from this many cores up when asked for 0
# ("auto"): measured on 2 cores, a second process cost more in protocol and scheduling than it gave.
AUTO_PROCESSES_FROM_CORES = 4
MAX_PROCESSES = 64


def auto_process_count(requested: int) -> int:
    """`requested` processes, or for 0 one per available core from AUTO_PROCESSES_FROM_CORES cores up (else 1)."""
    if requested:
        return requested
    cores = available_cores()
    return min(MAX_PROCESSES, cores) if cores >= AUTO_PROCESSES_FROM_CORES else 1
