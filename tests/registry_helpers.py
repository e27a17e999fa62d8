"""Shared by the registry tests: what ``nestprune materialize`` writes, made once per target and module."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from nestprune.variant.materialize import materialize


def materialized(models: dict[str, tuple[Path, Path]], tmp: Path) -> Callable[..., Path]:
    """``get(key, sparsity, layout="per-layer", multiple_of=None)``: materialize's output for ``models[key]``
    (base, artifact), made on first use (thread-safe) under ``tmp``."""
    made: dict[tuple, Path] = {}
    lock = threading.Lock()

    def get(key: str, sparsity: float, layout: str = "per-layer", multiple_of: int | None = None) -> Path:
        k = (key, sparsity, layout, multiple_of)
        with lock:
            if k not in made:
                base, art = models[key]
                out = tmp / f"{key}-{sparsity}-{layout}-{multiple_of}"
                materialize(art, base, out, sparsity=sparsity, layout=layout, multiple_of=multiple_of)
                made[k] = out
            return made[k]

    return get
