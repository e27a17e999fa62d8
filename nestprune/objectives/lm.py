"""``--objective lm`` (the default): causal-LM cross-entropy on random windows of calibration text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nestprune.errors import NestpruneError
from nestprune.objectives import LmConfig
from nestprune.objectives.base import Batch, token_nll
from nestprune.rank.calibration import CalibrationSet, load_calibration

LM_DEFAULT_SAMPLES = 2000  # the reference's calibration: 2000 windows of 256 tokens
LM_DEFAULT_SEQ_LEN = 256


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, windows: int) -> torch.Tensor:
    """The LM objective's part for one micro-batch: the sum of its windows' mean token losses / ``windows``
    (all windows of the step), so that the micro-batches' values and gradients add up to the objective's.
    (The memory planner runs this same function, ``memory.lm_step``.)"""
    return token_nll(model, input_ids, input_ids).sum() / windows


class LanguageModeling:
    """Causal-LM cross-entropy, every token labelled; the mean over windows of each window's mean loss."""

    name = "lm"

    def __init__(self, calib: CalibrationSet):
        self.calib = calib

    def batches(self, batch_size: int) -> Iterator[Batch]:
        w = self.calib.windows
        for i in range(0, len(w), batch_size):
            yield {"input_ids": w[i : i + batch_size]}

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return lm_loss(model, batch["input_ids"], len(self.calib.windows))

    def plan_shape(self) -> tuple[int, int]:
        """(sequences per step, tokens per sequence): what a memory plan of this objective needs."""
        return int(self.calib.windows.shape[0]), int(self.calib.windows.shape[1])

    def provenance(self) -> dict[str, Any]:
        c = self.calib
        return {
            "objective": "lm",
            "source": c.source,
            "sha256": c.sha256,
            "documents": c.documents,
            "tokens_available": c.tokens_available,
            "samples": int(c.windows.shape[0]),
            "seq_len": int(c.windows.shape[1]),
            "tokens_used": c.tokens_used,
            "seed": c.seed,
        }


def make_lm(cfg: LmConfig, data_path: Path | None, tokenizer, seed: int) -> LanguageModeling:
    """``cfg.samples`` windows (default 2000, or ``max_tokens // seq_len``) of ``cfg.seq_len`` tokens (256)."""
    if data_path is None:
        raise NestpruneError("--data is required: a .txt, .txt.xz or .jsonl calibration file")
    seq_len = cfg.seq_len or LM_DEFAULT_SEQ_LEN
    samples = cfg.samples
    if samples is None:
        samples = max(1, cfg.max_tokens // seq_len) if cfg.max_tokens else LM_DEFAULT_SAMPLES
    return LanguageModeling(load_calibration(Path(data_path), tokenizer, samples, seq_len, seed))
