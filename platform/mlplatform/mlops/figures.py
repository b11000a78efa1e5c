"""The figures runs log as PNG artifacts: learning curves and confusion matrices, drawn without pyplot state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay


def blank_figure(width_in: float = 6.4, height_in: float = 4.0) -> Figure:
    """A bare Figure on an Agg canvas: no pyplot state, no display, safe in worker threads."""
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def learning_curves_figure(
    steps: Sequence[float], curves: Mapping[str, Sequence[float]], *, title: str, xlabel: str = "step"
) -> Figure:
    """One panel per curve, sharing the x axis (``curves`` maps a label to its values at ``steps``).

    Raises:
        ValueError: a curve's length differs from ``steps``'.
    """
    for label, values in curves.items():
        if len(values) != len(steps):
            raise ValueError(f"got {len(steps)} steps but {len(values)} values of {label!r}")
    figure = blank_figure(6.4, 2.2 + 1.8 * len(curves))
    axes = figure.subplots(len(curves), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, values) in zip(axes, curves.items()):
        ax.plot(steps, values, marker="." if len(steps) < 60 else None)
        ax.set(ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[-1].set_xlabel(xlabel)
    return figure


def confusion_matrix_figure(truth: Sequence[int], predicted: Sequence[int], labels: Sequence[str], *, title: str) -> Figure:
    """Rows are the true class, columns the predicted one, each row normalised to 1 (the recall on the diagonal)."""
    figure = blank_figure(7.0, 6.0)
    ax = figure.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        np.asarray(truth), np.asarray(predicted), labels=list(range(len(labels))), display_labels=list(labels),
        normalize="true", values_format=".2f", cmap="Blues", colorbar=False, ax=ax, xticks_rotation=45,
    )
    ax.set_title(title)
    return figure
