"""The run directory: made once, locked while a run writes into it, and filled as the run goes.

config.yaml (resolved), classes.json, run_info.json, metrics.csv (a row per epoch), skipped_images.csv as
bad files are found; every file written atomically (transfer.files), and only by the main process.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from transfer.config import require
from transfer import distributed
from transfer.distributed import is_main
from transfer.errors import UserError
from transfer.files import write_csv, write_dict_rows, write_json, write_text


def log(message: str) -> None:
    if is_main():
        print(message, flush=True)


def make_run_dir(run_dir: str | Path, chosen: bool, resume: str | None) -> Path:
    """Create the run directory; never write into a folder that already holds another run.

    Resuming writes into the checkpoint's folder (`trainer.resume=RUN/last.pt` or `=RUN`), or into the chosen
    folder with `trainer.resume=auto`, which starts afresh when that folder has no checkpoint yet. `chosen`:
    the user named the folder (hydra.run.dir); otherwise a timestamped name that is free is taken.
    """
    if resume == "auto" and not chosen:
        raise UserError("trainer.resume=auto continues the run in hydra.run.dir: add hydra.run.dir=RUN_DIR, "
                        "or give the checkpoint itself, trainer.resume=RUN_DIR/last.pt.")
    if resume and not chosen:
        path = Path(resume).expanduser().resolve()
        if not path.exists():
            raise UserError(f"trainer.resume={resume}: no such file. Give RUN_DIR/last.pt, a run directory, or "
                            "auto (with hydra.run.dir=RUN_DIR).")
        return path if path.is_dir() else path.parent
    run_dir = Path(run_dir).expanduser()
    if chosen:
        if (run_dir / "config.yaml").exists() and not resume:
            raise UserError(f"{run_dir} already holds a run. Choose another hydra.run.dir, or continue it with "
                            f"trainer.resume={run_dir / 'last.pt'}.")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the run directory {run_dir}: {error.strerror}.") from None
        return run_dir
    return fresh_dir(run_dir)


def fresh_dir(base: Path) -> Path:
    """base, or base-1, base-2 …: mkdir without exist_ok makes concurrent runs pick different ones."""
    for attempt in range(1000):
        candidate = base if attempt == 0 else base.with_name(f"{base.name}-{attempt}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            raise UserError(f"cannot create the run directory {candidate}: {error.strerror}. "
                            "Set hydra.run.dir=PATH to a writable folder.") from None
    raise UserError(f"could not find a free run directory next to {base}.")


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on RUN/.lock while this process runs, so a second run (or a resume of a
    live run) is refused instead of writing into the same folder. The kernel releases the lock when the
    process ends in any way, kill -9 included, so a stale lock file never blocks. None where there is
    no fcntl (Windows): there only the exclusive mkdir of fresh run directories keeps runs apart."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        handle = open(run_dir / ".lock", "a+")
    except OSError as error:
        raise UserError(f"cannot write in the run directory {run_dir}: {error.strerror}. "
                        "Set hydra.run.dir=PATH to a writable folder.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise UserError(f"{run_dir} is in use by another transfer run{f' (pid {owner})' if owner else ''}. "
                        "Wait for it to end, or choose another hydra.run.dir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def write_run_info(run_dir: Path, meta: dict, splits: dict[str, int], data_description: str, total: int,
                   trainable: int, batches: dict[str, int]) -> None:
    if not is_main():
        return
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(meta["config"])))
    write_text(run_dir / "classes.json", json.dumps(meta["classes"], indent=1) + "\n")
    info = {"task": meta["task"], "preprocess": meta["preprocess"], "weights_source": meta["weights_source"],
            "data": data_description, "splits": splits, "parameters": total, "trainable_parameters": trainable,
            "batches": batches}
    write_json(run_dir / "run_info.json", info, sort_keys=False)


def write_epochs(run_dir: Path, history: list[dict]) -> None:
    if is_main():
        write_dict_rows(run_dir / "metrics.csv", history)


class SkippedFiles:
    """What a run could not use (unreadable images, manifest rows, COCO boxes): each listed once, with its
    reason, in RUN/skipped_images.csv as soon as it is found (indexing, cache, any epoch, any split), and
    counted in one warning line at the end."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "skipped_images.csv"
        self.reasons: dict[str, str] = {}
        if self.path.exists():  # a resumed run: what the earlier part found
            with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
                self.reasons = {row["path"]: row["reason"] for row in csv.DictReader(handle)}

    def share(self) -> None:
        """Several processes: what each found (in its shard of the training data) joins rank 0's list."""
        if distributed.active():
            for reasons in distributed.gather(self.reasons):
                self.add(list(reasons.items()))

    def add(self, skipped: list[tuple[str, str]]) -> None:
        new = {path: reason for path, reason in skipped if path not in self.reasons}
        self.reasons.update(new)
        if new and is_main():
            write_csv(self.path, ["path", "reason"], self.reasons.items())

    def report(self) -> None:
        if self.reasons:
            kinds = collections.Counter(map(reason_kind, self.reasons.values()))
            summary = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
            log(f"warning: skipped {len(self.reasons)} image(s) or annotation(s) ({summary}); list in {self.path}")


def reason_kind(reason: str) -> str:
    """'truncated file', 'decompression bomb (…)' → the words before any detail, for the warning's summary."""
    if reason.startswith("same file as"):
        return "in two splits"
    if reason.startswith("listed in"):
        return "missing"
    return reason.split(" (")[0]


def progress_mode(progress: str) -> str:
    """auto: bars on a terminal, one line per epoch otherwise (logs, CI)."""
    require(progress, ("auto", "bar", "plain", "off"), "trainer.progress")
    if progress == "auto":
        return "bar" if sys.stderr.isatty() else "plain"
    return progress
