"""`transfer lr-find [overrides] [out=DIR]`: the LR sweep on the configured task, data and model, its plot,
and the suggested optim.lr."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from transfer.cli.options import split_options
from transfer.config import compose, without_hydra
from transfer.engine.lr_find import sweep_lr, sweep_settings, write_sweep
from transfer.engine.setup import build_setup

LR_FIND_KEYS = ("out",)


def lr_find_command(arguments: list[str]) -> int:
    options, overrides = split_options(arguments, LR_FIND_KEYS)
    cfg = without_hydra(compose(overrides))
    out = Path(options.get("out") or f"runs/lr_find_{time.strftime('%Y-%m-%d_%H-%M-%S')}").expanduser()
    setup = build_setup(cfg)
    sweep = sweep_lr(setup.model, setup.plan, OmegaConf.to_container(cfg.optim), setup.loaders["train"], setup.task,
                     setup.runtime, **sweep_settings(cfg))
    data_path, plot_path = write_sweep(sweep, out)
    others = ", ".join(f"{name} {value:.2e}" for name, value in sweep.suggestions.items() if name != sweep.method)
    print(f"suggested optim.lr={sweep.suggestion:.2e} ({sweep.method}; {others}); {len(sweep.lrs)} steps in "
          f"{sweep.seconds:.1f}s; plot {plot_path}, points {data_path}")
    return 0
