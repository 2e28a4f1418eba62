"""The divergence invariants of DESIGN.md, checked through geoconnect.testing and directly."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geoconnect.divergences import (
    DIVERGENCES,
    fisher_rao,
    fisher_rao_squared,
    get_divergence,
    hellinger,
    jensen_shannon,
    symmetric_kl,
)
from geoconnect.testing import check_divergence
from geoconnect.testing.strategies import logits, nearby_pairs

ALL = [jensen_shannon, fisher_rao, hellinger, symmetric_kl]
PROPERTY = settings(max_examples=40, deadline=None, database=None)


@st.composite
def logit_pairs(draw, batch=3):
    """Two float64 logit tensors of one shape, at ordinary concentrations."""
    k = draw(st.integers(2, 6))
    scale = st.floats(0.0, 8.0)
    return (
        draw(logits(n_classes=k, batch_shape=(batch,), scale=scale)),
        draw(logits(n_classes=k, batch_shape=(batch,), scale=scale)),
    )


# ----------------------------------------------------------------------------------
# The declared properties, through check_divergence: each checks ≥ 0, zero iff
# equal, finiteness (values and gradients) at logits up to ±1e4 in float32 and
# float64, and that a batch of any leading shape equals its rows.


def test_jensen_shannon_is_symmetric_bounded_by_ln2_and_locally_ds2_over_8():
    # power=2: the triangle inequality is checked on √JSD, which is a metric.
    check_divergence(
        jensen_shannon,
        symmetric=True,
        triangle=True,
        power=2,
        upper_bound=math.log(2),
        local_constant=1 / 8,
    )


def test_fisher_rao_is_a_metric_bounded_by_pi_and_locally_ds():
    check_divergence(
        fisher_rao, symmetric=True, triangle=True, power=1, upper_bound=math.pi, local_constant=1
    )


def test_squared_hellinger_is_bounded_by_1_its_root_a_metric_and_locally_ds2_over_8():
    check_divergence(
        hellinger, symmetric=True, triangle=True, power=2, upper_bound=1.0, local_constant=1 / 8
    )


def test_symmetric_kl_is_symmetric_unbounded_and_locally_ds2():
    check_divergence(symmetric_kl, symmetric=True, power=2, local_constant=1)


def test_squared_fisher_rao_segment_cost_is_locally_ds2():
    check_divergence(
        fisher_rao_squared,
        triangle=True,
        power=2,
        upper_bound=math.pi**2,
        local_constant=1,
        max_examples=25,
    )


# ----------------------------------------------------------------------------------
# Agreement with the textbook definitions (DESIGN.md), evaluated in numpy.


def _probabilities(z: torch.Tensor) -> np.ndarray:
    return torch.softmax(z, dim=-1).numpy()


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


@PROPERTY
@given(logit_pairs())
def test_jensen_shannon_is_the_mean_kl_to_the_mixture(pair):
    p, q = map(_probabilities, pair)
    m = (p + q) / 2
    expected = 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    np.testing.assert_allclose(jensen_shannon(*pair).numpy(), expected, rtol=1e-7, atol=1e-12)


@PROPERTY
@given(logit_pairs())
def test_fisher_rao_is_twice_the_arccos_of_the_bhattacharyya_coefficient(pair):
    p, q = map(_probabilities, pair)
    expected = 2 * np.arccos(np.clip(np.sum(np.sqrt(p * q), axis=-1), -1.0, 1.0))
    # arccos near 1 is ill-conditioned: the reference itself is only good to ~1e-8.
    np.testing.assert_allclose(fisher_rao(*pair).numpy(), expected, rtol=1e-7, atol=1e-7)


@PROPERTY
@given(logit_pairs())
def test_squared_hellinger_is_one_minus_the_bhattacharyya_coefficient(pair):
    p, q = map(_probabilities, pair)
    expected = 1 - np.sum(np.sqrt(p * q), axis=-1)
    np.testing.assert_allclose(hellinger(*pair).numpy(), expected, rtol=1e-7, atol=1e-12)


@PROPERTY
@given(logit_pairs())
def test_symmetric_kl_is_the_sum_of_both_kls(pair):
    p, q = map(_probabilities, pair)
    expected = _kl(p, q) + _kl(q, p)
    np.testing.assert_allclose(symmetric_kl(*pair).numpy(), expected, rtol=1e-7, atol=1e-12)


@PROPERTY
@given(logit_pairs())
def test_fisher_rao_squared_is_the_square_of_the_distance(pair):
    torch.testing.assert_close(fisher_rao_squared(*pair), fisher_rao(*pair) ** 2)


# ----------------------------------------------------------------------------------
# Bounds, extremes and invariances.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounds_are_reached_by_disjoint_distributions(dtype):
    p = torch.tensor([[1e4, -1e4], [30.0, -30.0]], dtype=dtype)
    tol = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(
        jensen_shannon(p, -p), torch.full((2,), math.log(2), dtype=dtype), **tol
    )
    torch.testing.assert_close(fisher_rao(p, -p), torch.full((2,), math.pi, dtype=dtype), **tol)
    torch.testing.assert_close(hellinger(p, -p), torch.ones(2, dtype=dtype), **tol)


EXTREME_ROWS = torch.tensor(list(itertools.product([-1e4, 0.0, 1e4], repeat=3)))


@pytest.mark.parametrize("fn", ALL, ids=lambda fn: fn.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_are_finite_at_extreme_logits(fn, dtype):
    # Every pair of rows drawn from {-1e4, 0, 1e4}^3, equal pairs included.
    n = len(EXTREME_ROWS)
    p = EXTREME_ROWS.repeat_interleave(n, 0).to(dtype).requires_grad_(True)
    q = EXTREME_ROWS.repeat(n, 1).to(dtype).requires_grad_(True)
    value = fn(p, q)
    value.sum().backward()
    assert torch.isfinite(value).all()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    assert value.dtype == dtype


@pytest.mark.parametrize("fn", [jensen_shannon, hellinger, symmetric_kl, fisher_rao_squared])
def test_the_gradient_vanishes_where_the_distributions_are_equal(fn):
    # The quadratic costs have their minimum at p = q: a zero (not nan) gradient there.
    p = torch.tensor([[0.3, -1.2, 2.0], [1e4, 0.0, -1e4]], requires_grad=True)
    fn(p, p.detach().clone()).sum().backward()
    torch.testing.assert_close(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("fn", ALL, ids=lambda fn: fn.__name__)
@PROPERTY
@given(pair=logit_pairs(), data=st.data())
def test_relabelling_the_classes_changes_nothing(fn, pair, data):
    p, q = pair
    perm = torch.tensor(data.draw(st.permutations(range(p.shape[-1]))))
    torch.testing.assert_close(fn(p[..., perm], q[..., perm]), fn(p, q), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fn", ALL, ids=lambda fn: fn.__name__)
@PROPERTY
@given(pair=logit_pairs(), shift=st.floats(-50.0, 50.0))
def test_only_the_distributions_matter_not_the_logits_offset(fn, pair, shift):
    p, q = pair
    torch.testing.assert_close(fn(p + shift, q), fn(p, q), rtol=1e-6, atol=1e-9)


@PROPERTY
@given(nearby_pairs(batch_shape=(4,), scale=st.floats(0.0, 4.0)))
def test_the_local_constants_tie_the_divergences_together(pair):
    # JSD ≈ H² ≈ d_FR²/8 ≈ symmetric KL/8 as q → p: all four see the same ds².
    d2 = fisher_rao(*pair) ** 2
    for fn, constant in ((jensen_shannon, 1 / 8), (hellinger, 1 / 8), (symmetric_kl, 1.0)):
        torch.testing.assert_close(fn(*pair), constant * d2, rtol=1e-2, atol=0.0)


# ----------------------------------------------------------------------------------
# Inputs and the registry.


def test_non_tensor_inputs_are_a_type_error():
    with pytest.raises(TypeError, match="must be torch tensors of logits"):
        jensen_shannon(np.zeros((2, 3)), torch.zeros(2, 3))


def test_a_class_count_mismatch_is_a_value_error_naming_both_shapes():
    with pytest.raises(ValueError, match=r"same number of classes.*\(2, 3\) and \(2, 4\)"):
        fisher_rao(torch.zeros(2, 3), torch.zeros(2, 4))


def test_get_divergence_resolves_names_and_passes_callables_through():
    assert {name: get_divergence(name) for name in DIVERGENCES} == DIVERGENCES
    assert get_divergence("fisher_rao") is fisher_rao_squared  # the segment cost is d_FR²
    assert get_divergence(hellinger) is hellinger


def test_an_unknown_divergence_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"'divergence' parameter must be one of \['fisher_rao'"):
        get_divergence("wasserstein")
