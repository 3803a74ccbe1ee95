"""Process-rank facts. Single-process today; under torchrun only rank 0 writes files."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0
