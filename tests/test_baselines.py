"""Baselines: every structure once, Wanda-sp's uniform share per layer, magnitude by brute force, random seeded."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from nestprune.arch import KIND_CODES, Structures, arch_from_config, decoder_param_count
from nestprune.errors import NestpruneError
from nestprune.rank import baselines as bl
from nestprune.rank import wanda as wd
from nestprune.ranking import kept_counts

FAMILIES = ("llama", "llama-gqa", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


def _setup(name: str, **kw):
    model = make_tiny_model(name, num_layers=kw.pop("num_layers", 5), vocab_size=64, **kw)
    weights = {n for n, _ in model.named_parameters()}
    arch = arch_from_config(model.config.to_dict(), weights)
    return model, arch


def _windows(n: int = 6, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


def _check_complete(r, arch, gqa_mode, prunable_layers):
    akind = Structures(arch, gqa_mode).attention_kind
    n_attn = Structures(arch, gqa_mode).attention_units
    keys = Counter(zip(r.layer.tolist(), r.kind.tolist(), r.index.tolist(), strict=True))
    expect = {(layer, KIND_CODES[akind], i) for layer in range(arch.num_layers) for i in range(n_attn)}
    expect |= {(layer, KIND_CODES["channel"], j) for layer in range(arch.num_layers) for j in range(arch.intermediate_size)}
    assert set(keys) == expect and max(keys.values()) == 1
    assert np.array_equal(r.prunable, np.isin(r.layer, prunable_layers))
    first_protected = int(np.argmin(r.prunable)) if not r.prunable.all() else len(r)
    assert r.prunable[:first_protected].all() and not r.prunable[first_protected:].any()  # never-pruned last
    assert (r.step[~r.prunable] == -1).all()
    cost = np.where(r.kind == KIND_CODES["channel"], arch.structure_cost("channel"), arch.structure_cost(akind))
    assert np.array_equal(r.cost, cost)
    removed = r.step[: r.num_removed]
    assert (removed >= 0).all() and (np.diff(removed) >= 0).all()  # removal prefix, by step


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("gqa_mode", ["query", "group"])
def test_every_baseline_ranks_every_structure_once(name, gqa_mode):
    model, arch = _setup(name)
    prunable = arch.prunable_layers(0.2, 1)
    dp = decoder_param_count(model, arch)
    rankings = [
        wd.wanda_sp_ranking(model, Structures(arch, gqa_mode), _windows(), batch_size=4, skip_first_frac=0.2,
                            skip_last=1, decoder_params=dp),
        wd.wanda_sp_ranking(model, Structures(arch, gqa_mode), _windows(), batch_size=4, skip_first_frac=0.2,
                            skip_last=1, convention="full", steps=7),
        bl.magnitude_ranking(model, Structures(arch, gqa_mode), skip_first_frac=0.2, skip_last=1),
        bl.random_ranking(Structures(arch, gqa_mode), seed=3, decoder_params=dp, skip_first_frac=0.2, skip_last=1),
    ]
    for r in rankings:
        _check_complete(r, arch, gqa_mode, prunable)
        assert r.decoder_params == dp
        assert r.num_removed == int(r.prunable.sum())  # every baseline orders all prunable structures
        assert r.max_sparsity == pytest.approx(r.cost[r.prunable].sum() / dp)


# --------------------------------------------------------------------------------------- Wanda-sp


def _brute_input_norms(model, arch, windows, modules):
    """‖X_j‖₂ of each module's input, from inputs captured whole (no running sums)."""
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for layer in range(arch.num_layers):
        for m in modules:
            name = arch.layer_key(layer, m)
            hooks.append(model.get_submodule(name).register_forward_hook(
                lambda mod, inp, out, name=name: captured.setdefault(name, []).append(inp[0].detach().clone())))
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    return {k: torch.linalg.vector_norm(torch.cat(v).reshape(-1, v[0].shape[-1]).double(), dim=0)
            for k, v in captured.items()}


def test_input_norms_equal_brute_force_and_skip_padding():
    model, arch = _setup("llama-gqa")
    w = _windows(5, 10)
    mods = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
    sq, tokens = wd.input_sq_norms(model, arch, w, modules=mods, batch_size=2)
    brute = _brute_input_norms(model, arch, w, mods)
    assert tokens == 50 and set(sq) == set(brute)
    for k in brute:
        torch.testing.assert_close(sq[k].sqrt(), brute[k], rtol=1e-5, atol=1e-6)
    # padded batches: positions with attention_mask 0 do not count
    pad = torch.cat([w[:2], torch.zeros(2, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 4)], 1).long()
    sq_pad, tokens_pad = wd.input_sq_norms(model, arch, [{"input_ids": pad, "attention_mask": mask}], modules=mods)
    sq_ref, _ = wd.input_sq_norms(model, arch, w[:2], modules=mods)
    assert tokens_pad == 20
    for k in sq_ref:
        torch.testing.assert_close(sq_pad[k], sq_ref[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,gqa_mode", [("llama", "query"), ("llama-gqa", "query"), ("qwen2", "group"),
                                           ("phi3", "group"), ("gemma3", "query")])
def test_wanda_sp_scores_follow_the_flap_definition(name, gqa_mode):
    model, arch = _setup(name)
    w = _windows()
    r = wd.wanda_sp_ranking(model, Structures(arch, gqa_mode), w, skip_first_frac=0.2)
    norms = _brute_input_norms(model, arch, w, ("self_attn.o_proj", "mlp.down_proj"))
    akind = Structures(arch, gqa_mode).attention_code
    for layer in range(arch.num_layers):
        o = model.get_submodule(arch.layer_key(layer, "self_attn.o_proj")).weight.double()
        d = model.get_submodule(arch.layer_key(layer, "mlp.down_proj")).weight.double()
        head = (o.abs() * norms[arch.layer_key(layer, "self_attn.o_proj")]).mean(0).reshape(arch.num_heads, -1).sum(1)
        if Structures(arch, gqa_mode).attention_kind == "group":
            head = head.reshape(arch.num_kv_heads, -1).sum(1)
        chan = (d.abs() * norms[arch.layer_key(layer, "mlp.down_proj")]).mean(0)
        for kind, expect in ((akind, head), (KIND_CODES["channel"], chan)):
            sel = (r.layer == layer) & (r.kind == kind)
            got = np.empty(int(sel.sum()))
            got[r.index[sel]] = r.score[sel]
            np.testing.assert_allclose(got, expect.detach().numpy(), rtol=1e-5)
            # within a layer, structures leave in ascending score
            assert np.all(np.diff(r.score[sel]) >= -1e-12)


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_wanda_sp_full_convention_sums_every_owned_weight(name):
    model, arch = _setup(name, num_key_value_heads=4)  # MHA: a head owns q/k/v rows and o columns
    w = _windows()
    r = wd.wanda_sp_ranking(model, Structures(arch), w, convention="full")
    qkv_in, mlp_in = ("self_attn.qkv_proj", "mlp.gate_up_proj") if name == "phi3" else ("self_attn.q_proj", "mlp.gate_proj")
    mods = (qkv_in, "self_attn.o_proj", mlp_in, "mlp.down_proj")
    norms = _brute_input_norms(model, arch, w, mods)
    layer, h, j = 2, 1, 5
    dh = arch.head_dim

    def W(m):
        return projection_weight(model, arch, layer, m)

    n_in = norms[arch.layer_key(layer, qkv_in)]
    n_o = norms[arch.layer_key(layer, "self_attn.o_proj")]
    rows = slice(h * dh, (h + 1) * dh)
    head = sum(float((W(m)[rows].abs() * n_in).sum()) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    head += float((W("self_attn.o_proj")[:, rows].abs() * n_o[rows]).sum())
    n_mlp = norms[arch.layer_key(layer, mlp_in)]
    chan = float((W("mlp.gate_proj")[j].abs() * n_mlp).sum() + (W("mlp.up_proj")[j].abs() * n_mlp).sum())
    chan += float(W("mlp.down_proj")[:, j].abs().sum() * norms[arch.layer_key(layer, "mlp.down_proj")][j])
    pick = lambda kind, i: float(r.score[(r.layer == layer) & (r.kind == KIND_CODES[kind]) & (r.index == i)][0])  # noqa: E731
    assert pick("head", h) == pytest.approx(head, rel=1e-5)
    assert pick("channel", j) == pytest.approx(chan, rel=1e-5)


@pytest.mark.parametrize("name,gqa_mode,steps", [("llama", "query", None), ("llama-gqa", "query", 10),
                                                  ("qwen3", "group", None)])
def test_wanda_sp_removes_the_same_share_in_every_prunable_layer(name, gqa_mode, steps):
    model, arch = _setup(name, num_layers=6)
    r = wd.wanda_sp_ranking(model, Structures(arch, gqa_mode), _windows(), steps=steps)
    prunable = arch.prunable_layers()
    never = [layer for layer in range(arch.num_layers) if layer not in prunable]
    n_attn, n_mlp = Structures(arch, gqa_mode).attention_units, arch.intermediate_size
    T = steps or max(n_attn, n_mlp)
    assert r.step[: r.num_removed].max() == T
    ends = np.flatnonzero(np.r_[r.step[1 : r.num_removed] != r.step[: r.num_removed - 1], True])
    assert len(ends) >= min(T, 10)
    for e in ends.tolist():
        t = int(r.step[e])
        attn, mlp = kept_counts(r, e + 1)
        assert (attn[prunable] == n_attn - (t * n_attn) // T).all(), (t, attn)
        assert (mlp[prunable] == n_mlp - (t * n_mlp) // T).all(), (t, mlp)
        assert (attn[never] == n_attn).all() and (mlp[never] == n_mlp).all()
    # a prefix inside a step is within one structure of each kind of uniform
    for k in np.random.default_rng(0).integers(1, r.num_removed, 20).tolist():
        attn, mlp = kept_counts(r, k)
        assert np.ptp(attn[prunable]) <= 1 and np.ptp(mlp[prunable]) <= 1
        b = wd.step_boundary_prefix(r, k)
        assert b >= k and (b == r.num_removed or r.step[b] != r.step[k - 1])


def test_wanda_sp_max_sparsity_stops_at_a_step_boundary():
    model, arch = _setup("llama", num_layers=6)
    full = wd.wanda_sp_ranking(model, Structures(arch), _windows())
    cut = wd.wanda_sp_ranking(model, Structures(arch), _windows(), max_sparsity=0.3)
    assert np.array_equal(cut.index, full.index) and np.array_equal(cut.layer, full.layer)  # same order
    assert 0.3 <= cut.max_sparsity < 0.3 + 0.05
    k = cut.num_removed
    assert cut.step[k - 1] != full.step[k]  # stopped at the end of a step
    assert full.prefix_for_sparsity(0.3) <= k


def test_wanda_sp_rejects_bad_input():
    model, arch = _setup("llama", num_layers=2)
    with pytest.raises(NestpruneError, match="no prunable layer"):
        wd.wanda_sp_ranking(model, Structures(arch), _windows(), skip_first_frac=0.5, skip_last=1)
    model, arch = _setup("llama")
    with pytest.raises(NestpruneError, match="convention"):
        wd.wanda_sp_ranking(model, Structures(arch), _windows(), convention="sum")
    with pytest.raises(NestpruneError, match="non-empty"):
        wd.wanda_sp_ranking(model, Structures(arch), torch.zeros(0, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------- magnitude, random


def projection_weight(model, arch, layer: int, m: str) -> torch.Tensor:
    """Weight of projection ``m`` ("self_attn.q_proj", "mlp.up_proj", …) of one layer, cut by hand out of
    Phi-3's fused qkv_proj (q, k, v rows) and gate_up_proj (gate, up rows) where the model fuses them."""
    fused = {"self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
             "self_attn.v_proj": ("self_attn.qkv_proj", 2), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
             "mlp.up_proj": ("mlp.gate_up_proj", 1)}
    try:
        return model.get_submodule(arch.layer_key(layer, m)).weight.detach().double()
    except AttributeError:
        whole, part = fused[m]
        w = model.get_submodule(arch.layer_key(layer, whole)).weight.detach().double()
        if whole == "mlp.gate_up_proj":
            sizes = [arch.intermediate_size] * 2
        else:
            sizes = [arch.num_heads * arch.head_dim] + [arch.num_kv_heads * arch.head_dim] * 2
        assert sum(sizes) == w.shape[0]
        return w.split(sizes)[part]


@pytest.mark.parametrize("name,gqa_mode", [("llama", "query"), ("llama-gqa", "query"), ("mistral", "group"),
                                           ("qwen2", "query"), ("phi3", "group"), ("phi3", "query"),
                                           ("gemma2", "query")])
def test_magnitude_equals_brute_force_norms(name, gqa_mode):
    model, arch = _setup(name)
    r = bl.magnitude_ranking(model, Structures(arch, gqa_mode))
    dh, g = arch.head_dim, arch.group_size
    akind = Structures(arch, gqa_mode).attention_kind
    for i in range(len(r)):
        layer, kind, idx = int(r.layer[i]), int(r.kind[i]), int(r.index[i])

        def W(m, layer=layer):
            return projection_weight(model, arch, layer, m)

        if kind == KIND_CODES["channel"]:
            parts = [W("mlp.gate_proj")[idx], W("mlp.up_proj")[idx], W("mlp.down_proj")[:, idx]]
            norm = arch.normaliser("channel", "reference")
        else:
            q = range(idx * g, (idx + 1) * g) if akind == "group" else [idx]
            kv = [idx] if (akind == "group" or not arch.is_gqa) else []
            parts = [W("self_attn.q_proj")[h * dh : (h + 1) * dh] for h in q]
            parts += [W("self_attn.o_proj")[:, h * dh : (h + 1) * dh] for h in q]
            parts += [W(f"self_attn.{p}_proj")[k * dh : (k + 1) * dh] for p in ("k", "v") for k in kv]
            norm = arch.normaliser(akind, "reference")
        expect = float(torch.sqrt(sum((p**2).sum() for p in parts)))
        assert r.raw_score[i] == pytest.approx(expect, rel=1e-9)
        assert r.score[i] == pytest.approx(expect / norm, rel=1e-9)
    pr = r.prunable
    assert (np.diff(r.score[pr]) >= 0).all() and (r.step[pr] == 0).all()  # one global ascending order
    assert (np.diff(r.score[~pr]) >= 0).all()


def test_magnitude_normalisation_none_orders_raw_norms():
    model, arch = _setup("llama")
    r = bl.magnitude_ranking(model, Structures(arch), normalisation="none")
    np.testing.assert_array_equal(r.score, r.raw_score)
    with pytest.raises(NestpruneError, match="normalisation"):
        bl.magnitude_ranking(model, Structures(arch), normalisation="l1")


def test_random_is_seed_reproducible():
    _, arch = _setup("llama-gqa")
    a = bl.random_ranking(Structures(arch), seed=7, decoder_params=1000)
    b = bl.random_ranking(Structures(arch), seed=7, decoder_params=1000)
    c = bl.random_ranking(Structures(arch), seed=8, decoder_params=1000)
    for f in ("layer", "kind", "index", "score"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.index, c.index) or not np.array_equal(a.layer, c.layer)
    assert (np.diff(a.score[a.prunable]) >= 0).all()
    # not the canonical order: a random interleaving of layers and kinds
    assert not (np.diff(a.layer[a.prunable]) >= 0).all()


# --------------------------------------------------------------------------------------- build entry


def test_registered_baselines_return_a_trajectory_for_the_build():
    from nestprune.rank.methods import RANKERS, RankJob, rank
    from nestprune.schemas.artifact import StepRecord

    model, arch = _setup("llama", num_layers=6)
    objective = SimpleNamespace(calib=SimpleNamespace(windows=_windows()))
    job = RankJob(model=model, structures=Structures(arch, "query"), objective=objective, batch_size=4, seed=0,
                  max_sparsity=0.25, skip_first_frac=0.1, skip_last=1)
    for method in ("wanda-sp", "magnitude", "random"):
        result = rank(RANKERS.config_class(method)(), job)
        ranking, traj, planned = result.ranking, result.trajectory, result.steps_planned
        assert traj and all(isinstance(t, StepRecord) for t in traj)
        assert traj[-1].structures_removed == ranking.num_removed
        assert traj[-1].param_sparsity == pytest.approx(ranking.max_sparsity)
        if method == "wanda-sp":
            assert planned == arch.intermediate_size and 0.25 <= ranking.max_sparsity < 0.3
            assert len(traj) <= 257 and [t.step for t in traj] == sorted({t.step for t in traj})
    with pytest.raises(NestpruneError, match="--method must be one of .*; got 'snip'"):
        RANKERS.config_class("snip")


@pytest.mark.parametrize("method", ["wanda-sp", "magnitude", "random"])
def test_each_baseline_writes_a_valid_artifact(method, tiny_model_dir, sample_text_file, tmp_path):
    from nestprune.artifact import read_artifact
    from nestprune.build import BuildConfig, build_artifact

    model_dir = tiny_model_dir("llama-gqa", num_hidden_layers=5)
    cfg = BuildConfig(method=method, samples=4, seq_len=16, batch_size=2, max_sparsity=0.3, device="cpu")
    path = build_artifact(model_dir, sample_text_file, tmp_path / f"{method}.nestprune", cfg)
    manifest, ranking = read_artifact(path)
    assert manifest.schedule.method == method
    _check_complete(ranking, ranking.arch, "query", ranking.arch.prunable_layers())
    assert ranking.max_sparsity >= 0.3
    k = ranking.prefix_for_sparsity(0.3)
    attn, mlp = kept_counts(ranking, wd.step_boundary_prefix(ranking, k))
    prunable = ranking.arch.prunable_layers()
    if method == "wanda-sp":  # a step boundary: the same share in every prunable layer
        assert np.ptp(attn[prunable]) == 0 and np.ptp(mlp[prunable]) == 0
