"""Where base tensors come from: a protocol, so that materialize and registry pulls share one writer.

``take(name, axis, index)`` returns tensor ``name`` restricted to ``index`` (ascending original
indices) along ``axis``, or whole when ``index`` is None. Implementations: local safetensors files
(here) and a registry version in nested order (nestprune.registry.source).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open

from nestprune.errors import NestpruneError

# safetensors dtype names: the one table (variant headers, registry manifests and these reads use it)
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}


def row_runs(index: np.ndarray) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 6), (9, 10)]: the contiguous runs of an ascending index."""
    index = np.asarray(index, dtype=np.int64)
    if len(index) == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(index)]])
    return list(zip(index[starts].tolist(), (index[ends - 1] + 1).tolist(), strict=True))


class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def take(self, name: str, axis: int = 0, index: torch.Tensor | None = None) -> torch.Tensor: ...


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF directory (single file or sharded with an index)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise NestpruneError(f"model directory {model_dir} does not exist")
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise NestpruneError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise NestpruneError(f"{model_dir} is missing shard(s) named in its index: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")) or list(model_dir.glob("*.pth")):
        raise NestpruneError(
            f"{model_dir} holds only pickled weights (.bin/.pt); nestprune never unpickles. Convert them once "
            "with transformers (from_pretrained + save_pretrained(safe_serialization=True)) and retry"
        )
    raise NestpruneError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


class SafetensorsSource:
    """Lazy reads from an HF directory: row slices touch only those rows' pages."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.content_check = None  # a ``fingerprint.ContentCheck`` a writer feeds as it reads (``materialize``)
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        try:
            for f in weight_files(self.model_dir):
                h = self._stack.enter_context(safe_open(str(f), framework="pt"))
                for k in h.keys():
                    self._where[k] = h
        except NestpruneError:
            self._stack.close()
            raise
        except Exception as e:  # corrupt header, truncated file …
            self._stack.close()
            raise NestpruneError(f"cannot read safetensors in {self.model_dir}: {e}") from None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self._where)

    def _handle(self, name: str):
        try:
            return self._where[name]
        except KeyError:
            raise NestpruneError(f"tensor {name!r} is not in {self.model_dir}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        st_dtype = self._handle(name).get_slice(name).get_dtype()
        if st_dtype not in DTYPES:
            raise NestpruneError(f"tensor {name} in {self.model_dir} has dtype {st_dtype}, which nestprune cannot handle")
        return DTYPES[st_dtype]

    def take(self, name: str, axis: int = 0, index: torch.Tensor | None = None) -> torch.Tensor:
        h = self._handle(name)
        if index is None:
            return h.get_tensor(name)
        index = torch.as_tensor(index, dtype=torch.long)
        if axis == 0:
            sl = h.get_slice(name)
            # contiguous runs of rows are read as slices: only their pages are touched
            parts = [sl[a:b] for a, b in row_runs(index.numpy())]
            if not parts:
                shape = list(sl.get_shape())
                shape[0] = 0
                return torch.empty(shape, dtype=self.dtype(name))
            return torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        return h.get_tensor(name).index_select(axis, index)
