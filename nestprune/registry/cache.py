"""A local content-addressed cache of verified chunks and blobs: a second pull never reads a byte twice.

Keys are sha256 digests, so entries are shared by every version, name and registry that holds the
same bytes, and an entry is checked against its key on every read (a damaged entry is dropped and
fetched again). Writes are atomic (``atomic.write_file``), so concurrent pulls can share a cache.

Size: the cache holds at most ``max_bytes`` (``$NESTPRUNE_CACHE_MAX``, e.g. ``20G``; default 64 GiB). A read
marks its entry used (its mtime), and ``trim`` — run after every pull and by ``nestprune cache prune`` —
removes the least recently used entries until the cache fits. A pull that finds an entry gone fetches it
again, so trimming while others pull is safe.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nestprune.errors import NestpruneError
from nestprune.io import atomic

DEFAULT_MAX_BYTES = 64 << 30
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'20G' / '512MiB' / '1.5T' / '1000000' → bytes (powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise NestpruneError(f"{text!r} is not a size (e.g. 20G, 512M, 1000000)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def default_cache_dir() -> Path:
    """``$NESTPRUNE_CACHE``, else ``~/.cache/nestprune/chunks``."""
    return Path(os.environ.get("NESTPRUNE_CACHE") or "~/.cache/nestprune/chunks").expanduser()


def default_max_bytes() -> int:
    env = os.environ.get("NESTPRUNE_CACHE_MAX")
    return parse_size(env) if env else DEFAULT_MAX_BYTES


def sha256(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TrimResult:
    removed: int  # entries deleted
    freed: int  # bytes deleted
    kept: int  # bytes left


class ChunkCache:
    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes

    def _path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest

    def get(self, digest: str) -> bytes | None:
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if sha256(data) != digest:
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # used now: the last to go when the cache is trimmed
        except OSError:
            pass
        return data

    def put(self, digest: str, data: bytes | memoryview) -> None:
        path = self._path(digest)
        if not path.exists():
            atomic.write_file(path, data)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every entry."""
        from nestprune.registry.stores import LocalStore

        return [(i.mtime, i.size, self.root / i.key) for i in LocalStore(self.root).list_info("sha256")]

    def trim(self, max_bytes: int | None = None) -> TrimResult:
        """Delete least recently used entries until the cache holds at most ``max_bytes`` (default: its cap)."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = freed = 0
        if total > cap:
            for _, size, path in sorted(entries, key=lambda e: (e[0], e[2].name)):
                if total - freed <= cap:
                    break
                path.unlink(missing_ok=True)
                removed += 1
                freed += size
        return TrimResult(removed=removed, freed=freed, kept=total - freed)
