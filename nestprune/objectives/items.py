"""Task items and how a prompt and its continuation become tokens — one home for the objectives and evaluate.

* Items: :class:`ChoiceItem` (multiple choice), :class:`AnswerItem` (prompt/response, for the answer
  objective), :class:`GenerationItem` (prompt/answer, for exact match), each parsed from a JSONL record
  with one clear line per bad record (``parse_*`` take the record and where it came from).
* Joining: :func:`join_choice` puts prompt and choice together as lm-eval does.
* Encoding: :func:`encode_pairs` — the continuation's tokens are those that follow the context's in the
  encoding of the whole text, no special tokens added; an empty context becomes BOS (or EOS). The
  margin and answer objectives calibrate on exactly the tokens ``nestprune eval`` scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestprune.errors import NestpruneError
from nestprune.io.text import read_jsonl_records

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


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(``file:line``, record) per non-blank JSONL line; no record at all is an error."""
    rows = read_jsonl_records(Path(path))
    if not rows:
        raise NestpruneError(f"{path} holds no records")
    return rows


def read_choice_items(path: Path) -> list[ChoiceItem]:
    return [parse_choice_item(row, where) for where, row in read_records(path)]


def read_answer_items(path: Path) -> list[AnswerItem]:
    return [parse_answer_item(row, where) for where, row in read_records(path)]


def parse_choice_items(rows: Sequence[Mapping], source: str = "") -> list[ChoiceItem]:
    """Multiple-choice items from records already read (``record i`` of ``source`` in errors)."""
    items = [parse_choice_item(r, f"{source or 'task file'}: record {i}") for i, r in enumerate(rows, 1)]
    if not items:
        raise NestpruneError(f"{source or 'the task file'} holds no items")
    return items


@dataclass(frozen=True)
class GenerationItem:
    """One prompt and the answer its greedy completion must match (exact match)."""

    prompt: str
    answer: str


def parse_generation_item(row: Mapping, where: str) -> GenerationItem:
    """A generation record: a non-empty string ``prompt`` and an ``answer`` (a string or a number)."""
    prompt, answer = row.get("prompt"), row.get("answer")
    if not isinstance(prompt, str) or not prompt:
        raise NestpruneError(f"{where} has no non-empty string field 'prompt'")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise NestpruneError(f"{where}: 'answer' must be a string or a number")
    return GenerationItem(prompt, str(answer))


def parse_generation_items(rows: Sequence[Mapping], source: str = "") -> list[GenerationItem]:
    items = [parse_generation_item(r, f"{source or 'task file'}: record {i}") for i, r in enumerate(rows, 1)]
    if not items:
        raise NestpruneError(f"{source or 'the task file'} holds no items")
    return items


# ---------------------------------------------------------------------------------------------------
# Prompt + continuation -> tokens


def join_choice(prompt: str, choice: str, separator: str = " ") -> tuple[str, str]:
    """(context, continuation) as lm-eval and ``nestprune.evaluate`` join them: ``separator`` goes
    between prompt and choice unless the prompt ends or the choice starts with whitespace, and
    trailing spaces of the prompt move over to the continuation."""
    cont = choice if (not prompt or prompt[-1:].isspace() or choice[:1].isspace()) else separator + choice
    n_sp = len(prompt) - len(prompt.rstrip(" "))
    if n_sp:
        prompt, cont = prompt[:-n_sp], prompt[-n_sp:] + cont
    return prompt, cont


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added."""
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation): the continuation's tokens are those
    that follow the context's in the encoding of the whole text (so calibration sees the tokens that
    training text and evaluation see); where a merge crosses the boundary, each is encoded alone. No
    special tokens are added (as ``nestprune.evaluate`` scores); an empty context becomes BOS (or EOS)."""
    ctxs = encode_texts(tokenizer, [c for c, _ in pairs])
    wholes = encode_texts(tokenizer, [c + x for c, x in pairs])
    out = []
    for (_, cont_text), ctx, whole in zip(pairs, ctxs, wholes, strict=True):
        if whole[: len(ctx)] == ctx:
            cont = whole[len(ctx) :]
        else:
            cont = encode_texts(tokenizer, [cont_text])[0]
        out.append((ctx or [prefix_token(tokenizer)], cont))
    return out


def prefix_token(tokenizer) -> int:
    """The token an empty context is conditioned on: BOS, else EOS (as lm-eval)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise NestpruneError("an empty prompt needs a BOS or EOS token to condition on; the tokenizer has neither")
