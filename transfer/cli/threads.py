"""How torch's OpenMP threads wait for work: chosen by the command-line entry point, before torch loads
(libgomp reads the setting once), and never by `import transfer`, which must leave a caller's process alone.

GNU libgomp's default (about 3 ms of spinning) is a disaster on shared cores: a spinning thread holds the core
that the thread it waits for needs, and EfficientNet-Lite0 trained at 7 images/s instead of 124 (2 cores,
load ~4). Never spinning costs ~25% on an idle machine (Lite0 64 px training: 158 vs 209 images/s spinning
up to 10,000 rounds, ~0.1 ms). So: a short spin when the command starts on cores that are free, none when
other work already holds them. A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins. Figures:
docs/performance.md.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, MutableMapping

SHORT_SPIN = "10000"


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cores_are_free(window: float = 0.1) -> bool:
    """Whether other work uses less than half a core right now (sampled over `window` seconds): the load
    average would still count a job that ended a minute ago."""
    try:
        busy, total = cpu_times()
        time.sleep(window)
        busy_after, total_after = cpu_times()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    except (OSError, ValueError, IndexError):  # not Linux: no way to tell, so never spin
        return False
    return total_after > total and (busy_after - busy) / (total_after - total) * cores < 0.5


def wait_policy(environ: MutableMapping[str, str], free: Callable[[], bool]) -> dict[str, str]:
    """The variables to set: none when the user chose (the cores are then not sampled), else a short spin on
    free cores, else passive waiting."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"GOMP_SPINCOUNT": SHORT_SPIN} if free() else {"OMP_WAIT_POLICY": "PASSIVE"}


def choose_wait_policy(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the policy for this process (the CLI's own) unless torch is already loaded, where it is too late."""
    if "torch" in sys.modules:
        return {}
    chosen = wait_policy(environ, cores_are_free)
    environ.update(chosen)
    return chosen
