"""Quality benchmark (issue 4): does GISP rank better than the alternatives, on LLMs trained here?

Stages, each cached under ``--workdir`` (default ``runs/bench/<scale>``) so an interrupted run resumes:

1. corpus     byte-level BPE trained on ``shared/corpus/train.txt.xz``; train/valid token streams.
2. proxies    one small LLM per family (llama-mha, llama-gqa, qwen3), ``nestprune.evaluate.proxy``.
3. builds     every method (gisp, gisp-oneshot, wanda-sp, magnitude, random) on calibration windows from
              train, one artifact each (``build_artifact``), ranked up to the largest target sparsity;
              plus dedicated builds per target: a one-shot build cut at that target, and (``--dedicated
              gisp``) an iterative GISP build whose whole schedule ends at that target.
4. variants   ``materialize`` each artifact at 10 … 50 % parameter sparsity (per-layer layout),
              ``load_variant`` it and measure perplexity on valid (non-overlapping 128-token windows,
              ``nestprune.evaluate.metrics``), then delete the variant directory.
5. report     ``bench/results/<name>.md`` (one table per model, the ratios the issue asks for) and
              ``<name>.png`` (PPL vs sparsity). Every number in them comes from this run's results file.

    python bench/quality.py                       # CPU, reduced scale (~20 min on 2 cores)
    python bench/quality.py --scale gpu           # one GPU: ~35 M-parameter proxies, full valid split
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import _common as c
import torch
import typer
from _common import REPO, Results, console, model_sha
from rich.table import Table

from nestprune.device import resolve_device
from nestprune.evaluate.proxy import (
    device_name,
    load_or_train_proxy,
    prepare_corpus,
    proxy_spec,
    read_record,
    subset_documents,
)

FAMILY_ORDER = ("llama-mha", "llama-gqa", "qwen3")
METHOD_ORDER = ("gisp", "gisp-oneshot", "wanda-sp", "magnitude", "random")
METHOD_LABEL = {
    "gisp": "GISP (iterative, nested)",
    "gisp-oneshot": "GISP one-shot (nested)",
    "wanda-sp": "Wanda-sp",
    "magnitude": "magnitude",
    "random": "random",
    "dedicated-oneshot": "GISP one-shot, dedicated build per target",
    "dedicated-gisp": "GISP iterative, dedicated build per target",
}


@dataclass(frozen=True)
class ScaleSettings:
    """What differs between the CPU and the GPU run (all overridable on the command line)."""

    max_train_chars: int | None  # train text the proxies see (None: all of train)
    max_valid_chars: int | None  # valid text perplexity is measured on (None: all of valid)
    calib_chars: int  # train text the calibration windows are drawn from
    samples: int  # calibration windows
    seq_len: int  # tokens per calibration window
    batch_size: int  # build batch size
    eval_batch_size: int
    dedicated: tuple[str, ...]  # dedicated builds per target: "oneshot", "gisp"


SETTINGS = {
    "cpu": ScaleSettings(max_train_chars=8_000_000, max_valid_chars=150_000, calib_chars=1_000_000, samples=64,
                         seq_len=128, batch_size=16, eval_batch_size=32, dedicated=("oneshot", "gisp")),
    "gpu": ScaleSettings(max_train_chars=None, max_valid_chars=None, calib_chars=8_000_000, samples=2000,
                         seq_len=256, batch_size=32, eval_batch_size=64, dedicated=("oneshot", "gisp")),
}


def ppl_key(family: str, build: str, sparsity: float) -> str:
    return f"{family}/{build}/{sparsity:.2f}"


# ------------------------------------------------------------------------------------------------
# Stages


def build_one(model_dir: Path, out: Path, cfg, objective, results: Results, key: str) -> Path:
    """Build (or reuse) one artifact; its manifest's digest, timing and trajectory go into the results."""
    c.build_cached(model_dir, out, cfg, objective, results, key, describe=lambda m: dict(
        r_max=m.schedule.r_max, trajectory=[(r.step, r.ratio, r.param_sparsity, r.loss) for r in m.trajectory]))
    return out


def ratio_reaching(trajectory: list, sparsity: float) -> float | None:
    """The structure ratio of the first schedule step whose parameter sparsity reached ``sparsity``."""
    for _step, ratio, reached, _loss in trajectory:
        if reached >= sparsity - 1e-9:
            return float(ratio)
    return None


def evaluate_variant(artifact: Path, model_dir: Path, sparsity: float, scratch: Path, stream: torch.Tensor,
                     device: torch.device, batch_size: int) -> dict:
    """Materialize → load_variant → perplexity on the valid stream; the variant dir is deleted after."""
    from nestprune import load_variant
    from nestprune.evaluate.metrics import stream_perplexity
    from nestprune.variant.materialize import materialize

    shutil.rmtree(scratch, ignore_errors=True)
    res = materialize(artifact, model_dir, scratch, sparsity=sparsity, force=True)
    try:
        model = load_variant(scratch, dtype=torch.float32, device=device)
        ppl = stream_perplexity(model, stream, seq_len=128, batch_size=batch_size, source="valid")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dict(ppl=ppl.ppl, nll=ppl.nll, tokens=ppl.tokens, achieved=res.spec.achieved_sparsity,
                params=res.spec.total_params)


def dense_ppl(model_dir: Path, stream: torch.Tensor, device: torch.device, batch_size: int) -> dict:
    from nestprune import load_variant
    from nestprune.evaluate.metrics import stream_perplexity

    model = load_variant(model_dir, dtype=torch.float32, device=device)
    ppl = stream_perplexity(model, stream, seq_len=128, batch_size=batch_size, source="valid")
    return dict(ppl=ppl.ppl, nll=ppl.nll, tokens=ppl.tokens, achieved=0.0,
                params=sum(p.numel() for p in model.parameters()))


# ------------------------------------------------------------------------------------------------
# Report


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def rows_for(results: Results, family: str, sparsities: list[float]) -> list[tuple[str, list[dict | None]]]:
    ppl = results.data["ppl"]
    builds = [m for m in METHOD_ORDER] + ["dedicated-oneshot", "dedicated-gisp"]
    rows = []
    for b in builds:
        cells = [ppl.get(ppl_key(family, b, s)) for s in sparsities]
        if any(cells):
            rows.append((b, cells))
    return rows


def ratio(results: Results, family: str, a: str, b: str, s: float) -> float | None:
    pa, pb = results.data["ppl"].get(ppl_key(family, a, s)), results.data["ppl"].get(ppl_key(family, b, s))
    if not pa or not pb:
        return None
    return pa["ppl"] / pb["ppl"]


def write_report(results: Results, scale: str, sparsities: list[float], families: list[str], out_md: Path,
                 out_png: Path) -> None:
    d = results.data
    lines = [
        "# Quality benchmark: GISP vs baselines on proxy LLMs trained on shared/corpus",
        "",
        f"Generated by `bench/quality.py` on {d['meta']['finished']} — every number below is read from "
        f"`{d['meta']['results_file']}`, written by the invocations listed below.",
        "",
        f"- torch {d['meta']['torch']}, python {d['meta']['python']}; the invocations that produced the "
        "results (each stage is cached, so a later invocation re-uses what an earlier one computed; the machine "
        "is shared, hence the load averages):",
        *[f"  - `{r['command']}` — stages {r['stages']}, {r['device']}, {r['seconds'] / 60:.1f} min, load average "
          f"(1/5/15 min) {r['load_average_start']} at start, {r['load_average_end']} at end, finished {r['finished']}"
          for r in d.get("runs", [])],
        f"- scale `{scale}`: proxies trained on random windows of a {d['corpus']['train_tokens']:,}-token "
        f"subset of train ({d['corpus']['train_documents']} whole documents), BPE vocabulary "
        f"{d['corpus']['vocab_size']}; each proxy's training time and device come from its own training record "
        "(a proxy may have been trained by an earlier, interrupted invocation)",
        f"- calibration: {d['meta']['samples']} random windows × {d['meta']['seq_len']} tokens from train "
        f"(seed 0), the same windows for every method",
        f"- perplexity: valid split ({d['meta']['eval_tokens']:,} predicted tokens), non-overlapping 128-token "
        f"windows, fp32; variants materialized with the per-layer layout and loaded with `load_variant`",
        "- GISP: reference settings (block-wise normalisation, r_max 0.7, 3.5 steps per layer, at least 16, "
        "first 10 % of layers and the last layer never pruned; GQA query-head mode); the schedule stops once "
        f"{max(sparsities):.0%} parameter sparsity is reached",
        "",
        "## Proxies",
        "",
        "| model | params | decoder params | train tokens | train loss | valid loss | valid PPL | training s | device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in families:
        r = d["proxies"].get(f)
        if r:
            lines.append(f"| {f} | {r['parameters']:,} | {r['decoder_parameters']:,} | {r['tokens']:,} | "
                         f"{r['train_loss']:.3f} | {r['valid_loss']:.3f} | {r['valid_ppl']:.1f} | {r['seconds']} | "
                         f"{r['device']} |")
    lines += ["", "## Perplexity on valid (lower is better)", ""]
    for f in families:
        dense = d["ppl"].get(ppl_key(f, "dense", 0.0))
        lines += [f"### {f}" + (f" — dense PPL {fmt(dense['ppl'])}" if dense else ""), ""]
        lines.append("| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
        lines.append("|---|" + "---|" * len(sparsities))
        for b, cells in rows_for(results, f, sparsities):
            lines.append(f"| {METHOD_LABEL[b]} | " + " | ".join(fmt(c["ppl"]) if c else "–" for c in cells) + " |")
        lines.append("")
    lines += ["## Targets and comparisons", "",
              "Ratios of perplexities at the same parameter sparsity (< 1: the first method is better).", "",
              "| model | GISP / Wanda-sp @40% (target ≤ 0.80) | GISP / one-shot @40% (target < 1) | GISP / one-shot @50% (target < 1) | "
              "nested GISP / dedicated GISP @40% | nested one-shot / dedicated one-shot @40% |",
              "|---|---|---|---|---|---|"]
    for f in families:
        gw = ratio(results, f, "gisp", "wanda-sp", 0.4)
        verdict = "" if gw is None else (" ✓" if gw <= 0.8 else " ✗ missed")
        io = [ratio(results, f, "gisp", "gisp-oneshot", s) for s in (0.4, 0.5)]
        io_mark = ["" if r is None else (" ✓" if r < 1 else " ✗") for r in io]
        lines.append(
            f"| {f} | {fmt(gw, 3)}{verdict} | {fmt(io[0], 3)}{io_mark[0]} | {fmt(io[1], 3)}{io_mark[1]} | "
            f"{fmt(ratio(results, f, 'gisp', 'dedicated-gisp', 0.4), 3)} | "
            f"{fmt(ratio(results, f, 'gisp-oneshot', 'dedicated-oneshot', 0.4), 3)} |")
    lines += ["", "## Builds", "", "| model | build | steps run / planned | seconds |", "|---|---|---|---|"]
    for key, b in sorted(d["builds"].items()):
        fam, name = key.split("/", 1)
        lines.append(f"| {fam} | {name} | {b['steps_run']} / {b['steps_planned']} | {b['seconds']} |")
    lines += [
        "",
        "Notes: a one-shot GISP build cut at a target removes a prefix of the same dense-model score order as "
        "the nested one-shot build, so those two rows must agree (a check, not an assumption). A dedicated "
        "iterative build spends its whole schedule (same number of steps) on reaching one target, with "
        "`r_max` set to the structure ratio at which the nested build reached that target.",
        "",
    ]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines))
    plot(results, families, sparsities, out_png)


def plot(results: Results, families: list[str], sparsities: list[float], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(families), figsize=(5.2 * len(families), 4.8), squeeze=False)
    for ax, f in zip(axes[0], families, strict=True):
        for b, cells in rows_for(results, f, sparsities):
            xs = [s * 100 for s, c in zip(sparsities, cells, strict=True) if c]
            ys = [c["ppl"] for c in cells if c]
            style = "--" if b.startswith("dedicated") else "-"
            ax.plot(xs, ys, style, marker="o", ms=3, label=METHOD_LABEL[b])
        dense = results.data["ppl"].get(ppl_key(f, "dense", 0.0))
        if dense:
            ax.axhline(dense["ppl"], color="k", lw=0.8, ls=":", label="dense")
        ax.set_yscale("log")
        ax.set_title(f)
        ax.set_xlabel("parameter sparsity (%)")
        ax.set_ylabel("valid perplexity")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def quality(
    scale: c.Scale = None,
    corpus: c.Corpus = c.CORPUS,
    workdir: c.Workdir = None,
    results_dir: c.ResultsDir = c.RESULTS_DIR,
    name: c.Name = None,
    families: c.Families = ",".join(FAMILY_ORDER),
    methods: Annotated[str, typer.Option(help="build methods, comma-separated")] = ",".join(METHOD_ORDER),
    sparsities: c.Sparsities = "0.1,0.2,0.3,0.4,0.5",
    dedicated: Annotated[str | None, typer.Option(help="dedicated builds per target: oneshot,gisp (or none)")] = None,
    train_tokens: Annotated[int | None, typer.Option(help="override the scale's token budget")] = None,
    samples: Annotated[int | None, typer.Option(help="override the scale's calibration windows")] = None,
    device: c.Device = "auto",
    stages: c.Stages = "train,build,eval,report",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default)")] = 0,
) -> None:
    """Does GISP rank better than the alternatives, on LLMs trained here? (see bench/README.md)"""
    if threads:
        torch.set_num_threads(threads)
    scale = c.pick_scale(scale)
    st = SETTINGS[scale]
    work = workdir or REPO / "runs" / "bench" / scale
    work.mkdir(parents=True, exist_ok=True)
    name = name or ("quality" if scale == "cpu" else f"quality-{scale}")
    device_arg = device
    families = c.names(families)
    methods = c.names(methods)
    sparsities = sorted(float(s) for s in c.names(sparsities))
    dedicated = st.dedicated if dedicated is None else tuple(x for x in c.names(dedicated) if x != "none")
    samples = samples or st.samples
    stages = set(c.names(stages))
    device = resolve_device(device_arg)
    results = Results(work / "results.json", ("proxies", "builds", "ppl"))
    started = time.perf_counter()
    load_at_start = c.load_average()
    console.rule(f"[bold]quality benchmark — scale {scale}, {device_name(device)}, workdir {work}")

    # 1. corpus ------------------------------------------------------------------------------------
    train_txt, valid_txt = corpus / "train.txt.xz", corpus / "valid.txt.xz"
    vocab = proxy_spec(families[0], scale).vocab_size
    t0 = time.perf_counter()
    with console.status("corpus: training the BPE tokenizer and tokenising train/valid"):
        corpus_data = prepare_corpus(train_txt, work / "corpus", vocab, valid_path=valid_txt,
                                max_train_chars=st.max_train_chars, max_valid_chars=st.max_valid_chars)
    results.data["corpus"] = {k: corpus_data.info[k] for k in ("train_tokens", "train_documents", "valid_tokens",
                                                          "valid_documents", "vocab_size")}
    console.print(f"corpus: {corpus_data.info['train_tokens']:,} train / {corpus_data.info['valid_tokens']:,} "
                  f"valid tokens ({time.perf_counter() - t0:.1f}s)")
    # the evaluated valid text: the same documents, joined as nestprune eval does ("\n\n", one tokenisation)
    from nestprune.evaluate.metrics import token_stream
    from nestprune.io.text import read_documents
    from nestprune.rank.calibration import load_calibration

    valid_docs = subset_documents(read_documents(valid_txt), st.max_valid_chars, 0)
    eval_stream = token_stream(valid_docs, corpus_data.tokenizer)
    calib_file = c.write_docs(subset_documents(read_documents(train_txt), st.calib_chars, 7), work / "calibration.txt",
                              overwrite=False)

    # 2. proxies -----------------------------------------------------------------------------------
    model_dirs: dict[str, Path] = {}
    for f in families:
        overrides = {"tokens": train_tokens} if train_tokens else {}
        spec = proxy_spec(f, scale, **overrides)
        model_dirs[f] = work / "proxies" / f
        if "train" in stages:
            rec = load_or_train_proxy(spec, corpus_data, model_dirs[f], device=device_arg)
        else:  # never train outside the train stage; use what is there
            rec = read_record(model_dirs[f])
        if rec is not None:
            results.data["proxies"][f] = rec
            results.save()
            console.print(f"proxy {f}: {rec['parameters']:,} params, {rec['tokens']:,} tokens, valid loss "
                          f"{rec['valid_loss']:.3f} (PPL {rec['valid_ppl']:.1f}), {rec['seconds']}s")

    # 3.+4. builds and evaluation, model by model ---------------------------------------------------
    from nestprune.build import BuildConfig
    from nestprune.objectives.lm import LanguageModeling

    top = max(sparsities)
    for f in families:
        mdir = model_dirs[f]
        if not (mdir / "config.json").exists():
            console.print(f"[yellow]{f}: no trained proxy in {mdir}; skipped (run the train stage)")
            continue
        console.rule(f"{f}")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(mdir))
        objective = LanguageModeling(load_calibration(calib_file, tok, samples, st.seq_len, seed=0))
        base_cfg = dict(samples=samples, seq_len=st.seq_len, batch_size=st.batch_size, seed=0,
                        device=str(device))
        arts = work / "artifacts" / f
        plan: list[tuple[str, Path, float | None]] = []  # (build name, artifact, only this sparsity or None)
        if "build" in stages:
            for m in methods:
                cfg = BuildConfig(method=m, max_sparsity=min(0.99, top + 0.01), **base_cfg)
                plan.append((m, build_one(mdir, arts / f"{m}.nestprune", cfg, objective, results, f"{f}/{m}"), None))
            for s in sparsities:
                if "oneshot" in dedicated:
                    cfg = BuildConfig(method="gisp-oneshot", max_sparsity=s + 0.001, **base_cfg)
                    out = arts / f"dedicated-oneshot-{s:.2f}.nestprune"
                    plan.append(("dedicated-oneshot",
                                 build_one(mdir, out, cfg, objective, results, f"{f}/dedicated-oneshot-{s:.2f}"), s))
                nested = results.data["builds"].get(f"{f}/gisp")
                if "gisp" in dedicated and nested:
                    r_s = ratio_reaching(nested["trajectory"], s)
                    if r_s is None:
                        continue
                    cfg = BuildConfig(method="gisp", r_max=min(1.0, r_s), steps=nested["steps_planned"],
                                      max_sparsity=s + 0.001, **base_cfg)
                    out = arts / f"dedicated-gisp-{s:.2f}.nestprune"
                    plan.append(("dedicated-gisp",
                                 build_one(mdir, out, cfg, objective, results, f"{f}/dedicated-gisp-{s:.2f}"), s))
        else:  # evaluate whatever artifacts exist
            for p in sorted(arts.glob("*.nestprune")):
                stem = p.name.removesuffix(".nestprune")
                if stem.startswith("dedicated-"):
                    b, s = stem.rsplit("-", 1)
                    plan.append((b, p, float(s)))
                else:
                    plan.append((stem, p, None))

        if "eval" not in stages:
            continue
        key = ppl_key(f, "dense", 0.0)
        base = model_sha(mdir)
        if results.data["ppl"].get(key, {}).get("base") != base:
            results.data["ppl"][key] = dict(dense_ppl(mdir, eval_stream, device, st.eval_batch_size), base=base)
            results.save()
        console.print(f"  dense PPL {results.data['ppl'][key]['ppl']:.2f}")
        table = Table(title=f"{f}: valid PPL")
        table.add_column("build")
        for s in sparsities:
            table.add_column(f"{s:.0%}", justify="right")
        for b, art, only in plan:
            cells = []
            for s in sparsities:
                if only is not None and abs(only - s) > 1e-9:
                    continue
                key = ppl_key(f, b, s)
                digest = results.data["builds"].get(f"{f}/{b}" if only is None else f"{f}/{b}-{s:.2f}", {}).get("digest")
                cached = results.data["ppl"].get(key)
                if not cached or cached.get("digest") != digest:
                    r = evaluate_variant(art, mdir, s, work / "scratch" / f"{f}-{b}-{s:.2f}", eval_stream, device,
                                         st.eval_batch_size)
                    results.data["ppl"][key] = dict(r, digest=digest)
                    results.save()
                cells.append((s, results.data["ppl"][key]["ppl"]))
            if only is None:
                table.add_row(b, *[f"{p:.2f}" for _, p in cells])
            else:
                console.print(f"  {b} @ {only:.0%}: PPL {cells[0][1]:.2f}")
        console.print(table)

    # 5. report --------------------------------------------------------------------------------------
    invocation = c.invocation("bench/quality.py", device_name(device), started, load_at_start,
                              stages=",".join(x for x in ("train", "build", "eval", "report") if x in stages))
    runs = results.data.setdefault("runs", [])
    old = results.data.get("meta", {})
    if not runs and "command" in old:  # a results file from before invocations were listed
        runs.append({k: old.get(k) for k in invocation} | {"stages": "train,build,eval,report"})
    runs.append(invocation)
    results.data["meta"] = dict(
        torch=torch.__version__, python=platform.python_version(), finished=invocation["finished"],
        samples=samples, seq_len=st.seq_len, eval_tokens=(len(eval_stream) // 128) * 127,
        results_file=results.label(), settings=asdict(st),
    )
    results.save()
    if "report" in stages:
        out_md, out_png = results_dir / f"{name}.md", results_dir / f"{name}.png"
        write_report(results, scale, sparsities, families, out_md, out_png)
        shutil.copyfile(results.path, results_dir / f"{name}.json")
        console.print(f"report: {out_md}, {out_png}")
    console.rule(f"done in {(time.perf_counter() - started) / 60:.1f} min")


def main(argv: list[str] | None = None) -> int:
    return c.run(app, argv, "bench/quality.py")


if __name__ == "__main__":
    raise SystemExit(main())
