"""RUN/report.html: one self-contained page of what a run learned, made from the run directory's files alone.

Because it reads only what the run wrote (config, run_info, metrics, curves, reports/, overlays/), `transfer
report RUN` rebuilds the same page later, for a finished run or one still going, without torch or the model.
Pictures are embedded as data URIs, so the file can be mailed or attached as it is; there is no script.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import json
from pathlib import Path

from omegaconf import OmegaConf

from transfer.files import write_text

REPORT = "report.html"
SPLITS = ("val", "test")
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#1d2330}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #d6dae3;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #d6dae3;padding:.25em .6em;text-align:left}
th{background:#f1f3f7}td.number{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%}.side{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
.side img{max-width:560px}.gallery{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0;border:1px solid #d6dae3;padding:.4em;background:#fafbfc}figcaption{font-size:12px;max-width:220px}
.wrong{color:#b3261e}.muted{color:#667085}pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:12px}
"""


def write_html_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the run in `run_dir` (to RUN/report.html unless `out` says where); returns its path."""
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / REPORT
    write_text(path, render(run_dir))
    return path


def render(run_dir: Path) -> str:
    """The page's HTML: each section only when the run has its files."""
    info = read_json(run_dir / "run_info.json")
    metrics = read_json(run_dir / "metrics.json")
    title = f"{info.get('task', 'run')} · {model_name(run_dir)} · {run_dir.name}"
    sections = [summary_section(run_dir, info, metrics), metrics_section(metrics), curves_section(run_dir)]
    for split in SPLITS:
        sections += [classes_section(run_dir, split), mistakes_section(run_dir, split)]
    sections += [overlays_section(run_dir), skipped_section(run_dir), config_section(run_dir, info)]
    body = "\n".join(section for section in sections if section)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n")


def summary_section(run_dir: Path, info: dict, metrics: dict) -> str:
    batches = info.get("batches", {})
    state = (f"finished: best epoch {metrics['best_epoch']} of {epochs_run(run_dir)}, "
             f"{metrics.get('train_seconds', 0):.0f} s of training" if metrics
             else f"not finished: {epochs_run(run_dir)} epoch(s) so far")
    rows = [("status", state), ("task", info.get("task")), ("model", model_name(run_dir)),
            ("weights", info.get("weights_source")), ("data", info.get("data")), ("splits", info.get("splits")),
            ("parameters", parameters(info)), ("batch", batches.get("effective_batch")),
            ("preprocessing", preprocessing(info.get("preprocess"))), ("started", written(run_dir))]
    return section("summary", "Run", key_value_table([(k, v) for k, v in rows if v not in (None, "", {})]))


def metrics_section(metrics: dict) -> str:
    """Final metrics of the best weights: one row per metric, one column per split."""
    names = list(dict.fromkeys(key.split("/", 1)[1] for key in metrics if key.split("/", 1)[0] in SPLITS))
    if not names:
        return ""
    splits = [split for split in SPLITS if any(f"{split}/{name}" in metrics for name in names)]
    rows = [[name, *(number(metrics.get(f"{split}/{name}")) for split in splits)] for name in names]
    return section("metrics", "Metrics of the best weights", table(["metric", *splits], rows))


def curves_section(run_dir: Path) -> str:
    history = read_csv(run_dir / "metrics.csv")
    parts = [picture(run_dir / "curves.png", "learning curves")]
    if history:
        columns = list(history[0])
        parts.append(details("every epoch", table(columns, [[number(row[c]) for c in columns] for row in history])))
    return section("curves", "Learning curves", "\n".join(part for part in parts if part)) if any(parts) else ""


def classes_section(run_dir: Path, split: str) -> str:
    rows = read_csv(run_dir / "reports" / f"{split}_per_class.csv")
    confusion = picture(run_dir / "reports" / f"{split}_confusion.png", f"{split} confusion matrix")
    if not rows and not confusion:
        return ""
    columns = list(rows[0]) if rows else []
    per_class = table(columns, [[number(row[c]) for c in columns] for row in rows]) if rows else ""
    return section(f"classes-{split}", f"Per class ({split})", f"<div class=\"side\">{per_class}{confusion}</div>")


def mistakes_section(run_dir: Path, split: str) -> str:
    """The split's most confidently wrong images (fastai's top losses), as the model saw them."""
    folder = run_dir / "reports"
    rows = read_csv(folder / f"{split}_top_losses.csv")
    if not rows:
        return ""
    figures = []
    for row in rows:
        caption = (f"<span class=\"wrong\">predicted {escape(row['predicted'])} "
                   f"({float(row['confidence']):.2f})</span><br>true {escape(row['true'])} · loss "
                   f"{float(row['loss']):.2f}{source_line(row['source'])}")
        figures.append(f"<figure>{picture(folder / row['picture'], row['source'])}"
                       f"<figcaption>{caption}</figcaption></figure>")
    intro = (f"<p>The {len(rows)} {split} images with the highest loss, most confidently wrong first, at the "
             "model's input size.</p>")
    return section(f"mistakes-{split}", f"Most confidently wrong ({split})",
                   intro + f"<div class=\"gallery\">{''.join(figures)}</div>")


def source_line(source: str) -> str:
    """The image's file name (in-memory datasets such as the embedded digits have none)."""
    return "" if source.startswith("<") else f"<br><span class=\"muted\">{escape(Path(source).name)}</span>"


def overlays_section(run_dir: Path) -> str:
    """Segmentation and detection: predictions beside the ground truth, as the run drew them."""
    files = sorted((run_dir / "overlays").glob("*.png"))
    if not files:
        return ""
    figures = "".join(f"<figure>{picture(path, path.stem)}<figcaption>{escape(path.stem)}</figcaption></figure>"
                      for path in files)
    return section("overlays", "Predictions and ground truth", f"<div class=\"gallery\">{figures}</div>")


def skipped_section(run_dir: Path) -> str:
    rows = read_csv(run_dir / "skipped_images.csv")
    if not rows:
        return ""
    shown = table(["path", "reason"], [[row["path"], row["reason"]] for row in rows[:50]])
    more = f"<p class=\"muted\">and {len(rows) - 50} more in skipped_images.csv</p>" if len(rows) > 50 else ""
    return section("skipped", f"Skipped files ({len(rows)})", shown + more)


def config_section(run_dir: Path, info: dict) -> str:
    parts = []
    composition = run_dir / "composition.yaml"
    if composition.is_file():
        parts.append(f"<h3>Composed from</h3><pre>{escape(composition.read_text())}</pre>")
    if (run_dir / "config.yaml").is_file():
        parts.append(details("resolved config.yaml", f"<pre>{escape((run_dir / 'config.yaml').read_text())}</pre>"))
    return section("config", "Configuration", "".join(parts)) if parts else ""


# ---- small pieces


def section(anchor: str, heading: str, content: str) -> str:
    return f"<section id=\"{anchor}\"><h2>{escape(heading)}</h2>\n{content}\n</section>"


def details(summary: str, content: str) -> str:
    return f"<details><summary>{escape(summary)}</summary>{content}</details>"


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(str(name))}</th>" for name in header)
    body = "".join("<tr>" + "".join(cell(value) for value in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_value_table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{escape(key)}</th><td>{escape(str(value))}</td></tr>" for key, value in rows)
    return f"<table><tbody>{body}</tbody></table>"


def cell(value: object) -> str:
    if isinstance(value, float):
        return f"<td class=\"number\">{value:.4f}</td>"
    if isinstance(value, int):
        return f"<td class=\"number\">{value:,}</td>"
    return f"<td>{escape(str(value))}</td>"


def number(text: object) -> object:
    """CSV text as the number it holds (so tables align and round it), else as it is."""
    if text is None or text == "":
        return ""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and "." not in str(text) else value


def picture(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img src=\"data:image/png;base64,{encoded}\" alt=\"{escape(alt)}\">"


def escape(text: str) -> str:
    return html.escape(text, quote=True)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def model_name(run_dir: Path) -> str:
    try:
        return str(OmegaConf.load(run_dir / "config.yaml").model.name)
    except (OSError, ValueError, AttributeError, KeyError):
        return "model"


def epochs_run(run_dir: Path) -> int:
    return len(read_csv(run_dir / "metrics.csv"))


def parameters(info: dict) -> str | None:
    if "parameters" not in info:
        return None
    return f"{info.get('trainable_parameters', 0):,} of {info['parameters']:,} trained"


def preprocessing(preprocess: dict | None) -> str | None:
    if not preprocess:
        return None
    return ", ".join(f"{key} {value}" for key, value in preprocess.items())


def written(run_dir: Path) -> str:
    """When the run started (its run_info.json is written once, before the first epoch)."""
    path = run_dir / "run_info.json"
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M") if path.is_file() else ""
