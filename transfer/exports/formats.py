"""The writers, one per format: each writes its files, loads them back the consumer's way and compares outputs
with the fine-tuned model before the folder is published."""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from torch import nn

from transfer.errors import UserError
from transfer.exports.card import model_card
from transfer.exports.publish import staged_folder
from transfer.exports.source import CLASSIFIER_TASKS, READING_KEY, TOLERANCE, Check, Source

ONNX_OPSET = 17
PREPROCESS_FILE = "preprocess.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
BACKBONE_FILE = "backbone.safetensors"


def export(source: Source, fmt: str, out: Path, overwrite: bool = False, command: str = "") -> Check:
    """Write one format to `out` (atomically) and return how its round trip compared."""
    with staged_folder(out, overwrite) as staging, torch.no_grad():
        check = WRITERS[fmt](source, staging)
        if check.difference is not None and not check.difference <= check.tolerance:
            raise RuntimeError(f"the {fmt} export of {source.name} differs from the fine-tuned model by "
                               f"{check.difference:.3g} (> {check.tolerance:g}); nothing was written to {out}.")
        (staging / "README.md").write_text(model_card(source, fmt, check, out, command))
    return check


def write_timm_folder(source: Source, folder: Path) -> Check:
    """timm's own hub layout, so `local-dir:`, `hf-hub:` and timm's tooling all read it."""
    model_config = {"label_names": source.classes, READING_KEY: source.reading} if source.task in CLASSIFIER_TASKS \
        else {}  # a dense model's backbone has no labels
    timm.models.save_for_hf(source.model, str(folder), model_config=model_config,
                            safe_serialization=True, data_config=timm_data_config(source.preprocess))
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    batch = sample_batch(source.preprocess, 2)
    return Check(max_difference(source.model(batch), loaded(batch)), TOLERANCE["timm"], tuple(batch.shape),
                 "timm.create_model('local-dir:DIR', pretrained=True)")


def timm_data_config(preprocess: dict) -> dict:
    """Our preprocess record in timm's data-config terms (its 'center' crop is our eval crop)."""
    return {"input_size": tuple(preprocess["input_size"]), "mean": tuple(preprocess["mean"]),
            "std": tuple(preprocess["std"]), "interpolation": preprocess["interpolation"],
            "crop_pct": preprocess["crop_pct"], "crop_mode": "center"}


def write_backbone(source: Source, folder: Path) -> Check:
    """The weights without the classifier, loaded back through timm's features_only path."""
    from safetensors.torch import save_file

    body = copy.deepcopy(source.model)
    body.reset_classifier(0)
    untrained = set(source.untrained)  # layers past a dense model's last feature level
    save_file({k: v.contiguous() for k, v in body.state_dict().items() if k not in untrained},
              str(folder / BACKBONE_FILE), metadata={"format": "pt"})
    features = load_features(source.name, folder / BACKBONE_FILE)
    info = feature_info(features, source)
    (folder / "feature_info.json").write_text(json.dumps(info, indent=2) + "\n")
    batch = sample_batch(source.preprocess, 2)
    how = "timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=...))"
    reference = reference_features(source.model, batch, info["out_indices"])
    if reference is None:
        return Check(None, TOLERANCE["backbone"], tuple(batch.shape), how + "; the model has no "
                     "forward_intermediates to compare with")
    return Check(max_difference(reference, features(batch)), TOLERANCE["backbone"], tuple(batch.shape), how)


def load_features(name: str, file: Path) -> nn.Module:
    """timm logs 'Unexpected keys' for layers past the last level (EfficientNet's conv_head): expected."""
    try:
        with warnings.catch_warnings(), quiet_logger("timm"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, features_only=True, pretrained=True,
                                      pretrained_cfg_overlay={"file": str(file)})
    except (RuntimeError, ValueError, AssertionError, AttributeError) as error:
        raise UserError(f"timm cannot build {name} as a feature extractor ({str(error).splitlines()[0][:200]}). "
                        "Export format=timm and use forward_intermediates() instead.") from None
    return model.eval()


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def feature_info(features: nn.Module, source: Source) -> dict:
    """What a neck (FPN, decoder) needs: channels and stride of every level, and how to load them."""
    info = features.feature_info
    return {"architecture": source.name, "file": BACKBONE_FILE,
            "out_indices": [int(i) for i in info.out_indices], "channels": [int(c) for c in info.channels()],
            "reduction": [int(r) for r in info.reduction()], "modules": list(info.module_name()),
            "preprocess": source.preprocess}


def reference_features(model: nn.Module, batch: torch.Tensor, indices: list[int]) -> list[torch.Tensor] | None:
    """The fine-tuned model's own intermediate outputs at the exported levels."""
    if not hasattr(model, "forward_intermediates"):
        return None
    return model.forward_intermediates(batch, indices=indices, intermediates_only=True)


def write_onnx(source: Source, folder: Path) -> Check:
    """Traced at batch 2, checked at batch 3: the batch dimension must really be dynamic."""
    path = folder / "model.onnx"
    model = fixed_size_copy(source.model, source.preprocess["input_size"])
    try:
        with warnings.catch_warnings(), native_stdout_silenced():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (sample_batch(source.preprocess, 2),), str(path), dynamo=False,
                              opset_version=ONNX_OPSET, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as error:  # noqa: BLE001 - any exporter failure means: this architecture, not this user
        raise UserError(f"{source.name} could not be exported to ONNX ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200]}). Use format=torchscript or format=timm.") from None
    description = describe_io(source)
    embed_onnx_metadata(path, description)
    write_description(folder, description)
    session = onnx_session(path)
    batch = sample_batch(source.preprocess, 3)
    output = torch.from_numpy(session.run(["logits"], {"input": batch.numpy()})[0])
    return Check(max_difference(source.model(batch), output), TOLERANCE["onnx"], tuple(batch.shape),
                 "onnxruntime.InferenceSession('model.onnx')")


def fixed_size_copy(model: nn.Module, input_size: list[int]) -> nn.Module:
    """ViTs with dynamic_img_size resample their position embedding on every call, with an op the ONNX
    exporter lacks; resampling it once, for the one size an ONNX file takes, gives the same numbers."""
    if not getattr(model, "dynamic_img_size", False) or not hasattr(model, "set_input_size"):
        return model
    fixed = copy.deepcopy(model)
    fixed.set_input_size(img_size=tuple(input_size[1:]))
    return fixed


@contextmanager
def native_stdout_silenced() -> Iterator[None]:
    """When it fails, torch's ONNX exporter prints the whole graph from C++; the error says enough."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def embed_onnx_metadata(path: Path, description: dict) -> None:
    """The labels and preprocessing inside the .onnx too, so a copied file still describes itself."""
    try:
        import onnx
    except ImportError:
        return
    model = onnx.load(str(path))
    for key in ("classes", "preprocess", "reading"):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(description[key])
    onnx.save(model, str(path))


def onnx_session(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking an ONNX export needs onnxruntime: pip install onnxruntime") from None
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def write_torchscript(source: Source, folder: Path) -> Check:
    """Scripted where timm allows (any input size), traced otherwise (fixed to the training size)."""
    description = describe_io(source)
    batch = sample_batch(source.preprocess, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program, how = torch.jit.script(source.model), "torch.jit.script"
        except Exception:  # noqa: BLE001 - Python-only code paths; tracing still captures them
            program, how = torch.jit.trace(source.model, batch), "torch.jit.trace"
        torch.jit.save(program, str(folder / TORCHSCRIPT_FILE),
                       _extra_files={PREPROCESS_FILE: json.dumps(description)})
        loaded = torch.jit.load(str(folder / TORCHSCRIPT_FILE))
    write_description(folder, {**description, "torchscript": how})
    return Check(max_difference(source.model(batch), loaded(batch)), TOLERANCE["torchscript"],
                 tuple(batch.shape), f"torch.jit.load('{TORCHSCRIPT_FILE}') of a {how} program")


def describe_io(source: Source) -> dict:
    """The contract of an ONNX / TorchScript file: what goes in, what comes out, which labels."""
    return {"architecture": source.name, "classes": source.classes, "preprocess": source.preprocess,
            "input": {"name": "input", "shape": ["batch", *source.preprocess["input_size"]], "dtype": "float32",
                      "values": "RGB in [0, 1], then (x - mean) / std; resized so the short side is "
                                "input_size / crop_pct, then center-cropped to input_size"},
            "output": {"name": "logits", "shape": ["batch", len(source.classes)]}, "reading": source.reading}


def write_description(folder: Path, description: dict) -> None:
    (folder / PREPROCESS_FILE).write_text(json.dumps(description, indent=2) + "\n")


WRITERS: dict[str, Callable[[Source, Path], Check]] = {
    "timm": write_timm_folder, "backbone": write_backbone, "onnx": write_onnx, "torchscript": write_torchscript}


def sample_batch(preprocess: dict, size: int) -> torch.Tensor:
    """A fixed normalised-looking batch: the same numbers on every run, so a failure reproduces."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(size, *preprocess["input_size"], generator=generator)


@torch.no_grad()
def max_difference(expected: torch.Tensor | list, actual: torch.Tensor | list) -> float:
    if isinstance(expected, (list, tuple)):
        if len(expected) != len(actual):
            return float("inf")
        return max(max_difference(e, a) for e, a in zip(expected, actual))
    if expected.shape != actual.shape:
        return float("inf")
    return float((expected.float() - actual.float()).abs().max())
