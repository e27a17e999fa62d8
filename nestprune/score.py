"""GISP's first-order, loss-based structure scores (pure tensor math, no I/O, no devices).

Per weight: S_w = | W ⊙ mean_n ∇_W ℓ_n |  (abs after averaging). A structure's raw score is the sum
of S_w over the weights it owns (arch.py's table; biases are not scored, as in the reference).
Block-wise normalisation divides by a constant per block type (arch.ArchInfo.normaliser).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nestprune.arch import ArchInfo, GqaMode, TensorSlice


def _per_unit(s: TensorSlice, saliency: torch.Tensor, units: int, width: int) -> torch.Tensor:
    """Sum a (out, in) saliency matrix into one value per unit of the slice's index space. (units,)"""
    if s.axis == 0:
        return saliency.reshape(units, width, -1).sum(dim=(1, 2))
    return saliency.sum(dim=0).reshape(units, width).sum(dim=1)


def layer_scores(
    arch: ArchInfo,
    gqa_mode: GqaMode,
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores of one layer: (attention units,), (mlp channels,) in float64.

    ``weights``/``grads`` are keyed by the slice name inside the layer (e.g. "mlp.up_proj.weight");
    ``grads`` holds the objective's mean gradient.
    """
    kind = arch.attention_kind(gqa_mode)
    attn = torch.zeros(arch.num_attention_units(gqa_mode), dtype=torch.float64)
    mlp = torch.zeros(arch.intermediate_size, dtype=torch.float64)
    for s in scored_slices(arch, gqa_mode):
        w, g = weights[s.name], grads[s.name]
        saliency = (w.float() * g.float()).abs()
        per = _per_unit(s, saliency, arch.space_size(s.space), arch.space_width(s.space)).double().cpu()
        if s.space == "mlp":
            mlp += per
        elif s.space == "q" and kind == "group":
            attn += per.reshape(arch.num_kv_heads, arch.group_size).sum(1)  # (groups, heads/group) -> groups
        else:  # q under head kind; kv under MHA (head h = kv head h) or group kind (group g = kv head g)
            attn += per
    return attn, mlp


def scored_slices(arch: ArchInfo, gqa_mode: GqaMode) -> tuple[TensorSlice, ...]:
    """The weight tensors whose gradients the score needs (biases excluded; GQA query mode: no k/v)."""
    return tuple(s for s in arch.slices() if s.name.endswith(".weight") and arch.owns(s.space, gqa_mode))


def normalise(arch: ArchInfo, gqa_mode: GqaMode, attn: torch.Tensor, mlp: torch.Tensor,
              normalisation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise normalisation (GISP.md): heads / (4·d_h·d), channels / (3·I)."""
    kind = arch.attention_kind(gqa_mode)
    return attn / arch.normaliser(kind, normalisation), mlp / arch.normaliser("channel", normalisation)
