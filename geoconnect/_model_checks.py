"""Checks on the user's modules and the BatchNorm bookkeeping the path needs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.nn.utils.weight_norm import WeightNorm


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
    _check_not_scripted(model, name)
    _check_initialised(model, name)
    _check_no_legacy_weight_norm(model, name)
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{name} has no parameters; there is nothing to connect.")
    return model


def _where(module_name: str) -> str:
    return f"submodule {module_name!r}" if module_name else "the model itself"


def _check_not_scripted(model: nn.Module, name: str) -> None:
    """Refuse TorchScript modules: the path copies the model and calls it functionally."""
    for module_name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            what = name if not module_name else f"{name}'s submodule {module_name!r}"
            raise TypeError(
                f"{what} is a torch.jit scripted or traced module "
                f"({type(module).__name__}); a path needs the original torch.nn.Module, "
                "because it copies the model and calls it functionally with each point's "
                "parameters, which TorchScript does not support. Pass the un-scripted "
                "nn.Module (the one given to torch.jit.script or torch.jit.trace)."
            )


def _check_initialised(model: nn.Module, name: str) -> None:
    """Refuse uninitialised lazy modules and tensors on the meta device."""
    tensors = [("parameter", key, t) for key, t in model.named_parameters()]
    tensors += [("buffer", key, t) for key, t in model.named_buffers()]
    for kind, key, tensor in tensors:
        if is_lazy(tensor):
            raise ValueError(
                f"{name} has an uninitialised {kind} {key!r}: it comes from a lazy module "
                "(nn.LazyLinear, nn.LazyConv2d, …), whose shapes are only set by its first "
                f"forward pass. Run one forward pass on a batch first to initialise it, "
                f"e.g. {name}(X[:2]) under torch.no_grad(), then fit."
            )
    for kind, key, tensor in tensors:
        if tensor.is_meta:
            raise ValueError(
                f"{name}'s {kind} {key!r} is on the 'meta' device: it has a shape but no "
                f"values. Load its weights first, e.g. {name}.to_empty(device='cpu') then "
                f"{name}.load_state_dict(state_dict), or "
                f"{name}.load_state_dict(state_dict, assign=True)."
            )


def _check_no_legacy_weight_norm(model: nn.Module, name: str) -> None:
    """Refuse ``torch.nn.utils.weight_norm``: its weight is a plain, recomputed tensor."""
    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                raise ValueError(
                    f"{name} uses the legacy torch.nn.utils.weight_norm (on "
                    f"{_where(module_name)}, weight {hook.name!r}), which recomputes the "
                    "weight in a forward pre-hook as a plain tensor, so the model can be "
                    "neither copied nor called with a point's parameters. Use "
                    "torch.nn.utils.parametrizations.weight_norm instead, or call "
                    "torch.nn.utils.remove_weight_norm on the module before connecting."
                )


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
