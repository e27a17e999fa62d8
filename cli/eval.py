"""``nestprune eval``: perplexity, multiple-choice accuracy and exact match of a model or variant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from nestprune.cli.common import console, friendly, is_tty, out


def _table(results: list[dict[str, Any]], model: str) -> Table:
    t = Table(title=f"nestprune eval — {model}", title_justify="left")
    for col, just in (("task", "left"), ("file", "left"), ("n", "right"), ("metric", "left"), ("value", "right")):
        t.add_column(col, justify=just)
    for r in results:
        name = Path(r["source"]).name
        if r["task"] == "perplexity":
            t.add_row("perplexity", name, f"{r['tokens']:,} tok", f"ppl (seq {r['seq_len']})", f"{r['ppl']:.3f}" if r["ppl"] is not None else "inf")
        elif r["task"] == "multiple_choice":
            t.add_row("multiple choice", name, str(r["items"]), "acc", f"{r['acc']:.4f}")
            t.add_row("", "", "", "acc_norm", f"{r['acc_norm']:.4f}")
        else:
            t.add_row("exact match", name, str(r["items"]), f"em ({r['extract']})", f"{r['exact_match']:.4f}")
    return t


def evaluate(
    model: Annotated[Path, typer.Argument(metavar="MODEL_OR_VARIANT", help="Hugging Face model directory or nestprune variant directory")],
    ppl: Annotated[list[Path] | None, typer.Option("--ppl", metavar="FILE", help="text file (.txt, .txt.xz, .jsonl) for perplexity; repeatable")] = None,
    mc: Annotated[list[Path] | None, typer.Option("--mc", metavar="FILE", help="multiple-choice JSONL {prompt, choices, answer}; repeatable")] = None,
    gen: Annotated[list[Path] | None, typer.Option("--gen", metavar="FILE", help="generation JSONL {prompt, answer} for exact match; repeatable")] = None,
    seq_len: Annotated[int, typer.Option(min=2, help="perplexity window in tokens (reference: 128)")] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="sequences per forward pass")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="generation: greedy tokens at most")] = 32,
    extract: Annotated[str, typer.Option(help="generation: answer extraction: first-line | last-number | full | regex:PATTERN")] = "first-line",
    limit: Annotated[int | None, typer.Option(min=1, help="use only the first N items of each JSONL task")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")] = "auto",
) -> None:
    """Evaluate MODEL (a base model or any variant): perplexity, multiple-choice accuracy, exact match.

    Perplexity follows the reference protocol: documents joined with blank lines, non-overlapping
    --seq-len windows. Multiple choice reports acc and acc_norm (per character, as lm-eval).
    """
    from transformers.utils import logging as hf_logging

    from nestprune.evaluate.run import EvalTasks, evaluate_tasks, load_for_eval

    tasks = EvalTasks(ppl=ppl or [], mc=mc or [], gen=gen or [], seq_len=seq_len, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, extract=extract, limit=limit)
    tasks.check()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    net, tokenizer, dev = load_for_eval(model, device, dtype)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                        console=console, disable=not is_tty(), transient=True)

    def callback(label: str):
        task = progress.add_task(label, total=None)
        return lambda done, total: progress.update(task, completed=done, total=total)

    with progress:
        results = evaluate_tasks(net, tokenizer, tasks, dev, callback)
    params = sum(p.numel() for p in net.parameters())
    if as_json:
        doc = {"model": str(model), "parameters": params, "device": str(dev),
               "dtype": str(next(net.parameters()).dtype).removeprefix("torch."), "results": results}
        typer.echo(json.dumps(doc, indent=2))
    else:
        out.print(_table(results, f"{model} ({params / 1e6:.2f}M parameters, {dev})"))


def register(app: typer.Typer) -> None:
    app.command("eval")(friendly(evaluate))
