"""Running a model on batches: device and precision choice, on-device normalisation, logits.

Training, evaluation and prediction all go through these functions, so a checkpoint sees exactly
the same preprocessing arithmetic in every command.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer.config import require
from transfer.data.dataset import raise_if_strict
from transfer.errors import UserError


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={device} but no CUDA device is available. Use trainer.device=cpu or auto.")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"trainer.device={device} is not a device. Use auto, cpu, cuda or cuda:N.") from None


def pick_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA where supported, else fp16; off on CPU, where autocast is slower."""
    require(str(amp), ("auto", "bf16", "fp16", "off"), "trainer.amp")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Normalizer:
    """uint8 NCHW batch → float, normalised, in the memory format the model runs fastest in."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        return ((images - self.mean) * self.scale).contiguous(memory_format=self.memory_format)


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, normalize: Normalizer,
                   amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """(logits, labels, dataset indices, skipped files) over a whole loader, on the CPU. Runs the model's copy
    with its BatchNorms folded into the convolutions before them (`fold_batchnorm`, checked once)."""
    model.eval()
    runner = None
    logits, labels, indices, skipped = [], [], [], []
    for batch in loader:
        raise_if_strict(batch)
        skipped += batch["skipped"]
        if len(batch["label"]) == 0:
            continue
        with autocast(normalize.device, amp_dtype):
            images = normalize(batch["image"])
            runner = checked_fold(model, images) if runner is None else runner  # a Sequential of length 0 is falsy
            output = runner(images)
        logits.append(output.float().cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
    if not logits:  # nothing readable here (callers that gather shards decide whether that is an error)
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    return torch.cat(logits), torch.cat(labels), torch.cat(indices), skipped


@dataclass
class _Folded:
    """A model's folded copy, kept between evaluations: its structure (`signature`), the (model's conv, model's
    BatchNorm, copy's fused conv) triples whose weights are refolded at each use, and whether its outputs were
    found equal to the model's (None: not compared yet)."""

    copy: nn.Module
    pairs: list[tuple[nn.Conv2d, nn.Module, nn.Conv2d]]
    signature: tuple[int, ...]
    same: bool | None = None


_FOLDED: weakref.WeakKeyDictionary[nn.Module, _Folded] = weakref.WeakKeyDictionary()


def checked_fold(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """The folded copy when its outputs on (the first 8 of) `images` equal the model's, else the model itself.
    The comparison is made once per model structure: folding is exact arithmetic, so later weights agree too."""
    folded = fold_batchnorm(model)
    entry = _FOLDED.get(model)
    if folded is None or entry is None:
        return model
    if entry.same is None:
        entry.same = same_outputs(folded(images[:8]), model(images[:8]))
    return folded if entry.same else model


def fold_batchnorm(model: nn.Module) -> nn.Module | None:
    """For inference: a copy of the eval-mode model in which every BatchNorm2d that directly follows a Conv2d
    (next to it among its parent's children) is folded into that convolution's weights and bias, a third
    fewer passes over the activations on CPU (EfficientNet-Lite0: eval 1.5× faster). timm's BatchNormAct2d
    keeps its activation. Registration order is not always call order: callers compare the copy's outputs
    with the model's once (`checked_fold`, `same_outputs`). None when nothing folds, and on GPUs (not measured
    there) and for compiled models (a new module would be compiled again at every evaluation).

    Built once per model and structure, not at every evaluation: the copy shares every parameter and buffer
    with the model except the fused convolutions, whose weights are folded again from the model's current
    ones at each call (a training run evaluates after every epoch; copying the whole model each time cost as
    much as evaluating dozens of images)."""
    first_parameter = next(model.parameters(), None)
    if model.training or first_parameter is None or first_parameter.device.type != "cpu" or \
            any(getattr(module, "_compiled_call_impl", None) is not None for module in model.modules()):
        return None
    signature = _signature(model)
    entry = _FOLDED.get(model)
    if entry is None or entry.signature != signature:
        entry = _build_folded(model, signature)
        if entry is None:
            return None
        _FOLDED[model] = entry
    _refold(entry.pairs)
    return entry.copy


def _signature(model: nn.Module) -> tuple[int, ...]:
    """What the copy depends on: the model's modules, parameters and buffers (by identity)."""
    return tuple(id(item) for item in (*model.modules(), *model.parameters(), *model.buffers()))


def _build_folded(model: nn.Module, signature: tuple[int, ...]) -> _Folded | None:
    pairs = [(parent, first, second) for parent in model.modules()
             for first, second in zip(list(parent._modules), list(parent._modules)[1:])
             if _foldable(parent._modules[first], parent._modules[second])]
    if not pairs:
        return None
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    memo = dict(shared)  # deepcopy maps these to themselves: the copy shares them, the modules are new
    copy_ = copy.deepcopy(model, memo)
    triples = []
    for parent, first, second in pairs:
        twin = memo[id(parent)]
        conv, norm = twin._modules[first], twin._modules[second]
        channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.dim() == 4
        fused = fuse_conv_bn_eval(conv, norm)
        if channels_last:
            fused = fused.to(memory_format=torch.channels_last)
        fused.weight.requires_grad_(False)
        if fused.bias is not None:
            fused.bias.requires_grad_(False)
        twin._modules[first] = fused
        twin._modules[second] = nn.Sequential(norm.drop, norm.act) if hasattr(norm, "act") else nn.Identity()
        triples.append((parent._modules[first], parent._modules[second], fused))
    return _Folded(copy_.eval(), triples, signature)


@torch.no_grad()
def _refold(pairs: list[tuple[nn.Conv2d, nn.Module, nn.Conv2d]]) -> None:
    """Fold each BatchNorm's current statistics and affine weights into its convolution's copy, in place."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    for conv, norm, fused in pairs:
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                            norm.weight, norm.bias)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)


def _foldable(conv: nn.Module | None, norm: nn.Module | None) -> bool:
    from timm.layers import BatchNormAct2d

    plain = type(norm) is nn.BatchNorm2d
    with_act = isinstance(norm, BatchNormAct2d) and type(norm).forward is BatchNormAct2d.forward
    return isinstance(conv, nn.Conv2d) and (plain or with_act) and norm.track_running_stats and \
        norm.running_mean is not None and conv.out_channels == norm.num_features


def same_outputs(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether two logit batches agree to float rounding (1e-3 of their scale; bf16/fp16: 3e-2)."""
    tolerance = 1e-3 if theirs.dtype == torch.float32 and ours.dtype == torch.float32 else 3e-2
    ours, theirs = ours.float(), theirs.float()
    if ours.shape != theirs.shape:
        return False
    return (ours - theirs).abs().max().item() <= tolerance * max(theirs.abs().max().item(), 1.0)
