"""The registry: publish an artifact with its base weights once, pull any size variant reading only its bytes.

Files, in the order data flows:
  stores.py    where bytes live: local directory, S3 (fsspec/s3fs), read-only HTTP(S) with Range reads
  nested.py    the nested order: units permuted most-important-first, pruned axis as rows, chunking
  versions.py  references, content-addressed manifests, version records, tags, listing
  push.py      publish: blobs first, manifest next, version record last
  cache.py     the local content-addressed chunk cache
  source.py    RegistrySource: a TensorSource reading and verifying only the chunks asked for
  pull.py      pull: the same VariantSpec and the same materialize writer as ``nestprune materialize``

Why plain content-addressed blobs and not zarr arrays: a version must be immutable, deduplicated
across pushes and verifiable from one digest; a missing zarr chunk silently reads back as the fill
value, sharded zarr arrays are read-modify-write (two concurrent pushes could lose data) and a zarr
array path is mutable. A blob keyed by its own sha256 is complete once it exists, two writers can
only write identical bytes to it, and every chunk inside it is checked against the sha256 listed in
the manifest. One blob per tensor (not per chunk) keeps object counts low; a variant is a prefix of
each pack, fetched with one byte-range read.
"""

from nestprune.registry.cache import ChunkCache
from nestprune.registry.push import PushResult, push
from nestprune.registry.source import RegistrySource, TransferStats
from nestprune.registry.stores import HttpStore, LocalStore, Store, open_store
from nestprune.registry.versions import Reference, list_registry, parse_reference, resolve, set_tag

__all__ = [
    "ChunkCache", "HttpStore", "LocalStore", "PushResult", "Reference", "RegistrySource", "Store",
    "TransferStats", "list_registry", "open_store", "parse_reference", "push", "resolve", "set_tag",
]
