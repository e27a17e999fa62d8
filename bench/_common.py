"""What the proxy benchmarks (``quality.py``, ``task_aligned.py``) share: the results cache, cached
builds, the record of each invocation, and the command-line options they both take."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from a checkout

from nestprune.errors import NestpruneError  # noqa: E402

console = Console()
ARGV: list[str] = []  # this invocation's arguments, for the report's command line (set by run())

# ------------------------------------------------------------------------------------------------
# Command-line options both benchmarks take

Scale = Annotated[str | None, typer.Option(help="cpu | gpu (default: gpu if CUDA is available)")]
Corpus = Annotated[Path, typer.Option(help="folder of train/valid/test.txt.xz")]
Workdir = Annotated[Path | None, typer.Option(help="cache of every stage (default runs/<benchmark>/<scale>)")]
ResultsDir = Annotated[Path, typer.Option(help="where the report (.md, .png, .json) goes")]
Name = Annotated[str | None, typer.Option(help="report file stem (default: the benchmark's, -gpu on the GPU)")]
Families = Annotated[str, typer.Option(help="proxy families, comma-separated")]
Sparsities = Annotated[str, typer.Option(help="parameter sparsities of the variants, comma-separated")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
Stages = Annotated[str, typer.Option(help="stages to run, comma-separated")]
CORPUS = REPO.parent / "shared" / "corpus"
RESULTS_DIR = REPO / "bench" / "results"


def names(csv: str) -> list[str]:
    return [x for x in csv.split(",") if x]


def pick_scale(scale: str | None) -> str:
    import torch

    scale = scale or ("gpu" if torch.cuda.is_available() else "cpu")
    if scale not in ("cpu", "gpu"):
        raise NestpruneError(f"--scale must be cpu or gpu, got {scale!r}")
    return scale


def run(app: typer.Typer, argv: list[str] | None, script: str) -> int:
    """Run a benchmark's typer app: bad input is one ``error:`` line and exit status 1."""
    ARGV[:] = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=ARGV, prog_name=f"python {script}")
    except NestpruneError as e:
        console.print(f"[red]error:[/] {e}")
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


# ------------------------------------------------------------------------------------------------
# Results cache: one JSON file, written after every entry


class Results:
    def __init__(self, path: Path, sections: Iterable[str]):
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}
        for k in sections:
            self.data.setdefault(k, {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)

    def label(self) -> str:
        """The results file as the report names it (relative to the checkout when inside it)."""
        return str(self.path.relative_to(REPO)) if self.path.is_relative_to(REPO) else str(self.path)


def write_docs(docs: list[str], path: Path, overwrite: bool = True) -> Path:
    """Documents as a text file (``<|doc|>`` between them), written through a temporary sibling."""
    from nestprune.io.text import DOC_SEPARATOR

    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite or not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"\n{DOC_SEPARATOR}\n".join(docs) + "\n", encoding="utf-8")
        tmp.replace(path)
    return path


def model_sha(model_dir: Path) -> str:
    from nestprune.io.text import sha256_file

    return sha256_file(model_dir / "model.safetensors")


def build_cached(model_dir: Path, out: Path, cfg: Any, objective: Any, results: Results, key: str, *,
                 same: Callable[[dict], bool] = lambda done: True,
                 describe: Callable[[Any], dict] = lambda manifest: {}) -> dict:
    """Build one artifact (``build_artifact`` with ``objective``), or reuse it when it exists for the same
    base weights and BuildConfig and ``same(entry)`` holds. The results entry records digest, base,
    config, seconds and the schedule's steps, plus ``describe(manifest)``."""
    from nestprune.artifact import read_manifest
    from nestprune.build import build_artifact

    base = model_sha(model_dir)
    done = results.data["builds"].get(key)
    if out.exists() and done and done.get("base") == base and done.get("config") == asdict(cfg) and same(done):
        return done
    t0 = time.perf_counter()
    with console.status(f"  build {key} ({cfg.method.name}, max sparsity {cfg.max_sparsity})"):
        build_artifact(model_dir, None, out, cfg, objective=objective, force=True)
    manifest = read_manifest(out)
    entry = dict(
        method=cfg.method.name, digest=manifest.digest(), base=base, config=asdict(cfg),
        seconds=round(time.perf_counter() - t0, 1), steps_run=manifest.schedule.steps_run,
        steps_planned=manifest.schedule.steps_planned, max_sparsity=manifest.ranking.max_sparsity,
        **describe(manifest),
    )
    results.data["builds"][key] = entry
    results.save()
    console.print(f"  built {key}: {entry['steps_run']} step(s), ranked to {entry['max_sparsity']:.1%} in "
                  f"{entry['seconds']}s")
    return entry


# ------------------------------------------------------------------------------------------------
# The record of one invocation


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def invocation(script: str, device: str, started: float, load_at_start: list[float], **extra: Any) -> dict:
    """Command (with the thread and device environment), device, versions, wall time and load averages."""
    import torch

    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ)
    return dict(
        command=env + " ".join(shlex.quote(a) for a in ["python", script, *ARGV]), device=device,
        torch=torch.__version__, python=platform.python_version(),
        finished=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=round(time.perf_counter() - started, 1), load_average_start=load_at_start,
        load_average_end=load_average(), **extra,
    )
