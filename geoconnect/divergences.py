"""Divergences and distances between categorical predictive distributions.

Every function takes two tensors of **logits** of shape ``(..., n_classes)`` and
returns one value per distribution, shape ``(...)``. They work in log-space
(``log_softmax``), so saturated softmaxes (logits of ±1e4) give finite values, and
they are differentiable everywhere, including where the two distributions are equal.

Local behaviour, for ``q = p + dp`` and the Fisher metric ``ds² = Σ dp_k² / p_k``:

| function | bound | as ``q → p`` |
| --- | --- | --- |
| ``jensen_shannon`` | ``ln 2`` | ``ds² / 8`` |
| ``hellinger`` | ``1`` | ``ds² / 8`` (squared Hellinger distance) |
| ``fisher_rao`` | ``π`` | ``ds`` (the geodesic distance itself) |
| ``symmetric_kl`` | none | ``ds²`` |
| ``fisher_rao_squared`` | ``π²`` | ``ds²`` (the segment cost of ``"fisher_rao"``) |

Each function's declarations (name, bound, local constant, power, triangle
inequality, units, segment form) are one :class:`DivergenceSpec` in
:data:`ALL_SPECS`, which the rest of geoconnect reads and the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ALL_SPECS",
    "DIVERGENCES",
    "SPECS",
    "DivergenceSpec",
    "closed_form_segment_gradient",
    "fisher_form",
    "fisher_rao",
    "get_divergence",
    "hellinger",
    "jensen_shannon",
    "segment_form",
    "spec_of",
    "symmetric_kl",
]

Divergence = Callable[[Tensor, Tensor], Tensor]


def _log_probs(logits_p: Tensor, logits_q: Tensor) -> tuple[Tensor, Tensor]:
    _check_logits(logits_p, logits_q)
    return _log_softmax(logits_p), _log_softmax(logits_q)


# torch's CPU log_softmax is about 3x (float32) slower, forward and backward, when the
# class dimension is shorter than a SIMD vector: 760 against 254 us for 61k float32
# values in 10 classes (torch 2.13, 2 cores). There, log-probabilities are computed
# as below instead: shifted by the (constant, hence detached) maximum, as exact.
_SHORT_CLASSES = range(3, 16)


def _log_softmax(logits: Tensor) -> Tensor:
    """Log-probabilities, floored at the dtype's lowest finite number.

    A class masked with a −inf logit has probability 0 and log-probability −inf;
    the floor keeps every later difference of log-probabilities (``log p − log m``)
    a number, and multiplied by the zero probability it contributes exactly 0, value
    and gradient, where ``−inf − (−inf)`` would have made the divergence NaN.
    """
    if logits.device.type != "cpu" or logits.shape[-1] not in _SHORT_CLASSES:
        log_p = torch.log_softmax(logits, dim=-1)
    else:
        shifted = logits - logits.amax(dim=-1, keepdim=True).detach()
        log_p = shifted - shifted.exp().sum(dim=-1, keepdim=True).log()
    return log_p.clamp_min(torch.finfo(log_p.dtype).min)


def _check_logits(logits_p: Tensor, logits_q: Tensor) -> None:
    if not isinstance(logits_p, Tensor) or not isinstance(logits_q, Tensor):
        raise TypeError(
            "logits_p and logits_q must be torch tensors of logits; got "
            f"{type(logits_p).__name__} and {type(logits_q).__name__}."
        )
    if logits_p.shape[-1:] != logits_q.shape[-1:]:
        raise ValueError(
            "logits_p and logits_q must have the same number of classes in their last "
            f"dimension; got shapes {tuple(logits_p.shape)} and {tuple(logits_q.shape)}."
        )


def _safe_sqrt(x: Tensor) -> Tensor:
    """Square root with a finite gradient at 0 (where the true one is infinite).

    NaN stays NaN: a distance between undefined distributions is not 0.
    """
    positive = x > 0
    root = torch.sqrt(torch.where(positive, x, 1.0))
    return torch.where(positive, root, torch.where(torch.isnan(x), x, 0.0))


def jensen_shannon(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    r"""Jensen–Shannon divergence between ``softmax(logits_p)`` and ``softmax(logits_q)``.

    .. math:: \mathrm{JSD}(p, q) = \tfrac12 \mathrm{KL}(p \| m) + \tfrac12 \mathrm{KL}(q \| m),
              \quad m = \tfrac12 (p + q)

    in nats. Symmetric, ``0 ≤ JSD ≤ ln 2``, ``√JSD`` is a metric, and
    ``JSD ≈ ds²/8`` for nearby distributions. It is the seed paper's objective.

    Parameters
    ----------
    logits_p, logits_q : Tensor, shape=[..., n_classes]
        Unnormalised log-probabilities.

    Returns
    -------
    Tensor, shape=[...]
        One divergence per distribution.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.divergences import jensen_shannon
    >>> p = torch.tensor([[10.0, -10.0]])
    >>> q = torch.tensor([[-10.0, 10.0]])
    >>> round(jensen_shannon(p, q).item(), 4)  # close to the bound ln 2
    0.6931
    """
    log_p, log_q = _log_probs(logits_p, logits_q)
    raw, _, _ = _jsd_terms(log_p, log_q, log_p.exp(), log_q.exp())
    return _non_negative(raw)


class _SegmentJensenShannon(torch.autograd.Function):
    """``jensen_shannon(logits[:-1], logits[1:])`` with its gradient in closed form.

    ``∂JSD/∂p_k = ½ (log p_k − log m_k)``, and through the softmax
    ``∂JSD/∂a = ½ p ⊙ (d − ⟨p, d⟩)`` with ``d = log p − log m``. Saving ``p`` and the
    two ``d`` replaces the dozen intermediate tensors that automatic differentiation
    of the expression keeps, each point's log-probabilities are computed once rather
    than twice, and the gradient goes straight into the stack. It is the segment cost
    of every default fit, on (points × batch × classes) tensors.

    First derivatives only: a second derivative raises a ``RuntimeError``, and the
    ``torch.func`` transforms refuse the function (no silently wrong higher-order
    result); the pairwise ``jensen_shannon`` supports both.
    """

    @staticmethod
    def forward(ctx: object, logits: Tensor) -> Tensor:  # type: ignore[override]
        _, p, raw, d_before, d_after = _segment_jsd_parts(logits)
        ctx.save_for_backward(p, d_before, d_after)  # type: ignore[attr-defined]
        return raw.clamp_min(0.0)  # the gradient is the exact one, as in _non_negative

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: object, grad: Tensor) -> Tensor:  # type: ignore[override]
        p, d_before, d_after = ctx.saved_tensors  # type: ignore[attr-defined]
        return _segment_jsd_grad(p, d_before, d_after, (0.5 * grad).unsqueeze(-1))


def _jsd_terms(log_p: Tensor, log_q: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, ...]:
    """Unclamped JSD per distribution, and ``log p − log m``, ``log q − log m``."""
    log_m = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))
    # Where p and q agree, m is exactly them: logaddexp(a, a) − log 2 can round off a
    # by an ulp, and a JSD of 6e-8 between equal float32 distributions follows.
    log_m = torch.where(log_p == log_q, log_p, log_m)
    d_p, d_q = log_p - log_m, log_q - log_m
    # Adding (m - p) and (m - q), which sum to zero, makes every term non-negative and
    # of second order in (p - q): no cancellation between large terms.
    terms = (p * d_p).add_(q * d_q).sub_(p).sub_(q).add_(log_m.exp_(), alpha=2.0)
    return terms.sum(dim=-1).mul_(0.5), d_p, d_q


def _non_negative(raw: Tensor) -> Tensor:
    """``raw`` with rounding below zero clamped, and the gradient of ``raw`` itself.

    Near ``p = q`` the JSD is of second order in ``p − q`` and its computed value can
    round to slightly below zero, while its gradient, of first order, is still
    accurate: clamping the value must not zero the gradient there.
    """
    return raw + (raw.clamp_min(0.0) - raw).detach()


def _jsd_grad(probs: Tensor, d: Tensor, half: Tensor | float) -> Tensor:
    """Gradient with respect to one side's logits: ``½ g · p ⊙ (d − ⟨p, d⟩)``."""
    weighted = probs * d
    return weighted.sub_(probs * weighted.sum(dim=-1, keepdim=True)).mul_(half)


def _segment_jsd_grad(p: Tensor, d_before: Tensor, d_after: Tensor, half: Tensor | float) -> Tensor:
    """Gradient of the segment JSDs weighted by ``2 half`` with respect to the logits."""
    out = torch.zeros_like(p)
    out[:-1] += _jsd_grad(p[:-1], d_before, half)
    out[1:] += _jsd_grad(p[1:], d_after, half)
    return out


def _segment_jensen_shannon_and_grad(
    logits: Tensor, weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Segment JSDs, the gradient of ``weight`` × their sum, and the log-probabilities.

    What ``_SegmentJensenShannon`` computes forward and backward, by the same
    formulas, without the automatic differentiation machinery, whose fixed cost per
    call exceeds the arithmetic on the few points of a fitting step's block.
    """
    log_p, p, raw, d_before, d_after = _segment_jsd_parts(logits)
    return raw.clamp_min_(0.0), _segment_jsd_grad(p, d_before, d_after, 0.5 * weight), log_p


def _segment_jsd_parts(logits: Tensor) -> tuple[Tensor, ...]:
    """Log-probabilities, probabilities, unclamped segment JSDs and both sides' ``d``."""
    log_p = _log_softmax(logits)
    p = log_p.exp()
    return log_p, p, *_jsd_terms(log_p[:-1], log_p[1:], p[:-1], p[1:])


def hellinger(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    r"""Squared Hellinger distance ``1 − Σ √(p_k q_k)``.

    Computed as ``½ Σ (√p_k − √q_k)²``, which is the same number without the
    cancellation of ``1 − Σ√(pq)`` for nearby distributions. Symmetric, bounded by 1,
    its square root is a metric, and it is ``≈ ds²/8`` locally.

    Parameters
    ----------
    logits_p, logits_q : Tensor, shape=[..., n_classes]
        Unnormalised log-probabilities.

    Returns
    -------
    Tensor, shape=[...]
        One squared distance per distribution.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.divergences import hellinger
    >>> hellinger(torch.zeros(2, 3), torch.zeros(2, 3))
    tensor([0., 0.])
    """
    _check_logits(logits_p, logits_q)
    return _hellinger_of_roots(_root_probs(logits_p), _root_probs(logits_q))


def _root_probs(logits: Tensor) -> Tensor:
    return torch.exp(0.5 * _log_softmax(logits))


def _segment_hellinger_of_log_probs(log_p: Tensor) -> Tensor:
    roots = torch.exp(0.5 * log_p)
    return _hellinger_of_roots(roots[:-1], roots[1:])


def _segment_fisher_rao_squared_of_log_probs(log_p: Tensor) -> Tensor:
    """``fisher_rao_squared`` between consecutive points, from their log-probabilities."""
    return _fisher_rao_of_hellinger(_segment_hellinger_of_log_probs(log_p)).square()


def _hellinger_of_roots(root_p: Tensor, root_q: Tensor) -> Tensor:
    return (0.5 * (root_p - root_q).square_().sum(dim=-1)).clamp(0.0, 1.0)


def fisher_rao(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    r"""Fisher–Rao distance ``2 arccos Σ √(p_k q_k)`` on the probability simplex.

    The exact geodesic distance of the Fisher information metric of the categorical
    distribution: a metric, bounded by π, equal to ``ds`` locally. It is evaluated as
    ``4 arcsin √(h²/2)`` with ``h²`` the squared Hellinger distance, which is accurate
    for nearby distributions where ``arccos`` near 1 is not, and has a finite gradient
    where ``p = q``.

    Parameters
    ----------
    logits_p, logits_q : Tensor, shape=[..., n_classes]
        Unnormalised log-probabilities.

    Returns
    -------
    Tensor, shape=[...]
        One distance per distribution, in radians.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.divergences import fisher_rao
    >>> p = torch.tensor([[30.0, -30.0]])
    >>> q = torch.tensor([[-30.0, 30.0]])
    >>> round(fisher_rao(p, q).item(), 4)  # disjoint supports: π
    3.1416
    """
    return _fisher_rao_of_hellinger(hellinger(logits_p, logits_q))


def _fisher_rao_of_hellinger(h2: Tensor) -> Tensor:
    return 4.0 * torch.asin(_safe_sqrt(0.5 * h2).clamp_max(math.sqrt(0.5)))


def fisher_form(logits: Tensor, velocity: Tensor) -> Tensor:
    r"""The Fisher information metric's quadratic form of a velocity of the logits.

    For a categorical distribution ``p = softmax(z)`` moving with ``ż``, the squared
    speed in the Fisher–Rao metric is ``Σ_k ṗ_k² / p_k = Var_{k∼p}(ż_k)``: the local
    form of ``fisher_rao(z, z + h ż)² ≈ 8 · jensen_shannon(z, z + h ż) ≈ h² ·
    fisher_form(z, ż)``. Computed as ``Σ_k p_k (ż_k − E_p ż)²``, which is never
    negative.

    Parameters
    ----------
    logits : Tensor, shape=[..., n_classes]
        Unnormalised log-probabilities.
    velocity : Tensor, shape=[..., n_classes]
        Their velocity ``ż``.

    Returns
    -------
    Tensor, shape=[...]
        One squared speed per distribution, in radians² per unit time².

    Examples
    --------
    >>> import torch
    >>> from geoconnect.divergences import fisher_form
    >>> z = torch.zeros(1, 2)
    >>> fisher_form(z, torch.tensor([[1.0, 1.0]]))  # a shift of every logit: no motion
    tensor([0.])
    >>> fisher_form(z, torch.tensor([[1.0, -1.0]]))  # p' = ±1/2, so Σ p'²/p = 1
    tensor([1.])
    """
    if logits.shape != velocity.shape:
        raise ValueError(
            f"logits and velocity must have one shape; got {tuple(logits.shape)} and "
            f"{tuple(velocity.shape)}."
        )
    p = _log_softmax(logits).exp()
    centred = velocity - (p * velocity).sum(dim=-1, keepdim=True)
    return (p * centred.square()).sum(dim=-1)


def fisher_rao_squared(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Squared Fisher–Rao distance, the segment cost of ``divergence="fisher_rao"``.

    Parameters
    ----------
    logits_p, logits_q : Tensor, shape=[..., n_classes]
        Unnormalised log-probabilities.

    Returns
    -------
    Tensor, shape=[...]
        ``fisher_rao(logits_p, logits_q) ** 2``.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.divergences import fisher_rao_squared
    >>> fisher_rao_squared(torch.zeros(1, 4), torch.zeros(1, 4))
    tensor([0.])
    """
    return fisher_rao(logits_p, logits_q).square()


def symmetric_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    r"""Symmetrised Kullback–Leibler divergence ``KL(p‖q) + KL(q‖p)``.

    Equal to ``Σ (p_k − q_k)(log p_k − log q_k)``, a sum of non-negative terms.
    Symmetric and unbounded; ``≈ ds²`` locally.

    Parameters
    ----------
    logits_p, logits_q : Tensor, shape=[..., n_classes]
        Unnormalised log-probabilities.

    Returns
    -------
    Tensor, shape=[...]
        One divergence per distribution, in nats.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.divergences import symmetric_kl
    >>> p = torch.tensor([[0.0, 0.0]])
    >>> q = torch.tensor([[0.0, 2.0]])
    >>> bool(symmetric_kl(p, q) > 0)
    True
    """
    log_p, log_q = _log_probs(logits_p, logits_q)
    return _symmetric_kl_of(log_p, log_q, log_p.exp(), log_q.exp())


def _symmetric_kl_of(log_p: Tensor, log_q: Tensor, p: Tensor, q: Tensor) -> Tensor:
    return ((p - q) * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)


def _segment_jensen_shannon(logits: Tensor) -> Tensor:
    return _SegmentJensenShannon.apply(logits)


def _segment_hellinger(logits: Tensor) -> Tensor:
    return _segment_hellinger_of_log_probs(_log_softmax(logits))


def _segment_fisher_rao(logits: Tensor) -> Tensor:
    return _fisher_rao_of_hellinger(_segment_hellinger(logits))


def _segment_fisher_rao_squared(logits: Tensor) -> Tensor:
    return _segment_fisher_rao_squared_of_log_probs(_log_softmax(logits))


def _segment_symmetric_kl(logits: Tensor) -> Tensor:
    log_p = _log_softmax(logits)
    p = log_p.exp()
    return _symmetric_kl_of(log_p[:-1], log_p[1:], p[:-1], p[1:])


def segment_form(divergence: Divergence) -> Callable[[Tensor], Tensor]:
    """``logits -> divergence(logits[:-1], logits[1:])``, shared work done once.

    For the built-in divergences, a form that computes each point's probabilities
    once; for any other callable, the pairwise call itself. The Jensen–Shannon form
    has its gradient in closed form and is differentiable once only (a second
    derivative or a ``torch.func`` transform raises); call ``jensen_shannon``
    pairwise for those.

    Parameters
    ----------
    divergence : callable
        ``(logits_p, logits_q) -> Tensor`` of per-sample values.

    Returns
    -------
    callable
        A function of one stack of logits, shape ``(K, ..., n_classes)``, returning
        shape ``(K − 1, ...)``.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.divergences import jensen_shannon, segment_form
    >>> logits = torch.randn(5, 8, 3)
    >>> torch.allclose(segment_form(jensen_shannon)(logits),
    ...                jensen_shannon(logits[:-1], logits[1:]))
    True
    """
    spec = spec_of(divergence)
    if spec is not None:
        return spec.segment
    return lambda logits: divergence(logits[:-1], logits[1:])


def _jensen_shannon_energy_block(block: Tensor, weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """Segment JSDs, the gradient of ``weight`` × their sum, and the segment d_FR²."""
    values, grad, log_p = _segment_jensen_shannon_and_grad(block, weight)
    return values, grad, _segment_fisher_rao_squared_of_log_probs(log_p)


def closed_form_segment_gradient(divergence: Divergence) -> EnergyBlock | None:
    """The divergence's segment values and energy gradient without autograd, if it has one.

    Parameters
    ----------
    divergence : callable

    Returns
    -------
    callable or None
        ``(logits, weight) -> (values, grad, fr_squared)`` for a stack of logits
        ``(K, batch, n_classes)``: the segment divergences ``(K − 1, batch)``, the
        gradient of ``weight`` × their sum with respect to ``logits``, and the
        segments' squared Fisher–Rao distances; None when autograd is needed.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.divergences import closed_form_segment_gradient, hellinger
    >>> from geoconnect.divergences import jensen_shannon
    >>> values, grad, fr = closed_form_segment_gradient(jensen_shannon)(torch.zeros(3, 2, 4), 0.5)
    >>> values.shape, grad.shape, closed_form_segment_gradient(hellinger) is None
    (torch.Size([2, 2]), torch.Size([3, 2, 4]), True)
    """
    spec = spec_of(divergence)
    return None if spec is None else spec.closed_form_gradient


def get_divergence(divergence: str | Divergence) -> Divergence:
    """Resolve the ``divergence`` parameter to a function of two logit tensors.

    Parameters
    ----------
    divergence : {"jsd", "fisher_rao", "hellinger", "kl"} or callable
        A registered name, or a callable ``(logits_p, logits_q) -> Tensor`` of
        per-sample values.

    Returns
    -------
    callable
        The segment cost.

    Examples
    --------
    >>> from geoconnect.divergences import get_divergence, jensen_shannon
    >>> get_divergence("jsd") is jensen_shannon
    True
    """
    if callable(divergence):
        return divergence
    if isinstance(divergence, str) and divergence in DIVERGENCES:
        return DIVERGENCES[divergence]
    raise ValueError(
        f"The 'divergence' parameter must be one of {sorted(DIVERGENCES)} or a callable "
        f"(logits_p, logits_q) -> per-sample tensor. Got {divergence!r} instead."
    )


# ----------------------------------------------------------------------------------
# One record per divergence: what every other part of geoconnect (the connectors'
# parameter, the segment forms, the closed-form gradient, the plots' units, the
# tests' declarations) knows about it. A new divergence is one more spec below.

#: ``(logits, weight) -> (values, grad, fr_squared)``: see closed_form_segment_gradient.
EnergyBlock = Callable[[Tensor, float], tuple[Tensor, ...]]


@dataclass(frozen=True)
class DivergenceSpec:
    r"""Everything declared about one built-in divergence, in one record.

    The connectors' ``divergence`` names (:data:`DIVERGENCES`), :func:`segment_form`,
    :func:`closed_form_segment_gradient`, the units of the energy in
    :func:`geoconnect.plotting.plot_history` and the property tests all read these
    records; the tests check every declared property with
    :func:`geoconnect.testing.check_divergence` (see :attr:`declaration`).

    Parameters
    ----------
    name : str or None
        The value of the connectors' ``divergence`` parameter that selects
        ``pairwise`` as the segment cost (a key of :data:`SPECS`); None for a spec
        not selectable by name (the Fisher–Rao distance, whose segment cost is its
        square, ``"fisher_rao"``).
    pairwise : callable
        ``(logits_p, logits_q) -> Tensor`` of per-distribution values.
    segment : callable
        ``logits -> pairwise(logits[:-1], logits[1:])`` for a stack of points' logits,
        shape ``(K, ..., n_classes)`` to ``(K − 1, ...)``, computing each point's
        probabilities once.
    label : str
        What ``pairwise`` computes, in words (``"Jensen–Shannon"``).
    units : str
        Units of its values (``"nats"``, ``"rad"``, ``"rad²"``, ``"dimensionless"``).
    upper_bound : float or None
        ``pairwise ≤ upper_bound`` (reached by disjoint distributions); None if
        unbounded.
    local_constant : float
        ``pairwise(p, q) ** (2 / power) ≈ local_constant · ds²`` as ``q → p``, with
        ``ds² = Σ_k dp_k² / p_k`` the Fisher metric (DESIGN.md's local constants).
    power : float
        ``pairwise`` is the ``power``-th power of a distance-like quantity: 1 for a
        distance, 2 for a divergence quadratic in ``ds`` (every segment cost).
    triangle : bool
        Whether ``pairwise ** (1 / power)`` obeys the triangle inequality (a metric).
    symmetric : bool, default=True
        Whether ``pairwise(p, q) = pairwise(q, p)``.
    closed_form_gradient : callable or None, default=None
        ``(logits, weight) -> (values, grad, fr_squared)``, the segment values and
        energy gradient without autograd (see :func:`closed_form_segment_gradient`);
        None when the fit differentiates ``segment`` with autograd.

    See Also
    --------
    spec_of : the spec of a divergence function.
    SPECS : the specs by ``divergence`` name.

    Examples
    --------
    >>> import math
    >>> from geoconnect.divergences import SPECS, jensen_shannon
    >>> spec = SPECS["jsd"]
    >>> spec.pairwise is jensen_shannon, spec.units, spec.upper_bound == math.log(2)
    (True, 'nats', True)
    >>> spec.local_constant, spec.power, spec.triangle
    (0.125, 2, True)
    """

    name: str | None
    pairwise: Divergence
    segment: Callable[[Tensor], Tensor]
    label: str
    units: str
    upper_bound: float | None
    local_constant: float
    power: float
    triangle: bool
    symmetric: bool = True
    closed_form_gradient: EnergyBlock | None = None

    @property
    def declaration(self) -> dict[str, object]:
        """The declared properties, as keywords of :func:`geoconnect.testing.check_divergence`.

        Returns
        -------
        dict
            ``symmetric``, ``triangle``, ``power``, ``upper_bound`` and
            ``local_constant``.

        Examples
        --------
        >>> from geoconnect.divergences import fisher_rao, spec_of
        >>> from geoconnect.testing import check_divergence
        >>> spec_of(fisher_rao).declaration  # doctest: +NORMALIZE_WHITESPACE
        {'symmetric': True, 'triangle': True, 'power': 1,
         'upper_bound': 3.141592653589793, 'local_constant': 1}
        >>> "triangle" in check_divergence(fisher_rao, **spec_of(fisher_rao).declaration,
        ...                                max_examples=10)
        True
        """
        return {
            "symmetric": self.symmetric,
            "triangle": self.triangle,
            "power": self.power,
            "upper_bound": self.upper_bound,
            "local_constant": self.local_constant,
        }


#: Every built-in spec: the segment costs selectable by name, then the Fisher–Rao
#: distance itself (``name=None``), so that ``spec_of(fisher_rao)`` also has an answer.
ALL_SPECS: tuple[DivergenceSpec, ...] = (
    DivergenceSpec(
        name="jsd",
        pairwise=jensen_shannon,
        segment=_segment_jensen_shannon,
        label="Jensen–Shannon",
        units="nats",
        upper_bound=math.log(2),
        local_constant=1 / 8,
        power=2,
        triangle=True,
        closed_form_gradient=_jensen_shannon_energy_block,
    ),
    # The *squared* distance: like the others, quadratic in ds locally, so minimising
    # the sum over segments gives a constant-speed geodesic rather than any shortest
    # curve.
    DivergenceSpec(
        name="fisher_rao",
        pairwise=fisher_rao_squared,
        segment=_segment_fisher_rao_squared,
        label="squared Fisher–Rao",
        units="rad²",
        upper_bound=math.pi**2,
        local_constant=1,
        power=2,
        triangle=True,
    ),
    DivergenceSpec(
        name="hellinger",
        pairwise=hellinger,
        segment=_segment_hellinger,
        label="squared Hellinger",
        units="dimensionless",
        upper_bound=1.0,
        local_constant=1 / 8,
        power=2,
        triangle=True,
    ),
    DivergenceSpec(
        name="kl",
        pairwise=symmetric_kl,
        segment=_segment_symmetric_kl,
        label="symmetric KL",
        units="nats",
        upper_bound=None,
        local_constant=1,
        power=2,
        triangle=False,
    ),
    DivergenceSpec(
        name=None,
        pairwise=fisher_rao,
        segment=_segment_fisher_rao,
        label="Fisher–Rao",
        units="rad",
        upper_bound=math.pi,
        local_constant=1,
        power=1,
        triangle=True,
    ),
)

#: The specs of the segment costs by name, as accepted by the ``divergence`` parameter
#: of the connectors: ``"jsd"``, ``"fisher_rao"`` (the squared distance),
#: ``"hellinger"``, ``"kl"``.
SPECS: dict[str, DivergenceSpec] = {spec.name: spec for spec in ALL_SPECS if spec.name is not None}

#: Segment costs by name, as accepted by the ``divergence`` parameter of the connectors:
#: the ``pairwise`` functions of :data:`SPECS`.
DIVERGENCES: dict[str, Divergence] = {name: spec.pairwise for name, spec in SPECS.items()}


def spec_of(divergence: Divergence) -> DivergenceSpec | None:
    """The spec of a built-in divergence function; None for any other callable.

    Parameters
    ----------
    divergence : callable
        ``(logits_p, logits_q) -> Tensor``: one of this module's divergences, or a
        user's.

    Returns
    -------
    DivergenceSpec or None
        The spec whose ``pairwise`` is ``divergence`` itself (the object, not an equal
        function), or None.

    Examples
    --------
    >>> from geoconnect.divergences import fisher_rao, fisher_rao_squared, spec_of
    >>> spec_of(fisher_rao_squared).name, spec_of(fisher_rao).units
    ('fisher_rao', 'rad')
    >>> spec_of(lambda p, q: (p - q).square().sum(-1)) is None
    True
    """
    for spec in ALL_SPECS:  # identity, so a user's callable's __eq__ is never consulted
        if spec.pairwise is divergence:
            return spec
    return None
