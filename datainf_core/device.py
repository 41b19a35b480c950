"""Device selection shared by gradients, training and the app."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Returns the device to use: ``"auto"`` picks CUDA, then MPS, then CPU."""
    if isinstance(device, torch.device):
        return device
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: str | torch.device = "auto") -> str:
    """A short human description, e.g. ``"CUDA: NVIDIA H200"`` or ``"CPU (2 threads)"``."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(resolved)}"
    if resolved.type == "mps":
        return "Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"
