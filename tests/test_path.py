"""The path invariants of DESIGN.md, as laws.

Each test states one invariant; where there is an input space (model pairs, number of
points, permutations, loss profiles) it is a hypothesis property test.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_mlp, random_pair
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import Tensor, nn
from torch.nn import functional as F

from geoconnect import GeodesicConnector, LinearConnector, ModelPath
from geoconnect._data import as_data
from geoconnect.distributed import PathGroup, block_bounds
from geoconnect.divergences import (
    fisher_rao,
    fisher_rao_squared,
    hellinger,
    jensen_shannon,
    symmetric_kl,
)
from geoconnect.evaluation import (
    excess_over_chord,
    fisher_rao_length,
    loss_barrier,
    path_statistics,
    segment_divergences,
    segment_squared_norms,
)
from geoconnect.path import Shard

SETTINGS = settings(deadline=None, max_examples=12, derandomize=True)

pair_seeds = st.integers(0, 10_000)
n_points_st = st.integers(2, 6)
scales = st.sampled_from([0.5, 1.0, 3.0])


def logits_of(model: nn.Module, X: np.ndarray) -> torch.Tensor:
    """Eval-mode logits of a copy of ``model`` (the model itself is left alone)."""
    with torch.no_grad():
        return copy.deepcopy(model).eval()(torch.as_tensor(X, dtype=torch.float32))


def rms_fisher_rao(model_a: nn.Module, model_b: nn.Module, X: np.ndarray) -> float:
    """√(E_x d_FR(p_a(x), p_b(x))²): the length of the shortest possible path."""
    d = fisher_rao(logits_of(model_a, X).double(), logits_of(model_b, X).double())
    return float(d.square().mean().sqrt())


def fit_geodesic(pair, n_points: int, **kwargs) -> GeodesicConnector:
    params = {"max_iter": 5, "device": "cpu", "random_state": 0, **kwargs}
    return GeodesicConnector(n_points=n_points, **params).fit(
        pair.X, model_a=pair.model_a, model_b=pair.model_b
    )


def fit_linear(pair, n_points: int) -> LinearConnector:
    return LinearConnector(n_points=n_points, device="cpu").fit(
        pair.X, model_a=pair.model_a, model_b=pair.model_b
    )


def segment_fisher_rao_sq(path: ModelPath, X: np.ndarray) -> np.ndarray:
    data = as_data(X, device=path.device)
    return path_statistics(path, data).segment_fisher_rao_sq


# -- the ends ------------------------------------------------------------------------


@SETTINGS
@given(seed=pair_seeds, n_points=n_points_st, geodesic=st.booleans())
def test_ends_of_the_path_compute_what_the_given_models_compute(seed, n_points, geodesic):
    pair = random_pair(seed=seed)
    conn = fit_geodesic(pair, n_points) if geodesic else fit_linear(pair, n_points)
    x = torch.as_tensor(pair.X)
    with torch.no_grad():
        first, last = conn.path_[0](x), conn.path_[-1](x)
        stacked = conn.path_.logits(x)
    torch.testing.assert_close(first, logits_of(pair.model_a, pair.X))
    torch.testing.assert_close(last, logits_of(pair.model_b, pair.X))
    torch.testing.assert_close(stacked[0], logits_of(pair.model_a, pair.X))
    torch.testing.assert_close(stacked[-1], logits_of(pair.model_b, pair.X))


def test_ends_of_a_batchnorm_path_keep_their_own_statistics():
    def net(seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))

    a, b = net(0), net(1)
    X = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    for model in (a, b):  # give each end running statistics of its own
        model.train()
        with torch.no_grad():
            model(torch.as_tensor(X) * 2 + 1)
        model.eval()
    conn = GeodesicConnector(n_points=4, max_iter=3, device="cpu", random_state=0)
    conn.fit(X, model_a=a, model_b=b)
    with torch.no_grad():
        torch.testing.assert_close(conn.path_[0](torch.as_tensor(X)), a(torch.as_tensor(X)))
        torch.testing.assert_close(conn.path_[-1](torch.as_tensor(X)), b(torch.as_tensor(X)))


# -- the inputs are left alone -------------------------------------------------------


class _Net(nn.Module):
    """BatchNorm, dropout and a frozen layer: every kind of state fit could touch."""

    def __init__(self, seed: int):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
            self.drop = nn.Dropout(0.5)
            self.head = nn.Linear(8, 3)
        self.head.bias.requires_grad_(False)

    def forward(self, x):
        return self.head(self.drop(self.body(x)))


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grad": {k: p.grad for k, p in model.named_parameters()},
        "device": {k: p.device for k, p in model.named_parameters()},
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), f"{key} changed"
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert all(g is None for g in after["grad"].values())
    assert before["device"] == after["device"]


@SETTINGS
@given(seed=pair_seeds, train_mode=st.booleans(), geodesic=st.booleans())
def test_fit_leaves_the_input_modules_and_data_unchanged(seed, train_mode, geodesic):
    a, b = _Net(2 * seed), _Net(2 * seed + 1)
    a.train(train_mode)
    b.train(not train_mode)
    X = np.random.default_rng(seed).standard_normal((32, 4)).astype(np.float32)
    X_before = X.copy()
    before_a, before_b = _snapshot(a), _snapshot(b)
    if geodesic:
        conn = GeodesicConnector(n_points=4, max_iter=2, device="cpu", random_state=seed)
    else:
        conn = LinearConnector(n_points=4, device="cpu")
    conn.fit(X, model_a=a, model_b=b)
    conn.evaluate(X, np.zeros(32, dtype=int))
    conn.predict_proba(X)
    _assert_same(before_a, _snapshot(a))
    _assert_same(before_b, _snapshot(b))
    np.testing.assert_array_equal(X, X_before)
    # The path holds copies: changing the user's model later does not move the path.
    with torch.no_grad():
        a.head.weight.add_(1.0)
    assert not torch.equal(conn.path_.params["head.weight"][0], a.head.weight)


# -- lengths -------------------------------------------------------------------------


@SETTINGS
@given(seed=pair_seeds, n_points=n_points_st, scale=scales, geodesic=st.booleans())
def test_length_is_at_least_the_direct_fisher_rao_distance(seed, n_points, scale, geodesic):
    pair = random_pair(seed=seed, scale=scale)
    conn = fit_geodesic(pair, n_points) if geodesic else fit_linear(pair, n_points)
    direct = rms_fisher_rao(pair.model_a, pair.model_b, pair.X)
    assert conn.length_ >= direct - 1e-6


@SETTINGS
@given(seed=pair_seeds, n_points=st.integers(2, 9), scale=scales)
def test_refining_a_linear_path_never_shortens_it(seed, n_points, scale):
    pair = random_pair(seed=seed, scale=scale)
    coarse = ModelPath.linear(pair.model_a, pair.model_b, n_points)
    fine = ModelPath.linear(pair.model_a, pair.model_b, 2 * n_points - 1)
    # The fine path contains the coarse one's points.
    torch.testing.assert_close(fine.parameters_vector()[::2], coarse.parameters_vector())
    coarse_length = fisher_rao_length(segment_fisher_rao_sq(coarse, pair.X))
    fine_length = fisher_rao_length(segment_fisher_rao_sq(fine, pair.X))
    assert fine_length >= coarse_length - 1e-9


@SETTINGS
@given(seed=pair_seeds, n_points=n_points_st, scale=scales, fitted=st.booleans())
def test_fisher_rao_energy_bounds_squared_length_over_segments(seed, n_points, scale, fitted):
    pair = random_pair(seed=seed, scale=scale)
    if fitted:
        conn = fit_geodesic(pair, n_points, divergence="fisher_rao")
    else:
        conn = fit_linear(pair, n_points)
    steps = segment_fisher_rao_sq(conn.path_, pair.X)
    energy = float(np.sum(steps))
    if fitted:  # energy_ is the fitted path's energy, in d_FR² units here
        assert conn.energy_ == pytest.approx(energy, rel=1e-9, abs=1e-12)
    bound = conn.chord_length_**2 / (n_points - 1)
    assert energy >= bound - 1e-9
    # The gap is the spread of the segments' speeds: zero only at constant speed.
    speeds = np.sqrt(steps)
    gap = float(np.sum((speeds - speeds.mean()) ** 2))
    assert energy - bound == pytest.approx(gap, rel=1e-6, abs=1e-9)


def test_fisher_rao_energy_equals_squared_length_over_segments_at_constant_speed(digits_pair):
    line = fit_linear(digits_pair, 7)
    geodesic = GeodesicConnector(
        n_points=7, divergence="fisher_rao", max_iter=40, device="cpu", random_state=0
    ).fit(digits_pair.X, model_a=digits_pair.model_a, model_b=digits_pair.model_b)

    def relative_gap(conn):
        energy = float(np.sum(segment_fisher_rao_sq(conn.path_, digits_pair.X)))
        return energy / (conn.chord_length_**2 / 6) - 1

    # The line moves at uneven speed through distribution space; the minimiser of
    # the energy moves at (nearly) constant speed, where the bound is an equality.
    assert relative_gap(line) > 0.05
    assert relative_gap(geodesic) < 0.02
    assert relative_gap(geodesic) < relative_gap(line) / 5


def test_a_two_point_path_meets_the_energy_bound_with_equality(small_pair):
    conn = fit_linear(small_pair, 2)
    energy = float(np.sum(segment_fisher_rao_sq(conn.path_, small_pair.X)))
    assert energy == pytest.approx(conn.chord_length_**2, rel=1e-9)


def test_geodesic_is_no_longer_than_the_line_on_trained_models(digits_pair):
    line = fit_linear(digits_pair, 9)
    geodesic = fit_geodesic(digits_pair, 9, max_iter=20)
    assert geodesic.length_ <= line.length_
    assert geodesic.length_ >= rms_fisher_rao(
        digits_pair.model_a, digits_pair.model_b, digits_pair.X
    )


@SETTINGS
@given(seed=pair_seeds, n_points=st.integers(3, 6), scale=scales)
def test_geodesic_is_no_longer_than_the_line(seed, n_points, scale):
    pair = random_pair(seed=seed, scale=scale)
    line = fit_linear(pair, n_points)
    geodesic = fit_geodesic(pair, n_points, max_iter=10)
    assert geodesic.length_ <= line.length_ + 1e-9


# -- symmetry of hidden units -------------------------------------------------------


def permute_hidden_units(model: nn.Sequential, perm: list[int]) -> nn.Sequential:
    """The same function with the first hidden layer's units in another order."""
    permuted = copy.deepcopy(model)
    index = torch.as_tensor(perm)
    with torch.no_grad():
        permuted[0].weight.copy_(model[0].weight[index])
        permuted[0].bias.copy_(model[0].bias[index])
        permuted[2].weight.copy_(model[2].weight[:, index])
    return permuted


@SETTINGS
@given(seed=pair_seeds, perm=st.permutations(list(range(8))))
def test_permuting_hidden_units_leaves_every_divergence_unchanged(seed, perm):
    a = random_mlp((5, 8, 3), 2 * seed)
    b = random_mlp((5, 8, 3), 2 * seed + 1)
    b_perm = permute_hidden_units(b, perm)
    X = np.random.default_rng(seed).standard_normal((30, 5)).astype(np.float32)
    torch.testing.assert_close(logits_of(b_perm, X), logits_of(b, X))
    la, lb, lp = logits_of(a, X), logits_of(b, X), logits_of(b_perm, X)
    for divergence in (jensen_shannon, fisher_rao, fisher_rao_squared, hellinger, symmetric_kl):
        torch.testing.assert_close(divergence(la, lp), divergence(la, lb))
        torch.testing.assert_close(divergence(lp, la), divergence(lb, la))
    # ...and so the shortest-path bound and a 2-point path's chord, too (the line
    # between a and the permuted b is another path, so its length may differ).
    assert rms_fisher_rao(a, b_perm, X) == pytest.approx(rms_fisher_rao(a, b, X), rel=1e-5)
    assert fit_linear_models(a, b_perm, X).chord_length_ == pytest.approx(
        fit_linear_models(a, b, X).chord_length_, rel=1e-5
    )


def fit_linear_models(a, b, X) -> LinearConnector:
    return LinearConnector(n_points=2, device="cpu").fit(X, model_a=a, model_b=b)


# -- barriers ----------------------------------------------------------------------------


profiles = arrays(
    np.float64, st.integers(2, 30), elements=st.floats(0, 10, allow_nan=False, width=32)
)


@settings(deadline=None, max_examples=60)
@given(loss=profiles)
def test_barrier_is_never_negative(loss):
    assert loss_barrier(loss) >= 0.0


@settings(deadline=None, max_examples=60)
@given(loss=profiles)
def test_the_barrier_is_the_largest_excess_over_the_chord_at_a_point_it_names(loss):
    excess = excess_over_chord(loss)
    assert excess[0] == 0.0 and abs(excess[-1]) < 1e-12
    worst = int(np.argmax(excess))
    assert loss_barrier(loss) == pytest.approx(max(0.0, excess[worst]), abs=1e-12)


@settings(deadline=None, max_examples=60)
@given(start=st.floats(0, 10), end=st.floats(0, 10), n_points=st.integers(2, 30))
def test_a_profile_on_the_chord_between_the_ends_has_no_barrier(start, end, n_points):
    t = np.linspace(0.0, 1.0, n_points)
    assert loss_barrier((1 - t) * start + t * end) == pytest.approx(0.0, abs=1e-12)


@SETTINGS
@given(seed=pair_seeds)
def test_a_path_of_just_the_ends_has_no_barrier(seed):
    pair = random_pair(seed=seed)
    evaluation = fit_linear(pair, 2).evaluate(pair.X, pair.y)
    assert evaluation.barrier == 0.0
    assert evaluation.accuracy_barrier == 0.0


def test_barriers_of_a_fitted_path_are_not_negative(digits_pair):
    evaluation = fit_linear(digits_pair, 9).evaluate(digits_pair.X_test, digits_pair.y_test)
    assert evaluation.barrier > 0.0  # trained MLPs from two seeds: the line crosses one
    assert evaluation.accuracy_barrier >= 0.0


# -- positions along the path ------------------------------------------------------------


def test_at_the_points_positions_returns_the_points(small_pair):
    conn = fit_geodesic(small_pair, 5)
    path = conn.path_
    assert path.t_[0] == 0.0 and path.t_[-1] == 1.0
    assert np.all(np.diff(path.t_) >= 0)
    x = torch.as_tensor(small_pair.X)
    with torch.no_grad():
        for i, t in enumerate(path.t_):
            torch.testing.assert_close(path.at(float(t))(x), path[i](x))


def test_at_interpolates_parameters_between_neighbouring_points(small_pair):
    path = fit_geodesic(small_pair, 4).path_
    t = 0.5 * (path.t_[1] + path.t_[2])
    module = path.at(float(t))
    expected = 0.5 * (path.params["0.weight"][1] + path.params["0.weight"][2])
    torch.testing.assert_close(module[0].weight.detach(), expected)


def test_path_points_are_fresh_modules_in_eval_mode(small_pair):
    path = fit_linear(small_pair, 3).path_
    point = path[1]
    assert not point.training
    with torch.no_grad():
        point[0].weight.add_(1.0)
    assert not torch.equal(path[1][0].weight, point[0].weight)
    assert path.parameters_vector().shape == (3, path.n_params)


# -- evaluation strategies ---------------------------------------------------------


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_every_evaluation_strategy_gives_the_same_logits_and_gradients(strategy):
    from geoconnect.models import make_cnn

    path = ModelPath.linear(make_cnn(seed=1), make_cnn(seed=2), 7)
    module = path.batch_statistics_module()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def logits_and_grads(name: str) -> tuple[Tensor, list[Tensor]]:
        path.strategy = name
        interior = {k: v[1:-1].clone().requires_grad_(True) for k, v in path.params.items()}
        out = path.functional_forward(interior, x, module=module)
        out.square().sum().backward()
        return out.detach(), [v.grad for v in interior.values()]

    reference, reference_grads = logits_and_grads("loop")
    out, grads = logits_and_grads(strategy)
    assert out.shape == (5, 16, 10)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_tied_weights_stay_tied_at_every_point(strategy):
    class Tied(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.encode = nn.Linear(4, 4, bias=False)
            self.decode = nn.Linear(4, 4, bias=False)
            self.decode.weight = self.encode.weight

        def forward(self, x):
            return self.decode(torch.tanh(self.encode(x)))

    path = ModelPath.linear(Tied(1), Tied(2), 5)
    path.strategy = strategy
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    weights = path.params["encode.weight"]
    expected = torch.stack([torch.tanh(x @ w.T) @ w.T for w in weights])
    torch.testing.assert_close(path.logits(x), expected)


def test_a_path_refuses_an_unknown_strategy():
    path = ModelPath.linear(nn.Linear(2, 2), nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match=r"strategy must be one of \['vmap', 'loop'\]"):
        path.strategy = "fast"


def test_the_strategy_rule_uses_the_loop_for_batchnorm_and_vmap_for_dense_layers(small_pair):
    from geoconnect.fitting import choose_strategy
    from geoconnect.models import make_cnn

    x = torch.as_tensor(small_pair.X[:8], dtype=torch.float32)
    mlp = ModelPath.linear(small_pair.model_a, small_pair.model_b, 11)
    assert choose_strategy(mlp, x) == "vmap"
    cnn = ModelPath.linear(make_cnn(seed=1), make_cnn(seed=2), 5)
    assert choose_strategy(cnn, torch.zeros(4, 1, 8, 8)) == "loop"


def test_the_strategy_rule_uses_the_loop_where_vmap_cannot_trace_the_model():
    class Branchy(nn.Module):  # control flow on a parameter's value: vmap refuses it
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return self.linear(x) if self.linear.weight.sum() > 0 else -self.linear(x)

    from geoconnect.fitting import choose_strategy

    path = ModelPath.linear(Branchy(), Branchy(), 4)
    assert choose_strategy(path, torch.ones(2, 3)) == "loop"


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), n_points=st.integers(2, 11))
def test_path_statistics_equal_the_whole_path_evaluated_at_once(seed, n_points):
    # path_statistics works through the points a few at a time; nothing may change.
    pair = random_pair(seed=seed)
    path = ModelPath.linear(pair.model_a, pair.model_b, n_points)
    stats = path_statistics(
        path,
        as_data(pair.X, pair.y, device=torch.device("cpu")),
        batch_size=len(pair.X),  # one batch: the logits are bit for bit those below
        divergence=jensen_shannon,
    )
    x, y = torch.as_tensor(pair.X), torch.as_tensor(pair.y)
    logits = path.logits(x).double()
    expected_fr = segment_divergences(logits, fisher_rao_squared).mean(1)
    expected_js = segment_divergences(logits, jensen_shannon).mean(1)
    loss = torch.stack([F.cross_entropy(z, y) for z in logits])
    accuracy = (logits.argmax(-1) == y).double().mean(1)
    np.testing.assert_allclose(
        stats.segment_fisher_rao_sq, expected_fr.numpy(), rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(stats.segment_costs, expected_js.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.loss, loss.numpy(), rtol=1e-9)
    np.testing.assert_allclose(stats.accuracy, accuracy.numpy())


@settings(deadline=None, max_examples=40)
@given(
    n_points=st.integers(1, 12),  # one point: no segment
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_segment_squared_norms_are_each_segments_squared_distance(n_points, shape, seed):
    stack = torch.randn(n_points, *shape, generator=torch.Generator().manual_seed(seed))
    direct = (stack[1:] - stack[:-1]).double().reshape(n_points - 1, stack[0].numel())
    direct = direct.square().sum(1)
    torch.testing.assert_close(
        segment_squared_norms({"w": stack, "frozen": stack}, frozen=["frozen"]),
        direct,
        rtol=1e-12,
        atol=0,
    )
    assert segment_squared_norms({"w": stack}, frozen=["w"]) is None


@given(n_points=st.integers(3, 12), world_size=st.integers(1, 4), rank=st.integers(0, 3))
def test_a_rank_keeps_copies_of_the_ends_and_its_block(n_points, world_size, rank):
    rank = rank % world_size
    path = ModelPath.linear(nn.Linear(3, 2), nn.Linear(3, 2), n_points)
    shard = PathGroup(rank=rank, world_size=world_size).keep_block(path)
    start, stop = block_bounds(n_points - 2, world_size)[rank]
    assert shard.shard == Shard(start, stop, n_points, rank, world_size)
    assert shard.shard.points == [0, *range(start + 1, stop + 1), n_points - 1]
    assert shard.n_points == stop - start + 2 and shard.whole_points == n_points
    assert torch.equal(shard.parameters_vector(), path.parameters_vector()[shard.shard.points])
    shard.params["weight"].zero_()  # copies: the whole path is not moved
    assert path.params["weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="whole path"):
        PathGroup(rank=0, world_size=1).keep_block(shard)


def test_a_path_takes_anothers_points_and_gives_them_back():
    path = ModelPath.linear(nn.Linear(3, 2), nn.Linear(3, 2), 7)
    whole = path.select(range(7))
    path.take_points(PathGroup(rank=1, world_size=2).keep_block(path))
    assert (path.n_points, path.whole_points, len(path.t_)) == (4, 7, 4)
    path.take_points(whole)
    assert path.shard is None and path.n_points == 7
    assert torch.equal(path.parameters_vector(), whole.parameters_vector())
    with pytest.raises(ValueError, match="architecture"):
        path.take_points(
            ModelPath.linear(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False), 3)
        )
