"""Start-up: `transfer --help` answers without torch, output cut short by its reader ends quietly, and a run
reports the time from the command to its first training step (what a user waits before anything trains)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transfer.cli import COMMANDS

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "albumentations", "sklearn", "cv2")


def python(code: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.mark.parametrize("arguments", [["--help"], *[[command, "--help"] for command in COMMANDS]])
def test_help_imports_no_heavy_library(arguments: list[str], tmp_path: Path) -> None:
    """torch and timm take seconds to import: help of any command must not wait for them (fresh interpreter)."""
    script = (f"import sys; from transfer.cli import main; code = main({arguments!r}); "
              f"print(code, sorted(set({HEAVY!r}) & set(sys.modules)), file=sys.stderr)")
    result = python(script, tmp_path)
    assert result.stderr.split("\n")[-2] == "0 []", result.stderr
    assert f"transfer {arguments[0] if len(arguments) > 1 else '<command>'}" in result.stdout


def test_help_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    """`transfer --help | head -1`: the reader is gone before the usage is written (read end closed first)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "transfer", "--help"], cwd=tmp_path, stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        os.close(write_end)
    assert result.stderr == "" and result.returncode == 141


def test_startup_counts_from_the_command_not_from_train(tiny_image_folder: Path, tmp_path: Path) -> None:
    """The command (main() reading sys.argv, as the `transfer` script and `python -m transfer` call it) that
    waits 1 s before it starts reports at least that second in its start-up: it is measured from the process's
    start (imports included), not from when training code began. (main(ARGV) called inside a longer-lived
    process counts from the call instead: a test session's age is no command's start-up.)"""
    run = tmp_path / "run"
    arguments = ["train", f"data.root={tiny_image_folder}", "model=timm", "model.name=test_efficientnet",
                 "model.pretrained=false", "trainer.epochs=1", "preprocess.input_size=32", "trainer.device=cpu",
                 "trainer.progress=off", f"hydra.run.dir={run}"]
    started = time.time()
    result = python("import sys, time; time.sleep(1.0); from transfer.cli import main; "
                    f"sys.argv = ['transfer', *{arguments!r}]; raise SystemExit(main())", tmp_path)
    wall = time.time() - started
    assert result.returncode == 0, result.stderr
    startup = json.loads((run / "metrics.json").read_text())["startup_seconds"]
    assert 1.0 <= startup < wall
    line = next(line for line in result.stdout.splitlines() if line.startswith("start-up "))
    assert f"start-up {startup:.1f}s from the command to the first training step" in line


def test_main_called_in_process_counts_from_the_call(tiny_image_folder: Path, tmp_path: Path, run_cli) -> None:
    """In a test session (or any script) that has run a while, main([...]) reports the start-up of its own
    call, not the age of the process around it."""
    run = tmp_path / "run"
    started = time.time()
    code, _, err = run_cli(["train", f"data.root={tiny_image_folder}", "model=timm", "model.name=test_efficientnet",
                            "model.pretrained=false", "trainer.epochs=1", "preprocess.input_size=32",
                            "trainer.device=cpu", "trainer.progress=off", f"hydra.run.dir={run}"])
    assert code == 0, err
    assert 0 < json.loads((run / "metrics.json").read_text())["startup_seconds"] < time.time() - started
