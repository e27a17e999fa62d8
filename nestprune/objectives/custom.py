"""``--objective-fn``: a user's objective, named ``package.module:callable`` or ``path/to/file.py:callable``.

``fn(tokenizer, data_path, options)`` returns any object with ``name``, ``batches``, ``loss`` and
``provenance`` (the Objective protocol); it is checked, and its provenance records the callable, the
data file's sha256 and the options. E.g.::

    # my_objectives.py — nestprune build MODEL --objective-fn my_objectives.py:make --data items.jsonl
    def make(tokenizer, data_path, options):
        return MarginObjective.from_jsonl(data_path, tokenizer, prompt_template="Q: {prompt}\nA:")

Library users may instead pass any Objective instance to ``build_artifact(objective=...)``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from nestprune.errors import NestpruneError
from nestprune.io.text import sha256_file
from nestprune.objectives import CustomConfig
from nestprune.objectives.base import Batch, Objective


def resolve_callable(spec: str) -> Callable:
    """``package.module:name`` or ``path/to/file.py:name`` → the named callable."""
    if not isinstance(spec, str) or ":" not in spec:
        raise NestpruneError(f"objective callable {spec!r} must look like 'package.module:function' or 'file.py:function'")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise NestpruneError(f"objective callable {spec!r} must look like 'package.module:function' or 'file.py:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise NestpruneError(f"cannot import objective module {target}: no such file")
        mod_name = "nestprune_user_objective_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise NestpruneError(f"cannot import objective module {target}")
        module = importlib.util.module_from_spec(module_spec)
        try:
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any import-time error becomes one line
            sys.modules.pop(mod_name, None)
            raise NestpruneError(f"cannot import objective module {target}: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise NestpruneError(f"cannot import objective module {target!r}: {type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise NestpruneError(f"objective module {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise NestpruneError(f"objective {spec!r} is not callable (it is a {type(obj).__name__})")
    return obj


def check_objective(obj: Any, origin: str) -> Objective:
    """Refuse, in one line, an object that does not satisfy the Objective protocol."""
    missing = [a for a in ("name", "batches", "loss", "provenance") if not hasattr(obj, a)]
    not_callable = [a for a in ("batches", "loss", "provenance") if hasattr(obj, a) and not callable(getattr(obj, a))]
    if missing or not_callable:
        what = ", ".join([f"no {a!r}" for a in missing] + [f"{a!r} is not callable" for a in not_callable])
        raise NestpruneError(
            f"{origin} returned a {type(obj).__name__} that is not an Objective ({what}); "
            "it needs name, batches(batch_size), loss(model, batch) and provenance()"
        )
    if not isinstance(obj.name, str) or not obj.name:
        raise NestpruneError(f"{origin} returned an objective whose name is not a non-empty string")
    return obj


class CustomObjective:
    """A user objective, checked, with its origin added to its provenance."""

    def __init__(self, inner: Objective, origin: str, data_path: Path | None, options: Mapping[str, Any]):
        self.inner = check_objective(inner, origin)
        self.name = inner.name
        self.origin = origin
        self.data_path = data_path
        self.options = dict(options)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return self.inner.batches(batch_size)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.inner.loss(model, batch)

    def provenance(self) -> dict[str, Any]:
        details = self.inner.provenance()
        if not isinstance(details, dict):
            raise NestpruneError(f"{self.origin}: provenance() must return a dict, got {type(details).__name__}")
        try:
            json.dumps(details)
        except (TypeError, ValueError) as e:
            raise NestpruneError(f"{self.origin}: provenance() must be JSON-serialisable ({e})") from None
        p = self.data_path
        return {
            "objective": "custom",
            "callable": self.origin,
            "name": self.name,
            "source": str(p) if p is not None else None,
            "sha256": sha256_file(p) if p is not None and Path(p).is_file() else None,
            "options": _jsonable(self.options),
            "details": details,
        }


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        try:
            json.dumps(v)
            out[str(k)] = v
        except (TypeError, ValueError):
            out[str(k)] = repr(v)
    return out


def load_objective(
    spec: str | Callable,
    tokenizer,
    data_path: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> Objective:
    """Build a user objective: ``spec`` (``module:fn``, ``file.py:fn`` or the callable itself) is called
    as ``fn(tokenizer, data_path, options)`` and must return an Objective. The result's provenance
    records the callable, the data file's sha256 and the options."""
    fn = resolve_callable(spec) if isinstance(spec, str) else spec
    origin = spec if isinstance(spec, str) else f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    if not callable(fn):
        raise NestpruneError(f"objective {origin!r} is not callable")
    opts = dict(options or {})
    path = Path(data_path) if data_path is not None else None
    try:
        inspect.signature(fn).bind(tokenizer, path, opts)
    except TypeError:
        raise NestpruneError(f"objective {origin!r} must accept (tokenizer, data_path, options)") from None
    except ValueError:  # builtins without a signature: just call
        pass
    obj = fn(tokenizer, path, opts)
    return CustomObjective(obj, origin, path, opts)


def make_custom(cfg: CustomConfig, data_path: Path | None, tokenizer, seed: int) -> CustomObjective:
    """The user's objective: ``cfg.fn`` called with the shared options (samples, seq_len, seed,
    chat_template, max_tokens) and ``cfg.options``."""
    opts = {"samples": cfg.samples, "seq_len": cfg.seq_len, "seed": seed, "chat_template": cfg.chat_template,
            "max_tokens": cfg.max_tokens, **dict(cfg.options)}
    return load_objective(cfg.fn, tokenizer, data_path, opts)
