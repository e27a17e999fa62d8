"""``nestprune eval``: load a base model or any variant, run the requested task files, one result each."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nestprune.errors import NestpruneError
from nestprune.evaluate import metrics as ev

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EvalTasks:
    """What to evaluate: task files by kind, and how."""

    ppl: Sequence[Path] = ()
    mc: Sequence[Path] = ()
    gen: Sequence[Path] = ()
    seq_len: int = 128
    batch_size: int = 8
    max_new_tokens: int = 32
    extract: str = "first-line"
    limit: int | None = None

    def check(self) -> None:
        """Refuse nothing to do, a missing file or a bad extraction rule before any model is loaded."""
        if not (self.ppl or self.mc or self.gen):
            raise NestpruneError("nothing to evaluate: give --ppl, --mc and/or --gen")
        for f in [*self.ppl, *self.mc, *self.gen]:
            if not Path(f).is_file():
                raise NestpruneError(f"task file {f} does not exist")
        ev.Extractor(self.extract)


def load_for_eval(path: Path, device: str = "auto", dtype: str = "auto") -> tuple[torch.nn.Module, Any, torch.device]:
    """(model in eval mode, tokenizer, device) of a plain HF directory or a nestprune variant (either layout)."""
    from nestprune.build import load_tokenizer
    from nestprune.device import resolve_device, resolve_dtype
    from nestprune.io.fingerprint import read_config
    from nestprune.io.weights import weight_files
    from nestprune.variant.load import load_variant

    path = Path(path)
    if not path.is_dir() or not (path / "config.json").exists():
        raise NestpruneError(f"{path} is not a model directory (no config.json)")
    read_config(path)  # a corrupt config.json is one line, before anything is loaded
    weight_files(path)  # safetensors only, before anything is loaded: pickles are refused, never unpickled
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(path)
    try:
        model = load_variant(path, dtype=dt, device=dev)
    except NestpruneError:
        raise
    except Exception as e:
        raise NestpruneError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
    return model.eval(), tokenizer, dev


def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: EvalTasks, device: torch.device | None = None,
                   progress: Callable[[str], Progress | None] = lambda label: None) -> list[dict[str, Any]]:
    """Every task's result as a dict (``to_dict`` of each result; a non-finite number becomes None, as JSON
    has no infinity). ``progress(label)`` gives the callback of one task."""
    t = tasks
    results: list[dict[str, Any]] = []
    for f in t.ppl:
        results.append(ev.perplexity_file(model, tokenizer, f, seq_len=t.seq_len, batch_size=t.batch_size,
                                          device=device, progress=progress(f"ppl {Path(f).name}")).to_dict())
    for f in t.mc:
        results.append(ev.multiple_choice_file(model, tokenizer, f, limit=t.limit, batch_size=t.batch_size,
                                               device=device, progress=progress(f"mc {Path(f).name}")).to_dict())
    for f in t.gen:
        results.append(ev.exact_match_file(model, tokenizer, f, limit=t.limit, extract=t.extract,
                                           max_new_tokens=t.max_new_tokens, batch_size=t.batch_size, device=device,
                                           progress=progress(f"gen {Path(f).name}")).to_dict())
    for r in results:
        r.update({k: None for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
    return results
