"""Calibration text → seeded token windows, with provenance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nestprune.errors import NestpruneError
from nestprune.io.text import read_documents, sha256_file


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


def tokenize_documents(docs: list[str], tokenizer) -> torch.Tensor:
    """Concatenate documents into one token stream, an EOS token between documents."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    for piece in enc:
        ids.extend(piece)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from a token stream (seeded, with replacement)."""
    if n < 1 or seq_len < 2:
        raise NestpruneError(f"need at least 1 window of at least 2 tokens, got {n} x {seq_len}")
    if len(stream) < seq_len:
        raise NestpruneError(
            f"calibration data has {len(stream)} tokens, fewer than one window of {seq_len}; "
            "give more text or a shorter --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (n,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def load_calibration(path: Path, tokenizer, n: int, seq_len: int, seed: int = 0) -> CalibrationSet:
    path = Path(path)
    docs = read_documents(path)
    if not docs:
        raise NestpruneError(f"data file {path} holds no text")
    stream = tokenize_documents(docs, tokenizer)
    windows = sample_windows(stream, n, seq_len, seed)
    return CalibrationSet(windows=windows, source=str(path), sha256=sha256_file(path), seed=seed,
                          documents=len(docs), tokens_available=len(stream))
