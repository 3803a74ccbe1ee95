"""`transfer predict` for segmentation and detection checkpoints: the task's own outputs (mask PNGs, one
boxes JSON) for every readable image; unreadable files are listed in OUT/skipped_images.csv."""

from __future__ import annotations

from pathlib import Path

from transfer.data.images import BadImageError, read_rgb
from transfer.dense.train import dense_from_checkpoint
from transfer.errors import UserError

DEFAULT_OUT = "predictions"


def predict_dense(checkpoint: dict, files: list[str], input_root: str, out: str | None, batch_size: int) -> int:
    """Predict every file in chunks of batch_size; outputs named by their path below the input folder."""
    from transfer.commands import write_skipped

    task, model = dense_from_checkpoint(checkpoint)
    folder = Path(out or DEFAULT_OUT).expanduser()
    root = Path(input_root).expanduser()
    skipped: list[tuple[str, str]] = []

    def chunks():
        """(names, predictions) of each chunk of readable files; the unreadable ones into `skipped`."""
        for start in range(0, len(files), batch_size):
            images, names = [], []
            for file in files[start:start + batch_size]:
                try:
                    images.append(read_rgb(file))
                except BadImageError as error:
                    skipped.append((file, error.reason))
                    continue
                names.append(output_name(Path(file), root))
            if images:
                yield names, task.predict(model, images)

    done = task.write_predictions(chunks(), folder)
    if not done:
        raise UserError(f"none of the {len(files)} input file(s) could be read as an image "
                        f"({'; '.join(f'{p}: {r}' for p, r in skipped[:3])}).")
    if skipped:
        write_skipped(folder / "skipped_images.csv", skipped)
        print(f"warning: skipped {len(skipped)} unreadable image(s); list in {folder / 'skipped_images.csv'}")
    print(f"wrote {task.name} predictions for {done} image(s) to {folder}")
    return 0


def output_name(file: Path, root: Path) -> str:
    """a/b.jpg below the input folder → 'a/b' (one input file: its stem)."""
    relative = file.relative_to(root) if root.is_dir() else Path(file.name)
    return str(relative.with_suffix(""))
