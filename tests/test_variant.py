"""Loading variants: fp32 logits equal the masked base model's, for every family, layout and GQA mode."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ATTN_IMPLEMENTATIONS
from safetensors import safe_open
from test_slicing import synthetic_ranking

from nestprune.arch import Structures, arch_from_config
from nestprune.io.weights import SafetensorsSource
from nestprune.rank.mask import apply_masks_, mask_model_
from nestprune.variant.load import EmptyAttention, load_variant
from nestprune.variant.materialize import materialize_variant
from nestprune.variant.verify import fixed_prompts, spec_masks
from nestprune.variant.widths import plan_variant

FAMILIES = ["llama", "llama-gqa", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]


def model_arch(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as h:
        names = set(h.keys())
    return arch_from_config(json.loads((model_dir / "config.json").read_text()), names)


def base_decoder_params(model_dir) -> int:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as h:
        return sum(h.get_tensor(k).numel() for k in h.keys() if k.startswith("model.layers."))


def ranking_for(model_dir, mode="query", seed=0, **kw):
    return synthetic_ranking(model_arch(model_dir), mode, seed=seed,
                             decoder_params=base_decoder_params(model_dir), **kw)


def write_variant(model_dir, ranking, out, sparsity, layout="per-layer", multiple_of=None, **kw):
    spec = plan_variant(ranking, sparsity, layout, multiple_of)
    with SafetensorsSource(model_dir) as src:
        materialize_variant(src, ranking, spec, model_dir, out, **kw)
    return spec


def reference(model_dir, spec, ranking=None, attn="eager"):
    """Base model in fp32 with the dropped structures zeroed (the lead's prefix mask when exact)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    if ranking is not None:
        mask_model_(model, ranking, spec.prefix_len)
    else:
        apply_masks_(model, spec.structures, spec_masks(spec))
    return model


@torch.no_grad()
def assert_same_logits(variant, ref, vocab):
    ids = fixed_prompts(vocab)
    a, b = variant(input_ids=ids).logits, ref(input_ids=ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5


@torch.no_grad()
def assert_same_generation(variant, ref, vocab):
    ids = fixed_prompts(vocab)[:2, :6]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = variant.generate(ids, **kw)
    assert out.shape == (2, 10)
    assert torch.equal(out, ref.generate(ids, **kw))


CASES = [(f, layout, mode) for f in FAMILIES for layout in ("per-layer", "uniform")
         for mode in (("query",) if f == "llama" else ("query", "group"))]


@pytest.mark.parametrize("family,layout,mode", CASES)
def test_equivalence_per_family_layout_mode(tiny_model_dir, tmp_path, family, layout, mode):
    base = tiny_model_dir(family)
    ranking = ranking_for(base, mode, seed=18, prunable_layers=[1, 2])  # seed 18: a K/V gather layer in every GQA family
    spec = write_variant(base, ranking, tmp_path / "v", 0.3, layout)
    assert 0.3 <= spec.achieved_sparsity or layout == "uniform"
    for attn in ATTN_IMPLEMENTATIONS[family]:
        variant = load_variant(tmp_path / "v", dtype=torch.float32, attn_implementation=attn)
        ref = reference(base, spec, ranking if layout == "per-layer" else None, attn)
        assert_same_logits(variant, ref, spec.arch.vocab_size)
    assert_same_generation(variant, ref, spec.arch.vocab_size)  # sdpa (eager if none); eager: the tests below
    # the variant really is smaller (K/V gathered per query head at load add to the count in memory)
    n = sum(p.numel() for p in variant.parameters())
    gathered = any(k.num_heads and not k.uniform_groups for k in spec.layers)
    assert (n > spec.total_params) if gathered else (n == spec.total_params)
    assert n < sum(p.numel() for p in ref.parameters())


def test_uniform_loads_with_plain_from_pretrained(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("mistral")
    ranking = ranking_for(base, "query", seed=3, prunable_layers=[1, 2])
    spec = write_variant(base, ranking, tmp_path / "u", 0.35, "uniform")
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    assert "nestprune" not in cfg and cfg["head_dim"] == 8
    assert cfg["num_key_value_heads"] == 2 and cfg["num_attention_heads"] == spec.layers[0].num_heads
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "u"), dtype=torch.float32).eval()
    assert model.model.layers[0].mlp.gate_proj.out_features == spec.layers[0].intermediate_size
    assert_same_logits(model, reference(base, spec), spec.arch.vocab_size)


def test_query_mode_gather_and_groups(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama-gqa")  # 4 query heads, 2 KV heads: group g = heads 2g, 2g+1
    first = [(1, "head", 0), (2, "head", 0), (2, "head", 2), (3, "head", 0), (3, "head", 1)]
    ranking = ranking_for(base, "query", seed=2, first=first, prunable_layers=[1, 2, 3])
    spec = write_variant(base, ranking, tmp_path / "v", float(ranking.sparsity_curve()[5]))
    assert spec.prefix_len == 5
    for impl in ("eager", "sdpa"):
        variant = load_variant(tmp_path / "v", attn_implementation=impl)
        attn = [layer.self_attn for layer in variant.model.layers]
        assert attn[0].num_key_value_groups == 2 and attn[0].k_proj.out_features == 2 * 8
        assert attn[1].num_key_value_groups == 1 and attn[1].k_proj.out_features == 3 * 8  # gathered per head
        assert attn[2].num_key_value_groups == 1 and attn[2].k_proj.out_features == 2 * 8  # one head per group
        assert attn[3].num_key_value_groups == 2 and attn[3].k_proj.out_features == 1 * 8  # group 0 dropped
        ref = reference(base, spec, ranking, impl)
        assert_same_logits(variant, ref, spec.arch.vocab_size)
        assert_same_generation(variant, ref, spec.arch.vocab_size)


def test_save_pretrained_of_a_loaded_variant_round_trips(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama-gqa")
    ranking = ranking_for(base, "query", seed=2, first=[(1, "head", 0)], prunable_layers=[1, 2])
    spec = write_variant(base, ranking, tmp_path / "v", float(ranking.sparsity_curve()[1]))
    variant = load_variant(tmp_path / "v")
    assert variant.model.layers[1].self_attn.k_proj.out_features == 3 * 8  # gathered
    variant.save_pretrained(str(tmp_path / "saved"))
    again = load_variant(tmp_path / "saved")
    assert again.model.layers[1].self_attn.k_proj.out_features == 3 * 8
    assert_same_logits(again, reference(base, spec, ranking), spec.arch.vocab_size)


@pytest.mark.parametrize("family,mode", [("llama", "query"), ("qwen2", "query"), ("qwen3", "group"), ("phi3", "query"),
                                         ("gemma2", "group"), ("gemma3", "query")])
def test_layer_with_no_heads_and_layer_with_no_channels(tiny_model_dir, tmp_path, family, mode):
    base = tiny_model_dir(family)
    arch = model_arch(base)
    units = Structures(arch, mode).attention_units
    kind = Structures(arch, mode).attention_kind
    first = [(0, kind, u) for u in range(units)] + [(2, "channel", j) for j in range(arch.intermediate_size)]
    ranking = ranking_for(base, mode, seed=1, first=first)
    spec = write_variant(base, ranking, tmp_path / "v", float(ranking.sparsity_curve()[len(first)]))
    assert spec.layers[0].num_heads == 0 and spec.layers[2].intermediate_size == 0
    for attn in ATTN_IMPLEMENTATIONS[family]:
        variant = load_variant(tmp_path / "v", attn_implementation=attn)
        assert isinstance(variant.model.layers[0].self_attn, EmptyAttention)
        assert variant.model.layers[2].mlp.down_proj.in_features == 0
        ref = reference(base, spec, ranking, attn)
        assert_same_logits(variant, ref, arch.vocab_size)
        assert_same_generation(variant, ref, arch.vocab_size)  # layer 0 empty: cache length must still be right


def test_tied_embeddings_and_dtype(tiny_model_dir, tmp_path):
    base = tiny_model_dir("qwen2", tie_word_embeddings=True)
    ranking = ranking_for(base, "group", seed=4, prunable_layers=[1, 2])
    spec = write_variant(base, ranking, tmp_path / "v", 0.2)
    variant = load_variant(tmp_path / "v")
    assert variant.lm_head.weight.data_ptr() == variant.model.embed_tokens.weight.data_ptr()
    assert_same_logits(variant, reference(base, spec, ranking), spec.arch.vocab_size)
    half = load_variant(tmp_path / "v", dtype=torch.bfloat16)
    assert half.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert half.model.rotary_emb.inv_freq.dtype == torch.float32


def test_plain_directory_loads_through_load_variant(tiny_model_dir):
    base = tiny_model_dir("llama")
    model = load_variant(base, dtype=torch.float32)
    assert not model.training and model.model.layers[0].self_attn.q_proj.out_features == 32


def test_load_variant_is_exported_lazily():
    import nestprune

    assert nestprune.load_variant is load_variant
