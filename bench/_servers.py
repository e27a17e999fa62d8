"""Run one registry test server in its own process (so it does not share the benchmark's interpreter):

    python bench/_servers.py s3 BUCKET      moto's S3 server on 127.0.0.1, with BUCKET created
    python bench/_servers.py http DIR       a Range-honouring static server of DIR on 127.0.0.1

Prints the URL on its first line, then serves until its standard input closes. ``serve(kind, arg)`` starts one
from a benchmark and yields the URL.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serve(kind: str, arg: str) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, __file__, kind, arg], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not url:
            raise SystemExit(f"the {kind} server did not start")
        yield url
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=30)


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from registry_servers import http_server, s3_server

    kind, arg = sys.argv[1], sys.argv[2]
    ctx = s3_server(arg) if kind == "s3" else http_server(Path(arg))
    with ctx as got:
        url = got if kind == "s3" else got[0]
        print(url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
