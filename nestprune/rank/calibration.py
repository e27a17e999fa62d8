"""Calibration text → seeded token windows, with provenance, streamed.

The windows are defined on one token stream: every document's tokens followed by EOS, documents in file
order; ``n`` window starts are drawn uniformly from ``[0, len(stream) - seq_len]`` by a generator seeded
with ``seed`` (with replacement). Drawing them needs only the stream's length, so :func:`load_calibration`
never holds the stream: a first pass tokenises the documents a batch at a time and keeps only their token
counts; a second pass tokenises again only the documents the windows touch, and keeps of each only the
span the windows cover. Memory: a few bytes per document plus the covered tokens, instead of the whole corpus as Python ints (3.3 GB on the
9.7M-token shared corpus before). The windows are the same as those of :func:`sample_windows` on
:func:`tokenize_documents` (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nestprune.errors import NestpruneError
from nestprune.io.text import iter_documents, sha256_file

# documents tokenised at once: up to this many, and up to this many characters (the tokenizer's output for a
# batch — ids as Python ints and its per-token encodings — takes ~100-200 bytes a token while it lives)
DOCS_PER_BATCH = 256
CHARS_PER_BATCH = 1 << 18


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows for calibration, plus where they came from."""

    windows: torch.Tensor  # (n, seq_len) int64
    source: str
    sha256: str
    seed: int
    documents: int
    tokens_available: int

    @property
    def tokens_used(self) -> int:
        return int(self.windows.numel())


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """Consecutive documents, at most DOCS_PER_BATCH of them and (past the first) CHARS_PER_BATCH characters."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        if batch and (len(batch) >= DOCS_PER_BATCH or chars + len(doc) > CHARS_PER_BATCH):
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc)
    if batch:
        yield batch


def _encode(docs: list[str], tokenizer) -> list[list[int]]:
    return tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []


def tokenize_documents(docs: Iterable[str], tokenizer) -> torch.Tensor:
    """Concatenate documents into one token stream, an EOS token between documents."""
    eos = tokenizer.eos_token_id
    parts: list[np.ndarray] = []
    for batch in _batches(docs):
        for piece in _encode(batch, tokenizer):
            parts.append(np.asarray(piece + ([eos] if eos is not None else []), dtype=np.int64))
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)


def draw_starts(length: int, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """The ``n`` window starts of a stream of ``length`` tokens (seeded, with replacement). (n,) int64"""
    if n < 1 or seq_len < 2:
        raise NestpruneError(f"need at least 1 window of at least 2 tokens, got {n} x {seq_len}")
    if length < seq_len:
        raise NestpruneError(
            f"calibration data has {length} tokens, fewer than one window of {seq_len}; "
            "give more text or a shorter --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, length - seq_len + 1, (n,), generator=g)


def sample_windows(stream: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from a token stream (seeded, with replacement)."""
    starts = draw_starts(len(stream), n, seq_len, seed)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def stream_windows(docs: Callable[[], Iterable[str]], tokenizer, n: int, seq_len: int, seed: int) -> tuple[torch.Tensor, int, int]:
    """The windows of :func:`sample_windows` over :func:`tokenize_documents` of ``docs()`` without the stream.
    ``docs`` is called twice and must give the same documents. Returns (windows, documents, stream tokens)."""
    eos = tokenizer.eos_token_id
    extra = 0 if eos is None else 1
    lengths: list[int] = []
    for batch in _batches(docs()):  # pass 1: token counts only
        lengths.extend(len(piece) + extra for piece in _encode(batch, tokenizer))
    if not lengths:
        raise NestpruneError("the calibration data holds no text")
    sizes = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(sizes)  # stream offset just past each document
    total = int(ends[-1])
    starts = draw_starts(total, n, seq_len, seed).numpy()
    first = np.searchsorted(ends, starts, side="right")  # document holding each window's first token
    last = np.searchsorted(ends, starts + seq_len - 1, side="right")  # ... and its last
    doc_start = ends - sizes
    lo = np.full(len(sizes), np.iinfo(np.int64).max)  # the span of each document that windows cover
    hi = np.full(len(sizes), -1)
    for s, a, b in zip(starts.tolist(), first.tolist(), last.tolist(), strict=True):
        for i in range(a, b + 1):
            lo[i] = min(lo[i], max(s, doc_start[i]) - doc_start[i])
            hi[i] = max(hi[i], min(s + seq_len, ends[i]) - doc_start[i])
    spans: dict[int, np.ndarray] = {}  # document -> its covered tokens, lo[i]:hi[i]
    index = iter(range(len(sizes)))
    for batch in _batches(docs()):  # pass 2: only the documents the windows touch
        keep = [(i, d) for i, d in ((next(index), d) for d in batch) if hi[i] >= 0]
        for (i, _), piece in zip(keep, _encode([d for _, d in keep], tokenizer), strict=True):
            if len(piece) + extra != sizes[i]:
                raise NestpruneError("the calibration data changed while it was read")
            full = piece + ([eos] if extra else [])
            spans[i] = np.asarray(full[lo[i] : hi[i]], dtype=np.int64)
    if len(spans) != int((hi >= 0).sum()):
        raise NestpruneError("the calibration data changed while it was read")
    windows = np.empty((n, seq_len), dtype=np.int64)
    for w, (s, a, b) in enumerate(zip(starts.tolist(), first.tolist(), last.tolist(), strict=True)):
        pos = 0
        for i in range(a, b + 1):
            x, y = max(s, doc_start[i]) - doc_start[i], min(s + seq_len, ends[i]) - doc_start[i]
            windows[w, pos : pos + y - x] = spans[i][x - lo[i] : y - lo[i]]
            pos += y - x
    return torch.from_numpy(windows), len(sizes), total


def load_calibration(path: Path, tokenizer, n: int, seq_len: int, seed: int = 0) -> CalibrationSet:
    path = Path(path)
    try:
        windows, documents, total = stream_windows(lambda: iter_documents(path), tokenizer, n, seq_len, seed)
    except NestpruneError as e:
        if "holds no text" in str(e):
            raise NestpruneError(f"data file {path} holds no text") from None
        raise
    return CalibrationSet(windows=windows, source=str(path), sha256=sha256_file(path), seed=seed,
                          documents=documents, tokens_available=total)
