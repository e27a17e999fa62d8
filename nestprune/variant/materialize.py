"""Streaming safetensors in → variant directory out.

``materialize_variant`` is the one writer: it reads every tensor through a ``TensorSource`` (local
safetensors files, or the registry's store), slices it to the kept rows/columns of a ``VariantSpec`` and
streams it straight into the output safetensors file, whose header is computed up front from the spec —
so peak memory is one tensor (two for a column slice), never a shard. Given the same spec, tensors,
aux files and provenance it writes byte-identical files whatever the source.

With local safetensors (``SafetensorsSource``) whole tensors and runs of kept rows are byte ranges of the
base files and are copied in the kernel (``os.copy_file_range``); column slices (o_proj, down_proj) are
gathered by numpy from a read-only map of the file. The bytes are the same as through ``take``.

Output directory (written to a temporary sibling, renamed into place only when complete)::

    config.json                      base config; per-layer widths under "nestprune" (or a stock config)
    model.safetensors                or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer*, generation_config.json, …   copied from the aux directory
    nestprune_variant.json           the variant manifest (schemas/variant.py)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nestprune import __version__
from nestprune.arch import TensorSlice
from nestprune.errors import NestpruneError
from nestprune.io.weights import SafetensorsSource, TensorSource, weight_files
from nestprune.ranking import Ranking
from nestprune.schemas.artifact import BaseFingerprint
from nestprune.schemas.variant import VARIANT_MANIFEST_NAME, LayerKept, VariantManifest
from nestprune.variant.widths import Layout, VariantSpec, plan_variant, sparsity_for_params

DEFAULT_SHARD_BYTES = 5 * 1024**3  # like transformers' save_pretrained default
INDEX_NAME = "model.safetensors.index.json"
# Files copied verbatim from the aux directory (tokenizer, generation settings, licence).
AUX_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
    "generation_config.json", "chat_template*", "preprocessor_config.json", "LICENSE*", "NOTICE*",
)
Progress = Callable[[str, int, int], None]  # (tensor name, bytes written so far, bytes in total)

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


# --- what to write ------------------------------------------------------------------------------------------

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
        if dtype not in ST_DTYPES:
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
        header[p.name] = {"dtype": ST_DTYPES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def take(source: TensorSource, p: TensorPlan) -> torch.Tensor:
    index = None if p.index is None else torch.from_numpy(p.index)
    t = source.take(p.name, p.axis, index)
    if tuple(t.shape) != p.shape or t.dtype != p.dtype:
        raise NestpruneError(f"the tensor source returned {p.name} as {tuple(t.shape)} {t.dtype}, "
                             f"expected {p.shape} {p.dtype}")
    return t


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
        if dtype != ST_DTYPES[p.dtype] or len(shape) != 2 or shape[0] != p.shape[0]:
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
        if dtype != ST_DTYPES[p.dtype] or shape[1:] != p.shape[1:] or not shape:
            return None
        row = int(np.prod(shape[1:], dtype=np.int64)) * p.dtype.itemsize
        if p.index is None:
            return [(fd, start, row * shape[0])] if shape == p.shape else None
        if len(p.index) and (p.index.min() < 0 or p.index.max() >= shape[0]):
            return None
        return [(fd, start + a * row, (b - a) * row) for a, b in row_runs(p.index)]


def row_runs(index: np.ndarray) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 6), (9, 10)]: the contiguous runs of an ascending index."""
    if len(index) == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(index)]])
    return [(int(index[s]), int(index[e - 1]) + 1) for s, e in zip(starts, ends, strict=True)]


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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
    """Uniform: a stock config of the narrower model. Per-layer: the base config plus per-layer widths."""
    cfg = {k: v for k, v in base_config.items() if k != "nestprune"}
    if spec.layout == "uniform":
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


def aux_files(aux_dir: Path) -> list[Path]:
    """Tokenizer, generation and licence files of a model directory (what a variant copies), sorted."""
    found = {p for pat in AUX_PATTERNS for p in Path(aux_dir).glob(pat) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# --- the writer ---------------------------------------------------------------------------------------------

def check_out(out_dir: Path, force: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise NestpruneError(f"{out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise NestpruneError(f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return out_dir


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary directory to ``out_dir`` (an existing one is replaced: --force)."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        out_dir.rename(old / "x")
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def materialize_variant(
    source: TensorSource,
    ranking: Ranking,
    spec: VariantSpec,
    aux_dir: Path,
    out_dir: Path,
    *,
    base: BaseFingerprint | None = None,
    artifact_digest: str | None = None,
    requested_params: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    progress: Progress | None = None,
) -> VariantManifest:
    """Write the variant ``spec`` of the model behind ``source`` as an HF directory at ``out_dir``.

    source     every base tensor, by checkpoint key (``SafetensorsSource(base_dir)`` or a registry's store)
    ranking    the ranking ``spec`` was planned from (checked to match it)
    spec       ``plan_variant(ranking, sparsity, layout, multiple_of)``
    aux_dir    a directory holding the base ``config.json`` and the tokenizer / generation files to copy
    out_dir    created atomically (temporary sibling + rename); refused if it exists unless ``force``
    base, artifact_digest, requested_params   provenance recorded in ``nestprune_variant.json``
    shard_bytes  above this many bytes of tensors the weights are sharded with an index
    progress   called after each tensor with (name, bytes written, bytes in total)

    Returns the manifest written. Output bytes depend only on the arguments' contents, never on the source
    type, its tensor order or the clock.
    """
    if spec.structures != ranking.structures:
        raise NestpruneError("the variant spec was not planned from this ranking (architecture or GQA mode differs)")
    aux_dir = Path(aux_dir)
    config_file = aux_dir / "config.json"
    if not config_file.exists():
        raise NestpruneError(f"{aux_dir} has no config.json")
    out_dir = check_out(out_dir, force)
    plans = plan_tensors(source, spec)  # before any write: a bad source fails early
    config = variant_config(json.loads(config_file.read_text()), spec)  # so does a config the family cannot hold
    manifest = variant_manifest(spec, base, artifact_digest, requested_params)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        write_weights(tmp, plans, source, shard_bytes, progress)
        write_json(tmp / "config.json", config)
        for f in aux_files(aux_dir):
            shutil.copyfile(f, tmp / f.name)
        write_json(tmp / VARIANT_MANIFEST_NAME, manifest.model_dump(mode="json"))
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# --- the convenience entry point ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MaterializeResult:
    out_dir: Path
    spec: VariantSpec
    manifest: VariantManifest
    max_abs_diff: float | None  # set when verified


def materialize(
    artifact_path: Path,
    base_dir: Path,
    out: Path,
    sparsity: float | None = None,
    params: int | None = None,
    layout: Layout = "per-layer",
    multiple_of: int | None = None,
    force: bool = False,
    verify: bool = False,
    full_check: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
) -> MaterializeResult:
    """Artifact + base weights + one target (``sparsity`` or total ``params``) → a loadable variant at ``out``.

    The base must match the artifact's fingerprint (config sha256, weight file names and sizes; with
    ``full_check`` every file's sha256). ``verify`` compares fp32 logits with the masked base (≤ 1e-5).
    """
    from nestprune.artifact import read_artifact
    from nestprune.io.fingerprint import check_fingerprint

    if (sparsity is None) == (params is None):
        raise NestpruneError("give exactly one target: --sparsity or --params")
    check_out(out, force)
    manifest, ranking = read_artifact(Path(artifact_path))
    check_fingerprint(Path(base_dir), manifest.base, full=full_check)
    target = sparsity if sparsity is not None else sparsity_for_params(ranking, int(params))
    spec = plan_variant(ranking, target, layout, multiple_of)
    with SafetensorsSource(Path(base_dir)) as source:
        written = materialize_variant(
            source, ranking, spec, Path(base_dir), Path(out), base=manifest.base,
            artifact_digest=manifest.digest(), requested_params=params, shard_bytes=shard_bytes,
            force=force, progress=progress,
        )
    diff = None
    if verify:
        from nestprune.variant.verify import verify_variant

        diff = verify_variant(Path(base_dir), Path(out), spec)
    return MaterializeResult(out_dir=Path(out), spec=spec, manifest=written, max_abs_diff=diff)
