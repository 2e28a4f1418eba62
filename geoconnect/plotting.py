"""Figures of paths: loss profiles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .evaluation import PathEvaluation

__all__ = ["plot_loss_profile"]


def plot_loss_profile(
    evaluations: PathEvaluation | Mapping[str, PathEvaluation],
    *,
    ax: Axes | None = None,
    accuracy: bool = False,
    title: str | None = None,
) -> Axes:
    """Loss along one or more paths against the position on the path.

    Parameters
    ----------
    evaluations : PathEvaluation or mapping of label to PathEvaluation
        What to draw; a mapping draws one line per entry, labelled with its key.
    ax : matplotlib Axes, optional
        Where to draw; a new figure when omitted.
    accuracy : bool, default=False
        Also draw accuracy (dashed) on a twin axis.
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> from geoconnect.evaluation import PathEvaluation
    >>> from geoconnect.plotting import plot_loss_profile
    >>> line = PathEvaluation.from_arrays([0.1, 0.9, 0.2], [1.0, 0.6, 1.0])
    >>> geo = PathEvaluation.from_arrays([0.1, 0.15, 0.2], [1.0, 1.0, 1.0])
    >>> ax = plot_loss_profile({"linear": line, "geodesic": geo})
    """
    import matplotlib.pyplot as plt

    from .evaluation import PathEvaluation

    if isinstance(evaluations, PathEvaluation):
        evaluations = {"path": evaluations}
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
    twin = ax.twinx() if accuracy else None
    for label, ev in evaluations.items():
        (line,) = ax.plot(ev.t, ev.loss, marker="o", markersize=3, label=f"{label} loss")
        if twin is not None:
            twin.plot(
                ev.t,
                100 * ev.accuracy,
                linestyle="--",
                color=line.get_color(),
                label=f"{label} accuracy",
            )
    ax.set_xlabel("position on the path, t = i / (N − 1)")
    ax.set_ylabel("cross-entropy loss (nats)")
    if twin is not None:
        twin.set_ylabel("accuracy (%)")
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return ax
