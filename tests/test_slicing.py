"""slicing: removal order + target → kept indices (pure, no model files)."""

from __future__ import annotations

import numpy as np
import pytest

from nestprune.arch import KIND_CODES, ArchInfo, Structures, arch_from_config
from nestprune.errors import NestpruneError
from nestprune.ranking import Ranking
from nestprune.variant.widths import (
    expand,
    is_nested,
    kept_decoder_params,
    non_decoder_params,
    plan_variant,
    sparsity_for_params,
)


def decoder_param_count(arch: ArchInfo) -> int:
    """All decoder-layer parameters, norms included, from the family table (checked against real models in
    test_families.py)."""
    return arch.layer_params() * arch.num_layers


def synthetic_ranking(arch: ArchInfo, gqa_mode: str = "query", seed: int = 0,
                      prunable_layers: list[int] | None = None, first: list[tuple[int, str, int]] = (),
                      decoder_params: int | None = None) -> Ranking:
    """A random removal order over every structure of ``arch``; structures of ``prunable_layers`` (all
    layers by default) are all 'removed' (step >= 0), listed first; ``first`` entries go to the front."""
    rng = np.random.default_rng(seed)
    attn_kind = Structures(arch, gqa_mode).attention_kind
    prunable_layers = list(range(arch.num_layers)) if prunable_layers is None else prunable_layers
    entries = [(layer, attn_kind, i) for layer in range(arch.num_layers)
               for i in range(Structures(arch, gqa_mode).attention_units)]
    entries += [(layer, "channel", j) for layer in range(arch.num_layers) for j in range(arch.intermediate_size)]
    entries = [entries[i] for i in rng.permutation(len(entries))]
    front = [tuple(e) for e in first]
    entries = front + [e for e in entries if e not in front]
    entries.sort(key=lambda e: e[0] not in prunable_layers)  # stable: prunable ones first
    n = len(entries)
    prunable = np.array([e[0] in prunable_layers for e in entries])
    return Ranking(
        structures=Structures(arch, gqa_mode),
        decoder_params=decoder_params or decoder_param_count(arch),
        layer=np.array([e[0] for e in entries], np.int32),
        kind=np.array([KIND_CODES[e[1]] for e in entries], np.uint8),
        index=np.array([e[2] for e in entries], np.int32),
        step=np.where(prunable, np.arange(n), -1).astype(np.int32),
        score=rng.random(n), raw_score=rng.random(n),
        cost=np.array([arch.structure_cost(e[1]) for e in entries], np.int64),
        prunable=prunable,
    )


def tiny_arch(name: str = "llama-gqa", **over) -> ArchInfo:
    cfgs = {
        "llama": dict(model_type="llama", num_key_value_heads=4),
        "llama-gqa": dict(model_type="llama", num_key_value_heads=2),
        "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
        "llama-8": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
        "mistral-8": dict(model_type="mistral", num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
        "phi3-8": dict(model_type="phi3", num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
        "gemma2-8": dict(model_type="gemma2", num_attention_heads=8, num_key_value_heads=2, hidden_size=64, head_dim=16),
        "gemma3-8": dict(model_type="gemma3_text", num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                         head_dim=16),
    }
    cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
               vocab_size=300)
    cfg.update(cfgs[name])
    cfg.update(over)
    return arch_from_config(cfg)


def kept_sets(spec):
    return [(set(k.heads.tolist()), set(k.kv_heads.tolist()), set(k.channels.tolist())) for k in spec.layers]


@pytest.mark.parametrize("name,mode", [("llama", "query"), ("llama-gqa", "query"), ("llama-gqa", "group"),
                                       ("qwen2", "query")])
def test_per_layer_is_complement_of_prefix(name, mode):
    arch = tiny_arch(name)
    r = synthetic_ranking(arch, mode, seed=3)
    spec = plan_variant(r, 0.3)
    assert spec.prefix_len == r.prefix_for_sparsity(0.3)
    removed = set(zip(r.layer[: spec.prefix_len].tolist(), r.kind[: spec.prefix_len].tolist(),
                      r.index[: spec.prefix_len].tolist(), strict=True))
    for layer in range(arch.num_layers):
        units = spec.units(layer).tolist()
        all_units = range(Structures(arch, mode).attention_units)
        assert units == [u for u in all_units if (layer, r.attention_kind, u) not in removed]
        ch = spec.layers[layer].channels.tolist()
        assert ch == [j for j in range(arch.intermediate_size) if (layer, KIND_CODES["channel"], j) not in removed]
    # achieved: exactly the prefix's sparsity, except KV heads dropped because no query head reads them
    curve = r.sparsity_curve()[spec.prefix_len]
    assert spec.achieved_sparsity >= 0.3 - 1e-12
    if not (arch.is_gqa and mode == "query"):
        assert spec.achieved_sparsity == pytest.approx(curve, abs=1e-12)
    assert spec.prefix_len == 0 or r.sparsity_curve()[spec.prefix_len - 1] < 0.3


def test_query_mode_kv_map_and_dropped_kv_heads():
    arch = tiny_arch("llama-8")  # 8 query heads, 2 KV heads: group g = heads 4g..4g+3
    first = [(1, "head", h) for h in (0, 1, 2, 3, 5)]  # layer 1 loses all of group 0 and head 5
    r = synthetic_ranking(arch, "query", seed=1, first=first)
    spec = plan_variant(r, r.sparsity_curve()[5])
    keep = spec.layers[1]
    assert spec.prefix_len == 5
    assert keep.heads.tolist() == [4, 6, 7]
    assert keep.kv_heads.tolist() == [1]
    assert keep.kv_of_head.tolist() == [0, 0, 0]
    assert keep.uniform_groups == 3
    # the unused KV head (rows of k and v) counts as removed on top of the prefix
    extra = 2 * arch.head_dim * arch.hidden_size
    assert spec.kept_decoder_params == r.decoder_params - int(r.cost[:5].sum()) - extra
    other = spec.layers[0]
    assert other.heads.tolist() == list(range(8)) and other.uniform_groups == 4


def test_unequal_groups_have_no_uniform_group_count():
    arch = tiny_arch("llama-8")
    r = synthetic_ranking(arch, "query", seed=1, first=[(2, "head", 0)])
    keep = plan_variant(r, r.sparsity_curve()[1]).layers[2]
    assert keep.heads.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert keep.kv_of_head.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert keep.uniform_groups is None


def test_group_mode_keeps_whole_groups():
    arch = tiny_arch("llama-8")
    r = synthetic_ranking(arch, "group", seed=2, first=[(2, "group", 1)])
    keep = plan_variant(r, r.sparsity_curve()[1]).layers[2]
    assert keep.kv_heads.tolist() == [0]
    assert keep.heads.tolist() == [0, 1, 2, 3]
    assert keep.uniform_groups == 4


@pytest.mark.parametrize("layout", ["per-layer", "uniform"])
@pytest.mark.parametrize("name,mode", [("llama", "query"), ("llama-8", "query"), ("llama-8", "group")])
def test_nested_across_sparsities(layout, name, mode):
    arch = tiny_arch(name)
    r = synthetic_ranking(arch, mode, seed=5, prunable_layers=[1, 2])
    grid = np.linspace(0, r.max_sparsity, 13)
    specs = [plan_variant(r, float(s), layout, multiple_of=8 if layout == "uniform" else None) for s in grid]
    for a, b in zip(specs, specs[1:], strict=False):
        assert is_nested(a, b)
        assert b.kept_decoder_params <= a.kept_decoder_params
    assert is_nested(specs[0], specs[-1]) and not is_nested(specs[-1], specs[0])
    assert specs[-1].kept_decoder_params < specs[0].kept_decoder_params


def test_uniform_widths_equal_everywhere():
    arch = tiny_arch("mistral-8")
    r = synthetic_ranking(arch, "query", seed=7, prunable_layers=[1, 2])
    spec = plan_variant(r, 0.25, "uniform")
    widths = {(k.num_heads, k.num_kv_heads, k.intermediate_size) for k in spec.layers}
    assert len(widths) == 1
    (h, kv, c), = widths
    assert kv == 2 and h % 2 == 0 and all(k.uniform_groups == h // 2 for k in spec.layers)
    # widths are the rounded mean kept widths of the per-layer subnetwork at the prefix the policy chose
    per = plan_variant(r, float(r.sparsity_curve()[spec.prefix_len]), "per-layer")
    assert per.prefix_len == spec.prefix_len
    assert c == int(np.floor(np.mean([k.intermediate_size for k in per.layers]) + 0.5))
    # within a layer: the last-removed channels by the global order
    order = r.layer_order(1, KIND_CODES["channel"])
    assert spec.layers[1].channels.tolist() == sorted(order[len(order) - c:].tolist())
    # never-pruned layer 0 is cut to the same width
    assert spec.layers[0].intermediate_size == c < arch.intermediate_size
    assert spec.achieved_sparsity == pytest.approx(0.25, abs=0.08)


def test_uniform_llama_head_counts_divide_hidden():
    # LlamaConfig refuses hidden_size % num_attention_heads != 0: 6 of 8 heads (hidden 64) is not a stock config
    # (so do Gemma-2/3's configs, even with an explicit head_dim; Phi-3's and Mistral's accept it)
    for name, expect_ok in (("llama-8", False), ("mistral-8", True), ("phi3-8", True), ("gemma2-8", False),
                            ("gemma3-8", False)):
        arch = tiny_arch(name)
        r = synthetic_ranking(arch, "query", seed=0)
        heads = {plan_variant(r, float(s), "uniform").layers[0].num_heads
                 for s in np.linspace(0, r.max_sparsity, 40)}
        assert (6 in heads) is expect_ok
        assert all(64 % h == 0 for h in heads) or expect_ok


def test_uniform_keeps_at_least_one_head_and_group():
    arch = tiny_arch("llama-8")
    for mode in ("query", "group"):
        r = synthetic_ranking(arch, mode, seed=0, prunable_layers=[0, 1, 2, 3])
        spec = plan_variant(r, r.max_sparsity, "uniform")
        for k in spec.layers:
            assert k.num_kv_heads == (2 if mode == "query" else 1)
            assert k.num_heads == (2 if mode == "query" else 4)


def test_multiple_of_rounds_channels_and_reports_achieved():
    arch = tiny_arch("llama", intermediate_size=64)
    r = synthetic_ranking(arch, "query", seed=4)
    plain = plan_variant(r, 0.3)
    rounded = plan_variant(r, 0.3, multiple_of=16)
    for p, q in zip(plain.layers, rounded.layers, strict=True):
        assert q.intermediate_size % 16 == 0
        assert abs(q.intermediate_size - p.intermediate_size) <= 8
        assert q.heads.tolist() == p.heads.tolist()
    assert rounded.achieved_sparsity == pytest.approx(
        1 - kept_decoder_params(arch, r.decoder_params, rounded.layers) / r.decoder_params)
    assert rounded.achieved_sparsity != plain.achieved_sparsity
    assert rounded.multiple_of == 16


def test_zero_and_max_sparsity():
    arch = tiny_arch("llama-gqa")
    r = synthetic_ranking(arch, "query", seed=0, prunable_layers=[1, 2])
    full = plan_variant(r, 0.0)
    assert full.prefix_len == 0 and full.achieved_sparsity == 0.0
    assert full.kept_decoder_params == r.decoder_params
    top = plan_variant(r, r.max_sparsity)
    assert top.prefix_len == r.num_removed
    assert top.layers[1].num_heads == 0 and top.layers[1].intermediate_size == 0
    assert top.layers[0].num_heads == 4  # never pruned


def test_out_of_range_sparsity_and_bad_options():
    r = synthetic_ranking(tiny_arch("llama"), "query", prunable_layers=[1])
    with pytest.raises(NestpruneError, match="beyond what this artifact ranked"):
        plan_variant(r, min(0.99, r.max_sparsity + 0.05))
    with pytest.raises(NestpruneError, match=r"\[0, 1\)"):
        plan_variant(r, 1.2)
    with pytest.raises(NestpruneError, match="unknown layout"):
        plan_variant(r, 0.1, "diagonal")
    with pytest.raises(NestpruneError, match="multiple-of"):
        plan_variant(r, 0.1, multiple_of=0)


def test_params_target():
    arch = tiny_arch("llama")
    r = synthetic_ranking(arch)
    total = r.decoder_params + non_decoder_params(arch)
    assert non_decoder_params(arch) == 2 * 300 * 32 + 32
    s = sparsity_for_params(r, total - r.decoder_params // 4)
    assert s == pytest.approx(0.25)
    spec = plan_variant(r, s)
    assert spec.total_params <= total - r.decoder_params // 4
    with pytest.raises(NestpruneError, match="more than the base"):
        sparsity_for_params(r, total + 1)
    with pytest.raises(NestpruneError, match="embeddings"):
        sparsity_for_params(r, 100)


def test_expand():
    assert expand(np.array([1, 3]), 2).tolist() == [2, 3, 6, 7]
    assert expand(np.array([], np.int64), 4).tolist() == []


def test_spec_arrays_are_read_only():
    spec = plan_variant(synthetic_ranking(tiny_arch("llama")), 0.2)
    with pytest.raises(ValueError):
        spec.layers[0].channels[0] = 5
