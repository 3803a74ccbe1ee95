"""What lives under the cache root (`data.cache_dir`): entries, their size and last use, the size cap
(`data.cache_max_gb`) with least-recently-used eviction, and what `transfer cache list|clear` shows and removes.

An entry is the files KIND/KEY.* that go together: images/KEY.u8 + KEY.json (the disk image cache) or
features/KEY.npy + KEY.json (one split's linear-probe features), each with KEY.about.json saying what it
was built from. Its last use is the newest modification time of its files: a run that opens an entry
touches them (memory-mapped reads do not update access times reliably).

Nothing a run needs disappears under it: a run holds a shared lock (flock) on the entry's data file while
it uses it; eviction and `clear` take an exclusive lock on every file of an entry before deleting any, and
skip an entry they cannot lock or that was used in the last RECENT_SECONDS (written by a process that is
about to lock it). Hidden files (.NAME.tmp) are writes in progress: never counted, never evicted; `clear`
removes those left untouched for a day (an interrupted write). Uses only the standard library, so the
`transfer cache` command stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from transfer.errors import UserError
from transfer.files import TEMPORARY_SUFFIX, write_json

KINDS = ("images", "features")
DEFAULT_MAX_GB = 20  # conf/data/default.yaml's data.cache_max_gb; dense tasks accept only this value
ABOUT_SUFFIX = ".about.json"
RECENT_SECONDS = 10.0
STALE_TEMPORARY_SECONDS = 24 * 3600.0


@dataclass
class Entry:
    kind: str
    key: str
    files: list[Path]
    size: int
    last_used: float
    about: dict = field(default_factory=dict)

    def describe(self) -> str:
        return self.about.get("description") or "(not recorded)"


def default_cache_dir() -> Path:
    """$TRANSFER_CACHE_DIR, else $XDG_CACHE_HOME/transfer, else ~/.cache/transfer."""
    if os.environ.get("TRANSFER_CACHE_DIR"):
        return Path(os.environ["TRANSFER_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "transfer"


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """`data.cache_dir`, or the default when it is null."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def cap_bytes(value) -> int | None:
    """`data.cache_max_gb` (decimal gigabytes, null: no cap) in bytes."""
    if value is None:
        return None
    try:
        gigabytes = float(value)
    except (TypeError, ValueError):
        gigabytes = -1.0
    if not 0 < gigabytes < float("inf"):
        raise UserError(f"data.cache_max_gb={value} must be a number of gigabytes above 0 (e.g. data.cache_max_gb="
                        f"{DEFAULT_MAX_GB}), or null for no cap.")
    return int(gigabytes * 1e9)


def entries(root: Path, kinds: tuple[str, ...] = KINDS) -> list[Entry]:
    """Every complete or partly removed entry under root/KIND/, oldest use first."""
    found = []
    for kind in kinds:
        groups: dict[str, list[Path]] = {}
        with contextlib.suppress(OSError):
            for path in (root / kind).iterdir():
                if not path.name.startswith(".") and path.is_file():
                    groups.setdefault(path.name.partition(".")[0], []).append(path)
        for key, files in groups.items():
            entry = _entry(kind, key, sorted(files))
            if entry is not None:
                found.append(entry)
    return sorted(found, key=lambda entry: entry.last_used)


def _entry(kind: str, key: str, files: list[Path]) -> Entry | None:
    try:
        stats = [path.stat() for path in files]
    except OSError:  # removed meanwhile
        return None
    about = {}
    with contextlib.suppress(OSError, ValueError):
        about = json.loads((files[0].parent / f"{key}{ABOUT_SUFFIX}").read_text())
    return Entry(kind, key, files, sum(s.st_size for s in stats), max(s.st_mtime for s in stats),
                 about if isinstance(about, dict) else {})


def write_about(folder: Path, key: str, description: str, **details) -> None:
    """KEY.about.json beside a new entry: what it was built from, for `transfer cache list`."""
    write_json(folder / f"{key}{ABOUT_SUFFIX}", {"description": description, "created": time.time(), **details})


def use(folder: Path, key: str, data_file: Path):
    """Mark an entry as used now and hold it for as long as the returned handle lives (None without flock).
    Raises FileNotFoundError when it was removed meanwhile: the caller treats it as a cache miss."""
    now = time.time()
    for path in folder.glob(f"{key}.*"):
        with contextlib.suppress(OSError):
            os.utime(path, (now, now))
    return hold(data_file)


def hold(path: Path):
    """A shared lock on `path` for the life of the returned file object; None where there is no flock."""
    try:
        import fcntl
    except ImportError:
        return None
    handle = open(path, "rb")
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        if os.fstat(handle.fileno()).st_ino != os.stat(path).st_ino:  # removed between open and lock
            raise FileNotFoundError(path)
    except OSError:  # being removed right now (an exclusive lock), or gone
        handle.close()
        raise FileNotFoundError(path) from None
    return handle


def remove(entry: Entry, now: float | None = None) -> bool:
    """Delete an entry's files unless a run holds it or used it a moment ago; the index goes first, so a
    reader never sees a complete-looking entry without its data."""
    if (now or time.time()) - entry.last_used < RECENT_SECONDS:
        return False
    with contextlib.ExitStack() as locks:
        for path in entry.files:
            if not _lock_exclusive(path, locks):
                return False
        for path in sorted(entry.files, key=lambda path: path.name != f"{entry.key}.json"):
            path.unlink(missing_ok=True)
    return True


def _lock_exclusive(path: Path, locks: contextlib.ExitStack) -> bool:
    try:
        import fcntl
    except ImportError:
        return True
    try:
        handle = locks.enter_context(open(path, "rb"))
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return True  # already gone
    except OSError:
        return False
    return True


def evict(root: Path, cap: int | None, keep: Collection[Path]) -> tuple[list[Entry], int]:
    """Remove least recently used entries until the whole cache fits `cap` bytes (never those in `keep`, the
    entries this run wrote or uses: root/KIND/KEY). (removed entries, bytes left)."""
    found = entries(root)
    total = sum(entry.size for entry in found)
    removed = []
    if cap is None:
        return removed, total
    now = time.time()
    for entry in found:
        if total <= cap:
            break
        if root / entry.kind / entry.key not in keep and remove(entry, now):
            removed.append(entry)
            total -= entry.size
    return removed, total


def eviction_note(root: Path, cap: int | None, keep: Collection[Path]) -> str | None:
    """Evict, and say what went in one line (None when nothing did)."""
    removed, total = evict(root, cap, keep)
    if not removed:
        return None
    freed = sum(entry.size for entry in removed)
    return (f"data.cache_max_gb={cap / 1e9:g}: removed the {len(removed)} least recently used cache "
            f"entr{'y' if len(removed) == 1 else 'ies'} ({size(freed)}) from {root}; it holds {size(total)} now")


def unused_for(entry: Entry, days: float | None, now: float | None = None) -> bool:
    """Whether the entry was last used `days` ago or earlier (None: any entry)."""
    return days is None or (now or time.time()) - entry.last_used >= days * 86400


def clear(root: Path, kinds: tuple[str, ...], older_than_days: float | None = None) -> tuple[list[Entry], list[Entry]]:
    """(removed, kept because in use) among the entries of `kinds` unused for `older_than_days` (all: None),
    and the interrupted writes left behind there."""
    now = time.time()
    chosen = [entry for entry in entries(root, kinds) if unused_for(entry, older_than_days, now)]
    removed, busy = [], []
    for entry in chosen:
        (removed if remove(entry, now) else busy).append(entry)
    for kind in kinds:
        for path in (root / kind).glob(f".*{TEMPORARY_SUFFIX}"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                    path.unlink()
    return removed, busy


def when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
