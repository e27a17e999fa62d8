"""lm-evaluation-harness on any variant (either layout), through its Python API, offline.

lm-eval has no plugin mechanism for model names, and its command line indexes its ~15k built-in tasks
before anything runs. Here the variant is loaded by ``nestprune.variant.load.load_variant`` (no
``trust_remote_code``, no hub), wrapped in lm-eval's own ``HFLM`` (so every request type and option
behaves as users know it), and tasks come from a ``TaskManager`` over local folders only
(``include_defaults=False`` unless asked for). Hub access is switched off (``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE``) before lm-eval is imported.

Two conveniences on top of lm-eval:

* a task's relative ``dataset_kwargs.data_files`` are read from the folder of its YAML file (lm-eval would
  read them from the current directory), so a task folder works from anywhere;
* for ``loglikelihood_rolling`` tasks the result also holds ``token_perplexity`` = exp(−Σ log-likelihood /
  Σ predicted tokens), the quantity ``nestprune eval --ppl`` reports. lm-eval predicts every token of a
  document, the first one conditioned on a prefix token (BOS, else EOS), in disjoint windows of the
  model's context length, each window after the first conditioned on the previous window's last token
  only. ``nestprune eval`` cuts one token stream (documents joined by blank lines, the tokenizer's own
  special tokens added) into disjoint windows and predicts all but the first token of each. The two agree
  exactly when a document fits one window and starts with the prefix token (see tests/test_lm_eval.py).

Needs the optional extra: ``pip install 'nestprune[lm-eval]'``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nestprune.errors import NestpruneError

INSTALL_HINT = ("lm-evaluation-harness (with its HF model support) is not installed; install nestprune's lm-eval "
                "extra (pip install 'lm-eval[hf]')")


def import_lm_eval() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise NestpruneError(INSTALL_HINT) from None
    return lm_eval


@dataclass
class RollingCounts:
    """Σ log-likelihood and Σ predicted tokens of the rolling requests, per task."""

    loglikelihood: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def make_lm(model: Any, tokenizer: Any, batch_size: int, max_length: int | None) -> Any:
    """lm-eval's HFLM around an already loaded model, counting rolling tokens per task."""
    import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    class NestpruneLM(HFLM):
        def __init__(self, **kw: Any):
            super().__init__(**kw)
            self.rolling = RollingCounts()

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            out = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            for req, ll in zip(requests, out, strict=True):
                task = getattr(req, "task_name", None) or "?"
                self.rolling.loglikelihood[task] += float(ll)
                self.rolling.tokens[task] += len(self.tok_encode(req.args[0]))
            return out

    device = str(next(model.parameters()).device)
    return NestpruneLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                       device=device)


def resolve_data_files(cfg: dict[str, Any], yaml_dir: Path) -> dict[str, Any]:
    """A task config whose relative ``dataset_kwargs.data_files`` point into ``yaml_dir``."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return cfg

    def fix(p: Any) -> Any:
        if isinstance(p, str) and "://" not in p and not Path(p).is_absolute():
            return str((yaml_dir / p).resolve())
        return p

    if isinstance(files, dict):
        files = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
    elif isinstance(files, list):
        files = [fix(x) for x in files]
    else:
        files = fix(files)
    return {**cfg, "dataset_kwargs": {**cfg["dataset_kwargs"], "data_files": files}}


def task_specs(task_manager: Any, names: list[str]) -> list[Any]:
    """Each requested name as lm-eval takes it: a config dict with data files resolved where we can."""
    known = set(task_manager.all_tasks)
    missing = [n for n in names if n not in known]
    if missing:
        have = ", ".join(sorted(known)[:20]) or "none (give --include-path DIR)"
        raise NestpruneError(f"unknown lm-eval task(s) {', '.join(missing)}; known: {have}")
    index = getattr(task_manager, "_index", {})  # lm-eval's task index (name -> entry with yaml_path, cfg)
    specs: list[Any] = []
    for n in names:
        entry = index.get(n)
        cfg, yaml_path = getattr(entry, "cfg", None), getattr(entry, "yaml_path", None)
        if isinstance(cfg, dict) and yaml_path is not None and cfg.get("task") == n:
            specs.append(resolve_data_files(cfg, Path(yaml_path).parent))
        else:
            specs.append(n)
    return specs


def summarize(results: dict[str, Any], rolling: RollingCounts) -> dict[str, dict[str, Any]]:
    """{task: {metric: value}} with lm-eval's "metric,filter" keys shortened, plus token_perplexity."""
    summary: dict[str, dict[str, Any]] = {}
    for task, metrics in (results.get("results") or {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, int | float):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else key] = value
        if rolling.tokens.get(task):
            row["token_perplexity"] = math.exp(-rolling.loglikelihood[task] / rolling.tokens[task])
            row["tokens"] = rolling.tokens[task]
        row["samples"] = (results.get("n-samples") or {}).get(task, {}).get("effective")
        summary[task] = row
    return summary


def write_json_atomic(path: Path, data: Any) -> None:
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=handle_non_serializable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_lm_eval(
    variant: Path | str,
    tasks: list[str],
    *,
    include_path: list[Path] | None = None,
    include_defaults: bool = False,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    limit: float | None = None,
    output_path: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int | None = None,
    bootstrap_iters: int = 100000,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on a variant directory (either layout) or any HF causal-LM directory.

    Returns {"model", "tasks": {task: {metric: value}}, "results": lm-eval's result dict}. With
    ``output_path`` the whole lm-eval result (configs, versions, sample counts) is written there as JSON.
    """
    if not tasks:
        raise NestpruneError("give at least one task with --tasks")
    for p in include_path or []:
        if not Path(p).is_dir():
            raise NestpruneError(f"--include-path {p} is not a directory")
    if output_path is not None and Path(output_path).is_dir():
        raise NestpruneError(f"--output-path {output_path} is a directory; give a file name such as results.json")
    path = Path(variant)
    if not (path / "config.json").is_file():
        raise NestpruneError(f"{path} is not a model directory (no config.json)")
    lm_eval = import_lm_eval()
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from nestprune.device import resolve_device, resolve_dtype
    from nestprune.variant.load import load_variant

    includes = [str(p) for p in include_path or []]
    tm = TaskManager(include_path=includes or None, include_defaults=include_defaults)
    specs = task_specs(tm, tasks)  # unknown names fail before the model is loaded
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise NestpruneError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None
    model = load_variant(path, dtype=resolve_dtype(dtype, dev), device=dev)
    lm = make_lm(model, tokenizer, batch_size, max_length)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit, task_manager=tm, log_samples=False,
            bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except NestpruneError:
        raise
    except Exception as e:  # a task that cannot load its data, a bad template …
        raise NestpruneError(f"lm-eval failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if results is None:
        raise NestpruneError("lm-eval returned no results")
    summary = summarize(results, lm.rolling)
    if output_path is not None:
        write_json_atomic(Path(output_path), {**results, "nestprune": {"model": str(path), "tasks": summary}})
    return {"model": str(path), "tasks": summary, "results": results}
