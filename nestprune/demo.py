"""``python -m nestprune.demo`` (``make demo``): the whole product on a laptop CPU, nothing downloaded.

1. train a byte-level BPE tokenizer and a tiny Llama on the bundled English sample (about a minute);
2. ``build``: rank every head and MLP channel by GISP once, into one artifact;
3. ``inspect`` the artifact;
4. ``materialize`` two sizes from that one artifact;
5. load each (``nestprune.load_variant``), measure perplexity on held-out text and generate a line.

Everything lands in ``--workdir`` (default ``runs/demo``). A second run reuses the trained model.
"""

from __future__ import annotations

import importlib.resources
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()

PROMPTS = ("The kernel", "In Python, a list")


def sample_path() -> Path:
    """The bundled English text sample (see nestprune/data/README.md)."""
    return Path(str(importlib.resources.files("nestprune") / "data" / "sample.txt.xz"))


def split_sample(src: Path, out_dir: Path, valid_every: int = 20) -> tuple[Path, Path]:
    """Write train/valid text files from the sample: every ``valid_every``-th document is held out."""
    from nestprune.io.text import DOC_SEPARATOR, read_documents

    train, valid = out_dir / "train.txt", out_dir / "valid.txt"
    if train.exists() and valid.exists():
        return train, valid
    docs = read_documents(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    sep = f"\n{DOC_SEPARATOR}\n"
    train.write_text(sep.join(d for i, d in enumerate(docs) if i % valid_every) + "\n", encoding="utf-8")
    valid.write_text(sep.join(d for i, d in enumerate(docs) if i % valid_every == 0) + "\n", encoding="utf-8")
    return train, valid


def stage(n: int, title: str) -> float:
    console.rule(f"[bold cyan]{n}. {title}")
    return time.perf_counter()


def done(t0: float) -> None:
    console.print(f"[dim]  ({time.perf_counter() - t0:.1f}s)[/]")


class BuildProgress:
    """A rich display for ``build_artifact``: GISP steps, sparsity, calibration loss, ETA."""

    def __init__(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
        self.steps = self.progress.add_task("GISP steps", total=None, info="")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def on_batch(self, step: int, batches_done: int, total: int) -> None:
        pass

    def on_step(self, record, steps_planned: int) -> None:
        loss = f"{record.loss:.3f}" if record.loss is not None else "-"
        self.progress.update(self.steps, completed=record.step + 1, total=max(steps_planned, record.step + 1),
                             info=f"sparsity {record.param_sparsity:5.1%}  loss {loss}")


def generate_line(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt`` (no repeated trigrams), on one line."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, no_repeat_ngram_size=3, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return " ".join((prompt + text).split())  # newlines and runs of spaces as one space


def held_out_perplexity(model, tokenizer, valid: Path, max_chars: int) -> float | None:
    """PPL (128-token windows) on the first ``max_chars`` characters of held-out documents, if evaluate exists."""
    try:
        from nestprune.evaluate.metrics import perplexity
    except ImportError:
        return None
    from nestprune.io.text import read_documents

    docs, total = [], 0
    for d in read_documents(valid):
        if total >= max_chars:
            break
        docs.append(d)
        total += len(d)
    return perplexity(model, tokenizer, docs, seq_len=128, batch_size=16, source=str(valid)).ppl


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where everything is written")] = Path("runs/demo"),
    family: Annotated[str, typer.Option(help="llama-mha | llama-gqa | qwen3")] = "llama-mha",
    tokens: Annotated[int, typer.Option(help="training token budget")] = 1_000_000,
    train_seconds: Annotated[float, typer.Option(help="training time cap (0: none)")] = 120.0,
    sparsities: Annotated[str, typer.Option(help="the two (or more) sizes to materialize")] = "0.2,0.4",
    samples: Annotated[int, typer.Option(help="calibration windows of 128 tokens")] = 128,
    retrain: Annotated[bool, typer.Option("--retrain", help="train again even if the workdir holds a model")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: all cores)")] = 0,
) -> None:
    """The whole product on a laptop CPU, nothing downloaded: train → build → inspect → materialize → generate."""
    status = run_demo(workdir, family, tokens, train_seconds, [float(x) for x in sparsities.split(",")], samples,
                      retrain, threads)
    if status:
        raise typer.Exit(status)


def main(argv: list[str] | None = None) -> int:
    """``python -m nestprune.demo [OPTIONS]``; returns the exit status."""
    try:
        app(args=argv, prog_name="python -m nestprune.demo")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def run_demo(work: Path, family: str, tokens: int, train_seconds: float, sparsities: list[float], samples: int,
             retrain: bool, threads: int) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from nestprune.errors import NestpruneError
    from nestprune.evaluate.proxy import load_or_train_proxy, prepare_corpus, proxy_spec, train_proxy

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        # 1. tokenizer + tiny model -----------------------------------------------------------------
        t0 = stage(1, f"train a tokenizer and a tiny {family} on the bundled sample")
        train_txt, valid_txt = split_sample(sample_path(), work / "data")
        spec = proxy_spec(family, "tiny", tokens=tokens, seconds=train_seconds or None)
        corpus = prepare_corpus(train_txt, work / "corpus", spec.vocab_size, valid_path=valid_txt)
        console.print(f"  tokenizer: {len(corpus.tokenizer)} tokens; {corpus.info['train_tokens']:,} training "
                      f"tokens, {corpus.info['valid_tokens']:,} held-out")
        model_dir = work / "model"
        if retrain:
            from dataclasses import asdict

            record = asdict(train_proxy(spec, corpus, model_dir))
        else:
            record = load_or_train_proxy(spec, corpus, model_dir)
        console.print(f"  {model_dir}: {record['parameters']:,} parameters, {record['tokens']:,} tokens in "
                      f"{record['seconds']}s on {record['device']}; valid loss {record['valid_loss']:.3f}")
        done(t0)

        # 2. build -----------------------------------------------------------------------------------
        from nestprune.build import BuildConfig, build_artifact

        t0 = stage(2, "nestprune build: GISP ranks every head and channel, once")
        artifact = work / "artifact.nestprune"
        cfg = BuildConfig(samples=samples, seq_len=128, batch_size=16, max_sparsity=max(sparsities) + 0.05,
                          device="cpu")
        console.print(f"  $ nestprune build {model_dir} --data {train_txt} --out {artifact} --samples "
                      f"{cfg.objective.samples} --seq-len {cfg.objective.seq_len} --max-sparsity "
                      f"{cfg.max_sparsity:.2f} --force")
        with BuildProgress() as rep:
            build_artifact(model_dir, train_txt, artifact, cfg, force=True, reporter=rep)
        done(t0)

        # 3. inspect ---------------------------------------------------------------------------------
        from nestprune.artifact import read_artifact
        from nestprune.describe import describe_artifact

        t0 = stage(3, "nestprune inspect")
        levels = sorted({0.1, *sparsities})
        console.print(f"  $ nestprune inspect {artifact} --levels {','.join(f'{s:g}' for s in levels)}")
        for part in describe_artifact(str(artifact), *read_artifact(artifact), levels):
            console.print(part)
        done(t0)

        # 4. materialize two sizes ---------------------------------------------------------------------
        from nestprune.variant.materialize import materialize

        t0 = stage(4, "nestprune materialize: any size from the one artifact")
        variants: list[tuple[str, Path, float]] = [("dense", model_dir, 0.0)]
        for s in sparsities:
            out = work / f"variant-{round(s * 100)}"
            console.print(f"  $ nestprune materialize {artifact} --base {model_dir} --sparsity {s:g} --out {out} --force")
            res = materialize(artifact, model_dir, out, sparsity=s, force=True)
            console.print(f"    achieved sparsity {res.spec.achieved_sparsity:.1%}, "
                          f"{res.spec.total_params:,} parameters")
            variants.append((f"{s:.0%}", out, res.spec.achieved_sparsity))
        done(t0)

        # 5. load, evaluate, generate ------------------------------------------------------------------
        from nestprune import load_variant

        t0 = stage(5, "load each with nestprune.load_variant, measure held-out perplexity, generate")
        from transformers import AutoTokenizer

        table = Table(title="one build, several sizes")
        for col in ("variant", "params", "sparsity", "held-out PPL", f"greedy continuation of {PROMPTS[0]!r}"):
            table.add_column(col, overflow="fold")
        for name, path, sparsity in variants:
            model = load_variant(path)
            tok = AutoTokenizer.from_pretrained(str(path))
            params = sum(p.numel() for p in model.parameters())
            ppl = held_out_perplexity(model, tok, valid_txt, max_chars=60_000)
            line = generate_line(model, tok, PROMPTS[0])
            table.add_row(name, f"{params:,}", f"{sparsity:.1%}", "-" if ppl is None else f"{ppl:.1f}", line)
        console.print(table)
        done(t0)
    except NestpruneError as e:
        console.print(f"[red]error:[/] {e}")
        return 1
    console.rule(f"[bold green]demo finished in {time.perf_counter() - started:.0f}s — everything is in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
