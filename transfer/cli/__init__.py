"""`transfer <command> [overrides]`: parse, dispatch, and turn user mistakes into one-line errors.

A `UserError` (or Ctrl-C) ends the process with a message and a non-zero exit, never a traceback; anything
else is a bug and keeps its traceback. Commands import torch and timm only once they run (`transfer --help`
answers at once), and the process's OpenMP wait policy is chosen here, before torch loads (threads.py).
"""

from __future__ import annotations

import sys

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

COMMANDS = ("train", "sweep", "eval", "predict", "augment-preview", "export", "lr-find", "report", "runs",
            "compare", "cache")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    if command == "train":
        from transfer.cli.train import train_command

        return train_command(arguments)
    if command == "sweep":
        from transfer.cli.sweep import sweep_command

        return sweep_command(arguments)
    if command == "eval":
        from transfer.cli.evaluate import eval_command

        return eval_command(arguments)
    if command == "predict":
        from transfer.cli.predict import predict_command

        return predict_command(arguments)
    if command == "export":
        from transfer.cli.export import export_command

        return export_command(arguments)
    if command == "report":
        from transfer.cli.report import report_command

        return report_command(arguments)
    if command == "runs":
        from transfer.cli.runs import runs_command

        return runs_command(arguments)
    if command == "compare":
        from transfer.cli.runs import compare_command

        return compare_command(arguments)
    if command == "cache":
        from transfer.cli.cache import cache_command

        return cache_command(arguments)
    if command == "lr-find":
        from transfer.cli.lr_find import lr_find_command

        return lr_find_command(arguments)
    from transfer.cli.preview import preview_command

    return preview_command(arguments)
