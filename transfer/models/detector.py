"""The detection model: torchvision's FCOS around a timm features_only backbone, its feature pyramid slimmed
to CPU size."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from transfer.models.features import DenseModel, feature_channels, feature_strides


class _Pyramid(nn.Module):
    """timm feature maps → FPN levels (+ P6, P7), as FCOS expects of its `backbone`.

    The timm model is held without registering it here: it is registered once, as `Detector.backbone`, so
    checkpoints, freezing, layer decay and export see one backbone under `backbone.*` (a deepcopy, as for EMA,
    copies the list along with the model and so points at the copy's backbone)."""

    def __init__(self, backbone: nn.Module, fpn: FeaturePyramidNetwork, out_channels: int) -> None:
        super().__init__()
        self.fpn, self.out_channels = fpn, out_channels
        self._body = [backbone]

    def forward(self, images: torch.Tensor) -> OrderedDict:
        features = self._body[0](images)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


class Detector(DenseModel):
    """`backbone` (the timm features_only model) + `head` (FCOS: its pyramid, towers and input transform), so
    the fine-tune strategies, layer decay and export treat it like every dense model.

    forward(images, targets) → FCOS's loss dict in train mode, [{"boxes", "scores", "labels"}] in eval mode;
    images are float in [0, 1] (FCOS's transform normalises them)."""

    def __init__(self, backbone: nn.Module, head: FCOS, model_name: str) -> None:
        super().__init__()
        self.backbone, self.head, self.model_name = backbone, head, model_name

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        return self.head(list(images), targets)


def build_detector(backbone: nn.Module, model_name: str, num_classes: int, input_size: tuple[int, int],
                   mean: list[float], std: list[float], fpn_channels: int = 64, head_convs: int = 2,
                   center_sampling_radius: float = 1.5, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                   detections_per_img: int = 100) -> Detector:
    """FCOS over the backbone's levels; `num_classes` objects (labels 1..K; FCOS keeps slot 0 unused).
    `input_size` = (short, long) side the pipeline already resized to, so FCOS's own resize leaves it be."""
    fpn = FeaturePyramidNetwork(feature_channels(backbone), fpn_channels,
                                extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
    strides = feature_strides(backbone)
    strides += [strides[-1] * 2, strides[-1] * 4]  # P6, P7
    # one location per cell; FCOS assigns an object to the level whose anchor size s has 4s <= reach < 8s
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    head = FCOSHead(fpn_channels, 1, num_classes + 1, num_convs=head_convs)
    fcos = FCOS(_Pyramid(backbone, fpn, fpn_channels), num_classes + 1, min_size=input_size[0],
                max_size=input_size[1], image_mean=list(mean), image_std=list(std), anchor_generator=anchors, head=head,
                center_sampling_radius=center_sampling_radius, score_thresh=score_thresh, nms_thresh=nms_thresh,
                detections_per_img=detections_per_img)
    return Detector(backbone, fcos, model_name)
