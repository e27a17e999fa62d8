"""Base-model fingerprints: what an artifact records about the model it ranked, and the checks against it.

Three levels, recorded at build and checked by ``materialize``, ``push`` and ``pull``:

config     sha256 of config.json (always checked).
content    (default check) every byte of every tensor, hashed fast: each tensor's bytes are cut into
           ``BLOCK_BYTES`` blocks hashed with XXH3-128 (several GB/s per core), and the tensor's digest is
           XXH3-128 over its dtype, shape and block hashes (``schemas.artifact.ContentFingerprint``). Any changed
           bit of any tensor changes its digest (up to a 2^-128 chance per tensor, for data nobody crafted to
           collide), so a fine-tune, a partial fine-tune, a merged adapter or a one-row edit of the same shapes
           is refused. Every byte is read: a sample of rows cannot see a one-row edit. Blocks are hashed straight
           from mapped views of the page cache (no copy). ``materialize`` does not read the base twice for it:
           the variant writer hashes each block of the base while it holds it to cut the kept rows out
           (``ContentCheck``) and compares the digests before it publishes the variant
           (``bench/fingerprint_cost.py`` measures the cost). The digest does not depend on how tensors are split
           into files.
files      sha256 of every weight file (``--full-check``): byte-exact files, headers and metadata included.

Artifacts of schema version 1 have no content fingerprint: they are checked as before (config, file names
and sizes) and the check says so (``BaseCheck.SIZES``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from nestprune.errors import NestpruneError
from nestprune.io.text import sha256_file
from nestprune.io.weights import weight_files
from nestprune.schemas.artifact import BaseFingerprint, ContentFingerprint, FileDigest, TensorDigest

if TYPE_CHECKING:
    import torch

    from nestprune.io.weights import TensorSource
    from nestprune.schemas.artifact import ArtifactManifest

BLOCK_BYTES = 16 << 20
READ_THREADS = 4  # blocks hashed at once (XXH3 releases the GIL; a cold block waits on the disk meanwhile)
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
NOT_THE_BASE = "is not the model this artifact was built from"


class BaseCheck(StrEnum):
    """What a check compared, from the weakest: sizes (schema 1 artifacts), content (default), files."""

    SIZES = "sizes"
    CONTENT = "content"
    FILES = "files"


def config_path(model_dir: Path) -> Path:
    if not Path(model_dir).is_dir():
        raise NestpruneError(f"model directory {model_dir} does not exist")
    p = Path(model_dir) / "config.json"
    if not p.exists():
        raise NestpruneError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    return p


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model directory as a dict (one line if it is missing or not a JSON object)."""
    p = config_path(model_dir)
    try:
        data = json.loads(p.read_bytes())
    except ValueError as e:
        raise NestpruneError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise NestpruneError(f"{p} is not a JSON object")
    return data


# --- safetensors headers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes lie in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in ``file``
    nbytes: int


def read_header(path: Path) -> list[TensorSpan]:
    """The tensors of one safetensors file, every field checked (one line for a corrupt or truncated file)."""
    path = Path(path)

    def bad(why: str) -> NestpruneError:
        return NestpruneError(f"{path} is not a valid safetensors file ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise bad(f"header length {n} does not fit the file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ITEMSIZE:
            raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[dtype]:
            raise bad(f"tensor {name!r} holds {offsets[1] - offsets[0]} bytes, its shape and dtype need "
                      f"{math.prod(shape) * ITEMSIZE[dtype]}")
        spans.append(TensorSpan(name, dtype, tuple(shape), path, data_start + offsets[0], offsets[1] - offsets[0]))
    return spans


def tensor_spans(model_dir: Path) -> dict[str, TensorSpan]:
    """Every tensor of a model directory's safetensors files (single or sharded), by checkpoint key."""
    spans: dict[str, TensorSpan] = {}
    for f in weight_files(model_dir):
        for s in read_header(f):
            if s.name in spans:
                raise NestpruneError(f"tensor {s.name!r} is stored twice ({spans[s.name].file.name} and {f.name})")
            spans[s.name] = s
    return spans


# --- digests -----------------------------------------------------------------------------------------------

def _tensor_digest(dtype: str, shape: tuple[int, ...], blocks: list[bytes]) -> str:
    h = xxhash.xxh3_128()
    h.update(f"{dtype}{list(shape)}".encode())
    for b in blocks:
        h.update(b)
    return h.hexdigest()


def digest_tensor_bytes(dtype: str, shape: tuple[int, ...], data: memoryview | bytes,
                        block_bytes: int = BLOCK_BYTES) -> str:
    """The content digest of one tensor from its raw (little-endian, row-major) bytes."""
    view = memoryview(data).cast("B")
    blocks = [xxhash.xxh3_128_digest(view[i:i + block_bytes]) for i in range(0, len(view), block_bytes)]
    return _tensor_digest(dtype, shape, blocks)


def digest_tensor(t: torch.Tensor, block_bytes: int = BLOCK_BYTES) -> str:
    """The content digest of an in-memory tensor (the same as of its bytes in a safetensors file)."""
    import torch

    from nestprune.io.weights import DTYPE_NAMES

    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return digest_tensor_bytes(DTYPE_NAMES[t.dtype], tuple(t.shape), raw.data, block_bytes)


def content_sha256(tensors: Mapping[str, TensorDigest]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\t{t.dtype}\t{list(t.shape)}\t{t.digest}\n".encode())
    return h.hexdigest()


def block_count(nbytes: int, block_bytes: int) -> int:
    return max(1, -(-nbytes // block_bytes))  # an empty tensor has one (empty) block


def hash_spans(spans: list[TensorSpan], block_bytes: int = BLOCK_BYTES, threads: int = READ_THREADS,
               into: Mapping[str, list[bytes | None]] | None = None) -> dict[str, list[bytes]]:
    """The block digests of every tensor in ``spans`` (every byte read), hashed straight from mapped views of the
    page cache (no copy into buffers), one block per job on ``threads`` threads — XXH3 releases the GIL — with
    the blocks ahead asked of the disk while the current ones are hashed (a cold file is read in parallel).
    With ``into``, blocks already there (not None) are not read again."""
    from nestprune.io.buffers import mapped
    from nestprune.io.parallel import run_jobs

    order = sorted(spans, key=lambda s: (str(s.file), s.start))  # sequential reads, file by file
    out: dict[str, list[bytes | None]] = {}
    with ExitStack() as stack:
        fds: dict[Path, int] = {}
        for s in order:
            if s.file not in fds:
                fd = os.open(s.file, os.O_RDONLY)
                stack.callback(os.close, fd)
                fds[s.file] = fd

        def block(s: TensorSpan, k: int) -> tuple[str, int, bytes]:
            n = min(block_bytes, s.nbytes - k * block_bytes)
            try:
                with mapped(fds[s.file], s.start + k * block_bytes, n, ahead=threads * block_bytes) as view:
                    return s.name, k, xxhash.xxh3_128_digest(view)
            except NestpruneError:
                raise NestpruneError(f"{s.file} ended early while reading tensor {s.name} (was it changed while "
                                     "being read?)") from None

        jobs = []
        for s in order:
            have = (into or {}).get(s.name)
            out[s.name] = list(have) if have is not None else [None] * block_count(s.nbytes, block_bytes)
            jobs += [partial(block, s, k) for k, d in enumerate(out[s.name]) if d is None]
        for name, k, digest in run_jobs(jobs, max(1, threads)):
            out[name][k] = digest
    return out  # type: ignore[return-value]


def content_fingerprint(model_dir: Path, block_bytes: int = BLOCK_BYTES, threads: int = READ_THREADS,
                        spans: Mapping[str, TensorSpan] | None = None) -> ContentFingerprint:
    """Hash every tensor of ``model_dir`` (every byte; see the module docstring)."""
    spans = dict(spans) if spans is not None else tensor_spans(model_dir)
    blocks = hash_spans(list(spans.values()), block_bytes, threads)
    tensors = {s.name: TensorDigest(dtype=s.dtype, shape=list(s.shape), digest=_tensor_digest(s.dtype, s.shape, blocks[s.name]))
               for s in spans.values()}
    tensors = dict(sorted(tensors.items()))
    return ContentFingerprint(block_bytes=block_bytes, sha256=content_sha256(tensors), tensors=tensors)


class ContentCheck:
    """A content check fed as the base is read anyway: whoever holds a tensor's bytes (the variant writer's jobs,
    each with one block of a tensor in hand) hands their block digests to ``add``; ``finish`` reads and hashes
    what nobody handed in (``rest``, e.g. the local files), compares every digest with the fingerprint and raises
    ``fail(names of the tensors that differ)``. The variant writer calls ``finish`` before it publishes anything,
    so a base that fails leaves nothing behind, as a check made before writing would — at the cost of one read
    of the base instead of two. Thread-safe: each (tensor, block) has one slot, written once."""

    def __init__(self, expected: ContentFingerprint, fail: Callable[[list[str]], NestpruneError],
                 rest: Callable[[list[str], Mapping[str, list[bytes | None]]], Mapping[str, list[bytes]]] | None = None,
                 blocks: Mapping[str, int] | None = None):
        self.expected, self.fail, self.rest = expected, fail, rest
        self.block_bytes = expected.block_bytes
        sizes = blocks or {n: block_count(math.prod(t.shape) * ITEMSIZE[t.dtype], self.block_bytes)
                           for n, t in expected.tensors.items()}
        self._blocks: dict[str, list[bytes | None]] = {n: [None] * k for n, k in sizes.items()}

    def wants(self, name: str) -> bool:
        """Whether digests of ``name`` are still missing."""
        return any(d is None for d in self._blocks.get(name, ()))

    def add(self, name: str, k: int, digest: bytes) -> None:
        self._blocks[name][k] = digest

    def finish(self) -> None:
        missing = [n for n in self._blocks if self.wants(n)]
        if missing and self.rest is not None:
            for name, got in self.rest(missing, self._blocks).items():
                self._blocks[name] = list(got)
        changed = [n for n, t in self.expected.tensors.items() if n in self._blocks and not self.wants(n)
                   and _tensor_digest(t.dtype, tuple(t.shape), self._blocks[n]) != t.digest]  # type: ignore[arg-type]
        if changed:
            raise self.fail(changed)


def local_check(model_dir: Path, expected: ContentFingerprint, spans: Mapping[str, TensorSpan]) -> ContentCheck:
    """A ``ContentCheck`` of a local base directory whose tensors (``spans``) have the fingerprint's names, dtypes
    and shapes (``compare_tensors``): every tensor must be seen; what the reader did not hand in is read here."""
    model_dir = Path(model_dir)

    def fail(changed: list[str]) -> NestpruneError:
        return NestpruneError(
            f"{model_dir} {NOT_THE_BASE}: {len(changed)} of {len(expected.tensors)} tensors hold other values "
            f"({_examples(changed)}); same shapes, other weights (a fine-tune, another checkpoint or a merged "
            "adapter?)")

    def rest(names: list[str], have: Mapping[str, list[bytes | None]]) -> Mapping[str, list[bytes]]:
        return hash_spans([spans[n] for n in names], expected.block_bytes, into=have)

    return ContentCheck(expected, fail, rest, {n: block_count(s.nbytes, expected.block_bytes) for n, s in spans.items()})


def fingerprint(model_dir: Path) -> BaseFingerprint:
    """Everything an artifact records about its base: config sha256, every file's sha256, the content."""
    model_dir = Path(model_dir)
    files = [FileDigest(name=f.name, size=f.stat().st_size, sha256=sha256_file(f)) for f in weight_files(model_dir)]
    return BaseFingerprint(path=str(model_dir), config_sha256=sha256_file(config_path(model_dir)), files=files,
                           content=content_fingerprint(model_dir, BLOCK_BYTES))  # (looked up now: tests shrink it)


# --- checks ------------------------------------------------------------------------------------------------

def _examples(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def compare_tensors(have: Mapping[str, tuple[str, tuple[int, ...]]], want: ContentFingerprint) -> str | None:
    """What differs between tensors (name -> (dtype, shape)) and a fingerprint's, in words; None if nothing."""
    missing = sorted(set(want.tensors) - set(have))
    extra = sorted(set(have) - set(want.tensors))
    if missing:
        return f"it lacks {len(missing)} tensor(s) of the artifact's base: {_examples(missing)}"
    if extra:
        return f"it has {len(extra)} tensor(s) the artifact's base has not: {_examples(extra)}"
    for name, t in want.tensors.items():
        dtype, shape = have[name]
        if dtype != t.dtype or list(shape) != t.shape:
            return f"tensor {name} is {dtype} {list(shape)} there, {t.dtype} {t.shape} in the artifact's base"
    return None


def begin_content_check(model_dir: Path, expected: ContentFingerprint,
                        spans: Mapping[str, TensorSpan] | None = None) -> ContentCheck:
    """The content check, names, dtypes and shapes done (cheap), the read of every byte still to come
    (``ContentCheck.finish``, or fed by a reader first)."""
    model_dir = Path(model_dir)
    spans = spans if spans is not None else tensor_spans(model_dir)
    why = compare_tensors({n: (s.dtype, s.shape) for n, s in spans.items()}, expected)
    if why:
        raise NestpruneError(f"{model_dir} {NOT_THE_BASE}: {why}")
    return local_check(model_dir, expected, spans)


def check_content(model_dir: Path, expected: ContentFingerprint, spans: Mapping[str, TensorSpan] | None = None) -> None:
    begin_content_check(model_dir, expected, spans).finish()


def check_fingerprint(model_dir: Path, expected: BaseFingerprint, full: bool = False) -> BaseCheck:
    """Check ``model_dir`` against a recorded fingerprint; returns what was compared.

    Always config.json's sha256; then with ``full`` every weight file's sha256 (names and sizes first), else
    the content fingerprint where the artifact has one, else (schema 1 artifacts) weight file names and sizes.
    """
    kind, pending = begin_check(model_dir, expected, full)
    if pending is not None:
        pending.finish()
    return kind


def begin_check(model_dir: Path, expected: BaseFingerprint, full: bool = False) -> tuple[BaseCheck, ContentCheck | None]:
    """``check_fingerprint`` with the content check (the read of every tensor byte) returned pending, for a reader
    of the base to feed as it reads (``ContentCheck``); None when the check is something else (done here)."""
    model_dir = Path(model_dir)
    if sha256_file(config_path(model_dir)) != expected.config_sha256:
        raise NestpruneError(f"{model_dir} {NOT_THE_BASE} (config.json differs)")
    if not full and expected.content is not None:
        return BaseCheck.CONTENT, begin_content_check(model_dir, expected.content)
    have = {f.name: f for f in weight_files(model_dir)}
    want = {f.name: f for f in expected.files}
    if set(have) != set(want):
        raise NestpruneError(
            f"{model_dir} {NOT_THE_BASE} (weight files differ: expected {', '.join(sorted(want))}, found "
            f"{', '.join(sorted(have))})"
        )
    for name, f in want.items():
        if have[name].stat().st_size != f.size:
            raise NestpruneError(f"{model_dir} {NOT_THE_BASE} ({name} differs in size)")
    if not full:
        return BaseCheck.SIZES, None
    for name, f in want.items():
        if sha256_file(have[name]) != f.sha256:
            raise NestpruneError(f"{model_dir} {NOT_THE_BASE} ({name} sha256 differs)")
    return BaseCheck.FILES, None


def check_base_arch(model_dir: Path, manifest: ArtifactManifest) -> None:
    """The cheap half of ``check_base``: the manifest's architecture against the base's config.json and tensor
    headers (``artifact.check_arch``); reads no tensor data."""
    from nestprune.artifact import check_arch

    spans = tensor_spans(model_dir)
    check_arch(manifest.arch, read_config(model_dir), {n: s.shape for n, s in spans.items()}, str(model_dir))


def check_base(model_dir: Path, manifest: ArtifactManifest, full: bool = False) -> BaseCheck:
    """Is ``model_dir`` the base ``manifest`` was built from? The manifest's architecture against the base's
    config.json and tensors (``check_base_arch``), then its fingerprint (``check_fingerprint``)."""
    check_base_arch(Path(model_dir), manifest)
    return check_fingerprint(Path(model_dir), manifest.base, full)


# --- sources -----------------------------------------------------------------------------------------------

class CheckedSource:
    """A ``TensorSource`` whose whole tensors are checked against a content fingerprint (a registry version: its
    sliced reads are checked by their chunk sha256, and only whole tensors can be compared with the base's
    digests). ``take`` of a whole tensor checks it at once; a writer that moves bytes with the source's own
    ``copy_jobs`` hands the whole tensors it wrote to ``content_check`` and calls its ``finish`` before it
    publishes (``nestprune.variant.hf``)."""

    def __init__(self, source: TensorSource, content: ContentFingerprint, where: str):
        self.source, self.content, self.where = source, content, where

        def fail(changed: list[str]) -> NestpruneError:
            return NestpruneError(f"{where}: tensor {changed[0]} does not hold what the artifact's base held (its "
                                  "content fingerprint differs); the registry copy is not of this base")

        self.content_check = ContentCheck(content, fail)  # no ``rest``: what was not seen whole is not compared
        if hasattr(source, "copy_jobs"):
            self.copy_jobs = source.copy_jobs  # type: ignore[attr-defined]
        if hasattr(source, "write_workers"):
            self.write_workers = source.write_workers  # type: ignore[attr-defined]

    def names(self) -> list[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(name)

    def take(self, name: str, axis: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        t = self.source.take(name, axis, index)
        if index is None and name in self.content.tensors:
            if digest_tensor(t, self.content.block_bytes) != self.content.tensors[name].digest:
                raise self.content_check.fail([name])
        return t


def check_source(source: TensorSource, manifest: ArtifactManifest, config: Mapping[str, Any],
                 where: str) -> TensorSource:
    """Check a tensor source (a registry version) against the artifact it is published with: tensor names,
    dtypes and shapes against the base's content fingerprint, the manifest's architecture against ``config``
    (the base's config.json). Returns the source to read from: whole tensors are checked as they are read."""
    from nestprune.artifact import check_arch
    from nestprune.io.weights import DTYPE_NAMES

    shapes = {n: tuple(source.shape(n)) for n in source.names()}
    check_arch(manifest.arch, config, shapes, where)
    content = manifest.base.content
    if content is None:
        return source
    why = compare_tensors({n: (DTYPE_NAMES[source.dtype(n)], s) for n, s in shapes.items()}, content)
    if why:
        raise NestpruneError(f"{where}: the stored weights are not the artifact's base: {why}")
    return CheckedSource(source, content, where)
