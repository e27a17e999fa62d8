"""Device and dtype choice shared by build and eval: CUDA + bf16 when available, else CPU + fp32.

torch is imported inside the functions, so that :data:`DTYPES` is readable without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestprune.errors import NestpruneError

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; an unknown name or an
    unavailable CUDA device is refused in one line."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise NestpruneError(f"unknown --device {device!r}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise NestpruneError("--device cuda was asked for but no CUDA device is available")
    return d


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 elsewhere."""
    import torch

    if dtype not in DTYPES:
        raise NestpruneError(f"--dtype must be one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def device_name(device: torch.device) -> str:
    """``cuda: <GPU name>`` or ``cpu`` (as the artifact manifest records it)."""
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return "cpu"
