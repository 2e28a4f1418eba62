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
    ALL_SPECS,
    DIVERGENCES,
    SPECS,
    closed_form_segment_gradient,
    fisher_rao,
    fisher_rao_squared,
    get_divergence,
    hellinger,
    jensen_shannon,
    segment_form,
    spec_of,
    symmetric_kl,
)
from geoconnect.evaluation import segment_divergences
from geoconnect.fitting import SEGMENTS_PER_BLOCK, energy_step
from geoconnect.testing import check_divergence
from geoconnect.testing.strategies import logits, nearby_pairs

# Every built-in divergence function, as declared by its spec: a new spec is tested here.
ALL = [spec.pairwise for spec in ALL_SPECS]
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
# The declared properties, through check_divergence: beside what each spec declares
# (symmetry, bound, triangle inequality of fn ** (1 / power), local constant), it
# checks ≥ 0, zero iff equal, finiteness (values and gradients) at logits up to ±1e4
# in float32 and float64, and that a batch of any leading shape equals its rows.


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda spec: spec.pairwise.__name__)
def test_every_spec_declares_properties_its_divergence_has(spec):
    checked = check_divergence(spec.pairwise, **spec.declaration)
    declared = {
        "symmetric": spec.symmetric,
        "upper_bound": spec.upper_bound is not None,
        "triangle": spec.triangle,
        "local_constant": True,
    }
    assert {prop for prop, on in declared.items() if on} <= set(checked)


def test_every_segment_cost_is_quadratic_in_ds():
    # Minimising a sum of them over segments gives a constant-speed geodesic.
    assert all(spec.power == 2 for spec in SPECS.values())


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


BOUNDED = [spec for spec in ALL_SPECS if spec.upper_bound is not None]


@pytest.mark.parametrize("spec", BOUNDED, ids=lambda spec: spec.pairwise.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounds_are_reached_by_disjoint_distributions(spec, dtype):
    p = torch.tensor([[1e4, -1e4], [30.0, -30.0]], dtype=dtype)
    torch.testing.assert_close(
        spec.pairwise(p, -p),
        torch.full((2,), spec.upper_bound, dtype=dtype),
        rtol=1e-6,
        atol=1e-6,
    )


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


@pytest.mark.parametrize(
    "fn", [spec.pairwise for spec in ALL_SPECS if spec.power == 2], ids=lambda fn: fn.__name__
)
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
    # JSD ≈ H² ≈ d_FR²/8 ≈ symmetric KL/8 as q → p: all of them see the same ds².
    d2 = fisher_rao(*pair) ** 2
    for spec in ALL_SPECS:
        torch.testing.assert_close(
            spec.pairwise(*pair) ** (2 / spec.power),
            spec.local_constant * d2,
            rtol=1e-2,
            atol=0.0,
        )


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


def test_the_names_are_those_of_the_specs_and_each_function_has_one_spec():
    assert list(DIVERGENCES) == list(SPECS) == ["jsd", "fisher_rao", "hellinger", "kl"]
    assert all(DIVERGENCES[name] is spec.pairwise for name, spec in SPECS.items())
    assert all(spec.name == name for name, spec in SPECS.items())
    assert len({id(spec.pairwise) for spec in ALL_SPECS}) == len(ALL_SPECS)
    assert all(spec_of(spec.pairwise) is spec for spec in ALL_SPECS)
    # The distance is described too, though its segment cost "fisher_rao" is its square.
    assert spec_of(fisher_rao).name is None and spec_of(fisher_rao).power == 1


def test_a_users_callable_has_no_spec():
    def total_variation(p, q):
        return 0.5 * (p.softmax(-1) - q.softmax(-1)).abs().sum(-1)

    assert spec_of(total_variation) is None
    assert spec_of(lambda p, q: jensen_shannon(p, q)) is None  # identity, not behaviour
    assert closed_form_segment_gradient(total_variation) is None


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda spec: spec.pairwise.__name__)
def test_the_segment_form_and_closed_form_gradient_are_the_specs(spec):
    assert segment_form(spec.pairwise) is spec.segment
    assert closed_form_segment_gradient(spec.pairwise) is spec.closed_form_gradient


# ----------------------------------------------------------------------------------
# The fast forms: the JSD's non-negative terms, log-probabilities for few classes, the
# segment forms (the JSD's with its gradient in closed form) and the block-wise energy
# step compute the same numbers as the plain expressions they replace.


def plain_jensen_shannon(logits_p, logits_q):
    """The definition, differentiated by autograd: ½ KL(p‖m) + ½ KL(q‖m)."""
    log_p, log_q = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_p + kl_q)


def values_and_grads(fn, *tensors, seed=0):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    values = fn(*leaves)
    weights = torch.randn(values.shape, generator=torch.Generator().manual_seed(seed)).to(
        values.dtype
    )
    return values.detach(), torch.autograd.grad((values * weights).sum(), leaves)


@PROPERTY
@given(
    p=logits(n_classes=st.integers(2, 20), batch_shape=(2, 3), scale=st.floats(0, 30)),
    data=st.data(),
)
def test_the_jensen_shannon_gradient_is_that_of_the_definition(p, data):
    # q broadcasts over p's leading axis, so the gradient must be summed back to it.
    q = data.draw(logits(n_classes=p.shape[-1], batch_shape=(3,), scale=st.floats(0, 30)))
    got, got_grads = values_and_grads(jensen_shannon, p, q)
    want, want_grads = values_and_grads(plain_jensen_shannon, p, q)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_clamping_a_value_rounded_below_zero_keeps_the_jensen_shannon_gradient():
    # Uniform against nearly uniform: the value is of order 1e-17 and may round below
    # zero, the gradient is of order 1e-9 and must survive the clamp (found by
    # hypothesis: the clamp used to zero it).
    p = torch.zeros(1, 5, dtype=torch.float64)
    q = p.clone()
    q[0, 0] = 2.9802e-08
    _, (want, _) = values_and_grads(plain_jensen_shannon, p, q)
    _, (got, _) = values_and_grads(jensen_shannon, p, q)
    assert want.abs().max() > 1e-9
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-15)
    stack = torch.cat([p, q]).unsqueeze(1)  # two points, one sample
    _, (got_stack,) = values_and_grads(segment_form(jensen_shannon), stack)
    torch.testing.assert_close(got_stack[0, 0], want[0], rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(x=st.data())
@PROPERTY
def test_log_probabilities_for_few_classes_are_torchs_for_every_class_count(dtype, x):
    # Through the JSD, whose plain definition uses torch.log_softmax: values and
    # gradients agree on both sides of the few-classes threshold, up to saturation.
    n_classes = x.draw(st.integers(2, 40))
    p, q = (
        x.draw(logits(n_classes=n_classes, batch_shape=(4,), dtype=dtype, scale=st.floats(0, 1e4)))
        for _ in range(2)
    )
    got, got_grads = values_and_grads(jensen_shannon, p, q)
    want, want_grads = values_and_grads(plain_jensen_shannon, p, q)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
@PROPERTY
@given(data=st.data())
def test_a_segment_form_is_the_divergence_of_neighbouring_points(fn, data):
    n_points = data.draw(st.integers(2, 7))
    stack = data.draw(
        logits(
            n_classes=st.integers(2, 20),
            batch_shape=(n_points, 3),
            scale=st.one_of(st.floats(0, 8), st.floats(8, 1e3)),
        )
    )
    got, (got_grad,) = values_and_grads(segment_form(fn), stack)
    want, (want_grad,) = values_and_grads(lambda s: fn(s[:-1], s[1:]), stack)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-10)


def test_a_callable_without_a_segment_form_is_called_pairwise():
    calls = []

    def total_variation(p, q):
        calls.append((p.shape, q.shape))
        return 0.5 * (p.softmax(-1) - q.softmax(-1)).abs().sum(-1)

    stack = torch.randn(4, 5, 3)
    torch.testing.assert_close(
        segment_form(total_variation)(stack), total_variation(stack[:-1], stack[1:])
    )
    assert calls[0] == ((3, 5, 3), (3, 5, 3))


@pytest.mark.parametrize("fn", DIVERGENCES.values(), ids=lambda f: f.__name__)
@settings(max_examples=20, deadline=None, database=None)
@given(n_points=st.integers(2, 3 * SEGMENTS_PER_BLOCK + 2), seed=st.integers(0, 2**16))
def test_the_block_wise_energy_step_equals_the_energy_differentiated_at_once(fn, n_points, seed):
    stack = torch.randn(n_points, 6, 4, generator=torch.Generator().manual_seed(seed)) * 3
    grad, costs, fr = energy_step(stack, fn)
    leaf = stack.clone().requires_grad_(True)
    values = segment_divergences(leaf, fn)
    values.mean(1).sum().backward()
    torch.testing.assert_close(grad, leaf.grad)
    torch.testing.assert_close(costs, values.detach().double().sum(1))
    # d_FR² per sample in float32 (the Hellinger form is accurate there), summed in
    # float64: within float32 rounding of the float64 evaluation.
    want_fr = segment_divergences(stack.double(), fisher_rao_squared).sum(1)
    torch.testing.assert_close(fr, want_fr, rtol=1e-5, atol=1e-6)
    assert costs.dtype == fr.dtype == torch.float64


def test_the_jensen_shannon_divergence_has_every_derivative_and_works_under_vmap():
    p, q = torch.randn(4, 6, 3, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(jensen_shannon)(p, q), jensen_shannon(p, q))
    hessian = torch.autograd.functional.hessian(lambda a: jensen_shannon(a, q[0, 0]), p[0, 0])
    want = torch.autograd.functional.hessian(lambda a: plain_jensen_shannon(a, q[0, 0]), p[0, 0])
    torch.testing.assert_close(hessian, want)


def test_the_closed_form_segment_gradient_refuses_what_it_cannot_do_loudly():
    # First derivatives only: no silently wrong second derivative or transform.
    stack = torch.randn(4, 3, 5)
    form = segment_form(jensen_shannon)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda s: form(s).sum())(stack)
    leaf = stack.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(form(leaf).sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.sum(), leaf)
