"""The Fisher–Rao geodesic between two networks, by energy minimisation."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._data import TensorData
from ..divergences import DIVERGENCES, fisher_rao_squared, get_divergence
from ..evaluation import euclidean_length, fisher_rao_length, segment_divergences
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
        Seeds the batch order (the only randomness of the fit).
    verbose : int, default=0
        1: a progress bar with energy and length; 2: a line per epoch.
    warm_start : bool, default=False
        Continue from the previous ``path_`` instead of the straight line.

    Attributes
    ----------
    path_ : ModelPath
        The fitted path. ``path_[0]`` and ``path_[-1]`` compute what model_a and
        model_b do; interior BatchNorm statistics are recomputed on X.
    energy_ : float
        Energy of the path on X, in the divergence's units.
    length_ : float
        Fisher–Rao length on X (radians), whatever the divergence.
    euclidean_length_ : float
        Length in parameter space.
    history_ : dict of str to list of float
        Per epoch: ``energy`` and ``length`` (means over the epoch's batches, as the
        path moved), ``euclidean_length`` (at the epoch's end).
    n_iter_ : int
        Number of epochs run.
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
        y : ignored
            Accepted for pipeline compatibility; the fit is label-free.
        model_a, model_b : nn.Module
            The ends: classifiers of the same architecture mapping X to logits.
            Not modified; the path holds copies.

        Returns
        -------
        self : GeodesicConnector
        """
        self._validate_params()
        divergence = get_divergence(self.divergence)
        inputs = self._fit_inputs(X, None, model_a, model_b, require_X=True)
        path = self._initial_path(inputs)
        history = (
            self.history_
            if self.warm_start and hasattr(self, "history_")
            else {"energy": [], "length": [], "euclidean_length": []}
        )
        n_iter = self.n_iter_ if self.warm_start and hasattr(self, "n_iter_") else 0
        if path.n_points > 2:
            n_iter += self._optimise(path, inputs, divergence, history)
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

    def _optimise(
        self,
        path: ModelPath,
        inputs: FitInputs,
        divergence: object,
        history: dict[str, list[float]],
    ) -> int:
        data = inputs.data
        assert data is not None
        rng = check_random_state(self.random_state)
        generator = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        n_points = path.n_points
        interior = {
            name: stack[1:-1].clone().requires_grad_(True) for name, stack in path.params.items()
        }
        tensors = list(interior.values())
        if self.solver == "adam":
            optimizer = torch.optim.Adam(tensors, lr=self.learning_rate_init)
        else:
            optimizer = torch.optim.SGD(tensors, lr=self.learning_rate_init)
        module = path.batch_statistics_module()
        ends = _EndLogits(path, data, self.batch_size)
        first = next(iter(data.batches(self.batch_size)))
        path.choose_strategy(first.x, n_points - 2, module=module)

        best, stale, epochs = np.inf, 0, 0
        bar = tqdm(total=self.max_iter, disable=self.verbose != 1, desc="geodesic", unit="epoch")
        try:
            for epoch in range(self.max_iter):
                energy_sum = torch.zeros(n_points - 1, device=inputs.device, dtype=torch.float64)
                length_sum = torch.zeros_like(energy_sum)
                seen = 0
                for batch in data.batches(self.batch_size, generator=generator):
                    inner = path.functional_forward(interior, batch.x, module=module)
                    end = ends.logits(batch)
                    logits = torch.cat([end[:1], inner, end[1:]])
                    costs = segment_divergences(logits, divergence)
                    optimizer.zero_grad(set_to_none=True)
                    costs.mean(1).sum().backward()
                    optimizer.step()
                    with torch.no_grad():
                        energy_sum += costs.detach().double().sum(1)
                        length_sum += segment_divergences(
                            logits.detach().double(), fisher_rao_squared
                        ).sum(1)
                    seen += batch.x.shape[0]
                energy = float(energy_sum.sum()) / seen
                if not np.isfinite(energy):
                    raise ValueError(
                        f"The energy became {energy} in epoch {epoch + 1}. Lower "
                        f"learning_rate_init (now {self.learning_rate_init}) or check "
                        "that the divergence is finite for these models."
                    )
                epochs += 1
                with torch.no_grad():
                    for name, stack in path.params.items():
                        stack[1:-1] = interior[name].detach()
                length = fisher_rao_length(length_sum / seen)
                history["energy"].append(energy)
                history["length"].append(length)
                history["euclidean_length"].append(euclidean_length(path))
                bar.update(1)
                bar.set_postfix(energy=f"{energy:.4g}", length=f"{length:.4g}")
                if self.verbose >= 2:
                    print(
                        f"epoch {epoch + 1:4d}  energy {energy:.6g}  length {length:.6g}  "
                        f"euclidean length {history['euclidean_length'][-1]:.6g}"
                    )
                if energy > best - self.tol:
                    stale += 1
                    if stale >= self.n_iter_no_change:
                        break
                else:
                    stale = 0
                best = min(best, energy)
        except KeyboardInterrupt:
            warnings.warn(
                f"Fitting interrupted after {epochs} complete epoch(s); the path keeps "
                "what was learned so far.",
                RuntimeWarning,
                stacklevel=3,
            )
        finally:
            bar.close()
        with torch.no_grad():
            for name, stack in path.params.items():
                stack[1:-1] = interior[name].detach()
        return epochs


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
