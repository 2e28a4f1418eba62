"""The numbers of a path: energy, Fisher–Rao and Euclidean length, barriers.

Each number of DESIGN.md's table is computed here and only here; the connectors,
plots, command line and benchmarks call these functions.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._data import StreamData, TensorData, as_data, check_labels
from ._inputs import n_rows, rows
from ._model_checks import float_dtype
from .divergences import Divergence, fisher_rao_squared, segment_form

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .curves import Curve
    from .path import ModelPath

__all__ = [
    "PathEvaluation",
    "PathLength",
    "accuracy_barrier",
    "arc_length_positions",
    "euclidean_length",
    "evaluate_path",
    "excess_over_chord",
    "fisher_rao_length",
    "length_ratio",
    "loss_barrier",
    "path_length",
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
    squared = segment_squared_norms(params, frozen)
    if squared is None:  # every parameter frozen
        return 0.0
    return float(squared.sqrt().sum())


#: Segments whose differences :func:`segment_squared_norms` holds at once.
_NORM_ROWS = 2


def segment_squared_norms(
    params: Mapping[str, Tensor], frozen: Iterable[str] = ()
) -> Tensor | None:
    """``‖θ_{i+1} − θ_i‖₂²`` of each segment of stacked points, in float64; None when
    every parameter is ``frozen``.

    A few segments at a time, so that the temporaries (the differences in float64)
    are a few points' worth, not twice the stack's.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.evaluation import segment_squared_norms
    >>> segment_squared_norms({"w": torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 5.0]])})
    tensor([25.,  1.], dtype=torch.float64)
    """
    squared = None
    for name, stack in params.items():
        if name in frozen:
            continue
        rows = [stack.new_zeros(0, dtype=torch.float64)]  # one point: no segment
        for lo in range(0, stack.shape[0] - 1, _NORM_ROWS):
            hi = min(lo + _NORM_ROWS, stack.shape[0] - 1)
            diff = (stack[lo + 1 : hi + 1] - stack[lo:hi]).double().reshape(hi - lo, -1)
            rows.append(diff.square_().sum(1))
        term = torch.cat(rows)
        squared = term if squared is None else squared + term
    return squared


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
    #: (N, n_samples, n_classes): every point's logits, when asked and within
    #: ``_CACHE_BYTES`` (:func:`path_length` reuses them).
    logits: Tensor | None = None

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
    keep_logits: bool = False,
    points_only: bool = False,
) -> PathStatistics:
    """One pass over ``data`` evaluating every point in eval mode.

    Gathers the per-segment means of d_FR² (always), of ``divergence`` (when given),
    and the per-point loss and accuracy (when the data carry labels); with
    ``keep_logits``, the logits too, when they fit in ``_CACHE_BYTES``.
    ``points_only``: the caller reads the points' numbers alone (a shard's, whose
    segments are not the path's).
    """
    if getattr(path, "shard", None) is not None and not points_only:
        path.check_whole("measure the statistics of")  # type: ignore[union-attr]
    n = 0
    totals: dict[str, Tensor] = {}
    nonfinite: Tensor | None = None
    kept: list[Tensor] | None = [] if keep_logits else None
    for batch in data.batches(batch_size):
        logits = path.logits(batch.x)  # (N, B, C)
        if logits.ndim != 3:
            raise ValueError(
                "The models must map a batch of X to logits of shape (batch, n_classes); "
                f"got outputs of shape {tuple(logits.shape[1:])}."
            )
        bad = ~torch.isfinite(logits).flatten(1).all(1)
        nonfinite = bad if nonfinite is None else nonfinite | bad
        if kept is not None:
            kept.append(logits)
            if sum(k.element_size() * k.nelement() for k in kept) > _CACHE_BYTES:
                kept = None
        if batch.y is not None:
            check_labels(batch.y, logits.shape[-1])
        for key, part in _batch_sums(logits, batch.y, divergence).items():
            totals[key] = _add(totals.get(key), part)
        n += n_rows(batch.x)
    if n == 0 or nonfinite is None:
        raise ValueError("X is empty: no samples to evaluate the path on.")

    def mean(key: str) -> np.ndarray | None:
        return (totals[key] / n).cpu().numpy() if key in totals else None

    return PathStatistics(
        n_samples=n,
        segment_fisher_rao_sq=mean("fisher_rao_sq"),  # type: ignore[arg-type]
        segment_costs=mean("costs"),
        loss=mean("loss"),
        accuracy=mean("correct"),
        nonfinite_points=np.flatnonzero(nonfinite.cpu().numpy()),
        logits=None if kept is None else torch.cat(kept, 1),
    )


def shard_barriers(
    path: ModelPath, data: TensorData | StreamData, *, batch_size: int = 256
) -> PathEvaluation:
    """Every point's loss and accuracy, and the barriers, of a path split across the
    ranks (a distributed chain's ``path_`` with ``gather=False``): each rank
    evaluates its own points, and the ranks gather the numbers. Every rank of the
    fit's process group calls it, each with its shard.

    Returns a :class:`~geoconnect.evaluation.PathEvaluation` without lengths (NaN):
    measuring them across ranks is not built yet.
    """
    from .distributed import PathGroup

    shard = path.shard
    assert shard is not None
    group = PathGroup.of_shard(shard)
    stats = path_statistics(path, data, batch_size=batch_size, points_only=True)
    if stats.loss is None or stats.accuracy is None:
        raise ValueError("Evaluating a path needs labels: pass y (or (x, y) batches).")
    own = range(0 if shard.rank == 0 else 1, path.n_points - (shard.rank != 0))
    mine = {shard.points[i]: (float(stats.loss[i]), float(stats.accuracy[i])) for i in own}
    every = {point: pair for part in group.gather(mine) for point, pair in part.items()}  # type: ignore[attr-defined]
    numbers = np.array([every[i] for i in range(shard.n_points)])
    return PathEvaluation.from_arrays(numbers[:, 0], numbers[:, 1])


def _batch_sums(
    logits: Tensor, y: Tensor | None, divergence: Divergence | None
) -> dict[str, Tensor]:
    """One batch's sums over its samples: per segment ``fisher_rao_sq`` (and
    ``costs`` with a divergence), per point ``loss`` and ``correct`` (with labels).

    In float64, a few points at a time: the temporaries of the divergences scale with
    points × batch × classes, and all N at once set the peak memory."""
    n_points, b, n_classes = logits.shape
    parts: dict[str, list[Tensor]] = {"fisher_rao_sq": []}
    if divergence is not None:
        parts["costs"] = []
    if y is not None:
        parts["loss"], parts["correct"] = [], []
    for start in range(0, n_points, _POINTS_PER_BLOCK):
        block = logits[start : start + _POINTS_PER_BLOCK + 1].double()
        own = block[:_POINTS_PER_BLOCK]  # this block's points; block adds the next
        if len(block) > 1:
            parts["fisher_rao_sq"].append(segment_divergences(block, fisher_rao_squared).sum(1))
            if divergence is not None:
                parts["costs"].append(segment_divergences(block, divergence).double().sum(1))
        if y is not None:
            k = len(own)
            ce = F.cross_entropy(own.reshape(k * b, n_classes), y.repeat(k), reduction="none")
            parts["loss"].append(ce.reshape(k, b).sum(1))
            parts["correct"].append((own.argmax(-1) == y).double().sum(1))
    return {key: torch.cat(values) for key, values in parts.items()}


#: The length's estimated relative error that counts as measured.
LENGTH_RTOL = 0.01
#: An error that counts as measured whatever the length (radians): the rounding of
#: float32 logits puts about 1e-7 into every chord, however short.
LENGTH_ATOL = 1e-6
#: The finest subdivision of a segment :func:`path_length` tries (pieces per segment).
MAX_SUBDIVISIONS = 32
#: The most inputs :func:`path_length` measures on: larger in-memory data sets are
#: measured on a fixed random subset of this size (data streams on all of theirs).
LENGTH_SAMPLES = 2048
#: The segments a :class:`~geoconnect.curves.Curve` is first cut into, in ``t``.
CURVE_SEGMENTS = 8
#: Networks held together while a subdivided block of segments is measured.
_POINTS_PER_MEASURE = 33
#: The most bytes of logits :class:`_Pieces` keeps to reuse at the next resolution
#: (and :func:`path_statistics` keeps for it).
_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PathLength:
    """The Fisher–Rao length of a continuous path, with its error and its lower bound.

    Attributes
    ----------
    length : float
        The length (radians): the limit of the chord sums
        ``Σ_j √(E_x d_FR(p(t_j), p(t_{j+1}))²)`` as the resolution grows. Chord
        sums converge to it from below, on networks with ReLUs as ``O(1/m)`` (each
        doubling of the resolution adds about half of what the last one added), so
        each segment's is its finest chord sum plus what the last doubling added.
    error : float
        The estimated error of ``length``: for each segment, the largest of how
        much its estimate moved at its last doubling, a quarter of what that
        doubling added (half at the second doubling, all of it at the first), and
        how far it is from (and how much moved) the extrapolation by the observed
        ratio of consecutive additions. With BatchNorm, the jumps at the ends (the
        models' own statistics against the inputs') are measured on their own,
        without error, and are part of ``length``.
    chord_length : float
        The chord sum at the path's points alone (a curve: at ``CURVE_SEGMENTS + 1``
        evenly spaced ``t``), which understates the length when the path bends
        between them.
    refined_chord_length : float
        The chord sum at the finest resolution measured: a lower bound of the
        length (chord sums only grow as the resolution does).
    min_length : float
        ``√(E_x d_FR(p_a(x), p_b(x))²)``, the distance between the ends' predictions:
        no path between the two ends is shorter on these inputs.
    subdivisions : int
        The finest resolution used, in pieces per segment (the straighter segments
        stop earlier).
    converged : bool
        Whether ``error`` is at most ``rtol`` of the length.
    n_samples : int
        The inputs the networks between the points were measured on: a fixed
        random subset of at most ``max_samples`` of in-memory data (the chords and
        ``min_length`` are measured on all of them).
    positions : ndarray of shape (n_points,) or (CURVE_SEGMENTS + 1,), or None
        A path's points' positions in [0, 1] by cumulative arc length; a curve's,
        of ``t = j / CURVE_SEGMENTS``.

    Examples
    --------
    >>> from geoconnect.evaluation import PathLength
    >>> measured = PathLength(1.2, 0.004, 1.0, 1.19, 0.6, 8, True, 500)
    >>> measured.ratio
    2.0
    """

    length: float
    error: float
    chord_length: float
    refined_chord_length: float
    min_length: float
    subdivisions: int
    converged: bool
    n_samples: int
    positions: np.ndarray | None = None

    @property
    def ratio(self) -> float:
        """``length / min_length``: how many times the shortest possible (≥ 1)."""
        return length_ratio(self.length, self.min_length)


def length_ratio(length: float, min_length: float) -> float:
    """``length / min_length``, with 1 for a path of zero length between equal ends.

    Examples
    --------
    >>> from geoconnect.evaluation import length_ratio
    >>> length_ratio(1.5, 0.5), length_ratio(0.0, 0.0), length_ratio(0.1, 0.0)
    (3.0, 1.0, inf)
    """
    if min_length > 0.0:
        return length / min_length
    if length == 0.0 and min_length == 0.0:
        return 1.0
    return math.inf if length > 0.0 else math.nan


def path_length(
    path: ModelPath | Curve,
    data: TensorData | StreamData,
    *,
    batch_size: int = 256,
    rtol: float = LENGTH_RTOL,
    atol: float = LENGTH_ATOL,
    max_subdivisions: int = MAX_SUBDIVISIONS,
    max_samples: int | None = LENGTH_SAMPLES,
    chord_squared: np.ndarray | None = None,
    point_logits: Tensor | None = None,
) -> PathLength:
    """The Fisher–Rao length of the continuous path a user gets, to a known error.

    A :class:`~geoconnect.ModelPath` is the polygon between its points:
    :meth:`ModelPath.at` interpolates the parameters linearly between neighbours, and
    the networks between two points are part of the path. Their predictions need not
    lie on the chord between the points' predictions, so the chord sum at the points
    understates the length (by 12–150 % on fitted digits paths). A
    :class:`~geoconnect.curves.Curve` is measured at any ``t``.

    The segments are cut into 2, 4, 8, … equal pieces in parameter space (a curve's
    in ``t``), the most uncertain first, until the estimated error of the whole
    length is at most ``rtol`` of it (:class:`PathLength` says how the length and
    its error are estimated from the chord sums), or ``max_subdivisions`` is
    reached: then a ``RuntimeWarning`` says how uncertain it is, and ``converged``
    is False. The
    networks between points get BatchNorm statistics recomputed on ``data``, as
    :meth:`ModelPath.at` does; the path's own points keep theirs (so pass the data
    they were recomputed on, or a path recomputed on ``data``).

    Parameters
    ----------
    path : ModelPath or Curve
    data : TensorData or StreamData
        The inputs the predictions are compared on.
    batch_size : int, default=256
    rtol : float, default=0.01
        The relative error of the length to reach.
    atol : float, default=1e-6
        An error (radians) that counts as reached whatever the length: float32
        rounding puts about 1e-7 into every chord of a path of one function.
    max_subdivisions : int, default=32
        The finest resolution tried, in pieces per segment (≥ 2).
    max_samples : int or None, default=2048
        In-memory data with more inputs has the predictions of the networks between
        the points compared on a fixed random subset of this size (None: all; their
        BatchNorm statistics come from all the inputs, as the points'); the chords at the points
        and ``min_length`` are measured on every input, and each segment's length
        is its chord there times its length over its chord on the subset (a ratio
        estimate, whose sampling noise the chords largely cancel). The subset's size
        is ``n_samples`` in the result.
    chord_squared : array-like of shape (n_points − 1,), optional
        A path's segments' ``E_x d_FR²`` at its points on ``data``, if already
        measured (:func:`path_statistics`): saves a pass over streamed data
        (in-memory data are measured again, their logits kept for the refinement).
    point_logits : Tensor of shape (n_points, n_samples, n_classes), optional
        A path's points' logits on in-memory ``data``, if already computed
        (``path_statistics(..., keep_logits=True).logits``): saves a pass.

    Returns
    -------
    PathLength

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect._data import as_data
    >>> from geoconnect.evaluation import path_length
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> mlp = lambda: torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(),
    ...                                   torch.nn.Linear(16, 3))
    >>> path = ModelPath.linear(mlp(), mlp(), 3)
    >>> measured = path_length(path, as_data(torch.randn(64, 4), device="cpu"))
    >>> measured.converged, measured.min_length <= measured.chord_length <= measured.length
    (True, True)
    """
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and value >= 0.0):
            raise ValueError(f"{name} must be a number ≥ 0; got {value!r}.")
    if not (isinstance(max_subdivisions, int) and max_subdivisions >= 2):
        raise ValueError(
            f"max_subdivisions must be an integer ≥ 2; got {max_subdivisions!r}. For the "
            "chord sum at the points alone, read chord_length."
        )
    sample = _length_sample(data, max_samples)
    networks = _Networks(path)
    pieces = _Pieces(networks, sample, batch_size, statistics=data)
    everywhere = pieces if sample is data else _Pieces(networks, data, batch_size)
    if point_logits is not None and networks.curve is None:
        everywhere.remember_points(point_logits)
    if (
        chord_squared is None
        or networks.curve is not None
        or networks.jumps
        or (everywhere is pieces and pieces.caching)
    ):
        inner = everywhere.chords()  # in memory, their logits kept for the refinement
    else:
        inner = torch.as_tensor(np.asarray(chord_squared), dtype=torch.float64).flatten()
    jumps, chords = _end_jumps(everywhere, inner)
    if chord_squared is not None and networks.curve is None:
        chords = torch.as_tensor(np.asarray(chord_squared), dtype=torch.float64).flatten()
    refinement = _Refinement(inner if sample is data else pieces.chords())
    refinement.run(pieces, rtol, atol, max_subdivisions, jumps=float(jumps.sum()))
    if sample is not data:
        # The chords on every input, each segment scaled as the subset's refinement did
        # its chord: a ratio estimate, whose sampling noise the chords mostly cancel.
        refinement.rescale(inner.clamp_min(0.0).sqrt())
    length, error = refinement.length() + float(jumps.sum()), refinement.error()
    converged = error <= rtol * length + atol
    if not converged and math.isfinite(length):
        _warn_unconverged(length, error, max_subdivisions)
    min_length = math.sqrt(max(everywhere.ends(), 0.0))
    for measured in {id(pieces): pieces, id(everywhere): everywhere}.values():
        measured.warn_if_nonfinite()
    return PathLength(
        length=length,
        error=error,
        chord_length=float(chords.clamp_min(0.0).sqrt().sum()),
        refined_chord_length=float(refinement.chords.sum() + jumps.sum()),
        min_length=min_length,
        subdivisions=int(refinement.pieces.max()),
        converged=bool(converged),
        n_samples=pieces.n_samples,
        positions=arc_length_positions(_with_jumps(refinement.segments(), jumps).square()),
    )


def _warn_unconverged(length: float, error: float, max_subdivisions: int) -> None:
    warnings.warn(
        f"The path's Fisher–Rao length did not converge at {max_subdivisions} pieces "
        f"per segment: {length:.4g} is uncertain by about {error:.3g} "
        f"({error / length:.1%}). More points (n_points) make a path's segments "
        "straighter; max_subdivisions refines them further.",
        RuntimeWarning,
        stacklevel=3,  # this, path_length, its caller
    )


class _Refinement:
    """Each segment's chord sum at its own resolution, its length and the error of that.

    Chord sums of the paths of ReLU networks converge to the length as ``O(1/m)``,
    not ``O(1/m²)``: the kinks where units switch on or off are cut at every
    resolution (measured on digits paths: each doubling of the resolution adds half
    of what the last one added). A segment's length is therefore its chord sum plus
    what the last doubling added (Richardson's extrapolation for a first-order
    error). Some segments converge faster (a BatchNorm CNN's line: each doubling
    added 0.36–0.48 of the last), and there that extrapolation overshoots. The
    error is the largest of: how much the estimate moved at the last doubling; a
    quarter of what the doubling added (half, at the second doubling); and how far
    it is from, and how much moved, the extrapolation by the observed ratio of
    consecutive additions (Aitken's Δ², the ratio capped at 0.6).
    """

    def __init__(self, chord_squared: Tensor):
        self.chords = chord_squared.clamp_min(0.0).sqrt()  # NaN kept
        self.initial = self.chords.clone()  # the chords at the points
        self.pieces = torch.ones(self.chords.numel(), dtype=torch.long)
        # what the last three doublings added, the last first
        self.added = [torch.full_like(self.chords, math.nan) for _ in range(3)]

    def segments(self) -> Tensor:
        """Each segment's estimated length."""
        return torch.where(self.added[0].isnan(), self.chords, self.chords + self.added[0])

    def errors(self) -> Tensor:
        """Each segment's estimated error (inf: not refined yet)."""
        d0, d1, d2 = self.added
        first = self.chords + d0
        moved = (2.0 * d0 - d1).abs()
        aitken = self.chords + _aitken_tail(d0, d1)
        aitken_before = self.chords - d0 + _aitken_tail(d1, d2)
        errors = torch.maximum(moved, d0 / 4).maximum((aitken - first).abs())
        # Two additions say little about how the next ones shrink (a BatchNorm CNN's
        # curve: ratios 0.46, then 0.31): half the last one, until a third is known.
        errors = torch.where(
            d2.isnan(), errors.maximum(d0 / 2), errors.maximum((aitken - aitken_before).abs())
        )
        errors = torch.where(d1.isnan(), d0, errors)
        return torch.where(d0.isnan(), math.inf, errors)

    def length(self) -> float:
        return float(self.segments().sum())

    def error(self) -> float:
        return float(self.errors().sum())

    def next_segments(self, tolerance: float, max_subdivisions: int) -> dict[int, list[int]]:
        """The segments to double next, by their resolution: those never refined, then
        the largest errors until the others' are within the ``tolerance`` (an error
        in radians; those doubled come back smaller, and the next round takes the
        largest again); none when the error is within it."""
        errors = self.errors()
        refinable = 2 * self.pieces <= max_subdivisions
        unknown = torch.isinf(errors)
        chosen = unknown & refinable
        known = torch.where(unknown, torch.zeros_like(errors), errors)
        if not unknown.any() and float(known.sum()) <= tolerance:
            return {}  # measured
        left = float(known.sum())
        for i in torch.argsort(torch.where(refinable, known, -1.0), descending=True).tolist():
            if left <= tolerance or not refinable[i] or known[i] <= 0.0:
                break
            chosen[i] = True
            left -= float(known[i])
        out: dict[int, list[int]] = {}
        for i in torch.nonzero(chosen).flatten().tolist():
            out.setdefault(int(self.pieces[i]), []).append(i)
        return out

    def run(
        self,
        pieces: _Pieces,
        rtol: float,
        atol: float,
        max_subdivisions: int,
        jumps: float = 0.0,
    ) -> None:
        """Double the resolution of the most uncertain segments until the error of
        the length (with ``jumps`` besides the segments) is within ``rtol`` of it
        plus ``atol``, or none can be doubled."""
        while math.isfinite(self.length()):
            tolerance = rtol * (self.length() + jumps) + atol
            chosen = self.next_segments(tolerance, max_subdivisions)
            if not chosen:
                return
            for m, segments in chosen.items():
                finer = pieces.squares(segments, 2 * m).clamp_min(0.0).sqrt().sum(1)
                self.refine(segments, finer)

    def rescale(self, chords: Tensor) -> None:
        """Scale each segment to the given chord (its chord on more inputs)."""
        factor = torch.where(self.initial > 0, chords / self.initial, torch.ones_like(chords))
        self.chords = self.chords * factor
        self.added = [added * factor for added in self.added]
        self.initial = chords

    def refine(self, segments: list[int], finer: Tensor) -> None:
        """Record the chord sums of ``segments`` at twice their resolution."""
        index = torch.tensor(segments)
        self.added[2][index] = self.added[1][index]
        self.added[1][index] = self.added[0][index]
        # Never negative but for rounding: √(E_x d_FR²) obeys the triangle inequality.
        self.added[0][index] = (finer - self.chords[index]).clamp_min(0.0)
        self.chords[index] = finer
        self.pieces[index] *= 2


def _aitken_tail(last: Tensor, before: Tensor, cap: float = 0.6) -> Tensor:
    """What the doublings after one that added ``last`` (the one before it:
    ``before``) add if each adds the same ratio of the previous one (≤ ``cap``)."""
    ratio = torch.where(before > 0, last / before, (last > 0).to(last.dtype))
    ratio = ratio.clamp(0.0, cap)
    return last * ratio / (1.0 - ratio)


class _Networks:
    """The networks of a path or a curve at positions ``u`` ∈ [0, n_segments]: at the
    integers a path's own points, or a curve's ``t = u / n_segments``.

    With BatchNorm, the networks between the ends get statistics recomputed on the
    data while the ends keep their models' own: the path jumps at each end, from a
    model to the same parameters with recomputed statistics. Chord sums converge
    slowly across a jump (a chord from the end counts only part of the jump and the
    motion after it until the pieces are much shorter than the jump), so the
    continuous part is measured from the recomputed ends (``jumps``: positions 0 and
    ``n_segments`` are those) and each jump is measured on its own.
    """

    def __init__(self, path: ModelPath | Curve):
        if getattr(path, "shard", None) is not None:  # a distributed fit's gather=False
            path.check_whole("measure the length of")  # type: ignore[union-attr]
        from .curves import Curve

        if isinstance(path, Curve):
            self.curve: Curve | None = path
            self.base: ModelPath = path.control
            self.n_segments = CURVE_SEGMENTS
        else:
            self.curve, self.base, self.n_segments = None, path, path.n_points - 1
        self.jumps = self.base.has_batchnorm

    def fresh(self, u: Tensor, own: Tensor | None = None) -> list[int]:
        """The positions among ``u`` whose BatchNorm statistics are recomputed: all
        but a path's points, the ends included when ``jumps``, less those ``own``
        marks (the ends' own models)."""
        if self.curve is not None:
            t = u / self.n_segments
            fresh = torch.ones_like(t, dtype=torch.bool) if self.jumps else (t > 0) & (t < 1)
        else:
            frac = u - u.floor().clamp(0, self.n_segments - 1)
            fresh = (frac > 0) & (frac < 1)
            if self.jumps:
                fresh |= (u == 0) | (u == self.n_segments)
        if own is not None:
            fresh &= ~own
        return torch.nonzero(fresh).flatten().tolist()

    def at(self, u: Tensor, own: Tensor | None = None) -> tuple[ModelPath, list[int]]:
        """The networks at ``u`` (float64), with their positions whose BatchNorm
        statistics must be recomputed (:meth:`fresh`)."""
        from .path import ModelPath

        base, device = self.base, self.base.device
        if self.curve is not None:
            t = u / self.n_segments
            params = self.curve.params_at(t)
            for name, stack in base.params.items():  # the ends bit for bit
                params[name][t == 0] = stack[0]
                params[name][t == 1] = stack[-1]
            nearest = torch.where(t >= 0.5, base.n_points - 1, 0)
        else:
            low = u.floor().clamp(0, self.n_segments - 1)
            frac = u - low
            params = {}
            for name, stack in base.params.items():
                w = frac.to(device=device, dtype=stack.dtype).reshape(-1, *[1] * (stack.ndim - 1))
                a, b = stack[low.long().to(device)], stack[(low.long() + 1).to(device)]
                params[name] = torch.where(w == 0, a, torch.where(w == 1, b, torch.lerp(a, b, w)))
            nearest = (low + (frac >= 0.5).double()).long()
        nearest = nearest.to(device)
        block = ModelPath(
            base.template,
            params,
            {k: v[nearest].clone() for k, v in base.batchnorm_buffers.items()},
            strategy=base.strategy,
            frozen=base.frozen,
            output=base.output,
        )
        return block, self.fresh(u, own)


class _Pieces:
    """``E_x d_FR²`` of equal pieces of a path's segments on one data set.

    In-memory data keep each segment's logits at the positions measured last (within
    ``_CACHE_BYTES``), so that a doubling evaluates only the new midpoints; streamed
    data are measured in one pass per block of networks, the old positions again.
    """

    def __init__(
        self,
        networks: _Networks,
        data: TensorData | StreamData,
        batch_size: int,
        statistics: TensorData | StreamData | None = None,
    ):
        self.networks, self.data, self.batch_size = networks, data, batch_size
        # The BatchNorm statistics of the networks between the points come from all
        # the inputs, as the points' own and path.at(t, X)'s do, even when the
        # predictions are compared on a subset: statistics from two data sets on one
        # path would put steps into it at the points that no refinement removes.
        self.statistics = data if statistics is None else statistics
        self.n_samples = 0  # the inputs the predictions were compared on
        self.cache: dict[int, Tensor] = {}
        self.caching = isinstance(data, TensorData)
        self.nonfinite = False
        # The logits of single networks at integer positions (the points, the ends
        # with and without recomputed statistics), by (position, recomputed): the
        # chords, the jumps and the ends share them.
        self.known: dict[tuple[float, bool], Tensor] = {}

    def remember_points(self, logits: Tensor) -> None:
        """Take a path's points' logits on the data (as :meth:`_Networks.at` gives
        them without recomputed statistics)."""
        if self.caching and logits.shape[0] == self.networks.n_segments + 1:
            for i, row in enumerate(logits):
                self.known[(float(i), False)] = row

    def squares(self, segments: list[int], m: int) -> Tensor:
        """Shape (len(segments), m): each piece's ``E_x d_FR²``."""
        if not self.caching:
            return self._streamed(segments, m)
        per_block = max(1, _POINTS_PER_MEASURE // (m + 1))
        return torch.cat(
            [
                self._block(segments[s : s + per_block], m)
                for s in range(0, len(segments), per_block)
            ]
        )

    def chords(self) -> Tensor:
        """Shape (n_segments,): each segment's ``E_x d_FR²`` between its ends."""
        n_segments = self.networks.n_segments
        if not self.caching:
            return self._streamed(list(range(n_segments)), 1)[:, 0]
        out = []
        for start in range(0, n_segments, _POINTS_PER_MEASURE - 1):
            stop = min(n_segments, start + _POINTS_PER_MEASURE - 1)
            logits = self._logits(torch.arange(start, stop + 1, dtype=torch.float64))
            for i in range(stop - start):
                self._keep(start + i, logits[i : i + 2])
            out.append(self._steps(logits))
        return torch.cat(out)

    def ends(self) -> float:
        """``E_x d_FR²`` between the path's two ends."""
        u = torch.tensor([0.0, float(self.networks.n_segments)], dtype=torch.float64)
        return float(self._steps(self._logits(u, own=torch.ones(2, dtype=torch.bool)))[0])

    def _block(self, segments: list[int], m: int) -> Tensor:
        """:meth:`squares` of a few segments, whose networks are evaluated together."""
        olds = [self.cache.pop(s, None) for s in segments]
        reuse = m % 2 == 0 and all(o is not None and o.shape[0] == m // 2 + 1 for o in olds)
        if reuse:  # only the midpoints are new
            odd = torch.arange(1, m, 2, dtype=torch.float64) / m
            new = self._logits(torch.cat([s + odd for s in segments])).split(m // 2)
            runs = []
            for old, mid in zip(olds, new):
                run = old.new_empty((m + 1, *old.shape[1:]))
                run[0::2], run[1::2] = old, mid
                runs.append(run)
        else:
            frac = torch.arange(m + 1, dtype=torch.float64) / m
            runs = list(self._logits(torch.cat([s + frac for s in segments])).split(m + 1))
        for segment, run in zip(segments, runs):
            self._keep(segment, run)
        return torch.stack([self._steps(run) for run in runs])

    def _keep(self, segment: int, logits: Tensor) -> None:
        if self._room(logits):
            self.cache[segment] = logits

    def _room(self, logits: Tensor) -> bool:
        """Whether ``logits`` fit besides what is kept (counted as if copies)."""
        held = sum(v.element_size() * v.nelement() for v in self.cache.values())
        held += sum(v.element_size() * v.nelement() for v in self.known.values())
        return held + logits.element_size() * logits.nelement() <= _CACHE_BYTES

    def steps(self, u: Tensor, own: Tensor) -> Tensor:
        """``E_x d_FR²`` between the consecutive networks at ``u`` (``own``: see
        :meth:`_Networks.at`)."""
        if self.caching:
            return self._steps(self._logits(u, own))
        block, fresh = self.networks.at(u, own)
        block.recompute_batchnorm(self.statistics, points=fresh, batch_size=self.batch_size)
        stats = path_statistics(block, self.data, batch_size=self.batch_size)
        self.nonfinite |= stats.nonfinite_points.size > 0
        return torch.as_tensor(stats.segment_fisher_rao_sq, dtype=torch.float64)

    def _logits(self, u: Tensor, own: Tensor | None = None) -> Tensor:
        """Logits of the networks at ``u`` on all of the data: (len(u), n, n_classes);
        those at integer positions are remembered and reused."""
        fresh = set(self.networks.fresh(u, own))
        keys = [(v, i in fresh) for i, v in enumerate(u.tolist())]
        missing = [i for i, key in enumerate(keys) if key not in self.known]
        computed = None
        if missing:
            index = torch.tensor(missing)
            computed = self._compute(u[index], None if own is None else own[index])
            for i, row in zip(missing, computed):
                if float(keys[i][0]).is_integer() and self._room(row):
                    self.known[keys[i]] = row
        if computed is not None and len(missing) == len(keys):
            logits = computed
        else:
            found = dict(zip(missing, () if computed is None else computed))
            logits = torch.stack(
                [found[i] if i in found else self.known[key] for i, key in enumerate(keys)]
            )
        self.n_samples = logits.shape[1]
        return logits

    def _compute(self, u: Tensor, own: Tensor | None) -> Tensor:
        """Logits of the networks at ``u``, evaluated."""
        single = u.numel() == 1  # a path has two points at least
        if single:
            u, own = u.repeat(2), None if own is None else own.repeat(2)
        block, fresh = self.networks.at(u, own)
        block.recompute_batchnorm(self.statistics, points=fresh, batch_size=self.batch_size)
        with torch.no_grad():
            logits = torch.cat([block.logits(b.x) for b in self.data.batches(self.batch_size)], 1)
        logits = logits[:1] if single else logits
        if not torch.isfinite(logits).all():
            self.nonfinite = True
        return logits

    @staticmethod
    def _steps(logits: Tensor) -> Tensor:
        """The mean over the data of each step's d_FR² between consecutive rows."""
        steps = []
        for start in range(0, logits.shape[0] - 1, _POINTS_PER_BLOCK):
            block = logits[start : start + _POINTS_PER_BLOCK + 1].double()
            steps.append(segment_divergences(block, fisher_rao_squared).mean(1))
        return torch.cat(steps).cpu()

    def _streamed(self, segments: list[int], m: int) -> Tensor:
        per_block = max(1, _POINTS_PER_MEASURE // (m + 1))
        frac = torch.arange(m + 1, dtype=torch.float64) / m
        out = []
        for s in range(0, len(segments), per_block):
            u = torch.tensor(segments[s : s + per_block], dtype=torch.float64)[:, None] + frac
            block, fresh = self.networks.at(u.flatten())
            block.recompute_batchnorm(self.statistics, points=fresh, batch_size=self.batch_size)
            stats = path_statistics(block, self.data, batch_size=self.batch_size)
            self.n_samples = stats.n_samples
            self.nonfinite |= stats.nonfinite_points.size > 0
            steps = torch.as_tensor(stats.segment_fisher_rao_sq, dtype=torch.float64)
            # The block runs through every piece and, between two segments, one step
            # from a segment's end to the next one's start: dropped.
            out.append(torch.cat([steps, steps.new_zeros(1)]).reshape(-1, m + 1)[:, :m])
        return torch.cat(out)

    def warn_if_nonfinite(self) -> None:
        if self.nonfinite:
            warnings.warn(
                "Networks on the path give NaN or infinite logits on X, so its Fisher–Rao "
                "length is NaN. Likely causes: logits that overflow a low-precision dtype "
                "(float16 overflows above 65504: use float32 or bfloat16 models), or a "
                "model that returns NaN on some inputs.",
                RuntimeWarning,
                stacklevel=3,
            )


def _end_jumps(pieces: _Pieces, inner: Tensor) -> tuple[Tensor, Tensor]:
    """The jumps at the ends (zero without BatchNorm) and the chords at the points
    with the ends' own models, given those with the recomputed ends (``inner``,
    ``E_x d_FR²``).

    One pass over the networks at ``[1, 0*, 0, n, n*, n − 1]`` (``*``: the model's
    own statistics) gives the first chord, the first jump, the line, the last
    jump and the last chord.
    """
    networks, n = pieces.networks, pieces.networks.n_segments
    if not networks.jumps:
        return torch.zeros(2, dtype=torch.float64), inner
    u = torch.tensor([1.0, 0.0, 0.0, n, n, n - 1], dtype=torch.float64)
    own = torch.tensor([False, True, False, False, True, False])
    if n == 1:  # the neighbours are the other end's own model
        own[[0, 5]] = True
    steps = pieces.steps(u, own)
    chords = inner.clone()
    chords[0], chords[-1] = steps[0], steps[4]
    return steps[[1, 3]].clamp_min(0.0).sqrt(), chords


def _with_jumps(segments: Tensor, jumps: Tensor) -> Tensor:
    """Each segment's length with the jumps at the ends added to the end segments."""
    out = segments.clone()
    out[0] += jumps[0]
    out[-1] += jumps[1]
    return out


def _length_sample(
    data: TensorData | StreamData, max_samples: int | None
) -> TensorData | StreamData:
    """``data``, or a fixed random subset of ``max_samples`` of its inputs when it is
    in memory and larger."""
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive integer or None; got {max_samples!r}.")
    if max_samples is None or not isinstance(data, TensorData) or data.n_samples <= max_samples:
        return data
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(data.n_samples, generator=generator)[:max_samples].sort().values
    return TensorData(rows(data.x, index.to(data.home)), None, data.device)


def _length_on(
    path: ModelPath, data: TensorData | StreamData, batch_size: int, chord_squared: np.ndarray
) -> PathLength:
    """:func:`path_length` on ``data``, every interior network's BatchNorm statistics
    recomputed on it."""
    if path.has_batchnorm and path.n_points > 2:
        path = copy.deepcopy(path)
        path.recompute_batchnorm(data, batch_size=batch_size)
        chord_squared = None
    return path_length(path, data, batch_size=batch_size, chord_squared=chord_squared)


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
        Fisher–Rao length on this data (radians) of the path a user gets, the polygon
        between the points (:func:`path_length`).
    euclidean_length : float
        Length in parameter space.
    t_arc : ndarray of shape (n_points,)
        Point positions by Fisher–Rao arc length on this data.
    chord_length : float
        The chord sum ``Σ_i √(E_x d_FR(p_i, p_{i+1})²)`` at the points alone (≤
        ``length``).
    length_error : float
        What ``length`` still misses, estimated (:class:`PathLength`).
    min_length : float
        ``√(E_x d_FR(p_a, p_b)²)`` between the ends on this data: no path between
        them is shorter (see :attr:`length_ratio`).

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
    chord_length: float = float("nan")
    length_error: float = float("nan")
    min_length: float = float("nan")

    @classmethod
    def from_arrays(
        cls,
        loss: np.ndarray,
        accuracy: np.ndarray,
        *,
        length: float = float("nan"),
        euclidean_length: float = float("nan"),
        t_arc: np.ndarray | None = None,
        chord_length: float = float("nan"),
        length_error: float = float("nan"),
        min_length: float = float("nan"),
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
        chord_length, length_error, min_length : float, optional
            The chord sum at the points, the length's error and the shortest
            possible length, if known.

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
            chord_length=float(chord_length),
            length_error=float(length_error),
            min_length=float(min_length),
        )

    @property
    def length_ratio(self) -> float:
        """``length / min_length``: how many times the shortest possible the path is.

        Examples
        --------
        >>> from geoconnect.evaluation import PathEvaluation
        >>> PathEvaluation.from_arrays([0.1, 0.1], [1, 1], length=0.9, min_length=0.3).length_ratio
        3.0
        """
        return length_ratio(self.length, self.min_length)

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
    path: ModelPath, X: object, y: object, *, batch_size: int = 256, lengths: bool = True
) -> PathEvaluation:
    """Evaluate ``path`` on labelled data.

    The loss and accuracy are those of the points; the length is the polygon's
    (:func:`path_length`). For a path with BatchNorm layers, the length is that of
    the path with every interior network's statistics recomputed on ``X``, the
    points' as well as those between them: statistics from two data sets on one path
    would put steps into it that neither has.

    Parameters
    ----------
    path : ModelPath
    X : array-like, tensor, Dataset or DataLoader
        Inputs (a Dataset/DataLoader yields ``(x, y)`` and ``y`` is None).
    y : array-like of shape (n_samples,) or None
        Class indices.
    batch_size : int, default=256
    lengths : bool, default=True
        Whether to measure the Fisher–Rao lengths (False: NaN, for the barriers
        alone, e.g. in ``score``).

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
    if getattr(path, "shard", None) is not None:  # a distributed fit's gather=False
        path.check_whole("evaluate")  # type: ignore[union-attr]
    data = as_data(X, y, device=path.device, dtype=float_dtype(path.template))
    stats = path_statistics(path, data, batch_size=batch_size)
    stats.warn_if_nonfinite()
    if stats.loss is None:
        raise ValueError("evaluate needs labels: pass y, or a Dataset/DataLoader yielding (x, y).")
    if not lengths:
        return PathEvaluation.from_arrays(stats.loss, stats.accuracy)  # type: ignore[arg-type]
    measured = _length_on(path, data, batch_size, stats.segment_fisher_rao_sq)
    return PathEvaluation.from_arrays(
        stats.loss,
        stats.accuracy,  # type: ignore[arg-type]
        length=measured.length,
        euclidean_length=euclidean_length(path),
        t_arc=measured.positions,
        chord_length=measured.chord_length,
        length_error=measured.error,
        min_length=measured.min_length,
    )
