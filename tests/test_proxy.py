"""Proxy LLMs: presets, corpus cache, a few training steps that lower the loss, saved dirs that load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nestprune.errors import NestpruneError
from nestprune.evaluate.proxy import (
    FAMILIES,
    SCALES,
    ProxySpec,
    TrainConfig,
    lr_at,
    prepare_corpus,
    proxy_spec,
    read_record,
    train_proxy,
)

WORDS = ("the kernel maps each page of memory into the process while python reads the file in order "
         "and every module imports a function that returns a list of strings").split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A few KB of documents in the corpus format (``<|doc|>`` separators)."""
    docs = []
    for d in range(24):
        sentences = [" ".join(WORDS[(d * 3 + s * 5 + k) % len(WORDS)] for k in range(12)) + "."
                     for s in range(6)]
        docs.append("\n".join(sentences))
    p = tmp_path_factory.mktemp("text") / "train.txt"
    p.write_text("\n<|doc|>\n".join(docs) + "\n")
    return p


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus") / "c"


@pytest.fixture(scope="module")
def corpus(text_file, corpus_dir):
    return prepare_corpus(text_file, corpus_dir, vocab_size=300, valid_frac=0.2)


def micro_spec(family: str = "llama-gqa", **train) -> ProxySpec:
    cfg = dict(tokens=30 * 8 * 32, batch_size=8, seq_len=32, lr=1e-2, warmup_frac=0.1, eval_tokens=512)
    cfg.update(train)
    return ProxySpec(family=family, scale="test", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4,
                     head_dim=8, intermediate_size=48, train=TrainConfig(**cfg))


def test_presets_build_configs():
    for family in FAMILIES:
        for scale in SCALES:
            spec = proxy_spec(family, scale)
            cfg = spec.hf_config()
            assert cfg.model_type == FAMILIES[family].model_type
            assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
            assert (cfg.num_key_value_heads < cfg.num_attention_heads) == (family != "llama-mha")
    assert proxy_spec("llama-gqa", "gpu").decoder_params() > 10_000_000
    with pytest.raises(NestpruneError, match="unknown proxy family"):
        proxy_spec("gpt2", "tiny")
    with pytest.raises(NestpruneError, match="unknown training option"):
        proxy_spec("qwen3", "tiny", epochs=3)


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_frac=0.1, min_lr_frac=0.1)
    assert lr_at(0.0, cfg) == 0.0
    assert lr_at(0.05, cfg) == pytest.approx(0.5)
    assert lr_at(0.1, cfg) == pytest.approx(1.0)
    assert lr_at(1.0, cfg) == pytest.approx(0.1)
    assert lr_at(0.3, cfg) > lr_at(0.6, cfg) > lr_at(0.9, cfg)


def test_corpus_split_and_cache(corpus, corpus_dir, text_file, tmp_path):
    assert corpus.info["train_documents"] + corpus.info["valid_documents"] == 24
    assert corpus.info["valid_documents"] == 5
    assert len(corpus.train) == corpus.info["train_tokens"] and len(corpus.valid) == corpus.info["valid_tokens"]
    stamp = (corpus_dir / "tokens.safetensors").stat().st_mtime_ns
    cached = prepare_corpus(text_file, corpus_dir, vocab_size=300, valid_frac=0.2)
    assert (corpus_dir / "tokens.safetensors").stat().st_mtime_ns == stamp  # read back, not rebuilt
    assert torch.equal(cached.train, corpus.train) and torch.equal(cached.valid, corpus.valid)
    fresh = prepare_corpus(text_file, tmp_path / "fresh", vocab_size=300, valid_frac=0.2)  # same seed, same tokens
    assert torch.equal(fresh.train, corpus.train)
    other = prepare_corpus(text_file, corpus_dir, vocab_size=280, valid_frac=0.2)  # new settings: rebuilt
    assert len(other.tokenizer) == 280


def test_training_lowers_loss_and_saves_a_loadable_hf_dir(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "proxy"
    rec = train_proxy(micro_spec(), corpus, out, device="cpu", progress=False)
    initial = torch.log(torch.tensor(300.0)).item()  # a uniform guess over the vocabulary
    assert rec.steps == 30 and rec.tokens == 30 * 8 * 32
    assert rec.train_loss < initial - 1.0
    assert rec.valid_loss < initial - 1.0
    saved = read_record(out)
    assert saved["steps"] == 30 and saved["device"].startswith("cpu")
    assert {"tokens", "steps", "train_loss", "valid_loss", "seconds", "device"} <= set(saved)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert model.config.num_key_value_heads == 2
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "the kernel maps each page of memory."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 300) and torch.isfinite(logits).all()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_same_seed_same_weights(corpus, tmp_path):
    spec = micro_spec("qwen3", tokens=5 * 8 * 32)
    a = train_proxy(spec, corpus, tmp_path / "a", device="cpu", progress=False)
    b = train_proxy(spec, corpus, tmp_path / "b", device="cpu", progress=False)
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and any("q_norm" in k for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert a.train_loss == b.train_loss
    c = train_proxy(micro_spec("qwen3", tokens=5 * 8 * 32, seed=1), corpus, tmp_path / "c", device="cpu",
                    progress=False)
    assert c.train_loss != a.train_loss


def test_budget_must_exist(corpus, tmp_path):
    with pytest.raises(NestpruneError, match="budget"):
        train_proxy(micro_spec(tokens=None), corpus, tmp_path / "x", progress=False)
    with pytest.raises(NestpruneError, match="less than one batch"):
        train_proxy(micro_spec(tokens=10), corpus, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_retraining_replaces_the_proxy_with_no_moment_where_it_is_missing(corpus, tmp_path, monkeypatch):
    from test_atomic import record_states

    out = tmp_path / "proxy"
    train_proxy(micro_spec(tokens=8 * 32), corpus, out, device="cpu", progress=False)
    seen = record_states(monkeypatch, lambda: (out / "model.safetensors").exists() and (out / "training.json").exists())
    rec = train_proxy(micro_spec(tokens=2 * 8 * 32), corpus, out, device="cpu", progress=False)
    assert seen and all(seen), seen
    assert read_record(out)["steps"] == rec.steps == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proxy"]


def test_an_unknown_device_is_one_clear_error(corpus, tmp_path):
    with pytest.raises(NestpruneError, match="unknown --device 'gpu0'"):
        train_proxy(micro_spec(), corpus, tmp_path / "x", device="gpu0", progress=False)
    assert not (tmp_path / "x").exists()
