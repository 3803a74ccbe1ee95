"""How much memory this process may really use: the tighter of its container's limit and the machine's memory.

A container (Docker, Kubernetes, a systemd slice, a batch scheduler) limits memory through a cgroup, while
/proc/meminfo's MemAvailable describes the whole machine: a budget taken from MemAvailable alone lets a
container fill its limit and be OOM-killed. So the budget is the smallest of MemAvailable and, for every
memory cgroup level from this process's own up to its mount (a parent's limit binds its children too),
the level's limit less what it holds. Page cache the kernel would reclaim first (inactive files) is not
counted as held, as MemAvailable and Kubernetes' working set do not count it.

cgroup v2: /proc/self/cgroup says `0::/PATH`; the files are memory.max ("max": no limit) and memory.current.
cgroup v1: the line naming the memory controller; memory.limit_in_bytes (a huge number: no limit) and
memory.usage_in_bytes. Where each hierarchy is mounted comes from /proc/self/mountinfo (inside a container the
mount's root is the container's own cgroup). Every path is read under `root`, so tests can hand in a tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as the largest page-aligned 64-bit number
FALLBACK_BYTES = 8 * 1024**3  # neither /proc/meminfo nor a cgroup readable (not Linux)
CGROUP_FILES = {"cgroup2": ("memory.max", "memory.current", "inactive_file"),
                "cgroup": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


@dataclass(frozen=True)
class Memory:
    """Bytes this process may still take, and where that number came from (for messages)."""

    bytes: int
    source: str


@dataclass(frozen=True)
class Mount:
    kind: str  # "cgroup2" or "cgroup" (v1)
    root: str  # the cgroup path that the mount point shows
    point: Path


def usable_memory(root: str | os.PathLike = "/") -> Memory:
    """min(MemAvailable, every enclosing memory cgroup's limit − usage), with the source of the smaller."""
    root = Path(root)
    candidates = [item for item in (meminfo_available(root), *cgroup_headroom(root)) if item is not None]
    if not candidates:
        return Memory(FALLBACK_BYTES, "an assumed 8 GB (no /proc/meminfo)")
    return min(candidates, key=lambda memory: memory.bytes)


def meminfo_available(root: Path) -> Memory | None:
    try:
        with open(root / "proc" / "meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return Memory(int(line.split()[1]) * 1024, "the available memory (MemAvailable)")
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_headroom(root: Path) -> list[Memory]:
    """limit − usage of each limited memory cgroup level above this process (v1 and v2 hierarchies alike)."""
    found = []
    for mount, path in memory_cgroups(root):
        folder = mount.point / os.path.relpath(path, mount.root) if is_within(path, mount.root) else mount.point
        while True:
            found += [item for item in [level_headroom(folder, mount.kind, root)] if item is not None]
            if folder == mount.point or mount.point not in folder.parents:
                break
            folder = folder.parent
    return found


def level_headroom(folder: Path, kind: str, root: Path) -> Memory | None:
    limit_name, usage_name, inactive_name = CGROUP_FILES[kind]
    limit = read_number(folder / limit_name)
    usage = read_number(folder / usage_name)
    if limit is None or usage is None or limit >= NO_LIMIT:
        return None
    held = max(0, usage - (read_stat(folder / "memory.stat", inactive_name) or 0))
    shown = "/" / folder.relative_to(root) if folder.is_relative_to(root) else folder
    version = "v2" if kind == "cgroup2" else "v1"
    return Memory(max(0, limit - held), f"the container's memory limit ({_gb(limit)} in cgroup {version} "
                                        f"{shown / limit_name}, {_gb(held)} of it in use)")


def memory_cgroups(root: Path) -> list[tuple[Mount, str]]:
    """(mount, this process's cgroup path) for the v2 hierarchy and the v1 memory controller, where present."""
    memberships = read_memberships(root)
    pairs = []
    for mount in read_mounts(root):
        path = memberships.get(mount.kind)
        if path is not None:
            pairs.append((mount, path))
    return pairs


def read_memberships(root: Path) -> dict[str, str]:
    """{"cgroup2": path, "cgroup": path of the v1 memory controller} from /proc/self/cgroup."""
    found = {}
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            found["cgroup2"] = path
        elif "memory" in controllers.split(","):
            found["cgroup"] = path
    return found


def read_mounts(root: Path) -> list[Mount]:
    """cgroup2 mounts and v1 mounts of the memory controller, from /proc/self/mountinfo; the usual places
    (/sys/fs/cgroup, /sys/fs/cgroup/memory) when it cannot be read."""
    try:
        lines = (root / "proc" / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return [Mount("cgroup2", "/", root / "sys/fs/cgroup"), Mount("cgroup", "/", root / "sys/fs/cgroup/memory")]
    mounts = []
    for line in lines:
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        kind, options = tail[0], tail[2].split(",")
        if kind == "cgroup2" or (kind == "cgroup" and "memory" in options):
            point = unescape(fields[4]).lstrip("/")
            mounts.append(Mount(kind, unescape(fields[3]), root / point))
    return mounts


def read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return NO_LIMIT
    try:
        return int(text)
    except ValueError:
        return None


def read_stat(path: Path, name: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def is_within(path: str, parent: str) -> bool:
    return os.path.commonpath([path, parent]) == parent if path.startswith("/") else False


def unescape(field: str) -> str:
    """mountinfo writes spaces, tabs, newlines and backslashes in paths as octal escapes."""
    for code, character in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, character)
    return field


def _gb(count: int) -> str:
    return f"{count / 1e9:.1f} GB"
