"""Task-aligned benchmark (issue 5, Deliver 3): does calibrating GISP on the task beat calibrating on text?

Per proxy (Llama-style MHA, Llama-3-style GQA, Qwen3-style; ``nestprune.evaluate.proxy`` presets), three GISP
builds that differ only in the objective — ``lm`` (random windows of train text), ``margin`` (the
identifier-cloze decision task's calibration items, from valid) and ``answer`` (the generated problems'
calibration items) — each with the same calibration token budget; variants at 30/40/50 % parameter
sparsity (per-layer layout) evaluated on
  * the decision task's evaluation items (from test): acc and acc_norm, lm- vs margin-calibrated;
  * the generation task's evaluation items: exact match (greedy, first line), lm- vs answer-calibrated;
  * perplexity on a slice of valid (context: what LM calibration optimises);
plus the dense model. The proxies are trained on a train mix with a share of generated problems
(``nestprune.evaluate.tasks.mix_problems``; held-out calibration/evaluation prompts never appear), so that exact
match is measurable; the dense EM is checked before anything is built.

Stages are cached under ``--workdir`` (default ``runs/bench-task/<scale>``; one ``results.json``,
written after every entry), so an interrupted run resumes where it stopped:

1. tasks      decision files (``nestprune.evaluate.tasks.build_decision_files``: calib from valid, eval from
              test), generation files, the train mix (a seeded subset of train + problems)
2. corpus     byte-level BPE on the train mix; train/valid token streams (``prepare_corpus``)
3. proxies    ``load_or_train_proxy`` per family
4. builds     GISP × {lm, margin, answer} (``build_artifact``; margin-copy with ``--modes any,copy``)
5. eval       materialize → load_variant → multiple choice / exact match / perplexity; variant deleted
6. report     ``bench/results/task_aligned.md`` + ``.png`` + ``.json`` (every number from this run's
              results file)

    python bench/task_aligned.py                      # CPU (2 cores): reduced scale, ~25 min
    python bench/task_aligned.py --modes any,copy     # + the copy-only decision task as a second variant
    python bench/task_aligned.py --scale gpu          # one GPU: "gpu" proxies, larger tasks and budgets
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import _common as c
import torch
import typer
from _common import REPO, Results, console, model_sha

FAMILY_ORDER = ("llama-mha", "llama-gqa", "qwen3")
SPARSITIES = (0.3, 0.4, 0.5)


@dataclass(frozen=True)
class ScaleSettings:
    """What differs between the CPU and the GPU run (the main ones overridable on the command line)."""

    proxy_scale: str  # nestprune.evaluate.proxy preset shape
    train_tokens: int  # proxy training budget
    train_batch: int  # windows per optimizer step (small: more steps for the same tokens)
    max_train_chars: int  # train text (before problems are mixed in)
    problem_share: float  # share of the train mix's characters that are generated problems
    max_valid_chars: int
    calib_chars: int  # train text the lm calibration windows come from
    calib_tokens: int  # calibration token budget of every objective (lm: windows × seq_len)
    lm_seq_len: int
    margin_seq_len: int  # cap on margin sequences (left truncation of the prompt)
    decision_calib: int
    decision_eval: int
    context_chars: int
    generation_calib: int
    generation_eval: int
    ppl_tokens: int  # valid tokens for the perplexity column
    build_batch: int
    eval_batch: int


SETTINGS = {
    "cpu": ScaleSettings(proxy_scale="tiny", train_tokens=3_000_000, train_batch=8, max_train_chars=8_000_000,
                         problem_share=0.25, max_valid_chars=150_000, calib_chars=1_000_000, calib_tokens=16_384,
                         lm_seq_len=128, margin_seq_len=64, decision_calib=400, decision_eval=1000,
                         context_chars=200, generation_calib=1000, generation_eval=500, ppl_tokens=16_384,
                         build_batch=16, eval_batch=32),
    "gpu": ScaleSettings(proxy_scale="gpu", train_tokens=200_000_000, train_batch=64, max_train_chars=40_000_000,
                         problem_share=0.05, max_valid_chars=700_000, calib_chars=8_000_000, calib_tokens=262_144,
                         lm_seq_len=256, margin_seq_len=256, decision_calib=2000, decision_eval=2000,
                         context_chars=600, generation_calib=2000, generation_eval=1000, ppl_tokens=200_000,
                         build_batch=32, eval_batch=64),
}


# ------------------------------------------------------------------------------------------------
# Tasks and corpus


def prepare_tasks(corpus: Path, work: Path, st: ScaleSettings, modes: list[str], results: Results) -> dict:
    """Decision files per mode, generation files, train mix, lm calibration text (each written once)."""
    from nestprune.evaluate.proxy import subset_documents
    from nestprune.evaluate.tasks import build_decision_files, build_generation_files, mix_problems
    from nestprune.io.text import read_documents

    tasks = work / "tasks"
    task_fields = ("max_train_chars", "problem_share", "calib_chars", "decision_calib", "decision_eval",
                   "context_chars", "generation_calib", "generation_eval")
    want = {k: getattr(st, k) for k in task_fields}
    info = results.data["tasks"]
    if info.get("want") != want:
        info.clear()
        info["want"] = want
    for mode in modes:
        key = f"decision-{mode}"
        out = tasks / key
        if key not in info or not (out / "decision_eval.jsonl").exists():
            t0 = time.perf_counter()
            d = build_decision_files(corpus, out, st.decision_calib, st.decision_eval, seed=0,
                                     context_chars=st.context_chars, mode=mode)
            info[key] = d
            results.save()
            console.print(f"tasks: decision ({mode}) {d['calib']['items']} calib / {d['eval']['items']} eval items "
                          f"({time.perf_counter() - t0:.1f}s)")
    gen = tasks / "generation"
    mix = work / "train_mix.txt"
    calib_txt = work / "calib_lm.txt"
    if "generation" not in info or not mix.exists() or not calib_txt.exists():
        t0 = time.perf_counter()
        g = build_generation_files(gen, st.generation_calib, st.generation_eval, seed=0)
        train_docs = read_documents(corpus / "train.txt.xz")
        held_out = [json.loads(line)["prompt"] for f in ("generation_calib.jsonl", "generation_eval.jsonl")
                    for line in (gen / f).read_text().splitlines() if line.strip()]
        base = subset_documents(train_docs, st.max_train_chars, 0)
        mixed = mix_problems(base, st.problem_share, seed=2, exclude=held_out)
        c.write_docs(mixed, mix)
        c.write_docs(subset_documents(train_docs, st.calib_chars, 7), calib_txt)
        g["train_mix"] = dict(source=str(corpus / "train.txt.xz"), text_documents=len(base),
                              text_chars=sum(map(len, base)), problem_blocks=len(mixed) - len(base),
                              share=st.problem_share, chars=sum(map(len, mixed)))
        info["generation"] = g
        results.save()
        console.print(f"tasks: generation {g['calib']['items']} calib / {g['eval']['items']} eval problems; "
                      f"train mix {g['train_mix']['chars']:,} chars ({time.perf_counter() - t0:.1f}s)")
    return dict(tasks=tasks, mix=mix, calib_txt=calib_txt, gen=gen)


# ------------------------------------------------------------------------------------------------
# Builds


def make_objective(kind: str, tok, paths: dict, st: ScaleSettings, mode: str = "any"):
    from nestprune.objectives import AnswerConfig, LmConfig, MarginConfig, make_objective

    if kind == "lm":
        return make_objective(LmConfig(samples=st.calib_tokens // st.lm_seq_len, seq_len=st.lm_seq_len),
                              paths["calib_txt"], tok, seed=0)
    if kind == "margin":
        return make_objective(MarginConfig(seq_len=st.margin_seq_len, max_tokens=st.calib_tokens),
                              paths["tasks"] / f"decision-{mode}" / "decision_calib.jsonl", tok, seed=0)
    if kind == "answer":  # the proxies' tokenizer has no chat template: prompt + response as in training
        return make_objective(AnswerConfig(max_tokens=st.calib_tokens), paths["gen"] / "generation_calib.jsonl",
                              tok, seed=0)
    raise ValueError(kind)


def build_one(model_dir: Path, out: Path, cfg, objective, results: Results, key: str) -> dict:
    """Build (or reuse, for the same objective provenance) one artifact; the objective goes into the results."""
    provenance = json.loads(json.dumps(objective.provenance()))
    return c.build_cached(model_dir, out, cfg, objective, results, key,
                          same=lambda done: done.get("provenance") == provenance,
                          describe=lambda m: dict(objective=m.objective.name,
                                                  provenance=json.loads(json.dumps(m.objective.provenance))))


# ------------------------------------------------------------------------------------------------
# Evaluation


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def eval_model(model, tok, paths: dict, modes: list[str], st: ScaleSettings, ppl_stream: torch.Tensor,
               want: set[str]) -> dict:
    """Decision (per mode), generation and perplexity results of one loaded model."""
    from nestprune.evaluate.metrics import (
        exact_match,
        multiple_choice,
        parse_choice_items,
        parse_generation_items,
        stream_perplexity,
    )
    from nestprune.io.text import read_jsonl

    out: dict = {}
    torch.manual_seed(0)
    for mode in modes:
        if f"decision-{mode}" not in want:
            continue
        path = paths["tasks"] / f"decision-{mode}" / "decision_eval.jsonl"
        rows = read_jsonl(path)
        r = multiple_choice(model, tok, parse_choice_items(rows, str(path)), batch_size=st.eval_batch)
        ok = [int(p == row["answer"]) for p, row in zip(r.predictions, rows, strict=True)]
        ok_n = [int(p == row["answer"]) for p, row in zip(r.predictions_norm, rows, strict=True)]
        split = {}
        for flag, name in ((True, "copy"), (False, "recall")):
            idx = [i for i, row in enumerate(rows) if bool(row.get("in_context")) == flag]
            if idx:
                split[name] = dict(n=len(idx), acc=sum(ok[i] for i in idx) / len(idx),
                                   acc_norm=sum(ok_n[i] for i in idx) / len(idx))
        out[f"decision-{mode}"] = dict(n=r.items, acc=r.acc, acc_norm=r.acc_norm, split=split,
                                       correct="".join(map(str, ok)), correct_norm="".join(map(str, ok_n)))
    if "generation" in want:
        path = paths["gen"] / "generation_eval.jsonl"
        rows = read_jsonl(path)
        g = exact_match(model, tok, parse_generation_items(rows, str(path)), extract="first-line",
                        max_new_tokens=12, batch_size=max(st.eval_batch, 64))
        ok = [int(bool(x) and x == str(row["answer"]).strip()) for x, row in zip(g.extracted, rows, strict=True)]
        kinds: dict[str, list[int]] = {}
        for k, row in zip(ok, rows, strict=True):
            kinds.setdefault(row.get("kind", "?"), []).append(k)
        out["generation"] = dict(n=g.items, em=g.exact_match, correct="".join(map(str, ok)),
                                 kinds={k: sum(v) / len(v) for k, v in sorted(kinds.items())},
                                 examples=[[rows[i]["prompt"], g.completions[i]] for i in range(3)])
    if "ppl" in want:
        p = stream_perplexity(model, ppl_stream, seq_len=128, batch_size=st.eval_batch, source="valid")
        out["ppl"] = dict(ppl=p.ppl, nll=p.nll, tokens=p.tokens)
    return out


def eval_key(family: str, build: str, sparsity: float) -> str:
    return f"{family}/{build}/{sparsity:.2f}"


def run_eval(results: Results, key: str, digest: str, want: set[str], load, tok, paths, modes, st, ppl_stream,
             label: str) -> dict:
    """Evaluate what ``want`` names and is not cached for this digest; ``load()`` gives (model, cleanup)."""
    entry = results.data["evals"].get(key)
    if not entry or entry.get("digest") != digest:
        entry = {"digest": digest}
    missing = {w for w in want if w not in entry}
    if missing:
        t0 = time.perf_counter()
        model, cleanup = load()
        try:
            with torch.inference_mode():
                entry.update(eval_model(model, tok, paths, modes, st, ppl_stream, missing))
        finally:
            del model
            cleanup()
        entry.setdefault("seconds", 0.0)
        entry["seconds"] = round(entry["seconds"] + time.perf_counter() - t0, 1)
        results.data["evals"][key] = entry
        results.save()
    parts = []
    for m in modes:
        d = entry.get(f"decision-{m}")
        if d:
            parts.append(f"{m}: acc {d['acc']:.3f} norm {d['acc_norm']:.3f}")
    if "generation" in entry:
        parts.append(f"EM {entry['generation']['em']:.3f}")
    if "ppl" in entry:
        parts.append(f"PPL {entry['ppl']['ppl']:.1f}")
    console.print(f"  {label}: " + "; ".join(parts))
    return entry


# ------------------------------------------------------------------------------------------------
# Report


def paired(a: str, b: str) -> tuple[float, float]:
    """Mean and standard error of the per-item difference a − b (paired over the same items)."""
    d = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    m = sum(d) / n
    var = sum((x - m) ** 2 for x in d) / max(n - 1, 1)
    return m, math.sqrt(var / n)


def verdict(ok: bool, diff: float, dse: float) -> str:
    """yes/no, and whether the paired difference is within two standard errors of zero."""
    noise = abs(diff) < 2 * dse or dse == 0 and diff == 0
    return ("yes" if ok else "no") + (" (Δ within 2 SE of 0)" if noise else "")


NOTES_BEGIN, NOTES_END = "<!-- notes: kept when the report is regenerated -->", "<!-- /notes -->"


def kept_notes(path: Path) -> str | None:
    """A hand-written block between the notes markers of an existing report, to carry over."""
    if not path.exists():
        return None
    text = path.read_text()
    a, b = text.find(NOTES_BEGIN), text.find(NOTES_END)
    return text[a : b + len(NOTES_END)] if 0 <= a < b else None


def fmt_pct(p: float | None, s: float | None = None) -> str:
    if p is None:
        return "–"
    return f"{100 * p:.1f} ± {100 * s:.1f}" if s is not None else f"{100 * p:.1f}"


def get(results: Results, family: str, build: str, sparsity: float, what: str):
    e = results.data["evals"].get(eval_key(family, build, sparsity))
    return e.get(what) if e else None


def write_report(results: Results, families: list[str], modes: list[str], sparsities: list[float], out_md: Path,
                 out_png: Path) -> None:
    d = results.data
    meta = d["meta"]
    st = meta["settings"]
    tasks = d["tasks"]
    gen = tasks.get("generation", {})
    L = [
        "# Task-aligned calibration: GISP with lm vs margin vs answer objectives on proxy LLMs",
        "",
        "## How to run",
        "",
        "```",
        "python bench/task_aligned.py                    # CPU, reduced scale (2 cores: ~25 min); resumable",
        "python bench/task_aligned.py --modes any,copy   # + the copy-only decision task (second variant)",
        "python bench/task_aligned.py --scale gpu        # one GPU: 'gpu' proxies, larger tasks and budgets",
        "python bench/task_aligned.py --stages report    # rewrite this file from the cached results",
        "```",
        "",
        "Everything is cached under `--workdir` (default `runs/bench-task/<scale>`, separate from "
        "`bench/quality.py`'s `runs/bench/`): task files, train mix, tokenizer, proxies, artifacts and "
        "`results.json` (written after every evaluation), so an interrupted run resumes. Variants are "
        "materialized into a scratch directory and deleted after evaluation.",
        "",
        "## This run",
        "",
        f"Generated by `bench/task_aligned.py` on {meta['finished']}; every number below is read from "
        f"`{meta['results_file']}` (copied next to this file as JSON), written by the invocations listed below.",
        "",
        f"- device: {meta['device']}; torch {meta['torch']}; python {meta['python']}. One torch thread: on this "
        "shared 2-core machine two threads ran ~10× slower (oversubscription), measured before the run",
        "- invocations that filled the results file (each reuses what earlier ones cached; wall time of each; "
        "1-minute load average at its start → end, other benchmarks shared the cores):",
    ]
    for inv in d.get("invocations", [meta]):
        L.append(f"  - `{inv['command']}` — {inv['finished']}, {inv['seconds'] / 60:.1f} min, load "
                 f"{inv.get('load_average_start', inv.get('loadavg_start'))[0]} → "
                 f"{inv.get('load_average_end', inv.get('loadavg_end'))[0]}")
    L += [
        f"- proxies: `nestprune.proxy` preset shape `{st['proxy_scale']}`, {st['train_tokens']:,} training tokens "
        f"each, on a train mix: a seeded {st['max_train_chars']:,}-character subset of `train.txt.xz` with "
        f"{gen.get('train_mix', {}).get('problem_blocks', '?')} blocks of generated problems "
        f"(share {st['problem_share']:.0%} of characters; held-out calibration/evaluation prompts excluded)",
        f"- calibration budget, the same for every objective: {st['calib_tokens']:,} tokens "
        f"(lm: {st['calib_tokens'] // st['lm_seq_len']} random windows × {st['lm_seq_len']} tokens of train text, "
        f"seed 0; margin: decision calibration items from valid, sequences capped at {st['margin_seq_len']} tokens "
        "by left truncation of the prompt; answer: generation calibration problems, loss on the response only, "
        "no chat template — the proxies' tokenizer has none)",
        "- GISP: reference settings (block-wise normalisation, r_max 0.7, 3.5 steps per layer and at least 16, "
        "first 10 % of layers and the last layer never pruned, GQA query-head mode); the schedule stops at "
        f"{max(sparsities):.0%} parameter sparsity; variants materialized with the per-layer layout and loaded "
        "with `load_variant` (fp32)",
    ]
    for m in modes:
        t = tasks.get(f"decision-{m}")
        if t:
            L.append(f"- decision task `{m}`: identifier cloze (`nestprune.tasks`, 4 choices, "
                     f"{st['context_chars']} characters of context), {t['calib']['items']} calibration items "
                     f"from valid, {t['eval']['items']} evaluation items from test (in_context: "
                     f"{t['eval']['in_context']}); acc = highest log-likelihood, acc_norm = per character")
    if gen:
        L.append(f"- generation task: {gen['calib']['items']} calibration / {gen['eval']['items']} evaluation "
                 f"problems ({', '.join(gen['kinds'])}), greedy decoding ≤ 12 tokens, exact match of the first "
                 "line")
    L.append(f"- perplexity: first {st['ppl_tokens']:,} tokens of the valid stream, 128-token windows")
    L.append("- ± is one binomial standard error √(p(1−p)/n); Δ columns are paired over the same items "
             "(mean per-item difference ± its standard error)")
    L += ["", "## Proxies", "",
          "| model | params | train tokens | valid loss | valid PPL | training s |", "|---|---|---|---|---|---|"]
    for f in families:
        r = d["proxies"].get(f)
        if r:
            L.append(f"| {f} | {r['parameters']:,} | {r['tokens']:,} | {r['valid_loss']:.3f} | "
                     f"{r['valid_ppl']:.1f} | {r['seconds']} |")
    L += ["", "## Targets (issue 5)", "",
          "| model | task | dense | lm @40% | task-calibrated @40% | Δ (points) | target | met? |",
          "|---|---|---|---|---|---|---|---|"]
    for f in families:
        for m in modes:
            key = f"decision-{m}"
            dense = get(results, f, "dense", 0.0, key)
            a, b = get(results, f, "lm", 0.4, key), get(results, f, f"margin-{m}", 0.4, key)
            if a and b and dense:
                diff, dse = paired(b["correct"], a["correct"])
                ok = 100 * diff >= 3
                L.append(f"| {f} | decision ({m}) acc | {fmt_pct(dense['acc'])} | {fmt_pct(a['acc'])} | "
                         f"{fmt_pct(b['acc'])} | {100 * diff:+.1f} ± {100 * dse:.1f} | ≥ +3 | "
                         f"{verdict(ok, diff, dse)} |")
        dense = get(results, f, "dense", 0.0, "generation")
        a, b = get(results, f, "lm", 0.4, "generation"), get(results, f, "answer", 0.4, "generation")
        if a and b and dense:
            diff, dse = paired(b["correct"], a["correct"])
            L.append(f"| {f} | generation EM | {fmt_pct(dense['em'])} | {fmt_pct(a['em'])} | {fmt_pct(b['em'])} | "
                     f"{100 * diff:+.1f} ± {100 * dse:.1f} | > 0 | {verdict(diff > 0, diff, dse)} |")
    for f in families:
        L += ["", f"## {f}", ""]
        for m in modes:
            key = f"decision-{m}"
            dense = get(results, f, "dense", 0.0, key)
            if not dense:
                continue
            title = "Decision task (identifier cloze)" + (" — copy-only variant" if m == "copy" else "")
            L += [f"### {title}: accuracy % (n = {dense['n']}, chance 25)", "",
                  "| calibration | metric | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "|---|---|" + "---|" * len(sparsities)]
            L.append("| dense | acc | " + " | ".join([fmt_pct(dense["acc"], se(dense["acc"], dense["n"]))]
                                                     * len(sparsities)) + " |")
            rows = [("lm", "lm"), (f"margin-{m}", "margin")]
            for metric in ("acc", "acc_norm"):
                for b, label in rows:
                    cells = [get(results, f, b, s, key) for s in sparsities]
                    L.append(f"| {label} | {metric} | " + " | ".join(
                        fmt_pct(c[metric], se(c[metric], c["n"])) if c else "–" for c in cells) + " |")
            for metric, field in (("Δ acc margin − lm", "correct"), ("Δ acc_norm margin − lm", "correct_norm")):
                cells = []
                for s in sparsities:
                    a, b = get(results, f, "lm", s, key), get(results, f, f"margin-{m}", s, key)
                    if a and b:
                        x, e = paired(b[field], a[field])
                        cells.append(f"{100 * x:+.1f} ± {100 * e:.1f}")
                    else:
                        cells.append("–")
                L.append(f"| {metric} | paired | " + " | ".join(cells) + " |")
            if dense.get("split"):
                for part in ("copy", "recall"):
                    if part not in dense["split"]:
                        continue
                    n = dense["split"][part]["n"]
                    cells_d = f"dense {fmt_pct(dense['split'][part]['acc'])}"
                    for b, label in rows:
                        cells = [get(results, f, b, s, key) for s in sparsities]
                        L.append(f"| {label} | acc, {part} items (n={n}; {cells_d}) | " + " | ".join(
                            fmt_pct(c["split"][part]["acc"], se(c["split"][part]["acc"], n))
                            if c and part in c["split"] else "–" for c in cells) + " |")
            L.append("")
        dense = get(results, f, "dense", 0.0, "generation")
        if dense:
            L += [f"### Generation task: exact match % (n = {dense['n']})", "",
                  "| calibration | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "|---|" + "---|" * len(sparsities),
                  "| dense | " + " | ".join([fmt_pct(dense["em"], se(dense["em"], dense["n"]))] * len(sparsities))
                  + " |"]
            for b in ("lm", "answer"):
                cells = [get(results, f, b, s, "generation") for s in sparsities]
                L.append(f"| {b} | " + " | ".join(fmt_pct(c["em"], se(c["em"], c["n"])) if c else "–"
                                                  for c in cells) + " |")
            cells = []
            for s in sparsities:
                a, b = get(results, f, "lm", s, "generation"), get(results, f, "answer", s, "generation")
                if a and b:
                    x, e = paired(b["correct"], a["correct"])
                    cells.append(f"{100 * x:+.1f} ± {100 * e:.1f}")
                else:
                    cells.append("–")
            L.append("| Δ answer − lm (paired) | " + " | ".join(cells) + " |")
            L += ["", "EM by problem kind (dense; lm / answer at 40%): " + ", ".join(
                f"{k} {100 * v:.0f}" + (
                    f" ({100 * get(results, f, 'lm', 0.4, 'generation')['kinds'][k]:.0f} / "
                    f"{100 * get(results, f, 'answer', 0.4, 'generation')['kinds'][k]:.0f})"
                    if get(results, f, "lm", 0.4, "generation") and get(results, f, "answer", 0.4, "generation")
                    else "")
                for k, v in dense["kinds"].items()), ""]
        dense = get(results, f, "dense", 0.0, "ppl")
        if dense:
            builds = ["lm"] + [f"margin-{m}" for m in modes] + ["answer"]
            L += ["### Valid perplexity (context: what LM calibration optimises)", "",
                  "| calibration | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "|---|" + "---|" * len(sparsities),
                  "| dense | " + " | ".join([f"{dense['ppl']:.1f}"] * len(sparsities)) + " |"]
            for b in builds:
                cells = [get(results, f, b, s, "ppl") for s in sparsities]
                if any(cells):
                    L.append(f"| {b} | " + " | ".join(f"{c['ppl']:.1f}" if c else "–" for c in cells) + " |")
            L.append("")
    L += ["## Builds", "", "| build | objective tokens | items | steps | seconds |", "|---|---|---|---|---|"]
    for key, b in sorted(d["builds"].items()):
        p = b["provenance"]
        L.append(f"| {key} | {p.get('tokens_used', '?')} | {p.get('items', p.get('samples', '?'))} | "
                 f"{b['steps_run']} | {b['seconds']} |")
    L.append("")
    notes = kept_notes(out_md)
    if notes:  # the analysis written after the run goes right after the targets table
        at = L.index("## Targets (issue 5)")
        end = next(i for i in range(at + 1, len(L)) if L[i].startswith("## "))
        L[end:end] = [notes, ""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(L))
    plot(results, families, modes, sparsities, out_png)


def plot(results: Results, families: list[str], modes: list[str], sparsities: list[float], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"decision-{m}", "acc", f"decision ({m}) acc %", [("lm", "lm"), (f"margin-{m}", "margin")])
              for m in modes] + [("generation", "em", "generation EM %", [("lm", "lm"), ("answer", "answer")])]
    fig, axes = plt.subplots(len(panels), len(families), figsize=(4.6 * len(families), 3.4 * len(panels)),
                             squeeze=False)
    xs = [0.0] + list(sparsities)
    for col, f in enumerate(families):
        for row, (task, metric, ylabel, builds) in enumerate(panels):
            ax = axes[row][col]
            dense = get(results, f, "dense", 0.0, task)
            for b, label in builds:
                pts = [(0.0, dense)] + [(s, get(results, f, b, s, task)) for s in sparsities]
                pts = [(s, c) for s, c in pts if c]
                if len(pts) < 2:
                    continue
                ax.errorbar([100 * s for s, _ in pts], [100 * c[metric] for _, c in pts],
                            yerr=[100 * se(c[metric], c["n"]) for _, c in pts], marker="o", ms=3, capsize=2,
                            label=label)
            if task.startswith("decision"):
                ax.axhline(25, color="grey", lw=0.8, ls=":", label="chance")
            ax.set_title(f"{f}: {task}")
            ax.set_xlabel("parameter sparsity (%)")
            ax.set_ylabel(ylabel)
            ax.set_xticks([100 * x for x in xs])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def task_aligned(
    scale: c.Scale = None,
    corpus: c.Corpus = c.CORPUS,
    workdir: c.Workdir = None,
    results_dir: c.ResultsDir = c.RESULTS_DIR,
    name: c.Name = None,
    families: c.Families = ",".join(FAMILY_ORDER),
    modes: Annotated[str, typer.Option(help="decision task modes: any, copy, recall (comma-separated)")] = "any",
    sparsities: c.Sparsities = ",".join(map(str, SPARSITIES)),
    train_tokens: Annotated[int | None, typer.Option(help="override the scale's proxy token budget")] = None,
    calib_tokens: Annotated[int | None, typer.Option(help="override the calibration token budget")] = None,
    problem_share: Annotated[float | None, typer.Option(help="override the train mix's problem share")] = None,
    train_batch: Annotated[int | None, typer.Option(help="override the proxies' training batch size")] = None,
    proxy_scale: Annotated[str | None, typer.Option(help="override the nestprune.proxy preset shape: tiny | cpu | gpu")] = None,
    max_train_chars: Annotated[int | None, typer.Option(help="override the train text size")] = None,
    min_dense_em: Annotated[float, typer.Option(help="refuse to build when the dense proxy's exact match is below this")] = 0.05,
    device: c.Device = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads (1: on a shared 2-core machine 2 threads ran ~10x "
                                              "slower)")] = 1,
    stages: c.Stages = "train,build,eval,report",
) -> None:
    """Does calibrating GISP on the task beat calibrating on text? (see bench/README.md)"""
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # import every nestprune module the run uses now, not halfway through a long run
    import nestprune.artifact  # noqa: F401
    import nestprune.build  # noqa: F401
    import nestprune.evaluate.metrics  # noqa: F401
    import nestprune.evaluate.tasks  # noqa: F401
    import nestprune.objectives  # noqa: F401
    import nestprune.variant.load  # noqa: F401
    import nestprune.variant.materialize  # noqa: F401
    from nestprune.device import resolve_device
    from nestprune.errors import NestpruneError
    from nestprune.evaluate.proxy import device_name, load_or_train_proxy, prepare_corpus, proxy_spec

    if proxy_scale not in (None, "tiny", "cpu", "gpu"):
        raise NestpruneError(f"--proxy-scale must be tiny, cpu or gpu, got {proxy_scale!r}")
    scale = c.pick_scale(scale)
    st = SETTINGS[scale]
    overrides = {k: v for k, v in (("train_tokens", train_tokens), ("calib_tokens", calib_tokens),
                                   ("problem_share", problem_share), ("train_batch", train_batch),
                                   ("proxy_scale", proxy_scale), ("max_train_chars", max_train_chars))
                 if v is not None}
    if overrides:
        from dataclasses import replace

        st = replace(st, **overrides)
    work = workdir or REPO / "runs" / "bench-task" / scale
    work.mkdir(parents=True, exist_ok=True)
    name = name or ("task_aligned" if scale == "cpu" else f"task_aligned-{scale}")
    families = c.names(families)
    modes = c.names(modes)
    sparsities = sorted(float(s) for s in c.names(sparsities))
    stages = set(c.names(stages))
    device_arg = device
    device = resolve_device(device_arg)
    results = Results(work / "results.json", ("proxies", "builds", "evals", "tasks"))
    started = time.perf_counter()
    load_start = c.load_average()
    console.rule(f"[bold]task-aligned benchmark — scale {scale}, {device_name(device)}, workdir {work}")

    # 1.+2. tasks, corpus ---------------------------------------------------------------------------
    if stages != {"report"}:
        paths = prepare_tasks(corpus, work, st, modes, results)
        vocab = proxy_spec(families[0], st.proxy_scale).vocab_size
        t0 = time.perf_counter()
        with console.status("corpus: BPE on the train mix, tokenising train mix / valid"):
            corpus_data = prepare_corpus(paths["mix"], work / "corpus", vocab, valid_path=corpus / "valid.txt.xz",
                                         max_valid_chars=st.max_valid_chars)
        console.print(f"corpus: {corpus_data.info['train_tokens']:,} train-mix / "
                      f"{corpus_data.info['valid_tokens']:,} valid tokens ({time.perf_counter() - t0:.1f}s)")
        results.data["corpus"] = {k: corpus_data.info[k]
                                  for k in ("train_tokens", "train_documents", "valid_tokens", "vocab_size")}
        ppl_stream = corpus_data.valid[: st.ppl_tokens]

    from nestprune.build import BuildConfig

    for f in families if stages != {"report"} else []:
        console.rule(f)
        spec = proxy_spec(f, st.proxy_scale, tokens=st.train_tokens, batch_size=st.train_batch)
        mdir = work / "proxies" / f
        if "train" in stages or (mdir / "config.json").exists():
            rec = load_or_train_proxy(spec, corpus_data, mdir, device=device_arg, progress=False)
            results.data["proxies"][f] = rec
            results.save()
            console.print(f"proxy {f}: {rec['parameters']:,} params, {rec['tokens']:,} tokens, valid loss "
                          f"{rec['valid_loss']:.3f} (PPL {rec['valid_ppl']:.1f}), {rec['seconds']}s")
        if not (mdir / "config.json").exists():
            console.print(f"[yellow]{f}: no trained proxy; skipped")
            continue
        from transformers import AutoTokenizer

        from nestprune import load_variant

        tok = AutoTokenizer.from_pretrained(str(mdir))
        base = model_sha(mdir)
        want_all = {f"decision-{m}" for m in modes} | {"generation", "ppl"}
        if "eval" in stages:
            dense = run_eval(results, eval_key(f, "dense", 0.0), base, want_all,
                             lambda mdir=mdir: (load_variant(mdir, dtype=torch.float32, device=device), lambda: None),
                             tok, paths, modes, st, ppl_stream, "dense")
            em = dense["generation"]["em"]
            if em < min_dense_em:
                console.print(f"[red]{f}: dense exact match {em:.3f} is below {min_dense_em}; "
                              "train longer or with a larger problem share")
        if "build" not in stages and "eval" not in stages:
            continue
        cfg = BuildConfig(method="gisp", samples=st.calib_tokens // st.lm_seq_len, seq_len=st.lm_seq_len,
                          batch_size=st.build_batch, seed=0, max_sparsity=min(0.99, max(sparsities) + 0.01),
                          device=str(device))
        plan = [("lm", "lm", "any")] + [(f"margin-{m}", "margin", m) for m in modes] + [("answer", "answer", "any")]
        arts = work / "artifacts" / f
        for bname, kind, mode in plan:
            out = arts / f"{bname}.nestprune"
            key = f"{f}/{bname}"
            if "build" in stages:
                build_one(mdir, out, cfg, make_objective(kind, tok, paths, st, mode), results, key)
            b = results.data["builds"].get(key)
            if "eval" not in stages or not b or not out.exists():
                continue
            want = {"generation", "ppl"} if kind == "answer" else (
                {f"decision-{mode}", "ppl"} if kind == "margin" else want_all)
            for s in sparsities:
                scratch = work / "scratch" / f"{f}-{bname}-{s:.2f}"

                def load(out=out, s=s, scratch=scratch, mdir=mdir):
                    from nestprune.variant.materialize import materialize

                    shutil.rmtree(scratch, ignore_errors=True)
                    materialize(out, mdir, scratch, sparsity=s, force=True)
                    return (load_variant(scratch, dtype=torch.float32, device=device),
                            lambda: shutil.rmtree(scratch, ignore_errors=True))

                run_eval(results, eval_key(f, bname, s), b["digest"], want, load, tok, paths, modes, st, ppl_stream,
                         f"{bname} @ {s:.0%}")

    # report -------------------------------------------------------------------------------------------
    if stages != {"report"}:
        meta = c.invocation("bench/task_aligned.py", device_name(device), started, load_start,
                            settings=asdict(st), scale=scale, threads=torch.get_num_threads(), modes=modes,
                            results_file=results.label())
        results.data["meta"] = meta
        results.data.setdefault("invocations", []).append(meta)
    results.save()
    if "report" in stages:
        out_md, out_png = results_dir / f"{name}.md", results_dir / f"{name}.png"
        done = [m for m in ("any", "copy", "recall") if f"decision-{m}" in results.data["tasks"]]
        write_report(results, families, done or modes, sparsities, out_md, out_png)
        shutil.copyfile(results.path, results_dir / f"{name}.json")
        console.print(f"report: {out_md}, {out_png}")
    console.rule(f"done in {(time.perf_counter() - started) / 60:.1f} min")


def main(argv: list[str] | None = None) -> int:
    return c.run(app, argv, "bench/task_aligned.py")


if __name__ == "__main__":
    raise SystemExit(main())
