"""Weight matching through timm's normalisation layers: a MobileNetV3-small.

timm is the model zoo most users reach for, and its BatchNorm layers are not
``nn.BatchNorm2d``'s forward: ``BatchNormAct2d`` (``timm/layers/norm_act.py``)
subclasses it and calls ``F.batch_norm`` on the module's own running statistics and
affine parameters, then a drop and an activation — so torch.fx traces into it, and
the derivation meets those buffers used directly by a ``batch_norm`` call. timm is
not a dependency (installing it replaces torch with a CUDA build here), so the
layers below re-implement the structure of ``timm.create_model(
"mobilenetv3_small_050")``: the same submodule names and forward (``conv_stem``,
``bn1``, ``blocks`` of depthwise-separable and inverted-residual blocks with
squeeze-excite, ``conv_head``, ``act2``, ``classifier``), with a width multiplier
of 0.5 on small channel counts so that the tests stay fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from aligning import assert_same_function, parameter_distance, random_permutation
from torch import nn

from geoconnect import LinearConnector
from geoconnect.align import PermutationSpec, weight_matching


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: ``F.batch_norm`` on its own buffers, then an activation."""

    def __init__(self, num_features: int, act_layer: type[nn.Module] | None = nn.ReLU):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class SqueezeExcite(nn.Module):
    """timm's ``SqueezeExcite`` of ``_efficientnet_blocks``: a gate from the mean."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, se: int | None):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=False)
        self.bn1 = BatchNormAct2d(in_chs, nn.ReLU)
        self.se = SqueezeExcite(in_chs, se) if se else nn.Identity()
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = BatchNormAct2d(out_chs, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.se(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        if self.has_skip:
            x = x + shortcut
        return x


class InvertedResidual(nn.Module):
    def __init__(
        self, in_chs: int, mid_chs: int, out_chs: int, k: int, stride: int, se: int | None, act
    ):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid_chs, act)
        self.conv_dw = nn.Conv2d(mid_chs, mid_chs, k, stride, k // 2, groups=mid_chs, bias=False)
        self.bn2 = BatchNormAct2d(mid_chs, act)
        self.se = SqueezeExcite(mid_chs, se) if se else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = BatchNormAct2d(out_chs, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = x + shortcut
        return x


class ConvBnAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn1 = BatchNormAct2d(out_chs, nn.Hardswish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x))


class MobileNetV3Small050(nn.Module):
    """``mobilenetv3_small_050``'s module structure (its stages, 0.5 channels)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        hs = nn.Hardswish
        self.conv_stem = nn.Conv2d(in_chans, 8, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(8, hs)
        self.blocks = nn.Sequential(
            nn.Sequential(DepthwiseSeparableConv(8, 8, 2, se=8)),
            nn.Sequential(
                InvertedResidual(8, 36, 16, 3, 2, None, nn.ReLU),
                InvertedResidual(16, 44, 16, 3, 1, None, nn.ReLU),
            ),
            nn.Sequential(
                InvertedResidual(16, 48, 24, 5, 1, 16, hs),
                InvertedResidual(24, 120, 24, 5, 1, 32, hs),
            ),
            nn.Sequential(ConvBnAct(24, 144)),
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(144, 256, 1, bias=True)
        self.act2 = hs()
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_stem(x)
        x = self.bn1(x)
        x = self.blocks(x)
        x = self.global_pool(x)
        x = self.conv_head(x)
        x = self.act2(x)
        return self.classifier(self.flatten(x))


def trained_statistics(seed: int) -> MobileNetV3Small050:
    """A network with non-trivial running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = MobileNetV3Small050()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def test_a_timm_style_batchnorm_follows_its_units():
    model = trained_statistics(0)
    axes = PermutationSpec.from_model(model).axes
    # The normalisation's own buffers and affine parameters sit on the channels of the
    # convolution that feeds it (torch.nn's BatchNorm2d is followed the same way).
    for name in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        assert axes[name][0] == axes["conv_stem.weight"][0] is not None
    assert axes["blocks.1.0.bn3.running_var"][0] == axes["blocks.1.0.conv_pwl.weight"][0]


def test_permuting_a_timm_style_mobilenet_by_the_derived_spec_keeps_its_function():
    model = trained_statistics(0)
    x = torch.randn(4, 3, 32, 32)
    spec = PermutationSpec.from_model(model)
    permuted = spec.apply(model, random_permutation(spec, model, seed=1))
    assert parameter_distance(model, permuted) > 0
    assert_same_function(model, permuted, x)


def test_weight_matching_aligns_two_timm_style_mobilenets_and_keeps_the_function():
    a, b = trained_statistics(1), trained_statistics(2)
    x = torch.randn(8, 3, 32, 32)
    aligned = weight_matching(a, b, random_state=0)
    assert_same_function(b, aligned, x)  # to 1e-5
    assert parameter_distance(a, aligned) < parameter_distance(a, b)
    line = LinearConnector(n_points=3, device="cpu", align="weight_matching")
    line.fit(x.numpy(), model_a=a, model_b=b)
    with torch.no_grad():
        torch.testing.assert_close(line.path_[-1](x), b(x), rtol=1e-5, atol=1e-5)


class FunctionalNorm(nn.Module):
    """A per-channel normalisation written with torch.nn.functional on its own tensors."""

    def __init__(self, kind: str, channels: int, groups: int = 1):
        super().__init__()
        self.kind, self.groups = kind, groups
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels))
        self.register_buffer("running_mean", torch.randn(channels))
        self.register_buffer("running_var", torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "batch_norm":
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias)
        if self.kind == "instance_norm":
            return F.instance_norm(x, weight=self.weight, bias=self.bias)
        return F.group_norm(x, self.groups, self.weight, self.bias)


def small_net(kind: str, groups: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        FunctionalNorm(kind, 4, groups),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


@pytest.mark.parametrize(
    ("kind", "groups"),
    [("batch_norm", 1), ("instance_norm", 1), ("group_norm", 1), ("group_norm", 4)],
)
def test_functional_per_channel_norms_follow_the_channels(kind, groups):
    torch.manual_seed(0)
    model = small_net(kind, groups).eval()
    spec = PermutationSpec.from_model(model)
    units = spec.axes["0.weight"][0]
    assert units is not None
    for name in ("1.weight", "1.bias") + (("1.running_mean",) if kind == "batch_norm" else ()):
        assert spec.axes[name] == (units,)
    permuted = spec.apply(model, random_permutation(spec, model, seed=3))
    assert parameter_distance(model, permuted) > 0
    assert_same_function(model, permuted, torch.randn(6, 3, 8, 8))


def test_a_group_norm_across_groups_keeps_its_channels_in_place():
    torch.manual_seed(0)
    model = small_net("group_norm", groups=2).eval()  # 2 groups of 2 channels
    spec = PermutationSpec.from_model(model)
    assert spec.axes["0.weight"][0] is None and spec.axes["1.weight"] == (None,)
    assert spec.axes["3.weight"][0] is not None  # the next layer's units still permute
