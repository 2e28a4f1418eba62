"""The nudged elastic band on the loss (Draxler et al., 2018)."""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import Interval
from torch import nn

from ..divergences import jensen_shannon
from ..neb import fit_neb
from ._base import _LossConnector, check_points_per_rank, communication


class NEBConnector(_LossConnector):
    """A low-loss path between two networks by the nudged elastic band on the loss.

    The method of Draxler et al. (*Essentially No Barriers in Neural Network Energy
    Landscape*, 2018): a band of ``n_points`` networks, the ends fixed at ``model_a``
    and ``model_b``, the interior started on the straight line and moved by the NEB
    force — the loss gradient with its component along the band removed, plus a
    spring along the band that keeps the images evenly spaced — with the improved
    tangent of Henkelman & Jónsson (2000). One step per batch, every image's loss
    and gradient (the images evaluated eight at a time, so the activations held at
    once are eight images', whatever ``n_points``), BatchNorm layers on the batch's
    statistics. Like
    :class:`CurveConnector` it needs labels; unlike the curve, ``path_`` is the band
    itself (BatchNorm statistics recomputed on X), so evaluation, plots, saving and
    alignment work as for the other connectors. The engine is :mod:`geoconnect.neb`.

    Parameters
    ----------
    n_points : int, default=25
        Images of the band, ends included (≥ 2).
    spring_constant : float, default=1.0
        ``k`` of the spring force ``k (‖θ_{i+1} − θ_i‖ − ‖θ_i − θ_{i−1}‖) τ_i``, in
        units of the loss per parameter-space distance. Plain SGD is stable for
        ``spring_constant × learning_rate_init < 0.5``; with Adam keep the product
        much smaller (see Notes).
    insert_points : int, default=0
        Images inserted during the fit, as in AutoNEB: the band starts with
        ``n_points − insert_points`` images evenly on the line (at least 3), the
        ``max_iter`` epochs are split into ``insert_points + 1`` cycles, and after
        each cycle but the last one image is inserted at the midpoint of the segment
        whose midpoint has the highest loss (on at most 1024 rows of X).
    solver : {"sgd", "adam"}, default="sgd"
        The optimiser, given minus the NEB force as its gradient. ``"sgd"`` follows
        the force exactly; Adam rescales each coordinate, so its steps leave the
        force's direction (see Notes).
    learning_rate_init : float, default=0.1
    max_iter : int, default=30
        Maximum number of epochs, all cycles together: ``n_iter_ ≤ max_iter``.
    batch_size : int, default=128
    tol : float, default=1e-3
        Early stopping on the epoch's mean interior loss, relative, as the curve's
        (per cycle).
    n_iter_no_change : int, default=10
    device : str or torch.device, default="auto"
    random_state : int, RandomState instance or None, default=None
        Seeds the batch order and the subset that places insertions.
    model_factory : callable, default=None
        Used only when fit gets neither model; see :class:`GeodesicConnector`.
    align : {"weight_matching"} or None, default=None
        Align model_b's units to model_a's first (see :class:`GeodesicConnector`).
    output : None, str, int or callable, default=None
        Where the logits are in the models' output (see :class:`GeodesicConnector`).
    distributed : bool, default=False
        Split the band's interior images across the processes of a
        ``torch.distributed`` group (launched by ``torchrun``), as
        :class:`GeodesicConnector` splits a chain's points: each rank evaluates and
        moves its block of images on the shared batch; per step the ranks gather
        the images' losses and swap the images at their blocks' edges (which the
        tangents and springs there need); after each epoch every rank gets the
        whole band. The band is that of one process (to float rounding). Needs an
        int ``random_state``, ``n_points − 2`` at least the number of ranks, and
        ``insert_points=0`` (not yet with insertion). See the user guide's
        "Scaling out".

    Attributes
    ----------
    path_ : ModelPath
        The band, ``n_points`` networks; the ends compute the models.
    history_ : dict of str to list
        Per epoch: ``loss`` (the mean training loss of the interior images),
        ``max_loss`` (the highest image's mean training loss), ``seconds`` and
        ``n_points`` (the band's size in that epoch).
    n_iter_ : int
        Epochs run.
    communication_ : dict of str to int
        Only with ``distributed``: this rank's ``rank``, the ``world_size``, and
        what it sent: ``steps`` and ``exchanged_bytes`` (its edge images, two
        networks' parameters a step), ``reduced_bytes`` (its images' losses) and
        ``shared_bytes`` (its block, once per epoch).
    length_, energy_, euclidean_length_, n_classes_, classes_, n_features_in_
        As for :class:`LinearConnector`, of ``path_`` on the fit data.

    See Also
    --------
    CurveConnector : a Bezier curve or polygonal chain trained on the loss.
    GeodesicConnector : the label-free path along the Fisher–Rao geodesic.

    Notes
    -----
    The defaults were chosen by measurement (``benchmarks/methods.py``, 25 images,
    30 epochs, pairs trained 40 epochs on digits). With SGD at 0.1 the default band's
    test loss barriers were 0.000 (64-16-16-10 MLPs; the line's 1.527), 0.014
    (LayerNorm 64-64-64-10 MLPs; the line's 0.179) and 0.033 (aligned residual CNNs;
    the line's 1.205). Adam at 2e-3 gave 0.038, 0.071 and 0.043 on the same pairs,
    with bands two to five times longer than the line in parameter space: Adam's
    per-coordinate steps are not along the force, so once the loss gradients are
    small the spring makes the band oscillate (the loss zig-zags from image to image
    and ``history_["max_loss"]`` climbs). If that happens, lower
    ``learning_rate_init`` or ``spring_constant``.

    Examples
    --------
    >>> import torch
    >>> from geoconnect import NEBConnector
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> neb = NEBConnector(n_points=5, insert_points=1, max_iter=2, device="cpu",
    ...                    random_state=0)
    >>> neb = neb.fit(X, y, model_a=a, model_b=b)
    >>> len(neb.path_), neb.n_iter_, neb.history_["n_points"]
    (5, 2, [4, 5])
    """

    _parameter_constraints: dict = {
        **_LossConnector._parameter_constraints,
        "spring_constant": [Interval(Real, 0, None, closed="left")],
        "insert_points": [Interval(Integral, 0, None, closed="left")],
        "distributed": ["boolean"],
    }

    def __init__(
        self,
        n_points: int = 25,
        spring_constant: float = 1.0,
        insert_points: int = 0,
        solver: str = "sgd",
        learning_rate_init: float = 0.1,
        max_iter: int = 30,
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
        self.spring_constant = spring_constant
        self.insert_points = insert_points
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
    ) -> NEBConnector:
        """Fit the band between ``model_a`` and ``model_b`` on (X, y).

        A transaction, as the other connectors' fits: a fit that raises leaves the
        estimator as it was.

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, mapping, Dataset or \
DataLoader
            Inputs; a Dataset or DataLoader yields ``(x, y)``.
        y : array-like of shape (n_samples,)
            Class indices: required (in X for a Dataset), since the band moves down
            the loss.
        model_a, model_b : nn.Module, optional
            The ends; see :class:`GeodesicConnector`.

        Returns
        -------
        self : NEBConnector
        """
        return self._fit_transaction(X, y, model_a, model_b)

    def _fit(self, X: object, y: object, model_a: object, model_b: object) -> dict[str, object]:
        start = self.n_points - self.insert_points
        if self.insert_points and start < 3:
            raise ValueError(
                f"insert_points={self.insert_points} leaves the band "
                f"n_points - insert_points = {start} images to start with; it needs at "
                "least 3 (one interior image). Lower insert_points or raise n_points."
            )
        self._check_distributed()
        if self.distributed and self.insert_points:
            raise ValueError(
                f"insert_points={self.insert_points} grows the band between cycles, which "
                "distributed=True does not do yet. Set insert_points=0 (and n_points to "
                "the images you want), or distributed=False."
            )
        inputs = self._labelled_inputs(X, y, model_a, model_b, why="moves the band down the loss")
        data = inputs.data
        assert data is not None
        band = self._line(inputs)
        if start != self.n_points:
            band = band.resample(start)
        with self._ranks(band, inputs) as (settings, group):
            check_points_per_rank(self.n_points, group, "image")
            band, history, _ = fit_neb(
                band,
                data,
                settings,
                self._generator(),
                spring_constant=self.spring_constant,
                insert_points=self.insert_points,
            )
        band.recompute_batchnorm(data, batch_size=self.batch_size)
        attributes = self._path_attributes(band, inputs, jensen_shannon)
        attributes.update(
            history_=history, n_iter_=len(history["loss"]), communication_=communication(group)
        )
        return attributes
