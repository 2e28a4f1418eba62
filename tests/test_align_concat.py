"""Weight matching through concatenations, layout permutes and parameters used directly.

Three architectures the derivation follows by itself, each written here with the
module structure and forward of the library it comes from (torchvision and timm are
not dependencies), with small widths:

- torchvision's DenseNet (``torchvision/models/densenet.py``: ``_DenseLayer``,
  ``_DenseBlock``, ``_Transition``) and SqueezeNet's ``Fire`` module: ``torch.cat``
  along the channels, whose axis carries one permutation per concatenated part;
- a ConvNeXt block as in the official code (``facebookresearch/ConvNeXt``:
  depthwise 7×7, ``permute(0, 2, 3, 1)``, ``LayerNorm``, two ``Linear``\\s with GELU,
  ``self.gamma * x``, ``permute(0, 3, 1, 2)``, drop path), and as in torchvision's
  ``CNBlock`` (a ``Permute`` module, ``layer_scale`` of shape ``(C, 1, 1)``,
  stochastic depth), with ``LayerNorm2d`` stems and downsampling;
- a small ViT as in timm (``PatchEmbed``: ``Conv2d(kernel=stride=patch)``,
  ``flatten(2).transpose(1, 2)``; a class token concatenated along the tokens; a
  learned position embedding added directly; ``norm``; the head on ``x[:, 0]``),
  with an ``nn.TransformerEncoder`` as its blocks.

The laws, per architecture: permuting units by the derived spec keeps the function
(1e-5); weight matching two differently seeded models returns a copy of model_b with
the same logits and a non-identity permutation, closer to model_a; and
``LinearConnector(align="weight_matching")`` ends at model_b's function. What is still
refused is refused with a ``ValueError`` naming the operation and the ways forward.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from aligning import assert_same_function, parameter_distance, random_permutation
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from geoconnect import LinearConnector
from geoconnect.align import PermutationSpec, weight_matching

SETTINGS = settings(deadline=None, max_examples=5, derandomize=True)


def randomised(model: nn.Module) -> nn.Module:
    """Random norm affine parameters, running statistics and layer scales; eval mode.

    Their library initialisations (ones, zeros, 1e-6) would hide a tensor left behind
    by the permutation.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(int(torch.randint(1, 100, ())))
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "layer_scale")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("cls_token", "pos_embed")):
                p.normal_(0.0, 0.5)
    return model.eval()


def seeded(build, seed: int, **kwargs) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return randomised(build(**kwargs))


def images(seed: int, n: int = 4, size: int = 32) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- torchvision's DenseNet and SqueezeNet, module for module ----------------------------


class _DenseLayer(nn.Module):
    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(
            num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False
        )
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        return bottleneck_output

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        if isinstance(input, Tensor):
            prev_features = [input]
        else:
            prev_features = input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(
            num_input_features, num_output_features, kernel_size=1, stride=1, bias=False
        )
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(
        self,
        growth_rate: int = 4,
        block_config: tuple[int, ...] = (2, 2),
        num_init_features: int = 8,
        bn_size: int = 2,
        drop_rate: float = 0,
        num_classes: int = 10,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    (
                        "conv0",
                        nn.Conv2d(
                            3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False
                        ),
                    ),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(
                    num_input_features=num_features, num_output_features=num_features // 2
                )
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


class Fire(nn.Module):
    def __init__(
        self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int
    ) -> None:
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [
                self.expand1x1_activation(self.expand1x1(x)),
                self.expand3x3_activation(self.expand3x3(x)),
            ],
            1,
        )


class SqueezeNet(nn.Module):
    """torchvision's ``squeezenet1_1``, its first three Fire modules, at about 1/8 of its widths."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(8, 4, 8, 8),
            Fire(16, 4, 8, 8),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(16, 8, 16, 16),
        )
        final_conv = nn.Conv2d(32, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1))
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.classifier(x)
        return torch.flatten(x, 1)


# -- ConvNeXt: the official block, torchvision's CNBlock ----------------------------------


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """timm's ``drop_path``: the identity in eval mode."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    return x * random_tensor.div_(keep_prob)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)


class Block(nn.Module):
    """The official ConvNeXt block (``facebookresearch/ConvNeXt``, ``models/convnext.py``)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim), requires_grad=True)
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)

        x = input + self.drop_path(x)
        return x


class Permute(nn.Module):
    """torchvision's ``ops.misc.Permute``."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class StochasticDepth(nn.Module):
    """torchvision's ``ops.StochasticDepth`` (row mode): the identity in eval mode."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return input
        size = [input.shape[0]] + [1] * (input.ndim - 1)
        noise = torch.empty(size, dtype=input.dtype, device=input.device)
        return input * noise.bernoulli_(1.0 - self.p).div_(1.0 - self.p)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ``convnext.LayerNorm2d``: a LayerNorm over the channels."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block (``torchvision/models/convnext.py``)."""

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class ConvNeXt(nn.Module):
    """A two-stage ConvNeXt: a patchify stem, blocks, a downsampling layer, a head.

    ``block="official"`` uses :class:`Block` (with ``drop_path`` > 0 a
    :class:`DropPath`, else ``nn.Identity``; ``layer_scale=0`` leaves out ``gamma``),
    ``block="torchvision"`` uses :class:`CNBlock`. The stem, the downsampling and the
    head are torchvision's (``LayerNorm2d``; the head's ``LayerNorm2d``, ``flatten``,
    ``Linear`` after global average pooling).
    """

    def __init__(
        self,
        block: str = "official",
        dims: tuple[int, int] = (8, 16),
        depths: tuple[int, int] = (1, 1),
        layer_scale: float = 1e-6,
        drop_path: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()

        def make(dim: int) -> nn.Module:
            if block == "official":
                return Block(dim, drop_path=drop_path, layer_scale_init_value=layer_scale)
            return CNBlock(dim, layer_scale=layer_scale, stochastic_depth_prob=drop_path)

        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        ]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[make(dim) for _ in range(depth)]))
            if i + 1 < len(dims):
                layers.append(
                    nn.Sequential(
                        LayerNorm2d(dim), nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2)
                    )
                )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = self.classifier(x)
        return x


# -- a small ViT, as timm writes it -------------------------------------------------------


class PatchEmbed(nn.Module):
    """timm's ``PatchEmbed``: image to patch tokens, channels last."""

    def __init__(
        self, img_size: int = 16, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 16
    ):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        x = self.norm(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 16,
        patch_size: int = 4,
        embed_dim: int = 16,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02
        )
        self.pos_drop = nn.Dropout(p=0.1)
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            num_heads,
            dim_feedforward=int(embed_dim * mlp_ratio),
            dropout=0.1,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def _pos_embed(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        return self.pos_drop(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


# -- the architectures under test ---------------------------------------------------------

MODELS = {
    "densenet": (DenseNet, {}, 32),
    "densenet-dropout": (DenseNet, {"drop_rate": 0.2, "block_config": (3, 2)}, 32),
    "squeezenet": (SqueezeNet, {}, 32),
    "convnext-official": (ConvNeXt, {"block": "official"}, 16),
    "convnext-official-no-gamma": (
        ConvNeXt,
        {"block": "official", "layer_scale": 0.0, "drop_path": 0.0},
        16,
    ),
    "convnext-torchvision": (ConvNeXt, {"block": "torchvision"}, 16),
    "vit": (VisionTransformer, {}, 16),
}


def model(kind: str, seed: int = 0) -> nn.Module:
    build, kwargs, _ = MODELS[kind]
    return seeded(build, seed, **kwargs)


def x_of(kind: str, seed: int, n: int = 4) -> Tensor:
    return images(seed, n, MODELS[kind][2])


# -- the derived structure ----------------------------------------------------------------


def test_a_dense_block_concatenates_one_permutation_per_layer():
    net = model("densenet")
    axes = PermutationSpec.from_model(net).axes
    stem = axes["features.conv0.weight"][0]
    block1 = "features.denseblock1"
    l1, l2 = (
        axes[f"{block1}.denselayer1.conv2.weight"][0],
        axes[f"{block1}.denselayer2.conv2.weight"][0],
    )
    assert len({stem, l1, l2}) == 3 and None not in (stem, l1, l2)
    # each dense layer reads the concatenation of everything before it, in order
    assert axes[f"{block1}.denselayer1.conv1.weight"][1] == stem
    assert axes[f"{block1}.denselayer2.norm1.running_mean"] == ((stem, l1),)
    assert axes[f"{block1}.denselayer2.conv1.weight"] == (
        axes[f"{block1}.denselayer2.conv1.weight"][0],
        (stem, l1),
        None,
        None,
    )
    # the transition layer reads the block's output, all three parts
    assert axes["features.transition1.norm.weight"] == ((stem, l1, l2),)
    assert axes["features.transition1.conv.weight"][1] == (stem, l1, l2)
    # the classifier reads the last block's concatenation through norm5 and the pooling
    trans = axes["features.transition1.conv.weight"][0]
    block2 = "features.denseblock2"
    m1, m2 = (
        axes[f"{block2}.denselayer1.conv2.weight"][0],
        axes[f"{block2}.denselayer2.conv2.weight"][0],
    )
    assert axes["features.norm5.weight"] == ((trans, m1, m2),)
    assert axes["classifier.weight"] == (None, (trans, m1, m2))
    assert axes["classifier.bias"] == (None,) and axes["features.conv0.weight"][1] is None


def test_a_fire_module_concatenates_its_two_expand_layers():
    net = model("squeezenet")
    axes = PermutationSpec.from_model(net).axes
    e1, e3 = axes["features.3.expand1x1.weight"][0], axes["features.3.expand3x3.weight"][0]
    assert e1 != e3 and axes["features.4.squeeze.weight"][1] == (e1, e3)
    # the final convolution computes the logits: its outputs stay
    assert axes["classifier.1.weight"][0] is None
    assert axes["classifier.1.weight"][1] == (
        axes["features.6.expand1x1.weight"][0],
        axes["features.6.expand3x3.weight"][0],
    )


def test_a_convnext_block_follows_the_channels_through_its_layout_permutes():
    net = model("convnext-official")
    axes = PermutationSpec.from_model(net).axes
    stream = axes["features.0.0.weight"][0]
    block = "features.1.0"
    assert stream is not None
    # the stem's LayerNorm2d (permute, F.layer_norm with its own parameters, permute)
    assert axes["features.0.1.weight"] == axes["features.0.1.bias"] == (stream,)
    # depthwise conv, the channels-last LayerNorm and the pointwise Linear layers
    assert axes[f"{block}.dwconv.weight"] == (stream, None, None, None)
    assert axes[f"{block}.norm.weight"] == (stream,)
    hidden = axes[f"{block}.pwconv1.weight"][0]
    assert axes[f"{block}.pwconv1.weight"] == (hidden, stream) and hidden != stream
    assert axes[f"{block}.pwconv2.weight"] == (stream, hidden)
    # the layer scale, a parameter multiplied in forward, moves with the channels
    assert axes[f"{block}.gamma"] == (stream,)
    # the residual add ties the block's output to its input; the downsample starts anew
    assert axes[f"{block}.pwconv2.bias"] == (stream,)
    assert axes["features.2.1.weight"][1] == stream != axes["features.2.1.weight"][0]
    assert axes["classifier.2.weight"] == (None, axes["features.3.0.pwconv2.weight"][0])


def test_a_torchvision_cnblock_permutes_its_layer_scale_along_the_channels():
    net = model("convnext-torchvision")
    axes = PermutationSpec.from_model(net).axes
    stream = axes["features.1.0.block.0.weight"][0]
    assert axes["features.1.0.layer_scale"] == (stream, None, None)
    assert axes["features.1.0.block.5.weight"][0] == stream == axes["features.0.0.weight"][0]


def test_a_vit_permutes_its_residual_stream_from_the_patch_embedding_on():
    net = model("vit")
    spec = PermutationSpec.from_model(net)
    axes = spec.axes
    stream = axes["patch_embed.proj.weight"][0]
    assert axes["patch_embed.proj.weight"] == (stream, None, None, None)
    # the class token is concatenated along the tokens, not the units
    assert axes["cls_token"] == (None, None, stream)
    assert axes["pos_embed"] == (None, None, stream)
    assert axes["blocks.layers.0.self_attn.in_proj_weight"] == (None, stream)
    assert axes["norm.weight"] == (stream,) and axes["head.weight"] == (None, stream)
    assert spec.sizes(net) == {
        stream: 16,
        "blocks.layers.0.linear1": 32,
        "blocks.layers.1.linear1": 32,
    }


# -- the laws -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_permuting_units_by_the_derived_spec_keeps_the_function(kind, seed):
    net = model(kind, seed)
    spec = PermutationSpec.from_model(net)
    permutation = random_permutation(spec, net, seed)
    permuted = spec.apply(net, permutation)
    assert_same_function(permuted, net, x_of(kind, seed))
    if any(len(p) > 1 for p in permutation.values()):
        assert any(not torch.equal(p, q) for p, q in zip(permuted.parameters(), net.parameters()))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_weight_matching_aligns_two_differently_seeded_models(kind):
    a, b = model(kind, 0), model(kind, 1)
    aligned, perms = weight_matching(a, b, random_state=0, return_permutations=True)
    assert_same_function(aligned, b, x_of(kind, 0))
    assert sorted(aligned.state_dict()) == sorted(b.state_dict())
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    assert parameter_distance(a, aligned) < parameter_distance(a, b)


@pytest.mark.parametrize("kind", ["densenet", "squeezenet", "convnext-official", "vit"])
def test_weight_matching_recovers_a_shuffled_copy(kind):
    a = model(kind, 0)
    spec = PermutationSpec.from_model(a)
    shuffled = spec.apply(a, random_permutation(spec, a, 1))
    aligned = weight_matching(a, shuffled, random_state=0)
    for (name, p), q in zip(aligned.state_dict().items(), a.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", ["densenet", "convnext-official", "vit"])
def test_the_aligned_line_ends_at_model_b(kind):
    a, b = model(kind, 0), model(kind, 1)
    X = x_of(kind, 0, n=8)
    est = LinearConnector(n_points=3, align="weight_matching", device="cpu", random_state=0)
    path = est.fit(X, model_a=a, model_b=b).path_
    assert_same_function(path[-1], b, X)
    assert_same_function(path[0], a, X)
    assert path.alignment


# -- the spec format: concatenated axes --------------------------------------------------


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 5)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1))


def test_a_concatenated_axis_is_permuted_segment_by_segment():
    torch.manual_seed(0)
    net = TwoBranches()
    spec = PermutationSpec.from_model(net)
    assert spec.axes["out.weight"] == (None, ("a", "b"))
    assert spec.sizes(net) == {"a": 3, "b": 5}
    permuted = spec.apply(net, {"a": [2, 0, 1], "b": [4, 3, 2, 1, 0]})
    index = torch.tensor([2, 0, 1, 7, 6, 5, 4, 3])
    assert torch.equal(permuted.out.weight, net.out.weight[:, index])
    assert_same_function(permuted, net, torch.randn(6, 4))
    # a permutation left out of the mapping is the identity on its segment
    only_b = spec.apply(net, {"b": [4, 3, 2, 1, 0]})
    assert torch.equal(only_b.out.weight[:, :3], net.out.weight[:, :3])


def test_a_concatenation_with_the_input_keeps_its_parts_in_place():
    class WithInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(4, 3), nn.Linear(7, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(torch.cat([x, torch.relu(self.a(x))], dim=1))

    spec = PermutationSpec.from_model(WithInput())
    assert spec.axes["out.weight"] == (None, None) and spec.axes["a.weight"] == (None, None)


@pytest.mark.parametrize(
    ("axes", "error", "message"),
    [
        ({"out.weight": (None, ("a", 3))}, TypeError, "non-empty tuple of permutation names"),
        ({"out.weight": (None, ())}, TypeError, "non-empty tuple of permutation names"),
        (
            {"out.weight": (None, ("a", "b"))},
            ValueError,
            r"Permutation 'a' acts only on a segment of axis 1 of 'out\.weight'",
        ),
        (
            {"a.weight": ("a", None), "b.weight": ("b", None), "out.weight": (None, ("a", "a"))},
            ValueError,
            r"Axis 1 of 'out\.weight' has 8 entries, which is not a multiple of its segments' "
            r"units, 3 \('a'\) \+ 3 \('a'\) = 6\.",
        ),
    ],
)
def test_a_bad_concatenated_axis_is_rejected(axes, error, message):
    with pytest.raises(error, match=message):
        PermutationSpec(axes).sizes(TwoBranches())


# -- what is still refused ---------------------------------------------------------------


class ChannelsFirstLayerNorm(nn.Module):
    """The official ConvNeXt's ``LayerNorm(data_format="channels_first")``."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 3)
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.head = nn.Linear(dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return self.head(x.mean((2, 3)))


class RegisterTokens(nn.Module):
    """A parameter concatenated along the units: its segment cannot be permuted."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.extra = nn.Parameter(torch.randn(1, 2))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.fc(x), self.extra.expand(x.shape[0], -1)], dim=1)
        return self.head(h)


class ConcatPlusOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1) + self.c(x))


class Transposed(nn.Module):
    """``h.T.T`` is ``h``, but an attribute of a tensor is not followed."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.a(x)).T.T)


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (
            ChannelsFirstLayerNorm(4),
            r"at operation 'mean' \(node 'mean'\): a reduction over the units or the batch\.",
        ),
        (
            RegisterTokens(),
            r"at parameter or buffer 'extra': it is used directly in forward by operation "
            r"'cat' \(node 'cat'\), along the units, which is not an elementwise operation",
        ),
        (
            ConcatPlusOne(),
            r"at operation 'add' \(node 'add'\): it joins units concatenated from "
            r"differently permuted parts with units that are split otherwise\.",
        ),
        (
            Transposed(),
            r"at operation 'getattr' \(node 'getattr_1'\): its attribute 'T' of the units is not "
            r"followed\.",
        ),
    ],
    ids=["channels-first-layernorm", "parameter-along-units", "concat-plus-layer", "attribute-T"],
)
def test_what_cannot_be_derived_is_named_in_the_error(net, message):
    with pytest.raises(
        ValueError, match=r"Cannot derive the permutation structure " + message
    ) as info:
        PermutationSpec.from_model(net)
    assert "spec=PermutationSpec" in str(info.value) and "align=None" in str(info.value)
