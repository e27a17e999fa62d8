"""Benchmark task data: a decision task built from real text and a generation task the proxies can learn.

Decision task — identifier cloze (multiple choice). GISP.md warns that "which sentence comes next"
barely moves under pruning at proxy scale, so the blanks here are the specifics a model has to know or
copy: an identifier, constant, dotted name, ``literal`` or number in the corpus text. The prompt is the
text before the blank (up to ``context_chars``, cut at a whitespace boundary); the choices are the true
term and distractors *of the same kind and similar length* taken from other documents of the same
split and absent from the prompt. Prompt and true choice joined as the margin objective and the
evaluator join them (a space unless the prompt ends with whitespace) reproduce the original text. Each item records its kind and whether the answer
occurs in the prompt (``in_context``: answerable by copying; otherwise by recall), so a benchmark can
report both. Calibration items come from one split (valid), evaluation items from another (test):
documents are disjoint by construction of the corpus, and an evaluation item whose prompt tail and
answer also occur in the calibration items is dropped.

Generation task — short problems with one exact answer (``add``, ``sub``, ``lookup``, ``copy``),
written as prompt/response pairs (``"Q: 47+38=? A:"`` → ``" 85"``; the answer objective's default
separator is "") with the bare ``answer`` ("85") for exact match (``nestprune eval``, first line). ``mix_problems`` puts a share of such problems (never the held-out calibration or
evaluation prompts) into training documents so proxy models learn them and exact match is measurable.

Everything is deterministic from a seed. Command line: ``python bench/make_tasks.py decision|generation ...``.
"""

from __future__ import annotations

import json
import lzma
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nestprune.errors import NestpruneError
from nestprune.io.text import DOC_SEPARATOR, read_documents, sha256_file

# ---------------------------------------------------------------------------------------------------
# Decision task: identifier cloze

# A blank: preceded by one space, optionally wrapped in rst ``literal`` markup, not followed by more
# identifier characters. Group 1/3: the markup, group 2: the term.
_BLANK = re.compile(
    r"(?<= )(``)?([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|0x[0-9A-Fa-f]+|[0-9]+)((?(1)``|))(?![A-Za-z0-9_`])"
)
_KINDS: tuple[tuple[str, re.Pattern], ...] = (
    ("number", re.compile(r"0x[0-9A-Fa-f]+|[0-9]{2,}")),
    ("dotted", re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")),
    ("constant", re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")),
    ("snake", re.compile(r"_*[a-z][a-z0-9]*(?:_+[a-z0-9]+)+")),
    ("camel", re.compile(r"[A-Z]?[a-z0-9]+(?:[A-Z][a-z0-9]*)+")),
)
KINDS = tuple(k for k, _ in _KINDS) + ("word",)  # "word": any other term, only inside ``literal``


def term_kind(term: str, literal: bool = False) -> str | None:
    """The kind of a blank's term, or None when it is not specific enough to be a blank."""
    for kind, rx in _KINDS:
        if rx.fullmatch(term):
            return kind
    if literal and len(term) >= 3 and not term.isdigit():
        return "word"
    return None


@dataclass(frozen=True)
class Blank:
    """A candidate blank: where it starts in its document and the choice text (markup included)."""

    doc: int
    start: int
    choice: str
    kind: str  # "snake", "literal:snake", ...


def find_blanks(doc: str, doc_index: int = 0, min_context_chars: int = 200) -> list[Blank]:
    out = []
    for m in _BLANK.finditer(doc):
        if m.start() < min_context_chars:
            continue
        literal = bool(m.group(1))
        kind = term_kind(m.group(2), literal)
        if kind is None:
            continue
        out.append(Blank(doc_index, m.start(), m.group(0), ("literal:" if literal else "") + kind))
    return out


def cloze_prompt(doc: str, start: int, context_chars: int) -> str:
    """The text before a blank at ``start``, at most ``context_chars`` long, starting after a whitespace
    (no partial first word). The single space before the blank is left out when a non-space precedes
    it, so that ``prompt + " " + choice`` — joined as ``nestprune.objectives.join_choice`` and
    ``nestprune.evaluate`` do, no separator after whitespace — is the original text."""
    end = start - 1 if start >= 2 and not doc[start - 2].isspace() else start
    lo = max(0, end - context_chars)
    if lo > 0:
        cut = re.search(r"\s", doc[lo:end])
        lo = lo + cut.end() if cut else lo
    return doc[lo:end]


Pool = dict[int, list[tuple[str, frozenset[int]]]]  # term length -> (term, documents holding it), sorted


def _pick_distractors(answer: str, doc: int, pool: Pool, prompt: str, k: int, rng: random.Random,
                      nearest: int = 40) -> list[str] | None:
    """``k`` terms of the answer's kind that occur in a document other than ``doc``, none equal to the
    answer (case folded) nor present in the prompt, drawn from the ``nearest`` in length (ties by
    text); None when there are not ``k``."""
    folded, size = answer.casefold(), len(answer)
    want = max(nearest, k)
    cands: list[str] = []
    for dist in sorted({abs(n - size) for n in pool}):
        if len(cands) >= want:
            break
        for n in (size - dist, size + dist) if dist else (size,):
            cands.extend(t for t, in_docs in pool.get(n, ())
                         if (len(in_docs) > 1 or doc not in in_docs) and t.casefold() != folded and t not in prompt)
    if len(cands) < k:
        return None
    cands.sort(key=lambda t: (abs(len(t) - size), t))
    return rng.sample(cands[:want], k)


def cloze_items(
    docs: Sequence[str],
    n: int,
    *,
    seed: int = 0,
    n_choices: int = 4,
    context_chars: int = 600,
    min_context_chars: int = 200,
    per_doc: int = 80,
    mode: str = "any",
) -> list[dict]:
    """Up to ``n`` identifier-cloze items from ``docs`` (one split). ``mode``: ``any``, ``copy``
    (the answer occurs in the prompt) or ``recall`` (it does not). At most ``per_doc`` items per
    document, drawn round-robin over documents in a seeded order."""
    if mode not in ("any", "copy", "recall"):
        raise NestpruneError(f"cloze mode must be any, copy or recall, got {mode!r}")
    if n_choices < 2:
        raise NestpruneError(f"a multiple-choice item needs at least 2 choices, got {n_choices}")
    rng = random.Random(seed)
    per_doc_blanks = [find_blanks(d, i, min_context_chars) for i, d in enumerate(docs)]
    docs_of: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))  # kind -> term -> docs
    for blanks in per_doc_blanks:
        for b in blanks:
            docs_of[b.kind][b.choice].add(b.doc)
    pools: dict[str, Pool] = {}
    for kind, terms in docs_of.items():
        by_len: Pool = defaultdict(list)
        for term in sorted(terms):
            by_len[len(term)].append((term, frozenset(terms[term])))
        pools[kind] = dict(by_len)
    candidates: list[list[Blank]] = []
    for blanks in per_doc_blanks:
        blanks = list(blanks)
        rng.shuffle(blanks)
        candidates.append(blanks)
    order = list(range(len(docs)))
    rng.shuffle(order)
    items: list[dict] = []
    taken = [0] * len(docs)
    seen: set[tuple[str, str]] = set()
    cursor = [0] * len(docs)
    while len(items) < n:
        progressed = False
        for d in order:
            if len(items) >= n:
                break
            while taken[d] < per_doc and cursor[d] < len(candidates[d]):
                b = candidates[d][cursor[d]]
                cursor[d] += 1
                item = _make_item(docs[d], b, pools[b.kind], rng, n_choices, context_chars, mode, seen)
                if item is not None:
                    items.append(item)
                    taken[d] += 1
                    progressed = True
                    break
        if not progressed:
            break
    return items


def _make_item(doc: str, b: Blank, pool: Pool, rng: random.Random, n_choices: int,
               context_chars: int, mode: str, seen: set) -> dict | None:
    prompt = cloze_prompt(doc, b.start, context_chars)
    in_context = b.choice in prompt
    if (mode == "copy" and not in_context) or (mode == "recall" and in_context):
        return None
    key = (prompt[-200:], b.choice)
    if key in seen:
        return None
    distractors = _pick_distractors(b.choice, b.doc, pool, prompt, n_choices - 1, rng)
    if distractors is None:
        return None
    seen.add(key)
    choices = distractors + [b.choice]
    rng.shuffle(choices)
    return {"prompt": prompt, "choices": choices, "answer": choices.index(b.choice), "kind": b.kind,
            "in_context": in_context, "doc": b.doc, "offset": b.start}


def item_key(item: dict) -> tuple[str, str]:
    """What makes two cloze items the same question: the prompt's last 200 characters and the answer."""
    return item["prompt"][-200:], item["choices"][item["answer"]]


def decision_task(calib_docs: Sequence[str], eval_docs: Sequence[str], n_calib: int, n_eval: int, *,
                  seed: int = 0, **options) -> tuple[list[dict], list[dict]]:
    """Calibration items from ``calib_docs``, evaluation items from ``eval_docs`` (seeds differ per
    split); evaluation items that repeat a calibration question are dropped."""
    calib = cloze_items(calib_docs, n_calib, seed=seed, **options)
    keys = {item_key(it) for it in calib}
    evals = [it for it in cloze_items(eval_docs, n_eval + len(keys), seed=seed + 1, **options)
             if item_key(it) not in keys][:n_eval]
    return calib, evals


# ---------------------------------------------------------------------------------------------------
# Generation task: short problems with exact answers

PROBLEM_KINDS = ("add", "sub", "lookup", "copy")
_KEYS = "abcdefghijklmnopqrstuvwxyz"
_WORDS = ("page", "file", "lock", "task", "node", "list", "byte", "port", "mode", "user", "time", "path",
          "disk", "code", "data", "line", "size", "type", "name", "key")


def make_problem(kind: str, rng: random.Random) -> dict:
    """One problem: ``{"prompt", "response", "answer", "kind"}``. ``response`` (" 85", read by the answer
    objective) is what follows the prompt in training text; ``answer`` ("85") is what
    ``nestprune.evaluate``'s exact match compares the first generated line with."""
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt, answer = f"Q: {a}+{b}=? A:", str(a + b)
    elif kind == "sub":
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        prompt, answer = f"Q: {a}-{b}=? A:", str(a - b)
    elif kind == "lookup":
        keys = rng.sample(_KEYS, rng.randint(3, 6))
        values = [rng.randint(0, 9) for _ in keys]
        q = rng.randrange(len(keys))
        table = " ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        prompt, answer = f"Q: {table}. {keys[q]}? A:", str(values[q])
    elif kind == "copy":
        words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 5))]
        prompt, answer = f"Q: repeat {' '.join(words)} A:", " ".join(words)
    else:
        raise NestpruneError(f"unknown problem kind {kind!r}; choose from {', '.join(PROBLEM_KINDS)}")
    return {"prompt": prompt, "response": " " + answer, "answer": answer, "kind": kind}


def problems(n: int, *, seed: int = 0, kinds: Sequence[str] = PROBLEM_KINDS,
             exclude: Iterable[str] = ()) -> list[dict]:
    """``n`` distinct problems (by prompt), kinds in rotation, none whose prompt is in ``exclude``."""
    rng = random.Random(seed)
    banned = set(exclude)
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        p = make_problem(kinds[len(out) % len(kinds)], rng)
        tries += 1
        if tries > 100 * n + 1000:
            raise NestpruneError(f"cannot draw {n} distinct problems of kinds {list(kinds)}")
        if p["prompt"] in banned:
            continue
        banned.add(p["prompt"])
        out.append(p)
    return out


def generation_task(n_calib: int, n_eval: int, *, seed: int = 0,
                    kinds: Sequence[str] = PROBLEM_KINDS) -> tuple[list[dict], list[dict]]:
    """Calibration and evaluation problems with disjoint prompts."""
    evals = problems(n_eval, seed=seed + 1, kinds=kinds)
    calib = problems(n_calib, seed=seed, kinds=kinds, exclude=[p["prompt"] for p in evals])
    return calib, evals


def problem_text(p: dict) -> str:
    """How a problem appears in training text: prompt, response, newline (the model learns to stop)."""
    return p["prompt"] + p["response"] + "\n"


def mix_problems(docs: Sequence[str], share: float, *, seed: int = 0, kinds: Sequence[str] = PROBLEM_KINDS,
                 exclude: Iterable[str] = (), per_block: int = 16) -> list[str]:
    """``docs`` with blocks of ``per_block`` problems inserted as extra documents at seeded positions,
    so that problems make up ``share`` of the characters. Prompts in ``exclude`` (held-out calibration
    and evaluation problems) never appear."""
    if not 0 <= share < 1:
        raise NestpruneError(f"problem share must be in [0, 1), got {share}")
    rng = random.Random(seed)
    banned = set(exclude)
    target = share / (1 - share) * sum(len(d) for d in docs)
    blocks: list[str] = []
    chars = 0
    while chars < target:
        block = []
        while len(block) < per_block:
            p = make_problem(rng.choice(list(kinds)), rng)
            if p["prompt"] not in banned:
                block.append(problem_text(p))
        text = "".join(block).rstrip("\n")
        blocks.append(text)
        chars += len(text)
    out = list(docs)
    for block in blocks:
        out.insert(rng.randint(0, len(out)), block)
    return out


# ---------------------------------------------------------------------------------------------------
# Files


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_documents(path: Path, docs: Sequence[str]) -> None:
    """Documents in the corpus format (``<|doc|>`` lines between them), xz-compressed if ``.xz``."""
    text = f"\n{DOC_SEPARATOR}\n".join(docs) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".xz":
        with lzma.open(path, "wt", encoding="utf-8", preset=1) as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _summary(items: list[dict], field: str) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for it in items:
        counts[str(it[field])] += 1
    return dict(sorted(counts.items()))


SPLITS = ("train", "valid", "test")


def _split_docs(corpus: Path, splits: Sequence[str]) -> tuple[list[str], list[dict]]:
    docs, sources = [], []
    for split in splits:
        if split not in SPLITS:
            raise NestpruneError(f"unknown corpus split {split!r}; choose from {', '.join(SPLITS)}")
        path = corpus / f"{split}.txt.xz"
        docs.extend(read_documents(path))
        sources.append({"split": split, "source": str(path), "sha256": sha256_file(path)})
    return docs, sources


def build_decision_files(corpus: Path, out: Path, n_calib: int, n_eval: int, seed: int = 0, *,
                         calib_splits: Sequence[str] = ("valid",), eval_splits: Sequence[str] = ("test",),
                         **options) -> dict:
    """decision_calib.jsonl (from ``calib_splits``, default valid) and decision_eval.jsonl (from
    ``eval_splits``, default test) under ``out``, plus decision.json describing them. The corpus puts
    each source document in one split, so distinct splits share no document. Evaluating on
    valid+test (calibrating on train, where the proxies learnt the specifics) doubles the items."""
    if set(calib_splits) & set(eval_splits):
        raise NestpruneError(f"calibration and evaluation splits overlap: {sorted(set(calib_splits) & set(eval_splits))}")
    calib_docs, calib_src = _split_docs(corpus, calib_splits)
    eval_docs, eval_src = _split_docs(corpus, eval_splits)
    calib, evals = decision_task(calib_docs, eval_docs, n_calib, n_eval, seed=seed, **options)
    write_jsonl(out / "decision_calib.jsonl", calib)
    write_jsonl(out / "decision_eval.jsonl", evals)
    info = {"task": "identifier cloze", "seed": seed, "options": options,
            "calib": {"sources": calib_src, "items": len(calib),
                      "kinds": _summary(calib, "kind"), "in_context": _summary(calib, "in_context")},
            "eval": {"sources": eval_src, "items": len(evals),
                     "kinds": _summary(evals, "kind"), "in_context": _summary(evals, "in_context")}}
    (out / "decision.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_generation_files(out: Path, n_calib: int, n_eval: int, seed: int = 0, train: Path | None = None,
                           share: float = 0.05, kinds: Sequence[str] = PROBLEM_KINDS) -> dict:
    """generation_calib.jsonl, generation_eval.jsonl and, with ``train``, train_mix.txt.xz (the
    training text with ``share`` of problems mixed in, held-out prompts excluded)."""
    calib, evals = generation_task(n_calib, n_eval, seed=seed, kinds=kinds)
    write_jsonl(out / "generation_calib.jsonl", calib)
    write_jsonl(out / "generation_eval.jsonl", evals)
    info: dict = {"task": "generated problems", "seed": seed, "kinds": list(kinds),
                  "calib": {"items": len(calib), "kinds": _summary(calib, "kind")},
                  "eval": {"items": len(evals), "kinds": _summary(evals, "kind")}}
    if train is not None:
        docs = read_documents(train)
        held_out = [p["prompt"] for p in calib + evals]
        mixed = mix_problems(docs, share, seed=seed + 2, kinds=kinds, exclude=held_out)
        write_documents(out / "train_mix.txt.xz", mixed)
        info["train_mix"] = {"source": str(train), "sha256": sha256_file(train), "share": share,
                             "documents": len(mixed), "problem_blocks": len(mixed) - len(docs)}
    (out / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
