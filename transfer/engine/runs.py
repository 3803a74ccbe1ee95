"""Runs at a glance: run directories read back into rows (`transfer runs`), two runs' differences
(`transfer compare`), and the aligned text tables both print, with the end-of-training table.

A run directory is a folder holding config.yaml and run_info.json, wherever it lies below the folder listed
(multirun and sweep folders keep theirs in subfolders); one without metrics.json has not finished. Only the
small text files are read, never a checkpoint, and neither torch nor timm is imported: listing is instant.
The monitored metric is the run's trainer.monitor; its test twin is the same name on the test split, so a
new task needs no entry here.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import math
import os
import textwrap
from datetime import datetime
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from transfer.errors import UserError

RUN_FILES = ("config.yaml", "run_info.json")
COLUMNS = ("run", "status", "task", "model", "recipe", "overrides", "monitor", "best", "test", "epochs", "time",
           "date")
SHOWN = ("run", "task", "model", "overrides", "monitor", "best", "test", "epochs", "time", "date")  # status: in test
SAME_FOR_ALL = ("task", "model", "monitor")  # said once under the table when every run shares them
NUMERIC = ("best", "test", "epochs", "time")
IN_OTHER_COLUMNS = ("task", "model.name", "recipe")  # overrides a table row shows in its own columns


def is_run(folder: Path) -> bool:
    return all((folder / name).is_file() for name in RUN_FILES)


def find_runs(folder: str | Path) -> list[dict]:
    """Every run below `folder` (or `folder` itself), in the order of their paths; the row of each."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{folder}: no such folder. Give the folder your runs are in (hydra.run.dir's parent, "
                        "runs/ by default; a multirun or sweep folder works too).")
    if is_run(root):
        return [read_run(root, root.parent)]
    found = []
    for path, subfolders, _ in os.walk(root):
        subfolders.sort()
        if is_run(Path(path)):
            found.append(read_run(Path(path), root))
            subfolders.clear()  # a run's reports/ and overlays/ hold no runs
    return found


def read_run(run_dir: Path, root: Path) -> dict:
    """One run's row (COLUMNS), plus its path and whole metrics.json; unreadable files make an 'unreadable'
    row rather than end the listing."""
    row = dict.fromkeys(COLUMNS)
    row.update(run=run_dir.relative_to(root).as_posix(), path=str(run_dir), metrics={}, overrides=[])
    try:
        config = load_config(run_dir)
        info = json.loads((run_dir / "run_info.json").read_text())
        composition = load_composition(run_dir)
        history = epoch_rows(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else None
    except (OSError, ValueError, yaml.YAMLError) as error:
        return {**row, "status": f"unreadable ({type(error).__name__})"}
    trainer = config.get("trainer", {})
    monitor = str(trainer.get("monitor") or "")
    test_name = "test/" + monitor.split("/", 1)[-1]
    if metrics is not None:
        best, test = metrics.get(monitor), metrics.get(test_name)
        seconds = metrics.get("train_seconds")
    else:
        best, test = best_so_far(history, monitor, monitor_mode(monitor, trainer.get("monitor_mode"))), None
        seconds = sum(float(r.get("seconds") or 0) for r in history)
    row.update(status=status(run_dir, metrics is not None), task=info.get("task"),
               model=config.get("model", {}).get("name"), recipe=composition.get("choices", {}).get("recipe"),
               overrides=[str(item) for item in composition.get("overrides", [])], monitor=monitor, best=best,
               test=test, epochs=int(float(history[-1]["epoch"])) if history else 0, time=seconds,
               date=started(run_dir), metrics=metrics or {}, max_epochs=trainer.get("epochs"))
    return row


def load_config(run_dir: Path) -> dict:
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    if not isinstance(config, dict):
        raise ValueError(f"{run_dir / 'config.yaml'} is not a mapping")
    return config


def load_composition(run_dir: Path) -> dict:
    """RUN/composition.yaml (what the command line said); {} for runs made before it was recorded."""
    path = run_dir / "composition.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def epoch_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def monitor_mode(monitor: str, mode: str | None) -> str:
    """The monitor's direction as the run chose it: trainer.monitor_mode, else (auto) a loss is minimised."""
    if mode in ("min", "max"):
        return mode
    return "min" if monitor.endswith("loss") else "max"


def best_so_far(history: list[dict[str, str]], monitor: str, mode: str) -> float | None:
    """An unfinished run's best validated epoch (epochs between validations have no value)."""
    values = [float(row[monitor]) for row in history if row.get(monitor) not in (None, "")]
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def started(run_dir: Path) -> str:
    """When the run began: composition.yaml is written once at its start, config.yaml again on every resume."""
    times = [(run_dir / name).stat().st_mtime for name in ("composition.yaml", "config.yaml")
             if (run_dir / name).is_file()]
    return datetime.fromtimestamp(min(times)).isoformat(timespec="milliseconds")


def status(run_dir: Path, finished: bool) -> str:
    """done; running (a live process holds RUN/.lock); stopped (interrupted, killed or pruned: resumable
    from last.pt when it has one)."""
    if finished:
        return "done"
    return "running" if is_locked(run_dir / ".lock") else "stopped"


def is_locked(path: Path) -> bool:
    """Whether a process holds the run's flock, read from /proc/locks (Linux): probing with a lock of our
    own could make a run starting at that instant find its folder in use. Elsewhere: False."""
    try:
        stat = path.stat()
        with open("/proc/locks") as handle:
            held = handle.read()
    except OSError:
        return False
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino} "
    return any(device in line and "FLOCK" in line for line in held.splitlines())


def sort_runs(rows: list[dict], column: str, descending: bool = False) -> list[dict]:
    """Sorted by one column; rows without a value (an unfinished run's test metric) come last either way."""
    if column not in COLUMNS:
        raise UserError(f"sort={column}: not a column. Sort by one of: {', '.join(COLUMNS)}.")
    present = [row for row in rows if row[column] is not None]
    missing = [row for row in rows if row[column] is None]

    def key(row: dict):
        value = row[column]
        return " ".join(value) if isinstance(value, list) else value

    return sorted(present, key=key, reverse=descending) + missing


# --- two runs ------------------------------------------------------------------------------------------


def compare_runs(a: str | Path, b: str | Path) -> dict[str, dict]:
    """{overrides, config: {key: {a, b}} where they differ; metrics: {name: {a, b, difference (b − a)}} for
    every number both metrics.json hold}. None stands for a key one run does not have."""
    runs = [run_argument(path) for path in (a, b)]
    overrides = [override_values(load_composition(run)) for run in runs]
    configs = [flatten(load_config(run)) for run in runs]
    metrics = [json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
               for run in runs]
    numbers = [key for key in metrics[0] if key in metrics[1] and is_number(metrics[0][key])
               and is_number(metrics[1][key])]
    return {"a": str(runs[0]), "b": str(runs[1]),
            "overrides": differences(*overrides), "config": differences(*configs),
            "metrics": {key: {"a": metrics[0][key], "b": metrics[1][key],
                              "difference": metrics[1][key] - metrics[0][key]} for key in numbers},
            "finished": {"a": bool(metrics[0]), "b": bool(metrics[1])}}


def run_argument(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if folder.is_file() and folder.suffix == ".pt":  # RUN/best.pt stands for its run
        folder = folder.parent
    if not is_run(folder):
        raise UserError(f"{path} is not a run directory (one with config.yaml and run_info.json, as transfer train "
                        "writes). `transfer runs FOLDER` lists the runs in a folder.")
    return folder


def override_values(composition: dict) -> dict[str, str]:
    """{key: value} of the command-line overrides: `optim.lr=0.01` → optim.lr: 0.01, `~mixup` → mixup: ~."""
    values = {}
    for item in composition.get("overrides", []):
        key, separator, value = str(item).partition("=")
        values[key.lstrip("+~")] = value if separator else "~ (removed)"
    return values


def flatten(node, prefix: str = "") -> dict:
    """Dotted keys of a nested config: {'optim': {'lr': 0.01}} → {'optim.lr': 0.01}; lists stay values."""
    if not isinstance(node, dict) or (not node and prefix):
        return {prefix.rstrip("."): node}
    flat = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def differences(a: dict, b: dict) -> dict[str, dict]:
    keys = list(a) + [key for key in b if key not in a]
    return {key: {"a": a.get(key), "b": b.get(key)} for key in keys if a.get(key) != b.get(key) or
            (key in a) != (key in b)}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- text -----------------------------------------------------------------------------------------------


def runs_table(rows: list[dict], width: int = 120) -> str:
    """The rows as aligned columns that fit `width` characters. What every run shares (its task, model, monitor,
    overrides) is said once under the table, so the columns show what differs; a run's overrides come rarest
    first, and long overrides, run names and model names are then cut (…)."""
    shared = shared_overrides(rows) if len(rows) > 1 else []
    counts = collections.Counter(item for row in rows for item in set(shown_overrides(row)))
    rows = [{**row, "overrides": sorted(row["overrides"], key=counts.__getitem__)} for row in rows]  # rarest first
    same = [c for c in SAME_FOR_ALL if len(rows) > 1 and len({row[c] for row in rows}) == 1]
    columns = [column for column in SHOWN if column not in same]
    cells = [[cell(row, column, shared) for column in columns] for row in rows]
    widths = [max(len(text) for text in column) for column in zip(columns, *cells)]
    for column, least in (("overrides", 24), ("run", 12), ("model", 12)):  # shrink in this order, to these
        excess = sum(widths) + 2 * (len(widths) - 1) - width
        if excess > 0 and column in columns:
            index = columns.index(column)
            widths[index] = max(least, widths[index] - excess)
    keep_end = {"run"}  # a nested run's own name is at its end
    cells = [[clip(text, widths[i], columns[i] in keep_end) for i, text in enumerate(line)] for line in cells]
    table = aligned(columns, cells, [column in NUMERIC for column in columns])
    common = [f"{column} {rows[0][column]}" for column in same]
    if shared:
        common.append("overrides " + " ".join(map(short_override, shared)))
    if not common:
        return table
    return table + "\n" + textwrap.fill("every run: " + ", ".join(common), width, subsequent_indent="  ",
                                        break_long_words=False, break_on_hyphens=False)


def shown_overrides(row: dict) -> list[str]:
    return [item for item in row["overrides"] if item.split("=", 1)[0].lstrip("+~") not in IN_OTHER_COLUMNS]


def shared_overrides(rows: list[dict]) -> list[str]:
    common = set.intersection(*(set(shown_overrides(row)) for row in rows))
    return [item for item in shown_overrides(rows[0]) if item in common]


def cell(row: dict, column: str, shared: list[str] = ()) -> str:
    value = row[column]
    if column == "overrides":
        return " ".join(short_override(item) for item in shown_overrides(row) if item not in shared) or "-"
    if column == "test" and row["status"] != "done":
        return row["status"].split()[0]  # stopped, running, unreadable: why it has no test metric
    if value is None:
        return "-"
    if column == "monitor":
        return value.removeprefix("val/")
    if column == "epochs":
        return f"{value}/{row['max_epochs']}" if row.get("max_epochs") and value != row["max_epochs"] else str(value)
    if column == "time":
        return duration(value)
    if column == "date":
        return value.replace("T", " ")[5:16]  # month-day hour:minute; format=csv has it to the millisecond
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def short_override(item: str) -> str:
    """data.root=/long/path/to/images → data.root=…/images: a table row has no room for whole paths."""
    key, separator, value = item.partition("=")
    if separator and "/" in value.rstrip("/") and len(value) > 20:
        return f"{key}=…/{Path(value).name}"
    return item


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def clip(text: str, width: int, keep_end: bool = False) -> str:
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1:] if keep_end else text[:width - 1] + "…"


def aligned(header: list[str], rows: list[list[str]], right: list[bool] | None = None) -> str:
    """Columns two spaces apart; numbers (right[i]) right-aligned so their decimals line up."""
    right = right or [False] * len(header)
    widths = [max(len(text) for text in column) for column in zip(header, *rows)]
    lines = []
    for line in [header, *rows]:
        texts = [text.rjust(w) if r else text.ljust(w) for text, w, r in zip(line, widths, right)]
        lines.append("  ".join(texts).rstrip())
    return "\n".join(lines)


def runs_csv(rows: list[dict]) -> str:
    """Every column and the run's path, unformatted (overrides space-separated), for other tools."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*COLUMNS, "path"])
    for row in rows:
        writer.writerow([" ".join(row[c]) if c == "overrides" else ("" if row[c] is None else row[c])
                         for c in COLUMNS] + [row["path"]])
    return out.getvalue()


def comparison_text(comparison: dict, width: int = 120) -> str:
    """Overrides and config keys that differ (A, B), then every shared metric (A, B, B − A)."""
    half = max(16, (width - 40) // 2)
    parts = [f"A: {comparison['a']}\nB: {comparison['b']}"]
    for section in ("overrides", "config"):
        found = comparison[section]
        if not found:
            parts.append(f"{section}: the same")
            continue
        rows = [[key, *(clip(text, half, is_path(text)) for text in (value_text(v["a"]), value_text(v["b"])))]
                for key, v in found.items()]
        parts.append(aligned([section, "A", "B"], rows))
    unfinished = [name for name, done in comparison["finished"].items() if not done]
    if unfinished:
        parts.append(f"metrics: run {' and '.join(n.upper() for n in unfinished)} has not finished (no metrics.json)")
    elif comparison["metrics"]:
        rows = [[key, number(v["a"]), number(v["b"]), number(v["difference"], signed=True)]
                for key, v in comparison["metrics"].items()]
        parts.append(aligned(["metric", "A", "B", "B-A"], rows, [False, True, True, True]))
    return "\n\n".join(parts)


def value_text(value) -> str:
    if value is None:
        return "(absent)"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def is_path(text: str) -> bool:
    """A path is told apart by its end: cut it at the front."""
    return "/" in text and " " not in text


def number(value: float, signed: bool = False) -> str:
    if isinstance(value, int):
        return f"{value:+d}" if signed else str(value)
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def split_table(metrics: dict[str, float], names: list[str]) -> str:
    """The end of training: one row per metric name, one column per split (val, test) that has it."""
    splits = [split for split in ("val", "test") if any(f"{split}/{name}" in metrics for name in names)]
    rows = [[name, *(number(metrics[f"{s}/{name}"]) if f"{s}/{name}" in metrics else "-" for s in splits)]
            for name in names if any(f"{s}/{name}" in metrics for s in splits)]
    if not rows:  # no held-out split
        return ""
    return aligned(["metric", *splits], rows, [False, *[True] * len(splits)])
