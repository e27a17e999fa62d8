"""The build artifact's manifest (stored in the zarr root group's attributes under ``nestprune``)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ARTIFACT_SCHEMA_VERSIONS = ("1",)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileDigest(_Doc):
    name: str = Field(description="file name inside the base model directory")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class BaseFingerprint(_Doc):
    path: str = Field(description="the base directory as given to build (informational)")
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    files: list[FileDigest] = Field(description="every safetensors weight file, with its sha256")


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
    schema_version: Literal["1"] = "1"
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

    def digest(self) -> str:
        """Content address of the artifact: sha256 of the canonical manifest (which holds the ranking's sha256)."""
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


ArtifactManifest = ArtifactManifestV1

DOCUMENTS = {"artifact": ArtifactManifestV1}
