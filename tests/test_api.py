"""The Python API and the promise that importing transfer changes nothing in the caller's process."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=32",
        "trainer.epochs=1", "trainer.progress=off"]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def test_importing_transfer_changes_nothing_in_the_process() -> None:
    """No environment variables, no torch import, no sleep (the old start-up sampled the CPU for 0.1 s)."""
    script = ("import os, sys, time; before = dict(os.environ); start = time.perf_counter(); import transfer; "
              "took = time.perf_counter() - start; print(dict(os.environ) == before, 'torch' in sys.modules, took < 0.09)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=clean_env(), timeout=120)
    assert result.stdout.split() == ["True", "False", "True"], result.stdout + result.stderr


def test_the_api_leaves_the_callers_matplotlib_backend_and_hydra_state_alone(tiny_image_folder: Path,
                                                                            tmp_path: Path) -> None:
    script = f"""
import matplotlib
matplotlib.use("svg")
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
import transfer
with initialize_config_dir(config_dir={str(REPO / 'conf')!r}, version_base="1.3"):
    run = transfer.train({[f"data.root={tiny_image_folder}", *TINY]!r}, run_dir={str(tmp_path / 'run')!r})
    print(matplotlib.get_backend(), GlobalHydra.instance().is_initialized(), (run.run_dir / "curves.png").exists())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=clean_env(), timeout=300)
    assert result.stdout.split()[-3:] == ["svg", "True", "True"], result.stdout[-2000:] + result.stderr[-2000:]


def test_the_cli_chooses_the_thread_wait_policy_before_torch_loads() -> None:
    """A short spin on free cores, passive waiting on busy ones, the user's choice always; never once torch has
    loaded (libgomp has read the setting by then)."""
    from transfer.cli.threads import SHORT_SPIN, wait_policy

    assert wait_policy({}, free=lambda: True) == {"GOMP_SPINCOUNT": SHORT_SPIN}
    assert wait_policy({}, free=lambda: False) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}, free=lambda: 1 / 0) == {}  # the user chose: no sampling
    script = ("import os, sys; from transfer.cli import main; main(['train', '--cfg']); "
              "print(os.environ.get('GOMP_SPINCOUNT') or os.environ.get('OMP_WAIT_POLICY'))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=clean_env(), timeout=120)
    assert result.stdout.split()[-1] in (SHORT_SPIN, "PASSIVE"), result.stdout + result.stderr
    chosen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**clean_env(), "OMP_WAIT_POLICY": "ACTIVE"})
    assert chosen.stdout.split()[-1] == "ACTIVE"


def test_train_load_predict_export_from_python(tiny_image_folder: Path, tmp_path: Path, run_cli) -> None:
    import transfer

    run = transfer.train([f"data.root={tiny_image_folder}", *TINY], run_dir=tmp_path / "run")
    assert run.metrics["test/top1"] == pytest.approx(
        __import__("json").loads((run.run_dir / "metrics.json").read_text())["test/top1"])
    model = transfer.load(run.run_dir)
    assert model.classes == ["circle", "square", "stripes"] and model.preprocess["input_size"] == [3, 32, 32]
    files = sorted(str(p) for p in tiny_image_folder.rglob("*.png"))[:3]
    array = np.asarray(Image.open(files[0]).convert("RGB"))
    predictions = model.predict([*files, array])
    assert all(abs(sum(p.values()) - 1) < 1e-6 and list(p.values()) == sorted(p.values(), reverse=True)
               for p in predictions)
    assert predictions[0] == pytest.approx(predictions[3])  # a file and its pixels: the same answer
    code, _, err = run_cli(["predict", f"checkpoint={run.best}", f"input={files[0]}", "top_k=3",
                            f"out={tmp_path / 'p.csv'}"])
    assert code == 0, err
    with open(tmp_path / "p.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert {row[f"label_{i}"]: float(row[f"prob_{i}"]) for i in (1, 2, 3)} == pytest.approx(predictions[0], abs=1e-6)
    folder = transfer.export(run.best, "timm", tmp_path / "timm")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    """The README's Python API block, run as written (digits, offline weights package), from a fresh folder."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                            env=clean_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "runs" / "api-demo" / "best.pt").is_file()
    assert (tmp_path / "exports" / "digits-timm" / "model.safetensors").is_file()
