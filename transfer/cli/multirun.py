"""`transfer train -m key=a,b other=x,y`: Hydra's multirun — every combination, one run after the other.

Hydra's own override grammar and cross product (its BasicSweeper) expand the command line; every job is
composed before the first one trains, so a typo in the fifth costs nothing. The jobs run in this process,
each in its own run directory SWEEP/N under one sweep directory (`hydra.sweep.dir`, by default
multirun/<date>_<time>), each with its composition.yaml. At the end SWEEP/summary.csv holds every job's
overrides, status and final metrics, and with several seeds SWEEP/summary_by_config.csv holds mean ± std
per configuration; both are printed. Rerunning the same command with the same `hydra.sweep.dir` skips
finished jobs and resumes a stopped one from its last.pt.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transfer.cli.train import compose_run, train_flags, train_in
from transfer.config import without_hydra
from transfer.engine.rundir import lock_run_dir
from transfer.errors import UserError
from transfer.files import write_csv, write_json

SWEEP_DIR = "hydra.sweep.dir"


def expand(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, in Hydra's order (the last swept key varies fastest)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException as error:
        raise UserError(f"{str(error).splitlines()[0]} (transfer train -m takes key=a,b,c lists, choice() and "
                        "range(); interval() needs a search: transfer sweep).") from None
    return [job for batch in batches for job in batch]


def swept_keys(overrides: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.get_key_element() for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]


def sweep_dir(overrides: list[str]) -> tuple[Path, list[str], bool]:
    """(the sweep directory, the overrides without it, whether the user chose it)."""
    chosen = [item.split("=", 1)[1] for item in overrides if item.startswith(f"{SWEEP_DIR}=")]
    rest = [item for item in overrides if not item.startswith(f"{SWEEP_DIR}=")]
    if chosen:
        return Path(chosen[-1]).expanduser(), rest, True
    return Path("multirun") / time.strftime("%Y-%m-%d_%H-%M-%S"), rest, False


def multirun_entry(arguments: list[str]) -> int:
    config_file, overrides, show_only, _ = train_flags(arguments)
    if show_only:
        raise UserError("-m runs several jobs; --cfg shows one config: drop one of them.")
    return multirun_command(overrides, config_file)


def multirun_command(overrides: list[str], config_file: str | None) -> int:
    folder, overrides, chosen = sweep_dir(overrides)
    if any(item.startswith("hydra.run.dir=") for item in overrides):
        raise UserError("transfer train -m puts each job in hydra.sweep.dir/N: set hydra.sweep.dir, not hydra.run.dir.")
    jobs = expand(overrides)
    keys = swept_keys(overrides)
    composed = [compose_run(job, config_file) for job in jobs]  # every mistake before the first job trains
    folder.mkdir(parents=True, exist_ok=chosen)
    lock = lock_run_dir(folder)
    try:
        write_json(folder / "multirun.json", {"overrides": overrides, "config_file": config_file, "swept": keys,
                                             "jobs": jobs}, sort_keys=False)
        print(f"multirun: {len(jobs)} jobs over {', '.join(keys) or 'no swept key'} in {folder}", flush=True)
        rows = []
        try:
            for number, (job, (cfg, record)) in enumerate(zip(jobs, composed)):
                rows.append(run_job(number, len(jobs), job, cfg, record, folder, keys))
        finally:
            report(folder, rows, keys, str(composed[0][0].trainer.monitor).split("/", 1)[-1])
    finally:
        if lock is not None:
            lock.close()
    return 0 if all(row["status"] != "failed" for row in rows) else 1


def run_job(number: int, total: int, job: list[str], cfg: DictConfig, record: dict, folder: Path,
            keys: list[str]) -> dict:
    """One job: skipped when it finished before, resumed when it stopped, else trained afresh."""
    run_dir = folder / str(number)
    values = dict(item.split("=", 1) for item in job if "=" in item and item.split("=", 1)[0].lstrip("+~") in keys)
    row = {"job": number, **{key: values.get(key, "") for key in keys}, "run_dir": str(run_dir)}
    if (run_dir / "metrics.json").is_file():
        print(f"multirun: job {number} ({' '.join(job)}) finished before: reusing {run_dir}", flush=True)
        return {**row, "status": "done", **json.loads((run_dir / "metrics.json").read_text())}
    resume = (run_dir / "last.pt").is_file()
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"multirun: job {number} of {total}: {' '.join(job) or '(defaults)'}{' (resuming)' if resume else ''}",
          flush=True)
    config = without_hydra(cfg)
    if resume:
        OmegaConf.update(config, "trainer.resume", str(run_dir / "last.pt"))
    try:
        metrics = train_in(config, run_dir, record)
    except UserError as error:
        print(f"multirun: job {number} failed: {error}", flush=True)
        return {**row, "status": "failed", "error": str(error)}
    return {**row, "status": "done", **metrics}


def headline(rows: list[dict]) -> list[str]:
    """The final metrics worth a column: split/metric (no per-class entries), then the training time."""
    keys = {key for row in rows for key in row if key.count("/") == 1 and key.split("/")[0] in ("val", "test")}
    return sorted(keys) + (["train_seconds"] if any("train_seconds" in row for row in rows) else [])


def report(folder: Path, rows: list[dict], keys: list[str], monitored: str) -> None:
    """summary.csv (+ summary_by_config.csv when seeds repeat a configuration), every final metric; printed
    with the monitored metric's columns (val/ and test/) and the training time."""
    if not rows:
        return
    metrics = headline(rows)
    columns = ["job", *keys, "status", *metrics, "run_dir"]
    write_csv(folder / "summary.csv", columns, [[format_value(row.get(c, "")) for c in columns] for row in rows])
    shown = [key for key in (f"val/{monitored}", f"test/{monitored}", "train_seconds") if key in metrics]
    brief = ["job", *keys, "status", *shown]
    table = [[format_value(row.get(column, "")) for column in brief] for row in rows]
    print(f"\nmultirun summary (every metric in {folder / 'summary.csv'}):\n{aligned(brief, table)}", flush=True)
    varied = [key for key in keys if key != "seed"]
    if "seed" in keys and len({row.get("seed") for row in rows}) > 1:
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            if row["status"] == "done":
                groups.setdefault(tuple(row.get(key, "") for key in varied), []).append(row)
        header = [*varied, "runs", *metrics]
        lines = [[*config, str(len(members)), *(mean_std([m[k] for m in members if k in m]) for k in metrics)]
                 for config, members in groups.items()]
        write_csv(folder / "summary_by_config.csv", header, lines)
        picked = [header.index(column) for column in [*varied, "runs", *shown]]
        short = [[line[i] for i in picked] for line in lines]
        print(f"\nmean ± std over seeds (every metric in {folder / 'summary_by_config.csv'}):\n"
              f"{aligned([header[i] for i in picked], short)}", flush=True)


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return format_value(values[0])
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def format_value(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def aligned(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header, *rows]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
