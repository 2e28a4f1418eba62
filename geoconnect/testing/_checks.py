"""``check_divergence``: hypothesis-driven checks of the properties a divergence declares."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import hypothesis
import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes
from hypothesis.strategies import SearchStrategy
from torch import Tensor

from .strategies import (
    _DEFAULT_SCALE,
    _argument,
    _draw_logits,
    _layouts,
    _n_classes,
    _non_negative,
    nearby_pairs,
    triples,
)

__all__ = ["PROPERTIES", "DivergenceCheckError", "check_divergence", "infer_power"]

#: Every property ``check_divergence`` knows, in the order it checks them.
PROPERTIES = (
    "finite",
    "batch",
    "non_negative",
    "zero_on_equal",
    "positive_on_distinct",
    "symmetric",
    "upper_bound",
    "triangle",
    "local_constant",
)

_OWNER = "check_divergence()"
_ROWS = st.tuples(st.integers(1, 4))
_EXTREME_SCALE = st.one_of(st.just(1e4), st.floats(64.0, 1e4))
_WIDE_SCALE = st.one_of(_DEFAULT_SCALE, _EXTREME_SCALE)


class DivergenceCheckError(AssertionError):
    """A property of a divergence, checked by default or declared, does not hold.

    The message names each broken property with where it came from: ``checked by
    default`` for the laws every divergence obeys (and ``symmetric``, on unless
    ``symmetric=False``), ``declared`` for ``upper_bound``, ``triangle`` and
    ``local_constant``.

    Attributes
    ----------
    failures : dict of str to str
        For each broken property (a name from ``PROPERTIES``), what broke and the
        minimal counter-example hypothesis found.
    origins : dict of str to str
        For each broken property, where it came from, as the message shows it
        (``"checked by default"``, ``"declared"``, ``"declared, power=2 inferred"``...).
    """

    def __init__(
        self, name: str, failures: dict[str, str], origins: dict[str, str] | None = None
    ) -> None:
        self.failures = dict(failures)
        self.origins = {prop: (origins or {}).get(prop, _origin(prop)) for prop in failures}
        noun = "property" if len(failures) == 1 else "properties"
        named = ", ".join(f"{prop} ({self.origins[prop]})" for prop in failures)
        lines = [f"{name} breaks {len(failures)} {noun}: {named}."]
        for prop, message in failures.items():
            lines += ["", f"[{prop}] {message}"]
        super().__init__("\n".join(lines))


def _origin(prop: str) -> str:
    """Whether ``prop`` is checked by default or only when declared."""
    if prop == "symmetric":
        return "checked by default; symmetric=False turns it off"
    if prop in ("upper_bound", "triangle", "local_constant"):
        return "declared"
    return "checked by default"


DivergenceCheckError.__module__ = "geoconnect.testing"  # where users import it from


class _Broken(AssertionError):
    """One example breaks ``prop``; the message shows the example."""

    def __init__(self, prop: str, what: str, example: dict[str, Any]) -> None:
        self.prop = prop
        self.example = example
        lines = [what, "Minimal counter-example:"]
        for key, value in example.items():
            lines.append(f"    {key} = {_show(value)}")
        super().__init__("\n".join(lines))


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        values = value.detach().tolist()
        dtype = str(value.dtype)
        if value.ndim == 0:
            return f"{values!r}"
        return f"torch.tensor({values!r}, dtype={dtype})"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


# ----------------------------------------------------------------------------------
# Drawing the examples.


def _pairs(
    n_classes: Any,
    dtypes: SearchStrategy[torch.dtype],
    scales: SearchStrategy[float],
    relations: tuple[str, ...],
    batch_shape: Any = _ROWS,
) -> SearchStrategy[tuple[Tensor, Tensor]]:
    layouts = _layouts(_OWNER, n_classes, batch_shape, dtypes)

    @st.composite
    def draw_pair(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
        layout = draw(layouts)
        p = _draw_logits(draw, layout, scales)
        relation = draw(st.sampled_from(relations))
        if relation == "independent":
            q = _draw_logits(draw, layout, scales)
        elif relation == "equal":
            q = p.clone()
        elif relation == "opposite":
            q = -p
        else:  # "shifted": the same distribution from other logits
            shifts = [draw(st.floats(-100.0, 100.0)) for _ in range(p[..., 0].numel())]
            q = p + torch.tensor(shifts, dtype=p.dtype).reshape(p.shape[:-1] + (1,))
        return p.to(layout.dtype), q.to(layout.dtype)

    return draw_pair()


# ----------------------------------------------------------------------------------
# Evaluating fn.


def _rows(*tensors: Tensor) -> list[Tensor]:
    return [t.reshape(-1, t.shape[-1]) for t in tensors]


def _example(i: int, **tensors: Tensor) -> dict[str, Any]:
    """The example to show: distribution ``i`` alone, or the whole batch and ``i``.

    A lone row misleads when fn mixes the rows of a batch, so a batch of several
    distributions is shown whole (hypothesis has already shrunk it).
    """
    if next(iter(tensors.values()))[..., 0].numel() == 1:
        return {name: t.reshape(-1) for name, t in tensors.items()}
    return {**tensors, "row": i}


def _evaluate(fn: Callable[[Tensor, Tensor], Tensor], p: Tensor, q: Tensor) -> Tensor:
    """``fn(p, q)`` as float64, after checking its type, shape and finiteness."""
    out = fn(p, q)
    if not isinstance(out, Tensor):
        raise TypeError(
            "fn must return a torch.Tensor with one value per distribution; got "
            f"{type(out).__name__}."
        )
    if out.shape != p.shape[:-1]:
        raise _Broken(
            "batch",
            f"fn returned shape {tuple(out.shape)} for logits of shape {tuple(p.shape)}; a "
            f"divergence returns one value per distribution, shape {tuple(p.shape[:-1])}.",
            {"logits_p": p, "logits_q": q},
        )
    bad = ~torch.isfinite(out.reshape(-1))
    if bad.any():
        i = int(bad.nonzero()[0])
        value = out.reshape(-1)[i]
        raise _Broken(
            "finite",
            f"fn(logits_p, logits_q) is {value.item()} (not finite).",
            {**_example(i, logits_p=p, logits_q=q), "fn(logits_p, logits_q)": value},
        )
    return out.detach().to(torch.float64)


class _Declaration:
    """What the caller declared, with the tolerances that go with it."""

    power: float | None = None  # None: not declared, and not needed
    #: False where a law was declared without ``power``: checked on fn itself (1).
    power_given = True

    def __init__(self, fn: Callable, **kwargs: Any) -> None:
        self.fn = fn
        self.__dict__.update(kwargs)

    def delta(self, values: Tensor) -> Tensor:
        """The distance-like ``fn ** (1 / power)`` the triangle and local laws are about."""
        return values.clamp_min(0.0) ** (1.0 / (self.power or 1.0))

    def close(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs() <= self.atol + self.rtol * torch.maximum(a.abs(), b.abs())


# ----------------------------------------------------------------------------------
# The properties. Each takes the declaration and one drawn example.


def _check_finite(d: _Declaration, pair: tuple[Tensor, Tensor]) -> None:
    p, q = (t.clone().requires_grad_(True) for t in pair)
    with torch.enable_grad():
        out = d.fn(p, q)
        _evaluate(lambda _p, _q: out, p.detach(), q.detach())
        if not (isinstance(out, Tensor) and out.requires_grad):
            return  # not differentiable (or detached): only the values are checked
        grads = torch.autograd.grad(out.sum(), [p, q], allow_unused=True)
    # A distance has no gradient where p = q (|x| has none at 0, √JSD's slope is
    # infinite there), so only a declared (or inferred) squared distance, smooth there,
    # has its gradient checked on the diagonal. The diagonal includes what rounds to
    # it: distributions equal in the dtype, or within 10 √eps where fn reads 0.
    rp, rq = _rows(p.detach(), q.detach())
    smooth = d.power is not None and d.power >= 2
    if smooth:
        checked = torch.ones(len(rp), dtype=torch.bool)
    else:
        prob_p, prob_q = rp.softmax(-1), rq.softmax(-1)
        gap = (prob_p - prob_q).abs().amax(-1)
        zero = out.detach().reshape(-1) == 0
        near = gap <= 10 * math.sqrt(torch.finfo(rp.dtype).eps)
        checked = (gap > 0) & ~(zero & near)
    for name, grad in zip(("logits_p", "logits_q"), grads):
        if grad is None:
            continue
        bad = checked & ~torch.isfinite(grad.reshape(-1, grad.shape[-1])).all(dim=-1)
        if bad.any():
            i = int(bad.nonzero()[0])
            (rg,) = _rows(grad)
            where = "" if smooth else ", at distinct distributions (p ≠ q)"
            raise _Broken(
                "finite",
                f"fn(logits_p, logits_q) is finite but its gradient with respect to {name} "
                f"is not{where}.",
                {**_example(i, logits_p=p.detach(), logits_q=q.detach()), name + ".grad": rg[i]},
            )


def _check_batch(d: _Declaration, pair: tuple[Tensor, Tensor]) -> None:
    p, q = pair
    batch = _evaluate(d.fn, p, q).reshape(-1)
    rp, rq = _rows(p, q)
    for i in range(len(rp)):
        alone = _evaluate(d.fn, rp[i : i + 1], rq[i : i + 1])[0]
        if not d.close(batch[i], alone):
            raise _Broken(
                "batch",
                f"fn on a batch of shape {tuple(p.shape[:-1])} gives {batch[i].item():.10g} "
                f"for distribution {i} (in row-major order), but {alone.item():.10g} on that "
                "distribution alone: a batch must equal its rows.",
                {"logits_p": p, "logits_q": q, "row": i},
            )


def _check_non_negative(d: _Declaration, pair: tuple[Tensor, Tensor]) -> None:
    p, q = pair
    values = _evaluate(d.fn, p, q).reshape(-1)
    bad = values < -d.atol
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _Broken(
            "non_negative",
            f"fn(logits_p, logits_q) = {values[i].item():.6g} < 0.",
            _example(i, logits_p=p, logits_q=q),
        )


def _check_zero_on_equal(d: _Declaration, pair: tuple[Tensor, Tensor]) -> None:
    p, q = pair
    values = _evaluate(d.fn, p, q).reshape(-1)
    bad = values.abs() > d.atol
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _Broken(
            "zero_on_equal",
            f"fn(logits_p, logits_q) = {values[i].item():.6g}, not 0 (atol {d.atol:.3g}), "
            "although both logits give the same distribution (they differ by a constant).",
            _example(i, logits_p=p, logits_q=q),
        )


def _check_positive_on_distinct(d: _Declaration, pair: tuple[Tensor, Tensor]) -> None:
    p, q = pair
    values = _evaluate(d.fn, p, q).reshape(-1)
    rp, rq = _rows(p, q)
    gap = (rp.double().softmax(-1) - rq.double().softmax(-1)).abs().amax(-1)
    bad = (gap >= 1e-3) & (values <= 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _Broken(
            "positive_on_distinct",
            f"fn(logits_p, logits_q) = {values[i].item():.6g} although the distributions "
            f"differ (by {gap[i].item():.3g} in one probability).",
            _example(i, logits_p=p, logits_q=q),
        )


def _check_symmetric(d: _Declaration, pair: tuple[Tensor, Tensor]) -> None:
    p, q = pair
    forward = _evaluate(d.fn, p, q).reshape(-1)
    backward = _evaluate(d.fn, q, p).reshape(-1)
    bad = ~d.close(forward, backward)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _Broken(
            "symmetric",
            f"fn(logits_p, logits_q) = {forward[i].item():.10g} but fn(logits_q, logits_p) = "
            f"{backward[i].item():.10g}.",
            _example(i, logits_p=p, logits_q=q),
        )


def _check_upper_bound(d: _Declaration, pair: tuple[Tensor, Tensor]) -> None:
    p, q = pair
    values = _evaluate(d.fn, p, q).reshape(-1)
    bad = values > d.upper_bound + d.atol + d.rtol * d.upper_bound
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _Broken(
            "upper_bound",
            f"fn(logits_p, logits_q) = {values[i].item():.10g} > upper_bound = "
            f"{d.upper_bound:.10g}.",
            _example(i, logits_p=p, logits_q=q),
        )


def _check_triangle(d: _Declaration, abc: tuple[Tensor, Tensor, Tensor]) -> None:
    a, b, c = abc
    ab, bc, ac = (d.delta(_evaluate(d.fn, x, y).reshape(-1)) for x, y in ((a, b), (b, c), (a, c)))
    bad = ac > ab + bc + d.atol + d.rtol * (ab + bc)
    if bad.any():
        i = int(bad.nonzero()[0])
        root = "fn" if d.power == 1 else f"fn^(1/{d.power:g})"
        raise _Broken(
            "triangle",
            f"{root}(a, c) = {ac[i].item():.10g} > {root}(a, b) + {root}(b, c) = "
            f"{ab[i].item():.10g} + {bc[i].item():.10g}.",
            _example(i, logits_a=a, logits_b=b, logits_c=c),
        )


def _check_local_constant(d: _Declaration, pair: tuple[Tensor, Tensor]) -> None:
    p, q = pair
    values = _evaluate(d.fn, p, q).reshape(-1)
    rp, rq = _rows(p, q)
    prob_p, prob_q = rp.double().softmax(-1), rq.double().softmax(-1)
    # The Fisher metric at the midpoint: the same ds² to leading order, and the error
    # of a symmetric divergence's expansion drops from O(step) to O(step²).
    ds2 = ((prob_q - prob_p).square() / ((prob_p + prob_q) / 2)).sum(-1)
    # Only where the step moves probability mass: a step that moves only classes of
    # probability 1e-40 leaves ds² below the rounding error of any divergence.
    step2 = (rq.double() - rp.double()).square().sum(-1)
    moved = ds2 >= 1e-3 * step2
    ratio = values.clamp_min(0.0) ** (2.0 / d.power) / ds2
    bad = moved & ((ratio - d.local_constant).abs() > d.local_rtol * d.local_constant)
    if bad.any():
        i = int(bad.nonzero()[0])
        half = _evaluate(d.fn, rp[i : i + 1], (rp[i : i + 1] + rq[i : i + 1]) / 2)[0]
        expo = ""
        if values[i] > 0 and half > 0:
            expo = (
                f" Near p, fn scales like ds^{math.log2(values[i].item() / half.item()):.2f}; "
                f"power={d.power:g} {'declares' if d.power_given else '(fn itself) means'} "
                f"ds^{d.power:g}."
            )
        law = "fn" if d.power == 2 else f"fn^(2/{d.power:g})"
        raise _Broken(
            "local_constant",
            f"{law}(p, q) / ds² = {ratio[i].item():.6g}, but local_constant = "
            f"{d.local_constant:.6g} (tolerance {d.local_rtol:.0%}); here "
            f"fn(p, q) = {values[i].item():.6g} and ds² = Σ (q_k - p_k)² / m_k = "
            f"{ds2[i].item():.6g}.{expo}",
            _example(i, logits_p=p, logits_q=q),
        )


# ----------------------------------------------------------------------------------
# Measuring the power.

#: Logit steps ε and 2ε of the measurement, and how far from a half-integer it may be.
_POWER_STEP = 1e-3
_POWER_TOLERANCE = 0.1
_POWER_DIRECTIONS = 4  # per number of classes


class _PowerNotMeasured(ValueError):
    """The local exponent of fn is not measurable, or not a half-integer."""


def _class_counts(n_classes: Any) -> list[int]:
    """A few numbers of classes from ``n_classes`` (a value, or a strategy drawn from)."""
    if not isinstance(n_classes, SearchStrategy):
        return [_n_classes(_OWNER, n_classes)]
    drawn: list[int] = []

    def record(k: int) -> None:
        drawn.append(k)

    config = settings(
        max_examples=20,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        verbosity=Verbosity.quiet,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    hypothesis.seed(0)(config(given(_argument(_OWNER, n_classes, _n_classes))(record)))()
    counts = sorted(set(drawn))
    return counts if len(counts) <= 3 else [counts[0], counts[len(counts) // 2], counts[-1]]


def _measure_power(fn: Callable[[Tensor, Tensor], Tensor], counts: list[int]) -> float:
    """The exponent of ``fn(p, p + εv) ~ ε^power``, rounded to the nearest half-integer.

    ``fn(p, p + 2εv) / fn(p, p + εv) → 2^power`` as ``ε → 0``; it is measured in float64
    at ``ε = 1e-3`` from random logits ``p`` (entries of unit scale) in random unit
    directions ``v`` that change the distribution, the same ones on every call.
    """
    generator = torch.Generator().manual_seed(0)
    exponents: list[float] = []
    for k in counts:
        for _ in range(_POWER_DIRECTIONS):
            p = torch.randn(1, k, generator=generator, dtype=torch.float64)
            v = torch.randn(1, k, generator=generator, dtype=torch.float64)
            v = v - v.mean()
            v = v / v.norm()
            steps = []
            for step in (_POWER_STEP, 2 * _POWER_STEP):
                with torch.no_grad():
                    out = fn(p, p + step * v)
                if not isinstance(out, Tensor) or out.numel() < 1:
                    got = "an empty tensor" if isinstance(out, Tensor) else type(out).__name__
                    raise TypeError(
                        f"fn must return a torch.Tensor with one value per distribution; got {got}."
                    )
                value = float(out.detach().reshape(-1)[0])
                if not (math.isfinite(value) and value > 0):
                    raise _PowerNotMeasured(
                        f"fn(p, p + {step:g}·v) = {value:.6g} with p = {_show(p[0])} and v = "
                        f"{_show(v[0])}, and measuring the power needs finite positive values "
                        "near p."
                    )
                steps.append(value)
            exponents.append(math.log2(steps[1] / steps[0]))
    measured = sorted(exponents)[len(exponents) // 2]
    power = round(2 * measured) / 2
    spread = max(abs(e - power) for e in exponents)
    span = (
        f"the median of fn(p, p + 2εv) / fn(p, p + εv) = 2^e over {len(exponents)} random "
        f"(p, v) at ε = {_POWER_STEP:g} is e = {measured:.3f} (from {min(exponents):.3f} to "
        f"{max(exponents):.3f})"
    )
    if power < 0.5:
        raise _PowerNotMeasured(f"fn does not vanish as q → p: {span}.")
    if spread > _POWER_TOLERANCE:
        raise _PowerNotMeasured(
            f"{span}, not within {_POWER_TOLERANCE:g} of a half-integer (1 for a distance, "
            "2 for a squared distance)."
        )
    return power


def infer_power(
    fn: Callable[[Tensor, Tensor], Tensor],
    *,
    n_classes: int | SearchStrategy[int] = st.integers(2, 8),  # noqa: B008
) -> float:
    """Measure the local scaling exponent of a divergence: ``fn(p, q) ~ ds^power``.

    ``power`` is what :func:`check_divergence` uses when it is not given: 1 for a
    distance (``fisher_rao``, ``√JSD``), 2 for a divergence that behaves like a
    squared distance (``jensen_shannon``, ``hellinger``, ``symmetric_kl``). As
    ``ε → 0``, ``fn(p, p + 2εv) / fn(p, p + εv) → 2^power``; the ratio is measured in
    float64 at ``ε = 1e-3``, for four random logits ``p`` (of unit scale) and logit
    directions ``v`` per number of classes (up to three numbers drawn from
    ``n_classes``), and rounded to the nearest half-integer. The measurement is
    deterministic: the same ``p`` and ``v`` on every call.

    Parameters
    ----------
    fn : callable
        ``(logits_p, logits_q) -> Tensor`` of per-distribution values; called on
        float64 logits of shape ``(1, n_classes)``.
    n_classes : int or strategy, default=integers(2, 8)
        Numbers of classes to measure at.

    Returns
    -------
    float
        The exponent, a half-integer ``>= 0.5``: ``1.0`` or ``2.0`` for every
        divergence in :mod:`geoconnect.divergences`.

    Raises
    ------
    ValueError
        Where the exponent cannot be measured (``fn`` is zero, negative or not finite
        near ``p``) or is not within 0.1 of a half-integer for every ``(p, v)``; the
        message says what was measured.
    TypeError
        ``fn`` does not return a tensor.

    Examples
    --------
    >>> from geoconnect.divergences import fisher_rao, jensen_shannon
    >>> from geoconnect.testing import infer_power
    >>> infer_power(fisher_rao), infer_power(jensen_shannon)
    (1.0, 2.0)
    >>> infer_power(lambda p, q: jensen_shannon(p, q) ** 0.6)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: infer_power() could not measure the power of fn: ... is e = 1.200 ...
    """
    if not callable(fn):
        raise TypeError(
            "The 'fn' argument of infer_power() must be a callable (logits_p, logits_q) "
            f"-> Tensor. Got {type(fn).__name__} instead."
        )
    try:
        return _measure_power(fn, _class_counts(n_classes))
    except _PowerNotMeasured as error:
        raise ValueError(f"infer_power() could not measure the power of fn: {error}") from None


# ----------------------------------------------------------------------------------
# The public entry point.


def _real(name: str, value: Any, *, positive: bool) -> float:
    _non_negative(name)(_OWNER, value)
    if positive and value == 0:
        raise ValueError(f"The '{name}' argument of {_OWNER} must be > 0. Got 0 instead.")
    return float(value)


def check_divergence(
    fn: Callable[[Tensor, Tensor], Tensor],
    *,
    symmetric: bool = True,
    triangle: bool = False,
    upper_bound: float | None = None,
    local_constant: float | None = None,
    power: float | None = None,
    n_classes: int | SearchStrategy[int] = st.integers(2, 8),  # noqa: B008
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    atol: float | None = None,
    max_examples: int = 50,
    seed: int | None = 0,
) -> tuple[str, ...]:
    """Property-test a divergence or distance between categorical distributions.

    ``fn(logits_p, logits_q)`` takes two logit tensors of shape ``(..., n_classes)``
    and returns one value per distribution, shape ``(...)`` — the convention of
    :mod:`geoconnect.divergences` and of the ``divergence`` parameter of the
    connectors. For a function of probabilities, pass
    ``lambda a, b: my_fn(a.softmax(-1), b.softmax(-1))``.

    Checked by default:

    - ``finite``: finite values, at extreme logits (up to ±1e4, in float32 and
      ``dtype``), including equal and opposite pairs; and finite gradients when the
      output carries a gradient, off the diagonal ``p ≠ q`` (where a distance such as
      ``√JSD`` has none), and on it too when ``power`` is 2 or more (a squared
      distance is smooth there);
    - ``batch``: the output has the batch's shape, and a batch (of any leading shape)
      equals its rows evaluated one by one;
    - ``non_negative``: ``fn ≥ 0``;
    - ``zero_on_equal``: ``fn(p, q) = 0`` when the logits give the same distribution
      (equal, or differing by a constant);
    - ``positive_on_distinct``: ``fn(p, q) > 0`` when a probability differs by
      ``1e-3`` or more;
    - ``symmetric``: ``fn(p, q) = fn(q, p)``, unless ``symmetric=False``.

    Checked when declared:

    - ``upper_bound``: ``fn ≤ upper_bound``, also at saturated logits;
    - ``triangle``: ``δ(a, c) ≤ δ(a, b) + δ(b, c)`` for ``δ = fn ** (1 / power)``,
      on triples where ``b`` is also drawn between ``a`` and ``c``;
    - ``local_constant``: ``δ² ≈ local_constant · ds²`` as ``q → p``, with
      ``ds² = Σ_k (q_k − p_k)² / p_k`` the Fisher metric, within 2 % in float64
      (10 % otherwise).

    ``power`` says what ``fn`` is: ``power=1`` for a distance (``fisher_rao``: the
    triangle is checked on ``fn``, the local law is ``fn² ≈ c·ds²``), ``power=2`` for a
    divergence that behaves like a squared distance (``jensen_shannon``,
    ``hellinger``, ``symmetric_kl``: the triangle is checked on ``√fn``, the local law
    is ``fn ≈ c·ds²``). A declaration means what it says: ``triangle`` or
    ``local_constant`` declared without ``power`` is about ``fn`` itself (power 1,
    a distance). Where such a law fails, the power of ``fn`` is measured
    (:func:`infer_power`: ``fn(p, p + 2εv) / fn(p, p + εv) → 2^power``), and if the
    law holds for it the message says so — "It holds for fn ** (1/2): pass power=2
    if fn is a squared distance" — the check still failing. A failure message says
    of each broken property whether it was checked by default or declared, and with
    which power.

    Parameters
    ----------
    fn : callable
        ``(logits_p, logits_q) -> Tensor`` of per-distribution values.
    symmetric : bool, default=True
        Check ``fn(p, q) = fn(q, p)``; False for an asymmetric divergence.
    triangle : bool, default=False
        Declare that ``fn ** (1 / power)`` obeys the triangle inequality (``fn``
        itself without ``power``).
    upper_bound : float, optional
        Declare ``fn ≤ upper_bound`` (e.g. ``math.log(2)`` for the Jensen–Shannon
        divergence, ``math.pi`` for the Fisher–Rao distance).
    local_constant : float, optional
        Declare ``fn(p, q) ** (2 / power) ≈ local_constant · ds²`` for nearby ``p, q``
        (1/8 for ``jensen_shannon`` and ``hellinger``, 1 for ``fisher_rao`` and
        ``symmetric_kl``).
    power : float, optional
        ``fn`` is the ``power``-th power of a distance-like quantity (see above).
        Used by ``triangle=True`` and ``local_constant``; without it they are
        about ``fn`` itself (power 1), and a failure says whether they hold for
        the power :func:`infer_power` measures.
    n_classes : int or strategy, default=integers(2, 8)
        Numbers of classes to draw.
    dtype : torch.dtype, default=torch.float64
        Floating dtype of the logits for the value checks. float64 separates real
        defects from rounding; ``finite`` always also runs in float32.
    rtol, atol : float, optional
        Tolerances of the exact laws (symmetry, batch, bound, triangle, zero), default
        ``sqrt(eps)`` and ``10 * sqrt(eps)`` of ``dtype`` (1.5e-8 and 1.5e-7 in float64).
    max_examples : int, default=50
        Hypothesis examples per property; each example is a small batch.
    seed : int or None, default=0
        Seed of the search, which makes the check deterministic (and uses no example
        database); ``None`` explores new examples on every run and replays failures
        from the hypothesis database of the current settings profile.

    Returns
    -------
    tuple of str
        The properties checked, all of which hold.

    Raises
    ------
    DivergenceCheckError
        An ``AssertionError`` listing every broken property, whether checked by
        default or declared, each with the minimal counter-example hypothesis found
        (its ``failures`` attribute maps property names to those messages).
    TypeError, ValueError
        Invalid arguments, ``fn`` returning something other than a tensor, or a
        ``power`` needed but not given that cannot be measured.

    Notes
    -----
    Call it from a plain test function, not from inside a ``@given`` test: it runs
    hypothesis itself, one search per property.

    Examples
    --------
    >>> import math
    >>> from geoconnect.divergences import jensen_shannon
    >>> from geoconnect.testing import check_divergence
    >>> check_divergence(jensen_shannon, triangle=True, power=2, upper_bound=math.log(2),
    ...                  local_constant=1 / 8, max_examples=10)  # a squared distance
    ... # doctest: +NORMALIZE_WHITESPACE
    ('finite', 'batch', 'non_negative', 'zero_on_equal', 'positive_on_distinct',
     'symmetric', 'upper_bound', 'triangle', 'local_constant')

    The Jensen–Shannon distance ``√JSD`` is a metric, though its gradient is infinite
    where ``p = q``:

    >>> "triangle" in check_divergence(lambda p, q: jensen_shannon(p, q).sqrt(),
    ...                                triangle=True, max_examples=10)  # fn itself
    True

    A broken declaration is caught and named, with the power it holds for:

    >>> from geoconnect.testing import DivergenceCheckError
    >>> try:
    ...     check_divergence(jensen_shannon, triangle=True, max_examples=20)
    ... except DivergenceCheckError as error:
    ...     print(str(error).splitlines()[0])
    ...     print(str(error).splitlines()[-1])
    jensen_shannon breaks 1 property: triangle (declared, power=1, fn itself: no power given).
    It holds for fn ** (1/2): pass power=2 if fn is a squared distance.
    """
    _check_arguments(fn, symmetric, triangle, dtype, max_examples, seed)
    if upper_bound is not None:
        upper_bound = _real("upper_bound", upper_bound, positive=True)
    if local_constant is not None:
        local_constant = _real("local_constant", local_constant, positive=True)
    if power is not None:
        power = _real("power", power, positive=True)
    eps = torch.finfo(dtype).eps
    rtol = math.sqrt(eps) if rtol is None else _real("rtol", rtol, positive=False)
    atol = 10 * math.sqrt(eps) if atol is None else _real("atol", atol, positive=False)
    plan = _plan(n_classes, dtype, symmetric, upper_bound, triangle, local_constant)
    _check_returns_a_tensor(fn, dtype)
    # A law declared without a power is about fn itself: a distance (power 1).
    power_given = power is not None or not (triangle or local_constant is not None)
    if not power_given:
        power = 1.0
    declaration = _Declaration(
        fn,
        power=power,
        power_given=power_given,
        upper_bound=upper_bound,
        local_constant=local_constant,
        local_rtol=0.02 if dtype == torch.float64 else 0.1,
        rtol=rtol,
        atol=atol,
    )
    config = _search_settings(max_examples, seed)
    failures: dict[str, str] = {}
    # The examples are batches of a few distributions: intra-op threads only add
    # hand-off latency, which on a busy machine costs milliseconds per call.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _, strategy, body in plan:
            broken = _search(declaration, strategy, body, config, seed)
            if broken is not None and broken.prop not in failures:
                failures[broken.prop] = str(broken)
        if not power_given:
            _hint_the_power(declaration, plan, failures, config, seed, n_classes)
    finally:
        torch.set_num_threads(threads)
    if failures:
        ordered = {prop: failures[prop] for prop in PROPERTIES if prop in failures}
        origins = {prop: _origin(prop) for prop in ordered}
        if power is not None:
            how = f"power={power:g}" + ("" if power_given else ", fn itself: no power given")
            origins.update({prop: f"declared, {how}" for prop in ("triangle", "local_constant")})
        raise DivergenceCheckError(getattr(fn, "__name__", repr(fn)), ordered, origins)
    return tuple(prop for prop, _, _ in plan)


#: A property's name, the strategy of its examples, and its check.
_Plan = list[tuple[str, SearchStrategy, Callable[[_Declaration, Any], None]]]


def _check_arguments(
    fn: object,
    symmetric: object,
    triangle: object,
    dtype: object,
    max_examples: object,
    seed: object,
) -> None:
    """A ``TypeError`` or ``ValueError`` naming the argument of check_divergence
    that is not what it must be."""
    if not callable(fn):
        raise TypeError(
            f"The 'fn' argument of {_OWNER} must be a callable (logits_p, logits_q) -> "
            f"Tensor. Got {type(fn).__name__} instead."
        )
    for name, flag in (("symmetric", symmetric), ("triangle", triangle)):
        if not isinstance(flag, bool):
            raise TypeError(
                f"The '{name}' argument of {_OWNER} must be True or False. Got {flag!r} instead."
            )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"The 'dtype' argument of {_OWNER} must be a floating torch.dtype. Got "
            f"{dtype!r} instead."
        )
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(
            f"The 'max_examples' argument of {_OWNER} must be an int >= 1. Got "
            f"{max_examples!r} instead."
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(
            f"The 'seed' argument of {_OWNER} must be an int or None. Got {seed!r} instead."
        )


def _plan(
    n_classes: Any,
    dtype: torch.dtype,
    symmetric: bool,
    upper_bound: float | None,
    triangle: bool,
    local_constant: float | None,
) -> _Plan:
    """The properties to check, in order: the defaults, then the declared ones."""
    values = st.just(dtype)
    extreme_dtypes = st.sampled_from(sorted({torch.float32, dtype}, key=str))
    steps = st.floats(1e-4, 1e-3) if dtype == torch.float64 else st.floats(2e-2, 6e-2)
    shapes = array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3)
    plan: _Plan = [
        (
            "finite",
            _pairs(n_classes, extreme_dtypes, _EXTREME_SCALE, ("independent", "equal", "opposite")),
            _check_finite,
        ),
        (
            "batch",
            _pairs(n_classes, values, _DEFAULT_SCALE, ("independent",), shapes),
            _check_batch,
        ),
        (
            "non_negative",
            _pairs(n_classes, values, _WIDE_SCALE, ("independent", "opposite")),
            _check_non_negative,
        ),
        (
            "zero_on_equal",
            _pairs(n_classes, values, _DEFAULT_SCALE, ("equal", "shifted")),
            _check_zero_on_equal,
        ),
        (
            "positive_on_distinct",
            _pairs(n_classes, values, _DEFAULT_SCALE, ("independent",)),
            _check_positive_on_distinct,
        ),
    ]
    if symmetric:
        strategy = _pairs(n_classes, values, _DEFAULT_SCALE, ("independent",))
        plan.append(("symmetric", strategy, _check_symmetric))
    if upper_bound is not None:
        strategy = _pairs(n_classes, values, _WIDE_SCALE, ("independent", "opposite"))
        plan.append(("upper_bound", strategy, _check_upper_bound))
    if triangle:
        strategy = triples(n_classes=n_classes, batch_shape=_ROWS, dtype=dtype)
        plan.append(("triangle", strategy, _check_triangle))
    if local_constant is not None:
        strategy = nearby_pairs(n_classes=n_classes, batch_shape=_ROWS, dtype=dtype, step=steps)
        plan.append(("local_constant", strategy, _check_local_constant))
    return plan


def _search_settings(max_examples: int, seed: int | None) -> settings:
    """Hypothesis's settings for one property's search: quiet, no deadline, and no
    example database when seeded (deterministic)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=False,
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
        **({"database": None} if seed is not None else {}),
    )


def _hint_the_power(
    declaration: _Declaration,
    plan: _Plan,
    failures: dict[str, str],
    config: settings,
    seed: int | None,
    n_classes: Any,
) -> None:
    """Where a law declared without ``power`` fails on fn itself, whether it holds
    for the power measured from fn (:func:`infer_power`): said in the failure's
    message, the declaration left as it was."""
    laws = [row for row in plan if row[0] in ("triangle", "local_constant") and row[0] in failures]
    if not laws:
        return
    try:
        measured = _measure_power(declaration.fn, _class_counts(n_classes))
    except _PowerNotMeasured:
        return
    if measured == 1:
        return
    other = _Declaration(**{**vars(declaration), "power": measured})
    kind = "a squared distance" if measured == 2 else f"a distance to the power {measured:g}"
    for prop, strategy, body in laws:
        if _search(other, strategy, body, config, seed) is not None:
            continue  # broken for the measured power too: nothing to suggest
        law = (
            f"fn ** (1/{measured:g})"
            if prop == "triangle"
            else ("fn" if measured == 2 else f"fn ** (2/{measured:g})") + " ≈ local_constant · ds²"
        )
        failures[prop] += f"\nIt holds for {law}: pass power={measured:g} if fn is {kind}."


def _check_returns_a_tensor(fn: Callable, dtype: torch.dtype) -> None:
    out = fn(torch.zeros(2, 3, dtype=dtype), torch.zeros(2, 3, dtype=dtype))
    if not isinstance(out, Tensor):
        raise TypeError(
            "fn must return a torch.Tensor with one value per distribution; got "
            f"{type(out).__name__}."
        )


def _search(
    declaration: _Declaration,
    strategy: SearchStrategy,
    body: Callable[[_Declaration, Any], None],
    config: settings,
    seed: int | None,
) -> _Broken | None:
    """Run one hypothesis search; the shrunk failure, if any."""

    def property_holds(example: Any) -> None:
        with torch.no_grad():
            body(declaration, example)

    test = config(given(strategy)(property_holds))
    if seed is not None:
        test = hypothesis.seed(seed)(test)
    try:
        test()
    except _Broken as broken:
        return _alone(declaration, body, broken)
    return None


def _alone(
    declaration: _Declaration, body: Callable[[_Declaration, Any], None], broken: _Broken
) -> _Broken:
    """The failing distribution on its own, where it breaks the property by itself.

    Hypothesis usually shrinks a batch to one row, but not always within its budget;
    a per-row property broken by row ``i`` is then shown on row ``i`` alone, so the
    counter-example does not depend on how far the shrinker got. A failure that
    needs the whole batch (``batch``, or a fn that mixes rows) keeps the batch.
    """
    row = broken.example.get("row")
    if row is None or broken.prop == "batch":
        return broken
    inputs = [v for k, v in broken.example.items() if k.startswith("logits_") and "." not in k]
    lone = tuple(r[row : row + 1] for r in _rows(*inputs))
    try:
        with torch.no_grad():
            body(declaration, lone)
    except _Broken as narrowed:
        return narrowed
    return broken
