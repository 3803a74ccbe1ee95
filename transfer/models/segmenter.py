"""The segmentation model: a timm features_only backbone and a decoder + segmentation head from
segmentation_models_pytorch (smp), joined by channel counts as smp joins its own encoders and decoders.

smp's decoders are the field's reference implementations; transfer builds and loads the backbone itself
(every weight source classification has, offline) and hands smp's decoder classes only the backbone's
channel counts, so smp never downloads anything and `model.backbone` stays the timm module that freezing,
layer decay and `transfer export format=backbone` work on.

smp's decoders read a list of feature maps indexed by stride: position p holds the map of stride 2**p
(position 0 the input itself). The backbone's maps are placed there; a position it does not give (the
input, or stride 2 for backbones that start at 4) gets an empty (0-channel) map of the right size, as smp
does for its own transformer encoders."""

from __future__ import annotations

import math
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from transfer.errors import UserError
from transfer.models.features import DenseModel, feature_channels, feature_strides

MIN_STRIDE = 4  # the finest level decoded: stride 2 maps cost much and add little at these input sizes
DEPTH = 5  # smp's encoder depth: the deepest map read has stride 2**5 = 32
NEEDED = (2, 3, 4, 5)  # positions (strides 4-32) every decoder here reads; unet and linknet read 1 too if given
GROUPS = 32  # smp's FPN normalises with GroupNorm(32, channels)


def _fpn(channels: list[int], width: int, options: dict) -> tuple[nn.Module, int]:
    from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

    if width % GROUPS:
        raise UserError(f"task.decoder_channels={width}: task.decoder=fpn normalises with GroupNorm({GROUPS}, "
                        f"channels); choose a multiple of {GROUPS} (e.g. 64).")
    return FPNDecoder(channels, DEPTH, pyramid_channels=width, segmentation_channels=width), width


def _unet(channels: list[int], width: int, options: dict) -> tuple[nn.Module, int]:
    """Five blocks up to the input's resolution, the first `width` wide, each next one half as wide (down to
    16, smp's own last width)."""
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

    widths = [max(width >> i, 16) for i in range(DEPTH)]
    return UnetDecoder(channels, widths, n_blocks=DEPTH), widths[-1]


def _deeplabv3plus(channels: list[int], width: int, options: dict) -> tuple[nn.Module, int]:
    """ASPP on the stride-16 map of a dilated backbone (smp's default output stride), fused with stride 4."""
    from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder

    rates = tuple(options.get("atrous_rates") or (12, 24, 36))  # smp's defaults
    return DeepLabV3PlusDecoder(channels, DEPTH, width, rates, output_stride=16, aspp_separable=True,
                                aspp_dropout=0.5), width


def _linknet(channels: list[int], width: int, options: dict) -> tuple[nn.Module, int]:
    """Block widths follow the backbone's channels; `width` is the last (smp's prefinal_channels)."""
    from segmentation_models_pytorch.decoders.linknet.decoder import LinknetDecoder

    return LinknetDecoder(channels, prefinal_channels=width, n_blocks=DEPTH), width


def _upernet(channels: list[int], width: int, options: dict) -> tuple[nn.Module, int]:
    from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

    return UPerNetDecoder(channels, DEPTH, decoder_channels=width), width


# name → (builder(channels by position, width, options) → (decoder, its output channels), smp's head kernel size,
#         finest backbone stride decoded by default, backbone output stride (None: undilated))
DECODERS: dict[str, tuple[Callable, int, int, int | None]] = {
    "fpn": (_fpn, 1, MIN_STRIDE, None),
    "unet": (_unet, 3, 2, None),
    "deeplabv3plus": (_deeplabv3plus, 1, MIN_STRIDE, 16),
    "linknet": (_linknet, 1, 2, None),
    "upernet": (_upernet, 1, MIN_STRIDE, None),
}
# decoder-specific keys (task.KEY) → the decoders that read them; set for another decoder, they are refused
DECODER_OPTIONS = {"atrous_rates": ("deeplabv3plus",)}


def positions(strides: list[int]) -> list[int]:
    """smp's list position of each backbone map: log2 of its stride, one past the previous where a dilated
    backbone repeats a stride (its last map then still takes the deepest position)."""
    placed: list[int] = []
    for stride in strides:
        placed.append(max(round(math.log2(stride)), placed[-1] + 1 if placed else 0))
    return placed


class DecoderHead(nn.Module):
    """smp decoder → smp segmentation head (a conv to class logits), over the backbone's maps placed at smp's
    positions: the whole model except the backbone, so the fine-tune strategies see one head."""

    def __init__(self, decoder: nn.Module, head: nn.Module, placed: list[int]) -> None:
        super().__init__()
        self.decoder, self.segmentation_head, self.placed = decoder, head, placed

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        first = features[0]
        maps = [first.new_zeros(first.shape[0], 0, math.ceil(size[0] / 2 ** p), math.ceil(size[1] / 2 ** p))
                for p in range(DEPTH + 1)]
        for p, feature in zip(self.placed, features):
            maps[p] = feature
        return self.segmentation_head(self.decoder(maps))


class SegmentationModel(DenseModel):
    """backbone → smp decoder + head → logits at the input's size. Inputs are padded (zeros, the mean after
    normalisation) to a multiple of the deepest stride, as smp's decoders add maps upsampled by exact factors
    of two, and the logits cropped back."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder_channels: int = 64, decoder: str = "fpn",
                 **options) -> None:
        super().__init__()
        self.backbone = backbone
        placed = positions(feature_strides(backbone))
        check_levels(decoder, placed)
        build, kernel, _, _ = DECODERS[decoder]
        channels = [0] * (DEPTH + 1)
        for p, count in zip(placed, feature_channels(backbone)):
            channels[p] = count
        module, out_channels = build(channels, int(decoder_channels), options)
        from segmentation_models_pytorch.base import SegmentationHead

        self.head = DecoderHead(module, SegmentationHead(out_channels, num_classes, kernel_size=kernel), placed)
        self.multiple = 2 ** DEPTH

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        padded = F.pad(images, (0, -width % self.multiple, 0, -height % self.multiple))
        logits = self.head(self.backbone(padded), padded.shape[-2:])
        if logits.shape[-2:] != padded.shape[-2:]:
            logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


def check_levels(decoder: str, placed: list[int]) -> None:
    """The decoders read the maps of strides 4 to 32: refuse a backbone or task.out_indices without them."""
    if any(p not in placed for p in NEEDED) or placed[-1] != DEPTH:
        raise UserError(f"task.decoder={decoder} reads the backbone's maps of strides 4, 8, 16 and 32; these "
                        f"levels have strides {[2 ** p for p in placed]}. Set task.out_indices=null (or list the "
                        "levels of those strides), or pick a backbone with them.")


def decoder_levels(name: str, decoder: str) -> list[int]:
    """The backbone levels a decoder reads by default: those of stride >= its finest stride."""
    return levels_from_stride(name, DECODERS[decoder][2])


def levels_from_stride(name: str, min_stride: int = MIN_STRIDE) -> list[int]:
    """The backbone levels of stride >= min_stride (timm numbers levels from the stem)."""
    info = timm.create_model(name, features_only=True, pretrained=False).feature_info
    return [int(i) for i, r in zip(info.out_indices, info.reduction()) if r >= min_stride]
