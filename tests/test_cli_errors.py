"""User mistakes end with exit code 2, one line on stderr that names the fix, no traceback, no files.

Settings are tiny (test model, random init, 32 px, one epoch), so mistakes that surface late in
`transfer train` still fail within seconds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLASSES, RunCli, write_png
from transfer.config import config_dir, group_options, groups

FAST = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "trainer.epochs=1",
        "preprocess.input_size=32", "trainer.device=cpu"]


def files_under(folder: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def assert_clean_error(run_cli: RunCli, args: list[str], *fragments: str) -> str:
    """Run the CLI from tmp_path (run_cli's cwd) and check the error contract; returns the message."""
    workspace = Path.cwd()
    before = files_under(workspace)
    code, out, err = run_cli(args)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    message = lines[0]
    assert message.startswith(f"transfer {args[0]}: error: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    after = files_under(workspace)
    assert sorted(set(after) - set(before)) == [], "a failed command must not write files"
    assert after == before
    return message


@pytest.fixture
def data_args(tiny_image_folder: Path) -> list[str]:
    return ["train", *FAST, f"data.root={tiny_image_folder}"]


# --- mistakes in the command line and the config -------------------------------------------------

def test_misspelled_key_suggests_the_right_one(run_cli: RunCli, data_args: list[str]) -> None:
    assert_clean_error(run_cli, [*data_args, "trainer.epochz=3"], "trainer.epochz", "trainer.epochs")


def test_config_mistakes_are_reported_before_torch_is_imported(tmp_path: Path) -> None:
    """Importing torch and timm takes seconds; a typo should not wait for it (fresh interpreter)."""
    script = ("import sys; from transfer.cli import main; code = main(['train', 'trainer.epochz=3']); "
              "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr


def test_misspelled_group_option_lists_the_options(run_cli: RunCli) -> None:
    message = assert_clean_error(run_cli, ["train", "model=lit0"], "lit0", "model=lite0")
    for option in group_options("model"):
        assert option in message


def test_unknown_recipe_names_the_recipes(run_cli: RunCli) -> None:
    message = assert_clean_error(run_cli, ["train", "recipe=no_such_recipe"], "recipe", "no_such_recipe")
    for recipe in group_options("recipe"):
        assert recipe in message
    if not group_options("recipe"):
        assert "recipe" in message.split("no_such_recipe", 1)[1], "say where recipes go when there are none"


def test_unknown_command_suggests_one(run_cli: RunCli) -> None:
    assert_clean_error(run_cli, ["trian", "trainer.epochs=1"], "'trian'", "train", "eval", "predict")


@pytest.mark.parametrize("override, choices", [
    ("data.cache=tape", "none, ram, disk"),
    ("finetune.strategy=foo", "full, linear_probe"),
    ("trainer.amp=fp8", "auto, bf16, fp16, off"),
])
def test_bad_choice_lists_the_choices(run_cli: RunCli, data_args: list[str], override: str, choices: str) -> None:
    assert_clean_error(run_cli, [*data_args, override], override, choices)


# --- mistakes in the data ---------------------------------------------------------------------------

def test_missing_data_folder(run_cli: RunCli) -> None:
    assert_clean_error(run_cli, ["train", *FAST, "data.root=/nonexistent"], "data.root=/nonexistent",
                       "does not exist")


def test_folder_without_class_folders(run_cli: RunCli, tmp_path: Path) -> None:
    root = tmp_path / "flat"
    write_png(root / "lonely.png", 0, seed=0)
    assert_clean_error(run_cli, ["train", *FAST, f"data.root={root}"], str(root), "no class folders",
                       "<class name>")


def _split_folders(root: Path, train: tuple[str, ...], val: tuple[str, ...]) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for index, name in enumerate(classes):
            for n in range(4):
                write_png(root / split / name / f"{n}.png", index, seed=n)
    return root


def test_empty_class_folder_in_train(run_cli: RunCli, tmp_path: Path) -> None:
    root = _split_folders(tmp_path / "split", CLASSES[:2], CLASSES[:2])
    (root / "train" / "empty_class").mkdir()
    assert_clean_error(run_cli, ["train", *FAST, f"data.root={root}"], "empty_class", "no images",
                       "remove the folder")


def test_val_class_missing_from_train(run_cli: RunCli, tmp_path: Path) -> None:
    root = _split_folders(tmp_path / "split", CLASSES[:2], (*CLASSES[:2], "zebra"))
    assert_clean_error(run_cli, ["train", *FAST, f"data.root={root}"], "zebra", "train/")


def test_manifest_with_wrong_columns(run_cli: RunCli, tmp_path: Path) -> None:
    write_png(tmp_path / "csv" / "a.png", 0, seed=0)
    manifest = tmp_path / "csv" / "labels.csv"
    manifest.write_text("file,class\na.png,circle\n", encoding="utf-8")
    assert_clean_error(run_cli, ["train", *FAST, f"data.root={manifest}"], "path,label", "file")


# --- mistakes about the model and its weights -----------------------------------------------------

def test_unknown_timm_model_lists_close_names(run_cli: RunCli, data_args: list[str]) -> None:
    assert_clean_error(run_cli, [*data_args, "model.name=resnet5000"], "resnet5000", "resnet50,")


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_hub_weights_without_network_fail_fast(run_cli: RunCli, data_args: list[str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub endpoint on this machine where nothing listens, and an empty cache, stand in for a machine without
    network (no traffic leaves the machine)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored after the test
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    started = time.perf_counter()
    assert_clean_error(run_cli, [*data_args, "model.name=test_resnet", "model.pretrained=true", "model.weights=hub"],
                       "test_resnet", "model.weights=PATH", "pip install", "model.pretrained=false")
    assert time.perf_counter() - started < 20


def test_missing_weights_file(run_cli: RunCli, data_args: list[str]) -> None:
    assert_clean_error(run_cli, [*data_args, "model.pretrained=true", "model.weights=/nope.safetensors"],
                       "/nope.safetensors", "no such file")


# --- the run directory ------------------------------------------------------------------------------

def test_refuses_a_run_dir_that_holds_a_run(run_cli: RunCli, data_args: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "old_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 1\n", encoding="utf-8")
    (run_dir / "last.pt").write_bytes(b"not really a checkpoint")
    before = files_under(run_dir)
    assert_clean_error(run_cli, [*data_args, f"hydra.run.dir={run_dir}"], str(run_dir), "already holds a run",
                       "hydra.run.dir", "trainer.resume=")
    assert files_under(run_dir) == before


# --- help -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_help_lists_the_commands(run_cli: RunCli, args: list[str]) -> None:
    code, out, err = run_cli(args)
    assert code == 0 and err == ""
    for command in ("train", "eval", "predict", "augment-preview"):
        assert f"\n  {command} " in out


def test_train_help_lists_groups_options_and_recipes(run_cli: RunCli) -> None:
    code, out, err = run_cli(["train", "--help"])
    assert code == 0 and err == ""
    assert set(groups()) == {p.name for p in config_dir().iterdir() if p.is_dir()}
    for group in groups():
        line = next((line for line in out.splitlines() if line.split()[:1] == [group]), None)
        assert line is not None, f"group {group} missing from help"
        for option in group_options(group):
            assert option in line
    assert "trainer.epochs" in out or "epochs=" in out


HUB_PROBE = ("import sys; from transfer.models.backbone import hub_reachable; "
             "print(hub_reachable(timeout=3.0))")


@pytest.mark.parametrize("proxy, bypass, expected", [(None, None, "True"), ("bad", None, "False"),
                                                     ("bad", "127.0.0.1", "True")])
def test_the_hub_probe_asks_like_huggingface_hub(proxy, bypass, expected, tmp_path: Path) -> None:
    """The endpoint's own port (HF_ENDPOINT), the user's proxy (HTTP_PROXY) and its exceptions (NO_PROXY): a
    local server stands in for the hub, a closed local port for a dead proxy; no traffic leaves the machine."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
    if proxy:
        env["HTTP_PROXY"] = f"http://127.0.0.1:{closed_port()}"
    if bypass:
        env["NO_PROXY"] = bypass
    try:
        result = subprocess.run([sys.executable, "-c", HUB_PROBE], capture_output=True, text=True, env=env,
                                cwd=tmp_path, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert result.stdout.strip() == expected, result.stderr[-2000:]
