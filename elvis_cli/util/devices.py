"""Device selection shared by extraction, re-ranking and training."""

from __future__ import annotations

from typing import TYPE_CHECKING

from elvis_cli.util.errors import InputError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto|cpu|cuda[:N]` as a device; asking for CUDA where there is none fails clearly."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}: use auto, cpu or cuda")
    return device
