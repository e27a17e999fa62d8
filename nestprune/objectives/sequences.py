"""Answer-only labelled sequences (pure list/tensor helpers shared by the margin and answer objectives).

Sequence length: the ``percentile`` (99th) of the tokenised lengths of the selected items, at most
``seq_len`` when one is given (e.g. the model's context); longer sequences lose prompt tokens from the
LEFT (a leading BOS is kept); the answer is never cut (an answer longer than the limit keeps one
prompt token and makes its sequence longer than the limit). Batches are formed by length (longest
first), padded on the right with an attention mask; labels hold the answer tokens only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nestprune.errors import NestpruneError
from nestprune.objectives.base import Batch, token_nll

DEFAULT_PERCENTILE = 99.0

def length_limit(lengths: Sequence[int], percentile: float = DEFAULT_PERCENTILE) -> int:
    """Nearest-rank percentile of ``lengths`` (the smallest length ≥ ``percentile``% of them)."""
    if not lengths:
        raise NestpruneError("no sequences to take a length percentile of")
    if not 0 < percentile <= 100:
        raise NestpruneError(f"percentile must be in (0, 100], got {percentile}")
    s = sorted(lengths)
    return s[max(0, math.ceil(percentile / 100 * len(s)) - 1)]


def truncate_left(prompt: list[int], answer: list[int], max_len: int, keep: int = 0) -> list[int]:
    """Drop prompt tokens from the left (after the first ``keep`` ones, e.g. a BOS) until
    prompt + answer fits ``max_len``. The answer is never cut and at least one prompt token stays
    (the first answer token is predicted from it)."""
    excess = len(prompt) + len(answer) - max_len
    if excess <= 0:
        return prompt
    keep = min(keep, len(prompt) - 1)
    room = max(1, len(prompt) - keep - excess)  # tokens kept after the protected head
    return prompt[:keep] + prompt[len(prompt) - room :]


def length_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches by length, longest first (ties in index order). A batch holds at
    most ``batch_size`` sequences and, when ``batch_tokens`` is given, at most that many padded tokens
    (a single longer sequence still gets its own batch)."""
    if batch_size < 1:
        raise NestpruneError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # longest first: the first sets the padded width
        if cur and (len(cur) >= batch_size or (batch_tokens and width * (len(cur) + 1) > batch_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def pad_right(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """(prompt ids, answer ids) pairs → input_ids, attention_mask, labels; labels hold the answer
    tokens only (prompt and padding are -100)."""
    width = max(len(p) + len(a) for p, a in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for r, (p, a) in enumerate(sequences):
        ids = p + a
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, : len(ids)] = 1
        labels[r, len(p) : len(ids)] = torch.tensor(a, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's PAD token, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@dataclass
class LabelledSequences:
    """Sequences with answer-only labels and one weight each; the loss is Σ weight · (mean answer CE).

    The weights carry the objective's normalisation, so the losses of all batches sum to the objective.
    """

    sequences: list[tuple[list[int], list[int]]]  # (prompt ids, answer ids) after truncation
    weights: list[float]
    pad_id: int
    seq_len: int  # the length limit applied
    truncated: int = 0  # sequences that lost prompt tokens
    batch_tokens: int | None = None
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(p) + len(a) for p, a in self.sequences]

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for idx in length_batches(self.lengths, batch_size, self.batch_tokens):
            batch = pad_right([self.sequences[i] for i in idx], self.pad_id)
            batch["weights"] = torch.tensor([self.weights[i] for i in idx], dtype=torch.float32)
            yield batch

    @staticmethod
    def loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        nll = token_nll(model, batch["input_ids"], batch["labels"], batch["attention_mask"])  # (B,)
        return (nll * batch["weights"].to(nll.device)).sum()

    @property
    def tokens_used(self) -> int:
        return sum(self.lengths)

    @property
    def answer_tokens(self) -> int:
        return sum(len(a) for _, a in self.sequences)

    def provenance(self, percentile: float, cap: int | None) -> dict[str, Any]:
        """What the sequences used: tokens, the length limit and its rule, truncation."""
        return {"tokens_used": self.tokens_used, "answer_tokens": self.answer_tokens, "seq_len": self.seq_len,
                "seq_len_rule": length_rule(percentile, cap), "truncated": self.truncated,
                "truncation": "left (prompt only)"}


def select_items(n_items: int, samples: int | None, seed: int) -> list[int]:
    """A seeded random subset of ``samples`` item indices (all of them, shuffled, when None)."""
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    if samples is not None:
        if samples < 1:
            raise NestpruneError(f"samples must be at least 1, got {samples}")
        order = order[:samples]
    return order


def prepare_groups(
    groups: list[list[tuple[list[int], list[int]]]],
    tokenizer,
    *,
    seq_len: int | None,
    percentile: float,
    max_tokens: int | None,
) -> tuple[list[list[tuple[list[int], list[int]]]], int, int]:
    """Length limit + left truncation + token budget over groups of sequences (one group per item;
    a group is kept or dropped whole). The limit is the ``percentile`` of the lengths, capped at
    ``seq_len`` when given; a leading BOS survives truncation. Returns (kept groups, length limit,
    truncated count)."""
    keep_head = [bos_head(tokenizer, g[0][0]) for g in groups]
    if seq_len is not None and seq_len < 2:
        raise NestpruneError(f"sequence length must be at least 2, got {seq_len}")
    from_data = length_limit([len(p) + len(a) for g in groups for p, a in g], percentile)
    seq_len = from_data if seq_len is None else min(seq_len, from_data)
    out, used, truncated = [], 0, 0
    for g, keep in zip(groups, keep_head, strict=True):
        new = [(truncate_left(p, a, seq_len, keep), a) for p, a in g]
        cost = sum(len(p) + len(a) for p, a in new)
        if max_tokens is not None and out and used + cost > max_tokens:
            break
        out.append(new)
        used += cost
        truncated += sum(len(q) < len(p) for (q, _), (p, _) in zip(new, g, strict=True))
    return out, seq_len, truncated


def length_rule(percentile: float, cap: int | None) -> str:
    return f"p{percentile:g} of lengths" + (f", at most {cap}" if cap is not None else "")


def bos_head(tokenizer, prompt_ids: list[int]) -> int:
    """1 if the prompt starts with BOS (a token truncation keeps), else 0."""
    bos = tokenizer.bos_token_id
    return 1 if bos is not None and prompt_ids and prompt_ids[0] == bos else 0
