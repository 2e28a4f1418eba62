"""Paths between networks of every kind: normalisation layers, dropout, residual
blocks, integer buffers, and inputs of any shape.

For each kind of the zoo (tests/zoo.py) a straight line and a few-epoch geodesic are
fitted, and the tests check what DESIGN.md promises of a path's state: the ends
compute what the models compute, interior BatchNorm statistics are recomputed on the
fit data exactly as ``torch.optim.swa_utils.update_bn`` would (never interpolated),
integer buffers stay integers, other buffers come from model_a, and dropout is off
while fitting.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset
from zoo import KINDS, Counter, Kind, build_pair, kinds

from geoconnect import GeodesicConnector, LinearConnector

N_POINTS = 4
N_SAMPLES = 96
BATCH_SIZE = 40  # 96 = 40 + 40 + 16: several batches, none of one sample

# What the layer tags of tests/zoo.py promise a kind has, as a test of its modules.
HAS = {
    "batchnorm": lambda m: isinstance(m, _BatchNorm),
    "layernorm": lambda m: isinstance(m, nn.LayerNorm),
    "groupnorm": lambda m: isinstance(m, nn.GroupNorm),
    "dropout": lambda m: isinstance(m, _DropoutNd),
    "conv1d": lambda m: isinstance(m, nn.Conv1d),
    "conv2d": lambda m: isinstance(m, nn.Conv2d),
    "conv3d": lambda m: isinstance(m, nn.Conv3d),
    "integer-buffer": lambda m: isinstance(m, Counter),
}


def fit_both(kind: Kind | str) -> tuple[nn.Module, nn.Module, np.ndarray, dict]:
    a, b, X = build_pair(kind, n=N_SAMPLES)
    line = LinearConnector(n_points=N_POINTS, device="cpu").fit(X, model_a=a, model_b=b)
    geodesic = GeodesicConnector(
        n_points=N_POINTS, max_iter=2, batch_size=BATCH_SIZE, device="cpu", random_state=0
    ).fit(X, model_a=a, model_b=b)
    return a, b, X, {"linear": line, "geodesic": geodesic}


@pytest.fixture(scope="module", params=kinds())
def fitted(request):
    return (request.param, *fit_both(request.param))


def outputs(model: nn.Module, X: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).eval()(torch.as_tensor(X))


def state_dicts_equal(m1: nn.Module, m2: nn.Module) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(
        s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]) for k in s1
    )


@pytest.mark.parametrize("kind", kinds())
def test_the_zoo_tags_say_what_each_kind_has(kind):
    modules = list(build_pair(kind, n=1)[0].modules())
    for tag, has in HAS.items():
        assert any(map(has, modules)) == (tag in KINDS[kind].tags), tag


def test_the_ends_compute_what_the_models_compute(fitted):
    _, a, b, X, connectors = fitted
    for name, connector in connectors.items():
        path = connector.path_
        torch.testing.assert_close(outputs(path[0], X), outputs(a, X), msg=name)
        torch.testing.assert_close(outputs(path[-1], X), outputs(b, X), msg=name)
        # the batched evaluation agrees with the point modules
        logits = path.logits(torch.as_tensor(X))
        torch.testing.assert_close(logits[0], outputs(a, X), msg=name)
        torch.testing.assert_close(logits[-1], outputs(b, X), msg=name)


def test_the_ends_keep_the_models_own_state(fitted):
    _, a, b, _, connectors = fitted
    for connector in connectors.values():
        path = connector.path_
        ends = {"a": (path[0], a), "b": (path[-1], b)}
        for label, (point, model) in ends.items():
            for (name, got), expected in zip(point.named_buffers(), model.buffers()):
                is_bn_stat = name.rsplit(".", 1)[-1] in {
                    "running_mean",
                    "running_var",
                    "num_batches_tracked",
                }
                if is_bn_stat or label == "a":
                    assert torch.equal(got, expected), (label, name)


@pytest.mark.parametrize("fitted", kinds("batchnorm"), indirect=True)
def test_interior_batchnorm_statistics_are_recomputed_as_update_bn_does(fitted):
    kind, _, _, X, connectors = fitted
    for name, connector in connectors.items():
        path = connector.path_
        assert path.has_batchnorm, name
        # LinearConnector recomputes with batches of 256, GeodesicConnector its own.
        batch_size = getattr(connector, "batch_size", 256)
        loader = DataLoader(TensorDataset(torch.as_tensor(X)), batch_size=batch_size)
        for i in range(1, len(path) - 1):
            point = path[i]
            reference = copy.deepcopy(point)
            for module in reference.modules():
                if isinstance(module, _BatchNorm):  # forget what the path computed
                    module.running_mean.fill_(123.0)
                    module.running_var.fill_(456.0)
                if isinstance(module, _DropoutNd):  # off, as documented: update_bn's train
                    module.p = 0.0  # mode would turn on a dropout that precedes a BatchNorm
            update_bn(loader, reference)
            for (key, got), expected in zip(point.named_buffers(), reference.buffers()):
                if got.is_floating_point():
                    torch.testing.assert_close(got, expected, msg=f"{kind} {name} {key}")


@pytest.mark.parametrize("fitted", kinds("batchnorm"), indirect=True)
def test_interior_batchnorm_statistics_are_not_interpolated(fitted):
    _, a, b, _, connectors = fitted
    path = connectors["linear"].path_
    assert path.has_batchnorm
    mid, t = path[1], 1 / (len(path) - 1)
    for (key, got), ba, bb in zip(mid.named_buffers(), a.buffers(), b.buffers()):
        if key.endswith("running_var"):
            assert not torch.allclose(got, (1 - t) * ba + t * bb)


def test_integer_buffers_stay_integers(fitted):
    _, a, _, _, connectors = fitted
    dtypes = {k: v.dtype for k, v in a.state_dict().items()}
    for connector in connectors.values():
        path = connector.path_
        for point in path:
            for key, value in point.state_dict().items():
                assert value.dtype == dtypes[key], key
                if not value.is_floating_point():
                    assert int(value) == value.item() >= 0
        for stack in path.batchnorm_buffers.values():
            assert stack.dtype in (torch.float32, torch.long)


def counters(model: nn.Module) -> dict[str, Counter]:
    found = {name: m for name, m in model.named_modules() if isinstance(m, Counter)}
    assert found
    return found


@pytest.mark.parametrize("kind", kinds("integer-buffer"))
def test_buffers_that_are_not_batchnorm_statistics_come_from_model_a(kind):
    a, b, X = build_pair(kind, n=N_SAMPLES)
    line = LinearConnector(n_points=N_POINTS, device="cpu").fit(X, model_a=a, model_b=b)
    counters_a, counters_b = counters(a), counters(b)
    for name, counter_a in counters_a.items():
        assert int(counter_a.step) != int(counters_b[name].step)
    for point in line.path_:
        for name, counter in counters(point).items():
            counter_a = counters_a[name]
            assert counter.step.dtype == torch.long and int(counter.step) == int(counter_a.step)
            assert torch.equal(counter.scale, counter_a.scale)


@pytest.mark.parametrize("kind", kinds("integer-buffer"))
def test_a_float_buffer_that_differs_between_the_models_is_reported(kind):
    a, b, X = build_pair(kind, n=N_SAMPLES)
    name, counter_b = next(iter(counters(b).items()))
    with torch.no_grad():
        counter_b.scale.mul_(2.0)
    with pytest.warns(UserWarning, match=rf"Buffer '{re.escape(name)}\.scale' differs"):
        LinearConnector(n_points=3, device="cpu").fit(X, model_a=a, model_b=b)


@pytest.mark.parametrize("kind", kinds())
def test_the_path_between_two_copies_of_one_model_stays_at_it(kind):
    a, _, X = build_pair(kind, n=N_SAMPLES)
    line = LinearConnector(n_points=3, device="cpu").fit(X, model_a=a, model_b=copy.deepcopy(a))
    # interior statistics are recomputed on X, so they need not be a's: compare
    # parameters, which must be exactly a's.
    for point in line.path_:
        for p, q in zip(point.parameters(), a.parameters()):
            torch.testing.assert_close(p, q)


class ModeProbe(nn.Module):
    """Records whether it ran in training mode; module-level so copies share it."""

    seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ModeProbe.seen.append(self.training)
        return x


@pytest.mark.parametrize("connector", ["linear", "geodesic"])
def test_dropout_is_off_while_fitting(connector):
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(6, 12), nn.BatchNorm1d(12), ModeProbe(), nn.Dropout(0.9), nn.Linear(12, 3)
        )

    a, b, X = build_pair(Kind("probe", build, (6,), {"batchnorm", "dropout"}), n=N_SAMPLES)
    ModeProbe.seen.clear()
    if connector == "linear":
        est = LinearConnector(n_points=N_POINTS, device="cpu")
    else:
        est = GeodesicConnector(
            n_points=N_POINTS, max_iter=2, batch_size=BATCH_SIZE, device="cpu", random_state=0
        )
    est.fit(X, model_a=a, model_b=b)
    assert ModeProbe.seen and not any(ModeProbe.seen)
    # and the fitted path is deterministic: dropout would make two passes differ
    x = torch.as_tensor(X)
    torch.testing.assert_close(est.path_.logits(x), est.path_.logits(x), rtol=0, atol=0)
    assert not a.training and not b.training


@pytest.mark.parametrize("kind", kinds())
def test_fitting_leaves_the_models_untouched(kind):
    a, b, X = build_pair(kind, n=N_SAMPLES)
    a.train()
    before_a, before_b = copy.deepcopy(a), copy.deepcopy(b)
    LinearConnector(n_points=3, device="cpu").fit(X, model_a=a, model_b=b)
    GeodesicConnector(n_points=3, max_iter=1, device="cpu", random_state=0).fit(
        X, model_a=a, model_b=b
    )
    assert a.training and not b.training
    assert state_dicts_equal(a, before_a) and state_dicts_equal(b, before_b)
