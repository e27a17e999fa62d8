"""``nestprune materialize``: one artifact + the base weights → a loadable model at any sparsity."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from nestprune.cli.common import console, friendly, is_tty, out, warn
from nestprune.errors import NestpruneError
from nestprune.variant.widths import REACH_MARGIN, WIDTH_POLICIES, VariantSpec, reach_gap
from nestprune.variant.writers import DEFAULT_FORMAT, WRITERS

PROGRESS_MIN_BYTES = 256 * 1024**2  # show a progress bar above this many bytes of tensors
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}

# The choices come from the registries: a new width policy or writer is a new choice here.
LayoutChoice = StrEnum("LayoutChoice", {name.replace("-", "_"): name for name in WIDTH_POLICIES})
FormatChoice = StrEnum("FormatChoice", {name.replace("-", "_"): name for name in WRITERS})


def _choices_help(entries: dict[str, Any]) -> str:
    return "; ".join(f"{name}: {e.help}" for name, e in entries.items())


# The target and shape options, declared once for `materialize` and `pull`.
def _sparsity(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value < 1.0:  # NaN too
        raise typer.BadParameter(f"{value} is not in [0, 1)")
    return value


SparsityOption = Annotated[float | None, typer.Option(callback=_sparsity, help="parameter sparsity of the decoder layers, in [0, 1), e.g. 0.3")]
ParamsOption = Annotated[str | None, typer.Option("--params", help="total parameters instead, e.g. 4.5B or 120M")]
LayoutOption = Annotated[LayoutChoice, typer.Option(help=_choices_help(WIDTH_POLICIES))]
MultipleOfOption = Annotated[int | None, typer.Option("--multiple-of", min=1, help="round kept MLP widths to a multiple (e.g. 64, 128)")]
FormatOption = Annotated[FormatChoice, typer.Option("--format", help="output format; " + _choices_help(WRITERS))]
ForceOption = Annotated[bool, typer.Option("--force", help="replace an existing --out")]
GgufTypeOption = Annotated[str | None, typer.Option("--gguf-type", help="--format gguf: f32 | f16 | bf16 for the matrices (default f16; vectors are f32)")]
TokenizerPreOption = Annotated[str | None, typer.Option("--tokenizer-pre", help="--format gguf: llama.cpp pre-tokenizer name when it cannot be recognised from tokenizer.json (e.g. llama-bpe, qwen2, gpt-2)")]
DEFAULT_LAYOUT = LayoutChoice("per-layer")
DEFAULT_FORMAT_CHOICE = FormatChoice(DEFAULT_FORMAT)


def parse_params(text: str) -> int:
    """'4.5B' → 4_500_000_000, '120M', '3k', '1,200,000'."""
    m = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise NestpruneError(f"--params {text!r} is not a parameter count (e.g. 4.5B, 120M, 1200000)")
    return int(round(float(m.group(1).replace(",", "").replace("_", "")) * _SUFFIX[m.group(2).upper()]))


class ByteProgress:
    """Rich bar over the bytes written, started only once a large write begins."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True)
        self.task: int | None = None

    def __call__(self, name: str, done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES or not is_tty():
            return
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("writing", total=total)
        self.progress.update(self.task, completed=done, description=f"writing {name}")

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()


def materialize(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="the artifact written by `nestprune build`")],
    base: Annotated[Path, typer.Option("--base", help="the base model directory the artifact was built from")],
    out_dir: Annotated[Path, typer.Option("--out", help="variant directory to write")],
    sparsity: SparsityOption = None,
    params: ParamsOption = None,
    layout: LayoutOption = DEFAULT_LAYOUT,
    multiple_of: MultipleOfOption = None,
    force: ForceOption = False,
    verify: Annotated[bool, typer.Option("--verify", help="check the variant's logits against the masked base model's on 3 fixed prompts, both in fp64 (max difference ≤ 1e-6 × the largest logit); holds both models in fp64")] = False,
    full_check: Annotated[bool, typer.Option("--full-check", help="check the sha256 of every base file (byte-exact files) instead of the default content fingerprint of every tensor")] = False,
    format: FormatOption = DEFAULT_FORMAT_CHOICE,
    gguf_type: GgufTypeOption = None,
    tokenizer_pre: TokenizerPreOption = None,
) -> None:
    """Write a model directory at one size from ARTIFACT and the base weights, in seconds, on CPU.

    The removed heads and channels are the shortest prefix of the artifact's removal order that reaches the target, so every size is nested in the larger ones.
    """
    from nestprune.variant.materialize import check_target
    from nestprune.variant.materialize import materialize as run

    if verify:  # only --verify loads models: transformers stays unimported otherwise (startup time)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    check_target(sparsity, params)
    n_params = parse_params(params) if params is not None else None
    bar = ByteProgress()
    try:
        res = run(artifact, base, out_dir, sparsity=sparsity, params=n_params, layout=layout.value,
                  multiple_of=multiple_of, force=force, verify=verify, full_check=full_check, progress=bar,
                  format=format.value, writer_options={"gguf_type": gguf_type, "tokenizer_pre": tokenizer_pre})
    finally:
        bar.stop()
    if res.base_check == "sizes":
        warn(f"{artifact} predates content fingerprints: the base was checked by its config.json and file sizes only; "
             "--full-check compares every byte")
    s = res.spec
    out.print(summary(res.out_dir, s, n_params), soft_wrap=True, markup=False)
    reach_warning(s, n_params)
    v = res.verification
    if v is not None:
        out.print(f"verified: fp64 logits match the masked base model's (max abs diff {v.max_abs_diff:.2e}, "
                  f"≤ {v.tolerance:g} × the logit scale {v.scale:.3g})", markup=False)


def summary(where: Path, s: VariantSpec, n_params: int | None) -> str:
    """``wrote DIR (layout): requested …, achieved …`` — the size asked for and the size reached, side by side."""
    asked = (f"{n_params:,} parameters (sparsity {s.requested_sparsity:.4f})" if n_params
             else f"sparsity {s.requested_sparsity:.4f}")
    return (f"wrote {where} ({s.layout}): requested {asked}, achieved sparsity {s.achieved_sparsity:.4f} "
            f"({s.total_params:,} parameters)")


def reach_warning(s: VariantSpec, n_params: int | None) -> None:
    """Warn when the size reached is more than ``REACH_MARGIN`` away from the size asked for."""
    if reach_gap(s) > REACH_MARGIN:
        asked = f"{n_params:,} parameters" if n_params else f"sparsity {s.requested_sparsity:.4f}"
        warn(f"--layout {s.layout}{f' --multiple-of {s.multiple_of}' if s.multiple_of else ''} reached sparsity "
             f"{s.achieved_sparsity:.4f} ({s.total_params:,} parameters) for the requested {asked}, more than "
             f"{REACH_MARGIN:g} away: the nearest size it reaches")


def register(app: typer.Typer) -> None:
    app.command("materialize")(friendly(materialize))
