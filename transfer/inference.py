"""Running a model on batches: device and precision choice, on-device normalisation, logits.

Training, evaluation and prediction all go through these functions, so a checkpoint sees exactly
the same preprocessing arithmetic in every command.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader

from transfer.config import require
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
    """(logits, labels, dataset indices, skipped files) over a whole loader, on the CPU."""
    model.eval()
    logits, labels, indices, skipped = [], [], [], []
    for batch in loader:
        skipped += batch["skipped"]
        if len(batch["label"]) == 0:
            continue
        with autocast(normalize.device, amp_dtype):
            output = model(normalize(batch["image"]))
        logits.append(output.float().cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
    if not logits:
        raise UserError("no readable images to evaluate.")
    return torch.cat(logits), torch.cat(labels), torch.cat(indices), skipped
