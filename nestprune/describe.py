"""What an artifact holds, as printable lines and a table: ``nestprune inspect`` and the demo print it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.console import RenderableType
from rich.table import Table

from nestprune.errors import NestpruneError
from nestprune.ranking import Ranking, kept_counts
from nestprune.schemas.artifact import ArtifactManifest


def parse_levels(text: str) -> list[float]:
    """``"0.1,0.3"`` → [0.1, 0.3]; anything else is refused in one line."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise NestpruneError(f"--levels must be comma-separated numbers, got {text!r}") from None


def describe_artifact(name: str, m: ArtifactManifest, ranking: Ranking,
                      levels: Sequence[float] | None = None) -> list[RenderableType]:
    """The manifest in a few lines, then the heads/channels each layer keeps at each sparsity in
    ``levels`` (default 0.1, 0.2, … up to the largest the ranking reaches)."""
    a, s = m.arch, m.schedule
    lines: list[RenderableType] = [
        f"[bold]{name}[/]  {m.digest()}",
        f"  base       {a.model_type} ({a.family}), {a.num_layers} layers, d={a.hidden_size}, "
        f"heads {a.num_heads}/{a.num_kv_heads} kv, head_dim {a.head_dim}, mlp {a.intermediate_size}; "
        f"{a.total_params:,} params ({a.decoder_params:,} in decoder layers)",
        f"  method     {s.method}, objective {m.objective.name}, gqa-mode {s.gqa_mode}, normalisation "
        f"{s.normalisation}, r_max {s.r_max}, {s.steps_run}/{s.steps_planned} steps",
    ]
    content = m.base.content
    checked = (f"content of {len(content.tensors)} tensors (sha256 {content.sha256[:12]}…)" if content
               else "config, file names and sizes (a schema 1 artifact)")
    lines.append(f"  base check {checked}; {len(m.base.files)} weight file(s)")
    prov = m.objective.provenance
    if "tokens_used" in prov:
        lines.append(f"  calibration {prov.get('source')} (sha256 {str(prov.get('sha256'))[:12]}…), "
                     f"{prov.get('samples')} x {prov.get('seq_len')} tokens, seed {prov.get('seed')}")
    lines.append(f"  ranked     {m.ranking.num_structures} structures, {m.ranking.num_removed} removed, "
                 f"max parameter sparsity {m.ranking.max_sparsity:.4f}; built in {m.total_seconds:.1f}s on "
                 f"{m.device}, nestprune {m.nestprune_version}")
    targets = list(levels) if levels else [round(x, 2) for x in np.arange(0.1, ranking.max_sparsity + 1e-9, 0.1)]
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
    return [*lines, table]
