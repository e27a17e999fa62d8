"""Base-model fingerprints: what an artifact records about the model it ranked, and the checks against it.

Three levels, recorded at build and checked by ``materialize``, ``push`` and ``pull``:

config     sha256 of config.json (always checked).
content    (default check) every byte of every tensor, hashed fast: each tensor's bytes are cut into
           ``BLOCK_BYTES`` blocks hashed with XXH3-128 (several GB/s per core), and the tensor's digest is
           XXH3-128 over its dtype, shape and block hashes (``schemas.artifact.ContentFingerprint``). Any changed
           bit of any tensor changes its digest (up to a 2^-128 chance per tensor, for data nobody crafted to
           collide), so a fine-tune, a partial fine-tune, a merged adapter or a one-row edit of the same shapes
           is refused. Every byte is read: a sample of rows cannot see a one-row edit. The read also brings the
           base into the page cache, where materialize's own reads then find it (``bench/fingerprint_cost.py``
           measures the cost). The digest does not depend on how tensors are split into files.
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
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from enum import StrEnum
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
READ_THREADS = 4  # blocks read (pread releases the GIL) while others are hashed
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


def _blocks(spans: list[TensorSpan], block_bytes: int) -> Iterator[tuple[int, TensorSpan, int, int]]:
    for i, s in enumerate(spans):
        for off in range(0, s.nbytes, block_bytes):
            yield i, s, s.start + off, min(block_bytes, s.nbytes - off)


def content_fingerprint(model_dir: Path, block_bytes: int = BLOCK_BYTES, threads: int = READ_THREADS,
                        spans: Mapping[str, TensorSpan] | None = None) -> ContentFingerprint:
    """Hash every tensor of ``model_dir`` (every byte; see the module docstring)."""
    spans = dict(spans) if spans is not None else tensor_spans(model_dir)
    order = sorted(spans.values(), key=lambda s: (str(s.file), s.start))  # sequential reads, file by file
    with ExitStack() as stack:
        fds: dict[Path, int] = {}
        for s in order:
            if s.file not in fds:
                fd = os.open(s.file, os.O_RDONLY)
                stack.callback(os.close, fd)
                fds[s.file] = fd

        def block(job: tuple[int, TensorSpan, int, int]) -> tuple[int, bytes]:
            i, s, offset, n = job
            data = os.pread(fds[s.file], n, offset)
            if len(data) != n:
                raise NestpruneError(f"{s.file} ended early while reading tensor {s.name} (was it changed "
                                     "while being read?)")
            return i, xxhash.xxh3_128_digest(data)

        per_tensor: list[list[bytes]] = [[] for _ in order]
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for i, d in pool.map(block, _blocks(order, block_bytes)):
                per_tensor[i].append(d)
    tensors = {s.name: TensorDigest(dtype=s.dtype, shape=list(s.shape), digest=_tensor_digest(s.dtype, s.shape, b))
               for s, b in zip(order, per_tensor, strict=True)}
    tensors = dict(sorted(tensors.items()))
    return ContentFingerprint(block_bytes=block_bytes, sha256=content_sha256(tensors), tensors=tensors)


def fingerprint(model_dir: Path) -> BaseFingerprint:
    """Everything an artifact records about its base: config sha256, every file's sha256, the content."""
    model_dir = Path(model_dir)
    files = [FileDigest(name=f.name, size=f.stat().st_size, sha256=sha256_file(f)) for f in weight_files(model_dir)]
    return BaseFingerprint(path=str(model_dir), config_sha256=sha256_file(config_path(model_dir)), files=files,
                           content=content_fingerprint(model_dir))


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


def check_content(model_dir: Path, expected: ContentFingerprint, spans: Mapping[str, TensorSpan] | None = None) -> None:
    model_dir = Path(model_dir)
    spans = spans if spans is not None else tensor_spans(model_dir)
    shapes = {n: (s.dtype, s.shape) for n, s in spans.items()}
    why = compare_tensors(shapes, expected)
    if why:
        raise NestpruneError(f"{model_dir} {NOT_THE_BASE}: {why}")
    got = content_fingerprint(model_dir, expected.block_bytes, spans=spans)
    if got.sha256 != expected.sha256:
        changed = [n for n, t in expected.tensors.items() if got.tensors[n].digest != t.digest]
        raise NestpruneError(
            f"{model_dir} {NOT_THE_BASE}: {len(changed)} of {len(expected.tensors)} tensors hold other values "
            f"({_examples(changed)}); same shapes, other weights (a fine-tune, another checkpoint or a merged "
            "adapter?)")


def check_fingerprint(model_dir: Path, expected: BaseFingerprint, full: bool = False) -> BaseCheck:
    """Check ``model_dir`` against a recorded fingerprint; returns what was compared.

    Always config.json's sha256; then with ``full`` every weight file's sha256 (names and sizes first), else
    the content fingerprint where the artifact has one, else (schema 1 artifacts) weight file names and sizes.
    """
    model_dir = Path(model_dir)
    if sha256_file(config_path(model_dir)) != expected.config_sha256:
        raise NestpruneError(f"{model_dir} {NOT_THE_BASE} (config.json differs)")
    if not full and expected.content is not None:
        check_content(model_dir, expected.content)
        return BaseCheck.CONTENT
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
        return BaseCheck.SIZES
    for name, f in want.items():
        if sha256_file(have[name]) != f.sha256:
            raise NestpruneError(f"{model_dir} {NOT_THE_BASE} ({name} sha256 differs)")
    return BaseCheck.FILES


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
    """A ``TensorSource`` whose whole-tensor reads are checked against a content fingerprint as they stream
    (no extra read): what a registry pull uses, whose partial reads are checked by their chunk sha256."""

    def __init__(self, source: TensorSource, content: ContentFingerprint, where: str):
        self.source, self.content, self.where = source, content, where

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
                raise NestpruneError(f"{self.where}: tensor {name} does not hold what the artifact's base held "
                                     "(its content fingerprint differs); the registry copy is not of this base")
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
