"""Data-parallel training: shards that cover each split once, evaluations that merge to one process's numbers,
and real two-process runs on gloo (torchrun and trainer.processes), two "machines" on localhost, a killed
process, a stop and an exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from test_detection import write_coco_folder
from test_multilabel import write_manifest, write_patches
from test_segmentation import write_scene_folder
from transfer.checkpoint import load_checkpoint
from transfer.cli.launch import check_processes
from transfer.data.loaders import BalancedEpochSampler, EpochSampler
from transfer.errors import UserError

TINY = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "data.batch_size=4",
        "trainer.progress=plain"]


# ---- shards


@pytest.mark.parametrize("size", [0, 1, 7, 10, 33])
@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_shards_hold_every_sample_once(size, world):
    shards = [[index for _, index in EpochSampler(size, shuffle=False, seed=0, rank=r, world=world)]
              for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(EpochSampler(size, False, 0, r, world)) for r in range(world)] == [len(s) for s in shards]


@pytest.mark.parametrize("size", [1, 7, 10, 33])
def test_training_shards_are_equal_and_cover_the_epoch(size):
    world, epoch = 3, 4
    samplers = [EpochSampler(size, shuffle=True, seed=5, rank=r, world=world) for r in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    shards = [[index for _, index in sampler] for sampler in samplers]
    assert len({len(shard) for shard in shards}) == 1 == len({len(s) for s in samplers})
    assert set(i for shard in shards for i in shard) == set(range(size))
    one = EpochSampler(size, shuffle=True, seed=5)  # the single process's order of the same epoch, dealt out
    one.set_epoch(epoch)
    order = [index for _, index in one]
    padded = (order * world)[:len(shards[0]) * world]
    assert shards == [padded[r::world] for r in range(world)]
    assert all(pair[0] == epoch for sampler in samplers for pair in sampler)  # augmentation keyed by epoch


def test_balanced_sampler_deals_out_the_single_process_draw():
    labels = [0] * 30 + [1] * 3
    whole = [index for _, index in BalancedEpochSampler(labels, seed=1)]
    parts = [[index for _, index in BalancedEpochSampler(labels, seed=1, rank=r, world=2)] for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 17
    assert parts == [(whole + whole[:1])[r::2] for r in range(2)]


def test_processes_must_agree_with_torchrun():
    assert check_processes(2, False, 1) == 2
    assert check_processes(1, True, 4) == 1 and check_processes(4, True, 4) == 4
    for wrong in (0, -1, "two", True):
        with pytest.raises(UserError, match="whole number"):
            check_processes(wrong, False, 1)
    with pytest.raises(UserError, match="nproc_per_node"):
        check_processes(3, True, 2)


# ---- merged evaluations equal one pass, for every task


def shard_loaders(loader: DataLoader, world: int) -> list[DataLoader]:
    return [DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                       sampler=EpochSampler(len(loader.dataset), shuffle=False, seed=0, rank=r, world=world))
            for r in range(world)]


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection", "multilabel",
                                  "segmentation-unet", "detection-faster_rcnn", "detection-retinanet"])
def test_shards_score_as_one_pass(task, engine_folders):
    from transfer.config import compose
    from transfer.engine.setup import build_setup

    cfg = compose(engine_folders[task] + ["trainer.device=cpu"])
    setup = build_setup(cfg)
    split = "test" if "test" in setup.loaders else "val"
    loader = setup.loaders[split]
    whole = setup.task.evaluate(setup.model, loader, setup.runtime)
    parts = [setup.task.infer(setup.model, shard, setup.runtime) for shard in shard_loaders(loader, 3)]
    merged = setup.task.score(parts)
    assert merged.metrics.keys() == whole.metrics.keys()
    for key, value in whole.metrics.items():
        assert merged.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


# ---- real processes


@pytest.fixture(scope="module")
def engine_folders(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("ddp-data")
    scenes, coco = write_scene_folder(root / "scenes", 20), write_coco_folder(root / "coco", train=12, test=5)
    labelled = write_manifest(root / "patches" / "labels.csv", write_patches(root / "patches", 40))
    segmentation = ["task=segmentation", f"data.root={scenes}", "preprocess.input_size=32", "task.overlays=0",
                    "task.decoder_channels=64", "trainer.epochs=2", *TINY]
    detection = ["task=detection", f"data.root={coco}", "preprocess.input_size=64", "task.overlays=0",
                 "trainer.epochs=2", *TINY]
    return {
        "classification": ["trainer.epochs=1", "data.batch_size=32", "trainer.progress=plain"],  # digits, Lite0
        "segmentation": segmentation,
        "detection": detection,
        "multilabel": ["task=multilabel", f"data.root={labelled}", "preprocess.input_size=32", "data.test_fraction=0.2",
                       "trainer.epochs=2", *TINY],
        "segmentation-unet": [*segmentation, "task.decoder=unet"],
        "detection-faster_rcnn": [*detection, "task.detector=faster_rcnn"],
        "detection-retinanet": [*detection, "task.detector=retinanet"],
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(args: list[str], processes: int = 2, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            *(extra or []), "-m", "transfer", *args]


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment())


def evaluated(run_dir: Path, split: str) -> dict:
    done = run([sys.executable, "-m", "transfer", "eval", f"checkpoint={run_dir / 'best.pt'}", f"split={split}"])
    assert done.returncode == 0, done.stderr
    return json.loads((run_dir / f"eval-{split}" / "metrics.json").read_text())


def assert_same_as_one_process(run_dir: Path, split: str) -> None:
    trained = json.loads((run_dir / "metrics.json").read_text())
    alone = evaluated(run_dir, split)
    compared = [key for key in alone if key in trained]  # eval adds image counts
    assert len(compared) >= 3 and all(key.startswith(f"{split}/") for key in compared), (sorted(alone), sorted(trained))
    for key in compared:
        value, ours = alone[key], trained[key]
        if key.endswith("loss"):
            assert ours == pytest.approx(value, abs=1e-6, rel=1e-6), key
        else:
            assert ours == pytest.approx(value, abs=1e-9), key  # counts: exact


@pytest.mark.ddp
def test_two_processes_train_the_digits_default_as_one_would_score_it(tmp_path):
    """`transfer train trainer.processes=2` launches torchrun itself; rank 0 alone writes."""
    run_dir = tmp_path / "digits"
    done = run([sys.executable, "-m", "transfer", "train", "trainer.processes=2", "trainer.epochs=1",
                f"hydra.run.dir={run_dir}", "trainer.progress=plain"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("epoch   1/1") == 1 and "effective batch 128 = data.batch_size 64 per process × 2" \
        in done.stdout
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["batches"]["effective_batch"] == 128 and load_checkpoint(run_dir / "last.pt")["world_size"] == 2
    assert sorted(path.name for path in run_dir.iterdir() if path.suffix == ".tmp") == []
    assert_same_as_one_process(run_dir, "test")
    assert_same_as_one_process(run_dir, "val")


@pytest.mark.ddp
@pytest.mark.parametrize("task", ["segmentation", "detection", "multilabel", "segmentation-unet",
                                  "detection-faster_rcnn"])
def test_two_processes_train_task_plugins(task, engine_folders, tmp_path):
    run_dir = tmp_path / task
    done = run(torchrun(["train", *engine_folders[task], f"hydra.run.dir={run_dir}"]))
    assert done.returncode == 0, done.stderr
    assert_same_as_one_process(run_dir, "test")
    assert_same_as_one_process(run_dir, "val")


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", [
    ["finetune=gradual", "finetune.unfreeze_every=1", "ema.enabled=true"],  # a new DDP wrapper each epoch
    ["finetune=linear_probe", "augment=none"],  # features extracted in shards, the head on cached features
])
def test_freezing_strategies_and_ema_under_two_processes(strategy, tmp_path):
    run_dir = tmp_path / "run"
    done = run(torchrun(["train", "model=timm", "model.name=test_efficientnet", "model.pretrained=false",
                         "trainer.epochs=3", "trainer.progress=plain", f"hydra.run.dir={run_dir}", *strategy]))
    assert done.returncode == 0, done.stderr
    if "augment=none" in strategy:
        assert "linear probe on cached features" in done.stdout
        note = json.loads((run_dir / "features.json").read_text())
        assert note["splits"]["train"]["images"] == 1257  # every image once, gathered from both shards
    assert_same_as_one_process(run_dir, "test")


@pytest.mark.ddp
def test_two_machines_on_localhost(engine_folders, tmp_path):
    """nnodes=2, one process each, c10d rendezvous on 127.0.0.1: the README's two-machine command."""
    run_dir, port = tmp_path / "nodes", free_port()
    args = ["train", *engine_folders["segmentation"], f"hydra.run.dir={run_dir}"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=transfer-test", "-m", "transfer", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
             for rank in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert (run_dir / "metrics.json").is_file() and load_checkpoint(run_dir / "best.pt")["world_size"] == 2


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def start_long_run(engine_folders, run_dir: Path, epochs: int = 30, own_launcher: bool = False) -> subprocess.Popen:
    args = ["train", *engine_folders["segmentation"], f"trainer.epochs={epochs}", f"hydra.run.dir={run_dir}"]
    command = [sys.executable, "-m", "transfer", *args, "trainer.processes=2"] if own_launcher else torchrun(args)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())


def wait_for(path: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.ddp
def test_a_killed_process_ends_the_run_with_a_message(engine_folders, tmp_path):
    run_dir = tmp_path / "killed"
    launcher = start_long_run(engine_folders, run_dir, own_launcher=True)
    wait_for(run_dir / "last.pt")
    os.kill(worker_pids(launcher)[1], signal.SIGKILL)
    killed = time.monotonic()
    out, err = launcher.communicate(timeout=120)
    assert time.monotonic() - killed < 60
    assert launcher.returncode != 0
    assert "another process of this run ended" in err and "process 1 was killed by SIGKILL" in err, err
    assert "Traceback" not in err
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert checkpoint["epoch"] >= 1 and checkpoint["world_size"] == 2


@pytest.mark.ddp
def test_sigterm_to_one_process_stops_all_with_one_last_pt_and_resume_is_exact(engine_folders, tmp_path):
    """Digits at batch 8: 78 steps an epoch per process, so the stop lands mid-epoch, where each process's
    random streams (dropout) and BatchNorm statistics must come back for the resumed run to equal the whole."""
    whole_dir, split_dir, epochs = tmp_path / "whole", tmp_path / "split", 3
    args = [*TINY, "data.batch_size=8", "preprocess.input_size=32"]
    args.remove("data.batch_size=4")
    done = run(torchrun(["train", *args, f"trainer.epochs={epochs}", f"hydra.run.dir={whole_dir}"]))
    assert done.returncode == 0, done.stderr
    launcher = subprocess.Popen(torchrun(["train", *args, f"trainer.epochs={epochs}", f"hydra.run.dir={split_dir}"]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    wait_for(split_dir / "last.pt")
    time.sleep(0.3)
    os.kill(worker_pids(launcher)[1], signal.SIGTERM)  # the process that does not write
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and err.count("last.pt written; resume with") == 1, err
    stopped = load_checkpoint(split_dir / "last.pt")
    assert stopped["epoch"] < epochs, "the run ended before the signal: nothing was tested"
    print(f"stopped after epoch {stopped['epoch']}, step {stopped['step']}")
    if stopped["step"]:  # a mid-epoch checkpoint does not continue with another number of processes
        other_dir = tmp_path / "other"
        shutil.copytree(split_dir, other_dir)
        other = run([sys.executable, "-m", "transfer", "train", "--config", str(other_dir / "config.yaml"),
                     f"trainer.resume={other_dir / 'last.pt'}"])
        assert other.returncode == 2 and "Resume it with 2 process(es)" in other.stderr, other.stderr
    again = run(torchrun(["train", "--config", str(split_dir / "config.yaml"), f"trainer.resume={split_dir}"]))
    assert again.returncode == 0, again.stderr
    resumed, whole = load_checkpoint(split_dir / "last.pt"), load_checkpoint(whole_dir / "last.pt")
    assert [without_seconds(row) for row in resumed["history"]] == [without_seconds(row) for row in whole["history"]]
    assert all(torch.equal(resumed["model"][key], whole["model"][key]) for key in whole["model"])


def without_seconds(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "seconds"}
