"""Issue 6: bad data, interrupted runs, numerical faults, untrusted files, full disks and concurrent runs
lose nothing and end in one clear line, never a traceback.

Training runs are tiny (random-init test model, 32 px, 3 steps per epoch). Faults are made for real where
the machine allows it (signals sent to the process, SIGKILL, /dev/full, a crafted pickle, an flock held by
another process); a NaN loss comes from a scripted loss function.
"""

from __future__ import annotations

import csv
import errno
import multiprocessing
import os
import pickle
import queue
import random
import resource
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import CLASSES, RunCli, write_png
from transfer import files as files_module
from transfer.checkpoint import load_checkpoint, newest_checkpoint, remove_temporaries, save_checkpoint
from transfer.engine.rundir import lock_run_dir, make_run_dir
from transfer.data.images import read_rgb
from transfer.data.sources import build_splits
from transfer.errors import UserError

FAST = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=32",
        "trainer.device=cpu", "data.num_workers=0", "data.batch_size=8", "trainer.progress=off"]  # 3 steps/epoch
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared with other jobs: torch's second OpenMP thread then spins on a busy core and a
    step takes ~100x longer. One thread keeps these tests steady (it changes no result they check)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


def one_line_error(code: int, err: str, *fragments: str, expected: int = 2) -> str:
    """The CLI contract for a user-caused fault: exit code, no traceback, the message on the last line."""
    assert "Traceback" not in err, err
    assert code == expected, (code, err)
    message = err.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------
# A loss function that misbehaves on cue


SIGNALS = {"sigint": [signal.SIGINT], "sigterm": [signal.SIGTERM], "sigint_twice": [signal.SIGINT, signal.SIGINT],
           "ctrl_c": [signal.SIGINT]}


class ScriptedLoss(torch.nn.CrossEntropyLoss):
    """Cross-entropy, except at the calls (1-based) named in `script`: 'nan' returns NaN, 'nan_grad' a finite
    loss whose gradient is NaN, and the SIGNALS keys send those signals to this process mid-step."""

    script: dict[int, str] = {}
    calls = 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        action = self.script.get(type(self).calls)
        loss = super().forward(logits, labels)
        if action == "nan":
            return loss * float("nan")
        if action == "nan_grad":  # sqrt'(0) = inf, times the zero inner derivative = NaN
            return loss + (logits.sum() * 0).sqrt()
        if action == "ctrl_c":  # a terminal's Ctrl-C reaches the DataLoader workers too
            for worker in multiprocessing.active_children():
                os.kill(worker.pid, signal.SIGINT)
        for signum in SIGNALS.get(action, []):
            os.kill(os.getpid(), signum)
        return loss


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", ScriptedLoss)

    def use(script: dict[int, str]) -> None:
        ScriptedLoss.script, ScriptedLoss.calls = dict(script), 0

    use({})
    return use


@pytest.fixture
def data(tiny_image_folder: Path) -> str:
    return f"data.root={tiny_image_folder}"


# ------------------------------------------------------------------------------------------------
# 1. Bad images


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming any size, in ~60 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def cut_in_half(path: Path) -> Path:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


def bad_corpus(root: Path) -> dict[str, str]:
    """Split folders full of trouble. Returns {file name: word its skip reason must contain} for every
    file that must be skipped; every other file must train."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for split, per_class in (("train", 4), ("val", 2), ("test", 2)):
        for index, name in enumerate(CLASSES):
            if split == "val" and name == "stripes":
                (root / split / name).mkdir(parents=True)  # a class folder with no images (allowed outside train)
                continue
            for n in range(per_class):
                write_png(root / split / name / f"good{n}.png", index, seed=1000 * index + 10 * n + len(split))
    circle, square, stripes = (root / "train" / name for name in CLASSES)
    # bad files
    (circle / "zero.jpg").write_bytes(b"")
    Image.fromarray(noise).save(circle / "truncated.jpg", quality=90)
    cut_in_half(circle / "truncated.jpg")
    Image.fromarray(noise).save(square / "truncated.png")
    cut_in_half(square / "truncated.png")
    (square / "notes.jpg").write_text("a text file named .jpg\n")
    (stripes / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (circle / "loop_a.jpg").symlink_to(circle / "loop_b.jpg")
    (circle / "loop_b.jpg").symlink_to(circle / "loop_a.jpg")
    with open(os.fsencode(stripes) + b"/caf\xe9-broken.png", "wb"):
        pass  # a non-UTF-8 name on a bad file: the listing must still name it
    os.link(circle / "good0.png", root / "val" / "circle" / "again.png")  # the same file in two splits
    (root / "test" / "square" / "link.png").symlink_to(square / "good0.png")
    # odd but good files
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.new("RGB", (32, 16), (200, 30, 30)).save(circle / "rotated.jpg", exif=exif.tobytes())
    Image.new("RGB", (1, 1), (0, 0, 200)).save(square / "one_pixel.png")
    Image.fromarray(np.full((8, 8), 40_000, dtype=np.uint16)).save(stripes / "sixteen_bit.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(circle / "cmyk.jpg")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 200, 30, 60])
    palette.save(square / "palette.png", transparency=0)
    with open(os.fsencode(stripes) + b"/caf\xe9.png", "wb") as handle:
        Image.new("RGB", (8, 8), (10, 220, 10)).save(handle, format="PNG")
    return {"zero.jpg": "empty file", "truncated.jpg": "truncated", "truncated.png": "truncated",
            "notes.jpg": "not an image", "bomb.png": "decompression bomb", "loop_a.jpg": "symlink loop",
            "loop_b.jpg": "symlink loop", os.fsdecode(b"caf\xe9-broken.png"): "empty file",
            "again.png": "same file as", "link.png": "same file as"}


@pytest.mark.parametrize("cache", ["none", "ram"])
def test_bad_images_are_skipped_listed_with_reasons_and_counted_in_one_line(run_cli: RunCli, tmp_path: Path,
                                                                          cache: str) -> None:
    expected = bad_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    memory_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out, err = run_cli(["train", *FAST, f"data.root={tmp_path / 'corpus'}", f"data.cache={cache}",
                              "data.batch_size=13", "trainer.epochs=2", f"hydra.run.dir={run}"])  # 26 = 2 × 13: no
    # file left out by drop_last, so with cache=none every bad file is met in each epoch
    assert code == 0, err
    assert "Traceback" not in out + err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - memory_before < 1_000_000  # KiB: the bomb stayed shut
    listed = {Path(row["path"]).name: row["reason"] for row in rows(run / "skipped_images.csv")}
    assert set(listed) == set(expected)  # every bad file once (two epochs, three splits), no good one
    for name, word in expected.items():
        assert word in listed[name], (name, listed[name])
    warnings = [line for line in out.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: skipped {len(expected)} image(s) or annotation(s) (")
    assert str(run / "skipped_images.csv") in warnings[0]
    history = rows(run / "metrics.csv")
    assert [row["epoch"] for row in history] == ["1", "2"]  # bad files ended no epoch
    info = OmegaConf.load(run / "run_info.json")
    assert info.splits.train == 18 + (0 if cache == "ram" else 8)  # the cache drops bad files up front
    assert read_rgb(tmp_path / "corpus" / "train" / "circle" / "rotated.jpg").shape == (32, 16, 3)  # EXIF honoured


def test_bad_images_with_on_bad_image_error_stop_in_one_line(run_cli: RunCli, tmp_path: Path) -> None:
    bad_corpus(tmp_path / "corpus")
    code, _, err = run_cli(["train", *FAST, f"data.root={tmp_path / 'corpus'}", "data.on_bad_image=error",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    one_line_error(code, err, "data.on_bad_image=error")
    assert not (tmp_path / "run").exists()  # a failed fresh run leaves nothing behind


def test_bad_image_in_strict_mode_without_workers_is_one_line(run_cli: RunCli, tmp_path: Path, data: str,
                                                            tiny_image_folder: Path) -> None:
    (tiny_image_folder / "circle" / "zero.png").write_bytes(b"")
    code, _, err = run_cli(["train", *FAST, data, "data.cache=none", "data.on_bad_image=error",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    one_line_error(code, err, "zero.png", "empty file")


def test_bad_image_in_strict_mode_with_workers_is_one_line(run_cli: RunCli, tmp_path: Path, data: str,
                                                         tiny_image_folder: Path) -> None:
    (tiny_image_folder / "circle" / "zero.png").write_bytes(b"")
    args = [a for a in FAST if not a.startswith("data.num_workers")]
    code, _, err = run_cli(["train", *args, data, "data.num_workers=1", "data.cache=none", "data.on_bad_image=error",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    one_line_error(code, err, "zero.png", "empty file")


def write_csv(path: Path, lines: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(lines)
    return path


@pytest.fixture
def manifest_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    for index, name in enumerate(("cat", "dog")):
        for n in range(3):
            write_png(folder / "img" / f"{name}{n}.png", index, seed=10 * index + n)
    return folder


def test_messy_manifest_rows_are_skipped_with_reasons(manifest_folder: Path) -> None:
    lines = [["path", "label", "split"]]
    lines += [[f"img/{name}{n}.png", name, "train" if n < 2 else "test"] for name in ("cat", "dog") for n in range(3)]
    lines += [["img/ghost.png", "cat", "train"], ["", "dog", "train"], ["img/cat0.png", "", "train"], ["img/dog0.png"],
              ["img/cat0.png", "cat", "test"]]  # the last: a training image listed again for test
    data = build_splits(str(write_csv(manifest_folder / "list.csv", lines)), 0.0, 0.0, 0)
    assert data.counts() == {"train": 4, "test": 2}
    reasons = [reason for _, reason in data.skipped]
    assert len(reasons) == 5
    for word in ("missing", "empty path", "empty label", "same file as"):
        assert any(word in reason for reason in reasons), (word, reasons)


def test_manifest_label_unknown_to_train_and_bad_encoding_are_user_errors(manifest_folder: Path) -> None:
    lines = [["path", "label", "split"], ["img/cat0.png", "cat", "train"], ["img/dog0.png", "zebra", "val"]]
    with pytest.raises(UserError, match="no training images for class.*zebra"):
        build_splits(str(write_csv(manifest_folder / "list.csv", lines)), 0.0, 0.0, 0)
    latin1 = manifest_folder / "latin1.csv"
    latin1.write_bytes("path,label\nimg/cat0.png,ch\xe2t\n".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        build_splits(str(latin1), 0.0, 0.0, 0)


# Also part of the corpus, tested where the rest of their kind is:
#   class folder with no images in train     test_cli_errors.py::test_empty_class_folder_in_train
#   class in val missing from train          test_cli_errors.py::test_val_class_missing_from_train
#   CSV with wrong columns                   test_cli_errors.py::test_manifest_with_wrong_columns,
#                                            test_sources.py::test_manifest_with_wrong_columns_is_a_user_error
#   every image mode, pixel for pixel        test_images.py


# ------------------------------------------------------------------------------------------------
# 2. Interruption


def test_sigint_mid_epoch_saves_the_step_and_the_resume_is_exact(run_cli: RunCli, tmp_path: Path, data: str,
                                                               scripted) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli(["train", *FAST, data, "trainer.epochs=2", f"hydra.run.dir={straight}"])[0] == 0
    scripted({5: "sigint"})  # epoch 2, step 2 of 3
    code, _, err = run_cli(["train", *FAST, data, "trainer.epochs=2", f"hydra.run.dir={stopped}"])
    message = one_line_error(code, err, "interrupted in epoch 2/2 after step 2/3; last.pt written; resume with: "
                             "transfer train --config", expected=130)
    saved = load_checkpoint(stopped / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 2)
    assert load_checkpoint(stopped / "best.pt")["epoch"] == 1  # a mid-epoch state is never best
    scripted({})
    command = shlex.split(message.split("resume with: ", 1)[1])
    assert command[:2] == ["transfer", "train"]
    code, out, err = run_cli(command[1:])
    assert code == 0, err
    assert "resumed from" in out and "after epoch 1, step 2" in out
    ours, theirs = load_checkpoint(stopped / "last.pt"), load_checkpoint(straight / "last.pt")
    assert all(torch.equal(ours["model"][key], theirs["model"][key]) for key in theirs["model"])
    without_time = [{k: v for k, v in row.items() if k != "seconds"} for row in rows(straight / "metrics.csv")]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in rows(stopped / "metrics.csv")] == without_time


@pytest.mark.parametrize("again", ["same command", "run directory"])
def test_sigterm_in_the_last_step_finishes_the_epoch_and_resume_auto_continues(run_cli: RunCli, tmp_path: Path,
                                                                               data: str, scripted, again: str) -> None:
    run = tmp_path / "run"
    command = ["train", *FAST, data, "trainer.epochs=2", f"hydra.run.dir={run}", "trainer.resume=auto"]
    scripted({3: "sigterm"})  # the last step of epoch 1
    code, out, err = run_cli(command)  # resume=auto in an empty folder starts afresh
    assert "no checkpoint" in out
    one_line_error(code, err, "interrupted after epoch 1/2; last.pt written", expected=143)
    assert (load_checkpoint(run / "last.pt")["epoch"], load_checkpoint(run / "last.pt")["step"]) == (1, 0)
    scripted({})
    if again == "run directory":  # trainer.resume=RUN: the newest checkpoint there, and the run goes on there
        command = ["train", *FAST, data, "trainer.epochs=2", f"trainer.resume={run}"]
    code, out, err = run_cli(command)  # the same command picks the run up
    assert code == 0, err
    assert f"resumed from {run / 'last.pt'} after epoch 1" in out
    assert [row["epoch"] for row in rows(run / "metrics.csv")] == ["1", "2"]
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def test_ctrl_c_that_reaches_dataloader_workers_still_stops_cleanly(run_cli: RunCli, tmp_path: Path, data: str,
                                                                   scripted) -> None:
    run = tmp_path / "run"
    scripted({2: "ctrl_c"})
    args = [a for a in FAST if not a.startswith("data.num_workers")]
    code, _, err = run_cli(["train", *args, data, "data.num_workers=1", "data.cache=none", "trainer.epochs=2",
                            f"hydra.run.dir={run}"])
    one_line_error(code, err, "interrupted in epoch 1/2 after step 2/3; last.pt written", expected=130)
    assert load_checkpoint(run / "last.pt")["step"] == 2


def test_a_second_signal_stops_at_once_and_keeps_the_previous_checkpoint(run_cli: RunCli, tmp_path: Path,
                                                                        data: str, scripted) -> None:
    run = tmp_path / "run"
    scripted({5: "sigint_twice"})
    code, _, err = run_cli(["train", *FAST, data, "trainer.epochs=2", f"hydra.run.dir={run}"])
    one_line_error(code, err, "stopped at once by a second SIGINT", expected=130)
    saved = load_checkpoint(run / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 0)
    assert temporaries(run) == []


def test_newest_checkpoint_that_loads_wins_and_temporaries_never_count(tmp_path: Path, capsys) -> None:
    def fake(epoch: int, step: int = 0) -> dict:
        return {"model": {"w": torch.full((2,), float(epoch))}, "classes": ["a"], "epoch": epoch, "step": step}

    assert newest_checkpoint(tmp_path) is None
    save_checkpoint(fake(2), tmp_path / "best.pt")
    save_checkpoint(fake(3), tmp_path / "last.pt")
    save_checkpoint(fake(9), tmp_path / ".last.pt.abc123.tmp")  # what a kill during a save leaves
    path, state = newest_checkpoint(tmp_path)
    assert (path.name, state["epoch"]) == ("last.pt", 3)
    save_checkpoint(fake(2, step=1), tmp_path / "last.pt")  # interrupted one step into epoch 3
    assert newest_checkpoint(tmp_path)[0].name == "last.pt"
    cut_in_half(tmp_path / "last.pt")  # damaged behind transfer's back
    path, state = newest_checkpoint(tmp_path)
    assert (path.name, state["epoch"]) == ("best.pt", 2)
    assert "passing over" in capsys.readouterr().err
    assert [p.name for p in remove_temporaries(tmp_path)] == [".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_resume_auto_without_a_run_directory_is_a_user_error(run_cli: RunCli, data: str) -> None:
    code, _, err = run_cli(["train", *FAST, data, "trainer.resume=auto"])
    one_line_error(code, err, "trainer.resume=auto", "hydra.run.dir=")


# The SIGKILL test, fast: a realistic checkpoint (the test model, AdamW and scheduler state, RNG states, metadata)
# saved in a loop through the engine's own save_progress (last.pt, then best.pt as a hard link to it on every
# second epoch, the improved ones) by a process forked from a warm parent, killed at random moments, 24 times.
# The weights say which epoch saved them (the classifier's bias holds the epoch number), so a checkpoint can be
# compared with what that epoch really saved.

SAVER = r"""
import os, signal, sys, time
from pathlib import Path
import timm, torch
torch.set_num_threads(1)
from transfer.engine.state import save_progress
model = timm.create_model("test_efficientnet", num_classes=3)
optimizer = torch.optim.AdamW(model.parameters())
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
model(torch.randn(2, 3, 32, 32)).sum().backward()
optimizer.step()
meta = {"classes": ["a", "b", "c"], "config": {"seed": 0}, "preprocess": {"input_size": [3, 32, 32]}}


def save(epoch, folder):
    with torch.no_grad():
        model.classifier.bias.fill_(epoch)  # the epoch that saved these weights
    best = epoch - epoch % 2
    state = {"epoch": epoch, "step": 0, "history": [{"epoch": epoch, "train/loss": 1.0}], "best": float(best),
             "best_epoch": best or None, "train_seconds": float(epoch)}
    save_progress(model, optimizer, scheduler, None, state, meta, Path(folder), improved=epoch % 2 == 0)


started = time.perf_counter()
save(0, sys.argv[1])
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the killed children
print("ready", time.perf_counter() - started, flush=True)
for line in sys.stdin:
    folder, epoch = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        try:
            epoch = int(epoch)
            while True:  # what training does at each epoch end, as fast as it can
                epoch += 1
                save(epoch, folder)
        finally:
            os._exit(1)
    print(pid, flush=True)
"""


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.002)
    raise AssertionError(f"process {pid} outlived SIGKILL")


def assert_saved_by_its_epoch(state: dict, reference: dict) -> None:
    """Whole, and the very bytes its epoch saved: the reference's weights with the epoch in the bias."""
    for key, value in reference["model"].items():
        expected = torch.full_like(value, state["epoch"]) if key == "classifier.bias" else value
        assert torch.equal(state["model"][key], expected), (key, state["epoch"])
    assert state["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    assert state["scheduler"] == reference["scheduler"] and state["train_seconds"] == state["epoch"]


def test_kill_9_at_random_moments_never_corrupts_a_checkpoint(tmp_path: Path) -> None:
    reference_path, run = tmp_path / "reference", tmp_path / "run"
    run.mkdir()
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(reference_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        ready, seconds = saver.stdout.readline().split()
        assert ready == "ready"
        reference = load_checkpoint(reference_path / "last.pt")
        rng, done, kills_mid_write, linked = random.Random(6), 0, 0, 0
        for _ in range(24):
            remove_temporaries(run)  # what a resumed train() does first
            saver.stdin.write(f"{run}\t{done}\n")
            saver.stdin.flush()
            pid = int(saver.stdout.readline())
            time.sleep(rng.uniform(0.0, 3 * float(seconds)))  # within the first three saves, on any disk
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid)
            kills_mid_write += bool(temporaries(run))
            states = {path.name: load_checkpoint(path) for path in (run / "last.pt", run / "best.pt") if path.exists()}
            for state in states.values():
                assert_saved_by_its_epoch(state, reference)
            if "best.pt" in states:  # an improved epoch's checkpoint, never one that came after it
                best, last = states["best.pt"]["epoch"], states["last.pt"]["epoch"]
                assert best % 2 == 0 and states["best.pt"]["best_epoch"] == best and best <= last
                if best == last:
                    assert os.path.samefile(run / "best.pt", run / "last.pt")  # the hard link, not a copy
                    linked += 1
            found = newest_checkpoint(run)  # what trainer.resume=auto takes
            assert found is None or (found[0].name in ("last.pt", "best.pt") and found[1]["epoch"] >= done)
            done = found[1]["epoch"] if found else 0  # the next process resumes from there
        assert done > 0
        assert kills_mid_write >= 3, "too few kills landed inside a save to show anything"
        assert linked >= 1, "no kill left best.pt as the link to last.pt: the link path went untested"
        print(f"24 kills, {kills_mid_write} inside a checkpoint save, {linked} with best.pt linked; epoch {done}")
    finally:
        saver.kill()
        saver.wait()


# ------------------------------------------------------------------------------------------------
# 3. Numerical faults


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(run_cli: RunCli, tmp_path: Path, data: str,
                                                                    scripted) -> None:
    run = tmp_path / "run"
    scripted({5: "nan"})
    code, _, err = run_cli(["train", *FAST, data, "trainer.epochs=2", f"hydra.run.dir={run}"])
    one_line_error(code, err, "the loss became nan in epoch 2 at step 2/3",
                   f"The last good checkpoint is {run / 'last.pt'} (after epoch 1)", "trainer.max_bad_steps=N")
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_nan_losses_are_skipped_and_counted_up_to_max_bad_steps(run_cli: RunCli, tmp_path: Path, data: str,
                                                                scripted) -> None:
    run = tmp_path / "run"
    scripted({2: "nan", 5: "nan"})
    code, _, err = run_cli(["train", *FAST, data, "trainer.epochs=2", "trainer.max_bad_steps=2",
                            f"hydra.run.dir={run}"])
    assert code == 0, err
    assert [row["train/bad_steps"] for row in rows(run / "metrics.csv")] == ["1", "1"]
    assert load_checkpoint(run / "last.pt")["bad_steps"] == 2


def test_nan_weights_are_never_saved(run_cli: RunCli, tmp_path: Path, data: str, scripted) -> None:
    run = tmp_path / "run"
    scripted({4: "nan_grad"})  # epoch 2's first update poisons the weights; its later losses are NaN (skipped)
    code, _, err = run_cli(["train", *FAST, data, "trainer.epochs=2", "trainer.max_bad_steps=100",
                            f"hydra.run.dir={run}"])
    one_line_error(code, err, "the weights became NaN or Inf in epoch 2 and were not saved",
                   f"{run / 'last.pt'} (after epoch 1)")
    for name in ("last.pt", "best.pt"):
        saved = load_checkpoint(run / name)
        assert saved["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------
# 4. Untrusted files


class RunsCode:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(params=["torch_zip", "raw_pickle"])
def crafted(request, tmp_path: Path) -> tuple[Path, Path]:
    """(a .pt file whose loading would run a command, the file that command would create)."""
    marker, path = tmp_path / "code_ran", tmp_path / "evil.pt"
    payload = {"model": RunsCode(marker), "classes": ["a", "b"], "epoch": 1}
    if request.param == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    return path, marker


def test_crafted_pickle_is_refused_by_load_checkpoint(crafted: tuple[Path, Path]) -> None:
    path, marker = crafted
    with pytest.raises(UserError, match="was refused: .* could run code") as caught:
        load_checkpoint(path)
    assert "weights_only=True" in str(caught.value) and ".safetensors" in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "predict", "export", "train weights", "train resume"])
def test_crafted_pickle_is_refused_by_every_command(run_cli: RunCli, crafted: tuple[Path, Path], command: str,
                                                    data: str, tmp_path: Path, tiny_image_folder: Path) -> None:
    path, marker = crafted
    arguments = {
        "eval": ["eval", f"checkpoint={path}"],
        "predict": ["predict", f"checkpoint={path}", f"input={tiny_image_folder}"],
        "export": ["export", f"checkpoint={path}", "format=timm", f"out={tmp_path / 'exported'}"],
        "train weights": ["train", *FAST, data, "model.pretrained=true", f"model.weights={path}",
                          f"hydra.run.dir={tmp_path / 'run'}"],
        "train resume": ["train", *FAST, data, f"trainer.resume={path}", f"hydra.run.dir={tmp_path / 'run'}"],
    }[command]
    code, out, err = run_cli(arguments)
    one_line_error(code, err, str(path))
    assert "refus" in err  # "was refused" / "refusing"
    assert not marker.exists()


def test_manifest_paths_outside_its_folder_are_refused_unless_allowed(run_cli: RunCli, manifest_folder: Path,
                                                                      tmp_path: Path) -> None:
    secret = write_png(tmp_path / "private" / "secret.png", 0, seed=99)
    (manifest_folder / "img" / "sneaky.png").symlink_to(secret)
    lines = [["path", "label"]] + [[f"img/{name}{n}.png", name] for name in ("cat", "dog") for n in range(3)]
    for escape in ("../private/secret.png", str(secret), "img/sneaky.png"):
        manifest = write_csv(manifest_folder / "list.csv", lines + [[escape, "cat"]])
        with pytest.raises(UserError, match="outside the manifest's folder.*data.allow_outside_root=true"):
            build_splits(str(manifest), 0.0, 0.0, 0)
        allowed = build_splits(str(manifest), 0.0, 0.0, 0, allow_outside_root=True)
        assert str(secret) in {record.source for record in allowed.splits["train"]}
    code, _, err = run_cli(["train", *FAST, f"data.root={manifest}", f"hydra.run.dir={tmp_path / 'run'}"])
    one_line_error(code, err, "img/sneaky.png", "data.allow_outside_root=true")


# ------------------------------------------------------------------------------------------------
# 5. Disk


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, good_saves: int) -> None:
    """Checkpoint saves after the first `good_saves` write into /dev/full: every write fails with ENOSPC, for real
    (other files keep being written: the disk fills while a checkpoint is written)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real, calls = tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        handle, name = real(*args, **kwargs)
        if ".pt." in Path(name).name:
            calls.append(name)
        if ".pt." in Path(name).name and len(calls) > good_saves:
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, handle)
            os.close(full)
        return handle, name

    monkeypatch.setattr(files_module.tempfile, "mkstemp", mkstemp)


def test_full_disk_while_saving_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    state = {"model": {"w": torch.randn(1000)}, "classes": ["a"], "epoch": 1}
    save_checkpoint(state, tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    fill_disk_after(monkeypatch, good_saves=0)
    with pytest.raises(UserError, match="No space left on device. The previous last.pt is intact"):
        save_checkpoint({**state, "epoch": 2}, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_full_disk_during_training_is_one_line_and_keeps_epoch_one(run_cli: RunCli, tmp_path: Path, data: str,
                                                                   monkeypatch) -> None:
    run = tmp_path / "run"
    fill_disk_after(monkeypatch, good_saves=1)  # epoch 1 writes last.pt; best.pt is a hard link to it
    code, _, err = run_cli(["train", *FAST, data, "trainer.epochs=2", f"hydra.run.dir={run}"])
    one_line_error(code, err, f"cannot write checkpoint {run / 'last.pt'}: No space left on device",
                   "The previous last.pt is intact")
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert temporaries(run) == []


def test_unwritable_output_folder_is_one_line(run_cli: RunCli, tmp_path: Path, data: str) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    code, _, err = run_cli(["train", *FAST, data, f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"])
    one_line_error(code, err, "cannot create the run directory", "Not a directory")


def test_read_only_run_folder_mid_run_is_one_line(run_cli: RunCli, tmp_path: Path, data: str, monkeypatch) -> None:
    import transfer.engine.fit

    def read_only(run_dir, history):
        raise OSError(errno.EROFS, "Read-only file system", str(run_dir / "metrics.csv"))

    monkeypatch.setattr(transfer.engine.fit, "write_epochs", read_only)
    code, _, err = run_cli(["train", *FAST, data, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"])
    one_line_error(code, err, "metrics.csv: Read-only file system", "hydra.run.dir")


# ------------------------------------------------------------------------------------------------
# 6. Two runs, one folder

HOLDER = ("import pathlib, sys, time; from transfer.engine.rundir import lock_run_dir; "
          "lock = lock_run_dir(pathlib.Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")


def test_a_run_directory_in_use_is_refused_until_its_process_dies(run_cli: RunCli, tmp_path: Path,
                                                                  data: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in (["trainer.resume=auto"], []):
            code, _, err = run_cli(["train", *FAST, data, f"hydra.run.dir={run}", *extra])
            one_line_error(code, err, str(run), f"in use by another transfer run (pid {holder.pid})")
        assert [p.name for p in run.iterdir()] == [".lock"]
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    lock_run_dir(run).close()


def test_concurrent_fresh_runs_get_their_own_directories(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"trainer": {"resume": None}, "hydra": {"run": {"dir": str(tmp_path / "runs" / "same")}}})
    made, barrier = [], threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        made.append(make_run_dir(cfg.hydra.run.dir, False, None))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 8


# ------------------------------------------------------------------------------------------------
# The SIGKILL test on real training (slow): 20 kills of `transfer train`, each resumed with trainer.resume=auto.

SLOW_SAVES = ("import os, sys, time\n"
              "_fsync = os.fsync\n"
              "def fsync(fd):\n"
              "    time.sleep(0.15)  # a slow disk: more kills land inside a save\n"
              "    _fsync(fd)\n"
              "os.fsync = fsync\n"
              "from transfer.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")


def lines_of(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.slow
def test_training_killed_20_times_resumes_every_time_and_finishes(tmp_path: Path, tiny_image_folder: Path) -> None:
    run, epochs = tmp_path / "run", 40
    command = [sys.executable, "-c", SLOW_SAVES, "train", *FAST, f"data.root={tiny_image_folder}",
               f"trainer.epochs={epochs}", f"hydra.run.dir={run}", "trainer.resume=auto"]
    rng, done, kills_mid_write, log = random.Random(20), 0, 0, []
    for kill in range(20):
        process = subprocess.Popen(command, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        lines = lines_of(process)
        if kill % 5:  # most kills during training; every fifth during start-up
            log.append(lines.get(timeout=120))
        time.sleep(rng.uniform(0.0, 1.0))  # an epoch takes about a second here, saves included
        process.kill()
        process.wait()
        kills_mid_write += bool(temporaries(run))
        for name in ("last.pt", "best.pt"):
            if (run / name).exists():
                load_checkpoint(run / name)  # never corrupt
        found = newest_checkpoint(run) if run.exists() else None
        epoch = found[1]["epoch"] if found else 0
        assert epoch >= done, "a kill lost a checkpoint that had been written"
        done = epoch
    assert 0 < done < epochs, "the kills should fall inside training"
    print(f"20 kills, {kills_mid_write} inside a checkpoint save; {done}/{epochs} epochs kept before the last run")
    final = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "Traceback" not in final.stdout + final.stderr
    assert [int(row["epoch"]) for row in rows(run / "metrics.csv")] == list(range(1, epochs + 1))
    assert load_checkpoint(run / "last.pt")["epoch"] == epochs
    assert temporaries(run) == []
    assert kills_mid_write >= 3


@pytest.mark.slow
def test_a_real_sigint_to_a_training_process(tmp_path: Path, tiny_image_folder: Path) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "transfer", "train", *FAST, f"data.root={tiny_image_folder}",
                                "trainer.epochs=50", f"hydra.run.dir={run}"], cwd=tmp_path, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = lines_of(process)
    while not lines.get(timeout=120).startswith("epoch   1/"):
        pass
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    err = process.stderr.read()
    one_line_error(130, err, "interrupted", "last.pt written; resume with: transfer train --config", expected=130)
    assert load_checkpoint(run / "last.pt")["epoch"] >= 1


def test_best_checkpoint_is_a_link_that_later_saves_leave_alone(tmp_path: Path) -> None:
    """best.pt shares last.pt's bytes when they are the same epoch, and keeps them when last.pt moves on."""
    from transfer.checkpoint import copy_checkpoint, save_checkpoint

    first = {"epoch": 1, "model": {"w": torch.ones(3)}, "classes": ["a", "b"]}
    second = {**first, "epoch": 2, "model": {"w": torch.zeros(3)}}
    save_checkpoint(first, tmp_path / "last.pt")
    copy_checkpoint(tmp_path / "last.pt", tmp_path / "best.pt", first)
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")
    save_checkpoint(second, tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1 and load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["model"]["w"], torch.ones(3))
    assert temporaries(tmp_path) == []
