"""Odd but plausible inputs get a clear error naming the argument, the cause and the fix.

Compiled, lazy, weight-normed or weightless models; devices that hold no data; X that
overflows the models' dtype; one-shot streams; string labels from a DataLoader. Each
used to end in a raw torch traceback or a misleading message.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from geoconnect import GeodesicConnector, LinearConnector

CONNECTORS = [
    pytest.param(lambda **kw: GeodesicConnector(**{"max_iter": 2, **kw}), id="geodesic"),
    pytest.param(LinearConnector, id="linear"),
]

N_FEATURES, N_CLASSES = 4, 3

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.\\w+` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
]


def linear(seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(N_FEATURES, N_CLASSES)


def samples(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, N_FEATURES)).astype(np.float32)


def fit(make, X=None, model_a=None, model_b=None, **params):
    params = {"device": "cpu", "n_points": 3, **params}
    model_a = linear(0) if model_a is None else model_a
    model_b = linear(1) if model_b is None else model_b
    X = samples() if X is None else X
    return make(**params).fit(X, model_a=model_a, model_b=model_b)


# -- 1. TorchScript ----------------------------------------------------------------------


def _scripted():
    return torch.jit.script(linear(0)), torch.jit.script(linear(1))


def _traced():
    x = torch.zeros(2, N_FEATURES)
    return torch.jit.trace(linear(0), x), torch.jit.trace(linear(1), x)


def _nested():
    return (
        nn.Sequential(torch.jit.script(linear(0))),
        nn.Sequential(torch.jit.script(linear(1))),
    )


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize("build", [_scripted, _traced, _nested], ids=["script", "trace", "nested"])
def test_a_torchscript_model_is_refused_asking_for_the_original_module(make, build):
    model_a, model_b = build()
    with pytest.raises(TypeError, match=r"model_a.*torch\.jit scripted or traced") as info:
        fit(make, model_a=model_a, model_b=model_b)
    message = str(info.value)
    assert "original torch.nn.Module" in message
    assert "calls it functionally" in message
    assert "Pass the un-scripted nn.Module" in message


# -- 2. lazy modules ---------------------------------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
def test_an_uninitialised_lazy_model_is_refused_asking_for_one_forward_pass(make):
    with pytest.raises(ValueError, match=r"model_a has an uninitialised parameter 'w") as info:
        fit(make, model_a=nn.LazyLinear(N_CLASSES), model_b=nn.LazyLinear(N_CLASSES))
    assert "lazy module" in str(info.value)
    assert "Run one forward pass on a batch first" in str(info.value)


def test_a_lazy_model_initialised_by_one_forward_pass_connects():
    X = samples()
    model_a, model_b = nn.LazyLinear(N_CLASSES), nn.LazyLinear(N_CLASSES)
    with torch.no_grad():
        model_a(torch.as_tensor(X[:2]))
        model_b(torch.as_tensor(X[:2]))
    assert fit(LinearConnector, X, model_a, model_b).predict(X).shape == (10,)


# -- 3. legacy weight_norm ---------------------------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
def test_legacy_weight_norm_is_refused_naming_the_parametrization_and_removal(make):
    with warnings.catch_warnings():  # torch deprecates torch.nn.utils.weight_norm itself
        warnings.simplefilter("ignore")
        model_a = nn.Sequential(torch.nn.utils.weight_norm(linear(0)))
        model_b = nn.Sequential(torch.nn.utils.weight_norm(linear(1)))
    with pytest.raises(ValueError, match=r"model_a uses the legacy torch\.nn\.utils\.weight_norm"):
        fit(make, model_a=model_a, model_b=model_b)
    with pytest.raises(ValueError, match=r"submodule '0', weight 'weight'") as info:
        fit(make, model_a=model_a, model_b=model_b)
    assert "torch.nn.utils.parametrizations.weight_norm" in str(info.value)
    assert "torch.nn.utils.remove_weight_norm" in str(info.value)


def test_weight_norm_as_a_parametrization_connects():
    weight_norm = torch.nn.utils.parametrizations.weight_norm
    X = samples()
    line = fit(LinearConnector, X, weight_norm(linear(0)), weight_norm(linear(1)))
    assert line.predict(X).shape == (10,)


# -- 4. the meta device ------------------------------------------------------------------


@pytest.mark.parametrize("make", CONNECTORS)
def test_a_model_on_the_meta_device_is_refused_asking_to_load_its_weights(make):
    with torch.device("meta"):
        model_a, model_b = nn.Linear(N_FEATURES, N_CLASSES), nn.Linear(N_FEATURES, N_CLASSES)
    with pytest.raises(ValueError, match=r"model_a's parameter 'weight' is on the 'meta'") as info:
        fit(make, model_a=model_a, model_b=model_b)
    assert "no values" in str(info.value)
    assert "Load its weights first" in str(info.value)
    assert "load_state_dict(state_dict, assign=True)" in str(info.value)


@pytest.mark.parametrize("make", CONNECTORS)
def test_device_meta_is_refused_because_no_data_can_live_there(make):
    with pytest.raises(ValueError, match=r"'device' parameter of \w+ asks for 'meta'") as info:
        fit(make, device="meta")
    assert "no data can live there" in str(info.value)
    assert "'cpu'" in str(info.value)


@pytest.mark.parametrize("make", CONNECTORS)
def test_device_xla_without_its_backend_is_refused_naming_the_devices_that_work(make):
    try:
        torch.empty(1, device="xla")
    except Exception:
        pass
    else:  # pragma: no cover - only where torch_xla is installed
        pytest.skip("xla works here")
    with pytest.raises(ValueError, match=r"'device' parameter of \w+ asks for 'xla'") as info:
        fit(make, device="xla")
    message = str(info.value)
    assert "backend is not installed or not usable here" in message
    assert "install torch_xla" in message
    assert "devices that work here: 'auto', 'cpu'" in message


# -- 5. X beyond float32's range ---------------------------------------------------------


def _overflowing(kind: str):
    X = samples().astype(np.float64)
    X[3, 1] = -1e300
    if kind == "array":
        return X
    if kind == "tensor":
        return torch.as_tensor(X)
    return DataLoader(TensorDataset(torch.as_tensor(X), torch.zeros(10, dtype=torch.long)), 5)


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize("kind", ["array", "tensor", "dataloader"])
def test_float64_x_overflowing_float32_is_reported_as_out_of_range_not_nan(make, kind):
    with pytest.raises(ValueError, match=r"X has values beyond the range of float32") as info:
        fit(make, _overflowing(kind))
    message = str(info.value)
    assert "NaN" not in message
    assert "largest |value| is 1e+300" in message
    assert "float32's largest is 3.403e+38" in message
    assert "Rescale X" in message and "float64 models" in message


def test_float64_x_in_range_connects_and_nan_is_still_called_nan():
    X = samples().astype(np.float64) * 1e30
    assert fit(LinearConnector, X).predict(X).shape == (10,)
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        fit(LinearConnector, torch.as_tensor(X))


# -- 6. one-shot streams -----------------------------------------------------------------


class OneShot(IterableDataset):
    """An IterableDataset whose __iter__ returns the same iterator every time."""

    def __init__(self, n: int = 10):
        X = torch.as_tensor(samples(n))
        self.items = iter([(X[i], i % N_CLASSES) for i in range(n)])

    def __iter__(self):
        return self.items


class Fresh(IterableDataset):
    def __init__(self, n: int = 10):
        self.X = torch.as_tensor(samples(n))

    def __iter__(self):
        for i in range(len(self.X)):
            yield self.X[i], i % N_CLASSES


@pytest.mark.parametrize("make", CONNECTORS)
def test_a_one_shot_stream_is_reported_as_iterable_only_once_not_as_empty(make):
    with pytest.raises(ValueError, match=r"X could be iterated only once") as info:
        fit(make, DataLoader(OneShot(), batch_size=4))
    message = str(info.value)
    assert "empty" not in message
    assert "several passes" in message
    assert "__iter__ return a fresh iterator" in message
    assert "map-style Dataset" in message


@pytest.mark.parametrize("make", CONNECTORS)
def test_a_stream_with_a_fresh_iterator_per_pass_connects(make):
    X = DataLoader(Fresh(), batch_size=4)
    assert fit(make, X).predict(X).shape == (10,)


# -- 7. string labels from a DataLoader --------------------------------------------------


class StringLabels(Dataset):
    def __init__(self, n: int = 10):
        self.X = torch.as_tensor(samples(n))

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], ("cat", "dog")[i % 2]


@pytest.mark.parametrize("make", CONNECTORS)
@pytest.mark.parametrize(
    "collate",
    [None, lambda items: (torch.stack([x for x, _ in items]), np.array([y for _, y in items]))],
    ids=["list", "array"],
)
def test_string_labels_from_a_dataloader_ask_for_a_label_encoder(make, collate):
    X = DataLoader(StringLabels(), batch_size=5, collate_fn=collate)
    with pytest.raises(ValueError, match=r"X yielded string labels \('cat', 'dog'") as info:
        fit(make, X)
    assert "y must hold integer class indices" in str(info.value)
    assert "sklearn.preprocessing.LabelEncoder" in str(info.value)


def test_a_one_shot_stream_is_refused_before_a_probe_can_read_part_of_it():
    """A probe that reads one batch of a one-shot stream would leave the next pass to
    continue it: an evaluation would silently miss the first batches. It is refused
    up front instead, by evaluate as by fit."""
    conn = fit(LinearConnector)
    stream = OneShot()  # yields (x, y)
    with pytest.raises(ValueError, match=r"its __iter__ returns the same iterator"):
        conn.evaluate(DataLoader(stream, batch_size=4))
    assert len(list(stream)) == 10  # and nothing of it was read
