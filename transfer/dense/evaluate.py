"""`transfer eval` for segmentation and detection checkpoints: a held-out split scored with the task's own
metrics, as training scored it, into OUT/metrics.json with overlays of a few images.

The data is the run's (its saved data config, `data.KEY=VALUE` overrides on top): the same splits, so the
run's test figures come back exactly. A new data.root is read as training reads a root: its split folders,
or one pooled folder split by data.val_fraction / data.test_fraction.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from transfer.errors import UserError
from transfer.evaluate import write_json

HELD_OUT = ("test", "val")


def eval_dense(path: Path, checkpoint: dict, options: dict[str, str], data_overrides: list[str]) -> int:
    from transfer.commands import data_config, device_argument, positive_int, write_skipped
    from transfer.dense.train import dense_from_checkpoint, dense_loader, drain, prefixed

    cfg = OmegaConf.create(checkpoint["config"])
    cfg.data = data_config(checkpoint["config"]["data"], data_overrides)
    cfg.data.eval_batch_size = positive_int(options, "batch_size", int(cfg.data.eval_batch_size))
    task, model = dense_from_checkpoint(checkpoint)
    datasets, classes, skipped = task.build_datasets(cfg, dict(checkpoint["preprocess"]))
    if list(classes) != list(checkpoint["classes"]):
        raise UserError(f"data.root={cfg.data.root} names the classes {list(classes)}; {path} was trained on "
                        f"{list(checkpoint['classes'])}. Evaluate on data with the same classes.")
    split = held_out_split(options.get("split"), datasets, path)
    model.to(device_argument(options))
    metrics = prefixed(task.evaluate(model, dense_loader(datasets[split], task, cfg, train=False)), split)
    skipped += drain(task)
    out = Path(options.get("out") or path.parent / f"eval-{split}").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    count = int(cfg.task.get("overlays", 0) or 0)
    if count:
        task.write_overlays(model, datasets[split], out / "overlays", count)
    write_skipped(out / "skipped_images.csv", skipped)
    shown = "  ".join(f"{key.split('/', 1)[1]} {value:.4f}" for key, value in metrics.items()
                      if key.split("/")[-1] in ("miou", "pixel_accuracy", "map", "map50", "map75"))
    print(f"eval {split} ({task.name}): {len(datasets[split])} image(s) from {cfg.data.root}\n  {shown}")
    if skipped:
        print(f"  warning: skipped {len(skipped)} image(s) or annotation(s); list in {out / 'skipped_images.csv'}")
    print(f"  metrics in {out / 'metrics.json'}")
    return 0


def held_out_split(asked: str | None, datasets: dict, path: Path) -> str:
    """The split to score: the one asked for, else test, else val; never the training split."""
    held_out = [name for name in HELD_OUT if name in datasets]
    if asked is None and held_out:
        return held_out[0]
    if asked in held_out:
        return asked
    have = ", ".join(held_out) or "none"
    raise UserError(f"split={asked or '(default)'}: the data of {path} has held-out splits: {have}. Choose one with "
                    "split=test|val, or give data.root a test/ folder (or data.test_fraction > 0).")
