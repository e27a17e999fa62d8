"""Write the benchmark task files (``nestprune.evaluate.tasks``) from the command line.

    python bench/make_tasks.py decision --out runs/tasks/decision --calib-items 1000 --eval-items 2000
    python bench/make_tasks.py generation --out runs/tasks/generation --train shared/corpus/train.txt.xz

Each prints the JSON description it writes next to the files. ``bench/task_aligned.py`` calls the same
library functions directly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from nestprune.errors import NestpruneError  # noqa: E402
from nestprune.evaluate.tasks import PROBLEM_KINDS, build_decision_files, build_generation_files  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Benchmark task files: a decision task (identifier cloze) and a generation task.")


def _names(csv: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in csv.split(",") if k.strip())


@app.command()
def decision(
    out: Annotated[Path, typer.Option(help="folder for decision_calib.jsonl, decision_eval.jsonl, decision.json")],
    corpus: Annotated[Path, typer.Option(help="folder of train/valid/test.txt.xz")] = REPO.parent / "shared" / "corpus",
    calib_items: Annotated[int, typer.Option(help="calibration items")] = 1000,
    eval_items: Annotated[int, typer.Option(help="evaluation items")] = 2000,
    choices: Annotated[int, typer.Option(help="choices per item")] = 4,
    context_chars: Annotated[int, typer.Option(help="characters of text before the blank")] = 600,
    per_doc: Annotated[int, typer.Option(help="items per document at most")] = 80,
    mode: Annotated[str, typer.Option(help="any | copy (answer in the prompt) | recall (not in it)")] = "any",
    calib_split: Annotated[str, typer.Option(help="split(s) for calibration items, comma-separated")] = "valid",
    eval_split: Annotated[str, typer.Option(help="split(s) for evaluation items, comma-separated")] = "test",
    seed: Annotated[int, typer.Option(help="seed of every draw")] = 0,
) -> None:
    """Identifier-cloze multiple choice: calibration items from valid, evaluation items from test."""
    info = build_decision_files(corpus, out, calib_items, eval_items, seed, calib_splits=_names(calib_split),
                                eval_splits=_names(eval_split), n_choices=choices, context_chars=context_chars,
                                per_doc=per_doc, mode=mode)
    print(json.dumps(info, indent=2))


@app.command()
def generation(
    out: Annotated[Path, typer.Option(help="folder for generation_calib.jsonl, generation_eval.jsonl, generation.json")],
    calib_items: Annotated[int, typer.Option(help="calibration problems")] = 1000,
    eval_items: Annotated[int, typer.Option(help="evaluation problems")] = 1000,
    train: Annotated[Path | None, typer.Option(help="training text to mix problems into")] = None,
    share: Annotated[float, typer.Option(help="share of training characters that are problems")] = 0.05,
    kinds: Annotated[str, typer.Option(help="problem kinds, comma-separated")] = ",".join(PROBLEM_KINDS),
    seed: Annotated[int, typer.Option(help="seed of every draw")] = 0,
) -> None:
    """Generated problems (prompt/response pairs) and, with --train, a training mix."""
    info = build_generation_files(out, calib_items, eval_items, seed, train, share, _names(kinds))
    print(json.dumps(info, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Run a command; a bad input exits with ``error: ...`` (as SystemExit's message), success returns."""
    try:
        app(args=argv, prog_name="python bench/make_tasks.py")
    except NestpruneError as e:
        raise SystemExit(f"error: {e}") from None
    except SystemExit as e:
        if e.code not in (0, None):
            raise


if __name__ == "__main__":
    main()
