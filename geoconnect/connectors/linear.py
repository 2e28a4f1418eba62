"""The straight line between two networks in parameter space."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from ..divergences import jensen_shannon
from ..repair import repair as repair_path
from ._base import _BaseConnector


class LinearConnector(_BaseConnector):
    """Linear interpolation ``θ(t) = (1 − t) θ_a + t θ_b``: the baseline path.

    The straight line in parameter space is what mode-connectivity studies measure
    barriers on. Fitting it needs no optimisation; ``X`` is optional and, when given,
    is used to recompute the interior points' BatchNorm statistics (required for
    networks with BatchNorm) and to measure the path's Fisher–Rao length.

    Parameters
    ----------
    n_points : int, default=25
        Number of points on the path, ends included (≥ 2).
    device : str or torch.device, default="auto"
        Where the path lives: ``"auto"`` picks CUDA, then MPS, then the CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds the two models fit trains when it gets neither model_a nor model_b,
        and the order of weight matching with ``align``; the line itself involves
        no randomness.
    model_factory : callable, default=None
        Used only when fit gets neither ``model_a`` nor ``model_b``: fit then trains
        the two ends as ``model_factory(X, y, seed)`` (X a float tensor, y int64
        class indices, both on the device) with two seeds drawn from
        ``random_state``. None trains a small ReLU MLP sized from the number of
        features and classes; see :class:`GeodesicConnector`.
    align : {"weight_matching"} or None, default=None
        Align model_b's hidden units to model_a's before connecting them:
        ``"weight_matching"`` permutes model_b's units by
        :func:`geoconnect.align.weight_matching` (Git Re-Basin), which leaves its
        function unchanged but brings it close to model_a in parameter space. Then
        ``path_[-1]`` is the permuted copy of model_b (same outputs, reordered
        units). None connects the models as given.
    repair : bool, default=False
        Rescale each interior point's pre-activations to the interpolation of the
        ends' means and standard deviations, measured on X (REPAIR, Jordan et al.
        2023; see :func:`geoconnect.repair.repair`, which repairs any connector's
        path). It undoes the variance collapse of averaged networks; for BatchNorm
        layers the statistics recomputation is that correction already. Needs X.
        Where it would make the path worse — a higher loss barrier on X against
        the ends' predicted classes, a label-free rule — the plain line is kept,
        with a warning (``path_.metadata["repair"]`` is then False, and
        ``"repair_barrier"`` holds both paths' values).
    output : None, str, int or callable, default=None
        Where the logits are in what the models return. None detects it: a tensor
        as it is, the first element of a tuple or list, the ``"logits"`` entry of a
        mapping or a ``transformers`` ``ModelOutput``. Otherwise a key
        (``output="scores"``), an index, or a callable
        ``output(model_output) -> logits`` (a named function, so the estimator can
        be pickled). ``path_[i]`` still returns what the models return; every number
        is computed from the logits.

    Attributes
    ----------
    path_ : ModelPath
        The path; ``path_[0]`` and ``path_[-1]`` compute what model_a and model_b do
        (with ``align``, ``path_[-1]`` is model_b with its units permuted).
    length_ : float or None
        Fisher–Rao length on the fit data (radians); None when fit without X.
    energy_ : float or None
        Sum of the Jensen–Shannon divergences between neighbouring points on the fit
        data (nats), comparable with a default :class:`GeodesicConnector`'s; None when
        fit without X.
    euclidean_length_ : float
        Length in parameter space, ``‖θ_b − θ_a‖₂``.
    n_classes_ : int
        Number of classes the models output (set when fit with X).
    classes_ : ndarray of shape (n_classes_,)
        ``0 … n_classes_ − 1``; the labels of y when fit trained the models.
    n_features_in_ : int
        Number of features of a 2-D X.

    See Also
    --------
    GeodesicConnector : the low-loss path through distribution space.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import LinearConnector
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> X, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    >>> line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
    >>> len(line.path_)
    5
    >>> line.evaluate(X, y).barrier >= 0
    True
    """

    _parameter_constraints: dict = {
        **_BaseConnector._parameter_constraints,
        "repair": ["boolean"],
    }

    def __init__(
        self,
        n_points: int = 25,
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        model_factory: Callable[..., nn.Module] | None = None,
        align: str | None = None,
        output: str | int | Callable[[object], object] | None = None,
        repair: bool = False,
    ):
        self.n_points = n_points
        self.device = device
        self.random_state = random_state
        self.model_factory = model_factory
        self.align = align
        self.output = output
        self.repair = repair

    def fit(
        self,
        X: object = None,
        y: object = None,
        *,
        model_a: nn.Module | None = None,
        model_b: nn.Module | None = None,
    ) -> LinearConnector:
        """Build the straight line between ``model_a`` and ``model_b``.

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, Dataset or \
DataLoader, optional
            Data to recompute BatchNorm statistics on and to measure lengths with.
            Required when the models have BatchNorm layers.
        y : array-like of shape (n_samples,), optional
            With the models given, only checked (length, labels within the models'
            classes). Without models, the labels the two ends are trained on.
        model_a, model_b : nn.Module, optional
            The ends: classifiers of the same architecture mapping X to logits.
            Not modified; the path holds copies. Pass both, or neither to have fit
            train two from ``model_factory`` (then X and y are required).

        Returns
        -------
        self : LinearConnector
        """
        return self._fit_transaction(X, y, model_a, model_b)

    def _fit(self, X: object, y: object, model_a: object, model_b: object) -> dict[str, object]:
        """The fit's work; returns the fitted attributes instead of setting them."""
        inputs = self._fit_inputs(X, y, model_a, model_b, require_X=False)
        path = self._line(inputs)
        if path.has_batchnorm:
            if inputs.data is None:
                raise ValueError(
                    "The models have BatchNorm layers, whose statistics cannot be "
                    "interpolated: pass X to LinearConnector.fit so that the interior "
                    "points' statistics are recomputed on it."
                )
            path.recompute_batchnorm(inputs.data, batch_size=self._eval_batch_size())
        if self.repair:
            if inputs.data is None:
                raise ValueError(
                    "repair=True rescales the interior points' activations to statistics "
                    "measured on data: pass X to LinearConnector.fit."
                )
            path = repair_path(path, inputs.data, batch_size=self._eval_batch_size())
        return self._path_attributes(path, inputs, jensen_shannon)
