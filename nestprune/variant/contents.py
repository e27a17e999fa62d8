"""What a variant holds, whatever its format: every base tensor cut to the spec's kept rows and columns, and
the base directory's aux files (tokenizer, generation settings, licence). Writers (``nestprune.variant.writers``)
turn this into bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nestprune import __version__
from nestprune.arch import TensorSlice
from nestprune.errors import NestpruneError
from nestprune.io.weights import DTYPE_NAMES, TensorSource
from nestprune.schemas.artifact import BaseFingerprint
from nestprune.schemas.variant import LayerKept, VariantManifest
from nestprune.variant.widths import VariantSpec

# Files copied verbatim from the aux directory (tokenizer, generation settings, licence).
AUX_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
    "generation_config.json", "chat_template*", "preprocessor_config.json", "LICENSE*", "NOTICE*",
)
DEFAULT_SHARD_BYTES = 5 * 1024**3  # above this many bytes of tensors a writer splits its output (like transformers)
Progress = Callable[[str, int, int], None]  # (tensor name, bytes written so far, bytes in total)


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: ``source.take(name, axis, index)`` with the shape and dtype it must have."""

    name: str
    axis: int
    index: np.ndarray | None  # int64 kept element indices along ``axis``; None = whole tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def natural_key(name: str) -> list[Any]:
    """'model.layers.10.x' sorts after 'model.layers.9.x'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def sliced_tensors(spec: VariantSpec) -> dict[str, tuple[int, TensorSlice]]:
    """Checkpoint key → (layer, first segment) for every tensor the spec cuts."""
    arch = spec.arch
    return {arch.layer_key(layer, name): (layer, arch.segments(name)[0])
            for layer in range(arch.num_layers) for name in arch.tensor_names()}


def plan_tensors(source: TensorSource, spec: VariantSpec) -> list[TensorPlan]:
    """Every tensor of the source, sliced where the spec says, in a canonical (natural) name order."""
    cut = sliced_tensors(spec)
    missing = sorted(set(cut) - set(source.names()))
    if missing:
        raise NestpruneError(f"the base weights lack {len(missing)} tensor(s) the ranking needs, e.g. {missing[0]}")
    plans = []
    for name in sorted(source.names(), key=natural_key):
        shape, dtype = tuple(source.shape(name)), source.dtype(name)
        if dtype not in DTYPE_NAMES:
            raise NestpruneError(f"tensor {name} has dtype {dtype}, which nestprune cannot write")
        if name not in cut:
            plans.append(TensorPlan(name, 0, None, shape, dtype))
            continue
        layer, s = cut[name]
        index = spec.arch.tensor_index(s.name, lambda seg, layer=layer: spec.rows(layer, seg.space))
        out_shape = list(shape)
        out_shape[s.axis] = len(index)
        plans.append(TensorPlan(name, s.axis, index, tuple(out_shape), dtype))
    return plans


def take(source: TensorSource, p: TensorPlan) -> torch.Tensor:
    index = None if p.index is None else torch.from_numpy(p.index)
    t = source.take(p.name, p.axis, index)
    if tuple(t.shape) != p.shape or t.dtype != p.dtype:
        raise NestpruneError(f"the tensor source returned {p.name} as {tuple(t.shape)} {t.dtype}, "
                             f"expected {p.shape} {p.dtype}")
    return t


def aux_files(aux_dir: Path) -> list[Path]:
    """Tokenizer, generation and licence files of a model directory (what a variant copies), sorted."""
    found = {p for pat in AUX_PATTERNS for p in Path(aux_dir).glob(pat) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def variant_manifest(spec: VariantSpec, base: BaseFingerprint | None = None, artifact_digest: str | None = None,
                     requested_params: int | None = None) -> VariantManifest:
    return VariantManifest(
        nestprune_version=__version__, base=base, artifact_digest=artifact_digest,
        model_type=spec.arch.model_type, layout=spec.layout, gqa_mode=spec.gqa_mode,
        multiple_of=spec.multiple_of, requested_sparsity=spec.requested_sparsity,
        requested_params=requested_params, achieved_sparsity=spec.achieved_sparsity, prefix_len=spec.prefix_len,
        decoder_params=spec.decoder_params, kept_decoder_params=spec.kept_decoder_params,
        total_params=spec.total_params,
        layers=[LayerKept(heads=k.heads.tolist(), kv_heads=k.kv_heads.tolist(), kv_of_head=k.kv_of_head.tolist(),
                          channels=k.channels.tolist()) for k in spec.layers],
    )
