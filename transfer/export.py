"""`transfer export`: hand a fine-tuned checkpoint to another project, in the form that project loads.

Formats (one folder each, with a model card README.md):

- timm: `config.json` + `model.safetensors` (timm's `save_for_hf`: label names and the preprocessing
  actually used); loads with `timm.create_model('local-dir:DIR', pretrained=True)`, uploads as is.
- backbone: `backbone.safetensors` (no head) + `feature_info.json`, for detectors and segmenters that
  call `timm.create_model(name, features_only=True, pretrained_cfg_overlay=dict(file=...))`.
- onnx: `model.onnx` (dynamic batch, opset 17) + `preprocess.json`; preprocessing also in its metadata.
- torchscript: `model.torchscript.pt` (+ `preprocess.json`, also embedded as an extra file).

Every writer loads its files back the consumer's way and compares outputs with the fine-tuned model
before the folder is published, so an export that exists has been checked. Folders are written
under a hidden temporary name beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from transfer.checkpoint import load_checkpoint
from transfer.errors import UserError
from transfer.models.backbone import model_from_checkpoint

FORMATS = ("timm", "backbone", "onnx", "torchscript")
KEYS = ("checkpoint", "format", "out", "weights", "overwrite")
WEIGHT_CHOICES = ("auto", "model", "ema")
TOLERANCE = {"timm": 1e-5, "backbone": 1e-5, "onnx": 1e-4, "torchscript": 1e-4}
ONNX_OPSET = 17
PREPROCESS_FILE = "preprocess.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
BACKBONE_FILE = "backbone.safetensors"
USAGE = ("transfer export checkpoint=RUN/best.pt format=timm|backbone|onnx|torchscript|all [out=DIR] "
         "[weights=auto|model|ema] [overwrite=false]")


@dataclass
class Source:
    """The fine-tuned model of one checkpoint, plus what its model card tells about it."""

    path: Path
    checkpoint: dict
    model: nn.Module
    weights: str  # "model" or "ema": which of the checkpoint's weights the model holds
    task: str = "classification"  # segmentation / detection: `model` is the headless classifier around the backbone
    untrained: tuple[str, ...] = ()  # its tensors the dense model's backbone did not cover (left out of exports)

    @property
    def name(self) -> str:
        return self.checkpoint["config"]["model"]["name"]

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint["classes"])

    @property
    def preprocess(self) -> dict:
        return dict(self.checkpoint["preprocess"])


@dataclass
class Check:
    """How a written export compared with the fine-tuned model when loaded back."""

    difference: float | None  # max abs difference; None when there was nothing to compare with
    tolerance: float
    batch: tuple[int, ...]
    how: str  # the consumer call that loaded it back


# ---------------------------------------------------------------------------------------------
# command


def export_command(arguments: list[str]) -> int:
    """`transfer export ...`: validate everything cheap first, so mistakes cost no model building."""
    options = parse_options(arguments)
    formats = chosen_formats(options.get("format"))
    path = checkpoint_path(options.get("checkpoint"))
    weights = options.get("weights") or "auto"
    if weights not in WEIGHT_CHOICES:
        raise UserError(f"weights={weights} is not valid. Choose one of: {', '.join(WEIGHT_CHOICES)}.")
    overwrite = flag(options.get("overwrite"), "overwrite")
    outs = output_folders(path, formats, options.get("out"))
    for out in outs.values():
        prepare_output(out, overwrite)
    source = load_source(path, weights)
    check_dense_formats(source, formats)
    command = shlex.join(["transfer", "export", *arguments])
    for fmt, out in outs.items():
        check = export(source, fmt, out, overwrite=overwrite, command=command)
        print(f"{fmt:<11} {out}  ({describe(check)})", flush=True)
    return 0


def parse_options(arguments: list[str]) -> dict[str, str]:
    from transfer.commands import reject_unknown, split_options

    options, rest = split_options(arguments, KEYS)
    reject_unknown(rest, "export", list(KEYS))
    return options


def chosen_formats(value: str | None) -> tuple[str, ...]:
    if not value:
        raise UserError(f"say which format: format={'|'.join(FORMATS)}|all. Usage: {USAGE}")
    if value == "all":
        return FORMATS
    names = tuple(dict.fromkeys(part.strip() for part in value.split(",")))
    unknown = [name for name in names if name not in FORMATS]
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], FORMATS, n=1)
        did_you_mean = f" Did you mean format={hint[0]}?" if hint else ""
        raise UserError(f"unknown format '{unknown[0]}'.{did_you_mean} Choose from: {', '.join(FORMATS)}, all "
                        "(or a comma-separated list).")
    return names


def checkpoint_path(value: str | None) -> Path:
    """The checkpoint file; a run directory stands for its best.pt."""
    if not value:
        raise UserError(f"transfer export needs checkpoint=PATH, e.g. checkpoint=runs/<run>/best.pt. Usage: {USAGE}")
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise UserError(f"checkpoint={value}: no such checkpoint. Runs keep theirs as <run dir>/best.pt and last.pt.")
    return path


def flag(value: str | None, key: str) -> bool:
    if value is None or value.lower() in ("", "false", "no", "0"):
        return False
    if value.lower() in ("true", "yes", "1"):
        return True
    raise UserError(f"{key}={value}: use {key}=true or {key}=false.")


def output_folders(checkpoint: Path, formats: tuple[str, ...], out: str | None) -> dict[str, Path]:
    """One folder per format. Default: <run dir>/export/<format>; with several formats, out= is their parent."""
    base = Path(out).expanduser() if out else checkpoint.parent / "export"
    if out and len(formats) == 1:
        return {formats[0]: base.absolute()}
    return {fmt: (base / fmt).absolute() for fmt in formats}


def describe(check: Check) -> str:
    if check.difference is None:
        return f"written; {check.how}"
    return f"max abs difference {check.difference:.2e} <= {check.tolerance:g} on a batch of {check.batch[0]}"


# ---------------------------------------------------------------------------------------------
# the checkpoint


def load_source(path: Path, weights: str = "auto") -> Source:
    checkpoint = load_checkpoint(path)
    missing = [key for key in ("config", "preprocess") if key not in checkpoint]
    if missing:
        raise UserError(f"{path} has no {' or '.join(missing)} inside: export needs a checkpoint written by "
                        "`transfer train`.")
    state, chosen = choose_weights(checkpoint, weights, path)
    if checkpoint.get("task", "classification") != "classification":
        from transfer.dense.train import backbone_as_classifier

        model, untrained = backbone_as_classifier(checkpoint, state)
        return Source(path, checkpoint, model, chosen, checkpoint["task"], tuple(untrained))
    model = model_from_checkpoint({**checkpoint, "model": state})
    return Source(path, checkpoint, model, chosen)


def check_dense_formats(source: Source, formats: tuple[str, ...]) -> None:
    """A segmentation or detection checkpoint exports its fine-tuned backbone: format=backbone, or timm (headless)
    when the backbone covers the whole classifier body."""
    if source.task == "classification":
        return
    other = [fmt for fmt in formats if fmt not in ("backbone", "timm")]
    if other:
        raise UserError(f"{source.path} is a {source.task} checkpoint: export its backbone with format=backbone "
                        f"(format={other[0]} exports classifiers).")
    if "timm" in formats and source.untrained:
        raise UserError(f"{source.path} is a {source.task} checkpoint whose backbone stops before "
                        f"{len(source.untrained)} tensors of {source.name}'s classifier body (e.g. "
                        f"{source.untrained[0]}), which were never trained: export format=backbone.")


def choose_weights(checkpoint: dict, choice: str, path: Path | str = "the checkpoint") -> tuple[dict, str]:
    """The EMA weights when the run found them best (or they are asked for), else the raw model's."""
    has_ema = checkpoint.get("model_ema") is not None
    if choice == "ema" and not has_ema:
        raise UserError(f"{path} holds no EMA weights (the run trained without EMA). Use weights=model or auto.")
    use_ema = choice == "ema" or (choice == "auto" and has_ema and bool(checkpoint.get("best_is_ema")))
    return (unwrapped(checkpoint["model_ema"]), "ema") if use_ema else (checkpoint["model"], "model")


def unwrapped(state: dict) -> dict:
    """timm's ModelEmaV3.state_dict() prefixes every key with 'module.'; the model's keys have none."""
    if state and all(key.startswith("module.") for key in state):
        return {key.removeprefix("module."): value for key, value in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# publishing a folder atomically


def prepare_output(out: Path, overwrite: bool) -> None:
    """Fail before any work when the folder cannot be written or would silently replace another."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists. Choose another out=DIR, or replace it with overwrite=true.")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder. Choose another out=DIR.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {out.parent}: {error.strerror or error}. Choose a writable out=DIR.") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {out.parent} (permission denied). Choose a writable out=DIR.")


@contextmanager
def staged_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden temporary folder beside `out`, renamed to `out` only if the block completes."""
    prepare_output(out, overwrite)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as error:
        raise UserError(f"cannot write into {out.parent}: {error.strerror or error}. "
                        "Choose a writable out=DIR.") from None
    try:
        yield staging
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """Rename into place once every byte is on disk; an export being replaced is moved aside first,
    put back if the rename fails, and removed only afterwards."""
    share_like_any_folder(staging)
    for path in [*staging.rglob("*"), staging]:
        fsync(path)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    fsync(out.parent)


def fsync(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some systems; their renames are durable there anyway
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def share_like_any_folder(folder: Path) -> None:
    """mkdtemp (0700) and safetensors (0600) make private files; an export is meant to be handed on."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# ---------------------------------------------------------------------------------------------
# formats


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
    labels = source.classes if source.task == "classification" else []  # a dense model's backbone has no labels
    timm.models.save_for_hf(source.model, str(folder), model_config={"label_names": labels},
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
    for key in ("classes", "preprocess"):
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
            "output": {"name": "logits", "shape": ["batch", len(source.classes)]}}


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


# ---------------------------------------------------------------------------------------------
# model card


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
            f"{'classifier' if source.task == 'classification' else source.task + ' model'}; this folder holds its "
            f"{weights} as {what}.\n")


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
