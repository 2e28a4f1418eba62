"""Paths between networks of every kind: normalisation layers, dropout, residual
blocks, integer buffers, and inputs of any shape.

For each kind a straight line and a few-epoch geodesic are fitted, and the tests
check what DESIGN.md promises of a path's state: the ends compute what the models
compute, interior BatchNorm statistics are recomputed on the fit data exactly as
``torch.optim.swa_utils.update_bn`` would (never interpolated), integer buffers stay
integers, other buffers come from model_a, and dropout is off while fitting.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.models import ResidualBlock

N_POINTS = 4
N_SAMPLES = 96
BATCH_SIZE = 40  # 96 = 40 + 40 + 16: several batches, none of one sample


class Counter(nn.Module):
    """Adds a learned bias; carries an integer buffer and a float buffer that are
    not BatchNorm statistics (so they must be shared, taken from model_a)."""

    def __init__(self, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("scale", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def tabular_batchnorm() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 3)
    )


def signal_batchnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def image_batchnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout2d(0.3),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


def volume_batchnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1),
        nn.BatchNorm3d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    )


def tabular_layernorm() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 10), nn.LayerNorm(10), nn.GELU(), nn.Dropout(0.5), nn.Linear(10, 3)
    )


def signal_groupnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def image_residual() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        ResidualBlock(4, 4),
        ResidualBlock(4, 6, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def tabular_residual_buffers() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 8),
        Residual(nn.Sequential(nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8))),
        Counter(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


@dataclass
class Kind:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


KINDS = {
    "tabular-batchnorm1d-dropout": Kind(tabular_batchnorm, (6,)),
    "signal-conv1d-batchnorm1d": Kind(signal_batchnorm, (2, 16)),
    "image-conv2d-batchnorm2d-dropout2d": Kind(image_batchnorm, (1, 8, 8)),
    "volume-conv3d-batchnorm3d": Kind(volume_batchnorm, (1, 4, 4, 4)),
    "tabular-layernorm-dropout": Kind(tabular_layernorm, (6,)),
    "signal-groupnorm": Kind(signal_groupnorm, (2, 16)),
    "image-residual-batchnorm": Kind(image_residual, (1, 8, 8)),
    "tabular-residual-integer-buffer": Kind(tabular_residual_buffers, (6,)),
}


def build_pair(kind: Kind, seed: int = 0) -> tuple[nn.Module, nn.Module, np.ndarray]:
    """Two models of ``kind`` with distinct, non-trivial state, and inputs for them."""
    models = []
    with torch.random.fork_rng():
        for k in range(2):
            torch.manual_seed(2 * seed + k)
            model = kind.build()
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, _BatchNorm):
                        module.running_mean.normal_(0.0, 0.3)
                        module.running_var.uniform_(0.5, 2.0)
                        module.num_batches_tracked.fill_(17 + k)
                        module.weight.uniform_(0.5, 1.5)
                    if isinstance(module, Counter):
                        module.step.fill_(5 + k)  # differs, but is not used by forward
                        module.scale.copy_(torch.linspace(0.5, 1.5, len(module.scale)))
            models.append(model.eval())
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N_SAMPLES, *kind.input_shape)).astype(np.float32)
    return models[0], models[1], X


def fit_both(kind: Kind) -> tuple[nn.Module, nn.Module, np.ndarray, dict]:
    a, b, X = build_pair(kind)
    line = LinearConnector(n_points=N_POINTS, device="cpu").fit(X, model_a=a, model_b=b)
    geodesic = GeodesicConnector(
        n_points=N_POINTS, max_iter=2, batch_size=BATCH_SIZE, device="cpu", random_state=0
    ).fit(X, model_a=a, model_b=b)
    return a, b, X, {"linear": line, "geodesic": geodesic}


@pytest.fixture(scope="module", params=sorted(KINDS))
def fitted(request):
    return (request.param, *fit_both(KINDS[request.param]))


def outputs(model: nn.Module, X: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).eval()(torch.as_tensor(X))


def state_dicts_equal(m1: nn.Module, m2: nn.Module) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(
        s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]) for k in s1
    )


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


def test_interior_batchnorm_statistics_are_recomputed_as_update_bn_does(fitted):
    kind, _, _, X, connectors = fitted
    for name, connector in connectors.items():
        path = connector.path_
        if not path.has_batchnorm:
            continue
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
            update_bn(loader, reference)
            for (key, got), expected in zip(point.named_buffers(), reference.buffers()):
                if got.is_floating_point():
                    torch.testing.assert_close(got, expected, msg=f"{kind} {name} {key}")


def test_interior_batchnorm_statistics_are_not_interpolated(fitted):
    _, a, b, _, connectors = fitted
    path = connectors["linear"].path_
    if not path.has_batchnorm:
        pytest.skip("no BatchNorm")
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


def test_buffers_that_are_not_batchnorm_statistics_come_from_model_a():
    a, b, X = build_pair(KINDS["tabular-residual-integer-buffer"])
    line = LinearConnector(n_points=N_POINTS, device="cpu").fit(X, model_a=a, model_b=b)
    assert int(a[2].step) != int(b[2].step)
    for point in line.path_:
        counter = point[2]
        assert counter.step.dtype == torch.long and int(counter.step) == int(a[2].step)
        assert torch.equal(counter.scale, a[2].scale)


def test_a_float_buffer_that_differs_between_the_models_is_reported():
    a, b, X = build_pair(KINDS["tabular-residual-integer-buffer"])
    with torch.no_grad():
        b[2].scale.mul_(2.0)
    with pytest.warns(UserWarning, match=r"Buffer '2\.scale' differs"):
        LinearConnector(n_points=3, device="cpu").fit(X, model_a=a, model_b=b)


def test_the_path_between_two_copies_of_one_model_stays_at_it(fitted):
    kind_name = fitted[0]
    a, _, X = build_pair(KINDS[kind_name])
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

    a, b, X = build_pair(Kind(build, (6,)))
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


def test_fitting_leaves_the_models_untouched(fitted):
    kind_name = fitted[0]
    a, b, X = build_pair(KINDS[kind_name])
    a.train()
    before_a, before_b = copy.deepcopy(a), copy.deepcopy(b)
    LinearConnector(n_points=3, device="cpu").fit(X, model_a=a, model_b=b)
    GeodesicConnector(n_points=3, max_iter=1, device="cpu", random_state=0).fit(
        X, model_a=a, model_b=b
    )
    assert a.training and not b.training
    assert state_dicts_equal(a, before_a) and state_dicts_equal(b, before_b)
