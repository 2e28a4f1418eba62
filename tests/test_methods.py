"""Every path method on the suite's small architectures, and in scikit-learn's tools.

The line with REPAIR, the curves of Garipov et al. and the nudged elastic band share
the estimator API with the geodesic: each keeps its ends exact, leaves the user's
modules and data alone, and composes with Pipeline and GridSearchCV.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from zoo import build_pair

from geoconnect import CurveConnector, GeodesicConnector, LinearConnector, NEBConnector

pytestmark = [
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
    # two epochs on random networks may end above the line: the fit says so and
    # returns the line, which keeps its ends all the same
    pytest.mark.filterwarnings("ignore:The fit ended with energy:RuntimeWarning"),
]

SMALL = {"n_points": 4, "device": "cpu", "random_state": 0}

METHODS = {
    "linear + REPAIR": lambda **kw: LinearConnector(repair=True, **{**SMALL, **kw}),
    "Bezier": lambda **kw: CurveConnector(max_iter=2, n_bends=2, **{**SMALL, **kw}),
    "polychain": lambda **kw: CurveConnector(curve="polychain", max_iter=2, **{**SMALL, **kw}),
    "NEB": lambda **kw: NEBConnector(max_iter=2, **{**SMALL, **kw}),
    "NEB, inserting": lambda **kw: NEBConnector(max_iter=2, insert_points=1, **{**SMALL, **kw}),
    "geodesic": lambda **kw: GeodesicConnector(max_iter=2, **{**SMALL, **kw}),
}
LABELLED = {"Bezier", "polychain", "NEB", "NEB, inserting"}
KINDS = [
    "tabular-mlp",
    "image-cnn-batchnorm",
    "image-layernorm",
    "tabular-residual-integer-buffer",
    "image-resnet-batchnorm",
]


def _labels(model: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        n_classes = model(torch.as_tensor(X[:2])).shape[1]
    return np.random.default_rng(0).integers(0, n_classes, len(X))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_its_ends_and_the_users_inputs(method, kind):
    a, b, X = build_pair(kind)
    y = _labels(a, X) if method in LABELLED else None
    states = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    X_before = X.copy()
    conn = METHODS[method]().fit(X, y, model_a=a, model_b=b)
    x = torch.as_tensor(X[:16])
    with torch.no_grad():
        torch.testing.assert_close(conn.path_[0](x), a(x), rtol=0, atol=0)
        torch.testing.assert_close(conn.path_[-1](x), b(x), rtol=0, atol=0)
        for point in conn.path_:
            assert bool(torch.isfinite(point(x)).all())
    assert len(conn.path_) == 4 and np.isfinite(conn.length_)
    for model, state in zip((a, b), states):
        assert not model.training
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key])
    np.testing.assert_array_equal(X, X_before)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_works_in_a_pipeline(method, small_pair):
    y = small_pair.y if method in LABELLED else None
    pipe = Pipeline([("scale", StandardScaler()), ("conn", METHODS[method]())])
    pipe.fit(small_pair.X, y, conn__model_a=small_pair.model_a, conn__model_b=small_pair.model_b)
    scaled = StandardScaler().fit_transform(small_pair.X)
    alone = METHODS[method]().fit(scaled, y, model_a=small_pair.model_a, model_b=small_pair.model_b)
    np.testing.assert_allclose(pipe.predict_proba(small_pair.X), alone.predict_proba(scaled))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_searched_by_grid_search(method, small_pair):
    search = GridSearchCV(METHODS[method](), {"n_points": [4, 5]}, cv=2, error_score="raise")
    search.fit(small_pair.X, small_pair.y, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert len(search.best_estimator_.path_) == search.best_params_["n_points"]
    assert np.all(search.cv_results_["mean_test_score"] <= 0)  # minus the barrier


@pytest.mark.parametrize("method", ["linear + REPAIR", "Bezier", "NEB, inserting"])
def test_every_methods_path_saves_and_loads_with_its_record(method, small_pair, tmp_path):
    from geoconnect import ModelPath

    y = small_pair.y if method in LABELLED else None
    conn = METHODS[method]().fit(
        small_pair.X, y, model_a=small_pair.model_a, model_b=small_pair.model_b
    )
    file = conn.path_.save(tmp_path / "path.safetensors")
    loaded = ModelPath.load(file, template=small_pair.model_a)
    assert torch.equal(loaded.parameters_vector(), conn.path_.parameters_vector())
    assert loaded.metadata == conn.path_.metadata
    assert loaded.metadata["connector"] == type(conn).__name__


@pytest.mark.parametrize("method", METHODS)
def test_every_method_clones_pickles_and_reproduces(method, small_pair):
    y = small_pair.y if method in LABELLED else None
    fit = {"model_a": small_pair.model_a, "model_b": small_pair.model_b}
    first = METHODS[method]().fit(small_pair.X, y, **fit)
    again = clone(first).fit(small_pair.X, y, **fit)
    np.testing.assert_array_equal(first.transform(small_pair.X), again.transform(small_pair.X))
    loaded = pickle.loads(pickle.dumps(first))
    np.testing.assert_array_equal(loaded.transform(small_pair.X), first.transform(small_pair.X))


@pytest.mark.parametrize("method", sorted(LABELLED))
def test_a_failed_refit_of_a_labelled_method_leaves_its_fit(method, small_pair):
    fit = {"model_a": small_pair.model_a, "model_b": small_pair.model_b}
    conn = METHODS[method]().fit(small_pair.X, small_pair.y, **fit)
    before, history = conn.transform(small_pair.X), copy.deepcopy(conn.history_)
    with pytest.raises(ValueError, match="needs labels"):
        conn.fit(small_pair.X, **fit)
    with pytest.raises(ValueError, match="lower learning_rate_init"):
        conn.set_params(learning_rate_init=1e30).fit(small_pair.X, small_pair.y, **fit)
    np.testing.assert_array_equal(conn.transform(small_pair.X), before)
    assert conn.history_ == history and conn.n_iter_ == len(history["loss"])
