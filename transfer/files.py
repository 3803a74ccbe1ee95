"""Every file transfer writes goes through here: written beside its target, flushed, renamed into place.

A reader (a user's script, a resumed run, a second process) therefore sees the old file or the new one,
never half of one, whatever kills the writer. Files get the permissions of any file the user creates
(`mkstemp` alone would leave them 0600), and a write that fails leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (folders cannot be opened on some systems: nothing to do there)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _temporary(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    return handle, Path(name)


def _publish(temporary: Path, path: Path, durable: bool) -> None:
    temporary.chmod(0o666 & ~_umask())
    os.replace(temporary, path)
    if durable:
        fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", durable: bool = False, **open_kwargs) -> Iterator:
    """An open file (mode "w" or "wb") whose contents replace `path` only when the block completes; `durable`
    also fsyncs the file and its folder (checkpoints: a power cut must not leave an empty last.pt)."""
    path = Path(path)
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    handle, temporary = _temporary(path)
    try:
        with os.fdopen(handle, mode, **open_kwargs) as stream:
            yield stream
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        _publish(temporary, path, durable)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a library that writes by file name (savefig, PIL); renamed over
    `path` when the block ends without an exception, removed otherwise."""
    path = Path(path)
    handle, temporary = _temporary(path)
    os.close(handle)
    try:
        yield temporary
        _publish(temporary, path, durable=False)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as stream:
        stream.write(text)


def write_json(path: str | os.PathLike, payload, sort_keys: bool = True) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")


def write_csv(path: str | os.PathLike, header: list[str], rows: Iterable[Iterable]) -> None:
    """File names in rows are written as they are on disk (surrogate escapes kept)."""
    with atomic_write(path, newline="", errors="surrogateescape") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


def write_dict_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """A CSV with one column per key seen in any row, in order of first appearance."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    write_csv(path, columns, ([row.get(column, "") for column in columns] for row in rows))


def save_figure(figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """A matplotlib Figure as a PNG, atomically (never through pyplot: callers' backends stay as they are)."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)


def save_picture(pixels, path: str | os.PathLike, min_height: int = 0) -> None:
    """An H×W×3 uint8 array as a PNG, atomically; enlarged by a whole factor (nearest neighbour, so no pixel is
    invented) until it is at least `min_height` tall: a 28 px input stays legible in a report."""
    from PIL import Image

    picture = Image.fromarray(pixels)
    zoom = max(1, -(-min_height // picture.height)) if min_height else 1
    if zoom > 1:
        picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")


def remove_temporaries(folder: str | os.PathLike, pattern: str = f".*{TEMPORARY_SUFFIX}") -> list[Path]:
    """Delete what an interrupted atomic write left behind; returns what went."""
    stale = sorted(Path(folder).glob(pattern))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
