"""A command's own `key=value` arguments: split from the rest, and the first unknown one refused with a hint.
Standard library only, so a command that needs no model (`transfer cache`) starts without torch."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from transfer.errors import UserError


def split_options(arguments: list[str], keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """(this command's own options, everything else): the rest goes to the config, or is refused."""
    keys = set(keys)
    options, rest = {}, []
    for item in arguments:
        key, separator, value = item.partition("=")
        if separator and key in keys:
            options[key] = value
        else:
            rest.append(item)
    return options, rest


def reject_unknown(items: list[str], command: str, valid: list[str]) -> None:
    """One message for the first unknown or malformed argument, with the closest valid key."""
    if not items:
        return
    item = items[0]
    key, separator, _ = item.partition("=")
    names = [v.split("=")[0] for v in valid]
    hint = difflib.get_close_matches(key, names, n=1)
    did_you_mean = f" Did you mean {hint[0]}=?" if hint else ""
    problem = f"unknown key '{key}'" if separator and key else f"'{item}' is not key=value"
    raise UserError(f"{problem}.{did_you_mean} Valid keys for transfer {command}: {', '.join(valid)}.")
