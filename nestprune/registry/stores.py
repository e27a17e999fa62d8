"""Where registry bytes live: a local directory, an S3-compatible bucket (fsspec/s3fs), or read-only HTTP(S).

A store is a flat key → bytes map with four verbs: whole reads, byte-range reads, atomic whole-key
writes, and listing by prefix. Everything above (content addressing, versions, tags) is built on
those alone, so a new backend is one small class.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Protocol

from nestprune.errors import NestpruneError
from nestprune.io import atomic


def default_registry_dir() -> Path:
    """``$NESTPRUNE_REGISTRY``, else ``~/.cache/nestprune/registry``."""
    return Path(os.environ.get("NESTPRUNE_REGISTRY") or "~/.cache/nestprune/registry").expanduser()


class KeyNotFound(NestpruneError):
    """A key the registry does not hold."""


class Store(Protocol):
    url: str
    read_only: bool

    def read(self, key: str) -> bytes: ...

    def read_range(self, key: str, start: int, end: int) -> bytes: ...

    def write(self, key: str, data: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]: ...


class LocalStore:
    """A directory. Writes are atomic per key (``atomic.write_file``: a temporary sibling renamed into place)."""

    read_only = False

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise KeyNotFound(f"{self.url}: no {key}") from None

    def read_range(self, key: str, start: int, end: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyNotFound(f"{self.url}: no {key}") from None

    def write(self, key: str, data: bytes) -> None:
        atomic.write_file(self._path(key), data)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")
        )


class FsspecStore:
    """An fsspec filesystem under a prefix (S3 through s3fs; any fsspec URL works). PUTs are atomic per key.

    The endpoint and credentials come from the usual AWS settings (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID`` …) or from ``storage_options``.
    """

    read_only = False

    def __init__(self, url: str, **storage_options: object):
        import fsspec

        self.url = url.rstrip("/")
        protocol, path = url.split("://", 1)
        if protocol == "s3":
            try:
                import s3fs  # noqa: F401
            except ImportError:
                raise NestpruneError("s3:// registries need s3fs: pip install 'nestprune[s3]'") from None
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint and "endpoint_url" not in storage_options:
                storage_options = {**storage_options, "endpoint_url": endpoint}
        self.fs = fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False, **storage_options)
        self.root = path.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _call(self, what: str, key: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise KeyNotFound(f"{self.url}: no {key}") from None
        except PermissionError as e:
            raise NestpruneError(f"{self.url}: access denied while trying to {what} {key} ({e})") from None
        except OSError as e:
            raise NestpruneError(f"{self.url}: cannot {what} {key}: {e}") from None

    def read(self, key: str) -> bytes:
        return self._call("read", key, self.fs.cat_file, self._path(key))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self._call("read", key, lambda: self.fs.cat_file(self._path(key), start=start, end=end))

    def write(self, key: str, data: bytes) -> None:
        self._call("write", key, self.fs.pipe_file, self._path(key), data)

    def exists(self, key: str) -> bool:
        return bool(self._call("check", key, self.fs.exists, self._path(key)))

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix).rstrip("/")
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise NestpruneError(f"{self.url}: cannot list {prefix}: {e}") from None
        n = len(self.root) + 1
        return sorted(p[n:] for p in found)


class HttpStore:
    """Read-only HTTP(S) (a static server or a CDN): GET, and GET with ``Range: bytes=a-b``.

    It cannot list, so ``nestprune list`` reads the registry's ``index.json``.
    """

    read_only = True

    def __init__(self, url: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, key: str, headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(f"{self.url}/{urllib.parse.quote(key)}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            if e.code in (403, 404):
                raise KeyNotFound(f"{self.url}: no {key} (HTTP {e.code})") from None
            raise NestpruneError(f"{self.url}: GET {key} failed with HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise NestpruneError(f"{self.url}: cannot reach the registry ({reason})") from None

    def read(self, key: str) -> bytes:
        return self._get(key, {})[1]

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        status, data = self._get(key, {"Range": f"bytes={start}-{end - 1}"})
        if status == 200:  # the server ignored Range: correct, but it sent the whole blob
            return data[start:end]
        return data

    def write(self, key: str, data: bytes) -> None:
        raise NestpruneError(f"{self.url} is an HTTP registry, which is read-only; push to its backing store")

    def exists(self, key: str) -> bool:
        try:
            self._get(key, {"Range": "bytes=0-0"})
            return True
        except KeyNotFound:
            return False

    def list(self, prefix: str) -> list[str]:
        raise NestpruneError(f"{self.url} is an HTTP registry, which cannot list keys")


def open_store(location: str | Path | None = None, **storage_options: object) -> Store:
    """A store for a registry location: a path (default ``~/.cache/nestprune/registry``), s3://, http(s)://."""
    if location is None or str(location) == "":
        return LocalStore(default_registry_dir())
    loc = str(location)
    if loc.startswith(("http://", "https://")):
        return HttpStore(loc)
    if "://" in loc:
        if loc.startswith("file://"):
            return LocalStore(loc[len("file://") :])
        return FsspecStore(loc, **storage_options)
    return LocalStore(loc)
