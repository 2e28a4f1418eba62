"""Checks on the user's modules and the BatchNorm bookkeeping the path needs."""

from __future__ import annotations

import torch
from torch import nn
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


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (float32 if none).

    Examples
    --------
    >>> import torch
    >>> from geoconnect._model_checks import float_dtype
    >>> float_dtype(torch.nn.Linear(2, 2).double())
    torch.float64
    """
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
