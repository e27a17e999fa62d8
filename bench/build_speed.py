"""How fast is a build, and what does it hold in memory: compaction, lean accumulation, streamed calibration.

    python bench/build_speed.py                 # CPU: trains two small proxies once (cached), then measures
    python bench/build_speed.py --scale gpu     # GPU: Llama-2-7B / Llama-3-8B / Llama-2-13B shapes (≈8 min on an H200)
    python bench/build_speed.py --scale gpu --dry-run   # the GPU code path on CPU, on tiny shapes (a check)

CPU, on trained proxies (``nestprune.evaluate.proxy``, cpu scale, trained on ../shared/corpus), side by side
in one run:

* ``speed``: the wall time of a GISP build to 50% parameter sparsity with compaction and with
  ``--no-compact`` (interleaved, ``--repeats`` each; the rankings must be identical: asserted), and the
  work bound of compaction: the mean over the run's steps of the per-token weights left (decoder +
  output layer), which a compacted build cannot beat;
* ``step``: one build step (accumulate → score → select → apply, step 0 on the dense model) against a
  plain forward+backward of the same model on the same tokens (the transformers loss over full fp32
  logits, the same weights requiring grad, gradients left in ``.grad``), median of ``--repeats``;
* ``accumulators``: builds of the proxies in bf16 with each accumulator mode; the removal order of each
  against the fp32-accumulator one: overlap of the structures removed up to 20% and 40% parameter
  sparsity (and fp32 weights against bf16 weights, for scale);
* ``rss``: peak RSS of ``nestprune build`` (a subprocess, one GISP step on 2000 × 256-token windows of
  the whole shared train corpus) against the model, its buffers (the memory plan's peak) and a
  baseline process that only imports the libraries, and the peak RSS of tokenising the corpus the old
  way (every token a Python int).

GPU (``--scale gpu``): model shapes from their configs with random bf16 weights, SDPA, built on the
device: tokens/s of a plain forward+backward against a build micro-batch (dense, and after a random
removal compacted to 30% and 50% parameter sparsity), the step's scoring time, the peak
(``torch.cuda.max_memory_allocated``) against the plan, and the projected wall time of a whole
512k-token-per-step build to 50% (the measured tokens/s interpolated over the schedule's sparsity:
a projection from measured step times, not a measurement).

Writes bench/results/build_speed.md (+ .json; -gpu for the GPU scale) with the command, device and load.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Annotated

import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import _common as c  # noqa: E402

app = typer.Typer(add_completion=False)
FAMILIES = ("llama-mha", "llama-gqa")
CPU_STAGES = ("speed", "step", "accumulators", "plan", "rss")
PROXY_STAGES = ("speed", "step", "accumulators", "plan")  # per proxy, on the calibration windows of ``setup``
MiB, GiB = 1 << 20, 1 << 30


# ------------------------------------------------------------------------------------------------
# shared pieces


def calibration(stream, samples: int, seq_len: int, seed: int = 0):
    import torch

    from nestprune.rank.calibration import CalibrationSet, sample_windows

    w = sample_windows(stream, samples, seq_len, seed)
    return CalibrationSet(windows=w, source="corpus/train", sha256="0" * 64, seed=seed, documents=1,
                          tokens_available=int(torch.numel(stream)))


class StepClock:
    """A build reporter that records the process CPU time of each finished step."""

    def __init__(self) -> None:
        self.last = time.process_time()
        self.steps: list[float] = []

    def on_batch(self, step: int, done: int, total: int) -> None:
        pass

    def on_step(self, record, steps_planned: int) -> None:
        now = time.process_time()
        self.steps.append(now - self.last)
        self.last = now


def build_once(model_dir: Path, objective, cfg, dtype=None) -> tuple[dict, object]:
    """({"wall", "cpu", "steps_cpu"} seconds of the ranking itself, result) on a freshly loaded model."""
    import torch

    from nestprune.build import load_model, rank_model, read_arch

    arch = read_arch(model_dir)
    model = load_model(model_dir, torch.device("cpu"), dtype or torch.float32)
    gc.collect()
    clock = StepClock()
    t0, c0 = time.perf_counter(), time.process_time()
    clock.last = c0
    result = rank_model(model, arch, objective, cfg, clock, micro_batch=cfg.batch_size,
                        accumulator=None if cfg.accumulator == "auto" else cfg.accumulator)
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "steps_cpu": clock.steps}, result


def same_ranking(a, b) -> bool:
    import numpy as np

    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("layer", "kind", "index", "step", "score"))


def work_bound(config: dict, trajectory) -> float:
    """Mean over the run's steps of (output layer + decoder weights left) / (output layer + decoder): step t runs
    on what step t-1 left. Time per token taken as proportional to the weights a token meets."""
    from nestprune.arch import arch_from_config

    arch = arch_from_config(config)
    decoder = arch.num_layers * arch.layer_params()
    head = arch.vocab_size * arch.hidden_size
    left = [1.0] + [1.0 - r.param_sparsity for r in trajectory[:-1]]
    return statistics.mean((head + decoder * x) / (head + decoder) for x in left)


def work_bound_of_shape(config: dict) -> float:
    """The same bound for an LLM shape over its whole default schedule to 50% (config only)."""
    from nestprune.rank.plan import step_costs

    config = {**config, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    return statistics.mean(step_costs(config, steps=default_steps(config), r_max=0.7, max_sparsity=0.5))


def default_steps(config: dict) -> int:
    """GISP's default schedule length for this model (``nestprune.build.plan_steps``)."""
    from nestprune.build import BuildConfig, plan_steps

    return plan_steps(BuildConfig(), int(config["num_hidden_layers"]))[0]


def overlap(a, b, sparsity: float) -> float:
    """Share of the structures ``a`` removes up to ``sparsity`` that ``b``'s as long prefix removes too."""
    k = a.prefix_for_sparsity(sparsity)
    sa = set(zip(a.layer[:k].tolist(), a.kind[:k].tolist(), a.index[:k].tolist(), strict=True))
    sb = set(zip(b.layer[:k].tolist(), b.kind[:k].tolist(), b.index[:k].tolist(), strict=True))
    return len(sa & sb) / max(1, k)


# ------------------------------------------------------------------------------------------------
# CPU stages


def stage_speed(model_dir: Path, objective, steps: int | None, micro: int, repeats: int) -> dict:
    from nestprune.build import BuildConfig

    out: dict = {"wall": {"compact": [], "no_compact": []}, "cpu": {"compact": [], "no_compact": []}}
    rankings, per_step = {}, {}
    for _ in range(repeats):
        for key, flag in (("no_compact", True), ("compact", False)):
            cfg = BuildConfig(max_sparsity=0.5, steps=steps, batch_size=micro, no_compact=flag)
            seconds, result = build_once(model_dir, objective, cfg)
            out["wall"][key].append(round(seconds["wall"], 2))
            out["cpu"][key].append(round(seconds["cpu"], 2))
            per_step.setdefault(key, []).append(seconds["steps_cpu"])
            if key in rankings:
                assert same_ranking(rankings[key], result.ranking), f"{key}: not reproducible"
            rankings[key] = result.ranking
            out["steps_run"] = len(result.trajectory)
            out["trajectory"] = [r.param_sparsity for r in result.trajectory]
            traj = result.trajectory
    assert same_ranking(rankings["compact"], rankings["no_compact"]), "compaction changed the ranking"
    out["same_ranking"] = True
    for clock in ("wall", "cpu"):
        out[f"ratio_{clock}"] = statistics.median(out[clock]["compact"]) / statistics.median(out[clock]["no_compact"])
    # per step (CPU time, median over the repeats): compact / no-compact, on the first and the last step
    med = {k: [statistics.median(x) for x in zip(*v, strict=True)] for k, v in per_step.items()}
    out["step_cpu"] = {k: [round(x, 3) for x in v] for k, v in med.items()}
    out["first_step_ratio"] = med["compact"][0] / med["no_compact"][0]
    out["last_step_ratio"] = med["compact"][-1] / med["no_compact"][-1]
    out["work_bound"] = work_bound(json.loads((model_dir / "config.json").read_text()), traj)
    return out


def plain_step(model, params, windows, micro: int) -> None:
    """A plain forward+backward: transformers' loss over the full fp32 logits, gradients left in .grad."""
    import torch.nn.functional as F

    for i in range(0, len(windows), micro):
        ids = windows[i : i + micro]
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()


def stage_step(model_dir: Path, objective, micro: int, repeats: int) -> dict:
    import torch

    from nestprune.arch import Structures
    from nestprune.build import load_model, read_arch
    from nestprune.rank.gisp import GispState, Workspace, plan_gisp, run_step, scored_params
    from nestprune.rank.methods import RankJob, SilentReporter

    arch = read_arch(model_dir)
    model = load_model(model_dir, torch.device("cpu"), torch.float32)
    job = RankJob(model=model, structures=Structures(arch, "query"), objective=objective, batch_size=micro,
                  seed=0, max_sparsity=0.5, skip_first_frac=0.1, skip_last=1)
    plan = plan_gisp(job, r_max=0.7, steps=None, one_shot=False, normalisation="reference")
    windows = objective.calib.windows
    times: dict[str, dict[str, list[float]]] = {c: {"plain": [], "build": [], "accumulate": []} for c in ("wall", "cpu")}

    def timed(fn) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0

    for r in range(repeats + 1):  # the first round warms up
        params = dict(model.named_parameters())
        names = list(scored_params(model, plan.structures, plan.layers(0)))
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for n in names:
            params[n].requires_grad_(True)
        plain = timed(lambda: plain_step(model, None, windows, micro))  # the model as transformers runs it
        for n in names:
            params[n].requires_grad_(False)
            params[n].grad = None
        work = Workspace(model, plan)
        acc = timed(lambda: work.accumulate(objective, plan.layers(0)))  # noqa: B023
        gc.collect()
        state = GispState.start(len(plan.table))
        step = timed(lambda: run_step(work, objective, plan, state, SilentReporter()))  # noqa: B023
        work.restore()
        if r:
            for i, clock in enumerate(("wall", "cpu")):
                times[clock]["plain"].append(plain[i])
                times[clock]["build"].append(step[i])
                times[clock]["accumulate"].append(acc[i])
    # where a build step's time goes: one more step under the profiler
    from torch.profiler import profile

    work = Workspace(model, plan)
    with profile() as prof:
        run_step(work, objective, plan, GispState.start(len(plan.table)), SilentReporter())
    work.restore()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    med = {c: {k: statistics.median(v) for k, v in t.items()} for c, t in times.items()}
    return {"matmul_share": mm / total,
            "seconds": {c: {k: [round(x, 3) for x in v] for k, v in t.items()} for c, t in times.items()},
            "median": {c: {k: round(v, 3) for k, v in m.items()} for c, m in med.items()},
            "ratio_wall": med["wall"]["build"] / med["wall"]["plain"],
            "ratio_cpu": med["cpu"]["build"] / med["cpu"]["plain"],
            "tokens": int(windows.numel()), "micro_batch": micro}


def stage_accumulators(model_dir: Path, objective, steps: int | None, micro: int) -> dict:
    import torch

    from nestprune.build import BuildConfig

    ranks, secs = {}, {}
    for key, dtype, mode in (("fp32 weights", torch.float32, "fp32"), ("fp32", torch.bfloat16, "fp32"),
                             ("bf16-stochastic", torch.bfloat16, "bf16-stochastic"),
                             ("fp32-host", torch.bfloat16, "fp32-host")):
        cfg = BuildConfig(max_sparsity=0.5, steps=steps, batch_size=micro, accumulator=mode)
        t, result = build_once(model_dir, objective, cfg, dtype)
        secs[key] = t["cpu"]
        ranks[key] = result.ranking
    out = {}
    for key in ("fp32 weights", "bf16-stochastic", "fp32-host"):
        out[key] = {"overlap_20": overlap(ranks["fp32"], ranks[key], 0.2),
                    "overlap_40": overlap(ranks["fp32"], ranks[key], 0.4),
                    "identical": same_ranking(ranks["fp32"], ranks[key]), "seconds": round(secs[key], 1)}
    out["fp32"] = {"seconds": round(secs["fp32"], 1)}
    assert out["fp32-host"]["identical"], "fp32-host must sum exactly as fp32"
    return out


def stage_plan(model_dir: Path, micro: int, seq_len: int) -> dict:
    """The memory plan's peak of a build step on the proxy's config against the step's measured peak RSS
    (``bench/plan_validation.py``'s protocol: a fresh subprocess, random weights, the steady-state step)."""
    import plan_validation as pv

    config = json.loads((model_dir / "config.json").read_text())
    out = {}
    for dtype in ("float32", "bfloat16"):
        pred = pv.predict(config, "build", dtype, micro, seq_len)
        meas = pv.measure_cpu(config, "build", dtype, micro, seq_len)
        out[dtype] = {"predicted": pred["predicted_peak"], "measured": meas["measured_peak"],
                      "ratio": meas["measured_peak"] / pred["predicted_peak"]}
    return out


RSS_CHILD = textwrap.dedent("""
    import json, runpy, sys
    what = sys.argv[1]
    if what == "baseline":
        import torch, transformers, nestprune.build, nestprune.rank.gisp  # noqa: F401
    elif what == "old-tokenise":
        import torch
        from transformers import PreTrainedTokenizerFast
        from nestprune.io.text import read_documents
        tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[3])
        docs = read_documents(sys.argv[2])
        ids = []
        for piece in tok(docs, add_special_tokens=False)["input_ids"]:  # the old tokenize_documents
            ids.extend(piece)
            ids.append(tok.eos_token_id)
        stream = torch.tensor(ids, dtype=torch.long)
    elif what == "calibration":  # the libraries, the tokenizer and the streamed windows, as the build makes them
        import nestprune.build, nestprune.rank.gisp  # noqa: F401
        from nestprune.build import load_tokenizer
        from nestprune.rank.calibration import load_calibration
        calib = load_calibration(sys.argv[2], load_tokenizer(sys.argv[3]), int(sys.argv[4]), 256, 0)
    else:  # the command line, in this process
        sys.argv = ["nestprune", *sys.argv[2:]]
        try:
            runpy.run_module("nestprune", run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
    # VmHWM: this process image's own peak (ru_maxrss would also count the parent's peak: at exec the
    # kernel carries the old address space's high-water mark over, and a vfork child's is the parent's)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"maxrss": hwm}))
""")


def _child_peak(args: list[str]) -> tuple[int, float]:
    """(peak RSS the child reports for itself, seconds)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed blocks go back: RSS follows live memory
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["maxrss"], time.perf_counter() - t0


def stage_rss(model_dir: Path, work: Path, corpus: Path, samples: int) -> dict:
    import torch

    from nestprune.build import BuildConfig, plan_for_build, read_config

    train = corpus / "train.txt.xz"
    base, _ = _child_peak(["baseline"])
    old, old_s = _child_peak(["old-tokenise", str(train), str(model_dir)])
    calib, calib_s = _child_peak(["calibration", str(train), str(model_dir), str(samples)])
    peak, build_s = _child_peak(["build", "build", str(model_dir), "--data", str(train), "--out",
                                 str(work / "rss.nestprune"), "--force", "--method", "gisp-oneshot", "--samples",
                                 str(samples), "--seq-len", "256", "--batch-size", "8", "--device", "cpu"])
    cfg = BuildConfig("gisp-oneshot", samples=samples, seq_len=256, batch_size=8, device="cpu")
    plan = plan_for_build(cfg, read_config(model_dir), torch.device("cpu"), torch.float32)
    return {"samples": samples, "baseline_process": base, "old_tokenise_peak": old, "calibration_peak": calib,
            "calibration_seconds": round(calib_s, 1),
            "old_tokenise_seconds": round(old_s, 1), "build_peak": peak, "build_seconds": round(build_s, 1),
            "plan_peak": plan.peak_bytes, "weights": plan.breakdown.weights,
            "over_plan_and_libraries": peak - base - plan.peak_bytes}


# ------------------------------------------------------------------------------------------------
# GPU


GPU_SHAPES = {
    "Llama-2-7B": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "Llama-3-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "Llama-2-13B": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
}
DRY_SHAPES = {"tiny-mha": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=256,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
              "tiny-gqa": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=256,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)}


def random_removal(plan, sparsity: float, seed: int = 0):
    """A GispState with random prunable structures removed until ``sparsity`` (parameters) is reached."""
    import numpy as np

    from nestprune.rank.gisp import GispState

    table = plan.table
    state = GispState.start(len(table))
    order = np.random.default_rng(seed).permutation(np.flatnonzero(table.prunable))
    k = int(np.searchsorted(np.cumsum(table.cost[order]) / plan.decoder_params, sparsity) + 1)
    state.pruned[order[:k]] = True
    return state


def gpu_shape(name: str, config: dict, device, seq_len: int, samples: int, measure_batches: int,
              memory: int) -> dict:
    import torch

    from nestprune.arch import Structures, arch_from_config
    from nestprune.objectives.lm import LanguageModeling
    from nestprune.rank.gisp import Workspace, plan_gisp
    from nestprune.rank.memory import grad_param_names, model_from_config
    from nestprune.rank.methods import RankJob
    from nestprune.rank.plan import plan_build, step_costs

    config = {**config, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    steps = default_steps(config)
    plan = plan_build(config, memory, samples=samples, seq_len=seq_len, dtype=dtype, steps=steps, max_sparsity=0.5,
                      max_micro_batch=None if cuda else 4)
    mb = plan.micro_batch
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t_load = time.perf_counter()
    model = model_from_config(config, dtype, device)  # random weights; SDPA via the build's wrapper
    model.config._attn_implementation = "sdpa"
    load_s = time.perf_counter() - t_load
    arch = arch_from_config(config)
    vocab = config["vocab_size"]
    windows = torch.randint(0, vocab, (mb * measure_batches, seq_len))
    from nestprune.rank.calibration import CalibrationSet

    objective = LanguageModeling(CalibrationSet(windows=windows, source="random", sha256="0" * 64, seed=0,
                                                documents=1, tokens_available=windows.numel()))
    tokens = windows.numel()
    out: dict = {"micro_batch": mb, "seq_len": seq_len, "plan_peak": plan.peak_bytes, "plan_fits": plan.fits,
                 "accumulator": plan.accumulator, "model_init_seconds": round(load_s, 1)}

    # plain forward+backward (the first step's weights requiring grad, full logits, gradients in .grad)
    names = grad_param_names(config)
    named = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        named[n].requires_grad_(True)
    plain_step(model, None, windows[:mb].to(device), mb)  # warm-up
    sync()
    t0 = time.perf_counter()
    plain_step(model, None, windows.to(device), mb)
    sync()
    out["plain_tokens_per_s"] = tokens / (time.perf_counter() - t0)
    for n in names:
        named[n].requires_grad_(False)
        named[n].grad = None
    del named
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    job = RankJob(model=model, structures=Structures(arch, "query"), objective=objective, batch_size=mb, seed=0,
                  max_sparsity=0.5, skip_first_frac=0.1, skip_last=1, accumulator=plan.accumulator)
    gplan = plan_gisp(job, r_max=0.7, steps=steps, one_shot=False, normalisation="reference")
    work = Workspace(model, gplan)
    for label, sparsity in (("dense", 0.0), ("30%", 0.3), ("50%", 0.5)):
        if sparsity:
            work.sync(random_removal(gplan, sparsity))
        layers = gplan.layers(0 if not sparsity else 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        work.accumulate(objective, layers)  # warm-up (and, dense, the peak of a build step)
        sync()
        if cuda and not sparsity:
            out["measured_peak"] = torch.cuda.max_memory_allocated()
        t0 = time.perf_counter()
        _, grads = work.accumulate(objective, layers)
        sync()
        acc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        work.score(layers, grads)
        sync()
        score_s = time.perf_counter() - t0
        del grads
        out[f"build_tokens_per_s_{label}"] = tokens / acc_s
        out[f"score_seconds_{label}"] = score_s
    work.restore()
    del work, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # the projection: a 512k-token step at each step's sparsity, tokens/s interpolated between the measured points
    steps_cost = step_costs(config, steps=steps, r_max=0.7, max_sparsity=0.5)
    pts = [(0.0, out["build_tokens_per_s_dense"]), (0.3, out["build_tokens_per_s_30%"]),
           (0.5, out["build_tokens_per_s_50%"])]

    def tps_at(s: float) -> float:
        for (s0, t0_), (s1, t1) in zip(pts, pts[1:], strict=False):
            if s <= s1:
                return t0_ + (t1 - t0_) * (s - s0) / (s1 - s0)
        return pts[-1][1]

    decoder = arch.num_layers * arch.layer_params()
    head = arch.vocab_size * arch.hidden_size
    step_tokens = 2000 * 256
    total = 0.0
    for cost in steps_cost:
        s = (1.0 - cost) * (head + decoder) / decoder  # the parameter sparsity of that step's model
        total += step_tokens / tps_at(s) + out["score_seconds_dense"] * (1 - s)
    out["projected_build_seconds"] = total
    out["projected_steps"] = len(steps_cost)
    out["projected_dense_seconds"] = len(steps_cost) * (step_tokens / out["build_tokens_per_s_dense"]
                                                        + out["score_seconds_dense"])
    return out


# ------------------------------------------------------------------------------------------------
# reports


def merge_runs(old: dict, new: dict, todo: set[str]) -> dict:
    """``new``'s stages over ``old``'s results; every stage stays attributed to the run that measured it."""
    out = dict(old)
    for key in PROXY_STAGES:
        if key in todo:
            out[key] = new[key]
    if todo & set(PROXY_STAGES):
        out["setup"], out["proxies"] = new["setup"], new["proxies"]
    if "rss" in todo:
        out["rss"], out["corpus_tokens"] = new["rss"], new["corpus_tokens"]
    out["work_bound_7b"] = new["work_bound_7b"]
    runs = [dict(r, stages=[x for x in r["stages"] if x not in todo]) for r in old.get("runs", [])]
    out["runs"] = [r for r in runs if r["stages"]] + new["runs"]
    return out


def fmt_bytes(n: float) -> str:
    return f"{n / MiB:,.0f} MiB" if n < 10 * GiB else f"{n / GiB:.1f} GiB"


def write_cpu_report(res: dict, path: Path) -> None:
    setup = res["setup"]
    lines = ["# Build speed and memory (CPU)", ""]
    for inv in res["runs"]:
        lines += [f"Command: `{inv['command']}` — stages {', '.join(inv['stages'])}  ",
                  f"Device: {inv['device']}; {setup.get('threads', '?')} torch thread(s)  ",
                  f"Finished: {inv['finished']}, {inv['seconds']:.0f} s; load average at start "
                  f"{inv['load_average_start']}, at end {inv['load_average_end']}", ""]
    lines += [
        "Cores shared with other work: wall seconds are noisy; CPU seconds are the process's own CPU time, which "
        "other processes change much less with one torch thread; every ratio is measured side by side within one "
        "run, the builds interleaved.", "",
        f"Proxies: {', '.join(f'{k} ({v})' for k, v in res['proxies'].items())}; calibration "
        f"{setup['samples']} windows × {setup['seq_len']} tokens from the shared train split, "
        f"micro-batch {setup['micro_batch']}; GISP to 50% parameter sparsity (r_max 0.7, default steps).", "",
    ]
    if res.get("speed"):
        lines += ["## Build to 50%: compaction vs `--no-compact`", "",
                  "| proxy | steps | compact CPU s | no-compact CPU s | **ratio CPU** (target ≤ 0.60) | ratio wall | "
                  "first / last step (CPU) | work bound | same ranking |", "|---|---|---|---|---|---|---|---|---|"]
        for f, s in res["speed"].items():
            lines.append(f"| {f} | {s['steps_run']} | {', '.join(map(str, s['cpu']['compact']))} | "
                         f"{', '.join(map(str, s['cpu']['no_compact']))} | **{s['ratio_cpu']:.2f}** | "
                         f"{s['ratio_wall']:.2f} | {s['first_step_ratio']:.2f} / {s['last_step_ratio']:.2f} | "
                         f"{s['work_bound']:.2f} | {'yes (asserted)' if s['same_ranking'] else 'NO'} |")
        bound7 = res.get("work_bound_7b")
        lines += ["", "Ratios: compacted / `--no-compact`, medians of the repeats. First / last step: the CPU time of "
                  "the build's first step (dense in both) and of its last (the most compacted) against the same step "
                  "of the zeroing path. Work bound: the mean over the run's steps of the weights a token meets "
                  "(decoder layers + output layer) relative to the dense model — what compaction can remove at best "
                  "if time were proportional to weights. A linear schedule to 50% leaves ~75% of the decoder on "
                  "average, and the output layer (vocabulary × hidden) is never cut, so ≤ 0.60 is out of reach by "
                  "compaction alone"
                  + (f"; on a Llama-2-7B shape the same bound is {bound7:.2f} (`rank.plan.step_costs`)" if bound7 else "")
                  + ".", ""]
    if res.get("step"):
        lines += ["## One build step vs a plain forward+backward (same model, same tokens)", "",
                  "| proxy | tokens | plain CPU s (median) | build step CPU s | of which accumulate | **ratio CPU** "
                  "(target ≤ 1.10) | ratio wall | matmul share of the step |", "|---|---|---|---|---|---|---|---|"]
        for f, s in res["step"].items():
            m = s["median"]["cpu"]
            share = s.get("matmul_share")
            lines.append(f"| {f} | {s['tokens']:,} | {m['plain']} | {m['build']} | {m['accumulate']} | "
                         f"**{s['ratio_cpu']:.2f}** | {s['ratio_wall']:.2f} | "
                         f"{f'{share:.0%}' if share is not None else '-'} |")
        lines += ["", "Plain: transformers' loss over the full fp32 logits, the step-0 weights requiring grad, "
                  "gradients left in `.grad`. Build step: step 0 of GISP on the dense model — accumulate (the "
                  "chunked loss, persistent accumulators), score, select, apply. Matmul share: the self CPU time of "
                  "`aten::mm`/`addmm`/`bmm` in one profiled build step (output layer included), the most that "
                  "narrower layers can save; the rest (norms, RoPE, attention kernel, loss, elementwise) scales with "
                  "the tokens and the hidden size, which compaction does not cut.", ""]
    if res.get("accumulators"):
        lines += ["## Accumulator modes on bf16 weights vs fp32 accumulators (removal-order agreement)", "",
                  f"Micro-batches of {setup['accumulate_micro']} windows: "
                  f"{setup['samples'] // setup['accumulate_micro']} gradients summed per step.", "",
                  "| proxy | mode | overlap ≤20% | overlap ≤40% | identical order | build CPU s |",
                  "|---|---|---|---|---|---|"]
        for f, a in res["accumulators"].items():
            for mode in ("bf16-stochastic", "fp32-host", "fp32 weights"):
                x = a[mode]
                lines.append(f"| {f} | {mode} | {x['overlap_20']:.3f} | {x['overlap_40']:.3f} | "
                             f"{'yes' if x['identical'] else 'no'} | {x['seconds']} |")
            lines.append(f"| {f} | fp32 (the reference) | 1 | 1 | - | {a['fp32']['seconds']} |")
        lines += ["", "Overlap ≤ s: of the structures the fp32-accumulator build (bf16 weights) removes up to s "
                  "parameter sparsity, the share the other build's prefix of the same length removes too. "
                  "`fp32 weights`: the whole build in fp32 instead of bf16, the scale of what bf16 itself changes.", ""]
    if res.get("plan"):
        lines += ["## Memory plan vs measured peak RSS of a build step (proxy configs)", "",
                  f"Two micro-batches of {setup['samples']} × {setup['seq_len']} tokens through the build's gradient "
                  "pass, fp32 accumulators; predicted on the meta device from config.json, measured as peak RSS in a "
                  "fresh process (`bench/plan_validation.py`'s protocol).", "",
                  "| proxy | weights | predicted | measured | measured / predicted |", "|---|---|---|---|---|"]
        for f, pl in res["plan"].items():
            for dtype, x in pl.items():
                lines.append(f"| {f} | {dtype} | {fmt_bytes(x['predicted'])} | {fmt_bytes(x['measured'])} | "
                             f"{x['ratio']:.3f} |")
        lines.append("")
    if res.get("rss"):
        r = res["rss"]
        lines += ["## Peak RSS of a build on the shared corpus", "",
                  f"`nestprune build` (gisp-oneshot, {r.get('samples', 2000)} × 256-token windows, micro-batch 8, CPU) "
                  f"on the whole "
                  f"train split ({res['corpus_tokens']:,} tokens with the proxy's tokenizer), in a child process:", "",
                  "| | peak RSS |", "|---|---|",
                  f"| process with torch + transformers + nestprune imported | {fmt_bytes(r['baseline_process'])} |",
                  f"| memory plan of the step (weights {fmt_bytes(r['weights'])} + accumulators + activations) | "
                  f"{fmt_bytes(r['plan_peak'])} |",
                  f"| **the build** ({r['build_seconds']} s) | **{fmt_bytes(r['build_peak'])}** |",
                  f"| build − imports − plan (calibration, tokenizer, allocator) | {fmt_bytes(r['over_plan_and_libraries'])} |",
                  *([f"| of which: a process that imports, loads the tokenizer and streams the windows only "
                     f"({r['calibration_seconds']} s) | {fmt_bytes(r['calibration_peak'])} (imports + "
                     f"{fmt_bytes(r['calibration_peak'] - r['baseline_process'])}) |"] if "calibration_peak" in r else []),
                  f"| before: tokenising the corpus into Python ints alone ({r['old_tokenise_seconds']} s) | "
                  f"{fmt_bytes(r['old_tokenise_peak'])} |", ""]
    lines += ["## Not measured here", "", "No GPU was available to this run: the GPU section "
              "(`python bench/build_speed.py --scale gpu`, Llama-2-7B / Llama-3-8B / Llama-2-13B shapes) is ready and "
              "writes build_speed-gpu.md; its targets (7B build to 50% ≤ 45 min projected from measured step "
              "times, 13B peak ≤ 80 GB, plan within 10%) are not measured. `nestprune build --plan` projects them "
              "from a given throughput only.", ""]
    path.write_text("\n".join(lines))


def write_gpu_report(res: dict, path: Path) -> None:
    inv = res["invocation"]
    lines = ["# Build speed and memory (GPU)", "", f"Command: `{inv['command']}`  ", f"Device: {inv['device']}  ",
             f"Plan (micro-batch, accumulators) made for a card of {res.get('plan_memory', '?')}  ",
             f"Finished: {inv['finished']}, {inv['seconds']:.0f} s", "",
             "| shape | micro-batch | accumulators | plain fwd+bwd tok/s | build dense tok/s | build 30% | build 50% | "
             "score s | peak / plan (ratio) | projected build to 50% (all dense) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["shapes"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | | | | |")
            continue
        peak = r.get("measured_peak")
        vs = f"{fmt_bytes(peak)} / {fmt_bytes(r['plan_peak'])} ({peak / r['plan_peak']:.3f})" if peak else \
            f"- / {fmt_bytes(r['plan_peak'])}"
        lines.append(
            f"| {name} | {r['micro_batch']}×{r['seq_len']} | {r['accumulator']} | {r['plain_tokens_per_s']:,.0f} | "
            f"{r['build_tokens_per_s_dense']:,.0f} | {r['build_tokens_per_s_30%']:,.0f} | "
            f"{r['build_tokens_per_s_50%']:,.0f} | {r['score_seconds_dense']:.2f} | {vs} | "
            f"{r['projected_build_seconds'] / 60:.0f} min ({r['projected_dense_seconds'] / 60:.0f} min) |")
    lines += ["", "Measured: tokens/s of one plain forward+backward and of the build's gradient pass (dense, and "
              "after random removals compacted to 30% and 50% parameter sparsity: the speed depends on the widths, "
              "not on which structures go), the scoring time, and the peak (`torch.cuda.max_memory_allocated`, "
              "weights included) of the dense build pass at the plan's micro-batch. Projected (not a measured "
              "build): 512k tokens per step over the schedule's steps to 50%, each at the tokens/s interpolated "
              "between the measured dense/30%/50% points, plus the scoring time.", "",
              "Targets: Llama-2-7B projected build to 50% ≤ 45 min; Llama-2-13B peak ≤ 80 GB; peak within 10% of "
              "the plan.", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------


@app.command()
def main(
    scale: Annotated[str, typer.Option(help="cpu | gpu")] = "cpu",
    dry_run: Annotated[bool, typer.Option(help="gpu: run the GPU path on CPU with tiny shapes")] = False,
    corpus: c.Corpus = c.CORPUS,
    workdir: c.Workdir = None,
    results_dir: c.ResultsDir = c.RESULTS_DIR,
    families: c.Families = ",".join(FAMILIES),
    stages: c.Stages = ",".join(CPU_STAGES),
    samples: Annotated[int, typer.Option(help="calibration windows (cpu)")] = 64,
    seq_len: Annotated[int, typer.Option(help="tokens per window")] = 128,
    repeats: Annotated[int, typer.Option(help="repeats of each timed build / step")] = 2,
    accumulate_micro: Annotated[int, typer.Option(help="micro-batch of the accumulator stage: many micro-batches "
                                                       "per step, so that the accumulators really sum")] = 4,
    threads: Annotated[int, typer.Option(help="torch threads (cpu): 1 makes process CPU time a clean measure of "
                                              "the work on a shared machine")] = 1,
    gpu_memory: Annotated[str, typer.Option(help="gpu: the card the plan is made for (micro-batch, accumulators; "
                                                 "the 13B target is 80 GB); 'device' for the whole device")] = "80GB",
    rss_samples: Annotated[int, typer.Option(help="rss: 256-token calibration windows of the measured build")] = 2000,
    update: Annotated[bool, typer.Option(help="cpu: keep the other stages' results in the results file (each "
                                              "attributed to its own run); replace only the stages run now")] = False,
) -> None:
    import torch

    started, load0 = time.perf_counter(), c.load_average()
    if scale == "gpu":
        device = torch.device("cpu" if dry_run else "cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise c.NestpruneError("--scale gpu needs a CUDA device (or --dry-run)")
        shapes = DRY_SHAPES if dry_run else GPU_SHAPES
        from nestprune.rank.plan import detect_device_memory, parse_memory

        whole = detect_device_memory() if device.type == "cuda" else 8 * GiB
        memory = whole if gpu_memory == "device" else min(whole, parse_memory(gpu_memory))
        res: dict = {"shapes": {}, "plan_memory": fmt_bytes(memory)}
        for name, cfg in shapes.items():
            t0 = time.perf_counter()
            try:
                res["shapes"][name] = gpu_shape(name, cfg, device, 256 if not dry_run else 32,
                                                2000 if not dry_run else 16, 3 if not dry_run else 2, memory)
            except Exception as e:  # one shape failing (e.g. out of memory) keeps the others
                res["shapes"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            c.console.print(f"{name}: {time.perf_counter() - t0:.0f} s {res['shapes'][name]}")
        import plan_validation as pv

        dev = pv.machine(True) if device.type == "cuda" else f"cpu (dry run), torch {torch.__version__}"
        res["invocation"] = c.invocation("bench/build_speed.py", dev, started, load0)
        stem = "build_speed-gpu" if not dry_run else "build_speed-gpu-dryrun"
        out_dir = results_dir if not dry_run else (workdir or REPO / "runs" / "bench-build")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
        write_gpu_report(res, out_dir / f"{stem}.md")
        c.console.print(f"wrote {out_dir / stem}.md")
        return

    from nestprune.evaluate.proxy import load_or_train_proxy, prepare_corpus, proxy_spec
    from nestprune.objectives.lm import LanguageModeling

    torch.set_num_threads(threads)
    work = workdir or REPO / "runs" / "bench-build" / "cpu"
    work.mkdir(parents=True, exist_ok=True)
    fams, todo = c.names(families), set(c.names(stages))
    spec0 = proxy_spec(fams[0], "cpu")
    with c.console.status("corpus"):
        data = prepare_corpus(corpus / "train.txt.xz", work / "corpus", spec0.vocab_size,
                              valid_path=corpus / "valid.txt.xz", max_train_chars=6_000_000)
    res = {"proxies": {}, "setup": {"samples": samples, "seq_len": seq_len, "micro_batch": samples,
                                    "accumulate_micro": accumulate_micro, "threads": threads},
           "speed": {}, "step": {}, "accumulators": {}, "plan": {}}
    objective = LanguageModeling(calibration(data.train, samples, seq_len))
    for f in fams:
        model_dir = work / "proxies" / f
        rec = load_or_train_proxy(proxy_spec(f, "cpu"), data, model_dir, device="cpu")
        res["proxies"][f] = f"{rec['parameters'] / 1e6:.2f}M parameters, valid ppl {rec['valid_ppl']:.1f}"
        if "speed" in todo:
            res["speed"][f] = stage_speed(model_dir, objective, None, samples, repeats)
            sp = res["speed"][f]
            c.console.print(f"{f} speed: cpu {sp['ratio_cpu']:.2f}, wall {sp['ratio_wall']:.2f} "
                            f"(bound {sp['work_bound']:.2f}; last step {sp['last_step_ratio']:.2f})")
        if "step" in todo:
            res["step"][f] = stage_step(model_dir, objective, samples, repeats + 1)
            c.console.print(f"{f} step: cpu {res['step'][f]['ratio_cpu']:.2f}, wall {res['step'][f]['ratio_wall']:.2f}")
        if "accumulators" in todo:
            res["accumulators"][f] = stage_accumulators(model_dir, objective, None, accumulate_micro)
            c.console.print(f"{f} accumulators: {res['accumulators'][f]}")
        if "plan" in todo:
            res["plan"][f] = stage_plan(model_dir, samples, seq_len)
            c.console.print(f"{f} plan: {res['plan'][f]}")
    if "rss" in todo:
        from nestprune.rank.calibration import stream_windows  # noqa: F401 (the code measured)

        res["corpus_tokens"] = None
        res["rss"] = stage_rss(work / "proxies" / fams[0], work, corpus, rss_samples)
        from nestprune.artifact import read_manifest

        res["corpus_tokens"] = read_manifest(work / "rss.nestprune").objective.provenance["tokens_available"]
        c.console.print(f"rss: {res['rss']}")
    res["work_bound_7b"] = work_bound_of_shape(GPU_SHAPES["Llama-2-7B"])
    import plan_validation as pv

    inv = dict(c.invocation("bench/build_speed.py", pv.machine(False), started, load0),
               stages=[x for x in CPU_STAGES if x in todo])
    path = results_dir / "build_speed.json"
    res["runs"] = [inv]
    if update and path.exists():
        res = merge_runs(json.loads(path.read_text()), res, todo)
    results_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    write_cpu_report(res, results_dir / "build_speed.md")
    c.console.print(f"wrote {results_dir / 'build_speed.md'}")


if __name__ == "__main__":
    raise SystemExit(c.run(app, None, "bench/build_speed.py"))
