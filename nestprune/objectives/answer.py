"""``--objective answer`` (generation tasks): CE on the response tokens of prompt/response pairs.

The mean over each sample's response tokens, then the mean over samples. The tokenizer's chat template
renders the prompt (and the response as the assistant turn) when the tokenizer has one, unless turned
off. Lengths, truncation and batching: ``nestprune.objectives.sequences``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nestprune.errors import NestpruneError
from nestprune.io.text import sha256_file
from nestprune.objectives import AnswerConfig
from nestprune.objectives.items import AnswerItem, encode_pairs, read_answer_items
from nestprune.objectives.sequences import (
    DEFAULT_PERCENTILE,
    LabelledSequences,
    pad_token_id,
    prepare_groups,
    select_items,
)


def render_chat(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """Prompt and response rendered with the tokenizer's chat template: (text up to and including the
    assistant header, the assistant turn that follows — response plus any end-of-turn markers)."""
    user = [{"role": "user", "content": prompt}]
    try:
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    except Exception as e:  # a Jinja template's own error: one line, and the way out
        raise NestpruneError(
            f"the tokenizer's chat template failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "turn it off with --no-chat-template"
        ) from None
    if isinstance(full, str) and isinstance(head, str) and full.startswith(head) and len(full) > len(head):
        return head, full[len(head) :]
    return head, response


class AnswerObjective:
    """Mean over samples of the mean CE over each sample's response tokens (prompt and pad -100)."""

    name = "answer"

    def __init__(
        self,
        items: Sequence[AnswerItem],
        tokenizer,
        *,
        samples: int | None = None,
        seq_len: int | None = None,
        seed: int = 0,
        chat_template: bool = True,
        separator: str = "",
        append_eos: bool = False,
        percentile: float = DEFAULT_PERCENTILE,
        max_tokens: int | None = None,
        batch_tokens: int | None = None,
        source: str = "",
        sha256: str = "",
    ):
        if not items:
            raise NestpruneError("the answer objective needs at least one item")
        chosen = [items[i] for i in select_items(len(items), samples, seed)]
        use_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        if use_template:
            texts = [render_chat(tokenizer, it.prompt, it.response) for it in chosen]
        else:
            texts = [(it.prompt, separator + it.response) for it in chosen]
        encoded = encode_pairs(tokenizer, texts)
        if append_eos and not use_template and tokenizer.eos_token_id is not None:
            encoded = [(p, a + [int(tokenizer.eos_token_id)]) for p, a in encoded]
        groups = []
        for it, (p, a) in zip(chosen, encoded, strict=True):
            if not a:
                raise NestpruneError(f"the response of the item with prompt {it.prompt[:40]!r} tokenises to nothing")
            groups.append([(p, a)])
        kept, limit, truncated = prepare_groups(groups, tokenizer, seq_len=seq_len, percentile=percentile,
                                                max_tokens=max_tokens)
        sequences = [g[0] for g in kept]
        weights = [1.0 / len(sequences)] * len(sequences)
        self.data = LabelledSequences(sequences, weights, pad_token_id(tokenizer), limit, truncated, batch_tokens)
        self.batches, self.loss = self.data.batches, self.data.loss  # the objective is its sequences'
        self.chat_template_applied = use_template
        self._prov = {
            "objective": "answer",
            "source": source,
            "sha256": sha256,
            "items_available": len(items),
            "items": len(sequences),
            **self.data.provenance(percentile, seq_len),
            "chat_template": use_template,
            "chat_template_requested": chat_template,
            "separator": None if use_template else separator,
            "append_eos": bool(append_eos and not use_template),
            "max_tokens": max_tokens,
            "seed": seed,
        }

    @classmethod
    def from_jsonl(cls, path: Path, tokenizer, **kwargs) -> AnswerObjective:
        path = Path(path)
        return cls(read_answer_items(path), tokenizer, source=str(path), sha256=sha256_file(path), **kwargs)

    def provenance(self) -> dict[str, Any]:
        return dict(self._prov)


def make_answer(cfg: AnswerConfig, data_path: Path | None, tokenizer, seed: int) -> AnswerObjective:
    """The answer objective an :class:`AnswerConfig` describes, on a prompt/response JSONL file."""
    if data_path is None:
        raise NestpruneError("objective 'answer' needs a data file: --data pairs.jsonl")
    return AnswerObjective.from_jsonl(Path(data_path), tokenizer, samples=cfg.samples, seq_len=cfg.seq_len,
                                      seed=seed, chat_template=cfg.chat_template, separator=cfg.separator,
                                      append_eos=cfg.append_eos, percentile=cfg.percentile,
                                      max_tokens=cfg.max_tokens, batch_tokens=cfg.batch_tokens)
