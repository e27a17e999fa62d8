"""The ``hf`` writer: a variant as a Hugging Face model directory (config.json + safetensors + tokenizer files).

``write_hf`` streams every tensor of a ``TensorSource`` (local safetensors files, or the registry's store),
sliced to the kept rows/columns of a ``VariantSpec``, straight into the output safetensors file, whose
header is computed up front from the spec — so every tensor's place in the file is known, and a tensor is
written as independent *jobs* (each a disjoint byte range, ``pwrite`` at its offset) that run on a bounded
pool of threads (``nestprune.io.parallel``). Given the same spec, tensors, aux files and manifest it writes
byte-identical files whatever the source, the number of threads or the order jobs finish in.

With local safetensors (``FileSpans``) whole tensors and long runs of kept rows are copied in the kernel
(``os.copy_file_range``); short runs are coalesced across the small holes between them and written from a
mapping of the source with one ``pwritev`` per block (one kernel copy per kept byte, no call per run);
column slices (o_proj, down_proj) are gathered by numpy from mapped blocks of rows, whole heads at a time
where the kept columns allow. A registry source supplies its own jobs (``RegistrySource.copy_jobs``); any
other source goes through ``take``. Memory: a few blocks of ``BLOCK_BYTES`` per thread, whatever the model.

Output directory (written atomically: ``nestprune.io.atomic.output_dir``)::

    config.json                      base config; per-layer widths under "nestprune" (or a stock config)
    model.safetensors                or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer*, generation_config.json, …   copied from the aux directory
    nestprune_variant.json           the variant manifest (schemas/variant.py)
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nestprune.errors import NestpruneError
from nestprune.io import atomic
from nestprune.io.parallel import default_workers, run_jobs
from nestprune.io.weights import DTYPE_NAMES, SafetensorsSource, TensorSource, row_runs, weight_files
from nestprune.schemas.variant import VARIANT_MANIFEST_NAME, VariantManifest
from nestprune.variant.contents import (
    DEFAULT_SHARD_BYTES,
    Progress,
    TensorPlan,
    aux_files,
    plan_tensors,
    take,
)
from nestprune.variant.widths import VariantSpec

INDEX_NAME = "model.safetensors.index.json"
BLOCK_BYTES = 16 << 20  # what one write job reads (and holds, twice at most) at a time
COALESCE_GAP = 256 << 10  # read across holes this small between kept rows rather than issue another read
KERNEL_COPY_MIN = 1 << 20  # a run of kept bytes at least this long is copied in the kernel
PARALLEL_MIN_BYTES = 64 << 20
IOV_MAX = 1024  # buffers per pwritev (Linux's limit)  # below this many bytes of tensors the writer uses one thread


def plan_shards(plans: list[TensorPlan], shard_bytes: int) -> list[list[TensorPlan]]:
    """Greedy shards in name order; a tensor larger than ``shard_bytes`` gets a shard of its own."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for p in plans:
        if shards[-1] and size + p.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


# --- bytes --------------------------------------------------------------------------------------------------

def safetensors_header(plans: list[TensorPlan]) -> bytes:
    """8-byte little-endian length + JSON header padded with spaces to an 8-byte boundary."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in plans:
        header[p.name] = {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


class FileSpans:
    """Where each tensor of local safetensors files lies, so that a tensor is written with few large reads and
    writes instead of one call per row run (``jobs``): whole tensors and long runs of rows are copied in the
    kernel (``os.copy_file_range``); short runs are read as one span across the small holes between them
    and gathered in memory; column slices (o_proj, down_proj) are read in blocks of rows and gathered by
    numpy. Every job holds at most about ``BLOCK_BYTES`` twice. The bytes are the same as through ``take``."""

    def __init__(self, files: list[Path]):
        self.fds: list[int] = []
        self.path: dict[int, Path] = {}
        self.where: dict[str, tuple[int, str, tuple[int, ...], int]] = {}  # name -> (fd, dtype, shape, offset)
        try:
            for f in files:
                fd = os.open(f, os.O_RDONLY)
                self.fds.append(fd)
                self.path[fd] = Path(f)
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                header = json.loads(os.pread(fd, n, 8))
                for name, info in header.items():
                    if name != "__metadata__":
                        self.where[name] = (fd, info["dtype"], tuple(info["shape"]), 8 + n + info["data_offsets"][0])
        except Exception:
            self.close()
            raise

    def columns(self, p: TensorPlan) -> tuple[int, int, tuple[int, ...]] | None:
        """(fd, byte offset, shape) of a 2-D tensor whose kept columns ``jobs`` gathers from the file, or None."""
        if p.name not in self.where or p.axis != 1 or p.index is None:
            return None
        fd, dtype, shape, start = self.where[p.name]
        if dtype != DTYPE_NAMES[p.dtype] or len(shape) != 2 or shape[0] != p.shape[0]:
            return None
        if len(p.index) and (p.index.min() < 0 or p.index.max() >= shape[1]):
            return None
        return fd, start, shape

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def spans(self, p: TensorPlan) -> list[tuple[int, int, int]] | None:
        """(source fd, byte offset, length) of every contiguous piece of ``p``, or None (use ``take``)."""
        if p.name not in self.where or p.axis != 0:
            return None
        fd, dtype, shape, start = self.where[p.name]
        if dtype != DTYPE_NAMES[p.dtype] or shape[1:] != p.shape[1:] or not shape:
            return None
        row = int(np.prod(shape[1:], dtype=np.int64)) * p.dtype.itemsize
        if p.index is None:
            return [(fd, start, row * shape[0])] if shape == p.shape else None
        if len(p.index) and (p.index.min() < 0 or p.index.max() >= shape[0]):
            return None
        return [(fd, start + a * row, (b - a) * row) for a, b in row_runs(p.index)]

    def jobs(self, p: TensorPlan) -> list[Job] | None:
        """Jobs that each write one disjoint part of ``p``'s bytes, or None (use ``take``)."""
        pieces = self.spans(p)
        if pieces is not None:
            return piece_jobs(pieces)
        cols = self.columns(p)
        if cols is not None:
            return column_jobs(*cols, p.index, p.dtype.itemsize)  # type: ignore[arg-type]
        return None


Job = Callable[["Sink"], int]  # writes part of one tensor's bytes; returns how many bytes it wrote


@dataclass(frozen=True)
class Sink:
    """One tensor's place in an output file: ``write`` / ``copy`` at offsets relative to its first byte."""

    fd: int
    offset: int

    def write(self, at: int, data: bytes | bytearray | memoryview | np.ndarray | list[memoryview]) -> int:
        if isinstance(data, list):
            write_all((self.fd, self.offset + at), data)
            return sum(len(b) for b in data)
        view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else memoryview(
            np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        write_all((self.fd, self.offset + at), view)
        return len(view)

    def copy(self, src: int, src_offset: int, length: int, at: int) -> int:
        copy_range(src, self.fd, src_offset, length, self.offset + at)
        return length


def piece_jobs(pieces: list[tuple[int, int, int]]) -> list[Job]:
    """Jobs writing ``pieces`` (source fd, offset, length; contiguous in the output, in order). A piece of at
    least ``KERNEL_COPY_MIN`` bytes is copied in the kernel (in parts of ``BLOCK_BYTES``); shorter ones
    are grouped while the holes between them stay under ``COALESCE_GAP`` and the group's span under
    ``BLOCK_BYTES``, and each group is one read and one write."""
    jobs: list[Job] = []
    group: list[tuple[int, int, int]] = []
    at = group_at = 0

    def flush() -> None:
        if group:
            jobs.append(partial(_gather_job, tuple(group), group_at))
            group.clear()

    for fd, off, n in pieces:
        if n >= KERNEL_COPY_MIN:
            flush()
            for k in range(0, n, BLOCK_BYTES):
                jobs.append(partial(_copy_job, fd, off + k, min(BLOCK_BYTES, n - k), at + k))
        else:
            if group and (fd != group[0][0] or off - (group[-1][1] + group[-1][2]) > COALESCE_GAP
                          or off + n - group[0][1] > BLOCK_BYTES):
                flush()
            if not group:
                group_at = at
            group.append((fd, off, n))
        at += n
    flush()
    return jobs


def _copy_job(fd: int, off: int, n: int, at: int, sink: Sink) -> int:
    return sink.copy(fd, off, n, at)


def _gather_job(group: tuple[tuple[int, int, int], ...], at: int, sink: Sink) -> int:
    fd, first = group[0][0], group[0][1]
    if len(group) == 1:
        return sink.copy(fd, first, group[0][2], at)
    with mapped(fd, first, group[-1][1] + group[-1][2] - first) as view:
        # one pwritev straight from the mapped page cache: the kernel copies each kept byte once, as
        # copy_file_range would, without one system call per run
        pieces = [view[o - first: o - first + n] for _, o, n in group]
        try:
            return sink.write(at, pieces)
        finally:
            for v in pieces:
                v.release()


@contextlib.contextmanager
def mapped(fd: int, offset: int, length: int) -> Iterator[memoryview]:
    """A read-only view of ``length`` bytes of ``fd`` at ``offset``, mapped (and populated) for the block only, so
    a job's mapping never outlives it and the process's resident memory stays bounded by its jobs."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    m = mmap.mmap(fd, length + offset - start, flags=flags, prot=mmap.PROT_READ, offset=start)
    view = memoryview(m)
    try:
        part = view[offset - start: offset - start + length]
        try:
            if len(part) < length:
                raise NestpruneError("a base weight file ended early while being read; was it modified?")
            yield part
        finally:
            part.release()
    finally:
        view.release()
        m.close()


_SCRATCH = threading.local()


def scratch(n: int, slot: int) -> memoryview:
    """A reusable buffer of ``n`` bytes for this thread (``slot`` 0 or 1): no fresh pages to fault in and
    zero for every block read."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = [bytearray(), bytearray()]
    if len(bufs[slot]) < n:
        bufs[slot] = bytearray(max(n, min(2 * len(bufs[slot]), 2 * BLOCK_BYTES)))
    return memoryview(bufs[slot])[:n]


def read_exact(fd: int, n: int, offset: int, into: memoryview | None = None) -> memoryview:
    """``n`` bytes of ``fd`` at ``offset`` (into ``into`` when given); a short file is an error."""
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:  # preadv may return less (signals, some file systems)
        k = os.preadv(fd, [buf[got:n]], offset + got)
        if k == 0:
            raise NestpruneError("a base weight file ended early while being read; was it modified?")
        got += k
    return buf[:n]


def unit_of(index: np.ndarray, width: int) -> int:
    """The largest u such that ``index`` keeps whole aligned blocks of u elements of a ``width``-long axis
    (a head's head_dim columns of o_proj): a gather then moves u elements at a time."""
    runs = row_runs(index)
    if not runs:
        return 1
    return int(np.gcd.reduce(np.array([width] + [v for run in runs for v in run], dtype=np.int64)))


def column_jobs(fd: int, start: int, shape: tuple[int, ...], index: np.ndarray, itemsize: int) -> list[Job]:
    """Jobs gathering the ``index`` columns of a (rows, cols) tensor at ``start`` of ``fd``, a block of rows each."""
    rows, cols = shape
    kept = len(index)
    if rows * cols == 0 or kept == 0:
        return [lambda sink: 0]
    u = unit_of(index, cols)
    units = np.asarray(index[::u] // u, dtype=np.int64)
    block = max(1, BLOCK_BYTES // (cols * itemsize))
    return [partial(_column_job, fd, start, rows, cols, itemsize, u, units, r, min(rows, r + block))
            for r in range(0, rows, block)]


def _column_job(fd: int, start: int, rows: int, cols: int, itemsize: int, u: int, units: np.ndarray,
                r0: int, r1: int, sink: Sink) -> int:
    unit = np.dtype((np.void, u * itemsize))
    out = np.frombuffer(scratch((r1 - r0) * len(units) * unit.itemsize, 1), dtype=unit).reshape(r1 - r0, len(units))
    with mapped(fd, start + r0 * cols * itemsize, (r1 - r0) * cols * itemsize) as data:
        block = np.frombuffer(data, dtype=unit).reshape(r1 - r0, cols // u)
        np.take(block, units, axis=1, out=out)
        del block
    return sink.write(r0 * len(units) * u * itemsize, out)


def write_all(fd: int | tuple[int, int], data: memoryview | list[memoryview]) -> None:
    """Write all of ``data`` to ``fd`` at its file position, or — ``fd`` given as (fd, offset) — at that offset
    (``pwrite``: what parallel jobs use, each on its own part of the file). ``data`` may be a list of buffers,
    written in order with ``pwritev`` (at an offset only)."""
    if isinstance(fd, tuple):
        fd, offset = fd
        if isinstance(data, list):
            for k in range(0, len(data), IOV_MAX):
                batch = data[k: k + IOV_MAX]
                want = sum(len(b) for b in batch)
                n = os.pwritev(fd, batch, offset)
                if n < want:  # a partial vector write (rare): finish it piece by piece
                    skip = n
                    for b in batch:
                        if skip >= len(b):
                            skip -= len(b)
                            continue
                        write_all((fd, offset + n), b[skip:])
                        n += len(b) - skip
                        skip = 0
                offset += want
            return
        while len(data):
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
        return
    while len(data):
        data = data[os.write(fd, data):]  # type: ignore[index]


def copy_range(src: int, dst: int, offset: int, length: int, dst_offset: int) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` to ``dst`` at ``dst_offset``, in the kernel where it can."""
    while length:
        try:
            n = os.copy_file_range(src, dst, length, offset, dst_offset)
        except OSError:  # not supported here (old kernel, some file systems): copy through memory
            n = 0
        if n == 0:
            data = os.pread(src, min(length, BLOCK_BYTES), offset)
            if not data:
                raise NestpruneError("a base weight file ended early while being read; was it modified?")
            write_all((dst, dst_offset), memoryview(data))
            n = len(data)
        offset += n
        dst_offset += n
        length -= n


def take_job(source: TensorSource, p: TensorPlan) -> Job:
    def job(sink: Sink) -> int:
        t = take(source, p).contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
        return sink.write(0, t.numpy())
    return job


def tensor_jobs(p: TensorPlan, source: TensorSource, spans: FileSpans | None) -> list[Job]:
    """How ``p`` is written: the local fast paths, a source's own jobs (the registry's), else ``take``."""
    found = spans.jobs(p) if spans is not None else None
    if found is None and hasattr(source, "copy_jobs"):
        found = source.copy_jobs(p.name, p.axis, p.index, p.shape, p.dtype)
    return found if found is not None else [take_job(source, p)]


def write_shard(path: Path, plans: list[TensorPlan], source: TensorSource, done: int, total: int,
                progress: Progress | None, spans: FileSpans | None = None, workers: int = 1) -> int:
    """Write one safetensors file: the header, then every tensor's jobs on ``workers`` threads, each job at
    its own offset. Returns bytes written so far (for progress), reported as each tensor completes."""
    ordered = sorted(plans, key=lambda p: (-p.dtype.itemsize, p.name))  # wider dtypes first: aligned offsets
    header = safetensors_header(ordered)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        write_all(fd, memoryview(header))
        offset, left, work = len(header), {}, []
        for p in ordered:
            jobs = tensor_jobs(p, source, spans)
            left[p.name] = [len(jobs), p.nbytes, 0]
            work += [partial(_run, job, Sink(fd, offset), p.name) for job in jobs]
            offset += p.nbytes
        os.ftruncate(fd, offset)
        for name, n in run_jobs(work, workers):
            entry = left[name]
            entry[0] -= 1
            entry[2] += n
            if entry[0] == 0:
                if entry[2] != entry[1]:
                    raise NestpruneError(f"internal: {entry[2]} bytes were written for {name}, expected {entry[1]}")
                done += entry[1]
                if progress is not None:
                    progress(name, done, total)
    finally:
        os.close(fd)
    return done


def _run(job: Job, sink: Sink, name: str) -> tuple[str, int]:
    return name, job(sink)


def write_weights(out_dir: Path, plans: list[TensorPlan], source: TensorSource, shard_bytes: int,
                  progress: Progress | None = None, workers: int | None = None) -> list[str]:
    shards = plan_shards(plans, shard_bytes)
    names = shard_names(len(shards))
    total, done = sum(p.nbytes for p in plans), 0
    if workers is None:  # threads only pay for themselves on large outputs (and tiny ones stay in order)
        workers = getattr(source, "write_workers", None) or default_workers()
        if total < PARALLEL_MIN_BYTES:
            workers = 1
    spans = FileSpans(weight_files(source.model_dir)) if isinstance(source, SafetensorsSource) else None
    try:
        for name, shard in zip(names, shards, strict=True):
            done = write_shard(out_dir / name, shard, source, done, total, progress, spans, workers)
    finally:
        if spans is not None:
            spans.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {p.name: n for n, shard in zip(names, shards, strict=True) for p in shard}}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


# --- config, manifest, aux files ----------------------------------------------------------------------------

def variant_config(base_config: dict[str, Any], spec: VariantSpec) -> dict[str, Any]:
    """Widths the same in every layer (``uniform``): a stock config of the narrower model. Otherwise the base
    config plus every layer's widths under "nestprune" — the per-layer config form ``load_variant`` reads,
    whichever width policy chose them ("layout" there names that form, not the policy)."""
    cfg = {k: v for k, v in base_config.items() if k != "nestprune"}
    if spec.same_in_every_layer:
        first = spec.layers[0]
        return spec.arch.stock_config(cfg, {"q": first.num_heads, "kv": first.num_kv_heads,
                                            "mlp": first.intermediate_size})
    cfg["nestprune"] = {
        "layout": "per-layer",
        "gqa_mode": spec.gqa_mode,
        "layers": [{"num_attention_heads": k.num_heads, "num_key_value_heads": k.num_kv_heads,
                    "kv_of_head": k.kv_of_head.tolist(), "intermediate_size": k.intermediate_size}
                   for k in spec.layers],
    }
    return cfg


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")




# --- the writer ---------------------------------------------------------------------------------------------

def write_hf(spec: VariantSpec, source: TensorSource, aux_dir: Path, out: Path, manifest: VariantManifest, *,
             shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False, inputs: Iterable[Path] = (),
             progress: Progress | None = None) -> None:
    """Write ``spec`` of the model behind ``source`` as an HF directory at ``out`` (see ``writers.Writer``)."""
    aux_dir = Path(aux_dir)
    config_file = aux_dir / "config.json"
    if not config_file.exists():
        raise NestpruneError(f"{aux_dir} has no config.json")
    plans = plan_tensors(source, spec)  # before any write: a bad source fails early
    config = variant_config(json.loads(config_file.read_text()), spec)  # so does a config the family cannot hold
    with atomic.output_dir(out, force=force, inputs=inputs) as tmp:
        write_weights(tmp, plans, source, shard_bytes, progress)
        write_json(tmp / "config.json", config)
        for f in aux_files(aux_dir):
            shutil.copyfile(f, tmp / f.name)
        write_json(tmp / VARIANT_MANIFEST_NAME, manifest.model_dump(mode="json"))
