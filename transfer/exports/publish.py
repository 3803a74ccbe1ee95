"""Export folders appear whole or not at all: written under a hidden name beside the target, synced, renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transfer.errors import UserError
from transfer.files import fsync_folder


def prepare_output(out: Path, overwrite: bool) -> None:
    """Fail before any work when the folder cannot be written or would silently replace another."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists. Choose another out=DIR, or replace it with overwrite=true.")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder. Choose another out=DIR.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {out.parent}: {error.strerror or error}. Choose a writable out=DIR.") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {out.parent} (permission denied). Choose a writable out=DIR.")


@contextmanager
def staged_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden temporary folder beside `out`, renamed to `out` only if the block completes."""
    prepare_output(out, overwrite)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as error:
        raise UserError(f"cannot write into {out.parent}: {error.strerror or error}. "
                        "Choose a writable out=DIR.") from None
    try:
        yield staging
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """Rename into place once every byte is on disk; an export being replaced is moved aside first,
    put back if the rename fails, and removed only afterwards."""
    share_like_any_folder(staging)
    for path in [*staging.rglob("*"), staging]:
        fsync_folder(path)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    fsync_folder(out.parent)


def share_like_any_folder(folder: Path) -> None:
    """mkdtemp (0700) and safetensors (0600) make private files; an export is meant to be handed on."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
