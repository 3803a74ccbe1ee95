"""Detection: pycocotools scores hand-made cases as expected, bad COCO files are clipped, skipped or refused
with the fix, and `transfer train task=detection` / `transfer predict` run end to end on a tiny folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_backbone_exported, assert_eval_repeats

from transfer.data.coco import BoxDataset, clip_box, collate_boxes, read_coco, read_splits
from transfer.data.augment import build_dense_transform
from transfer.metrics.detection import coco_metrics
from transfer.errors import UserError

COLOURS = ((255, 60, 60), (60, 255, 60))  # class 1 red, class 2 green


def _truth(boxes, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


def _pred(boxes, labels, scores) -> dict:
    return {**_truth(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


# ----------------------------------------------------------------------------------------------
# metrics


def test_perfect_prediction_scores_one() -> None:
    truths = [_truth([[0, 0, 10, 10], [20, 20, 40, 30]], [1, 2]), _truth([[5, 5, 25, 45]], [1])]
    preds = [_pred([[0, 0, 10, 10], [20, 20, 40, 30]], [1, 2], [0.9, 0.8]), _pred([[5, 5, 25, 45]], [1], [0.7])]
    metrics = coco_metrics(truths, preds, num_classes=2)
    assert metrics["map"] == pytest.approx(1.0) and metrics["map50"] == pytest.approx(1.0)


def test_partial_overlap_gives_the_known_ap() -> None:
    """One box at IoU 0.62 with its ground truth: a hit at the thresholds .50, .55, .60 and a miss at the seven
    from .65 to .95, so AP@.5 = 1, AP@.75 = 0 and AP@[.5:.95] = 3/10."""
    truths = [_truth([[0, 0, 10, 10]], [1])]
    preds = [_pred([[0, 0, 10, 6.2]], [1], [0.9])]
    metrics = coco_metrics(truths, preds, num_classes=1)
    assert metrics["map50"] == pytest.approx(1.0)
    assert metrics["map75"] == pytest.approx(0.0)
    assert metrics["map"] == pytest.approx(0.3)


def test_missed_object_and_wrong_class() -> None:
    """Half the objects found with precision 1: COCO's 101-point interpolated AP is 51/101; a box with the
    wrong class finds nothing."""
    truths = [_truth([[0, 0, 10, 10], [30, 30, 50, 50]], [1, 1])]
    found_one = coco_metrics(truths, [_pred([[0, 0, 10, 10]], [1], [0.9])], num_classes=2)
    assert found_one["map50"] == pytest.approx(51 / 101)
    wrong = coco_metrics(truths, [_pred([[0, 0, 10, 10], [30, 30, 50, 50]], [2, 2], [0.9, 0.8])], num_classes=2)
    assert wrong["map50"] == 0.0
    assert coco_metrics(truths, [_pred([], [], [])], num_classes=2)["map"] == 0.0  # no detections at all


# ----------------------------------------------------------------------------------------------
# a tiny COCO folder


def write_scene(path: Path, objects: list[tuple[int, list[int]]], side: int = 64, seed: int = 0) -> None:
    """A dark noisy image with one filled rectangle per object (class colour) at COCO box [x, y, w, h]."""
    pixels = np.random.default_rng(seed).integers(0, 40, (side, side, 3), dtype=np.uint8)
    for label, (x, y, w, h) in objects:
        pixels[y:y + h, x:x + w] = COLOURS[label - 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_coco_split(folder: Path, count: int, seed: int = 0, side: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]}
    for n in range(count):
        objects = []
        for _ in range(int(rng.integers(1, 3))):
            w, h = (int(v) for v in rng.integers(10, 24, size=2))
            x, y = int(rng.integers(0, side - w)), int(rng.integers(0, side - h))
            objects.append((int(rng.integers(1, 3)), [x, y, w, h]))
        write_scene(folder / "images" / f"{n:03d}.png", objects, side, seed * 1000 + n)
        coco["images"].append({"id": n + 1, "file_name": f"{n:03d}.png", "width": side, "height": side})
        for label, box in objects:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": n + 1, "category_id": label,
                                        "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    (folder / "annotations.json").write_text(json.dumps(coco))
    return coco


def write_coco_folder(root: Path, train: int = 16, test: int = 6) -> Path:
    """A detection data folder: train/ and test/ COCO splits."""
    write_coco_split(root / "train", train, seed=0)
    write_coco_split(root / "test", test, seed=1)
    return root


def write_easy_split(folder: Path, count: int, seed: int, side: int = 64) -> None:
    """One big box per image (24-40 px of 64), red and green in turn: a set any detector must learn."""
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]}
    for n in range(count):
        label, (w, h) = n % 2 + 1, (int(v) for v in rng.integers(24, 40, size=2))
        box = [int(rng.integers(0, side - w)), int(rng.integers(0, side - h)), w, h]
        write_scene(folder / "images" / f"{n:03d}.png", [(label, box)], side, seed * 1000 + n)
        coco["images"].append({"id": n + 1, "file_name": f"{n:03d}.png", "width": side, "height": side})
        coco["annotations"].append({"id": n + 1, "image_id": n + 1, "category_id": label, "bbox": box,
                                    "area": w * h, "iscrowd": 0})
    (folder / "annotations.json").write_text(json.dumps(coco))


@pytest.fixture
def coco_folder(tmp_path: Path) -> Path:
    return write_coco_folder(tmp_path / "scenes")


# ----------------------------------------------------------------------------------------------
# bad annotations


def _edit(folder: Path, change) -> Path:
    path = folder / "annotations.json"
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))
    return path


def test_bad_boxes_and_missing_files_are_clipped_or_skipped_and_listed(coco_folder: Path) -> None:
    def damage(coco: dict) -> None:
        anns = coco["annotations"]
        anns[0]["bbox"] = [50, 50, 30, 30]          # sticks out of the 64x64 image: clipped to 14x14
        anns[1]["bbox"] = [10, 10, 0, 5]            # zero area: skipped
        anns[2]["bbox"] = [100, 100, 10, 10]        # entirely outside: skipped
        coco["images"].append({"id": 99, "file_name": "gone.png", "width": 64, "height": 64})
        anns.append({"id": 999, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0})

    path = _edit(coco_folder / "train", damage)
    before = json.loads(path.read_text())
    categories, records, skipped = read_coco(path)
    assert categories.names == ["red", "green"] and len(records) == 16
    reasons = [reason for _, reason in skipped]
    assert any("clipped" in r for r in reasons) and any("zero-area" in r for r in reasons)
    assert any("outside the image" in r and "skipped" in r for r in reasons)
    assert any(p.endswith("gone.png") and r.startswith("listed in") for p, r in skipped)
    boxes = np.concatenate([r.boxes for r in records])
    assert len(boxes) == len(before["annotations"]) - 1 - 2  # the missing image's box and the two skipped
    assert (boxes[:, 0] + boxes[:, 2] <= 64).all() and (boxes[:, 1] + boxes[:, 3] <= 64).all()
    assert clip_box([50, 50, 30, 30], 64, 64)[0] == [50.0, 50.0, 14.0, 14.0]


@pytest.mark.parametrize("change, words", [
    (lambda c: c["categories"][1].pop("name"), ["category id 2 has no name", "annotations.json"]),
    (lambda c: c["categories"][1].update(name=""), ["category id 2 has no name"]),
    (lambda c: c["annotations"][0].update(category_id=7), ["category_id 7", "not in 'categories'"]),
    (lambda c: c["images"][0].update(file_name="../../outside.png"), ["outside its folder", "allow_outside_root"]),
])
def test_unfixable_annotations_raise_a_user_error(coco_folder: Path, change, words: list[str]) -> None:
    path = _edit(coco_folder / "train", change)
    with pytest.raises(UserError) as error:
        read_coco(path)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_splits_from_folders_and_from_one_pooled_file(coco_folder: Path, tmp_path: Path) -> None:
    _, splits, _ = read_splits(coco_folder, val_fraction=0.25, test_fraction=0.2, split_seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "val": 4, "test": 6}
    pooled = tmp_path / "pooled"
    write_coco_split(pooled, 20)
    _, splits, _ = read_splits(pooled, val_fraction=0.1, test_fraction=0.2, split_seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 14, "val": 2, "test": 4}
    again = read_splits(pooled, val_fraction=0.1, test_fraction=0.2, split_seed=0)[1]
    assert [r.source for r in again["test"]] == [r.source for r in splits["test"]]
    for root in (None, tmp_path / "empty"):
        with pytest.raises(UserError, match="annotations.json"):
            read_splits(root, 0.1, 0.2, 0)


def test_dataset_yields_xyxy_boxes_and_collates(coco_folder: Path) -> None:
    _, records, _ = read_coco(coco_folder / "train" / "annotations.json")
    preprocess = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    dataset = BoxDataset(records, build_dense_transform(None, preprocess, boxes=True))
    sample = dataset[0]
    x, y, w, h = records[0].boxes[0] / 2  # 64 → 32 px
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.uint8
    assert sample["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h], abs=1e-4)
    assert sample["labels"].tolist() == records[0].labels.tolist()
    Path(records[1].source).write_bytes(b"not a png")
    batch = collate_boxes([dataset[i] for i in range(3)])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].max() <= 1.0
    assert len(batch["targets"]) == 2 and batch["skipped"][0][0] == records[1].source


# ----------------------------------------------------------------------------------------------
# end to end


def test_train_and_predict_from_the_cli(tmp_path: Path, run_cli) -> None:
    """The detection recipe on the tiny model learns an easy set: test mAP@.5 0.76, 0.46, 0.83 (seeds 0-2)
    where the same run with every update at learning rate 0 scored 0.0; then eval and predict on its checkpoint."""
    scenes = tmp_path / "scenes"
    write_easy_split(scenes / "train", 32, seed=0)
    write_easy_split(scenes / "test", 12, seed=1)
    Path(scenes / "train" / "images" / "003.png").write_bytes(b"broken")  # an unreadable file: skipped and listed
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "recipe=fashion_scenes_det_lite0", f"data.root={scenes}",
                              "model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=32",
                              "trainer.epochs=6", "optim.lr=3e-3", "data.batch_size=8", "task.overlays=2",
                              "trainer.progress=off", f"hydra.run.dir={run}"])
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/map", "val/map50", "test/map", "test/map50"} <= set(metrics)
    assert metrics["test/map50"] >= 0.3
    assert len(list((run / "overlays").glob("*.png"))) == 2
    with open(run / "skipped_images.csv", newline="") as handle:
        assert any(row["path"].endswith("003.png") for row in csv.DictReader(handle))
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["task"] == "detection" and checkpoint["classes"] == ["red", "green"]
    assert any(k.startswith("backbone.") for k in checkpoint["model"])

    code, out, err = run_cli(["eval", f"checkpoint={run / 'best.pt'}", f"out={tmp_path / 'eval'}"])
    assert code == 0, err  # the run's test split scored again: the run's own figures
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # another code path on the same weights (eval's own loader): equal to float rounding, not bit for bit
    assert {k: v for k, v in again.items() if k.split("/")[1] in ("map", "map50", "map75")} == \
        pytest.approx({key: value for key, value in metrics.items() if key.startswith("test/")}, abs=1e-6)
    assert again["test/images"] == 12

    out_dir = tmp_path / "pred"
    code, out, err = run_cli(["predict", f"checkpoint={run / 'best.pt'}", f"input={scenes / 'test' / 'images'}",
                              f"out={out_dir}", "batch_size=4"])
    assert code == 0, err
    written = json.loads((out_dir / "boxes.json").read_text())
    assert [i["file_name"] for i in written["images"]] == [f"{n:03d}" for n in range(12)]
    assert [c["name"] for c in written["categories"]] == ["red", "green"]
    for entry in written["annotations"]:
        x, y, w, h = entry["bbox"]
        assert entry["category_id"] in (1, 2) and 0 <= x and x + w <= 64.01 and 0 <= entry["score"] <= 1


def test_fine_tune_strategies_and_layer_decay_apply_to_the_detector() -> None:
    """linear_probe freezes exactly the timm backbone (BatchNorm statistics included) and trains FCOS; layer
    decay gives the backbone's early layers smaller learning rates than the detection head."""
    from transfer.models.features import build_backbone
    from transfer.models.detector import build_detector
    from transfer.models.finetune import apply_strategy
    from transfer.engine.optim import build_optimizer

    backbone, _ = build_backbone("test_efficientnet", pretrained=False, out_indices=[2, 3, 4])
    model = build_detector(backbone, "test_efficientnet", 2, (64, 64), [0.5] * 3, [0.5] * 3)
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "head"}
    plan = apply_strategy(model, "linear_probe", epochs=2)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not model.backbone.training and model.head.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    sum(model(torch.rand(2, 3, 64, 64), targets).values()).backward()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())  # BN stats unchanged
    plan = apply_strategy(model, "full", epochs=2)
    optimizer = build_optimizer(model, plan, {"opt": "adamw", "lr": 1e-3, "layer_decay": 0.5})
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    assert min(scales) < max(scales) == 1.0


def test_detection_refuses_autocast_and_trains_in_float32(coco_folder: Path, run_cli, tmp_path: Path) -> None:
    """FCOS's losses are not stable under bf16 autocast: an explicit trainer.amp is refused with the reason;
    trainer.amp=auto trains in float32."""
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "task=detection", f"data.root={coco_folder}", "model.name=test_efficientnet",
                              "model.pretrained=false", "preprocess.input_size=64", "trainer.epochs=1",
                              "trainer.amp=bf16", "data.batch_size=4", "task.overlays=0", "trainer.progress=off",
                              f"hydra.run.dir={run}"])
    assert code == 2 and "trainer.amp=bf16" in err and "float32" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["train", "task=detection", f"data.root={coco_folder}", "model.name=test_efficientnet",
                              "model.pretrained=false", "preprocess.input_size=64", "trainer.epochs=1",
                              "trainer.amp=auto", "data.batch_size=4", "task.overlays=0", "trainer.progress=off",
                              f"hydra.run.dir={run}"])
    assert code == 0, err
    assert "amp" not in out.split("best.pt by")[0].split("device")[1]  # no autocast dtype in the start line
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/map50"] <= 1.0


# ---- crowds


def crowd_file(folder: Path) -> tuple[Path, list[dict]]:
    """Three 64 px images; image 1 has a crowd box, image 3 a crowd of class 2. Detections: hits, misses, and
    two that fall inside the crowds (ignored by COCOeval, false positives if the crowds were dropped)."""
    (folder / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]}
    boxes = {1: [([4, 4, 20, 20], 1, 0), ([30, 30, 30, 30], 1, 1)],
             2: [([10, 10, 16, 24], 2, 0), ([40, 8, 12, 12], 1, 0)],
             3: [([2, 2, 28, 28], 2, 1), ([36, 36, 20, 20], 2, 0)]}
    for image_id, entries in boxes.items():
        Image.fromarray(np.full((64, 64, 3), 30, np.uint8)).save(folder / "images" / f"{image_id}.png")
        coco["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 64})
        for box, category, crowd in entries:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id, "bbox": box,
                                        "category_id": category, "area": box[2] * box[3], "iscrowd": crowd})
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    detections = [{"image_id": 1, "category_id": 1, "bbox": [5, 4, 19, 21], "score": 0.9},
                  {"image_id": 1, "category_id": 1, "bbox": [34, 33, 14, 14], "score": 0.95},  # inside the crowd
                  {"image_id": 2, "category_id": 2, "bbox": [10, 12, 16, 20], "score": 0.8},
                  {"image_id": 2, "category_id": 1, "bbox": [20, 40, 12, 12], "score": 0.7},   # a miss
                  {"image_id": 3, "category_id": 2, "bbox": [6, 6, 10, 10], "score": 0.85},    # inside the crowd
                  {"image_id": 3, "category_id": 2, "bbox": [37, 35, 20, 22], "score": 0.6}]
    return path, detections


def test_crowds_are_ignore_regions_and_the_map_equals_pycocotools(tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path, detections = crowd_file(tmp_path / "crowds")
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(path))
        evaluation = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    theirs = {"map": evaluation.stats[0], "map50": evaluation.stats[1], "map75": evaluation.stats[2]}

    _, records, skipped = read_coco(path)
    assert not skipped and [int(r.crowd.sum()) for r in records] == [1, 0, 1]
    dataset = BoxDataset(records, build_dense_transform(None, {"input_size": (3, 64, 64), "interpolation": "bilinear"},
                                                        boxes=True))
    batch = collate_boxes([dataset[i] for i in range(len(records))])
    xyxy = lambda box: [box[0], box[1], box[0] + box[2], box[1] + box[3]]  # noqa: E731
    predictions = [{"boxes": torch.tensor([xyxy(d["bbox"]) for d in detections if d["image_id"] == r.image_id]),
                    "scores": torch.tensor([d["score"] for d in detections if d["image_id"] == r.image_id]),
                    "labels": torch.tensor([d["category_id"] for d in detections if d["image_id"] == r.image_id])}
                   for r in records]
    ours = coco_metrics(batch["targets"], predictions, num_classes=2)
    assert ours == pytest.approx(theirs, abs=1e-12)
    dropped = [{"boxes": t["boxes"][~t["iscrowd"]], "labels": t["labels"][~t["iscrowd"]]} for t in batch["targets"]]
    assert coco_metrics(dropped, predictions, num_classes=2)["map50"] < ours["map50"]  # crowds matter here


def test_crowds_are_never_training_targets(tmp_path):
    from transfer.tasks.detection import Detection
    from transfer.tasks.base import Runtime

    path, _ = crowd_file(tmp_path / "crowds")
    _, records, _ = read_coco(path)
    dataset = BoxDataset(records, build_dense_transform(None, {"input_size": (3, 64, 64), "interpolation": "bilinear"},
                                                        boxes=True))
    batch = collate_boxes([dataset[i] for i in range(len(records))])
    seen = []

    def model(images, targets):
        seen.extend(targets)
        return {"loss": torch.zeros(())}

    Detection().training_step(model, batch, Runtime(torch.device("cpu"), None, None))
    assert [len(t["boxes"]) for t in seen] == [1, 2, 1]  # 6 boxes, 2 of them crowds


# ----------------------------------------------------------------------------------------------
# every detector (torchvision's FCOS, RetinaNet, Faster R-CNN on the timm backbone)

DETECTOR_NAMES = ["fcos", "retinanet", "faster_rcnn"]
NEW_DETECTORS = ["retinanet", "faster_rcnn"]  # fcos, the default, runs in the tests above


@pytest.mark.parametrize("detector", DETECTOR_NAMES)
def test_every_detector_builds_on_the_timm_backbone_and_takes_a_finite_step(detector: str) -> None:
    """backbone + head like every dense model (linear_probe trains exactly the head), finite losses whose
    gradients reach the backbone, boxes in eval mode."""
    from transfer.models.detector import build_detector
    from transfer.models.features import build_backbone
    from transfer.models.finetune import apply_strategy

    torch.manual_seed(0)
    backbone, _ = build_backbone("test_efficientnet", pretrained=False, out_indices=[2, 3, 4])
    model = build_detector(backbone, "test_efficientnet", 2, (64, 64), [0.5] * 3, [0.5] * 3, detector=detector)
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "head"}
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    losses = model(torch.rand(2, 3, 64, 64), targets)
    loss = sum(losses.values())
    loss.backward()
    assert torch.isfinite(loss) and len(losses) >= 2
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    (output,) = model.eval()(torch.rand(1, 3, 64, 64))
    assert set(output) == {"boxes", "scores", "labels"} and output["boxes"].shape[-1] == 4
    apply_strategy(model.train(), "linear_probe", epochs=2)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_anchor_sizes_follow_the_backbone_strides() -> None:
    from transfer.models.detector import OCTAVE_SCALES, anchor_sizes

    assert anchor_sizes([8, 16], 4, OCTAVE_SCALES) == ((32, 40, 51), (64, 81, 102))
    assert anchor_sizes([8, 16, 32, 64], 4, (1.0,)) == ((32,), (64,), (128,), (256,))


@pytest.mark.parametrize("overrides, words", [
    (["task.detector=retinanet", "task.center_sampling_radius=1.5"], ["center_sampling_radius=1.5", "only fcos"]),
    (["task.anchor_size=3"], ["task.detector=fcos", "anchor_size=3", "retinanet|faster_rcnn"]),
    (["task.detector=retinanet", "task.representation_size=128"], ["representation_size=128", "only faster_rcnn"]),
    (["task.detector=yolo"], ["task.detector=yolo", "fcos, retinanet, faster_rcnn"]),
])
def test_keys_of_another_detector_are_refused_in_one_line(coco_folder: Path, run_cli, tmp_path: Path,
                                                         overrides: list[str], words: list[str]) -> None:
    code, _, err = run_cli(["train", "task=detection", f"data.root={coco_folder}", "model.name=test_efficientnet",
                            "model.pretrained=false", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err


@pytest.fixture(scope="module", params=NEW_DETECTORS)
def detector_run(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """One short CLI run per new detector on the easy set at 64 px (its anchors start at 32 px): RetinaNet long
    enough to learn it, Faster R-CNN one epoch. (detector, data, run)."""
    from transfer.cli import main

    detector, folder = request.param, tmp_path_factory.mktemp(request.param)
    data = folder / "easy"
    learn = detector == "retinanet"
    write_easy_split(data / "train", 32 if learn else 8, seed=0)
    write_easy_split(data / "test", 12 if learn else 4, seed=1)
    code = main(["train", "recipe=fashion_scenes_det_lite0", f"data.root={data}", "model.name=test_efficientnet",
                 "model.pretrained=false", "preprocess.input_size=64", f"task.detector={detector}",
                 f"trainer.epochs={6 if learn else 1}", "optim.lr=3e-3", "data.batch_size=8", "task.overlays=1",
                 "data.num_workers=0", "trainer.progress=off", f"hydra.run.dir={folder / 'run'}"])
    assert code == 0
    return detector, data, folder / "run"


def test_a_non_default_detector_learns_an_easy_set(detector_run) -> None:
    """RetinaNet at 64 px, 6 epochs: test mAP@.5 0.50 here (seed 0); Faster R-CNN scored 0.49 with the same
    budget (not run here: 3x the time); the FCOS test's runs at learning rate 0 scored 0.0."""
    detector, _, run = detector_run
    if detector != "retinanet":
        pytest.skip("the learning run is retinanet's")
    assert json.loads((run / "metrics.json").read_text())["test/map50"] >= 0.3


def test_every_detector_evaluates_predicts_and_exports_its_backbone(detector_run, tmp_path: Path, run_cli) -> None:
    detector, data, run = detector_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/map", "val/map50", "test/map", "test/map50"} <= set(metrics)
    assert len(list((run / "overlays").glob("*.png"))) == 1
    assert_eval_repeats(run_cli, run, tmp_path / "eval", "test/map50")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "000.png").write_bytes((data / "test" / "images" / "000.png").read_bytes())
    code, _, err = run_cli(["predict", f"checkpoint={run / 'best.pt'}", f"input={inputs}", f"out={tmp_path / 'pred'}"])
    assert code == 0, err
    assert [i["file_name"] for i in json.loads((tmp_path / "pred" / "boxes.json").read_text())["images"]] == ["000"]
    assert_backbone_exported(run_cli, run, tmp_path / "bb")
