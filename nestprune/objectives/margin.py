"""``--objective margin`` (decision tasks, GISP.md): mean CE of the correct choices − mean CE of the others.

One sequence per (item, choice) = prompt + " " + choice (the separator is dropped when the prompt ends
or the choice starts with whitespace, exactly as ``nestprune.evaluate`` and lm-eval join them; the
prompt may first go through a template such as the reference's "Question: {prompt}\nAnswer:"). CE on
the choice tokens only (prompt and pad labelled -100), per-sequence mean over those tokens. Objective =
mean CE over correct options − mean CE over incorrect options, so the accumulated gradient is
``mean_pos ∇ℓ − mean_neg ∇ℓ``. Each sequence carries its signed weight (+1/N_pos or −1/N_neg) in the
batch. Lengths, truncation and batching: ``nestprune.objectives.sequences``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nestprune.errors import NestpruneError
from nestprune.io.text import sha256_file
from nestprune.objectives import MarginConfig
from nestprune.objectives.items import ChoiceItem, encode_pairs, join_choice, read_choice_items
from nestprune.objectives.sequences import (
    DEFAULT_PERCENTILE,
    LabelledSequences,
    pad_token_id,
    prepare_groups,
    select_items,
)

REFERENCE_PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"  # GISP's reference format for margin prompts


class MarginObjective:
    """E_correct[CE(answer tokens)] − E_incorrect[CE(answer tokens)] over multiple-choice items."""

    name = "margin"

    def __init__(
        self,
        items: Sequence[ChoiceItem],
        tokenizer,
        *,
        samples: int | None = None,
        seq_len: int | None = None,
        seed: int = 0,
        prompt_template: str = "{prompt}",
        separator: str = " ",
        percentile: float = DEFAULT_PERCENTILE,
        max_tokens: int | None = None,
        batch_tokens: int | None = None,
        source: str = "",
        sha256: str = "",
    ):
        if not items:
            raise NestpruneError("the margin objective needs at least one item")
        chosen = [items[i] for i in select_items(len(items), samples, seed)]
        prompts = [_format_prompt(prompt_template, it.prompt) for it in chosen]
        encoded = iter(encode_pairs(tokenizer, [join_choice(p, c, separator)
                                                for p, it in zip(prompts, chosen, strict=True) for c in it.choices]))
        groups, labels = [], []
        for it in chosen:
            g = [next(encoded) for _ in it.choices]
            for c, (_, cont) in zip(it.choices, g, strict=True):
                if not cont:
                    raise NestpruneError(f"choice {c!r} of the item with prompt {it.prompt[:40]!r} tokenises to nothing")
            groups.append(g)
            labels.append(it.answer)
        kept, limit, truncated = prepare_groups(groups, tokenizer, seq_len=seq_len, percentile=percentile,
                                                max_tokens=max_tokens)
        sequences, positive = [], []
        for g, ans in zip(kept, labels, strict=False):
            for j, s in enumerate(g):
                sequences.append(s)
                positive.append(j == ans)
        n_pos, n_neg = sum(positive), len(positive) - sum(positive)
        if n_neg == 0:
            raise NestpruneError("the margin objective needs incorrect choices; every item has only one")
        weights = [1.0 / n_pos if pos else -1.0 / n_neg for pos in positive]
        self.data = LabelledSequences(sequences, weights, pad_token_id(tokenizer), limit, truncated, batch_tokens)
        self.batches, self.loss = self.data.batches, self.data.loss  # the objective is its sequences'
        self.positive = positive
        self.items_used = len(kept)
        self._prov = {
            "objective": "margin",
            "source": source,
            "sha256": sha256,
            "items_available": len(items),
            "items": len(kept),
            "sequences": len(sequences),
            "positives": n_pos,
            "negatives": n_neg,
            **self.data.provenance(percentile, seq_len),
            "prompt_template": prompt_template,
            "separator": separator,
            "max_tokens": max_tokens,
            "seed": seed,
        }

    @classmethod
    def from_jsonl(cls, path: Path, tokenizer, **kwargs) -> MarginObjective:
        path = Path(path)
        return cls(read_choice_items(path), tokenizer, source=str(path), sha256=sha256_file(path), **kwargs)

    def provenance(self) -> dict[str, Any]:
        return dict(self._prov)


def _format_prompt(template: str, prompt: str) -> str:
    try:
        return template.format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as e:
        raise NestpruneError(f"prompt template {template!r} is not valid: use {{prompt}} for the prompt ({e})") from None


def make_margin(cfg: MarginConfig, data_path: Path | None, tokenizer, seed: int) -> MarginObjective:
    """The margin objective a :class:`MarginConfig` describes, on a multiple-choice JSONL file."""
    if data_path is None:
        raise NestpruneError("objective 'margin' needs a data file: --data items.jsonl")
    return MarginObjective.from_jsonl(Path(data_path), tokenizer, samples=cfg.samples, seq_len=cfg.seq_len,
                                      seed=seed, prompt_template=cfg.prompt_template, separator=cfg.separator,
                                      percentile=cfg.percentile, max_tokens=cfg.max_tokens,
                                      batch_tokens=cfg.batch_tokens)
