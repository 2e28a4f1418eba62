"""Parametric curves between two networks, trained on the loss (Garipov et al., 2018).

A curve ``θ(t)``, ``t ∈ [0, 1]``, with ``θ(0) = θ_a`` and ``θ(1) = θ_b``, is given by
control points: the two ends and ``n_bends`` bends between them.

* ``"bezier"``: ``θ(t) = Σ_j B_j(t) θ_j`` with the Bernstein polynomials
  ``B_j(t) = C(n, j) tʲ (1 − t)ⁿ⁻ʲ`` of degree ``n = n_bends + 1``;
* ``"polychain"``: the polygonal chain through the control points, which sit at
  ``t = j / n``.

Bends placed evenly on the straight line make either curve the line itself. The bends
are trained to minimise the expected loss along the curve, ``E_{t ~ U(0, 1)}
L(θ(t))`` — one ``t`` per batch, the networks' BatchNorm layers using the batch's
statistics — which needs labels, unlike the geodesic. :class:`Curve` holds the control
points as a :class:`~geoconnect.ModelPath` (one point per control point);
:meth:`Curve.sample` gives the path of networks along the curve that every
evaluation, plot and file of geoconnect takes.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from math import comb
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._data import Batch, StreamData, TensorData, as_data
from ._inputs import Inputs, concat, n_rows, rows, stack_inputs
from ._optim import SGD, Adam
from .divergences import Divergence, fisher_form, fisher_rao, jensen_shannon, spec_of
from .evaluation import arc_length_positions, euclidean_length, segment_divergences
from .fitting import (
    ADAPTIVE_CUTS,
    FitSettings,
    _load_moments,
    _moments,
    _resumable,
    check_finite_start,
    check_fittable,
    diverged,
    progress_bar,
    relative_scales,
    scheduled_rate,
    update_no_improvement_count,
    warn_batch_of_one,
    warn_diverged,
)
from .path import ModelPath, recompute_module_batchnorm
from .persistence import prefixed

__all__ = [
    "Curve",
    "curve_chord_energy",
    "curve_energy",
    "curve_euclidean_length",
    "curve_fisher_form",
    "fit_curve",
]

CurveKind = Literal["bezier", "polychain"]
Objective = Literal["loss", "energy"]
#: How a batch estimates a curve's energy: the chords of a random grid of ``t``
#: (:func:`curve_chord_energy`), or the speed at random ``t`` (:func:`curve_energy`).
EnergyEstimate = Literal["chord", "split", "jvp"]
ENERGY_ESTIMATES: tuple[str, ...] = ("chord", "split", "jvp")

#: A fit whose last epoch's objective is this many times its best has blown up.
_CLIMBED = 2.0


class Curve:
    """A Bezier curve or polygonal chain of networks, given by its control points.

    Parameters
    ----------
    control : ModelPath
        The control points, ends included (``n_bends + 2`` points); the curve
        moves them in place when trained.
    kind : {"bezier", "polychain"}

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.curves import Curve
    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> curve = Curve(ModelPath.linear(a, b, 5), "bezier")  # three bends on the line
    >>> mid = curve.sample(3).params["weight"][1]
    >>> torch.allclose(mid, (a.weight + b.weight) / 2)
    True
    """

    def __init__(self, control: ModelPath, kind: CurveKind):
        if kind not in ("bezier", "polychain"):
            raise ValueError(f"kind must be 'bezier' or 'polychain'; got {kind!r}.")
        self.control, self.kind = control, kind

    @property
    def n_bends(self) -> int:
        return self.control.n_points - 2

    def weights(self, t: Tensor) -> Tensor:
        """Each control point's weight at each ``t``: shape (len(t), n_bends + 2).

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> from geoconnect.curves import Curve
        >>> net = torch.nn.Linear(2, 2)
        >>> Curve(ModelPath.linear(net, net, 3), "polychain").weights(torch.tensor([0.25]))
        tensor([[0.5000, 0.5000, 0.0000]], dtype=torch.float64)
        """
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        n = self.control.n_points - 1
        j = torch.arange(n + 1, dtype=torch.float64)
        if self.kind == "bezier":
            binomial = torch.tensor([comb(n, k) for k in range(n + 1)], dtype=torch.float64)
            return binomial * t**j * (1 - t) ** (n - j)
        return (1 - (t * n - j).abs()).clamp_min(0)

    def tangent_weights(self, t: Tensor) -> Tensor:
        """Each control point's weight in the velocity ``θ̇(t)``: shape (len(t), n_bends + 2).

        The derivatives of :meth:`weights` in ``t``; each row sums to zero. A
        polygonal chain's velocity at a bend is that of the segment after it (at
        ``t = 1``, the last segment's).

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> from geoconnect.curves import Curve
        >>> net = torch.nn.Linear(2, 2)
        >>> Curve(ModelPath.linear(net, net, 3), "polychain").tangent_weights(torch.tensor([0.25]))
        tensor([[-2.,  2.,  0.]], dtype=torch.float64)
        """
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        n = self.control.n_points - 1
        j = torch.arange(n + 1, dtype=torch.float64)
        if self.kind == "bezier":
            # d/dt B_{j,n} = n (B_{j−1,n−1} − B_{j,n−1}), with B_{−1,n−1} = B_{n,n−1} = 0.
            low = torch.tensor([comb(n - 1, k) for k in range(n)], dtype=torch.float64)
            lower = low * t ** j[:-1] * (1 - t) ** (n - 1 - j[:-1])
            zero = torch.zeros_like(t)
            return n * (torch.cat([zero, lower], 1) - torch.cat([lower, zero], 1))
        segment = (t * n).floor().clamp(0, n - 1)
        return n * ((j == segment + 1).double() - (j == segment).double())

    def params_at(
        self,
        t: Tensor,
        stacks: dict[str, Tensor] | None = None,
        *,
        velocity: bool = False,
    ) -> dict[str, Tensor]:
        """The networks' parameters at ``t``: a stack ``(len(t), *shape)`` per name.

        ``stacks`` replaces the control points' (the differentiable bends while
        training); ``velocity=True`` gives the velocity ``θ̇(t)`` instead. A
        parameter frozen in both models (the control path's ``frozen``) is its
        common value at every ``t``, exactly.
        """
        stacks = self.control.params if stacks is None else stacks
        w = self.tangent_weights(t) if velocity else self.weights(t)
        out = {}
        for name, stack in stacks.items():
            if name in self.control.frozen:  # one value along the curve, exactly
                value = torch.zeros_like(stack[0]) if velocity else stack[0]
                out[name] = value.expand(len(w), *stack.shape[1:])
                continue
            weights = w.to(device=stack.device, dtype=stack.dtype)
            out[name] = torch.tensordot(weights, stack, dims=([1], [0]))
        return out

    def sample(
        self,
        n_points: int,
        data: object = None,
        *,
        batch_size: int = 256,
        t: np.ndarray | None = None,
    ) -> ModelPath:
        """The path of ``n_points`` networks at ``t = i / (n_points − 1)`` on the curve,
        or at the increasing ``t`` given (from 0 to 1).

        The ends are the models exactly, BatchNorm statistics included; the others'
        statistics are recomputed on ``data`` (needed for BatchNorm networks).
        """
        if t is None:
            t = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64)
        else:
            t = torch.as_tensor(np.asarray(t, dtype=np.float64))
            if t.shape != (n_points,) or t[0] != 0.0 or t[-1] != 1.0 or (t.diff() < 0).any():
                raise ValueError(
                    f"t must be {n_points} increasing positions from 0 to 1; got {t.tolist()}."
                )
        params = self.params_at(t)
        for name, stack in self.control.params.items():  # the ends bit for bit
            params[name][0], params[name][-1] = stack[0], stack[-1]
        bn = {
            name: stack[[0] * (n_points - 1) + [-1]].clone()
            for name, stack in self.control.batchnorm_buffers.items()
        }
        path = ModelPath(
            self.control.template,
            params,
            bn,
            t=t.numpy(),
            strategy=self.control.strategy,
            frozen=self.control.frozen,
            output=self.control.output,
        )
        path.alignment = dict(self.control.alignment)
        if path.has_batchnorm:
            if data is None:
                raise ValueError(
                    "The networks have BatchNorm layers: pass data to recompute the "
                    "statistics of the networks along the curve."
                )
            path.recompute_batchnorm(data, batch_size=batch_size)
        return path

    def at(self, t: float, X: object = None, *, batch_size: int = 256) -> torch.nn.Module:
        """The network at position ``t`` on the curve, a fresh module in eval mode.

        A network with BatchNorm needs ``X`` to recompute its statistics (but at the
        ends, which keep the models' own).

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> from geoconnect.curves import Curve
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> net = Curve(ModelPath.linear(a, b, 3), "bezier").at(1.0)
        >>> torch.equal(net.weight, b.weight)
        True
        """
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1]; got {t}.")
        if t in (0.0, 1.0):
            return self.control[0 if t == 0.0 else -1]
        params = self.params_at(torch.tensor([t], dtype=torch.float64))
        module = self.control._module_from(
            {k: v[0] for k, v in params.items()},
            {k: v[0] for k, v in self.control.batchnorm_buffers.items()},
        )
        if self.control.has_batchnorm:
            if X is None:
                raise ValueError(
                    f"t={t}: a network with BatchNorm needs X to recompute its "
                    "statistics: curve.at(t, X)."
                )
            data = as_data(X, device=self.control.device)
            recompute_module_batchnorm(module, data, batch_size)
        return module


#: The chords, evenly spaced in ``t``, by which :func:`arc_length_t` measures a curve.
ARC_PIECES = 16


@torch.no_grad()
def arc_length_t(
    curve: Curve,
    data: object,
    n_points: int,
    *,
    batch_size: int = 256,
    n_pieces: int = ARC_PIECES,
    max_batches: int = 4,
) -> np.ndarray:
    """The ``t`` of ``n_points`` networks evenly spaced by Fisher–Rao arc length.

    The arc length is measured by the chords between the curve's networks at
    ``t = j / n_pieces``, on the first ``max_batches`` batches of ``data``, as the
    fit sees them (BatchNorm on batch statistics), and is linear in ``t`` between
    them: a placement of the points, at the cost of ``n_pieces + 1`` forward passes
    of those batches. (A curve fitted to its energy is near constant speed already.)

    Parameters
    ----------
    curve : Curve
    data : array-like, dict of arrays, Dataset or DataLoader
        The inputs (labels are not needed).
    n_points : int
    batch_size : int, default=256
    n_pieces : int, default=ARC_PIECES
    max_batches : int, default=4

    Returns
    -------
    ndarray of shape (n_points,)
        Increasing, from 0 to 1; evenly spaced when the curve has no length.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.curves import Curve, arc_length_t
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> curve = Curve(ModelPath.linear(a, b, 3), "bezier")
    >>> t = arc_length_t(curve, torch.randn(64, 4), 5)
    >>> float(t[0]), float(t[-1]), bool((t[1:] >= t[:-1]).all())
    (0.0, 1.0, True)
    """
    control = curve.control
    data = as_data(data, device=control.device)
    module = control.batch_statistics_module() if control.has_batchnorm else None
    grid = torch.linspace(0.0, 1.0, n_pieces + 1, dtype=torch.float64)
    params = curve.params_at(grid)
    squared = torch.zeros(n_pieces, dtype=torch.float64)
    seen = 0
    for batch in data.batches(batch_size):
        if seen >= max_batches * batch_size:
            break
        if control.has_batchnorm and n_rows(batch.x) < 2:
            continue
        logits = control.functional_forward(params, batch.x, module=module)
        distances = segment_divergences(logits, fisher_rao).double()
        squared += (distances**2).sum(1).cpu()
        seen += n_rows(batch.x)
    knots = arc_length_positions(squared / max(seen, 1))
    t = np.interp(np.linspace(0.0, 1.0, n_points), knots, grid.numpy())
    t[0], t[-1] = 0.0, 1.0
    return np.maximum.accumulate(t)


#: The stratified values of ``t`` at which each batch estimates a curve's energy
#: (``energy="jvp"``).
ENERGY_T_PER_BATCH = 4
#: The chords of the grid of ``t`` on which each batch estimates a curve's energy
#: (``energy="chord"``).
CHORD_PIECES = 8
#: The batches, and the values of t, on which a curve's energy and length are
#: compared before and after its fit.
_CHECK_BATCHES = 4
_CHECK_T = 8


@dataclass
class _Stopping:
    """Early stopping's counters, as :func:`update_no_improvement_count` reads them."""

    settings: FitSettings
    best: float = math.inf
    stale: int = 0
    #: The plateaus at which ``learning_rate="adaptive"`` divided the rate.
    cuts: int = 0

    def plateaued(self, value: float) -> bool:
        """Count ``value`` in; True when the fit stops here. An adaptive rate is
        divided at a plateau instead, up to ``ADAPTIVE_CUTS`` times."""
        if not update_no_improvement_count(self, value):  # type: ignore[arg-type]
            return False
        adaptive = self.settings.learning_rate_schedule == "adaptive"
        if adaptive and self.cuts < ADAPTIVE_CUTS:
            self.cuts, self.stale = self.cuts + 1, 0
            return False
        return True


def fit_curve(
    curve: Curve,
    data: TensorData | StreamData,
    settings: FitSettings,
    generator: torch.Generator,
    objective: Objective = "loss",
    *,
    energy: EnergyEstimate = "chord",
    divergence: Divergence = jensen_shannon,
    validation: TensorData | None = None,
) -> tuple[dict[str, list], bool]:
    """Train the bends along the curve; returns the history and convergence.

    Each step draws ``t`` from ``generator`` and evaluates the network at ``θ(t)``
    on the batch with batch-statistics BatchNorm (Garipov et al.). The
    ``objective`` is the expected value over ``t`` that the bends descend:

    * ``"loss"``: the cross-entropy ``E_t L(θ(t))`` at one ``t ~ U(0, 1)`` per step
      (needs labels). History: ``loss``.
    * ``"energy"``: the Fisher–Rao energy ``∫₀¹ E_x ‖θ̇(t)‖²_F dt`` (label-free),
      estimated on each batch as ``energy`` says: ``"chord"``, the energy of the
      polygon through the curve's networks on a random grid of ``CHORD_PIECES``
      steps in ``t``, each chord measured by ``divergence``
      (:func:`curve_chord_energy`); ``"jvp"``, the squared speed
      :func:`curve_fisher_form` at ``ENERGY_T_PER_BATCH`` stratified ``t``
      (:func:`curve_energy`); ``"split"``, the chords with each on its own part
      of the batch (``curve_chord_energy(split=True)``): a step's networks see
      two batches' worth of inputs in all, not one each. History: ``energy`` and
      ``length`` (the grid's chord sum, or the mean speed at the drawn ``t``).

    Early stopping on the epoch's mean objective, as the geodesic chain's on its
    energy; the history's ``seconds`` are each epoch's wall-clock time. With
    ``validation`` (held-out inputs, no labels needed; the energy only), early
    stopping watches the curve's length on them instead, measured after every
    epoch at fixed draws of ``t`` (history: ``validation_energy`` and
    ``validation_length``), and the curve of the epoch with the shortest is
    returned: the descent's own inputs can be fitted past the point where the
    curve stops improving on others.
    """
    control = curve.control
    check_fittable(control, settings)
    if objective == "energy" and energy not in ENERGY_ESTIMATES:
        raise ValueError(f"energy must be one of {list(ENERGY_ESTIMATES)}; got {energy!r}.")
    if validation is not None and objective != "energy":
        raise ValueError("validation inputs stop a descent of the energy, not the loss.")
    bends = {n: v for n, v in control.interior().items() if n not in control.frozen}
    optimizer = _optimizer(control, bends, settings)
    module = control.batch_statistics_module()
    keys = ("loss",) if objective == "loss" else ("energy", "length")
    stopping = _Stopping(settings)
    epoch = _CurveEpoch(
        curve, data, settings, generator, module, bends, optimizer, objective, energy, divergence
    )
    history, initial, converged, best, start = _begin(
        epoch, _empty_history(keys, objective, validation), stopping
    )
    try:
        with progress_bar(settings, settings.max_iter, "curve") as bar:
            while not converged and len(history["seconds"]) < settings.max_iter:
                tic = time.perf_counter()
                optimizer.lr = scheduled_rate(settings, len(history["seconds"]), stopping.cuts)
                record = epoch.run()
                value = _record_epoch(history, record, keys, epoch, validation)
                history["seconds"].append(time.perf_counter() - tic)
                if objective == "energy" and value < stopping.best:
                    best = {k: v.detach().clone() for k, v in bends.items()}
                converged = stopping.plateaued(value)
                if settings.checkpoint is not None:
                    state = {"initial": list(initial), "converged": converged}
                    settings.checkpoint.write(
                        _snapshot(bends, best, start, optimizer, settings, generator, epoch.draws),
                        {"history": history, **_stopping_state(stopping), **state},
                    )
                _report(bar, record, keys, settings, len(history["seconds"]))
    finally:
        for v in bends.values():
            v.grad = None
            v.requires_grad_(False)
    if objective == "energy":
        if validation is not None:  # the curve of the best epoch on the held-out inputs
            with torch.no_grad():
                for name, value in best.items():
                    bends[name].copy_(value)
        key = "energy" if validation is None else "validation_length"
        _never_worse(epoch, history[key], stopping.best, best, start, initial, key)
    if settings.group is not None:
        settings.group.share_from_first(bends)
    return history, converged


def _optimizer(control: ModelPath, bends: dict[str, Tensor], settings: FitSettings) -> Adam | SGD:
    """The settings' optimiser of the bends, which it makes trainable; steps relative
    to each tensor's distance between the models with ``relative_step``."""
    make = SGD if settings.solver == "sgd" else Adam
    scales = relative_scales(control, bends) if settings.relative_step else None
    return make(
        [v.requires_grad_(True) for v in bends.values()], lr=settings.learning_rate, scales=scales
    )


def _begin(
    epoch: _CurveEpoch, history: dict[str, list], stopping: _Stopping
) -> tuple[dict[str, list], tuple[float, float], bool, dict[str, Tensor], dict[str, Tensor]]:
    """Where the fit starts: the history, the start's energy and length, whether it
    has converged, the best and the starting bends — a checkpoint's, where it left
    one, or a fresh start's (whose NaN logits are named, not descended)."""
    settings = epoch.settings
    saved = _resumable(settings)  # distributed: the latest epoch every rank wrote
    if saved is not None:  # resume where the checkpointed fit stopped
        return _resume(
            saved, epoch.bends, epoch.optimizer, stopping, settings, epoch.generator, epoch.draws
        )
    start = {k: v.detach().clone() for k, v in epoch.bends.items()}
    if epoch.objective != "energy":
        return history, (math.nan, math.nan), False, start, start
    initial = epoch.measure()
    check_finite_start(initial[0])
    return history, initial, False, start, start  # best: replaced, never written into


def _empty_history(
    keys: tuple[str, ...], objective: Objective, validation: TensorData | None
) -> dict[str, list]:
    """The per-epoch record of a curve fit, before its first epoch."""
    extra = () if objective == "loss" else ("euclidean_length",)
    history: dict[str, list] = {key: [] for key in (*keys, *extra, "seconds")}
    if validation is not None:
        history["validation_energy"], history["validation_length"] = [], []
    return history


def _record_epoch(
    history: dict[str, list],
    record: dict[str, float],
    keys: tuple[str, ...],
    epoch: _CurveEpoch,
    validation: TensorData | None,
) -> float:
    """Append an epoch's means (and the curve's Euclidean length, and its length on
    the held-out inputs) to ``history``; return the number early stopping watches.
    A non-finite objective is refused, with the epoch and the rate to lower."""
    value = record[keys[0]]
    if not math.isfinite(value):
        raise ValueError(
            f"The {keys[0]} along the curve became {value} in epoch "
            f"{len(history['seconds']) + 1}: lower learning_rate_init (now "
            f"{epoch.settings.learning_rate})."
        )
    for key in keys:
        history[key].append(record[key])
    if "euclidean_length" in history:
        history["euclidean_length"].append(curve_euclidean_length(epoch.curve))
    if validation is not None:  # early stopping watches the held-out length
        held_out = epoch.measure(validation)
        history["validation_energy"].append(held_out[0])
        history["validation_length"].append(held_out[1])
        value = held_out[1]  # its length, the number the path reports
    return value


def _stopping_state(stopping: _Stopping) -> dict[str, float | int]:
    """Early stopping's counters, as a checkpoint records them."""
    return {"best": stopping.best, "stale": stopping.stale, "cuts": stopping.cuts}


def _report(
    bar: Any, record: dict[str, float], keys: tuple[str, ...], settings: FitSettings, done: int
) -> None:
    """The progress bar's step, and with ``verbose >= 2`` a line per epoch."""
    bar.update(1)
    bar.set_postfix({key: f"{record[key]:.4g}" for key in keys})
    if settings.verbose >= 2:
        line = "  ".join(f"{key} {record[key]:.6g}" for key in keys)
        print(f"epoch {done:4d}  {line}")


#: The pieces of ``t`` on which :func:`curve_euclidean_length` measures a curve.
_EUCLIDEAN_PIECES = 16


@torch.no_grad()
def curve_euclidean_length(curve: Curve, n_pieces: int = _EUCLIDEAN_PIECES) -> float:
    """The curve's length in parameter space, ``∫₀¹ ‖θ̇(t)‖₂ dt``, as the length of
    the polygon through it at ``n_pieces`` even steps of ``t`` (a lower bound, exact
    for the polygonal chain when the steps meet its bends).

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.curves import Curve, curve_euclidean_length
    >>> from geoconnect.evaluation import euclidean_length
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> line = ModelPath.linear(a, b, 5)
    >>> bool(abs(curve_euclidean_length(Curve(line, "bezier")) - euclidean_length(line)) < 1e-5)
    True
    """
    grid = torch.linspace(0.0, 1.0, n_pieces + 1, dtype=torch.float64)
    return euclidean_length(_StacksAt(curve, grid), curve.control.frozen)


class _StacksAt(Mapping):
    """A curve's parameters at ``t``, by name, each computed when it is read: a
    reader that goes through them one by one holds one name's stack at a time, not
    ``len(t)`` copies of the whole model."""

    def __init__(self, curve: Curve, t: Tensor):
        self.curve, self.t, self.stacks = curve, t, curve.control.params

    def __getitem__(self, name: str) -> Tensor:
        return self.curve.params_at(self.t, {name: self.stacks[name]})[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stacks)

    def __len__(self) -> int:
        return len(self.stacks)


def _snapshot(
    bends: dict[str, Tensor],
    best: dict[str, Tensor],
    start: dict[str, Tensor],
    optimizer: Adam | SGD,
    settings: FitSettings,
    generator: torch.Generator,
    draws: torch.Generator,
) -> dict[str, Tensor]:
    """A curve fit's tensors after an epoch: the bends, the best epoch's and the
    start's, the optimiser's moments and the random generators' states (the batch
    order's, the draws of t's, torch's)."""
    tensors = {f"bends/{k}": v.detach() for k, v in bends.items()}
    tensors.update({f"best/{k}": v for k, v in best.items()})
    tensors.update({f"start/{k}": v for k, v in start.items()})
    tensors.update({f"moments/{k}": v for k, v in _moments(optimizer, settings.solver).items()})
    tensors["rng/generator"] = generator.get_state()
    tensors["rng/draws"] = draws.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    return tensors


def _resume(
    saved: tuple[dict[str, Tensor], dict],
    bends: dict[str, Tensor],
    optimizer: Adam | SGD,
    stopping: _Stopping,
    settings: FitSettings,
    generator: torch.Generator,
    draws: torch.Generator,
) -> tuple[dict[str, list], tuple[float, float], bool, dict[str, Tensor], dict[str, Tensor]]:
    """Load a :func:`_snapshot` and its record into a fit; returns its history, the
    start's energy and length, whether it had converged, and the best epoch's and
    the start's bends."""
    tensors, record = saved
    with torch.no_grad():
        for name, value in bends.items():
            value.copy_(tensors[f"bends/{name}"])
    _load_moments(optimizer, prefixed(tensors, "moments/"), settings.solver)
    generator.set_state(tensors["rng/generator"])
    draws.set_state(tensors["rng/draws"])
    torch.set_rng_state(tensors["rng/torch"])
    stopping.best, stopping.stale = record["best"], record["stale"]
    stopping.cuts = int(record.get("cuts", 0))
    best = {k: tensors[f"best/{k}"].clone() for k in bends}
    start = {k: tensors[f"start/{k}"].clone() for k in bends}
    initial = (float(record["initial"][0]), float(record["initial"][1]))
    history = {key: list(values) for key, values in record["history"].items()}
    return history, initial, bool(record["converged"]), best, start


def _never_worse(
    epoch: _CurveEpoch,
    energies: list[float],
    lowest: float,
    best: dict[str, Tensor],
    start: dict[str, Tensor],
    initial: tuple[float, float],
    watched: str = "energy",
) -> None:
    """After an energy descent: a descent that blew up keeps its best epoch's curve,
    and one whose energy or length ends above where it began (measured the same
    way: a curve can lower its energy by evening out its speed while it lengthens)
    its start, each with a warning. (Not on the loss: a curve's mean loss at random
    t, once near zero, can double from one epoch to the next without anything
    going wrong.) ``energies`` are what early stopping watched, named by
    ``watched`` (``"validation_length"``: the held-out length)."""
    bends, settings = epoch.bends, epoch.settings
    last = energies[-1] if energies else math.nan
    if last > _CLIMBED * lowest:
        for name, value in best.items():
            bends[name].copy_(value)
        what = "energy along the curve" if watched == "energy" else "curve's held-out length"
        warnings.warn(
            f"The {what} rose from {lowest:.4g} to {last:.4g} by epoch "
            f"{len(energies)}: the descent is unstable, and the curve of its best epoch "
            f"is kept. Lower learning_rate_init (now {settings.learning_rate}).",
            RuntimeWarning,
            stacklevel=4,  # this, fit_curve, its caller's caller
        )
    final = epoch.measure()
    if diverged(final[0], initial[0]) or diverged(final[1], initial[1]):
        for name, value in start.items():
            bends[name].copy_(value)
        warn_diverged(final, initial, settings.learning_rate, stacklevel=4)


def curve_fisher_form(
    curve: Curve,
    t: Tensor,
    x: Inputs,
    *,
    stacks: dict[str, Tensor] | None = None,
    module: torch.nn.Module | None = None,
) -> Tensor:
    """``‖θ̇(t)‖²_F`` per sample of ``x``: the curve's squared Fisher–Rao speed at ``t``.

    The logits' velocity ``ż = J_θ z · θ̇(t)`` is one forward-mode Jacobian–vector
    product (``torch.func.jvp``) along the curve's tangent, and
    :func:`~geoconnect.divergences.fisher_form` turns it into ``Var_{k∼p}(ż_k)``, in
    ``d_FR²`` per ``dt²``. Differentiable in ``stacks`` (the control points).

    Parameters
    ----------
    curve : Curve
    t : Tensor of shape (1,)
    x : Tensor or dict of str to Tensor
        A batch on the curve's device.
    stacks : dict of str to Tensor, optional
        Control points replacing the curve's (the trainable bends).
    module : nn.Module, optional
        The architecture to run (default the template: eval-mode BatchNorm on its
        own statistics; fits pass one on batch statistics).

    Returns
    -------
    Tensor of shape (batch,)

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.curves import Curve, curve_fisher_form
    >>> net = torch.nn.Linear(4, 3)
    >>> same = Curve(ModelPath.linear(net, net, 4), "bezier")  # one function throughout
    >>> bool(curve_fisher_form(same, torch.tensor([0.3]), torch.randn(8, 4)).abs().max() < 1e-12)
    True
    """
    control = curve.control
    t = torch.as_tensor(t, dtype=torch.float64).reshape(1)
    params = curve.params_at(t, stacks)
    velocity = curve.params_at(t, stacks, velocity=True)

    def logits(p: dict[str, Tensor]) -> Tensor:
        return control.functional_forward(p, x, module=module, strategy="loop")[0]

    z, z_dot = torch.func.jvp(logits, (params,), (velocity,))
    return fisher_form(z, z_dot)


def curve_energy(
    curve: Curve,
    x: Inputs,
    generator: torch.Generator | None = None,
    *,
    n_t: int = ENERGY_T_PER_BATCH,
    stacks: dict[str, Tensor] | None = None,
    module: torch.nn.Module | None = None,
) -> tuple[Tensor, float]:
    """An unbiased estimate of the curve's Fisher–Rao energy on ``x``, and its speed.

    The energy is ``∫₀¹ E_x ‖θ̇(t)‖²_F dt``; the estimate is the mean of
    :func:`curve_fisher_form` over ``x`` at ``n_t`` stratified ``t`` (one uniform
    draw in each of ``n_t`` equal parts of ``[0, 1]``), which has less variance
    than as many independent draws. ``GeodesicConnector(curve=..., energy="jvp")``
    descends it, one estimate per batch.

    Parameters
    ----------
    curve : Curve
    x : Tensor or dict of str to Tensor
        A batch on the curve's device.
    generator : torch.Generator, optional
        The draws' source (default torch's global one).
    n_t : int, default=ENERGY_T_PER_BATCH
        The values of ``t``.
    stacks, module
        As for :func:`curve_fisher_form`.

    Returns
    -------
    energy : Tensor of shape ()
        Differentiable in ``stacks``.
    speed : float
        The mean of ``√(E_x ‖θ̇(t)‖²_F)`` at the drawn ``t``: an estimate of the
        curve's Fisher–Rao length.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.curves import Curve, curve_energy
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> curve = Curve(ModelPath.linear(a, b, 4), "bezier")
    >>> energy, speed = curve_energy(curve, torch.randn(16, 4), torch.Generator().manual_seed(0))
    >>> bool(energy >= speed**2 - 1e-9)  # Jensen: the mean square is at least the squared mean
    True
    """
    if not (isinstance(n_t, int) and n_t >= 1):
        raise ValueError(f"n_t must be a positive integer; got {n_t!r}.")
    draws = torch.rand(n_t, generator=generator, dtype=torch.float64)
    forms = [
        curve_fisher_form(curve, t.reshape(1), x, stacks=stacks, module=module).mean()
        for t in (torch.arange(n_t, dtype=torch.float64) + draws) / n_t
    ]
    speed = sum(math.sqrt(max(float(f.detach()), 0.0)) for f in forms) / n_t
    return torch.stack(forms).mean(), speed


def curve_chord_energy(
    curve: Curve,
    x: Inputs,
    generator: torch.Generator | None = None,
    *,
    n_pieces: int = CHORD_PIECES,
    divergence: Divergence = jensen_shannon,
    stacks: dict[str, Tensor] | None = None,
    module: torch.nn.Module | None = None,
    split: bool = False,
) -> tuple[Tensor, float]:
    """The energy of the polygon through the curve's networks on a random grid of ``t``.

    The grid is ``0, (j + u) / n_pieces`` for ``j = 0, …, n_pieces − 1``, and ``1``,
    with one uniform ``u``; each chord's ``E_x d_FR²`` is estimated from
    ``divergence`` by its local constant (``8 · JSD`` for ``"jsd"``), and the
    energy is ``Σ_j E_x d_FR²(t_j, t_{j+1}) / (t_{j+1} − t_j)``, the discrete form
    of ``∫₀¹ E_x ‖θ̇(t)‖²_F dt``: equal to it in the limit of a fine grid, and at
    most it on any grid for the Fisher–Rao distance itself (the Cauchy–Schwarz
    inequality on each chord; the other divergences agree with it to leading
    order in the chord's length). This is what
    ``GeodesicConnector(curve=..., energy="chord")`` descends, one estimate per
    batch.

    A chord sees the whole change of the predictions between its ends, however
    abruptly it happens, and a bounded divergence bounds each chord's cost. The
    squared speed at random ``t`` (:func:`curve_energy`) is unbiased but
    heavy-tailed: a curve can switch its predictions within a narrow interval of
    ``t`` that few draws hit, and the draws that hit it give gradients that Adam
    scales down. On the digits pairs such switches carried about a third of the
    energy of a curve fitted that way, and made the energy jump between epochs.

    Parameters
    ----------
    curve : Curve
    x : Tensor or dict of str to Tensor
        A batch on the curve's device.
    generator : torch.Generator, optional
        The draw of ``u`` (default torch's global generator).
    n_pieces : int, default=CHORD_PIECES
        The grid's steps (its chords are ``n_pieces + 1``: the first and the last
        are shorter).
    divergence : callable, default=jensen_shannon
        A built-in divergence (:mod:`geoconnect.divergences`): its local constant
        turns it into ``d_FR²``.
    stacks, module
        As for :func:`curve_fisher_form`.
    split : bool, default=False
        Measure each chord on its own ``1 / (n_pieces + 1)`` of the batch (chord
        ``j`` on rows ``j · c`` to ``(j + 1) · c``), so that each network sees
        two such parts and a step costs two networks' worth of the batch instead
        of ``n_pieces + 2``: each chord's estimate is noisier, the energy's is
        unbiased. Whole batches when a part would have fewer than two rows.

    Returns
    -------
    energy : Tensor of shape ()
        Differentiable in ``stacks``.
    length : float
        The grid's chord sum, ``Σ_j √(E_x d_FR²(t_j, t_{j+1}))`` (for the
        Fisher–Rao distance, at most the curve's length).

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.curves import Curve, curve_chord_energy
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> curve = Curve(ModelPath.linear(a, b, 4), "bezier")
    >>> energy, length = curve_chord_energy(curve, torch.randn(16, 4), torch.Generator())
    >>> bool(energy >= length**2 - 1e-6)  # Cauchy–Schwarz over the chords
    True
    """
    if not (isinstance(n_pieces, int) and n_pieces >= 1):
        raise ValueError(f"n_pieces must be a positive integer; got {n_pieces!r}.")
    spec = spec_of(divergence)
    if spec is None:
        raise ValueError(
            "The chord estimate of a curve's energy turns a divergence into d_FR² by "
            "its local constant, which a callable has none of: pass a built-in "
            "divergence (geoconnect.divergences)."
        )
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    inner = (torch.arange(n_pieces, dtype=torch.float64) + u) / n_pieces
    t = torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])
    control = curve.control
    points = control.params if stacks is None else stacks
    ends_params = {k: v[[0, -1]] for k, v in points.items()}
    inner_params = curve.params_at(inner, stacks)
    chunk = n_rows(x) // (n_pieces + 1)
    if split and chunk >= 2:
        pieces = _split_chords(control, ends_params, inner_params, x, chunk, divergence, module)
    else:
        strategy = control.strategy
        with torch.no_grad():  # the ends are fixed: no gradient to carry
            ends = control.functional_forward(ends_params, x, module=module, strategy=strategy)
        middle = control.functional_forward(inner_params, x, module=module, strategy=strategy)
        logits = torch.cat([ends[:1], middle, ends[1:]])
        pieces = segment_divergences(logits, divergence).double()  # (n_pieces + 1, batch)
    squared = (pieces.clamp_min(0.0) ** (2.0 / spec.power)).mean(1) / spec.local_constant
    steps = t.diff()
    energy = torch.where(steps > 0, squared / steps.clamp_min(1e-300), 0.0).sum()
    return energy, float(squared.detach().sqrt().sum())


def _split_chords(
    control: ModelPath,
    ends_params: dict[str, Tensor],
    inner_params: dict[str, Tensor],
    x: Inputs,
    chunk: int,
    divergence: Divergence,
    module: torch.nn.Module | None,
) -> Tensor:
    """Each chord's divergences on its own ``chunk`` rows of the batch: shape
    ``(n_chords, chunk)``. Chord ``j`` joins grid points ``j`` and ``j + 1`` on rows
    ``j · chunk`` onwards, so an inner point is evaluated on two chunks (its chords'),
    an end on one: two networks' worth of the batch in all, not one per point."""
    n_chords = next(iter(inner_params.values())).shape[0] + 1
    chunks = [rows(x, slice(j * chunk, (j + 1) * chunk)) for j in range(n_chords)]
    pairs = [concat([chunks[k], chunks[k + 1]]) for k in range(n_chords - 1)]
    stacked = stack_inputs(pairs)
    strategy = control.strategy
    with torch.no_grad():  # the ends are fixed: no gradient to carry
        first, last = (
            control.functional_forward(
                {k: v[[i]] for k, v in ends_params.items()}, c, module=module, strategy=strategy
            )[0]
            for i, c in ((0, chunks[0]), (1, chunks[-1]))
        )
    middle = control.functional_forward(
        inner_params, stacked, module=module, strategy=strategy, stacked_x=True
    )  # (n_chords - 1, 2 chunk, classes): point k + 1 on chunks k and k + 1
    left = torch.cat([first[None], middle[:, chunk:]])
    right = torch.cat([middle[:, :chunk], last[None]])
    return divergence(left, right).double()


def share_out(batches: list[Batch], parts: int, least: int = 1) -> list[Batch]:
    """A data-parallel step's batches, cut into ``parts`` near-equal ones when there
    are fewer (fewer parts where each would have under ``least`` samples), so that
    no rank idles while another works through an epoch's last, short step.

    Examples
    --------
    >>> import torch
    >>> from geoconnect._data import Batch
    >>> from geoconnect.curves import share_out
    >>> last = Batch(torch.arange(5.0)[:, None], torch.arange(5), None)
    >>> [part.y.tolist() for part in share_out([last], 2)]
    [[0, 1], [2, 3, 4]]
    """
    if len(batches) >= parts:
        return batches
    x = concat([batch.x for batch in batches])
    y = None if batches[0].y is None else torch.cat([batch.y for batch in batches])  # type: ignore[misc]
    n = n_rows(x)
    parts = max(1, min(parts, n // least))
    bounds = [i * n // parts for i in range(parts + 1)]
    return [
        Batch(rows(x, slice(lo, hi)), None if y is None else y[lo:hi], None)
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]


class _CurveEpoch:
    """One pass of :func:`fit_curve`: a step per batch at a random ``t``."""

    def __init__(
        self,
        curve: Curve,
        data: TensorData | StreamData,
        settings: FitSettings,
        generator: torch.Generator,
        module: torch.nn.Module,
        bends: dict[str, Tensor],
        optimizer: Adam | SGD,
        objective: Objective,
        estimate: EnergyEstimate = "chord",
        divergence: Divergence = jensen_shannon,
    ):
        self.curve, self.data, self.settings, self.generator = curve, data, settings, generator
        self.module, self.bends, self.optimizer, self.objective = (
            module,
            bends,
            optimizer,
            objective,
        )
        self.estimate, self.divergence = estimate, divergence
        self.warned_single = False
        # The draws of t on a generator of their own, seeded from the batch order's:
        # a stream and the same inputs in memory, whose batch orders consume the
        # batch-order generator differently, draw the same t.
        seed = int(torch.randint(2**62, (1,), generator=generator))
        self.draws = torch.Generator().manual_seed(seed)

    def run(self) -> dict[str, float]:
        """The epoch's means: ``loss``, or ``energy`` and ``length``.

        A step takes ``settings.batches_per_step`` batches of the batch order (one,
        unless a test or benchmark says otherwise) and, distributed, that many per
        rank: the step's batches go to the ranks in turn, each rank computes its own
        (each at its own draw of ``t``) and the ranks add up the gradients, weighted
        by the batches' rows. Every rank reads the whole batch order and draws every
        batch's ``t``, so a distributed step is the step of one process that takes
        the same batches and ``t`` in turn.
        """
        group = self.settings.group
        per_step = self.settings.batches_per_step * (1 if group is None else group.world_size)
        sums = torch.zeros(3, dtype=torch.float64)  # value · rows, speed · rows, rows
        step: list[Batch] = []
        for batch in self.data.batches(self.settings.batch_size, generator=self.generator):
            if self._usable(batch):
                step.append(batch)
            if len(step) == per_step:
                sums += self._step(step)
                step = []
        if step:  # the epoch's last step, short of batches: shared out evenly
            least = 2 if self.curve.control.has_batchnorm else 1
            sums += self._step(share_out(step, per_step, least))
        if group is not None:  # every rank records the same means and stops together
            group.sum(sums)
        total, root, seen = sums.tolist()
        if not seen:
            return {"loss": math.nan, "energy": math.nan, "length": math.nan}
        if self.objective == "loss":
            return {"loss": total / seen}
        return {"energy": total / seen, "length": root / seen}

    def _usable(self, batch: Batch) -> bool:
        """Whether a step can take the batch: refused without labels on the loss,
        skipped (with a warning, once) when a BatchNorm batch has one sample."""
        if self.objective == "loss" and batch.y is None:
            raise ValueError("A curve is trained on labels: X yielded a batch without y.")
        if self.curve.control.has_batchnorm and n_rows(batch.x) < 2:
            if not self.warned_single:  # no batch statistics from one sample
                self.warned_single = True
                warn_batch_of_one(stacklevel=6)  # _usable, run, fit_curve, _fit_curve, _fit
            return False
        return True

    def _step(self, batches: list[Batch]) -> Tensor:
        """One step of the optimiser on ``batches`` (this rank's share of them);
        returns this rank's sums of the value and the speed times the rows, and
        the rows."""
        group = self.settings.group
        rank, world = (0, 1) if group is None else (group.rank, group.world_size)
        whole = group is None and len(batches) == 1  # the batch's mean, as it always was
        for v in self.bends.values():
            v.grad = None
        sums = torch.zeros(3, dtype=torch.float64)
        for i, batch in enumerate(batches):
            if i % world != rank:  # another rank's batch: its draws of t, not its work
                torch.rand(self._draws_per_batch(), generator=self.draws, dtype=torch.float64)
                continue
            value, speed = self._value(batch)
            rows = n_rows(batch.x)
            (value if whole else value * rows).backward()
            sums += torch.tensor(
                [float(value.detach()) * rows, speed * rows, rows], dtype=torch.float64
            )
        if not whole:
            self._mean_gradient(float(sums[2]))
        self.optimizer.step()
        return sums

    def _draws_per_batch(self) -> int:
        """How many numbers :meth:`_value` draws from ``draws`` for a batch."""
        return ENERGY_T_PER_BATCH if self.objective == "energy" and self.estimate == "jvp" else 1

    def _mean_gradient(self, rows: float) -> None:
        """The bends' gradients of the step's summed ``value · rows``, added up
        across the ranks (one bucket: every gradient and the rows) and divided by
        the step's rows: the gradient of the mean over the step's samples."""
        bends = list(self.bends.values())
        grads = [torch.zeros_like(v) if v.grad is None else v.grad for v in bends]
        flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_full((1,), rows)])
        if self.settings.group is not None:
            self.settings.group.sum(flat, step=True)
        flat = flat[:-1] / flat[-1]
        for v, g in zip(bends, flat.split([g.numel() for g in grads]), strict=True):
            v.grad = g.view_as(v)

    @torch.no_grad()
    def measure(self, data: TensorData | None = None) -> tuple[float, float]:
        """The curve's energy and length as the fit estimates them, on the first
        ``_CHECK_BATCHES`` batches of the fit's inputs, or on all of ``data``, at
        fixed draws of ``t`` (``_CHECK_T`` stratified ones for ``"jvp"``): the same
        every time, so that two curves compare without the draws' noise."""
        generator = torch.Generator().manual_seed(0)
        stacks = self._stacks()
        energy = length = 0.0
        seen = 0
        limit = _CHECK_BATCHES * self.settings.batch_size if data is None else None
        for batch in (self.data if data is None else data).batches(self.settings.batch_size):
            if self.curve.control.has_batchnorm and n_rows(batch.x) < 2:
                continue
            rows = n_rows(batch.x)
            value, speed = self._energy(batch.x, generator, stacks, n_t=_CHECK_T)
            energy += float(value.detach()) * rows
            length += speed * rows
            seen += rows
            if limit is not None and seen >= limit:
                break
        return (energy / seen, length / seen) if seen else (math.nan, math.nan)

    def _stacks(self) -> dict[str, Tensor]:
        """The control points, the ends and the bends being trained."""
        return {
            name: torch.cat([stack[:1], self.bends[name], stack[-1:]])
            if name in self.bends
            else stack
            for name, stack in self.curve.control.params.items()
        }

    def _energy(
        self,
        x: Inputs,
        generator: torch.Generator,
        stacks: dict[str, Tensor],
        n_t: int = ENERGY_T_PER_BATCH,
        split: bool = False,
    ) -> tuple[Tensor, float]:
        """The energy's estimate on ``x`` and its length: the chords of a random grid
        (``"chord"``), or the speed at ``n_t`` stratified ``t`` (``"jvp"``)."""
        if self.estimate in ("chord", "split"):  # measured on whole batches either way
            return curve_chord_energy(
                self.curve,
                x,
                generator,
                n_pieces=CHORD_PIECES,  # read here: benchmarks/curve_settings.py varies it
                divergence=self.divergence,
                stacks=stacks,
                module=self.module,
                split=split,
            )
        return curve_energy(self.curve, x, generator, n_t=n_t, stacks=stacks, module=self.module)

    def _value(self, batch: Batch) -> tuple[Tensor, float]:
        """The objective's estimate on one batch, differentiable in the bends, and the
        curve's length as it estimates it (NaN for the loss).

        The loss at one ``t ~ U(0, 1)``; the energy as :meth:`_energy` says.
        """
        control = self.curve.control
        stacks = self._stacks()
        if self.objective == "energy":
            return self._energy(batch.x, self.draws, stacks, split=self.estimate == "split")
        t = torch.rand(1, generator=self.draws, dtype=torch.float64)
        params = self.curve.params_at(t, stacks)
        logits = control.functional_forward(params, batch.x, module=self.module, strategy="loop")
        return F.cross_entropy(logits[0], batch.y), math.nan
