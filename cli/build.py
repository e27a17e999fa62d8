"""``nestprune build``: GISP once per model -> one ranking artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from nestprune.cli.common import console, friendly
from nestprune.schemas.artifact import StepRecord


class RichReporter:
    """Live display: step, structure ratio, parameter sparsity, loss, ETA; and batches within a step."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.steps = progress.add_task("steps", total=None, info="")
        self.batches = progress.add_task("  calibration pass", total=None, info="")
        self.started = False

    def _start(self) -> None:  # only once work begins, so that input errors print alone
        if not self.started:
            self.progress.start()
            self.started = True

    def stop(self) -> None:
        if self.started:
            self.progress.stop()

    def on_batch(self, step: int, done: int, total: int) -> None:
        self._start()
        self.progress.update(self.batches, completed=done, total=total, info=f"step {step}")

    def on_step(self, record: StepRecord, steps_planned: int) -> None:
        self._start()
        loss = f"{record.loss:.4f}" if record.loss is not None else "-"
        self.progress.update(
            self.steps, completed=record.step + 1, total=max(steps_planned, record.step + 1),
            info=f"ratio {record.ratio:.3f}  sparsity {record.param_sparsity:.3f}  loss {loss}",
        )


def build(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (config.json + safetensors)")],
    data: Annotated[Path | None, typer.Option("--data", help="calibration data: .txt, .txt.xz or .jsonl")] = None,
    out: Annotated[Path, typer.Option("--out", help="artifact path to write (a zarr v3 store)")] = Path("artifact.nestprune"),
    method: Annotated[str, typer.Option(help="gisp | gisp-oneshot | wanda-sp | magnitude | random")] = "gisp",
    objective: Annotated[str, typer.Option(help="lm | margin | answer (task-aligned objectives)")] = "lm",
    objective_fn: Annotated[str | None, typer.Option("--objective-fn", help="custom objective: 'pkg.module:callable' or 'file.py:callable'")] = None,
    objective_arg: Annotated[list[str] | None, typer.Option("--objective-arg", help="KEY=VALUE option for a custom objective (repeatable)")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="margin/answer/custom: token budget (the reference used 512k)")] = None,
    prompt_template: Annotated[str, typer.Option(help="margin: prompt template, e.g. 'Question: {prompt}\\nAnswer:'")] = "{prompt}",
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template", help="answer objective: do not apply the tokenizer's chat template")] = False,
    samples: Annotated[int | None, typer.Option(min=1, help="lm: calibration windows (default 2000, the reference's); margin/answer: cap on items (default all)")] = None,
    seq_len: Annotated[int | None, typer.Option(min=2, help="lm: tokens per window (default 256); margin/answer: length limit (default: 99th percentile of the data)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="windows per forward/backward")] = 8,
    seed: Annotated[int, typer.Option(help="seed of the calibration windows")] = 0,
    r_max: Annotated[float, typer.Option(min=0.0, max=1.0, help="final structure ratio of the schedule")] = 0.7,
    steps: Annotated[int | None, typer.Option(min=1, help="schedule steps (default: 3.5 per layer, 112 for 32 layers)")] = None,
    max_sparsity: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="stop once this parameter sparsity is reached (goes past --r-max if needed)")] = None,
    gqa_mode: Annotated[str, typer.Option(help="GQA: 'query' prunes query heads (reference), 'group' prunes KV groups")] = "query",
    normalisation: Annotated[str, typer.Option(help="'reference' block-wise normalisation or 'none'")] = "reference",
    skip_first_frac: Annotated[float, typer.Option(help="never prune layers below int(frac*L)")] = 0.1,
    skip_last: Annotated[int, typer.Option(help="never prune this many last layers")] = 1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """Rank every attention head and MLP channel of MODEL_DIR by GISP and write one artifact.

    Every later size variant (`nestprune materialize`, `nestprune pull`) is derived from it.
    """
    from transformers.utils import logging as hf_logging

    from nestprune.build import BuildConfig, build_artifact

    hf_logging.disable_progress_bar()
    cfg = BuildConfig(method=method, samples=samples or 2000, seq_len=seq_len or 256, batch_size=batch_size, seed=seed,
                      r_max=r_max, steps=steps, max_sparsity=max_sparsity, gqa_mode=gqa_mode,
                      normalisation=normalisation, skip_first_frac=skip_first_frac, skip_last=skip_last,
                      device=device, dtype=dtype)
    factory = objective_factory(objective, objective_fn, data, samples, seq_len, seed,
                                chat_template=not no_chat_template, options=objective_arg,
                                max_tokens=max_tokens, prompt_template=prompt_template)
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    reporter = RichReporter(Progress(*columns, console=console))
    try:
        path = build_artifact(model_dir, data, out, cfg, objective_factory=factory, force=force, reporter=reporter)
    finally:
        reporter.stop()
    from nestprune.artifact import read_manifest

    m = read_manifest(path)
    console.print(
        f"wrote [bold]{path}[/]: {m.ranking.num_structures} structures ranked, {m.ranking.num_removed} removed "
        f"over {m.schedule.steps_run} step(s), up to {m.ranking.max_sparsity:.1%} parameter sparsity "
        f"({m.total_seconds:.1f}s on {m.device})"
    )


def objective_factory(objective: str, objective_fn: str | None, data: Path | None, samples: int | None,
                      seq_len: int | None, seed: int, chat_template: bool, options: list[str] | None = None,
                      max_tokens: int | None = None, prompt_template: str = "{prompt}"):
    """None for the default LM objective (built by build_artifact); else a factory(tokenizer)."""
    if objective == "lm" and objective_fn is None and not options and max_tokens is None:
        return None
    from nestprune.objectives import make_objective, parse_options

    kind = "custom" if objective_fn else objective
    opts = parse_options(options) if options else None
    extra = {"prompt_template": prompt_template} if kind == "margin" else {}

    def factory(tokenizer):
        return make_objective(kind, data, tokenizer, samples=samples, seq_len=seq_len, seed=seed,
                              chat_template=chat_template, custom=objective_fn, options=opts,
                              max_tokens=max_tokens, **extra)

    return factory


def register(app: typer.Typer) -> None:
    app.command("build")(friendly(build))
