"""`transfer train [--config RUN/config.yaml] [--cfg] [overrides]`: compose, make the run directory, train.

The run directory is made and locked here, before torch and timm load, so a mistake in it costs nothing;
a run that fails on a user's mistake before its first checkpoint leaves no folder behind.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transfer.config import compose, without_hydra
from transfer.engine.rundir import lock_run_dir, make_run_dir
from transfer.errors import UserError

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # OSErrors the user can fix


def train_command(arguments: list[str]) -> int:
    config_file, overrides, show_only = train_flags(arguments)
    cfg = compose(overrides, with_hydra=True, config_file=config_file)
    if show_only:
        print(OmegaConf.to_yaml(without_hydra(cfg), resolve=True))
        return 0
    chosen = any(o.startswith("hydra.run.dir=") for o in overrides)
    run_dir = make_run_dir(cfg.hydra.run.dir, chosen, cfg.trainer.get("resume"))
    train_in(without_hydra(cfg), run_dir)
    return 0


def train_in(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Train into `run_dir` under its lock; a failure before the first checkpoint removes a folder made for it."""
    from transfer.engine.fit import train  # torch, timm: seconds to import, so only once the config is valid

    lock = lock_run_dir(run_dir)
    try:
        if not cfg.trainer.resume and (run_dir / "config.yaml").exists():  # another run got there first
            raise UserError(f"{run_dir} already holds a run. Choose another hydra.run.dir.")
        fresh = all(path.name == ".lock" for path in run_dir.iterdir())
        try:
            return train(cfg, run_dir)  # writes config.yaml once the data, model and any resume are checked
        except OSError as error:
            if error.errno not in DISK_ERRORS:
                raise
            verb = "access" if error.errno in (errno.EACCES, errno.EPERM) else "write"
            raise UserError(f"cannot {verb} {error.filename or run_dir}: {error.strerror}. Free some space, fix the "
                            "permissions or set hydra.run.dir to a writable folder; checkpoints already written are "
                            "intact.") from None
        except (UserError, KeyboardInterrupt):
            if fresh and not (run_dir / "last.pt").exists():  # no checkpoint yet: leave no run behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    finally:
        if lock is not None:
            lock.close()


def train_flags(arguments: list[str]) -> tuple[str | None, list[str], bool]:
    config_file, overrides, show_only = None, [], False
    items = iter(arguments)
    for item in items:
        if item == "--config":
            config_file = next(items, None)
            if config_file is None:
                raise UserError("--config needs a path to a run's config.yaml.")
        elif item.startswith("--config="):
            config_file = item.split("=", 1)[1]
        elif item in ("--cfg", "--show-config"):
            show_only = True
        elif item.startswith("-"):
            raise UserError(f"unknown option {item}. Options: --config PATH, --cfg, --help; the rest are key=value.")
        else:
            overrides.append(item)
    return config_file, overrides, show_only
