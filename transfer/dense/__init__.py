"""Dense tasks (segmentation, detection) on the same timm backbones, weight sources, augmentation presets,
optimizer, schedules and fine-tune strategies as classification.

backbone.py   a timm features_only backbone filled from any classification weight source
augment.py    albumentations pipelines that move masks and boxes with the image
train.py      the loop for dense tasks; the task object (segmentation.py, detection.py) brings data,
              model, loss, metrics, predictions and overlays
coco.py       COCO files read and checked for detection, their splits, dataset and batching
predict.py    `transfer predict` for dense checkpoints (mask PNGs, one boxes JSON)
evaluate.py   `transfer eval` for dense checkpoints (the task's metrics on a held-out split)
"""

TASKS = ("classification", "segmentation", "detection")


def build_task(name: str):
    """The task object for a dense task name (imported lazily: detection pulls in torchvision's models)."""
    from transfer.config import require

    require(name, TASKS[1:], "task.name")
    if name == "segmentation":
        from transfer.dense.segmentation import Segmentation

        return Segmentation()
    from transfer.dense.detection import Detection

    return Detection()
