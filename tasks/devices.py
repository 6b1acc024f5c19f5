"""Which device a run trains on, decided before any step computes."""

from __future__ import annotations

import importlib.metadata


class DeviceUnavailable(ValueError):
    """CUDA was asked for and this machine's torch cannot use it."""


def cuda_available() -> bool:
    """Whether torch can use a CUDA device here.

    A CPU-only torch build (its version ends in "+cpu") cannot, which is known without
    importing torch: a run whose every step is cached never needs torch otherwise.
    """
    if importlib.metadata.version("torch").endswith("+cpu"):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: str) -> str:
    """"auto" means CUDA when present; asking for CUDA without one is an error."""
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    if requested == "cuda" and not cuda_available():
        raise DeviceUnavailable("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return requested
