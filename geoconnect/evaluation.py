"""The numbers of a path: energy, Fisher–Rao and Euclidean length, barriers.

Each number of DESIGN.md's table is computed here and only here; the connectors,
plots, command line and benchmarks call these functions.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._data import StreamData, TensorData, as_data, check_labels
from ._inputs import n_rows
from ._model_checks import float_dtype
from .divergences import Divergence, fisher_rao_squared, segment_form

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .path import ModelPath

__all__ = [
    "PathEvaluation",
    "accuracy_barrier",
    "arc_length_positions",
    "euclidean_length",
    "evaluate_path",
    "excess_over_chord",
    "fisher_rao_length",
    "loss_barrier",
    "path_statistics",
    "segment_divergences",
]


def segment_divergences(logits: Tensor, divergence: Divergence) -> Tensor:
    """Per-sample divergences between neighbouring points: shape (K − 1, batch).

    ``logits`` is the sequence of the points' logits on one batch, shape
    ``(K, batch, n_classes)``. A neighbour block's boundary logits can be prepended or
    appended to it, so a path split into blocks sums to the same energy.

    Parameters
    ----------
    logits : Tensor, shape=[K, batch, n_classes]
        The points' logits on one batch, in path order.
    divergence : callable
        ``(logits_p, logits_q) -> Tensor`` of per-sample values.

    Returns
    -------
    Tensor, shape=[K − 1, batch]

    Raises
    ------
    ValueError
        If ``divergence`` does not return one value per sample.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.divergences import jensen_shannon
    >>> from geoconnect.evaluation import segment_divergences
    >>> segment_divergences(torch.zeros(4, 8, 3), jensen_shannon).shape
    torch.Size([3, 8])
    """
    if not isinstance(logits, Tensor) or logits.ndim < 2:
        raise TypeError(
            "logits must be a tensor of shape (K, batch, n_classes); got "
            f"{type(logits).__name__}{tuple(getattr(logits, 'shape', ()))}."
        )
    values = segment_form(divergence)(logits)
    expected = logits.shape[:2]
    expected = (expected[0] - 1, expected[1])
    if not isinstance(values, Tensor) or tuple(values.shape) != expected:
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(
            "The divergence must return one value per sample over the leading "
            f"dimensions of its inputs: for logits of shape {tuple(logits[1:].shape)} "
            f"it should return shape {expected}, got {got}. Reduce over the last "
            "(class) dimension only."
        )
    return values


def fisher_rao_length(segment_squared: Tensor | np.ndarray) -> float:
    """Length ``Σ_i √(E_x d_FR(p_i, p_{i+1})²)`` from the per-segment means of d_FR².

    Parameters
    ----------
    segment_squared : array-like of shape (n_points − 1,)
        Each segment's mean squared Fisher–Rao distance ``E_x d_FR²`` (rad²).

    Returns
    -------
    float
        The length, in radians.

    Examples
    --------
    >>> from geoconnect.evaluation import fisher_rao_length
    >>> fisher_rao_length([0.25, 0.25])
    1.0
    """
    values = torch.as_tensor(segment_squared, dtype=torch.float64).clamp_min(0.0)
    return float(values.sqrt().sum())


def arc_length_positions(segment_squared: Tensor | np.ndarray) -> np.ndarray:
    """Positions in [0, 1] of the points by cumulative Fisher–Rao arc length.

    Uniform positions when the path has zero length, or a NaN or infinite one.

    Parameters
    ----------
    segment_squared : array-like of shape (n_points − 1,)
        Each segment's mean squared Fisher–Rao distance (rad²).

    Returns
    -------
    ndarray of shape (n_points,)
        From 0 to 1.

    Examples
    --------
    >>> from geoconnect.evaluation import arc_length_positions
    >>> arc_length_positions([1.0, 4.0]).tolist()
    [0.0, 0.3333333333333333, 1.0]
    """
    steps = torch.as_tensor(segment_squared, dtype=torch.float64).clamp_min(0.0).sqrt()
    total = float(steps.sum())
    n_points = steps.numel() + 1
    if not np.isfinite(total) or total <= 0.0:  # no length to measure positions by
        return np.linspace(0.0, 1.0, n_points)
    cumulative = torch.cat([steps.new_zeros(1), steps.cumsum(0)]) / total
    positions = cumulative.numpy()
    positions[-1] = 1.0
    return positions


@torch.no_grad()
def euclidean_length(path: ModelPath | Mapping[str, Tensor], frozen: Iterable[str] = ()) -> float:
    """Length ``Σ_i ‖θ_{i+1} − θ_i‖₂`` of the path in parameter space.

    Parameters
    ----------
    path : ModelPath or mapping of str to Tensor
        A path, or its stacked parameters ``(n_points, *shape)`` by name (as a saved
        file holds them).
    frozen : iterable of str, default=()
        With stacked parameters: the names to leave out (a path knows its own).

    Returns
    -------
    float
        Over the trainable parameters (not the path's ``frozen`` ones), in parameter
        units.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.evaluation import euclidean_length
    >>> a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    >>> with torch.no_grad():
    ...     _ = a.weight.fill_(0.0), a.bias.fill_(0.0), b.weight.fill_(3.0), b.bias.fill_(4.0)
    >>> round(euclidean_length(ModelPath.linear(a, b, 6)), 6)
    5.0
    """
    if isinstance(path, Mapping):
        params, frozen = path, set(frozen)
    else:
        params, frozen = path.params, path.frozen
    squared = None
    for name, stack in params.items():
        if name in frozen:
            continue
        diff = (stack[1:] - stack[:-1]).double().reshape(stack.shape[0] - 1, -1)
        term = diff.square().sum(1)
        squared = term if squared is None else squared + term
    if squared is None:  # every parameter frozen
        return 0.0
    return float(squared.sqrt().sum())


def excess_over_chord(values: np.ndarray) -> np.ndarray:
    """Each point's value above the chord between the ends, ``t_i = i/(N−1)``.

    ``V_i − ((1 − t_i) V_0 + t_i V_{N−1})``: what :func:`loss_barrier` maximises, so
    its ``argmax`` is the point where a path's loss barrier is.

    Parameters
    ----------
    values : array-like of shape (n_points,)
        One value per point, in path order (a loss, an accuracy, …).

    Returns
    -------
    ndarray of shape (n_points,), float
        Zero at the ends.

    Examples
    --------
    >>> from geoconnect.evaluation import excess_over_chord
    >>> excess_over_chord([0.1, 0.9, 0.3]).round(6).tolist()
    [0.0, 0.7, 0.0]
    """
    values = np.asarray(values, dtype=float)
    t = np.linspace(0.0, 1.0, values.size)
    return values - ((1.0 - t) * values[0] + t * values[-1])


def _barrier(values: np.ndarray, sign: float) -> float:
    """The largest excess over the chord, ≥ 0; NaN when any value is NaN or infinite.

    A point whose loss is not a number is not a point of low loss: the barrier of
    such a path is NaN, never a finite number that could rank it above a sound one.
    """
    values = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(values)):
        return float("nan")
    return float(max(0.0, np.max(sign * excess_over_chord(values))))


def loss_barrier(loss: np.ndarray) -> float:
    """``max_i [L_i − ((1 − t_i) L_0 + t_i L_{N−1})]``, ``t_i = i/(N−1)``; ≥ 0.

    NaN when any loss is NaN or infinite (a point that overflows has no loss to
    compare).

    Parameters
    ----------
    loss : array-like of shape (n_points,)
        Each point's mean loss (nats), in path order.

    Returns
    -------
    float
        The loss barrier, in the loss's units.

    Examples
    --------
    >>> from geoconnect.evaluation import loss_barrier
    >>> loss_barrier([0.1, 0.9, 0.3])
    0.7
    >>> loss_barrier([0.1, float("nan"), 0.3])
    nan
    """
    return _barrier(loss, 1.0)


def accuracy_barrier(accuracy: np.ndarray) -> float:
    """``max_i [((1 − t_i) A_0 + t_i A_{N−1}) − A_i]``, ``t_i = i/(N−1)``; ≥ 0.

    Parameters
    ----------
    accuracy : array-like of shape (n_points,)
        Each point's accuracy in [0, 1], in path order.

    Returns
    -------
    float
        The accuracy barrier, a fraction.

    Examples
    --------
    >>> from geoconnect.evaluation import accuracy_barrier
    >>> round(accuracy_barrier([0.9, 0.5, 1.0]), 6)
    0.45
    """
    return _barrier(accuracy, -1.0)


@dataclass
class PathStatistics:
    """Sums gathered in one pass of the data over every point of a path."""

    n_samples: int
    segment_fisher_rao_sq: np.ndarray  # (N − 1,) means of d_FR²
    segment_costs: np.ndarray | None  # (N − 1,) means of the divergence, if asked
    loss: np.ndarray | None  # (N,) mean cross-entropy, if labels
    accuracy: np.ndarray | None  # (N,) if labels
    nonfinite_points: np.ndarray  # indices of points with a NaN or infinite logit

    def warn_if_nonfinite(self, stacklevel: int = 2) -> None:
        """Warn, naming the points, when some point's logits were NaN or infinite."""
        if self.nonfinite_points.size == 0:
            return
        points = self.nonfinite_points.tolist()
        warnings.warn(
            f"Point(s) {points[:10]} of the path give NaN or infinite logits on X, so "
            "their loss, the barriers and the lengths are NaN. Likely causes: logits "
            "that overflow a low-precision dtype (float16 overflows above 65504: use "
            "float32 or bfloat16 models), or a model that returns NaN on some inputs.",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )


_POINTS_PER_BLOCK = 4  # points evaluated together in path_statistics (with their next)


def _add(total: Tensor | None, part: Tensor) -> Tensor:
    return part if total is None else total + part


@torch.no_grad()
def path_statistics(
    path: ModelPath,
    data: TensorData | StreamData,
    *,
    batch_size: int = 256,
    divergence: Divergence | None = None,
) -> PathStatistics:
    """One pass over ``data`` evaluating every point in eval mode.

    Gathers the per-segment means of d_FR² (always), of ``divergence`` (when given),
    and the per-point loss and accuracy (when the data carry labels).
    """
    n = 0
    fr_sum = costs_sum = loss_sum = correct = nonfinite = None
    for batch in data.batches(batch_size):
        logits = path.logits(batch.x)  # (N, B, C)
        if logits.ndim != 3:
            raise ValueError(
                "The models must map a batch of X to logits of shape (batch, n_classes); "
                f"got outputs of shape {tuple(logits.shape[1:])}."
            )
        bad = ~torch.isfinite(logits).flatten(1).all(1)
        nonfinite = bad if nonfinite is None else nonfinite | bad
        n_points, b, n_classes = logits.shape
        if batch.y is not None:
            check_labels(batch.y, n_classes)
        # In float64, a few points at a time: the temporaries of the divergences
        # scale with points × batch × classes, and all N at once set the peak memory.
        fr, costs, loss, hits = [], [], [], []
        for start in range(0, n_points, _POINTS_PER_BLOCK):
            block = logits[start : start + _POINTS_PER_BLOCK + 1].double()
            own = block[:_POINTS_PER_BLOCK]  # this block's points; block adds the next
            if len(block) > 1:
                fr.append(segment_divergences(block, fisher_rao_squared).sum(1))
                if divergence is not None:
                    costs.append(segment_divergences(block, divergence).double().sum(1))
            if batch.y is not None:
                k = len(own)
                ce = F.cross_entropy(
                    own.reshape(k * b, n_classes), batch.y.repeat(k), reduction="none"
                ).reshape(k, b)
                loss.append(ce.sum(1))
                hits.append((own.argmax(-1) == batch.y).double().sum(1))
        fr_sum = _add(fr_sum, torch.cat(fr))
        if divergence is not None:
            costs_sum = _add(costs_sum, torch.cat(costs))
        if batch.y is not None:
            loss_sum = _add(loss_sum, torch.cat(loss))
            correct = _add(correct, torch.cat(hits))
        n += n_rows(batch.x)
    if n == 0:
        raise ValueError("X is empty: no samples to evaluate the path on.")

    def mean(total: Tensor | None) -> np.ndarray | None:
        return None if total is None else (total / n).cpu().numpy()

    return PathStatistics(
        n_samples=n,
        segment_fisher_rao_sq=mean(fr_sum),  # type: ignore[arg-type]
        segment_costs=mean(costs_sum),
        loss=mean(loss_sum),
        accuracy=mean(correct),
        nonfinite_points=np.flatnonzero(nonfinite.cpu().numpy()),
    )


@dataclass
class PathEvaluation:
    """Loss and accuracy along a path, its barriers and lengths, on one data set.

    Attributes
    ----------
    t : ndarray of shape (n_points,)
        Point positions ``i / (n_points − 1)``, the ones the barriers use.
    loss : ndarray of shape (n_points,)
        Mean cross-entropy of each point, in nats.
    accuracy : ndarray of shape (n_points,)
        Accuracy of each point, in [0, 1].
    barrier : float
        Loss barrier (nats), ≥ 0.
    accuracy_barrier : float
        Accuracy barrier (fraction), ≥ 0.
    length : float
        Fisher–Rao length on this data (radians).
    euclidean_length : float
        Length in parameter space.
    t_arc : ndarray of shape (n_points,)
        Point positions by Fisher–Rao arc length on this data.

    Examples
    --------
    >>> from geoconnect.evaluation import PathEvaluation
    >>> ev = PathEvaluation.from_arrays(loss=[0.1, 0.5, 0.2], accuracy=[1.0, 0.8, 1.0])
    >>> round(ev.barrier, 6), round(ev.accuracy_barrier, 6)
    (0.35, 0.2)
    """

    t: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    barrier: float
    accuracy_barrier: float
    length: float = float("nan")
    euclidean_length: float = float("nan")
    t_arc: np.ndarray | None = None

    @classmethod
    def from_arrays(
        cls,
        loss: np.ndarray,
        accuracy: np.ndarray,
        *,
        length: float = float("nan"),
        euclidean_length: float = float("nan"),
        t_arc: np.ndarray | None = None,
    ) -> PathEvaluation:
        """Build an evaluation from per-point losses and accuracies.

        Parameters
        ----------
        loss : array-like of shape (n_points,)
            Each point's mean cross-entropy (nats), in path order.
        accuracy : array-like of shape (n_points,)
            Each point's accuracy in [0, 1].
        length : float, optional
            Fisher–Rao length (radians), if known.
        euclidean_length : float, optional
            Length in parameter space, if known.
        t_arc : array-like of shape (n_points,), optional
            Positions by Fisher–Rao arc length, if known.

        Returns
        -------
        PathEvaluation

        Examples
        --------
        >>> from geoconnect.evaluation import PathEvaluation
        >>> PathEvaluation.from_arrays([0.2, 0.6, 0.2], [0.9, 0.7, 0.9]).t.tolist()
        [0.0, 0.5, 1.0]
        """
        loss = np.asarray(loss, dtype=float)
        accuracy = np.asarray(accuracy, dtype=float)
        return cls(
            t=np.linspace(0.0, 1.0, loss.size),
            loss=loss,
            accuracy=accuracy,
            barrier=loss_barrier(loss),
            accuracy_barrier=accuracy_barrier(accuracy),
            length=float(length),
            euclidean_length=float(euclidean_length),
            t_arc=t_arc,
        )

    @property
    def min_accuracy(self) -> float:
        """The lowest accuracy of any point on the path."""
        return float(np.min(self.accuracy))

    def plot(self, ax: Axes | None = None, **kwargs: object) -> Axes:
        """Plot loss (and accuracy) along the path with ``plotting.plot_loss_profile``.

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Where to draw (a pair of Axes with ``accuracy=True``); a new figure when
            omitted.
        **kwargs
            Passed to :func:`geoconnect.plotting.plot_loss_profile`: ``test``,
            ``accuracy``, ``position``, ``title``.

        Returns
        -------
        matplotlib.axes.Axes
            The loss axes; with ``accuracy=True`` an array ``[loss_axes,
            accuracy_axes]``.

        Examples
        --------
        >>> from geoconnect.evaluation import PathEvaluation
        >>> ev = PathEvaluation.from_arrays(loss=[0.1, 0.5, 0.2], accuracy=[1, 0.8, 1])
        >>> ax = ev.plot()
        """
        from .plotting import plot_loss_profile

        return plot_loss_profile(self, ax=ax, **kwargs)


def evaluate_path(
    path: ModelPath, X: object, y: object, *, batch_size: int = 256
) -> PathEvaluation:
    """Evaluate ``path`` on labelled data.

    Parameters
    ----------
    path : ModelPath
    X : array-like, tensor, Dataset or DataLoader
        Inputs (a Dataset/DataLoader yields ``(x, y)`` and ``y`` is None).
    y : array-like of shape (n_samples,) or None
        Class indices.
    batch_size : int, default=256

    Returns
    -------
    PathEvaluation

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.evaluation import evaluate_path
    >>> path = ModelPath.linear(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), 5)
    >>> ev = evaluate_path(path, torch.randn(20, 4), torch.randint(0, 3, (20,)))
    >>> ev.loss.shape
    (5,)
    """
    data = as_data(X, y, device=path.device, dtype=float_dtype(path.template))
    stats = path_statistics(path, data, batch_size=batch_size)
    stats.warn_if_nonfinite()
    if stats.loss is None:
        raise ValueError("evaluate needs labels: pass y, or a Dataset/DataLoader yielding (x, y).")
    return PathEvaluation.from_arrays(
        stats.loss,
        stats.accuracy,  # type: ignore[arg-type]
        length=fisher_rao_length(stats.segment_fisher_rao_sq),
        euclidean_length=euclidean_length(path),
        t_arc=arc_length_positions(stats.segment_fisher_rao_sq),
    )
