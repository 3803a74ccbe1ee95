"""Running an export the way `transfer predict` runs a checkpoint, so a user can check an export
with the same command: a timm folder (through timm) or an ONNX file (through onnxruntime).

Both take what a checkpoint's predictor takes — an NCHW batch of 0–255 pixel values, uint8 or float,
already resized and cropped by the eval transform — and normalise it with the same `Normalizer`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from transfer.errors import UserError
from transfer.exports.source import READING_KEY, SOFTMAX_READING
from transfer.models.backbone import resolve_preprocess
from transfer.models.inference import Normalizer

ONNX_FILE = "model.onnx"


class ExportedPredictor(NamedTuple):
    logits: Callable[[torch.Tensor], torch.Tensor]  # pixel batch → CPU float logits
    classes: list[str]
    preprocess: dict
    reading: dict  # how the logits become predictions (exports/source.py: Source.reading)


def is_exported(path: str | Path) -> bool:
    """Whether `checkpoint=` names an export rather than a transfer checkpoint."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.suffix == ".onnx"
    return path.is_dir() and ((path / "config.json").is_file() or (path / ONNX_FILE).is_file())


def load_exported_predictor(path: str | Path, device: torch.device | str = "cpu") -> ExportedPredictor:
    path = Path(path).expanduser()
    device = torch.device(device)
    if path.is_dir() and (path / "config.json").is_file():
        return timm_folder_predictor(path, device)
    if path.is_dir() and (path / ONNX_FILE).is_file():
        path = path / ONNX_FILE
    if path.is_file() and path.suffix == ".onnx":
        return onnx_predictor(path, device)
    raise UserError(f"{path} is neither a timm folder (with config.json) nor an .onnx file. Make one with "
                    "transfer export checkpoint=RUN/best.pt format=timm (or format=onnx).")


def timm_folder_predictor(folder: Path, device: torch.device) -> ExportedPredictor:
    import timm


    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval().to(device)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"{folder} does not load as a timm folder ({str(error).splitlines()[0][:200]}). "
                        "Re-export it with transfer export format=timm.") from None
    preprocess = resolve_preprocess(model)
    normalize = Normalizer(preprocess["mean"], preprocess["std"], device, channels_last=False)
    labels = model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
    reading = json.loads((folder / "config.json").read_text()).get(READING_KEY, SOFTMAX_READING)

    @torch.no_grad()
    def logits(images: torch.Tensor) -> torch.Tensor:
        return model(normalize(images)).float().cpu()

    return ExportedPredictor(logits, list(labels), preprocess, dict(reading))


def onnx_predictor(file: Path, device: torch.device) -> ExportedPredictor:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("running an ONNX file needs onnxruntime: pip install onnxruntime") from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = onnxruntime.InferenceSession(str(file), providers=providers)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad files
        raise UserError(f"{file} does not load in onnxruntime ({str(error).splitlines()[0][:200]}).") from None
    description = onnx_description(session, file)
    preprocess = description["preprocess"]
    normalize = Normalizer(preprocess["mean"], preprocess["std"], torch.device("cpu"), channels_last=False)
    name = session.get_inputs()[0].name

    def logits(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: normalize(images).numpy()})[0]).float()

    return ExportedPredictor(logits, list(description["classes"]), dict(preprocess), description["reading"])


def onnx_description(session, file: Path) -> dict:
    """Labels and preprocessing: embedded in the model's metadata, else the preprocess.json beside it."""
    metadata = session.get_modelmeta().custom_metadata_map
    if "classes" in metadata and "preprocess" in metadata:
        return {"reading": SOFTMAX_READING, **{key: json.loads(value) for key, value in metadata.items()
                                              if key in ("classes", "preprocess", "reading")}}
    sidecar = file.parent / "preprocess.json"
    try:
        description = json.loads(sidecar.read_text())
        return {"reading": description.get("reading", SOFTMAX_READING),
                **{key: description[key] for key in ("classes", "preprocess")}}
    except (OSError, ValueError, KeyError):
        raise UserError(f"{file} carries no labels or preprocessing, and there is no readable {sidecar}. "
                        "Export it with transfer export format=onnx, which writes both.") from None
