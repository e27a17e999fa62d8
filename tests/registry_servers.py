"""Real servers for the registry tests, on 127.0.0.1 only: moto's S3 server and a Range-honouring HTTP server.

Both start in-process on an ephemeral port with only the dev extra installed (moto[server], botocore), so
``make test`` runs them on a fresh CI machine with no network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterator
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOOPBACK = "127.0.0.1"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Static files with single-range ``Range: bytes=a-b`` support (206), as a CDN serves them."""

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if rng is None or not path.is_file():
            f = self.send_head()
            if f:
                try:
                    data = f.read()
                    self.wfile.write(data)
                    self.server.count(len(data), ranged=False)  # type: ignore[attr-defined]
                finally:
                    f.close()
            return
        m = _RANGE.match(rng.strip())
        size = path.stat().st_size
        if not m or (not m.group(1) and not m.group(2)):
            self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            return
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:  # suffix range: the last N bytes
            start, end = max(0, size - int(m.group(2))), size - 1
        if start >= size or end < start:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        fault = self.server.next_fault()  # type: ignore[attr-defined]
        if fault == "503":
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE)
            return
        if fault == "reset":  # drop the connection without an answer
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "flip":  # a bit flipped in transit
            data = bytes([data[0] ^ 1]) + data[1:]
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if fault == "truncate":  # half the body, then the connection drops
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)
        self.server.count(len(data), ranged=True)  # type: ignore[attr-defined]


class CountingHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.ranged_requests = 0
        self.whole_requests = 0
        self.faults: list[str] = []  # injected into the next ranged requests, in order: 503, reset, truncate, flip

    def next_fault(self) -> str | None:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def count(self, n: int, ranged: bool) -> None:
        with self._lock:
            self.bytes_sent += n
            if ranged:
                self.ranged_requests += 1
            else:
                self.whole_requests += 1


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[tuple[str, CountingHTTPServer]]:
    """Serve ``directory`` read-only at http://127.0.0.1:<port>; yields (url, server)."""
    handler = partial(RangeRequestHandler, directory=str(directory))
    server = CountingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": LOOPBACK,
    "no_proxy": LOOPBACK,
}


@contextlib.contextmanager
def s3_server(bucket: str = "registry") -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with ``bucket`` created; sets AWS_ENDPOINT_URL and fake credentials
    for the duration (restored after). Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import botocore.session

        botocore.session.get_session().create_client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
