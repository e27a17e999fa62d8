"""Compaction: the compacted build ranks exactly as the zeroing path (--no-compact), for every family in
both GQA modes; widths, padding and the working model's state; resuming from a GispState; the removal
order does not depend on the micro-batch size."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import ATTN_IMPLEMENTATIONS, FAMILY_CONFIGS, SAMPLE_TEXT, make_tiny_model

from nestprune.arch import Structures, arch_from_config
from nestprune.objectives.lm import LanguageModeling
from nestprune.rank.calibration import CalibrationSet, sample_windows, tokenize_documents
from nestprune.rank.compact import CompactPolicy, LayerLayout, default_policy
from nestprune.rank.gisp import GispState, Workspace, finish_ranking, finished, plan_gisp, run_gisp, run_step
from nestprune.rank.methods import RankJob, SilentReporter

CASES = [(f, m) for f in FAMILY_CONFIGS for m in ("query", "group")
         if not (m == "group" and FAMILY_CONFIGS[f][1].get("num_key_value_heads", 4) == 4)]
INTERMEDIATE = 96  # room for two cuts at the CPU's multiple of 32 (96 -> 64 -> 32)


def calib(tokenizer, n=4, seq_len=16, seed=0) -> CalibrationSet:
    stream = tokenize_documents(SAMPLE_TEXT.split("\n\n"), tokenizer)
    return CalibrationSet(windows=sample_windows(stream, n, seq_len, seed), source="mem", sha256="0" * 64, seed=seed,
                          documents=1, tokens_available=len(stream))


def tiny(family: str, tokenizer, **overrides):
    """A tiny model with the attention the build loads (SDPA unless the family soft-caps attention logits)."""
    model = make_tiny_model(family, vocab_size=len(tokenizer), intermediate_size=INTERMEDIATE, **overrides)
    model.config._attn_implementation = ATTN_IMPLEMENTATIONS[family][-1]
    return model


def setup(model, objective, gqa_mode="query", *, compact=True, policy=None, batch_size=2, steps=5, r_max=0.9,
          max_sparsity=None):
    arch = arch_from_config(model.config.to_dict(), set(model.state_dict()))
    job = RankJob(model=model, structures=Structures(arch, gqa_mode), objective=objective, batch_size=batch_size,
                  seed=0, max_sparsity=max_sparsity, skip_first_frac=0.1, skip_last=1, compact=compact,
                  compact_policy=policy)
    return plan_gisp(job, r_max=r_max, steps=steps, one_shot=False, normalisation="reference")


def run(model, objective, plan, state=None):
    """``run_gisp``'s loop, step by step, recording the working model's widths after each step."""
    state = state or GispState.start(len(plan.table))
    work = Workspace(model, plan)
    widths = []
    try:
        work.sync(state)
        while True:
            ratio = run_step(work, objective, plan, state, SilentReporter())
            widths.append(work.widths())
            if finished(plan, state, ratio):
                break
    finally:
        work.restore()
    return finish_ranking(plan, state), state, widths


def same_order(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("layer", "kind", "index", "step"))


@pytest.mark.parametrize("family,gqa_mode", CASES)
def test_compacted_ranking_is_identical_to_the_zeroing_path(family, gqa_mode, tokenizer):
    """fp32 on CPU: the full removal order, every score and the final weights agree to the bit, while the
    working model really shrinks (attention units and MLP channels both cut)."""
    objective = LanguageModeling(calib(tokenizer))
    zero_model, cut_model = tiny(family, tokenizer), tiny(family, tokenizer)
    r0, _, w0 = run(zero_model, objective, setup(zero_model, objective, gqa_mode, compact=False))
    policy = CompactPolicy(channel_multiple=32, head_multiple=1, min_shrink=0.0)
    r1, _, w1 = run(cut_model, objective, setup(cut_model, objective, gqa_mode, policy=policy))
    assert same_order(r0, r1)
    np.testing.assert_array_equal(r0.score, r1.score)
    np.testing.assert_array_equal(r0.raw_score, r1.raw_score)
    full = w0[0]
    assert all(w == full for w in w0)  # the zeroing path never cuts
    assert w1[-1]["attention"] < full["attention"] and w1[-1]["mlp"] < full["mlp"]
    # handed back at full width, removed structures zeroed: the same tensors as the zeroing path's
    s0, s1 = zero_model.state_dict(), cut_model.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert not hasattr(cut_model.model.layers[1].self_attn, "nestprune_kv_index")
    assert cut_model.config._attn_implementation == zero_model.config._attn_implementation


def test_padding_widths_and_policy(tokenizer):
    p = CompactPolicy(channel_multiple=32, head_multiple=1, min_shrink=1 / 16)
    assert p.width(live=40, current=96, multiple=32) == 64  # rounded up to the multiple
    assert p.width(live=70, current=96, multiple=32) is None  # 96: nothing to gain
    assert p.width(live=0, current=96, multiple=32) == 32  # never below one multiple
    assert p.width(live=1, current=48, multiple=1, minimum=2) == 2  # nor below the minimum
    assert CompactPolicy(head_multiple=1, min_shrink=0.25).width(live=7, current=8, multiple=1) is None  # < 1/4
    assert default_policy("cpu").channel_multiple == 32 and default_policy("cuda").channel_multiple == 64
    with pytest.raises(ValueError):
        CompactPolicy(channel_multiple=0)
    # a synced workspace: live units first, then padding (removed units, kept zero), ascending positions
    model = tiny("llama-gqa", tokenizer)
    objective = LanguageModeling(calib(tokenizer))
    plan = setup(model, objective, policy=CompactPolicy(channel_multiple=32, head_multiple=1, min_shrink=0.0))
    state = GispState.start(len(plan.table))
    per = 4 + INTERMEDIATE
    state.pruned[per + 4 : per + 4 + 70] = True  # layer 1: 70 of 96 channels, 26 left
    state.pruned[per + 1] = True  # and query head 1
    work = Workspace(model, plan)
    work.sync(state)
    lay = work.layout[1]
    assert len(lay.mlp) == 32 and list(lay.attn) == [0, 2, 3]
    live = ~state.pruned[per + 4 + lay.mlp]
    assert live.sum() == 26 and (np.diff(lay.mlp) > 0).all()
    mlp = model.model.layers[1].mlp
    assert mlp.gate_proj.weight.shape == (32, 32) and mlp.down_proj.weight.shape == (32, 32)
    assert (mlp.down_proj.weight[:, torch.from_numpy(~live)] == 0).all()  # padding is zero
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.shape[0] == 3 * 8 and attn.k_proj.weight.shape[0] == 2 * 8  # K/V never cut (query mode)
    assert attn.nestprune_kv_index.tolist() == [0, 1, 1] and attn.num_key_value_groups == 1
    assert LayerLayout.full(plan.structures).counts(plan.structures) == {"q": 4, "kv": 2, "mlp": INTERMEDIATE}
    # the persistent accumulators follow the cut: made at the compacted shape, then reused step after step
    _, grads = work.accumulate(objective, plan.layers(1))
    key = plan.structures.arch.layer_key(1, "mlp.down_proj.weight")
    assert key in work.buffers and grads[key] is work.buffers[key] and work.buffers[key].shape == (32, 32)
    kept = dict(work.buffers)
    _, again = work.accumulate(objective, plan.layers(1))
    assert all(work.buffers[k] is kept[k] for k in kept) and torch.equal(again[key], grads[key])
    work.restore()
    assert model.model.layers[1].mlp.gate_proj.weight.shape == (INTERMEDIATE, 32)


def test_phi3_compacted_attention_gets_its_own_config_view(tokenizer):
    model = tiny("phi3", tokenizer)
    objective = LanguageModeling(calib(tokenizer))
    plan = setup(model, objective, "group", policy=CompactPolicy(channel_multiple=32, head_multiple=1, min_shrink=0.0))
    state = GispState.start(len(plan.table))
    per = 2 + INTERMEDIATE
    state.pruned[per] = True  # layer 1: KV group 0 (query heads 0, 1 and KV head 0)
    work = Workspace(model, plan)
    work.sync(state)
    attn = model.model.layers[1].self_attn
    assert attn.config is not model.config and attn.config.num_attention_heads == 2 and attn.num_key_value_heads == 1
    assert attn.qkv_proj.weight.shape[0] == (2 + 1 + 1) * 8
    ids = objective.calib.windows[:2]
    with torch.no_grad():
        model(input_ids=ids)  # runs at the cut width
    work.restore()
    assert attn.config is model.config and attn.num_key_value_heads == 2


def test_resume_from_a_saved_state_gives_the_same_ranking(tokenizer):
    """The workspace is rebuilt from a dense model and a GispState (what issue 12's resume needs)."""
    objective = LanguageModeling(calib(tokenizer))
    whole = tiny("llama-gqa", tokenizer)
    full_ranking, _, _ = run(whole, objective, setup(whole, objective))
    first = tiny("llama-gqa", tokenizer)
    plan = setup(first, objective)
    state = GispState.start(len(plan.table))
    work = Workspace(first, plan)
    for _ in range(2):
        run_step(work, objective, plan, state, SilentReporter())
        assert not finished(plan, state, plan.ratio(state.t - 1))
    work.restore()
    saved = copy.deepcopy(state)  # what a checkpoint holds: numpy arrays, the trajectory, the step index
    fresh = tiny("llama-gqa", tokenizer)  # the base model again
    resumed, _ = run_gisp(fresh, objective, setup(fresh, objective), SilentReporter(), saved)
    assert same_order(full_ranking, resumed)
    np.testing.assert_array_equal(full_ranking.score, resumed.score)


def test_removal_order_does_not_depend_on_the_micro_batch(tokenizer):
    """Micro-batches of 1, 2, 3 (uneven: 3 + 1) and 4 windows: the gradient sums differ by rounding only, and so
    does nothing else."""
    family, gqa_mode = "qwen2", "group"
    objective = LanguageModeling(calib(tokenizer))
    out = []
    for b in (1, 2, 4, 3):
        model = tiny(family, tokenizer)
        ranking, _, _ = run(model, objective, setup(model, objective, gqa_mode, batch_size=b))
        out.append(ranking)
    for other in out[1:]:
        assert same_order(out[0], other)
        np.testing.assert_allclose(other.score, out[0].score, rtol=1e-5, atol=0)
    assert not np.array_equal(out[0].score, out[2].score)  # really summed differently
