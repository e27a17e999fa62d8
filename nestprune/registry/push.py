"""Publish an artifact and its base weights: blobs first, the manifest next, the version record last.

Every blob is keyed by its sha256, so a blob that exists is complete (writes are atomic per key), a
second push of the same model writes nothing new, and two concurrent pushes of the same model only
ever write identical bytes to the same keys. An interrupted push leaves unreferenced blobs and no
version record: nothing is visible, and a retry reuses what was uploaded.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from nestprune import __version__
from nestprune.artifact import read_artifact
from nestprune.errors import NestpruneError
from nestprune.io.fingerprint import check_base
from nestprune.io.weights import DTYPE_NAMES, SafetensorsSource
from nestprune.registry.cache import sha256
from nestprune.registry.gc import Lease
from nestprune.registry.nested import (
    DEFAULT_CHANNEL_BLOCK,
    chunk_rows_for,
    layer_units,
    placement,
    tensor_bytes,
    to_stored,
)
from nestprune.registry.stores import DEFAULT_JOBS, Store, open_store
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
IN_FLIGHT_BYTES = 1 << 30  # packed tensors waiting for or in upload at once (bounds a push's memory)


@dataclass(frozen=True)
class PushResult:
    record: VersionRecord
    tag: str
    bytes_written: int  # new blob bytes (blobs already in the registry are not written again)
    bytes_total: int
    warnings: tuple[str, ...] = ()  # what failed after the version was published (tags, index): it still is


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
    """Blob uploads on ``jobs`` threads, at most ``IN_FLIGHT_BYTES`` held at once; every digest is leased
    before its existence is checked (see ``nestprune.registry.gc``)."""

    def __init__(self, store: Store, lease: Lease, on_bytes: Callable[[int], None] | None, jobs: int):
        self.store = store
        self.lease = lease
        self.on_bytes = on_bytes
        self.written = 0
        self.total = 0
        self.reused: set[str] = set()
        self._lock = threading.Lock()
        self._room = threading.Semaphore(IN_FLIGHT_BYTES >> 20)  # in MiB
        self._pool = ThreadPoolExecutor(max(1, jobs), thread_name_prefix="nestprune-push")
        self._futures: list[Future] = []

    def put(self, data: bytes | memoryview, digest: str | None = None) -> FileRef:
        """Upload ``data`` now (small files, the manifest)."""
        digest = digest or sha256(data)
        self._upload(digest, data)
        return FileRef(digest=digest, size=len(data))

    def _upload(self, digest: str, data: bytes | memoryview) -> None:
        self.lease.hold(digest)
        key = blob_key(digest)
        if self.store.exists(key):
            with self._lock:
                self.reused.add(digest)
        else:
            self.store.write(key, data)
            with self._lock:
                self.written += len(data)
        with self._lock:
            self.total += len(data)
        if self.on_bytes:
            self.on_bytes(len(data))

    def submit(self, job: Callable[[], None], nbytes: int) -> None:
        """Run ``job`` (which holds ``nbytes``) on the pool once that much room is free."""
        mib = min(max(1, nbytes >> 20), IN_FLIGHT_BYTES >> 20)
        for _ in range(mib):
            self._room.acquire()

        def run() -> None:
            try:
                job()
            finally:
                for _ in range(mib):
                    self._room.release()

        self._futures.append(self._pool.submit(run))
        self._raise_failed()

    def _raise_failed(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def finish(self) -> None:
        wait(self._futures)
        self._raise_failed()

    def close(self) -> None:
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)


def _pack(t, where, units, channel_block: int) -> tuple[bytes, tuple[int, ...], int, int]:
    """(bytes, stored shape, row bytes, chunk rows) of one tensor in the nested order."""
    stored = to_stored(t, where, units)
    shape = tuple(stored.shape)
    row_bytes = t.element_size() * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else t.element_size()
    rows = chunk_rows_for(where, shape, t.element_size(), channel_block)
    return tensor_bytes(stored), shape, row_bytes, rows


def push(
    registry: str | Path | None,
    artifact: Path,
    base: Path,
    name: str | None = None,
    tag: str = DEFAULT_TAG,
    channel_block: int = DEFAULT_CHANNEL_BLOCK,
    on_bytes: Callable[[int], None] | None = None,
    store: Store | None = None,
    jobs: int = DEFAULT_JOBS,
) -> PushResult:
    """Publish ``artifact`` (a build artifact) with the weights of ``base`` as a new version of ``name``.

    The version is tagged ``tag`` and ``latest`` (which always names the last version published). Blobs go up
    on ``jobs`` threads (S3: large ones as multipart uploads). Once the version record is written the version
    is published: a tag or index write failing after that is a warning in the result, never an error.
    """
    store = store or open_store(registry, jobs=jobs)
    if store.read_only:
        raise NestpruneError(f"{store.url} is read-only; push to the store that backs it")
    name = check_name(name or default_name(base))
    check_tag(tag)
    artifact, base = Path(artifact), Path(base)
    a_manifest, ranking = read_artifact(artifact)
    check_base(base, a_manifest)  # config, architecture and the content of every tensor, before any upload
    arch = ranking.arch
    units = layer_units(ranking)
    lease = Lease(store, name)
    up = _Uploader(store, lease, on_bytes, jobs)
    try:
        tensors: dict[str, TensorEntry] = {}

        def upload_tensor(tname: str, dtype: str, shape: list[int], where, data: bytes, stored: tuple[int, ...],
                          row_bytes: int, rows: int) -> None:
            view = memoryview(data)
            chunks = [sha256(view[i: i + row_bytes * rows]) for i in range(0, len(data), row_bytes * rows)]
            ref = up.put(data)
            tensors[tname] = TensorEntry(
                dtype=dtype, shape=shape, stored_shape=list(stored),
                transposed=bool(where is not None and where.axis == 1),
                layer=None if where is None else where.layer, space=None if where is None else where.space,
                segments=[TensorSegment(space=sp, rows=n) for sp, n in where.segments] if where and where.segments else None,
                unit_rows=1 if where is None else where.unit_rows, chunk_rows=rows,
                blob=ref.digest, size=ref.size, chunks=chunks,
            )

        with SafetensorsSource(base) as src:
            for tname in sorted(src.names()):
                t = src.take(tname)
                where = placement(arch, tname, units)
                data, stored, row_bytes, rows = _pack(t, where, units, channel_block)
                job = partial(upload_tensor, tname, DTYPE_NAMES[t.dtype], list(t.shape), where, data, stored,
                              row_bytes, rows)
                del t
                up.submit(job, len(data))
                del data, job
        up.finish()
        tensors = dict(sorted(tensors.items()))

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
        manifest_bytes = canonical(manifest)
        mref = up.put(manifest_bytes)
        # Blobs found already there were not written by this push: a gc that read the leases just before this
        # push leased one may have deleted it since. Write any such blob again (it is leased now, so no gc
        # removes it any more) before the version names it.
        files = {ref.digest: path for path, ref in (*((base / k, v) for k, v in aux.items()),
                                                    *((artifact / k, v) for k, v in art.items()))}
        by_blob = {e.blob: n for n, e in tensors.items()}
        for _ in range(3):
            gone = [d for d in sorted(up.reused) if not store.exists(blob_key(d))]
            if not gone:
                break
            with SafetensorsSource(base) as src:
                for d in gone:
                    if d == mref.digest:
                        data = manifest_bytes
                    elif d in files:
                        data = files[d].read_bytes()
                    else:
                        tname = by_blob[d]
                        data = _pack(src.take(tname), placement(arch, tname, units), units, channel_block)[0]
                    if sha256(data) != d:
                        raise NestpruneError(f"{base} changed while it was being pushed; nothing was published")
                    store.write(blob_key(d), data)
        else:
            raise NestpruneError(f"{store.url}: blobs keep disappearing while this push runs (a gc with no grace "
                                 "period?); nothing was published, push again")

        # The version becomes visible only now, after every byte it names is in the store.
        record = read_version(store, name, mref.digest)
        if record is None:
            record = VersionRecord(name=name, digest=mref.digest, created_at=now(), total_size=manifest.total_size,
                                   nestprune_version=__version__)
            store.write(version_key(name, mref.digest), record.model_dump_json(indent=1).encode())
    except BaseException:
        up.close()
        try:  # nothing was published: the blobs written so far are gc's after its grace period
            lease.release()
        except Exception:  # noqa: BLE001 - a dead lease is ignored by gc after a day anyway
            pass
        raise
    up.close()
    # Published. What follows can only warn: the version exists whatever happens to its tags or the index.
    warnings: list[str] = []
    for t in dict.fromkeys((tag, DEFAULT_TAG)):  # `latest` always names the last version published
        try:
            write_tag(store, name, t, mref.digest)
        except (NestpruneError, OSError) as e:
            warnings.append(f"tag {name}:{t} was not moved to the new version ({e}); run "
                            f"`nestprune tag {store.url}/{name}@sha256:{mref.digest} {t}`")
    for what, step in (("the registry index (for HTTP readers) was not updated", lambda: refresh_index(store)),
                       ("the push's lease was not removed (gc ignores it after a day)", lease.release)):
        try:
            step()
        except (NestpruneError, OSError) as e:
            warnings.append(f"{what}: {e}")
    return PushResult(record=record, tag=tag, bytes_written=up.written, bytes_total=up.total,
                      warnings=tuple(warnings))
