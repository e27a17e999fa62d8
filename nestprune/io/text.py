"""Reading text and JSONL files (documents, records) and hashing files: the one place text comes in.

Accepted files: ``.txt``, ``.txt.xz`` (and ``.xz``/``.gz`` of either), ``.jsonl`` (``{"text": ...}``
per line). Documents are separated by a line holding only ``<|doc|>`` (the bundled corpus format) or,
when no such line exists, by blank lines.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
from pathlib import Path

from nestprune.errors import NestpruneError

DOC_SEPARATOR = "<|doc|>"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_text(path: Path):
    path = Path(path)
    if not path.exists():
        raise NestpruneError(f"data file {path} does not exist")
    if path.is_dir():
        raise NestpruneError(f"data path {path} is a directory; give a .txt, .txt.xz or .jsonl file")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _base_suffix(path: Path) -> str:
    suffixes = [s for s in Path(path).suffixes if s not in (".xz", ".gz")]
    return suffixes[-1] if suffixes else ""


def read_jsonl_records(path: Path) -> list[tuple[str, dict]]:
    """(``file:line``, record) per non-blank JSONL line; a malformed line is an error naming it."""
    path = Path(path)
    rows = []
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise NestpruneError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise NestpruneError(f"{where}: expected a JSON object, got {type(row).__name__}")
                rows.append((where, row))
    except (UnicodeDecodeError, lzma.LZMAError, EOFError) as e:
        raise NestpruneError(f"cannot read {path}: {e}") from None
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a malformed line is an error naming the line."""
    return [row for _, row in read_jsonl_records(path)]


def read_documents(path: Path) -> list[str]:
    """Documents of a text or JSONL file, in file order, empty ones dropped."""
    path = Path(path)
    if _base_suffix(path) == ".jsonl":
        docs = []
        for i, row in enumerate(read_jsonl(path), 1):
            if not isinstance(row.get("text"), str):
                raise NestpruneError(f"{path}: record {i} has no string field 'text'")
            docs.append(row["text"])
        return [d for d in docs if d.strip()]
    try:
        with open_text(path) as f:
            text = f.read()
    except (UnicodeDecodeError, lzma.LZMAError, EOFError) as e:
        raise NestpruneError(f"cannot read {path} as UTF-8 text: {e}") from None
    lines = text.split("\n")
    if any(line.strip() == DOC_SEPARATOR for line in lines):
        docs, cur = [], []
        for line in lines:
            if line.strip() == DOC_SEPARATOR:
                docs.append("\n".join(cur))
                cur = []
            else:
                cur.append(line)
        docs.append("\n".join(cur))
    else:
        docs = [d for d in text.split("\n\n")]
    return [d.strip("\n") for d in docs if d.strip()]
