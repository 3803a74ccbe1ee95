"""Rerun a saved run and vary it: `transfer train --config RUN/config.yaml [overrides]`, groups included."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import RunCli, final
from transfer.cli.train import COMPOSITION, compose_run
from transfer.config import compose, without_hydra

TINY = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=32",
        "trainer.epochs=1", "trainer.progress=off"]


@pytest.fixture(scope="module")
def original(images: Path, runs: Path) -> tuple[Path, list[str]]:
    from transfer.cli import main

    overrides = [f"data.root={images}", *TINY, "optim.lr=2e-3"]
    assert main(["train", *overrides, f"hydra.run.dir={runs / 'original'}"]) == 0
    return runs / "original", overrides


def as_dict(cfg) -> dict:
    return OmegaConf.to_container(without_hydra(cfg), resolve=True)


def test_a_run_records_what_it_was_composed_from(original) -> None:
    run, overrides = original
    record = OmegaConf.load(run / COMPOSITION)
    assert list(record.overrides) == overrides  # hydra.run.dir is where, not what: not recorded
    assert record.choices.model == "timm" and record.choices.augment == "light" and record.parent is None


def test_rerun_without_overrides_gives_identical_metrics(original, run_cli: RunCli, tmp_path: Path) -> None:
    run, _ = original
    code, _, err = run_cli(["train", "--config", str(run / "config.yaml"), f"hydra.run.dir={tmp_path / 'again'}"])
    assert code == 0, err
    assert {k: v for k, v in final(tmp_path / "again").items() if not k.endswith("_seconds")} == \
        {k: v for k, v in final(run).items() if not k.endswith("_seconds")}
    assert OmegaConf.load(tmp_path / "again" / COMPOSITION).parent == str(run.resolve())


@pytest.mark.parametrize("new", [["augment=strong"], ["optim=sgd"], ["finetune=linear_probe"],
                                 ["recipe=fashion_mnist_lite0"], ["optim.lr=5e-4"], ["model=lite0", "mixup=mixup"]])
def test_an_override_composes_as_the_original_overrides_plus_it(original, new: list[str]) -> None:
    run, overrides = original
    varied, record = compose_run(new, str(run / "config.yaml"))
    assert as_dict(varied) == as_dict(compose(overrides + new))
    assert record["overrides"] == overrides + new and record["parent"] == str(run.resolve())


def test_a_group_override_swaps_the_whole_group_and_the_varied_run_trains(original, run_cli: RunCli,
                                                                         tmp_path: Path) -> None:
    run, _ = original
    varied = tmp_path / "varied"
    code, _, err = run_cli(["train", "--config", str(run / "config.yaml"), "augment=strong", f"hydra.run.dir={varied}"])
    assert code == 0, err
    saved = OmegaConf.load(varied / "config.yaml")
    assert [step["_target_"] for step in saved.augment.train] == \
        [step["_target_"] for step in compose(["augment=strong"]).augment.train]
    assert saved.optim.lr == 2e-3  # the original's key override is kept
    assert OmegaConf.load(varied / COMPOSITION).parent == str(run.resolve())


def test_impossible_overrides_and_old_runs_are_one_line(original, run_cli: RunCli, tmp_path: Path) -> None:
    run, _ = original
    code, _, err = run_cli(["train", "--config", str(run / "config.yaml"), "augment=stronk"])
    assert code == 2 and "augment=strong" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text((run / "config.yaml").read_text())  # a run from before composition.yaml
    code, _, err = run_cli(["train", "--config", str(old / "config.yaml"), "optim=sgd"])
    assert code == 2 and COMPOSITION in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
