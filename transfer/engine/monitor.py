"""The metric that picks best.pt and drives early stopping, checked against what the task reports.

`trainer.monitor` must name one of the task's validation metrics (`val/NAME`); a misspelling is refused
before training with the valid names. Its direction is the task's declaration for that metric (a loss is
minimised), or `trainer.monitor_mode=max|min`. Only epochs that ran validation compete: with
`trainer.eval_every=N` the epochs in between neither improve nor count towards early stopping's patience
beyond the epochs that pass. A run without a validation split keeps its newest epoch as best.pt.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from transfer.config import require
from transfer.errors import UserError

MODES = ("auto", "max", "min")


@dataclass
class Monitor:
    name: str
    mode: str  # "max" or "min"
    validated: bool  # the run has a validation split: without one, every epoch is the newest best

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best

    def improved(self, row: dict, state: dict) -> bool:
        """Whether this epoch beats the best so far (and record it); an epoch without validation never does,
        unless the run has no validation split at all."""
        value = row.get(self.name)
        if not self.validated:
            better = True
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            better = False
        else:
            better = self.better(value, state["best"])
        if better:
            state["best"], state["best_epoch"] = value, row["epoch"]
        return better

    def should_stop(self, patience: int | None, state: dict) -> bool:
        """`patience` epochs after the best one without a better monitored metric (validated runs only)."""
        if not patience or not self.validated or state.get("best_epoch") is None:
            return False
        return state["epoch"] - state["best_epoch"] >= int(patience)


def build_monitor(name: str, mode: str, modes: dict[str, str], validated: bool) -> Monitor:
    """The monitor for `trainer.monitor` / `trainer.monitor_mode`, given the task's {metric: direction}."""
    require(str(mode), MODES, "trainer.monitor_mode")
    valid = [f"val/{metric}" for metric in modes]
    if name not in valid:
        hint = difflib.get_close_matches(str(name), valid, n=1)
        did_you_mean = f" Did you mean {hint[0]}?" if hint else ""
        raise UserError(f"trainer.monitor={name} is not a validation metric of this task.{did_you_mean} "
                        f"Choose one of: {', '.join(valid)}.")
    direction = modes[name.split("/", 1)[1]] if mode == "auto" else mode
    return Monitor(name, direction, validated)
