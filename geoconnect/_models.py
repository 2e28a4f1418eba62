"""Checks on the user's modules and the BatchNorm bookkeeping the path needs."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def check_model(model: object, name: str, owner: str) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``; raise a clear error otherwise."""
    if model is None:
        raise ValueError(
            f"{owner}.fit needs {name}: call fit(X, y, model_a=..., model_b=...) with two "
            "torch.nn.Module classifiers of the same architecture."
        )
    if isinstance(model, list) and model and all(isinstance(m, nn.Module) for m in model):
        raise TypeError(
            f"{name} must be a torch.nn.Module mapping a batch of X to logits; got a list "
            f"of {len(model)} modules. scikit-learn's cross-validation splits fit "
            "parameters whose length equals the number of samples, and an nn.Sequential "
            "has a length: wrap the model, e.g. nn.Sequential(model), so its length "
            "differs from n_samples."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{name} must be a torch.nn.Module mapping a batch of X to logits; got "
            f"{type(model).__name__}."
        )
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{name} has no parameters; there is nothing to connect.")
    return model


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter or buffer that differs."""
    for kind, items_a, items_b in (
        ("parameter", dict(model_a.named_parameters()), dict(model_b.named_parameters())),
        ("buffer", dict(model_a.named_buffers()), dict(model_b.named_buffers())),
    ):
        only_a = sorted(set(items_a) - set(items_b))
        only_b = sorted(set(items_b) - set(items_a))
        if only_a or only_b:
            where = (
                f"{kind} {only_a[0]!r} is in model_a but not model_b"
                if only_a
                else f"{kind} {only_b[0]!r} is in model_b but not model_a"
            )
            raise ValueError(
                f"model_a and model_b must have the same architecture, but {where}. "
                "Pass two instances of the same network class built with the same "
                "arguments."
            )
        for key, tensor_a in items_a.items():
            tensor_b = items_b[key]
            if tensor_a.shape != tensor_b.shape:
                raise ValueError(
                    f"model_a and model_b must have the same architecture, but {kind} "
                    f"{key!r} has shape {tuple(tensor_a.shape)} in model_a and "
                    f"{tuple(tensor_b.shape)} in model_b."
                )
            if tensor_a.dtype != tensor_b.dtype:
                raise ValueError(
                    f"model_a and model_b must have the same dtypes, but {kind} {key!r} "
                    f"is {tensor_a.dtype} in model_a and {tensor_b.dtype} in model_b. "
                    "Convert one with .to(dtype)."
                )


def batchnorm_buffer_names(model: nn.Module) -> list[str]:
    """Names of the buffers that are BatchNorm running statistics."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            prefix = f"{module_name}." if module_name else ""
            names.extend(prefix + buffer for buffer, _ in module.named_buffers(recurse=False))
    return names


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def default_hidden_width(n_features: int, n_classes: int) -> int:
    """Width of the default MLP's hidden layers: ``2·(n_features + n_classes)`` in [16, 64].

    Examples
    --------
    >>> from geoconnect._models import default_hidden_width
    >>> default_hidden_width(64, 10), default_hidden_width(2, 2)
    (64, 16)
    """
    return int(min(64, max(16, 2 * (n_features + n_classes))))


def default_model_factory(X: Tensor, y: Tensor, seed: int) -> nn.Module:
    """Train the connectors' default model: a small ReLU MLP, sized from the data.

    The network flattens each sample, then has two hidden layers of
    :func:`default_hidden_width` units and one output per class. It is trained with
    Adam (learning rate 0.01, batches of 64) for about 300 steps (5 to 50 epochs), so
    that fitting a connector without models stays fast on small data sets.

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
    >>> from geoconnect._models import default_model_factory
    >>> X, y = torch.randn(40, 3), torch.arange(40) % 2
    >>> default_model_factory(X, y, seed=0)(X).shape
    torch.Size([40, 2])
    """
    n_samples = int(X.shape[0])
    n_features = int(np.prod(X.shape[1:]))
    n_classes = int(y.max()) + 1
    width = default_hidden_width(n_features, n_classes)
    with torch.random.fork_rng(devices=[X.device] if X.device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, n_classes),
        )
    model = model.to(device=X.device, dtype=X.dtype if X.is_floating_point() else None)
    generator = torch.Generator().manual_seed(seed)
    batch_size = 64
    n_batches = max(1, -(-n_samples // batch_size))
    epochs = int(min(50, max(5, -(-300 // n_batches))))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n_samples, generator=generator).to(X.device)
        for start in range(0, n_samples, batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(X[index]), y[index]).backward()
            optimizer.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()
