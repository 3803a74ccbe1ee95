"""`transfer train --help`: the config groups, keys and examples, generated from conf/ so it cannot drift."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf

from transfer.config import PRIMARY_CONFIG, compose, config_dir, group_options, groups


def command_help(command: str, usage: str) -> str:
    if command == "sweep":
        from transfer.cli import sweep

        return sweep.__doc__.replace("`", "")
    if command in ("runs", "compare"):
        from transfer.cli import runs

        return runs.__doc__.replace("`", "")
    if command == "cache":
        from transfer.cli import cache

        return cache.__doc__.replace("`", "")
    if command != "train":
        return usage
    lines = ["usage: transfer train [--config RUN/config.yaml] [--cfg] [-m] [group=option ...] [key=value ...]",
             "", "config groups (pick one with group=option; defaults marked *):"]
    defaults = defaults_list()
    for group in groups():
        options = [f"{o}*" if defaults.get(group) == o else o for o in group_options(group)]
        lines.append(f"  {group:<10} {', '.join(options) or '(none yet)'}")
    lines += ["", "keys (override with key=value; --cfg prints the composed config):"]
    lines += key_lines()
    lines += option_key_lines(defaults)
    lines += ["", "examples:", "  transfer train recipe=fashion_mnist_lite0 data.root=bench/data/fashion_mnist_100",
              "  transfer train data.root=/my/images model=timm model.name=resnet50 trainer.epochs=20 optim.lr=3e-4",
              "  transfer train finetune=linear_probe hydra.run.dir=runs/probe",
              "  transfer train finetune=freeze_then_unfreeze mixup=mixup ema.enabled=true optim.layer_decay=0.8 "
              "trainer.tta=flip",
              "  transfer train optim.lr=auto          # run the LR finder first (transfer lr-find plots the sweep)",
              "  transfer train task=segmentation data.root=/my/scenes   # classes.txt + images/ + masks/",
              "  transfer train task=detection data.root=/my/coco        # annotations.json + images/ (COCO)",
              "  transfer train trainer.monitor=val/loss trainer.early_stop_patience=3",
              "  transfer train -m seed=0,1,2 optim.lr=1e-3,3e-3   # every combination, mean ± std over seeds",
              "  transfer train trainer.processes=2        # data-parallel: torchrun's launcher with 2 processes",
              "  transfer train logger=[tensorboard,mlflow]  # trackers, offline, files in the run directory"]
    return "\n".join(lines)


def defaults_list() -> dict[str, str]:
    raw = OmegaConf.load(config_dir() / f"{PRIMARY_CONFIG}.yaml")
    return {k: v for entry in raw.defaults if isinstance(entry, dict) or hasattr(entry, "items")
            for k, v in entry.items()}


def key_lines() -> list[str]:
    cfg = compose([])
    lines = []
    for section, node in cfg.items():
        if isinstance(node, DictConfig):
            values = [f"{k}={short(v)}" for k, v in node.items() if not isinstance(v, (DictConfig, ListConfig))]
            if values:
                lines.append(f"  {section}: " + "  ".join(values))
        else:
            lines.append(f"  {section}={node}")
    return lines


def option_key_lines(defaults: dict[str, str]) -> list[str]:
    """Keys that a group's other options bring (e.g. finetune=freeze_then_unfreeze: finetune.head_epochs)."""
    lines = []
    for group in groups():
        default = defaults.get(group)
        known = set(OmegaConf.load(config_dir() / group / f"{default}.yaml")) if default else set()
        for option in group_options(group):
            if group == "recipe" or option == default:
                continue
            node = OmegaConf.load(config_dir() / group / f"{option}.yaml")
            extra = [f"{k}={short(v)}" for k, v in node.items() if k not in known and not isinstance(v, DictConfig)
                     and k != "defaults"]
            if extra and default:
                lines.append(f"  {group}={option} adds: " + "  ".join(f"{group}.{item}" for item in extra))
    return lines


def short(value) -> str:
    return "null" if value is None else str(value)
