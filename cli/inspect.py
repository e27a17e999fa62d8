"""``nestprune inspect``: what an artifact is, and what each sparsity keeps per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from nestprune.cli.common import friendly, out


def inspect(
    artifact: Annotated[Path, typer.Argument(help="artifact written by `nestprune build`")],
    levels: Annotated[str | None, typer.Option(help="comma-separated sparsities (default 0.1 … the max ranked)")] = None,
) -> None:
    """Show the artifact's manifest and, for sparsities 0.1 … r_max, the heads/channels each layer keeps."""
    from nestprune.artifact import read_artifact
    from nestprune.ranking import kept_counts

    m, ranking = read_artifact(artifact)
    a, s = m.arch, m.schedule
    out.print(f"[bold]{artifact}[/]  {m.digest()}")
    out.print(f"  base       {a.model_type} ({a.family}), {a.num_layers} layers, d={a.hidden_size}, "
              f"heads {a.num_heads}/{a.num_kv_heads} kv, head_dim {a.head_dim}, mlp {a.intermediate_size}; "
              f"{a.total_params:,} params ({a.decoder_params:,} in decoder layers)")
    out.print(f"  method     {s.method}, objective {m.objective.name}, gqa-mode {s.gqa_mode}, normalisation "
              f"{s.normalisation}, r_max {s.r_max}, {s.steps_run}/{s.steps_planned} steps")
    prov = m.objective.provenance
    if "tokens_used" in prov:
        out.print(f"  calibration {prov.get('source')} (sha256 {str(prov.get('sha256'))[:12]}…), "
                  f"{prov.get('samples')} x {prov.get('seq_len')} tokens, seed {prov.get('seed')}")
    out.print(f"  ranked     {m.ranking.num_structures} structures, {m.ranking.num_removed} removed, "
              f"max parameter sparsity {m.ranking.max_sparsity:.4f}; built in {m.total_seconds:.1f}s on {m.device}, "
              f"nestprune {m.nestprune_version}")
    if levels:
        try:
            targets = [float(x) for x in levels.split(",")]
        except ValueError:
            from nestprune.errors import NestpruneError

            raise NestpruneError(f"--levels must be comma-separated numbers, got {levels!r}") from None
    else:
        top = ranking.max_sparsity
        targets = [round(x, 2) for x in np.arange(0.1, top + 1e-9, 0.1)]
    akind = "groups" if s.gqa_mode == "group" and a.num_kv_heads < a.num_heads else "heads"
    table = Table(title=f"kept {akind}/channels per layer (protected layers marked *)")
    table.add_column("layer", justify="right")
    prefixes = [ranking.prefix_for_sparsity(t) for t in targets]
    for t in targets:
        table.add_column(f"{t:.0%}", justify="right")
    counts = [kept_counts(ranking, p) for p in prefixes]
    for layer in range(a.num_layers):
        mark = "" if layer in s.prunable_layers else "*"
        table.add_row(f"{layer}{mark}", *[f"{c[0][layer]}/{c[1][layer]}" for c in counts])
    curve = ranking.sparsity_curve()
    table.add_row("achieved", *[f"{curve[p]:.1%}" for p in prefixes])
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("inspect")(friendly(inspect))
