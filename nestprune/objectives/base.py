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


LOGITS_CHUNK_BYTES = 64 << 20  # fp32 logits of one chunk of tokens (the loss never holds more at once)


def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy over labelled positions (labels -100 are ignored). (B,)

    Computed without the (B, T, V) logits: the decoder's last hidden states go through the output layer
    a chunk of tokens at a time (:class:`ChunkedLinearNLL`), the chunk's logits in fp32, and the gradient
    with respect to the hidden states is made in the same pass (so nothing vocabulary-sized is saved for
    backward). A model whose output layer is not a plain Linear, has no ``base_model``, or whose output
    layer requires grad (the build never asks for it) takes :func:`token_nll_from_logits`.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if (not isinstance(head, torch.nn.Linear) or base is None or base is model or head.weight.requires_grad
            or (head.bias is not None and head.bias.requires_grad)):
        return token_nll_from_logits(model, input_ids, labels, attention_mask)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return ChunkedLinearNLL.apply(hidden[:, :-1], head.weight, head.bias, labels[:, 1:], softcap)


def token_nll_from_logits(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`token_nll` through the model's full (B, T, V) logits, copied to fp32 (the plain way). (B,)"""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    counts = (shift_labels != -100).sum(1).clamp_min(1)
    return nll.sum(1) / counts  # (B,)


class ChunkedLinearNLL(torch.autograd.Function):
    """Per-sample mean cross-entropy of ``linear(hidden, weight, bias)`` (optionally soft-capped logits,
    ``cap·tanh(z/cap)`` as Gemma-2/3) against ``labels``, chunk by chunk of tokens. (B,)

    hidden (B, T, d); weight (V, d); labels (B, T), -100 ignored. Each chunk's logits are made in the
    weight's dtype and widened to fp32 (as the plain path does), so the values agree with
    :func:`token_nll_from_logits` to fp32 rounding. The forward also computes d(loss)/d(hidden) for a unit
    upstream gradient per sample, (softmax − onehot)/count @ W, kept in the hidden states' dtype;
    backward scales it per sample. The output layer's own gradient is not computed (the build never
    asks for it).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                softcap: float | None = None, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise NotImplementedError("ChunkedLinearNLL does not compute the output layer's gradient")
        B, T, d = hidden.shape
        flat, y = hidden.reshape(B * T, d), labels.reshape(B * T)
        valid = y != -100
        counts = valid.view(B, T).sum(1).clamp_min(1)
        nll = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(flat) if want_grad else None
        if want_grad:
            per_token = (valid.view(B, T) / counts[:, None].float()).reshape(-1)  # (B*T,) 1/count, 0 unlabelled
        rows = max(1, chunk_bytes // (4 * weight.shape[0]))
        for lo in range(0, B * T, rows):
            hi = min(B * T, lo + rows)
            z = F.linear(flat[lo:hi], weight, bias).float()  # (C, V)
            tanh = None
            if softcap:
                tanh = torch.tanh(z / softcap)
                z = tanh * softcap
            # classes along dim 0, as the plain path's cross_entropy over (B, V, T) lays them out: the same
            # reduction order, so the same per-token values to the bit
            logp = F.log_softmax(z.t().contiguous(), dim=0)  # (V, C)
            del z
            target = torch.where(valid[lo:hi], y[lo:hi], 0)[None, :]  # (1, C)
            nll[lo:hi] = -logp.gather(0, target).squeeze(0) * valid[lo:hi]
            if want_grad:
                p = logp.exp_()  # softmax, in place
                p.scatter_add_(0, target, -torch.ones_like(target, dtype=p.dtype))
                p.mul_(per_token[None, lo:hi])
                if tanh is not None:
                    p.mul_(1.0 - tanh.t() * tanh.t())
                grad[lo:hi] = p.t().to(weight.dtype) @ weight
                del p
            del logp, tanh
        if want_grad:
            ctx.save_for_backward(grad)
        return nll.view(B, T).sum(1) / counts

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        B = grad_out.shape[0]
        g = grad.view(B, -1, grad.shape[-1]) * grad_out.to(grad.dtype)[:, None, None]
        return g, None, None, None, None, None
