"""``nestprune inspect``: what an artifact is, and what each sparsity keeps per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nestprune.cli.common import friendly, out


def inspect(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="artifact written by `nestprune build`")],
    levels: Annotated[str | None, typer.Option(help="comma-separated sparsities (default 0.1 … the max ranked)")] = None,
) -> None:
    """Show the artifact's manifest and, for sparsities 0.1 … r_max, the heads/channels each layer keeps."""
    from nestprune.artifact import read_artifact
    from nestprune.describe import describe_artifact, parse_levels

    targets = parse_levels(levels) if levels else None
    manifest, ranking = read_artifact(artifact)
    for part in describe_artifact(str(artifact), manifest, ranking, targets):
        out.print(part)


def register(app: typer.Typer) -> None:
    app.command("inspect")(friendly(inspect))
