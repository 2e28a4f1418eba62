"""REPAIR: restore the pre-activation statistics of interpolated networks.

Jordan et al. (*REPAIR: REnormalizing Permuted Activations for Interpolation
Repair*, ICLR 2023) observed that averaging two networks' weights shrinks the spread
of their hidden units' activations ("variance collapse"), and that much of the linear
barrier goes once each unit's mean and standard deviation are reset to the
interpolation of the ends'. :func:`repair` does that for every point of a path:
at point ``i`` (weight ``w = i / (N − 1)``) each channel ``c`` of each *site* gets

``y_c ← (y_c − μ_c) · σ*_c / σ_c + μ*_c``,  with ``μ* = (1 − w) μ_a + w μ_b`` and
``σ* = (1 − w) σ_a + w σ_b``,

where ``μ, σ`` are the channel's mean and standard deviation over the data (and over
positions for convolutions and tokens) and ``a``, ``b`` the path's ends. The
correction is folded into the site's weight and bias, so the repaired points are
ordinary networks of the architecture. Sites are corrected in forward order, each
measured after the ones before it are fixed.

The sites are the pre-activations: the outputs of ``nn.Linear`` and ``nn.Conv*``
layers, or — where such an output goes straight into a ``LayerNorm`` or
``GroupNorm`` — that normalisation layer's output (its affine parameters take the
correction; this is what matters for LayerNorm networks, whose per-sample
normalisation does not undo a per-channel collapse). A layer whose output goes
straight into a BatchNorm is not a site: recomputing that BatchNorm's statistics on
the data, which every connector does, already renormalises it, so for BatchNorm
networks REPAIR is that recomputation (the special case). The last layer called (the
logits) is left as it is, as are layers called more than once per forward pass and
layers whose weight is frozen.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ._data import Batch, StreamData, TensorData, as_data
from ._inputs import call, n_rows
from ._model_checks import float_dtype
from .evaluation import loss_barrier
from .path import ModelPath, recompute_module_batchnorm

__all__ = ["repair"]

_EPS = 1e-5
_NORMS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class _Site:
    """A layer whose output channels REPAIR rescales: its name and channel layout."""

    name: str
    #: How the channels lie in the output: "last" (Linear), "first" (dim 1: Conv,
    #: GroupNorm) or "trailing" (LayerNorm: its normalized_shape's dims).
    layout: str
    trailing: int = 1

    def reduce_dims(self, y: Tensor) -> list[int]:
        """The dims a channel's statistics are taken over."""
        if self.layout == "first":
            return [0, *range(2, y.ndim)]
        return list(range(y.ndim - self.trailing))


@torch.no_grad()
def repair(path: ModelPath, X: object, *, batch_size: int = 256, guard: bool = True) -> ModelPath:
    """A copy of ``path`` whose interior points have the ends' interpolated statistics.

    REPAIR can make a path worse: on a narrow MLP, or on a pair whose line has no
    barrier, it raises the loss barrier. With ``guard`` (the default) it never does
    so silently: the repaired and the plain path are compared by their loss barrier
    on ``X`` with the ends' predicted classes as the labels — at the point of weight
    ``w``, the mean of ``(1 − w) · CE(p_w, ŷ_a) + w · CE(p_w, ŷ_b)``, and its largest
    excess over the chord between the ends' (:func:`~geoconnect.evaluation.loss_barrier`):
    label-free, and the loss barrier itself on inputs both ends classify correctly.
    Where the repaired path's is higher, a ``UserWarning`` says so and the plain path
    is returned (metadata ``repair=False``); both values are in the metadata's
    ``"repair_barrier"``.

    Parameters
    ----------
    path : ModelPath
        Any path: a connector's ``path_`` or :meth:`ModelPath.linear`. Not modified.
    X : array-like, tensor, mapping, Dataset or DataLoader
        The inputs the statistics are measured on (labels are not needed).
    batch_size : int, default=256
        Batch size of the measuring passes.
    guard : bool, default=True
        Keep the plain path, with a warning, where REPAIR raises the loss barrier
        against the ends' predictions (above). False: the repaired path whatever
        it does (both barriers still measured).

    Returns
    -------
    ModelPath
        The repaired path: the same ends, positions, alignment and output convention;
        BatchNorm statistics of the interior recomputed on ``X``. Its metadata says
        ``repair=True``, lists the rescaled layers (``"repair_sites"``), gives the
        label-free barrier of the plain and the repaired path (``"repair_barrier"``,
        nats) and counts
        the network evaluations of one sample that REPAIR made, the comparison's
        included (``"repair_forwards"``). With ``guard``, where REPAIR made the
        path worse: a copy of ``path`` with ``repair=False`` and the same keys.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.repair import repair
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = lambda: torch.nn.Sequential(
    ...     torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> a, b, X = net(), net(), torch.randn(256, 4)
    >>> fixed = repair(ModelPath.linear(a, b, 3), X)
    >>> hidden = lambda m: m[0](X).std(0).mean()
    >>> target = (hidden(a) + hidden(b)) / 2
    >>> bool(abs(hidden(fixed[1]) - target) < 1e-4)
    True
    """
    data = _Counted(
        X
        if isinstance(X, (TensorData, StreamData))
        else as_data(X, device=path.device, dtype=float_dtype(path.template))
    )
    sites = _sites(path, data)
    if not sites and not path.has_batchnorm:
        warnings.warn(
            "REPAIR found no layer to rescale (no nn.Linear, nn.Conv*, LayerNorm or "
            "GroupNorm output before the last layer): the path is returned unchanged.",
            UserWarning,
            stacklevel=2,
        )
    ends = [_statistics(path[i], data, sites, batch_size) for i in (0, -1)]
    repaired = copy.deepcopy(path)
    for i in range(1, path.n_points - 1):
        w = i / (path.n_points - 1)
        target = {
            site.name: tuple(torch.lerp(a, b, w) for a, b in zip(ends[0][k], ends[1][k]))
            for k, site in enumerate(sites)
        }
        module = _repaired_point(path[i], data, sites, target, batch_size)
        _write_point(repaired, i, module)
    barrier = {"plain": _agreement_barrier(path, data, batch_size)}
    barrier["repaired"] = _agreement_barrier(repaired, data, batch_size)
    worse = not barrier["repaired"] <= barrier["plain"]  # NaN counts as worse
    if guard and worse:
        warnings.warn(
            "REPAIR made the path worse on X: its loss barrier against the ends' "
            f"predicted classes is {barrier['repaired']:.4g} nats, the plain path's "
            f"{barrier['plain']:.4g}. The plain path is kept (metadata 'repair': False); "
            "geoconnect.repair.repair(path, X, guard=False) returns the repaired one.",
            UserWarning,
            stacklevel=3,  # repair's caller, through torch.no_grad's wrapper
        )
        repaired = copy.deepcopy(path)
    repaired.metadata = {
        **path.metadata,
        "repair": not (guard and worse),
        "repair_sites": [site.name for site in sites],
        "repair_barrier": barrier,
        "repair_forwards": data.rows,
    }
    return repaired


@torch.no_grad()
def _agreement_barrier(path: ModelPath, data: _Counted, batch_size: int) -> float:
    """The loss barrier of ``path`` on ``data`` with the ends' predicted classes as
    labels: at point ``i`` (``w = i / (N − 1)``), the mean of
    ``(1 − w) · CE(p_i, ŷ_a) + w · CE(p_i, ŷ_b)``, through :func:`loss_barrier`."""
    n_points, rows = path.n_points, 0
    w = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64, device=path.device)[:, None]
    total: Tensor | None = None
    for batch in data.batches(batch_size, networks=n_points):
        log_p = path.logits(batch.x).double().log_softmax(-1)  # (N, batch, classes)
        picked = [
            log_p.gather(-1, log_p[end].argmax(-1).expand(n_points, -1)[..., None])[..., 0]
            for end in (0, -1)
        ]
        loss = -torch.lerp(picked[0], picked[1], w).sum(1)
        total = loss if total is None else total + loss
        rows += n_rows(batch.x)
    if total is None or rows == 0:
        return math.nan
    return loss_barrier((total / rows).cpu().numpy())


class _Counted:
    """The data, counting the network evaluations of one sample its passes feed: a
    row each, or ``networks`` per row for a pass of several networks."""

    def __init__(self, data: TensorData | StreamData):
        self.data, self.rows = data, 0

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None, networks: int = 1
    ) -> Iterator[Batch]:
        for batch in self.data.batches(batch_size, generator=generator):
            self.rows += networks * n_rows(batch.x)
            yield batch


#: What REPAIR's passes read: the data, counted.
_Data = TensorData | StreamData | _Counted


def _sites(path: ModelPath, data: _Data) -> list[_Site]:
    """The layers to rescale, in forward order, found on one probe pass of point 0."""
    module = path[0]
    names = {m: n for n, m in module.named_modules()}
    calls: list[nn.Module] = []
    # id of an output tensor -> the layer that made it, and the tensor, held so that
    # its id is not reused by a later tensor during the pass
    produced: dict[int, tuple[nn.Module, Tensor]] = {}
    fed_norm: dict[nn.Module, nn.Module] = {}  # layer -> the norm layer its output fed

    def after(layer: nn.Module, _inputs: tuple, output: object) -> None:
        calls.append(layer)
        if isinstance(output, Tensor):
            produced[id(output)] = (layer, output)

    def before(norm: nn.Module, inputs: tuple) -> None:
        x = inputs[0] if inputs else None
        if isinstance(x, Tensor) and id(x) in produced and produced[id(x)][1] is x:
            fed_norm[produced[id(x)][0]] = norm

    watched = [m for m in module.modules() if isinstance(m, (nn.Linear, _ConvNd, *_NORMS))]
    handles = [m.register_forward_hook(after) for m in watched]
    handles += [m.register_forward_pre_hook(before) for m in watched if isinstance(m, _NORMS)]
    try:
        call(module, next(iter(data.batches(8))).x)
    finally:
        for handle in handles:
            handle.remove()
    if not calls:
        return []
    once = [m for m in dict.fromkeys(calls) if calls.count(m) == 1 and m is not calls[-1]]
    chosen = [_site_of(m, fed_norm.get(m), names) for m in once]
    trainable = {n for n, p in module.named_parameters() if n not in path.frozen}
    return [
        site
        for site in dict.fromkeys(s for s in chosen if s is not None)
        if f"{site.name}.weight" in trainable
    ]


def _site_of(layer: nn.Module, norm: nn.Module | None, names: dict) -> _Site | None:
    """The site a layer's output stands for: itself, the norm it feeds, or none."""
    if isinstance(layer, _BatchNorm) or isinstance(norm, _BatchNorm):
        return None  # renormalised by the recomputed statistics
    if norm is not None and not isinstance(layer, _NORMS):
        return _site_of(norm, None, names)
    if isinstance(layer, nn.Linear):
        return _Site(names[layer], "last")
    if isinstance(layer, _ConvNd) or (isinstance(layer, nn.GroupNorm) and layer.affine):
        return _Site(names[layer], "first")
    if isinstance(layer, nn.LayerNorm) and layer.elementwise_affine:
        return _Site(names[layer], "trailing", len(layer.normalized_shape))
    return None


@torch.no_grad()
def _statistics(
    module: nn.Module,
    data: _Data,
    sites: list[_Site],
    batch_size: int,
) -> list[tuple[Tensor, Tensor]]:
    """Each site's per-channel mean and standard deviation over the data (float64)."""
    layers = dict(module.named_modules())
    sums: dict[str, list] = {site.name: [0, 0.0, 0.0] for site in sites}

    def hook(site: _Site):
        def record(_layer: nn.Module, _inputs: tuple, y: Tensor) -> None:
            dims = site.reduce_dims(y)
            y = y.double()
            entry = sums[site.name]
            entry[0] += y.numel() // _channels(y, site)
            entry[1] = entry[1] + y.sum(dims)
            entry[2] = entry[2] + (y * y).sum(dims)

        return record

    handles = [layers[site.name].register_forward_hook(hook(site)) for site in sites]
    try:
        for batch in data.batches(batch_size):
            call(module, batch.x)
    finally:
        for handle in handles:
            handle.remove()
    result = []
    for site in sites:
        count, total, squares = sums[site.name]
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0)
        result.append((mean, var.sqrt()))
    return result


def _channels(y: Tensor, site: _Site) -> int:
    """The number of channels of a site's output."""
    if site.layout == "first":
        return y.shape[1]
    return int(torch.tensor(y.shape[y.ndim - site.trailing :]).prod())


def _repaired_point(
    module: nn.Module,
    data: _Data,
    sites: list[_Site],
    target: dict[str, tuple[Tensor, Tensor]],
    batch_size: int,
) -> nn.Module:
    """Rescale each site of one point in turn, measured after the earlier ones."""
    layers = dict(module.named_modules())
    for site in sites:
        recompute_module_batchnorm(module, data, batch_size)
        ((mean, std),) = _statistics(module, data, [site], batch_size)
        goal_mean, goal_std = target[site.name]
        # A channel constant on the data (a dead unit) keeps its scale: only its mean
        # can be restored, and a huge weight would blow up on other inputs.
        alive = std > _EPS * (1 + goal_std)
        scale = torch.where(alive, goal_std / std.clamp_min(_EPS), torch.ones_like(std))
        _fold(layers[site.name], site, scale, goal_mean - scale * mean)
    recompute_module_batchnorm(module, data, batch_size)
    return module


def _fold(layer: nn.Module, site: _Site, scale: Tensor, shift: Tensor) -> None:
    """Make ``layer``'s output ``scale · y + shift`` per channel."""
    weight = layer.weight
    shape = (-1,) + (1,) * (weight.ndim - 1) if site.layout != "trailing" else weight.shape
    weight.mul_(scale.reshape(shape).to(weight.dtype))
    bias = getattr(layer, "bias", None)
    if bias is None:
        warnings.warn(
            f"REPAIR: layer {site.name!r} has no bias, so only the spread of its "
            "channels is restored, not their means.",
            UserWarning,
            stacklevel=5,
        )
        return
    bias.mul_(scale.reshape(bias.shape).to(bias.dtype)).add_(
        shift.reshape(bias.shape).to(bias.dtype)
    )


def _write_point(path: ModelPath, i: int, module: nn.Module) -> None:
    """Copy one point's module into the path's stacks at ``i``."""
    params = dict(module.named_parameters())
    for name, stack in path.params.items():
        stack[i] = params[name].detach().to(stack.dtype)
    buffers = dict(module.named_buffers())
    for name, stack in path.batchnorm_buffers.items():
        stack[i] = buffers[name].detach().to(stack.dtype)
