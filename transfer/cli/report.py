"""`transfer report RUN [out=FILE]`: rebuild RUN/report.html from what the run wrote (no model, no torch).

For a run made before reports existed, one still training, or after its files changed (a `transfer eval` into
RUN/reports, a resumed run): the page shows whatever the run directory holds now.
"""

from __future__ import annotations

from pathlib import Path

from transfer.engine.report import write_html_report
from transfer.errors import UserError


def report_command(arguments: list[str]) -> int:
    folders = [item for item in arguments if "=" not in item]
    options = dict(item.split("=", 1) for item in arguments if "=" in item)
    unknown = sorted(set(options) - {"out"})
    if unknown or len(folders) != 1:
        problem = f"unknown key '{unknown[0]}'" if unknown else f"give one run directory (got {len(folders)})"
        raise UserError(f"{problem}. Usage: transfer report RUN [out=FILE.html].")
    run_dir = Path(folders[0]).expanduser()
    if not (run_dir / "run_info.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (no run_info.json): give the folder `transfer train` "
                        "wrote, e.g. transfer report runs/2026-01-01_12-00-00.")
    out = write_html_report(run_dir, options.get("out") or None)
    print(f"report: {out}")
    return 0
