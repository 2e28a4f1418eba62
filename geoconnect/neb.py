"""The nudged elastic band on the loss (Draxler et al., 2018; Henkelman & Jónsson, 2000).

A band of ``N`` networks — images — ``θ_0 … θ_{N−1}``, held as a
:class:`~geoconnect.ModelPath`: the ends are the two models and stay fixed, the
interior starts on the straight line. Each step evaluates every image on one labelled
batch (BatchNorm layers on the batch's statistics, as the curve's fit does), takes each
image's cross-entropy ``V_i`` and its gradient ``g_i``, and moves the interior images
along the NEB force

``F_i = −(g_i − (g_i·τ_i) τ_i) + k (‖θ_{i+1} − θ_i‖ − ‖θ_i − θ_{i−1}‖) τ_i``:

the loss gradient with its component along the band removed, so that images do not
slide down into the ends' basins, plus a spring along the band that keeps them evenly
spaced. ``τ_i`` is the improved tangent of Henkelman & Jónsson, which points to the
higher-loss neighbour (and mixes both at a loss extremum), so that the band does not
kink. Vectors run over every trainable parameter of the network; the frozen ones
(``path.frozen``) do not move. The optimiser (Adam or SGD) steps down ``−F_i`` as
its gradient.

With ``insert_points``, the band grows as in Draxler et al.'s AutoNEB: it starts with
fewer images, and after each cycle of epochs but the last one image is inserted at
the midpoint of the segment whose midpoint has the highest loss on a fixed subset of
the fit data.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._data import Batch, StreamData, TensorData
from ._inputs import n_rows, rows
from ._optim import SGD, Adam
from .distributed import block_bounds
from .fitting import POINTS_PER_CHUNK, FitSettings, choose_strategy, update_no_improvement_count
from .path import ModelPath

__all__ = ["fit_neb", "improved_tangents", "insert_image", "midpoint_losses", "neb_gradient"]

#: Rows of the fit data on which the midpoints are scored for an insertion.
_PROBE_ROWS = 1024


#: A band: one flattened tensor (n_images, n_params), or one stack per parameter
#: tensor, each (n_images, *shape), as :attr:`~geoconnect.ModelPath.params` holds them.
Band = Tensor | dict[str, Tensor]


def improved_tangents(theta: Band, energies: Tensor) -> Band:
    """The improved tangents of Henkelman & Jónsson (2000) at the interior images.

    At image ``i`` the tangent is the segment towards the higher-energy neighbour
    when the energy rises or falls monotonically through ``i``; at an extremum it is
    the mix ``ΔV_max τ⁺ + ΔV_min τ⁻`` (or the reverse), weighted towards the
    higher neighbour, so the tangent turns continuously. Normalised over all of an
    image's parameters; zero where both segments are.

    Parameters
    ----------
    theta : Tensor of shape (n_images, n_params), or dict of str to Tensor
        The band, flattened, or one stack of shape (n_images, *shape) per parameter
        tensor (computed a tensor at a time, without flattening the band).
    energies : Tensor of shape (n_images,)
        Each image's loss.

    Returns
    -------
    Tensor of shape (n_images − 2, n_params), or dict of str to Tensor
        Of ``theta``'s kind, the stacks of shape (n_images − 2, *shape).

    Examples
    --------
    >>> import torch
    >>> from geoconnect.neb import improved_tangents
    >>> theta = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    >>> improved_tangents(theta, torch.tensor([0.0, 1.0, 2.0]))  # rising: forward
    tensor([[0., 1.]])
    >>> improved_tangents(theta, torch.tensor([2.0, 1.0, 0.0]))  # falling: backward
    tensor([[1., 0.]])
    """
    stacks = _stacks(theta)
    tangent = _Tangent(stacks, energies)
    return _like(theta, {name: tangent.of(name) for name in stacks})


def neb_gradient(theta: Band, energies: Tensor, gradients: Band, spring_constant: float) -> Band:
    """Minus the NEB force on the interior images: what the optimiser steps down.

    ``−F_i = (g_i − (g_i·τ_i) τ_i) − k (‖θ_{i+1} − θ_i‖ − ‖θ_i − θ_{i−1}‖) τ_i``, with
    ``τ_i`` from :func:`improved_tangents`; dot products and norms run over all of an
    image's parameters.

    Parameters
    ----------
    theta : Tensor of shape (n_images, n_params), or dict of str to Tensor
        The band, flattened, or one stack of shape (n_images, *shape) per parameter
        tensor: then the force is computed a tensor at a time, and its temporaries
        are a few copies of the largest tensor's stack, not of the whole band.
    energies : Tensor of shape (n_images,)
        Each image's loss.
    gradients : Tensor of shape (n_images − 2, n_params), or dict of str to Tensor
        The loss gradients of the interior images, of ``theta``'s kind.
    spring_constant : float
        ``k``.

    Returns
    -------
    Tensor of shape (n_images − 2, n_params), or dict of str to Tensor

    Examples
    --------
    >>> import torch
    >>> from geoconnect.neb import neb_gradient
    >>> theta = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    >>> g = torch.tensor([[5.0, 2.0]])  # along the band: dropped; across: kept
    >>> neb_gradient(theta, torch.tensor([0.0, 1.0, 2.0]), g, spring_constant=1.0)
    tensor([[-1.,  2.]])
    """
    stacks, grads = _stacks(theta), _stacks(gradients)
    tangent = _Tangent(stacks, energies)
    along = sum(_dot(grads[name], tangent.of(name)) for name in stacks)
    push = along + spring_constant * (tangent.forward_norm - tangent.backward_norm)
    return _like(
        theta,
        {name: grads[name] - _per_image(push, grads[name]) * tangent.of(name) for name in stacks},
    )


class _Tangent:
    """The improved tangent of a band given as stacks, one tensor at a time.

    The weights of the two segments at each image depend on the energies alone; the
    norms of the segments and of the mixed tangent are summed over the stacks once;
    :meth:`of` gives one stack's slice of the normalised tangent on demand.
    """

    def __init__(self, stacks: dict[str, Tensor], energies: Tensor):
        self.stacks = stacks
        self.w_forward, self.w_backward = _tangent_weights(energies)
        first = next(iter(stacks.values()))
        zeros = torch.zeros(first.shape[0] - 2, dtype=first.dtype, device=first.device)
        forward_sq, backward_sq, mixed_sq = zeros.clone(), zeros.clone(), zeros.clone()
        for name in stacks:
            forward, backward = self._segments(name)
            forward_sq += _dot(forward, forward)
            backward_sq += _dot(backward, backward)
            mixed = self._mix(forward, backward)
            mixed_sq += _dot(mixed, mixed)
        self.forward_norm, self.backward_norm = forward_sq.sqrt(), backward_sq.sqrt()
        self.norm = mixed_sq.sqrt().clamp_min(torch.finfo(first.dtype).tiny)

    def _segments(self, name: str) -> tuple[Tensor, Tensor]:
        stack = self.stacks[name]
        return stack[2:] - stack[1:-1], stack[1:-1] - stack[:-2]

    def _mix(self, forward: Tensor, backward: Tensor) -> Tensor:
        w_f = _per_image(self.w_forward.to(forward), forward)
        w_b = _per_image(self.w_backward.to(forward), forward)
        return w_f * forward + w_b * backward

    def of(self, name: str) -> Tensor:
        """The normalised tangent's stack for parameter ``name``: (n_images − 2, *shape)."""
        mixed = self._mix(*self._segments(name))
        return mixed / _per_image(self.norm, mixed)


def _tangent_weights(energies: Tensor) -> tuple[Tensor, Tensor]:
    """Each interior image's weights of its forward and backward segment."""
    v_prev, v, v_next = energies[:-2], energies[1:-1], energies[2:]
    up = (v_next > v) & (v > v_prev)
    down = (v_next < v) & (v < v_prev)
    d_next, d_prev = (v_next - v).abs(), (v_prev - v).abs()
    big, small = torch.maximum(d_next, d_prev), torch.minimum(d_next, d_prev)
    rising = v_next > v_prev
    w_forward = torch.where(up, 1.0, torch.where(down, 0.0, torch.where(rising, big, small)))
    w_backward = torch.where(up, 0.0, torch.where(down, 1.0, torch.where(rising, small, big)))
    flat = (w_forward == 0) & (w_backward == 0)  # equal energies: the bisector
    return w_forward.masked_fill(flat, 1.0), w_backward.masked_fill(flat, 1.0)


def _stacks(band: Band) -> dict[str, Tensor]:
    return band if isinstance(band, dict) else {"": band}


def _like(band: Band, stacks: dict[str, Tensor]) -> Band:
    return stacks if isinstance(band, dict) else stacks[""]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per image (the first dimension): the dot product over all other dimensions."""
    return (a * b).reshape(a.shape[0], -1).sum(1)


def _per_image(values: Tensor, like: Tensor) -> Tensor:
    """``values`` of shape (n,) shaped to broadcast over ``like`` of shape (n, …)."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def insert_image(band: ModelPath, segment: int) -> ModelPath:
    """The band with one more image, at the midpoint of segment ``segment``.

    Segment ``j`` joins images ``j`` and ``j + 1``; the new image becomes image
    ``j + 1``. Its BatchNorm statistics are a placeholder (image ``j``'s) until
    :meth:`~geoconnect.ModelPath.recompute_batchnorm`.

    Parameters
    ----------
    band : ModelPath
    segment : int
        In ``[0, n_points − 2]``.

    Returns
    -------
    ModelPath
        A new band of ``n_points + 1`` images; ``band`` is left as it was.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.neb import insert_image
    >>> band = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 3)
    >>> longer = insert_image(band, 1)
    >>> len(longer), torch.equal(longer.params["bias"][3], band.params["bias"][2])
    (4, True)
    """
    if not 0 <= segment < band.n_points - 1:
        raise ValueError(
            f"segment must be in [0, {band.n_points - 2}] for a band of {band.n_points} "
            f"images; got {segment}."
        )
    j = segment
    params = {
        name: torch.cat(
            [stack[: j + 1], torch.lerp(stack[j], stack[j + 1], 0.5)[None], stack[j + 1 :]]
        )
        for name, stack in band.params.items()
    }
    bn = {
        name: torch.cat([stack[: j + 1], stack[j : j + 1], stack[j + 1 :]])
        for name, stack in band.batchnorm_buffers.items()
    }
    longer = ModelPath(
        band.template, params, bn, strategy=band.strategy, frozen=band.frozen, output=band.output
    )
    longer.alignment = dict(band.alignment)
    return longer


@torch.no_grad()
def midpoint_losses(
    band: ModelPath, batches: list[Batch], module: nn.Module | None = None
) -> Tensor:
    """The mean cross-entropy of each segment's midpoint over labelled batches.

    Parameters
    ----------
    band : ModelPath
    batches : list of Batch
        Labelled batches on the band's device.
    module : nn.Module, optional
        The module to evaluate; default the band's template (running statistics).
        A fit passes :meth:`~geoconnect.ModelPath.batch_statistics_module`'s.

    Returns
    -------
    Tensor of shape (n_points − 1,), float64

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect._data import Batch
    >>> from geoconnect.neb import midpoint_losses
    >>> band = ModelPath.linear(torch.nn.Linear(2, 3), torch.nn.Linear(2, 3), 4)
    >>> batch = Batch(torch.randn(8, 2), torch.randint(0, 3, (8,)), None)
    >>> midpoint_losses(band, [batch]).shape
    torch.Size([3])
    """
    mids = {name: torch.lerp(stack[:-1], stack[1:], 0.5) for name, stack in band.params.items()}
    total = torch.zeros(band.n_points - 1, dtype=torch.float64, device=band.device)
    seen = 0
    for batch in batches:
        size = n_rows(batch.x)
        if band.has_batchnorm and size < 2:
            continue  # no batch statistics from one sample
        logits = band.functional_forward(mids, batch.x, module=module)
        total += _image_losses(logits, batch.y).double() * size
        seen += size
    return total / seen if seen else total.fill_(math.nan)


def _image_losses(logits: Tensor, y: Tensor) -> Tensor:
    """Each image's mean cross-entropy: logits (K, batch, C), y (batch,) → (K,)."""
    k, b, c = logits.shape
    losses = F.cross_entropy(logits.reshape(k * b, c), y.repeat(k), reduction="none")
    return losses.reshape(k, b).mean(1)


def _new_history() -> dict[str, list]:
    return {"loss": [], "max_loss": [], "seconds": [], "n_points": []}


@dataclass
class _Run:
    """A NEB fit's state: the band, its moving views and their optimiser, the history."""

    data: TensorData | StreamData
    settings: FitSettings
    generator: torch.Generator
    spring_constant: float
    module: nn.Module
    band: ModelPath | None = None
    #: The trainable interior stacks: views into ``band.params``, moved in place.
    images: dict[str, Tensor] = field(default_factory=dict)
    optimizer: Adam | SGD | None = None
    history: dict[str, list] = field(default_factory=_new_history)
    probe: list[Batch] = field(default_factory=list)
    best: float = math.inf
    stale: int = 0

    def attach(self, band: ModelPath, moments: dict | None = None) -> None:
        """Make ``band`` the one that moves, with a fresh optimiser (or these moments)."""
        self.release()
        self.band = band
        interior = band.interior(trainable=True) if band.n_points > 2 else {}
        block = self.block()
        self.images = {n: v[block].requires_grad_(True) for n, v in interior.items()}
        make = SGD if self.settings.solver == "sgd" else Adam
        self.optimizer = make(list(self.images.values()), lr=self.settings.learning_rate)
        if moments:
            self.optimizer.load_moments(moments)

    def block(self) -> slice:
        """The interior images this process moves: all, or its rank's block."""
        assert self.band is not None
        n_interior = max(self.band.n_points - 2, 0)
        group = self.settings.group
        return slice(0, n_interior) if group is None else group.block(n_interior)

    def release(self) -> None:
        for v in self.images.values():
            v.grad = None
            v.requires_grad_(False)
        self.images = {}


def fit_neb(
    band: ModelPath,
    data: TensorData | StreamData,
    settings: FitSettings,
    generator: torch.Generator,
    *,
    spring_constant: float = 1.0,
    insert_points: int = 0,
) -> tuple[ModelPath, dict[str, list], bool]:
    """Move the band's interior images along the NEB force; insert images if asked.

    The ``settings.max_iter`` epochs are split into ``insert_points + 1`` cycles, each
    with its own early stopping on the epoch's mean interior loss (as the curve's);
    between cycles one image is inserted where the loss is highest
    (:func:`midpoint_losses` on at most 1024 rows of ``data``, :func:`insert_image`),
    and Adam's moments of the new image are the mean of its neighbours'. Sets the
    band's :attr:`~geoconnect.ModelPath.strategy` by
    :func:`~geoconnect.fitting.choose_strategy`.

    Parameters
    ----------
    band : ModelPath
        The starting band, moved in place (returned as it is if nothing is inserted).
    data : TensorData or StreamData
        Labelled batches.
    settings : FitSettings
        ``solver``, ``learning_rate``, ``max_iter``, ``batch_size``, ``tol`` and
        ``n_iter_no_change`` are read.
    generator : torch.Generator
        The batch order and the insertion subset.
    spring_constant : float, default=1.0
        ``k`` of the NEB force.
    insert_points : int, default=0
        Images to insert.

    Returns
    -------
    band : ModelPath
        The fitted band, of ``len(band) + insert_points`` images.
    history : dict of str to list
        Per epoch: ``loss`` (mean interior loss), ``max_loss`` (the highest image's
        mean loss), ``seconds``, ``n_points``.
    converged : bool
        Whether the last cycle stopped early.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect._data import as_data
    >>> from geoconnect.fitting import FitSettings
    >>> from geoconnect.neb import fit_neb
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> data = as_data(torch.randn(64, 4), torch.randint(0, 3, (64,)), device="cpu")
    >>> band, history, _ = fit_neb(ModelPath.linear(a, b, 4), data, FitSettings(max_iter=4),
    ...                            torch.Generator().manual_seed(0), insert_points=1)
    >>> len(band), history["n_points"]
    (5, [4, 4, 5, 5])
    """
    run = _Run(data, settings, generator, spring_constant, band.batch_statistics_module())
    band.strategy = choose_strategy(band, data.head(2), run.module)
    if insert_points:
        run.probe = _probe_batches(data, generator, settings.batch_size)
    run.attach(band)
    converged = False
    try:
        for cycle, budget in enumerate(_cycle_budgets(settings.max_iter, insert_points + 1)):
            if cycle:
                _insert_at_highest_loss(run)
            converged = _run_cycle(run, budget)
    finally:
        run.release()
    assert run.band is not None
    return run.band, run.history, converged


def _cycle_budgets(max_iter: int, cycles: int) -> list[int]:
    """``max_iter`` epochs split into ``cycles`` near-equal parts, the later ones larger."""
    base, extra = divmod(max_iter, cycles)
    return [base + (1 if c >= cycles - extra else 0) for c in range(cycles)]


def _probe_batches(
    data: TensorData | StreamData, generator: torch.Generator, batch_size: int
) -> list[Batch]:
    """A fixed random subset of the fit data, at most 1024 rows, in training batches."""
    batches, seen = [], 0
    for batch in data.batches(batch_size, generator=generator):
        if batch.y is None:
            raise ValueError(_NO_LABELS)
        take = min(n_rows(batch.x), _PROBE_ROWS - seen)
        batches.append(Batch(rows(batch.x, slice(0, take)), batch.y[:take], None))
        seen += take
        if seen >= _PROBE_ROWS:
            break
    return batches


_NO_LABELS = (
    "The band moves down the loss, which needs labels: X yielded a batch without y; "
    "make it yield (x, y)."
)


def _run_cycle(run: _Run, budget: int) -> bool:
    """Up to ``budget`` epochs with early stopping; True when it stopped early."""
    run.best, run.stale = math.inf, 0
    if not run.images:
        return True  # no interior image, or every parameter frozen: nothing moves
    for _ in range(budget):
        tic = time.perf_counter()
        losses = _epoch(run)
        if run.settings.group is not None:  # every rank the whole band
            assert run.band is not None
            run.settings.group.share_points(run.band.params, run.band.n_points - 2)
        loss = float(losses[1:-1].mean())
        if not math.isfinite(loss):
            raise ValueError(
                f"The loss along the band became {loss} in epoch "
                f"{len(run.history['loss']) + 1}: lower learning_rate_init (now "
                f"{run.settings.learning_rate})."
            )
        run.history["loss"].append(loss)
        run.history["max_loss"].append(float(losses.max()))
        run.history["seconds"].append(time.perf_counter() - tic)
        run.history["n_points"].append(losses.numel())
        if update_no_improvement_count(run, loss):  # type: ignore[arg-type]
            return True
    return False


def _epoch(run: _Run) -> Tensor:
    """One pass, a step per batch; each image's mean loss over the epoch (float64)."""
    assert run.band is not None
    total = torch.zeros(run.band.n_points, dtype=torch.float64, device=run.band.device)
    seen = 0
    for batch in run.data.batches(run.settings.batch_size, generator=run.generator):
        if batch.y is None:
            raise ValueError(_NO_LABELS)
        size = n_rows(batch.x)
        if run.band.has_batchnorm and size < 2:
            continue  # no batch statistics from one sample
        total += _step(run, batch).double() * size
        seen += size
    return total / seen if seen else total.fill_(math.nan)


def _step(run: _Run, batch: Batch) -> Tensor:
    """One NEB step on a batch; returns every image's loss on it.

    Image ``i``'s loss depends on ``θ_i`` alone, so the interior images are evaluated
    and back-propagated ``POINTS_PER_CHUNK`` at a time (as the geodesic's are): the
    activations held at once are a chunk's, whatever the band's length.
    """
    band, images = run.band, run.images
    assert band is not None and run.optimizer is not None
    with torch.no_grad():
        ends = {name: stack[[0, -1]] for name, stack in band.params.items()}
        end_losses = _image_losses(
            band.functional_forward(ends, batch.x, module=run.module), batch.y
        )
    block = run.block()
    grads = {name: torch.zeros_like(v) for name, v in images.items()}
    interior = []
    for start in range(0, block.stop - block.start, POINTS_PER_CHUNK):
        where = slice(start, min(start + POINTS_PER_CHUNK, block.stop - block.start))
        leaves = {name: v[where].detach().requires_grad_(True) for name, v in images.items()}
        fixed = {n: s[1:-1][block][where] for n, s in band.params.items() if n not in images}
        logits = band.functional_forward({**leaves, **fixed}, batch.x, module=run.module)
        losses = _image_losses(logits, batch.y)
        losses.sum().backward()
        for name, leaf in leaves.items():
            if leaf.grad is not None:  # None: a parameter the forward pass does not use
                grads[name][where] = leaf.grad
        interior.append(losses.detach())
    for name, v in images.items():
        v.grad = grads[name]
    mine = torch.cat(interior) if interior else end_losses.new_zeros(0)
    if run.settings.group is not None:  # every image's loss; the neighbours' images
        mine = _every_image_loss(run, mine)
        _refresh_neighbours(run)
    losses = torch.cat([end_losses[:1], mine, end_losses[1:]])
    _replace_gradients(run, losses)
    run.optimizer.step()
    return losses


def _every_image_loss(run: _Run, mine: Tensor) -> Tensor:
    """The interior images' losses on the batch, from every rank's block."""
    assert run.band is not None and run.settings.group is not None
    n_interior = run.band.n_points - 2
    bounds = block_bounds(n_interior, run.settings.group.world_size)
    widest = max(stop - start for start, stop in bounds)
    padded = torch.cat([mine, mine.new_zeros(widest - len(mine))])
    every = run.settings.group.gather_tensor(padded)
    return torch.cat([every[r][: stop - start] for r, (start, stop) in enumerate(bounds)])


@torch.no_grad()
def _refresh_neighbours(run: _Run) -> None:
    """Write the images just before and after this rank's block, as their owners
    hold them now, into the band: the tangents and springs of the block's ends."""
    assert run.band is not None and run.settings.group is not None
    band, block = run.band, run.block()
    names = list(run.images)
    first, last = (
        torch.cat([band.params[n][1 + i].reshape(-1) for n in names])
        for i in (block.start, block.stop - 1)
    )
    left, right = run.settings.group.neighbours(first, last, band.n_points - 2)
    for vector, index in ((left, block.start), (right, block.stop + 1)):
        if vector is None:
            continue  # an end: fixed, the same everywhere
        for name, part in zip(names, vector.split([band.params[n][0].numel() for n in names])):
            band.params[name][index].copy_(part.view_as(band.params[name][index]))


@torch.no_grad()
def _replace_gradients(run: _Run, energies: Tensor) -> None:
    """Swap the images' loss gradients for minus the NEB force, a tensor at a time."""
    assert run.band is not None
    block = run.block()
    around = slice(block.start, block.stop + 2)  # the block and its two neighbours
    theta = {name: run.band.params[name][around] for name in run.images}
    energies = energies[around]
    grads = {n: torch.zeros_like(v) if v.grad is None else v.grad for n, v in run.images.items()}
    dtype = next(iter(theta.values())).dtype
    force = neb_gradient(theta, energies.to(dtype), grads, run.spring_constant)
    for name, v in run.images.items():
        v.grad = force[name].contiguous()


def _insert_at_highest_loss(run: _Run) -> None:
    """Insert an image at the highest-loss midpoint; carry Adam's moments over."""
    assert run.band is not None and run.optimizer is not None
    losses = midpoint_losses(run.band, run.probe, run.module)
    segment = int(torch.nan_to_num(losses, nan=math.inf).argmax())
    moments = _moments_with_new_image(run.optimizer.moments(), segment, run.band.n_points - 2)
    run.attach(insert_image(run.band, segment), moments)


def _moments_with_new_image(moments: dict, segment: int, n_interior: int) -> dict:
    """Adam's moments with a row for the image inserted in ``segment``.

    The new image lies between images ``segment`` and ``segment + 1`` (interior rows
    ``segment − 1`` and ``segment``); its moments are the mean of those of its
    interior neighbours, the step count stays. Without them (a fresh row of zeros
    under an advanced step count) its first steps would be ~3 times too long.
    """
    neighbours = [r for r in (segment - 1, segment) if 0 <= r < n_interior]
    out = {}
    for index, entry in moments.items():
        new = dict(entry)
        for key in ("exp_avg", "exp_avg_sq"):
            m = entry[key]
            row = m[neighbours].mean(0, keepdim=True)
            new[key] = torch.cat([m[:segment], row, m[segment:]])
        out[index] = new
    return out
