"""Resolution of the ``device`` parameter."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device, owner: str = "GeodesicConnector") -> torch.device:
    """Turn ``"auto"`` or a torch device string into an available ``torch.device``.

    ``"auto"`` picks CUDA, then MPS, then the CPU.
    """
    if isinstance(device, str) and device == "auto":
        return _auto_device()
    resolved = _parse_device(device, owner)
    _check_available(resolved, owner)
    return resolved


def _auto_device() -> torch.device:
    """The device ``"auto"`` stands for: CUDA, then MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _parse_device(device: object, owner: str) -> torch.device:
    """``device`` (a ``torch.device`` or a device string other than ``"auto"``) as a
    ``torch.device``; a wrong type or an unparsable string is refused."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(
                f"The 'device' parameter of {owner} must be 'auto' or a torch device "
                f"string such as 'cpu', 'cuda' or 'cuda:1'. Got {device!r} instead."
            ) from None
    raise TypeError(
        f"The 'device' parameter of {owner} must be a str or torch.device. "
        f"Got {type(device).__name__} instead."
    )


def _check_available(resolved: torch.device, owner: str) -> None:
    """Refuse a device that does not exist or cannot hold data here."""
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
    if resolved.type == "meta":
        raise ValueError(
            f"The 'device' parameter of {owner} asks for 'meta', but tensors on the meta "
            "device have shapes and no values, so no data can live there and nothing can "
            f"be computed. Use a device that holds data: {_working_devices()}."
        )
    if resolved.type not in ("cpu", "cuda", "mps"):
        _check_backend_usable(resolved, owner)


def _check_backend_usable(resolved: torch.device, owner: str) -> None:
    """Refuse a backend torch knows by name but may lack (xla without torch_xla, xpu,
    hpu, …): try one tiny tensor there rather than fail deep inside the fit."""
    try:
        torch.empty(1, device=resolved)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else "no message"
        reason = reason if len(reason) <= 100 else reason[:100] + "…"
        hint = " (for 'xla', install torch_xla)" if resolved.type == "xla" else ""
        raise ValueError(
            f"The 'device' parameter of {owner} asks for {str(resolved)!r}, but its "
            f"backend is not installed or not usable here{hint}: creating a tensor "
            f"there raised {type(exc).__name__} ({reason}). Use one of the devices "
            f"that work here: {_working_devices()}."
        ) from None


def _working_devices() -> str:
    """The device strings that work here, for error messages."""
    devices = ["'auto'", "'cpu'"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        devices.append("'cuda'" + (f" ('cuda:0' … 'cuda:{count - 1}')" if count > 1 else ""))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("'mps'")
    return ", ".join(devices)
