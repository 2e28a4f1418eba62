"""Hypothesis strategies for categorical distributions and small classifier pairs.

Every strategy takes keyword-only arguments, each either a plain value or a
hypothesis strategy of such values; plain values are checked when the strategy is
built, so a bad argument fails at once with a message naming it. Distributions are
drawn as **logits** (the inputs of every divergence in :mod:`geoconnect.divergences`);
``probability_vectors`` gives their softmax.

Importing this module registers torch's global random number generator with
:func:`hypothesis.register_random`, so code under test that calls ``torch.randn`` or
builds ``nn.Module``\\ s is seeded by hypothesis and its failures replay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, Union

import numpy as np
import torch
from hypothesis import register_random
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from hypothesis.strategies import SearchStrategy
from torch import Tensor, nn

from ..models import make_cnn, make_mlp

__all__ = [
    "ClassifierPair",
    "classifier_pairs",
    "logits",
    "nearby_pairs",
    "probability_vectors",
    "triples",
]

T = TypeVar("T")
#: A plain value or a hypothesis strategy drawing such values.
ValueOrStrategy = Union[T, SearchStrategy[T]]  # noqa: UP007 (a runtime alias on 3.10)


class _TorchRandom:
    """torch's global generator behind the ``random.Random`` interface hypothesis manages."""

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed % 2**64)

    def getstate(self) -> Tensor:
        return torch.random.get_rng_state()

    def setstate(self, state: Tensor) -> None:
        torch.random.set_rng_state(state)


# Module-level so that the weak reference hypothesis keeps stays alive.
_TORCH_RANDOM = _TorchRandom()
register_random(_TORCH_RANDOM)

_DEFAULT_N_CLASSES = st.integers(2, 10)
_DEFAULT_BATCH_SHAPE = array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4)
# Shrinks towards 0 (the uniform distribution); up to 64 gives gaps of e^-128 (one-hot).
_DEFAULT_SCALE = st.one_of(st.floats(0.0, 4.0), st.floats(4.0, 64.0))
_DEFAULT_STEP = st.floats(1e-4, 1e-3)
_DEFAULT_ARCHITECTURE = st.sampled_from(["mlp", "cnn"])
_DEFAULT_MODEL_CLASSES = st.integers(2, 5)
_DEFAULT_WIDTH = st.integers(2, 8)
_DEFAULT_N_FEATURES = st.integers(1, 8)
_DEFAULT_N_SAMPLES = st.integers(1, 16)


# ----------------------------------------------------------------------------------
# Argument checking: eager for values, at draw time for strategies.


def _n_classes(owner: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"The 'n_classes' argument of {owner} must be an int >= 2 or a strategy of "
            f"such ints. Got {value!r} of type {type(value).__name__} instead."
        )
    if value < 2:
        raise ValueError(
            f"The 'n_classes' argument of {owner} must be an int >= 2 (a distribution "
            f"needs two classes). Got {value!r} instead."
        )
    return int(value)


def _batch_shape(owner: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in value
    ):
        raise TypeError(
            f"The 'batch_shape' argument of {owner} must be a tuple of ints, e.g. (4,) or "
            f"() for a single distribution, or a strategy of such tuples. Got {value!r} "
            "instead."
        )
    if any(n < 1 for n in value):
        raise ValueError(
            f"The 'batch_shape' argument of {owner} must have sides >= 1. Got {value!r} instead."
        )
    return tuple(int(n) for n in value)


def _dtype(owner: str, value: Any) -> torch.dtype:
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(
            f"The 'dtype' argument of {owner} must be a floating torch.dtype such as "
            f"torch.float64 or torch.float32, or a strategy of them. Got {value!r} instead."
        )
    return value


def _non_negative(name: str) -> Callable[[str, Any], float]:
    def check(owner: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            raise TypeError(
                f"The '{name}' argument of {owner} must be a real number or a strategy of "
                f"real numbers. Got {value!r} of type {type(value).__name__} instead."
            )
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"The '{name}' argument of {owner} must be a finite number >= 0. Got "
                f"{value!r} instead."
            )
        return float(value)

    return check


def _positive(name: str) -> Callable[[str, Any], float]:
    base = _non_negative(name)

    def check(owner: str, value: Any) -> float:
        value = base(owner, value)
        if value == 0:
            raise ValueError(f"The '{name}' argument of {owner} must be > 0. Got 0 instead.")
        return value

    return check


def _positive_int(name: str) -> Callable[[str, Any], int]:
    def check(owner: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"The '{name}' argument of {owner} must be an int >= 1 or a strategy of such "
                f"ints. Got {value!r} instead."
            )
        return int(value)

    return check


def _architecture(owner: str, value: Any) -> str:
    if value not in ("mlp", "cnn"):
        raise ValueError(
            f"The 'architecture' argument of {owner} must be 'mlp' or 'cnn', or a strategy "
            f"of them. Got {value!r} instead."
        )
    return value


def _argument(owner: str, value: Any, check: Callable[[str, Any], T]) -> SearchStrategy[T]:
    """A strategy for one argument: ``value`` checked now, or a strategy checked per draw."""
    if isinstance(value, SearchStrategy):
        return value.map(lambda drawn: check(owner, drawn))
    return st.just(check(owner, value))


class _Layout(NamedTuple):
    batch_shape: tuple[int, ...]
    n_classes: int
    dtype: torch.dtype


def _layouts(owner: str, n_classes: Any, batch_shape: Any, dtype: Any) -> SearchStrategy[_Layout]:
    return st.builds(
        _Layout,
        _argument(owner, batch_shape, _batch_shape),
        _argument(owner, n_classes, _n_classes),
        _argument(owner, dtype, _dtype),
    )


def _draw_logits(draw: st.DrawFn, layout: _Layout, scales: SearchStrategy[float]) -> Tensor:
    """Float64 logits of ``layout``'s shape: unit entries times a per-distribution scale."""
    n_rows = math.prod(layout.batch_shape)
    unit = draw(arrays(np.float64, (n_rows, layout.n_classes), elements=st.floats(-1.0, 1.0)))
    scale = np.array([draw(scales) for _ in range(n_rows)], dtype=np.float64)
    values = torch.from_numpy(unit * scale[:, None])
    return values.reshape(*layout.batch_shape, layout.n_classes)


# ----------------------------------------------------------------------------------
# Distributions.


def logits(
    *,
    n_classes: ValueOrStrategy[int] = _DEFAULT_N_CLASSES,
    batch_shape: ValueOrStrategy[tuple[int, ...]] = _DEFAULT_BATCH_SHAPE,
    dtype: ValueOrStrategy[torch.dtype] = torch.float64,
    scale: ValueOrStrategy[float] = _DEFAULT_SCALE,
) -> SearchStrategy[Tensor]:
    """Logit tensors of shape ``(*batch_shape, n_classes)``.

    Each distribution's logits are ``scale`` times entries in ``[-1, 1]``; ``scale``
    sets the concentration: 0 gives the uniform distribution, a few units an ordinary
    one, 64 a near-one-hot softmax (probabilities down to ``e^-128``) and ``1e4`` the
    saturated logits that break a naive ``log(softmax)``. When ``scale`` is a strategy,
    every distribution of the batch draws its own, so one batch mixes concentrations.

    Parameters
    ----------
    n_classes : int or strategy, default=integers(2, 10)
        Number of classes, >= 2.
    batch_shape : tuple of int or strategy, default=array_shapes(min_dims=0, max_dims=2, max_side=4)
        Leading dimensions; ``()`` draws a single distribution.
    dtype : torch.dtype or strategy, default=torch.float64
        Floating dtype of the tensor (values are drawn in float64 and then cast).
    scale : float or strategy, default=one_of(floats(0, 4), floats(4, 64))
        Concentration, >= 0 (see above). Shrinks towards 0, the uniform distribution.

    Returns
    -------
    SearchStrategy[Tensor]
        Tensors of shape ``(*batch_shape, n_classes)``.

    Raises
    ------
    TypeError, ValueError
        At once, when a plain argument is invalid.

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from geoconnect.testing.strategies import logits
    >>> @settings(max_examples=20, deadline=None)
    ... @given(logits(n_classes=3, batch_shape=(2,)))
    ... def test_softmax_sums_to_one(z):
    ...     assert torch.allclose(z.softmax(-1).sum(-1), torch.ones(2, dtype=z.dtype))
    >>> test_softmax_sums_to_one()
    >>> logits(n_classes=1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The 'n_classes' argument of logits() must be an int >= 2 ... Got 1 instead.
    """
    owner = "logits()"
    layouts = _layouts(owner, n_classes, batch_shape, dtype)
    scales = _argument(owner, scale, _non_negative("scale"))

    @st.composite
    def draw_logits(draw: st.DrawFn) -> Tensor:
        layout = draw(layouts)
        return _draw_logits(draw, layout, scales).to(layout.dtype)

    return draw_logits()


def probability_vectors(
    *,
    n_classes: ValueOrStrategy[int] = _DEFAULT_N_CLASSES,
    batch_shape: ValueOrStrategy[tuple[int, ...]] = _DEFAULT_BATCH_SHAPE,
    dtype: ValueOrStrategy[torch.dtype] = torch.float64,
    scale: ValueOrStrategy[float] = _DEFAULT_SCALE,
) -> SearchStrategy[Tensor]:
    """Probability vectors: the softmax of :func:`logits` drawn with the same arguments.

    The softmax is taken in float64 and then cast to ``dtype``, so large ``scale`` gives
    exact zeros (underflow) — the inputs that make ``log(p)`` infinite.

    Parameters
    ----------
    n_classes, batch_shape, dtype, scale
        As in :func:`logits`.

    Returns
    -------
    SearchStrategy[Tensor]
        Non-negative tensors of shape ``(*batch_shape, n_classes)`` whose last
        dimension sums to 1.

    Examples
    --------
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from geoconnect.testing.strategies import probability_vectors
    >>> @settings(max_examples=20, deadline=None)
    ... @given(probability_vectors(n_classes=4, scale=1e4))
    ... def test_probabilities_sum_to_one(p):
    ...     assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones_like(p[..., 0]))
    >>> test_probabilities_sum_to_one()
    """
    owner = "probability_vectors()"
    layouts = _layouts(owner, n_classes, batch_shape, dtype)
    scales = _argument(owner, scale, _non_negative("scale"))

    @st.composite
    def draw_probabilities(draw: st.DrawFn) -> Tensor:
        layout = draw(layouts)
        return _draw_logits(draw, layout, scales).softmax(-1).to(layout.dtype)

    return draw_probabilities()


def nearby_pairs(
    *,
    n_classes: ValueOrStrategy[int] = _DEFAULT_N_CLASSES,
    batch_shape: ValueOrStrategy[tuple[int, ...]] = _DEFAULT_BATCH_SHAPE,
    dtype: ValueOrStrategy[torch.dtype] = torch.float64,
    scale: ValueOrStrategy[float] = _DEFAULT_SCALE,
    step: ValueOrStrategy[float] = _DEFAULT_STEP,
) -> SearchStrategy[tuple[Tensor, Tensor]]:
    """Pairs ``(logits_p, logits_q)`` of nearby distributions, for local checks.

    ``logits_q = logits_p + step * u`` with ``u`` a unit vector orthogonal to the
    all-ones direction (which would not change the distribution). Because the step is
    in logit space, every probability moves by a *relative* amount ``O(step)``, however
    small it is, which is what a check of ``D(p, q) ≈ c·ds²`` needs. Use float64: in
    float32 a logit of 50 has a resolution of ``4e-6``.

    Parameters
    ----------
    n_classes, batch_shape, dtype, scale
        As in :func:`logits`; they describe ``p``.
    step : float or strategy, default=floats(1e-4, 1e-3)
        Euclidean length of ``logits_q - logits_p``, > 0; a strategy is drawn per
        distribution.

    Returns
    -------
    SearchStrategy[tuple[Tensor, Tensor]]
        Two tensors of shape ``(*batch_shape, n_classes)``.

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from geoconnect.divergences import jensen_shannon
    >>> from geoconnect.testing.strategies import nearby_pairs
    >>> @settings(max_examples=20, deadline=None)
    ... @given(nearby_pairs(batch_shape=(3,)))
    ... def test_nearby_distributions_are_close(pair):
    ...     assert (jensen_shannon(*pair) < 1e-6).all()
    >>> test_nearby_distributions_are_close()
    """
    owner = "nearby_pairs()"
    layouts = _layouts(owner, n_classes, batch_shape, dtype)
    scales = _argument(owner, scale, _non_negative("scale"))
    steps = _argument(owner, step, _positive("step"))

    @st.composite
    def draw_nearby_pairs(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
        layout = draw(layouts)
        p = _draw_logits(draw, layout, scales)
        n_rows, k = math.prod(layout.batch_shape), layout.n_classes
        raw = draw(arrays(np.float64, (n_rows, k), elements=st.floats(-1.0, 1.0)))
        direction = torch.from_numpy(raw - raw.mean(axis=1, keepdims=True))
        # A constant direction (where shrinking goes) moves nothing: use e_0 - e_1.
        flat = direction.norm(dim=1) < 1e-6
        direction[flat] = 0.0
        direction[flat, 0], direction[flat, 1] = 1.0, -1.0
        direction = direction / direction.norm(dim=1, keepdim=True)
        length = torch.tensor([draw(steps) for _ in range(n_rows)], dtype=torch.float64)
        q = p + (length[:, None] * direction).reshape(p.shape)
        return p.to(layout.dtype), q.to(layout.dtype)

    return draw_nearby_pairs()


def triples(
    *,
    n_classes: ValueOrStrategy[int] = _DEFAULT_N_CLASSES,
    batch_shape: ValueOrStrategy[tuple[int, ...]] = _DEFAULT_BATCH_SHAPE,
    dtype: ValueOrStrategy[torch.dtype] = torch.float64,
    scale: ValueOrStrategy[float] = _DEFAULT_SCALE,
) -> SearchStrategy[tuple[Tensor, Tensor, Tensor]]:
    """Triples ``(logits_a, logits_b, logits_c)`` for triangle-inequality checks.

    Independent points rarely come close to breaking a triangle inequality; a
    squared distance breaks it when ``b`` lies *between* ``a`` and ``c``. So ``b`` is
    drawn in one of four arrangements: independent of ``a`` and ``c``; on the segment
    between their logits; on the mixture ``(1 - t) p_a + t p_c`` of their
    probabilities; or close to ``a``.

    Parameters
    ----------
    n_classes, batch_shape, dtype, scale
        As in :func:`logits`.

    Returns
    -------
    SearchStrategy[tuple[Tensor, Tensor, Tensor]]
        Three tensors of shape ``(*batch_shape, n_classes)``.

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from geoconnect.divergences import fisher_rao
    >>> from geoconnect.testing.strategies import triples
    >>> @settings(max_examples=20, deadline=None)
    ... @given(triples())
    ... def test_fisher_rao_triangle(abc):
    ...     a, b, c = abc
    ...     assert (fisher_rao(a, c) <= fisher_rao(a, b) + fisher_rao(b, c) + 1e-9).all()
    >>> test_fisher_rao_triangle()
    """
    owner = "triples()"
    layouts = _layouts(owner, n_classes, batch_shape, dtype)
    scales = _argument(owner, scale, _non_negative("scale"))

    @st.composite
    def draw_triples(draw: st.DrawFn) -> tuple[Tensor, Tensor, Tensor]:
        layout = draw(layouts)
        a = _draw_logits(draw, layout, scales)
        c = _draw_logits(draw, layout, scales)
        arrangement = draw(st.sampled_from(["independent", "logit_segment", "mixture", "near"]))
        if arrangement == "independent":
            b = _draw_logits(draw, layout, scales)
        elif arrangement == "logit_segment":
            t = draw(st.floats(0.0, 1.0))
            b = (1.0 - t) * a + t * c
        elif arrangement == "mixture":
            t = draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))
            b = torch.logaddexp(a.log_softmax(-1) + math.log1p(-t), c.log_softmax(-1) + math.log(t))
        else:
            b = a + draw(st.floats(1e-4, 1e-1)) * _draw_logits(draw, layout, st.just(1.0))
        return a.to(layout.dtype), b.to(layout.dtype), c.to(layout.dtype)

    return draw_triples()


# ----------------------------------------------------------------------------------
# Classifiers.


class ClassifierPair(NamedTuple):
    """Two classifiers of one architecture and inputs they accept."""

    model_a: nn.Module
    """First classifier, in eval mode."""
    model_b: nn.Module
    """Second classifier: same architecture, another initialisation, in eval mode."""
    X: Tensor
    """Inputs, float32, shape ``(n_samples, n_features)`` or ``(n_samples, 1, 8, 8)``."""


def classifier_pairs(
    *,
    architecture: ValueOrStrategy[str] = _DEFAULT_ARCHITECTURE,
    n_classes: ValueOrStrategy[int] = _DEFAULT_MODEL_CLASSES,
    width: ValueOrStrategy[int] = _DEFAULT_WIDTH,
    n_features: ValueOrStrategy[int] = _DEFAULT_N_FEATURES,
    n_samples: ValueOrStrategy[int] = _DEFAULT_N_SAMPLES,
) -> SearchStrategy[ClassifierPair]:
    """Pairs of small, randomly initialised torch classifiers of matched architecture.

    ``"mlp"`` is ``n_features → width → n_classes`` with a ReLU
    (:func:`geoconnect.models.make_mlp`); ``"cnn"`` is the BatchNorm convolutional
    network of :func:`geoconnect.models.make_cnn` on 1×8×8 images. The two models
    are built from two drawn seeds without touching torch's global generator, and the
    inputs ``X`` are Gaussian from a third. Both models come in eval mode.

    Parameters
    ----------
    architecture : {"mlp", "cnn"} or strategy, default=sampled_from(["mlp", "cnn"])
    n_classes : int or strategy, default=integers(2, 5)
        Number of outputs (logits), >= 2.
    width : int or strategy, default=integers(2, 8)
        Hidden units of the MLP, or channels of the CNN's first convolution, >= 1.
    n_features : int or strategy, default=integers(1, 8)
        Input features of the MLP, >= 1 (the CNN ignores it).
    n_samples : int or strategy, default=integers(1, 16)
        Rows of ``X``, >= 1.

    Returns
    -------
    SearchStrategy[ClassifierPair]
        Named tuples ``(model_a, model_b, X)``.

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from geoconnect.testing.strategies import classifier_pairs
    >>> @settings(max_examples=10, deadline=None)
    ... @given(classifier_pairs(n_classes=3))
    ... def test_models_give_one_row_of_logits_per_sample(pair):
    ...     assert pair.model_a(pair.X).shape == pair.model_b(pair.X).shape == (len(pair.X), 3)
    >>> test_models_give_one_row_of_logits_per_sample()
    """
    owner = "classifier_pairs()"
    architectures = _argument(owner, architecture, _architecture)
    classes = _argument(owner, n_classes, _n_classes)
    widths = _argument(owner, width, _positive_int("width"))
    features = _argument(owner, n_features, _positive_int("n_features"))
    samples = _argument(owner, n_samples, _positive_int("n_samples"))
    seeds = st.integers(0, 2**31 - 1)

    @st.composite
    def draw_pair(draw: st.DrawFn) -> ClassifierPair:
        kind, k, w, n = draw(architectures), draw(classes), draw(widths), draw(samples)
        seed_a, seed_b, seed_x = draw(seeds), draw(seeds), draw(seeds)
        if seed_b == seed_a:
            seed_b += 1
        with torch.random.fork_rng(devices=[]):
            if kind == "mlp":
                d = draw(features)
                model_a, model_b = (make_mlp((d, w, k), seed=s) for s in (seed_a, seed_b))
                shape: tuple[int, ...] = (d,)
            else:
                model_a, model_b = (make_cnn(k, w, seed=s) for s in (seed_a, seed_b))
                shape = (1, 8, 8)
        X = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed_x))
        return ClassifierPair(model_a.eval(), model_b.eval(), X)

    return draw_pair()
