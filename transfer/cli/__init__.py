"""`transfer <command> [overrides]`: parse, dispatch, and turn user mistakes into one-line errors.

A `UserError` (or Ctrl-C) ends the process with a message and a non-zero exit, never a traceback; anything
else is a bug and keeps its traceback. Commands import torch and timm only once they run (`transfer --help`
answers at once), and the process's OpenMP wait policy is chosen here, before torch loads (threads.py).
"""

from __future__ import annotations

import importlib
import os
import sys

from transfer.cli.launch import mark_command_start
from transfer.cli.threads import choose_wait_policy
from transfer.distributed import is_main
from transfer.errors import UserError

USAGE = """usage: transfer <command> [key=value ...]

commands:
  train            fine-tune a model (transfer train --help lists config groups and recipes);
                   transfer train -m key=a,b other=x,y runs every combination (Hydra multirun) with a summary
  sweep            an Optuna search: transfer sweep trials=16 'optim.lr=tag(log, interval(1e-4, 1e-2))' ...
  eval             evaluate a checkpoint: transfer eval checkpoint=RUN/best.pt [split=test] [data.root=DIR] [tta=flip]
  predict          run a checkpoint on images: transfer predict checkpoint=RUN/best.pt input=FILE_OR_FOLDER [top_k=5]
  augment-preview  write a PNG grid of augmented training images: transfer augment-preview [overrides] [out=PNG]
  lr-find          sweep the learning rate, plot the loss, suggest optim.lr: transfer lr-find [overrides] [out=DIR]
  export           for other projects: transfer export checkpoint=RUN/best.pt format=timm|backbone|onnx|torchscript|all
  report           rebuild a run's report.html (curves, metrics, mistakes, overlays, config): transfer report RUN
  runs             the runs in a folder, one line each: transfer runs [FOLDER] [sort=COLUMN] [desc=true] [format=csv]
  compare          what differs between two runs (overrides, config, metrics B-A): transfer compare RUN_A RUN_B
  cache            list or clear the disk image caches and linear-probe features under data.cache_dir:
                   transfer cache [list|clear] [what=images|features|all] [older_than_days=N] [data.cache_dir=DIR]

Also runs as `python -m transfer`. Examples:
  transfer train                                   # EfficientNet-Lite0 on the embedded digits, offline
  transfer train data.root=/my/images model=timm model.name=convnext_tiny trainer.epochs=20
  transfer train recipe=fashion_mnist_lite0 data.root=bench/data/fashion_mnist_100 optim.lr=3e-4
  transfer train --config runs/2026-01-01_12-00-00/config.yaml      # rerun a saved run exactly
"""

# command → (module, function): imported only when that command runs (torch and timm take seconds to load)
HANDLERS = {
    "train": ("transfer.cli.train", "train_command"),
    "sweep": ("transfer.cli.sweep", "sweep_command"),
    "eval": ("transfer.cli.evaluate", "eval_command"),
    "predict": ("transfer.cli.predict", "predict_command"),
    "augment-preview": ("transfer.cli.preview", "preview_command"),
    "export": ("transfer.cli.export", "export_command"),
    "lr-find": ("transfer.cli.lr_find", "lr_find_command"),
    "report": ("transfer.cli.report", "report_command"),
    "runs": ("transfer.cli.runs", "runs_command"),
    "compare": ("transfer.cli.runs", "compare_command"),
    "cache": ("transfer.cli.cache", "cache_command"),
}
COMMANDS = tuple(HANDLERS)


def main(argv: list[str] | None = None) -> int:
    """The exit code of `transfer ARGV`; output cut short by its reader (`transfer --help | head -1`) ends quietly."""
    mark_command_start(whole_process=argv is None)
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # the reader has gone: send what is still buffered nowhere, so the flush at exit cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a program killed by the closed pipe reports


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, arguments = argv[0], argv[1:]
    choose_wait_policy()
    try:
        return dispatch(command, arguments)
    except UserError as error:
        if str(error):  # empty: another process of the run reports it (errors.ReportedElsewhere)
            print(f"transfer {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # transfer.engine.interrupt.Interrupted carries its message and exit code
        if is_main():  # several processes stop together; rank 0 says where and how to resume
            print(f"transfer {command}: {stop or 'interrupted'}", file=sys.stderr)
        return getattr(stop, "code", 130)


def dispatch(command: str, arguments: list[str]) -> int:
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown command '{command}'.{hint} Commands: {', '.join(COMMANDS)}.")
    if "-h" in arguments or "--help" in arguments:
        from transfer.cli.help import command_help

        print(command_help(command, USAGE))
        return 0
    if command == "train" and ("-m" in arguments or "--multirun" in arguments):
        from transfer.cli.multirun import multirun_entry

        return multirun_entry(arguments)
    module, function = HANDLERS[command]
    return getattr(importlib.import_module(module), function)(arguments)
