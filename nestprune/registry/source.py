"""``RegistrySource``: the ``TensorSource`` of one registry version, reading only the chunks asked for.

``take(name, axis, index)`` maps the requested original indices to stored rows (undoing the nested
permutation and the transposition), fetches just the chunks that hold them — from the local cache,
else with one byte-range read per run of adjacent missing chunks — checks every chunk against its
sha256 before use, and returns exactly what ``SafetensorsSource.take`` returns for the base model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from nestprune.errors import NestpruneError
from nestprune.io.weights import DTYPES
from nestprune.registry.cache import ChunkCache, sha256
from nestprune.registry.nested import stored_order, stored_rows_of, tensor_from_bytes
from nestprune.registry.stores import KeyNotFound, Store
from nestprune.registry.versions import blob_key
from nestprune.schemas.registry import FileRef, TensorEntry, VersionManifestV1


@dataclass
class TransferStats:
    """Bytes read from the registry (``fetched``) and served by the local cache (``cached``)."""

    fetched: int = 0
    cached: int = 0
    requests: int = 0
    started: float = field(default_factory=time.perf_counter)
    on_update: Callable[[TransferStats], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, fetched: int = 0, cached: int = 0, requests: int = 0) -> None:
        with self._lock:
            self.fetched += fetched
            self.cached += cached
            self.requests += requests
        if self.on_update:
            self.on_update(self)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def rate(self) -> float:
        """Bytes per second read from the registry."""
        return self.fetched / max(self.seconds, 1e-9)


def _row_bytes(e: TensorEntry) -> int:
    itemsize = torch.empty((), dtype=DTYPES[e.dtype]).element_size()
    return itemsize * int(np.prod(e.stored_shape[1:], dtype=np.int64)) if len(e.stored_shape) > 1 else itemsize


class RegistrySource:
    def __init__(self, store: Store, manifest: VersionManifestV1, cache: ChunkCache | None = None,
                 stats: TransferStats | None = None, workers: int = 4):
        self.store = store
        self.manifest = manifest
        self.cache = cache
        self.stats = stats or TransferStats()
        self.workers = workers
        self._orders = {
            int(k): {"q": np.asarray(o.q), "kv": np.asarray(o.kv), "mlp": np.asarray(o.mlp)}
            for k, o in manifest.orders.items()
        }

    # --- TensorSource ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.manifest.tensors)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.manifest.tensors[name]
        except KeyError:
            raise NestpruneError(f"tensor {name!r} is not in this registry version") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name).dtype]

    def take(self, name: str, axis: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        e = self._entry(name)
        pruned_axis = 1 if e.transposed else 0
        if index is not None and axis != pruned_axis:  # not along the stored rows: read all, select after
            return self.take(name).index_select(axis, torch.as_tensor(index, dtype=torch.long)).contiguous()
        if index is None:
            idx = np.arange(e.shape[pruned_axis] if e.shape else 1)
        else:
            idx = torch.as_tensor(index, dtype=torch.long).numpy()
        if e.space is not None:  # units permuted within each segment (one segment unless the tensor is fused)
            segments = [(g.space, g.rows) for g in e.segments] if e.segments else [(e.space, e.shape[pruned_axis])]
            rows = stored_rows_of(idx, stored_order(segments, self._orders[e.layer].__getitem__, e.unit_rows))
        else:
            rows = idx
        out = self._rows(name, e, rows, DTYPES[e.dtype])
        if not e.shape:
            return out.reshape(())
        return out.t().contiguous() if e.transposed else out

    # --- bytes ----------------------------------------------------------------------------------------
    def _rows(self, name: str, e: TensorEntry, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """Stored rows ``rows`` of tensor ``name``, in that order. (len(rows), *stored_shape[1:])"""
        rest = tuple(e.stored_shape[1:])
        if len(rows) == 0:
            return torch.empty((0, *rest), dtype=dtype)
        need = np.unique(rows // e.chunk_rows)
        chunks = self._chunks(name, e, need.tolist())
        block = tensor_from_bytes(b"".join(chunks), dtype, (-1, *rest) if rest else (-1,))
        slot = np.searchsorted(need, rows // e.chunk_rows)  # position of each row's chunk among those read
        local = slot * e.chunk_rows + rows % e.chunk_rows
        return block.index_select(0, torch.as_tensor(local, dtype=torch.long))

    def _chunks(self, name: str, e: TensorEntry, ids: list[int]) -> list[bytes | memoryview]:
        """Verified bytes of chunks ``ids`` (ascending) of a pack: cache first, then ranged reads."""
        step = _row_bytes(e) * e.chunk_rows
        span = [(c * step, min((c + 1) * step, e.size)) for c in range(len(e.chunks))]
        got: dict[int, bytes | memoryview] = {}
        missing: list[int] = []
        for c in ids:
            data = self.cache.get(e.chunks[c]) if self.cache else None
            if data is None:
                missing.append(c)
            else:
                got[c] = data
                self.stats.add(cached=len(data))
        runs: list[list[int]] = []
        for c in missing:
            if runs and runs[-1][-1] == c - 1:
                runs[-1].append(c)
            else:
                runs.append([c])

        def fetch(run: list[int]) -> dict[int, memoryview]:
            start, end = span[run[0]][0], span[run[-1]][1]
            try:
                data = self.store.read_range(blob_key(e.blob), start, end)
            except KeyNotFound:
                raise NestpruneError(
                    f"{self.store.url}: blob sha256:{e.blob[:12]} of tensor {name} is missing; "
                    "the registry is damaged (push this model again)"
                ) from None
            self.stats.add(fetched=len(data), requests=1)
            view = memoryview(data)
            out = {}
            for c in run:
                a, b = span[c][0] - start, span[c][1] - start
                piece = view[a:b]
                if len(piece) != b - a or sha256(piece) != e.chunks[c]:
                    raise NestpruneError(
                        f"{self.store.url}: chunk {c} of tensor {name} (blob sha256:{e.blob[:12]}, bytes "
                        f"{span[c][0]}-{span[c][1]}) fails its sha256 check; the registry copy is corrupt"
                    )
                if self.cache:
                    self.cache.put(e.chunks[c], piece)
                out[c] = piece
            return out

        if len(runs) > 1 and self.workers > 1:
            with ThreadPoolExecutor(min(self.workers, len(runs))) as pool:
                for part in pool.map(fetch, runs):
                    got.update(part)
        else:
            for run in runs:
                got.update(fetch(run))
        return [got[c] for c in ids]

    def read_file(self, ref: FileRef, what: str) -> bytes:
        """A whole blob (aux or artifact file), verified, through the cache."""
        data = self.cache.get(ref.digest) if self.cache else None
        if data is not None:
            self.stats.add(cached=len(data))
            return data
        try:
            data = self.store.read(blob_key(ref.digest))
        except KeyNotFound:
            raise NestpruneError(f"{self.store.url}: blob of {what} is missing; the registry is damaged") from None
        self.stats.add(fetched=len(data), requests=1)
        if sha256(data) != ref.digest:
            raise NestpruneError(f"{self.store.url}: {what} fails its sha256 check; the registry copy is corrupt")
        if self.cache:
            self.cache.put(ref.digest, data)
        return data
