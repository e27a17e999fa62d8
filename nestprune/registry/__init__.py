"""The registry: publish an artifact with its base weights once, pull any size variant reading only its bytes.

Files, in the order data flows:
  stores.py    where bytes live: local directory, S3 (botocore), read-only HTTP(S) with Range reads; retries
  nested.py    the nested order: units permuted most-important-first, pruned axis as rows, chunking
  versions.py  references, content-addressed manifests, version records, tags, listing
  push.py      publish: blobs first, manifest next, version record last
  cache.py     the local content-addressed chunk cache
  source.py    RegistrySource: a TensorSource reading and verifying only the chunks asked for
  pull.py      pull: the same VariantSpec and the same materialize writer as ``nestprune materialize``
  gc.py        push leases, garbage collection of unreferenced blobs, removing versions and tags

Why plain content-addressed blobs and not zarr arrays: a version must be immutable, deduplicated
across pushes and verifiable from one digest; a missing zarr chunk silently reads back as the fill
value, sharded zarr arrays are read-modify-write (two concurrent pushes could lose data) and a zarr
array path is mutable. A blob keyed by its own sha256 is complete once it exists, two writers can
only write identical bytes to it, and every chunk inside it is checked against the sha256 listed in
the manifest. One blob per tensor (not per chunk) keeps object counts low; a variant is a prefix of
each pack, fetched with one byte-range read.

Names are imported on first use (``from nestprune.registry import list_registry`` does not import torch), so
commands that only list, tag or collect garbage start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ChunkCache": "cache", "PushResult": "push", "push": "push", "RegistrySource": "source",
    "TransferStats": "source", "HttpStore": "stores", "LocalStore": "stores", "S3Store": "stores", "Store": "stores",
    "open_store": "stores", "Reference": "versions", "list_registry": "versions", "parse_reference": "versions",
    "resolve": "versions", "set_tag": "versions",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'nestprune.registry' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nestprune.registry.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
