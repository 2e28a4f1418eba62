"""Bad input gets a clear ValueError or TypeError naming the argument and the fix.

Never a raw torch error from deep inside, never a silent NaN path; and the user's
modules and arrays are never modified, even when fit fails.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_mlp, random_pair
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from geoconnect import GeodesicConnector, LinearConnector

CONNECTORS = [
    pytest.param(lambda **kw: GeodesicConnector(**{"max_iter": 2, **kw}), id="geodesic"),
    pytest.param(LinearConnector, id="linear"),
]


def fit(make, pair, X=None, y=None, **params):
    params.setdefault("device", "cpu")
    params.setdefault("n_points", 3)
    X = pair.X if X is None else X
    return make(**params).fit(X, y, model_a=pair.model_a, model_b=pair.model_b)


# -- the models ------------------------------------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
def test_models_of_different_widths_are_rejected_naming_the_parameter(make, small_pair):
    other = random_mlp((5, 9, 3), seed=7)
    with pytest.raises(ValueError, match=r"same architecture.*'0\.weight'.*\(8, 5\).*\(9, 5\)"):
        make(device="cpu").fit(small_pair.X, model_a=small_pair.model_a, model_b=other)


@pytest.mark.parametrize("make", CONNECTORS)
def test_models_with_different_layers_are_rejected_naming_the_parameter(make, small_pair):
    deeper = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(
        ValueError, match=r"same architecture.*'4\.(bias|weight)' is in model_b but not model_a"
    ):
        make(device="cpu").fit(small_pair.X, model_a=small_pair.model_a, model_b=deeper)


@pytest.mark.parametrize("make", CONNECTORS)
def test_models_of_different_dtypes_are_rejected(make, small_pair):
    double = copy.deepcopy(small_pair.model_b).double()
    with pytest.raises(ValueError, match=r"same dtypes.*'0\.weight'.*\.to\(dtype\)"):
        make(device="cpu").fit(small_pair.X, model_a=small_pair.model_a, model_b=double)


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize("which", ["model_a", "model_b"])
@pytest.mark.parametrize("bad", [lambda x: x, "a model", np.zeros(3)], ids=["fn", "str", "array"])
def test_a_model_that_is_not_a_module_is_a_type_error(make, which, bad, small_pair):
    models = {"model_a": small_pair.model_a, "model_b": small_pair.model_b, which: bad}
    with pytest.raises(TypeError, match=rf"{which} must be a torch\.nn\.Module"):
        make(device="cpu").fit(small_pair.X, **models)


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize("given", ["model_a", "model_b"])
def test_only_one_model_is_rejected(make, given, small_pair):
    with pytest.raises(ValueError, match="pass both model_a and model_b, or neither"):
        make(device="cpu").fit(small_pair.X, small_pair.y, **{given: small_pair.model_a})


@pytest.mark.parametrize("make", CONNECTORS)
def test_no_models_and_no_labels_is_rejected(make, small_pair):
    with pytest.raises(ValueError, match=r"requires y to be passed.*pass y.*or pass both models"):
        make(device="cpu").fit(small_pair.X)


def test_a_model_without_parameters_is_rejected(small_pair):
    with pytest.raises(ValueError, match="model_a has no parameters"):
        LinearConnector(device="cpu").fit(small_pair.X, model_a=nn.ReLU(), model_b=nn.ReLU())


@pytest.mark.parametrize("make", CONNECTORS)
def test_a_model_that_returns_nan_is_rejected(make, small_pair):
    broken = copy.deepcopy(small_pair.model_b)
    with torch.no_grad():
        broken[2].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="model_b returns NaN or infinite logits"):
        make(device="cpu").fit(small_pair.X, model_a=small_pair.model_a, model_b=broken)


def test_a_model_that_does_not_return_logits_is_rejected(small_pair):
    flat = nn.Sequential(nn.Linear(5, 3), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"logits of shape \(batch, n_classes\)"):
        LinearConnector(device="cpu").fit(small_pair.X, model_a=flat, model_b=copy.deepcopy(flat))


# -- the parameters --------------------------------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize("n_points", [1, 0, -3, 2.5, "5", None])
def test_n_points_must_be_an_int_of_at_least_two(make, n_points, small_pair):
    with pytest.raises(
        (ValueError, TypeError), match=r"'n_points' parameter .* int in the range \[2, inf\)"
    ):
        fit(make, small_pair, n_points=n_points)


@pytest.mark.parametrize(
    "param, value, message",
    [
        ("divergence", "euclid", r"'divergence' parameter .*'jsd'"),
        ("divergence", 3, r"'divergence' parameter"),
        ("solver", "lbfgs", r"'solver' parameter .*'adam'"),
        ("learning_rate_init", 0.0, r"'learning_rate_init' parameter .* range \(0"),
        ("learning_rate_init", -0.1, r"'learning_rate_init' parameter .* range \(0"),
        ("max_iter", 0, r"'max_iter' parameter"),
        ("batch_size", 0, r"'batch_size' parameter"),
        ("tol", -1.0, r"'tol' parameter"),
        ("n_iter_no_change", 0, r"'n_iter_no_change' parameter"),
        ("warm_start", "yes", r"'warm_start' parameter"),
        ("model_factory", "mlp", r"'model_factory' parameter"),
    ],
)
def test_bad_geodesic_parameters_are_rejected_naming_them(param, value, message, small_pair):
    with pytest.raises((ValueError, TypeError), match=message):
        fit(CONNECTORS[0].values[0], small_pair, **{param: value})


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu0", r"'device' parameter .* 'auto' or a torch device string"),
        ("cuda:7" if not torch.cuda.is_available() else "cuda:99", r"'device' parameter .*cuda"),
        (3, r"'device' parameter"),
    ],
)
def test_unknown_devices_are_rejected_naming_the_parameter(make, device, message, small_pair):
    with pytest.raises((ValueError, TypeError), match=message):
        fit(make, small_pair, device=device)


def test_a_custom_divergence_of_the_wrong_shape_is_rejected(small_pair):
    def total(p, q):
        return (p - q).square().sum()

    with pytest.raises(ValueError, match=r"divergence must return one value per sample"):
        fit(CONNECTORS[0].values[0], small_pair, curve="chain", divergence=total)


def test_a_custom_divergence_without_a_gradient_is_rejected(small_pair):
    def detached(p, q):
        return (p.softmax(-1) - q.softmax(-1)).abs().sum(-1).detach()

    with pytest.raises(ValueError, match=r"divergence returned values without a gradient"):
        fit(CONNECTORS[0].values[0], small_pair, curve="chain", divergence=detached)


# -- the data ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["array", "tensor", "loader"])
def test_x_with_nan_or_inf_is_rejected(make, bad, kind, small_pair):
    X = small_pair.X.copy()
    X[3, 1] = bad
    if kind == "tensor":
        X = torch.as_tensor(X)
    elif kind == "loader":
        X = DataLoader(TensorDataset(torch.as_tensor(X)), batch_size=16)
    with pytest.raises(ValueError, match=r"X contains (NaN|infinity)"):
        fit(make, small_pair, X=X)


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize(
    "X",
    [np.zeros((0, 5), np.float32), torch.zeros(0, 5), TensorDataset(torch.zeros(0, 5))],
    ids=["array", "tensor", "dataset"],
)
def test_empty_x_is_rejected(make, X, small_pair):
    with pytest.raises(ValueError, match=r"0 sample|X is empty"):
        fit(make, small_pair, X=X)


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize(
    "shape", [(10, 4), (10, 6), (10, 5, 2)], ids=["too-few", "too-many", "too-many-dims"]
)
def test_x_of_a_shape_the_model_rejects_names_the_shape(make, shape, small_pair):
    X = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=r"model_a cannot be applied to X: a batch of shape \(2, "):
        fit(make, small_pair, X=X)


@pytest.mark.parametrize("make", CONNECTORS)
def test_one_dimensional_x_is_rejected_with_the_fix(make, small_pair):
    with pytest.raises(ValueError, match=r"(?s)Expected 2D array.*reshape"):
        fit(make, small_pair, X=np.ones(5))


@pytest.mark.parametrize("make", CONNECTORS)
def test_x_of_strings_is_rejected(make, small_pair):
    with pytest.raises((TypeError, ValueError), match=r"X must hold numbers.*np\.asarray"):
        fit(make, small_pair, X=np.full((10, 5), "a"))


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize("n_labels", [39, 41])
def test_y_of_another_length_than_x_is_rejected(make, n_labels, small_pair):
    with pytest.raises(ValueError, match=rf"y has {n_labels} labels but X has 40 samples"):
        fit(make, small_pair, y=np.zeros(n_labels, dtype=int))


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize("label", [3, -1])
def test_labels_outside_the_models_classes_are_rejected(make, label, small_pair):
    y = small_pair.y.copy()
    y[0] = label
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\].*LabelEncoder"):
        fit(make, small_pair, y=y)
    conn = fit(make, small_pair)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        conn.evaluate(small_pair.X, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        conn.score(small_pair.X, y)


def test_labels_outside_the_classes_in_a_loader_are_rejected(small_pair):
    conn = fit(LinearConnector, small_pair)
    y = torch.full((40,), 5)
    loader = DataLoader(TensorDataset(torch.as_tensor(small_pair.X), y), batch_size=8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        conn.evaluate(loader)


def test_y_with_a_loader_is_rejected(small_pair):
    loader = DataLoader(TensorDataset(torch.as_tensor(small_pair.X)), batch_size=8)
    with pytest.raises(ValueError, match=r"y must be None when X is a Dataset or DataLoader"):
        fit(LinearConnector, small_pair, X=loader, y=small_pair.y)


def test_non_integer_labels_are_rejected(small_pair):
    conn = fit(LinearConnector, small_pair)
    with pytest.raises(ValueError, match=r"y must hold integer class indices"):
        conn.evaluate(small_pair.X, small_pair.y + 0.5)


def test_evaluate_without_labels_says_so(small_pair):
    conn = fit(LinearConnector, small_pair)
    with pytest.raises(ValueError, match=r"evaluate needs labels"):
        conn.evaluate(small_pair.X)


@pytest.mark.parametrize("make", CONNECTORS)
def test_methods_reject_x_of_another_width_than_fit(make, small_pair):
    conn = fit(make, small_pair)
    X = np.ones((4, 6), np.float32)
    for method in (conn.predict, conn.predict_proba, conn.transform):
        with pytest.raises(ValueError, match=r"X has 6 features, but \w+ is expecting 5"):
            method(X)


def test_geodesic_needs_x():
    pair = random_pair()
    with pytest.raises(ValueError, match=r"GeodesicConnector\.fit needs X"):
        GeodesicConnector(device="cpu").fit(None, model_a=pair.model_a, model_b=pair.model_b)


def test_warm_start_with_another_number_of_points_is_rejected(small_pair):
    # the chain's points are what it continues (a curve resamples its path_ at any n_points)
    conn = fit(CONNECTORS[0].values[0], small_pair, curve="chain", n_points=4, warm_start=True)
    conn.set_params(n_points=5)
    with pytest.raises(
        ValueError, match=r"warm_start=True .* 4 points.*n_points=5.*Set n_points=4"
    ):
        conn.fit(small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b)


@pytest.mark.parametrize(
    ("curve", "message"),
    [
        ("chain", r"energy became nan in epoch \d+, from a finite .* Lower learning_rate_init"),
        ("bezier", r"energy along the curve became nan in epoch \d+: lower learning_rate_init"),
    ],
)
def test_a_learning_rate_that_diverges_is_reported_not_returned(curve, message):
    pair = random_pair(scale=3.0)
    conn = GeodesicConnector(
        curve=curve, n_points=4, solver="sgd", learning_rate_init=1e30, max_iter=5, device="cpu"
    )
    with pytest.raises(ValueError, match=message):
        conn.fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    assert not hasattr(conn, "path_")


# -- nothing is modified, even on failure ------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
def test_a_failed_fit_leaves_models_and_data_unchanged(make, small_pair):
    state_a = copy.deepcopy(small_pair.model_a.state_dict())
    X = small_pair.X.copy()
    X[0, 0] = np.nan
    X_before = X.copy()
    with pytest.raises(ValueError):
        fit(make, small_pair, X=X)
    np.testing.assert_array_equal(X, X_before)
    for key, value in small_pair.model_a.state_dict().items():
        assert torch.equal(value, state_a[key])


def test_data_is_converted_at_most_once_and_a_ready_tensor_is_shared():
    # X is only read: a float32 tensor is used as it is, a float64 array is converted
    # once, and neither is written to by a fit.
    from geoconnect._data import as_data

    cpu = torch.device("cpu")
    ready = torch.randn(20, 4)
    assert as_data(ready, device=cpu).x.data_ptr() == ready.data_ptr()
    array = np.random.default_rng(0).normal(size=(20, 4))
    converted = as_data(array, device=cpu).x
    assert converted.dtype == torch.float32
    np.testing.assert_allclose(converted.numpy(), array, rtol=1e-6)
    read_only = array.copy()
    read_only.flags.writeable = False
    as_data(read_only, device=cpu)  # no warning about non-writable arrays
