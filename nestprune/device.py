"""Device and dtype choice shared by build and eval: CUDA + bf16 when available, else CPU + fp32."""

from __future__ import annotations

import torch

from nestprune.errors import NestpruneError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str) -> torch.device:
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
    if dtype not in DTYPES:
        raise NestpruneError(f"--dtype must be one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)
