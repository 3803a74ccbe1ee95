"""`transfer train [--config RUN/config.yaml] [--cfg] [overrides]`: compose, make the run directory, train.

The run directory is made and locked here, before torch and timm load, so a mistake in it costs nothing;
a run that fails on a user's mistake before its first checkpoint leaves no folder behind.

Each run records what it was composed from in RUN/composition.yaml (the command-line overrides, the group
choices Hydra made, and the run it was varied from), beside the resolved config.yaml. `--config RUN/config.yaml`
reruns the saved config exactly; key overrides change single values of it; a group override (`augment=strong`,
`model=timm`, `recipe=...`) recomposes from the recorded overrides plus the new ones, as composing all of them
from scratch would, so the group is swapped whole.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transfer import distributed
from transfer.cli.launch import check_processes, command_started
from transfer.config import compose, groups, without_hydra
from transfer.engine.rundir import lock_run_dir, make_run_dir
from transfer.errors import UserError
from transfer.files import write_text

COMPOSITION = "composition.yaml"
NOT_RECORDED = ("hydra.run.dir", "trainer.resume")  # where and whether to continue: never carried to a new run

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # OSErrors the user can fix


def train_command(arguments: list[str]) -> int:
    config_file, overrides, show_only, multirun = train_flags(arguments)
    if multirun:  # cli/__init__.py sends -m to transfer.cli.multirun
        raise UserError("-m runs several jobs; --cfg shows one config: drop one of them.")
    cfg, record = compose_run(overrides, config_file)
    if show_only:
        print(OmegaConf.to_yaml(without_hydra(cfg), resolve=True))
        return 0
    processes = check_processes(cfg.trainer.get("processes", 1), distributed.launched(),
                                distributed.local_world_size())
    if processes > 1 and not distributed.launched():
        from transfer.cli.launch import launch

        return launch(processes, ["train", *arguments])
    chosen = any(o.startswith("hydra.run.dir=") for o in overrides)
    train_shared(cfg, lambda: make_run_dir(cfg.hydra.run.dir, chosen, cfg.trainer.get("resume")), record,
                 command_started())
    return 0


def train_shared(cfg: DictConfig, make_dir, record: dict,
                 started: float | None = None) -> tuple[Path, dict[str, float]]:
    """(run directory, metrics) of a training run; with several processes, rank 0 resolves the config and makes
    the run directory (`make_dir`), and every rank trains with those (a timestamped folder or `${now:}` would
    differ between processes). `started`: when the command began (time.time()), for the start-up it reports."""
    if not distributed.launched():
        run_dir = make_dir()
        return run_dir, train_in(without_hydra(cfg), run_dir, record, started=started)
    distributed.start()
    try:
        from transfer.engine.parallel import agree

        made, error = None, None
        if distributed.is_main():
            try:
                made = (make_dir(), OmegaConf.to_container(without_hydra(cfg), resolve=True))
            except UserError as raised:
                error = raised
        agree(error)
        run_dir, resolved = distributed.broadcast(made)
        return Path(run_dir), train_in(OmegaConf.create(resolved), Path(run_dir), record, started=started)
    finally:
        distributed.stop()


def compose_run(overrides: list[str], config_file: str | None = None) -> tuple[DictConfig, dict]:
    """(the config with Hydra's node, what it was composed from: RUN/composition.yaml's contents)."""
    parent = None
    if config_file is not None and any(is_group_override(item) for item in overrides):
        parent = Path(config_file).expanduser().resolve().parent
        overrides = recorded_overrides(parent) + overrides
        config_file = None
    cfg = compose(overrides, with_hydra=True, config_file=config_file)
    choices = {group: choice for group, choice in cfg.hydra.runtime.choices.items() if not group.startswith("hydra/")}
    if config_file is not None:  # the saved config itself (and key overrides on it): the parent's record continues
        parent = Path(config_file).expanduser().resolve().parent
        earlier = OmegaConf.load(parent / COMPOSITION) if (parent / COMPOSITION).is_file() else {}
        overrides = [str(item) for item in earlier.get("overrides", [])] + overrides
        choices = dict(earlier.get("choices", {}))
    kept = [item for item in overrides if item.split("=", 1)[0].lstrip("+~") not in NOT_RECORDED]
    return cfg, {"overrides": kept, "choices": choices, "parent": str(parent) if parent else None}


def is_group_override(item: str) -> bool:
    """`augment=strong`, `+recipe=x`, `~mixup`: a choice of a whole conf/ group rather than one key's value."""
    key = item.split("=", 1)[0].lstrip("+~")
    return "." not in key and key in groups()


def recorded_overrides(run_dir: Path) -> list[str]:
    path = run_dir / COMPOSITION
    if not path.is_file():
        raise UserError(f"{run_dir} has no {COMPOSITION} (it was made before transfer recorded how runs are composed), "
                        "so a group override cannot be applied to it. Rerun it as it is with --config alone, or compose "
                        "afresh with the original overrides plus the new ones.")
    return [str(item) for item in OmegaConf.load(path).get("overrides", [])]


def train_in(cfg: DictConfig, run_dir: Path, record: dict | None = None, hooks=None,
             started: float | None = None) -> dict[str, float]:
    """Train into `run_dir` under its lock; a failure before the first checkpoint removes a folder made for it."""
    from transfer.engine.fit import Hooks, train  # torch, timm: seconds to import, so only once the config is valid

    hooks = hooks or Hooks(started=started)

    if not distributed.is_main():  # rank 0 holds and writes the run directory; the others only compute
        return train(cfg, run_dir, hooks)
    lock = lock_run_dir(run_dir)
    try:
        if not cfg.trainer.resume and (run_dir / "config.yaml").exists():  # another run got there first
            raise UserError(f"{run_dir} already holds a run. Choose another hydra.run.dir.")
        fresh = all(path.name == ".lock" for path in run_dir.iterdir())
        if record is not None and not cfg.trainer.resume:
            write_text(run_dir / COMPOSITION, OmegaConf.to_yaml(OmegaConf.create(record)))
        try:
            return train(cfg, run_dir, hooks)  # writes config.yaml once the data, model and any resume are checked
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


def train_flags(arguments: list[str]) -> tuple[str | None, list[str], bool, bool]:
    config_file, overrides, show_only, multirun = None, [], False, False
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
        elif item in ("-m", "--multirun"):
            multirun = True
        elif item.startswith("-"):
            raise UserError(f"unknown option {item}. Options: --config PATH, --cfg, -m/--multirun, --help; the rest "
                            "are key=value.")
        else:
            overrides.append(item)
    return config_file, overrides, show_only, multirun
