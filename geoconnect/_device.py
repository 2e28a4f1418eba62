"""Resolution of the ``device`` parameter."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device, owner: str = "GeodesicConnector") -> torch.device:
    """Turn ``"auto"`` or a torch device string into an available ``torch.device``.

    ``"auto"`` picks CUDA, then MPS, then the CPU.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str):
        if device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            mps = getattr(torch.backends, "mps", None)
            if mps is not None and mps.is_available():
                return torch.device("mps")
            return torch.device("cpu")
        try:
            resolved = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(
                f"The 'device' parameter of {owner} must be 'auto' or a torch device "
                f"string such as 'cpu', 'cuda' or 'cuda:1'. Got {device!r} instead."
            ) from None
    else:
        raise TypeError(
            f"The 'device' parameter of {owner} must be a str or torch.device. "
            f"Got {type(device).__name__} instead."
        )
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"The 'device' parameter of {owner} asks for {str(resolved)!r}, but CUDA is "
            "not available here. Use device='auto' or device='cpu'."
        )
    if resolved.type == "cuda" and resolved.index is not None:
        if resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"The 'device' parameter of {owner} asks for {str(resolved)!r}, but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist."
            )
    if resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"The 'device' parameter of {owner} asks for 'mps', which is not "
                "available here. Use device='auto' or device='cpu'."
            )
    return resolved
