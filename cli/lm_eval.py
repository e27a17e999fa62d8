"""``nestprune lm-eval``: lm-evaluation-harness tasks on a variant (either layout), offline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from nestprune.cli.common import friendly, out


def _table(model: str, tasks: dict[str, dict[str, Any]]) -> Table:
    t = Table(title=f"nestprune lm-eval — {model}", title_justify="left")
    for col, just in (("task", "left"), ("n", "right"), ("metric", "left"), ("value", "right")):
        t.add_column(col, justify=just)
    for task, row in tasks.items():
        first = True
        for metric, value in row.items():
            if metric in ("samples", "tokens") or metric.endswith("_stderr"):
                continue
            shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)
            t.add_row(task if first else "", str(row.get("samples") or "") if first else "", metric, shown)
            first = False
    return t


def lm_eval(
    model: Annotated[Path, typer.Argument(metavar="VARIANT", help="nestprune variant directory (either layout) or any HF causal-LM directory")],
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated lm-eval task names")],
    include_path: Annotated[list[Path] | None, typer.Option("--include-path", metavar="DIR", help="folder of lm-eval task YAML files; repeatable")] = None,
    builtin_tasks: Annotated[bool, typer.Option("--builtin-tasks", help="also index lm-eval's ~15k built-in tasks (slow; their data must be available offline)")] = False,
    num_fewshot: Annotated[int | None, typer.Option(min=0, help="few-shot examples per item (default: the task's)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="sequences per forward pass")] = 1,
    limit: Annotated[float | None, typer.Option(min=0, help="items per task: a count, or a fraction below 1")] = None,
    output_path: Annotated[Path | None, typer.Option(help="write lm-eval's full result as JSON to this file")] = None,
    max_length: Annotated[int | None, typer.Option(min=2, help="context length for lm-eval (default: the model's)")] = None,
    bootstrap_iters: Annotated[int, typer.Option(min=0, help="bootstrap iterations for standard errors (0: none)")] = 100000,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")] = "auto",
) -> None:
    """Run lm-evaluation-harness TASKS on VARIANT, loaded by nestprune (no trust_remote_code, no hub).

    Tasks come from --include-path folders (e.g. examples/lm_eval_tasks); relative data files in a task
    YAML are read from its folder. Rolling-perplexity tasks also report token_perplexity, the quantity
    `nestprune eval --ppl` reports. Needs: pip install 'nestprune[lm-eval]'.
    """
    from nestprune.evaluate.lm_eval import run_lm_eval

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    res = run_lm_eval(model, names, include_path=include_path, include_defaults=builtin_tasks,
                      num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, output_path=output_path,
                      device=device, dtype=dtype, max_length=max_length, bootstrap_iters=bootstrap_iters)
    if as_json:
        clean = {t: {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None) for k, v in row.items()}
                 for t, row in res["tasks"].items()}
        typer.echo(json.dumps({"model": res["model"], "tasks": clean}, indent=2))
    else:
        out.print(_table(str(model), res["tasks"]))


def register(app: typer.Typer) -> None:
    app.command("lm-eval")(friendly(lm_eval))
