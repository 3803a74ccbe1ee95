"""RUN/report.html: written by every run, rebuilt by `transfer report RUN`, and checked the way a person sees it —
in headless Chromium (Debian's chromium + chromium-driver, driven by selenium): its sections are there, every
picture decodes, the console stays free of errors, and the screenshot is not blank."""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import final
from test_segmentation import write_scene_folder
from transfer.metrics.classification import top_losses

TINY = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "trainer.epochs=1"]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module; its console is read back after each page."""
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium and chromium-driver (apt-get install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1600"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def look(browser, page: Path) -> dict:
    """What a person would notice: the section ids, images that failed to decode, console errors, the picture."""
    browser.get_log("browser")  # drop what an earlier page said
    browser.get(page.resolve().as_uri())
    images = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    sections = browser.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id)")
    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))
    return {"sections": sections, "images": len(images), "broken": [i for i in images if not (i[0] and i[1] > 0)],
            "errors": errors, "shot": shot}


def assert_renders(seen: dict, sections: list[str]) -> None:
    assert set(sections) <= set(seen["sections"]), seen["sections"]
    assert seen["images"] and not seen["broken"], seen["broken"]
    assert not seen["errors"], seen["errors"]
    shot = seen["shot"]
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50  # text, tables, plots: not blank


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    from transfer.cli import main

    run_dir = tmp_path_factory.mktemp("report") / "digits"
    assert main(["train", *TINY, "task.top_losses=8", f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def test_digits_run_report_renders_in_chromium(digits_run: Path, browser) -> None:
    seen = look(browser, digits_run / "report.html")
    assert_renders(seen, ["summary", "metrics", "curves", "classes-val", "classes-test", "mistakes-val",
                          "mistakes-test", "config"])
    # curves, two confusion matrices, and a picture per listed mistake
    listed = sum(len(read_rows(digits_run / "reports" / f"{s}_top_losses.csv")) for s in ("val", "test"))
    assert seen["images"] == 3 + listed


def test_segmentation_run_report_shows_overlays(tmp_path: Path, run_cli, browser) -> None:
    scenes = write_scene_folder(tmp_path / "scenes", 8)
    run_dir = tmp_path / "seg"
    code, _, err = run_cli(["train", "task=segmentation", f"data.root={scenes}", "model.name=test_efficientnet",
                            "model.pretrained=false", "preprocess.input_size=32", "trainer.epochs=1",
                            "data.batch_size=4", "task.overlays=2", f"hydra.run.dir={run_dir}"])
    assert code == 0, err
    page = (run_dir / "report.html").read_text()
    assert "iou/disc" in page and f"{final(run_dir)['val/miou']:.4f}" in page
    seen = look(browser, run_dir / "report.html")
    assert_renders(seen, ["summary", "metrics", "curves", "overlays", "config"])
    assert seen["images"] == 1 + len(list((run_dir / "overlays").glob("*.png")))


def test_the_browser_check_catches_a_broken_page(tmp_path: Path, browser) -> None:
    """The checks above can fail: a page with an undecodable picture and a script error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><section id='summary'><h1>x</h1><img src='data:image/png;base64,AAAA'>"
                    "<script>missing_function()</script></section></body></html>")
    seen = look(browser, page)
    assert seen["broken"] and seen["errors"]
    with pytest.raises(AssertionError):
        assert_renders(seen, ["summary"])


def test_mistakes_are_the_wrong_images_with_the_highest_loss(digits_run: Path) -> None:
    rows = read_rows(digits_run / "reports" / "val_top_losses.csv")
    assert 0 < len(rows) <= 8
    assert all(row["true"] != row["predicted"] for row in rows)
    losses = [float(row["loss"]) for row in rows]
    assert losses == sorted(losses, reverse=True)
    picture = Image.open(digits_run / "reports" / rows[0]["picture"])
    assert picture.height >= 128 and picture.height % 48 == 0  # the 48 px input, enlarged by a whole factor
    html = (digits_run / "report.html").read_text()
    assert f"predicted {rows[0]['predicted']} ({float(rows[0]['confidence']):.2f})" in html


def test_top_losses_picks_confidently_wrong_samples() -> None:
    logits = torch.tensor([[4.0, 0.0], [0.0, 1.0], [0.0, 5.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    chosen = top_losses(logits, labels, 5)
    assert [item["position"] for item in chosen] == [2, 3, 1]  # right answers never listed; highest loss first
    expected = torch.tensor([0.0, 5.0]).softmax(0)[1].item()
    assert chosen[0]["predicted"] == 1 and chosen[0]["confidence"] == pytest.approx(expected)
    assert len(top_losses(logits, labels, 1)) == 1


def test_transfer_report_rebuilds_the_same_page(digits_run: Path, run_cli, tmp_path: Path) -> None:
    code, out, _ = run_cli(["report", str(digits_run), f"out={tmp_path / 'again.html'}"])
    assert code == 0 and "again.html" in out
    assert (tmp_path / "again.html").read_bytes() == (digits_run / "report.html").read_bytes()


def test_report_of_an_unfinished_run_says_so(digits_run: Path, run_cli, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(digits_run, partial, ignore=shutil.ignore_patterns("*.pt", "metrics.json", "report.html"))
    code, _, err = run_cli(["report", str(partial)])
    assert code == 0, err
    assert "not finished: 1 epoch(s) so far" in (partial / "report.html").read_text()


@pytest.mark.parametrize("arguments, words", [([], "give one run directory"), (["{tmp}"], "not a run directory"),
                                              (["{run}", "colour=red"], "unknown key 'colour'")])
def test_report_mistakes_are_one_line(arguments, words, digits_run: Path, run_cli, tmp_path: Path) -> None:
    filled = [item.format(tmp=tmp_path, run=digits_run) for item in arguments]
    code, _, err = run_cli(["report", *filled])
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
