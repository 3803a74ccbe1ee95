"""TensorBoard: event files in RUN/tensorboard (`logger.tensorboard.*` are SummaryWriter arguments).

Scalars are written as float64 tensors (`double_precision`), so they read back as the numbers metrics.csv holds,
not rounded to float32. A resumed run writes a new event file into the same folder; TensorBoard joins them.
"""

from __future__ import annotations

from pathlib import Path

from transfer.trackers.base import check_options, label, require_package


class TensorBoard:
    name = "tensorboard"

    def __init__(self, options: dict) -> None:
        writer = require_package("torch.utils.tensorboard", "tensorboard").SummaryWriter
        self.options, self.writer = check_options(options, writer.__init__, self.name), None
        self.last_step, self.folders = 0, []

    def start(self, config: dict, run_dir: Path, earlier: dict | None) -> dict:
        from omegaconf import OmegaConf
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.options.get("log_dir") or run_dir / "tensorboard"
        self.writer = SummaryWriter(**{**self.options, "log_dir": str(log_dir)})
        self.folders = [Path(log_dir)]
        if earlier is None:  # a resumed run's config is the first part's, with trainer.resume set
            yaml = OmegaConf.to_yaml(OmegaConf.create(config))
            self.writer.add_text("config", f"```yaml\n{yaml}```", global_step=0)  # markdown: keep the indentation
        return {"log_dir": str(log_dir)}

    def log_step(self, metrics: dict[str, float], batch: int) -> None:
        self.scalars(metrics, batch)

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        self.scalars(metrics, epoch)
        self.last_step = epoch

    def log_final(self, metrics: dict[str, float], epoch: int) -> None:
        self.scalars({f"final/{key}": value for key, value in metrics.items()}, epoch)

    def log_files(self, paths: list[Path], run_dir: Path) -> None:
        import numpy as np
        from PIL import Image

        for path in paths:
            if path.suffix == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"images/{label(path, run_dir)}", pixels, self.last_step, dataformats="HWC")

    def finish(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)
