"""The geodesic fit's engine: one state object, an epoch loop, a chunked step.

:class:`~geoconnect.GeodesicConnector` validates its parameters and data, builds the
straight line, and hands it here; everything that moves the path lives in this
module, in the shape of scikit-learn's ``_fit_stochastic`` and skorch's
``fit_loop → run_single_epoch → train_step``::

    fit_path                      the coarse-to-fine levels, Ctrl-C, the result
    └── _run_level                one level: an optimiser, epochs, early stopping
        └── _run_epoch            one pass over the data, recorded once
            └── train_step        one batch: the energy's gradient, chunk by chunk
                └── energy_step   the gradient with respect to the points' logits

All of it works on one :class:`FitState`; :class:`FitSettings` holds the
hyperparameters and :class:`FitResult` what the estimator assigns at the end.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from ._data import Batch, StreamData, TensorData
from ._inputs import Inputs, n_rows
from ._optim import SGD, Adam
from .checkpoint import Checkpoint, checkpoint_epochs
from .distributed import PathGroup
from .divergences import (
    Divergence,
    closed_form_segment_gradient,
    fisher_rao_squared,
)
from .evaluation import (
    euclidean_length,
    fisher_rao_length,
    segment_divergences,
    segment_squared_norms,
)
from .path import ModelPath, Strategy
from .persistence import prefixed

#: The fit's optimisers (see :mod:`geoconnect._optim`).
Optimizer = Adam | SGD

__all__ = [
    "EndLogits",
    "FitResult",
    "FitSettings",
    "FitState",
    "choose_strategy",
    "coarse_to_fine_schedule",
    "copy_history",
    "energy_step",
    "fit_path",
    "path_energy",
    "train_step",
]

#: Interior points whose networks are evaluated together, and hold activations together.
POINTS_PER_CHUNK = 8
#: Segments whose divergence temporaries live together in :func:`energy_step`.
SEGMENTS_PER_BLOCK = 8

HISTORY_KEYS = ("energy", "chord_length", "euclidean_length", "n_points", "seconds")


@dataclass(frozen=True)
class FitSettings:
    """The hyperparameters of a geodesic fit (the connector's, validated).

    Examples
    --------
    >>> from geoconnect.fitting import FitSettings
    >>> FitSettings(max_iter=5).max_iter
    5
    """

    solver: Literal["adam", "sgd"] = "adam"
    learning_rate: float = 3e-3
    #: ``"cosine"``: a curve's rate falls from ``learning_rate`` to 0 along half a
    #: cosine over ``max_iter`` epochs (:func:`scheduled_rate`); ``"adaptive"``: it is
    #: divided by ``ADAPTIVE_DIVISOR`` where early stopping would stop, up to
    #: ``ADAPTIVE_CUTS`` times, and the fit stops at the plateau after. The chain's
    #: is constant.
    learning_rate_schedule: Literal["constant", "cosine", "adaptive"] = "constant"
    #: A curve's step relative to each tensor's scale: ``learning_rate`` times the
    #: RMS distance between the ends' values of the tensor (:func:`relative_scales`).
    relative_step: bool = False
    max_iter: int = 100
    batch_size: int = 256
    #: A curve's step takes this many batches in turn (each at its own ``t``) and
    #: descends their mean; distributed, this many per rank. One for every fit; more
    #: in the tests, which compare a distributed fit with one process's.
    batches_per_step: int = 1
    tol: float = 1e-3
    n_iter_no_change: int = 10
    coarse_to_fine: bool = True
    mixed_precision: bool = False
    strategy: Literal["auto", "vmap", "loop"] = "auto"
    verbose: int = 0
    #: Called with the state after every recorded epoch (benchmarks trace fits with it).
    on_epoch: Callable[[FitState], None] | None = field(default=None, compare=False)
    #: Where the state is written after every epoch, and resumed from (see
    #: :class:`~geoconnect.checkpoint.Checkpoint`).
    checkpoint: Checkpoint | None = field(default=None, compare=False)
    #: The ranks the points are split across (see :mod:`geoconnect.distributed`);
    #: None fits every point in this process.
    group: PathGroup | None = field(default=None, compare=False)


@dataclass
class FitState:
    """Everything a fit carries from step to step, in one place.

    Attributes
    ----------
    target : ModelPath
        The path being fitted; its interior is moved in place. Distributed, it
        holds the rank's shard while it fits
        (:meth:`~geoconnect.distributed.PathGroup.keep_block`), the whole path after.
    path : ModelPath
        The level being optimised: ``target`` itself, or a coarser polygon of it.
    data : TensorData or StreamData
        The batches.
    divergence : callable
        The segment cost.
    settings : FitSettings
    module : nn.Module
        The template with batch-statistics BatchNorm, used for every forward pass.
    ends : EndLogits
        The fixed ends' logits.
    generator : torch.Generator
        The batch order.
    history : dict of str to list
        One entry per epoch, as ``history_``.
    initial_energy : float
        Energy of the initial path (the line, or warm start's path) on the data,
        as the fit measures it: what a diverging fit is recognised by.
    initial_interior : dict of str to Tensor
        A copy of the initial path's interior: a fit that ends with more energy
        returns it instead (one more copy of the interior's parameters).
    lowest : float
        The current level's lowest epoch energy.
    rises : int
        Consecutive epochs whose energy rose.
    warned : set of str
        The warnings this fit has already given (each is given once).
    interior : dict of str to Tensor
        The moving tensors: views of the current level's interior points (see
        :meth:`ModelPath.interior`) — of this rank's block of them when the fit is
        distributed, the only ones it holds; the optimiser updates them in place.
    fixed : dict of str to Tensor
        Views of the same points' frozen parameters.
    block : slice
        Which interior points of the level's stacks :attr:`interior` holds: all of
        them (distributed, the stacks are the rank's shard: its block).
    optimizer : Adam or SGD or None
        The current level's optimiser of ``interior``.
    best, stale : float, int
        Early stopping: the lowest energy of the level, epochs since it improved.
    level, level_epochs : int
        The current level's index in :func:`coarse_to_fine_schedule`, and the epochs
        run on it.
    moments : dict of str to Tensor or None
        Optimiser moments to load into the next level's optimiser (a warm start's or
        a checkpoint's); after a fit, those of the full path's optimiser
        (``"<solver>/<tensor index>/<name>"``).
    """

    target: ModelPath
    path: ModelPath
    data: TensorData | StreamData
    divergence: Divergence
    settings: FitSettings
    module: nn.Module
    ends: EndLogits
    generator: torch.Generator
    history: dict[str, list]
    interior: dict[str, Tensor] = field(default_factory=dict)
    fixed: dict[str, Tensor] = field(default_factory=dict)
    block: slice = field(default_factory=lambda: slice(0, 0))
    optimizer: Optimizer | None = None
    best: float = math.inf
    stale: int = 0
    initial_energy: float = math.nan
    initial_interior: dict[str, Tensor] = field(default_factory=dict)
    lowest: float = math.inf
    rises: int = 0
    warned: set[str] = field(default_factory=set)
    level: int = 0
    level_epochs: int = 0
    moments: dict[str, Tensor] | None = None

    @property
    def n_iter(self) -> int:
        """Epochs run, previous fits' included (``len(history["energy"])``)."""
        return len(self.history["energy"])

    @classmethod
    def start(
        cls,
        path: ModelPath,
        data: TensorData | StreamData,
        divergence: Divergence,
        settings: FitSettings,
        previous: FitResult | None = None,
        generator: torch.Generator | None = None,
    ) -> FitState:
        """The state at the start of a fit: the strategy chosen, the ends cached.

        Sets ``path.strategy`` (by :func:`choose_strategy` when ``settings.strategy``
        is ``"auto"``). A ``previous`` fit's history is continued (copied, never
        modified) and its optimiser moments are loaded into the first level's.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> from geoconnect._data import as_data
        >>> from geoconnect.divergences import jensen_shannon
        >>> from geoconnect.fitting import FitSettings, FitState
        >>> path = ModelPath.linear(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), 5)
        >>> data = as_data(torch.randn(8, 4), device=torch.device("cpu"))
        >>> FitState.start(path, data, jensen_shannon, FitSettings()).n_iter
        0
        """
        check_fittable(path, settings)
        module = path.batch_statistics_module()
        path.strategy = _resolve_strategy(path, data, module, settings)
        state = cls(
            target=path,
            path=path,
            data=data,
            divergence=divergence,
            settings=settings,
            module=module,
            ends=EndLogits(path, data, settings.batch_size),
            generator=torch.Generator() if generator is None else generator,
            history=copy_history(None if previous is None else previous.history),
            moments=None if previous is None else previous.moments,
        )
        state.initial_energy = path_energy(state)
        check_finite_start(state.initial_energy)
        state.initial_interior = {name: view.clone() for name, view in path.interior().items()}
        return state

    def usable(self, batch: Batch) -> bool:
        """False for a batch of one sample through BatchNorm (no batch statistics)."""
        if n_rows(batch.x) > 1 or not self.target.has_batchnorm:
            return True
        if "single" not in self.warned:
            self.warned.add("single")
            warn_batch_of_one(stacklevel=5)
        return False

    def begin_level(self) -> None:
        """Make the current level's interior the moving tensors, with a new optimiser.

        The optimiser starts from :attr:`moments` when there are some (then cleared).
        A distributed fit's level is this rank's shard: it moves its block only.
        """
        self.block = slice(0, self.path.n_points - 2)
        views = {n: v[self.block] for n, v in self.path.interior().items()}
        self.interior = {n: v for n, v in views.items() if n not in self.path.frozen}
        self.fixed = {n: v for n, v in views.items() if n in self.path.frozen}
        self.optimizer = _make_optimizer(self.interior, self.settings)
        if self.moments is not None:
            _load_moments(self.optimizer, self.moments, self.settings.solver)
            self.moments = None
        self.best, self.stale, self.lowest, self.level_epochs = math.inf, 0, math.inf, 0

    def end_level(self) -> None:
        """Detach the moving tensors from the finished (or interrupted) level.

        The full path's optimiser leaves its moments in :attr:`moments`.
        """
        if self.optimizer is not None and self.path is self.target:
            # the optimiser's own tensors: it steps no more (not a second copy of them)
            self.moments = _moments(self.optimizer, self.settings.solver, copy=False)
        for tensor in self.interior.values():
            tensor.grad = None
            tensor.requires_grad_(False)
        self.interior, self.fixed, self.optimizer = {}, {}, None

    def snapshot(self) -> tuple[dict[str, Tensor], dict]:
        """Everything a resumed fit needs, as tensors and a JSON-serialisable record.

        The current level's points, the optimiser's moments, the batch order's and
        torch's random generators, the counters and the history: :meth:`restore`
        continues from it exactly where this fit is.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> from geoconnect._data import as_data
        >>> from geoconnect.divergences import jensen_shannon
        >>> from geoconnect.fitting import FitSettings, FitState
        >>> path = ModelPath.linear(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), 5)
        >>> data = as_data(torch.randn(8, 4), device=torch.device("cpu"))
        >>> tensors, record = FitState.start(path, data, jensen_shannon, FitSettings()).snapshot()
        >>> sorted(tensors)[:3], record["level"], record["n_points"]
        (['level/bias', 'level/weight', 'rng/generator'], 0, 5)
        """
        tensors = {f"level/{name}": stack for name, stack in self.path.params.items()}
        tensors["rng/generator"] = self.generator.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        if self.optimizer is not None:
            moments = _moments(self.optimizer, self.settings.solver)
            tensors.update({f"moments/{key}": value for key, value in moments.items()})
        record = {
            "level": self.level,
            "level_epochs": self.level_epochs,
            "n_points": self.path.whole_points,
            "history": self.history,
            "best": self.best,
            "stale": self.stale,
            "lowest": self.lowest,
            "rises": self.rises,
            "warned": sorted(self.warned),
        }
        return tensors, record

    def restore(self, tensors: dict[str, Tensor], record: dict, levels: list) -> None:
        """Continue from a :meth:`snapshot` of this fit taken after an epoch of ``levels``."""
        level = record["level"]
        if not 0 <= level < len(levels) or levels[level][0] != record["n_points"]:
            raise ValueError(
                f"The checkpoint's level ({level}, of {record['n_points']} points) is not "
                f"one of this fit's levels {levels}: it was written by another version "
                "of geoconnect. Delete it to start afresh."
            )
        self.level = level
        _enter_level(self, record["n_points"])
        with torch.no_grad():
            for name, stack in self.path.params.items():
                stack.copy_(tensors[f"level/{name}"])
        self.moments = prefixed(tensors, "moments/")
        self.begin_level()
        self.generator.set_state(tensors["rng/generator"])
        torch.set_rng_state(tensors["rng/torch"])
        self.history = copy_history(record["history"])
        self.best, self.stale, self.lowest = record["best"], record["stale"], record["lowest"]
        self.rises, self.warned = record["rises"], set(record["warned"])
        self.level_epochs = record["level_epochs"]


def warn_batch_of_one(stacklevel: int) -> None:
    """Say that a BatchNorm batch of one sample is skipped (``stacklevel`` as
    :func:`warnings.warn`'s, from the caller)."""
    warnings.warn(
        "X yielded a batch of one sample; BatchNorm's batch statistics need at "
        "least two, so the fit skips such batches. Give the DataLoader a "
        "batch_size that does not leave one sample over (or drop_last=True).",
        UserWarning,
        stacklevel=stacklevel + 1,
    )


def check_fittable(path: ModelPath, settings: FitSettings) -> None:
    """Refuse what no step can fit: nothing trainable, BatchNorm batches of one."""
    if path.frozen.issuperset(path.params):
        raise ValueError(
            "Every parameter is frozen (requires_grad=False) in both models: there is "
            "nothing to move between them. Unfreeze the parameters the path may move."
        )
    if path.has_batchnorm and settings.batch_size < 2:
        raise ValueError(
            "The models have BatchNorm layers, whose batch statistics need at least "
            f"two samples per batch. Set batch_size ≥ 2 (now {settings.batch_size})."
        )


def _resolve_strategy(
    path: ModelPath, data: TensorData | StreamData, module: nn.Module, settings: FitSettings
) -> Strategy:
    if settings.strategy != "auto":
        return settings.strategy
    if settings.mixed_precision:
        return "loop"  # torch.autocast does not reach inside vmap (torch 2.13)
    first = next(iter(data.batches(settings.batch_size)))
    return choose_strategy(path, first.x, module)


def check_finite_start(energy: float) -> None:
    if not math.isfinite(energy):
        raise ValueError(
            f"The energy of the initial path on X is {energy}: some of its points give "
            "NaN or infinite logits on some inputs. Likely causes: logits that overflow "
            "a low-precision dtype (float16 overflows above 65504: use float32 or "
            "bfloat16 models), or a model that returns NaN on some rows of X (check "
            "model_a(X) and model_b(X))."
        )


@dataclass
class FitResult:
    """What a fit produced, for the estimator to assign in one go.

    Examples
    --------
    >>> from geoconnect.fitting import FitResult
    >>> FitResult(history={"energy": [0.1]}).n_iter
    1
    """

    history: dict[str, list]
    converged: bool = False
    interrupted: bool = False
    #: The full path's optimiser moments at the end (see :attr:`FitState.moments`).
    moments: dict[str, Tensor] | None = None

    @property
    def n_iter(self) -> int:
        """Epochs in the record, previous fits' included."""
        return len(self.history["energy"])


def copy_history(history: dict[str, list] | None = None) -> dict[str, list]:
    """A fresh per-epoch record with every key, continuing ``history`` (not modified).

    Examples
    --------
    >>> from geoconnect.fitting import copy_history
    >>> copy_history({"energy": [0.5]})["energy"], copy_history()["n_points"]
    ([0.5], [])
    """
    history = dict(history or {})
    if "length" in history and "chord_length" not in history:  # an older checkpoint
        history["chord_length"] = history.pop("length")
    return {key: list(history.get(key, [])) for key in HISTORY_KEYS}


# -- the loop ---------------------------------------------------------------------------


def fit_path(
    path: ModelPath,
    data: TensorData | StreamData,
    divergence: Divergence,
    settings: FitSettings,
    previous: FitResult | None = None,
    generator: torch.Generator | None = None,
) -> FitResult:
    """Minimise the energy of ``path``'s interior on ``data``; the path moves in place.

    Runs the coarse-to-fine levels of :func:`coarse_to_fine_schedule`, each an Adam or
    SGD descent with early stopping on the last. Ctrl-C keeps what was learned: a
    coarser level is spread out to the full path, and a warning says how many epochs
    were complete. A ``ConvergenceWarning`` says when ``max_iter`` ran out first.
    With ``settings.checkpoint``, the state is written after every epoch, and a
    checkpoint found there is resumed: the result is the uninterrupted fit's.

    Parameters
    ----------
    path : ModelPath
        The initial path (ends fixed); its interior is updated in place.
    data : TensorData or StreamData
        The batches.
    divergence : callable
        The segment cost ``(logits_p, logits_q) -> per-sample tensor``.
    settings : FitSettings
    previous : FitResult, optional
        A previous fit to continue: its history (copied, not modified) and its
        optimiser moments (a warm start).
    generator : torch.Generator, optional
        The batch order; default a fresh, unseeded one.

    Returns
    -------
    FitResult

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect._data import as_data
    >>> from geoconnect.divergences import jensen_shannon
    >>> from geoconnect.fitting import FitSettings, fit_path
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> path = ModelPath.linear(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), 5)
    >>> data = as_data(torch.randn(32, 4), device=torch.device("cpu"))
    >>> result = fit_path(path, data, jensen_shannon, FitSettings(max_iter=3, tol=0.0))
    >>> result.n_iter, len(result.history["energy"])
    (3, 3)
    """
    levels = coarse_to_fine_schedule(path.n_points, settings.max_iter, settings.coarse_to_fine)
    if settings.group is not None:  # each rank holds its block only, and the ends
        path.take_points(settings.group.keep_block(path))
    state = FitState.start(path, data, divergence, settings, previous, generator)
    saved = _resumable(settings)
    if saved is not None:
        state.restore(*saved, levels)
    converged = interrupted = False
    with progress_bar(settings, sum(epochs for _, epochs in levels)) as bar:
        bar.update(sum(epochs for _, epochs in levels[: state.level]) + state.level_epochs)
        try:
            for level in range(state.level, len(levels)):
                state.level = level
                n_points, epochs = levels[level]
                _enter_level(state, n_points)
                converged = _run_level(state, epochs, bar, final=level == len(levels) - 1)
        except KeyboardInterrupt:
            if settings.group is not None:
                # The ranks stop at different points: no path common to them to keep.
                # Every rank raises; a checkpointed fit resumes from the last epoch.
                raise
            interrupted = True
            warnings.warn(
                f"Fitting interrupted after {state.n_iter} complete epoch(s) (n_iter_ = "
                f"{state.n_iter}); the path keeps what was learned so far.",
                RuntimeWarning,
                stacklevel=4,  # fit_path, the connector's _fit, fit, the caller
            )
        finally:
            state.end_level()
    _enter_level(state, path.whole_points)  # a coarser level, if interrupted, spread out
    if _check_descent(state):
        state.moments = None  # a diverged descent's moments: no warm start from them
    if not (converged or interrupted):
        warn_not_converged(settings, stacklevel=5)  # this, fit_path, _fit, fit, the caller
    if settings.group is not None:  # every rank the whole path, the fit's copies freed
        state.initial_interior = {}
        path.take_points(settings.group.whole_path(path))
    return FitResult(state.history, converged, interrupted, state.moments)


def warn_not_converged(settings: FitSettings, stacklevel: int) -> None:
    """The ``ConvergenceWarning`` of a geodesic fit that ran out of ``max_iter``."""
    warnings.warn(
        f"GeodesicConnector stopped at max_iter={settings.max_iter} epochs before the "
        f"energy converged (tol={settings.tol}, n_iter_no_change="
        f"{settings.n_iter_no_change}). Raise max_iter, or continue with "
        "warm_start=True.",
        ConvergenceWarning,
        stacklevel=stacklevel,
    )


def _resumable(settings: FitSettings) -> tuple[dict[str, Tensor], dict] | None:
    """The checkpoint to resume from: the latest, or distributed the latest epoch that
    every rank has (a crash while the ranks wrote leaves some a epoch ahead)."""
    checkpoint, group = settings.checkpoint, settings.group
    if checkpoint is None or group is None:
        return None if checkpoint is None else checkpoint.saved
    found = {checkpoint_epochs(record): (tensors, record) for tensors, record in checkpoint.found}
    every = [set(epochs) for epochs in group.gather(sorted(found))]  # type: ignore[arg-type]
    common = set.intersection(*every)
    return found[max(common)] if common else None


@torch.no_grad()
def path_energy(state: FitState) -> float:
    """The energy of the full path on the data, measured as the fit measures it.

    The points are evaluated with batch-statistics BatchNorm, a chunk at a time. The
    first batch also checks the divergence: a negative value would make the fit
    maximise distance, and is refused. Distributed, each rank measures the segments
    of its block (the one from the left neighbour's last point with its logits,
    exchanged) and the sums are added up.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect._data import as_data
    >>> from geoconnect.divergences import jensen_shannon
    >>> from geoconnect.fitting import FitSettings, FitState, path_energy
    >>> net = torch.nn.Linear(4, 3)
    >>> path = ModelPath.linear(net, net, 5)  # a model and itself
    >>> data = as_data(torch.randn(8, 4), device=torch.device("cpu"))
    >>> path_energy(FitState.start(path, data, jensen_shannon, FitSettings()))
    0.0
    """
    group = state.settings.group
    total = torch.zeros((), dtype=torch.float64, device=state.target.device)
    seen = 0
    for batch in state.data.batches(state.settings.batch_size):
        if not state.usable(batch):
            continue
        for values in _segment_values(state, batch):
            if seen == 0:
                _check_sign(values)
            total += values.double().sum()
        seen += n_rows(batch.x)
    if group is not None:
        group.sum(total)
    return float(total) / seen if seen else math.nan


def _segment_values(state: FitState, batch: Batch) -> Iterator[Tensor]:
    """The path's divergences on the batch, a chunk of points at a time: every
    segment, or distributed those the rank reports (:func:`_owned_segments`)."""
    path, left = state.target, None
    first, stop = 0, path.n_points  # the points evaluated here, in the path's stacks
    if state.settings.group is not None:
        if path.n_points == 2:  # no block: no segment of its own
            _shard_bounds(state, batch)  # the exchange, in which every rank takes part
            return
        left, last = _shard_bounds(state, batch)
        first, stop = int(left is not None), path.n_points - int(not last)
    for start in range(first, stop, POINTS_PER_CHUNK):
        params = {k: v[start : min(start + POINTS_PER_CHUNK, stop)] for k, v in path.params.items()}
        out = path.functional_forward(params, batch.x, module=state.module)
        block = out if left is None else torch.cat([left, out])
        if len(block) > 1:
            yield segment_divergences(block, state.divergence)
        left = out[-1:]


def _shard_bounds(state: FitState, batch: Batch) -> tuple[Tensor | None, bool]:
    """A rank's left neighbour's last point's logits on the batch, shape (1, batch, C)
    (None for the first block, whose left is ``a``), and whether its block is the last.
    """
    path = state.target
    end = state.ends.logits(batch)
    if path.n_points > 2:
        params = {k: v[[1, path.n_points - 2]] for k, v in path.params.items()}
        bounds = path.functional_forward(params, batch.x, module=state.module).to(end.dtype)
    else:
        bounds = torch.zeros_like(end)
    group = state.settings.group
    assert group is not None
    left, right = group.neighbours(bounds[0], bounds[-1], path.whole_points - 2, step=False)
    return (None if left is None else left.unsqueeze(0)), right is None


def _check_sign(values: Tensor) -> None:
    low = float(values.min()) if values.numel() else 0.0
    if low < -1e-6:
        raise ValueError(
            f"The divergence returned a negative value ({low:.3g}) between neighbouring "
            "points of the straight line. A divergence must be ≥ 0 (and 0 only between "
            "equal distributions), or fitting would push the points apart. Check its "
            "sign; geoconnect.testing.check_divergence tests every property."
        )


def coarse_to_fine_schedule(
    n_points: int, max_iter: int, coarse_to_fine: bool = True
) -> list[tuple[int, int]]:
    """The levels of a fit: ``(n_points, epochs)`` each, the last the full path's.

    Each coarser level has about half the points of the next (25 → 13 → 7 → 4) and
    twice its epochs (2, 4, 8): a few interior points find the geodesic's shape at a
    fraction of the cost, and the finer levels start close to it. The coarse levels
    come out of ``max_iter``: they take at most half of it, the coarsest levels
    dropped first, so the epochs of all levels add up to at most ``max_iter``.

    Parameters
    ----------
    n_points : int
        Points of the full path.
    max_iter : int
        The epoch budget of the whole fit.
    coarse_to_fine : bool, default=True
        False: one level, the full path, for ``max_iter`` epochs.

    Returns
    -------
    list of (int, int)

    Examples
    --------
    >>> from geoconnect.fitting import coarse_to_fine_schedule
    >>> coarse_to_fine_schedule(25, 100)
    [(4, 8), (7, 4), (13, 2), (25, 86)]
    >>> coarse_to_fine_schedule(25, 8)
    [(13, 2), (25, 6)]
    >>> coarse_to_fine_schedule(25, 1)
    [(25, 1)]
    """
    sizes = [n_points]
    while coarse_to_fine and sizes[0] > 5:
        sizes.insert(0, (sizes[0] + 2) // 2)
    coarse = [(size, 2 ** (len(sizes) - 1 - k)) for k, size in enumerate(sizes[:-1])]
    while coarse and sum(epochs for _, epochs in coarse) > max_iter // 2:
        coarse.pop(0)
    return [*coarse, (n_points, max_iter - sum(epochs for _, epochs in coarse))]


def _enter_level(state: FitState, n_points: int) -> None:
    """Make ``state.path`` the level of ``n_points``, resampled from the current one.

    Distributed, the current level is gathered, resampled, and the rank keeps its
    block of the new one (a level's points are a resampling of the whole level).
    """
    if state.path.whole_points == n_points:
        return
    group = state.settings.group
    whole = state.path if group is None else group.whole_path(state.path)
    level = whole.resample(n_points)
    if group is not None:
        level = group.keep_block(level)
    if n_points == state.target.whole_points:
        state.target.copy_interior_from(level)
        level = state.target
    state.path = level


# A fit warns when its energy rises this many epochs running to this many times the
# level's lowest, and gives back more than this fraction of what the level had gained
# from its first epoch to its lowest: on a plateau the epoch means wobble by up to a
# fifth (the digits CNN's rose 19 % in three epochs while its barrier still fell), and
# near convergence by half (a digits MLP's rose seven epochs running, 0.0044 to 0.0068,
# after falling from 0.024, with no barrier left); a diverging descent climbs back
# towards, or past, where the level began.
_RISES = 3
_CLIMB = 1.5
_GIVEN_BACK = 0.5


def _check_descent(state: FitState) -> bool:
    """Never end worse than the start: a fit that raised the energy returns its start.

    The final path is measured as the initial one was (the epochs' energies are means
    over a moving path, which Adam's first large steps inflate). When it has more
    energy, the descent diverged: the initial path (the line, or warm start's) is put
    back, with a warning that says so. Returns True then.
    """
    final, initial = path_energy(state), state.initial_energy
    if not diverged(final, initial):
        return False
    with torch.no_grad():
        for name, view in state.target.interior().items():
            view.copy_(state.initial_interior[name])
    warn_diverged(final, initial, state.settings.learning_rate, stacklevel=6)
    return True


def diverged(final: float, initial: float) -> bool:
    """Whether a fit's energy ended above where it began (beyond rounding)."""
    return final > initial * (1.0 + 1e-3) + 1e-12


def warn_diverged(
    final: float | tuple[float, float],
    initial: float | tuple[float, float],
    learning_rate: float,
    stacklevel: int,
) -> None:
    """The warning of a fit that ended above its start, and returns the start: its
    energy, or its (energy, length)."""
    if isinstance(final, tuple) and isinstance(initial, tuple):
        ended = f"energy {final[0]:.4g} and length {final[1]:.4g}"
        began = f"{initial[0]:.4g} and {initial[1]:.4g}"
    else:
        ended, began = f"energy {final:.4g}", f"{initial:.4g}"
    warnings.warn(
        f"The fit ended with {ended}, against the {began} of the path it "
        "started from: the descent diverged. The path returned is the one the fit "
        "started from (the straight line, or warm_start's path_), not the diverged one. "
        f"Lower learning_rate_init (now {learning_rate}).",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def _run_level(state: FitState, epochs: int, bar: tqdm, *, final: bool) -> bool:
    """Descend on the current level for up to ``epochs``; True when it converged.

    A level resumed from a checkpoint is already begun, some of its epochs run.
    Each epoch ends with the checkpoint, written after early stopping has counted
    it, so that a resumed fit stops where the uninterrupted one did.
    """
    if state.optimizer is None:
        state.begin_level()
    stopped = final and state.stale >= state.settings.n_iter_no_change
    while not stopped and state.level_epochs < epochs:
        energy = _run_epoch(state, bar)
        state.level_epochs += 1
        stopped = final and update_no_improvement_count(state, energy)
        if state.settings.checkpoint is not None:
            state.settings.checkpoint.write(*state.snapshot())
    if not stopped:
        state.end_level()
    return stopped


def _make_optimizer(interior: dict[str, Tensor], settings: FitSettings) -> Optimizer:
    """Adam (torch's fused kernel where it has one) or SGD over the moving tensors."""
    tensors = [t.requires_grad_(True) for t in interior.values()]
    if settings.solver == "sgd":
        return SGD(tensors, lr=settings.learning_rate)
    return Adam(tensors, lr=settings.learning_rate)


def _moments(optimizer: Optimizer, solver: str, *, copy: bool = True) -> dict[str, Tensor]:
    """The optimiser's state tensors, ``"<solver>/<tensor index>/<name>"``: copied, or
    (``copy=False``) its own."""
    return {
        f"{solver}/{index}/{name}": value
        for index, entry in optimizer.moments(copy=copy).items()
        for name, value in entry.items()
    }


def _load_moments(optimizer: Optimizer, moments: dict[str, Tensor], solver: str) -> None:
    """Load :func:`_moments` of the same solver and tensors into ``optimizer``."""
    params = optimizer.params
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in moments.items():
        owner, index, name = key.split("/", 2)
        if owner != solver:
            return  # another solver's moments mean nothing to this one
        if int(index) >= len(params) or (value.ndim and value.shape != params[int(index)].shape):
            return  # another path's
        state.setdefault(int(index), {})[name] = value
    optimizer.load_moments(state)


def relative_scales(path: ModelPath, names: Iterable[str]) -> list[float]:
    """Each named tensor's scale: the RMS distance between its values at the path's
    ends (the RMS of its values where the ends agree, 1 where both are zero).

    A step ``learning_rate × scale`` is then the same fraction of the way between
    the models for every tensor, whatever the architecture's parametrisation: a
    fine-tune's weights, close to each other, move as little as it moved them.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.fitting import relative_scales
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> with torch.no_grad():
    ...     _ = a.weight.fill_(0.0), b.weight.fill_(3.0), a.bias.fill_(2.0), b.bias.fill_(2.0)
    >>> relative_scales(ModelPath.linear(a, b, 3), ["weight", "bias"])
    [3.0, 2.0]
    """
    scales = []
    for name in names:
        stack = path.params[name].detach().double()
        for value in ((stack[-1] - stack[0]), stack[[0, -1]], None):
            rms = 1.0 if value is None else float(value.pow(2).mean().sqrt())
            if rms > 0.0 and math.isfinite(rms):
                break
        scales.append(rms)
    return scales


#: ``learning_rate="adaptive"`` divides a curve's rate by this at each plateau ...
ADAPTIVE_DIVISOR = 5.0
#: ... this many times before a plateau stops the fit.
ADAPTIVE_CUTS = 2


def scheduled_rate(settings: FitSettings, epoch: int, cuts: int = 0) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under the settings' schedule,
    after ``cuts`` plateaus of an ``"adaptive"`` one.

    Examples
    --------
    >>> from geoconnect.fitting import FitSettings, scheduled_rate
    >>> cosine = FitSettings(learning_rate=0.01, max_iter=4, learning_rate_schedule="cosine")
    >>> [round(scheduled_rate(cosine, k), 5) for k in range(4)]
    [0.01, 0.00854, 0.005, 0.00146]
    """
    if settings.learning_rate_schedule == "constant":
        return settings.learning_rate
    if settings.learning_rate_schedule == "adaptive":
        return settings.learning_rate / ADAPTIVE_DIVISOR**cuts
    return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * epoch / settings.max_iter))


def update_no_improvement_count(state: FitState, energy: float) -> bool:
    """Early stopping: True after ``n_iter_no_change`` epochs without improvement.

    An epoch improves when it lowers the level's best energy by more than ``tol``
    times that energy: a relative rule, so that it means the same for every
    divergence's units and every number of points.
    """
    settings = state.settings
    if energy < state.best * (1.0 - settings.tol):
        state.stale = 0
    else:
        state.stale += 1
    state.best = min(state.best, energy)
    return state.stale >= settings.n_iter_no_change


def _run_epoch(state: FitState, bar: tqdm) -> float:
    """One pass over the data, a step per batch; recorded; returns the epoch's energy."""
    tic = time.perf_counter()
    segments = state.path.whole_points - 1
    device = state.path.device
    energy_sum = torch.zeros(segments, device=device, dtype=torch.float64)
    length_sum = torch.zeros_like(energy_sum)
    seen = 0
    owned = _owned_segments(state)
    for batch in state.data.batches(state.settings.batch_size, generator=state.generator):
        if not state.usable(batch):
            continue
        costs, fr_squared = train_step(state, batch)
        state.optimizer.step()  # type: ignore[union-attr]
        width = owned.stop - owned.start
        energy_sum[owned] += costs[:width]
        length_sum[owned] += fr_squared[:width]
        seen += n_rows(batch.x)
    _share_epoch(state, energy_sum, length_sum)
    if seen == 0:
        raise ValueError(
            "No batch of X had two or more samples, which BatchNorm's batch statistics "
            f"need. Set batch_size ≥ 2 (now {state.settings.batch_size}) or give a "
            "DataLoader with batches of two or more."
        )
    # One host-device synchronisation per epoch, here.
    energy = float(energy_sum.sum()) / seen
    if not np.isfinite(energy):
        raise ValueError(
            f"The energy became {energy} in epoch {state.n_iter + 1}, from a finite "
            f"{state.initial_energy:.4g} at the start: the steps moved the points to "
            "networks with NaN or infinite outputs. Lower learning_rate_init (now "
            f"{state.settings.learning_rate}), or check that the divergence is finite "
            "for these models."
        )
    length = fisher_rao_length(length_sum / seen)
    _record_epoch(state, energy, length, time.perf_counter() - tic, bar)
    return energy


def _owned_segments(state: FitState) -> slice:
    """The level's segments whose sums this process reports: all, or its rank's."""
    group = state.settings.group
    n_interior = state.path.whole_points - 2
    return slice(0, n_interior + 1) if group is None else group.owned_segments(n_interior)


def _share_epoch(state: FitState, energy_sum: Tensor, length_sum: Tensor) -> None:
    """Distributed: the segment sums added up, so that every rank records the same
    epoch and stops at the same one."""
    group = state.settings.group
    if group is None:
        return
    group.sum(energy_sum)
    group.sum(length_sum)


def _record_epoch(state: FitState, energy: float, length: float, seconds: float, bar: tqdm) -> None:
    """Everything an epoch records goes through here: history, progress bar, log line."""
    record = {
        "energy": energy,
        "chord_length": length,
        "euclidean_length": _euclidean_length(state),
        "n_points": state.path.whole_points,
        "seconds": seconds,
    }
    previous = state.history["energy"][-1] if state.history["energy"] else math.inf
    same_level = state.history["n_points"][-1:] == [record["n_points"]]
    state.rises = state.rises + 1 if same_level and energy > previous else 0
    for key, value in record.items():
        state.history[key].append(value)
    climbed = _climbed(state, energy)
    state.lowest = min(state.lowest, energy)
    if state.rises >= _RISES and climbed and "rising" not in state.warned:
        state.warned.add("rising")
        warnings.warn(
            f"The energy rose for {state.rises} epochs running (to {energy:.4g} in epoch "
            f"{state.n_iter}): the descent is unstable. Lower learning_rate_init (now "
            f"{state.settings.learning_rate}).",
            RuntimeWarning,
            stacklevel=7,
        )
    bar.update(1)
    bar.set_postfix(points=record["n_points"], energy=f"{energy:.4g}", chord_length=f"{length:.4g}")
    if state.settings.on_epoch is not None:
        state.settings.on_epoch(state)
    if state.settings.verbose >= 2:
        print(
            f"epoch {state.n_iter:4d}  points {record['n_points']:3d}  "
            f"energy {energy:.6g}  chord length {length:.6g}  "
            f"euclidean length {record['euclidean_length']:.6g}"
        )


def _euclidean_length(state: FitState) -> float:
    """The level's length in parameter space; distributed, each rank's segments
    (from its left neighbour's last point, :meth:`~geoconnect.distributed.PathGroup.point_before`)
    added up."""
    group, path = state.settings.group, state.path
    if group is None:
        return euclidean_length(path)
    last = path.whole_points - 2 == path.shard.stop  # type: ignore[union-attr]
    before = group.point_before(path)
    if path.n_points == 2:  # no block: no segment
        return float(group.sum(torch.zeros((), dtype=torch.float64, device=path.device)))
    total = torch.zeros((), dtype=torch.float64, device=path.device)
    joining = {name: torch.stack([before[name], stack[1]]) for name, stack in path.params.items()}
    own = {name: stack[1 : None if last else -1] for name, stack in path.params.items()}
    for stacks in (joining, own):  # the segment to the block, then the block's own
        squared = segment_squared_norms(stacks, path.frozen)
        if squared is not None:
            total += squared.sqrt().sum()
    return float(group.sum(total))


def _climbed(state: FitState, energy: float) -> bool:
    """Whether ``energy`` (just recorded) is well above the level's lowest before it.

    Well above: more than ``_CLIMB`` times it, and more than ``_GIVEN_BACK`` of the
    way back from it to the level's first epoch (the comment at ``_RISES`` says why).
    """
    first = state.history["energy"][-1 - state.level_epochs]  # the level's first epoch
    lowest = state.lowest
    return energy > _CLIMB * lowest and energy > lowest + _GIVEN_BACK * (first - lowest)


@contextlib.contextmanager
def progress_bar(settings: FitSettings, total: int, desc: str = "geodesic") -> Iterator[tqdm]:
    """The fit's progress bar over ``total`` epochs, shown with ``verbose=1``."""
    bar = tqdm(total=total, disable=settings.verbose != 1, desc=desc, unit="epoch")
    try:
        yield bar
    finally:
        bar.close()


# -- the step ---------------------------------------------------------------------------


def train_step(state: FitState, batch: Batch) -> tuple[Tensor, Tensor]:
    """Set the interior's gradient of the batch's energy; return its segments' sums.

    The interior is evaluated ``POINTS_PER_CHUNK`` points at a time, each network once.
    A point's gradient needs only its neighbours' logits, so a chunk is
    back-propagated as soon as the next chunk's first point is known::

        a ─ 1 ─ 2 ─ … ─ 8 ═ 9 ─ 10 ─ … ─ 16 ═ 17 ─ … ─ b
            └─ chunk 0 ──┘   └─── chunk 1 ──┘   └ chunk 2 …

    Chunk 0 owns the segments from the fixed end ``a`` to its last point; each later
    chunk owns the segments among its own points (and the last chunk the one to
    ``b``). The joining segment ``═`` is computed when the later chunk is evaluated:
    its gradient completes the earlier chunk's, which is then back-propagated and
    freed before the later chunk's own segments are differentiated. So at most two
    chunks' networks hold their activations at once, whatever ``n_points``, and the
    result is the gradient of the whole batch's energy.

    A distributed fit runs this on its rank's block, with the neighbouring ranks'
    boundary logits (:func:`_neighbour_logits`) in place of ``a`` and ``b``.

    Parameters
    ----------
    state : FitState
        Its optimiser's tensors (the interior) receive the gradient.
    batch : Batch

    Returns
    -------
    costs, fr_squared : Tensor, shape=[n_points − 1], float64
        Each segment's divergence and d_FR², summed over the batch; distributed, of
        the segments that touch the rank's block (one more than its points).

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect._data import as_data
    >>> from geoconnect.divergences import jensen_shannon
    >>> from geoconnect.fitting import FitSettings, FitState, train_step
    >>> path = ModelPath.linear(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), 5)
    >>> data = as_data(torch.randn(8, 4), device=torch.device("cpu"))
    >>> state = FitState.start(path, data, jensen_shannon, FitSettings())
    >>> state.begin_level()
    >>> costs, fr = train_step(state, next(iter(data.batches(8))))
    >>> costs.shape
    torch.Size([4])
    """
    end = state.ends.logits(batch)
    before, after = _neighbour_logits(state, batch, end)
    step = _Step(state.interior, state.divergence)
    n_block = state.block.stop - state.block.start
    if n_block == 0:  # a rank with no point of this level: nothing to differentiate
        zeros = torch.zeros(0, dtype=torch.float64, device=end.device)
        return zeros, zeros
    left, pending = before, None  # the point before the chunk, not differentiated
    for start in range(0, n_block, POINTS_PER_CHUNK):
        where = slice(start, min(start + POINTS_PER_CHUNK, n_block))
        chunk = _forward_chunk(state, where, batch.x, end.dtype)
        right = after if where.stop == n_block else end[:0]  # after the last chunk
        if pending is None:
            chunk.grad = step.first_chunk(left, chunk, right)
        else:
            chunk.grad = step.next_chunk(left, chunk, right, pending)
        left, pending = chunk.logits[-1:].detach().clone(), chunk
    step.backward(pending)  # type: ignore[arg-type]
    return torch.cat(step.costs), torch.cat(step.fr_squared)


def _neighbour_logits(state: FitState, batch: Batch, end: Tensor) -> tuple[Tensor, Tensor]:
    """The logits of the points just before and after the block, shape (1, batch, C).

    The fixed ends ``a`` and ``b`` in one process. Distributed, every rank first
    evaluates its block's first and last points (no gradient) and the ranks swap
    them: two (batch × classes) tensors per rank, whatever the model's size.
    """
    group = state.settings.group
    if group is None:
        return end[:1], end[1:]
    n_interior = state.path.whole_points - 2
    if state.block.stop > state.block.start:
        with torch.no_grad():
            last = state.block.stop - state.block.start - 1
            bounds = _forward_chunk(state, [0, last], batch.x, end.dtype).logits
    else:
        bounds = torch.zeros_like(end)  # nothing of its own to tell its neighbours
    left, right = group.neighbours(bounds[0], bounds[-1], n_interior)
    return (
        end[:1] if left is None else left.unsqueeze(0),
        end[1:] if right is None else right.unsqueeze(0),
    )


@dataclass
class _Chunk:
    """Interior points evaluated together, their logits, and the gradient they await."""

    where: slice
    leaves: dict[str, Tensor]
    logits: Tensor
    grad: Tensor | None = None


def _forward_chunk(
    state: FitState, where: slice | list[int], x: Inputs, dtype: torch.dtype
) -> _Chunk:
    """Evaluate the block's points ``where`` as fresh leaves of the autograd graph."""
    leaves = {n: t[where].detach().requires_grad_(True) for n, t in state.interior.items()}
    fixed = {n: t[where] for n, t in state.fixed.items()}
    precision = (
        torch.autocast(state.path.device.type, dtype=torch.bfloat16)
        if state.settings.mixed_precision
        else contextlib.nullcontext()
    )
    with precision:
        out = state.path.functional_forward({**leaves, **fixed}, x, module=state.module)
    return _Chunk(where, leaves, out.to(dtype))


@dataclass
class _Step:
    """One step's gradient bookkeeping: the segment sums, in path order, and backward."""

    interior: dict[str, Tensor]
    divergence: Divergence
    costs: list[Tensor] = field(default_factory=list)
    fr_squared: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        for tensor in self.interior.values():
            if tensor.grad is None:
                tensor.grad = torch.empty_like(tensor)

    def energy(self, logits: Tensor) -> Tensor:
        """Gradient of the energy of the segments between ``logits``; sums recorded."""
        grad, costs, fr_squared = energy_step(logits, self.divergence)
        self.costs.append(costs)
        self.fr_squared.append(fr_squared)
        return grad

    def first_chunk(self, left: Tensor, chunk: _Chunk, right: Tensor) -> Tensor:
        """Chunk 0: its segments from the end ``a`` (and to ``b`` if it is the last)."""
        own = chunk.logits.detach()
        return self.energy(torch.cat([left, own, right]))[1 : len(own) + 1]

    def next_chunk(self, left: Tensor, chunk: _Chunk, right: Tensor, pending: _Chunk) -> Tensor:
        """A later chunk: the joining segment completes ``pending``, then its own."""
        own = chunk.logits.detach()
        join = self.energy(torch.cat([left, own[:1]]))
        pending.grad[-1] += join[0]  # type: ignore[index]
        self.backward(pending)
        inside = torch.cat([own, right])
        grad = self.energy(inside) if len(inside) > 1 else torch.zeros_like(inside)
        grad[0] += join[1]
        return grad[: len(own)]

    def backward(self, chunk: _Chunk) -> None:
        """Back-propagate a chunk into its slice of the interior's gradient, and free it."""
        # The leaves' gradients are the interior's, zeroed: autograd adds into them in
        # place, not into a tensor of its own that would then be copied there (one
        # more chunk of parameters, at the peak of the step).
        for name, leaf in chunk.leaves.items():
            leaf.grad = self.interior[name].grad[chunk.where].zero_()  # type: ignore[index]
        # The vector-Jacobian product as the gradient of a scalar: the same numbers
        # (each logit's gradient times one), without backward(gradient=)'s first-use
        # import of sympy (0.7 s, as long as several epochs of a small network).
        torch.sum(chunk.logits * chunk.grad).backward()
        chunk.leaves, chunk.grad = {}, None


class EndLogits:
    """The fixed ends' eval-mode logits, computed once per sample when data allow.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect._data import as_data
    >>> from geoconnect.fitting import EndLogits
    >>> path = ModelPath.linear(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), 5)
    >>> data = as_data(torch.randn(8, 4), device=torch.device("cpu"))
    >>> EndLogits(path, data, 4).logits(next(iter(data.batches(4)))).shape
    torch.Size([2, 4, 3])
    """

    def __init__(self, path: ModelPath, data: TensorData | StreamData | None, batch_size: int):
        self.path = path
        self.cache: Tensor | None = None
        if isinstance(data, TensorData):
            blocks = [path.logits(batch.x, points=[0, -1]) for batch in data.batches(batch_size)]
            self.cache = torch.cat(blocks, dim=1)

    def logits(self, batch: Batch) -> Tensor:
        """Shape (2, batch, n_classes): ``a``'s and ``b``'s logits on the batch."""
        if self.cache is not None and batch.index is not None:
            return self.cache[:, batch.index]
        return self.path.logits(batch.x, points=[0, -1])


# -- the energy's gradient --------------------------------------------------------------


def energy_step(logits: Tensor, divergence: Divergence) -> tuple[Tensor, Tensor, Tensor]:
    """The energy's gradient on one batch, and its segments' sums, a block at a time.

    The energy of a batch is ``Σ_i mean_x divergence(p_i(x), p_{i+1}(x))`` (DESIGN.md);
    its gradient with respect to the points' logits is what :func:`train_step`
    back-propagates through the networks. The divergence's temporaries scale with
    segments × batch × classes, so the segments are taken ``SEGMENTS_PER_BLOCK`` at a
    time, each block differentiated and freed before the next: the result is the same
    as differentiating all segments at once, with a fraction of the peak memory. A
    divergence with a closed-form segment gradient (the default, ``jensen_shannon``)
    is applied without automatic differentiation; any other is differentiated by
    autograd.

    Parameters
    ----------
    logits : Tensor, shape=[K, batch, n_classes]
        The points' logits on one batch, in path order (not differentiated through).
    divergence : callable
        The segment cost, ``(logits_p, logits_q) -> Tensor`` of per-sample values.

    Returns
    -------
    grad : Tensor, shape=[K, batch, n_classes]
        Gradient of the batch's energy with respect to ``logits``.
    costs : Tensor, shape=[K − 1], float64
        Each segment's divergence summed over the batch.
    fr_squared : Tensor, shape=[K − 1], float64
        Each segment's d_FR² summed over the batch, for the Fisher–Rao length.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.divergences import jensen_shannon
    >>> from geoconnect.fitting import energy_step
    >>> grad, costs, fr = energy_step(torch.zeros(3, 8, 4), jensen_shannon)
    >>> grad.shape, costs.tolist(), fr.tolist()
    (torch.Size([3, 8, 4]), [0.0, 0.0], [0.0, 0.0])
    """
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise TypeError(
            "logits must be a tensor of shape (K, batch, n_classes); got "
            f"{type(logits).__name__}{tuple(getattr(logits, 'shape', ()))}."
        )
    logits = logits.detach()
    if logits.shape[0] <= SEGMENTS_PER_BLOCK + 1:  # one block
        return _energy_block(logits, divergence)
    grad = torch.zeros_like(logits)
    costs, fr = [], []
    for start in range(0, logits.shape[0] - 1, SEGMENTS_PER_BLOCK):
        stop = start + SEGMENTS_PER_BLOCK + 1  # the block's points, with the next one
        block_grad, block_costs, block_fr = _energy_block(logits[start:stop], divergence)
        grad[start:stop] += block_grad
        costs.append(block_costs)
        fr.append(block_fr)
    return grad, torch.cat(costs), torch.cat(fr)


def _energy_block(block: Tensor, divergence: Divergence) -> tuple[Tensor, Tensor, Tensor]:
    """``energy_step`` on one block of points."""
    weight = 1.0 / block.shape[1]  # the energy is a mean over the batch
    closed_form = closed_form_segment_gradient(divergence)
    if closed_form is not None:
        values, grad, fr = closed_form(block, weight)
    else:
        values, grad = _autograd_energy(block, divergence, weight)
        with torch.no_grad():
            fr = segment_divergences(block, fisher_rao_squared)
    # values in the logits' precision, sums in float64
    return grad, values.sum(1, dtype=torch.float64), fr.sum(1, dtype=torch.float64)


def _autograd_energy(block: Tensor, divergence: Divergence, weight: float) -> tuple[Tensor, Tensor]:
    """A block's segment divergences and the gradient of ``weight`` × their sum."""
    block = block.detach().requires_grad_(True)
    with torch.enable_grad():
        values = segment_divergences(block, divergence)
        if not values.requires_grad:
            raise ValueError(
                "The divergence returned values without a gradient: it must be "
                "computed from its logits with differentiable torch operations "
                "(no .detach(), .item(), NumPy or torch.no_grad())."
            )
        (values.sum() * weight).backward()
    assert block.grad is not None
    return values.detach(), block.grad


# -- the evaluation strategy ------------------------------------------------------------

# Layers whose torch.func batching rules add passes or fall back to per-example loops:
# with them, a loop over the points is faster (BatchNorm's batch statistics under vmap
# took 52 ms against the loop's 42 ms on the digits CNN) and needs less memory.
_LOOP_LAYERS: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def choose_strategy(path: ModelPath, x: Inputs, module: nn.Module | None = None) -> Strategy:
    """How to evaluate a stack of points: ``"vmap"`` or ``"loop"``, by a fixed rule.

    The rule looks at the architecture and at one trial, never at a clock, so every
    process given the same models and data follows the same code path and gets the
    same numbers, however loaded the machine: ``"loop"`` when the network has layers
    whose batching rules are slow (BatchNorm, attention, recurrent layers) or when a
    vmapped forward pass of two points on ``x`` raises or makes torch warn that it
    falls back to a per-example loop; ``"vmap"`` otherwise (on the digits MLPs it
    made an epoch 2.3× faster than the seed's loop of networks).

    Parameters
    ----------
    path : ModelPath
    x : Tensor of shape (batch, *input_shape), or dict of str to Tensor
        A batch on the path's device.
    module : nn.Module, optional
        The module the fit evaluates (default the path's template).

    Returns
    -------
    {"vmap", "loop"}

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.fitting import choose_strategy
    >>> mlp = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                                   torch.nn.Linear(8, 3))
    >>> choose_strategy(ModelPath.linear(mlp(), mlp(), 5), torch.zeros(2, 4))
    'vmap'
    >>> bn = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> choose_strategy(ModelPath.linear(bn(), bn(), 5), torch.zeros(2, 4))
    'loop'
    """
    module = path.template if module is None else module
    if any(isinstance(m, _LOOP_LAYERS) for m in path.template.modules()):
        return "loop"
    return "vmap" if _vmap_runs_natively(path, x, module) else "loop"


def _vmap_runs_natively(path: ModelPath, x: Inputs, module: nn.Module) -> bool:
    """Whether a vmapped forward of two points runs, without a batching-rule fallback."""
    params = {k: v[:2] for k, v in path.params.items()}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            path.functional_forward(params, x, module=module, strategy="vmap")
        except Exception:
            return False
    return not any("batching rule" in str(w.message) for w in caught)
