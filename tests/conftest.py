"""Shared fixtures: tiny random models of every family saved as HF directories (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SAMPLE_TEXT = "\n\n".join(
    " ".join(f"{w}{(i * 7 + j) % 13}" for j, w in enumerate(
        "the kernel maps each page of memory into the process and python reads the file in order".split()))
    for i in range(60)
)

FAMILY_CONFIGS = {
    # name: (model_type, extra config)
    "llama": ("llama", {}),
    "llama-gqa": ("llama", {"num_key_value_heads": 2}),
    "mistral": ("mistral", {"num_key_value_heads": 2}),
    "qwen2": ("qwen2", {"num_key_value_heads": 2}),
    "qwen3": ("qwen3", {"num_key_value_heads": 2, "head_dim": 8}),
    # fused qkv_proj / gate_up_proj; token ids inside the tiny vocabulary
    "phi3": ("phi3", {"num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    # head_dim 16 != hidden/heads 8; sliding-window layers that matter on 24-token prompts; soft-capping that bites
    "gemma2": ("gemma2", {"num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                          "attn_logit_softcapping": 0.02, "final_logit_softcapping": 0.5}),
    # + q/k norms, sliding/full layers alternating, tied embeddings (as Gemma-3: no attention soft-capping)
    "gemma3": ("gemma3_text", {"num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
                               "sliding_window": 8, "sliding_window_pattern": 2, "final_logit_softcapping": 0.5,
                               "tie_word_embeddings": True}),
}
# attention implementations each tiny model can run exactly (SDPA cannot soft-cap attention logits)
ATTN_IMPLEMENTATIONS = {name: ("eager",) if extra.get("attn_logit_softcapping") else ("eager", "sdpa")
                        for name, (_, extra) in FAMILY_CONFIGS.items()}


@pytest.fixture(scope="session")
def tokenizer():
    from nestprune.evaluate.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([SAMPLE_TEXT], vocab_size=300)


def make_tiny_model(name: str, seed: int = 0, num_layers: int = 4, vocab_size: int = 300, **overrides):
    """A tiny random causal LM of family ``name`` (see FAMILY_CONFIGS), fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILY_CONFIGS[name]
    cfg = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    cfg.update(extra)
    cfg.update(overrides)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # give biases and norms non-trivial values so slicing errors show
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tiny_model(model, tokenizer, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """Factory: tiny_model_dir("llama-gqa") -> Path of a saved HF directory."""

    def make(name: str = "llama", seed: int = 0, **overrides) -> Path:
        model = make_tiny_model(name, seed=seed, vocab_size=len(tokenizer), **overrides)
        return save_tiny_model(model, tokenizer, tmp_path / f"{name}-{seed}")

    return make


@pytest.fixture
def sample_text_file(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(SAMPLE_TEXT)
    return p
