"""Publish an artifact and its base weights: blobs first, the manifest next, the version record last.

Every blob is keyed by its sha256, so a blob that exists is complete (writes are atomic per key), a
second push of the same model writes nothing new, and two concurrent pushes of the same model only
ever write identical bytes to the same keys. An interrupted push leaves unreferenced blobs and no
version record: nothing is visible, and a retry reuses what was uploaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nestprune import __version__
from nestprune.artifact import read_artifact
from nestprune.errors import NestpruneError
from nestprune.io.fingerprint import check_base
from nestprune.io.weights import DTYPE_NAMES, SafetensorsSource
from nestprune.registry.cache import sha256
from nestprune.registry.nested import (
    DEFAULT_CHANNEL_BLOCK,
    chunk_rows_for,
    layer_units,
    placement,
    split_chunks,
    tensor_bytes,
    to_stored,
)
from nestprune.registry.stores import Store, open_store
from nestprune.registry.versions import (
    DEFAULT_TAG,
    blob_key,
    canonical,
    check_name,
    check_tag,
    now,
    read_version,
    refresh_index,
    version_key,
    write_tag,
)
from nestprune.schemas.registry import (
    FileRef,
    LayerOrder,
    TensorEntry,
    TensorSegment,
    VersionManifestV1,
    VersionRecord,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class PushResult:
    record: VersionRecord
    tag: str
    bytes_written: int  # new blob bytes (blobs already in the registry are not written again)
    bytes_total: int


def default_name(base: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(base).resolve().name.lower()).strip("-._")
    return name or "model"


def aux_files(base: Path) -> list[Path]:
    """The non-weight files at the top of the base directory (config, tokenizer, generation config …)."""
    return sorted(
        p for p in Path(base).iterdir()
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)
        and p.name not in WEIGHT_FILES
    )


class _Uploader:
    def __init__(self, store: Store, on_bytes: Callable[[int], None] | None):
        self.store = store
        self.on_bytes = on_bytes
        self.written = 0
        self.total = 0

    def put(self, data: bytes) -> FileRef:
        digest = sha256(data)
        self.total += len(data)
        key = blob_key(digest)
        if not self.store.exists(key):
            self.store.write(key, data)
            self.written += len(data)
        if self.on_bytes:
            self.on_bytes(len(data))
        return FileRef(digest=digest, size=len(data))


def push(
    registry: str | Path | None,
    artifact: Path,
    base: Path,
    name: str | None = None,
    tag: str = DEFAULT_TAG,
    channel_block: int = DEFAULT_CHANNEL_BLOCK,
    on_bytes: Callable[[int], None] | None = None,
    store: Store | None = None,
) -> PushResult:
    """Publish ``artifact`` (a build artifact) with the weights of ``base`` as a new version of ``name``.

    The version is tagged ``tag`` and ``latest`` (which always names the last version published).
    """
    store = store or open_store(registry)
    if store.read_only:
        raise NestpruneError(f"{store.url} is read-only; push to the store that backs it")
    name = check_name(name or default_name(base))
    check_tag(tag)
    artifact, base = Path(artifact), Path(base)
    a_manifest, ranking = read_artifact(artifact)
    check_base(base, a_manifest)  # config, architecture and the content of every tensor, before any upload
    arch = ranking.arch
    units = layer_units(ranking)
    up = _Uploader(store, on_bytes)

    tensors: dict[str, TensorEntry] = {}
    with SafetensorsSource(base) as src:
        for tname in sorted(src.names()):
            t = src.take(tname)
            where = placement(arch, tname, units)
            stored = to_stored(t, where, units)
            shape = tuple(stored.shape)
            row_bytes = t.element_size() * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else t.element_size()
            rows = chunk_rows_for(where, shape, t.element_size(), channel_block)
            data = tensor_bytes(stored)
            chunks = [sha256(c) for c in split_chunks(data, row_bytes, rows)]
            ref = up.put(data)
            tensors[tname] = TensorEntry(
                dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), stored_shape=list(shape),
                transposed=bool(where is not None and where.axis == 1),
                layer=None if where is None else where.layer, space=None if where is None else where.space,
                segments=[TensorSegment(space=sp, rows=n) for sp, n in where.segments] if where and where.segments else None,
                unit_rows=1 if where is None else where.unit_rows, chunk_rows=rows,
                blob=ref.digest, size=ref.size, chunks=chunks,
            )
            del t, stored, data

    aux = {p.name: up.put(p.read_bytes()) for p in aux_files(base)}
    art = {
        p.relative_to(artifact).as_posix(): up.put(p.read_bytes())
        for p in sorted(artifact.rglob("*")) if p.is_file()
    }
    manifest = VersionManifestV1(
        model_type=arch.model_type, gqa_mode=ranking.gqa_mode, artifact_digest=a_manifest.digest(),
        artifact=art, aux=aux,
        orders={str(i): LayerOrder(q=u.q.tolist(), kv=u.kv.tolist(), mlp=u.mlp.tolist()) for i, u in units.items()},
        tensors=tensors,
        total_size=sum(e.size for e in tensors.values()) + sum(f.size for f in (*aux.values(), *art.values())),
    )
    mref = up.put(canonical(manifest))

    # The version becomes visible only now, after every byte it names is in the store.
    record = read_version(store, name, mref.digest)
    if record is None:
        record = VersionRecord(name=name, digest=mref.digest, created_at=now(), total_size=manifest.total_size,
                               nestprune_version=__version__)
        store.write(version_key(name, mref.digest), record.model_dump_json(indent=1).encode())
    for t in dict.fromkeys((tag, DEFAULT_TAG)):  # `latest` always names the last version published
        write_tag(store, name, t, mref.digest)
    refresh_index(store)
    return PushResult(record=record, tag=tag, bytes_written=up.written, bytes_total=up.total)
