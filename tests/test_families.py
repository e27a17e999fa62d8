"""The family table (arch.py) against the real transformers models, and what the new families need:
Phi-3's fused tensors, Gemma-2/3's explicit head_dim, extra norms, soft-capping and tied embeddings."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from conftest import ATTN_IMPLEMENTATIONS, FAMILY_CONFIGS, make_tiny_model
from safetensors.torch import load_file
from test_variant import assert_same_logits, model_arch, ranking_for, reference, write_variant

from nestprune.arch import (
    FAMILIES,
    ArchInfo,
    arch_from_config,
    decoder_param_count,
    family_for,
    join_segments,
    needs_eager_attention,
)
from nestprune.build import BuildConfig, build_artifact
from nestprune.errors import NestpruneError
from nestprune.variant.load import load_variant
from nestprune.variant.materialize import materialize

NEW = ["phi3", "gemma2", "gemma3"]
# every optional tensor switched on where the family has a config flag for it
WITH_BIASES = [("llama", {"attention_bias": True, "mlp_bias": True}), ("qwen2", {}), ("qwen3", {"attention_bias": True}),
               ("gemma2", {"attention_bias": True}), ("gemma3", {"attention_bias": True})]


def _arch(model) -> ArchInfo:
    return arch_from_config(model.config.to_dict(), {n for n, _ in model.named_parameters()})


# --- the table is complete and consistent ---------------------------------------------------------------

@pytest.mark.parametrize("name,extra", [(f, {}) for f in FAMILY_CONFIGS] + WITH_BIASES)
def test_table_names_every_tensor_of_a_layer(name, extra):
    model = make_tiny_model(name, num_layers=2, vocab_size=64, **extra)
    arch = _arch(model)
    params = dict(model.named_parameters())
    prefix = arch.fam.layer_prefix.format(1)
    in_layer = {n.removeprefix(prefix): tuple(p.shape) for n, p in params.items() if n.startswith(prefix)}
    assert set(arch.layer_tensor_names()) == set(in_layer)
    for s in arch.slices():
        assert arch.tensor_shape(s) == in_layer[s.name], s
    for t in arch.fixed_tensors():
        assert arch.fixed_shape(t) == in_layer[t.name], t
    assert arch.layer_params() * arch.num_layers == decoder_param_count(model, arch)
    # the config flags alone imply the same optional tensors as the weights
    assert arch_from_config(model.config.to_dict()) == arch
    # every module path the family names exists
    layer = model.get_submodule(arch.fam.layers_path)[0]
    assert layer.get_submodule(arch.fam.attention) is not None and layer.get_submodule(arch.fam.mlp) is not None
    for module in arch.fam.output_modules:
        assert isinstance(layer.get_submodule(module), torch.nn.Linear)
    assert set(arch.linear_shapes()) == {s.module for s in arch.slices() if not s.is_bias}


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_entries_are_well_formed(fam):
    keys = [(s.name, s.part) for s in fam.slices]
    assert len(keys) == len(set(keys)), "a segment is listed twice"
    for name in dict.fromkeys(s.name for s in fam.slices):
        segs = [s for s in fam.slices if s.name == name]
        assert len({s.axis for s in segs}) == 1 and len({s.space == "mlp" for s in segs}) == 1, name
        assert len(segs) == 1 or all(s.part for s in segs), f"fused {name} needs segment labels"
    assert fam.output_slice("q").axis == 1 and fam.output_slice("mlp").axis == 1
    assert not {s.name for s in fam.slices} & {t.name for t in fam.fixed}
    assert all(family_for(t) is fam for t in fam.model_types)


def test_model_types_are_unique_and_unknown_ones_are_refused():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))
    with pytest.raises(NestpruneError, match="gemma3_text"):
        family_for("gemma3")  # the multimodal wrapper: use its text model


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])
def test_stock_head_counts_are_what_transformers_accepts(fam):
    from transformers import AutoConfig

    arch = arch_from_config({"model_type": fam.model_types[0], "hidden_size": 64, "num_attention_heads": 8,
                             "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 48,
                             "num_hidden_layers": 2, "vocab_size": 64})
    for heads in range(1, 9):
        try:
            AutoConfig.for_model(fam.model_types[0], hidden_size=64, num_attention_heads=heads, num_key_value_heads=1,
                                 head_dim=16, intermediate_size=48, num_hidden_layers=2, vocab_size=64, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2)
            accepted = True
        except Exception:
            accepted = False
        assert arch.stock_head_count_ok(heads) is accepted, (fam.name, heads)


def test_config_defaults_of_the_family_fill_what_config_json_omits():
    base = {"hidden_size": 2304, "num_attention_heads": 8, "intermediate_size": 9216, "num_hidden_layers": 26,
            "vocab_size": 256000}
    g = arch_from_config({"model_type": "gemma2", **base})
    assert (g.head_dim, g.num_kv_heads, g.tie_word_embeddings) == (256, 4, True)  # Gemma2Config's defaults
    g = arch_from_config({"model_type": "gemma3_text", **base, "head_dim": 128, "tie_word_embeddings": False})
    assert (g.head_dim, g.tie_word_embeddings) == (128, False)  # what config.json says wins
    q = arch_from_config({"model_type": "qwen3", **base, "num_attention_heads": 16, "hidden_size": 1024})
    assert q.head_dim == 128  # Qwen3-0.6B: 16 heads of 128 with hidden 1024
    assert arch_from_config({"model_type": "llama", **base}).head_dim == 2304 // 8


# --- segments: the one helper ---------------------------------------------------------------------------

def test_join_segments_and_phi3_tensor_index():
    assert join_segments([4, 2], [np.array([1, 3]), np.array([0])]).tolist() == [1, 3, 4]
    assert join_segments([], []).tolist() == []
    arch = arch_from_config({"model_type": "phi3", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "intermediate_size": 6, "num_hidden_layers": 2, "vocab_size": 64})
    q, k, v = arch.segments("self_attn.qkv_proj.weight")
    assert [arch.segment_span(s) for s in (q, k, v)] == [(0, 32), (32, 16), (48, 16)]
    rows = {"q": np.array([8, 9]), "kv": np.array([0, 15])}
    got = arch.tensor_index("self_attn.qkv_proj.weight", lambda s: rows[s.space])
    assert got.tolist() == [8, 9, 32, 47, 48, 63]
    # with other widths (a variant's layer: 1 query head, 1 KV head)
    got = arch.tensor_index("self_attn.qkv_proj.weight", lambda s: np.arange(8), {"q": 1, "kv": 1, "mlp": 6})
    assert got.tolist() == list(range(24))
    gate, up = arch.segments("mlp.gate_up_proj.weight")
    assert arch.segment_span(up) == (6, 6) and arch.tensor_shape(gate) == (12, 32)
    assert arch.linear_shapes({"q": 3, "kv": 1, "mlp": 5}) == {
        "self_attn.qkv_proj": (40, 32), "self_attn.o_proj": (32, 24), "mlp.gate_up_proj": (10, 32),
        "mlp.down_proj": (32, 5)}
    assert arch.structure_cost("head") == 2 * 8 * 32 and arch.structure_cost("channel") == 3 * 32


def test_phi3_variant_tensors_are_the_kept_rows_of_each_segment(tiny_model_dir, tmp_path):
    base = tiny_model_dir("phi3")
    ranking = ranking_for(base, "group", seed=5, prunable_layers=[1, 2])
    spec = write_variant(base, ranking, tmp_path / "v", 0.35)
    got, full = load_file(str(tmp_path / "v" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    d, H, K, inter = 8, 4, 2, 48
    for layer in (1, 2):
        keep = spec.layers[layer]
        assert 0 < keep.num_kv_heads < K or 0 < keep.intermediate_size < inter
        q_rows = [h * d + i for h in keep.heads for i in range(d)]
        kv_rows = [g * d + i for g in keep.kv_heads for i in range(d)]
        qkv = full[f"model.layers.{layer}.self_attn.qkv_proj.weight"]
        want = torch.cat([qkv[:H * d][q_rows], qkv[H * d:(H + K) * d][kv_rows], qkv[(H + K) * d:][kv_rows]])
        assert torch.equal(got[f"model.layers.{layer}.self_attn.qkv_proj.weight"], want)
        gu = full[f"model.layers.{layer}.mlp.gate_up_proj.weight"]
        ch = keep.channels.tolist()
        assert torch.equal(got[f"model.layers.{layer}.mlp.gate_up_proj.weight"], torch.cat([gu[:inter][ch], gu[inter:][ch]]))
        o = full[f"model.layers.{layer}.self_attn.o_proj.weight"]
        assert torch.equal(got[f"model.layers.{layer}.self_attn.o_proj.weight"], o[:, q_rows])


# --- loading: per-layer views of the config, stock configs ----------------------------------------------

def test_phi3_per_layer_attention_sees_its_own_head_count(tiny_model_dir, tmp_path):
    base = tiny_model_dir("phi3")
    first = [(1, "head", 0), (2, "head", 0), (2, "head", 3)]
    ranking = ranking_for(base, "query", seed=2, first=first, prunable_layers=[1, 2, 3])
    spec = write_variant(base, ranking, tmp_path / "v", float(ranking.sparsity_curve()[3]))
    variant = load_variant(tmp_path / "v", attn_implementation="eager")
    attn = [layer.self_attn for layer in variant.model.layers]
    assert [a.config.num_attention_heads for a in attn] == [4, 3, 2, 4] == [k.num_heads for k in spec.layers]
    assert variant.config.num_attention_heads == 4  # the global config is untouched
    assert attn[0].config is variant.config  # full-width layers share it
    assert attn[2].qkv_proj.out_features == (2 + 2 + 2) * 8  # heads 1, 2: one per KV group, K/V kept as is
    assert attn[1].qkv_proj.out_features == (3 + 3 + 3) * 8 and attn[1].num_key_value_heads == 3  # gathered
    assert_same_logits(variant, reference(base, spec, ranking), spec.arch.vocab_size)


def test_uniform_variants_hold_a_stock_config(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    for family in NEW:
        base = tiny_model_dir(family)
        ranking = ranking_for(base, "query", seed=3)
        spec = write_variant(base, ranking, tmp_path / family, 0.5, "uniform")
        cfg = json.loads((tmp_path / family / "config.json").read_text())
        base_cfg = json.loads((base / "config.json").read_text())
        assert "nestprune" not in cfg and cfg["head_dim"] == spec.arch.head_dim
        assert cfg["num_attention_heads"] == spec.layers[0].num_heads < base_cfg["num_attention_heads"]
        assert {k: v for k, v in cfg.items() if k not in ("num_attention_heads", "intermediate_size", "head_dim")} \
            == {k: v for k, v in base_cfg.items() if k not in ("num_attention_heads", "intermediate_size", "head_dim")}
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / family), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        assert sum(p.numel() for p in model.parameters()) == spec.total_params
        assert_same_logits(model, reference(base, spec), spec.arch.vocab_size)


def test_phi3_longrope_uniform_is_refused_before_writing(tiny_model_dir, tmp_path):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    base = tiny_model_dir("phi3", rope_scaling=rope, original_max_position_embeddings=64)
    ranking = ranking_for(base, "query", seed=3)
    with pytest.raises(NestpruneError, match="rope short_factor .* per-layer layout"):
        write_variant(base, ranking, tmp_path / "u", 0.5, "uniform")
    assert not (tmp_path / "u").exists() and not list(tmp_path.glob(".u.*"))
    write_variant(base, ranking, tmp_path / "u", 0.05, "uniform")  # a uniform variant keeping every head is fine
    assert json.loads((tmp_path / "u" / "config.json").read_text())["num_attention_heads"] == 4
    spec = write_variant(base, ranking, tmp_path / "v", 0.5)  # per-layer: exact
    assert min(k.num_heads for k in spec.layers) < 4
    assert_same_logits(load_variant(tmp_path / "v", dtype=torch.float32, attn_implementation="eager"),
                       reference(base, spec, ranking), spec.arch.vocab_size)


def test_soft_capping_families_load_with_eager_attention(tiny_model_dir, tmp_path):
    base = tiny_model_dir("gemma2")
    assert needs_eager_attention(json.loads((base / "config.json").read_text()))
    assert not needs_eager_attention({"model_type": "gemma2", "attn_logit_softcapping": None})
    assert not needs_eager_attention({"model_type": "gpt2"})
    ranking = ranking_for(base, "group", seed=1, prunable_layers=[1, 2])
    spec = write_variant(base, ranking, tmp_path / "v", 0.3)
    variant = load_variant(tmp_path / "v", dtype=torch.float32)  # no implementation given: eager
    assert variant.config._attn_implementation == "eager"
    assert_same_logits(variant, reference(base, spec, ranking), spec.arch.vocab_size)


def test_gemma3_tied_scaled_embeddings_survive_per_layer_loading(tiny_model_dir, tmp_path):
    base = tiny_model_dir("gemma3")
    arch = model_arch(base)
    assert arch.tie_word_embeddings and arch.head_dim == 16 != arch.hidden_size // arch.num_heads
    ranking = ranking_for(base, "query", seed=4, prunable_layers=[1, 2])
    spec = write_variant(base, ranking, tmp_path / "v", 0.3)
    variant = load_variant(tmp_path / "v", dtype=torch.float32)
    emb = variant.model.embed_tokens
    assert variant.lm_head.weight is emb.weight
    assert float(emb.embed_scale) == pytest.approx(arch.hidden_size ** 0.5) and not emb.embed_scale.is_meta
    assert sum(p.numel() for p in variant.parameters()) == spec.total_params
    assert_same_logits(variant, reference(base, spec, ranking), spec.arch.vocab_size)


# --- end to end: build -> both layouts -> verified ------------------------------------------------------

@pytest.mark.parametrize("family,gqa_mode", [("phi3", "query"), ("gemma2", "group"), ("gemma3", "query")])
def test_build_materialize_verify(family, gqa_mode, tiny_model_dir, sample_text_file, tmp_path):
    base = tiny_model_dir(family)
    cfg = BuildConfig(samples=4, seq_len=16, batch_size=2, steps=4, gqa_mode=gqa_mode, max_sparsity=0.5)
    art = build_artifact(base, sample_text_file, tmp_path / "a", cfg)
    for layout in ("per-layer", "uniform"):
        res = materialize(art, base, tmp_path / layout, sparsity=0.25, layout=layout, verify=True)
        assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-5
        assert res.spec.achieved_sparsity > 0.1
        for impl in ATTN_IMPLEMENTATIONS[family]:
            variant = load_variant(tmp_path / layout, dtype=torch.float32, attn_implementation=impl)
            assert_same_logits(variant, reference(base, res.spec, attn=impl), res.spec.arch.vocab_size)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_a_layer_without_heads_keeps_the_cache_length(family, tiny_model_dir, tmp_path):
    """The cache length (read from layer 0, and the source of positions when none are given) counts the
    tokens an empty attention saw, whatever name this transformers version passes the cache under."""
    base = tiny_model_dir(family)
    arch = model_arch(base)
    first = [(0, "head", u) for u in range(arch.num_heads)]
    ranking = ranking_for(base, "query", seed=1, first=first)
    spec = write_variant(base, ranking, tmp_path / "v", float(ranking.sparsity_curve()[len(first)]))
    assert spec.layers[0].num_heads == 0
    variant = load_variant(tmp_path / "v", dtype=torch.float32, attn_implementation="eager")
    ref = reference(base, spec, ranking)
    ids = torch.arange(1, 9).view(1, 8)
    with torch.no_grad():
        out = variant(input_ids=ids[:, :6], use_cache=True)
        assert out.past_key_values.get_seq_length() == 6
        name = "cache" if "cache" in inspect.signature(type(variant).forward).parameters else "past_key_values"
        step = variant(input_ids=ids[:, 6:], use_cache=True, **{name: out.past_key_values}).logits
        whole = ref(input_ids=ids).logits[:, 6:]
    assert (step - whole).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", NEW)
def test_gguf_refuses_the_new_families_clearly(family, tiny_model_dir):
    from nestprune.variant.gguf import choose_arch
    from nestprune.variant.widths import plan_variant

    ranking = ranking_for(tiny_model_dir(family), "query", seed=3)
    for layout in ("per-layer", "uniform"):
        with pytest.raises(NestpruneError, match=f"GGUF export does not support the {family} family"):
            choose_arch(plan_variant(ranking, 0.3, layout))
