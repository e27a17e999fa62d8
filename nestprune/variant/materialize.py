"""Materialize: artifact + base weights + a target → one variant, as kept widths × a writer.

``materialize_variant`` writes a planned ``VariantSpec`` with a registered writer (``--format``); both
``nestprune materialize`` (local safetensors) and ``nestprune pull`` (a registry's store) call it, so their
outputs are byte-identical. ``materialize`` is the whole command: read and check the artifact and the
base, plan the widths, write, and optionally verify.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestprune.errors import NestpruneError
from nestprune.io import atomic
from nestprune.io.weights import SafetensorsSource, TensorSource
from nestprune.ranking import Ranking
from nestprune.schemas.artifact import BaseFingerprint
from nestprune.schemas.variant import VariantManifest
from nestprune.variant.contents import DEFAULT_SHARD_BYTES, Progress, variant_manifest
from nestprune.variant.widths import VariantSpec, plan_variant, sparsity_for_params
from nestprune.variant.writers import DEFAULT_FORMAT, writer

if TYPE_CHECKING:
    from nestprune.variant.verify import Verification


def check_target(sparsity: float | None, params: int | str | None) -> None:
    if (sparsity is None) == (params is None):
        raise NestpruneError("give exactly one target: --sparsity or --params")


def plan_target(ranking: Ranking, sparsity: float | None, params: int | None, layout: str,
                multiple_of: int | None) -> VariantSpec:
    """The spec for exactly one target: a ``sparsity``, or a total parameter count (``params``)."""
    check_target(sparsity, params)
    target = sparsity if sparsity is not None else sparsity_for_params(ranking, int(params))  # type: ignore[arg-type]
    return plan_variant(ranking, target, layout, multiple_of)


def materialize_variant(
    source: TensorSource,
    ranking: Ranking,
    spec: VariantSpec,
    aux_dir: Path,
    out_dir: Path,
    *,
    format: str = DEFAULT_FORMAT,
    base: BaseFingerprint | None = None,
    artifact_digest: str | None = None,
    requested_params: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    inputs: Iterable[Path] = (),
    progress: Progress | None = None,
    writer_options: Mapping[str, Any] | None = None,
) -> VariantManifest:
    """Write the variant ``spec`` of the model behind ``source`` at ``out_dir`` with the writer ``format``.

    source     every base tensor, by checkpoint key (``SafetensorsSource(base_dir)`` or a registry's store)
    ranking    the ranking ``spec`` was planned from (checked to match it)
    spec       ``plan_variant(ranking, sparsity, layout, multiple_of)``
    aux_dir    a directory holding the base ``config.json`` and the tokenizer / generation files to copy
    out_dir    written atomically; refused if it exists unless ``force``, and always if it is (or holds) one
               of ``inputs``
    base, artifact_digest, requested_params   provenance recorded in ``nestprune_variant.json``
    shard_bytes  above this many bytes of tensors the weights are split (HF: shards with an index)
    progress   called after each tensor with (name, bytes written, bytes in total)
    writer_options  settings of the writer ``format`` (e.g. gguf: ``gguf_type``); refused by other writers

    Returns the manifest written. Output bytes depend only on the arguments' contents, never on the source
    type, its tensor order or the clock.
    """
    if spec.structures != ranking.structures:
        raise NestpruneError("the variant spec was not planned from this ranking (architecture or GQA mode differs)")
    write = writer(format)
    write.check_options(writer_options or {})
    inputs = (*inputs, aux_dir)
    atomic.check_out(out_dir, force, inputs, directory=False)  # before any work; the writer checks the rest
    manifest = variant_manifest(spec, base, artifact_digest, requested_params)
    write(spec, source, Path(aux_dir), Path(out_dir), manifest, shard_bytes=shard_bytes, force=force,
          inputs=inputs, progress=progress, options=writer_options)
    return manifest


# --- the convenience entry point ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MaterializeResult:
    out_dir: Path
    spec: VariantSpec
    manifest: VariantManifest
    base_check: str  # what the base was checked by: "content", "files" (--full-check) or "sizes" (old artifacts)
    verification: Verification | None = None  # set when verified

    @property
    def max_abs_diff(self) -> float | None:
        return None if self.verification is None else self.verification.max_abs_diff


def materialize(
    artifact_path: Path,
    base_dir: Path,
    out: Path,
    sparsity: float | None = None,
    params: int | None = None,
    layout: str = "per-layer",
    multiple_of: int | None = None,
    force: bool = False,
    verify: bool = False,
    full_check: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
    format: str = DEFAULT_FORMAT,
    writer_options: Mapping[str, Any] | None = None,
) -> MaterializeResult:
    """Artifact + base weights + one target (``sparsity`` or total ``params``) → a loadable variant at ``out``.

    The base must be the artifact's (``io.fingerprint.check_base``, in two steps): config.json's sha256, the manifest's
    architecture, and the content of every tensor (with ``full_check``: every file's sha256; artifacts of
    schema version 1 only have file names and sizes, and ``base_check`` says "sizes"). The content check reads
    the base once, with the writer: the hf writer hashes every block of the base as it cuts the variant out of it
    and refuses before it publishes anything (other writers: the check reads the base first). ``verify`` compares
    fp64 logits with the masked base's (``variant.verify``).
    """
    from nestprune.artifact import read_artifact
    from nestprune.io.fingerprint import begin_check, check_base_arch

    check_target(sparsity, params)
    inputs = (Path(artifact_path), Path(base_dir))
    atomic.check_out(out, force, inputs, directory=False)
    writer(format).check_options(writer_options or {})
    if verify and not writer(format).loadable:
        raise NestpruneError(f"--verify reads the variant back with load_variant, which cannot read --format {format}")
    manifest, ranking = read_artifact(Path(artifact_path))
    check_base_arch(Path(base_dir), manifest)  # cheap checks first: the read of every byte comes last
    spec = plan_target(ranking, sparsity, params, layout, multiple_of)
    base_check, pending = begin_check(Path(base_dir), manifest.base, full=full_check)
    if pending is not None and not getattr(writer(format).load(), "feeds_content_check", False):
        pending.finish()  # a writer that cannot hash the base as it reads it: read it once more, first
        pending = None
    with SafetensorsSource(Path(base_dir)) as source:
        source.content_check = pending  # the writer finishes it before it publishes anything
        written = materialize_variant(
            source, ranking, spec, Path(base_dir), Path(out), format=format, base=manifest.base,
            artifact_digest=manifest.digest(), requested_params=params, shard_bytes=shard_bytes,
            force=force, inputs=inputs, progress=progress, writer_options=writer_options,
        )
    verification = None
    if verify:
        from nestprune.variant.verify import verify_variant

        verification = verify_variant(Path(base_dir), Path(out), spec)
    return MaterializeResult(out_dir=Path(out), spec=spec, manifest=written, base_check=str(base_check),
                             verification=verification)
