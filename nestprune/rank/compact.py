"""Compaction: pruned heads and channels physically removed from the working model during a build.

Zeroing a removed structure (``mask.py``) keeps the model's cost: every step still runs the dense
forward and backward. Compaction cuts the rows/columns of removed structures out of the working tensors
(every segment of a fused tensor, biases included), so forward, backward, gradient accumulation and
scoring shrink with the model. The structure table, the scores and the removal order stay in full-width
terms (``GispState``); a :class:`LayerLayout` says which original unit sits at each position of a
layer's working tensors.

Policy (:class:`CompactPolicy`), per layer and block (attention units, MLP channels), after each step's
removals: the block's new width is its live units rounded up to a multiple (``channel_multiple`` for
MLP channels: 64 on CUDA, the bf16 tensor-core tile; 32 on CPU, the unit of PyTorch's vectorised
elementwise loops, see below; ``head_multiple`` for attention units, whose width is already a multiple
of ``head_dim``), never below one multiple nor below two channels; the block is cut when that drops its
width by at least ``min_shrink`` (1/16) of its current width. A cut costs one copy of the block's
weights; each step pays the cut-away width again in forward and backward over all calibration tokens,
so a cut pays for itself within the step, and the 1/16 threshold only keeps the number of
reallocations (and allocator fragmentation) low: a block is re-cut after every ~6% of it has been
removed. The positions kept beyond the live units are padding: removed units left in place, whose
weights are zero, so they add exact zeros and their gradients are exactly zero; they are never scored
(a removed structure's score is recorded when it is removed, and the score vector gives every removed
structure exactly 0, present or not).

Exactness (why the compacted and the zeroing path give the same removal order, and when). A removed
structure contributes exactly zero in the zeroing path: its q (and owned k/v) rows and o columns, or
gate/up rows and down column, are zero, so its attention output, its MLP activation and every gradient
flowing through it are exact zeros (0·x = 0 for finite x). Compaction drops those zero terms, and the
two paths agree to the bit where three things hold; each was found by comparing them op by op:

* every reduction over a pruned axis (o_proj and down_proj in forward; the input gradient of
  q/k/v/qkv and gate/up/gate_up in backward; the K/V gradient over a group's query heads) adds its
  surviving terms one after another: adding an exact zero to a running sum changes nothing. MKL's fp32
  GEMM on x86 does so within one K-block (an FMA chain per output element; measured bit-identical up to
  K = 384 and not beyond), except when one side is a single column or row (its matrix-vector path sums
  in another order: hence never fewer than two channels). Past one K-block the two paths group the
  surviving terms differently; GPU GEMMs (split-K, tensor-core tiles) give no such guarantee at all;
* elementwise functions computed with a vector routine (SiLU/GELU's ``exp``/``tanh`` in forward and
  backward) see each element in the same kind of lane: PyTorch's CPU loops take 32 fp32 values at a time
  and finish a tensor's last partial block with the scalar routine, whose last bit can differ; a
  compacted width that is a multiple of 32 keeps every element in the vector loop, as the full-width
  tensors (B·T·intermediate_size a multiple of 32) are;
* scores sum each unit's weights as one contiguous block in both paths (``score.per_unit``), and the
  GQA query-head mode gathers K/V per query head in both paths (``attention.py``), so the K/V gradient
  is the same ``index_add`` over the same heads in ascending order.

Hence: identical scores and removal orders in fp32 on CPU when every pruned axis fits one K-block (the
tiny models of every family and the CPU proxies; tested on all families in both GQA modes, and asserted
by ``bench/build_speed.py``). Elsewhere (GPU, bf16, LLM widths) the scores agree to fp32 rounding
(≈1e-7 relative) and the order can differ only where two scores are that close: a near-tie that the
zeroing path itself breaks differently under another micro-batch size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from nestprune.arch import ArchInfo, Structures, TensorSlice
from nestprune.rank import attention


@dataclass(frozen=True)
class CompactPolicy:
    """When and to which width a block is cut (see the module docstring)."""

    channel_multiple: int = 32
    head_multiple: int = 1
    min_shrink: float = 1 / 16

    def __post_init__(self) -> None:
        if self.channel_multiple < 1 or self.head_multiple < 1 or not 0.0 <= self.min_shrink < 1.0:
            raise ValueError(f"invalid compaction policy {self}")

    def width(self, live: int, current: int, multiple: int, minimum: int = 1) -> int | None:
        """The new width of a block with ``live`` units left of ``current`` positions (never below
        ``minimum``, nor one multiple); None: leave it."""
        new = min(current, max(multiple, minimum, -(-live // multiple) * multiple))
        if new >= current or current - new < self.min_shrink * current:
            return None
        return new


def default_policy(device: torch.device | str) -> CompactPolicy:
    return CompactPolicy(channel_multiple=64 if torch.device(device).type == "cuda" else 32)


@dataclass
class LayerLayout:
    """Which original unit sits at each position of one layer's working tensors (ascending)."""

    attn: np.ndarray  # (positions,) attention-unit index
    mlp: np.ndarray  # (positions,) MLP channel index

    @classmethod
    def full(cls, st: Structures) -> LayerLayout:
        return cls(np.arange(st.attention_units), np.arange(st.arch.intermediate_size))

    def counts(self, st: Structures) -> dict[str, int]:
        """Units per index space of the working tensors."""
        arch, n = st.arch, len(self.attn)
        if st.attention_kind == "group":
            q, kv = n * arch.group_size, n
        else:
            q, kv = n, (n if st.owns("kv") else arch.num_kv_heads)
        return {"q": q, "kv": kv, "mlp": len(self.mlp)}

    def is_full(self, st: Structures) -> bool:
        return len(self.attn) == st.attention_units and len(self.mlp) == st.arch.intermediate_size

    def kv_of_head(self, st: Structures) -> np.ndarray | None:
        """GQA query-head mode: the KV head of each query-head position (what the attention gathers)."""
        if st.attention_kind != "head" or st.owns("kv"):
            return None
        return self.attn // st.arch.group_size


def _expand(units: np.ndarray, width: int) -> np.ndarray:
    return (np.asarray(units, dtype=np.int64)[:, None] * width + np.arange(width)).reshape(-1)


def unit_elements(st: Structures, space: str, positions: np.ndarray, counts: dict[str, int]) -> np.ndarray:
    """Element indices, inside a segment of index space ``space`` laid out with ``counts``, of the attention
    units / channels at ``positions`` (all of the segment where no structure owns the space)."""
    arch = st.arch
    if space == "mlp":
        return np.asarray(positions, dtype=np.int64)
    if not st.owns(space):  # GQA query-head mode: K/V are never cut
        return np.arange(counts[space] * arch.head_dim)
    heads = _expand(positions, arch.group_size) if (space == "q" and st.attention_kind == "group") else positions
    return _expand(heads, arch.head_dim)


def tensor_index(st: Structures, name: str, attn_pos: np.ndarray, mlp_pos: np.ndarray,
                 counts: dict[str, int]) -> torch.Tensor:
    """Indices along the pruned axis of tensor ``name`` (every segment) that keep the given positions."""
    def rows(s: TensorSlice) -> np.ndarray:
        return unit_elements(st, s.space, mlp_pos if s.space == "mlp" else attn_pos, counts)

    return torch.from_numpy(st.arch.tensor_index(name, rows, counts))


def _modules(model: torch.nn.Module, arch: ArchInfo, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    block = model.get_submodule(arch.fam.layers_path)[layer]
    return block.get_submodule(arch.fam.attention), block.get_submodule(arch.fam.mlp)


def _set_tensor(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    module_path, attr = key.rsplit(".", 1)
    module = model.get_submodule(module_path)
    setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    if isinstance(module, torch.nn.Linear) and attr == "weight":
        module.out_features, module.in_features = value.shape


def _configure(model: torch.nn.Module, st: Structures, layer: int, lay: LayerLayout,
               original_config: object) -> None:
    """Module attributes that must follow a layer's widths: the K/V gather (GQA query-head mode), the
    group count the kernel sees, K/V head counts, and a per-layer config view where the attention reads
    widths from the global config (Phi-3)."""
    arch = st.arch
    attn, mlp = _modules(model, arch, layer)
    counts = lay.counts(st)
    kv = lay.kv_of_head(st)
    if kv is not None:
        device = next(attn.parameters()).device
        attention.set_kv_index(attn, torch.as_tensor(kv, device=device), 1)
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = counts["kv"]
    view = arch.attention_config(counts)
    if any(getattr(original_config, k) != v for k, v in view.items()):
        attn.config = copy.copy(original_config)
        for k, v in view.items():
            setattr(attn.config, k, v)
    else:
        attn.config = original_config
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = counts["mlp"]


@torch.no_grad()
def select_(model: torch.nn.Module, st: Structures, layer: int, lay: LayerLayout, attn_keep: np.ndarray,
            mlp_keep: np.ndarray, original_config: object) -> LayerLayout:
    """Keep only the positions ``attn_keep`` / ``mlp_keep`` (ascending, into ``lay``) of one layer's working
    tensors, in place in ``model`` (new Parameters; the old ones are released). Returns the new layout."""
    arch = st.arch
    counts = lay.counts(st)
    named = dict(model.named_parameters())
    for name in arch.tensor_names():
        key = arch.layer_key(layer, name)
        axis = arch.segments(name)[0].axis
        index = tensor_index(st, name, attn_keep, mlp_keep, counts)
        old = named.pop(key)
        if index.numel() == old.shape[axis]:
            continue
        new = old.detach().index_select(axis, index.to(old.device))
        del old
        _set_tensor(model, key, new)
    new_lay = LayerLayout(lay.attn[attn_keep], lay.mlp[mlp_keep])
    _configure(model, st, layer, new_lay, original_config)
    return new_lay


@torch.no_grad()
def expand_(model: torch.nn.Module, st: Structures, layer: int, lay: LayerLayout, original_config: object) -> None:
    """Put one layer back to full width: every absent row/column zero (what the zeroing path holds)."""
    arch = st.arch
    full = LayerLayout.full(st)
    base = full.counts(st)
    named = dict(model.named_parameters())
    for name in arch.tensor_names():
        key = arch.layer_key(layer, name)
        s = arch.segments(name)[0]
        index = tensor_index(st, name, lay.attn, lay.mlp, base)  # where each current row/column belongs
        cur = named.pop(key)
        length = arch.tensor_length(name)
        if cur.shape[s.axis] == length:
            continue
        shape = list(cur.shape)
        shape[s.axis] = length
        new = cur.new_zeros(shape).index_copy_(s.axis, index.to(cur.device), cur.detach())
        del cur
        _set_tensor(model, key, new)
    _configure(model, st, layer, full, original_config)


def zero_positions_(model: torch.nn.Module, st: Structures, layer: int, lay: LayerLayout,
                    attn_live: np.ndarray, mlp_live: np.ndarray) -> None:
    """Zero the removed units still present in one layer's working tensors (``*_live``: per position)."""
    from nestprune.rank.mask import layer_tensors, zero_removed_

    zero_removed_(st, layer_tensors(model, st.arch, layer), attn_live, mlp_live, lay.counts(st))
