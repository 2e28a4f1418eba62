"""The Fisher–Rao geodesic between two networks, by energy minimisation."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._data import TensorData
from ..divergences import DIVERGENCES, get_divergence
from ..evaluation import energy_step, euclidean_length, fisher_rao_length
from ..path import ModelPath
from ._base import FitInputs, _BaseConnector


class GeodesicConnector(_BaseConnector):
    """Low-loss path between two networks along a geodesic of their predictions.

    The path is a chain of ``n_points`` networks ``θ_0 = θ_a, θ_1, …, θ_{N−1} = θ_b``
    whose interior is moved to minimise the energy ``Σ_i E_x D(p_i(x), p_{i+1}(x))``,
    the sum of divergences between neighbouring points' predictive distributions
    (Tan et al., *Geodesic Mode Connectivity*, 2023). Minimisers are constant-speed
    geodesics of the Fisher–Rao metric: the path stays close to both networks'
    predictions, and so at low loss, where the straight line often crosses a barrier.
    The fit needs no labels.

    Parameters
    ----------
    n_points : int, default=25
        Number of networks on the path, ends included (≥ 2).
    divergence : {"jsd", "fisher_rao", "hellinger", "kl"} or callable, default="jsd"
        Segment cost ``D``: Jensen–Shannon (the paper's), squared Fisher–Rao distance,
        squared Hellinger distance, symmetric KL, or a callable
        ``(logits_p, logits_q) -> Tensor`` of per-sample values.
    solver : {"adam", "sgd"}, default="adam"
        Optimiser of the interior points. ``"sgd"`` is plain SGD, the paper's.
    learning_rate_init : float, default=3e-3
        Step size.
    max_iter : int, default=100
        Maximum number of epochs (passes over X).
    batch_size : int, default=256
        Samples per optimisation step.
    tol : float, default=1e-5
        Early stopping: an epoch improves when it lowers the energy by more than
        ``tol``.
    n_iter_no_change : int, default=10
        Stop after this many epochs without improvement.
    device : str or torch.device, default="auto"
        ``"auto"`` picks CUDA, then MPS, then the CPU; any torch device string works.
    random_state : int, RandomState instance or None, default=None
        Seeds the batch order and the order of weight matching with ``align``.
    verbose : int, default=0
        1: a progress bar with energy and length; 2: a line per epoch.
    warm_start : bool, default=False
        Continue from the previous ``path_`` instead of the straight line.
    model_factory : callable, default=None
        Used only when fit gets neither ``model_a`` nor ``model_b``: fit then trains
        the two ends itself, as ``model_factory(X, y, seed)`` with two seeds drawn
        from ``random_state`` (X a float tensor, y int64 class indices, both on the
        device), and connects them. None trains a small ReLU MLP sized from the
        number of features and classes (two hidden layers of
        ``clip(2·(n_features + n_classes), 16, 64)`` units, Adam, ~300 steps).
    align : {"weight_matching"} or None, default=None
        Align model_b's hidden units to model_a's before connecting them:
        ``"weight_matching"`` permutes model_b's units by
        :func:`geoconnect.align.weight_matching` (Git Re-Basin), which leaves its
        function unchanged but brings it close to model_a in parameter space. Then
        ``path_[-1]`` is the permuted copy of model_b (same outputs, reordered
        units). None connects the models as given.
    coarse_to_fine : bool, default=True
        Start with a coarse path (25 → 13 → 7 → 4 points) and refine it: the
        coarser levels run 2, 4, 8, … epochs (cheap: few interior points), then the
        full path runs up to ``max_iter`` epochs with early stopping. On the digits
        pairs this reaches a given barrier with about a third of the computation (see
        ``benchmarks/``). Not used with ``warm_start`` continuing a fitted path.
    mixed_precision : bool, default=False
        Run the networks' forward and backward passes during fitting in bfloat16
        under ``torch.autocast`` (CUDA or CPU); the parameters, their optimiser, the
        energy and every reported number stay in the models' dtype. Meant for large
        networks on GPUs with bfloat16 units. On the digits pairs (CPU) the fitted
        path's test barrier was that of a float32 fit within 0.001 nats, and the
        epochs were no faster.

    Attributes
    ----------
    path_ : ModelPath
        The fitted path. ``path_[0]`` and ``path_[-1]`` compute what model_a and
        model_b do (with ``align``, ``path_[-1]`` is model_b with its units
        permuted); interior BatchNorm statistics are recomputed on X.
    energy_ : float
        Energy of the path on X, in the divergence's units.
    length_ : float
        Fisher–Rao length on X (radians), whatever the divergence.
    euclidean_length_ : float
        Length in parameter space.
    history_ : dict of str to list of float
        Per epoch: ``energy`` and ``length`` (means over the epoch's batches, as the
        path moved), ``euclidean_length`` (at the epoch's end), and ``n_points``
        (the level's number of points with ``coarse_to_fine``; energy and length of
        a coarser level are those of its coarser polygon), and ``seconds`` (the
        epoch's wall-clock time).
    n_iter_ : int
        Number of epochs run, coarse levels included (``len(history_["energy"])``).
    n_classes_ : int
        Number of classes the models output.
    classes_ : ndarray of shape (n_classes_,)
        ``0 … n_classes_ − 1``.
    n_features_in_ : int
        Number of features of a 2-D X.

    See Also
    --------
    LinearConnector : the straight line, the baseline.

    Notes
    -----
    Defaults were chosen by measurement on pairs of digits MLPs: see the user guide.
    The paper's settings are ``solver="sgd", learning_rate_init=0.1, max_iter=20,
    batch_size=256``.

    Each step evaluates the interior 8 points at a time and back-propagates a group
    as soon as the next group's first point is known, so at most two groups' networks
    hold their activations at once: that part of the memory does not grow with
    ``n_points``. The parameters and Adam's two moments do, about 4 × ``n_points`` ×
    the model's parameters.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import GeodesicConnector
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> X = torch.randn(64, 4)
    >>> geo = GeodesicConnector(n_points=5, max_iter=3, device="cpu", random_state=0)
    >>> geo = geo.fit(X, model_a=a, model_b=b)
    >>> geo.n_iter_, len(geo.history_["energy"])
    (3, 3)
    """

    _parameter_constraints: dict = {
        "n_points": [Interval(Integral, 2, None, closed="left")],
        "divergence": [StrOptions(set(DIVERGENCES)), callable],
        "solver": [StrOptions({"adam", "sgd"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "coarse_to_fine": ["boolean"],
        "align": [StrOptions({"weight_matching"}), None],
        "model_factory": [callable, None],
        "mixed_precision": ["boolean"],
    }

    def __init__(
        self,
        n_points: int = 25,
        divergence: str = "jsd",
        solver: str = "adam",
        learning_rate_init: float = 3e-3,
        max_iter: int = 100,
        batch_size: int = 256,
        tol: float = 1e-5,
        n_iter_no_change: int = 10,
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
        warm_start: bool = False,
        align: str | None = None,
        model_factory: Callable[..., nn.Module] | None = None,
        coarse_to_fine: bool = True,
        mixed_precision: bool = False,
    ):
        self.n_points = n_points
        self.divergence = divergence
        self.solver = solver
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.model_factory = model_factory
        self.coarse_to_fine = coarse_to_fine
        self.align = align
        self.mixed_precision = mixed_precision

    def fit(
        self,
        X: object,
        y: object = None,
        *,
        model_a: nn.Module | None = None,
        model_b: nn.Module | None = None,
    ) -> GeodesicConnector:
        """Fit the path between ``model_a`` and ``model_b`` on X.

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, Dataset or DataLoader
            Inputs the predictive distributions are compared on. No labels needed.
        y : array-like of shape (n_samples,), optional
            The path's fit is label-free: with the models given, y is only checked
            (length, labels within the models' classes). Without models, the labels
            the two ends are trained on.
        model_a, model_b : nn.Module, optional
            The ends: classifiers of the same architecture mapping X to logits.
            Not modified; the path holds copies. Pass both, or neither to have fit
            train two from ``model_factory``.

        Returns
        -------
        self : GeodesicConnector
        """
        self._validate_params()
        divergence = get_divergence(self.divergence)
        inputs = self._fit_inputs(X, y, model_a, model_b, require_X=True)
        if self.mixed_precision and inputs.device.type not in ("cuda", "cpu"):
            raise ValueError(
                "mixed_precision=True runs under torch.autocast in bfloat16 on CUDA or "
                f"CPU devices; the device is {inputs.device}. Set mixed_precision=False."
            )
        path = self._initial_path(inputs)
        history = (
            self.history_
            if self.warm_start and hasattr(self, "history_")
            else {"energy": [], "length": [], "euclidean_length": [], "n_points": []}
        )
        history.setdefault("seconds", [])
        continuing = self.warm_start and hasattr(self, "path_")
        n_iter = self.n_iter_ if continuing and hasattr(self, "n_iter_") else 0
        if path.n_points > 2:
            n_iter += self._optimise(path, inputs, divergence, history, continuing)
        assert inputs.data is not None
        path.recompute_batchnorm(inputs.data, batch_size=self.batch_size)
        self.history_ = history
        self.n_iter_ = n_iter
        self._set_path_summary(path, inputs.data, divergence)
        return self

    def _initial_path(self, inputs: FitInputs) -> ModelPath:
        if not (self.warm_start and hasattr(self, "path_")):
            return ModelPath.linear(inputs.model_a, inputs.model_b, self.n_points, inputs.device)
        previous: ModelPath = self.path_
        if len(previous) != self.n_points:
            raise ValueError(
                f"warm_start=True continues from path_, which has {len(previous)} points, "
                f"but n_points={self.n_points}. Set n_points={len(previous)} or "
                "warm_start=False."
            )
        # The ends are the models given now; the interior continues from path_.
        path = ModelPath.linear(inputs.model_a, inputs.model_b, self.n_points, inputs.device)
        for name, stack in path.params.items():
            stack[1:-1] = previous.params[name][1:-1].to(inputs.device)
        return path

    def _levels(self, n_points: int, continuing: bool) -> list[tuple[int, int]]:
        """Coarse-to-fine schedule: (n_points, epochs) per level, the last being the fit's.

        Each coarser level has about half the points of the next (25 → 13 → 7 → 4)
        and twice its epochs (2, 4, 8, …): a few interior points find the geodesic's
        shape at a fraction of the cost, and the finer levels start close to it.
        """
        sizes = [n_points]
        if self.coarse_to_fine and not continuing:
            while sizes[0] > 5:
                sizes.insert(0, (sizes[0] + 2) // 2)
        n_coarse = len(sizes) - 1
        epochs = [2 ** (n_coarse - k) for k in range(n_coarse)] + [self.max_iter]
        return list(zip(sizes, epochs))

    def _optimise(
        self,
        path: ModelPath,
        inputs: FitInputs,
        divergence: object,
        history: dict[str, list[float]],
        continuing: bool,
    ) -> int:
        data = inputs.data
        assert data is not None
        rng = check_random_state(self.random_state)
        generator = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        module = path.batch_statistics_module()
        ends = _EndLogits(path, data, self.batch_size)
        first = next(iter(data.batches(self.batch_size)))
        path.choose_strategy(first.x, min(path.n_points - 2, _POINTS_PER_CHUNK), module=module)
        levels = self._levels(path.n_points, continuing)
        bar = tqdm(
            total=sum(e for _, e in levels),
            disable=self.verbose != 1,
            desc="geodesic",
            unit="epoch",
        )
        current = path if len(levels) == 1 else path.resample(levels[0][0])
        epochs = 0
        try:
            for level, (n_points, budget) in enumerate(levels):
                if current.n_points != n_points:
                    current = current.resample(n_points)
                if n_points == path.n_points and current is not path:
                    for name, stack in path.params.items():
                        stack[1:-1] = current.params[name][1:-1]
                    current = path
                current._strategy = path._strategy
                final = level == len(levels) - 1
                epochs += self._descend(
                    current,
                    data,
                    module,
                    ends,
                    divergence,
                    history,
                    generator,
                    budget,
                    early_stopping=final,
                    bar=bar,
                    epochs_before=epochs,
                )
        except KeyboardInterrupt:
            warnings.warn(
                f"Fitting interrupted after {epochs} complete epoch(s); the path keeps "
                "what was learned so far.",
                RuntimeWarning,
                stacklevel=3,
            )
            if current is not path:  # interrupted at a coarse level: spread it out
                current = current.resample(path.n_points)
                for name, stack in path.params.items():
                    stack[1:-1] = current.params[name][1:-1]
        finally:
            bar.close()
        return epochs

    def _descend(
        self,
        path: ModelPath,
        data: object,
        module: nn.Module,
        ends: _EndLogits,
        divergence: object,
        history: dict[str, list[float]],
        generator: torch.Generator,
        max_epochs: int,
        *,
        early_stopping: bool,
        bar: tqdm,
        epochs_before: int,
    ) -> int:
        """Minimise the energy of ``path``'s interior for up to ``max_epochs`` epochs.

        The interior is updated in place in ``path.params``.
        """
        n_points = path.n_points
        # The interior is a view of the stacked points: the optimiser updates the path
        # in place, with no second copy of the parameters.
        interior = {name: stack[1:-1].requires_grad_(True) for name, stack in path.params.items()}
        tensors = list(interior.values())
        device = next(iter(path.params.values())).device
        if self.solver == "adam":
            # One fused kernel per tensor where torch has it: a third of the for-loop
            # implementation's time per step (130 against 430 us on the digits CNN).
            fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
            optimizer = torch.optim.Adam(tensors, lr=self.learning_rate_init, **fused)
        else:
            optimizer = torch.optim.SGD(tensors, lr=self.learning_rate_init)
        best, stale, epochs = np.inf, 0, 0
        for _ in range(max_epochs):
            tic = time.perf_counter()
            energy_sum = torch.zeros(n_points - 1, device=device, dtype=torch.float64)
            length_sum = torch.zeros_like(energy_sum)
            seen = 0
            for batch in data.batches(self.batch_size, generator=generator):  # type: ignore[attr-defined]
                costs, fr_squared = _step(
                    path, interior, batch, ends, module, divergence, self.mixed_precision
                )
                optimizer.step()
                energy_sum += costs
                length_sum += fr_squared
                seen += batch.x.shape[0]
            # One host-device synchronisation per epoch, here.
            energy = float(energy_sum.sum()) / seen
            if not np.isfinite(energy):
                raise ValueError(
                    f"The energy became {energy} in epoch {epochs_before + epochs + 1}. "
                    f"Lower learning_rate_init (now {self.learning_rate_init}) or check "
                    "that the divergence is finite for these models."
                )
            epochs += 1
            length = fisher_rao_length(length_sum / seen)
            history["energy"].append(energy)
            history["length"].append(length)
            history["euclidean_length"].append(euclidean_length(path))
            history["n_points"].append(n_points)
            history["seconds"].append(time.perf_counter() - tic)
            bar.update(1)
            bar.set_postfix(points=n_points, energy=f"{energy:.4g}", length=f"{length:.4g}")
            if self.verbose >= 2:
                print(
                    f"epoch {epochs_before + epochs:4d}  points {n_points:3d}  "
                    f"energy {energy:.6g}  length {length:.6g}  "
                    f"euclidean length {history['euclidean_length'][-1]:.6g}"
                )
            if early_stopping:
                if energy > best - self.tol:
                    stale += 1
                    if stale >= self.n_iter_no_change:
                        break
                else:
                    stale = 0
                best = min(best, energy)
        for tensor in tensors:
            tensor.grad = None
            tensor.requires_grad_(False)
        return epochs


_POINTS_PER_CHUNK = 8  # interior points whose networks' activations live together


def _step(
    path: ModelPath,
    interior: dict[str, Tensor],
    batch: object,
    ends: _EndLogits,
    module: nn.Module,
    divergence: object,
    mixed_precision: bool,
) -> tuple[Tensor, Tensor]:
    """Set the interior's gradient of the energy on one batch; return its segment sums.

    The interior is evaluated ``_POINTS_PER_CHUNK`` points at a time, each network
    once. A point's gradient needs only its neighbours' logits, so a chunk is
    back-propagated as soon as the next chunk's first point is known, before the
    next chunk's own segments are differentiated: at most two chunks' networks hold
    their activations at once, and the divergence's temporaries meet only one
    chunk's, whatever the number of points. The result is the gradient of the whole
    batch's energy.
    """
    end = ends.logits(batch)
    precision = (
        torch.autocast(end.device.type, dtype=torch.bfloat16)
        if mixed_precision
        else contextlib.nullcontext()
    )
    n_interior = next(iter(interior.values())).shape[0]
    for tensor in interior.values():
        if tensor.grad is None:
            tensor.grad = torch.empty_like(tensor)
    costs: list[Tensor] = []
    fr_squared: list[Tensor] = []
    pending: _Chunk | None = None
    left = end[:1]  # logits of the point before the chunk, not differentiated
    for start in range(0, n_interior, _POINTS_PER_CHUNK):
        where = slice(start, min(start + _POINTS_PER_CHUNK, n_interior))
        leaves = {n: t[where].detach().requires_grad_(True) for n, t in interior.items()}
        with precision:
            out = path.functional_forward(leaves, batch.x, module=module)  # type: ignore[attr-defined]
        chunk = _Chunk(where, leaves, out.to(end.dtype))
        del out
        own = chunk.logits.detach()
        last = where.stop == n_interior
        if pending is None:  # the first chunk: no earlier chunk waits on its segments
            block = torch.cat([left, own, end[1:]] if last else [left, own])
            chunk.grad = _energy(block, divergence, costs, fr_squared)[1 : len(own) + 1]
            del block
        else:
            # The segment joining the chunk to the point before it completes the
            # previous chunk's gradient; that chunk is back-propagated, and its
            # activations freed, before this chunk's own segments are differentiated.
            join = _energy(torch.cat([left, own[:1]]), divergence, costs, fr_squared)
            pending.grad[-1] += join[0]  # type: ignore[index]
            pending.backward(interior)
            inside = torch.cat([own, end[1:]]) if last else own
            grad = (
                _energy(inside, divergence, costs, fr_squared)
                if len(inside) > 1
                else torch.zeros_like(inside)
            )
            grad[0] += join[1]
            chunk.grad = grad[: len(own)]
            del inside, grad, join
        left = own[-1:].clone()
        pending = chunk
        del own
    assert pending is not None
    pending.backward(interior)
    return torch.cat(costs), torch.cat(fr_squared)


def _energy(
    logits: Tensor, divergence: object, costs: list[Tensor], fr_squared: list[Tensor]
) -> Tensor:
    """Gradient of the energy of the segments between ``logits``; their sums appended."""
    grad, costs_part, fr_part = energy_step(logits, divergence)  # type: ignore[arg-type]
    costs.append(costs_part)
    fr_squared.append(fr_part)
    return grad


@dataclasses.dataclass
class _Chunk:
    """Interior points evaluated together, and their logits awaiting its gradient."""

    where: slice
    leaves: dict[str, Tensor]
    logits: Tensor | None
    grad: Tensor | None = None

    def backward(self, interior: dict[str, Tensor]) -> None:
        """Back-propagate into this chunk's slice of the interior's gradient, and free."""
        self.logits.backward(self.grad)  # type: ignore[union-attr]
        for name, leaf in self.leaves.items():
            target = interior[name].grad[self.where]  # type: ignore[index]
            if leaf.grad is None:  # a parameter the forward pass does not use
                target.zero_()
            else:
                target.copy_(leaf.grad)
        self.logits = self.grad = None
        self.leaves = {}


class _EndLogits:
    """The fixed ends' eval-mode logits, computed once per sample when data allow."""

    def __init__(self, path: ModelPath, data: object, batch_size: int):
        self.path = path
        self.cache: Tensor | None = None
        if isinstance(data, TensorData):
            blocks = [path.logits(batch.x, points=[0, -1]) for batch in data.batches(batch_size)]
            self.cache = torch.cat(blocks, dim=1)

    def logits(self, batch: object) -> Tensor:
        if self.cache is not None and batch.index is not None:  # type: ignore[attr-defined]
            return self.cache[:, batch.index]  # type: ignore[attr-defined]
        return self.path.logits(batch.x, points=[0, -1])  # type: ignore[attr-defined]
