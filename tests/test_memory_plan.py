"""The memory planner: the allocation tracker against independent counts, meta predictions against
the same step on real CPU tensors, the plan's choices against brute force, and a 7B-shaped prediction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILY_CONFIGS

from nestprune.errors import NestpruneError
from nestprune.rank import plan as plan_mod
from nestprune.rank.memory import (
    ACCUMULATORS,
    AllocationTracker,
    grad_param_names,
    hf_config,
    lm_step,
    measure_peak,
    measure_throughput,
    meta_model,
    model_from_config,
    predict_peak,
)
from nestprune.rank.plan import BuildPlan, detect_device_memory, parse_memory, plan_build

MiB, GiB = 1 << 20, 1 << 30


def tiny_config(name: str = "llama", **overrides) -> dict:
    """config.json of a tiny model of family ``name`` (the shapes of conftest.make_tiny_model)."""
    model_type, extra = FAMILY_CONFIGS[name]
    cfg = dict(model_type=model_type, vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
               rms_norm_eps=1e-6)
    cfg.update(extra)
    cfg.update(overrides)
    return cfg


LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


# ---------------------------------------------------------------------------------------------
# (1) the tracker on real tensors
# ---------------------------------------------------------------------------------------------


def test_tracker_counts_new_storages_not_views_or_in_place():
    with AllocationTracker() as t:
        a = torch.empty(1000)
        assert t.current_bytes == 4000
        v = a.view(10, 100)[2:5]  # a view: no new storage
        a.add_(1)  # in place
        assert t.current_bytes == 4000
        b = a * 2  # new storage
        c = torch.ones(10, dtype=torch.float64)
        assert t.current_bytes == nbytes(a, b, c) == 8080
        del b
        assert t.current_bytes == 4080
        assert t.peak_bytes == 8080
        del a  # the view keeps the storage alive
        assert t.current_bytes == 4080
        del v
        assert t.current_bytes == 80
        c.resize_(100)  # grows its storage in place
        assert t.current_bytes == 800
    assert t.peak_bytes == 8080
    del c
    assert t.current_bytes == 800  # frozen at exit


def test_tracker_adds_the_softmax_kernels_internal_copy_of_a_transposed_input():
    x = torch.randn(64, 32)
    with AllocationTracker() as t:
        y = torch.log_softmax(x, dim=1)
    assert t.peak_bytes == t.current_bytes == nbytes(y)
    with AllocationTracker() as t:
        y = torch.log_softmax(x.t(), dim=0)  # the kernel copies x.t() to a contiguous temporary
    assert t.current_bytes == nbytes(y) and t.peak_bytes == 2 * nbytes(y)


def test_tracker_adopts_labels_and_relabels():
    w = torch.zeros(256)
    with AllocationTracker(logits_width=7) as t:
        t.adopt([w, w.view(16, 16)], "weights")  # one storage, counted once
        with t.label("accumulators"):
            acc = torch.zeros(100)
        x = torch.ones(3, 7)  # vocabulary-sized dim
        y = torch.ones(5)
        assert t.peak_breakdown == {"weights": 1024, "accumulators": 400, "activations": 20, "logits": 84,
                                    "workspace": 0}
        t.relabel([y], "workspace")
        assert t.peak_breakdown["workspace"] == 20 and t.peak_breakdown["activations"] == 0
        assert sum(t.peak_breakdown.values()) == t.peak_bytes == nbytes(w, acc, x, y)
    with pytest.raises(ValueError):
        with t.label("nonsense"):
            pass


def test_tracker_labels_backward_allocations_workspace():
    x = torch.randn(64, 64, requires_grad=True)
    with AllocationTracker() as t:
        y = (x * 2).sin().sum()
        made_forward = t.current_bytes
        y.backward()
        del y
    assert made_forward == 64 * 64 * 4 + 4  # x*2 (saved by sin) and the sum; sin's output is gone
    assert t.peak_breakdown["workspace"] > 0
    assert t.current_bytes == nbytes(x.grad)  # only the gradient is left
    assert t.peak_breakdown["workspace"] + t.peak_breakdown["activations"] == t.peak_bytes


def test_tracker_agrees_with_saved_tensors_on_a_tiny_llama():
    """End of forward: tracked bytes == the unique storages autograd saved plus the live loss;
    end of backward: == the gradients left in .grad."""
    cfg = tiny_config("llama-gqa")
    model = model_from_config(cfg, torch.float32, "cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n in set(grad_param_names(cfg))]
    for p in params:
        p.requires_grad_(True)
    weights = {p.untyped_storage()._cdata for p in model.parameters()} | {
        b.untyped_storage()._cdata for b in model.buffers()}
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        if t.untyped_storage()._cdata not in weights:
            saved[t.untyped_storage()._cdata] = t
        return t

    from nestprune.objectives.base import token_nll

    with AllocationTracker() as t:
        ids = torch.randint(0, 300, (3, 16))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = token_nll(model, ids, ids).sum()
        live = {**saved, ids.untyped_storage()._cdata: ids, loss.untyped_storage()._cdata: loss}
        assert t.current_bytes == nbytes(*live.values())
        saved.clear()
        del live
        loss.backward()
        del loss, ids
        assert t.current_bytes == nbytes(*(p.grad for p in params))


CHILD = textwrap.dedent("""
    import gc, json, sys, torch
    from nestprune.rank.memory import grad_param_names, install_accumulators, lm_step, model_from_config

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    args = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    cfg, mb, T = args["config"], args["micro_batch"], args["seq_len"]
    tiny = dict(cfg, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    lm_step(model_from_config(tiny, torch.float32, "cpu"), {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    gc.collect()  # libraries initialised
    base = status("VmRSS")
    model = model_from_config(cfg, torch.float32, "cpu")
    gc.collect()
    model_bytes = status("VmRSS") - base
    for p in model.parameters():
        p.requires_grad_(False)
    named = dict(model.named_parameters())
    params = {n: named[n] for n in grad_param_names(cfg)}
    for p in params.values():
        p.requires_grad_(True)
    lm_step(model, {"input_ids": torch.randint(0, cfg["vocab_size"], (mb, T))})  # warm-up
    for p in params.values():
        p.grad = None
    gc.collect()
    loaded = status("VmRSS")
    reset_peak()
    install_accumulators(params, "fp32")  # what the build does (fp32 weights: gradients in .grad)
    for _ in range(2):
        lm_step(model, {"input_ids": torch.randint(0, cfg["vocab_size"], (mb, T))})
    print(json.dumps({"model": model_bytes, "step": status("VmHWM") - loaded}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_prediction_matches_peak_rss_of_a_real_step(tmp_path):
    """A 43M-parameter model, two micro-batches of 2x128 in a subprocess: peak RSS above the loaded model
    vs the meta prediction minus its weights (glibc told to return every block above 64 KiB)."""
    cfg = dict(model_type="llama", vocab_size=16000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, rms_norm_eps=1e-6,
               tie_word_embeddings=False)
    est = predict_peak(cfg, dtype=torch.float32, micro_batch=2, seq_len=128)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"config": cfg, "micro_batch": 2, "seq_len": 128})],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    predicted_step = est.peak_bytes - est.breakdown.weights
    assert abs(measured["model"] - est.breakdown.weights) <= 0.02 * est.breakdown.weights + 4 * MiB, measured
    assert abs(measured["step"] - predicted_step) <= 0.05 * predicted_step + 16 * MiB, (measured, predicted_step)


# ---------------------------------------------------------------------------------------------
# (2) meta prediction == the same step on real CPU tensors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,dtype,accumulator", [
    *[(f, torch.float32, "fp32") for f in FAMILY_CONFIGS],
    ("llama", torch.bfloat16, "fp32"),
    ("llama-gqa", torch.bfloat16, "bf16-stochastic"),
    ("qwen2", torch.bfloat16, "fp32-host"),
    ("llama-gqa", torch.bfloat16, "grad"),
])
def test_meta_prediction_equals_the_real_cpu_step(family, dtype, accumulator):
    cfg = tiny_config(family)
    names = grad_param_names(cfg)
    real = measure_peak(model_from_config(cfg, dtype, "cpu"), micro_batch=3, seq_len=16, params_requiring_grad=names,
                        accumulator=accumulator)
    meta = predict_peak(cfg, dtype=dtype, micro_batch=3, seq_len=16, accumulator=accumulator)
    # the only difference: the CUDA flash op's meta kernel returns its RNG seed and offset (24 bytes per layer)
    slack = 24 * cfg["num_hidden_layers"]
    assert 0 <= meta.peak_bytes - real.peak_bytes <= slack
    for a, b in zip(meta.micro_batch_peaks, real.micro_batch_peaks, strict=True):
        assert 0 <= a - b <= slack
    r, m = real.breakdown, meta.breakdown
    assert (m.weights, m.accumulators, m.logits) == (r.weights, r.accumulators, r.logits)
    assert m.total == meta.peak_bytes and r.total == real.peak_bytes
    model = meta_model(cfg, dtype)
    assert m.weights == nbytes(*model.parameters(), *model.buffers())  # buffers: rotary inv_freq


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_grad_param_names_are_what_the_gisp_loop_differentiates(family):
    from nestprune.arch import Structures, arch_from_config
    from nestprune.rank.gisp import scored_params

    cfg = tiny_config(family)
    model = meta_model(cfg, torch.float32)
    for mode in ("query", "group"):
        for layers in (None, [1, 2]):
            want = scored_params(model, Structures(arch_from_config(cfg), mode), layers or list(range(4)))
            assert grad_param_names(cfg, mode, layers) == list(want)


def test_persistent_accumulators_and_their_bytes():
    """Accumulators are made once, before the first micro-batch (fp32 weights: a persistent fp32 .grad that
    autograd adds into): every micro-batch has the same peak, and the buffers hold 4 (2) bytes per element."""
    cfg = tiny_config("llama")
    n_grad = sum(p.numel() for n, p in meta_model(cfg, torch.float32).named_parameters() if n in grad_param_names(cfg))
    fp32 = predict_peak(cfg, dtype=torch.float32, micro_batch=2, seq_len=16, micro_batches=3)
    assert fp32.micro_batch_peaks[0] == fp32.micro_batch_peaks[1] == fp32.micro_batch_peaks[2]
    assert fp32.breakdown.accumulators == 4 * n_grad
    for mode in ("fp32", "bf16-stochastic", "fp32-host"):
        e = predict_peak(cfg, dtype=torch.bfloat16, micro_batch=2, seq_len=16, accumulator=mode)
        assert e.breakdown.accumulators == ACCUMULATORS[mode].device_bytes * n_grad
        assert e.host_bytes == ACCUMULATORS[mode].host_bytes * n_grad


def test_predict_peak_leaves_the_model_untouched_and_rejects_bad_input():
    cfg = tiny_config("llama")
    model = meta_model(cfg, torch.float32)
    predict_peak(cfg, dtype=torch.float32, micro_batch=1, seq_len=8, model=model)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    with pytest.raises(NestpruneError, match="no parameter"):
        measure_peak(model, micro_batch=1, seq_len=8, params_requiring_grad=["model.nope.weight"])
    with pytest.raises(NestpruneError, match="unknown accumulator"):
        predict_peak(cfg, dtype=torch.float32, micro_batch=1, seq_len=8, accumulator="fp8")
    with pytest.raises(NestpruneError, match="micro_batch"):
        predict_peak(cfg, dtype=torch.float32, micro_batch=0, seq_len=8)
    with pytest.raises(NestpruneError, match="model_type"):
        hf_config({"hidden_size": 8})
    with pytest.raises(NestpruneError, match="does not know"):
        hf_config({"model_type": "no-such-model"})


def test_a_custom_step_function_is_what_runs():
    cfg = tiny_config("llama")
    calls = []

    def step(model, batch):
        calls.append(tuple(batch["input_ids"].shape))
        lm_step(model, batch)

    predict_peak(cfg, dtype=torch.float32, micro_batch=2, seq_len=8, step_fn=step)
    assert calls == [(2, 8), (2, 8)]


# ---------------------------------------------------------------------------------------------
# (3) the plan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peaks", [
    [10 + 3 * b for b in range(1, 41)],  # affine
    [max(10 + 3 * b, 5 * b - 20, b * b // 4) for b in range(1, 41)],  # convex, piecewise
    [10 + 3 * b + (b > 20) * 40 for b in range(1, 41)],  # a step: monotone but not convex
])
def test_largest_fitting_equals_brute_force(peaks):
    for usable in range(0, max(peaks) + 5, 3):
        probes = []

        def peak(b, probes=probes):
            probes.append(b)
            return peaks[b - 1]

        want = max((b for b in range(1, 41) if peaks[b - 1] <= usable), default=None)
        assert plan_mod._largest_fitting(peak, usable, 40) == want
        assert all(1 <= b <= 40 for b in probes)


def test_auto_micro_batch_is_the_largest_that_fits():
    cfg = tiny_config("llama-gqa", num_hidden_layers=2)
    samples = 8
    model = meta_model(cfg, torch.float32)
    peaks = {b: predict_peak(cfg, dtype=torch.float32, micro_batch=b, seq_len=32, model=model,
                             micro_batches=min(2, -(-samples // b))).peak_bytes for b in range(1, samples + 1)}
    assert all(peaks[b] < peaks[b + 1] for b in range(1, samples))
    for target in (1, 5, 8):
        device = int((peaks[target] + 100) / 0.9) + 1  # just above the peak at ``target``, 10% headroom
        p = plan_build(cfg, device, samples=samples, seq_len=32, dtype="float32", steps=16)
        assert p.fits and p.micro_batch == target and p.peak_bytes == peaks[target]
        assert p.accumulator == "fp32"
        assert p.breakdown.total == p.peak_bytes
        assert p.micro_batches_per_step == -(-samples // target)
    assert plan_build(cfg, 10 * GiB, samples=samples, seq_len=32, dtype="float32", steps=16).micro_batch == samples


def test_nothing_fits_and_the_lower_memory_accumulator_is_chosen():
    cfg = tiny_config("llama", num_hidden_layers=2)
    kw = dict(samples=8, seq_len=32, dtype="bfloat16", steps=4, headroom=0.0)
    e = {m: predict_peak(cfg, dtype=torch.bfloat16, micro_batch=1, seq_len=32, accumulator=m).peak_bytes
         for m in plan_mod.AUTO_ACCUMULATORS}
    assert e["fp32"] > e["bf16-stochastic"] > e["fp32-host"]
    p = plan_build(cfg, e["fp32"] - 1, **kw)  # fp32 does not fit even at micro-batch 1
    assert p.fits and p.accumulator == "bf16-stochastic"
    p = plan_build(cfg, e["fp32-host"] + 1, **kw)
    assert p.fits and p.accumulator == "fp32-host" and p.micro_batch == 1 and p.host_bytes > 0
    p = plan_build(cfg, e["fp32-host"] - 1, **kw)
    assert not p.fits and p.micro_batch == 1 and p.accumulator == "fp32-host" and p.peak_bytes == e["fp32-host"]
    assert "does not fit: needs" in p.verdict()
    p = plan_build(cfg, e["fp32-host"] - 1, **{**kw, "accumulator": "fp32", "batch_size": 4})
    assert not p.fits and p.micro_batch == 4 and p.accumulator == "fp32"


def test_plan_json_round_trip_summary_and_projected_time():
    cfg = tiny_config("qwen3")
    p = plan_build(cfg, "1GiB", samples=10, seq_len=16, dtype="float32", steps=7, batch_size=4, throughput=80.0)
    assert BuildPlan.from_json(p.to_json()) == p
    d = json.loads(p.to_json())
    assert isinstance(d["peak_bytes"], int) and d["fits"] is True and d["micro_batch"] == 4
    assert d["accumulator"] == "fp32" and sum(d["breakdown"].values()) == d["peak_bytes"]
    assert set(d["breakdown"]) == {"weights", "accumulators", "activations", "logits", "workspace"}
    assert d["projected_seconds_dense"] == pytest.approx(7 * 10 * 16 / 80.0)
    costs = plan_mod.step_costs(cfg, steps=7, r_max=0.7)
    assert len(costs) == 7 and costs[0] == 1.0 and all(a > b for a, b in zip(costs, costs[1:], strict=False))
    assert d["projected_seconds"] == pytest.approx(7 * 10 * 16 / 80.0 * sum(costs) / 7)
    assert d["projected_seconds"] < d["projected_seconds_dense"]
    dense = plan_build(cfg, "1GiB", samples=10, seq_len=16, dtype="float32", steps=7, batch_size=4, throughput=80.0,
                       compact=False)
    assert dense.projected_seconds == dense.projected_seconds_dense == pytest.approx(14.0)
    assert d["micro_batches_per_step"] == 3 and d["tokens_per_step"] == 160 and d["device_memory"] == GiB
    assert "fits: peak" in p.summary() and "projected: 7 steps" in p.summary() and "not a measurement" in p.summary()
    with pytest.raises(NestpruneError, match="plan version"):
        BuildPlan.from_dict({**d, "plan_version": 99})


def test_plan_rejects_bad_input():
    cfg = tiny_config("llama")
    kw = dict(samples=4, seq_len=16, dtype="float32", steps=2)
    for bad, match in [({"ranks": 0}, "ranks must be"), ({"ranks": True}, "ranks must be"),
                       ({"shard": True, "ranks": 2, "accumulator": "bf16-stochastic"}, "sharded build accumulates"),
                       ({"batch_size": 0}, "batch size"), ({"accumulator": "fp8"}, "unknown accumulator"),
                       ({"dtype": "int8"}, "dtype"), ({"samples": 0}, "samples"), ({"headroom": 1.0}, "headroom"),
                       ({"throughput": 0.0}, "throughput")]:
        with pytest.raises(NestpruneError, match=match):
            plan_build(cfg, "1GiB", **{**kw, **bad})


def test_measure_throughput_on_a_real_model():
    cfg = tiny_config("llama")
    model = model_from_config(cfg, torch.float32, "cpu")
    tps = measure_throughput(model, micro_batch=2, seq_len=16, params_requiring_grad=grad_param_names(cfg), repeats=2)
    assert tps > 0
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    if not torch.cuda.is_available():
        assert detect_device_memory() is None


def test_parse_memory():
    assert parse_memory("80GiB") == 80 * GiB
    assert parse_memory("80 GB") == 80 * 10**9
    assert parse_memory("0.5gib") == GiB // 2
    assert parse_memory("24000MiB") == 24000 * MiB
    assert parse_memory("1024") == parse_memory(1024) == 1024
    for bad in ("", "GiB", "80 GiBs", "-1GiB", "0", "1e9", True):
        with pytest.raises(NestpruneError):
            parse_memory(bad)


# ---------------------------------------------------------------------------------------------
# (4) a Llama-2-7B shape, from its config alone
# ---------------------------------------------------------------------------------------------


def test_llama2_7b_shape_prediction():
    """Known: 47.8 GiB at 8x256 with fp32 accumulators (bf16 weights, all layers' scored weights)."""
    model = meta_model(LLAMA2_7B, torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    n_grad = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    fp32 = predict_peak(LLAMA2_7B, dtype=torch.bfloat16, micro_batch=8, seq_len=256, model=model)
    assert 46.5 * GiB < fp32.peak_bytes < 49 * GiB
    assert fp32.breakdown.weights == 2 * n_params + 2 * 64 * 4  # + rotary inv_freq and its original (fp32)
    assert fp32.breakdown.accumulators == 4 * n_grad
    bf16 = predict_peak(LLAMA2_7B, dtype=torch.bfloat16, micro_batch=8, seq_len=256, model=model,
                        accumulator="bf16-stochastic")
    assert fp32.peak_bytes - bf16.peak_bytes == 2 * n_grad
