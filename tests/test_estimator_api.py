"""The connectors behave as scikit-learn estimators: cloning, pipelines, search, pickling."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import sklearn
import torch
from conftest import random_pair
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from torch.utils.data import DataLoader, TensorDataset

from geoconnect import GeodesicConnector, LinearConnector


def geodesic(**params):
    # random_state: a curve's draws of t, so that two fits compare
    params = {"n_points": 4, "max_iter": 3, "device": "cpu", "random_state": 0, **params}
    return GeodesicConnector(**params)


def linear(**params):
    return LinearConnector(**{"n_points": 4, "device": "cpu", **params})


CONNECTORS = [pytest.param(geodesic, id="geodesic"), pytest.param(linear, id="linear")]


def models(pair) -> dict:
    return {"model_a": pair.model_a, "model_b": pair.model_b}


def same_path(first, second) -> bool:
    return torch.equal(first.path_.parameters_vector(), second.path_.parameters_vector())


# -- parameters ----------------------------------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
def test_clone_copies_parameters_and_drops_fitted_state(make, small_pair):
    conn = make(random_state=3).fit(small_pair.X, **models(small_pair))
    cloned = clone(conn)
    assert cloned.get_params() == conn.get_params()
    assert not hasattr(cloned, "path_")


def test_get_params_lists_the_documented_parameters():
    params = GeodesicConnector().get_params()
    for name in (
        "n_points divergence solver learning_rate_init max_iter batch_size tol "
        "n_iter_no_change device random_state verbose warm_start model_factory"
    ).split():
        assert name in params
    assert {"n_points", "device", "random_state", "model_factory"} <= set(
        LinearConnector().get_params()
    )


def test_set_params_changes_what_fit_does(small_pair):
    conn = geodesic().set_params(n_points=5, max_iter=2)
    assert conn.get_params()["n_points"] == 5
    conn.fit(small_pair.X, **models(small_pair))
    assert len(conn.path_) == 5 and conn.n_iter_ == 2


def test_init_stores_parameters_unvalidated():
    conn = GeodesicConnector(n_points="many", divergence="nope")
    assert conn.n_points == "many" and conn.divergence == "nope"


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize(
    "method",
    ["predict", "predict_proba", "transform", "evaluate", "score", "get_feature_names_out"],
)
def test_methods_before_fit_raise_not_fitted(make, method, small_pair):
    conn = make()
    args = {
        "evaluate": (small_pair.X, small_pair.y),
        "score": (small_pair.X, small_pair.y),
        "get_feature_names_out": (),
    }.get(method, (small_pair.X,))
    with pytest.raises(NotFittedError, match="not fitted yet"):
        getattr(conn, method)(*args)


@pytest.mark.parametrize("make", CONNECTORS)
def test_fit_returns_self_and_sets_n_features_in(make, small_pair):
    conn = make()
    assert conn.fit(small_pair.X, **models(small_pair)) is conn
    assert conn.n_features_in_ == 5


# -- composition ---------------------------------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
def test_a_pipeline_routes_the_models_to_its_connector_step(make, small_pair):
    pipe = Pipeline([("scale", StandardScaler()), ("conn", make())])
    pipe.fit(
        small_pair.X,
        small_pair.y,
        conn__model_a=small_pair.model_a,
        conn__model_b=small_pair.model_b,
    )
    scaled = StandardScaler().fit_transform(small_pair.X)
    alone = make().fit(scaled, **models(small_pair))
    np.testing.assert_allclose(pipe.predict_proba(small_pair.X), alone.predict_proba(scaled))
    assert pipe.score(small_pair.X, small_pair.y) == pytest.approx(
        alone.score(scaled, small_pair.y)
    )


def test_grid_search_passes_the_models_to_every_candidate(small_pair):
    a_state = copy.deepcopy(small_pair.model_a.state_dict())
    search = GridSearchCV(geodesic(random_state=0), {"n_points": [3, 5]}, cv=2)
    search.fit(small_pair.X, small_pair.y, **models(small_pair))
    assert search.best_params_["n_points"] in (3, 5)
    assert len(search.best_estimator_.path_) == search.best_params_["n_points"]
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert np.all(search.cv_results_["mean_test_score"] <= 0)  # −barrier
    for key, value in small_pair.model_a.state_dict().items():
        assert torch.equal(value, a_state[key])


def test_cross_validation_scores_are_minus_barriers(small_pair):
    scores = cross_val_score(linear(), small_pair.X, small_pair.y, cv=3, params=models(small_pair))
    assert scores.shape == (3,) and np.all(scores <= 0)


@pytest.mark.parametrize("make", CONNECTORS)
def test_metadata_routing_passes_the_models_when_requested(make, small_pair):
    with sklearn.config_context(enable_metadata_routing=True):
        conn = make().set_fit_request(model_a=True, model_b=True)
        pipe = Pipeline([("identity", FunctionTransformer()), ("conn", conn)])
        pipe.fit(small_pair.X, small_pair.y, **models(small_pair))
        expected = make().fit(small_pair.X, **models(small_pair))
        np.testing.assert_allclose(
            pipe.predict_proba(small_pair.X), expected.predict_proba(small_pair.X)
        )
        search = GridSearchCV(
            make().set_fit_request(model_a=True, model_b=True), {"n_points": [3, 4]}, cv=2
        )
        search.fit(small_pair.X, small_pair.y, **models(small_pair))
        assert search.best_params_["n_points"] in (3, 4)


def test_metadata_routing_refuses_models_that_were_not_requested(small_pair):
    with sklearn.config_context(enable_metadata_routing=True):
        pipe = Pipeline([("identity", FunctionTransformer()), ("conn", linear())])
        with pytest.raises(ValueError, match="model_a"):
            pipe.fit(small_pair.X, small_pair.y, **models(small_pair))


# -- state ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
def test_pickle_round_trip_gives_identical_predictions(make, small_pair):
    conn = make().fit(small_pair.X, **models(small_pair))
    restored = pickle.loads(pickle.dumps(conn))
    assert same_path(conn, restored)
    np.testing.assert_array_equal(
        restored.predict_proba(small_pair.X), conn.predict_proba(small_pair.X)
    )
    np.testing.assert_array_equal(restored.transform(small_pair.X), conn.transform(small_pair.X))
    assert restored.score(small_pair.X, small_pair.y) == conn.score(small_pair.X, small_pair.y)
    assert restored.get_params().keys() == conn.get_params().keys()


def test_equal_random_states_give_identical_fits():
    pair = random_pair(n_samples=100)
    first = geodesic(random_state=7, batch_size=16).fit(pair.X, **models(pair))
    second = geodesic(random_state=7, batch_size=16).fit(pair.X, **models(pair))
    other = geodesic(random_state=8, batch_size=16).fit(pair.X, **models(pair))
    assert same_path(first, second)
    # Everything but the wall-clock seconds per epoch.
    assert without_seconds(first.history_) == without_seconds(second.history_)
    assert not same_path(first, other)  # the seed decides the batch order


@pytest.mark.parametrize("make", CONNECTORS)
def test_equal_random_states_give_identical_fits_without_models(make, small_pair):
    first = make(random_state=1).fit(small_pair.X, small_pair.y)
    second = make(random_state=1).fit(small_pair.X, small_pair.y)
    assert same_path(first, second)
    assert not same_path(first, make(random_state=2).fit(small_pair.X, small_pair.y))


@pytest.mark.parametrize("make", CONNECTORS)
def test_refitting_is_idempotent(make, small_pair):
    conn = make(random_state=0).fit(small_pair.X, **models(small_pair))
    before = conn.path_.parameters_vector().clone()
    conn.fit(small_pair.X, **models(small_pair))
    assert torch.equal(conn.path_.parameters_vector(), before)


# -- kinds of X ------------------------------------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
def test_a_tensor_x_fits_the_same_path_as_an_array(make, small_pair):
    from_array = make(random_state=0).fit(small_pair.X, **models(small_pair))
    from_tensor = make(random_state=0).fit(torch.as_tensor(small_pair.X), **models(small_pair))
    assert same_path(from_array, from_tensor)
    assert from_tensor.n_features_in_ == 5
    np.testing.assert_array_equal(
        from_tensor.predict_proba(torch.as_tensor(small_pair.X)),
        from_array.predict_proba(small_pair.X),
    )


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize("with_labels", [False, True])
def test_a_dataloader_x_fits_a_path(make, with_labels, small_pair):
    tensors = [torch.as_tensor(small_pair.X)]
    if with_labels:
        tensors.append(torch.as_tensor(small_pair.y))
    loader = DataLoader(TensorDataset(*tensors), batch_size=16, shuffle=False)
    conn = make(random_state=0).fit(loader, **models(small_pair))
    from_array = make(random_state=0).fit(small_pair.X, **models(small_pair))
    assert conn.length_ == pytest.approx(from_array.length_, rel=0.2 if make is geodesic else 1e-6)
    assert conn.transform(loader).shape == (40, 4 * 3)


def test_a_dataset_x_fits_a_path(small_pair):
    dataset = TensorDataset(torch.as_tensor(small_pair.X))
    conn = geodesic(random_state=0, batch_size=16).fit(dataset, **models(small_pair))
    assert conn.n_iter_ == 3 and np.isfinite(conn.length_)


def test_a_float64_array_is_fed_to_float32_models(small_pair):
    X64 = small_pair.X.astype(np.float64)
    conn = linear().fit(X64, **models(small_pair))
    np.testing.assert_allclose(conn.predict_proba(X64), conn.predict_proba(small_pair.X))


# -- warm start -------------------------------------------------------------------------


def test_warm_start_continues_from_the_previous_path(small_pair):
    warm = geodesic(random_state=0, warm_start=True).fit(small_pair.X, **models(small_pair))
    first_energy = warm.energy_
    warm.fit(small_pair.X, **models(small_pair))
    assert warm.n_iter_ == 6
    assert len(warm.history_["energy"]) == 6
    assert warm.energy_ < first_energy
    cold = geodesic(random_state=0).fit(small_pair.X, **models(small_pair))
    cold.fit(small_pair.X, **models(small_pair))
    assert cold.n_iter_ == 3
    assert cold.energy_ == pytest.approx(first_energy)


def test_warm_start_keeps_the_newly_given_ends(small_pair):
    conn = geodesic(random_state=0, warm_start=True).fit(small_pair.X, **models(small_pair))
    other = random_pair(seed=5)
    conn.fit(small_pair.X, model_a=other.model_a, model_b=other.model_b)
    x = torch.as_tensor(small_pair.X)
    with torch.no_grad():
        torch.testing.assert_close(conn.path_[0](x), other.model_a(x))
        torch.testing.assert_close(conn.path_[-1](x), other.model_b(x))


# -- output containers and feature names --------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
def test_set_output_pandas_names_the_columns_by_point_and_class(make, small_pair):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(small_pair.X, columns=[f"f{i}" for i in range(5)])
    conn = make().set_output(transform="pandas").fit(frame, **models(small_pair))
    assert conn.feature_names_in_.tolist() == ["f0", "f1", "f2", "f3", "f4"]
    out = conn.transform(frame)
    assert isinstance(out, pd.DataFrame)
    assert out.columns.tolist() == conn.get_feature_names_out().tolist()
    assert out.columns[-1] == "point3_class2"
    np.testing.assert_allclose(
        out.to_numpy(), conn.set_output(transform="default").transform(frame)
    )


def test_a_sequential_split_by_cross_validation_gets_a_hint():
    # _is_arraylike: a Sequential with as many layers as samples is split row-wise.
    pair = random_pair(n_samples=3)
    assert len(pair.model_a) == 3
    search = GridSearchCV(linear(), {"n_points": [2]}, cv=3, error_score="raise")
    with pytest.raises(TypeError, match=r"got a list of 2 modules.*nn\.Sequential\(model\)"):
        search.fit(pair.X, pair.y, **models(pair))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_device_fits_on_cuda_and_agrees_with_the_cpu(small_pair):
    on_gpu = LinearConnector(n_points=4).fit(small_pair.X, **models(small_pair))
    on_cpu = linear().fit(small_pair.X, **models(small_pair))
    assert on_gpu.path_.device.type == "cuda"
    np.testing.assert_allclose(
        on_gpu.predict_proba(small_pair.X), on_cpu.predict_proba(small_pair.X), atol=1e-5
    )
    assert next(small_pair.model_a.parameters()).device.type == "cpu"


def without_seconds(history: dict) -> dict:
    return {key: values for key, values in history.items() if key != "seconds"}
