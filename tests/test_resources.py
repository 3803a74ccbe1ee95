"""The memory a process may use (transfer.resources): a container's cgroup limit (v2 and v1 layouts, written as
real files in a temporary tree) wins over the machine's MemAvailable when it is tighter, and the RAM caches of
every task stay within half of it, saying where the limit came from when they step aside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transfer.data.cache as cache_module
from transfer.data.cache import build_cache
from transfer.data.sources import Record
from transfer.resources import meminfo_available, usable_memory
from test_cache import keep

GB = 2**30  # meminfo counts kB: whole GiB keep the sums exact
V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def machine(root: Path, available: int, cgroup: str, mountinfo: str | None) -> Path:
    """root/proc as Linux writes it: meminfo, this process's cgroups and mounts."""
    write(root / "proc/meminfo", f"MemTotal:       65000000 kB\nMemFree:            1000 kB\n"
                                 f"MemAvailable:   {available // 1024} kB\n")
    write(root / "proc/self/cgroup", cgroup)
    if mountinfo is not None:
        write(root / "proc/self/mountinfo", mountinfo)
    return root


def v2_tree(root: Path, limit: str, current: int, inactive_file: int = 0, parent_limit: str = "max",
            parent_current: int = 0, available: int = 30 * GB) -> Path:
    """cgroup v2 (unified): this process in /user.slice/job.scope, a limit on it and one on its parent."""
    machine(root, available, "0::/user.slice/job.scope\n", V2_MOUNT)
    group = root / "sys/fs/cgroup/user.slice"
    write(group / "memory.max", f"{parent_limit}\n")
    write(group / "memory.current", f"{parent_current}\n")
    write(group / "job.scope/memory.max", f"{limit}\n")
    write(group / "job.scope/memory.current", f"{current}\n")
    write(group / "job.scope/memory.stat", f"anon {current - inactive_file}\nfile {inactive_file}\n"
                                           f"active_file 0\ninactive_file {inactive_file}\n")
    write(root / "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")  # the root has no memory.max
    return root


def v1_tree(root: Path, limit: int, usage: int, inactive_file: int = 0, available: int = 30 * GB) -> Path:
    """cgroup v1 inside a Docker container: /proc/self/cgroup names the host's path, the mount's root is that
    same path, so the container's own limit sits at the mount point."""
    mountinfo = ("35 31 0:32 /docker/abc123 /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n"
                 "36 31 0:33 /docker/abc123 /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n")
    machine(root, available, "12:cpu,cpuacct:/docker/abc123\n4:memory:/docker/abc123\n0::/system.slice\n", mountinfo)
    group = root / "sys/fs/cgroup/memory"
    write(group / "memory.limit_in_bytes", f"{limit}\n")
    write(group / "memory.usage_in_bytes", f"{usage}\n")
    write(group / "memory.stat", f"cache {inactive_file}\nrss {usage - inactive_file}\n"
                                 f"total_inactive_file {inactive_file}\n")
    write(root / "sys/fs/cgroup/cpu,cpuacct/cpu.shares", "1024\n")
    return root


def test_cgroup_v2_limit_less_usage_is_the_budget_when_tighter(tmp_path: Path) -> None:
    memory = usable_memory(v2_tree(tmp_path, limit=str(4 * GB), current=3 * GB, inactive_file=1 * GB))
    assert memory.bytes == 2 * GB  # 4 GB limit − (3 GB charged − 1 GB of reclaimable file cache)
    assert "container" in memory.source and "cgroup v2 /sys/fs/cgroup/user.slice/job.scope/memory.max" in memory.source


def test_cgroup_v2_a_parent_limit_binds_too_and_max_means_none(tmp_path: Path) -> None:
    tight_parent = usable_memory(v2_tree(tmp_path / "a", limit="max", current=GB, parent_limit=str(3 * GB),
                                         parent_current=2 * GB + GB // 2))
    assert tight_parent.bytes == GB // 2 and "user.slice/memory.max" in tight_parent.source
    unlimited = usable_memory(v2_tree(tmp_path / "b", limit="max", current=GB, available=5 * GB))
    assert unlimited.bytes == 5 * GB and "MemAvailable" in unlimited.source


def test_cgroup_v1_memory_controller_in_a_container(tmp_path: Path) -> None:
    memory = usable_memory(v1_tree(tmp_path / "a", limit=2 * GB, usage=GB + GB // 2, inactive_file=GB // 2))
    assert memory.bytes == GB and "cgroup v1 /sys/fs/cgroup/memory/memory.limit_in_bytes" in memory.source
    unlimited = usable_memory(v1_tree(tmp_path / "b", limit=9223372036854771712, usage=GB, available=7 * GB))
    assert unlimited.bytes == 7 * GB and "MemAvailable" in unlimited.source


def test_the_smaller_of_the_container_headroom_and_the_available_memory_wins(tmp_path: Path) -> None:
    roomy_container = usable_memory(v2_tree(tmp_path / "a", limit=str(16 * GB), current=GB, available=3 * GB))
    assert roomy_container.bytes == 3 * GB and "MemAvailable" in roomy_container.source
    full_container = usable_memory(v1_tree(tmp_path / "b", limit=2 * GB, usage=2 * GB + 5, available=3 * GB))
    assert full_container.bytes == 0  # over its limit: nothing more to spend


def test_without_mountinfo_the_usual_mount_points_are_read(tmp_path: Path) -> None:
    machine(tmp_path, 30 * GB, "0::/\n", mountinfo=None)
    write(tmp_path / "sys/fs/cgroup/memory.max", f"{GB}\n")
    write(tmp_path / "sys/fs/cgroup/memory.current", "0\n")
    assert usable_memory(tmp_path).bytes == GB


def test_this_machine(tmp_path: Path) -> None:
    """The real /proc and /sys/fs/cgroup parse: never more than MemAvailable, never negative."""
    memory = usable_memory()
    available = meminfo_available(Path("/"))
    assert available is not None and 0 <= memory.bytes <= available.bytes
    assert memory.source


def test_the_ram_cache_names_the_container_limit_when_it_steps_aside(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for index in range(4):
        Image.fromarray(np.full((40, 40, 3), index, np.uint8)).save(folder / f"{index}.png")
        records.append(Record(str(folder / f"{index}.png"), 0))
    tree = v2_tree(tmp_path / "machine", limit=str(30_000), current=20_000)  # 10 kB to spend: 5 kB budget
    monkeypatch.setattr(cache_module, "usable_memory", lambda: usable_memory(tree))
    assert build_cache("ram", records, keep(40)) == (None, [])
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "data.cache=ram needs ~19.2 kB but the budget is 5.0 kB" in out
    assert "half of the container's memory limit" in out and "cgroup v2" in out and "data.cache=none" in out
    roomy = v2_tree(tmp_path / "roomy", limit=str(GB), current=0)
    monkeypatch.setattr(cache_module, "usable_memory", lambda: usable_memory(roomy))
    cache, _ = build_cache("ram", records, keep(40))
    assert len(cache) == 4 and "(budget 536.9 MB)" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_dense_tasks_keep_decoded_images_within_the_same_budget(task: str, tmp_path: Path, capsys) -> None:
    """Segmentation and detection hold every image at full size (and masks): over budget they read files each
    epoch instead, with one line, and return no cache."""
    if task == "segmentation":
        from test_segmentation import write_scene_folder

        from transfer.data.masks import index_pairs, load_all

        _, splits = index_pairs(str(write_scene_folder(tmp_path / "scenes", 4)), 0.0, 0.0, 0)
        records = [r for rs in splits.splits.values() for r in rs]
        needed = sum(32 * 32 * 4 for _ in records)  # 32 px scenes: RGB + mask

        def decode(budget):
            return load_all(records, 3, 255, strict=False, budget_bytes=budget)
    else:
        from test_detection import write_coco_split

        from transfer.data.coco import decode_all, read_splits

        write_coco_split(tmp_path / "coco", 4)
        _, splits, _ = read_splits(str(tmp_path / "coco"), 0.0, 0.0, 0)
        records = [r for rs in splits.values() for r in rs]
        needed = sum(64 * 64 * 3 for _ in records)

        def decode(budget):
            return decode_all(records, strict=False, budget_bytes=budget)
    assert decode(needed - 1) == (None, [])
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "but the budget is" in out and "(data.cache=none)" in out
    cache, skipped = decode(needed)
    assert len(cache) == len(records) and not skipped
    assert f"data.cache=ram: {len(records)} " in capsys.readouterr().out
