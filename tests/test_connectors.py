"""What the connectors do: fitting, early stopping, state, prediction, evaluation."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch
from conftest import random_pair
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from geoconnect import GeodesicConnector, LinearConnector, PathEvaluation
from geoconnect._data import Batch, as_data
from geoconnect.divergences import SPECS, fisher_rao_squared, jensen_shannon
from geoconnect.evaluation import (
    arc_length_positions,
    path_length,
    path_statistics,
    segment_divergences,
)
from geoconnect.fitting import POINTS_PER_CHUNK, FitSettings, FitState, train_step
from geoconnect.path import ModelPath


def fit_geodesic(pair, **params):
    params = {"n_points": 5, "max_iter": 5, "device": "cpu", "random_state": 0, **params}
    return GeodesicConnector(**params).fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)


def fit_linear(pair, n_points=5, X="fit"):
    X = pair.X if isinstance(X, str) else X
    return LinearConnector(n_points=n_points, device="cpu").fit(
        X, model_a=pair.model_a, model_b=pair.model_b
    )


# -- the method works --------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_paths(digits_pair):
    line = fit_linear(digits_pair, n_points=9)
    geodesic = fit_geodesic(digits_pair, n_points=9, max_iter=30)
    return line, geodesic


def test_geodesic_lowers_the_loss_barrier_of_trained_networks(digits_pair, digits_paths):
    line, geodesic = digits_paths
    test = (digits_pair.X_test, digits_pair.y_test)
    line_eval, geodesic_eval = line.evaluate(*test), geodesic.evaluate(*test)
    assert line_eval.barrier > 0.2  # two seeds: the straight line crosses a barrier
    assert geodesic_eval.barrier <= line_eval.barrier / 10
    worse_end = min(geodesic_eval.accuracy[0], geodesic_eval.accuracy[-1])
    assert geodesic_eval.min_accuracy >= worse_end - 0.03
    assert line_eval.min_accuracy < worse_end - 0.03


def test_geodesic_energy_falls_while_fitting(digits_paths):
    _, geodesic = digits_paths  # the default: the continuous curve
    energy, length = geodesic.history_["energy"], geodesic.history_["length"]
    assert energy[-1] < energy[0]
    assert length[-1] < length[0]


def test_the_default_energy_is_the_jensen_shannon_sum(digits_pair, digits_paths):
    line, geodesic = digits_paths
    x = torch.as_tensor(digits_pair.X)
    for conn in (line, geodesic):
        with torch.no_grad():
            logits = conn.path_.logits(x).double()
        expected = float(jensen_shannon(logits[:-1], logits[1:]).mean(1).sum())
        assert conn.energy_ == pytest.approx(expected, rel=1e-6)


def test_points_positions_are_their_arc_length_fractions(digits_pair, digits_paths):
    line, geodesic = digits_paths
    data = as_data(digits_pair.X, device=torch.device("cpu"))
    for conn in (line, geodesic):
        t = conn.path_.t_
        assert t[0] == 0.0 and t[-1] == 1.0 and np.all(np.diff(t) >= 0)
        np.testing.assert_allclose(t, path_length(conn.path_, data).positions, atol=1e-9)

    # The line's chords are uneven in distribution space; the geodesic's nearly even.
    def chord_unevenness(conn):
        chords = arc_length_positions(path_statistics(conn.path_, data).segment_fisher_rao_sq)
        return np.abs(chords - np.linspace(0, 1, 9)).max()

    assert chord_unevenness(geodesic) < chord_unevenness(line)


# -- fitting -------------------------------------------------------------------------


def test_history_has_one_record_per_epoch(small_pair):
    conn = fit_geodesic(small_pair, curve="chain", max_iter=4)
    assert conn.n_iter_ == 4
    assert {"energy", "chord_length", "euclidean_length", "n_points", "seconds"} <= set(
        conn.history_
    )
    assert all(len(values) == 4 for values in conn.history_.values())
    assert all(seconds > 0 for seconds in conn.history_["seconds"])
    assert conn.history_["euclidean_length"][-1] == pytest.approx(conn.euclidean_length_)


def test_fit_stops_after_n_iter_no_change_epochs_without_improvement(small_pair):
    conn = fit_geodesic(small_pair, max_iter=50, tol=0.999, n_iter_no_change=3)
    # The first epoch improves on nothing-yet; the next three cannot cut it by 99.9 %.
    assert conn.n_iter_ == 4
    assert len(conn.history_["energy"]) == 4


def test_fit_runs_max_iter_epochs_while_it_improves(small_pair):
    conn = fit_geodesic(small_pair, max_iter=6, tol=0.0, n_iter_no_change=6)
    assert conn.n_iter_ == 6


@pytest.mark.parametrize("divergence", list(SPECS))
def test_every_divergence_shortens_the_path(divergence, digits_pair):
    line = fit_linear(digits_pair, n_points=5)
    conn = fit_geodesic(digits_pair, divergence=divergence, max_iter=8)
    assert conn.length_ < line.length_


def test_a_custom_divergence_is_used(small_pair):
    calls = []

    def squared_logit_gap(p, q):
        calls.append(p.shape)
        return (torch.log_softmax(p, -1) - torch.log_softmax(q, -1)).square().sum(-1)

    conn = fit_geodesic(small_pair, curve="chain", divergence=squared_logit_gap, max_iter=2)
    assert calls
    x = torch.as_tensor(small_pair.X)
    with torch.no_grad():
        logits = conn.path_.logits(x)
    expected = float(squared_logit_gap(logits[:-1], logits[1:]).double().mean(1).sum())
    assert conn.energy_ == pytest.approx(expected, rel=1e-5)


def test_sgd_is_available_with_the_papers_settings(digits_pair):
    conn = fit_geodesic(digits_pair, solver="sgd", learning_rate_init=0.1, max_iter=3)
    assert conn.n_iter_ == 3
    assert np.isfinite(conn.energy_)


def test_mixed_precision_finds_the_same_path_quality_as_float32(digits_pair, digits_paths):
    line, _ = digits_paths
    chain = {"curve": "chain", "n_points": 9, "max_iter": 30}  # mixed precision: the chain's
    geodesic = fit_geodesic(digits_pair, **chain)
    mixed = fit_geodesic(digits_pair, mixed_precision=True, **chain)
    test = (digits_pair.X_test, digits_pair.y_test)
    barrier = mixed.evaluate(*test).barrier
    assert barrier <= line.evaluate(*test).barrier / 10
    assert barrier == pytest.approx(geodesic.evaluate(*test).barrier, abs=0.01)
    assert mixed.length_ == pytest.approx(geodesic.length_, rel=0.1)
    for name, stack in mixed.path_.params.items():
        assert stack.dtype == torch.float32, name  # the path itself stays in float32


def test_mixed_precision_runs_the_networks_in_bfloat16(small_pair):
    seen = []

    class Recording(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            seen.append(out.dtype)
            return out

    a, b = Recording(small_pair.model_a), Recording(small_pair.model_b)
    seen.clear()
    GeodesicConnector(
        curve="chain", n_points=4, max_iter=1, device="cpu", mixed_precision=True
    ).fit(small_pair.X, model_a=a, model_b=b)
    assert torch.bfloat16 in seen  # the fit's steps
    assert torch.float32 in seen  # the ends, the evaluation of the path


def test_a_two_point_geodesic_is_the_pair_itself(small_pair):
    conn = fit_geodesic(small_pair, curve="chain", n_points=2)
    assert len(conn.path_) == 2
    assert conn.n_iter_ == 0
    assert conn.length_ == pytest.approx(fit_linear(small_pair, n_points=2).length_)


def test_verbose_2_prints_a_line_per_epoch(small_pair, capsys):
    fit_geodesic(small_pair, curve="chain", max_iter=3, verbose=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3
    assert all("energy" in line and "chord length" in line for line in lines)


def test_verbose_1_shows_a_progress_bar_with_energy_and_length(small_pair, capsys):
    fit_geodesic(small_pair, max_iter=3, verbose=1)
    err = capsys.readouterr().err
    assert "energy=" in err and "length=" in err


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_verbose_0_is_silent(small_pair, capsys):
    fit_geodesic(small_pair, max_iter=2)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_linear_fit_without_x_has_no_fisher_rao_length(small_pair):
    conn = fit_linear(small_pair, X=None)
    assert conn.length_ is None and conn.energy_ is None
    assert conn.euclidean_length_ > 0
    proba = conn.predict_proba(small_pair.X)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert conn.predict(small_pair.X).shape == (40,)


def test_the_linear_path_is_the_straight_line(small_pair):
    path = fit_linear(small_pair, n_points=5).path_
    theta = path.parameters_vector().double()
    t = torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]
    torch.testing.assert_close(theta, (1 - t) * theta[0] + t * theta[-1], rtol=1e-6, atol=1e-6)


# -- one optimisation step ------------------------------------------------------------


def _step_inputs(n_points, strategy, batchnorm, seed):
    """A path with a perturbed interior, its fitting module, and one batch."""
    gen = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)]
    nets = []
    for _ in range(2):
        net = nn.Sequential(*copy.deepcopy(layers if batchnorm else layers[:1] + layers[2:]))
        with torch.no_grad():
            for param in net.parameters():
                param.copy_(torch.randn(param.shape, generator=gen))
        nets.append(net.double().eval())
    path = ModelPath.linear(*nets, n_points)
    with torch.no_grad():
        for stack in path.params.values():
            stack[1:-1] += 0.3 * torch.randn(stack[1:-1].shape, generator=gen, dtype=stack.dtype)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    data = as_data(x, device=torch.device("cpu"), dtype=torch.float64)
    state = FitState.start(path, data, jensen_shannon, FitSettings(strategy=strategy))
    state.begin_level()
    return state, Batch(x, None, None)  # no row index: the ends are evaluated afresh


@settings(max_examples=20, deadline=None, database=None)
@given(
    n_points=st.integers(3, 3 * POINTS_PER_CHUNK + 2),
    strategy=st.sampled_from(["loop", "vmap"]),
    batchnorm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_chunked_step_is_the_gradient_of_the_whole_batch_energy(
    n_points, strategy, batchnorm, seed
):
    state, batch = _step_inputs(n_points, strategy, batchnorm, seed)
    path, module = state.path, state.module
    leaves = {k: v[1:-1].clone().requires_grad_(True) for k, v in path.params.items()}
    ends = path.logits(batch.x, points=[0, -1])
    logits = torch.cat(
        [ends[:1], path.functional_forward(leaves, batch.x, module=module), ends[1:]]
    )
    values = segment_divergences(logits, jensen_shannon)
    values.mean(1).sum().backward()

    costs, fr = train_step(state, batch)
    for name, tensor in state.interior.items():
        torch.testing.assert_close(tensor.grad, leaves[name].grad, msg=name)
    torch.testing.assert_close(costs, values.detach().sum(1))
    want_fr = segment_divergences(logits.detach(), fisher_rao_squared).sum(1)
    torch.testing.assert_close(fr, want_fr)


def test_a_step_holds_at_most_two_chunks_of_activations_whatever_the_points():
    n_points = 3 * POINTS_PER_CHUNK + 2
    state, batch = _step_inputs(n_points, "loop", batchnorm=False, seed=0)
    path, module = state.path, state.module
    live, peak = [0], [0]

    class Held:  # a saved activation of the hidden layer (width 7), counted while held
        def __init__(self, tensor):
            self.tensor = tensor
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            weakref.finalize(self, lambda: live.__setitem__(0, live[0] - 1))

    def pack(tensor):
        return Held(tensor) if tensor.shape[-1] == 7 else tensor

    def unpack(saved):
        return saved.tensor if isinstance(saved, Held) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        one = {k: v[:1].clone().requires_grad_(True) for k, v in path.params.items()}
        path.functional_forward(one, batch.x, module=module)
        per_network = peak[0]
        live[0] = peak[0] = 0
        train_step(state, batch)
    assert per_network > 0
    assert peak[0] == 2 * POINTS_PER_CHUNK * per_network < (n_points - 2) * per_network
    assert live[0] == 0


# -- models with state ---------------------------------------------------------------


def batchnorm_net(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    net.train()
    with torch.no_grad():
        net(torch.randn(64, 4, generator=torch.Generator().manual_seed(seed)) * 3 + seed)
    return net.eval()


@pytest.fixture
def batchnorm_pair():
    pair = random_pair((4, 8, 3), n_samples=64)
    pair.model_a, pair.model_b = batchnorm_net(1), batchnorm_net(2)
    return pair


@pytest.mark.parametrize("geodesic", [False, True], ids=["linear", "geodesic"])
def test_interior_batchnorm_statistics_are_recomputed_on_x(geodesic, batchnorm_pair):
    conn = fit_geodesic(batchnorm_pair) if geodesic else fit_linear(batchnorm_pair)
    path = conn.path_
    loader = DataLoader(TensorDataset(torch.as_tensor(batchnorm_pair.X)), batch_size=256)
    for i in range(1, len(path) - 1):
        reference = path[i]
        update_bn(loader, reference)  # what torch's SWA utilities compute
        point = path[i]
        torch.testing.assert_close(point[1].running_mean, reference[1].running_mean)
        torch.testing.assert_close(point[1].running_var, reference[1].running_var)
    # The ends keep their own statistics.
    torch.testing.assert_close(path[0][1].running_mean, batchnorm_pair.model_a[1].running_mean)
    torch.testing.assert_close(path[-1][1].running_mean, batchnorm_pair.model_b[1].running_mean)


def test_linear_fit_of_batchnorm_models_without_x_asks_for_x(batchnorm_pair):
    with pytest.raises(ValueError, match=r"BatchNorm.*pass X to LinearConnector\.fit"):
        fit_linear(batchnorm_pair, X=None)


def test_dropout_is_off_during_fit():
    pair = random_pair((5, 8, 3), seed=3)

    def with_dropout(model):
        layers = list(copy.deepcopy(model))
        return nn.Sequential(layers[0], layers[1], nn.Dropout(0.9), layers[2])

    def without_dropout(model):
        layers = list(copy.deepcopy(model))
        return nn.Sequential(layers[0], layers[1], nn.Identity(), layers[2])

    fits = []
    for wrap in (with_dropout, without_dropout):
        conn = GeodesicConnector(n_points=4, max_iter=3, device="cpu", random_state=0)
        fits.append(conn.fit(pair.X, model_a=wrap(pair.model_a), model_b=wrap(pair.model_b)))
    # Everything but the wall-clock seconds per epoch.
    assert without_seconds(fits[0].history_) == without_seconds(fits[1].history_)
    torch.testing.assert_close(fits[0].path_.parameters_vector(), fits[1].path_.parameters_vector())


def test_non_batchnorm_buffers_come_from_model_a(small_pair):
    a, b = small_pair.copies()
    a.register_buffer("scale", torch.tensor(2.0))
    b.register_buffer("scale", torch.tensor(5.0))
    with pytest.warns(UserWarning, match="Buffer 'scale' differs between model_a and model_b"):
        path = fit_linear(small_pair.__class__(a, b, small_pair.X, small_pair.y), n_points=3).path_
    assert all(float(point.scale) == 2.0 for point in path)


# -- using a fitted path -------------------------------------------------------------


@pytest.fixture
def fitted(small_pair):
    return fit_geodesic(small_pair, n_points=4), small_pair


def test_predict_proba_is_the_mean_of_the_points_probabilities(fitted):
    conn, pair = fitted
    x = torch.as_tensor(pair.X)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(p(x).double(), -1) for p in conn.path_]).mean(0)
    proba = conn.predict_proba(pair.X)
    np.testing.assert_allclose(proba, expected.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(conn.predict(pair.X), proba.argmax(1))


def test_transform_puts_every_points_probabilities_side_by_side(fitted):
    conn, pair = fitted
    out = conn.transform(pair.X)
    names = conn.get_feature_names_out()
    assert out.shape == (40, 4 * 3) == (40, len(names))
    assert names[3 * 2 + 1] == "point2_class1"
    x = torch.as_tensor(pair.X)
    with torch.no_grad():
        point2 = torch.softmax(conn.path_[2](x).double(), -1).numpy()
    np.testing.assert_allclose(out[:, 6:9], point2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.reshape(40, 4, 3).mean(1), conn.predict_proba(pair.X), atol=1e-7)


def test_evaluate_reports_every_point_and_score_is_minus_the_barrier(fitted):
    conn, pair = fitted
    evaluation = conn.evaluate(pair.X, pair.y)
    assert isinstance(evaluation, PathEvaluation)
    assert evaluation.loss.shape == evaluation.accuracy.shape == evaluation.t.shape == (4,)
    x = torch.as_tensor(pair.X)
    y = torch.as_tensor(pair.y)
    with torch.no_grad():
        losses = [float(nn.functional.cross_entropy(p(x), y)) for p in conn.path_]
    np.testing.assert_allclose(evaluation.loss, losses, rtol=1e-5)
    assert evaluation.length == pytest.approx(conn.length_)
    assert evaluation.euclidean_length == pytest.approx(conn.euclidean_length_)
    assert conn.score(pair.X, pair.y) == -evaluation.barrier


def test_evaluate_on_a_loader_of_pairs_matches_arrays(fitted):
    conn, pair = fitted
    loader = DataLoader(
        TensorDataset(torch.as_tensor(pair.X), torch.as_tensor(pair.y)), batch_size=7
    )
    from_loader, from_arrays = conn.evaluate(loader), conn.evaluate(pair.X, pair.y)
    np.testing.assert_allclose(from_loader.loss, from_arrays.loss, rtol=1e-5)
    np.testing.assert_allclose(from_loader.accuracy, from_arrays.accuracy)


# -- fitting without models -------------------------------------------------------------


def test_without_models_fit_trains_two_from_different_seeds(digits):
    X, y = digits.X_train[:400], digits.y_train[:400]
    conn = GeodesicConnector(n_points=5, max_iter=5, device="cpu", random_state=0).fit(X, y)
    ends = conn.path_.parameters_vector()[[0, -1]]
    assert not torch.allclose(ends[0], ends[1])
    accuracy = conn.evaluate(digits.X_test, digits.y_test).accuracy
    assert accuracy[0] > 0.8 and accuracy[-1] > 0.8  # both ends learned the task


def test_model_factory_is_called_with_the_data_and_two_seeds(small_pair):
    calls = []

    def factory(X, y, seed):
        calls.append((X.shape, y.dtype, seed))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Linear(5, 3)

    conn = LinearConnector(n_points=3, device="cpu", random_state=0, model_factory=factory)
    conn.fit(small_pair.X, small_pair.y)
    assert [c[0] for c in calls] == [(40, 5), (40, 5)]
    assert all(c[1] == torch.int64 for c in calls)
    assert calls[0][2] != calls[1][2]
    again = clone_fit(conn, small_pair)
    torch.testing.assert_close(again.path_.parameters_vector(), conn.path_.parameters_vector())


def clone_fit(conn, pair):
    from sklearn.base import clone

    return clone(conn).fit(pair.X, pair.y)


def test_without_models_classes_are_the_labels_of_y(small_pair):
    labels = np.array(["cat", "dog", "emu"])[small_pair.y]
    conn = LinearConnector(n_points=3, device="cpu", random_state=0).fit(small_pair.X, labels)
    assert conn.classes_.tolist() == ["cat", "dog", "emu"]
    assert set(conn.predict(small_pair.X)) <= {"cat", "dog", "emu"}
    by_label = conn.evaluate(small_pair.X, labels)
    by_index = LinearConnector(n_points=3, device="cpu", random_state=0).fit(
        small_pair.X, small_pair.y
    )
    np.testing.assert_allclose(by_label.loss, by_index.evaluate(small_pair.X, small_pair.y).loss)
    with pytest.raises(ValueError, match=r"labels the path was not fit on: \['yak'\]"):
        conn.evaluate(small_pair.X[:1], ["yak"])


def test_without_models_a_loader_of_pairs_is_enough(small_pair):
    loader = DataLoader(
        TensorDataset(torch.as_tensor(small_pair.X), torch.as_tensor(small_pair.y)), batch_size=8
    )
    conn = LinearConnector(n_points=3, device="cpu", random_state=0).fit(loader)
    assert conn.n_classes_ == 3


def test_without_models_one_class_is_rejected(small_pair):
    with pytest.raises(ValueError, match=r"y has 1 class .*at least 2 classes"):
        LinearConnector(device="cpu").fit(small_pair.X, np.zeros(40, dtype=int))


def test_without_models_continuous_targets_are_rejected(small_pair):
    with pytest.raises(ValueError, match=r"Unknown label type"):
        LinearConnector(device="cpu").fit(small_pair.X, np.linspace(0, 1, 40))


def test_a_factory_that_returns_no_module_is_rejected(small_pair):
    conn = LinearConnector(device="cpu", model_factory=lambda X, y, seed: "net")
    with pytest.raises(TypeError, match=r"model_factory's model_a must be a torch\.nn\.Module"):
        conn.fit(small_pair.X, small_pair.y)


def without_seconds(history: dict) -> dict:
    return {key: values for key, values in history.items() if key != "seconds"}
