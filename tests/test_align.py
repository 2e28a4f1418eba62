"""Weight matching and the permutation structure: laws and errors.

The laws: permuting hidden units by a spec leaves the function unchanged; weight
matching returns a permuted copy of model_b (same function, to 1e-5), recovers a
shuffled copy of model_a exactly, never moves model_b away from model_a, and leaves
its inputs alone; the connectors' ``align`` makes ``path_[-1]`` that permuted copy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from aligning import assert_same_function, parameter_distance, random_permutation
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import build, inputs, kinds

from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.align import PermutationSpec, weight_matching
from geoconnect.models import make_mlp, make_resnet

# The kinds of the zoo (tests/zoo.py) whose structure the derivation finds by itself.
ALIGNABLE = kinds("alignable")
# Each law is checked on every kind, on a few seeds per kind.
SETTINGS = settings(deadline=None, max_examples=5, derandomize=True)


def x_of(kind: str, seed: int, n: int = 16) -> torch.Tensor:
    return torch.as_tensor(inputs(kind, seed, n))


# -- the derived structure ------------------------------------------------------------


@pytest.mark.parametrize("kind", ALIGNABLE)
def test_every_supported_kind_has_hidden_units_to_permute(kind):
    spec = PermutationSpec.from_model(build(kind, 0))
    assert spec.sizes(build(kind, 0))


@pytest.mark.parametrize("kind", kinds(without=("alignable",)))
def test_the_other_kinds_are_refused_or_have_nothing_to_permute(kind):
    # what keeps the zoo's "alignable" tag honest
    model = build(kind, 0)
    try:
        spec = PermutationSpec.from_model(model)
    except ValueError as error:
        assert "spec=PermutationSpec" in str(error)
    else:
        assert not spec.sizes(model)


@pytest.mark.parametrize("kind", ALIGNABLE)
@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_permuting_units_by_the_derived_spec_keeps_the_function(kind, seed):
    model = build(kind, seed)
    spec = PermutationSpec.from_model(model)
    permuted = spec.apply(model, random_permutation(spec, model, seed))
    assert_same_function(permuted, model, x_of(kind, seed))


def test_residual_additions_tie_the_permutations_they_add():
    spec = PermutationSpec.from_model(make_resnet(width=4))
    stem = spec.axes["0.weight"][0]
    # the first block adds its output to the stem's: one permutation for both
    assert spec.axes["3.conv2.weight"][0] == stem == spec.axes["3.bn2.running_mean"][0]
    # the second block's shortcut and body share theirs, distinct from the stem's
    assert spec.axes["4.shortcut.0.weight"][0] == spec.axes["4.conv2.weight"][0] != stem
    # the inputs and outputs are never permuted
    assert spec.axes["0.weight"][1] is None and spec.axes["7.weight"][0] is None
    assert spec.axes["1.num_batches_tracked"] == ()


def test_groups_of_channels_stay_in_place():
    spec = PermutationSpec.from_model(build("signal-conv1d-batchnorm1d-groupnorm"))
    assert spec.axes["3.weight"][0] is None and spec.axes["4.weight"] == (None,)
    assert spec.axes["0.weight"][0] is not None


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.attn(h, h, h)[0].mean(1))


class RawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(x @ self.w))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (Attention(), "module 'attn' (MultiheadAttention)"),
        (RawParameter(), "'w'"),
        (DataDependent(), "DataDependent"),
    ],
)
def test_a_structure_that_cannot_be_derived_is_named_in_the_error(model, named):
    with pytest.raises(ValueError, match="spec=PermutationSpec") as info:
        PermutationSpec.from_model(model)
    assert named in str(info.value)
    with pytest.raises(ValueError, match="spec=PermutationSpec"):
        weight_matching(model, copy.deepcopy(model))


def test_an_explicit_spec_aligns_what_tracing_cannot():
    torch.manual_seed(0)
    a, b = RawParameter(), RawParameter()
    spec = PermutationSpec({"w": (None, "h"), "out.weight": (None, "h")})
    shuffled = spec.apply(a, {"h": np.random.default_rng(0).permutation(6)})
    aligned = weight_matching(a, shuffled, spec=spec, random_state=0)
    assert all(torch.equal(p, q) for p, q in zip(aligned.parameters(), a.parameters()))
    x = torch.randn(8, 4)
    assert_same_function(weight_matching(a, b, spec=spec, random_state=0), b, x)


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"nope.weight": ("h", None)}, "'nope.weight', which is not a parameter"),
        ({"0.weight": ("h",)}, "gives 1 axes for '0.weight'"),
        ({"0.weight": ("h", None), "2.weight": ("h", None)}, "not a multiple of"),
    ],
)
def test_a_spec_that_does_not_fit_the_model_is_rejected(axes, message):
    mlp = make_mlp((4, 8, 3))
    with pytest.raises(ValueError, match=message):
        weight_matching(mlp, copy.deepcopy(mlp), spec=PermutationSpec(axes))


def test_bad_arguments_get_clear_errors():
    mlp = make_mlp((4, 8, 3))
    with pytest.raises(TypeError, match="spec must be a PermutationSpec"):
        weight_matching(mlp, mlp, spec={"0.weight": ("h", None)})
    with pytest.raises(ValueError, match="max_iter must be an int"):
        weight_matching(mlp, mlp, max_iter=0)
    with pytest.raises(ValueError, match="same architecture"):
        weight_matching(mlp, make_mlp((4, 9, 3)))
    with pytest.raises(TypeError, match="sequence with one permutation name"):
        PermutationSpec({"0.weight": "h"})
    spec = PermutationSpec.from_model(mlp)
    with pytest.raises(ValueError, match="must be a permutation of range"):
        spec.apply(mlp, {"0": [0, 0, 1, 2, 3, 4, 5, 6]})


# -- weight matching -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALIGNABLE)
@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_the_aligned_model_computes_what_model_b_computes(kind, seed):
    a, b = build(kind, 2 * seed), build(kind, 2 * seed + 1)
    aligned = weight_matching(a, b, random_state=seed)
    assert_same_function(aligned, b, x_of(kind, seed))
    # BatchNorm running statistics moved with their units
    assert sorted(aligned.state_dict()) == sorted(b.state_dict())


@pytest.mark.parametrize("kind", ALIGNABLE)
@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_weight_matching_recovers_a_shuffled_copy(kind, seed):
    a = build(kind, seed)
    spec = PermutationSpec.from_model(a)
    shuffled = spec.apply(a, random_permutation(spec, a, seed + 1))
    aligned = weight_matching(a, shuffled, random_state=seed)
    for (name, p), q in zip(aligned.state_dict().items(), a.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", ALIGNABLE)
@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_weight_matching_never_moves_model_b_away_from_model_a(kind, seed):
    a, b = build(kind, 2 * seed), build(kind, 2 * seed + 1)
    aligned = weight_matching(a, b, random_state=seed)
    assert parameter_distance(a, aligned) <= parameter_distance(a, b) + 1e-9


def test_weight_matching_leaves_its_inputs_alone():
    a, b = build("image-resnet-batchnorm", 0), build("image-resnet-batchnorm", 1)
    a.train()
    before_a, before_b = copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())
    aligned = weight_matching(a, b, random_state=0)
    assert aligned is not b and a.training and not b.training
    for before, model in ((before_a, a), (before_b, b)):
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key])


def test_weight_matching_with_a_seed_is_reproducible():
    a, b = build("tabular-mlp", 0), build("tabular-mlp", 1)
    first = weight_matching(a, b, random_state=3)
    second = weight_matching(a, b, random_state=3)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))


# -- the connectors' align -------------------------------------------------------------


@pytest.mark.parametrize("connector", [LinearConnector, GeodesicConnector])
def test_with_align_the_path_ends_at_the_permuted_model_b(connector):
    a, b = build("image-resnet-batchnorm", 0), build("image-resnet-batchnorm", 1)
    X = inputs("image-resnet-batchnorm", 0, n=48)
    params = {"max_iter": 1} if connector is GeodesicConnector else {}
    est = connector(n_points=3, device="cpu", random_state=0, align="weight_matching", **params)
    path = est.fit(X, model_a=a, model_b=b).path_
    expected = weight_matching(a, b, random_state=0)
    x = torch.as_tensor(X)
    assert_same_function(path[-1], b, x)
    assert_same_function(path[0], a, x)
    for p, q in zip(path[-1].parameters(), expected.parameters()):
        torch.testing.assert_close(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(path[-1].parameters(), b.parameters()))


def test_alignment_shortens_the_line_between_two_trained_networks(digits_pair):
    def line(align):
        est = LinearConnector(n_points=5, device="cpu", random_state=0, align=align)
        return est.fit(digits_pair.X, model_a=digits_pair.model_a, model_b=digits_pair.model_b)

    plain, aligned = line(None), line("weight_matching")
    assert aligned.euclidean_length_ < plain.euclidean_length_
    assert aligned.evaluate(digits_pair.X, digits_pair.y).barrier < (
        plain.evaluate(digits_pair.X, digits_pair.y).barrier
    )


@pytest.mark.parametrize("connector", [LinearConnector, GeodesicConnector])
def test_an_unknown_align_is_rejected_like_scikit_learn_does(connector):
    a, b = build("tabular-mlp", 0), build("tabular-mlp", 1)
    with pytest.raises(ValueError, match=r"The 'align' parameter of .* must be .*Got 'magic'"):
        connector(align="magic", device="cpu").fit(inputs("tabular-mlp", 0), model_a=a, model_b=b)


def test_a_structure_that_would_change_the_function_is_caught_when_fitting():
    # Linear layers on (batch, 5, 4) sequences, then a flatten: units end up on the
    # inner axis, where the derivation (which takes Linear inputs as (batch, features))
    # assumes blocks. The connectors check the aligned copy on X and refuse it.
    def net(seed: int) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Flatten(), nn.Linear(30, 3))

    X = torch.randn(20, 5, 4, generator=torch.Generator().manual_seed(0))
    line = LinearConnector(n_points=3, device="cpu", random_state=0, align="weight_matching")
    with pytest.raises(ValueError, match="changes what model_b computes"):
        line.fit(X, model_a=net(0), model_b=net(1))
