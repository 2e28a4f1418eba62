"""Small reference classifiers, a trainer, and the offline digits pair.

Used by the ``geoconnect demo`` command, the examples and the benchmarks so that
they all connect the same kind of model pair. Nothing here is downloaded: the data
are scikit-learn's bundled handwritten digits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

__all__ = [
    "DigitsSplit",
    "ResidualBlock",
    "default_hidden_width",
    "default_model_factory",
    "load_digits_split",
    "make_cnn",
    "make_mlp",
    "make_mobilenet",
    "make_resnet",
    "train_classifier",
]


@dataclass
class DigitsSplit:
    """Standardised digits, split into train and test (float32 inputs, int64 labels)."""

    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray

    @property
    def images_train(self) -> np.ndarray:
        """Train inputs as 1×8×8 images."""
        return self.X_train.reshape(-1, 1, 8, 8)

    @property
    def images_test(self) -> np.ndarray:
        """Test inputs as 1×8×8 images."""
        return self.X_test.reshape(-1, 1, 8, 8)


def load_digits_split(test_size: float = 0.3, random_state: int = 0) -> DigitsSplit:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes), standardised and split.

    Parameters
    ----------
    test_size : float, default=0.3
    random_state : int, default=0

    Returns
    -------
    DigitsSplit

    Examples
    --------
    >>> from geoconnect.models import load_digits_split
    >>> split = load_digits_split()
    >>> split.X_train.shape, split.X_test.shape
    ((1257, 64), (540, 64))
    """
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_size, random_state=random_state, stratify=y
    )
    scaler = StandardScaler().fit(X_train)  # constant pixels keep scale 1
    return DigitsSplit(
        scaler.transform(X_train).astype(np.float32),
        scaler.transform(X_test).astype(np.float32),
        y_train.astype(np.int64),
        y_test.astype(np.int64),
    )


def _seeded(seed: int | None) -> contextlib.AbstractContextManager:
    """Seed the initialisation without touching the caller's global torch RNG."""
    if seed is None:
        return contextlib.nullcontext()
    return _forked_seed(seed)


@contextlib.contextmanager
def _forked_seed(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_mlp(
    sizes: tuple[int, ...] = (64, 16, 16, 10),
    *,
    seed: int | None = None,
    layer_norm: bool = False,
) -> nn.Sequential:
    """A ReLU multilayer perceptron, e.g. 64-16-16-10 for digits.

    Parameters
    ----------
    sizes : tuple of int, default=(64, 16, 16, 10)
        Layer widths, input first, classes last.
    seed : int, optional
    layer_norm : bool, default=False
        Put a ``LayerNorm`` between each hidden layer's ``Linear`` and its ReLU.
        Seed of the initialisation; the global torch RNG is left as it was.

    Returns
    -------
    nn.Sequential

    Examples
    --------
    >>> from geoconnect.models import make_mlp
    >>> make_mlp(seed=0)
    Sequential(
      (0): Linear(in_features=64, out_features=16, bias=True)
      (1): ReLU()
      (2): Linear(in_features=16, out_features=16, bias=True)
      (3): ReLU()
      (4): Linear(in_features=16, out_features=10, bias=True)
    )
    >>> make_mlp((4, 8, 2), layer_norm=True)
    Sequential(
      (0): Linear(in_features=4, out_features=8, bias=True)
      (1): LayerNorm((8,), eps=1e-05, elementwise_affine=True, bias=True)
      (2): ReLU()
      (3): Linear(in_features=8, out_features=2, bias=True)
    )
    """
    layers: list[nn.Module] = []
    with _seeded(seed):
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.extend([nn.LayerNorm(n_out)] if layer_norm else [])
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_cnn(
    n_classes: int = 10, width: int = 16, *, in_channels: int = 1, seed: int | None = None
) -> nn.Sequential:
    """A small convolutional network with BatchNorm for 8×8 images.

    Parameters
    ----------
    n_classes : int, default=10
    width : int, default=16
        Channels of the first convolution (the second has twice as many).
    in_channels : int, default=1
    seed : int, optional

    Returns
    -------
    nn.Sequential

    Examples
    --------
    >>> import torch
    >>> from geoconnect.models import make_cnn
    >>> make_cnn(seed=0)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    with _seeded(seed):
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, n_classes),
        )


class ResidualBlock(nn.Module):
    """A basic residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1×1 convolution with BatchNorm when the block
    changes the number of channels or the resolution.

    Parameters
    ----------
    in_channels, out_channels : int
    stride : int, default=1

    Examples
    --------
    >>> import torch
    >>> from geoconnect.models import ResidualBlock
    >>> ResidualBlock(4, 8, stride=2)(torch.zeros(2, 4, 8, 8)).shape
    torch.Size([2, 8, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def make_resnet(
    n_classes: int = 10, width: int = 16, *, in_channels: int = 1, seed: int | None = None
) -> nn.Sequential:
    """A small residual network with BatchNorm for 8×8 images (a miniature ResNet).

    A 3×3 stem convolution, a residual block at full resolution, a downsampling
    residual block with twice the channels, global average pooling and a linear
    layer.

    Parameters
    ----------
    n_classes : int, default=10
    width : int, default=16
        Channels of the stem and the first block (the second has twice as many).
    in_channels : int, default=1
    seed : int, optional

    Returns
    -------
    nn.Sequential

    Examples
    --------
    >>> import torch
    >>> from geoconnect.models import make_resnet
    >>> make_resnet(width=4, seed=0)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    with _seeded(seed):
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            ResidualBlock(width, width),
            ResidualBlock(width, 2 * width, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, n_classes),
        )


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: channels rescaled by a gate computed from their means."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))
        return x * gate


class InvertedResidual(nn.Module):
    """MobileNetV2/V3's block: 1×1 expansion, depthwise 3×3, squeeze-excitation,
    1×1 projection, BatchNorm after each convolution; residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, expand: int = 4, stride: int = 1):
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            SqueezeExcite(hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def make_mobilenet(
    n_classes: int = 10, width: int = 16, *, in_channels: int = 1, seed: int | None = None
) -> nn.Sequential:
    """A small MobileNet-style network for 8×8 images: BatchNorm-heavy, depthwise.

    A 3×3 stem, three inverted-residual blocks with squeeze-excitation (the second
    downsampling to twice the channels), a 1×1 head convolution, global average
    pooling and a linear layer: thirteen BatchNorm layers. The kind of network on
    which a geodesic fit's step size matters most.

    Parameters
    ----------
    n_classes : int, default=10
    width : int, default=16
    in_channels : int, default=1
    seed : int, optional

    Returns
    -------
    nn.Sequential

    Examples
    --------
    >>> import torch
    >>> from geoconnect.models import make_mobilenet
    >>> make_mobilenet(width=4, seed=0)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    with _seeded(seed):
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(),
            InvertedResidual(width, width),
            InvertedResidual(width, 2 * width, stride=2),
            InvertedResidual(2 * width, 2 * width),
            nn.Conv2d(2 * width, 4 * width, 1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, n_classes),
        )


def train_classifier(
    model: nn.Module,
    X: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: int = 60,
    lr: float = 1e-2,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; return it in eval mode.

    Parameters
    ----------
    model : nn.Module
        Trained where its parameters are.
    X : ndarray or Tensor of shape (n_samples, *input_shape)
        Arrays become float32; a floating-point tensor keeps its dtype.
    y : ndarray or Tensor of shape (n_samples,)
        Class indices.
    epochs : int, default=60
    lr : float, default=1e-2
    batch_size : int, default=64
    weight_decay : float, default=0.0
    seed : int, default=0
        Seed of the batch order.

    Returns
    -------
    nn.Module

    Examples
    --------
    >>> from geoconnect.models import load_digits_split, make_mlp, train_classifier
    >>> split = load_digits_split()
    >>> net = train_classifier(make_mlp(seed=0), split.X_train, split.y_train, epochs=2)
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    floating = isinstance(X, torch.Tensor) and X.is_floating_point()
    X_t = torch.as_tensor(X, dtype=None if floating else torch.float32).to(device)
    y_t = torch.as_tensor(y, dtype=torch.long).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(X_t), generator=generator).to(device)
        for start in range(0, len(X_t), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X_t[idx]), y_t[idx]).backward()
            optimizer.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


def default_hidden_width(n_features: int, n_classes: int) -> int:
    """Width of the default MLP's hidden layers: ``2·(n_features + n_classes)`` in [16, 64].

    Examples
    --------
    >>> from geoconnect.models import default_hidden_width
    >>> default_hidden_width(64, 10), default_hidden_width(2, 2)
    (64, 16)
    """
    return int(min(64, max(16, 2 * (n_features + n_classes))))


def default_model_factory(X: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """Train the connectors' default model: a small ReLU MLP, sized from the data.

    The network flattens each sample, then is a :func:`make_mlp` with two hidden
    layers of :func:`default_hidden_width` units and one output per class, trained by
    :func:`train_classifier` (Adam, learning rate 0.01, batches of 64) for about 300
    steps (5 to 50 epochs), so that fitting a connector without models stays fast on
    small data sets.

    Parameters
    ----------
    X : Tensor of shape (n_samples, *input_shape)
        Float inputs, on the device to train on.
    y : Tensor of shape (n_samples,)
        Class indices ``0 … n_classes − 1`` (int64), on the same device.
    seed : int
        Seeds the initialisation and the batch order; the global torch RNG is left
        alone.

    Returns
    -------
    nn.Module
        The trained network, in eval mode.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.models import default_model_factory
    >>> X, y = torch.randn(40, 3), torch.arange(40) % 2
    >>> default_model_factory(X, y, seed=0)(X).shape
    torch.Size([40, 2])
    """
    n_features = int(np.prod(X.shape[1:]))
    n_classes = int(y.max()) + 1
    width = default_hidden_width(n_features, n_classes)
    mlp = make_mlp((n_features, width, width, n_classes), seed=seed)
    model = nn.Sequential(nn.Flatten(), *mlp)
    model = model.to(device=X.device, dtype=X.dtype if X.is_floating_point() else None)
    n_batches = max(1, -(-int(X.shape[0]) // 64))
    epochs = int(min(50, max(5, -(-300 // n_batches))))
    return train_classifier(model, X, y, epochs=epochs, lr=1e-2, batch_size=64, seed=seed)
