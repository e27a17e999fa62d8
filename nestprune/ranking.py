"""The global ranking: every prunable structure once, in removal order (pure data, no I/O).

Entries removed by the schedule come first, by step and, within a step, by ascending score.
Entries the schedule never removed follow (``step == -1``): first those of prunable layers, then
those of never-pruned layers (``prunable == False``), each by ascending final score. So a variant at
any sparsity the build reached is the complement of a prefix of this order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nestprune.arch import KIND_CODES, ArchInfo, GqaMode, Structures
from nestprune.errors import NestpruneError

RANKING_FIELDS = ("layer", "kind", "index", "step", "score", "raw_score", "cost", "prunable")


@dataclass(frozen=True)
class Ranking:
    structures: Structures  # the model's shapes and how attention is cut into units
    decoder_params: int  # all decoder-layer parameters of the base model, norms included
    layer: np.ndarray  # int32 (n,)
    kind: np.ndarray  # uint8 (n,) KIND_CODES
    index: np.ndarray  # int32 (n,) head / group / channel index inside its layer
    step: np.ndarray  # int32 (n,) removal step, -1 = never removed by the schedule
    score: np.ndarray  # float64 (n,) normalised score at removal (final score if never removed)
    raw_score: np.ndarray  # float64 (n,) the same before block-wise normalisation
    cost: np.ndarray  # int64 (n,) parameters the structure holds
    prunable: np.ndarray  # bool (n,) False for structures of never-pruned layers

    def __post_init__(self) -> None:
        n = len(self.layer)
        for f in RANKING_FIELDS:
            if len(getattr(self, f)) != n:
                raise NestpruneError(f"ranking column {f!r} has {len(getattr(self, f))} entries, expected {n}")

    def __len__(self) -> int:
        return len(self.layer)

    @property
    def arch(self) -> ArchInfo:
        return self.structures.arch

    @property
    def gqa_mode(self) -> GqaMode:
        return self.structures.gqa_mode

    @property
    def attention_kind(self) -> int:
        return self.structures.attention_code

    @property
    def num_removed(self) -> int:
        """Length of the prefix the schedule actually removed."""
        return int((self.step >= 0).sum())

    def sparsity_curve(self) -> np.ndarray:
        """Parameter sparsity after removing the first k entries, for k = 0 … num_removed. (num_removed+1,)"""
        removed = np.concatenate([[0], np.cumsum(self.cost[: self.num_removed], dtype=np.int64)])
        return removed / float(self.decoder_params)

    @property
    def max_sparsity(self) -> float:
        return float(self.sparsity_curve()[-1])

    def prefix_for_sparsity(self, sparsity: float) -> int:
        """Shortest prefix of the removal order whose parameter sparsity reaches ``sparsity``."""
        if not 0.0 <= sparsity < 1.0:
            raise NestpruneError(f"sparsity must be in [0, 1), got {sparsity}")
        curve = self.sparsity_curve()
        if sparsity > curve[-1] + 1e-12:
            raise NestpruneError(
                f"sparsity {sparsity:.4f} is beyond what this artifact ranked (max {curve[-1]:.4f}); "
                "rebuild with a higher --max-sparsity"
            )
        return int(np.searchsorted(curve, sparsity - 1e-12, side="left"))

    def layer_order(self, layer: int, kind: int) -> np.ndarray:
        """Indices of one layer's structures of ``kind``, from first removed to last (most important last)."""
        sel = (self.layer == layer) & (self.kind == kind)
        return self.index[sel]


@dataclass(frozen=True)
class StructureTable:
    """Every structure of a model once, in canonical order (per layer: attention units, then channels)."""

    layer: np.ndarray  # int32 (N,)
    kind: np.ndarray  # uint8 (N,)
    index: np.ndarray  # int32 (N,)
    cost: np.ndarray  # int64 (N,)
    prunable: np.ndarray  # bool (N,)

    def __len__(self) -> int:
        return len(self.layer)


def structure_table(st: Structures, prunable_layers: list[int]) -> StructureTable:
    arch, akind = st.arch, st.attention_kind
    n_attn, n_mlp = st.attention_units, arch.intermediate_size
    per_layer = n_attn + n_mlp
    L = arch.num_layers
    layer = np.repeat(np.arange(L, dtype=np.int32), per_layer)
    kind = np.tile(np.r_[np.full(n_attn, KIND_CODES[akind]), np.full(n_mlp, KIND_CODES["channel"])], L)
    index = np.tile(np.r_[np.arange(n_attn), np.arange(n_mlp)], L).astype(np.int32)
    cost = np.tile(np.r_[np.full(n_attn, arch.structure_cost(akind)), np.full(n_mlp, arch.structure_cost("channel"))],
                   L).astype(np.int64)
    prunable = np.isin(layer, np.asarray(prunable_layers, dtype=np.int32))
    return StructureTable(layer=layer, kind=kind.astype(np.uint8), index=index, cost=cost, prunable=prunable)


def kept_counts(ranking: Ranking, prefix_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Attention units and channels each layer keeps after removing the first ``prefix_len`` entries. (L,), (L,)"""
    arch = ranking.arch
    L = arch.num_layers
    removed_layer = ranking.layer[:prefix_len]
    is_ch = ranking.kind[:prefix_len] == KIND_CODES["channel"]
    attn = ranking.structures.attention_units - np.bincount(removed_layer[~is_ch], minlength=L)
    mlp = arch.intermediate_size - np.bincount(removed_layer[is_ch], minlength=L)
    return attn, mlp
