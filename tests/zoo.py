"""The test zoo: small networks of every kind the library promises to handle.

One registry, :data:`KINDS`, holds every architecture the tests connect or align:
MLPs, 1-, 2- and 3-d convolutions, BatchNorm/LayerNorm/GroupNorm, dropout, residual
blocks, functional forward passes and non-BatchNorm buffers. Each :class:`Kind` has
a name (the test id), a builder, the shape of one input sample and tags saying what
it has, so that a test module picks the kinds it needs by tag::

    from zoo import build, build_pair, kinds

    @pytest.mark.parametrize("kind", kinds("batchnorm"))
    def test_something(kind):
        a, b, X = build_pair(kind)

:func:`build` makes a model from a seed inside ``torch.random.fork_rng()`` (the
global RNG is left as it was) and gives it non-trivial state: random BatchNorm
running statistics and ``num_batches_tracked``, random affine parameters of every
normalisation layer, and seed-dependent :class:`Counter` steps; models come back in
eval mode. :func:`build_pair` makes two models from one seed, and inputs for them.

Tags say what a kind has:

- layers: ``batchnorm``, ``layernorm``, ``groupnorm``, ``dropout``, ``conv1d``,
  ``conv2d``, ``conv3d``, ``flatten`` (a flatten of a spatial feature map into a
  linear layer), ``residual`` (an addition of a layer's input to its output);
- ``functional``: the forward pass is written with functional calls, not a
  ``Sequential``;
- ``integer-buffer``: :class:`Counter` modules, carrying an integer and a float
  buffer that are not BatchNorm statistics;
- ``alignable``: :class:`geoconnect.align.PermutationSpec` derives the kind's
  permutation structure by itself and finds hidden units to permute.

To add a kind, write a builder taking no arguments (a function or a module class)
and add ``Kind(name, builder, input_shape, tags)`` to :data:`KINDS` (a new tag goes
into :data:`TAGS` and the list above). The tests of tests/test_architectures.py (every
kind) and tests/test_align.py (``alignable``) pick it up; they also check the tags
that can be read off the model: test_architectures.py the normalisation, dropout,
convolution and ``integer-buffer`` tags against its modules, test_align.py that a
kind not tagged ``alignable`` is refused by the derivation or has nothing to permute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from geoconnect.models import make_cnn, make_mlp, make_resnet

# -- modules the builders use ----------------------------------------------------------


class Counter(nn.Module):
    """Adds a learned bias; carries an integer buffer and a float buffer that are
    not BatchNorm statistics (so a path must share them, taken from model_a)."""

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


class FunctionalCNN(nn.Module):
    """A CNN written with functional calls, a view and a spatial mean."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + torch.sigmoid(self.conv2(x))
        x = self.depthwise(x).relu()
        return self.fc(x.mean((2, 3)))


class FlattenCNN(nn.Module):
    """Convolutions followed by flatten of a 4×4 map and two linear layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 5, 3, padding=1), nn.GroupNorm(5, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.fc1 = nn.Linear(5 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


# -- builders --------------------------------------------------------------------------


def tabular_mlp() -> nn.Module:
    return make_mlp((6, 12, 12, 3))


def tabular_batchnorm() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 3)
    )


def tabular_layernorm() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 10),
        nn.LayerNorm(10),
        nn.GELU(),
        nn.Dropout(0.5),
        nn.Linear(10, 10),
        nn.BatchNorm1d(10),
        nn.Tanh(),
        nn.Linear(10, 3),
    )


def tabular_residual_buffers() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 8),
        Residual(nn.Sequential(nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8))),
        Counter(8),
        nn.ReLU(),
        nn.Linear(8, 3),
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


def signal_groupnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def signal_batchnorm_groupnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Conv1d(6, 8, 3, padding=1),
        nn.GroupNorm(2, 8),  # groups of channels: kept in place by the derivation
        nn.ReLU(),
        nn.AdaptiveMaxPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
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


def image_cnn() -> nn.Module:
    return make_cnn(n_classes=3, width=4)


def image_resnet() -> nn.Module:
    return make_resnet(n_classes=3, width=4)


def image_layernorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.LayerNorm([4, 8, 8]),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.LayerNorm(8),  # over the last spatial axis only
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


def volume_batchnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


# -- the registry ----------------------------------------------------------------------


TAGS = frozenset(
    {
        "batchnorm",
        "layernorm",
        "groupnorm",
        "dropout",
        "conv1d",
        "conv2d",
        "conv3d",
        "flatten",
        "residual",
        "functional",
        "integer-buffer",
        "alignable",
    }
)


@dataclass(frozen=True)
class Kind:
    """One architecture of the zoo: ``builder()`` makes a model (any initialisation:
    :func:`build` seeds it) taking inputs of shape ``(n, *input_shape)``."""

    name: str
    builder: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    tags: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "tags", frozenset(self.tags))
        assert self.tags <= TAGS, f"unknown tags {set(self.tags - TAGS)}: add them to TAGS"


def _registry(*entries: Kind) -> dict[str, Kind]:
    registry = {kind.name: kind for kind in entries}
    assert len(registry) == len(entries), "two kinds of one name"
    return registry


KINDS: dict[str, Kind] = _registry(
    Kind("tabular-mlp", tabular_mlp, (6,), {"alignable"}),
    Kind(
        "tabular-batchnorm1d-dropout",
        tabular_batchnorm,
        (6,),
        {"batchnorm", "dropout", "alignable"},
    ),
    Kind(
        "tabular-layernorm-batchnorm1d-dropout",
        tabular_layernorm,
        (6,),
        {"layernorm", "batchnorm", "dropout", "alignable"},
    ),
    Kind(
        "tabular-residual-integer-buffer",
        tabular_residual_buffers,
        (6,),
        {"residual", "layernorm", "integer-buffer", "alignable"},
    ),
    Kind(
        "signal-conv1d-batchnorm1d",
        signal_batchnorm,
        (2, 16),
        {"conv1d", "batchnorm", "alignable"},
    ),
    Kind("signal-conv1d-groupnorm", signal_groupnorm, (2, 16), {"conv1d", "groupnorm"}),
    Kind(
        "signal-conv1d-batchnorm1d-groupnorm",
        signal_batchnorm_groupnorm,
        (2, 16),
        {"conv1d", "batchnorm", "groupnorm", "alignable"},
    ),
    Kind(
        "image-conv2d-batchnorm2d-dropout2d",
        image_batchnorm,
        (1, 8, 8),
        {"conv2d", "batchnorm", "dropout", "flatten", "alignable"},
    ),
    Kind("image-cnn-batchnorm", image_cnn, (1, 8, 8), {"conv2d", "batchnorm", "alignable"}),
    Kind(
        "image-resnet-batchnorm",
        image_resnet,
        (1, 8, 8),
        {"conv2d", "batchnorm", "residual", "alignable"},
    ),
    Kind(
        "image-functional-depthwise",
        FunctionalCNN,
        (1, 8, 8),
        {"conv2d", "batchnorm", "residual", "functional", "alignable"},
    ),
    Kind(
        "image-flatten-groupnorm",
        FlattenCNN,
        (1, 8, 8),
        {"conv2d", "groupnorm", "flatten", "functional", "alignable"},
    ),
    Kind(
        "image-layernorm",
        image_layernorm,
        (1, 8, 8),
        {"conv2d", "layernorm", "flatten", "alignable"},
    ),
    Kind(
        "volume-conv3d-batchnorm3d",
        volume_batchnorm,
        (1, 4, 4, 4),
        {"conv3d", "batchnorm", "alignable"},
    ),
)


def kinds(*tags: str, without: tuple[str, ...] = ()) -> list[str]:
    """The names of the kinds having every one of ``tags`` and none of ``without``,
    sorted (stable test ids)."""
    names = sorted(
        name
        for name, kind in KINDS.items()
        if kind.tags.issuperset(tags) and kind.tags.isdisjoint(without)
    )
    assert names, f"no kind has tags {tags} without {without}"
    return names


def _kind(kind: Kind | str) -> Kind:
    return KINDS[kind] if isinstance(kind, str) else kind


def build(kind: Kind | str, seed: int = 0) -> nn.Module:
    """A model of ``kind`` from ``seed`` with random non-trivial state, in eval mode.

    The global torch RNG is left as it was.
    """
    kind = _kind(kind)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = kind.builder()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, _BatchNorm):
                    module.running_mean.normal_(0.0, 0.5)
                    module.running_var.uniform_(0.3, 3.0)
                    module.num_batches_tracked.fill_(17 + seed)
                if isinstance(module, (_BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                    module.weight.normal_()
                    module.bias.normal_()
                if isinstance(module, Counter):
                    module.step.fill_(5 + seed)  # differs, but is not used by forward
                    # the same in every model: a float buffer that is not a BatchNorm
                    # statistic must not differ between the ends of a path
                    module.scale.copy_(torch.linspace(0.5, 1.5, len(module.scale)))
    return model.eval()


def inputs(kind: Kind | str, seed: int = 0, n: int = 16) -> np.ndarray:
    """``n`` standard Gaussian float32 inputs for ``kind``, from ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *_kind(kind).input_shape)).astype(np.float32)


def build_pair(
    kind: Kind | str, seed: int = 0, n: int = 96
) -> tuple[nn.Module, nn.Module, np.ndarray]:
    """Two models of ``kind`` with distinct state (seeds ``2 * seed`` and
    ``2 * seed + 1``) and ``n`` inputs for them (seed ``seed``)."""
    return build(kind, 2 * seed), build(kind, 2 * seed + 1), inputs(kind, seed, n)
