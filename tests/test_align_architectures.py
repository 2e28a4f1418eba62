"""Weight matching on real architectures: torchvision's ResNets and transformer encoders.

The laws, per architecture: the derived permutation structure is the one the
architecture has (residual streams tied across each stage, downsample branches on the
block's stream, inputs and outputs never permuted); permuting units by it keeps the
function; weight matching returns a copy of model_b computing the same logits (to
1e-5) with a non-trivial permutation, closer to model_a than model_b was; and the
connectors' ``align="weight_matching"`` runs on it. Where the structure cannot be
derived (Hugging Face BERT, which torch.fx cannot trace; an unknown encoder layer),
the ``ValueError`` names the module and says that fitting with ``align=None`` works.

torchvision is not a dependency, so :class:`ResNet` below re-implements its module
structure (``torchvision/models/resnet.py``): the same submodule names, the same
forward (in-place ReLU shared within a block, ``out += identity``, ``MaxPool2d``,
``AdaptiveAvgPool2d((1, 1))``, ``torch.flatten(x, 1)``) and the same initialisation,
with a ``width`` argument (torchvision's is 64) so that tests stay small.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from aligning import assert_same_function, parameter_distance, random_permutation
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.align import PermutationSpec, weight_matching

SETTINGS = settings(deadline=None, max_examples=5, derandomize=True)

# -- torchvision's ResNet, module for module ----------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        width: int = 64,
        in_channels: int = 3,
    ):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(
            in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


ARCHITECTURES = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


def resnet(arch: str = "resnet18", seed: int = 0, width: int = 8) -> ResNet:
    """A ResNet of torchvision's structure for 3×32×32 images, as if trained a little.

    Built from ``seed`` without touching the global RNG, with random BatchNorm affine
    parameters and running statistics (torchvision initialises them to 1, 0, 0 and 1,
    which would hide a running statistic left behind by the permutation); eval mode.
    """
    block, layers = ARCHITECTURES[arch]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ResNet(block, layers, num_classes=10, width=width)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(int(torch.randint(1, 100, ())))
    return model.eval()


def images(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- shared checks ----------------------------------------------------------------------


def assert_aligned(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    """weight_matching(a, b) computes b's logits, is non-trivial and moves b towards a."""
    aligned, perms = weight_matching(a, b, random_state=0, return_permutations=True)
    assert_same_function(aligned, b, x)
    assert sorted(aligned.state_dict()) == sorted(b.state_dict())
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    assert parameter_distance(a, aligned) < parameter_distance(a, b)


# -- ResNets ----------------------------------------------------------------------------


def test_resnet18_units_are_tied_along_each_stage_and_its_downsample_branch():
    model = resnet("resnet18")
    spec = PermutationSpec.from_model(model)
    axes = spec.axes
    stem = axes["conv1.weight"][0]
    # layer1 adds to the stem's output (max-pooled): one permutation for both
    assert stem is not None
    for block in ("layer1.0", "layer1.1"):
        assert axes[f"{block}.conv2.weight"][0] == stem == axes[f"{block}.bn2.running_mean"][0]
        assert axes[f"{block}.conv1.weight"][1] == stem
    for stage in ("layer2", "layer3", "layer4"):
        # the downsample branch and the body of the first block add: one permutation,
        # which the second block adds to again
        stream = axes[f"{stage}.0.downsample.0.weight"][0]
        assert stream == axes[f"{stage}.0.conv2.weight"][0] == axes[f"{stage}.1.conv2.weight"][0]
        assert stream == axes[f"{stage}.0.downsample.1.running_var"][0] != stem
        # each block's inner channels are a permutation of their own
        inner = axes[f"{stage}.0.conv1.weight"][0]
        assert inner not in (None, stream) and axes[f"{stage}.0.conv2.weight"][1] == inner
    # the downsample convolution reads the previous stage's stream
    assert axes["layer2.0.downsample.0.weight"][1] == stem
    # the classifier reads the last stream through avgpool and flatten
    assert axes["fc.weight"] == (None, axes["layer4.0.conv2.weight"][0])
    # the inputs and outputs are never permuted
    assert axes["conv1.weight"][1] is None and axes["fc.bias"] == (None,)
    assert axes["bn1.num_batches_tracked"] == ()
    # 4 streams (stem + layer1, layer2, layer3, layer4) and one inner per block
    assert len(spec.sizes(model)) == 4 + 8


def test_resnet50_has_a_permutation_per_stream_and_per_inner_layer():
    model = resnet("resnet50")
    spec = PermutationSpec.from_model(model)
    # layer1 widens the stem's channels 4-fold, so its downsample starts a new stream
    assert spec.axes["layer1.0.downsample.0.weight"] == ("layer1.0.conv3", "conv1", None, None)
    assert spec.axes["layer1.1.conv3.weight"][0] == "layer1.0.conv3"
    # the stem, 4 stages, and conv1 and conv2 of each of the 16 blocks
    assert len(spec.sizes(model)) == 1 + 4 + 2 * 16


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_permuting_resnet_units_by_the_derived_spec_keeps_the_function(arch, seed):
    model = resnet(arch, seed)
    spec = PermutationSpec.from_model(model)
    permuted = spec.apply(model, random_permutation(spec, model, seed))
    assert_same_function(permuted, model, images(seed))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_weight_matching_aligns_two_resnets(arch):
    a, b = resnet(arch, seed=0), resnet(arch, seed=1)
    assert_aligned(a, b, images(0))


def test_weight_matching_recovers_a_shuffled_resnet18():
    a = resnet("resnet18")
    spec = PermutationSpec.from_model(a)
    shuffled = spec.apply(a, random_permutation(spec, a, 1))
    aligned = weight_matching(a, shuffled, random_state=0)
    for (name, p), q in zip(aligned.state_dict().items(), a.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_the_line_between_aligned_resnet18s_is_shorter():
    a, b = resnet(seed=0), resnet(seed=1)
    X = images(0, n=16)

    def line(align):
        est = LinearConnector(n_points=3, align=align, device="cpu", random_state=0)
        return est.fit(X, model_a=a, model_b=b)

    plain, aligned = line(None), line("weight_matching")
    assert_same_function(aligned.path_[-1], b, X)
    assert_same_function(aligned.path_[0], a, X)
    assert aligned.path_.alignment and not plain.path_.alignment
    assert aligned.euclidean_length_ < plain.euclidean_length_


# -- transformer encoders ---------------------------------------------------------------


class TokenClassifier(nn.Module):
    """Token and position embeddings, an ``nn.TransformerEncoder``, mean pooling, a head.

    Token id 0 is padding, masked out of the attention.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        norm_first: bool = False,
        activation: str = "relu",
        layer: type[nn.TransformerEncoderLayer] = nn.TransformerEncoderLayer,
        vocab: int = 30,
        d_model: int = 16,
        max_len: int = 10,
    ):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.tokens = nn.Embedding(vocab, d_model, padding_idx=0)
            self.positions = nn.Embedding(max_len, d_model)
            encoder_layer = layer(
                d_model,
                nhead=2,
                dim_feedforward=24,
                dropout=0.1,
                activation=activation,
                batch_first=True,
                norm_first=norm_first,
            )
            self.encoder = nn.TransformerEncoder(
                encoder_layer, num_layers=2, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
            )
            self.head = nn.Linear(d_model, 3)
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.LayerNorm):
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.normal_(0.0, 0.1)
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.tokens(ids) + self.positions(positions)
        h = self.encoder(h, src_key_padding_mask=ids == 0)
        return self.head(h.mean(dim=1))


def token_ids(seed: int, n: int = 8, length: int = 10) -> torch.Tensor:
    ids = torch.randint(1, 30, (n, length), generator=torch.Generator().manual_seed(seed))
    ids[:, -2:] = 0  # padding
    return ids


def test_a_transformer_encoder_aligns_its_residual_stream_and_feed_forward_units():
    model = TokenClassifier()
    spec = PermutationSpec.from_model(model)
    axes = spec.axes
    stream = axes["tokens.weight"][1]
    assert stream is not None and axes["positions.weight"] == (None, stream)
    assert spec.sizes(model) == {
        stream: 16,
        "encoder.layers.0.linear1": 24,
        "encoder.layers.1.linear1": 24,
    }
    for layer in ("encoder.layers.0", "encoder.layers.1"):
        # attention reads and writes the stream; its heads keep their order
        assert axes[f"{layer}.self_attn.in_proj_weight"] == (None, stream)
        assert axes[f"{layer}.self_attn.in_proj_bias"] == (None,)
        assert axes[f"{layer}.self_attn.out_proj.weight"] == (stream, None)
        hidden = f"{layer}.linear1"
        assert axes[f"{layer}.linear1.weight"] == (hidden, stream)
        assert axes[f"{layer}.linear2.weight"] == (stream, hidden)
        assert axes[f"{layer}.norm1.weight"] == axes[f"{layer}.norm2.bias"] == (stream,)
    assert axes["encoder.norm.weight"] == (stream,)
    assert axes["head.weight"] == (None, stream) and axes["head.bias"] == (None,)


@pytest.mark.parametrize(
    "options", [{}, {"norm_first": True, "activation": "gelu"}], ids=["post-norm", "pre-norm"]
)
@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_permuting_transformer_units_by_the_derived_spec_keeps_the_function(options, seed):
    model = TokenClassifier(seed, **options)
    spec = PermutationSpec.from_model(model)
    permuted = spec.apply(model, random_permutation(spec, model, seed))
    assert_same_function(permuted, model, token_ids(seed))


@pytest.mark.parametrize(
    "options", [{}, {"norm_first": True, "activation": "gelu"}], ids=["post-norm", "pre-norm"]
)
def test_weight_matching_aligns_two_transformer_encoders(options):
    a, b = TokenClassifier(0, **options), TokenClassifier(1, **options)
    assert_aligned(a, b, token_ids(0))


def test_the_line_between_aligned_transformer_encoders_ends_at_model_b():
    a, b = TokenClassifier(0), TokenClassifier(1)
    X = token_ids(0, n=16)
    est = LinearConnector(n_points=3, align="weight_matching", device="cpu", random_state=0)
    path = est.fit(X, model_a=a, model_b=b).path_
    assert_same_function(path[-1], b, X)
    assert_same_function(path[0], a, X)
    assert path.alignment


class CustomEncoderLayer(nn.TransformerEncoderLayer):
    """Looks like an encoder layer, but computes something else."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        return super().forward(src.flip(-1), src_mask, src_key_padding_mask, is_causal)


def test_an_unknown_encoder_layer_is_named_in_the_error():
    model = TokenClassifier(layer=CustomEncoderLayer)
    with pytest.raises(ValueError, match=r"spec=PermutationSpec.*align=None") as info:
        weight_matching(model, TokenClassifier(1, layer=CustomEncoderLayer))
    assert "module 'encoder.layers.0' (CustomEncoderLayer)" in str(info.value)


# -- Hugging Face BERT ------------------------------------------------------------------


def tiny_bert(seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.BertForSequenceClassification(config).eval()


class BertLogits(nn.Module):
    """A BERT classifier as the connectors take it: token ids in, logits out."""

    def __init__(self, seed: int):
        super().__init__()
        self.bert = tiny_bert(seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids).logits


# torch.fx cannot trace BERT's self-attention; the error names the first module on the
# way to it that does not trace on its own, and the two ways forward.
BERT_ERROR = (
    r"Cannot derive the permutation structure of {model}: torch.fx cannot trace its "
    r"submodule '{prefix}encoder\.layer\.0\.attention\.self' \(BertSelfAttention; .*\)\. "
    r"Pass an explicit spec=PermutationSpec\(.*\) for this network, or connect the "
    r"models without alignment: the geodesic does not need it \(fit with align=None\)\."
)


def test_weight_matching_on_bert_names_the_module_it_cannot_trace():
    a, b = tiny_bert(0), tiny_bert(1)
    error = BERT_ERROR.format(model="BertForSequenceClassification", prefix=r"bert\.")
    with pytest.raises(ValueError, match=error):
        weight_matching(a, b)
    with pytest.raises(ValueError, match=error):
        PermutationSpec.from_model(a)


def test_aligning_bert_in_a_connector_fails_clearly_and_fitting_without_align_works():
    a, b = BertLogits(0), BertLogits(1)
    X = token_ids(0, n=8, length=8)
    line = LinearConnector(n_points=3, align="weight_matching", device="cpu")
    with pytest.raises(
        ValueError, match=BERT_ERROR.format(model="BertLogits", prefix=r"bert\.bert\.")
    ):
        line.fit(X, model_a=a, model_b=b)
    assert not hasattr(line, "path_")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one epoch: not converged
        geodesic = GeodesicConnector(n_points=3, max_iter=1, device="cpu", random_state=0)
        geodesic.fit(X, model_a=a, model_b=b)
    assert np.isfinite(geodesic.length_)
