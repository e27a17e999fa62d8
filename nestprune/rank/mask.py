"""Masks: which structures of each layer are kept, and zeroing removed ones in weights (pure tensor ops).

Zeroing a head's q rows and o columns (and k/v rows where it owns them), or a channel's gate/up rows
and down column (inside fused tensors: in each segment), removes exactly its contribution: the masked dense model computes what the
materialized variant computes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from nestprune.arch import KIND_CODES, ArchInfo, Structures, TensorSlice
from nestprune.ranking import Ranking

LayerMasks = dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (attention keep (units,), mlp keep (I,))


def full_masks(st: Structures) -> LayerMasks:
    return {
        layer: (np.ones(st.attention_units, bool), np.ones(st.arch.intermediate_size, bool))
        for layer in range(st.arch.num_layers)
    }


def masks_from_ranking(ranking: Ranking, prefix_len: int) -> LayerMasks:
    """Keep-masks after removing the first ``prefix_len`` entries of the removal order."""
    masks = full_masks(ranking.structures)
    layer, kind, index = (ranking.layer[:prefix_len], ranking.kind[:prefix_len], ranking.index[:prefix_len])
    for l_, k_, i_ in zip(layer.tolist(), kind.tolist(), index.tolist(), strict=True):
        masks[l_][1 if k_ == KIND_CODES["channel"] else 0][i_] = False
    return masks


def slice_mask(st: Structures, s: TensorSlice, attn_keep: np.ndarray, mlp_keep: np.ndarray) -> torch.Tensor | None:
    """Keep-vector of one segment's rows (axis 0) or columns (axis 1); None = untouched."""
    if s.space == "mlp":
        unit = mlp_keep
    elif not st.owns(s.space):
        return None
    elif s.space == "q" and st.attention_kind == "group":
        unit = np.repeat(attn_keep, st.arch.group_size)  # groups -> query heads
    else:
        unit = attn_keep
    return torch.from_numpy(np.repeat(unit, st.arch.space_width(s.space)))


@torch.no_grad()
def zero_removed_(st: Structures, tensors: Mapping[str, torch.Tensor], attn_keep: np.ndarray,
                  mlp_keep: np.ndarray, counts: Mapping[str, int] | None = None) -> None:
    """Zero, in place, the rows/columns of removed structures in one layer's tensors (keyed by tensor name),
    segment by segment (a fused tensor is zeroed in each segment it holds). ``counts``: units per index
    space of the tensors (default the base model's; a compacted layer's are smaller), the keep-vectors
    being per unit present."""
    for s in st.arch.slices():
        keep = slice_mask(st, s, attn_keep, mlp_keep)
        if keep is None or bool(keep.all()):
            continue
        start, length = st.arch.segment_span(s, counts)
        t = tensors[s.name].narrow(s.axis, start, length)  # a view: zeroing it zeroes the tensor
        m = keep.to(device=t.device, dtype=t.dtype)
        t.mul_(m.view(-1, 1) if (s.axis == 0 and t.dim() == 2) else m)


def layer_tensors(model: torch.nn.Module, arch: ArchInfo, layer: int) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {s.name: params[arch.layer_key(layer, s.name)] for s in arch.slices()}


def apply_masks_(model: torch.nn.Module, st: Structures, masks: LayerMasks) -> None:
    for layer, (attn_keep, mlp_keep) in masks.items():
        zero_removed_(st, layer_tensors(model, st.arch, layer), attn_keep, mlp_keep)


def mask_model_(model: torch.nn.Module, ranking: Ranking, prefix_len: int) -> torch.nn.Module:
    """Zero in ``model`` (in place) every structure in the first ``prefix_len`` entries of the ranking."""
    apply_masks_(model, ranking.structures, masks_from_ranking(ranking, prefix_len))
    return model
