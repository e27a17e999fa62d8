"""The memory plan against measured peaks: predicted on the meta device vs measured on real tensors.

    python bench/plan_validation.py            # CPU: peak RSS, writes bench/results/plan_validation.md
    python bench/plan_validation.py --gpu      # CUDA: torch.cuda.max_memory_allocated,
                                               #   writes bench/results/plan_validation_gpu.md

Every case is one micro-batch shape of one step kind on one model built from a config with random weights:

* ``plain``  forward + backward once, the scored decoder weights (q/k/v/o/gate/up/down of every layer)
             requiring grad, gradients left in ``.grad`` (``accumulator="grad"``);
* ``build``  the build's own gradient pass, ``nestprune.rank.gisp.accumulate_gradients``, over two
             micro-batches of the LM objective (fp32 weights accumulate in ``.grad``; bf16 weights into
             fp32 buffers through its hook).

The prediction is ``nestprune.rank.memory.predict_peak`` on the meta device (no weights), the same
parameters requiring grad, two micro-batches for ``build``, one for ``plain``.

CPU measurement, each case in a fresh subprocess with one torch thread and ``MALLOC_MMAP_THRESHOLD_=65536``
(glibc returns every freed block above 64 KiB, so RSS falls when tensors die): the libraries are
initialised on a throw-away tiny model; RSS is read before and after the model is built (the model's
bytes); the same step runs once to warm up (lazy imports, kernel set-up: measured at ~14 MiB more on
a process's first build step); the peak-RSS counter is reset (``/proc/self/clear_refs``) and the step
runs again: the steady state that a build's every step repeats. Measured peak = model bytes + (VmHWM - RSS before the step).

GPU measurement: the model is built on the device with ``attn_implementation="sdpa"`` (what the build
loads), the allocator's peak counter is reset after the model is there, and the measured peak is
``torch.cuda.max_memory_allocated`` after the step (weights included). The plan's prediction uses its
fused-attention model of the flash kernel, so this checks that model too.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB, GiB = 1 << 20, 1 << 30


def llama(vocab: int, hidden: int, layers: int, heads: int, kv: int, inter: int, **extra) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, **extra)


CPU_MODELS = {  # name: (config, [(dtype, micro_batch, seq_len), ...])
    "llama-17M": (llama(8000, 384, 6, 6, 6, 1024), [("float32", 1, 256), ("float32", 4, 256)]),
    "llama-gqa-75M": (llama(16000, 768, 8, 12, 4, 2048),
                      [("float32", 1, 256), ("float32", 4, 256), ("bfloat16", 4, 256)]),
    "llama-220M": (llama(32000, 1024, 12, 16, 16, 2816), [("float32", 1, 256), ("float32", 2, 256)]),
}
GPU_MODELS = {
    "Llama-2-7B": (llama(32000, 4096, 32, 32, 32, 11008), [("bfloat16", 8, 256), ("bfloat16", 4, 2048)]),
    "Llama-3-8B": (llama(128256, 4096, 32, 32, 8, 14336, rope_theta=500000.0), [("bfloat16", 8, 256)]),
    "Llama-2-13B": (llama(32000, 5120, 40, 40, 40, 13824), [("bfloat16", 8, 256)]),
}
STEPS = ("plain", "build")
SHAPES = {  # predictions only, from configs (no weights): name -> config; the GPU models above
    name: cfg for name, (cfg, _) in GPU_MODELS.items()
}
SHAPE_CASES = ((8, 256), (4, 2048))


# --- the measured side (runs in a subprocess on CPU, in process on CUDA) -------------------------------------

def run_step(model, cfg: dict, step: str, micro_batch: int, seq_len: int) -> None:
    """One ``plain`` or ``build`` step on a real model (random token ids)."""
    import torch

    from nestprune.rank.memory import grad_param_names, lm_step

    device = next(model.parameters()).device
    named = dict(model.named_parameters())
    names = grad_param_names(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    if step == "plain":
        for n in names:
            named[n].requires_grad_(True)
        lm_step(model, {"input_ids": torch.randint(0, cfg["vocab_size"], (micro_batch, seq_len), device=device)})
        return
    from nestprune.objectives.lm import LanguageModeling
    from nestprune.rank.calibration import CalibrationSet
    from nestprune.rank.gisp import accumulate_gradients

    windows = torch.randint(0, cfg["vocab_size"], (2 * micro_batch, seq_len))
    calib = CalibrationSet(windows=windows, source="random", sha256="", seed=0, documents=1,
                           tokens_available=windows.numel())
    accumulate_gradients(model, LanguageModeling(calib), {n: named[n] for n in names}, micro_batch)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def cpu_child(args: dict) -> dict:
    import gc

    import torch

    from nestprune.rank.memory import lm_step, model_from_config

    torch.set_num_threads(1)
    cfg, dtype = args["config"], getattr(torch, args["dtype"])
    tiny = dict(cfg, vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2)
    lm_step(model_from_config(tiny, dtype, "cpu"), {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    gc.collect()
    base = _status("VmRSS")
    model = model_from_config(cfg, dtype, "cpu")
    gc.collect()
    model_bytes = _status("VmRSS") - base
    run_step(model, cfg, args["step"], args["micro_batch"], args["seq_len"])  # warm-up: imports, kernels
    for p in model.parameters():
        p.grad = None
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    run_step(model, cfg, args["step"], args["micro_batch"], args["seq_len"])
    return {"model_bytes": model_bytes, "step_bytes": _status("VmHWM") - before,
            "measured_peak": model_bytes + _status("VmHWM") - before, "seconds": time.perf_counter() - t0}


def measure_cpu(cfg: dict, step: str, dtype: str, micro_batch: int, seq_len: int) -> dict:
    args = dict(config=cfg, step=step, dtype=dtype, micro_batch=micro_batch, seq_len=seq_len)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_gpu(cfg: dict, step: str, dtype: str, micro_batch: int, seq_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from nestprune.rank.memory import hf_config

    torch.cuda.empty_cache()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa").eval()
    model_bytes = torch.cuda.memory_allocated()
    run_step(model, cfg, step, 1, seq_len)  # warm-up (imports, kernels, cuBLAS workspace)
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_step(model, cfg, step, micro_batch, seq_len)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    del model
    torch.cuda.empty_cache()
    return {"model_bytes": model_bytes, "measured_peak": peak, "seconds": seconds}


# --- the predicted side -------------------------------------------------------------------------------------

def predict(cfg: dict, step: str, dtype: str, micro_batch: int, seq_len: int) -> dict:
    import torch

    from nestprune.rank.memory import predict_peak

    t0 = time.perf_counter()
    e = predict_peak(cfg, dtype=getattr(torch, dtype), micro_batch=micro_batch, seq_len=seq_len,
                     accumulator="grad" if step == "plain" else "fp32", micro_batches=1 if step == "plain" else 2)
    return {"predicted_peak": e.peak_bytes, "breakdown": e.breakdown.as_dict(),
            "predict_seconds": time.perf_counter() - t0}


def shape_predictions() -> tuple[list[dict], list[str]]:
    """Peaks of the build step on LLM shapes (bf16, every accumulator mode) and the plan for an 80 GB card."""
    import torch

    from nestprune.rank.memory import meta_model, predict_peak
    from nestprune.rank.plan import AUTO_ACCUMULATORS, plan_build

    rows, plans = [], []
    for name, cfg in SHAPES.items():
        model = meta_model(cfg, torch.bfloat16)
        for mb, seq in SHAPE_CASES:
            for mode in AUTO_ACCUMULATORS:
                t0 = time.perf_counter()
                e = predict_peak(cfg, dtype=torch.bfloat16, micro_batch=mb, seq_len=seq, accumulator=mode, model=model)
                rows.append(dict(model=name, micro_batch=mb, seq_len=seq, accumulator=mode, peak=e.peak_bytes,
                                 breakdown=e.breakdown.as_dict(), seconds=time.perf_counter() - t0))
                print(f"{name} {mb}x{seq} {mode}: {e.peak_bytes / GiB:.2f} GiB", flush=True)
        t0 = time.perf_counter()
        p = plan_build(cfg, "80GB", samples=2000, seq_len=256, dtype="bfloat16", steps=round(3.5 * cfg["num_hidden_layers"]))
        plans.append(f"**{name}**, `plan_build(config, '80GB', samples=2000, seq_len=256, dtype='bfloat16', "
                     f"steps={p.steps})`, {time.perf_counter() - t0:.0f} s:\n\n```\n{p.summary()}\n```\n")
    return rows, plans


# --- report -------------------------------------------------------------------------------------------------

def machine(gpu: bool) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    text = f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, Linux {platform.release()}, torch {torch.__version__}"
    if gpu:
        p = torch.cuda.get_device_properties(0)
        text = f"{p.name} ({p.total_memory / GiB:.1f} GiB), " + text
    return text


def fmt(n: float, unit: int) -> str:
    return f"{n / unit:,.1f}" if unit == MiB else f"{n / unit:,.2f}"


def write_report(rows: list[dict], path: Path, command: str, gpu: bool,
                 shapes: tuple[list[dict], list[str]] | None = None) -> None:
    unit, uname = (GiB, "GiB") if gpu else (MiB, "MiB")
    what = "torch.cuda.max_memory_allocated" if gpu else "peak RSS"
    lines = [
        f"# memory plan vs measured peaks ({'GPU' if gpu else 'CPU'})", "",
        f"Command: `{command}`  ",
        f"Device: {machine(gpu)}  ",
        f"Date: {_dt.date.today().isoformat()}", "",
        "Predicted: `predict_peak` on the meta device from the config alone (weights included). "
        f"Measured: {what} of the same step on real tensors with random weights (see the script's docstring "
        "for the protocol). `plain`: one forward+backward, gradients left in `.grad`; `build`: "
        "`nestprune.rank.gisp.accumulate_gradients` over two micro-batches (fp32 weights accumulate in `.grad`, "
        "bf16 weights into fp32 buffers). Parameters requiring grad: q/k/v/o/gate/up/down weights of every layer.",
        "",
        f"| model | params | dtype | step | micro-batch | predicted {uname} | measured {uname} | measured / predicted "
        f"| weights {uname} (pred / meas) | prediction s | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:,.0f}M | {r['dtype']} | {r['step']} | {r['micro_batch']}x{r['seq_len']} "
            f"| {fmt(r['predicted_peak'], unit)} | {fmt(r['measured_peak'], unit)} "
            f"| {r['measured_peak'] / r['predicted_peak']:.3f} "
            f"| {fmt(r['breakdown']['weights'], unit)} / {fmt(r['model_bytes'], unit)} "
            f"| {r['predict_seconds']:.1f} | {r['seconds']:.1f} |")
    ratios = [r["measured_peak"] / r["predicted_peak"] for r in rows]
    lines += ["", f"measured / predicted over all {len(rows)} cases: {min(ratios):.3f} to {max(ratios):.3f}.", ""]
    if not gpu:
        lines += ["The GPU half (`python bench/plan_validation.py --gpu`: Llama-2-7B / Llama-3-8B / Llama-2-13B "
                  "shapes, `torch.cuda.max_memory_allocated` vs the plan) writes `plan_validation_gpu.md`; it has "
                  "not been run yet (no GPU was available when this file was written).", ""]
    if shapes:
        shape_rows, plans = shapes
        lines += [
            "## Predictions for LLM shapes (config only, meta device; not measured here)", "",
            "The build step on the first GISP step (every layer's scored weights require grad), bf16 weights, "
            "two micro-batches, per accumulator mode. GiB = 2^30 bytes.", "",
            "| shape | micro-batch | accumulators | peak GiB | weights | accumulators | activations | logits "
            "| workspace | prediction s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in shape_rows:
            b = r["breakdown"]
            lines.append(f"| {r['model']} | {r['micro_batch']}x{r['seq_len']} | {r['accumulator']} "
                         f"| {r['peak'] / GiB:.2f} | " + " | ".join(f"{b[k] / GiB:.2f}" for k in
                         ("weights", "accumulators", "activations", "logits", "workspace"))
                         + f" | {r['seconds']:.1f} |")
        lines += ["", "### The plan for an 80 GB card (10% headroom), micro-batch and accumulators chosen", ""]
        lines += plans
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps({"measured": rows, "shapes": shapes[0] if shapes else []},
                                                    indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="measure on CUDA device 0 (torch.cuda.max_memory_allocated)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-shapes", action="store_true", help="skip the predictions for 7B-13B shapes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(cpu_child(json.loads(a.child))))
        return
    import torch

    from nestprune.rank.memory import meta_model

    if a.gpu and not torch.cuda.is_available():
        sys.exit("error: --gpu needs a CUDA device")
    models = GPU_MODELS if a.gpu else CPU_MODELS
    out = a.out or ROOT / "bench" / "results" / ("plan_validation_gpu.md" if a.gpu else "plan_validation.md")
    rows = []
    for name, (cfg, shapes) in models.items():
        params = sum(p.numel() for p in meta_model(cfg, torch.float32).parameters())
        for dtype, mb, seq in shapes:
            for step in STEPS:
                pred = predict(cfg, step, dtype, mb, seq)
                if a.gpu and pred["predicted_peak"] > torch.cuda.get_device_properties(0).total_memory:
                    print(f"{name} {step} {dtype} {mb}x{seq}: predicted {pred['predicted_peak'] / GiB:.1f} GiB does "
                          "not fit this device, skipped", flush=True)
                    continue
                meas = (measure_gpu if a.gpu else measure_cpu)(cfg, step, dtype, mb, seq)
                row = dict(model=name, params=params, dtype=dtype, step=step, micro_batch=mb, seq_len=seq,
                           **pred, **meas)
                rows.append(row)
                print(f"{name} {step} {dtype} {mb}x{seq}: predicted {pred['predicted_peak'] / MiB:,.1f} MiB, "
                      f"measured {meas['measured_peak'] / MiB:,.1f} MiB "
                      f"({meas['measured_peak'] / pred['predicted_peak']:.3f})", flush=True)
    shapes = None if a.gpu or a.no_shapes else shape_predictions()
    command = "python bench/plan_validation.py" + (" --gpu" if a.gpu else "")
    write_report(rows, out, command, a.gpu, shapes)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
