"""The base tokenizer as GGUF metadata (``tokenizer.ggml.*``), from an HF ``tokenizer.json``.

Two kinds, as llama.cpp's converter writes them:

``gpt2``   byte-level BPE (GPT-2, Llama 3, Qwen2/3, the byte-level BPE nestprune trains for tests): the
           tokens in their byte-level spelling, the merges, and ``tokenizer.ggml.pre`` naming the
           pre-tokenizer regex that llama.cpp implements. It is recognised from tokenizer.json's own
           regex (``PRE_TOKENIZERS``); any other is refused unless named with ``tokenizer_pre``.
``llama``  SentencePiece-style BPE with byte fallback (Llama 2, Mistral, as HF saves them): the pieces,
           their types (``<0xNN>`` bytes, control, unknown) and scores that make llama.cpp's SentencePiece
           merge order the tokenizer's merge order (score of a piece = −rank of the merge that makes it).

Special token ids and the chat template come from tokenizer_config.json / chat_template.jinja (read by the
``gguf`` package's ``SpecialVocab``); whether BOS/EOS are added is read from what the tokenizer itself
does, so that llama.cpp tokenizes a prompt the way transformers does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestprune.errors import NestpruneError

# The pre-tokenizer regexes of tokenizer.json that llama.cpp implements natively, by its name for them.
PRE_TOKENIZERS: dict[str, str] = {
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType


@dataclass(frozen=True)
class GgufVocab:
    model: str  # "gpt2" | "llama"
    pre: str
    tokens: tuple[str, ...]
    types: tuple[int, ...]
    scores: tuple[float, ...] | None  # llama only
    merges: tuple[str, ...] | None  # gpt2 only
    special_ids: dict[str, int]  # bos, eos, unk, pad, …
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None  # llama only
    chat_template: Any  # str, list of {name, template}, or None


def flatten(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A tokenizer.json component, with ``Sequence`` nodes flattened."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [x for child in node.get(key, []) for x in flatten(child, key)]
    return [node]


def byte_level_pre(tj: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json (or refuse)."""
    steps = flatten(tj.get("pre_tokenizer"), "pretokenizers")
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    splits = [s for s in steps if s.get("type") == "Split"]
    if len(byte_level) != 1 or len(steps) != len(byte_level) + len(splits) or len(splits) > 1:
        raise NestpruneError(f"the tokenizer's pre-tokenizer ({', '.join(s.get('type', '?') for s in steps) or 'none'}) "
                             "is not one llama.cpp implements; name it with --tokenizer-pre")
    if byte_level[0].get("add_prefix_space"):
        raise NestpruneError("the tokenizer adds a prefix space (ByteLevel add_prefix_space), which llama.cpp's "
                             "byte-level BPE does not; name a pre-tokenizer with --tokenizer-pre to write it anyway")
    if not splits:
        if not byte_level[0].get("use_regex", True):
            raise NestpruneError("the tokenizer's byte-level pre-tokenizer uses no regex; name one with --tokenizer-pre")
        return "gpt-2"
    pattern = (splits[0].get("pattern") or {}).get("Regex")
    if pattern not in PRE_TOKENIZERS:
        raise NestpruneError(f"the tokenizer's pre-tokenizer regex {pattern!r} is not one llama.cpp implements "
                             "(gpt-2, llama-bpe, qwen2); name llama.cpp's equivalent with --tokenizer-pre")
    return PRE_TOKENIZERS[pattern]


def space_prefix(tj: dict[str, Any]) -> bool:
    """Does a SentencePiece-style tokenizer.json put "▁" before the text (llama.cpp: add_space_prefix)?"""
    for n in flatten(tj.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            return True
    for p in flatten(tj.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
    return False


def merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for m in model.get("merges") or []:
        a, b = (m.split(" ", 1) if isinstance(m, str) else m)
        pairs.append((a, b))
    return pairs


def read_vocab(aux_dir: Path, vocab_size: int, tokenizer_pre: str | None = None) -> GgufVocab:
    """The tokenizer of ``aux_dir`` as GGUF vocab metadata, padded to the model's ``vocab_size``."""
    import gguf

    path = Path(aux_dir) / "tokenizer.json"
    if not path.is_file():
        raise NestpruneError(f"{aux_dir} has no tokenizer.json; the GGUF export converts HF fast tokenizers "
                             "(save the tokenizer with transformers to get one)")
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise NestpruneError(f"{path} is not valid JSON ({e})") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise NestpruneError(f"the tokenizer is a {model.get('type')} model; the GGUF export converts BPE tokenizers "
                             "(byte-level or SentencePiece-style)")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise NestpruneError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    spm = bool(model.get("byte_fallback"))
    unk = model.get("unk_token")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        t = by_id[i]
        tokens.append(t)
        if i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif spm and t == unk:
            types.append(UNKNOWN)
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    pairs = merge_pairs(model)
    scores = merges = None
    if spm:
        model_name, pre, prefix = "llama", tokenizer_pre or "default", space_prefix(tj)
        score = [0.0] * vocab_size
        seen: set[int] = set()
        for rank, (a, b) in enumerate(pairs):
            i = vocab.get(a + b)
            if i is not None and i not in seen:
                seen.add(i)
                score[i] = -float(rank + 1)
        scores = tuple(score)
    else:
        if (tj.get("decoder") or {}).get("type") != "ByteLevel":
            raise NestpruneError("the tokenizer is neither byte-level BPE nor SentencePiece-style BPE with byte "
                                 "fallback; the GGUF export cannot convert it")
        model_name, pre, prefix = "gpt2", tokenizer_pre or byte_level_pre(tj), None
        merges = tuple(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in p)
                       for p in pairs)
    special = gguf.SpecialVocab(Path(aux_dir), load_merges=False, n_vocab=vocab_size)
    add_bos, add_eos = adds_specials(Path(aux_dir), special.special_token_ids)
    return GgufVocab(model=model_name, pre=pre, tokens=tuple(tokens), types=tuple(types), scores=scores,
                     merges=merges, special_ids=dict(special.special_token_ids), add_bos=add_bos, add_eos=add_eos,
                     add_space_prefix=prefix, chat_template=special.chat_template)


def adds_specials(aux_dir: Path, special_ids: dict[str, int]) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what the transformers tokenizer does to a plain text."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(aux_dir))
    except Exception as e:
        raise NestpruneError(f"cannot load the tokenizer of {aux_dir}: {str(e).splitlines()[0]}") from None
    ids = list(tok("a b", add_special_tokens=True)["input_ids"])
    plain = list(tok("a b", add_special_tokens=False)["input_ids"])
    bos, eos = special_ids.get("bos"), special_ids.get("eos")
    add_bos = bos is not None and len(ids) > len(plain) and ids[0] == bos
    add_eos = eos is not None and len(ids) > len(plain) and ids[-1] == eos
    return add_bos, add_eos


def add_vocab(w: Any, v: GgufVocab) -> None:
    """Write the vocab's ``tokenizer.ggml.*`` keys into a ``gguf.GGUFWriter``."""
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(list(v.tokens))
    w.add_token_types(list(v.types))
    if v.scores is not None:
        w.add_token_scores(list(v.scores))
    if v.merges is not None:
        w.add_token_merges(list(v.merges))
    for kind, tid in sorted(v.special_ids.items()):
        handler = getattr(w, f"add_{kind}_token_id", None)
        if handler is not None:
            handler(int(tid))
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        w.add_chat_template(v.chat_template)
