"""``RegistrySource``: the ``TensorSource`` of one registry version, reading only the chunks asked for.

``take(name, axis, index)`` maps the requested original indices to stored rows (undoing the nested
permutation and the transposition), fetches just the chunks that hold them — from the local cache,
else with byte-range reads of runs of adjacent missing chunks, in parts of at most ``PART_BYTES`` moved
in parallel — checks every chunk against its sha256 before use, and returns exactly what
``SafetensorsSource.take`` returns for the base model.

``copy_jobs`` is what the HF writer uses instead of ``take``: a tensor stored whole (embeddings, norms,
lm_head) is written in blocks of whole chunks straight from the fetched bytes (no gather, memory bounded
by the block); a permuted tensor is fetched once (its kept chunks), then written in original order: rows
straight from the fetched bytes (one ``pwritev`` per ~1 MB of rows, no gather), transposed tensors (o_proj,
down_proj) gathered and transposed in blocks of output rows in two reused buffers. Jobs hold at most
``MEMORY_BYTES`` of fetched bytes together (a job waits for room); kept bytes of one permuted tensor above
``SPILL_BYTES`` are held in an unlinked temporary file instead, so a pull's memory stays bounded whatever the
model. From a local directory with no cache to fill, nothing is fetched: the chunks are checked and written
straight from the mapped blob (``LocalStore.mapped_range``, the page cache itself).

A chunk whose bytes do not match its sha256 is fetched again (``ATTEMPTS`` tries: a flipped bit in transit
is transient, a corrupt registry copy is not) and never used.
"""

from __future__ import annotations

import mmap
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import torch

from nestprune.errors import NestpruneError
from nestprune.io.buffers import scratch, small_pages
from nestprune.io.parallel import default_workers
from nestprune.io.weights import DTYPES
from nestprune.registry.cache import ChunkCache, sha256
from nestprune.registry.nested import stored_order, stored_rows_of, tensor_from_bytes
from nestprune.registry.stores import ATTEMPTS, DEFAULT_JOBS, PART_BYTES, KeyNotFound, ShortBlob, Store
from nestprune.registry.versions import blob_key
from nestprune.schemas.registry import FileRef, TensorEntry, VersionManifestV1

BLOCK_BYTES = 16 << 20  # what one write job of a whole tensor fetches and writes
SPILL_BYTES = 256 << 20  # kept bytes of one permuted tensor above which they wait in a temporary file
MEMORY_BYTES = 1 << 30  # fetched bytes all of a pull's jobs may hold in memory at once
_TORCH_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a dtype's bits: copies only move them


@dataclass
class TransferStats:
    """Bytes read from the registry (``fetched``) and served by the local cache (``cached``)."""

    fetched: int = 0
    cached: int = 0
    requests: int = 0
    retries: int = 0
    started: float = field(default_factory=time.perf_counter)
    on_update: Callable[[TransferStats], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, fetched: int = 0, cached: int = 0, requests: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.fetched += fetched
            self.cached += cached
            self.requests += requests
            self.retries += retries
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


class _Budget:
    """Bytes of memory jobs may hold at once, as reusable buffers: ``take`` waits until enough is free and hands
    out a buffer (reused when one of the size is free: no fresh pages to fault in and zero), ``give`` takes it
    back. Buffers are sized in powers of two; what is kept for reuse plus what is out never exceeds ``total``."""

    def __init__(self, total: int):
        self.total = total
        self.out = 0  # bytes of buffers handed out
        self.kept: dict[int, list[mmap.mmap]] = {}  # free buffers by size
        self._cond = threading.Condition()

    @staticmethod
    def size_for(n: int) -> int:
        return max(1 << 16, 1 << (max(1, n) - 1).bit_length())

    def _kept_bytes(self) -> int:
        return sum(k * len(v) for k, v in self.kept.items())

    def take(self, n: int) -> mmap.mmap:
        size = self.size_for(n)
        with self._cond:
            self._cond.wait_for(lambda: self.out + size <= self.total or self.out == 0)
            self.out += size
            if self.kept.get(size):
                return self.kept[size].pop()
            for k in sorted(self.kept, reverse=True):  # make room: drop kept buffers of other sizes
                while self.kept[k] and self.out + self._kept_bytes() > self.total:
                    self.kept[k].pop()
        return small_pages(size)

    def give(self, buf: mmap.mmap) -> None:
        with self._cond:
            self.out -= len(buf)
            if self.out + self._kept_bytes() + len(buf) <= self.total:
                self.kept.setdefault(len(buf), []).append(buf)
            self._cond.notify_all()


class _Held:
    """Verified chunks of one tensor, ``at[c]`` = where chunk ``c`` starts in ``buf``. Either the chunks laid end
    to end in a buffer from ``budget`` (or — above ``SPILL_BYTES`` — in an unlinked temporary file, mapped: page
    cache the kernel can write back and evict); or, from a local store with no cache to fill, the blob itself,
    mapped (``view``: nothing copied; chunks at their own offsets from the first one)."""

    def __init__(self, size: int, budget: _Budget | None = None, view: memoryview | None = None,
                 closer: Callable[[], None] | None = None):
        self.size = size
        self.mapped = view is not None
        self.at: dict[int, int] = {}
        self._closer = closer
        self._budget = budget
        self._file = None
        self._map: mmap.mmap | None = None
        if view is not None:
            self._budget = None
            self.buf: memoryview = view
            return
        spill = size > min(SPILL_BYTES, budget.total if budget else SPILL_BYTES)
        if spill:
            self._budget = None
            self._file = tempfile.TemporaryFile(prefix="nestprune-pull-")
            self._file.truncate(size)
            self._map = mmap.mmap(self._file.fileno(), size) if size else None
            self.buf = memoryview(self._map) if self._map is not None else memoryview(b"")
        else:
            self._map = self._budget.take(size) if self._budget is not None else small_pages(size)
            self.buf = memoryview(self._map)[:size]

    def rows(self, e: TensorEntry, rows: np.ndarray) -> np.ndarray:
        """Row of ``buf`` (in rows of the stored tensor) of each stored row in ``rows`` (whose chunks it holds)."""
        ids = np.array(sorted(self.at), dtype=np.int64)
        starts = np.array([self.at[c] for c in ids.tolist()], dtype=np.int64)  # chunks start on whole rows
        return starts[np.searchsorted(ids, rows // e.chunk_rows)] // _row_bytes(e) + rows % e.chunk_rows

    def close(self) -> None:
        try:
            self.buf.release()
            if self._map is not None and self._budget is None:
                self._map.close()
        except BufferError:  # a view is still alive (an exception is unwinding): the collector frees it
            self._map = None
        if self._closer is not None:
            self._closer()
        if self._file is not None:
            self._file.close()  # unlinked since it was made: nothing stays on disk
        if self._budget is not None and self._map is not None:
            self._budget.give(self._map)
        self._budget = self._map = self._closer = None


class RegistrySource:
    def __init__(self, store: Store, manifest: VersionManifestV1, cache: ChunkCache | None = None,
                 stats: TransferStats | None = None, workers: int = DEFAULT_JOBS):
        self.store = store
        self.manifest = manifest
        self.cache = cache
        self.stats = stats or TransferStats()
        self.workers = max(1, workers)
        # the writer's threads (``nestprune.variant.hf``): each job waits on its reads, so ``workers`` of them keep
        # that many requests in flight; from a local directory reads are CPU and memory work, so no more than cores
        local = hasattr(store, "read_range_into")
        self.write_workers = min(self.workers, default_workers()) if local else self.workers
        self._net: ThreadPoolExecutor | None = None
        self._net_lock = threading.Lock()
        self._budget = _Budget(MEMORY_BYTES)
        self._orders = {
            int(k): {"q": np.asarray(o.q), "kv": np.asarray(o.kv), "mlp": np.asarray(o.mlp)}
            for k, o in manifest.orders.items()
        }

    def close(self) -> None:
        if self._net is not None:
            self._net.shutdown(wait=True)
            self._net = None

    def __enter__(self) -> RegistrySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _stored_rows(self, e: TensorEntry, idx: np.ndarray) -> np.ndarray:
        """Stored row of each original index ``idx`` along the pruned axis."""
        if e.space is None:
            return idx
        pruned_axis = 1 if e.transposed else 0
        segments = [(g.space, g.rows) for g in e.segments] if e.segments else [(e.space, e.shape[pruned_axis])]
        return stored_rows_of(idx, stored_order(segments, self._orders[e.layer].__getitem__, e.unit_rows))

    def take(self, name: str, axis: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        e = self._entry(name)
        pruned_axis = 1 if e.transposed else 0
        if index is not None and axis != pruned_axis:  # not along the stored rows: read all, select after
            return self.take(name).index_select(axis, torch.as_tensor(index, dtype=torch.long)).contiguous()
        if index is None:
            idx = np.arange(e.shape[pruned_axis] if e.shape else 1)
        else:
            idx = torch.as_tensor(index, dtype=torch.long).numpy()
        out = self._rows(name, e, self._stored_rows(e, idx), DTYPES[e.dtype])
        if not e.shape:
            return out.reshape(())
        return out.t().contiguous() if e.transposed else out

    # --- the writer's jobs ----------------------------------------------------------------------------
    def copy_jobs(self, name: str, axis: int, index: np.ndarray | None, shape: tuple[int, ...],
                  dtype: torch.dtype) -> list[Callable] | None:
        """Jobs writing tensor ``name`` cut to ``index`` along ``axis`` (see ``nestprune.variant.hf.Sink``)."""
        e = self._entry(name)
        pruned_axis = 1 if e.transposed else 0
        if DTYPES[e.dtype] != dtype or not e.shape or len(e.stored_shape) > 2:
            return None
        if index is not None and axis != pruned_axis:
            return None
        row = _row_bytes(e)
        if e.space is None and index is None:  # stored whole, original order: the pack is the tensor's bytes
            per = max(1, BLOCK_BYTES // max(1, row * e.chunk_rows))
            n = len(e.chunks)
            return [lambda sink, a=a, b=min(n, a + per): self._whole_job(name, e, a, b, sink)
                    for a in range(0, n, per)] or [lambda sink: 0]
        idx = np.arange(e.shape[pruned_axis]) if index is None else np.asarray(index, dtype=np.int64)
        return [lambda sink: self._gather_job(name, e, idx, sink)]

    def _whole_job(self, name: str, e: TensorEntry, a: int, b: int, sink) -> int:
        step = _row_bytes(e) * e.chunk_rows
        held = self._hold(name, e, list(range(a, b)))
        try:
            return sink.write(a * step, held.buf)
        finally:
            held.close()

    def _gather_job(self, name: str, e: TensorEntry, idx: np.ndarray, sink) -> int:
        if len(idx) == 0:
            return 0
        rows = self._stored_rows(e, idx)
        held = self._hold(name, e, np.unique(rows // e.chunk_rows).tolist())
        try:
            local = held.rows(e, rows)  # row of ``held`` for each kept index, in order
            row = _row_bytes(e)
            if not e.transposed:  # output rows = kept stored rows in original order: written straight from ``held``
                runs = np.flatnonzero(np.diff(local) != 1) + 1  # runs of rows adjacent in ``held``
                first = local[np.r_[0, runs]] * row
                last = (local[np.r_[runs - 1, len(local) - 1]] + 1) * row
                return sink.write(0, [held.buf[x:y] for x, y in zip(first.tolist(), last.tolist(), strict=True)])
            # transposed (o_proj, down_proj): output (rows, kept) = held rows ``local`` transposed, by blocks of output
            # rows gathered then transposed in two reused buffers (torch's blocked transpose copy: ~3x numpy's)
            itemsize = DTYPES[e.dtype].itemsize
            cols = e.stored_shape[1]  # = output rows
            src = tensor_from_bytes(held.buf, _TORCH_BITS[itemsize], (-1, cols))
            order = torch.from_numpy(np.ascontiguousarray(local, dtype=np.int64))
            per = max(1, BLOCK_BYTES // max(1, len(local) * itemsize))
            written = 0
            for r in range(0, cols, per):
                n = min(per, cols - r)
                picked = torch.frombuffer(scratch(len(local) * n * itemsize, 1), dtype=src.dtype).view(len(local), n)
                torch.index_select(src[:, r: r + n], 0, order, out=picked)
                part = torch.frombuffer(scratch(len(local) * n * itemsize, 2), dtype=src.dtype).view(n, len(local))
                part.copy_(picked.t())
                written += sink.write(r * len(local) * itemsize, part.numpy())
            return written
        finally:
            src = picked = part = None  # noqa: F841  (drop the views before the buffer goes)
            held.close()

    # --- bytes ----------------------------------------------------------------------------------------
    def _rows(self, name: str, e: TensorEntry, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """Stored rows ``rows`` of tensor ``name``, in that order. (len(rows), *stored_shape[1:])"""
        rest = tuple(e.stored_shape[1:])
        if len(rows) == 0:
            return torch.empty((0, *rest), dtype=dtype)
        held = self._hold(name, e, np.unique(rows // e.chunk_rows).tolist())
        try:
            block = tensor_from_bytes(held.buf, dtype, (-1, *rest) if rest else (-1,))
            out = block.index_select(0, torch.as_tensor(held.rows(e, rows), dtype=torch.long))
            del block
            return out
        finally:
            held.close()

    def _pool(self) -> ThreadPoolExecutor:
        with self._net_lock:
            if self._net is None:
                self._net = ThreadPoolExecutor(self.workers, thread_name_prefix="nestprune-net")
            return self._net

    def _hold(self, name: str, e: TensorEntry, ids: list[int]) -> _Held:
        """The verified bytes of chunks ``ids`` (ascending) of tensor ``name``: mapped straight from the blob where
        the store is a local directory and there is no cache to fill (nothing copied), else fetched into a
        buffer (``_fill``). Any chunk that fails its sha256 is an error."""
        step = _row_bytes(e) * e.chunk_rows
        spans = {c: (c * step, min((c + 1) * step, e.size)) for c in ids}
        map_range = getattr(self.store, "mapped_range", None)
        if map_range is not None and self.cache is None and ids:
            lo, hi = spans[ids[0]][0], spans[ids[-1]][1]
            ctx = map_range(blob_key(e.blob), lo, hi - lo)
            try:
                view = ctx.__enter__()
            except ShortBlob:
                view = None  # read it the usual way: the short chunk is reported there
            except KeyNotFound:
                raise self._missing(name, e) from None
            if view is not None:
                held = _Held(hi - lo, view=view, closer=lambda: ctx.__exit__(None, None, None))
                held.at = {c: a - lo for c, (a, _) in spans.items()}
                return self._fill(name, e, ids, held)
        held = _Held(sum(b - a for a, b in spans.values()), self._budget)
        pos = 0
        for c in ids:
            held.at[c] = pos
            pos += spans[c][1] - spans[c][0]
        return self._fill(name, e, ids, held)

    def _missing(self, name: str, e: TensorEntry) -> NestpruneError:
        return NestpruneError(f"{self.store.url}: blob sha256:{e.blob[:12]} of tensor {name} is missing; the "
                              "registry is damaged (push this model again)")

    def _fill(self, name: str, e: TensorEntry, ids: list[int], held: _Held) -> _Held:
        """Check chunks ``ids`` (ascending) of ``held`` against their sha256 — reading them first into their places
        ``held.at`` unless ``held`` maps the blob: from the cache where it has them, else with ranged reads of runs
        of adjacent missing chunks, in parts of at most ``PART_BYTES``, fetched (or checked) in parallel. Returns
        ``held``; closes it if anything fails."""
        try:
            self._fill_parts(name, e, ids, held)
        except BaseException:
            held.close()
            raise
        return held

    def _fill_parts(self, name: str, e: TensorEntry, ids: list[int], held: _Held) -> None:
        step = _row_bytes(e) * e.chunk_rows

        def span(c: int) -> tuple[int, int]:
            return c * step, min((c + 1) * step, e.size)

        at = held.at
        missing: list[int] = []
        for c in ids:
            data = self.cache.get(e.chunks[c]) if self.cache and not held.mapped else None
            if data is None or len(data) != span(c)[1] - span(c)[0]:
                missing.append(c)
            else:
                held.buf[at[c]: at[c] + len(data)] = data
                self.stats.add(cached=len(data))
        parts: list[list[int]] = []  # runs of adjacent chunks, cut at PART_BYTES
        for c in missing:
            if parts and parts[-1][-1] == c - 1 and span(c)[1] - span(parts[-1][0])[0] <= max(PART_BYTES, step):
                parts[-1].append(c)
            else:
                parts.append([c])

        read_into = getattr(self.store, "read_range_into", None)  # a local store reads straight into ``held``

        def fetch(run: list[int]) -> None:
            start, end = span(run[0])[0], span(run[-1])[1]
            dest = held.buf[at[run[0]]: at[run[0]] + (end - start)]
            bad: list[int] = []
            for attempt in range(1 if held.mapped else ATTEMPTS):  # the mapped blob is what it is: no retry
                try:
                    if held.mapped:
                        n = len(dest)
                    elif read_into is not None:
                        n = read_into(blob_key(e.blob), start, dest)
                    else:
                        data = self.store.read_range(blob_key(e.blob), start, end)
                        n = min(len(data), len(dest))
                        dest[:n] = memoryview(data)[:n]
                        del data
                except KeyNotFound:
                    raise self._missing(name, e) from None
                self.stats.add(fetched=n, requests=1, retries=1 if attempt else 0)
                bad = []
                for c in run:
                    a, b = span(c)[0] - start, span(c)[1] - start
                    if b > n or sha256(dest[a:b]) != e.chunks[c]:
                        bad.append(c)
                if not bad:
                    break
            if bad:
                c = bad[0]
                raise NestpruneError(
                    f"{self.store.url}: chunk {c} of tensor {name} (blob sha256:{e.blob[:12]}, bytes "
                    f"{span(c)[0]}-{span(c)[1]}) fails its sha256 check; the registry copy is corrupt"
                )
            if self.cache:
                for c in run:
                    a, b = span(c)[0] - start, span(c)[1] - start
                    self.cache.put(e.chunks[c], dest[a:b])

        if len(parts) > 1 and self.workers > 1:
            futures = [self._pool().submit(fetch, run) for run in parts]
            wait(futures)  # all of them, so none writes into ``held`` after it is released
            for f in futures:
                f.result()
        else:
            for run in parts:
                fetch(run)

    def read_file(self, ref: FileRef, what: str) -> bytes:
        """A whole blob (aux or artifact file), verified, through the cache."""
        data = self.cache.get(ref.digest) if self.cache else None
        if data is not None:
            self.stats.add(cached=len(data))
            return data
        for attempt in range(ATTEMPTS):
            try:
                data = self.store.read(blob_key(ref.digest))
            except KeyNotFound:
                raise NestpruneError(f"{self.store.url}: blob of {what} is missing; the registry is damaged") from None
            self.stats.add(fetched=len(data), requests=1, retries=1 if attempt else 0)
            if sha256(data) == ref.digest:
                break
        else:
            raise NestpruneError(f"{self.store.url}: {what} fails its sha256 check; the registry copy is corrupt")
        if self.cache:
            self.cache.put(ref.digest, data)
        return data
