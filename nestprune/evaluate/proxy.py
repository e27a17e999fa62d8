"""Small proxy LLMs trained on real text: what the demo and the quality benchmark prune.

No pretrained LLM can be downloaded here, so nestprune trains its own: a byte-level BPE tokenizer and a
decoder-only model of one of three families, at one of three scales.

Families (``FAMILIES``):
  ``llama-mha``  Llama-2 style: multi-head attention, no biases, untied embeddings.
  ``llama-gqa``  Llama-3 style: grouped-query attention (4 query heads per KV head where the width allows).
  ``qwen3``      Qwen3 style: GQA with per-head RMSNorm on q and k (``q_norm``/``k_norm``).

Scales (``SCALES``):
  ``tiny``  the demo: ~0.5 M parameters, trains in one to two minutes on a laptop CPU.
  ``cpu``   the CPU quality benchmark: ~1 M parameters, a few minutes each on two cores.
  ``gpu``   the GPU quality benchmark: ~35 M parameters (tens of millions), a few minutes on one GPU.

Pipeline: ``prepare_corpus`` (tokenizer + token streams, cached) → ``train_proxy`` (AdamW, cosine schedule
with warmup, bf16 autocast on CUDA, token or time budget, live progress) → an HF directory:
``config.json`` + ``model.safetensors`` + tokenizer files + ``training.json`` (the training record).
Given a seed and a token budget, training on CPU is deterministic.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nestprune.device import resolve_device
from nestprune.errors import NestpruneError
from nestprune.evaluate.tokenizer import train_bpe_tokenizer
from nestprune.io import atomic
from nestprune.io.text import read_documents, sha256_file
from nestprune.rank.calibration import tokenize_documents

RECORD_FILE = "training.json"
CORPUS_FILE = "corpus.json"
TOKENS_FILE = "tokens.safetensors"


# --------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class FamilyPreset:
    """What makes a family: the HF model_type, how many query heads share a KV head, RoPE base."""

    model_type: str
    query_per_kv: int  # 1 = MHA
    rope_theta: float
    rms_norm_eps: float


FAMILIES: dict[str, FamilyPreset] = {
    "llama-mha": FamilyPreset("llama", 1, 10_000.0, 1e-5),
    "llama-gqa": FamilyPreset("llama", 4, 500_000.0, 1e-5),
    "qwen3": FamilyPreset("qwen3", 2, 1_000_000.0, 1e-6),  # q_norm/k_norm come with model_type qwen3
}


@dataclass(frozen=True)
class TrainConfig:
    """How a proxy is trained. ``tokens`` (deterministic) and/or ``seconds`` (wall clock) bound the run."""

    tokens: int | None = 2_000_000
    seconds: float | None = None
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_tokens: int = 65_536  # valid tokens for the final valid loss (non-overlapping windows)
    seed: int = 0


@dataclass(frozen=True)
class ProxySpec:
    """One proxy model: family × shape, plus how to train it."""

    family: str
    scale: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def preset(self) -> FamilyPreset:
        return FAMILIES[self.family]

    @property
    def num_kv_heads(self) -> int:
        q = self.preset.query_per_kv
        while q > 1 and (self.num_heads % q or self.num_heads // q < 2):
            q //= 2  # keep at least two KV heads so a KV-group mode has something to rank
        return self.num_heads // max(q, 1)

    @property
    def name(self) -> str:
        return f"{self.family}-{self.scale}"

    def hf_config(self, tokenizer=None):
        """A transformers config for this proxy (token ids from ``tokenizer`` when given)."""
        from transformers import AutoConfig

        ids: dict[str, Any] = {}
        if tokenizer is not None:
            ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        p = self.preset
        return AutoConfig.for_model(
            p.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=max(512, self.train.seq_len),
            rms_norm_eps=p.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta},
            tie_word_embeddings=False,
            attention_dropout=0.0,
            **ids,
        )

    def decoder_params(self) -> int:
        """Decoder-layer parameters (what parameter sparsity counts; embeddings and lm_head excluded)."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        norms = 2 * d + (2 * hd if self.preset.model_type == "qwen3" else 0)
        return self.num_layers * (attn + 3 * d * self.intermediate_size + norms)


# scale -> (shape, training defaults). Token budgets are what a few minutes buy on each device class.
SCALES: dict[str, tuple[dict[str, int], TrainConfig]] = {
    "tiny": (
        dict(vocab_size=2048, hidden_size=64, num_layers=4, num_heads=4, head_dim=16, intermediate_size=176),
        TrainConfig(tokens=1_000_000, batch_size=16, seq_len=128, lr=3e-3, eval_tokens=32_768),
    ),
    "cpu": (
        dict(vocab_size=2048, hidden_size=96, num_layers=6, num_heads=6, head_dim=16, intermediate_size=256),
        TrainConfig(tokens=1_000_000, batch_size=16, seq_len=128, lr=3e-3, eval_tokens=65_536),
    ),
    "gpu": (
        dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, head_dim=64, intermediate_size=1408),
        TrainConfig(tokens=40_000_000, batch_size=64, seq_len=256, lr=1e-3, eval_tokens=262_144),
    ),
}


def proxy_spec(family: str, scale: str, **train_overrides: Any) -> ProxySpec:
    """The preset proxy ``family`` × ``scale``; keyword arguments override its TrainConfig fields."""
    if family not in FAMILIES:
        raise NestpruneError(f"unknown proxy family {family!r}; choose from {', '.join(FAMILIES)}")
    if scale not in SCALES:
        raise NestpruneError(f"unknown proxy scale {scale!r}; choose from {', '.join(SCALES)}")
    shape, train = SCALES[scale]
    unknown = set(train_overrides) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise NestpruneError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    return ProxySpec(family=family, scale=scale, train=replace(train, **train_overrides), **shape)


# --------------------------------------------------------------------------------------------------
# Corpus: tokenizer + token streams


@dataclass(frozen=True)
class TokenizedCorpus:
    """A tokenizer and the train/valid token streams it produced (EOS between documents)."""

    tokenizer: Any  # transformers PreTrainedTokenizerFast
    train: torch.Tensor  # (n_train,) int64
    valid: torch.Tensor  # (n_valid,) int64
    info: dict[str, Any]


def subset_documents(docs: list[str], max_chars: int | None, seed: int) -> list[str]:
    """A seeded random subset of whole documents holding about ``max_chars`` characters."""
    if max_chars is None or sum(map(len, docs)) <= max_chars:
        return docs
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    picked, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        picked.append(i)
        total += len(docs[i])
    return [docs[i] for i in sorted(picked)]


def prepare_corpus(
    train_path: Path,
    out_dir: Path,
    vocab_size: int,
    valid_path: Path | None = None,
    valid_frac: float = 0.05,
    max_train_chars: int | None = None,
    max_valid_chars: int | None = None,
    tokenizer_chars: int | None = 4_000_000,
    seed: int = 0,
) -> TokenizedCorpus:
    """Train a byte-level BPE on ``train_path`` and tokenise train and valid; cached in ``out_dir``.

    Without ``valid_path`` a seeded ``valid_frac`` of train's documents is held out as valid. The
    ``max_*_chars`` options keep a seeded subset of whole documents (for CPU-sized runs); the tokenizer
    is trained on (at most) ``tokenizer_chars`` characters of the train documents.
    """
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    want = dict(
        train=str(train_path), train_sha256=sha256_file(Path(train_path)),
        valid=str(valid_path) if valid_path else None,
        valid_sha256=sha256_file(Path(valid_path)) if valid_path else None,
        valid_frac=None if valid_path else valid_frac,
        vocab_size=vocab_size, max_train_chars=max_train_chars, max_valid_chars=max_valid_chars,
        tokenizer_chars=tokenizer_chars, seed=seed,
    )
    meta_path = out_dir / CORPUS_FILE
    if meta_path.exists() and (out_dir / TOKENS_FILE).exists():
        info = json.loads(meta_path.read_text())
        if {k: info.get(k) for k in want} == want:
            tok = PreTrainedTokenizerFast.from_pretrained(str(out_dir / "tokenizer"))
            streams = load_file(str(out_dir / TOKENS_FILE))
            return TokenizedCorpus(tok, streams["train"].long(), streams["valid"].long(), info)

    docs = read_documents(Path(train_path))
    if valid_path is not None:
        valid_docs = read_documents(Path(valid_path))
    else:
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_valid = max(1, round(valid_frac * len(docs)))
        if n_valid >= len(docs):
            raise NestpruneError(f"{train_path}: {len(docs)} document(s) are too few to hold out a valid split")
        held = set(order[:n_valid])
        valid_docs = [d for i, d in enumerate(docs) if i in held]
        docs = [d for i, d in enumerate(docs) if i not in held]
    train_docs = subset_documents(docs, max_train_chars, seed)
    valid_docs = subset_documents(valid_docs, max_valid_chars, seed)
    if not train_docs or not valid_docs:
        raise NestpruneError(f"{train_path}: no text to train on")

    t0 = time.perf_counter()
    tok_docs = subset_documents(train_docs, tokenizer_chars, seed + 1)
    tokenizer = train_bpe_tokenizer(tok_docs, vocab_size=vocab_size)
    train_ids = tokenize_documents(train_docs, tokenizer)
    valid_ids = tokenize_documents(valid_docs, tokenizer)
    info = dict(
        want,
        train_documents=len(train_docs), train_chars=sum(map(len, train_docs)), train_tokens=len(train_ids),
        valid_documents=len(valid_docs), valid_chars=sum(map(len, valid_docs)), valid_tokens=len(valid_ids),
        seconds=round(time.perf_counter() - t0, 2),
    )
    with atomic.output_dir(out_dir, force=True, inputs=(train_path, valid_path)) as tmp:  # a cache: replaced
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        save_file({"train": train_ids.to(torch.int32), "valid": valid_ids.to(torch.int32)}, str(tmp / TOKENS_FILE),
                  metadata={"format": "pt"})
        (tmp / CORPUS_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return TokenizedCorpus(tokenizer, train_ids, valid_ids, info)


# --------------------------------------------------------------------------------------------------
# Training


def lr_at(frac: float, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_frac`` of the run, then cosine decay to ``min_lr_frac`` · lr."""
    if cfg.warmup_frac > 0 and frac < cfg.warmup_frac:
        return cfg.lr * frac / cfg.warmup_frac
    t = min(1.0, (frac - cfg.warmup_frac) / max(1e-9, 1.0 - cfg.warmup_frac))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len`` tokens. (B, T)"""
    if len(stream) <= seq_len:
        raise NestpruneError(f"{len(stream)} training tokens are fewer than one window of {seq_len}")
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=g)
    return stream[starts[:, None] + torch.arange(seq_len)]  # (B, T)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch of windows (every token labelled)."""
    logits = model(input_ids=ids).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def valid_loss(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, max_tokens: int,
               batch_size: int = 16) -> float:
    """Mean next-token loss over non-overlapping ``seq_len`` windows of the first ``max_tokens`` tokens."""
    device = next(model.parameters()).device
    n = min(len(stream), max_tokens) // seq_len
    if n == 0:
        raise NestpruneError(f"valid split has {len(stream)} tokens, fewer than one window of {seq_len}")
    windows = stream[: n * seq_len].view(n, seq_len)  # (n, T)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        ids = windows[i : i + batch_size].to(device)
        with _autocast(device):
            loss = lm_loss(model, ids)
        k = ids.shape[0] * (seq_len - 1)
        total += float(loss) * k
        count += k
    model.train(was_training)
    return total / count


# bench/quality.py and bench/task_aligned.py import it under this name
pick_device = resolve_device


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("step {task.fields[step]}  loss {task.fields[loss]:.3f}  "
                   "{task.fields[tokens]:,} tok  {task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )


@dataclass(frozen=True)
class TrainRecord:
    """What ``training.json`` holds."""

    name: str
    family: str
    scale: str
    model_type: str
    parameters: int
    decoder_parameters: int
    tokens: int
    steps: int
    train_loss: float  # mean of the last 5% of steps
    valid_loss: float
    valid_ppl: float
    seconds: float
    tokens_per_second: float
    device: str
    torch_version: str
    train: dict[str, Any]
    corpus: dict[str, Any]


def train_proxy(
    spec: ProxySpec,
    corpus: TokenizedCorpus,
    out_dir: Path,
    device: str = "auto",
    progress: bool = True,
) -> TrainRecord:
    """Train ``spec`` on ``corpus`` and save an HF directory to ``out_dir`` (written atomically)."""
    from transformers import AutoModelForCausalLM

    cfg = spec.train
    if cfg.tokens is None and cfg.seconds is None:
        raise NestpruneError("give a token budget, a time budget or both")
    if len(corpus.tokenizer) > spec.vocab_size:
        raise NestpruneError(f"tokenizer has {len(corpus.tokenizer)} tokens, more than the model's "
                             f"vocab_size {spec.vocab_size}")
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(spec.hf_config(corpus.tokenizer), attn_implementation="sdpa")
    model.to(dev).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, fused=dev.type == "cuda",
    )
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.Generator().manual_seed(cfg.seed)
    per_step = cfg.batch_size * cfg.seq_len
    max_steps = cfg.tokens // per_step if cfg.tokens is not None else None
    if max_steps is not None and max_steps < 1:
        raise NestpruneError(f"token budget {cfg.tokens} is less than one batch ({per_step} tokens)")
    train_stream = corpus.train

    losses: list[float] = []
    step, t0 = 0, time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task(f"train {spec.name}", total=1.0, step=0, loss=float("nan"), tokens=0, tps=0.0)
        log_lines, next_line = progress and not bar.console.is_terminal, 0.1
        while True:
            elapsed = time.perf_counter() - t0
            frac = 0.0
            if max_steps is not None:
                frac = step / max_steps
            if cfg.seconds is not None:
                frac = max(frac, elapsed / cfg.seconds)
            if frac >= 1.0:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(frac, cfg)
            ids = sample_batch(train_stream, cfg.batch_size, cfg.seq_len, g).to(dev, non_blocking=True)
            with _autocast(dev):
                loss = lm_loss(model, ids)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0 or step < 10 or (max_steps is not None and step == max_steps):
                losses_val = float(loss.detach())  # syncs with the device only every few steps
                losses.append(losses_val)
                elapsed = time.perf_counter() - t0
                frac = max(step / max_steps if max_steps else 0.0, elapsed / cfg.seconds if cfg.seconds else 0.0)
                bar.update(task, completed=min(1.0, frac), step=step, loss=losses_val,
                           tokens=step * per_step, tps=step * per_step / max(elapsed, 1e-9))
                if log_lines and frac >= next_line:  # no live display (a log file): a line every 10 %
                    next_line += 0.1
                    eta = elapsed / max(frac, 1e-9) * (1 - frac)
                    bar.console.print(f"  {spec.name}: {frac:4.0%}  step {step}  loss {losses_val:.3f}  "
                                      f"{step * per_step:,} tokens  {step * per_step / max(elapsed, 1e-9):,.0f} "
                                      f"tok/s  ETA {eta:.0f}s")
        seconds = time.perf_counter() - t0
        bar.update(task, completed=1.0)

    tail = losses[-max(1, len(losses) // 20):] if losses else [float("nan")]
    v_loss = valid_loss(model, corpus.valid, cfg.seq_len, cfg.eval_tokens)
    record = TrainRecord(
        name=spec.name, family=spec.family, scale=spec.scale, model_type=spec.preset.model_type,
        parameters=sum(p.numel() for p in model.parameters()), decoder_parameters=spec.decoder_params(),
        tokens=step * per_step, steps=step, train_loss=round(sum(tail) / len(tail), 4),
        valid_loss=round(v_loss, 4), valid_ppl=round(math.exp(v_loss), 3),
        seconds=round(seconds, 1), tokens_per_second=round(step * per_step / max(seconds, 1e-9), 1),
        device=device_name(dev), torch_version=torch.__version__,
        train=asdict(cfg), corpus=corpus.info,
    )
    save_proxy(model, corpus.tokenizer, record, Path(out_dir))
    return record


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def save_proxy(model: torch.nn.Module, tokenizer, record: TrainRecord, out_dir: Path) -> Path:
    """Write model (safetensors, fp32), tokenizer and ``training.json`` atomically (replacing ``out_dir``)."""
    model = model.float().cpu().eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic.output_dir(out_dir, force=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / RECORD_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")
    return out_dir


def read_record(model_dir: Path) -> dict[str, Any] | None:
    """The training record of a proxy directory, or None if it holds none."""
    p = Path(model_dir) / RECORD_FILE
    return json.loads(p.read_text()) if p.exists() else None


def load_or_train_proxy(spec: ProxySpec, corpus: TokenizedCorpus, out_dir: Path, device: str = "auto",
                        progress: bool = True) -> dict[str, Any]:
    """Reuse ``out_dir`` if it holds a proxy trained with the same spec and corpus; else train one."""
    rec = read_record(out_dir)
    if rec is not None and (Path(out_dir) / "config.json").exists():
        same_train = rec.get("train") == json.loads(json.dumps(asdict(spec.train)))
        same_corpus = rec.get("corpus", {}).get("train_sha256") == corpus.info.get("train_sha256") and \
            rec.get("corpus", {}).get("train_tokens") == corpus.info.get("train_tokens")
        if rec.get("name") == spec.name and same_train and same_corpus:
            return rec
    return asdict(train_proxy(spec, corpus, out_dir, device=device, progress=progress))
