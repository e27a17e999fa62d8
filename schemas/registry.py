"""What the registry persists: the version manifest (content-addressed), version records, tags, the index.

Store keys (every key relative to the registry root)::

    blobs/sha256/<hh>/<hex>              immutable content: tensor packs, aux files, ranking, manifests
    models/<name>/versions/<hex>.json    VersionRecord: a version exists once this is written (last)
    models/<name>/tags/<tag>.json        TagRecord: a mutable pointer to a version
    index.json                           RegistryIndex: a listing for stores that cannot list (HTTP)
    leases/<id>.json                     PushLease: the blobs a push in flight uses (gc keeps them)

A version's digest is the sha256 of its manifest blob; the manifest lists the sha256 of every blob
and of every chunk inside each tensor pack, so one digest pins every byte of a pull.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

Hex = str  # sha256, 64 lowercase hex digits


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRef(_Doc):
    """A whole file stored as one blob."""

    digest: Hex = Field(description="sha256 of the file's bytes (its blob key)")
    size: int = Field(ge=0)


class TensorSegment(_Doc):
    """One segment of a fused tensor's pruned axis (Phi-3 qkv_proj: q, k, v; gate_up_proj: gate, up)."""

    space: Literal["q", "kv", "mlp"] = Field(description="index space of the segment's rows")
    rows: int = Field(ge=0, description="rows of the segment along the pruned axis")


class TensorEntry(_Doc):
    """One tensor of the base model, stored as one pack blob of row-major chunks.

    The stored tensor is the original with its pruned axis moved to the rows (``transposed`` for
    o_proj/down_proj) and its units permuted into ``LayerOrder`` order (most important first).
    A fused tensor lists its ``segments`` (in memory order); its units are permuted within each segment,
    so segment boundaries are the same in stored and original order.
    Chunk ``i`` holds stored rows ``[i*chunk_rows, (i+1)*chunk_rows)``; its byte offset in the pack is
    the sum of the sizes before it. Bytes are the tensor's raw little-endian bits (bf16 stays bf16,
    bit-exact), whatever ``dtype`` says.
    """

    dtype: str = Field(description="logical dtype, safetensors spelling: BF16, F16, F32, …")
    shape: list[int] = Field(description="shape of the original tensor")
    stored_shape: list[int] = Field(description="shape as stored (rows = the pruned axis)")
    transposed: bool = Field(description="stored as the transpose of the original (pruned axis was 1)")
    layer: int | None = Field(default=None, description="decoder layer of a prunable tensor")
    space: Literal["q", "kv", "mlp"] | None = Field(
        default=None, description="index space of the stored rows; None = stored whole, original order"
    )
    segments: list[TensorSegment] | None = Field(
        default=None, description="fused tensors only: the segments of the pruned axis in memory order (``space`` "
        "is the first one's); absent = one segment of ``space``"
    )
    unit_rows: int = Field(ge=1, description="stored rows per unit (head_dim for heads, 1 for channels)")
    chunk_rows: int = Field(ge=1, description="stored rows per chunk (the last chunk may be shorter)")
    blob: Hex = Field(description="sha256 of the whole pack")
    size: int = Field(ge=0, description="bytes of the pack")
    chunks: list[Hex] = Field(description="sha256 of each chunk, in stored order")

    @model_serializer(mode="wrap")
    def _omit_absent_segments(self, handler):  # tensors that are not fused serialise as before segments existed
        data = handler(self)
        if self.segments is None:
            data.pop("segments", None)
        return data


class LayerOrder(_Doc):
    """Units of one layer in stored order: original index of stored unit 0, 1, … (most important first)."""

    q: list[int]
    kv: list[int] = Field(description="original order in GQA query mode (K/V heads are not ranked there)")
    mlp: list[int]


class VersionManifestV1(_Doc):
    """Everything a pull needs; its sha256 is the version's digest. Holds no name and no date."""

    schema_version: Literal["1"] = "1"
    format: Literal["nestprune-nested"] = "nestprune-nested"
    model_type: str
    gqa_mode: Literal["query", "group"]
    artifact_digest: str = Field(description="content address of the build artifact (its manifest's digest)")
    artifact: dict[str, FileRef] = Field(description="every file of the build artifact (zarr store), by path")
    aux: dict[str, FileRef] = Field(description="non-weight files of the base directory (config, tokenizer, …)")
    orders: dict[str, LayerOrder] = Field(description="per decoder layer (key = layer index)")
    tensors: dict[str, TensorEntry]
    total_size: int = Field(ge=0, description="bytes of every blob of the version")


class VersionRecord(_Doc):
    """A published version of a name: written after all its blobs, so its existence means complete."""

    schema_version: Literal["1"] = "1"
    name: str
    digest: Hex
    created_at: str = Field(description="UTC, ISO 8601")
    total_size: int = Field(ge=0)
    nestprune_version: str


class TagRecord(_Doc):
    schema_version: Literal["1"] = "1"
    name: str
    tag: str
    digest: Hex
    updated_at: str = Field(description="UTC, ISO 8601")


class IndexEntry(_Doc):
    versions: list[VersionRecord]
    tags: dict[str, Hex]


class RegistryIndex(_Doc):
    """A listing of the registry, rewritten after each push and tag, for stores that cannot list."""

    schema_version: Literal["1"] = "1"
    updated_at: str
    models: dict[str, IndexEntry]


class PushLease(_Doc):
    """Written by a push before it checks or writes any blob, extended before each further blob, and deleted
    once its version record is written. ``nestprune gc`` keeps every blob a live lease names, so a push in
    flight is never broken; a lease not renewed for ``gc``'s lease lifetime is a dead push's and ignored."""

    schema_version: Literal["1"] = "1"
    name: str = Field(description="the model name being pushed")
    host: str
    pid: int
    started_at: str = Field(description="UTC, ISO 8601")
    digests: list[Hex] = Field(description="blobs this push has checked or written so far")


DOCUMENTS = {
    "registry_manifest": VersionManifestV1,
    "registry_version": VersionRecord,
    "registry_tag": TagRecord,
    "registry_index": RegistryIndex,
    "registry_lease": PushLease,
}
