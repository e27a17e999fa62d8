"""The ``hf`` writer: a variant as a Hugging Face model directory (config.json + safetensors + tokenizer files).

``write_hf`` streams every tensor of a ``TensorSource`` (local safetensors files, or the registry's store),
sliced to the kept rows/columns of a ``VariantSpec``, straight into the output safetensors file, whose
header is computed up front from the spec — so peak memory is one tensor (two for a column slice), never
a shard. Given the same spec, tensors, aux files and manifest it writes byte-identical files whatever the
source.

With local safetensors (``SafetensorsSource``) whole tensors and runs of kept rows are byte ranges of the
base files and are copied in the kernel (``os.copy_file_range``); column slices (o_proj, down_proj) are
gathered by numpy from a read-only map of the file. The bytes are the same as through ``take``.

Output directory (written atomically: ``nestprune.io.atomic.output_dir``)::

    config.json                      base config; per-layer widths under "nestprune" (or a stock config)
    model.safetensors                or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer*, generation_config.json, …   copied from the aux directory
    nestprune_variant.json           the variant manifest (schemas/variant.py)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nestprune.errors import NestpruneError
from nestprune.io import atomic
from nestprune.io.weights import DTYPE_NAMES, SafetensorsSource, TensorSource, row_runs, weight_files
from nestprune.schemas.variant import VARIANT_MANIFEST_NAME, VariantManifest
from nestprune.variant.contents import (
    DEFAULT_SHARD_BYTES,
    Progress,
    TensorPlan,
    aux_files,
    plan_tensors,
    take,
)
from nestprune.variant.widths import VariantSpec

INDEX_NAME = "model.safetensors.index.json"


def plan_shards(plans: list[TensorPlan], shard_bytes: int) -> list[list[TensorPlan]]:
    """Greedy shards in name order; a tensor larger than ``shard_bytes`` gets a shard of its own."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for p in plans:
        if shards[-1] and size + p.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


# --- bytes --------------------------------------------------------------------------------------------------

def safetensors_header(plans: list[TensorPlan]) -> bytes:
    """8-byte little-endian length + JSON header padded with spaces to an 8-byte boundary."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in plans:
        header[p.name] = {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


class FileSpans:
    """Where each tensor of local safetensors files lies, so that whole tensors and runs of rows are copied
    in the kernel (``os.copy_file_range``) instead of through Python. Column slices still use ``take``.
    The bytes written are the same either way."""

    def __init__(self, files: list[Path]):
        self.fds: list[int] = []
        self.path: dict[int, Path] = {}
        self.where: dict[str, tuple[int, str, tuple[int, ...], int]] = {}  # name -> (fd, dtype, shape, offset)
        try:
            for f in files:
                fd = os.open(f, os.O_RDONLY)
                self.fds.append(fd)
                self.path[fd] = Path(f)
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                header = json.loads(os.pread(fd, n, 8))
                for name, info in header.items():
                    if name != "__metadata__":
                        self.where[name] = (fd, info["dtype"], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
        except Exception:
            self.close()
            raise

    def columns(self, p: TensorPlan) -> np.ndarray | None:
        """The kept columns of a 2-D tensor, gathered by numpy from a read-only map of its bytes, or None.
        (rows, kept) of unsigned ints as wide as the dtype: the bytes, whatever the dtype."""
        if p.name not in self.where or p.axis != 1 or p.index is None:
            return None
        fd, dtype, shape, start = self.where[p.name]
        if dtype != DTYPE_NAMES[p.dtype] or len(shape) != 2 or shape[0] != p.shape[0]:
            return None
        if len(p.index) and (p.index.min() < 0 or p.index.max() >= shape[1]):
            return None
        if shape[0] * shape[1] == 0:
            return np.zeros(p.shape, np.dtype(f"u{p.dtype.itemsize}"))
        words = np.memmap(self.path[fd], dtype=np.dtype(f"<u{p.dtype.itemsize}"), mode="r", offset=start, shape=shape)
        return np.take(words, p.index, axis=1)  # (rows, kept)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def spans(self, p: TensorPlan) -> list[tuple[int, int, int]] | None:
        """(source fd, byte offset, length) of every contiguous piece of ``p``, or None (use ``take``)."""
        if p.name not in self.where or p.axis != 0:
            return None
        fd, dtype, shape, start = self.where[p.name]
        if dtype != DTYPE_NAMES[p.dtype] or shape[1:] != p.shape[1:] or not shape:
            return None
        row = int(np.prod(shape[1:], dtype=np.int64)) * p.dtype.itemsize
        if p.index is None:
            return [(fd, start, row * shape[0])] if shape == p.shape else None
        if len(p.index) and (p.index.min() < 0 or p.index.max() >= shape[0]):
            return None
        return [(fd, start + a * row, (b - a) * row) for a, b in row_runs(p.index)]


def write_all(fd: int, data: memoryview) -> None:
    while len(data):
        data = data[os.write(fd, data):]


def copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Append ``length`` bytes of ``src`` from ``offset`` to ``dst``, in the kernel where it can."""
    while length:
        try:
            n = os.copy_file_range(src, dst, length, offset)
        except OSError:  # not supported here (old kernel, some file systems): copy through memory
            n = 0
        if n == 0:
            data = os.pread(src, min(length, 1 << 26), offset)
            if not data:
                raise NestpruneError("a base weight file ended early while being read; was it modified?")
            write_all(dst, memoryview(data))
            n = len(data)
        offset += n
        length -= n


def write_shard(path: Path, plans: list[TensorPlan], source: TensorSource, done: int, total: int,
                progress: Progress | None, spans: FileSpans | None = None) -> int:
    """Stream one safetensors file, tensor by tensor; returns bytes written so far (for progress)."""
    ordered = sorted(plans, key=lambda p: (-p.dtype.itemsize, p.name))  # wider dtypes first: aligned offsets
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        write_all(fd, memoryview(safetensors_header(ordered)))
        for p in ordered:
            pieces = spans.spans(p) if spans is not None else None
            cols = spans.columns(p) if (spans is not None and pieces is None) else None
            if pieces is not None:
                for src, offset, length in pieces:
                    copy_range(src, fd, offset, length)
            elif cols is not None:
                write_all(fd, memoryview(np.ascontiguousarray(cols).reshape(-1).view(np.uint8)))
            else:
                t = take(source, p).contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
                write_all(fd, memoryview(t.numpy()))
            done += p.nbytes
            if progress is not None:
                progress(p.name, done, total)
    finally:
        os.close(fd)
    return done


def write_weights(out_dir: Path, plans: list[TensorPlan], source: TensorSource, shard_bytes: int,
                  progress: Progress | None = None) -> list[str]:
    shards = plan_shards(plans, shard_bytes)
    names = shard_names(len(shards))
    total, done = sum(p.nbytes for p in plans), 0
    spans = FileSpans(weight_files(source.model_dir)) if isinstance(source, SafetensorsSource) else None
    try:
        for name, shard in zip(names, shards, strict=True):
            done = write_shard(out_dir / name, shard, source, done, total, progress, spans)
    finally:
        if spans is not None:
            spans.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {p.name: n for n, shard in zip(names, shards, strict=True) for p in shard}}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


# --- config, manifest, aux files ----------------------------------------------------------------------------

def variant_config(base_config: dict[str, Any], spec: VariantSpec) -> dict[str, Any]:
    """Widths the same in every layer (``uniform``): a stock config of the narrower model. Otherwise the base
    config plus every layer's widths under "nestprune" — the per-layer config form ``load_variant`` reads,
    whichever width policy chose them ("layout" there names that form, not the policy)."""
    cfg = {k: v for k, v in base_config.items() if k != "nestprune"}
    if spec.same_in_every_layer:
        first = spec.layers[0]
        return spec.arch.stock_config(cfg, {"q": first.num_heads, "kv": first.num_kv_heads,
                                            "mlp": first.intermediate_size})
    cfg["nestprune"] = {
        "layout": "per-layer",
        "gqa_mode": spec.gqa_mode,
        "layers": [{"num_attention_heads": k.num_heads, "num_key_value_heads": k.num_kv_heads,
                    "kv_of_head": k.kv_of_head.tolist(), "intermediate_size": k.intermediate_size}
                   for k in spec.layers],
    }
    return cfg


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")




# --- the writer ---------------------------------------------------------------------------------------------

def write_hf(spec: VariantSpec, source: TensorSource, aux_dir: Path, out: Path, manifest: VariantManifest, *,
             shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False, inputs: Iterable[Path] = (),
             progress: Progress | None = None) -> None:
    """Write ``spec`` of the model behind ``source`` as an HF directory at ``out`` (see ``writers.Writer``)."""
    aux_dir = Path(aux_dir)
    config_file = aux_dir / "config.json"
    if not config_file.exists():
        raise NestpruneError(f"{aux_dir} has no config.json")
    plans = plan_tensors(source, spec)  # before any write: a bad source fails early
    config = variant_config(json.loads(config_file.read_text()), spec)  # so does a config the family cannot hold
    with atomic.output_dir(out, force=force, inputs=inputs) as tmp:
        write_weights(tmp, plans, source, shard_bytes, progress)
        write_json(tmp / "config.json", config)
        for f in aux_files(aux_dir):
            shutil.copyfile(f, tmp / f.name)
        write_json(tmp / VARIANT_MANIFEST_NAME, manifest.model_dump(mode="json"))
