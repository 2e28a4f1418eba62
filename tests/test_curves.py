"""Curves trained on the loss (Garipov et al.): the law, the ends, the barrier, the API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from connecting import fit_and_check_on_digits
from hypothesis import given, settings
from hypothesis import strategies as st

from geoconnect import CurveConnector, ModelPath
from geoconnect._data import Batch
from geoconnect.curves import Curve, share_out
from geoconnect.models import make_cnn


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["bezier", "polychain"]),
    n_bends=st.integers(1, 5),
    t=st.floats(0.0, 1.0),
)
def test_a_curve_with_its_bends_on_the_line_is_the_line(kind, n_bends, t):
    a, b = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    curve = Curve(ModelPath.linear(a, b, n_bends + 2), kind)
    weights = curve.weights(torch.tensor([t], dtype=torch.float64))
    assert bool((weights >= 0).all()) and float(weights.sum()) == pytest.approx(1.0)
    point = curve.params_at(torch.tensor([t], dtype=torch.float64))
    expected = torch.lerp(a.weight.detach(), b.weight.detach(), t)
    torch.testing.assert_close(point["weight"][0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_a_curve_removes_the_linear_barrier_on_the_digits_pair(digits_pair, kind):
    pair = digits_pair
    curve = CurveConnector(curve=kind, random_state=0, device="cpu")
    fit_and_check_on_digits(curve, pair)
    with torch.no_grad():  # the curve's end is model_b
        x = torch.as_tensor(pair.X[:16])
        torch.testing.assert_close(curve.curve_.at(1.0)(x), pair.model_b(x), rtol=0, atol=0)
    assert curve.n_iter_ == len(curve.history_["loss"]) <= curve.max_iter


def test_a_batchnorm_curve_recomputes_its_statistics(digits):
    X, y = digits.images_train[:256], digits.y_train[:256]
    a, b = make_cnn(width=4, seed=1).eval(), make_cnn(width=4, seed=2).eval()
    curve = CurveConnector(n_points=5, max_iter=2, random_state=0, device="cpu").fit(
        X, y, model_a=a, model_b=b
    )
    with torch.no_grad():
        x = torch.as_tensor(X[:8], dtype=torch.float32)
        torch.testing.assert_close(curve.path_[-1](x), b(x), rtol=0, atol=0)
    assert np.isfinite(curve.evaluate(X, y).loss).all()
    assert isinstance(curve.curve_.at(0.3, X), torch.nn.Module)
    with pytest.raises(ValueError, match="needs X"):
        curve.curve_.at(0.3)


def test_a_curve_needs_labels(small_pair):
    curve = CurveConnector(n_points=5, max_iter=2, device="cpu")
    with pytest.raises(ValueError, match="needs labels: pass y"):
        curve.fit(small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert not hasattr(curve, "path_")


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    parts=st.integers(1, 6),
    least=st.sampled_from([1, 2]),
)
def test_a_short_step_is_shared_out_evenly_and_keeps_every_sample_in_order(sizes, parts, least):
    batches, start = [], 0
    for size in sizes:
        index = torch.arange(start, start + size)
        batches.append(Batch(index[:, None].float(), index, None))
        start += size
    shared = share_out(batches, parts, least)
    if len(batches) >= parts:
        assert shared is batches  # a full step: the batches as they are
        return
    assert torch.equal(torch.cat([b.y for b in shared]), torch.arange(start))
    assert torch.equal(torch.cat([b.x for b in shared])[:, 0], torch.arange(start).float())
    lengths = [len(b.y) for b in shared]
    assert len(shared) == max(1, min(parts, start // least))
    assert max(lengths) - min(lengths) <= 1
    assert min(lengths) >= least or len(shared) == 1
