"""The fine-tuning techniques: strategies and BatchNorm policy, layer decay and weight decay, mixup/cutmix,
EMA, gradient accumulation, class balance, early stopping, torch.compile, the LR finder and test-time
augmentation. Unit checks on timm's tiny `test_efficientnet`, end-to-end runs through the CLI at 32 px.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import CLASSES, RunCli, final, rows, write_png
from transfer.checkpoint import load_checkpoint
from transfer.cli import main
from transfer.cli.help import command_help
from transfer.errors import UserError
from transfer.models.finetune import Plan, apply_strategy, is_batchnorm, parameter_groups
from transfer.engine.optim import PhaseScheduler, build_optimizer
from transfer.engine.monitor import Monitor
from transfer.tasks.mixing import Mixer, class_weights

TINY = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=32",
        "data.num_workers=0", "data.batch_size=8", "trainer.progress=off"]
REPO = Path(__file__).resolve().parents[1]
ADAMW = {"opt": "adamw", "lr": 1e-3, "weight_decay": 0.05, "momentum": 0.9, "layer_decay": None,
         "filter_bias_and_bn": True}
COSINE = {"sched": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5, "min_lr": 1e-6}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=3)


def train(run_dir: Path, *overrides: str) -> Path:
    assert main(["train", *TINY, *overrides, f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def same_weights(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


@pytest.fixture(scope="module")
def train_only(runs: Path) -> Path:
    """32 training images (16/8/8 per class: imbalanced), no val or test split."""
    for index, (name, count) in enumerate(zip(CLASSES, (16, 8, 8))):
        for n in range(count):
            write_png(runs / "train_only" / "train" / name / f"{n}.png", index, seed=500 + index * 100 + n)
    return runs / "train_only"


# ---------------------------------------------------------------------------------------------
# 1. optimizer: layer decay reaches the learning rates, no weight decay on norms and biases


def test_layer_decay_reaches_every_param_groups_lr() -> None:
    model = tiny_model()
    plan = apply_strategy(model, "full", epochs=2)
    optimizer = build_optimizer(model, plan, {**ADAMW, "layer_decay": 0.5})
    scheduler = PhaseScheduler(optimizer, plan, {**COSINE, "warmup_epochs": 0}, 1e-3, batches_per_epoch=4)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert len(scales) > 3 and scales[-1] == 1.0 and scales[0] < 0.1  # one scale per layer, head at 1
    for group in optimizer.param_groups:  # timm's scheduler multiplies them in (a torch scheduler would not)
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    scheduler.step_update(num_updates=4)  # one epoch into the cosine: same ratios, lower lr
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(optimizer.param_groups[-1]["lr"] * group["lr_scale"] / scales[-1])
    stem = {id(p) for name, p in model.named_parameters() if name.startswith("conv_stem")}
    head = {id(p) for p in model.get_classifier().parameters()}
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    assert max(scale_of[i] for i in stem) < min(scale_of[i] for i in head)


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_no_weight_decay_on_norms_and_biases(layer_decay) -> None:
    model = tiny_model()
    optimizer = build_optimizer(model, apply_strategy(model, "full"), {**ADAMW, "layer_decay": layer_decay})
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert set(decay) == {id(p) for p in names.values()}  # every parameter is in the optimizer
    for name, parameter in names.items():
        one_d = parameter.ndim <= 1 or name.endswith(".bias")
        assert decay[id(parameter)] == (0.0 if one_d else 0.05), name
    off = build_optimizer(model, apply_strategy(model, "full"), {**ADAMW, "filter_bias_and_bn": False})
    assert {group["weight_decay"] for group in off.param_groups} == {0.05}


def test_lr_that_is_not_a_number_is_refused() -> None:
    model = tiny_model()
    with pytest.raises(UserError, match="optim.lr=auto"):
        build_optimizer(model, apply_strategy(model, "full"), {**ADAMW, "lr": "fast"})


# ---------------------------------------------------------------------------------------------
# 2. strategies and the BatchNorm policy


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_freeze_then_unfreeze_trains_the_head_then_everything_each_phase_with_its_lr() -> None:
    model = tiny_model()
    head = {"classifier.weight", "classifier.bias"}
    plan = apply_strategy(model, {"strategy": "freeze_then_unfreeze", "bn": "train", "head_epochs": 2,
                                  "head_lr": 1e-2, "head_warmup_epochs": 0}, epochs=5)
    assert trainable(model) == head
    assert not any(m.training for n, m in model.named_modules() if is_batchnorm(m))  # frozen body: eval mode
    optimizer = build_optimizer(model, plan, ADAMW)
    scheduler = PhaseScheduler(optimizer, plan, COSINE, 1e-3, batches_per_epoch=3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)  # head phase: its own lr, no warmup
    scheduler.step_update(num_updates=6)  # the first update of epoch 3: the full phase starts its warmup
    assert optimizer.param_groups[0]["lr"] == pytest.approx(COSINE["warmup_lr"])
    scheduler.step_update(num_updates=9)  # after its one warmup epoch: the cosine over the phase's 3 epochs
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi / 3)) / 2)
    plan.enter(model, 2)
    assert trainable(model) == set(dict(model.named_parameters())) and model.training


def test_gradual_unfreezes_one_timm_group_per_step_from_the_head_down() -> None:
    model = tiny_model()
    groups = parameter_groups(model)
    assert groups[-1] == ["classifier.bias", "classifier.weight"] and groups[0][0].startswith("conv_stem")
    plan = apply_strategy(model, {"strategy": "gradual", "bn": "train", "unfreeze_every": 2}, epochs=20)
    seen = []
    for epoch in range(0, 20, 2):
        plan.enter(model, epoch)
        seen.append(trainable(model))
        assert trainable(model) == set(plan.trainable(epoch + 1))  # steps every 2 epochs
    assert seen[0] == set(groups[-1])
    assert all(earlier < later for earlier, later in zip(seen, seen[1:len(groups)]))
    assert seen[len(groups) - 1] == set(dict(model.named_parameters()))


@pytest.mark.parametrize("policy", ["train", "freeze_stats", "frozen"])
def test_batchnorm_policy(policy: str) -> None:
    model = tiny_model()
    apply_strategy(model, {"strategy": "full", "bn": policy})
    norms = [m for m in model.modules() if is_batchnorm(m)]
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(4, 3, 32, 32))
    moved = [not torch.equal(m.running_mean, b) for m, b in zip(norms, before)]
    affine = [p.requires_grad for m in norms for p in m.parameters()]
    assert all(moved) if policy == "train" else not any(moved)
    assert all(affine) if policy != "frozen" else not any(affine)
    assert trainable(model) >= {name for name, p in model.named_parameters() if p.ndim == 4}  # convs train


def test_unknown_strategy_lists_the_choices() -> None:
    with pytest.raises(UserError, match="freeze_then_unfreeze"):
        Plan(tiny_model(), "freeze")


# ---------------------------------------------------------------------------------------------
# 3. mixup / cutmix, class balance, early stopping


def test_mixup_gets_the_class_count_and_smoothing_and_needs_even_batches() -> None:
    torch.manual_seed(0)
    mixer = Mixer(num_classes=3, label_smoothing=0.1, epochs=4, mixup_alpha=0.4, cutmix_alpha=1.0, off_epochs=1)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, targets = mixer(images.clone(), labels, epoch=0)
    assert targets.shape == (6, 3) and torch.allclose(targets.sum(1), torch.ones(6))
    assert targets.min() >= 0.1 / 3 - 1e-6
    odd, soft = mixer(images[:5].clone(), labels[:5], epoch=0)  # odd: not mixed, same kind of targets
    assert torch.equal(odd, images[:5]) and soft.shape == (5, 3)
    assert soft.max() == pytest.approx(1 - 0.1 + 0.1 / 3)
    last, _ = mixer(images.clone(), labels, epoch=3)  # the last off_epochs train on clean images
    assert torch.equal(last, images)


def test_mixup_with_an_odd_batch_size_is_refused(images: Path, run_cli: RunCli, tmp_path: Path) -> None:
    code, _, err = run_cli(["train", *TINY, f"data.root={images}", "mixup=mixup", "data.batch_size=7",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and "even" in err


def test_class_weights_are_scikit_learns_balanced() -> None:
    weights = class_weights([0] * 6 + [1] * 3 + [2] * 3, 4)  # class 3 absent: weight 1
    assert weights.tolist() == pytest.approx([12 / (3 * 6), 12 / (3 * 3), 12 / (3 * 3), 1.0])


def test_balanced_sampler_draws_classes_evenly_and_by_seed_and_epoch() -> None:
    from transfer.data.loaders import BalancedEpochSampler

    labels = [0] * 80 + [1] * 10 + [2] * 10
    sampler = BalancedEpochSampler(labels, seed=3)
    drawn = []
    for epoch in range(100):
        sampler.set_epoch(epoch)
        drawn += [labels[index] for _, index in sampler]
    counts = torch.bincount(torch.tensor(drawn)).float() / len(drawn)
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.03)
    sampler.set_epoch(1)
    first = list(sampler)
    assert first == list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first


def test_early_stopping_rule() -> None:
    monitor = Monitor("val/top1", "max", validated=True)
    assert not monitor.should_stop(None, {"epoch": 10, "best_epoch": 1})
    assert not monitor.should_stop(3, {"epoch": 7, "best_epoch": 5})
    assert monitor.should_stop(3, {"epoch": 8, "best_epoch": 5})
    unvalidated = Monitor("val/top1", "max", validated=False)  # nothing monitored (no val split): never
    assert not unvalidated.should_stop(3, {"epoch": 8, "best_epoch": 5})


def test_early_stopping_stops_a_plateau_and_keeps_the_best(images: Path, runs: Path) -> None:
    run = train(runs / "plateau", f"data.root={images}", "trainer.epochs=8", "trainer.early_stop_patience=2",
                "schedule=constant", "optim.lr=1e-12", "model.drop_rate=0", "finetune.bn=freeze_stats")
    assert [int(r["epoch"]) for r in rows(run)] == [1, 2, 3]  # val/top1 never moves: best is epoch 1
    assert final(run)["best_epoch"] == 1 and load_checkpoint(run / "best.pt")["epoch"] == 1
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


# ---------------------------------------------------------------------------------------------
# 4. EMA, gradient accumulation, exact resume with everything on


def test_ema_warmup_starts_at_the_model_and_lags_behind_it() -> None:
    from transfer.engine.ema import Ema

    model = tiny_model()
    ema = Ema(model, decay=0.998)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=1)  # warmup: the first update copies the weights
    assert same_weights(ema.state_dict(), model.state_dict(), atol=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=50)
    decay = 1 - (1 + 49) ** -0.75
    weight = next(iter(ema.state_dict().values()))
    expected = next(iter(model.state_dict().values())) - decay  # moved 1 - decay of the way
    assert torch.allclose(weight, expected, atol=1e-5)


@pytest.fixture(scope="module")
def ema_run(runs: Path, images: Path) -> Path:
    return train(runs / "ema", f"data.root={images}", "trainer.epochs=3", "ema.enabled=true", "ema.decay=0.9")


def test_ema_is_evaluated_every_epoch_and_competes_for_best(ema_run: Path) -> None:
    table = rows(ema_run)
    assert all("val_ema/top1" in row and "val/top1" in row for row in table)
    best = load_checkpoint(ema_run / "best.pt")
    row = table[best["epoch"] - 1]
    assert best["best_is_ema"] == (float(row["val_ema/top1"]) > float(row["val/top1"]))
    assert set(best["model_ema"]) == set(best["model"])
    chosen = max(float(row["val_ema/top1"]), float(row["val/top1"]))
    assert chosen == max(max(float(r["val_ema/top1"]), float(r["val/top1"])) for r in table)


def test_eval_of_best_uses_the_weights_training_chose(ema_run: Path, run_cli: RunCli, tmp_path: Path) -> None:
    code, _, err = run_cli(["eval", f"checkpoint={ema_run / 'best.pt'}", "split=test", f"out={tmp_path / 'e'}"])
    assert code == 0, err
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert evaluated["test/loss"] == pytest.approx(final(ema_run)["test/loss"], abs=1e-6)


def test_gradient_accumulation_matches_the_larger_batch(train_only: Path, runs: Path) -> None:
    common = [f"data.root={train_only}", "data.val_fraction=0", "data.test_fraction=0", "trainer.epochs=2",
              "finetune.bn=freeze_stats", "model.drop_rate=0"]  # BatchNorm statistics do not see the batch size
    big = train(runs / "batch16", *common, "data.batch_size=16")
    accumulated = train(runs / "batch8x2", *common, "data.batch_size=8", "trainer.accumulate_steps=2")
    small = train(runs / "batch8", *common, "data.batch_size=8")
    weights = {run: load_checkpoint(run / "last.pt")["model"] for run in (big, accumulated, small)}
    assert same_weights(weights[big], weights[accumulated], atol=1e-5)
    assert not same_weights(weights[big], weights[small], atol=1e-5)
    assert [float(r["lr"]) for r in rows(big)] == pytest.approx([float(r["lr"]) for r in rows(accumulated)])


EVERYTHING = ["finetune=freeze_then_unfreeze", "finetune.head_epochs=2", "mixup=mixup_cutmix", "ema.enabled=true",
              "optim.layer_decay=0.8", "trainer.accumulate_steps=2", "data.sampler=balanced",
              "trainer.class_weight=balanced", "model.drop_path_rate=0.1"]


def test_resume_is_exact_with_phases_ema_mixup_and_accumulation(images: Path, runs: Path) -> None:
    straight = train(runs / "straight", f"data.root={images}", "trainer.epochs=4", *EVERYTHING)
    resumed = train(runs / "resumed", f"data.root={images}", "trainer.epochs=2", *EVERYTHING)  # ends with phase 1
    assert main(["train", *TINY, f"data.root={images}", "trainer.epochs=4", *EVERYTHING,
                 f"trainer.resume={resumed / 'last.pt'}"]) == 0
    ignored = ("seconds", "lr")  # the 2-epoch run's own schedule ended at its epoch 2
    assert [{k: v for k, v in r.items() if k not in ignored} for r in rows(resumed)] == \
           [{k: v for k, v in r.items() if k not in ignored} for r in rows(straight)]
    assert [r["lr"] for r in rows(resumed)[2:]] == [r["lr"] for r in rows(straight)[2:]]
    ours, theirs = load_checkpoint(resumed / "last.pt"), load_checkpoint(straight / "last.pt")
    assert same_weights(ours["model"], theirs["model"]) and same_weights(ours["model_ema"], theirs["model_ema"])
    assert {k: v for k, v in final(resumed).items() if not k.endswith("_seconds")} == \
           {k: v for k, v in final(straight).items() if not k.endswith("_seconds")}


def test_compile_switch_compiles_the_model_in_place(images: Path, runs: Path) -> None:
    """A real torch.compile (Dynamo's graph capture with the eager backend: seconds, not the minutes inductor's
    code generation takes on CPU; tests/test_engine.py runs inductor for every task under -m slow). The
    checkpoint keeps the model's own keys, and the compiled run learns what the plain one learns. Dynamo's own
    counters show that it captured graphs of the model: the switch did more than print its line."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = train(runs / "compiled", f"data.root={images}", "trainer.epochs=1", "trainer.compile=eager")
    assert counters["stats"]["unique_graphs"] >= 1 and counters["frames"]["ok"] >= 1, dict(counters)
    plain = train(runs / "not-compiled", f"data.root={images}", "trainer.epochs=1")
    assert "_orig_mod" not in "".join(load_checkpoint(run / "best.pt")["model"])
    ours, theirs = rows(run)[0], rows(plain)[0]
    assert float(ours["train/loss"]) == pytest.approx(float(theirs["train/loss"]), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# 5. LR finder and optim.lr=auto


def test_lr_sweep_suggests_within_the_falling_part_and_restores_the_model(train_only: Path) -> None:
    from transfer.config import compose
    from transfer.engine.lr_find import sweep_lr
    from transfer.engine.setup import build_setup

    cfg = compose([*TINY, f"data.root={train_only}", "data.val_fraction=0", "data.test_fraction=0"])
    setup = build_setup(cfg)
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    rng = torch.get_rng_state()
    sweep = sweep_lr(setup.model, setup.plan, OmegaConf.to_container(cfg.optim), setup.loaders["train"], setup.task,
                     setup.runtime, num_iter=30, start_lr=1e-5, end_lr=10.0)
    assert same_weights(setup.model.state_dict(), before) and torch.equal(torch.get_rng_state(), rng)
    assert sweep.lrs == sorted(sweep.lrs) and sweep.lrs[0] == pytest.approx(1e-5)
    assert 1e-5 < sweep.suggestion < sweep.lrs[-1] and set(sweep.suggestions) == {"valley", "steepest", "minimum"}
    at = sweep.lrs.index(sweep.suggestion)  # steepest: where the loss falls, before its minimum
    assert 0 < at <= sweep.smoothed.index(min(sweep.smoothed))
    assert sweep.smoothed[min(at + 1, len(sweep.lrs) - 1)] < sweep.smoothed[at - 1]


def test_lr_find_command_writes_plot_and_suggestion(train_only: Path, run_cli: RunCli, tmp_path: Path) -> None:
    code, out, err = run_cli(["lr-find", *TINY, f"data.root={train_only}", "lr_find.num_iter=12",
                              f"out={tmp_path / 'sweep'}"])
    assert code == 0, err
    assert "suggested optim.lr=" in out
    assert (tmp_path / "sweep" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert 3 <= len(json.loads((tmp_path / "sweep" / "lr_find.json").read_text())["lrs"]) <= 12


def test_lr_auto_records_its_pick_and_equals_a_run_with_that_lr(train_only: Path, runs: Path) -> None:
    common = [f"data.root={train_only}", "data.val_fraction=0", "data.test_fraction=0", "trainer.epochs=1",
              "lr_find.num_iter=10"]
    auto = train(runs / "auto", *common, "optim.lr=auto")
    picked = json.loads((auto / "lr_find.json").read_text())["suggestion"]
    assert (auto / "lr_find.png").exists() and OmegaConf.load(auto / "config.yaml").optim.lr == "auto"
    explicit = train(runs / "explicit", *common, f"optim.lr={picked!r}")
    assert same_weights(load_checkpoint(auto / "last.pt")["model"], load_checkpoint(explicit / "last.pt")["model"])


# ---------------------------------------------------------------------------------------------
# 6. test-time augmentation


def test_tta_averages_probabilities_of_the_views() -> None:
    from transfer.models.tta import TestTimeAugmentation, five_crops

    model = tiny_model().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        flipped = TestTimeAugmentation(model, "flip")(images)
        expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
        assert torch.allclose(flipped.softmax(1), expected, atol=1e-6)
        crops = five_crops(images)
        assert len(crops) == 5 and all(c.shape == images.shape for c in crops)
        assert TestTimeAugmentation(model, "flip_crops")(images).shape == (2, 3)
    with pytest.raises(UserError, match="flip_crops"):
        TestTimeAugmentation(model, "rotate")


def test_tta_in_training_and_eval(ema_run: Path, run_cli: RunCli, tmp_path: Path) -> None:
    code, _, err = run_cli(["eval", f"checkpoint={ema_run / 'best.pt'}", "split=test", "tta=flip",
                            f"out={tmp_path / 'flip'}"])
    assert code == 0, err
    flip = json.loads((tmp_path / "flip" / "metrics.json").read_text())
    assert flip["test/loss"] != pytest.approx(final(ema_run)["test/loss"], abs=1e-7)  # other views, other numbers
    assert main(["train", "--config", str(ema_run / "config.yaml"), "trainer.tta=flip",
                 f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    run = tmp_path / "run"
    assert final(run)["test/loss"] == pytest.approx(flip["test/loss"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# 7. every switch is documented


NEW_KEYS = ["finetune", "finetune.bn", "finetune.head_epochs", "finetune.head_lr",
            "finetune.head_warmup_epochs", "finetune.unfreeze_every", "optim.layer_decay", "optim.filter_bias_and_bn",
            "mixup", "mixup.mixup_alpha", "mixup.cutmix_alpha", "mixup.prob", "mixup.switch_prob", "mixup.mode",
            "mixup.off_epochs", "ema.enabled", "ema.decay", "ema.use_warmup", "ema.warmup_power",
            "model.drop_path_rate", "trainer.class_weight", "data.sampler", "trainer.compile",
            "trainer.accumulate_steps", "trainer.channels_last", "trainer.early_stop_patience", "lr_find.start_lr",
            "lr_find.end_lr", "lr_find.num_iter", "lr_find.smooth", "lr_find.diverge", "lr_find.method",
            "trainer.tta", "optim.lr"]


@pytest.fixture(scope="module")
def train_help() -> str:
    return command_help("train", "")


@pytest.mark.parametrize("key", NEW_KEYS)
def test_every_switch_is_in_train_help_and_the_readme(key: str, train_help: str) -> None:
    text = train_help
    section, _, leaf = key.rpartition(".")
    if section:
        lines = [line for line in text.splitlines() if line.strip().startswith(f"{section}:") or f"{key}=" in line]
        assert any(f" {leaf}=" in line or f"{key}=" in line for line in lines), f"{key} missing from --help"
    else:
        assert f"  {key} " in text
    readme = (REPO / "README.md").read_text()
    cheat_sheet = readme.split("## Override cheat-sheet", 1)[1].split("\n## ", 1)[0]
    assert leaf in cheat_sheet, f"{key} missing from the README's cheat-sheet"
