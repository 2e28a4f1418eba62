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
from dataclasses import dataclass
from math import comb
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._data import StreamData, TensorData, as_data
from ._inputs import n_rows
from ._optim import SGD, Adam
from .fitting import FitSettings, update_no_improvement_count
from .path import ModelPath, recompute_module_batchnorm

__all__ = ["Curve", "fit_curve"]

CurveKind = Literal["bezier", "polychain"]


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

    def params_at(self, t: Tensor, stacks: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The networks' parameters at ``t``: a stack ``(len(t), *shape)`` per name.

        ``stacks`` replaces the control points' (the differentiable bends while
        training).
        """
        stacks = self.control.params if stacks is None else stacks
        w = self.weights(t)
        out = {}
        for name, stack in stacks.items():
            weights = w.to(device=stack.device, dtype=stack.dtype)
            out[name] = torch.tensordot(weights, stack, dims=([1], [0]))
        return out

    def sample(self, n_points: int, data: object = None, *, batch_size: int = 256) -> ModelPath:
        """The path of ``n_points`` networks at ``t = i / (n_points − 1)`` on the curve.

        The ends are the models exactly, BatchNorm statistics included; the others'
        statistics are recomputed on ``data`` (needed for BatchNorm networks).
        """
        t = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64)
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


@dataclass
class _Stopping:
    """Early stopping's counters, as :func:`update_no_improvement_count` reads them."""

    settings: FitSettings
    best: float = math.inf
    stale: int = 0


def fit_curve(
    curve: Curve,
    data: TensorData | StreamData,
    settings: FitSettings,
    generator: torch.Generator,
) -> tuple[dict[str, list], bool]:
    """Train the bends on the loss along the curve; returns the history and convergence.

    Each step draws one ``t ~ U(0, 1)`` from ``generator``, evaluates the network at
    ``θ(t)`` on the batch with batch-statistics BatchNorm, and steps the bends down the
    gradient of its cross-entropy. Early stopping on the epoch's mean loss, as the
    geodesic's on its energy. The history holds ``loss`` and ``seconds`` per epoch.
    """
    control = curve.control
    bends = {n: v for n, v in control.interior().items() if n not in control.frozen}
    make = SGD if settings.solver == "sgd" else Adam
    optimizer = make([v.requires_grad_(True) for v in bends.values()], lr=settings.learning_rate)
    module = control.batch_statistics_module()
    history: dict[str, list] = {"loss": [], "seconds": []}
    stopping, converged = _Stopping(settings), False
    try:
        while not converged and len(history["loss"]) < settings.max_iter:
            tic = time.perf_counter()
            loss = _curve_epoch(curve, data, settings, generator, module, bends, optimizer)
            if not math.isfinite(loss):
                raise ValueError(
                    f"The loss along the curve became {loss} in epoch "
                    f"{len(history['loss']) + 1}: lower learning_rate_init (now "
                    f"{settings.learning_rate})."
                )
            history["loss"].append(loss)
            history["seconds"].append(time.perf_counter() - tic)
            converged = update_no_improvement_count(stopping, loss)  # type: ignore[arg-type]
    finally:
        for v in bends.values():
            v.grad = None
            v.requires_grad_(False)
    return history, converged


def _curve_epoch(
    curve: Curve,
    data: TensorData | StreamData,
    settings: FitSettings,
    generator: torch.Generator,
    module: torch.nn.Module,
    bends: dict[str, Tensor],
    optimizer: Adam | SGD,
) -> float:
    """One pass: a step per batch at a random ``t``; the epoch's mean loss."""
    control = curve.control
    total, seen = 0.0, 0
    for batch in data.batches(settings.batch_size, generator=generator):
        if batch.y is None:
            raise ValueError("A curve is trained on labels: X yielded a batch without y.")
        if control.has_batchnorm and n_rows(batch.x) < 2:
            continue  # no batch statistics from one sample
        t = torch.rand(1, generator=generator, dtype=torch.float64)
        stacks = {
            name: torch.cat([stack[:1], bends[name], stack[-1:]]) if name in bends else stack
            for name, stack in control.params.items()
        }
        params = curve.params_at(t, stacks)
        logits = control.functional_forward(params, batch.x, module=module, strategy="loop")[0]
        loss = F.cross_entropy(logits, batch.y)
        for v in bends.values():
            v.grad = None
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * n_rows(batch.x)
        seen += n_rows(batch.x)
    return total / seen if seen else math.nan
