"""The README.md of an export: enough to trust, reproduce and load it without this toolkit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transfer.exports.source import Check, Source


def model_card(source: Source, fmt: str, check: Check, out: Path, command: str) -> str:
    """README.md of an export: enough to trust, reproduce and load it without this toolkit."""
    run = RunFacts.read(source)
    sections = [front_matter(source, fmt), f"# {source.name} fine-tuned on {run.data}\n",
                summary(source, fmt), data_section(source, run), metrics_section(run),
                recipe_section(source), commands_section(source, run, command),
                loading_section(source, fmt, out), verification_section(check)]
    return "\n".join(sections)


@dataclass
class RunFacts:
    """What the run directory adds to the checkpoint: the data description, splits, final metrics."""

    data: str
    splits: dict
    metrics: dict
    metrics_source: str
    config_file: Path | None

    @classmethod
    def read(cls, source: Source) -> "RunFacts":
        run_dir = source.path.parent
        info = read_json(run_dir / "run_info.json") or {}
        root = source.checkpoint["config"].get("data", {}).get("root")
        metrics, origin = checkpoint_metrics(source, read_json(run_dir / "metrics.json"))
        config_file = run_dir / "config.yaml"
        return cls(info.get("data") or (str(root) if root else "scikit-learn digits (embedded)"),
                   info.get("splits") or {}, metrics, origin, config_file if config_file.is_file() else None)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def checkpoint_metrics(source: Source, final: dict | None) -> tuple[dict, str]:
    """The run's final held-out metrics when they describe this checkpoint, else its epoch's row."""
    checkpoint = source.checkpoint
    if final and source.path.name == "best.pt" and source.weights == "model":
        return {k: v for k, v in final.items() if "/" in k}, "metrics.json (best checkpoint, held-out splits)"
    rows = [row for row in checkpoint.get("history", []) if row.get("epoch") == checkpoint.get("epoch")]
    values = {k: v for k, v in (rows[-1] if rows else {}).items() if "/" in k}
    return values, f"training history, epoch {checkpoint.get('epoch', '?')}"


def front_matter(source: Source, fmt: str) -> str:
    library = "timm" if fmt in ("timm", "backbone") else {"onnx": "onnx", "torchscript": "pytorch"}[fmt]
    lines = ["---", f"library_name: {library}", "tags:", "- image-classification", "- timm", "- transfer"]
    license_name = source.model.pretrained_cfg.get("license")  # of the pretrained weights it started from
    if license_name and source.checkpoint.get("weights_source") != "random init":
        lines.append(f"license: {license_name}")
    return "\n".join(lines + ["---", ""])


def summary(source: Source, fmt: str) -> str:
    config = source.checkpoint["config"]
    strategy = config.get("finetune", {}).get("strategy", "?")
    weights = "exponential moving average (EMA) weights" if source.weights == "ema" else "weights"
    what = {"timm": "a timm model folder (config.json + model.safetensors)",
            "backbone": "the backbone without its classifier, for detectors and segmenters",
            "onnx": "an ONNX model (dynamic batch, opset 17)", "torchscript": "a TorchScript program"}[fmt]
    return (f"`{source.name}` ({source.checkpoint.get('weights_source', 'unknown start')}), fine-tuned "
            f"(`{strategy}`) with transfer into a {len(source.classes)}-class image "
            f"{KINDS.get(source.task, source.task + ' model')}; this folder holds its {weights} as {what}.\n"
            + multilabel_note(source))


KINDS = {"classification": "classifier", "multilabel": "multi-label classifier"}


def multilabel_note(source: Source) -> str:
    """How a multi-label model's outputs are read: a sigmoid per class and the thresholds tuned with the weights."""
    if source.task != "multilabel":
        return ""
    pairs = ", ".join(f"`{name}` {value:.3f}" for name, value in zip(source.classes, source.reading["thresholds"]))
    return (f"\nIts outputs are one logit per class: apply a sigmoid to each and predict the classes whose "
            f"probability reaches its threshold (tuned on validation, and stored with the export for `transfer "
            f"predict`): {pairs}.\n")


def data_section(source: Source, run: RunFacts) -> str:
    classes = source.classes
    shown = ", ".join(f"`{c}`" for c in classes[:50]) + (f", … ({len(classes)} in all)" if len(classes) > 50 else "")
    splits = ", ".join(f"{name} {count}" for name, count in run.splits.items()) or "not recorded"
    pre = source.preprocess
    return (f"## Data\n\n- Source: {run.data}\n- Images per split: {splits}\n- Classes ({len(classes)}, in output "
            f"order): {shown}\n- Preprocessing: {pre['input_size'][1]}×{pre['input_size'][2]} RGB, "
            f"{pre['interpolation']} resize to input / {pre['crop_pct']:g}, center crop, mean {pre['mean']}, "
            f"std {pre['std']}\n")


def metrics_section(run: RunFacts) -> str:
    if not run.metrics:
        return "## Metrics\n\nNone recorded (the run had no validation split).\n"
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(run.metrics.items())
                     if isinstance(value, (int, float)))
    return f"## Metrics\n\nFrom {run.metrics_source}.\n\n| metric | value |\n|---|---|\n{rows}\n"


def recipe_section(source: Source) -> str:
    config = source.checkpoint["config"]
    optim, schedule, trainer = config.get("optim", {}), config.get("schedule", {}), config.get("trainer", {})
    augment = [step.get("_target_", "?").rsplit(".", 1)[-1] for step in config.get("augment", {}).get("train", [])]
    lines = [f"- Model: `{source.name}`, starting from {source.checkpoint.get('weights_source', '?')}",
             f"- Fine-tuning: `{config.get('finetune', {}).get('strategy', '?')}`, "
             f"{source.checkpoint.get('epoch', '?')} of {trainer.get('epochs', '?')} epochs",
             "- Optimizer: " + ", ".join(f"{k}={v}" for k, v in optim.items() if v is not None),
             "- Schedule: " + ", ".join(f"{k}={v}" for k, v in schedule.items() if v is not None),
             f"- Augmentation: {', '.join(augment) or 'none'}; label smoothing {trainer.get('label_smoothing', '?')}",
             f"- Seed: {config.get('seed', '?')}; weights exported: {source.weights}"]
    full = json.dumps(config, indent=2)
    return ("## Recipe\n\n" + "\n".join(lines) +
            f"\n\n<details><summary>Full resolved config</summary>\n\n```json\n{full}\n```\n</details>\n")


def commands_section(source: Source, run: RunFacts, command: str) -> str:
    train = (f"transfer train --config {run.config_file}" if run.config_file
             else "transfer train --config <run dir>/config.yaml")
    export_line = command or f"transfer export checkpoint={source.path} format=..."
    return f"## How it was made\n\n```bash\n{train}   # rerun the training exactly\n{export_line}\n```\n"


def loading_section(source: Source, fmt: str, out: Path) -> str:
    pre = source.preprocess
    fields = {"folder": out, "name": source.name, "side": pre["input_size"][1],
              "mean": [round(v, 6) for v in pre["mean"]], "std": [round(v, 6) for v in pre["std"]]}
    snippet = SNIPPETS[fmt].format(**fields).strip()
    check = ("\nCheck it with the command that runs checkpoints: "
             f"`transfer predict checkpoint={out if fmt == 'timm' else out / 'model.onnx'} input=IMAGES`.\n"
             if fmt in ("timm", "onnx") else "")
    return f"## How to load\n\n```python\n{snippet}\n```\n{check}"


def verification_section(check: Check) -> str:
    if check.difference is None:
        return f"## Verification\n\nWritten and loaded back with {check.how}.\n"
    return (f"## Verification\n\nBefore this folder was published it was loaded back with `{check.how}` and run on "
            f"a random batch of shape {list(check.batch)}: the largest absolute difference from the fine-tuned "
            f"model's outputs was {check.difference:.2e} (tolerance {check.tolerance:g}).\n")


SNIPPETS = {"timm": """
import timm, torch
from PIL import Image

folder = "{folder}"
model = timm.create_model(f"local-dir:{{folder}}", pretrained=True).eval()
labels = model.pretrained_cfg["label_names"]
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
with torch.no_grad():
    probabilities = model(transform(Image.open("image.jpg").convert("RGB"))[None]).softmax(-1)
print(labels[probabilities.argmax()])

# It is a model-hub folder as is: upload it, then timm.create_model("hf-hub:USER/NAME", pretrained=True)
# from huggingface_hub import upload_folder; upload_folder(repo_id="USER/NAME", folder_path=folder)
""", "backbone": """
from collections import OrderedDict

import timm, torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

folder = "{folder}"


def load_backbone(**kwargs) -> nn.Module:
    # a list of feature maps, one per level (channels, strides: feature_info.json); out_indices picks levels
    # (timm may log "Unexpected keys" for layers after the last level, e.g. EfficientNet's conv_head: expected)
    return timm.create_model("{name}", features_only=True, pretrained=True,
                             pretrained_cfg_overlay=dict(file=f"{{folder}}/backbone.safetensors"), **kwargs)


class BackboneWithFPN(nn.Module):
    # what torchvision's detectors expect: `out_channels` and an OrderedDict of equal-width maps
    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body, self.out_channels = body, out_channels
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelP6P7(out_channels, out_channels))

    def forward(self, x):
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class Segmenter(nn.Module):
    # a DeepLabV3 head on the deepest level, upsampled to the input size
    def __init__(self, body: nn.Module, num_classes: int):
        super().__init__()
        self.body, self.head = body, DeepLabHead(body.feature_info.channels()[-1], num_classes)

    def forward(self, x):
        logits = self.head(self.body(x)[-1])
        return nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


levels = load_backbone().feature_info.out_indices[-3:]  # the three deepest levels (strides 8-32 in most CNNs)
# torchvision's detection transform scales pixels to [0, 1] and normalises with these: as in fine-tuning
detector = RetinaNet(BackboneWithFPN(load_backbone(out_indices=levels)), num_classes=2,
                     min_size={side}, max_size={side}, image_mean={mean}, image_std={std})
segmenter = Segmenter(load_backbone(out_indices=levels[-1:]), num_classes=2)
""", "onnx": """
import json

import numpy as np
import onnxruntime

folder = "{folder}"
session = onnxruntime.InferenceSession(f"{{folder}}/model.onnx")
info = json.load(open(f"{{folder}}/preprocess.json"))  # also in the model's metadata_props
mean = np.array(info["preprocess"]["mean"], np.float32).reshape(1, 3, 1, 1)
std = np.array(info["preprocess"]["std"], np.float32).reshape(1, 3, 1, 1)
images = np.random.rand(4, 3, {side}, {side}).astype(np.float32)  # RGB in [0, 1], resized and center-cropped
logits = session.run(["logits"], {{"input": (images - mean) / std}})[0]
print([info["classes"][i] for i in logits.argmax(1)])
""", "torchscript": """
import json

import torch

folder = "{folder}"
extra = {{"preprocess.json": ""}}  # the labels and preprocessing travel inside the file
model = torch.jit.load(f"{{folder}}/model.torchscript.pt", _extra_files=extra).eval()
info = json.loads(extra["preprocess.json"])
mean = torch.tensor(info["preprocess"]["mean"]).view(1, 3, 1, 1)
std = torch.tensor(info["preprocess"]["std"]).view(1, 3, 1, 1)
images = torch.rand(4, 3, {side}, {side})  # RGB in [0, 1], resized and center-cropped
with torch.no_grad():
    logits = model((images - mean) / std)
print([info["classes"][i] for i in logits.argmax(1)])
"""}
