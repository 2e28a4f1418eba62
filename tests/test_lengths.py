"""The length of the path a user gets, and the continuous geodesic on a curve.

``length_`` is the Fisher–Rao length of the polygon between the points (the networks
``path_.at(t)`` gives), measured to a known error; ``chord_length_`` the chord sum at
the points; ``min_length_`` the distance between the ends' predictions, which no path
beats. ``GeodesicConnector(curve=...)`` descends a curve's Fisher–Rao energy,
estimated at random ``t`` by a forward-mode Jacobian–vector product.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_mlp, random_pair
from connecting import fit_and_check_on_digits
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file
from sklearn.exceptions import ConvergenceWarning
from torch.utils.data import TensorDataset

from geoconnect import (
    CurveConnector,
    GeodesicConnector,
    LinearConnector,
    ModelPath,
    NEBConnector,
)
from geoconnect._data import TensorData, as_data
from geoconnect.connectors.geodesic import ABSOLUTE_RATE, CURVE_EPOCHS, CURVE_RELATIVE_RATE
from geoconnect.curves import (
    Curve,
    arc_length_t,
    curve_chord_energy,
    curve_energy,
    curve_fisher_form,
)
from geoconnect.divergences import fisher_form, jensen_shannon
from geoconnect.evaluation import path_length
from geoconnect.models import load_digits_split, make_cnn, train_classifier
from geoconnect.path import recompute_module_batchnorm

SETTINGS = settings(max_examples=15, deadline=None)


def measure(path, X, **kwargs):
    return path_length(path, as_data(X, device="cpu"), **kwargs)


def batch_size(conn) -> int:
    """The batch size of a connector's BatchNorm statistics (and so of its networks)."""
    return getattr(conn, "batch_size", 256)


def denser(path: ModelPath | Curve, X: np.ndarray, subdivisions: int, **kwargs):
    """The measurement with every segment cut into ``subdivisions`` pieces."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rtol=0 never converges
        return measure(path, X, rtol=0.0, max_subdivisions=subdivisions, **kwargs)


def check_length_is_measured(conn, X: np.ndarray) -> None:
    """``length_`` within 2 % of a 4×-denser measurement, which its error bounds."""
    measured = measure(conn.path_, X, batch_size=batch_size(conn))
    assert conn.length_ == pytest.approx(measured.length, rel=1e-9)
    assert conn.length_error_ == pytest.approx(measured.error, rel=1e-6)
    dense = denser(conn.path_, X, 4 * measured.subdivisions, batch_size=batch_size(conn))
    assert conn.length_ == pytest.approx(dense.length, rel=0.02)
    assert abs(conn.length_ - dense.length) <= conn.length_error_ + 1e-9
    assert conn.min_length_ <= conn.chord_length_ + 1e-9
    assert conn.chord_length_ <= measured.refined_chord_length + 1e-9 <= conn.length_ + 2e-9


# -- the length of the path a user gets ------------------------------------------------


@pytest.fixture(scope="module")
def cnn_pair():
    """Two small BatchNorm CNNs on digits images (trained briefly)."""
    data = load_digits_split()
    X, y = data.images_train[:300], data.y_train[:300]
    a, b = (train_classifier(make_cnn(seed=s), X, y, epochs=10, seed=s) for s in (1, 2))
    return a, b, X, y


def every_connector() -> list:
    common = {"n_points": 9, "device": "cpu", "random_state": 0, "max_iter": 5}
    return [
        LinearConnector(n_points=9, device="cpu"),
        LinearConnector(n_points=9, device="cpu", repair=True),
        GeodesicConnector(**common),
        GeodesicConnector(curve="bezier", **common),
        CurveConnector(**common),
        NEBConnector(**common),
    ]


def test_every_connectors_length_is_within_2_percent_of_a_4x_denser_measurement(digits_pair):
    pair = digits_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for conn in every_connector():
            conn.fit(pair.X, pair.y, model_a=pair.model_a, model_b=pair.model_b)
            check_length_is_measured(conn, pair.X)
            # the networks between the points are on the path, and they bend it
            assert conn.length_ > 1.01 * conn.chord_length_


def test_every_connectors_length_is_measured_on_a_batchnorm_pair(cnn_pair):
    a, b, X, y = cnn_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for conn in every_connector():
            conn.fit(X, y, model_a=a, model_b=b)
            check_length_is_measured(conn, X)


def test_a_batchnorm_paths_length_on_other_inputs_recomputes_every_interior_network(cnn_pair):
    a, b, X, _ = cnn_pair
    line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
    # evaluate on other inputs: every interior network's statistics from those inputs,
    # so that the length is that of one path, not of a path with two data sets' steps.
    data = load_digits_split()
    X_test, y_test = data.images_test[:200], data.y_test[:200]
    on_test = line.evaluate(X_test, y_test)
    recomputed = copy.deepcopy(line.path_)
    recomputed.recompute_batchnorm(X_test)
    expected = measure(recomputed, X_test)
    assert on_test.length == pytest.approx(expected.length, rel=1e-9)
    assert on_test.min_length == pytest.approx(expected.min_length, rel=1e-9)
    assert on_test.min_length <= on_test.chord_length <= on_test.length
    assert on_test.length_ratio == pytest.approx(on_test.length / on_test.min_length)


def _rms_fisher_rao(net_a, net_b, X) -> float:
    """√(E_x d_FR²) between two networks' predictions on X."""
    x = torch.as_tensor(X, dtype=torch.float32)
    with torch.no_grad():
        la, lb = net_a.eval()(x).double(), net_b.eval()(x).double()
    bc = (0.5 * (la.log_softmax(1) + lb.log_softmax(1))).exp().sum(1).clamp(max=1.0)
    return float((2 * torch.acos(bc)).square().mean().sqrt())


def test_a_batchnorm_paths_jumps_at_its_ends_are_part_of_its_length(cnn_pair):
    # Between the ends, the networks get statistics recomputed on X; the ends keep the
    # models' own. The path jumps there, and the jumps are part of its length.
    a, b, X, _ = cnn_pair
    line = LinearConnector(n_points=2, device="cpu").fit(X, model_a=a, model_b=b)
    fresh_a, fresh_b = copy.deepcopy(a), copy.deepcopy(b)
    for net in (fresh_a, fresh_b):
        recompute_module_batchnorm(net, as_data(X, device="cpu"), 256)
    jump_a, jump_b = _rms_fisher_rao(a, fresh_a, X), _rms_fisher_rao(b, fresh_b, X)
    assert jump_a > 1e-3 and jump_b > 1e-3  # the models' statistics are not X's
    # the chord and the shortest length are between the models themselves ...
    assert line.min_length_ == pytest.approx(_rms_fisher_rao(a, b, X), rel=1e-6)
    assert line.chord_length_ == pytest.approx(line.min_length_, rel=1e-9)
    # ... and the length goes through both jumps (the triangle inequality)
    between = _rms_fisher_rao(fresh_a, fresh_b, X)
    assert line.length_ >= jump_a + between + jump_b - 1e-6
    assert line.length_ == pytest.approx(denser(line.path_, X, 128).length, rel=0.01)


def test_a_fits_measurement_evaluates_no_network_twice(cnn_pair, monkeypatch):
    # The points' logits come from the fit's own pass over them; the chords, the
    # jumps at the ends and the shortest length share the ends' networks.
    import geoconnect.evaluation as evaluation

    a, b, X, _ = cnn_pair
    evaluated: list[tuple[float, bool]] = []
    compute = evaluation._Pieces._compute

    def counted(self, u, own):
        fresh = set(self.networks.fresh(u, own))
        evaluated.extend((v, i in fresh) for i, v in enumerate(u.tolist()))
        return compute(self, u, own)

    monkeypatch.setattr(evaluation._Pieces, "_compute", counted)
    line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
    assert len(evaluated) == len(set(evaluated))
    points = {(float(i), False) for i in range(line.path_.n_points)}
    assert not points & set(evaluated)  # the fit's statistics pass had them
    assert {(0.0, True), (4.0, True)} <= set(evaluated)  # the ends' recomputed networks
    evaluated.clear()
    alone = measure(line.path_, X)  # without the fit's logits: the points once each
    assert len(evaluated) == len(set(evaluated)) and points <= set(evaluated)
    assert alone.length == pytest.approx(line.length_, rel=1e-9)


def test_the_shortest_length_is_the_two_point_lines_chord(digits_pair):
    pair = digits_pair
    two = LinearConnector(n_points=2, device="cpu").fit(
        pair.X, model_a=pair.model_a, model_b=pair.model_b
    )
    line = LinearConnector(device="cpu").fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    assert two.chord_length_ == pytest.approx(line.min_length_, rel=1e-6)
    assert line.path_.metadata["min_length"] == line.min_length_
    assert line.path_.metadata["chord_length"] == line.chord_length_
    assert line.length_ > line.chord_length_ > line.min_length_


def test_score_does_not_measure_lengths(digits_pair, monkeypatch):
    pair = digits_pair
    line = LinearConnector(device="cpu").fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    barrier = line.evaluate(pair.X_test, pair.y_test).barrier
    import geoconnect.evaluation as evaluation

    def refuse(*args, **kwargs):
        raise AssertionError("score measured a length")

    monkeypatch.setattr(evaluation, "path_length", refuse)
    assert line.score(pair.X_test, pair.y_test) == -barrier


def test_a_stream_and_an_array_give_one_length(digits_pair):
    # In-memory data reuse the logits of the positions measured before; streamed data
    # evaluate them again. Both are one measurement.
    path = ModelPath.linear(digits_pair.model_a, digits_pair.model_b, 4)
    X = torch.as_tensor(digits_pair.X[:500])
    array = path_length(path, as_data(X, device="cpu"))
    stream = path_length(path, as_data(TensorDataset(X), device="cpu"))
    assert stream.n_samples == array.n_samples == 500
    for field in ("length", "error", "chord_length", "refined_chord_length", "min_length"):
        assert getattr(stream, field) == pytest.approx(getattr(array, field), rel=1e-9)
    assert stream.subdivisions == array.subdivisions


def test_large_inputs_are_measured_on_a_fixed_subset_of_them(digits_pair):
    path = ModelPath.linear(digits_pair.model_a, digits_pair.model_b, 3)
    first = measure(path, digits_pair.X, max_samples=300)
    assert first.n_samples == 300 and measure(path, digits_pair.X).n_samples == len(digits_pair.X)
    assert measure(path, digits_pair.X, max_samples=None).n_samples == len(digits_pair.X)
    assert measure(path, digits_pair.X, max_samples=300).length == first.length  # one subset
    with pytest.raises(ValueError, match="max_samples"):
        measure(path, digits_pair.X, max_samples=0)


def test_a_batchnorm_path_measured_on_a_subset_keeps_its_statistics_from_every_input(
    cnn_pair,
):
    # The networks between the points take their statistics from all the inputs, as
    # the points do: from the subset, they would step away from the points' at each.
    a, b, _, _ = cnn_pair
    X = load_digits_split().images_train  # more than the 512 compared
    path = LinearConnector(n_points=4, device="cpu").fit(X, model_a=a, model_b=b).path_
    subset, everything = measure(path, X, max_samples=512), measure(path, X, max_samples=None)
    assert subset.n_samples == 512 and everything.n_samples == len(X)
    assert subset.converged and subset.subdivisions <= everything.subdivisions
    assert subset.length == pytest.approx(everything.length, rel=0.03)
    assert subset.chord_length == everything.chord_length
    assert subset.min_length == everything.min_length


def test_an_unconverged_length_says_so(digits_pair):
    path = ModelPath.linear(digits_pair.model_a, digits_pair.model_b, 2)
    with pytest.warns(RuntimeWarning, match="did not converge at 2 pieces per segment"):
        measured = measure(path, digits_pair.X, max_subdivisions=2)
    assert not measured.converged and measured.error > 0.01 * measured.length
    with pytest.raises(ValueError, match="max_subdivisions must be an integer ≥ 2"):
        measure(path, digits_pair.X, max_subdivisions=1)
    with pytest.raises(ValueError, match="rtol"):
        measure(path, digits_pair.X, rtol=-1.0)


@SETTINGS
@given(seed=st.integers(0, 1000), n_points=st.integers(2, 6), scale=st.sampled_from([1.0, 3.0]))
def test_law_refining_never_shortens_a_polygons_chords(seed, n_points, scale):
    pair = random_pair(seed=seed, scale=scale)
    line = LinearConnector(n_points=n_points, device="cpu").fit(
        pair.X, model_a=pair.model_a, model_b=pair.model_b
    )
    # √(E_x d_FR²) obeys the triangle inequality, so a finer chord sum is never shorter.
    coarse = denser(line.path_, pair.X, 2).refined_chord_length
    fine = denser(line.path_, pair.X, 8).refined_chord_length
    assert line.min_length_ <= line.chord_length_ + 1e-9 <= coarse + 2e-9 <= fine + 3e-9


@SETTINGS
@given(seed=st.integers(0, 1000), n_points=st.integers(3, 6), scale=st.sampled_from([1.0, 3.0]))
def test_law_no_path_is_shorter_than_the_distance_between_its_ends(seed, n_points, scale):
    pair = random_pair(seed=seed, scale=scale)
    path = ModelPath.linear(pair.model_a, pair.model_b, n_points)
    for i in range(1, n_points - 1):  # interior points off the line: a bent path
        for name, p in random_mlp((5, 8, 3), 1000 + seed + i).named_parameters():
            path.params[name][i] = scale * p.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a wild path may not converge
        measured = measure(path, pair.X)
    assert measured.min_length <= measured.chord_length + 1e-9
    assert measured.min_length <= measured.length + 1e-9
    assert measured.ratio >= 1.0 - 1e-9


@SETTINGS
@given(seed=st.integers(0, 1000), n_points=st.integers(2, 5))
def test_law_a_path_through_networks_of_one_function_has_length_zero(seed, n_points):
    # Each network differs from the first by a shift of every logit: one function.
    pair = random_pair(seed=seed)
    shifted = copy.deepcopy(pair.model_a)
    with torch.no_grad():
        shifted[-1].bias += 3.0
    path = ModelPath.linear(pair.model_a, shifted, n_points)
    measured = measure(path, pair.X)
    assert measured.length < 1e-5 and measured.min_length < 1e-6 and measured.converged


@SETTINGS
@given(seed=st.integers(0, 1000), n_points=st.integers(2, 6), scale=st.sampled_from([1.0, 3.0]))
def test_law_a_lines_length_does_not_depend_on_its_number_of_points(seed, n_points, scale):
    pair = random_pair(seed=seed, scale=scale)
    few = measure(ModelPath.linear(pair.model_a, pair.model_b, n_points), pair.X)
    many = measure(ModelPath.linear(pair.model_a, pair.model_b, 9), pair.X)
    # within the two measurements' tolerances (1 % each)
    assert few.length == pytest.approx(many.length, rel=0.02)


def test_a_curve_on_the_line_has_the_lines_length(digits_pair):
    # A Bezier curve whose bends lie on the line, evenly spaced, is the line itself,
    # first cut at t = k / 8: the line through 9 points, measured alike.
    line = ModelPath.linear(digits_pair.model_a, digits_pair.model_b, 9)
    curve = Curve(ModelPath.linear(digits_pair.model_a, digits_pair.model_b, 4), "bezier")
    on_curve, on_line = measure(curve, digits_pair.X), measure(line, digits_pair.X)
    np.testing.assert_allclose(on_curve.positions, on_line.positions, rtol=1e-4, atol=1e-6)
    assert on_curve.length == pytest.approx(on_line.length, rel=1e-4)
    assert on_curve.min_length == pytest.approx(on_line.min_length, rel=1e-9)
    # and through 3 points: the same path, within the two measurements' errors
    few = measure(ModelPath.linear(digits_pair.model_a, digits_pair.model_b, 3), digits_pair.X)
    assert few.length == pytest.approx(on_curve.length, rel=0.03)


# -- the Fisher form and the curve's energy ---------------------------------------------

logits = st.lists(st.floats(-6, 6), min_size=2, max_size=6)


@SETTINGS
@given(z=logits, seed=st.integers(0, 1000))
def test_law_the_fisher_form_is_the_local_jensen_shannon_divergence(z, seed):
    z = torch.tensor(z, dtype=torch.float64)
    velocity = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).double()
    form = float(fisher_form(z, velocity))
    assert form >= 0.0
    for h in (1e-3, 1e-4):
        jsd = float(jensen_shannon(z, z + h * velocity))
        # (abs: where p is nearly one-hot, h³ terms rival a form of ~1e-6)
        assert 8 * jsd / h**2 == pytest.approx(form, rel=1e-2, abs=1e-7)


def test_a_shift_of_every_logit_costs_nothing():
    z = torch.randn(4, 5, dtype=torch.float64)
    assert float(fisher_form(z, torch.ones_like(z)).abs().max()) < 1e-12


def _mlp_curve(seed: int, kind: str, n_bends: int) -> Curve:
    torch.manual_seed(seed)
    nets = [
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        for _ in range(n_bends + 2)
    ]
    path = ModelPath.linear(nets[0], nets[-1], n_bends + 2)
    for i, net in enumerate(nets[1:-1], start=1):  # bends off the line
        for name, p in net.named_parameters():
            path.params[name][i] = p.detach()
    return Curve(path, kind)


@SETTINGS
@given(
    seed=st.integers(0, 1000),
    kind=st.sampled_from(["bezier", "polychain"]),
    n_bends=st.integers(1, 3),
    t=st.floats(0.02, 0.97),
)
def test_law_the_jvp_form_is_the_divergence_between_t_and_t_plus_h(seed, kind, n_bends, t):
    curve = _mlp_curve(seed, kind, n_bends)
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    form = curve_fisher_form(curve, torch.tensor([t]), x)
    h = 1e-3  # the divergence between t − h and t + h: O(h²) from the form
    n = n_bends + 1  # a polychain bends at j / n: t ± h on one segment
    assume(kind == "bezier" or math.floor((t - h) * n) == math.floor((t + h) * n))
    near = curve.params_at(torch.tensor([t - h, t + h], dtype=torch.float64))
    with torch.no_grad():
        z = curve.control.functional_forward(near, x)
    divergence = 8 * jensen_shannon(z[0], z[1]) / (2 * h) ** 2
    torch.testing.assert_close(form, divergence, rtol=1e-3, atol=1e-6 * float(form.max()))


@SETTINGS
@given(seed=st.integers(0, 1000), kind=st.sampled_from(["bezier", "polychain"]))
def test_law_a_curve_through_networks_of_one_function_has_zero_energy(seed, kind):
    # The bends differ from the ends by a shift of every logit: one function throughout.
    curve = _mlp_curve(seed, kind, 2)
    stack = curve.control.params
    for name in stack:
        stack[name][:] = stack[name][0]
    stack["2.bias"][1:-1] += torch.tensor([[1.5], [-2.0]], dtype=torch.float64)
    x = torch.randn(16, 4, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        assert float(curve_fisher_form(curve, torch.tensor([t]), x).abs().max()) < 1e-12


def _quadrature(curve: Curve, x: torch.Tensor, phi=lambda s: s, n: int = 401) -> tuple:
    """The curve's energy and length on x by the trapezoid rule over ``s``, the curve
    run as ``t = phi(s)``: ``∫ F(φ(s)) φ'(s)² ds`` and ``∫ √F(φ(s)) φ'(s) ds``."""
    s = torch.linspace(0, 1, n, dtype=torch.float64).requires_grad_(True)
    t = phi(s)
    (dt,) = torch.autograd.grad(t.sum(), s)
    with torch.no_grad():
        forms = torch.stack([curve_fisher_form(curve, ti.reshape(1), x).mean() for ti in t])
    s = s.detach()
    energy = float(torch.trapezoid(forms * dt.square(), s))
    length = float(torch.trapezoid(forms.clamp_min(0).sqrt() * dt, s))
    return energy, length


def test_the_stratified_energy_estimate_is_unbiased():
    curve = _mlp_curve(3, "bezier", 2)
    x = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    energy, _ = _quadrature(curve, x)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        estimates = torch.stack([curve_energy(curve, x, generator)[0] for _ in range(1000)])
    mean, sem = float(estimates.mean()), float(estimates.std() / math.sqrt(len(estimates)))
    assert abs(mean - energy) < 4 * sem
    # stratified: less variance than as many independent draws
    with torch.no_grad():
        single = torch.stack([curve_energy(curve, x, generator, n_t=1)[0] for _ in range(1000)])
    assert estimates.var() < single.var() / 4 * 1.5


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), kind=st.sampled_from(["bezier", "polychain"]))
def test_law_a_curves_squared_length_is_at_most_its_energy(seed, kind):
    curve = _mlp_curve(seed, kind, 2)
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    energy, length = _quadrature(curve, x)
    assert length**2 <= energy * (1 + 1e-9)
    measured = path_length(curve, TensorData(x, None, torch.device("cpu")))  # chords
    assert measured.length**2 <= energy * (1 + 1e-9) + 2 * measured.length * measured.error


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), a=st.floats(-0.9, 0.9))
def test_law_reparametrising_a_curve_does_not_change_its_length(seed, a):
    # the speed from the forward-mode JVP, integrated along a smooth monotone
    # t = s − a sin(2πs) / 2π, is the length the chords measure along t
    curve = _mlp_curve(seed, "bezier", 2)
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _, uniform = _quadrature(curve, x)
    _, warped = _quadrature(curve, x, lambda s: s - a * torch.sin(2 * math.pi * s) / (2 * math.pi))
    measured = path_length(curve, TensorData(x, None, torch.device("cpu")), rtol=1e-3)
    assert warped == pytest.approx(uniform, rel=1e-3)
    assert abs(measured.length - uniform) <= measured.error + 1e-3 * uniform


@SETTINGS
@given(
    seed=st.integers(0, 1000),
    kind=st.sampled_from(["bezier", "polychain"]),
    n_pieces=st.integers(1, 12),
    name=st.sampled_from(["jensen_shannon", "fisher_rao_squared", "fisher_rao"]),
)
def test_law_the_chord_energy_bounds_its_chord_sum_squared_and_vanishes_on_one_function(
    seed, kind, n_pieces, name
):
    import geoconnect.divergences as divergences

    divergence = getattr(divergences, name)
    curve = _mlp_curve(seed, kind, 2)
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        energy, length = curve_chord_energy(
            curve, x, generator, n_pieces=n_pieces, divergence=divergence
        )
    assert length > 0 and length**2 <= float(energy) * (1 + 1e-9)  # Cauchy–Schwarz
    stack = curve.control.params  # one function throughout: a shift of every logit
    for key in stack:
        stack[key][:] = stack[key][0]
    stack["2.bias"][1:-1] += torch.tensor([[1.5], [-2.0]], dtype=torch.float64)
    with torch.no_grad():
        energy, length = curve_chord_energy(curve, x, generator, divergence=divergence)
    assert abs(float(energy)) < 1e-9 and length < 1e-6


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 1000),
    n_pieces=st.integers(1, 6),
    rows=st.integers(4, 40),
    strategy=st.sampled_from(["vmap", "loop"]),
)
def test_law_a_split_chord_is_measured_on_its_own_rows_only(seed, n_pieces, rows, strategy):
    # split=True: chord j joins its grid points on rows j·c .. (j + 1)·c, c = rows //
    # (n_pieces + 1): the energy of that is the mean over chords of each chord's
    # energy measured on its rows alone, point by point.
    curve = _mlp_curve(seed, "bezier", 2)
    curve.control.strategy = strategy
    x = torch.randn(rows, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    draw = torch.Generator().manual_seed(seed)
    u = float(torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    with torch.no_grad():
        energy, _ = curve_chord_energy(curve, x, draw, n_pieces=n_pieces, split=True)
    t = [0.0, *((j + u) / n_pieces for j in range(n_pieces)), 1.0]
    c = rows // (n_pieces + 1)
    if c < 2:  # too few rows to split: the whole batch, as without split
        again = curve_chord_energy(curve, x, torch.Generator().manual_seed(seed), n_pieces=n_pieces)
        assert float(energy) == pytest.approx(float(again[0]), rel=1e-12)
        return
    expected = 0.0
    for j in range(n_pieces + 1):
        part = x[j * c : (j + 1) * c]
        ends = curve.params_at(torch.tensor([t[j], t[j + 1]], dtype=torch.float64))
        logits = curve.control.functional_forward(ends, part, strategy="loop")
        squared = float(jensen_shannon(logits[0], logits[1]).mean()) * 8.0
        expected += squared / (t[j + 1] - t[j])
    assert float(energy) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_the_chord_energy_is_the_energy_on_a_fine_grid():
    # Below the continuous energy on a coarse grid, and equal to it on a fine one,
    # for every built-in divergence (each turned into d_FR² by its local constant).
    import geoconnect.divergences as divergences

    curve = _mlp_curve(3, "bezier", 2)
    x = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    energy, _ = _quadrature(curve, x)
    for name in ("jensen_shannon", "fisher_rao_squared", "fisher_rao", "hellinger", "symmetric_kl"):
        divergence = getattr(divergences, name)
        with torch.no_grad():
            fine = curve_chord_energy(curve, x, n_pieces=256, divergence=divergence)[0]
            coarse = torch.stack(
                [
                    curve_chord_energy(curve, x, n_pieces=2, divergence=divergence)[0]
                    for _ in range(20)
                ]
            )
        assert float(fine) == pytest.approx(energy, rel=2e-3), name
        assert float(coarse.max()) < energy, name


def test_the_chord_energy_refuses_a_divergence_without_a_local_constant():
    curve = _mlp_curve(0, "bezier", 1)
    with pytest.raises(ValueError, match="built-in divergence"):
        curve_chord_energy(curve, torch.randn(4, 4, dtype=torch.float64), divergence=torch.dist)


# -- GeodesicConnector(curve=...) ----------------------------------------------------


@pytest.fixture(scope="module")
def bezier_geodesic(digits_pair):
    pair = digits_pair
    geo = GeodesicConnector(
        curve="bezier", learning_rate_init=1e-2, device="cpu", random_state=0, max_iter=60
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit_and_check_on_digits(geo, pair)


def test_the_curve_geodesic_is_shorter_than_the_line_and_than_the_loss_curve(
    digits_pair, bezier_geodesic
):
    pair, geo = digits_pair, bezier_geodesic
    line = LinearConnector(device="cpu").fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    loss_curve = CurveConnector(device="cpu", random_state=0).fit(
        pair.X, pair.y, model_a=pair.model_a, model_b=pair.model_b
    )
    assert geo.length_ < 0.5 * line.length_
    assert geo.length_ < loss_curve.length_
    assert isinstance(geo.curve_, Curve) and geo.curve_.n_bends == 3
    assert set(geo.history_) == {"energy", "length", "euclidean_length", "seconds"}
    assert geo.history_["energy"][-1] < geo.history_["energy"][0]
    with torch.no_grad():  # the curve's ends are the models
        x = torch.as_tensor(pair.X[:16])
        torch.testing.assert_close(geo.curve_.at(1.0)(x), pair.model_b(x), rtol=0, atol=0)


def test_a_curve_geodesics_points_are_evenly_spaced_by_arc_length(digits_pair, bezier_geodesic):
    # path_ samples the curve at t evenly spaced by Fisher-Rao arc length (path_.t_,
    # measured on the polygon, is then near i / (N - 1)). A descent of the chord
    # energy leaves the curve near constant speed in t already (0.020 from even, with
    # arc-length sampling 0.013); one of the speed at random t did not (0.099 and
    # 0.044), so both are checked.
    pair = digits_pair
    jvp = GeodesicConnector(
        curve="bezier", energy="jvp", learning_rate_init=1e-2, device="cpu", random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        jvp.fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    even = np.linspace(0.0, 1.0, bezier_geodesic.n_points)
    for geo, margin in ((bezier_geodesic, 1.0), (jvp, 0.5)):
        by_t = measure(geo.curve_.sample(geo.n_points, pair.X), pair.X).positions
        assert np.abs(geo.path_.t_ - even).max() < 0.05
        assert np.abs(geo.path_.t_ - even).max() < margin * np.abs(by_t - even).max()


def test_arc_length_t_places_points_where_the_measured_length_does(digits_pair, bezier_geodesic):
    # arc_length_t reads the arc length off 16 chords on four batches; path_length
    # measures it on all the inputs to 1 % (linear between its 8 knots: the two
    # differ by up to 0.021 on the line by their interpolation alone). The line's
    # speed is far from even in t (the fitted curve's is near even): the telling case.
    pair = digits_pair
    fitted = LinearConnector(n_points=5).fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    line = Curve(fitted.path_, "bezier")
    for curve in (line, bezier_geodesic.curve_):
        knots = measure(curve, pair.X).positions
        assert knots is not None
        by_length = np.interp(np.linspace(0, 1, 25), knots, np.linspace(0, 1, knots.size))
        placed = arc_length_t(curve, pair.X, 25)
        assert placed[0] == 0.0 and placed[-1] == 1.0 and (np.diff(placed) >= 0).all()
        assert np.abs(placed - by_length).max() < 0.03
    even = np.linspace(0, 1, 25)
    assert np.abs(arc_length_t(line, pair.X, 25) - even).max() > 0.05


def test_a_chain_fit_after_a_curve_fit_has_no_curve(digits_pair, bezier_geodesic):
    geo = copy.deepcopy(bezier_geodesic).set_params(curve="chain", max_iter=2, n_points=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        geo.fit(digits_pair.X, model_a=digits_pair.model_a, model_b=digits_pair.model_b)
    assert not hasattr(geo, "curve_")


def test_a_curve_warm_start_continues_the_curve(digits_pair, bezier_geodesic):
    pair = digits_pair
    geo = copy.deepcopy(bezier_geodesic).set_params(warm_start=True, max_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        geo.fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    assert geo.n_iter_ == bezier_geodesic.n_iter_ + 2
    assert geo.history_["energy"][: bezier_geodesic.n_iter_] == bezier_geodesic.history_["energy"]
    with pytest.raises(ValueError, match="n_bends=3"):
        geo.set_params(n_bends=4).fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)


@pytest.mark.parametrize("setting", [{"mixed_precision": True}])
def test_what_a_curve_does_not_do_yet_is_refused_before_any_work(small_pair, setting):
    geo = GeodesicConnector(curve="polychain", device="cpu", random_state=0, **setting)
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name}=.*curve='chain'"):
        geo.fit(small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert not hasattr(geo, "path_")


REFERENCE = Path(__file__).parent / "data" / "chain_reference.safetensors"


def test_the_chain_is_unchanged_against_a_stored_reference():
    # tests/data/chain_reference.safetensors: this fit at commit f70a506, before
    # curve=... existed. Bitwise where the CPU kernels are those it was made with.
    reference = load_file(REFERENCE)
    with safe_open(REFERENCE, "pt") as handle:
        made = handle.metadata()
    pair = random_pair((5, 16, 16, 3), n_samples=200, seed=3)
    geo = GeodesicConnector(
        curve="chain", n_points=7, max_iter=6, device="cpu", random_state=0, strategy="loop"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        geo.fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    same_kernels = (made["torch"], made["cpu_capability"]) == (
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
    )
    energy = torch.tensor(geo.history_["energy"], dtype=torch.float64)
    for name, value in [("energy", energy)] + [
        (f"param.{k}", v) for k, v in geo.path_.params.items()
    ]:
        if same_kernels:
            assert torch.equal(value, reference[name]), name
        else:
            torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-6)


def test_a_curve_fit_that_ends_above_its_start_returns_its_start_and_says_so():
    pair = random_pair((5, 16, 3), n_samples=64, seed=0, scale=2.0)
    geo = GeodesicConnector(
        curve="bezier",
        n_bends=1,
        learning_rate_init=0.3,  # an absolute step this large diverges
        relative_step=False,
        max_iter=3,
        device="cpu",
        random_state=0,  # the batches' order and the t drawn: not the suite's RNG state
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(RuntimeWarning, match="descent diverged"):
            geo.fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    assert geo.history_["energy"][-1] > geo.history_["energy"][0]  # it did climb
    line = LinearConnector(device="cpu").fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    # the line it started from (its points spaced by arc length, not evenly in t)
    assert geo.length_ == pytest.approx(line.length_, rel=1e-3)
    bend = {k: v[1] for k, v in geo.curve_.control.params.items()}
    for name, ends in line.path_.params.items():
        torch.testing.assert_close(bend[name], 0.5 * (ends[0] + ends[-1]), rtol=1e-5, atol=1e-6)


def test_a_curve_refuses_a_divergence_without_a_known_local_form(small_pair):
    geo = GeodesicConnector(
        curve="bezier", divergence=lambda p, q: (p - q).square().sum(-1), device="cpu"
    )
    with pytest.raises(ValueError, match=r"callable divergence.*divergence='jsd'"):
        geo.fit(small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert not hasattr(geo, "path_")


def test_a_batchnorm_curve_geodesic_keeps_its_ends_and_recomputes_its_statistics(cnn_pair):
    a, b, X, _ = cnn_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        geo = GeodesicConnector(
            curve="bezier", n_points=5, max_iter=3, device="cpu", random_state=0
        ).fit(X, model_a=a, model_b=b)
    x = torch.as_tensor(X[:16])
    with torch.no_grad():
        torch.testing.assert_close(geo.path_[0](x), a(x), rtol=0, atol=0)
        torch.testing.assert_close(geo.path_[-1](x), b(x), rtol=0, atol=0)
    name = next(iter(geo.path_.batchnorm_buffers))
    stats = geo.path_.batchnorm_buffers[name]
    assert not torch.equal(stats[2], stats[0]) and not torch.equal(stats[2], stats[-1])
    check_length_is_measured(geo, X)


def test_a_cosine_schedule_lowers_a_curves_rate_to_zero_and_is_refused_for_the_chain(
    small_pair, monkeypatch
):
    import geoconnect.curves as curves

    rates = []
    run = curves._CurveEpoch.run

    def recording(self):
        rates.append(self.optimizer.lr)
        return run(self)

    monkeypatch.setattr(curves._CurveEpoch, "run", recording)
    pair = small_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        GeodesicConnector(
            curve="bezier",
            learning_rate="cosine",
            learning_rate_init=0.01,
            max_iter=5,
            n_iter_no_change=5,
            device="cpu",
            random_state=0,
        ).fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    assert rates == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)])
    chain = GeodesicConnector(curve="chain", learning_rate="cosine", device="cpu")
    with pytest.raises(ValueError, match="learning_rate='cosine' schedules a curve"):
        chain.fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    assert not hasattr(chain, "path_")


def _rescaled(model: torch.nn.Sequential, c: float) -> torch.nn.Sequential:
    """The same function with the first layer's weight and bias times ``c`` and the
    second's weight divided by it (a ReLU is positively homogeneous)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[0].weight.mul_(c), out[0].bias.mul_(c), out[2].weight.div_(c)
    return out


@settings(max_examples=4, deadline=None)
@given(c=st.sampled_from([0.1, 0.5, 4.0, 20.0]))
def test_a_relative_step_fits_the_same_curve_whatever_the_parametrisation(c):
    # Adam's step is blind to a tensor's gradient scale; measured in units of each
    # tensor's distance between the models, the step is blind to the tensor's own
    # scale too: the pair reparametrised by c gives the same curve of functions.
    pair = random_pair((5, 8, 3), n_samples=64, seed=3)
    x = torch.as_tensor(pair.X)
    plain, scaled = _curves_of_rescaled_pairs(pair, c, relative_step=True)
    line = Curve(ModelPath.linear(pair.model_a, pair.model_b, 5), "bezier").sample(9)
    assert (plain - line.logits(x)).abs().max() > 1e-2  # the fit moved the curve
    # (float32 rounding of the rescaled weights moves it by up to 2e-3 at c = 20)
    np.testing.assert_allclose(scaled.numpy(), plain.numpy(), atol=5e-3)
    # an absolute step of the same size moves the rescaled pair's curve elsewhere
    # (by 0.2 on this pair)
    plain, scaled = _curves_of_rescaled_pairs(pair, c, relative_step=False)
    assert (plain - scaled).abs().max() > 5e-2


def _curves_of_rescaled_pairs(pair, c: float, **params) -> list[torch.Tensor]:
    """The logits along the Bezier geodesic of the pair and of the pair rescaled by
    ``c``, at nine points evenly spaced in t."""
    logits = []
    for scale in (1.0, c):
        a, b = _rescaled(pair.model_a, scale), _rescaled(pair.model_b, scale)
        geo = GeodesicConnector(
            curve="bezier",
            learning_rate_init=0.05,
            max_iter=4,
            n_iter_no_change=4,
            batch_size=16,
            device="cpu",
            random_state=0,
            **params,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            geo.fit(pair.X, model_a=a, model_b=b)
        logits.append(geo.curve_.sample(9).logits(torch.as_tensor(pair.X)))
    return logits


def test_a_relative_step_is_refused_for_the_chain(small_pair):
    chain = GeodesicConnector(curve="chain", relative_step=True, device="cpu")
    with pytest.raises(ValueError, match="relative_step=True scales a curve's step"):
        chain.fit(small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert not hasattr(chain, "path_")


def test_a_curves_auto_settings_are_a_relative_step_and_a_budget_that_does_not_warn(small_pair):
    ends = {"model_a": small_pair.model_a, "model_b": small_pair.model_b}
    common = {"curve": "bezier", "n_iter_no_change": 100, "device": "cpu", "random_state": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a budget, not a failure
        auto = GeodesicConnector(**common).fit(small_pair.X, **ends)
    assert auto.n_iter_ == CURVE_EPOCHS == 20
    explicit = GeodesicConnector(
        relative_step=True, learning_rate_init=CURVE_RELATIVE_RATE, max_iter=20, **common
    )
    with pytest.warns(ConvergenceWarning, match="max_iter=20"):  # a limit the user set
        explicit.fit(small_pair.X, **ends)
    for name, stack in auto.curve_.control.params.items():
        assert torch.equal(explicit.curve_.control.params[name], stack)


def test_the_chains_auto_settings_are_an_absolute_step_of_3e_3(small_pair):
    ends = {"model_a": small_pair.model_a, "model_b": small_pair.model_b}
    common = {"curve": "chain", "max_iter": 3, "device": "cpu", "random_state": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        auto = GeodesicConnector(**common).fit(small_pair.X, **ends)
        explicit = GeodesicConnector(
            relative_step=False, learning_rate_init=ABSOLUTE_RATE, **common
        ).fit(small_pair.X, **ends)
    assert ABSOLUTE_RATE == 3e-3
    for name, stack in auto.path_.params.items():
        assert torch.equal(explicit.path_.params[name], stack)


def _validated(pair, **kwargs) -> GeodesicConnector:
    geo = GeodesicConnector(
        curve="bezier",
        validation_fraction=0.25,
        learning_rate_init=0.05,
        batch_size=16,
        device="cpu",
        random_state=0,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # a descent may climb at this rate
        return geo.fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)


def test_with_a_validation_fraction_the_curve_of_the_best_held_out_epoch_is_returned():
    # The held-out length is measured after every epoch; the fit returns the curve
    # of the epoch where it was shortest: the very curve a fit stopped at that epoch
    # ends with (the measurements draw nothing from the batch order).
    pair = random_pair((5, 8, 3), n_samples=96, seed=5)
    full = _validated(pair, max_iter=12, n_iter_no_change=12)
    held_out = full.history_["validation_length"]
    assert len(held_out) == len(full.history_["validation_energy"]) == 12
    best = int(np.argmin(held_out))
    stopped = _validated(pair, max_iter=best + 1, n_iter_no_change=12)
    for name, stack in full.curve_.control.params.items():
        torch.testing.assert_close(stack, stopped.curve_.control.params[name], rtol=0, atol=0)
    # the descent saw three quarters of X, the length and statistics all of it
    assert sum(full.history_["seconds"]) > 0 and np.isfinite(full.length_)
    x = torch.as_tensor(pair.X)
    assert full.path_.logits(x).shape[1] == len(pair.X)


def test_early_stopping_on_held_out_inputs_stops_a_fit_that_overfits_its_own():
    # 16 inputs to descend and 16 held out: the descended energy keeps falling while
    # the held-out length turns, and the fit stops n_iter_no_change epochs after.
    pair = random_pair((5, 32, 3), n_samples=32, seed=1)
    geo = _validated(pair, max_iter=200, n_iter_no_change=5)
    held_out, descended = geo.history_["validation_length"], geo.history_["energy"]
    assert geo.n_iter_ < 200
    # the last five epochs did not shorten the held-out length by the fraction tol
    assert min(held_out[-5:]) >= min(held_out[:-5]) * (1 - geo.tol)
    assert descended[-1] < descended[int(np.argmin(held_out))]  # its own kept falling


@pytest.mark.parametrize(
    ("settings_", "X", "message"),
    [
        ({"curve": "chain"}, None, "validation_fraction=0.25 stops a curve's fit"),
        ({"curve": "bezier"}, "loader", "a Dataset or DataLoader does not allow"),
        ({"curve": "bezier"}, "three", "too few to hold out"),
    ],
    ids=["chain", "dataloader", "too-few"],
)
def test_a_validation_fraction_is_refused_where_it_cannot_hold_out(
    small_pair, settings_, X, message
):
    pair = small_pair
    data = {
        None: pair.X,
        "loader": torch.utils.data.DataLoader(TensorDataset(torch.as_tensor(pair.X)), 8),
        "three": pair.X[:3],
    }[X]
    geo = GeodesicConnector(validation_fraction=0.25, device="cpu", **settings_)
    with pytest.raises(ValueError, match=message):
        geo.fit(data, model_a=pair.model_a, model_b=pair.model_b)
    assert not hasattr(geo, "path_")


def test_a_steady_validated_fit_is_not_called_unstable():
    # The climb check compares the watched held-out lengths with one another (it
    # once compared the held-out energy with the best length, and warned of
    # climbs that never were whenever the length was above 2).
    pair = random_pair((5, 8, 3), n_samples=96, seed=5, scale=4.0)
    geo = GeodesicConnector(
        curve="bezier",
        validation_fraction=0.25,
        learning_rate_init=1e-3,
        max_iter=4,
        batch_size=16,
        device="cpu",
        random_state=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        geo.fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    held_out = geo.history_["validation_length"]
    assert max(held_out) > 2.0 and max(held_out) < 2 * min(held_out)  # the telling case
    assert not [w for w in caught if "rose from" in str(w.message)]


def test_an_adaptive_rate_is_divided_at_each_plateau_and_the_third_stops(small_pair, monkeypatch):
    # tol=0.5: no epoch after the first lowers the energy by half, so each is a
    # plateau of n_iter_no_change=1: the rate is divided by 5 twice, then the fit
    # stops, without a ConvergenceWarning.
    import geoconnect.curves as curves

    rates = []
    run = curves._CurveEpoch.run

    def recording(self):
        rates.append(self.optimizer.lr)
        return run(self)

    monkeypatch.setattr(curves._CurveEpoch, "run", recording)
    pair = small_pair
    geo = GeodesicConnector(
        curve="bezier",
        learning_rate="adaptive",
        learning_rate_init=1e-3,
        tol=0.5,
        n_iter_no_change=1,
        max_iter=50,
        device="cpu",
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        geo.fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    assert rates == pytest.approx([1e-3, 1e-3, 2e-4, 4e-5])
    assert geo.n_iter_ == 4
    chain = GeodesicConnector(curve="chain", learning_rate="adaptive", device="cpu")
    with pytest.raises(ValueError, match="learning_rate='adaptive' schedules a curve"):
        chain.fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
