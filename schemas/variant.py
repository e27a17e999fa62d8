"""The variant manifest: ``nestprune_variant.json`` inside every materialized model directory.

It says where the variant came from (base fingerprint, artifact digest), what was asked and reached
(sparsity, parameters, width policy, rounding) and exactly which heads and channels each layer kept.
Versioned by ``schema_version``: a new version is a new model, joined to this one in a union on that field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nestprune.schemas.artifact import BaseFingerprint

VARIANT_SCHEMA_VERSIONS = ("1",)
VARIANT_MANIFEST_NAME = "nestprune_variant.json"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerKept(_Doc):
    heads: list[int] = Field(description="kept query heads, ascending original indices")
    kv_heads: list[int] = Field(description="kept key/value heads, ascending original indices")
    kv_of_head: list[int] = Field(description="for each kept query head, the position in kv_heads it reads")
    channels: list[int] = Field(description="kept MLP channels, ascending original indices")


class VariantManifestV1(_Doc):
    schema_version: Literal["1"] = "1"
    kind: Literal["nestprune.variant"] = "nestprune.variant"
    nestprune_version: str
    base: BaseFingerprint | None = Field(description="fingerprint of the base model the weights came from")
    artifact_digest: str | None = Field(description="digest of the build artifact whose ranking was sliced")
    model_type: str
    layout: str = Field(pattern=r"^[a-z][a-z0-9-]{0,63}$",
                        description="the width policy (--layout): per-layer, uniform, or another registered policy")
    gqa_mode: Literal["query", "group"]
    multiple_of: int | None = Field(ge=1, description="kept channel counts rounded to this multiple")
    requested_sparsity: float = Field(ge=0, lt=1)
    requested_params: int | None = Field(default=None, ge=1, description="set when asked for by parameter count")
    achieved_sparsity: float = Field(ge=0, le=1, description="parameter sparsity of the decoder layers")
    prefix_len: int = Field(ge=0, description="length of the removal prefix the kept widths come from")
    decoder_params: int = Field(ge=1, description="decoder-layer parameters of the base model")
    kept_decoder_params: int = Field(ge=0)
    total_params: int = Field(ge=1, description="parameters of the variant, embeddings and lm_head included")
    layers: list[LayerKept]


VariantManifest = VariantManifestV1

DOCUMENTS = {"variant": VariantManifestV1}
