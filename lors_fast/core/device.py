"""Device names of the stage configs: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import torch

__all__ = ["AUTO", "resolve_device", "check_device"]

#: the default device of every stage config
AUTO = "auto"


def check_device(device: str) -> str | None:
    """The problem with a device name as one sentence, or None when it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(device, str):
        return f"device must be a string ('auto', 'cpu', 'cuda' or 'cuda:N'), got {device!r}"
    if device == AUTO:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
    if dev.type not in ("cpu", "cuda"):
        return f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
    return None


def resolve_device(device: str | torch.device = AUTO) -> torch.device:
    """``auto`` → ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; any other name → ``torch.device(name)``.

    Raises ValueError (one line) for a name that is not a device, or for a CUDA device when CUDA is not available.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        problem = check_device(device)
        if problem:
            raise ValueError(problem)
        if device == AUTO:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r} requested but CUDA is not available (use --device auto or cpu)")
    return dev
