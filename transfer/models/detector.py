"""The detection models: torchvision's FCOS, RetinaNet and Faster R-CNN (their heads, anchor generators, RPN,
losses and post-processing) around a timm features_only backbone and torchvision's feature pyramid, slimmed
to CPU size. One builder per detector, named in DETECTORS; the backbone's weights come from transfer's own
sources (never torchvision's pretrained detectors)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from transfer.models.features import DenseModel, feature_channels, feature_strides

ASPECT_RATIOS = (0.5, 1.0, 2.0)  # anchor shapes of RetinaNet and Faster R-CNN (both papers')
OCTAVE_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))  # RetinaNet's three anchor sizes per level
ANCHOR_SIZE = 4  # anchor side / level stride: RetinaNet's 32 px on stride 8 (Faster R-CNN FPN's 32 px on stride 4 is 8)
CENTER_SAMPLING_RADIUS = 1.5  # torchvision's FCOS default
REPRESENTATION_SIZE = 256  # Faster R-CNN's box-head width (torchvision: 1024, which costs more than the backbone here)
BOX_BATCH_SIZE_PER_IMAGE = 128  # RoIs sampled per image for the box head (torchvision: 512; the scenes hold a few)


class _Pyramid(nn.Module):
    """timm feature maps → FPN levels (+ extra levels), as torchvision's detectors expect of their `backbone`.

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
    """`backbone` (the timm features_only model) + `head` (the torchvision detector: its pyramid, heads and
    input transform), so the fine-tune strategies, layer decay and export treat every detector alike.

    forward(images, targets) → the detector's loss dict in train mode, [{"boxes", "scores", "labels"}] in eval
    mode; images are float in [0, 1] (the detector's transform normalises them)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, model_name: str) -> None:
        super().__init__()
        self.backbone, self.head, self.model_name = backbone, head, model_name

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        return self.head(list(images), targets)


@dataclass
class Shared:
    """What every detector is built with: classes (K + 1: label 0 is background for Faster R-CNN and unused by
    FCOS and RetinaNet), the transform's sizes and normalisation, widths and post-processing."""

    num_classes: int
    transform: dict
    width: int
    convs: int
    score_thresh: float
    nms_thresh: float
    detections_per_img: int


def _pyramid(backbone: nn.Module, width: int, extra: nn.Module) -> _Pyramid:
    return _Pyramid(backbone, FeaturePyramidNetwork(feature_channels(backbone), width, extra_blocks=extra), width)


def _p3_to_p7(backbone: nn.Module) -> list[int]:
    """Strides of the backbone's levels and of P6, P7 (LastLevelP6P7 halves twice more)."""
    strides = feature_strides(backbone)
    return strides + [strides[-1] * 2, strides[-1] * 4]


def _fcos(backbone: nn.Module, shared: Shared, center_sampling_radius: float = CENTER_SAMPLING_RADIUS) -> FCOS:
    """FCOS (anchor-free): one location per cell; it assigns an object to the level whose 'anchor' size s (the
    stride) has 4s <= reach < 8s."""
    strides = _p3_to_p7(backbone)
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    head = FCOSHead(shared.width, 1, shared.num_classes, num_convs=shared.convs)
    return FCOS(_pyramid(backbone, shared.width, LastLevelP6P7(shared.width, shared.width)), shared.num_classes,
                **shared.transform, anchor_generator=anchors, head=head,
                center_sampling_radius=center_sampling_radius, score_thresh=shared.score_thresh,
                nms_thresh=shared.nms_thresh, detections_per_img=shared.detections_per_img)


def anchor_sizes(strides: list[int], anchor_size: float, scales: tuple[float, ...]) -> tuple[tuple[int, ...], ...]:
    """Per level: anchor sides anchor_size × stride × each scale, so anchors follow the backbone's strides (the
    scenes' 28-56 px objects meet 32-50 px anchors on stride 8 and 64 px on 16 at anchor_size=4), never
    torchvision's sizes for 800 px COCO images."""
    return tuple(tuple(round(anchor_size * s * scale) for scale in scales) for s in strides)


def _retinanet(backbone: nn.Module, shared: Shared, anchor_size: float = ANCHOR_SIZE) -> RetinaNet:
    """RetinaNet on P3-P7: 3 sizes × 3 shapes per location; its towers cut to `convs` layers (torchvision: 4)."""
    strides = _p3_to_p7(backbone)
    anchors = AnchorGenerator(anchor_sizes(strides, anchor_size, OCTAVE_SCALES), (ASPECT_RATIOS,) * len(strides))
    head = RetinaNetHead(shared.width, anchors.num_anchors_per_location()[0], shared.num_classes)
    for tower in (head.classification_head, head.regression_head):
        tower.conv = tower.conv[:shared.convs]
    return RetinaNet(_pyramid(backbone, shared.width, LastLevelP6P7(shared.width, shared.width)),
                     shared.num_classes, **shared.transform, anchor_generator=anchors, head=head,
                     score_thresh=shared.score_thresh, nms_thresh=shared.nms_thresh,
                     detections_per_img=shared.detections_per_img)


def _faster_rcnn(backbone: nn.Module, shared: Shared, anchor_size: float = ANCHOR_SIZE,
                 representation_size: int = REPRESENTATION_SIZE) -> FasterRCNN:
    """Faster R-CNN with FPN (torchvision's layout): an RPN (`convs` conv layers) on the levels + a max-pooled
    one, RoIAlign 7×7 from the backbone's levels, a two-layer MLP box head `representation_size` wide."""
    strides = feature_strides(backbone)
    levels = [str(i) for i in range(len(strides))]
    anchors = AnchorGenerator(anchor_sizes(strides + [strides[-1] * 2], anchor_size, (1.0,)),
                              (ASPECT_RATIOS,) * (len(strides) + 1))
    rpn = RPNHead(shared.width, anchors.num_anchors_per_location()[0], conv_depth=shared.convs)
    pool = MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(shared.width * 7 * 7, representation_size)
    return FasterRCNN(_pyramid(backbone, shared.width, LastLevelMaxPool()), None, **shared.transform,
                      rpn_anchor_generator=anchors, rpn_head=rpn, box_roi_pool=pool, box_head=box_head,
                      box_predictor=FastRCNNPredictor(representation_size, shared.num_classes),
                      box_score_thresh=shared.score_thresh, box_nms_thresh=shared.nms_thresh,
                      box_detections_per_img=shared.detections_per_img,
                      box_batch_size_per_image=BOX_BATCH_SIZE_PER_IMAGE)


DETECTORS: dict[str, Callable[..., nn.Module]] = {"fcos": _fcos, "retinanet": _retinanet, "faster_rcnn": _faster_rcnn}
# detector-specific keys (task.KEY, also the builders' keyword arguments) → the detectors that read them
DETECTOR_OPTIONS = {"center_sampling_radius": ("fcos",), "anchor_size": ("retinanet", "faster_rcnn"),
                    "representation_size": ("faster_rcnn",)}


def build_detector(backbone: nn.Module, model_name: str, num_classes: int, input_size: tuple[int, int],
                   mean: list[float], std: list[float], detector: str = "fcos", fpn_channels: int = 64,
                   head_convs: int = 2, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                   detections_per_img: int = 100, **options) -> Detector:
    """`detector` over the backbone's levels; `num_classes` objects (labels 1..K). `input_size` = (short, long)
    side the pipeline already resized to, so the detector's own resize leaves it be. `options`: the keys of
    DETECTOR_OPTIONS (None: the detector's default)."""
    transform = {"min_size": input_size[0], "max_size": input_size[1], "image_mean": list(mean),
                 "image_std": list(std)}
    shared = Shared(num_classes + 1, transform, fpn_channels, head_convs, score_thresh, nms_thresh,
                    detections_per_img)
    chosen = {key: value for key, value in options.items() if value is not None}
    return Detector(backbone, DETECTORS[detector](backbone, shared, **chosen), model_name)
