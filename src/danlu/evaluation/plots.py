"""PNG plots of a run, drawn on matplotlib Figures of their own (its object API, rendered by Agg), not
through pyplot: no display is needed, and a process that uses danlu's Python API keeps its matplotlib as
it was (the backend it chose, which `matplotlib.use("Agg")` at import replaced, and its figures)."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from danlu import __version__
from danlu.run import PLOT_SOFTWARE, atomic_write


def pyplot() -> Any:
    """matplotlib.pyplot, for plots only it draws (Optuna's): with the Agg backend where nothing in this
    process chose one (no pyplot imported yet, no MPLBACKEND), else as the process has it."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def _save(figure: Figure, path: Path) -> None:
    """The figure as PNG, tagged as danlu's (the tag is how `--overwrite` knows the plot is its own)."""
    buffer = io.BytesIO()
    metadata = {"Software": f"{PLOT_SOFTWARE} {__version__}"}
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata=metadata)
    if "matplotlib.pyplot" in sys.modules:  # a figure pyplot made (Optuna's) is released by pyplot
        sys.modules["matplotlib.pyplot"].close(figure)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def learning_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss per epoch (train and validation) and, where logged, the validation metrics."""
    metric_keys = [k for k in ("val_accuracy", "val_f1_macro", "val_r2") if any(k in h for h in history)]
    figure = Figure(figsize=(11 if metric_keys else 6, 4))
    axes = figure.subplots(1, 2 if metric_keys else 1)
    axes = np.atleast_1d(axes)
    for key in ("train_loss", "val_loss"):
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            axes[0].plot(*zip(*points, strict=True), label=key, marker="." if key == "val_loss" else None)
    axes[0].set(xlabel="epoch", ylabel="loss", title="Loss")
    axes[0].legend()
    for key in metric_keys:
        points = [(h["epoch"], h[key]) for h in history if key in h]
        axes[1].plot(*zip(*points, strict=True), label=key, marker=".")
    if metric_keys:
        axes[1].set(xlabel="epoch", title="Validation metrics")
        axes[1].legend()
    _save(figure, path)


def confusion_matrix(matrix: list[list[int]], classes: list[Any], path: Path) -> None:
    values = np.asarray(matrix)
    size = max(4, 0.6 * len(classes) + 2)
    figure = Figure(figsize=(size, size))
    ax = figure.subplots()
    ax.imshow(values, cmap="Blues")
    ticks = np.arange(len(classes))
    ax.set(
        xticks=ticks,
        yticks=ticks,
        xticklabels=[str(c) for c in classes],
        yticklabels=[str(c) for c in classes],
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix",
    )
    for i in range(len(classes)):
        for j in range(len(classes)):
            color = "white" if values[i, j] > values.max() / 2 else "black"
            ax.text(j, i, str(values[i, j]), ha="center", va="center", color=color)
    _save(figure, path)


def predicted_vs_actual(actual: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    figure = Figure(figsize=(5, 5))
    ax = figure.subplots()
    ax.scatter(actual, predicted, s=6, alpha=0.5)
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    ax.plot([low, high], [low, high], color="gray", linestyle="--")
    ax.set(xlabel="actual", ylabel="predicted", title="Predicted vs actual")
    _save(figure, path)
