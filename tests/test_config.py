"""Every config file on disk composes and feeds the functions it is meant for.

Options and recipes are discovered from the folders at collection time, so a new file is tested
without touching this module.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import timm
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from transfer.config import compose, config_dir, group_options, groups
from transfer.models.backbone import build_model, resolve_preprocess
from transfer.models.finetune import STRATEGIES

REPO = Path(__file__).resolve().parents[1]
CONF = config_dir()
GROUP_FILES = sorted(p for p in CONF.glob("*/*.yaml") if p.parent.name != "recipe")
RECIPE_FILES = sorted((CONF / "recipe").glob("*.yaml"))
# Keys the training loop passes itself; a config that also sets them would collide.
SCHEDULE_KEYS_SET_BY_LOOP = {"num_epochs", "step_on_epochs", "updates_per_epoch"}


def _id(path: Path) -> str:
    return f"{path.parent.name}={path.stem}"


def _body(path: Path) -> DictConfig:
    """A config file without its defaults list (and without hydra's own settings)."""
    raw = OmegaConf.load(path)
    return OmegaConf.masked_copy(raw, [k for k in raw if k not in ("defaults", "hydra")])


def _key_paths(node: DictConfig, prefix: str = "") -> list[str]:
    paths = []
    for key, value in node.items():
        paths += _key_paths(value, f"{prefix}{key}.") if isinstance(value, DictConfig) else [f"{prefix}{key}"]
    return paths


def _parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def _tiny_model():
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=3)


def assert_feeds_timm(cfg: DictConfig) -> None:
    """optim/schedule/model keys are exactly keyword arguments of the factories they feed."""
    assert set(cfg.optim) <= _parameters(create_optimizer_v2) - {"model_or_params"}
    optimizer = create_optimizer_v2(_tiny_model(), **cfg.optim)  # also catches keys for the optimizer class
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr)
    assert set(cfg.schedule) <= _parameters(create_scheduler_v2) - {"optimizer"} - SCHEDULE_KEYS_SET_BY_LOOP
    scheduler, epochs = create_scheduler_v2(optimizer, num_epochs=cfg.trainer.epochs, step_on_epochs=False,
                                            updates_per_epoch=4, **cfg.schedule)
    assert scheduler is not None and epochs >= cfg.trainer.epochs
    assert set(cfg.model) <= _parameters(build_model) - {"num_classes"}
    assert timm.is_model(cfg.model.name), cfg.model.name
    assert set(cfg.preprocess) <= _parameters(resolve_preprocess) - {"model"}
    assert cfg.finetune.strategy in STRATEGIES


def test_default_config_composes_and_feeds_timm() -> None:
    cfg = compose()
    assert {"data", "model", "augment", "optim", "schedule", "finetune", "trainer", "preprocess"} <= set(cfg)
    assert_feeds_timm(cfg)


def test_groups_are_the_folders_on_disk() -> None:
    on_disk = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert set(groups()) == on_disk
    assert {"model", "optim", "schedule", "recipe"} <= on_disk


@pytest.mark.parametrize("path", GROUP_FILES, ids=_id)
def test_group_option_composes_with_its_values(path: Path) -> None:
    group, option = path.parent.name, path.stem
    assert option in group_options(group)
    cfg = compose([f"{group}={option}"])
    body = OmegaConf.to_container(_body(path))
    if path.read_text().startswith("# @package _global_"):  # a task file: its own keys and the shared ones it sets
        for section, values in body.items():
            assert values.items() <= OmegaConf.to_container(cfg[section]).items()
    else:
        assert body.items() <= OmegaConf.to_container(cfg[group]).items()
    assert_feeds_timm(cfg)


@pytest.mark.parametrize("path", sorted(CONF.glob("augment/*.yaml")), ids=_id)
def test_augment_preset_builds_with_albumentations(path: Path) -> None:
    from transfer.data.augment import build_train_transform

    steps = OmegaConf.to_container(compose([f"augment={path.stem}"]).augment.train)
    preprocess = {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 0.875,
                  "mean": [0.5] * 3, "std": [0.5] * 3}
    pipeline = build_train_transform(steps, preprocess)
    assert len(pipeline.transforms) == len(steps) + 1  # + ToTensorV2


def test_recipe_group_is_the_recipes_folder() -> None:
    """conf/recipe reaches the top-level recipes/ (a symlink in the checkout, a copy in a wheel)."""
    assert group_options("recipe") == sorted(p.stem for p in RECIPE_FILES)
    if (REPO / "recipes").is_dir() and CONF == REPO / "conf":
        assert (CONF / "recipe").resolve() == (REPO / "recipes").resolve()
    assert compose().get("recipe", None) is None  # `recipe: null` adds nothing by default


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_id)
def test_recipe_composes_as_a_global_overlay(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().startswith("# @package _global_"), "recipes must start with `# @package _global_`"
    raw = OmegaConf.load(path)
    overrides = []
    for entry in raw.get("defaults", []):
        for key, option in (entry.items() if isinstance(entry, DictConfig) else []):
            assert key.startswith("override /"), f"{path.name}: use `override /{key}: {option}` in defaults"
            overrides.append(f"{key.removeprefix('override /')}={option}")
    base = compose(overrides)
    unknown = [key for key in _key_paths(_body(path)) if OmegaConf.select(base, key, default=KeyError) is KeyError]
    assert unknown == [], f"{path.name} sets keys the config does not have (misspelled?)"
    cfg = compose([f"recipe={path.stem}"])
    expected = OmegaConf.merge(base, _body(path))
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(expected)
    assert_feeds_timm(cfg)


def test_config_dir_is_found_from_another_working_directory(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = config_dir()
    assert folder.is_absolute() and (folder / "train.yaml").is_file()
    assert tmp_path not in folder.parents
    assert compose(["trainer.epochs=3"]).trainer.epochs == 3
