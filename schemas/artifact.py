"""The build artifact's manifest (stored in the zarr root group's attributes under ``nestprune``)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

# "2" adds the base's content fingerprint (``BaseFingerprint.content``); "1" artifacts are still read (their
# base is checked by config, file names and sizes only, and materialize says so)
ARTIFACT_SCHEMA_VERSIONS = ("1", "2")
ARTIFACT_SCHEMA_VERSION = "2"  # what this nestprune writes


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileDigest(_Doc):
    name: str = Field(description="file name inside the base model directory")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TensorDigest(_Doc):
    dtype: str = Field(description="safetensors dtype name: BF16, F16, F32, …")
    shape: list[int]
    digest: str = Field(pattern=r"^[0-9a-f]{32}$", description="the content digest of the tensor's bytes")


class ContentFingerprint(_Doc):
    """What the base's tensors hold, cheap enough to check on every materialize, push and pull.

    Every byte of every tensor is hashed (a change of any single bit of any tensor changes the fingerprint):
    the tensor's bytes are cut into ``block_bytes`` blocks, each hashed with XXH3-128, and the tensor's
    digest is XXH3-128 over its dtype, shape and the block hashes. ``sha256`` is over every tensor's name,
    dtype, shape and digest. Independent of how the tensors are split into files.
    """

    method: Literal["xxh3-128-blocks-v1"] = "xxh3-128-blocks-v1"
    block_bytes: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="over every tensor's name, dtype, shape, digest")
    tensors: dict[str, TensorDigest] = Field(description="every tensor of the base, by checkpoint key")


class BaseFingerprint(_Doc):
    path: str = Field(description="the base directory as given to build (informational)")
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    files: list[FileDigest] = Field(description="every safetensors weight file, with its sha256")
    content: ContentFingerprint | None = Field(default=None, description="the tensors' content fingerprint "
                                               "(absent in schema version 1 artifacts)")

    @model_serializer(mode="wrap")
    def _omit_absent_content(self, handler):  # older documents serialise (and digest) as they were written
        data = handler(self)
        if self.content is None:
            data.pop("content", None)
        return data


class ArchSummary(_Doc):
    family: str
    model_type: str
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool
    present_optional: list[str] = Field(description="optional tensors (biases) present in the checkpoint")
    decoder_params: int = Field(ge=1, description="all decoder-layer parameters, norms included")
    total_params: int = Field(ge=1)


class ConfigRecord(_Doc):
    """A build method's or an objective's config, as ``nestprune.config.record`` writes it."""

    name: str = Field(description="the registered name, e.g. gisp, wanda-sp, lm, margin")
    version: int = Field(ge=1, description="the config class's version")
    options: dict[str, Any] = Field(description="every option of the config, defaults included")


class ObjectiveInfo(_Doc):
    name: str = Field(description="lm | margin | answer | the custom objective's own name")
    provenance: dict[str, Any] = Field(description="data file sha256, samples, tokens, window length, seed …")
    config: ConfigRecord | None = Field(default=None, description="the objective's config (absent in older "
                                        "artifacts, and when the library was given an objective object)")


class ScheduleInfo(_Doc):
    method: str = Field(description="gisp | gisp-oneshot | wanda-sp | magnitude | random")
    iterative: bool
    r_max: float = Field(ge=0, le=1)
    steps_planned: int = Field(ge=1)
    steps_run: int = Field(ge=0)
    ratio_step: float = Field(ge=0)
    max_sparsity_requested: float | None = Field(default=None, ge=0, lt=1)
    normalisation: Literal["reference", "none"]
    gqa_mode: Literal["query", "group"]
    skip_first_frac: float = Field(ge=0, lt=1)
    skip_last: int = Field(ge=0)
    prunable_layers: list[int]
    batch_size: int = Field(ge=1)
    dtype: str
    seed: int
    method_config: ConfigRecord | None = Field(default=None, description="the method's config (absent in "
                                               "older artifacts)")


class StepRecord(_Doc):
    step: int = Field(ge=0)
    ratio: float = Field(description="target structure ratio r_t of this step")
    structures_removed: int = Field(ge=0, description="cumulative, after this step")
    param_sparsity: float = Field(ge=0, le=1, description="after this step")
    loss: float | None = Field(description="objective on the calibration set before this step's pruning")
    seconds: float = Field(ge=0)


class RankingInfo(_Doc):
    num_structures: int = Field(ge=1)
    num_removed: int = Field(ge=0, description="length of the removal prefix the schedule reached")
    max_sparsity: float = Field(ge=0, le=1, description="parameter sparsity of that prefix")
    fields: list[str]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="over the ranking arrays, in field order")


class ArtifactManifestV1(_Doc):
    """Schema versions 1 and 2 (2: ``base.content`` present; 1: absent) are one model."""

    schema_version: Literal["1", "2"] = ARTIFACT_SCHEMA_VERSION
    kind: Literal["nestprune.artifact"] = "nestprune.artifact"
    nestprune_version: str
    created: str = Field(description="ISO 8601 UTC")
    base: BaseFingerprint
    arch: ArchSummary
    objective: ObjectiveInfo
    schedule: ScheduleInfo
    trajectory: list[StepRecord]
    ranking: RankingInfo
    device: str
    total_seconds: float = Field(ge=0)

    @model_validator(mode="after")
    def _content_follows_version(self):
        if (self.schema_version == "1") != (self.base.content is None):
            raise ValueError("base.content is required in schema version 2 and absent in version 1")
        return self

    def digest(self) -> str:
        """Content address of the artifact: sha256 of the canonical manifest (which holds the ranking's sha256)."""
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


ArtifactManifest = ArtifactManifestV1

DOCUMENTS = {"artifact": ArtifactManifestV1}
