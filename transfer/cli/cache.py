"""`transfer cache [list|clear] [what=images|features|all] [older_than_days=N] [data.cache_dir=DIR]
[data.cache_max_gb=G]`: what the caches under data.cache_dir hold, and removing them.

`list` prints one line per entry (kind, size, last use, what it was built from) and the total against the
cap; `clear` removes the chosen entries, except those a running transfer holds or used seconds ago, and
says how much it freed. The cap and folder default to conf/data/default.yaml's (the same keys as training),
read without composing the whole config: the command imports no torch and answers at once.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from transfer.cli.arguments import reject_unknown, split_options
from transfer.config import config_dir
from transfer.data.cache_folder import KINDS, cache_root, cap_bytes, clear, entries, size, unused_for, when
from transfer.errors import UserError

ACTIONS = ("list", "clear")
WHAT = (*KINDS, "all")
KEYS = ("what", "older_than_days", "data.cache_dir", "data.cache_max_gb")
USAGE = ("transfer cache [list|clear] [what=images|features|all] [older_than_days=N] [data.cache_dir=DIR] "
         "[data.cache_max_gb=G]")


def cache_command(arguments: list[str]) -> int:
    action, arguments = chosen_action(arguments)
    options, rest = split_options(arguments, KEYS)
    reject_unknown(rest, "cache", list(KEYS))
    defaults = OmegaConf.load(config_dir() / "data" / "default.yaml")
    root = cache_root(nullable(options.get("data.cache_dir", defaults.get("cache_dir"))))
    cap = cap_bytes(nullable(options.get("data.cache_max_gb", defaults.get("cache_max_gb"))))
    kinds = chosen_kinds(options.get("what") or "all")
    older = days(options.get("older_than_days"))
    if action == "list":
        return list_entries(root, kinds, older, cap)
    return clear_entries(root, kinds, older)


def chosen_action(arguments: list[str]) -> tuple[str, list[str]]:
    if not arguments or "=" in arguments[0]:
        return "list", arguments
    action = arguments[0]
    if action not in ACTIONS:
        raise UserError(f"unknown action '{action}': choose list or clear. Usage: {USAGE}")
    return action, arguments[1:]


def chosen_kinds(value: str) -> tuple[str, ...]:
    if value not in WHAT:
        raise UserError(f"what={value} is not valid: choose one of {', '.join(WHAT)}.")
    return KINDS if value == "all" else (value,)


def days(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise UserError(f"older_than_days={value} must be a number of days of at least 0, e.g. older_than_days=30.")
    return number


def nullable(value):
    """Command-line text as the config reads it: empty, null or ~ is None."""
    return None if isinstance(value, str) and value.lower() in ("", "null", "none", "~") else value


def list_entries(root: Path, kinds: tuple[str, ...], older: float | None, cap: int | None) -> int:
    everything = entries(root)
    now = time.time()
    shown = [entry for entry in everything if entry.kind in kinds and unused_for(entry, older, now)]
    for entry in shown:
        print(f"{entry.kind:<9} {size(entry.size):>9}  last used {when(entry.last_used)}  {entry.key}  "
              f"{entry.describe()}")
    total = sum(entry.size for entry in everything)
    limit = f"the cap data.cache_max_gb={cap / 1e9:g}" if cap is not None else "no cap (data.cache_max_gb=null)"
    part = f"; shown: {entries_count(len(shown))}, {size(sum(e.size for e in shown))}" if shown != everything else ""
    print(f"total {size(total)} in {entries_count(len(everything))} under {root}, against {limit}{part}")
    return 0


def clear_entries(root: Path, kinds: tuple[str, ...], older: float | None) -> int:
    removed, busy = clear(root, kinds, older)
    freed = sum(entry.size for entry in removed)
    kept = f"; kept {len(busy)} in use by a running transfer (or used seconds ago)" if busy else ""
    print(f"freed {size(freed)}: removed {entries_count(len(removed), '/'.join(kinds))} from {root}{kept}")
    return 0


def entries_count(count: int, kind: str = "") -> str:
    return f"{count} {kind + ' ' if kind else ''}entr{'y' if count == 1 else 'ies'}"
