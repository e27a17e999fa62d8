"""Objectives: what the gradient in GISP's score is the gradient of.

An objective yields batches and, for each batch, a scalar whose gradients, summed over all batches,
are the gradient of the whole objective (so it carries its own normalisation: the LM objective
returns the sum of per-sample mean losses divided by the number of samples). ``build`` only calls
``loss(model, batch).backward()`` and accumulates; it knows nothing about the objective.

User-written objectives implement the same protocol (see nestprune.objectives for margin, answer
and the ``module:callable`` plug-in).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from nestprune.rank.calibration import CalibrationSet

Batch = dict[str, torch.Tensor]


@runtime_checkable
class Objective(Protocol):
    name: str

    def batches(self, batch_size: int) -> Iterator[Batch]: ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor: ...

    def provenance(self) -> dict[str, Any]: ...


def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy over labelled positions (labels -100 are ignored). (B,)"""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    counts = (shift_labels != -100).sum(1).clamp_min(1)
    return nll.sum(1) / counts  # (B,)


class LanguageModeling:
    """Causal-LM cross-entropy, every token labelled; the mean over windows of each window's mean loss."""

    name = "lm"

    def __init__(self, calib: CalibrationSet):
        self.calib = calib

    def batches(self, batch_size: int) -> Iterator[Batch]:
        w = self.calib.windows
        for i in range(0, len(w), batch_size):
            yield {"input_ids": w[i : i + batch_size]}

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        ids = batch["input_ids"]
        return token_nll(model, ids, ids).sum() / len(self.calib.windows)

    def provenance(self) -> dict[str, Any]:
        c = self.calib
        return {
            "objective": "lm",
            "source": c.source,
            "sha256": c.sha256,
            "documents": c.documents,
            "tokens_available": c.tokens_available,
            "samples": int(c.windows.shape[0]),
            "seq_len": int(c.windows.shape[1]),
            "tokens_used": c.tokens_used,
            "seed": c.seed,
        }
