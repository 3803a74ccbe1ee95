"""Test-time augmentation: a model wrapper that averages the class probabilities of several views.

`none` is the model itself; `flip` adds the horizontal mirror; `crops` is five crops (centre and corners,
`CROP_FRACTION` of the side, resized back to the input size); `flip_crops` is those five and their
mirrors. The wrapper returns log(mean softmax), which are valid logits: softmax, argmax, top-k and the
loss of every metric work on them unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transfer.config import require

TTA_MODES = ("none", "flip", "crops", "flip_crops")
CROP_FRACTION = 0.875


class TestTimeAugmentation(nn.Module):
    __test__ = False  # not a pytest class

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model, self.mode = model, require(mode, TTA_MODES, "tta")

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        views = five_crops(images) if "crops" in self.mode else [images]
        if "flip" in self.mode:
            views += [view.flip(-1) for view in views]
        return views

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([self.model(view).float().softmax(dim=1) for view in self.views(images)])
        return probabilities.mean(dim=0).clamp_min(1e-12).log()


def five_crops(images: torch.Tensor, fraction: float = CROP_FRACTION) -> list[torch.Tensor]:
    """Centre and four corner crops of an NCHW batch, each resized back to the batch's size."""
    height, width = images.shape[-2:]
    h, w = max(1, round(height * fraction)), max(1, round(width * fraction))
    tops, lefts = (0, height - h), (0, width - w)
    corners = [(top, left) for top in tops for left in lefts]
    centre = ((height - h) // 2, (width - w) // 2)
    crops = [images[..., t:t + h, l:l + w] for t, l in [centre, *corners]]
    return [F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
            .contiguous(memory_format=torch.channels_last if images.is_contiguous(memory_format=torch.channels_last)
                        else torch.contiguous_format) for crop in crops]


def with_tta(model: nn.Module, mode: str | None) -> nn.Module:
    """The model wrapped for test-time augmentation, or the model itself for none."""
    if mode in (None, "none"):
        return model
    return TestTimeAugmentation(model, mode)
