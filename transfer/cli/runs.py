"""`transfer runs [FOLDER] [sort=COLUMN] [desc=true] [format=table|csv]` and `transfer compare RUN_A RUN_B`.

`runs` lists every run below FOLDER (runs/ by default; multirun and sweep folders too), one line each: task,
model, command-line overrides, the monitored metric's best value and its test value (or why there is none:
stopped, running), epochs, training time and start date, oldest first. What every run shares is said once under
the table; format=csv gives every column in full, status and recipe included. `compare` prints the overrides and
config keys in which two runs differ, and every metric both finished with, B − A. Neither loads torch.
"""

from __future__ import annotations

import shutil

from transfer.engine.runs import (COLUMNS, compare_runs, comparison_text, find_runs, runs_csv, runs_table,
                                  sort_runs)
from transfer.errors import UserError

RUNS_KEYS = ("sort", "desc", "format")
DEFAULT_FOLDER = "runs"  # where `transfer train` puts runs/<date>_<time> unless hydra.run.dir says otherwise


def runs_command(arguments: list[str]) -> int:
    folders = [item for item in arguments if "=" not in item]
    options = dict(item.split("=", 1) for item in arguments if "=" in item)
    unknown = [key for key in options if key not in RUNS_KEYS]
    if unknown or len(folders) > 1:
        problem = f"unknown key '{unknown[0]}'" if unknown else f"one folder, not {len(folders)}"
        raise UserError(f"{problem}. Usage: transfer runs [FOLDER] [sort=COLUMN] [desc=true] [format=table|csv]; "
                        f"columns: {', '.join(COLUMNS)}.")
    output = options.get("format", "table")
    if output not in ("table", "csv"):
        raise UserError(f"format={output}: choose table or csv.")
    rows = sort_runs(find_runs(folders[0] if folders else DEFAULT_FOLDER), options.get("sort") or "date",
                     flag(options.get("desc", "false"), "desc"))
    if output == "csv":
        print(runs_csv(rows), end="")
    elif rows:
        print(runs_table(rows, terminal_width()))
    else:
        print(f"no runs in {folders[0] if folders else DEFAULT_FOLDER} (a run is a folder with config.yaml and "
              "run_info.json)")
    return 0


def compare_command(arguments: list[str]) -> int:
    if len(arguments) != 2 or any("=" in item for item in arguments):
        raise UserError("give two run directories: transfer compare RUN_A RUN_B (`transfer runs` lists them).")
    print(comparison_text(compare_runs(*arguments), terminal_width()))
    return 0


def flag(text: str, key: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no", ""):
        return False
    raise UserError(f"{key}={text}: give true or false.")


def terminal_width() -> int:
    """The terminal's width, 120 when printing to a file or pipe; never below 80."""
    return max(80, shutil.get_terminal_size((120, 24)).columns)
