"""Evaluation at its limit: end-to-end against compute-only images/s, for several evaluation batch sizes.

    python -m bench.evaluation                    # Lite0, 64 px, the 2,000 Fashion-MNIST test PNGs, data.cache=ram
    python -m bench.evaluation --batches 32,64,128,256 --size 96 --rounds 5

For each batch size, in one process and interleaved (so load that comes and goes hits every setting alike):
  compute-only  forward passes of the model as evaluation runs it (BatchNorm folded, channels-last, the
                runtime's normalisation) on uint8 batches already in memory, as many images as the split holds;
  end-to-end    `predict_logits` over the real loader of the split (`transfer train`'s own, rebuilt at this
                batch size): cache lookup, the deterministic evaluation transform (memoized after the first
                pass, as in training runs), collation, normalisation, forward, logits gathered on the CPU.
The ratio end-to-end / compute-only is what to compare between machines; the fastest end-to-end batch size
on this CPU is what `data.eval_batch_size` should default to. The load average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from datetime import date

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import transfer  # noqa: E402,F401  before torch: its OpenMP wait policy
import torch  # noqa: E402

from bench.throughput import FASHION, build, load, machine  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels")
    parser.add_argument("--batches", default="32,64,128,256", help="evaluation batch sizes, comma-separated")
    parser.add_argument("--cache", default="ram", help="data.cache: none | ram | disk")
    parser.add_argument("--root", default=str(FASHION), help="image folder with train/ and test/")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", default="auto", help="model.weights; 'none' for random init")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> argparse.Namespace:
    """bench.throughput's options for this model and data (its `build` composes `transfer train`'s config)."""
    return argparse.Namespace(root=args.root, model=args.model, augment="default", size=args.size, batch=64,
                              eval_batch=None, cache=args.cache, workers="auto", device="auto", amp="auto",
                              no_channels_last=False, compile=False, weights=args.weights)


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def measure(args: argparse.Namespace) -> tuple[dict[int, dict], dict]:
    """{batch size: seconds and images of each kind}, and what was built."""
    from transfer.data.loaders import build_loader
    from transfer.engine.setup import build_setup
    from transfer.models.inference import autocast, checked_fold, predict_logits

    cfg = build(settings(args), [])
    with contextlib.redirect_stdout(io.StringIO()):
        built = build_setup(cfg)
    model, runtime = built.model.eval(), built.runtime
    dataset = built.data.datasets["test"]
    size, side = len(dataset), built.preprocess["input_size"][1:]
    batches = [int(text) for text in args.batches.split(",")]
    loaders = {batch: build_loader(dataset, batch, train=False, num_workers=cfg.data.num_workers, seed=cfg.seed)
               for batch in batches}
    pixels = torch.randint(0, 256, (max(batches), 3, *side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def compute(batch: int) -> None:
        runner = None
        for first in range(0, size, batch):
            with autocast(runtime.device, runtime.amp_dtype):
                images = runtime.normalize(pixels[:min(batch, size - first)])
                runner = runner or checked_fold(model, images)
                runner(images).float().cpu()

    def end_to_end(batch: int) -> None:
        predict_logits(model, loaders[batch], runtime.normalize, runtime.amp_dtype)

    for batch in batches:  # warm-up: kernels, the folded copy, the memoized evaluation images
        compute(batch)
        end_to_end(batch)
    figures = {batch: {"compute_s": 0.0, "pipeline_s": 0.0, "images": 0} for batch in batches}
    for _ in range(args.rounds):
        for batch in batches:
            figures[batch]["compute_s"] += timed(lambda: compute(batch))
            figures[batch]["pipeline_s"] += timed(lambda: end_to_end(batch))
            figures[batch]["images"] += size
    return figures, {"cfg": cfg, "size": size, "runtime": runtime}


def report(args: argparse.Namespace, figures: dict[int, dict], built: dict, load_before: str) -> str:
    lines = [f"evaluation {built['cfg'].model.name} {args.size}px, {built['size']} test images, "
             f"cache={args.cache}, threads={torch.get_num_threads()}, {args.rounds} interleaved rounds",
             "| eval batch | compute-only | end-to-end | ratio |", "|---|---|---|---|"]
    for batch, part in figures.items():
        compute, pipeline = part["images"] / part["compute_s"], part["images"] / part["pipeline_s"]
        lines.append(f"| {batch} | {compute:.0f} img/s | {pipeline:.0f} img/s | {pipeline / compute:.2f} |")
    fastest = max(figures, key=lambda batch: figures[batch]["images"] / figures[batch]["pipeline_s"])
    lines.append(f"fastest end-to-end: batch {fastest} | load {load_before} -> {load()} | {machine()} | "
                 f"torch {torch.__version__} | {date.today()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.root == str(FASHION):
        from bench.fashion_mnist import build_fashion_folder

        build_fashion_folder(FASHION)
    before = load()
    figures, built = measure(args)
    print(report(args, figures, built, before), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
