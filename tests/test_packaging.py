"""The wheel carries conf/ and recipes/ (as transfer/conf/recipe/) once, and finds them when installed.

Builds from a copy of the checkout with one extra probe recipe, so the recipe path is exercised even
while recipes/ is empty.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = "zz_packaging_probe"
PROBE_TEXT = "# @package _global_\ndefaults:\n  - override /optim: sgd\ntrainer:\n  epochs: 7\n"
SKIPPED = {".git", "__pycache__", "build", "dist", "runs", "outputs", ".pytest_cache", ".benchmarks"}


def not_source(folder: str, names: list[str]) -> set[str]:
    """What the copy leaves out: VCS data, build and run outputs, benchmark downloads."""
    skipped = {n for n in names if n in SKIPPED or n.endswith(".egg-info")}
    return skipped | ({"data", "out"} & set(names) if Path(folder) == REPO / "bench" else set())

# Printed as JSON by a fresh interpreter; `sys.argv[1]` is the recipe to compose.
REPORT = """
import json, sys
import transfer, transfer.config as c
cfg = c.compose([f"recipe={sys.argv[1]}"] if sys.argv[1] else [])
print(json.dumps({"package": transfer.__file__, "config_dir": str(c.config_dir()),
                  "recipes": c.group_options("recipe"), "epochs": cfg.trainer.epochs, "opt": cfg.optim.opt}))
"""


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def clean_env(pythonpath: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | ({"PYTHONPATH": str(pythonpath)} if pythonpath else {})


def report(cwd: Path, recipe: str, pythonpath: Path | None = None) -> dict:
    env = clean_env(pythonpath)
    return json.loads(run([sys.executable, "-c", REPORT, recipe], cwd, env).stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("hatchling")
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=not_source)  # keeps conf/recipe a symlink
    (source / "recipes").mkdir(exist_ok=True)
    (source / "recipes" / f"{PROBE}.yaml").write_text(PROBE_TEXT, encoding="utf-8")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
         str(source)], root)
    wheel = next((root / "dist").glob("transfer-*.whl"))
    site = root / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], root)
    return {"root": root, "source": source, "wheel": wheel, "site": site}


def test_wheel_holds_every_config_once(built: dict[str, Path]) -> None:
    names = zipfile.ZipFile(built["wheel"]).namelist()
    assert len(names) == len(set(names)), "duplicate entries in the wheel"
    source = built["source"]
    expected = {f"transfer/conf/{p.relative_to(source / 'conf').as_posix()}"
                for p in (source / "conf").rglob("*.yaml") if p.parent.name != "recipe"}
    expected |= {f"transfer/conf/recipe/{p.name}" for p in (source / "recipes").glob("*.yaml")}
    assert f"transfer/conf/recipe/{PROBE}.yaml" in expected
    configs = {name for name in names if name.startswith("transfer/conf/")}
    assert configs == expected
    assert not any(name.startswith(("conf/", "recipes/", "tests/", "bench/")) for name in names)


def test_installed_wheel_finds_its_configs_from_elsewhere(built: dict[str, Path]) -> None:
    cwd = built["root"] / "elsewhere"
    cwd.mkdir(exist_ok=True)
    site = built["site"]
    found = report(cwd, PROBE, pythonpath=site)
    assert Path(found["package"]).is_relative_to(site), "imported the checkout, not the installed wheel"
    assert Path(found["config_dir"]) == site / "transfer" / "conf"
    assert PROBE in found["recipes"]
    assert (found["epochs"], found["opt"]) == (7, "sgd")


def test_installed_wheel_cli_lists_the_recipes(built: dict[str, Path]) -> None:
    help_text = run([sys.executable, "-m", "transfer", "train", "--help"], built["root"],
                    clean_env(built["site"])).stdout
    assert PROBE in help_text


def test_editable_install_finds_the_checkout_configs(tmp_path: Path) -> None:
    recipes = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    found = report(tmp_path, recipes[0] if recipes else "")
    if not Path(found["package"]).is_relative_to(REPO):
        pytest.skip(f"transfer is not installed editable from {REPO}")
    assert Path(found["config_dir"]) == REPO / "conf"
    assert found["recipes"] == recipes
