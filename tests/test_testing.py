"""geoconnect.testing: each planted defect is caught and named; the strategies keep their word."""

from __future__ import annotations

import importlib
import math
import re
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geoconnect.divergences import SPECS, fisher_rao, fisher_rao_squared, jensen_shannon, spec_of
from geoconnect.testing import PROPERTIES, DivergenceCheckError, check_divergence, infer_power
from geoconnect.testing.strategies import (
    classifier_pairs,
    logits,
    nearby_pairs,
    probability_vectors,
    triples,
)

FAST = settings(max_examples=20, deadline=None, database=None)
# What is declared about the functions the planted defects are variations of.
JSD = SPECS["jsd"]
FISHER_RAO = spec_of(fisher_rao)


# ----------------------------------------------------------------------------------
# Planted defects, each of one kind.


def forward_kl(logits_p, logits_q):
    """KL(p‖q): a fine divergence, but not a symmetric one."""
    log_p, log_q = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def jsd_with_log_of_softmax(logits_p, logits_q):
    """JSD through log(softmax(...)): log(0) = -inf and 0 · -inf = nan once p underflows."""
    p, q = logits_p.softmax(-1), logits_q.softmax(-1)
    m = (p + q) / 2
    return 0.5 * (p * (p.log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)


def jsd_without_the_half(logits_p, logits_q):
    """KL(p‖m) + KL(q‖m), twice the JSD: locally ds²/4, not the JSD's ds²/8."""
    return 2 * jensen_shannon(logits_p, logits_q)


def jsd_centred_over_the_batch(logits_p, logits_q):
    """Subtracts the batch mean of the logits: each row now depends on the others."""
    return jensen_shannon(logits_p - logits_p.mean(0), logits_q - logits_q.mean(0))


def jensen_shannon_distance(logits_p, logits_q):
    """√JSD, a metric; the slope of √ is infinite at 0, so it has no gradient where p = q."""
    return jensen_shannon(logits_p, logits_q).sqrt()


def naive_fisher_rao(logits_p, logits_q):
    """2 arccos Σ √(p_k q_k): √ has an infinite slope at p_k = 0, and 0 · ∞ = nan."""
    bc = (logits_p.softmax(-1) * logits_q.softmax(-1)).sqrt().sum(-1)
    return 2 * torch.acos(bc.clamp(-1.0, 1.0))


def failure_of(fn, **declaration) -> DivergenceCheckError:
    declaration.setdefault("max_examples", 30)
    with pytest.raises(DivergenceCheckError) as caught:
        check_divergence(fn, **declaration)
    assert isinstance(caught.value, AssertionError)
    for prop in caught.value.failures:
        assert f"[{prop}]" in str(caught.value)
    return caught.value


def failures_of(fn, **declaration) -> dict[str, str]:
    return failure_of(fn, **declaration).failures


def counter_example(message: str) -> dict[str, torch.Tensor]:
    """The tensors a failure message shows, evaluated back into tensors."""
    found = re.findall(r"^ +(logits_\w) = (torch\.tensor\(.*\))$", message, flags=re.M)
    return {name: eval(source, {"torch": torch}) for name, source in found}


def test_an_asymmetric_divergence_declared_symmetric_is_caught():
    failures = failures_of(forward_kl, symmetric=True)
    assert list(failures) == ["symmetric"]
    shown = counter_example(failures["symmetric"])
    p, q = shown["logits_p"], shown["logits_q"]
    assert p.ndim == 1  # one distribution, however far the shrinker got
    assert not torch.isclose(forward_kl(p, q), forward_kl(q, p))


def test_a_per_row_failure_found_in_a_batch_is_shown_on_its_row_alone():
    # What the shrinker hands back when it stops early: a batch in which one row is bad.
    from geoconnect.testing import _checks

    p = torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    declaration = _checks._Declaration(fn=forward_kl, atol=1e-9, rtol=1e-6)
    with pytest.raises(_checks._Broken) as caught:
        _checks._check_symmetric(declaration, (p, q))
    assert caught.value.example["row"] == 1
    alone = _checks._alone(declaration, _checks._check_symmetric, caught.value)
    assert torch.equal(alone.example["logits_p"], p[1])
    assert torch.equal(alone.example["logits_q"], q[1])
    assert "row" not in alone.example


def test_a_distance_without_the_triangle_inequality_is_caught():
    failures = failures_of(fisher_rao_squared, triangle=True, power=1)
    assert list(failures) == ["triangle"]
    shown = counter_example(failures["triangle"])
    a, b, c = shown["logits_a"], shown["logits_b"], shown["logits_c"]
    assert fisher_rao_squared(a, c) > fisher_rao_squared(a, b) + fisher_rao_squared(b, c)


def test_a_squared_distance_declared_a_metric_without_a_power_is_rejected_with_the_power_it_needs():
    # Inference must not change the declaration: triangle=True without power is
    # about fn itself, which a squared distance breaks; the message says what holds.
    error = failure_of(fisher_rao_squared, triangle=True)
    assert list(error.failures) == ["triangle"]
    assert "triangle (declared, power=1, fn itself: no power given)" in str(error)
    hint = "It holds for fn ** (1/2): pass power=2 if fn is a squared distance."
    assert error.failures["triangle"].endswith(hint)
    assert "fn(a, c)" in error.failures["triangle"]  # the violation of fn itself is shown


def test_a_local_law_declared_without_a_power_is_about_fn_itself_with_a_hint():
    error = failure_of(jensen_shannon, local_constant=JSD.local_constant)
    assert list(error.failures) == ["local_constant"]
    assert "power=1 (fn itself) means ds^1" in error.failures["local_constant"]
    assert error.failures["local_constant"].endswith(
        "It holds for fn ≈ local_constant · ds²: pass power=2 if fn is a squared distance."
    )


@pytest.mark.parametrize("fn", [fisher_rao, jensen_shannon_distance], ids=["fr", "sqrt_jsd"])
def test_metrics_pass_the_triangle_declared_without_a_power(fn):
    assert "triangle" in check_divergence(fn, triangle=True, max_examples=30)


def test_a_hint_is_given_only_where_the_measured_power_makes_the_law_hold():
    def doubled_jsd(logits_p, logits_q):  # 2·JSD: the local law fails for power 2 too
        return 2 * jensen_shannon(logits_p, logits_q)

    error = failure_of(doubled_jsd, local_constant=JSD.local_constant)
    assert "It holds" not in error.failures["local_constant"]


def test_the_square_root_of_the_same_function_passes_the_triangle_check():
    power = spec_of(fisher_rao_squared).power  # 2
    checked = check_divergence(fisher_rao_squared, triangle=True, power=power, max_examples=30)
    assert "triangle" in checked


def test_log_of_zero_at_extreme_logits_is_caught_as_not_finite():
    failures = failures_of(jsd_with_log_of_softmax, upper_bound=JSD.upper_bound)
    assert list(failures) == ["finite"]
    shown = counter_example(failures["finite"])
    assert torch.isnan(jsd_with_log_of_softmax(shown["logits_p"], shown["logits_q"]))


def test_a_nan_gradient_is_caught_as_not_finite():
    failures = failures_of(naive_fisher_rao)
    assert "finite" in failures
    assert "gradient" in failures["finite"]


@pytest.mark.parametrize("power", [None, 1])
def test_a_distance_without_a_gradient_at_the_diagonal_passes_the_finite_check(power):
    checked = check_divergence(
        jensen_shannon_distance,
        triangle=True,
        power=power,
        upper_bound=math.sqrt(JSD.upper_bound),
        local_constant=JSD.local_constant,
    )
    assert {"finite", "triangle", "local_constant"} <= set(checked)


def test_a_nan_value_off_the_diagonal_is_caught_as_checked_by_default():
    error = failure_of(jsd_with_log_of_softmax, triangle=True, power=2)
    assert list(error.failures) == ["finite"]
    assert "finite (checked by default)" in str(error).splitlines()[0]
    assert error.origins == {"finite": "checked by default"}


def test_a_nan_gradient_off_the_diagonal_of_a_distance_is_caught():
    failures = failures_of(naive_fisher_rao, triangle=True, power=1)
    assert list(failures) == ["finite"]
    assert "gradient" in failures["finite"] and "p ≠ q" in failures["finite"]
    shown = counter_example(failures["finite"])
    assert not torch.equal(shown["logits_p"].softmax(-1), shown["logits_q"].softmax(-1))


def test_a_nan_gradient_at_the_diagonal_is_caught_for_a_squared_distance():
    def squared_through_a_root(logits_p, logits_q):  # (√JSD)²: 0 · ∞ = nan where p = q
        return jensen_shannon_distance(logits_p, logits_q) ** 2

    failures = failures_of(squared_through_a_root, triangle=True, power=2)
    assert list(failures) == ["finite"]
    shown = counter_example(failures["finite"])
    assert torch.equal(shown["logits_p"].softmax(-1), shown["logits_q"].softmax(-1))


def test_a_wrongly_declared_property_is_said_to_be_declared():
    error = failure_of(fisher_rao_squared, triangle=True, power=1)
    assert "breaks 1 property: triangle (declared, power=1)." in str(error)
    error = failure_of(jsd_without_the_half, local_constant=JSD.local_constant)
    assert "local_constant (declared, power=1, fn itself: no power given)" in str(error)
    assert "power=1 (fn itself) means ds^1" in error.failures["local_constant"]


def test_symmetry_is_said_to_be_checked_by_default_and_how_to_turn_it_off():
    error = failure_of(forward_kl)
    assert "symmetric (checked by default; symmetric=False turns it off)" in str(error)
    assert check_divergence(forward_kl, symmetric=False, max_examples=10)


def test_a_wrong_local_constant_is_caught():
    failures = failures_of(jsd_without_the_half, power=JSD.power, local_constant=JSD.local_constant)
    assert list(failures) == ["local_constant"]
    assert "ds^2.00" in failures["local_constant"]


def test_a_distance_declared_as_a_squared_distance_fails_the_local_law_with_a_hint():
    failures = failures_of(fisher_rao, power=2, local_constant=FISHER_RAO.local_constant)
    assert list(failures) == ["local_constant"]
    assert "fn scales like ds^1.00; power=2 declares ds^2" in failures["local_constant"]


def test_a_batch_that_differs_from_its_rows_is_caught():
    failures = failures_of(jsd_centred_over_the_batch)
    assert next(iter(failures)) == "batch"
    assert "a batch must equal its rows" in failures["batch"]


def test_a_wrong_output_shape_is_caught_as_a_batch_failure():
    failures = failures_of(lambda p, q: jensen_shannon(p, q).sum())
    assert "batch" in failures
    assert "one value per distribution" in failures["batch"]


def test_an_exceeded_bound_is_caught():
    failures = failures_of(jsd_without_the_half, upper_bound=JSD.upper_bound)
    assert list(failures) == ["upper_bound"]


def test_negative_values_and_nonzero_self_divergence_are_caught():
    failures = failures_of(lambda p, q: jensen_shannon(p, q) - 0.01)
    assert {"non_negative", "zero_on_equal"} <= set(failures)


def test_a_divergence_blind_to_some_differences_is_caught():
    def argmax_disagreement(logits_p, logits_q):
        return (logits_p.argmax(-1) != logits_q.argmax(-1)).to(logits_p.dtype)

    failures = failures_of(argmax_disagreement)
    assert "positive_on_distinct" in failures


def test_every_failure_names_a_known_property():
    failures = failures_of(lambda p, q: 2 * jensen_shannon(p, q) - 0.01, upper_bound=0.5)
    assert set(failures) <= set(PROPERTIES)


# ----------------------------------------------------------------------------------
# The declarations and the arguments of check_divergence.


def test_a_sound_declaration_returns_the_properties_checked():
    checked = check_divergence(fisher_rao, **FISHER_RAO.declaration, max_examples=20)
    assert checked == (
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


def test_the_check_is_deterministic_for_a_seed():
    first = failures_of(forward_kl, seed=3, max_examples=10)
    assert failures_of(forward_kl, seed=3, max_examples=10) == first


@pytest.mark.parametrize(
    ("fn", "power"),
    [(fisher_rao, 1), (jensen_shannon, 2), (jensen_shannon_distance, 1), (fisher_rao_squared, 2)],
)
def test_the_power_of_a_distance_or_a_squared_distance_is_inferred(fn, power):
    assert infer_power(fn) == power
    assert infer_power(fn, n_classes=st.integers(3, 5)) == power


def test_a_declaration_without_power_is_about_fn_itself():
    # The Fisher–Rao distance is a distance: its laws hold for fn itself. The
    # Jensen–Shannon divergence is a squared one: they fail, each with the power
    # they hold for, and the power is not silently changed to make them pass.
    declaration = {k: v for k, v in FISHER_RAO.declaration.items() if k != "power"}
    checked = check_divergence(fisher_rao, **declaration, max_examples=20)
    assert {"triangle", "local_constant"} <= set(checked)
    declaration = {k: v for k, v in JSD.declaration.items() if k != "power"}
    error = failure_of(jensen_shannon, **declaration, max_examples=20)
    assert sorted(error.failures) == ["local_constant", "triangle"]
    assert all("pass power=2 if fn is a squared" in m for m in error.failures.values())


@pytest.mark.parametrize(
    ("fn", "measured"),
    [
        (lambda p, q: jensen_shannon(p, q) ** 0.6, r"is e = 1\.200 .*not within 0\.1 of a half"),
        (lambda p, q: (p.argmax(-1) != q.argmax(-1)) * 1.0, r"fn\(p, p \+ 0\.001·v\) = 0 with p"),
        (lambda p, q: jensen_shannon(p, q) + 1.0, r"fn does not vanish as q → p: .* e = 0\.0"),
    ],
)
@pytest.mark.parametrize("declaration", [{"triangle": True}, {"local_constant": 0.125}])
def test_a_power_that_cannot_be_measured_gives_no_hint_and_infer_power_says_why(
    fn, measured, declaration
):
    error = failure_of(fn, **declaration)  # the laws on fn itself: each of these breaks one
    assert not any("It holds" in message for message in error.failures.values())
    with pytest.raises(ValueError, match=measured):
        infer_power(fn)


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [
        ("upper_bound", -1.0, ValueError),
        ("upper_bound", math.inf, ValueError),
        ("local_constant", 0.0, ValueError),
        ("power", "2", TypeError),
        ("max_examples", 0, ValueError),
        ("dtype", torch.int64, TypeError),
        ("symmetric", "yes", TypeError),
        ("seed", 1.5, TypeError),
    ],
)
def test_invalid_arguments_are_named(argument, value, error):
    declaration = {argument: value}
    if argument in ("local_constant",):
        declaration["power"] = 2
    with pytest.raises(error, match=f"'{argument}'"):
        check_divergence(jensen_shannon, **declaration)


def test_fn_must_be_callable_and_return_a_tensor():
    with pytest.raises(TypeError, match="'fn'"):
        check_divergence("jsd")
    with pytest.raises(TypeError, match=r"must return a torch\.Tensor"):
        check_divergence(lambda p, q: jensen_shannon(p, q).numpy())


def test_the_check_restores_torch_thread_count():
    before = torch.get_num_threads()
    with pytest.raises(DivergenceCheckError):
        check_divergence(forward_kl, max_examples=10)
    assert torch.get_num_threads() == before


def test_a_clear_import_error_without_hypothesis(monkeypatch):
    for name in list(sys.modules):
        if name == "geoconnect.testing" or name.startswith("geoconnect.testing."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match=r"pip install 'geoconnect\[testing\]'"):
        importlib.import_module("geoconnect.testing")


# ----------------------------------------------------------------------------------
# Strategies.


@FAST
@given(st.data())
def test_logits_have_the_requested_layout(data):
    k = data.draw(st.integers(2, 6))
    shape = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    z = data.draw(logits(n_classes=k, batch_shape=shape, dtype=dtype))
    assert z.shape == (*shape, k)
    assert z.dtype == dtype
    assert torch.isfinite(z).all()


@FAST
@given(logits(batch_shape=(3,), scale=0.0))
def test_scale_zero_gives_the_uniform_distribution(z):
    assert (z == 0).all()


@FAST
@given(logits(batch_shape=(3,), scale=st.floats(0.0, 2.0)))
def test_logits_stay_within_their_scale(z):
    assert z.abs().max() <= 2.0


@FAST
@given(probability_vectors(batch_shape=(2, 3), dtype=torch.float32, scale=1e4))
def test_probability_vectors_are_distributions(p):
    assert (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(2, 3))


@FAST
@given(nearby_pairs(batch_shape=(4,), step=st.floats(1e-3, 1e-2)))
def test_nearby_pairs_are_one_step_apart_and_distinct(pair):
    p, q = pair
    step = (q - p).norm(dim=-1)
    assert ((step >= 1e-3 * (1 - 1e-9)) & (step <= 1e-2 * (1 + 1e-9))).all()
    assert torch.allclose((q - p).sum(-1), torch.zeros(4, dtype=p.dtype), atol=1e-12)
    assert (p.softmax(-1) != q.softmax(-1)).any(-1).all()


@FAST
@given(triples(batch_shape=(2,), n_classes=3))
def test_triples_share_one_layout(abc):
    assert {t.shape for t in abc} == {torch.Size([2, 3])}
    assert all(torch.isfinite(t).all() for t in abc)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: logits(n_classes=1), "'n_classes' argument of logits"),
        (lambda: logits(n_classes=2.0), "'n_classes' argument of logits"),
        (lambda: logits(batch_shape=(0,)), "'batch_shape' argument of logits"),
        (lambda: logits(batch_shape=4), "'batch_shape' argument of logits"),
        (lambda: logits(dtype=torch.int64), "'dtype' argument of logits"),
        (lambda: logits(scale=-1.0), "'scale' argument of logits"),
        (lambda: probability_vectors(scale=math.nan), "'scale' argument of probability_vec"),
        (lambda: nearby_pairs(step=0.0), "'step' argument of nearby_pairs"),
        (lambda: triples(n_classes=0), "'n_classes' argument of triples"),
        (lambda: classifier_pairs(architecture="rnn"), "'architecture' argument of classifier"),
        (lambda: classifier_pairs(n_samples=0), "'n_samples' argument of classifier_pairs"),
    ],
)
def test_bad_arguments_fail_when_the_strategy_is_built(make, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        make()


def test_a_bad_value_drawn_from_an_argument_strategy_fails_at_draw_time():
    strategy = logits(n_classes=st.just(1))  # building is fine: the value is not known yet

    @FAST
    @given(strategy)
    def draw(_):
        pass

    with pytest.raises(ValueError, match="'n_classes' argument of logits"):
        draw()


@settings(max_examples=10, deadline=None, database=None)
@given(st.data())
def test_classifier_pairs_match_and_leave_the_global_rng_alone(data):
    before = torch.random.get_rng_state()
    pair = data.draw(classifier_pairs(n_classes=3))
    assert torch.equal(torch.random.get_rng_state(), before)
    a, b = dict(pair.model_a.named_parameters()), dict(pair.model_b.named_parameters())
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert not pair.model_a.training and not pair.model_b.training
    with torch.no_grad():
        assert pair.model_a(pair.X).shape == pair.model_b(pair.X).shape == (len(pair.X), 3)


def test_torch_randomness_inside_a_test_replays():
    def run() -> list[float]:
        seen: list[float] = []

        @settings(max_examples=5, database=None, derandomize=True)
        @given(st.integers())
        def record(_):
            seen.append(torch.rand(()).item())

        record()
        return seen

    first = run()
    assert run() == first
    assert len(set(first)) == 1  # hypothesis seeds torch afresh for every example


def test_hypothesis_restores_the_torch_rng_after_a_test():
    @FAST
    @given(st.integers())
    def consume(_):
        torch.rand(10)

    before = torch.random.get_rng_state()
    consume()
    assert torch.equal(torch.random.get_rng_state(), before)
