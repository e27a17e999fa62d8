"""Objectives: what the gradient in GISP's score is the gradient of.

An objective yields batches and, for each batch, a scalar whose gradients, summed over all batches,
are the gradient of the whole objective (so it carries its own normalisation: the LM objective
returns the sum of per-sample mean losses divided by the number of samples). ``build`` only calls
``loss(model, batch).backward()`` and accumulates; it knows nothing about the objective.

The objectives nestprune ships (lm, margin, answer, and the ``module:callable`` plug-in) live in
this package, one module each; user-written objectives implement the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

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
