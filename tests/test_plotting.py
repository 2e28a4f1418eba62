"""The figures draw what the evaluations and fits measured, with labelled axes."""

from __future__ import annotations

import types
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from geoconnect import GeodesicConnector, LinearConnector, ModelPath, PathEvaluation
from geoconnect.divergences import SPECS
from geoconnect.evaluation import evaluate_path, loss_barrier
from geoconnect.plotting import (
    _grid_losses,
    plot_history,
    plot_loss_plane,
    plot_loss_profile,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _pair(batchnorm: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def net(s: int) -> nn.Module:
        torch.manual_seed(s)
        layers: list[nn.Module] = [nn.Linear(4, 8)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(8))
        layers += [nn.ReLU(), nn.Linear(8, 3)]
        return nn.Sequential(*layers).eval()

    X = torch.randn(96, 4, generator=generator)
    y = torch.randint(0, 3, (96,), generator=generator)
    return net(seed + 1), net(seed + 2), X, y


@pytest.fixture(scope="module")
def fitted():
    a, b, X, y = _pair()
    line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
    geo = GeodesicConnector(curve="chain", n_points=5, max_iter=8, device="cpu", random_state=0)
    geo.fit(X, model_a=a, model_b=b)
    return line, geo, X, y


def _evaluations():
    line = PathEvaluation.from_arrays([0.1, 0.9, 0.2], [1.0, 0.6, 0.9])
    geo = PathEvaluation.from_arrays([0.1, 0.15, 0.2], [1.0, 0.95, 0.9])
    return {"linear": line, "geodesic": geo}


# -- plot_loss_profile -------------------------------------------------------------------


def test_loss_profile_draws_each_paths_loss_against_its_positions():
    evs = _evaluations()
    ax = plot_loss_profile(evs)
    assert len(ax.lines) == 2
    for line, ev in zip(ax.lines, evs.values()):
        np.testing.assert_allclose(line.get_xdata(), ev.t)
        np.testing.assert_allclose(line.get_ydata(), ev.loss)
    assert ax.get_ylabel() == "cross-entropy loss (nats)"
    assert "t = i / (N − 1)" in ax.get_xlabel()


def test_loss_profile_draws_test_data_dashed_in_the_train_colour():
    train = _evaluations()
    test = {k: PathEvaluation.from_arrays(v.loss + 0.1, v.accuracy) for k, v in train.items()}
    ax = plot_loss_profile(train, test)
    assert len(ax.lines) == 4
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(solid) == len(dashed) == 2
    for s, d in zip(solid, dashed):
        assert s.get_color() == d.get_color()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(lbl.startswith("linear, train") for lbl in labels)
    assert any(lbl.startswith("geodesic, test") for lbl in labels)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0.0, 5.0), min_size=2, max_size=12))
def test_loss_profile_legend_reports_the_barrier_of_the_loss_drawn(losses):
    ev = PathEvaluation.from_arrays(losses, np.ones(len(losses)))
    ax = plot_loss_profile({"p": ev})
    (label,) = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"barrier {loss_barrier(np.asarray(losses)):.3g} nats" in label
    plt.close(ax.figure)


def test_loss_profile_with_accuracy_adds_a_percentage_panel():
    evs = _evaluations()
    loss_ax, acc_ax = plot_loss_profile(evs, accuracy=True)
    assert acc_ax.get_ylabel() == "accuracy (%)"
    for line, ev in zip(acc_ax.lines, evs.values()):
        np.testing.assert_allclose(line.get_ydata(), 100 * ev.accuracy)
    assert loss_ax.figure is acc_ax.figure


def test_loss_profile_draws_into_the_axes_it_is_given():
    _, ax = plt.subplots()
    assert plot_loss_profile(_evaluations(), ax=ax) is ax
    _, axes = plt.subplots(2, 1)
    out = plot_loss_profile(_evaluations(), ax=axes, accuracy=True)
    assert out[0] is axes[0] and out[1] is axes[1]


def test_loss_profile_needs_two_axes_for_accuracy():
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="pair of Axes"):
        plot_loss_profile(_evaluations(), ax=ax, accuracy=True)


def test_loss_profile_rejects_what_is_not_an_evaluation():
    with pytest.raises(TypeError, match="PathEvaluation"):
        plot_loss_profile([0.1, 0.2])


def test_loss_profile_by_arc_length_uses_t_arc(fitted):
    _, geo, X, y = fitted
    ev = geo.evaluate(X, y)
    ax = plot_loss_profile(ev, position="arc")
    np.testing.assert_allclose(ax.lines[0].get_xdata(), ev.t_arc)
    with pytest.raises(ValueError, match="t_arc"):
        plot_loss_profile(_evaluations(), position="arc")


def test_path_evaluation_plot_draws_its_loss(fitted):
    line, _, X, y = fitted
    ev = line.evaluate(X, y)
    _, ax = plt.subplots()
    assert ev.plot(ax=ax) is ax
    np.testing.assert_allclose(ax.lines[0].get_ydata(), ev.loss)


# -- plot_history ------------------------------------------------------------------------


def test_history_draws_the_fits_record_per_epoch(fitted):
    line, geo, _, _ = fitted
    axes = plot_history(geo, baseline=line)
    assert len(axes) == 3
    for ax, key in zip(axes, ["energy", "chord_length", "euclidean_length"]):
        np.testing.assert_allclose(ax.lines[0].get_ydata(), geo.history_[key])
        np.testing.assert_array_equal(ax.lines[0].get_xdata(), np.arange(1, geo.n_iter_ + 1))
        assert ax.get_xlabel() == "epoch"
    assert axes[1].get_ylabel() == "Fisher–Rao chord length (rad)"
    # the straight line's values as references: its chord sum, as the history's
    assert axes[1].lines[1].get_ydata()[0] == pytest.approx(line.chord_length_)
    # the continuous length of the path returned, at the last epoch
    assert axes[1].lines[2].get_ydata()[0] == pytest.approx(geo.length_)
    assert axes[1].lines[2].get_xdata()[0] == geo.n_iter_
    assert axes[2].lines[1].get_ydata()[0] == pytest.approx(line.euclidean_length_)
    assert axes[0].lines[1].get_ydata()[0] == pytest.approx(line.energy_)


def test_history_omits_the_lines_energy_for_another_divergence(fitted):
    line = fitted[0]
    a, b, X, _ = _pair()
    other = GeodesicConnector(
        curve="chain", n_points=4, max_iter=2, divergence="hellinger", device="cpu"
    )
    other.fit(X, model_a=a, model_b=b)
    axes = plot_history(other, baseline=line)
    assert len(axes[0].lines) == 1  # a JSD energy is not comparable with a Hellinger one
    assert len(axes[1].lines) == 3  # its chords, the line's, and its continuous length_
    assert "squared Hellinger" in axes[0].get_title()


def test_history_draws_a_curves_record_with_its_energy_in_fisher_rao_units(fitted):
    line = fitted[0]
    a, b, X, _ = _pair()
    curve = GeodesicConnector(curve="bezier", n_points=5, max_iter=3, device="cpu", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        curve.fit(X, model_a=a, model_b=b)
    axes = plot_history(curve, baseline=line)
    for ax, key in zip(axes, ["energy", "length", "euclidean_length"]):
        np.testing.assert_allclose(ax.lines[0].get_ydata(), curve.history_[key])
    assert axes[0].get_title() == "energy (Fisher–Rao, rad²)"
    assert len(axes[0].lines) == 1  # the line's energy_ is a JSD sum: not drawn
    # the line's continuous length, against the curve's, marked at the last epoch
    assert axes[1].lines[1].get_ydata()[0] == pytest.approx(line.length_)
    assert axes[1].lines[2].get_ydata()[0] == pytest.approx(curve.length_)
    # the parameter-space length rises from the line's as the bends move off it
    assert curve.history_["euclidean_length"][-1] > line.euclidean_length_
    assert axes[2].lines[1].get_ydata()[0] == pytest.approx(line.euclidean_length_)


@pytest.mark.parametrize("name", list(SPECS))
def test_the_energy_panel_names_a_built_in_divergence_and_its_units(name):
    # A stand-in for a fitted connector: its history_ and its divergence parameter.
    fitted = types.SimpleNamespace(
        history_={"energy": [0.5, 0.3], "chord_length": [2.0, 1.6], "euclidean_length": [1.0, 1.1]},
        divergence=name,
    )
    spec = SPECS[name]
    assert plot_history(fitted)[0].get_title() == f"energy ({spec.label}, {spec.units})"


def test_history_needs_a_fitted_connector():
    with pytest.raises(ValueError, match="fit"):
        plot_history(GeodesicConnector())
    with pytest.raises(TypeError, match="history_"):
        plot_history({"energy": [1.0]})


def test_history_draws_into_three_given_axes(fitted):
    _, geo, _, _ = fitted
    _, axes = plt.subplots(1, 3)
    out = plot_history(geo.history_, ax=axes)
    assert all(o is a for o, a in zip(out, axes))
    with pytest.raises(ValueError, match="three Axes"):
        plot_history(geo, ax=axes[0])


# -- plot_loss_plane ---------------------------------------------------------------------


def test_loss_plane_puts_the_ends_on_the_first_axis(fitted):
    line, geo, X, y = fitted
    ax = plot_loss_plane({"linear": line, "geodesic": geo}, X, y, resolution=4)
    theta = line.path_.parameters_vector().double()
    span = float((theta[-1] - theta[0]).norm())
    linear_line, geodesic_line = ax.lines[0], ax.lines[1]
    np.testing.assert_allclose(linear_line.get_xdata(), np.linspace(0, span, 5), atol=1e-5)
    np.testing.assert_allclose(linear_line.get_ydata(), 0.0, atol=1e-5)
    for line2d in (linear_line, geodesic_line):
        np.testing.assert_allclose(line2d.get_xdata()[[0, -1]], [0.0, span], atol=1e-5)
    # the geodesic leaves the line, on the positive side of the second axis
    assert geodesic_line.get_ydata().max() > 1e-3
    assert "parameter units" in ax.get_xlabel()
    assert "nats" in ax.figure.axes[-1].get_ylabel()  # the colour bar


def test_loss_plane_projection_preserves_the_farthest_points_distance(fitted):
    _, geo, X, y = fitted
    ax = plot_loss_plane(geo, X, y, resolution=3)
    theta = geo.path_.parameters_vector().double()
    chord = theta[-1] - theta[0]
    offsets = theta - theta[0]
    along = offsets @ chord / chord.norm()
    away = (offsets - (along / chord.norm())[:, None] * chord).norm(dim=1)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), along.numpy(), atol=1e-5)
    assert ax.lines[0].get_ydata().max() == pytest.approx(float(away.max()), rel=1e-5)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_plane_loss_at_a_path_point_is_that_points_loss(batchnorm):
    a, b, X, y = _pair(batchnorm=batchnorm, seed=3)
    geo = GeodesicConnector(n_points=4, max_iter=3, device="cpu", random_state=0)
    geo.fit(X, model_a=a, model_b=b)
    path = geo.path_
    losses = _grid_losses(path, path.parameters_vector(), X, y, batchnorm_X=X, batch_size=256)
    expected = evaluate_path(path, X, y).loss
    # the ends keep their own BatchNorm statistics; the plane recomputes them on X
    inner = slice(None) if not batchnorm else slice(1, -1)
    np.testing.assert_allclose(losses[inner], expected[inner], rtol=1e-4, atol=1e-5)


def test_loss_plane_leaves_the_paths_unchanged(fitted):
    line, geo, X, y = fitted
    before = geo.path_.parameters_vector().clone()
    plot_loss_plane({"linear": line, "geodesic": geo}, X, y, resolution=3)
    assert torch.equal(geo.path_.parameters_vector(), before)


def test_loss_plane_needs_a_point_off_the_line(fitted):
    line, _, X, y = fitted
    with pytest.raises(ValueError, match="off the line"):
        plot_loss_plane(line, X, y, resolution=3)


def test_loss_plane_needs_paths_with_the_same_ends(fitted):
    _, geo, X, y = fitted
    a, b, _, _ = _pair(seed=7)
    other = ModelPath.linear(a, b, 5)
    with pytest.raises(ValueError, match="share its ends"):
        plot_loss_plane({"geodesic": geo, "other": other}, X, y, resolution=3)


def test_loss_plane_rejects_what_is_not_a_path(fitted):
    _, _, X, y = fitted
    with pytest.raises(TypeError, match="ModelPath"):
        plot_loss_plane({"bad": 3}, X, y)
    with pytest.raises(ValueError, match="resolution"):
        plot_loss_plane(fitted[1], X, y, resolution=1)


def test_history_marks_each_refinement_of_a_coarse_to_fine_fit():
    history = {
        "energy": [0.5, 0.4, 0.6, 0.3, 0.2],
        "chord_length": [2.0, 1.8, 2.2, 1.7, 1.6],
        "euclidean_length": [10.0, 10.5, 11.0, 11.2, 11.3],
        "n_points": [4, 4, 7, 7, 7],
    }
    axes = plot_history(history)
    for ax in axes:
        assert "coarse, N = 4" in ax.get_xlabel()
        refinements = [ln for ln in ax.lines if ln.get_linestyle() == ":"]
        assert [ln.get_xdata()[0] for ln in refinements] == [2.5]  # between epochs 2 and 3
        (shade,) = ax.patches
        assert shade.get_x() == 0.5 and shade.get_width() == 2.0  # epochs 1 and 2
    single = plot_history({**history, "n_points": [7] * 5})
    assert single[0].get_xlabel() == "epoch"
    assert len(single[0].patches) == 0
