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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "fisher_rao",
    "get_divergence",
    "hellinger",
    "jensen_shannon",
    "symmetric_kl",
]

Divergence = Callable[[Tensor, Tensor], Tensor]


def _log_probs(logits_p: Tensor, logits_q: Tensor) -> tuple[Tensor, Tensor]:
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
    return torch.log_softmax(logits_p, dim=-1), torch.log_softmax(logits_q, dim=-1)


def _safe_sqrt(x: Tensor) -> Tensor:
    """Square root with a finite gradient at 0 (where the true one is infinite)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


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
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    p, q, m = log_p.exp(), log_q.exp(), log_m.exp()
    # Adding (m - p) and (m - q), which sum to zero, makes every term non-negative and
    # of second order in (p - q): no cancellation between large terms.
    terms = p * (log_p - log_m) + q * (log_q - log_m) - p - q + 2.0 * m
    return (0.5 * terms.sum(dim=-1)).clamp_min(0.0)


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
    log_p, log_q = _log_probs(logits_p, logits_q)
    diff = torch.exp(0.5 * log_p) - torch.exp(0.5 * log_q)
    return (0.5 * diff.square().sum(dim=-1)).clamp(0.0, 1.0)


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
    h2 = hellinger(logits_p, logits_q)
    return 4.0 * torch.asin(_safe_sqrt(0.5 * h2).clamp_max(math.sqrt(0.5)))


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
    terms = (log_p.exp() - log_q.exp()) * (log_p - log_q)
    return terms.sum(dim=-1).clamp_min(0.0)


#: Segment costs by name, as accepted by the ``divergence`` parameter of the connectors.
#: ``"fisher_rao"`` optimises the *squared* distance, which, like the others, is
#: quadratic in ``ds`` locally, so minimising the sum over segments gives a
#: constant-speed geodesic rather than any shortest curve.
DIVERGENCES: dict[str, Divergence] = {
    "jsd": jensen_shannon,
    "fisher_rao": fisher_rao_squared,
    "hellinger": hellinger,
    "kl": symmetric_kl,
}


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
