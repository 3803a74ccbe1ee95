"""`transfer eval checkpoint=PATH [split=] [out=] [batch_size=] [device=] [tta=] [data.KEY=VALUE ...]`: a
checkpoint's task metrics on a split, as training scored it, into OUT/metrics.json with the task's reports.

The data is the run's (its saved data config, `data.KEY=VALUE` overrides on top), so the run's own test
figures come back exactly; a classifier also takes a new data.root as it is. Unreadable files are counted in
one warning line and listed in OUT/skipped_images.csv.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transfer.cli.options import (checkpoint_argument, device_argument, load_run_checkpoint, positive_int,
                                  reject_unknown, run_checkpoint_file, split_options, write_skipped)
from transfer.data.loaders import build_loader
from transfer.engine.fit import prefixed
from transfer.engine.inference import load_for_inference
from transfer.errors import UserError
from transfer.files import write_json

EVAL_KEYS = ("checkpoint", "split", "out", "batch_size", "device", "tta")


def eval_command(arguments: list[str]) -> int:
    options, rest = split_options(arguments, EVAL_KEYS)
    data_overrides = [item for item in rest if item.startswith("data.") and "=" in item]
    reject_unknown([item for item in rest if item not in data_overrides], "eval",
                   [f"{key}=" for key in EVAL_KEYS] + ["data.KEY= (the run's data config)"])
    path = run_checkpoint_file(checkpoint_argument(options))
    checkpoint = load_run_checkpoint(path)
    loaded = load_for_inference(checkpoint, device_argument(options))
    task, saved = loaded.task, checkpoint["config"]
    tta = options.get("tta") or saved.get("trainer", {}).get("tta") or "none"
    if tta != "none" and "trainer.tta" in task.unsupported:
        raise UserError(f"tta= is for classifiers; {path} is a {task.name} checkpoint. Drop tta=.")
    cfg = OmegaConf.create(saved)
    cfg.data = data_config(saved["data"], data_overrides)
    split, dataset, data = task.eval_dataset(cfg, loaded.preprocess, options.get("split"), saved["data"].get("root"),
                                             loaded.classes)
    batch_size = positive_int(options, "batch_size", int(cfg.data.eval_batch_size))
    loader = build_loader(dataset, batch_size, train=False, num_workers=cfg.data.num_workers, seed=0,
                          pin_memory=loaded.runtime.device.type == "cuda", collate_fn=task.collate)
    evaluation = task.evaluate(loaded.model, loader, dataclasses.replace(loaded.runtime, tta=tta))
    skipped = data.skipped + evaluation.skipped
    metrics = {**prefixed(evaluation.metrics, split), f"{split}/images": len(dataset) - len(evaluation.skipped),
               f"{split}/skipped": len(skipped)}
    out = Path(options.get("out") or path.parent / f"eval-{split}").expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create out={out}: {error.strerror}. Choose a writable folder.") from None
    task.report(out, split, evaluation, dataset)
    count = int(cfg.task.get("overlays") or 0)
    if count:
        task.draw(loaded.model, dataset, out / "overlays", loaded.runtime, count)
    write_json(out / "metrics.json", metrics)
    write_skipped(out / "skipped_images.csv", skipped)
    print_summary(split, metrics, task.name, data.description, skipped, out)
    return 0


def data_config(saved: dict, overrides: list[str]) -> DictConfig:
    """The run's data config with `data.KEY=VALUE` overrides; only keys it already has."""
    for item in overrides:
        key = item.partition("=")[0].removeprefix("data.")
        if key not in saved:
            hint = difflib.get_close_matches(key, list(saved), n=1)
            did_you_mean = f" Did you mean data.{hint[0]}?" if hint else ""
            raise UserError(f"unknown key 'data.{key}'.{did_you_mean} Valid data keys: "
                            f"{', '.join('data.' + k for k in saved)}.")
    return OmegaConf.merge({"data": saved}, OmegaConf.from_dotlist(overrides)).data


def print_summary(split: str, metrics: dict, task: str, description: str, skipped: list, out: Path) -> None:
    shown = "  ".join(f"{key.split('/', 1)[1]} {value:.4f}" for key, value in metrics.items()
                      if isinstance(value, float) and key.count("/") == 1)
    print(f"eval {split}: {metrics[f'{split}/images']} images ({task}) from {description}")
    print(f"  {shown}")
    if skipped:
        print(f"  warning: skipped {len(skipped)} unreadable image(s) or annotation(s); list in "
              f"{out / 'skipped_images.csv'}")
    print(f"reports and metrics.json in {out}")
