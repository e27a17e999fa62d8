"""Pull a size variant: the same spec and the same writer as ``nestprune materialize``, fed by the registry.

A pull resolves the reference to a version, verifies its manifest against the digest, rebuilds the
build artifact and the base's aux files from their (verified) blobs, plans the variant with
``plan_variant`` exactly as materialize does, and calls ``materialize_variant`` with a
``RegistrySource`` in place of the local safetensors — so the output is byte-identical to
``nestprune materialize`` on the same artifact and base, in any ``--format``. Only the chunks the variant
keeps are read; any chunk failing its sha256 aborts the pull before the output directory appears. The
artifact and aux files are rebuilt in a scratch directory next to ``out`` (``atomic.scratch_dir``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestprune.artifact import read_artifact
from nestprune.errors import NestpruneError
from nestprune.io import atomic
from nestprune.io.fingerprint import check_source, read_config
from nestprune.registry.cache import ChunkCache
from nestprune.registry.source import RegistrySource, TransferStats
from nestprune.registry.stores import DEFAULT_JOBS, LocalStore, Store, open_store
from nestprune.registry.versions import Reference, parse_reference, read_manifest, resolve
from nestprune.schemas.registry import FileRef, VersionRecord
from nestprune.schemas.variant import VariantManifest
from nestprune.variant.contents import DEFAULT_SHARD_BYTES, Progress, plan_tensors
from nestprune.variant.materialize import check_target, materialize_variant, plan_target
from nestprune.variant.widths import VariantSpec
from nestprune.variant.writers import DEFAULT_FORMAT, writer

_DEFAULT = object()


@dataclass(frozen=True)
class PullResult:
    out_dir: Path
    record: VersionRecord
    spec: VariantSpec
    manifest: VariantManifest
    stats: TransferStats
    variant_bytes: int  # bytes of the variant's tensors (what a perfect pull would read)


def _write_files(src: RegistrySource, files: dict[str, FileRef], into: Path, what: str) -> None:
    for rel, ref in files.items():
        path = into / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise NestpruneError(f"the registry manifest names an unsafe path {rel!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(src.read_file(ref, f"{what} {rel}"))


def pull(
    ref: str | Reference,
    out: Path,
    sparsity: float | None = None,
    params: int | None = None,
    layout: str = "per-layer",
    multiple_of: int | None = None,
    *,
    force: bool = False,
    cache: ChunkCache | None | object = _DEFAULT,
    stats: TransferStats | None = None,
    progress: Progress | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    store: Store | None = None,
    format: str = DEFAULT_FORMAT,
    writer_options: Mapping[str, Any] | None = None,
    jobs: int = DEFAULT_JOBS,
) -> PullResult:
    """Write the variant of ``ref`` (``REGISTRY/NAME[:TAG|@DIGEST]``) at one target to ``out``.

    ``cache``: a ChunkCache, or None for none. Default: ``$NESTPRUNE_CACHE`` or ``~/.cache/nestprune/chunks``
    for remote registries (S3, HTTP); none for a local directory, which already is a local
    content-addressed store whose chunks are verified on every read. After the pull the cache is trimmed to
    its size cap (least recently used entries first; ``ChunkCache.max_bytes``).
    ``jobs``: concurrent transfers (ranged reads) and writer threads.
    """
    check_target(sparsity, params)
    writer(format).check_options(writer_options or {})
    ref = parse_reference(ref) if isinstance(ref, str) else ref
    store = store or open_store(ref.registry, jobs=jobs)
    if cache is _DEFAULT:  # a local registry is itself a local content-addressed store: no second copy
        cache = None if isinstance(store, LocalStore) else ChunkCache()
    # what this pull reads from: replacing any of it would destroy it
    inputs = [store.root] if isinstance(store, LocalStore) else []
    if isinstance(cache, ChunkCache):
        inputs.append(cache.root)
    out = atomic.check_out(Path(out), force, inputs, directory=False)
    record = resolve(store, ref)
    manifest = read_manifest(store, record.digest)
    with RegistrySource(store, manifest, cache, stats, workers=jobs) as src, \
            atomic.scratch_dir(out) as work:  # type: ignore[arg-type]
        art_dir, aux_dir = work / "artifact", work / "aux"
        _write_files(src, manifest.artifact, art_dir, "artifact file")
        _write_files(src, manifest.aux, aux_dir, "base file")
        a_manifest, ranking = read_artifact(art_dir)
        if a_manifest.digest() != manifest.artifact_digest:
            raise NestpruneError(f"{store.url}: the stored artifact does not match its recorded digest")
        checked = check_source(src, a_manifest, read_config(aux_dir), f"{store.url}/{record.name}")  # the artifact's base?
        spec = plan_target(ranking, sparsity, params, layout, multiple_of)
        written = materialize_variant(
            checked, ranking, spec, aux_dir, out, format=format, base=a_manifest.base,
            artifact_digest=a_manifest.digest(), requested_params=params, shard_bytes=shard_bytes, force=force,
            inputs=inputs, progress=progress, writer_options=writer_options,
        )
    variant_bytes = sum(p.nbytes for p in plan_tensors(src, spec))
    if isinstance(cache, ChunkCache):
        cache.trim()
    return PullResult(out_dir=out, record=record, spec=spec, manifest=written, stats=src.stats,
                      variant_bytes=variant_bytes)
