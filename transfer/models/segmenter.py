"""The segmentation model: a timm features_only backbone and a small FPN decoder joined by channel counts."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from transfer.models.features import DenseModel

MIN_STRIDE = 4  # the finest level decoded: stride 2 maps cost much and add little at these input sizes


class FpnDecoder(nn.Module):
    """Lateral 1x1 convs to one width, a top-down sum (coarse maps upsampled onto finer ones), every level
    brought to the finest stride and summed, one 3x3 conv-BN-ReLU to fuse, a 1x1 conv to class logits."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        maps = [lateral(f) for lateral, f in zip(self.lateral, features)]
        for i in range(len(maps) - 2, -1, -1):  # top-down
            maps[i] = maps[i] + F.interpolate(maps[i + 1], size=maps[i].shape[-2:], mode="nearest")
        size = maps[0].shape[-2:]
        fused = sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size else m
                    for m in maps)
        return self.classifier(self.fuse(fused))


class SegmentationModel(DenseModel):
    """backbone → FPN decoder → logits at the input's size."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder_channels: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = FpnDecoder(backbone.feature_info.channels(), num_classes, decoder_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def levels_from_stride(name: str, min_stride: int = MIN_STRIDE) -> list[int]:
    """The backbone levels of stride >= min_stride (timm numbers levels from the stem)."""
    info = timm.create_model(name, features_only=True, pretrained=False).feature_info
    return [int(i) for i, r in zip(info.out_indices, info.reduction()) if r >= min_stride]
