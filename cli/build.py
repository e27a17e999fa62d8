"""``nestprune build``: GISP once per model -> one ranking artifact."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from nestprune.build import BuildConfig
from nestprune.cli.common import Terminated, console, friendly, invocation
from nestprune.cli.options import config_options
from nestprune.config import params
from nestprune.errors import NestpruneError
from nestprune.objectives import OBJECTIVES
from nestprune.rank.methods import RANKERS
from nestprune.resume import interrupted_note
from nestprune.schemas.artifact import StepRecord


class RichReporter:
    """Live display: step, structure ratio, parameter sparsity, loss, ETA; and batches within a step."""

    def __init__(self, console: Console):
        columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self.progress = Progress(*columns, console=console, disable=not console.is_terminal)
        self.steps = self.progress.add_task("steps", total=None, info="")
        self.batches = self.progress.add_task("  calibration pass", total=None, info="")
        self.started = False

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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

    def on_plan(self, plan: Any) -> None:
        self.progress.console.print(f"[dim]memory plan: {plan.verdict()}[/]")

    def on_note(self, text: str) -> None:
        self.progress.console.print(escape(text), soft_wrap=True)

    def on_step(self, record: StepRecord, steps_planned: int) -> None:
        self._start()
        loss = f"{record.loss:.4f}" if record.loss is not None else "-"
        self.progress.update(
            self.steps, completed=record.step + 1, total=max(steps_planned, record.step + 1),
            info=f"ratio {record.ratio:.3f}  sparsity {record.param_sparsity:.3f}  loss {loss}",
        )


@config_options(params(BuildConfig), (OBJECTIVES, RANKERS))
def build(
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL_DIR", help="Hugging Face model directory (config.json + safetensors)")],
    data: Annotated[Path | None, typer.Option("--data", help="calibration data: .txt, .txt.xz or .jsonl")] = None,
    out: Annotated[Path, typer.Option("--out", help="artifact path to write (a zarr v3 store)")] = Path("artifact.nestprune"),
    method: Annotated[str, typer.Option(help=" | ".join(RANKERS.names()))] = "gisp",
    objective: Annotated[str | None, typer.Option(help=" | ".join(OBJECTIVES.names()) + " (default lm; custom "
                                                   "with --objective-fn)", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out; without --resume, discard the "
                                        "checkpoint of an interrupted build and start over")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue the interrupted build to --out from its last "
                                         "complete step (its checkpoint beside --out); with none, start from the "
                                         "beginning")] = False,
    plan: Annotated[bool, typer.Option("--plan", help="only print the memory plan (from config.json alone: no "
                                       "weights, no data, no --out needed) and exit")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="with --plan: print it as one JSON object")] = False,
    throughput: Annotated[float | None, typer.Option(help="with --plan: build-step tokens/s on the device, for the "
                                                     "projected time (default: measured when a GPU is present)",
                                                     show_default=False)] = None,
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, help="with --plan: plan per GPU for a build over N "
                                              "GPUs (torchrun ranks; with --shard: sharded) (default: WORLD_SIZE "
                                              "under torchrun, else 1)", show_default=False)] = None,
    **options: Any,
) -> None:
    """Rank every attention head and MLP channel of MODEL_DIR by GISP and write one artifact.

    Every later size variant (`nestprune materialize`, `nestprune pull`) is derived from it.
    An option that the chosen --method or --objective does not take is refused.
    Under torchrun (`torchrun --nproc-per-node N -m nestprune build ...`) the ranks share the work; rank 0
    prints and writes the artifact, the other ranks stay quiet.
    """
    try:
        _build(model_dir, data, out, method, objective, force, resume, plan, json_out, throughput, nproc, options)
    except BaseException as e:
        if getattr(e, "unreported", False):  # a rank that failed alone and could not tell rank 0: it speaks
            console.quiet = False
        raise


def _build(model_dir: Path, data: Path | None, out: Path, method: str, objective: str | None, force: bool, resume: bool,
           plan: bool, json_out: bool, throughput: float | None, nproc: int | None, options: dict[str, Any]) -> None:
    from transformers.utils import logging as hf_logging

    from nestprune.artifact import read_manifest
    from nestprune.build import build_artifact, plan_only
    from nestprune.rank.distributed import launch_env

    where = launch_env()
    main = where is None or where.rank == 0
    if not main:
        console.quiet = True  # only rank 0 prints: progress, the result, the one error line
    hf_logging.disable_progress_bar()
    cfg = BuildConfig(method, objective, **options)
    if json_out and not plan:
        raise NestpruneError("--json goes with --plan")
    if throughput is not None and not plan:
        raise NestpruneError("--throughput goes with --plan")
    if nproc is not None and not plan:
        raise NestpruneError("--nproc goes with --plan (a build runs on the ranks torchrun starts)")
    if resume and plan:
        raise NestpruneError("--resume goes without --plan")
    if plan:
        p = plan_only(model_dir, cfg, throughput, nproc)
        if main:
            print(p.to_json()) if json_out else console.print(p.summary(), highlight=False)
        if not p.fits:
            raise typer.Exit(1)
        return
    try:
        with RichReporter(console) as reporter:
            path = build_artifact(model_dir, data, out, cfg, force=force, reporter=reporter, resume=resume)
    except (KeyboardInterrupt, Terminated) as e:  # say what is kept, and the command that continues the build
        kept = interrupted_note(out)
        if kept:
            e.add_note(f"the artifact was not written; {kept}. Resume with: {resume_command()}")
        raise
    if not main:
        return
    m = read_manifest(path)
    console.print(
        f"wrote [bold]{path}[/]: {m.ranking.num_structures} structures ranked, {m.ranking.num_removed} removed "
        f"over {m.schedule.steps_run} step(s), up to {m.ranking.max_sparsity:.1%} parameter sparsity "
        f"({m.total_seconds:.1f}s on {m.device})"
    )


def resume_command(env: dict[str, str] | None = None) -> str:
    """The command line that continues this build: the one given, with ``--resume``; under torchrun, the torchrun
    launch of as many ranks per node and nodes (the launcher's own rendezvous options are not visible to a rank)."""
    import os

    env = os.environ if env is None else env
    args = invocation()
    tail = [*args, *([] if "--resume" in args else ["--resume"])]
    try:
        world, local = int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    except ValueError:
        world = local = 1
    if world <= 1 or local < 1:
        return shlex.join(["nestprune", *tail])
    nodes = max(1, world // local)
    launch = ["torchrun", f"--nproc-per-node={local}", *([f"--nnodes={nodes}"] if nodes > 1 else []), "-m", "nestprune"]
    return shlex.join([*launch, *tail]) + (" (with the same rendezvous options)" if nodes > 1 else "")


def register(app: typer.Typer) -> None:
    app.command("build")(friendly(build))
