"""Refuse, warn or be right: what geoconnect does with inputs that would mislead it."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.divergences import SPECS, fisher_rao, fisher_rao_squared
from geoconnect.evaluation import accuracy_barrier, loss_barrier
from geoconnect.models import make_mlp


def linear(**params) -> LinearConnector:
    return LinearConnector(**{"n_points": 5, "device": "cpu", **params})


def geodesic(**params) -> GeodesicConnector:
    return GeodesicConnector(**{"n_points": 5, "device": "cpu", "random_state": 0, **params})


# -- NaN is never a good score ----------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10), min_size=2, max_size=12),
    where=st.integers(0, 11),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_a_barrier_over_a_non_finite_value_is_nan(values, where, bad):
    values[where % len(values)] = bad
    assert math.isnan(loss_barrier(values))
    assert math.isnan(accuracy_barrier(values))


class NaNOnSomeRows(nn.Module):
    """A classifier that returns NaN on inputs whose first feature exceeds 1.5."""

    def __init__(self, seed: int):
        super().__init__()
        self.net = make_mlp((5, 8, 3), seed=seed)

    def forward(self, x):
        out = self.net(x)
        return torch.where(x[:, :1] > 1.5, torch.full_like(out, math.nan), out)


@pytest.fixture
def nan_pair(small_pair):
    X = small_pair.X.copy()
    X[:2, 0] = 0.0  # the probe's rows are fine
    X[5, 0] = 3.0  # one further row is not
    return NaNOnSomeRows(1).eval(), NaNOnSomeRows(2).eval(), X, small_pair.y


def test_a_path_with_nan_outputs_warns_and_scores_below_every_sound_path(nan_pair, small_pair):
    a, b, X, y = nan_pair
    with pytest.warns(RuntimeWarning, match=r"Point\(s\) \[0, 1, 2, 3, 4\] .* NaN"):
        line = linear().fit(X, model_a=a, model_b=b)
    assert math.isnan(line.energy_) and math.isnan(line.length_)
    with pytest.warns(RuntimeWarning, match="NaN or infinite logits"):
        assert math.isnan(line.evaluate(X, y).barrier)
    with pytest.warns(RuntimeWarning):
        broken = line.score(X, y)
    sound = linear().fit(small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert broken == -math.inf < sound.score(small_pair.X, small_pair.y)
    np.testing.assert_allclose(line.path_.t_, np.linspace(0, 1, 5))  # still usable


def test_a_geodesic_between_models_with_nan_outputs_names_the_cause(nan_pair):
    a, b, X, _ = nan_pair
    with pytest.raises(ValueError, match="returns NaN on some rows of X"):
        geodesic(max_iter=2).fit(X, model_a=a, model_b=b)


def test_float16_models_whose_logits_overflow_are_reported():
    def big(seed):
        net = make_mlp((4, 8, 3), seed=seed)
        with torch.no_grad():
            net[-1].weight.mul_(3e4)
        return net.half().eval()

    X = torch.ones(16, 4).half()
    X[8:] *= 40.0  # these rows overflow float16
    with pytest.warns(RuntimeWarning, match="float16 overflows above 65504"):
        line = linear().fit(X, model_a=big(1), model_b=big(2))
    assert math.isnan(line.energy_)


# -- an end that does not reproduce its model is reported ------------------------------


class Tempered(nn.Module):
    def __init__(self, seed: int, temperature: float = 1.0):
        super().__init__()
        self.net = make_mlp((5, 8, 3), seed=seed)
        self.temperature = temperature
        self.register_buffer("mask", torch.ones(3, dtype=torch.bool))

    def forward(self, x):
        out = self.net(x) / self.temperature
        return out.masked_fill(~self.mask, -30.0)


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda m: setattr(m, "temperature", 4.0), r"attribute Tempered.temperature \(1.0"),
        (lambda m: m.mask.__setitem__(1, False), "buffer 'mask'"),
        (lambda m: m.net.register_forward_hook(lambda mod, i, o: 2 * o), "the hooks of 'net'"),
    ],
)
def test_an_end_that_does_not_compute_model_b_is_reported(small_pair, change, named):
    a, b = Tempered(1).eval(), Tempered(2).eval()
    change(b)
    with pytest.warns(UserWarning, match=f"last point does not compute what model_b.*{named}"):
        linear().fit(small_pair.X, model_a=a, model_b=b)


def test_ends_that_compute_their_models_give_no_warning(small_pair):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear().fit(small_pair.X, model_a=Tempered(1).eval(), model_b=Tempered(2).eval())


# -- a diverging fit says so ---------------------------------------------------------


def test_a_diverging_fit_warns_and_names_the_learning_rate(digits_pair):
    conn = geodesic(n_points=7, learning_rate_init=1.0, max_iter=6, tol=0.0)
    with pytest.warns(RuntimeWarning, match=r"Lower learning_rate_init \(now 1.0\)"):
        conn.fit(digits_pair.X, model_a=digits_pair.model_a, model_b=digits_pair.model_b)


# -- the divergence must be a divergence ----------------------------------------------


def test_a_custom_divergence_with_negative_values_is_refused(small_pair):
    def negative(p, q):
        return -((p - q) ** 2).sum(-1)

    with pytest.raises(ValueError, match=r"negative value .* must be ≥ 0"):
        geodesic(curve="chain", divergence=negative, max_iter=2).fit(  # a callable: the chain
            small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b
        )


# -- BatchNorm and batches of one sample ------------------------------------------------


def batchnorm_net(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()


@settings(max_examples=8, deadline=None)
@given(n_samples=st.integers(3, 40), batch_size=st.integers(2, 16))
def test_a_loader_that_leaves_one_sample_over_fits_batchnorm_models(n_samples, batch_size):
    X = torch.randn(n_samples, 5, generator=torch.Generator().manual_seed(n_samples))
    loader = DataLoader(TensorDataset(X), batch_size=batch_size)
    a, b = batchnorm_net(1), batchnorm_net(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conn = geodesic(max_iter=2).fit(loader, model_a=a, model_b=b)
    single = n_samples % batch_size == 1
    said = [w for w in caught if "batch of one sample" in str(w.message)]
    assert bool(said) == single
    assert all(torch.isfinite(s).all() for s in conn.path_.batchnorm_buffers.values())


def test_batch_size_1_with_batchnorm_is_refused_naming_batch_size(small_pair):
    with (
        pytest.raises(ValueError, match=r"Set batch_size ≥ 2 \(now 1\)"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        geodesic(batch_size=1, max_iter=2).fit(
            small_pair.X, model_a=batchnorm_net(1), model_b=batchnorm_net(2)
        )


@pytest.mark.parametrize("make", [linear, geodesic])
def test_one_sample_with_batchnorm_is_refused(make, small_pair):
    with pytest.raises(ValueError, match="X has one sample"):
        make().fit(small_pair.X[:1], model_a=batchnorm_net(1), model_b=batchnorm_net(2))


# -- no side effects -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dataset", "shuffled loader"])
def test_a_fit_on_a_dataset_leaves_the_global_torch_rng_alone(small_pair, kind):
    data = TensorDataset(torch.as_tensor(small_pair.X))
    X = data if kind == "dataset" else DataLoader(data, batch_size=16, shuffle=True)
    before = torch.get_rng_state()
    geodesic(max_iter=2).fit(X, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_shuffled_loader_gives_the_same_path_for_the_same_random_state(small_pair):
    loader = DataLoader(TensorDataset(torch.as_tensor(small_pair.X)), batch_size=16, shuffle=True)
    fits = [
        geodesic(max_iter=3).fit(loader, model_a=small_pair.model_a, model_b=small_pair.model_b)
        for _ in range(2)
    ]
    assert torch.equal(fits[0].path_.parameters_vector(), fits[1].path_.parameters_vector())


# -- masked classes and extreme logits ---------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n_classes=st.integers(2, 12),
    name=st.sampled_from(sorted(SPECS)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_every_divergence_is_finite_with_masked_classes(data, n_classes, name, dtype):
    finite = st.floats(-3e4, 3e4, allow_nan=False, width=32)
    rows = st.lists(finite, min_size=n_classes, max_size=n_classes)
    p = torch.tensor([data.draw(rows), data.draw(rows)], dtype=dtype)
    q = torch.tensor([data.draw(rows), data.draw(rows)], dtype=dtype)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n_classes, max_size=n_classes)))
    mask[0] = False  # at least one class stays
    p, q = p.masked_fill(mask, -math.inf), q.masked_fill(mask, -math.inf)
    fn = SPECS[name].pairwise
    p.requires_grad_(True)
    value = fn(p, q)
    (grad,) = torch.autograd.grad(value.sum(), p)
    assert torch.isfinite(value).all() and (value >= 0).all()
    assert torch.isfinite(grad).all()
    assert torch.equal(fn(p.detach(), p.detach()), torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_logits_at_the_float32_limit_give_divergences_not_nan(name):
    big = torch.tensor([[3e38, -3e38, 0.0]])
    value = SPECS[name].pairwise(big, big.flip(-1))
    assert not torch.isnan(value).any() and (value >= 0).all()
    if SPECS[name].upper_bound is not None:  # the bounded ones are finite; the
        assert torch.isfinite(value).all()  # symmetric KL here exceeds float32's range


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fisher_rao_of_undefined_distributions_is_nan_not_zero(bad):
    logits = torch.tensor([[bad, 0.0]])
    assert torch.isnan(fisher_rao(logits, torch.zeros(1, 2))).all()
    assert torch.isnan(fisher_rao_squared(logits, torch.zeros(1, 2))).all()


# -- frozen parameters stay frozen -----------------------------------------------------


def frozen_backbone_pair(same_backbone: bool = True):
    a, b = make_mlp((5, 8, 8, 3), seed=1), make_mlp((5, 8, 8, 3), seed=2)
    if same_backbone:
        b[0].load_state_dict(a[0].state_dict())  # a shared pre-trained first layer
    for net in (a, b):
        net[0].requires_grad_(False)
    return a.eval(), b.eval()


def test_parameters_frozen_in_both_models_stay_at_their_common_value(small_pair):
    a, b = frozen_backbone_pair()
    conn = geodesic(n_points=7, max_iter=4, tol=0.0).fit(small_pair.X, model_a=a, model_b=b)
    for name in ("0.weight", "0.bias"):
        stack = conn.path_.params[name]
        assert torch.equal(stack, stack[:1].expand_as(stack)), name
    moved = conn.path_.params["2.weight"]
    line = linear(n_points=7).fit(small_pair.X, model_a=a, model_b=b).path_.params["2.weight"]
    assert not torch.equal(moved, line)  # the trainable layers did move
    point = conn.path_[3]
    assert not point[0].weight.requires_grad and point[2].weight.requires_grad


def test_the_euclidean_length_counts_trainable_parameters_only(small_pair):
    a, b = frozen_backbone_pair(same_backbone=False)
    with pytest.warns(UserWarning, match="'0.weight' is frozen .* values differ"):
        line = linear().fit(small_pair.X, model_a=a, model_b=b)
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    expected = math.sqrt(
        sum(
            float((dict(a.named_parameters())[n] - dict(b.named_parameters())[n]).square().sum())
            for n in trainable
        )
    )
    assert line.euclidean_length_ == pytest.approx(expected, rel=1e-6)


def test_a_fit_with_every_parameter_frozen_is_refused(small_pair):
    a, b = small_pair.copies()
    a.requires_grad_(False)
    b.requires_grad_(False)
    with pytest.raises(ValueError, match="Every parameter is frozen"):
        geodesic(max_iter=2).fit(small_pair.X, model_a=a, model_b=b)
