"""transfer: fine-tune ImageNet-pretrained timm backbones on your own images."""

import os

# How long torch's OpenMP threads spin before they sleep when they wait for work; read once, when torch loads,
# so it is set here, before anything imports torch. GNU libgomp's default (about 3 ms of spinning) is a
# disaster on shared cores: a spinning thread holds the core that the thread it waits for needs, and
# EfficientNet-Lite0 trained at 7 images/s instead of 124 (2 cores, load ~4). Never spinning costs ~25% on an
# idle machine (Lite0 64 px training: 158 vs 209 images/s spinning up to 10,000 rounds, ~0.1 ms). So: a short
# spin when this process starts on cores that are free, none when other work already holds them. A user's
# OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins. Figures: docs/performance.md.
SHORT_SPIN = "10000"


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _cores_are_free(window: float = 0.1) -> bool:
    """Whether other work uses less than half a core right now (sampled over `window` seconds): the load
    average would still count a job that ended a minute ago."""
    import time

    try:
        busy, total = _cpu_times()
        time.sleep(window)
        busy_after, total_after = _cpu_times()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    except (OSError, ValueError, IndexError):  # not Linux: no way to tell, so never spin
        return False
    return total_after > total and (busy_after - busy) / (total_after - total) * cores < 0.5


if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    if _cores_are_free():
        os.environ["GOMP_SPINCOUNT"] = SHORT_SPIN
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

__version__ = "0.1.0"
