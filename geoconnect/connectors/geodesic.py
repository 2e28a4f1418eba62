"""The Fisher–Rao geodesic between two networks, by energy minimisation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from .._data import StreamData, TensorData, split_off
from ..checkpoint import Checkpoint
from ..curves import Curve, arc_length_t, fit_curve
from ..distributed import PathGroup
from ..divergences import DIVERGENCES, Divergence, get_divergence
from ..fitting import FitResult, FitSettings, copy_history, fit_path, warn_not_converged
from ..path import ModelPath
from ._base import (
    _UNSET,
    OPTIMISATION_CONSTRAINTS,
    FitInputs,
    _BaseConnector,
    check_points_per_rank,
    communication,
    optimisation_settings,
)

#: What ``learning_rate_init="auto"`` is with a relative step (a curve's default) ...
CURVE_RELATIVE_RATE = 0.035
#: ... and with an absolute one (the chain's).
ABSOLUTE_RATE = 3e-3
#: What ``max_iter="auto"`` is for a curve (a budget: see the parameter) ...
CURVE_EPOCHS = 20
#: ... and for the chain (a limit its early stopping usually comes before).
CHAIN_EPOCHS = 100


class GeodesicConnector(_BaseConnector):
    """Low-loss path between two networks along a geodesic of their predictions.

    By default (``curve="bezier"``) the path is the continuous geodesic: a Bezier
    curve ``θ(t)`` from ``θ_a`` to ``θ_b`` through ``n_bends`` free networks, whose
    bends descend its Fisher–Rao energy ``∫₀¹ E_x ‖θ̇(t)‖²_F dt``, and ``path_``
    holds ``n_points`` networks along it. With ``curve="chain"`` the path is a
    chain of ``n_points`` networks ``θ_0 = θ_a, θ_1, …, θ_{N−1} = θ_b`` whose
    interior is moved to minimise the energy ``Σ_i E_x D(p_i(x), p_{i+1}(x))``, the
    sum of divergences between neighbouring points' predictive distributions (Tan
    et al., *Geodesic Mode Connectivity*, 2023). Minimisers of either are
    constant-speed geodesics of the Fisher–Rao metric: the path stays close to
    both networks' predictions, and so at low loss, where the straight line often
    crosses a barrier. The fit needs no labels.

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
    learning_rate_init : float or "auto", default="auto"
        Step size: with ``relative_step``, in units of each tensor's distance
        between the models. ``"auto"``: 0.035 with a relative step (a curve's
        default), 3e-3 without (the chain's); measured, see the user guide's "How
        the geodesic is fitted".
    learning_rate : {"constant", "cosine", "adaptive"}, default="constant"
        A curve's learning-rate schedule (``curve="bezier"`` or ``"polychain"``):
        constant; falling from ``learning_rate_init`` to 0 along half a cosine
        over ``max_iter`` epochs; or ``"adaptive"`` (as scikit-learn's
        ``MLPClassifier``): divided by 5 where early stopping would stop, twice,
        the fit stopping at the third plateau
        (:func:`geoconnect.fitting.scheduled_rate`). The chain's rate is constant:
        another schedule with ``curve="chain"`` is refused.
    relative_step : bool or "auto", default="auto"
        A curve's step relative to each tensor's scale: each parameter tensor
        steps by ``learning_rate_init`` times the RMS distance between its values
        in the two models (:func:`geoconnect.fitting.relative_scales`), so that
        one rate means the same for every architecture's parametrisation (a
        fine-tune's weights, close to each other, move as little as it moved
        them). The chain's step is absolute: ``True`` with ``curve="chain"`` is
        refused. ``"auto"``: True for a curve, False for the chain.
    validation_fraction : float or None, default=None
        A curve's early stopping on held-out inputs: this fraction of X (at
        random, by ``random_state``; no labels needed) is set aside, the curve's
        length on it is measured after every epoch, the fit stops when it has not
        improved for ``n_iter_no_change`` epochs, and the curve of the epoch where
        it was shortest is returned (``history_["validation_length"]``, and
        ``"validation_energy"``). The rest of
        X is descended; the path's statistics and ``length_`` use all of X. None:
        early stopping watches the descended inputs' energy. Needs array or
        mapping X (not a Dataset or DataLoader); the chain's early stopping watches
        its energy: a fraction with ``curve="chain"`` is refused.
    max_iter : int or "auto", default="auto"
        Maximum number of epochs (passes over X), the coarse levels of
        ``coarse_to_fine`` included: ``n_iter_ ≤ max_iter`` always. ``"auto"``:
        100 for the chain; 20 for a curve, which then stops there without a
        ``ConvergenceWarning``: a curve's length on the fit inputs goes on
        falling long after its loss barrier on other inputs has stopped
        improving (on the benchmark's narrow digits MLPs, the test barrier was
        0.000 after 20 epochs and 0.031 after 80), so its fit is a budget, not a
        descent to convergence (the user guide's "How the geodesic is fitted").
    batch_size : int, default=256
        Samples per optimisation step.
    tol : float, default=1e-3
        Early stopping: an epoch improves when it lowers the lowest energy so far by
        more than the fraction ``tol`` of it (a relative rule, the same for every
        divergence and number of points).
    n_iter_no_change : int, default=10
        Stop after this many epochs of the full path without improvement. When
        ``max_iter`` runs out first, a ``ConvergenceWarning`` says so.
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
        Start with a coarse path (4 → 7 → 13 → 25 points) and refine it: the
        coarser levels run 8, 4, 2 epochs (cheap: few interior points), then the
        full path runs the rest of ``max_iter`` with early stopping. The coarse
        levels take at most half of ``max_iter``, the coarsest dropped first
        (:func:`geoconnect.fitting.coarse_to_fine_schedule`). Not used with
        ``warm_start`` continuing a fitted path.
    mixed_precision : bool, default=False
        Run the networks' forward and backward passes during fitting in bfloat16
        under ``torch.autocast`` (CUDA or CPU); the parameters, their optimiser, the
        energy and every reported number stay in the models' dtype. Meant for large
        networks on GPUs with bfloat16 units. On the digits pairs (CPU, 8 epochs)
        the fitted path's test barrier was that of a float32 fit within 0.002 nats,
        and the epochs were no faster. The points are then evaluated in a loop
        (``torch.autocast`` does not reach inside ``vmap``).
    strategy : {"auto", "vmap", "loop"}, default="auto"
        How the points are evaluated together: one ``torch.func.vmap`` call, or a
        loop over the points. ``"auto"`` decides by a fixed rule from the
        architecture and one trial pass, never by timing, so results do not depend
        on the machine's load (:func:`geoconnect.fitting.choose_strategy`); the
        choice is ``strategy_``. With ``mixed_precision`` it is the loop, since
        ``torch.autocast`` does not reach inside ``vmap``.
    checkpoint : str or path-like, default=None
        A directory where the fit writes its whole state after every epoch
        (``checkpoint.safetensors``, replaced atomically: a crash leaves the last
        complete epoch's). A later ``fit`` with the same directory, models, X and
        parameters resumes from it and ends with the same path as an uninterrupted
        fit (bitwise on the CPU); a checkpoint of a finished fit is resumed at its
        end. A checkpoint made with other models, data or parameters is refused,
        naming what differs, and never overwritten. ``verbose``, ``device`` and
        ``checkpoint`` itself may differ. Give each fit its own directory (in a
        grid search, a fit per candidate would refuse the others' checkpoints).
        With ``distributed``, each rank keeps two files of its own, written in turn.
        See :mod:`geoconnect.checkpoint`.
    output : None, str, int or callable, default=None
        Where the logits are in what the models return. None detects it: a tensor
        as it is, the first element of a tuple or list, the ``"logits"`` entry of a
        mapping or a ``transformers`` ``ModelOutput``. Otherwise a key
        (``output="scores"``), an index, or a callable
        ``output(model_output) -> logits`` (a named function, so the estimator can
        be pickled). ``path_[i]`` still returns what the models return; every number
        is computed from the logits.

    distributed : bool, default=False
        Fit on every process of a ``torch.distributed`` group (launched by
        ``torchrun``; the group is initialised from its environment when it is not
        already, gloo on CPUs, NCCL on GPUs, where ``device="auto"`` takes
        ``cuda:LOCAL_RANK``). A curve (the default) is fitted data-parallel: a step
        takes one batch per rank, each rank its own batch at its own draws of
        ``t``, and the ranks add up the bends' gradients (``batch_size`` is per
        rank, so a step sees ``batch_size × world_size`` inputs). A chain's points
        are split instead: each rank holds and optimises a contiguous block of the
        interior (and the ends: about ``5/W`` of one process's path-sized memory),
        the ranks exchange only their boundary points' logits at each step, and at
        the end every rank gets the whole path. Either way the fitted
        path is the same on every rank, and that of one process taking the same
        batches and ``t`` in turn (to float rounding). Every rank must call fit
        with the same models, X and parameters, and an int ``random_state``.
        Ctrl-C stops every rank with ``KeyboardInterrupt``; a rank that dies makes
        the others raise, naming it; a fit with ``checkpoint`` resumes. See
        :mod:`geoconnect.distributed` and the user guide's "Scaling out".
    gather : bool, default=True
        Only with ``distributed`` and ``curve="chain"``. True: every rank ends with
        the whole path as ``path_``. False: each rank's ``path_`` keeps its block
        of points and the two ends (``path_.shard`` says which), and
        ``path_.save(file)`` — on every rank — writes one file per rank and an index
        (Hugging Face's layout), which ``ModelPath.load`` reads as the whole path in
        any number of processes. The lengths and the energy are measured on the
        whole path once, at the end of the fit. ``score``, called on every rank,
        evaluates each rank's points and gathers their losses; ``evaluate`` and the
        predictions refuse a shard (load the saved path to evaluate it).
    curve : {"chain", "bezier", "polychain"}, default="bezier"
        ``"chain"``: the ``n_points`` networks above are free, and the energy is
        the sum of divergences between neighbours. ``"bezier"`` or
        ``"polychain"``: the continuous geodesic, a Bezier curve or polygonal
        chain through ``n_bends`` free networks (as :class:`CurveConnector`'s),
        whose bends descend the Fisher–Rao energy ``∫₀¹ E_x ‖θ̇(t)‖²_F dt`` on
        each batch, estimated as ``energy`` says. The built-in divergences all
        have the Fisher metric as their local form (up to a constant), so the
        curve descends the same energy whichever is named; a callable divergence
        is refused with a curve. ``n_points`` then only sets how many networks
        ``path_`` samples along the fitted curve (evenly by Fisher–Rao arc
        length), not the cost of a step. Not yet with ``mixed_precision``;
        ``checkpoint`` resumes a curve's fit as a chain's.
    n_bends : int, default=3
        The free networks of a curve (``curve="bezier"`` or ``"polychain"``).
    energy : {"chord", "split", "jvp"}, default="chord"
        How a batch estimates a curve's energy. ``"chord"``: the energy of the
        polygon through the curve's networks on a random grid of 8 steps in ``t``,
        each chord measured by ``divergence``
        (:func:`geoconnect.curves.curve_chord_energy`). ``"split"``: the same
        chords, each measured on its own ninth of the batch, so that a step costs
        two networks' worth of the batch instead of ten (noisier, unbiased; the
        user guide's "How the geodesic is fitted"). ``"jvp"``: the squared
        Fisher–Rao speed at 4 stratified random ``t``, by a forward-mode
        Jacobian–vector product (:func:`geoconnect.curves.curve_energy`): unbiased,
        but heavy-tailed where the curve's predictions switch within a narrow
        interval of ``t``; on the digits pairs its fits were unstable at every
        learning rate tried, and ``"chord"``'s were not (user guide, "The
        continuous geodesic"). Unused by the chain.

    Attributes
    ----------
    path_ : ModelPath
        The fitted path. ``path_[0]`` and ``path_[-1]`` compute what model_a and
        model_b do (with ``align``, ``path_[-1]`` is model_b with its units
        permuted); interior BatchNorm statistics are recomputed on X.
    energy_ : float
        Energy of the path on X, in the divergence's units.
    length_ : float
        Fisher–Rao length on X (radians), whatever the divergence: of the
        continuous path, the networks between the points included
        (:func:`geoconnect.evaluation.path_length`), to the error
        ``length_error_``. ``chord_length_`` is the sum of the chords at the
        points alone, ``min_length_`` the length no path between the ends beats.
    euclidean_length_ : float
        Length in parameter space.
    history_ : dict of str to list of float
        Per epoch: ``energy`` and ``length`` (means over the epoch's batches, as the
        path moved), ``euclidean_length`` (at the epoch's end), and ``n_points``
        (the level's number of points with ``coarse_to_fine``; energy and length of
        a coarser level are those of its coarser polygon), and ``seconds`` (the
        epoch's wall-clock time).
        With a curve: ``energy`` and ``length`` (each epoch's means of the
        batches' estimates), and ``seconds``.
    curve_ : Curve
        Only with ``curve="bezier"`` or ``"polychain"``: the fitted curve
        (``curve_.at(t, X)`` is the network at any ``t``); ``path_`` holds
        ``n_points`` networks along it, evenly spaced by Fisher–Rao arc length.
    n_iter_ : int
        Number of epochs run, coarse levels included (``len(history_["energy"])``;
        with ``warm_start``, the previous fits' too).
    strategy_ : {"vmap", "loop"}
        How the path's points were evaluated (``path_.strategy``).
    communication_ : dict of str to int
        Only with ``distributed``: this rank's ``rank`` and the ``world_size``, and
        what it sent. A chain: ``steps`` and ``exchanged_bytes`` (the boundary
        logits, two batch × classes tensors per step), ``shared_bytes`` (its
        block's last point once per epoch, its block once per level) and
        ``reduced_bytes`` (segment sums, and the logits exchanged to measure the
        energy at the start and the end). A
        curve: ``steps`` (all-reduces of the bends' gradients, one bucket each) and
        ``reduced_bytes`` (those, the size of the bends per step, and the epochs'
        sums); ``shared_bytes``, the bends broadcast from rank 0 once at the end.
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
    Defaults were chosen by measurement on the benchmark's pairs (digits MLPs and
    CNNs, MNIST-1D): see the user guide. The paper's settings are
    ``curve="chain", solver="sgd", learning_rate_init=0.1, max_iter=20,
    batch_size=256``.

    A chain's step evaluates the interior 8 points at a time and back-propagates a group
    as soon as the next group's first point is known, so at most two groups' networks
    hold their activations at once: that part of the memory does not grow with
    ``n_points``. The parameters, their gradients, Adam's two moments and a copy of the
    starting interior (which a diverged fit returns) do: about 5 × ``n_points`` × the
    model's parameters.

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
        **_BaseConnector._parameter_constraints,
        "divergence": [StrOptions(set(DIVERGENCES)), callable],
        **OPTIMISATION_CONSTRAINTS,
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "coarse_to_fine": ["boolean"],
        "mixed_precision": ["boolean"],
        "strategy": [StrOptions({"auto", "vmap", "loop"})],
        "checkpoint": [str, os.PathLike, None],
        "distributed": ["boolean"],
        "gather": ["boolean"],
        "curve": [StrOptions({"chain", "bezier", "polychain"})],
        "n_bends": [Interval(Integral, 1, None, closed="left")],
        "energy": [StrOptions({"chord", "split", "jvp"})],
        "learning_rate": [StrOptions({"constant", "cosine", "adaptive"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "max_iter": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "relative_step": ["boolean", StrOptions({"auto"})],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither"), None],
    }

    def __init__(
        self,
        n_points: int = 25,
        divergence: str = "jsd",
        solver: str = "adam",
        learning_rate_init: float | str = "auto",
        max_iter: int | str = "auto",
        batch_size: int = 256,
        tol: float = 1e-3,
        n_iter_no_change: int = 10,
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
        warm_start: bool = False,
        align: str | None = None,
        model_factory: Callable[..., nn.Module] | None = None,
        coarse_to_fine: bool = True,
        mixed_precision: bool = False,
        strategy: str = "auto",
        checkpoint: str | os.PathLike | None = None,
        output: str | int | Callable[[object], object] | None = None,
        distributed: bool = False,
        curve: str = "bezier",
        n_bends: int = 3,
        energy: str = "chord",
        learning_rate: str = "constant",
        relative_step: bool | str = "auto",
        validation_fraction: float | None = None,
        gather: bool = True,
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
        self.strategy = strategy
        self.checkpoint = checkpoint
        self.output = output
        self.distributed = distributed
        self.curve = curve
        self.n_bends = n_bends
        self.energy = energy
        self.learning_rate = learning_rate
        self.relative_step = relative_step
        self.validation_fraction = validation_fraction
        self.gather = gather

    def fit(
        self,
        X: object,
        y: object = None,
        *,
        model_a: nn.Module | None = None,
        model_b: nn.Module | None = None,
    ) -> GeodesicConnector:
        """Fit the path between ``model_a`` and ``model_b`` on X.

        A transaction: every fitted attribute is assigned at the end, together; a fit
        that raises leaves the estimator as it was. Ctrl-C during the optimisation
        keeps the path learned so far (with a warning); with ``checkpoint``, a fit
        resumes where an earlier one in that directory stopped.

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
        return self._fit_transaction(X, y, model_a, model_b)

    def _fit(self, X: object, y: object, model_a: object, model_b: object) -> dict[str, object]:
        """The fit's work; returns the fitted attributes instead of setting them."""
        divergence = get_divergence(self.divergence)
        if self.checkpoint is not None:  # before any work: a directory that cannot be used
            Checkpoint.check_directory(self.checkpoint)
        self._check_distributed()
        self._check_curve()
        inputs = self._fit_inputs(X, y, model_a, model_b, require_X=True)
        self._check_mixed_precision(inputs.device)
        continuing = self.warm_start and hasattr(self, "path_")
        if self.curve != "chain":
            return self._fit_curve(inputs, divergence, continuing)
        path = self._initial_path(inputs, continuing)
        previous = (
            FitResult(self.history_, moments=getattr(self, "_fit_moments", None))
            if continuing
            else None
        )
        result = FitResult(copy_history(None if previous is None else previous.history))
        group = None
        if path.n_points > 2:  # else nothing moves between two ends
            assert inputs.data is not None
            # One digest of models and X, which the ranks compare and a checkpoint holds.
            needed = self.distributed or self.checkpoint is not None
            fingerprint = self._fingerprint(path, inputs.data) if needed else {}
            group = self._path_group(path, inputs, fingerprint)
            # Every rank gives the same warnings: rank 0 gives them, once. (Not around
            # the work below, so that the ranks' last collective is not their last act:
            # a rank that exits while another is still in it may abort that one.)
            with contextlib.nullcontext() if group is None else group.warnings_once():
                checkpoint = self._open_checkpoint(fingerprint, group)
                settings = self._settings(continuing, checkpoint, group)
                order = self._batch_order()
                result = fit_path(path, inputs.data, divergence, settings, previous, order)
        path.recompute_batchnorm(inputs.data, batch_size=self.batch_size)
        attributes = self._path_attributes(path, inputs, divergence)
        if group is not None and not self.gather:  # measured whole; kept split
            path.take_points(group.keep_block(path))
        attributes.update(
            history_=result.history,
            n_iter_=result.n_iter,
            strategy_=path.strategy,
            communication_=communication(group),
            _fit_moments=_UNSET if result.moments is None else result.moments,
            curve_=_UNSET,
        )
        return attributes

    def _fit_curve(self, inputs: FitInputs, divergence: Divergence, continuing: bool) -> dict:
        """The continuous geodesic: a curve's bends descend its Fisher–Rao energy."""
        data = inputs.data
        assert data is not None
        control = self._line(inputs).resample(self.n_bends + 2)
        previous = self._previous_curve(continuing)
        if previous is not None:
            control.copy_interior_from(previous.control)
        curve = Curve(control, self.curve)
        needed = self.distributed or self.checkpoint is not None
        fingerprint = self._fingerprint(control, data) if needed else {}
        group = self._process_group(inputs, fingerprint)
        with contextlib.nullcontext() if group is None else group.warnings_once():
            settings = self._settings(continuing, self._open_checkpoint(fingerprint, group), group)
            descended, validation = self._validation_split(data)
            history, converged = fit_curve(
                curve,
                descended,
                settings,
                self._batch_order(),
                "energy",
                energy=self.energy,  # type: ignore[arg-type]
                divergence=divergence,
                validation=validation,
            )
            if not converged and self.max_iter != "auto":  # "auto": a budget, not a limit
                warn_not_converged(settings, stacklevel=5)  # _fit_curve, _fit, fit, the caller
        if previous is not None:
            history = {k: self.history_[k] + history[k] for k in history}
        t = arc_length_t(curve, data, self.n_points, batch_size=self.batch_size)
        path = curve.sample(self.n_points, data, batch_size=self.batch_size, t=t)
        attributes = self._path_attributes(path, inputs, divergence)
        attributes.update(
            curve_=curve,
            history_=history,
            n_iter_=len(history["energy"]),
            strategy_=path.strategy,
            communication_=communication(group),
            _fit_moments=_UNSET,
        )
        return attributes

    def _previous_curve(self, continuing: bool) -> Curve | None:
        """The curve a warm start continues from (None for a fresh fit), refused
        when it is not of this fit's kind and bends."""
        previous = getattr(self, "curve_", None) if continuing else None
        if continuing and (
            previous is None or (previous.kind, previous.n_bends) != (self.curve, self.n_bends)
        ):
            before = (
                "was a chain"
                if previous is None
                else f"had curve={previous.kind!r}, n_bends={previous.n_bends}"
            )
            raise ValueError(
                f"warm_start=True continues from curve_, but the previous fit {before}; "
                f"this one asks for curve={self.curve!r}, n_bends={self.n_bends}. Fit "
                "with the previous curve and n_bends, or set warm_start=False."
            )
        return previous

    def _validation_split(
        self, data: TensorData | StreamData
    ) -> tuple[TensorData | StreamData, TensorData | None]:
        """The inputs a curve descends and those its early stopping watches."""
        if self.validation_fraction is None:
            return data, None
        if not isinstance(data, TensorData):
            raise ValueError(
                f"validation_fraction={self.validation_fraction!r} sets aside part of "
                "X, which a Dataset or DataLoader does not allow: pass X as an array, "
                "tensor or mapping of them, or set validation_fraction=None."
            )
        draw = torch.randint(2**62, (1,), generator=self._batch_order())
        return split_off(data, self.validation_fraction, torch.Generator().manual_seed(int(draw)))

    def _check_curve(self) -> None:
        """Refuse, before any work, what the continuous geodesic does not do yet."""
        if not self.gather and not (self.distributed and self.curve == "chain"):
            raise ValueError(
                "gather=False keeps the points of a distributed chain split across the "
                "ranks; it needs distributed=True and curve='chain' (a curve's path_ is "
                "built whole on every rank). Set gather=True."
            )
        if self.curve == "chain":
            if self.learning_rate != "constant":
                raise ValueError(
                    f"learning_rate={self.learning_rate!r} schedules a curve's fit; the "
                    "chain's coarse-to-fine levels keep a constant rate. Set "
                    "learning_rate='constant', or curve='bezier'."
                )
            if self.relative_step is True:
                raise ValueError(
                    "relative_step=True scales a curve's step by each tensor's distance "
                    "between the models; the chain's step is absolute. Set "
                    "relative_step=False, or curve='bezier'."
                )
            if self.validation_fraction is not None:
                raise ValueError(
                    f"validation_fraction={self.validation_fraction!r} stops a curve's "
                    "fit on held-out inputs; the chain's early stopping watches its "
                    "energy. Set validation_fraction=None, or curve='bezier'."
                )
            return
        if callable(self.divergence):
            raise ValueError(
                f"curve={self.curve!r} descends the Fisher–Rao energy, the local form of "
                "every built-in divergence; a callable divergence has no known local "
                "form. Pass divergence='jsd' (or another built-in name), or curve='chain'."
            )
        if self.mixed_precision:
            raise ValueError(
                "mixed_precision=True runs a chain's steps in bfloat16; it is not "
                f"available with curve={self.curve!r} yet. Set curve='chain', or "
                "mixed_precision=False."
            )

    def _open_checkpoint(self, fingerprint: dict, group: PathGroup | None) -> Checkpoint | None:
        """The fit's checkpoint, with the fingerprint that tells this fit from others.

        Distributed, each rank keeps its own two files, written in turn.
        """
        if self.checkpoint is None:
            return None
        if group is None:
            return Checkpoint.open(self.checkpoint, fingerprint)
        ranks = f"rank {group.rank} of {group.world_size}"
        fingerprint = {**fingerprint, "parameters": {**fingerprint["parameters"], "ranks": ranks}}
        stem = f"checkpoint-rank{group.rank}-of{group.world_size}"
        files = [f"{stem}-{slot}.safetensors" for slot in "ab"]
        return Checkpoint.open(self.checkpoint, fingerprint, files)

    def _path_group(
        self, path: ModelPath, inputs: FitInputs, fingerprint: dict
    ) -> PathGroup | None:
        """The ranks the fit splits the points across, checked to agree; or None."""
        group = self._process_group(inputs, fingerprint)
        check_points_per_rank(path.n_points, group)
        return group

    def _settings(
        self,
        continuing: bool,
        checkpoint: Checkpoint | None = None,
        group: PathGroup | None = None,
    ) -> FitSettings:
        return optimisation_settings(
            self,
            coarse_to_fine=self.coarse_to_fine and not continuing,
            mixed_precision=self.mixed_precision,
            strategy=self.strategy,
            verbose=self.verbose if group is None or group.rank == 0 else 0,
            checkpoint=checkpoint,
            group=group,
            learning_rate_schedule=self.learning_rate,
            **self._resolved(),
        )

    def _resolved(self) -> dict[str, object]:
        """The engine's values of the ``"auto"`` parameters, for this kind of path."""
        chain = self.curve == "chain"
        relative = not chain if self.relative_step == "auto" else bool(self.relative_step)
        rate = self.learning_rate_init
        if rate == "auto":
            rate = CURVE_RELATIVE_RATE if relative else ABSOLUTE_RATE
        epochs = self.max_iter
        if epochs == "auto":
            epochs = CHAIN_EPOCHS if chain else CURVE_EPOCHS
        return {"relative_step": relative, "learning_rate": rate, "max_iter": epochs}

    def _batch_order(self) -> torch.Generator:
        rng = check_random_state(self.random_state)
        return torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))

    def _check_mixed_precision(self, device: torch.device) -> None:
        if self.mixed_precision and self.strategy == "vmap":
            raise ValueError(
                "mixed_precision=True needs strategy='loop' or 'auto': torch.autocast "
                "does not reach inside torch.func.vmap, so the networks would run in "
                "full precision. Set strategy='auto'."
            )
        if self.mixed_precision and device.type not in ("cuda", "cpu"):
            raise ValueError(
                "mixed_precision=True runs under torch.autocast in bfloat16 on CUDA or "
                f"CPU devices; the device is {device}. Set mixed_precision=False."
            )

    def _initial_path(self, inputs: FitInputs, continuing: bool) -> ModelPath:
        """The straight line between the models, or, continuing, path_'s interior."""
        path = self._line(inputs)
        if not continuing:
            return path
        previous: ModelPath = self.path_
        if previous.shard is not None:
            raise ValueError(
                "warm_start=True continues from path_, which is this rank's shard of the "
                "path (gather=False): continuing from shards is not supported yet. Fit "
                "with gather=True to continue, or warm_start=False."
            )
        if len(previous) != self.n_points:
            raise ValueError(
                f"warm_start=True continues from path_, which has {len(previous)} points, "
                f"but n_points={self.n_points}. Set n_points={len(previous)} or "
                "warm_start=False."
            )
        # The ends are the models given now; the interior continues from path_.
        path.copy_interior_from(previous)
        return path
