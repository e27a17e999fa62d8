"""Names, versions and tags: references, content-addressed manifests, version records, tags, listing.

A version is immutable: its digest is the sha256 of its manifest blob, and the manifest lists the sha256
of every blob and chunk. It becomes visible when its ``VersionRecord`` is written, which a push does
last, after every blob. Tags are small mutable records pointing at a digest; writing one is atomic per
key (a rename locally, a PUT on S3), so the last writer wins and a reader never sees half a tag.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel, ValidationError

from nestprune.errors import NestpruneError, validation_message
from nestprune.registry.cache import sha256
from nestprune.registry.stores import KeyNotFound, Store
from nestprune.schemas.registry import IndexEntry, RegistryIndex, TagRecord, VersionManifestV1, VersionRecord

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
HEX_RE = re.compile(r"^[0-9a-f]{6,64}$")
DEFAULT_TAG = "latest"
INDEX_KEY = "index.json"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical(doc: BaseModel) -> bytes:
    return json.dumps(doc.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def blob_key(digest: str) -> str:
    return f"blobs/sha256/{digest[:2]}/{digest}"


def version_key(name: str, digest: str) -> str:
    return f"models/{name}/versions/{digest}.json"


def tag_key(name: str, tag: str) -> str:
    return f"models/{name}/tags/{tag}.json"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise NestpruneError(
            f"model name {name!r} is not valid: use lowercase letters, digits, '.', '_' and '-' (at most 128)"
        )
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.match(tag):
        raise NestpruneError(f"tag {tag!r} is not valid: use letters, digits, '.', '_' and '-' (at most 128)")
    return tag


@dataclass(frozen=True)
class Reference:
    """``REGISTRY/NAME[:TAG|@DIGEST]``; REGISTRY may be a path, s3://bucket/prefix or https://host/prefix."""

    registry: str | None
    name: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        where = f"{self.registry}/" if self.registry else ""
        return where + self.name + (f"@sha256:{self.digest}" if self.digest else f":{self.tag or DEFAULT_TAG}")


def parse_reference(ref: str) -> Reference:
    """Split a pull reference; without a registry part, the default local registry is meant."""
    ref = ref.strip()
    registry, _, last = ref.rpartition("/")
    if not last:
        raise NestpruneError(f"{ref!r} names no model: expected REGISTRY/NAME[:TAG|@DIGEST]")
    tag = digest = None
    if "@" in last:
        last, _, digest = last.partition("@")
        digest = digest.removeprefix("sha256:").lower()
        if not HEX_RE.match(digest):
            raise NestpruneError(f"digest {digest!r} is not a sha256 (hex, at least 6 digits)")
    elif ":" in last:
        last, _, tag = last.rpartition(":")
        check_tag(tag)
    return Reference(registry=registry or None, name=check_name(last), tag=tag, digest=digest)


def _parse(doc: type[BaseModel], data: bytes, what: str):
    try:
        return doc.model_validate_json(data)
    except ValidationError as e:
        raise NestpruneError(f"{what} is invalid {validation_message(e)} (written by a newer nestprune?)") from None


# --- reading ----------------------------------------------------------------------------------------------

def read_manifest(store: Store, digest: str) -> VersionManifestV1:
    """The manifest blob of ``digest``, verified against it."""
    try:
        data = store.read(blob_key(digest))
    except KeyNotFound:
        raise NestpruneError(f"{store.url}: the manifest of version sha256:{digest[:12]} is missing") from None
    if sha256(data) != digest:
        raise NestpruneError(f"{store.url}: the manifest of version sha256:{digest[:12]} is corrupt (sha256 mismatch)")
    return _parse(VersionManifestV1, data, f"manifest sha256:{digest[:12]}")


def read_tag(store: Store, name: str, tag: str) -> TagRecord | None:
    try:
        return _parse(TagRecord, store.read(tag_key(name, tag)), f"tag {name}:{tag}")
    except KeyNotFound:
        return None


def read_version(store: Store, name: str, digest: str) -> VersionRecord | None:
    try:
        return _parse(VersionRecord, store.read(version_key(name, digest)), f"version {name}@{digest[:12]}")
    except KeyNotFound:
        return None


def list_registry(store: Store, problems: list[str] | None = None) -> RegistryIndex:
    """Names, versions and tags. Stores that cannot list (HTTP) are answered from ``index.json``.

    A version or tag document that cannot be read (corrupt, or written by a newer nestprune) is left out
    and described in ``problems`` (when given): one bad document never hides the rest of the registry. A
    local registry directory that does not exist is an error (a typo must not look like an empty registry).
    """
    if store.read_only:
        try:
            return _parse(RegistryIndex, store.read(INDEX_KEY), f"{store.url}/{INDEX_KEY}")
        except KeyNotFound:
            return RegistryIndex(updated_at=now(), models={})
    check_root = getattr(store, "check_root", None)
    if check_root is not None:
        check_root()
    models: dict[str, IndexEntry] = {}
    keys = store.list("models")
    names = sorted({k.split("/")[1] for k in keys if k.count("/") == 3})
    for name in names:
        versions: list[VersionRecord] = []
        tags: dict[str, str] = {}
        for k in keys:
            parts = k.split("/")
            if len(parts) != 4 or parts[1] != name or not parts[3].endswith(".json"):
                continue
            try:
                if parts[2] == "versions":
                    v = read_version(store, name, parts[3][: -len(".json")])
                    if v is not None:
                        versions.append(v)
                elif parts[2] == "tags":
                    t = read_tag(store, name, parts[3][: -len(".json")])
                    if t is not None:
                        tags[t.tag] = t.digest
            except KeyNotFound:
                continue  # removed since the listing
            except NestpruneError as e:
                if problems is not None:
                    problems.append(f"skipped {store.url}/{k}: {e}")
        if versions:
            versions.sort(key=lambda v: (v.created_at, v.digest))
            models[name] = IndexEntry(versions=versions, tags=dict(sorted(tags.items())))
    return RegistryIndex(updated_at=now(), models=models)


def resolve(store: Store, ref: Reference) -> VersionRecord:
    """The version a reference points at, with clear errors for an unknown name, tag or digest."""
    name = ref.name
    if ref.digest is not None:
        if len(ref.digest) == 64:
            v = read_version(store, name, ref.digest)
            if v is not None:
                return v
            _unknown_name(store, ref)
            raise NestpruneError(f"{store.url}: {name} has no version sha256:{ref.digest[:12]}")
        entry = _entry(store, ref)
        hits = [v for v in entry.versions if v.digest.startswith(ref.digest)]
        if len(hits) != 1:
            how = "no" if not hits else f"{len(hits)} versions match; give more digits of the"
            raise NestpruneError(f"{store.url}: {name} has {how} version sha256:{ref.digest}")
        return hits[0]
    tag = ref.tag or DEFAULT_TAG
    t = read_tag(store, name, tag)
    if t is None:
        entry = _entry(store, ref)
        have = ", ".join(entry.tags) or "none"
        raise NestpruneError(f"{store.url}: {name} has no tag {tag!r} (its tags: {have})")
    v = read_version(store, name, t.digest)
    if v is None:
        raise NestpruneError(f"{store.url}: tag {name}:{tag} points at sha256:{t.digest[:12]}, which is not published")
    return v


def _entry(store: Store, ref: Reference) -> IndexEntry:
    index = list_registry(store)
    if ref.name not in index.models:
        _unknown_name(store, ref, index)
    return index.models[ref.name]


def _unknown_name(store: Store, ref: Reference, index: RegistryIndex | None = None) -> None:
    index = index or list_registry(store)
    if ref.name in index.models:
        return
    have = ", ".join(index.models) or "none"
    raise NestpruneError(f"{store.url}: no model named {ref.name!r} (models there: {have})")


# --- writing ----------------------------------------------------------------------------------------------

def write_tag(store: Store, name: str, tag: str, digest: str) -> TagRecord:
    record = TagRecord(name=name, tag=check_tag(tag), digest=digest, updated_at=now())
    store.write(tag_key(name, tag), record.model_dump_json(indent=1).encode())
    return record


def set_tag(store: Store, ref: Reference, new_tag: str) -> TagRecord:
    """Point ``new_tag`` of ``ref.name`` at the version ``ref`` resolves to (moving it if it exists)."""
    if store.read_only:
        raise NestpruneError(f"{store.url} is read-only; tag on its backing store")
    v = resolve(store, ref)
    record = write_tag(store, ref.name, new_tag, v.digest)
    refresh_index(store)
    return record


def refresh_index(store: Store) -> RegistryIndex:
    """Rewrite ``index.json`` from a listing (for HTTP readers). Racing writers each write a full listing."""
    index = list_registry(store)
    store.write(INDEX_KEY, index.model_dump_json(indent=1).encode())
    return index
