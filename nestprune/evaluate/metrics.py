"""Evaluation of a (model, tokenizer): perplexity, multiple-choice accuracy, generation exact match.

Protocols (GISP.md, "Evaluation protocol of the reference"):

* **Perplexity** — documents joined with ``"\\n\\n"``, tokenized once, cut into non-overlapping windows
  of ``seq_len`` tokens (the reference uses 128; a trailing partial window is dropped, as in the
  reference). Every window is scored independently; PPL = exp(total NLL / predicted tokens), with
  ``seq_len − 1`` predicted tokens per window, log-probabilities and sums in fp32/fp64.
* **Multiple choice** (JSONL ``{"prompt", "choices", "answer"}``) — lm-eval-harness style: the
  log-likelihood of each choice's tokens given the prompt (the prompt/continuation split of
  lm-eval: tokenize ``prompt + continuation`` and ``prompt``, the continuation is what follows);
  ``acc`` picks the highest sum, ``acc_norm`` the highest sum per *character* of the choice.
  A single space joins prompt and choice unless the prompt ends or the choice starts with whitespace.
  The records may use the margin objective's aliases (question/query/ctx, options/endings, label/gold,
  an answer given as a letter or as the choice's text).
* **Exact match** (JSONL ``{"prompt", "answer"}``) — greedy decoding of at most ``max_new_tokens``,
  then an extraction rule (``first-line``, ``last-number``, ``regex:PATTERN``, ``full``) on the
  completion; ``last-number`` is applied to the reference answer too (so ``"#### 18"`` works).

Items, prompt joining and encoding come from ``nestprune.objectives.items``, the same code the margin
and answer objectives calibrate with. Nothing here touches paths except through ``nestprune.io.text``'s
readers in the ``*_file`` helpers; the model is used where it already is (inputs are moved to its device).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nestprune.errors import NestpruneError
from nestprune.io.text import read_documents, read_jsonl
from nestprune.objectives.items import (
    ChoiceItem,
    GenerationItem,
    encode_pairs,
    encode_texts,
    join_choice,
    parse_choice_items,
    parse_generation_items,
    prefix_token,
)

Progress = Callable[[int, int], None]  # (done, total)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerplexityResult:
    source: str
    seq_len: int
    windows: int
    tokens: int  # predicted tokens: windows * (seq_len - 1)
    nll: float  # mean negative log-likelihood per predicted token (nats)
    ppl: float

    def to_dict(self) -> dict[str, Any]:
        return {"task": "perplexity", **asdict(self)}


@dataclass(frozen=True)
class ChoiceResult:
    source: str
    items: int
    acc: float
    acc_norm: float
    predictions: tuple[int, ...] = field(repr=False, default=())  # argmax of the summed log-likelihood
    predictions_norm: tuple[int, ...] = field(repr=False, default=())

    def to_dict(self) -> dict[str, Any]:
        return {"task": "multiple_choice", "source": self.source, "items": self.items, "acc": self.acc,
                "acc_norm": self.acc_norm}


@dataclass(frozen=True)
class GenerationResult:
    source: str
    items: int
    exact_match: float
    extract: str
    completions: tuple[str, ...] = field(repr=False, default=())
    extracted: tuple[str, ...] = field(repr=False, default=())

    def to_dict(self) -> dict[str, Any]:
        return {"task": "exact_match", "source": self.source, "items": self.items,
                "exact_match": self.exact_match, "extract": self.extract}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _device_of(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _max_positions(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------


def token_stream(docs: Sequence[str], tokenizer) -> torch.Tensor:
    """The reference's evaluation stream: documents joined with "\\n\\n", tokenized once (with the
    tokenizer's own special tokens, e.g. a leading BOS, as the reference's ``tokenizer(text)``). (n_tokens,)"""
    ids = tokenizer("\n\n".join(docs), add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def stream_perplexity(
    model: torch.nn.Module,
    stream: torch.Tensor,
    *,
    seq_len: int = 128,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    source: str = "",
) -> PerplexityResult:
    """Perplexity of a token stream in non-overlapping windows of ``seq_len`` (partial tail dropped)."""
    if seq_len < 2:
        raise NestpruneError(f"--seq-len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise NestpruneError(f"--batch-size must be at least 1, got {batch_size}")
    n_windows = len(stream) // seq_len
    if n_windows == 0:
        raise NestpruneError(
            f"{source or 'the text'} has {len(stream)} tokens, fewer than one window of {seq_len}; "
            "give more text or a shorter --seq-len"
        )
    dev = _device_of(model, device)
    windows = stream[: n_windows * seq_len].reshape(n_windows, seq_len)  # (n, T)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, n_windows, batch_size):
        ids = windows[i : i + batch_size].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        total += nll.double().sum().cpu()
        if progress:
            progress(min(i + batch_size, n_windows), n_windows)
    tokens = n_windows * (seq_len - 1)
    mean = float(total) / tokens
    return PerplexityResult(source=source, seq_len=seq_len, windows=n_windows, tokens=tokens, nll=mean,
                            ppl=math.exp(mean) if mean < 700 else math.inf)


def perplexity(model: torch.nn.Module, tokenizer, docs: Sequence[str], **kw: Any) -> PerplexityResult:
    """Perplexity over ``docs`` (joined with "\\n\\n"); keywords as :func:`stream_perplexity`."""
    if not docs:
        raise NestpruneError(f"{kw.get('source') or 'the text'} holds no text")
    return stream_perplexity(model, token_stream(docs, tokenizer), **kw)


def perplexity_file(model: torch.nn.Module, tokenizer, path: Path, **kw: Any) -> PerplexityResult:
    """Perplexity of a .txt / .txt.xz / .jsonl file (``nestprune.io.text.read_documents``)."""
    return perplexity(model, tokenizer, read_documents(Path(path)), source=str(path), **kw)


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context ids, continuation ids) pair.

    Right-padded batches; sequences longer than the model's positions are cut from the left.
    """
    dev = _device_of(model, device)
    limit = _max_positions(model)
    out = [0.0] * len(requests)
    order = sorted(range(len(requests)), key=lambda k: -(len(requests[k][0]) + len(requests[k][1])))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        seqs, conts = [], []
        for k in idx:
            ctx, cont = requests[k]
            if not cont:
                raise NestpruneError("a choice tokenizes to no tokens")
            seq = (ctx + cont)[:-1]  # the last token is predicted, never fed
            if limit is not None and len(seq) > limit:
                seq = seq[-limit:]
            seqs.append(seq)
            conts.append(cont)
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits  # (B, W, V)
        for r, (s, cont) in enumerate(zip(seqs, conts, strict=True)):
            n = len(cont)
            # positions predicting the continuation, (n, V); log-softmax in fp32 on those rows only
            rows = torch.log_softmax(logits[r, len(s) - n : len(s)].float(), dim=-1)
            target = torch.tensor(cont, device=rows.device)
            out[idx[r]] = float(rows.gather(1, target[:, None]).double().sum())
        if progress:
            progress(min(b + batch_size, len(order)), len(order))
    return out


def multiple_choice(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[ChoiceItem],
    *,
    batch_size: int = 8,
    delimiter: str = " ",
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    source: str = "",
) -> ChoiceResult:
    """acc and acc_norm (log-likelihood per character of the choice, as lm-eval's acc_norm)."""
    requests = encode_pairs(tokenizer, [join_choice(it.prompt, c, delimiter) for it in items for c in it.choices])
    spans, start = [], 0
    for it in items:
        spans.append((start, start + len(it.choices)))
        start += len(it.choices)
    ll = continuation_logprobs(model, requests, batch_size=batch_size, device=device, progress=progress)
    preds, preds_norm = [], []
    for it, (a, b) in zip(items, spans, strict=True):
        scores = ll[a:b]
        norm = [s / len(c) for s, c in zip(scores, it.choices, strict=True)]
        preds.append(max(range(len(scores)), key=scores.__getitem__))
        preds_norm.append(max(range(len(norm)), key=norm.__getitem__))
    n = len(items)
    return ChoiceResult(
        source=source, items=n,
        acc=sum(p == it.answer for p, it in zip(preds, items, strict=True)) / n,
        acc_norm=sum(p == it.answer for p, it in zip(preds_norm, items, strict=True)) / n,
        predictions=tuple(preds), predictions_norm=tuple(preds_norm),
    )


def multiple_choice_file(model: torch.nn.Module, tokenizer, path: Path, *, limit: int | None = None,
                         **kw: Any) -> ChoiceResult:
    rows = read_jsonl(Path(path))
    items = parse_choice_items(rows[:limit] if limit else rows, str(path))
    return multiple_choice(model, tokenizer, items, source=str(path), **kw)


# ---------------------------------------------------------------------------------------------
# Generation: greedy decoding + exact match
# ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Extractor:
    """An answer extraction rule: ``full``, ``first-line``, ``last-number`` or ``regex:PATTERN``.

    ``regex`` takes the first match's first group (the whole match if the pattern has no group);
    no match extracts the empty string (never equal to an answer).
    """

    spec: str

    def __post_init__(self) -> None:
        if self.spec.startswith("regex:"):
            try:
                re.compile(self.spec[len("regex:") :])
            except re.error as e:
                raise NestpruneError(f"--extract {self.spec!r}: bad regular expression ({e})") from None
        elif self.spec not in ("full", "first-line", "last-number"):
            raise NestpruneError(f"--extract must be full, first-line, last-number or regex:PATTERN, got {self.spec!r}")

    def __call__(self, text: str) -> str:
        if self.spec == "full":
            return text.strip()
        if self.spec == "first-line":
            stripped = text.strip()
            return stripped.split("\n", 1)[0].strip() if stripped else ""
        if self.spec == "last-number":
            nums = _NUMBER.findall(text)
            return _canonical_number(nums[-1]) if nums else ""
        m = re.search(self.spec[len("regex:") :], text)
        if not m:
            return ""
        return (m.group(1) if m.re.groups else m.group(0)).strip()

    def reference(self, answer: str) -> str:
        """The reference answer as compared: numbers canonicalised for last-number, else stripped."""
        if self.spec == "last-number":
            nums = _NUMBER.findall(answer)
            return _canonical_number(nums[-1]) if nums else answer.strip()
        return answer.strip()


def _canonical_number(s: str) -> str:
    s = s.replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy completions (decoded new tokens, special tokens dropped); stops at EOS. Left-padded batches."""
    if max_new_tokens < 1:
        raise NestpruneError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    dev = _device_of(model, device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    limit = _max_positions(model)
    outs: list[str] = [""] * len(prompts)
    for b in range(0, len(prompts), batch_size):
        enc = [e or [prefix_token(tokenizer)] for e in encode_texts(tokenizer, prompts[b : b + batch_size])]
        if limit is not None:
            keep = max(1, limit - max_new_tokens)
            enc = [e[-keep:] for e in enc]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros(len(enc), width, dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, width - len(e) :] = torch.tensor(e)
            mask[r, width - len(e) :] = 1
        gen = model.generate(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=1, pad_token_id=pad, eos_token_id=eos, temperature=None, top_p=None, top_k=None,
        )
        for r in range(len(enc)):
            new = gen[r, width:].tolist()
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            outs[b + r] = tokenizer.decode(new, skip_special_tokens=True)
        if progress:
            progress(min(b + batch_size, len(prompts)), len(prompts))
    return outs


def exact_match(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[GenerationItem],
    *,
    extract: str = "first-line",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    source: str = "",
) -> GenerationResult:
    """Share of items whose extracted greedy completion equals the (extracted) reference answer."""
    rule = Extractor(extract)
    completions = greedy_generate(model, tokenizer, [it.prompt for it in items], max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, device=device, progress=progress)
    extracted = [rule(c) for c in completions]
    hits = sum(bool(x) and x == rule.reference(it.answer) for x, it in zip(extracted, items, strict=True))
    return GenerationResult(source=source, items=len(items), exact_match=hits / len(items), extract=extract,
                            completions=tuple(completions), extracted=tuple(extracted))


def exact_match_file(model: torch.nn.Module, tokenizer, path: Path, *, limit: int | None = None,
                     **kw: Any) -> GenerationResult:
    rows = read_jsonl(Path(path))
    items = parse_generation_items(rows[:limit] if limit else rows, str(path))
    return exact_match(model, tokenizer, items, source=str(path), **kw)
