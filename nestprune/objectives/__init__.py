"""Task-aligned objectives (margin, answer-only) and the ``module:callable`` plug-in.

Every objective here satisfies :class:`nestprune.objective.Objective`: ``loss(model, batch)`` summed
over ``batches(batch_size)`` is the whole objective, so ``build`` only has to call ``.backward()``.

- ``margin`` (decision tasks, GISP.md): one sequence per (item, choice) = prompt + " " + choice
  (the separator is dropped when the prompt ends or the choice starts with whitespace, exactly as
  ``nestprune.evaluate`` and lm-eval join them; the prompt may first go through a template such as the
  reference's "Question: {prompt}\nAnswer:"). CE on the choice tokens only (prompt and pad labelled -100), per-sequence mean over those tokens.
  Objective = mean CE over correct options − mean CE over incorrect options, so the accumulated
  gradient is ``mean_pos ∇ℓ − mean_neg ∇ℓ``. Each sequence carries its signed weight
  (+1/N_pos or −1/N_neg) in the batch.
- ``answer`` (generation tasks): prompt/response pairs; CE on the response tokens only, the mean over
  each sample's response tokens, then the mean over samples. The tokenizer's chat template renders the
  prompt (and the response as the assistant turn) when the tokenizer has one, unless turned off.
- Plug-in: ``load_objective("pkg.module:fn", tokenizer, data_path, options)`` or
  ``load_objective("path/to/file.py:fn", ...)``; ``fn(tokenizer, data_path, options)`` returns any
  object with ``name``, ``batches``, ``loss`` and ``provenance`` (the Objective protocol). E.g.::

      # my_objectives.py — nestprune build MODEL --objective-fn my_objectives.py:make --data items.jsonl
      def make(tokenizer, data_path, options):
          return MarginObjective.from_jsonl(data_path, tokenizer, prompt_template="Q: {prompt}\nA:")

  Library users may instead pass any Objective instance to ``build_artifact(objective=...)``.

Tokens: the continuation's tokens are those that follow the prompt's in the encoding of the whole
text, no special tokens added (as ``nestprune.evaluate`` scores and generates), so calibration sees
what evaluation sees.

Sequence length: the ``percentile`` (99th) of the tokenised lengths of the selected items, at most
``seq_len`` when one is given (e.g. the model's context); longer sequences lose prompt tokens from the
LEFT (a leading BOS is kept); the answer is never cut (an answer longer than the limit keeps one
prompt token and makes its sequence longer than the limit).
Batches are formed by length (longest first), padded on the right with an attention mask.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import random
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nestprune.errors import NestpruneError
from nestprune.io.text import read_jsonl_records, sha256_file
from nestprune.objectives.base import Batch, LanguageModeling, Objective, token_nll
from nestprune.rank.calibration import load_calibration

REFERENCE_PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"  # GISP's reference format for margin prompts
DEFAULT_PERCENTILE = 99.0
LM_DEFAULT_SAMPLES = 2000  # the reference's calibration: 2000 windows of 256 tokens
LM_DEFAULT_SEQ_LEN = 256

PROMPT_KEYS = ("prompt", "question", "query", "ctx", "context", "instruction", "input")
CHOICE_KEYS = ("choices", "options", "endings")
ANSWER_INDEX_KEYS = ("answer", "label", "gold")
RESPONSE_KEYS = ("response", "answer", "completion", "output", "target")


# ---------------------------------------------------------------------------------------------------
# Items


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: the prompt, its options, the index of the correct one."""

    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class AnswerItem:
    """One prompt/response pair for answer-only calibration."""

    prompt: str
    response: str


def _first(row: Mapping, keys: Sequence[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in row:
            return k, row[k]
    return None, None


def _answer_index(value: Any, choices: Sequence[str]) -> int | None:
    """An answer given as an index, a digit string, a letter A.. or the text of one choice."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        v = value.strip()
        if v in choices:
            return list(choices).index(v)
        if v.lstrip("-").isdigit():
            return int(v)
        if len(v) == 1 and "A" <= v <= "Z":
            return ord(v) - ord("A")
    return None


def parse_choice_item(row: Mapping, where: str) -> ChoiceItem:
    """A multiple-choice record: ``prompt``, ``choices``, ``answer`` (index), or the lm-eval-ish
    aliases question/query/ctx, options/endings, label/gold. ``where`` names the record in errors."""
    _, prompt = _first(row, PROMPT_KEYS)
    if not isinstance(prompt, str):
        raise NestpruneError(f"{where}: needs a string field 'prompt' (or one of {', '.join(PROMPT_KEYS[1:])})")
    _, choices = _first(row, CHOICE_KEYS)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise NestpruneError(f"{where}: needs a field 'choices' holding a list of at least 2 strings")
    if any(not c.strip() for c in choices):
        raise NestpruneError(f"{where}: a choice is empty")
    _, value = _first(row, ANSWER_INDEX_KEYS)
    answer = _answer_index(value, choices)
    if answer is None or not 0 <= answer < len(choices):
        raise NestpruneError(
            f"{where}: 'answer' must be the index of the correct choice (0..{len(choices) - 1}), got {value!r}"
        )
    return ChoiceItem(prompt=prompt, choices=tuple(choices), answer=answer)


def parse_answer_item(row: Mapping, where: str) -> AnswerItem:
    """A prompt/response record: ``prompt`` and ``response`` (aliases question/instruction/input and
    answer/completion/output/target)."""
    _, prompt = _first(row, PROMPT_KEYS)
    if not isinstance(prompt, str):
        raise NestpruneError(f"{where}: needs a string field 'prompt' (or one of {', '.join(PROMPT_KEYS[1:])})")
    _, response = _first(row, RESPONSE_KEYS)
    if isinstance(response, int | float) and not isinstance(response, bool):
        response = str(response)  # {"question": ..., "answer": 18}
    if not isinstance(response, str) or not response.strip():
        raise NestpruneError(f"{where}: needs a non-empty string field 'response' (or answer/completion/output)")
    return AnswerItem(prompt=prompt, response=response)


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """(``file:line``, record) per non-blank JSONL line; no record at all is an error."""
    rows = read_jsonl_records(Path(path))
    if not rows:
        raise NestpruneError(f"{path} holds no records")
    return rows


def read_choice_items(path: Path) -> list[ChoiceItem]:
    return [parse_choice_item(row, where) for where, row in _read_records(path)]


def read_answer_items(path: Path) -> list[AnswerItem]:
    return [parse_answer_item(row, where) for where, row in _read_records(path)]


# ---------------------------------------------------------------------------------------------------
# Tokenised, labelled sequences (pure list/tensor helpers)


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


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def join_choice(prompt: str, choice: str, separator: str = " ") -> tuple[str, str]:
    """(context, continuation) as lm-eval and ``nestprune.evaluate`` join them: ``separator`` goes
    between prompt and choice unless the prompt ends or the choice starts with whitespace, and
    trailing spaces of the prompt move over to the continuation."""
    cont = choice if (not prompt or prompt[-1:].isspace() or choice[:1].isspace()) else separator + choice
    n_sp = len(prompt) - len(prompt.rstrip(" "))
    if n_sp:
        prompt, cont = prompt[:-n_sp], prompt[-n_sp:] + cont
    return prompt, cont


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation): the continuation's tokens are those
    that follow the context's in the encoding of the whole text (so calibration sees the tokens that
    training text and evaluation see); where a merge crosses the boundary, each is encoded alone. No
    special tokens are added (as in ``nestprune.evaluate``); an empty context becomes BOS (or EOS)."""
    ctxs = _encode(tokenizer, [c for c, _ in pairs])
    wholes = _encode(tokenizer, [c + x for c, x in pairs])
    out = []
    for (_, cont_text), ctx, whole in zip(pairs, ctxs, wholes, strict=True):
        if whole[: len(ctx)] == ctx:
            cont = whole[len(ctx) :]
        else:
            cont = _encode(tokenizer, [cont_text])[0]
        if not ctx:
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if prefix is None:
                raise NestpruneError("an empty prompt needs a BOS or EOS token to condition on; the tokenizer has neither")
            ctx = [int(prefix)]
        out.append((ctx, cont))
    return out


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


def _select(n_items: int, samples: int | None, seed: int) -> list[int]:
    """A seeded random subset of ``samples`` item indices (all of them, shuffled, when None)."""
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    if samples is not None:
        if samples < 1:
            raise NestpruneError(f"samples must be at least 1, got {samples}")
        order = order[:samples]
    return order


def _prepare(
    groups: list[list[tuple[list[int], list[int]]]],
    *,
    seq_len: int | None,
    percentile: float,
    max_tokens: int | None,
    keep_head: list[int],
) -> tuple[list[list[tuple[list[int], list[int]]]], int, int]:
    """Length limit + left truncation + token budget over groups of sequences (one group per item;
    a group is kept or dropped whole). The limit is the ``percentile`` of the lengths, capped at
    ``seq_len`` when given. Returns (kept groups, length limit, truncated count)."""
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


def _rule(percentile: float, cap: int | None) -> str:
    return f"p{percentile:g} of lengths" + (f", at most {cap}" if cap is not None else "")


def _bos_head(tokenizer, prompt_ids: list[int]) -> int:
    bos = tokenizer.bos_token_id
    return 1 if bos is not None and prompt_ids and prompt_ids[0] == bos else 0


# ---------------------------------------------------------------------------------------------------
# Margin


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
        chosen = [items[i] for i in _select(len(items), samples, seed)]
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
        kept, limit, truncated = _prepare(
            groups, seq_len=seq_len, percentile=percentile, max_tokens=max_tokens,
            keep_head=[_bos_head(tokenizer, g[0][0]) for g in groups],
        )
        sequences, positive = [], []
        for g, ans in zip(kept, labels, strict=False):
            for j, s in enumerate(g):
                sequences.append(s)
                positive.append(j == ans)
        n_pos, n_neg = sum(positive), len(positive) - sum(positive)
        if n_neg == 0:
            raise NestpruneError("the margin objective needs incorrect choices; every item has only one")
        weights = [1.0 / n_pos if pos else -1.0 / n_neg for pos in positive]
        self.data = LabelledSequences(sequences, weights, _pad_id(tokenizer), limit, truncated, batch_tokens)
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
            "tokens_used": self.data.tokens_used,
            "answer_tokens": self.data.answer_tokens,
            "seq_len": limit,
            "seq_len_rule": _rule(percentile, seq_len),
            "truncated": truncated,
            "truncation": "left (prompt only)",
            "prompt_template": prompt_template,
            "separator": separator,
            "max_tokens": max_tokens,
            "seed": seed,
        }

    @classmethod
    def from_jsonl(cls, path: Path, tokenizer, **kwargs) -> MarginObjective:
        path = Path(path)
        return cls(read_choice_items(path), tokenizer, source=str(path), sha256=sha256_file(path), **kwargs)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return self.data.batches(batch_size)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.data.loss(model, batch)

    def provenance(self) -> dict[str, Any]:
        return dict(self._prov)


def _format_prompt(template: str, prompt: str) -> str:
    try:
        return template.format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as e:
        raise NestpruneError(f"prompt template {template!r} is not valid: use {{prompt}} for the prompt ({e})") from None


# ---------------------------------------------------------------------------------------------------
# Answer-only


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
        chosen = [items[i] for i in _select(len(items), samples, seed)]
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
        kept, limit, truncated = _prepare(
            groups, seq_len=seq_len, percentile=percentile, max_tokens=max_tokens,
            keep_head=[_bos_head(tokenizer, g[0][0]) for g in groups],
        )
        sequences = [g[0] for g in kept]
        weights = [1.0 / len(sequences)] * len(sequences)
        self.data = LabelledSequences(sequences, weights, _pad_id(tokenizer), limit, truncated, batch_tokens)
        self.chat_template_applied = use_template
        self._prov = {
            "objective": "answer",
            "source": source,
            "sha256": sha256,
            "items_available": len(items),
            "items": len(sequences),
            "tokens_used": self.data.tokens_used,
            "answer_tokens": self.data.answer_tokens,
            "seq_len": limit,
            "seq_len_rule": _rule(percentile, seq_len),
            "truncated": truncated,
            "truncation": "left (prompt only)",
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

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return self.data.batches(batch_size)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.data.loss(model, batch)

    def provenance(self) -> dict[str, Any]:
        return dict(self._prov)


# ---------------------------------------------------------------------------------------------------
# Plug-in


def resolve_callable(spec: str) -> Callable:
    """``package.module:name`` or ``path/to/file.py:name`` → the named callable."""
    if not isinstance(spec, str) or ":" not in spec:
        raise NestpruneError(f"objective callable {spec!r} must look like 'package.module:function' or 'file.py:function'")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise NestpruneError(f"objective callable {spec!r} must look like 'package.module:function' or 'file.py:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise NestpruneError(f"cannot import objective module {target}: no such file")
        mod_name = "nestprune_user_objective_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise NestpruneError(f"cannot import objective module {target}")
        module = importlib.util.module_from_spec(module_spec)
        try:
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any import-time error becomes one line
            sys.modules.pop(mod_name, None)
            raise NestpruneError(f"cannot import objective module {target}: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise NestpruneError(f"cannot import objective module {target!r}: {type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise NestpruneError(f"objective module {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise NestpruneError(f"objective {spec!r} is not callable (it is a {type(obj).__name__})")
    return obj


def check_objective(obj: Any, origin: str) -> Objective:
    """Refuse, in one line, an object that does not satisfy the Objective protocol."""
    missing = [a for a in ("name", "batches", "loss", "provenance") if not hasattr(obj, a)]
    not_callable = [a for a in ("batches", "loss", "provenance") if hasattr(obj, a) and not callable(getattr(obj, a))]
    if missing or not_callable:
        what = ", ".join([f"no {a!r}" for a in missing] + [f"{a!r} is not callable" for a in not_callable])
        raise NestpruneError(
            f"{origin} returned a {type(obj).__name__} that is not an Objective ({what}); "
            "it needs name, batches(batch_size), loss(model, batch) and provenance()"
        )
    if not isinstance(obj.name, str) or not obj.name:
        raise NestpruneError(f"{origin} returned an objective whose name is not a non-empty string")
    return obj


class CustomObjective:
    """A user objective, checked, with its origin added to its provenance."""

    def __init__(self, inner: Objective, origin: str, data_path: Path | None, options: Mapping[str, Any]):
        self.inner = check_objective(inner, origin)
        self.name = inner.name
        self.origin = origin
        self.data_path = data_path
        self.options = dict(options)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return self.inner.batches(batch_size)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.inner.loss(model, batch)

    def provenance(self) -> dict[str, Any]:
        details = self.inner.provenance()
        if not isinstance(details, dict):
            raise NestpruneError(f"{self.origin}: provenance() must return a dict, got {type(details).__name__}")
        try:
            json.dumps(details)
        except (TypeError, ValueError) as e:
            raise NestpruneError(f"{self.origin}: provenance() must be JSON-serialisable ({e})") from None
        p = self.data_path
        return {
            "objective": "custom",
            "callable": self.origin,
            "name": self.name,
            "source": str(p) if p is not None else None,
            "sha256": sha256_file(p) if p is not None and Path(p).is_file() else None,
            "options": _jsonable(self.options),
            "details": details,
        }


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        try:
            json.dumps(v)
            out[str(k)] = v
        except (TypeError, ValueError):
            out[str(k)] = repr(v)
    return out


def load_objective(
    spec: str | Callable,
    tokenizer,
    data_path: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> Objective:
    """Build a user objective: ``spec`` (``module:fn``, ``file.py:fn`` or the callable itself) is called
    as ``fn(tokenizer, data_path, options)`` and must return an Objective. The result's provenance
    records the callable, the data file's sha256 and the options."""
    fn = resolve_callable(spec) if isinstance(spec, str) else spec
    origin = spec if isinstance(spec, str) else f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    if not callable(fn):
        raise NestpruneError(f"objective {origin!r} is not callable")
    opts = dict(options or {})
    path = Path(data_path) if data_path is not None else None
    try:
        inspect.signature(fn).bind(tokenizer, path, opts)
    except TypeError:
        raise NestpruneError(f"objective {origin!r} must accept (tokenizer, data_path, options)") from None
    except ValueError:  # builtins without a signature: just call
        pass
    obj = fn(tokenizer, path, opts)
    return CustomObjective(obj, origin, path, opts)


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` from the command line → dict; values parsed as JSON when they are JSON."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise NestpruneError(f"objective option {pair!r} must look like KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Dispatch

OBJECTIVE_KINDS = ("lm", "margin", "answer", "custom")


def make_objective(
    kind: str,
    data_path: str | Path | None,
    tokenizer,
    *,
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    chat_template: bool = True,
    custom: str | Callable | None = None,
    options: Mapping[str, Any] | None = None,
    max_tokens: int | None = None,
    prompt_template: str = "{prompt}",
    separator: str | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    batch_tokens: int | None = None,
) -> Objective:
    """The objective ``build`` differentiates.

    kind: ``lm`` (text → ``samples`` random windows of ``seq_len`` tokens; defaults 2000 × 256),
    ``margin`` (multiple-choice JSONL), ``answer`` (prompt/response JSONL) or ``custom`` (``custom`` =
    ``module:fn`` / ``file.py:fn`` / a callable, called with (tokenizer, data_path, options)).
    For margin/answer: ``samples`` caps the items (seeded shuffle), the length limit is the
    ``percentile`` of the items' lengths, at most ``seq_len`` when given (longer prompts are cut from
    the left), ``max_tokens`` caps the tokens used (whole items).
    ``separator`` defaults to " " for margin and "" for answer.
    """
    if custom is not None and kind in ("lm", "custom"):
        kind = "custom"
    if kind == "custom":
        if custom is None:
            raise NestpruneError("objective 'custom' needs a callable: --objective-fn package.module:function")
        opts = {"samples": samples, "seq_len": seq_len, "seed": seed, "chat_template": chat_template,
                "max_tokens": max_tokens, **dict(options or {})}
        return load_objective(custom, tokenizer, data_path, opts)
    if custom is not None:
        raise NestpruneError(f"--objective-fn is for custom objectives; it cannot be combined with objective {kind!r}")
    if kind not in OBJECTIVE_KINDS:
        raise NestpruneError(f"unknown objective {kind!r}; choose one of {', '.join(OBJECTIVE_KINDS)}")
    if data_path is None:
        raise NestpruneError(f"objective {kind!r} needs a data file")
    if options:
        raise NestpruneError(f"objective options are for custom objectives, not {kind!r}")
    if kind == "lm":
        seq_len = seq_len or LM_DEFAULT_SEQ_LEN
        if samples is None:
            samples = max(1, max_tokens // seq_len) if max_tokens else LM_DEFAULT_SAMPLES
        return LanguageModeling(load_calibration(Path(data_path), tokenizer, samples, seq_len, seed))
    common = dict(samples=samples, seq_len=seq_len, seed=seed, percentile=percentile,
                  max_tokens=max_tokens, batch_tokens=batch_tokens)
    if kind == "margin":
        return MarginObjective.from_jsonl(Path(data_path), tokenizer, prompt_template=prompt_template,
                                          separator=" " if separator is None else separator, **common)
    if prompt_template != "{prompt}":
        raise NestpruneError("a prompt template applies to the margin objective; answer uses the chat template")
    return AnswerObjective.from_jsonl(Path(data_path), tokenizer, chat_template=chat_template,
                                      separator="" if separator is None else separator, **common)
