"""The build artifact: one zarr v3 store = manifest (root attributes) + ranking (columnar arrays).

Files::

    ARTIFACT/zarr.json              root group; attributes["nestprune"] = the manifest (schemas/artifact.py)
    ARTIFACT/ranking/<field>/...    one 1-D array per ranking column, in removal order

Written atomically (``nestprune.io.atomic.output_dir``): it appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from pydantic import ValidationError

from nestprune.arch import ArchInfo, Structures, arch_from_config
from nestprune.errors import NestpruneError, validation_message
from nestprune.io import atomic
from nestprune.ranking import RANKING_FIELDS, Ranking
from nestprune.schemas.artifact import ARTIFACT_SCHEMA_VERSIONS, ArchSummary, ArtifactManifest

MANIFEST_KEY = "nestprune"
DTYPES = {
    "layer": np.int32, "kind": np.uint8, "index": np.int32, "step": np.int32,
    "score": np.float64, "raw_score": np.float64, "cost": np.int64, "prunable": np.bool_,
}
CHUNK = 1 << 16
NOT_ITS_BASE = "the artifact is not of this base (an edited manifest, or another model)"


def ranking_sha256(ranking: Ranking) -> str:
    h = hashlib.sha256()
    for f in RANKING_FIELDS:
        h.update(f.encode())
        h.update(np.ascontiguousarray(getattr(ranking, f), dtype=DTYPES[f]).tobytes())
    return h.hexdigest()


def arch_summary(arch: ArchInfo, decoder_params: int, total_params: int) -> ArchSummary:
    return ArchSummary(
        family=arch.family, model_type=arch.model_type, num_layers=arch.num_layers,
        hidden_size=arch.hidden_size, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim, intermediate_size=arch.intermediate_size, vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings, present_optional=list(arch.present_optional),
        decoder_params=decoder_params, total_params=total_params,
    )


def arch_from_summary(s: ArchSummary) -> ArchInfo:
    return ArchInfo(
        family=s.family, model_type=s.model_type, num_layers=s.num_layers, hidden_size=s.hidden_size,
        num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
        intermediate_size=s.intermediate_size, vocab_size=s.vocab_size,
        tie_word_embeddings=s.tie_word_embeddings, present_optional=tuple(s.present_optional),
    )


def check_arch(summary: ArchSummary, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
               where: str) -> None:
    """The manifest's architecture must be the base's: read again from its config.json and tensor names, and
    its decoder parameter count from the tensor shapes. An edited ``arch`` would slice the wrong rows."""
    if not isinstance(config, Mapping):
        raise NestpruneError(f"{where}/config.json is not a JSON object")
    try:
        base = arch_summary(arch_from_config(config, set(shapes)), summary.decoder_params, summary.total_params)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise NestpruneError(f"{where}/config.json has an invalid architecture ({e})") from None
    recorded = summary.model_dump()
    for key, value in base.model_dump().items():
        if recorded[key] != value:
            raise NestpruneError(f"the artifact's manifest says {key} = {recorded[key]!r} but {where} has "
                                 f"{value!r}: {NOT_ITS_BASE}")
    prefix = arch_from_summary(summary).fam.layer_prefix.split("{}")[0]
    decoder = sum(math.prod(s) for n, s in shapes.items() if n.startswith(prefix))
    if decoder != summary.decoder_params:
        raise NestpruneError(f"the artifact's manifest says decoder_params = {summary.decoder_params} but the "
                             f"decoder layers of {where} hold {decoder}: {NOT_ITS_BASE}")


def prepare_out(out: Path, force: bool, inputs: Iterable[Path | str | None] = ()) -> Path:
    """The early check of a build's ``--out`` (``atomic.check_out``; creates nothing)."""
    return atomic.check_out(out, force, inputs)


def write_artifact(out: Path, manifest: ArtifactManifest, ranking: Ranking, force: bool = False,
                   inputs: Iterable[Path | str | None] = ()) -> Path:
    """Write the artifact at ``out`` atomically. ``out`` may not be (or hold) the base model or ``inputs``."""
    if manifest.ranking.sha256 != ranking_sha256(ranking):
        raise NestpruneError("internal: manifest ranking digest does not match the ranking arrays")
    with atomic.output_dir(out, force=force, inputs=(manifest.base.path, *inputs)) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs[MANIFEST_KEY] = manifest.model_dump(mode="json")
        for f in RANKING_FIELDS:
            data = np.ascontiguousarray(getattr(ranking, f), dtype=DTYPES[f])
            root.create_array(f"ranking/{f}", data=data, chunks=(max(1, min(CHUNK, len(data))),))
    return Path(out)


def parse_manifest(data: Any) -> ArtifactManifest:
    if not isinstance(data, dict):
        raise NestpruneError("artifact manifest is missing or not an object")
    version = data.get("schema_version")
    if version not in ARTIFACT_SCHEMA_VERSIONS:
        raise NestpruneError(
            f"artifact schema version {version!r} is not supported by this nestprune "
            f"(supports {', '.join(ARTIFACT_SCHEMA_VERSIONS)}); upgrade nestprune"
        )
    try:
        return ArtifactManifest.model_validate(data)
    except ValidationError as e:
        raise NestpruneError(f"artifact manifest is invalid {validation_message(e)}") from None


def read_manifest(path: Path) -> ArtifactManifest:
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise NestpruneError(f"{path} is not a nestprune artifact (no zarr.json)")
    try:
        root = zarr.open_group(str(path), mode="r")
        data = root.attrs.get(MANIFEST_KEY)
    except Exception as e:  # corrupt metadata
        raise NestpruneError(f"cannot open artifact {path}: {e}") from None
    return parse_manifest(data)


def read_artifact(path: Path) -> tuple[ArtifactManifest, Ranking]:
    """Read and verify an artifact: manifest validated, ranking arrays checked against their sha256."""
    manifest = read_manifest(path)
    try:
        root = zarr.open_group(str(path), mode="r")
        cols = {f: np.asarray(root[f"ranking/{f}"][:], dtype=DTYPES[f]) for f in RANKING_FIELDS}
    except (KeyError, FileNotFoundError):
        raise NestpruneError(f"artifact {path} is incomplete: ranking arrays are missing") from None
    except Exception as e:
        raise NestpruneError(f"artifact {path} has corrupt ranking arrays: {e}") from None
    ranking = Ranking(
        structures=Structures(arch_from_summary(manifest.arch), manifest.schedule.gqa_mode),
        decoder_params=manifest.arch.decoder_params, **cols,
    )
    if ranking_sha256(ranking) != manifest.ranking.sha256:
        raise NestpruneError(f"artifact {path} is corrupt: ranking arrays do not match their recorded sha256")
    return manifest, ranking
