"""The nudged elastic band on the loss: the force's laws, the barrier, insertion, the API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from connecting import fit_and_check_on_digits
from hypothesis import given, settings
from hypothesis import strategies as st

from geoconnect import ModelPath, NEBConnector, neb
from geoconnect._data import as_data
from geoconnect.fitting import FitSettings
from geoconnect.models import make_cnn
from geoconnect.neb import fit_neb, improved_tangents, insert_image, neb_gradient


def _bands(draw_n: int, n_params: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(draw_n, n_params, generator=g, dtype=torch.float64)
    energies = torch.randn(draw_n, generator=g, dtype=torch.float64)
    gradients = torch.randn(draw_n - 2, n_params, generator=g, dtype=torch.float64)
    return theta, energies, gradients


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(3, 8), n_params=st.integers(1, 6), seed=st.integers(0, 2**16), k=st.floats(0, 10)
)
def test_the_neb_force_is_the_perpendicular_gradient_plus_a_spring_along_the_tangent(
    n, n_params, seed, k
):
    theta, energies, gradients = _bands(n, n_params, seed)
    tau = improved_tangents(theta, energies)
    torch.testing.assert_close(tau.norm(dim=1), torch.ones(n - 2, dtype=torch.float64))
    minus_force = neb_gradient(theta, energies, gradients, k)
    stretch = (theta[2:] - theta[1:-1]).norm(dim=1) - (theta[1:-1] - theta[:-2]).norm(dim=1)
    along = (minus_force * tau).sum(1)
    torch.testing.assert_close(along, -k * stretch)  # along the band: the spring alone
    perpendicular = minus_force - along[:, None] * tau
    expected = gradients - (gradients * tau).sum(1, keepdim=True) * tau
    torch.testing.assert_close(perpendicular, expected)  # across it: the loss gradient


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(3, 8),
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    k=st.floats(0, 10),
)
def test_the_force_a_tensor_at_a_time_is_the_force_on_the_flattened_band(n, shapes, seed, k):
    g = torch.Generator().manual_seed(seed)
    theta = {
        f"p{i}": torch.randn(n, *s, generator=g, dtype=torch.float64) for i, s in enumerate(shapes)
    }
    grads = {
        name: torch.randn(n - 2, *v.shape[1:], generator=g, dtype=torch.float64)
        for name, v in theta.items()
    }
    energies = torch.randn(n, generator=g, dtype=torch.float64)

    def flat(stacks):
        return torch.cat([v.reshape(v.shape[0], -1) for v in stacks.values()], 1)

    for per_tensor, whole in [
        (improved_tangents(theta, energies), improved_tangents(flat(theta), energies)),
        (
            neb_gradient(theta, energies, grads, k),
            neb_gradient(flat(theta), energies, flat(grads), k),
        ),
    ]:
        assert set(per_tensor) == set(theta)
        for name, stack in per_tensor.items():
            assert stack.shape == (n - 2, *theta[name].shape[1:])
        torch.testing.assert_close(flat(per_tensor), whole, rtol=1e-12, atol=1e-12)


def test_the_improved_tangent_points_to_the_higher_neighbour():
    theta = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    towards_next = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    towards_prev = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        improved_tangents(theta, torch.tensor([0.0, 1.0, 2.0])), towards_next
    )
    torch.testing.assert_close(
        improved_tangents(theta, torch.tensor([2.0, 1.0, 0.0])), towards_prev
    )
    # a maximum whose next neighbour is higher: mostly forward, continuously
    mixed = improved_tangents(theta, torch.tensor([0.0, 1.0, 0.5]))
    assert mixed[0, 1] > mixed[0, 0] > 0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 7), data=st.data())
def test_a_band_without_steps_is_the_line_and_insertion_keeps_it_there(n, data):
    a, b = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    line = ModelPath.linear(a, b, n)
    samples = as_data(
        torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)), device="cpu"
    )
    band, history, _ = fit_neb(
        ModelPath.linear(a, b, n), samples, FitSettings(max_iter=0), torch.Generator()
    )
    assert history["loss"] == [] and len(band) == n
    for name, stack in line.params.items():
        assert torch.equal(band.params[name], stack)
    segment = data.draw(st.integers(0, n - 2))
    longer = insert_image(line, segment)
    t = torch.tensor(
        list(line.t_[: segment + 1])
        + [np.mean(line.t_[segment : segment + 2])]
        + list(line.t_[segment + 1 :]),
        dtype=torch.float64,
    )
    w = t.reshape(-1, 1, 1)
    expected = (1 - w) * a.weight.detach() + w * b.weight.detach()
    torch.testing.assert_close(longer.params["weight"], expected, rtol=1e-12, atol=1e-12)


def test_images_are_inserted_where_the_loss_is_highest():
    # One input, label 0; the logit margin of image i is d_i (weight (d_i, 0), no bias).
    margins = torch.tensor([5.0, 4.0, -6.0, -3.0, 5.0])
    weight = torch.stack([margins, torch.zeros(5)], 1).reshape(5, 2, 1)
    band = ModelPath(torch.nn.Linear(1, 2, bias=False), {"weight": weight})
    samples = as_data(torch.ones(4, 1), torch.zeros(4, dtype=torch.long), device="cpu")
    # midpoints' margins: 4.5, -1, -4.5, 1 → the third segment's loss is the highest
    longer, history, _ = fit_neb(
        band, samples, FitSettings(max_iter=0), torch.Generator(), insert_points=1
    )
    assert len(longer) == 6 and history["n_points"] == []
    torch.testing.assert_close(longer.params["weight"][3, :, 0], torch.tensor([-4.5, 0.0]))
    torch.testing.assert_close(longer.params["weight"][[0, 1, 2, 4, 5]], weight)


@pytest.mark.parametrize("kind", ["mlp", "batchnorm-cnn"])
def test_the_band_moves_the_same_whatever_the_images_per_chunk(kind, monkeypatch):
    # Each image's loss depends on its own parameters only: evaluating the images two
    # at a time or all at once gives the same steps.
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        a, b = (
            torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
            for _ in range(2)
        )
        X = torch.randn(64, 6, generator=g)
    else:
        a, b = make_cnn(width=4, seed=1), make_cnn(width=4, seed=2)
        X = torch.randn(64, 1, 8, 8, generator=g)
    samples = as_data(X, torch.randint(0, 3, (64,), generator=g), device="cpu")
    bands = {}
    for per_chunk in (2, 100):
        monkeypatch.setattr(neb, "POINTS_PER_CHUNK", per_chunk)
        band, history, _ = fit_neb(
            ModelPath.linear(a, b, 9),
            samples,
            FitSettings(max_iter=2, batch_size=16),
            torch.Generator().manual_seed(0),
        )
        bands[per_chunk] = (band.parameters_vector(), history["loss"])
    torch.testing.assert_close(bands[2][0], bands[100][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bands[2][1], bands[100][1], rtol=1e-6)


def test_a_band_removes_the_linear_barrier_on_the_digits_pair(digits_pair):
    neb = fit_and_check_on_digits(NEBConnector(random_state=0, device="cpu"), digits_pair)
    assert len(neb.path_) == neb.n_points
    assert neb.n_iter_ == len(neb.history_["loss"]) <= neb.max_iter
    assert set(neb.history_) == {"loss", "max_loss", "seconds", "n_points"}
    assert neb.history_["loss"][-1] < neb.history_["loss"][0]


def test_insert_points_grows_the_band_to_n_points(small_pair):
    neb = NEBConnector(n_points=7, insert_points=2, max_iter=6, device="cpu", random_state=0)
    neb.fit(small_pair.X, small_pair.y, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert len(neb.path_) == 7 and neb.n_iter_ <= 6
    assert neb.history_["n_points"] == [5, 5, 6, 6, 7, 7]
    with pytest.raises(ValueError, match="insert_points=5 leaves"):
        NEBConnector(n_points=7, insert_points=5, device="cpu").fit(
            small_pair.X, small_pair.y, model_a=small_pair.model_a, model_b=small_pair.model_b
        )


@pytest.mark.parametrize("insert_points", [0, 2])
def test_one_epoch_of_budget_runs_at_most_one_epoch(small_pair, insert_points):
    neb = NEBConnector(n_points=5, insert_points=insert_points, max_iter=1, device="cpu")
    neb.fit(small_pair.X, small_pair.y, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert neb.n_iter_ <= 1 and len(neb.path_) == 5


def test_a_batchnorm_band_recomputes_its_statistics(digits):
    X, y = digits.images_train[:256], digits.y_train[:256]
    a, b = make_cnn(width=4, seed=1).eval(), make_cnn(width=4, seed=2).eval()
    neb = NEBConnector(n_points=5, max_iter=2, batch_size=256, random_state=0, device="cpu")
    neb.fit(X, y, model_a=a, model_b=b)
    with torch.no_grad():
        x = torch.as_tensor(X, dtype=torch.float32)
        torch.testing.assert_close(neb.path_[0](x[:8]), a(x[:8]), rtol=0, atol=0)
        torch.testing.assert_close(neb.path_[-1](x[:8]), b(x[:8]), rtol=0, atol=0)
        for i in range(1, 4):  # one batch of all X: the first layer's mean is exact
            image = neb.path_[i]
            torch.testing.assert_close(
                image[1].running_mean, image[0](x).mean((0, 2, 3)), rtol=1e-5, atol=1e-6
            )
    assert np.isfinite(neb.evaluate(X, y).loss).all()


def test_a_band_needs_labels(small_pair):
    neb = NEBConnector(n_points=5, max_iter=2, device="cpu")
    with pytest.raises(ValueError, match="needs labels: pass y"):
        neb.fit(small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert not hasattr(neb, "path_")


def test_a_diverging_band_says_to_lower_the_learning_rate(small_pair):
    neb = NEBConnector(n_points=4, max_iter=3, learning_rate_init=1e30, device="cpu")
    with pytest.raises(ValueError, match="lower learning_rate_init"):
        neb.fit(small_pair.X, small_pair.y, model_a=small_pair.model_a, model_b=small_pair.model_b)
