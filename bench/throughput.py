"""How close the input pipeline comes to the model's own compute limit, for training and evaluation.

    python -m bench.throughput                                   # the acceptance setting (below)
    python -m bench.throughput --cache none                      # decode every PNG every epoch
    python -m bench.throughput --model resnet50 --size 224 --batch 128 --amp bf16 --compile   # on a GPU

For one model, input size and batch size it measures, in one process:
  (a) compute-only images/s: the real training step (`transfer.engine.loop.Loop.step`: normalise, forward,
      loss, backward, optimizer step) on one uint8 batch already in memory;
  (b) end-to-end images/s: whole epochs of the real loop (`Loop.train_epoch`) fed by the real
      pipeline from an image folder (index, decode or cache, augment, collate, step);
  (c) b / a, and beside it the share of those real epochs spent waiting for the next batch (the input
      stall, timed inside the same epochs, so unmoved by load that changes between the blocks);
  (d) peak resident memory of the process (model, optimizer, data cache, workers);
and the same for evaluation (`predict_logits` over the test split against forward passes alone).

The machine may be shared, so the two are interleaved: each round times one compute-only block of as
many steps as an epoch, then one real epoch; the figures sum every round. The ratio is what to
compare between machines and settings; absolute images/s move with the load (printed beside them).

Everything is built from the same config as `transfer train` (`transfer.config.compose`), so the
bench cannot drift from what users run. Default: tf_efficientnet_lite0, 64 px, batch 64,
augment=default, data.cache=ram, the Fashion-MNIST benchmark folder (bench/data/fashion_mnist_100).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import transfer  # noqa: E402,F401  before torch: its OpenMP wait policy
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FASHION = REPO / "bench" / "data" / "fashion_mnist_100"


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels")
    parser.add_argument("--batch", type=int, default=64, help="training batch size")
    parser.add_argument("--eval-batch", type=int, default=None, help="data.eval_batch_size (default: the config's)")
    parser.add_argument("--augment", default="default", help="augment preset (conf/augment/NAME.yaml)")
    parser.add_argument("--cache", default="ram", help="data.cache: none | ram | disk")
    parser.add_argument("--workers", default="auto", help="data.num_workers")
    parser.add_argument("--root", default=str(FASHION), help="image folder with train/ [test/]")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved compute-only / real-epoch rounds")
    parser.add_argument("--max-steps", type=int, default=0, help="cap the steps of an epoch (0: the whole split)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", help="trainer.amp: auto | bf16 | fp16 | off")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--weights", default="auto", help="model.weights; 'none' for random init")
    return parser.parse_known_args(argv)


def build(args: argparse.Namespace, extra: list[str]):
    """The config `transfer train` composes for these settings."""
    from transfer.config import compose, without_hydra

    overrides = [f"data.root={args.root}", "model=timm", f"model.name={args.model}", f"augment={args.augment}",
                 f"preprocess.input_size={args.size}", f"data.batch_size={args.batch}",
                 f"data.cache={args.cache}",
                 f"data.num_workers={args.workers}", f"trainer.device={args.device}", f"trainer.amp={args.amp}",
                 f"trainer.channels_last={not args.no_channels_last}", f"trainer.compile={args.compile}",
                 "trainer.progress=off", "data.val_fraction=0"]
    overrides += ["model.pretrained=false"] if args.weights == "none" else [f"model.weights={args.weights}"]
    overrides += [f"data.eval_batch_size={args.eval_batch}"] if args.eval_batch else []
    return without_hydra(compose(overrides + extra))


def peak_rss_mb() -> float:
    """Peak resident memory of this process plus its finished children (loader workers), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024  # ru_maxrss is in KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core {model}"


def load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def measure(args: argparse.Namespace, extra: list[str]) -> dict:
    import contextlib
    import io

    from transfer.data.loaders import build_loader, resolve_workers
    from transfer.models.inference import autocast, fold_batchnorm, predict_logits
    from transfer.engine.loop import Loop
    from transfer.engine.rundir import SkippedFiles
    from transfer.engine.setup import build_setup
    from transfer.engine.state import fresh_state
    from transfer.engine.techniques import Techniques

    cfg = build(args, extra)
    started = time.perf_counter()
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # the cache's one line goes into ours
        built = build_setup(cfg)  # exactly what `transfer train` builds: task, data, model, strategy, loaders
    setup_seconds = time.perf_counter() - started
    runtime, data, model, task = built.runtime, built.data, built.model, built.task
    device, amp_dtype, normalize, preprocess = runtime.device, runtime.amp_dtype, runtime.normalize, built.preprocess
    workers = resolve_workers(cfg.data.num_workers)
    train_loader = _instrumented(built.loaders["train"], args.max_steps)
    kit = Techniques(cfg, model, built.plan, task, train_loader, runtime, None, log=lambda _: None)
    run_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    loop = Loop(model, task, kit, runtime, cfg, SkippedFiles(run_dir / "throughput-bench"))
    steps = len(train_loader)

    side = preprocess["input_size"][1:]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg.data.batch_size, 3, *side), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, len(data.classes), (cfg.data.batch_size,), generator=generator)
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()

    def compute_block(count: int) -> float:
        """The loop's step on one batch already in memory: normalise, forward, loss, backward, update."""
        model.train()
        synchronize(device)
        started = time.perf_counter()
        batch = {"image": images, "label": labels}
        for step in range(count):
            kit.at(0, step % steps, steps)
            loop.step(batch, runtime)
        synchronize(device)
        return time.perf_counter() - started

    def pipeline_epoch(epoch: int) -> tuple[float, int]:
        """One real epoch of the loop over the real loader."""
        synchronize(device)
        started = time.perf_counter()
        loop.train_epoch(train_loader, epoch, fresh_state())
        synchronize(device)
        return time.perf_counter() - started, steps * cfg.data.batch_size

    compute_block(3)  # warm-up: allocator, kernels, torch.compile
    pipeline_epoch(0)  # warm-up: the first epoch starts the workers (and a disk cache's page cache)
    type(train_loader).wait = 0.0
    train = {"compute_s": 0.0, "compute_n": 0, "pipeline_s": 0.0, "pipeline_n": 0}
    for round_ in range(args.rounds):
        train["compute_s"] += compute_block(steps)
        train["compute_n"] += steps * cfg.data.batch_size
        seconds, count = pipeline_epoch(round_ + 1)
        train["pipeline_s"] += seconds
        train["pipeline_n"] += count
    train["wait_s"] = type(train_loader).wait
    cache = " ".join(line.strip() for line in said.getvalue().splitlines() if line.startswith("data.cache"))
    result = {"cfg": cfg, "device": device, "amp": amp_dtype, "workers": workers, "setup_seconds": setup_seconds,
              "train": train, "cache": cache}

    held_out = "test" if "test" in built.loaders else "train"
    if not args.no_eval:
        eval_loader = built.loaders["test"] if held_out == "test" else build_loader(
            data.datasets["train"], cfg.data.eval_batch_size, train=False, num_workers=cfg.data.num_workers,
            seed=cfg.seed, pin_memory=device.type == "cuda")
        eval_images = torch.randint(0, 256, (cfg.data.eval_batch_size, 3, *side), dtype=torch.uint8,
                                    generator=generator)
        size = len(data.datasets[held_out])

        @torch.no_grad()
        def eval_compute() -> float:
            """Forward passes alone over as many images as the split holds, the split's batch sizes, by the
            model as predict_logits runs it (BatchNorm folded)."""
            model.eval()
            synchronize(device)
            started = time.perf_counter()
            runner = fold_batchnorm(model) or model
            for first in range(0, size, cfg.data.eval_batch_size):
                with autocast(device, amp_dtype):
                    runner(normalize(eval_images[:size - first])).float().cpu()
            synchronize(device)
            return time.perf_counter() - started

        def eval_pipeline() -> float:
            synchronize(device)
            started = time.perf_counter()
            predict_logits(model, eval_loader, normalize, amp_dtype)
            synchronize(device)
            return time.perf_counter() - started

        eval_compute()
        eval_pipeline()
        evaluation = {"compute_s": 0.0, "compute_n": 0, "pipeline_s": 0.0, "pipeline_n": 0}
        for _ in range(args.rounds):
            evaluation["compute_s"] += eval_compute()
            evaluation["compute_n"] += size
            evaluation["pipeline_s"] += eval_pipeline()
            evaluation["pipeline_n"] += size
        result["eval"] = evaluation
        result["eval_split"] = held_out
    result["rss"] = peak_rss_mb()
    if device.type == "cuda":
        result["gpu_mem"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _instrumented(loader, steps: int = 0):
    """The loader, each epoch cut to its first `steps` batches (0: all), timing how long the loop waits for
    each batch (`.wait`, seconds, summed): the input stall, measured inside the real epochs themselves."""
    from torch.utils.data import DataLoader

    class Instrumented(DataLoader):
        wait = 0.0

        def __len__(self) -> int:
            return min(steps, super().__len__()) if steps else super().__len__()

        def __iter__(self):
            batches = super().__iter__()
            for _ in range(len(self)):
                started = time.perf_counter()
                batch = next(batches, None)
                Instrumented.wait += time.perf_counter() - started
                if batch is None:
                    return
                yield batch

    return Instrumented(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                        drop_last=loader.drop_last, persistent_workers=loader.persistent_workers,
                        worker_init_fn=loader.worker_init_fn, prefetch_factor=loader.prefetch_factor)


def figures(part: dict) -> tuple[float, float, float]:
    compute = part["compute_n"] / part["compute_s"]
    pipeline = part["pipeline_n"] / part["pipeline_s"]
    return compute, pipeline, pipeline / compute


def line(args: argparse.Namespace, result: dict, load_before: str) -> str:
    cfg = result["cfg"]
    amp = str(result["amp"]).split(".")[-1] if result["amp"] else "off"
    compute, pipeline, ratio = figures(result["train"])
    parts = [f"throughput {cfg.model.name} {args.size}px batch {cfg.data.batch_size} augment={args.augment} "
             f"cache={cfg.data.cache} workers={result['workers']} device={result['device']} amp={amp} "
             f"channels_last={cfg.trainer.channels_last}{' compile' if args.compile else ''} "
             f"threads={torch.get_num_threads()} omp_wait={os.environ.get('OMP_WAIT_POLICY', 'default')} gomp_spincount={os.environ.get('GOMP_SPINCOUNT', 'default')}",
             f"train: compute {compute:.0f} img/s, pipeline {pipeline:.0f} img/s, ratio {ratio:.2f}, "
             f"waiting for data {result['train']['wait_s'] / result['train']['pipeline_s']:.1%} of the epochs"]
    if "eval" in result:
        compute, pipeline, ratio = figures(result["eval"])
        parts.append(f"eval ({result['eval_split']}, batch {cfg.data.eval_batch_size}): compute {compute:.0f} img/s, "
                     f"pipeline {pipeline:.0f} img/s, ratio {ratio:.2f}")
    memory = f"peak rss {result['rss']:.0f} MB"
    if "gpu_mem" in result:
        memory += f", gpu {result['gpu_mem']:.0f} MB"
    parts.append(memory)
    parts.append(f"setup (data, model, loaders) {result['setup_seconds']:.1f}s{' (' + result['cache'] + ')' if result['cache'] else ''}")
    parts.append(f"load {load_before} -> {load()} | {machine()} | torch {torch.__version__} | {date.today()}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(argv)
    from transfer.errors import UserError

    before = load()
    try:
        result = measure(args, [item for item in extra if item != "--"])
    except UserError as error:
        print(f"bench.throughput: error: {error}", file=sys.stderr)
        return 2
    print(line(args, result, before), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
