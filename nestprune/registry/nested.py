"""The nested order of registry packs (pure: tensors and ints in, tensors and bytes out; no I/O).

How a registry stores a tensor so that any variant reads a prefix of it. Within each decoder layer, heads / KV groups / MLP channels are permuted into the reverse of the
layer's removal order — most important first — and every prunable tensor is stored with its pruned
axis as the row axis (o_proj and down_proj transposed). A variant of any sparsity then keeps, in each
layer, a *prefix* of the stored units, so its bytes are a prefix of every prunable pack. The
permutation is function-preserving: it is applied to the rows of q/k/v/gate/up and the same columns
of o/down, and undone on read, so a pull hands materialize the original tensors restricted to the
requested original indices.

Chunks: one per head (``head_dim`` rows), one per block of ``channel_block`` MLP channels (default 32:
256 KiB at hidden 4096 in bf16, so rounding a layer's kept channels up to a block costs < 1% of a
variant while adjacent chunks are still fetched with one range read), and
row blocks of about ``WHOLE_CHUNK_BYTES`` for tensors that are never pruned (embeddings, norms,
lm_head), which are stored whole in their original order. K/V in GQA query-head mode are not ranked:
they keep their original order but are still chunked per head (a variant may drop a KV head).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from nestprune.arch import KIND_CODES, ArchInfo, Space, join_segments
from nestprune.errors import NestpruneError
from nestprune.ranking import Ranking
from nestprune.variant.widths import expand

WHOLE_CHUNK_BYTES = 4 << 20
DEFAULT_CHANNEL_BLOCK = 32  # 256 KiB chunks at hidden 4096 in bf16; a pull over-reads < 32 channels a layer


@dataclass(frozen=True)
class LayerUnits:
    """One layer's units in stored order (original indices, most important first).

    In GQA query-head mode K/V heads are not ranked; they keep their original order (still chunked per
    head, so a variant that drops a KV head none of whose query heads survives skips its bytes).
    """

    q: np.ndarray
    kv: np.ndarray
    mlp: np.ndarray

    def order(self, space: Space) -> np.ndarray:
        return {"q": self.q, "kv": self.kv, "mlp": self.mlp}[space]


@dataclass(frozen=True)
class Placement:
    """Where a prunable tensor's units live: its layer, index space, pruned axis and rows per unit.

    A fused tensor (Phi-3 qkv_proj, gate_up_proj) lists its ``segments`` (index space, rows along the pruned
    axis) in memory order; units are permuted within each segment, ``space`` is the first one's (every
    segment of a tensor has the same unit width). A plain tensor has no ``segments``.
    """

    layer: int
    space: Space
    axis: int
    unit_rows: int
    segments: tuple[tuple[Space, int], ...] = ()


def _check_perm(order: np.ndarray, n: int, what: str) -> np.ndarray:
    order = np.asarray(order, dtype=np.int64)
    if len(order) != n or not np.array_equal(np.sort(order), np.arange(n)):
        raise NestpruneError(f"the ranking does not list each of the {n} {what} exactly once")
    return order


def layer_units(ranking: Ranking) -> dict[int, LayerUnits]:
    """Stored order of every layer's units: the reverse of the layer's removal order."""
    arch = ranking.arch
    att = ranking.attention_kind
    group_mode = att == KIND_CODES["group"]
    units: dict[int, LayerUnits] = {}
    for layer in range(arch.num_layers):
        what = f"attention units of layer {layer}"
        a = _check_perm(ranking.layer_order(layer, att)[::-1], ranking.structures.attention_units, what)
        mlp = _check_perm(ranking.layer_order(layer, KIND_CODES["channel"])[::-1], arch.intermediate_size,
                          f"MLP channels of layer {layer}")
        if group_mode:  # a KV head and its query heads, the query heads in their original order
            gs = arch.group_size
            q = expand(a, gs)
            kv = a
        else:
            q = a
            kv = np.arange(arch.num_kv_heads) if arch.is_gqa else a
        units[layer] = LayerUnits(q=q, kv=kv, mlp=mlp)
    return units


@cache
def _layer_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix).replace(r"\{\}", r"(\d+)") + "(.+)$")


def placement(arch: ArchInfo, name: str, units: dict[int, LayerUnits]) -> Placement | None:
    """The placement of tensor ``name`` if it is prunable (its units are permuted), else None."""
    m = _layer_pattern(arch.fam.layer_prefix).match(name)
    if not m:
        return None
    layer, local = int(m.group(1)), m.group(2)
    segs = arch.segments(local)
    if not segs or layer not in units:
        return None
    s = segs[0]
    fused = tuple((g.space, arch.segment_length(g)) for g in segs) if len(segs) > 1 else ()
    return Placement(layer=layer, space=s.space, axis=s.axis, unit_rows=arch.space_width(s.space), segments=fused)


def to_stored(t: torch.Tensor, where: Placement | None, units: dict[int, LayerUnits]) -> torch.Tensor:
    """The tensor as stored: pruned axis as rows, units in stored order. Whole tensors unchanged."""
    if where is None:
        return t.contiguous()
    rows = t.t() if where.axis == 1 else t
    segments = where.segments or ((where.space, rows.shape[0]),)
    perm = torch.as_tensor(stored_order(segments, units[where.layer].order, where.unit_rows))
    return rows.index_select(0, perm).contiguous()


def stored_order(segments: tuple[tuple[Space, int], ...] | list[tuple[Space, int]],
                 order: Callable[[Space], np.ndarray], width: int) -> np.ndarray:
    """Original row of each stored row of a tensor whose rows are ``segments`` (space, rows) in memory order,
    the units of each permuted into ``order(space)``. (rows,)"""
    return join_segments([n for _, n in segments], [expand(order(sp), width) for sp, _ in segments])


def stored_rows_of(index: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Stored row of each original row in ``index``, for ``perm`` = original row of each stored row."""
    pos = np.empty(len(perm), dtype=np.int64)
    pos[perm] = np.arange(len(perm))
    return pos[np.asarray(index, dtype=np.int64)]


def chunk_rows_for(where: Placement | None, stored_shape: tuple[int, ...], itemsize: int,
                   channel_block: int = DEFAULT_CHANNEL_BLOCK) -> int:
    """Rows per chunk: one head, a block of channels, or ~WHOLE_CHUNK_BYTES of a whole tensor."""
    if where is not None:
        return where.unit_rows if where.space != "mlp" else max(1, channel_block)
    row_bytes = itemsize * int(np.prod(stored_shape[1:], dtype=np.int64)) if len(stored_shape) > 1 else itemsize
    return max(1, WHOLE_CHUNK_BYTES // max(1, row_bytes))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bits of a contiguous tensor (bf16 stays bit-exact)."""
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes | bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``data`` (no copy). Read-only bytes give a tensor that must not be written to."""
    if len(data) == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # "buffer is not writable": callers copy (index_select) before use
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)


def split_chunks(data: bytes, row_bytes: int, chunk_rows: int) -> list[bytes]:
    """The pack's bytes cut into chunks of ``chunk_rows`` rows (the last may be shorter)."""
    step = row_bytes * chunk_rows
    if not data:
        return []
    return [data[i : i + step] for i in range(0, len(data), step)]
