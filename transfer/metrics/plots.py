"""Plots drawn on matplotlib `Figure` objects, never through pyplot's global state: a notebook or program
that imports transfer keeps its own backend and figures."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from transfer.files import save_figure


def plot_curves(history: list[dict], monitor: str, path: Path) -> None:
    """Loss (train beside val) and the monitored metric per epoch."""
    figure = Figure(figsize=(10, 4))
    loss_axes, metric_axes = figure.subplots(1, 2)
    for axes, keys in ((loss_axes, ("train/loss", "val/loss")), (metric_axes, tuple(dict.fromkeys(
            (monitor, "train/" + monitor.split("/", 1)[-1]))))):
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
            if points:
                axes.plot(*zip(*points), marker="o", label=key)
        axes.set_xlabel("epoch")
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    figure.tight_layout()
    save_figure(figure, path)
