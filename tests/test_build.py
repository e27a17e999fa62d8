"""GISP engine: scores vs brute force, schedule, nestedness, reproducibility, every family builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILY_CONFIGS, SAMPLE_TEXT, make_tiny_model

from nestprune.arch import KIND_CODES, Structures, arch_from_config, family_for
from nestprune.artifact import read_artifact
from nestprune.build import BuildConfig, build_artifact, rank_model
from nestprune.objectives.lm import LanguageModeling
from nestprune.rank.calibration import CalibrationSet, sample_windows, tokenize_documents
from nestprune.rank.gisp import accumulate_gradients
from nestprune.rank.mask import masks_from_ranking
from nestprune.rank.schedule import select_pruned, threshold_k
from nestprune.rank.score import layer_scores, normalise
from nestprune.ranking import structure_table


def _calib(tokenizer, n=6, seq_len=24, seed=0) -> CalibrationSet:
    stream = tokenize_documents(SAMPLE_TEXT.split("\n\n"), tokenizer)
    w = sample_windows(stream, n, seq_len, seed)
    return CalibrationSet(windows=w, source="mem", sha256="0" * 64, seed=seed, documents=1,
                          tokens_available=len(stream))


def _arch(model):
    cfg = model.config.to_dict()
    return arch_from_config(cfg, set(model.state_dict()))


def per_weight_scores(model, layer, arch):
    """|W ⊙ ∇W| of each projection of one layer, written out by hand per module layout (not from arch.py's
    table): separate q/k/v/o and gate/up/down Linears, or Phi-3's fused qkv_proj (q, k, v rows) and
    gate_up_proj (gate, up rows)."""
    att = model.model.layers[layer].self_attn
    mlp = model.model.layers[layer].mlp

    def S(lin):
        return (lin.weight.detach() * lin.weight.grad).abs()

    out = {"o": S(att.o_proj), "down": S(mlp.down_proj)}
    if hasattr(att, "qkv_proj"):
        qkv, nq, nk = S(att.qkv_proj), arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        out.update(q=qkv[:nq], k=qkv[nq : nq + nk], v=qkv[nq + nk :])
        assert out["v"].shape[0] == nk
    else:
        out.update(q=S(att.q_proj), k=S(att.k_proj), v=S(att.v_proj))
    if hasattr(mlp, "gate_up_proj"):
        gu, n = S(mlp.gate_up_proj), arch.intermediate_size
        out.update(gate=gu[:n], up=gu[n:])
        assert out["up"].shape[0] == n
    else:
        out.update(gate=S(mlp.gate_proj), up=S(mlp.up_proj))
    return out


def brute_force_scores(model, arch, windows, gqa_mode):
    """Independent computation: one full-batch forward of an unmasked copy, plain autograd,
    per-structure sums written out head by head / channel by channel."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    logits = model(input_ids=windows).logits
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="none"
    ).view(windows.shape[0], -1)
    per_token.mean(1).mean().backward()
    dh, G = arch.head_dim, arch.group_size
    out = {}
    for layer in range(arch.num_layers):
        S = per_weight_scores(model, layer, arch)
        q, k, v, o = S["q"], S["k"], S["v"], S["o"]
        heads = []
        if not arch.is_gqa:
            for h in range(arch.num_heads):
                r = slice(h * dh, (h + 1) * dh)
                heads.append(q[r].sum() + k[r].sum() + v[r].sum() + o[:, r].sum())
        elif gqa_mode == "query":
            for h in range(arch.num_heads):
                r = slice(h * dh, (h + 1) * dh)
                heads.append(q[r].sum() + o[:, r].sum())
        else:
            for g in range(arch.num_kv_heads):
                qr = slice(g * G * dh, (g + 1) * G * dh)
                kr = slice(g * dh, (g + 1) * dh)
                heads.append(q[qr].sum() + o[:, qr].sum() + k[kr].sum() + v[kr].sum())
        gate, up, down = S["gate"], S["up"], S["down"]
        chans = [gate[j].sum() + up[j].sum() + down[:, j].sum() for j in range(arch.intermediate_size)]
        out[layer] = (torch.stack(heads).double(), torch.stack(chans).double())
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return out


CASES = [(f, m) for f in FAMILY_CONFIGS for m in ("query", "group")
         if not (m == "group" and FAMILY_CONFIGS[f][1].get("num_key_value_heads", 4) == 4)]


@pytest.mark.parametrize("family,gqa_mode", CASES)
def test_engine_scores_equal_brute_force(family, gqa_mode, tokenizer):
    model = make_tiny_model(family, vocab_size=len(tokenizer))
    arch = _arch(model)
    calib = _calib(tokenizer)
    expected = brute_force_scores(model, arch, calib.windows, gqa_mode)
    params = {arch.layer_key(layer, s.name): dict(model.named_parameters())[arch.layer_key(layer, s.name)]
              for layer in range(arch.num_layers) for s in Structures(arch, gqa_mode).scored_slices()}
    loss, grads = accumulate_gradients(model, LanguageModeling(calib), params, batch_size=4)  # 2 uneven batches
    for layer in range(arch.num_layers):
        w = {s.name: params[arch.layer_key(layer, s.name)] for s in Structures(arch, gqa_mode).scored_slices()}
        g = {s.name: grads[arch.layer_key(layer, s.name)] for s in Structures(arch, gqa_mode).scored_slices()}
        attn, mlp = layer_scores(Structures(arch, gqa_mode), w, g)
        torch.testing.assert_close(attn, expected[layer][0], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(mlp, expected[layer][1], rtol=1e-4, atol=1e-9)
    # normalisation constants of the reference
    na, nm = normalise(Structures(arch, gqa_mode), attn, mlp, "reference")
    head_const = 4 * arch.head_dim * arch.hidden_size * (arch.group_size if Structures(arch, gqa_mode).attention_kind == "group" else 1)
    torch.testing.assert_close(na, attn / head_const)
    torch.testing.assert_close(nm, mlp / (3 * arch.intermediate_size))


def test_select_pruned_matches_sorting():
    rng = np.random.default_rng(0)
    for n, ratio in [(50, 0.0), (50, 0.3), (97, 0.7), (10, 1.0)]:
        scores = rng.random(n)
        protected = np.zeros(n, bool)
        protected[:5] = True
        got = select_pruned(scores, np.zeros(n, bool), protected, ratio)
        k = n - int(n * (1 - ratio)) + 1
        kth = np.sort(np.where(protected, np.inf, scores))[min(k, n) - 1]
        np.testing.assert_array_equal(got, (scores <= kth) & ~protected)
        assert not got[protected].any()
    assert threshold_k(100, 0.0) == 1 and threshold_k(100, 0.3) == 31 and threshold_k(10, 1.0) == 10
    # already-pruned stay pruned even with zero ratio
    pruned = np.zeros(10, bool)
    pruned[3] = True
    assert select_pruned(np.arange(10.0), pruned, np.zeros(10, bool), 0.0)[3]


def _run(model, tokenizer, **cfg):
    arch = _arch(model)
    base = dict(samples=6, seq_len=24, batch_size=3, r_max=0.6)
    if cfg.get("method", "gisp") == "gisp":
        base["steps"] = 8
    base.update(cfg)
    c = BuildConfig(**base)
    calib = _calib(tokenizer, c.objective.samples, c.objective.seq_len, c.seed)
    result = rank_model(model, arch, LanguageModeling(calib), c)
    return result.ranking, result.trajectory, result.steps_planned


@pytest.mark.parametrize("family,gqa_mode", [("llama", "query"), ("llama-gqa", "query"), ("qwen2", "group")])
def test_ranking_nested_and_complete(family, gqa_mode, tokenizer):
    model = make_tiny_model(family, vocab_size=len(tokenizer))
    arch = _arch(model)
    ranking, traj, planned = _run(model, tokenizer, gqa_mode=gqa_mode)
    table = structure_table(Structures(arch, gqa_mode), arch.prunable_layers())
    # every structure exactly once
    got = set(zip(ranking.layer.tolist(), ranking.kind.tolist(), ranking.index.tolist(), strict=True))
    assert len(got) == len(ranking) == len(table)
    # removed prefix first, steps non-decreasing; never-pruned layers never removed and last
    removed = ranking.step >= 0
    assert removed[: ranking.num_removed].all() and not removed[ranking.num_removed:].any()
    assert (np.diff(ranking.step[: ranking.num_removed]) >= 0).all()
    assert not (removed & ~ranking.prunable).any()
    assert not ranking.prunable[-1] and (np.diff(ranking.prunable.astype(int)[ranking.num_removed:]) <= 0).all()
    # masks nested step to step, and the trajectory agrees with the ranking
    bounds = [int((ranking.step[: ranking.num_removed] <= t).sum()) for t in range(len(traj))]
    prev = None
    for t, b in enumerate(bounds):
        assert traj[t].structures_removed == b
        assert traj[t].param_sparsity == pytest.approx(ranking.cost[:b].sum() / ranking.decoder_params)
        keep = masks_from_ranking(ranking, b)
        if prev is not None:
            for layer in keep:
                assert not (keep[layer][0] & ~prev[layer][0]).any() and not (keep[layer][1] & ~prev[layer][1]).any()
        prev = keep
    assert len(traj) == planned == 8
    # the engine left the model with exactly the removed structures zeroed
    for layer in range(arch.num_layers):
        mlp = model.model.layers[layer].mlp
        zero_cols = (mlp.down_proj.weight == 0).all(0).numpy()
        np.testing.assert_array_equal(zero_cols, ~prev[layer][1])


def test_gradients_recomputed_on_masked_model(tokenizer):
    """Step-1 scores of what step 1 removed equal brute-force scores on the model masked after step 0."""
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    ref = make_tiny_model("llama", vocab_size=len(tokenizer))
    arch = _arch(model)
    ranking, traj, _ = _run(model, tokenizer, steps=4, r_max=0.6)
    step0 = int((ranking.step == 0).sum())
    from nestprune.rank.mask import mask_model_

    mask_model_(ref, ranking, step0)
    expected = brute_force_scores(ref, arch, _calib(tokenizer).windows, "query")
    sel = np.flatnonzero(ranking.step == 1)
    assert len(sel) > 0
    for i in sel:
        e = expected[int(ranking.layer[i])][1 if ranking.kind[i] == KIND_CODES["channel"] else 0][int(ranking.index[i])]
        assert ranking.raw_score[i] == pytest.approx(float(e), rel=1e-4)


def test_one_shot_is_a_single_step_at_r_max(tokenizer):
    model = make_tiny_model("llama-gqa", vocab_size=len(tokenizer))
    arch = _arch(model)
    ranking, traj, planned = _run(model, tokenizer, method="gisp-oneshot", r_max=0.5)
    assert len(traj) == 1 and planned == 1
    dense = make_tiny_model("llama-gqa", vocab_size=len(tokenizer))
    exp = brute_force_scores(dense, arch, _calib(tokenizer).windows, "query")
    table = structure_table(Structures(arch, "query"), arch.prunable_layers())
    norm = np.array([
        exp[int(l_)][1 if k == KIND_CODES["channel"] else 0][int(i)].item()
        / arch.normaliser("channel" if k == KIND_CODES["channel"] else "head", "reference")
        for l_, k, i in zip(table.layer, table.kind, table.index, strict=True)
    ])
    want = select_pruned(norm, np.zeros(len(table), bool), ~table.prunable, 0.5)
    got = set(zip(ranking.layer[: ranking.num_removed].tolist(), ranking.kind[: ranking.num_removed].tolist(),
                  ranking.index[: ranking.num_removed].tolist(), strict=True))
    assert got == set(zip(table.layer[want].tolist(), table.kind[want].tolist(), table.index[want].tolist(), strict=True))
    assert (np.diff(ranking.score[: ranking.num_removed]) >= 0).all()  # ascending within the single step


def test_max_sparsity_stops_and_extends(tokenizer):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    _, traj, _ = _run(model, tokenizer, steps=15, r_max=0.7, max_sparsity=0.2)
    assert traj[-1].param_sparsity >= 0.2 and traj[-2].param_sparsity < 0.2
    assert len(traj) < 15
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    r, traj, _ = _run(model, tokenizer, steps=3, r_max=0.1, max_sparsity=0.3)
    assert traj[-1].ratio > 0.1 and traj[-1].param_sparsity >= 0.3  # went past r_max to reach the target
    assert traj[-1].ratio == pytest.approx(0.05 * (len(traj) - 1))  # with the same ratio step
    assert r.max_sparsity >= 0.3


def test_protected_layers_get_dense_scores(tokenizer):
    model = make_tiny_model("llama", vocab_size=len(tokenizer), num_layers=5)
    ranking, _, _ = _run(model, tokenizer)
    prot = ~ranking.prunable
    assert set(ranking.layer[prot].tolist()) == {4}
    assert np.isfinite(ranking.score[prot]).all() and (ranking.score[prot] > 0).all()
    assert (np.diff(ranking.score[prot]) >= 0).all()


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_each_family_builds_and_is_reproducible(family, tiny_model_dir, sample_text_file, tmp_path):
    model_dir = tiny_model_dir(family)
    cfg = BuildConfig(samples=4, seq_len=16, batch_size=2, steps=5)
    a1 = build_artifact(model_dir, sample_text_file, tmp_path / "a1", cfg)
    a2 = build_artifact(model_dir, sample_text_file, tmp_path / "a2", cfg)
    m1, r1 = read_artifact(a1)
    m2, r2 = read_artifact(a2)
    assert m1.ranking.sha256 == m2.ranking.sha256
    np.testing.assert_array_equal(r1.index, r2.index)
    assert m1.arch.model_type == FAMILY_CONFIGS[family][0]
    assert m1.arch.family == family_for(FAMILY_CONFIGS[family][0]).name == {"gemma3_text": "gemma3"}.get(
        m1.arch.model_type, m1.arch.model_type)
    assert m1.objective.provenance["tokens_used"] == 4 * 16
    assert m1.base.files[0].name == "model.safetensors"
    from safetensors.torch import load_file

    sd = load_file(model_dir / "model.safetensors")
    assert m1.arch.decoder_params == sum(t.numel() for k, t in sd.items() if k.startswith("model.layers."))
    if family == "qwen2":
        assert "self_attn.q_proj.bias" in m1.arch.present_optional


def test_different_seed_changes_windows(tiny_model_dir, sample_text_file, tmp_path):
    model_dir = tiny_model_dir("llama")
    m1, _ = read_artifact(build_artifact(model_dir, sample_text_file, tmp_path / "a", BuildConfig(samples=4, seq_len=16, steps=3, seed=0)))
    m2, _ = read_artifact(build_artifact(model_dir, sample_text_file, tmp_path / "b", BuildConfig(samples=4, seq_len=16, steps=3, seed=1)))
    assert m1.objective.provenance["seed"] == 0 and m2.objective.provenance["seed"] == 1
    assert m1.trajectory[0].loss != m2.trajectory[0].loss


def test_low_precision_gradients_accumulate_in_fp32(tokenizer):
    """bf16 models (the GPU path) accumulate gradients in fp32 buffers through hooks and agree with fp32."""
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    arch, calib = _arch(model), _calib(tokenizer)
    names = [arch.layer_key(1, "mlp.up_proj.weight"), arch.layer_key(2, "self_attn.q_proj.weight")]
    _, g32 = accumulate_gradients(model, LanguageModeling(calib), {n: dict(model.named_parameters())[n] for n in names}, 2)
    model = model.to(torch.bfloat16)
    params = {n: dict(model.named_parameters())[n] for n in names}
    _, g16 = accumulate_gradients(model, LanguageModeling(calib), params, 2)
    for n in names:
        assert g16[n].dtype == torch.float32 and params[n].grad is None and not params[n].requires_grad
        assert (g16[n] - g32[n]).abs().max() <= 0.05 * g32[n].abs().max()
        assert (g16[n] - g32[n]).abs().max() > 0  # really computed in bf16
