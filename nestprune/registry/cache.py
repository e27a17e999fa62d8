"""A local content-addressed cache of verified chunks and blobs: a second pull never reads a byte twice.

Keys are sha256 digests, so entries are shared by every version, name and registry that holds the
same bytes, and an entry is checked against its key on every read (a damaged entry is dropped and
fetched again). Writes are atomic (``atomic.write_file``), so concurrent pulls can share a cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nestprune.io import atomic


def default_cache_dir() -> Path:
    """``$NESTPRUNE_CACHE``, else ``~/.cache/nestprune/chunks``."""
    return Path(os.environ.get("NESTPRUNE_CACHE") or "~/.cache/nestprune/chunks").expanduser()


def sha256(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class ChunkCache:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

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
        return data

    def put(self, digest: str, data: bytes | memoryview) -> None:
        path = self._path(digest)
        if not path.exists():
            atomic.write_file(path, data)
