"""The ``hf`` writer: a variant as a Hugging Face model directory (config.json + safetensors + tokenizer files).

``write_hf`` streams every tensor of a ``TensorSource`` (local safetensors files, or the registry's store),
sliced to the kept rows/columns of a ``VariantSpec``, straight into the output safetensors file, whose
header is computed up front from the spec — so every tensor's place in the file is known, and a tensor is
written as independent *jobs* (each a disjoint byte range, ``pwrite`` at its offset) that run on a bounded
pool of threads (``nestprune.io.parallel``). Given the same spec, tensors, aux files and manifest it writes
byte-identical files whatever the source, the number of threads or the order jobs finish in.

With local safetensors (``FileSpans``) each job maps one block of a base tensor (the page cache, no copy) and
writes the kept rows of the block straight from the mapping with ``pwritev`` (one kernel copy per kept byte, one
call per ~1 MiB of rows), or gathers its kept columns (o_proj, down_proj) with numpy into a reused buffer, whole
heads at a time where the kept columns allow — and, when the source carries a content check of the base
(``source.content_check``, set by ``materialize``), hashes the block while it holds it, so the default check
costs no second read of the base; ``write_hf`` finishes the check before it publishes. A registry source
supplies its own jobs (``RegistrySource.copy_jobs``) and its check of whole tensors is fed from the bytes
written; any other source goes through ``take``. Memory: one mapped block and one buffer of at most
``BLOCK_BYTES`` (or one hash block of the check, if larger) per thread, whatever the model.

Measured on the project's machines (bench/results/materialize.md): writes of more than ~1 MiB per call, and
writes from buffers on transparent huge pages, cost several times the CPU of small writes from small pages, so
every write is cut into ``WRITE_CHUNK`` calls and buffers are on small pages (``nestprune.io.buffers``); writes
to one file take turns on a lock (the kernel's own lock spins).

Output directory (written atomically: ``nestprune.io.atomic.output_dir``)::

    config.json                      base config; per-layer widths under "nestprune" (or a stock config)
    model.safetensors                or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer*, generation_config.json, …   copied from the aux directory
    nestprune_variant.json           the variant manifest (schemas/variant.py)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xxhash

from nestprune.errors import NestpruneError
from nestprune.io import atomic
from nestprune.io.buffers import mapped, scratch
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

if TYPE_CHECKING:
    from nestprune.io.fingerprint import ContentCheck

INDEX_NAME = "model.safetensors.index.json"
BLOCK_BYTES = 16 << 20  # source bytes one write job reads (maps) at a time; its buffer is at most as large
PARALLEL_MIN_BYTES = 64 << 20  # below this many bytes of tensors the writer uses one thread
IOV_MAX = 1024  # buffers per pwritev (Linux's limit)
WRITE_CHUNK = 1 << 20  # bytes per write call: larger writes are several times slower on some virtual machines


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
    """Where each tensor of local safetensors files lies, so that a tensor is written with few system calls and
    one copy of each kept byte (``jobs``). A tensor is cut into jobs of ``block_bytes`` of its *source* bytes
    (``job_blocks``: whole hash blocks of the content check when there is one). A job maps its block (the page
    cache, no copy), hands the block's digests to the content check when there is one, and writes its kept bytes:
    runs of kept rows straight from the mapping (``pwritev``), or — a tensor cut along columns (o_proj,
    down_proj) — the kept columns of the rows that begin in the block, gathered by numpy into a reused buffer
    (whole heads at a time where the kept columns allow). A job holds one mapping of about ``block_bytes`` (plus
    the rest of its last row) and one buffer of at most that, whatever the model. The bytes are the same as
    through ``take``."""

    def __init__(self, files: list[Path], check: ContentCheck | None = None, block_bytes: int | None = None):
        self.fds: list[int] = []
        self.check = check
        self.block_bytes = block_bytes or BLOCK_BYTES
        self.where: dict[str, tuple[int, str, tuple[int, ...], int]] = {}  # name -> (fd, dtype, shape, offset)
        try:
            for f in files:
                fd = os.open(f, os.O_RDONLY)
                self.fds.append(fd)
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
        if len(p.index) and (p.index.min() < 0 or p.index.max() >= shape[1] or np.any(np.diff(p.index) <= 0)):
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
        if len(p.index) and (p.index.min() < 0 or p.index.max() >= shape[0] or np.any(np.diff(p.index) <= 0)):
            return None
        return [(fd, start + a * row, (b - a) * row) for a, b in row_runs(p.index)]

    def jobs(self, p: TensorPlan) -> list[Job] | None:
        """Jobs that each read one block of ``p``'s source bytes and write its kept part, or None (use ``take``)."""
        pieces = self.spans(p)
        if pieces is None and self.columns(p) is None:
            return None
        fd, dtype, shape, start = self.where[p.name]
        size = int(np.prod(shape, dtype=np.int64)) * p.dtype.itemsize
        check = self.check if self.check is not None and self.check.wants(p.name) else None
        hashed = check.block_bytes if check is not None else 0
        blocks = job_blocks(size, self.block_bytes, hashed)
        digest = partial(_digest, check, p.name, hashed) if check is not None else None
        if pieces is not None:
            return piece_jobs(fd, start, blocks, pieces, digest)
        return column_jobs(fd, start, shape, p.index, p.dtype.itemsize, blocks, digest)  # type: ignore[arg-type]


Job = Callable[["Sink"], int]  # writes part of one tensor's bytes; returns how many bytes it wrote
Digest = Callable[[int, memoryview], None]  # (offset in the tensor, a view of whole hash blocks from there)


def job_blocks(size: int, block_bytes: int, hashed: int = 0) -> list[tuple[int, int]]:
    """[a, b) byte ranges of a ``size``-byte tensor, one per job: ``block_bytes`` long, or — with a content check
    whose hash blocks are ``hashed`` bytes — as many whole hash blocks as fit (at least one), so that each hash
    block is read by one job. An empty tensor has one empty block (its digest is still handed in)."""
    step = hashed * max(1, block_bytes // hashed) if hashed else max(1, block_bytes)
    return [(a, min(size, a + step)) for a in range(0, size, step)] or [(0, 0)]


def _digest(check: ContentCheck, name: str, block_bytes: int, at: int, view: memoryview) -> None:
    for k in range(0, max(1, len(view)), block_bytes):
        check.add(name, (at + k) // block_bytes, xxhash.xxh3_128_digest(view[k: k + block_bytes]))


@dataclass(frozen=True)
class Sink:
    """One tensor's place in an output file: ``write`` at offsets relative to its first byte. Writes
    to one file take turns (``lock``, one per file): the file system lets one writer in at a time anyway, and
    threads waiting here sleep where the kernel's lock would spin (CPU time for nothing)."""

    fd: int
    offset: int
    lock: Any = field(default_factory=threading.Lock, compare=False)

    def write(self, at: int, data: bytes | bytearray | memoryview | np.ndarray | list[memoryview]) -> int:
        if isinstance(data, list):
            with self.lock:
                return write_vector(self.fd, self.offset + at, data)
        view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else memoryview(
            np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        with self.lock:
            write_all((self.fd, self.offset + at), view)
        return len(view)


def piece_jobs(fd: int, start: int, blocks: list[tuple[int, int]], pieces: list[tuple[int, int, int]],
               digest: Digest | None) -> list[Job]:
    """Jobs writing ``pieces`` (source fd, offset, length; ascending, contiguous in the output, in order) of the
    tensor at ``start`` of ``fd``, one per source block [a, b) (offsets in the tensor): the parts of the pieces
    that lie in the block. Without a digest, a block with nothing kept has no job."""
    lo = np.array([off - start for _, off, _ in pieces], dtype=np.int64)  # each piece's offsets in the tensor
    hi = lo + np.array([n for _, _, n in pieces], dtype=np.int64)
    out = np.concatenate([[0], np.cumsum(hi - lo)[:-1]]).astype(np.int64)  # and in the output
    jobs: list[Job] = []
    for a, b in blocks:
        first, last = np.searchsorted(hi, a, side="right"), np.searchsorted(lo, b, side="left")  # overlap [a, b)
        x = np.maximum(lo[first:last], a)
        y, at = np.minimum(hi[first:last], b), out[first:last] + x - lo[first:last]
        parts = tuple(zip(x.tolist(), y.tolist(), at.tolist(), strict=True))
        if digest is None and not parts:
            continue
        jobs.append(partial(_piece_job, fd, start, a, b, parts, digest))
    return jobs or [lambda sink: 0]


def _piece_job(fd: int, start: int, a: int, b: int, parts: tuple[tuple[int, int, int], ...],
               digest: Digest | None, sink: Sink) -> int:
    """Hash block [a, b) of the tensor when there is a digest, then write ``parts`` ((from, to) in the tensor,
    output offset; contiguous in the output) straight from the mapping."""
    if digest is None and not parts:
        return 0
    lo, hi = (a, b) if digest is not None else (parts[0][0], parts[-1][1])
    with mapped(fd, start + lo, hi - lo, ahead=b - a if digest is not None else 0) as view:
        if digest is not None:
            digest(a, view)
        pieces = [view[x - lo: y - lo] for x, y, _ in parts]
        try:
            return sink.write(parts[0][2], pieces) if pieces else 0
        finally:
            for v in pieces:
                v.release()


def unit_of(index: np.ndarray, width: int) -> int:
    """The largest u such that ``index`` keeps whole aligned blocks of u elements of a ``width``-long axis
    (a head's head_dim columns of o_proj): a gather then moves u elements at a time."""
    runs = row_runs(index)
    if not runs:
        return 1
    return int(np.gcd.reduce(np.array([width] + [v for run in runs for v in run], dtype=np.int64)))


def column_jobs(fd: int, start: int, shape: tuple[int, ...], index: np.ndarray, itemsize: int,
                blocks: list[tuple[int, int]], digest: Digest | None) -> list[Job]:
    """Jobs gathering the ``index`` columns of a (rows, cols) tensor at ``start`` of ``fd``, one per source block
    [a, b) (offsets in the tensor): the rows that begin in the block. Without a digest, a block where no row
    begins has no job."""
    rows, cols = shape
    if rows * cols == 0 or len(index) == 0:
        return [partial(_column_job, fd, start, cols, itemsize, 1, index, a, b, 0, 0, digest)
                for a, b in blocks] if digest is not None else [lambda sink: 0]
    u = unit_of(index, cols)
    units = np.asarray(index[::u] // u, dtype=np.int64)
    row = cols * itemsize
    jobs = []
    for a, b in blocks:
        r0, r1 = -(-a // row), min(rows, -(-b // row))
        if digest is not None or r0 < r1:
            jobs.append(partial(_column_job, fd, start, cols, itemsize, u, units, a, b, r0, r1, digest))
    return jobs or [lambda sink: 0]


def _column_job(fd: int, start: int, cols: int, itemsize: int, u: int, units: np.ndarray, a: int, b: int,
                r0: int, r1: int, digest: Digest | None, sink: Sink) -> int:
    """Hash block [a, b) of the tensor when there is a digest; gather and write the kept columns of rows [r0, r1)."""
    row = cols * itemsize
    lo, hi = (a, max(b, r1 * row)) if digest is not None else (r0 * row, r1 * row)
    with mapped(fd, start + lo, hi - lo, ahead=b - a if digest is not None else 0) as data:
        if digest is not None:
            digest(a, data[: b - a])
        if r1 <= r0:
            return 0
        unit = np.dtype((np.void, u * itemsize))
        out = np.frombuffer(scratch((r1 - r0) * len(units) * unit.itemsize), dtype=unit).reshape(r1 - r0, len(units))
        block = np.frombuffer(data[r0 * row - lo: r1 * row - lo], dtype=unit).reshape(r1 - r0, cols // u)
        np.take(block, units, axis=1, out=out)
        del block
    return sink.write(r0 * len(units) * u * itemsize, out)


def write_all(fd: int | tuple[int, int], data: memoryview) -> None:
    """Write all of ``data`` to ``fd`` at its file position, or — ``fd`` given as (fd, offset) — at that offset
    (``pwrite``: what parallel jobs use, each on its own part of the file), ``WRITE_CHUNK`` bytes per call."""
    if isinstance(fd, tuple):
        fd, offset = fd
        while len(data):
            n = os.pwrite(fd, data[:WRITE_CHUNK], offset)
            data, offset = data[n:], offset + n
        return
    while len(data):
        data = data[os.write(fd, data[:WRITE_CHUNK]):]  # type: ignore[index]


def write_vector(fd: int, offset: int, pieces: list[memoryview]) -> int:
    """Write ``pieces`` one after another at ``offset`` of ``fd`` with few ``pwritev`` calls, each of at most
    ``IOV_MAX`` buffers and about ``WRITE_CHUNK`` bytes (a piece larger than that goes alone, in chunks);
    returns the bytes written."""
    total = 0
    batch: list[memoryview] = []
    size = 0
    for piece in [*pieces, None]:
        if piece is not None and len(batch) < IOV_MAX and size + len(piece) <= WRITE_CHUNK:
            batch.append(piece)
            size += len(piece)
            continue
        if batch:
            n = os.pwritev(fd, batch, offset)
            if n < size:  # a partial vector write (rare): the rest piece by piece
                for b in batch:
                    skip = min(len(b), max(0, n))
                    n -= skip
                    write_all((fd, offset + skip), b[skip:])
                    offset += len(b)
            else:
                offset += size
            total += size
        batch, size = [], 0
        if piece is None:
            break
        if len(piece) > WRITE_CHUNK:
            write_all((fd, offset), piece)
            offset += len(piece)
            total += len(piece)
        else:
            batch, size = [piece], len(piece)
    return total


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
                progress: Progress | None, spans: FileSpans | None = None, workers: int = 1,
                check: ContentCheck | None = None) -> int:
    """Write one safetensors file: the header, then every tensor's jobs on ``workers`` threads, each job at
    its own offset. Returns bytes written so far (for progress), reported as each tensor completes. Whole
    tensors ``check`` still wants (their jobs did not hash them) are hashed from what was written."""
    ordered = sorted(plans, key=lambda p: (-p.dtype.itemsize, p.name))  # wider dtypes first: aligned offsets
    header = safetensors_header(ordered)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        write_all(fd, memoryview(header))
        offset, left, work, lock = len(header), {}, [], threading.Lock()
        for p in ordered:
            jobs = tensor_jobs(p, source, spans)
            left[p.name] = [len(jobs), p.nbytes, 0]
            work += [partial(_run, job, Sink(fd, offset, lock), p.name) for job in jobs]
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
        if check is not None:
            at = len(header)
            for p in ordered:
                if p.index is None and check.wants(p.name):
                    for a, b in job_blocks(p.nbytes, BLOCK_BYTES, check.block_bytes):  # block by block: bounded
                        with mapped(fd, at + a, b - a) as view:
                            _digest(check, p.name, check.block_bytes, a, view)
                at += p.nbytes
    finally:
        os.close(fd)
    return done


def _run(job: Job, sink: Sink, name: str) -> tuple[str, int]:
    return name, job(sink)


def write_weights(out_dir: Path, plans: list[TensorPlan], source: TensorSource, shard_bytes: int,
                  progress: Progress | None = None, workers: int | None = None,
                  check: ContentCheck | None = None) -> list[str]:
    """Every tensor of ``plans`` into safetensors file(s) in ``out_dir``; the names written. ``check`` (the
    source's ``content_check``) is fed the digests of every block of the base the jobs read and of every whole
    tensor written; the caller calls its ``finish``."""
    shards = plan_shards(plans, shard_bytes)
    names = shard_names(len(shards))
    total, done = sum(p.nbytes for p in plans), 0
    if workers is None:  # threads only pay for themselves on large outputs (and tiny ones stay in order)
        workers = getattr(source, "write_workers", None) or default_workers()
        if total < PARALLEL_MIN_BYTES:
            workers = 1
    spans = FileSpans(weight_files(source.model_dir), check) if isinstance(source, SafetensorsSource) else None
    try:
        for name, shard in zip(names, shards, strict=True):
            done = write_shard(out_dir / name, shard, source, done, total, progress, spans, workers, check)
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
    check = getattr(source, "content_check", None)  # a check of the base, fed as the writer reads it
    with atomic.output_dir(out, force=force, inputs=inputs) as tmp:
        write_weights(tmp, plans, source, shard_bytes, progress, check=check)
        if check is not None:
            check.finish()  # a base that fails it leaves nothing: the temporary goes, nothing is published
        write_json(tmp / "config.json", config)
        for f in aux_files(aux_dir):
            shutil.copyfile(f, tmp / f.name)
        write_json(tmp / VARIANT_MANIFEST_NAME, manifest.model_dump(mode="json"))


write_hf.feeds_content_check = True  # type: ignore[attr-defined]  # it finishes ``source.content_check`` (above)
