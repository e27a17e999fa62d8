"""Where registry bytes live: a local directory, an S3-compatible bucket, or read-only HTTP(S).

A store is a flat key → bytes map: whole reads, byte-range reads, atomic whole-key writes, listing by prefix
(with sizes and modification times, for ``gc``) and deletes. Everything above (content addressing, versions,
tags, garbage collection) is built on those alone, so a new backend is one small class.

Network stores move bytes the way ``aws s3 cp`` / hf_transfer do: a pool of reused connections (``jobs``
wide), large writes as parallel multipart uploads, and every request retried with exponential backoff on
transient faults (HTTP 5xx and 429, connection resets, timeouts, short bodies). A retry can only ever
deliver bytes that the reader then checks against their sha256 (``RegistrySource``), so no retry path can
accept a wrong byte. Client libraries (chosen by measurement, bench/results/registry.md): botocore for S3
(a thread-safe client over a urllib3 pool, multipart uploads, the one library s3fs itself is built on) and
urllib3 for HTTP (connection reuse, thread-safe pools). Other fsspec URLs go through fsspec.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from nestprune.errors import NestpruneError
from nestprune.io import atomic
from nestprune.io.buffers import mapped

T = TypeVar("T")
DEFAULT_JOBS = 8  # concurrent transfers (``--jobs``)
PART_BYTES = 16 << 20  # ranged reads and multipart uploads move at most this much per request
ATTEMPTS = 5  # tries of one request on transient faults (backoff 0.25 s, 0.5 s, 1 s, 2 s, with jitter)


def default_registry_dir() -> Path:
    """``$NESTPRUNE_REGISTRY``, else ``~/.cache/nestprune/registry``."""
    return Path(os.environ.get("NESTPRUNE_REGISTRY") or "~/.cache/nestprune/registry").expanduser()


class KeyNotFound(NestpruneError):
    """A key the registry does not hold."""


class ShortBlob(Exception):
    """A blob shorter than a read asked for (the reader reports it as a failed chunk)."""


class Transient(Exception):
    """A fault worth retrying (5xx, reset, timeout, short body); ``retry`` gives up after ``ATTEMPTS``."""


def retry(what: str, fn: Callable[[], T], attempts: int = ATTEMPTS, base_delay: float = 0.25,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, tried again with exponential backoff and jitter while it raises ``Transient``."""
    for attempt in range(attempts):
        try:
            return fn()
        except Transient as e:
            if attempt == attempts - 1:
                raise NestpruneError(f"{what} failed after {attempts} attempts: {e}") from None
            sleep(base_delay * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class KeyInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch (last write)


class Store(Protocol):
    url: str
    read_only: bool

    def read(self, key: str) -> bytes: ...

    def read_range(self, key: str, start: int, end: int) -> bytes: ...

    def write(self, key: str, data: bytes | memoryview) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]: ...

    def list_info(self, prefix: str) -> list[KeyInfo]: ...

    def delete(self, key: str) -> None: ...


class LocalStore:
    """A directory. Writes are atomic per key (``atomic.write_file``: a temporary sibling renamed into place)."""

    read_only = False

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def check_root(self) -> None:
        """Refuse a registry directory that does not exist (listing it would look like an empty registry)."""
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise NestpruneError(f"registry {self.root} {what}")

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise KeyNotFound(f"{self.url}: no {key}") from None

    def read_range(self, key: str, start: int, end: int) -> bytes:
        buf = bytearray(max(0, end - start))
        return bytes(memoryview(buf)[: self.read_range_into(key, start, memoryview(buf))])

    def read_range_into(self, key: str, start: int, into: memoryview) -> int:
        """Read ``len(into)`` bytes of ``key`` from ``start`` straight into ``into``; returns how many there were
        (fewer only for a short blob, which the reader's sha256 check reports)."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyNotFound(f"{self.url}: no {key}") from None
        try:
            got = 0
            while got < len(into):
                n = os.preadv(fd, [into[got:]], start + got)
                if n == 0:
                    break
                got += n
            return got
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def mapped_range(self, key: str, start: int, length: int) -> Iterator[memoryview]:
        """A read-only view of ``length`` bytes of ``key`` from ``start``, mapped straight on the page cache (no
        copy) for the ``with`` block; a blob shorter than that is ``ShortBlob``."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyNotFound(f"{self.url}: no {key}") from None
        try:
            if os.fstat(fd).st_size < start + length:
                raise ShortBlob(key)
            with mapped(fd, start, length) as view:
                os.close(fd)  # the mapping holds the file
                fd = -1
                yield view
        finally:
            if fd >= 0:
                os.close(fd)

    def write(self, key: str, data: bytes | memoryview) -> None:
        atomic.write_file(self._path(key), data)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        return [i.key for i in self.list_info(prefix)]

    def list_info(self, prefix: str) -> list[KeyInfo]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        found = []
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.startswith("."):
                    continue
                path = os.path.join(dirpath, f)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                found.append(KeyInfo(Path(path).relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
        return sorted(found, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class FsspecStore:
    """Any other fsspec filesystem under a prefix (gs://, az:// … with their fsspec package). Writes are atomic
    per key where the filesystem's PUT is."""

    read_only = False

    def __init__(self, url: str, **storage_options: object):
        import fsspec

        self.url = url.rstrip("/")
        protocol, path = url.split("://", 1)
        try:
            self.fs = fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False, **storage_options)
        except (ImportError, ValueError) as e:
            raise NestpruneError(f"cannot open registry {url}: {e}") from None
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

    def write(self, key: str, data: bytes | memoryview) -> None:
        self._call("write", key, self.fs.pipe_file, self._path(key), bytes(data))

    def exists(self, key: str) -> bool:
        return bool(self._call("check", key, self.fs.exists, self._path(key)))

    def list(self, prefix: str) -> list[str]:
        return [i.key for i in self.list_info(prefix)]

    def list_info(self, prefix: str) -> list[KeyInfo]:
        base = self._path(prefix).rstrip("/")
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise NestpruneError(f"{self.url}: cannot list {prefix}: {e}") from None
        n = len(self.root) + 1
        out = []
        for p, info in found.items():
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            out.append(KeyInfo(p[n:], int(info.get("size") or 0), _seconds(mtime)))
        return sorted(out, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        try:
            self._call("delete", key, self.fs.rm_file, self._path(key))
        except KeyNotFound:
            pass


def _seconds(t: object) -> float:
    if hasattr(t, "timestamp"):
        return float(t.timestamp())  # type: ignore[attr-defined]
    try:
        return float(t)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


class S3Store:
    """An S3-compatible bucket under a prefix, through one thread-safe botocore client: a pool of ``2 × jobs``
    reused connections, botocore's standard retry mode (5xx, throttling, resets, timeouts, with backoff) and
    ours around streamed bodies; writes of more than ``PART_BYTES`` go up as a multipart upload of
    ``jobs`` parallel parts. A PUT (or a completed multipart upload) is atomic per key.

    The endpoint and credentials come from the usual AWS settings (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID`` …, or a profile).
    """

    read_only = False

    def __init__(self, url: str, jobs: int = DEFAULT_JOBS, part_bytes: int = PART_BYTES, **client_options: object):
        try:
            import botocore.config
            import botocore.session
        except ImportError:
            raise NestpruneError("s3:// registries need botocore: pip install 'nestprune[s3]'") from None
        self.url = url.rstrip("/")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise NestpruneError(f"{url} names no bucket: expected s3://bucket/prefix")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.jobs, self.part_bytes = max(1, jobs), part_bytes
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict[str, object] = {"endpoint_url": endpoint} if endpoint else {}
        options |= client_options
        config = botocore.config.Config(max_pool_connections=2 * self.jobs,
                                        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
                                        connect_timeout=20, read_timeout=60)
        self.client = botocore.session.get_session().create_client("s3", config=config, **options)
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        def once() -> T:
            try:
                return fn()
            except (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ConnectionError) as e:
                raise Transient(str(e)) from None
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise KeyNotFound(f"{self.url}: no {key}") from None
                if code == "NoSuchBucket":
                    raise NestpruneError(f"{self.url}: bucket {self.bucket} does not exist") from None
                if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise NestpruneError(f"{self.url}: access denied while trying to {what} {key} ({code})") from None
                if status >= 500 or status == 429:
                    raise Transient(f"HTTP {status} {code}") from None
                raise NestpruneError(f"{self.url}: cannot {what} {key}: {e}") from None
            except self._errors as e:
                raise NestpruneError(f"{self.url}: cannot {what} {key}: {e}") from None

        return retry(f"{self.url}: {what} {key}", once)

    def read(self, key: str) -> bytes:
        return self._call("read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""

        def get() -> bytes:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}")
            data = r["Body"].read()
            if len(data) != end - start and r.get("ContentLength") != len(data):
                raise Transient(f"short body ({len(data)} of {end - start} bytes)")
            return data

        return self._call("read", key, get)

    def write(self, key: str, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        if len(data) <= self.part_bytes:
            self._call("write", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key),
                                                                    Body=bytes(data)))
            return
        k = self._key(key)
        upload = self._call("write", key, lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=k))
        uid = upload["UploadId"]
        starts = range(0, len(data), self.part_bytes)

        def part(i: int) -> dict[str, object]:
            body = bytes(data[starts[i]: starts[i] + self.part_bytes])
            r = self._call("write", key, lambda: self.client.upload_part(
                Bucket=self.bucket, Key=k, UploadId=uid, PartNumber=i + 1, Body=body))
            return {"ETag": r["ETag"], "PartNumber": i + 1}

        try:
            futures = [self._parts().submit(part, i) for i in range(len(starts))]
            wait(futures)
            parts = [f.result() for f in futures]
            self._call("write", key, lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=k, UploadId=uid, MultipartUpload={"Parts": parts}))
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=uid)
            except Exception:  # best effort: the bucket's lifecycle rule or gc's grace covers the rest
                pass
            raise

    def _parts(self) -> ThreadPoolExecutor:
        """The store's pool for the parts of multipart uploads (shared by concurrent writes, so that a push
        uploading several blobs at once keeps at most ``jobs`` parts in flight)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="nestprune-s3-part")
            return self._pool

    def exists(self, key: str) -> bool:
        try:
            self._call("check", key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
            return True
        except KeyNotFound:
            return False

    def list(self, prefix: str) -> list[str]:
        return [i.key for i in self.list_info(prefix)]

    def list_info(self, prefix: str) -> list[KeyInfo]:
        full = self._key(prefix).rstrip("/") + "/"
        n = len(self.prefix) + 1 if self.prefix else 0
        out: list[KeyInfo] = []
        token: str | None = None
        while True:
            args = {"Bucket": self.bucket, "Prefix": full, **({"ContinuationToken": token} if token else {})}
            page = self._call("list", prefix, lambda args=args: self.client.list_objects_v2(**args))
            for o in page.get("Contents", []):
                out.append(KeyInfo(o["Key"][n:], int(o["Size"]), o["LastModified"].timestamp()))
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        return sorted(out, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))


class HttpStore:
    """Read-only HTTP(S) (a static server or a CDN): GET, and GET with ``Range: bytes=a-b``, over a urllib3 pool
    of ``2 × jobs`` kept-alive connections; 5xx, 429, resets, timeouts and short bodies are retried.

    It cannot list, so ``nestprune list`` reads the registry's ``index.json``.
    """

    read_only = True

    def __init__(self, url: str, timeout: float = 60.0, jobs: int = DEFAULT_JOBS):
        import urllib3

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.pool = urllib3.PoolManager(maxsize=2 * max(1, jobs), block=False, retries=False,
                                        timeout=urllib3.Timeout(connect=min(20.0, timeout), read=timeout))

    def _get(self, key: str, headers: dict[str, str]) -> tuple[int, bytes]:
        import urllib3

        def once() -> tuple[int, bytes]:
            try:
                r = self.pool.request("GET", f"{self.url}/{urllib.parse.quote(key)}", headers=headers,
                                      preload_content=False)
                try:
                    data = r.read()
                    expected = r.headers.get("Content-Length")
                    status = r.status
                finally:
                    r.release_conn()
            except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError,
                    urllib3.exceptions.NewConnectionError, urllib3.exceptions.IncompleteRead) as e:
                raise Transient(str(e)) from None
            except urllib3.exceptions.HTTPError as e:
                raise NestpruneError(f"{self.url}: cannot reach the registry ({e})") from None
            if status in (403, 404):
                raise KeyNotFound(f"{self.url}: no {key} (HTTP {status})")
            if status >= 500 or status == 429:
                raise Transient(f"HTTP {status}")
            if status >= 400:
                raise NestpruneError(f"{self.url}: GET {key} failed with HTTP {status}")
            if expected is not None and expected.isdigit() and int(expected) != len(data):
                raise Transient(f"short body ({len(data)} of {expected} bytes)")
            return status, data

        return retry(f"{self.url}: GET {key}", once)

    def read(self, key: str) -> bytes:
        return self._get(key, {})[1]

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        status, data = self._get(key, {"Range": f"bytes={start}-{end - 1}"})
        if status == 200:  # the server ignored Range: correct, but it sent the whole blob
            return data[start:end]
        return data

    def _read_only(self, *args: object) -> None:
        raise NestpruneError(f"{self.url} is an HTTP registry, which is read-only; push to its backing store")

    write = delete = _read_only

    def exists(self, key: str) -> bool:
        try:
            self._get(key, {"Range": "bytes=0-0"})
            return True
        except KeyNotFound:
            return False

    def list(self, prefix: str) -> list[str]:
        raise NestpruneError(f"{self.url} is an HTTP registry, which cannot list keys")

    def list_info(self, prefix: str) -> list[KeyInfo]:
        raise NestpruneError(f"{self.url} is an HTTP registry, which cannot list keys")


def open_store(location: str | Path | None = None, jobs: int = DEFAULT_JOBS, **options: object) -> Store:
    """A store for a registry location: a path (default ``~/.cache/nestprune/registry``), s3://, http(s)://,
    or another fsspec URL. ``jobs``: concurrent transfers of a network store."""
    if location is None or str(location) == "":
        return LocalStore(default_registry_dir())
    loc = str(location)
    if loc.startswith(("http://", "https://")):
        return HttpStore(loc, jobs=jobs)
    if loc.startswith("s3://"):
        return S3Store(loc, jobs=jobs, **options)
    if "://" in loc:
        if loc.startswith("file://"):
            return LocalStore(loc[len("file://") :])
        return FsspecStore(loc, **options)
    return LocalStore(loc)
