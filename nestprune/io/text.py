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
from collections.abc import Iterator
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


def iter_jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, record) per non-blank JSONL line, streamed; a malformed line is an error naming it."""
    path = Path(path)
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
                yield where, row
    except (UnicodeDecodeError, lzma.LZMAError, EOFError) as e:
        raise NestpruneError(f"cannot read {path}: {e}") from None


def read_jsonl_records(path: Path) -> list[tuple[str, dict]]:
    """(``file:line``, record) per non-blank JSONL line; a malformed line is an error naming it."""
    return list(iter_jsonl_records(path))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a malformed line is an error naming the line."""
    return [row for _, row in read_jsonl_records(path)]


def read_documents(path: Path) -> list[str]:
    """Documents of a text or JSONL file, in file order, empty ones dropped."""
    return list(iter_documents(path))


def iter_documents(path: Path) -> Iterator[str]:
    """The documents of :func:`read_documents`, streamed: the file is read in blocks and no more than one
    document (and one block) is held at a time. A text file is read twice (first to learn whether it uses
    the ``<|doc|>`` separator, which decides how it splits)."""
    path = Path(path)
    if _base_suffix(path) == ".jsonl":
        for i, (_, row) in enumerate(iter_jsonl_records(path), 1):
            if not isinstance(row.get("text"), str):
                raise NestpruneError(f"{path}: record {i} has no string field 'text'")
            if row["text"].strip():
                yield row["text"]
        return
    try:
        with open_text(path) as f:
            separated = any(line.strip() == DOC_SEPARATOR for line in f)
        with open_text(path) as f:
            pieces = _split_lines(f) if separated else _split_blank(f)
            for doc in pieces:
                if doc.strip():
                    yield doc.strip("\n")
    except (UnicodeDecodeError, lzma.LZMAError, EOFError) as e:
        raise NestpruneError(f"cannot read {path} as UTF-8 text: {e}") from None


def _split_lines(f) -> Iterator[str]:
    """Text between lines that hold only ``<|doc|>`` (``text.split("\\n")`` semantics: no trailing newline
    kept on the last line of a piece)."""
    cur: list[str] = []
    for line in f:
        body = line[:-1] if line.endswith("\n") else line
        if body.strip() == DOC_SEPARATOR:
            yield "\n".join(cur)
            cur = []
        else:
            cur.append(body)
    yield "\n".join(cur)  # text.split("\n") always has a last piece


def _split_blank(f, block: int = 1 << 20) -> Iterator[str]:
    """``text.split("\\n\\n")``, streamed: split each block joined to the unsplit tail of the previous one
    (left-to-right splitting resumes where it stopped, so the pieces are the same)."""
    tail = ""
    while chunk := f.read(block):
        parts = (tail + chunk).split("\n\n")
        tail = parts.pop()
        yield from parts
    yield tail
