"""Bezier curves and polygonal chains trained on the loss (Garipov et al., 2018)."""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ..curves import Curve, fit_curve
from ..divergences import jensen_shannon
from ._base import _LossConnector, communication


class CurveConnector(_LossConnector):
    """A low-loss curve between two networks, trained on labelled data.

    The curve of Garipov et al. (*Loss Surfaces, Mode Connectivity, and Fast
    Ensembling of DNNs*, 2018): a quadratic-or-higher Bezier curve, or a polygonal
    chain, from ``model_a`` to ``model_b`` through ``n_bends`` trainable bends,
    initialised on the straight line and trained to minimise the expected loss
    ``E_{t ~ U(0,1)} L(θ(t))`` — one ``t`` per batch, BatchNorm layers on the batch's
    statistics. Any ``nn.Module`` works as it is: the curve's networks are evaluated
    functionally, no layer is rewritten. Unlike :class:`GeodesicConnector` it needs
    labels. ``path_`` holds ``n_points`` networks along the curve (BatchNorm
    statistics recomputed), so evaluation, plots, saving and alignment work as for
    the other connectors; the curve itself is ``curve_``.

    Parameters
    ----------
    n_points : int, default=25
        Networks sampled along the trained curve for ``path_`` (``t = i/(n − 1)``).
    curve : {"bezier", "polychain"}, default="bezier"
        A Bezier curve with the bends as its inner control points, or the polygonal
        chain through them.
    n_bends : int, default=3
        Trainable control points between the ends.
    solver : {"adam", "sgd"}, default="adam"
    learning_rate_init : float, default=3e-3
    max_iter : int, default=50
        Maximum number of epochs.
    batch_size : int, default=128
    tol : float, default=1e-3
        Early stopping on the epoch's mean loss, relative, as the geodesic's.
    n_iter_no_change : int, default=10
    device : str or torch.device, default="auto"
    random_state : int, RandomState instance or None, default=None
        Seeds the batch order and the ``t`` drawn for each batch.
    model_factory : callable, default=None
        Used only when fit gets neither model; see :class:`GeodesicConnector`.
    align : {"weight_matching"} or None, default=None
        Align model_b's units to model_a's first (see :class:`GeodesicConnector`).
    output : None, str, int or callable, default=None
        Where the logits are in the models' output (see :class:`GeodesicConnector`).
    distributed : bool, default=False
        Fit data-parallel on every process of a ``torch.distributed`` group
        (launched by ``torchrun``): a step takes one batch per rank, each rank its
        own batch at its own ``t``, and the ranks add up the bends' gradients
        (``batch_size`` is per rank). The curve is the same on every rank, and that
        of one process taking the same batches and ``t`` in turn (to float
        rounding). Every rank must call fit with the same models, X, y and
        parameters, and an int ``random_state``. See
        :class:`GeodesicConnector`'s ``distributed`` and the user guide's
        "Scaling out".

    Attributes
    ----------
    path_ : ModelPath
        ``n_points`` networks along the curve; the ends compute the models.
    curve_ : Curve
        The trained curve: ``curve_.at(t, X)`` is its network at any ``t``.
    history_ : dict of str to list of float
        Per epoch: ``loss`` (the mean training loss along the curve) and ``seconds``.
    n_iter_ : int
        Epochs run.
    communication_ : dict of str to int
        Only with ``distributed``: as :class:`GeodesicConnector`'s for a curve.
    length_, energy_, euclidean_length_, n_classes_, classes_, n_features_in_
        As for :class:`LinearConnector`, of ``path_`` on the fit data.

    See Also
    --------
    GeodesicConnector : the label-free path along the Fisher–Rao geodesic.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import CurveConnector
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> curve = CurveConnector(n_points=5, max_iter=2, device="cpu", random_state=0)
    >>> curve = curve.fit(X, y, model_a=a, model_b=b)
    >>> len(curve.path_), curve.n_iter_
    (5, 2)
    """

    _parameter_constraints: dict = {
        **_LossConnector._parameter_constraints,
        "curve": [StrOptions({"bezier", "polychain"})],
        "n_bends": [Interval(Integral, 1, None, closed="left")],
        "distributed": ["boolean"],
    }

    def __init__(
        self,
        n_points: int = 25,
        curve: str = "bezier",
        n_bends: int = 3,
        solver: str = "adam",
        learning_rate_init: float = 3e-3,
        max_iter: int = 50,
        batch_size: int = 128,
        tol: float = 1e-3,
        n_iter_no_change: int = 10,
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        model_factory: Callable[..., nn.Module] | None = None,
        align: str | None = None,
        output: str | int | Callable[[object], object] | None = None,
        distributed: bool = False,
    ):
        self.n_points = n_points
        self.curve = curve
        self.n_bends = n_bends
        self.solver = solver
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.random_state = random_state
        self.model_factory = model_factory
        self.align = align
        self.output = output
        self.distributed = distributed

    def fit(
        self,
        X: object,
        y: object = None,
        *,
        model_a: nn.Module | None = None,
        model_b: nn.Module | None = None,
    ) -> CurveConnector:
        """Train the curve between ``model_a`` and ``model_b`` on (X, y).

        A transaction, as the other connectors' fits.

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, mapping, Dataset or \
DataLoader
            Inputs; a Dataset or DataLoader yields ``(x, y)``.
        y : array-like of shape (n_samples,)
            Class indices: required (in X for a Dataset), since the curve is trained
            on the loss.
        model_a, model_b : nn.Module, optional
            The ends; see :class:`GeodesicConnector`.

        Returns
        -------
        self : CurveConnector
        """
        return self._fit_transaction(X, y, model_a, model_b)

    def _fit(self, X: object, y: object, model_a: object, model_b: object) -> dict[str, object]:
        self._check_distributed()
        inputs = self._labelled_inputs(X, y, model_a, model_b, why="trains the curve on the loss")
        data = inputs.data
        assert data is not None
        curve = Curve(self._line(inputs).resample(self.n_bends + 2), self.curve)
        with self._ranks(curve.control, inputs) as (settings, group):
            history, _ = fit_curve(curve, data, settings, self._generator())
        path = curve.sample(self.n_points, data, batch_size=self.batch_size)
        attributes = self._path_attributes(path, inputs, jensen_shannon)
        attributes.update(
            curve_=curve,
            history_=history,
            n_iter_=len(history["loss"]),
            communication_=communication(group),
        )
        return attributes
