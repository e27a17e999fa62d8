"""Cleaning a registry up: remove versions and tags, and garbage-collect the blobs nothing references.

Reachable blobs: every blob named by the manifest of a published version (its tensor packs, artifact and
aux files, the manifest itself), and every blob named by a live push lease. ``gc`` deletes the others once
they are older than a grace period — what an interrupted push left, and what removed versions held.

Why a push in flight is never broken:

* a push writes its lease (``leases/<id>.json``) before it checks or writes its first blob, and adds each
  blob's digest to the lease before it checks whether the blob exists (``Lease.hold``);
* ``gc`` lists the blobs first, then reads the leases and the versions; before each batch of deletes it
  reads the leases and versions again and drops every candidate they now name;
* blobs younger than the grace period (default 1 hour) are never deleted, so blobs a push has just written
  survive even a push whose lease gc could not yet see;
* before it writes its version record, a push checks that every blob it found already present (and so did
  not write) still exists, and writes again any that a gc removed in the instant between that gc's last read
  of the leases and its delete (leased by then, so no later gc removes it) — a version never names a missing
  blob.

A lease not renewed for ``LEASE_LIFETIME`` (a day) belongs to a dead push and is ignored (and removed by
``gc --yes``).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nestprune.errors import NestpruneError
from nestprune.io import atomic
from nestprune.registry.stores import KeyInfo, KeyNotFound, Store
from nestprune.registry.versions import (
    _parse,
    check_tag,
    list_registry,
    now,
    read_manifest,
    read_tag,
    refresh_index,
    tag_key,
    version_key,
)
from nestprune.schemas.registry import PushLease

DEFAULT_GRACE_S = 3600.0
LEASE_LIFETIME_S = 24 * 3600.0
BATCH = 100  # deletes between two fresh reads of the leases and versions
BLOBS = "blobs/sha256"


def lease_key(lease_id: str) -> str:
    return f"leases/{lease_id}.json"


def _digest_of(key: str) -> str | None:
    parts = key.split("/")
    return parts[3] if len(parts) == 4 and key.startswith(BLOBS + "/") else None


# --- leases --------------------------------------------------------------------------------------------------

class Lease:
    """A push's lease: ``hold(digest)`` returns once the lease stored in the registry names ``digest``.
    Concurrent callers share writes (one rewrite covers every digest added meanwhile)."""

    def __init__(self, store: Store, name: str):
        self.store = store
        self.id = f"{atomic.HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.key = lease_key(self.id)
        self._doc = PushLease(name=name, host=atomic.HOST, pid=os.getpid(), started_at=now(), digests=[])
        self._held: set[str] = set()
        self._stored: set[str] = set()
        self._lock = threading.Lock()
        self._write()

    def _write(self) -> None:
        doc = self._doc.model_copy(update={"digests": sorted(self._held)})
        self.store.write(self.key, doc.model_dump_json().encode())

    def hold(self, *digests: str) -> None:
        with self._lock:
            self._held.update(digests)
            if not set(digests) <= self._stored:
                pending = set(self._held)
                self._write()
                self._stored |= pending

    def release(self) -> None:
        self.store.delete(self.key)


def live_leases(store: Store, lifetime_s: float = LEASE_LIFETIME_S,
                at: float | None = None) -> tuple[set[str], list[KeyInfo]]:
    """Digests named by live leases, and the dead leases (not renewed within ``lifetime_s``)."""
    at = time.time() if at is None else at
    held: set[str] = set()
    dead: list[KeyInfo] = []
    for info in store.list_info("leases"):
        if at - info.mtime > lifetime_s:
            dead.append(info)
            continue
        try:
            held.update(_parse(PushLease, store.read(info.key), info.key).digests)
        except KeyNotFound:
            continue  # released since the listing
        except NestpruneError:  # unreadable: keep everything rather than guess
            raise NestpruneError(f"{store.url}/{info.key} cannot be read; gc keeps out until it is fixed or "
                                 "removed") from None
    return held, dead


# --- reachability --------------------------------------------------------------------------------------------

@dataclass
class Reachable:
    """Blobs named by published versions (manifests read once each) and live leases."""

    store: Store
    lifetime_s: float = LEASE_LIFETIME_S
    blobs: set[str] = field(default_factory=set)
    manifests: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    dead_leases: list[KeyInfo] = field(default_factory=list)

    def refresh(self) -> set[str]:
        """Read the versions (new manifests only) and leases again; returns every reachable digest."""
        held, self.dead_leases = live_leases(self.store, self.lifetime_s)
        index = list_registry(self.store, self.problems)
        for entry in index.models.values():
            for v in entry.versions:
                if v.digest in self.manifests:
                    continue
                m = read_manifest(self.store, v.digest)
                self.blobs.add(v.digest)
                self.blobs.update(e.blob for e in m.tensors.values())
                self.blobs.update(f.digest for f in (*m.artifact.values(), *m.aux.values()))
                self.manifests.add(v.digest)
        # a version record whose file could not be parsed: keep every blob rather than guess
        unreadable = [p for p in self.problems if "/versions/" in p]
        if unreadable:
            raise NestpruneError(f"gc stops: {unreadable[0]}; fix or remove that version record first")
        return self.blobs | held


@dataclass(frozen=True)
class GcResult:
    candidates: list[KeyInfo]  # unreferenced blobs older than the grace period (deleted unless dry run)
    deleted: int
    freed: int  # bytes deleted (or that would be, in a dry run)
    young: int  # unreferenced blobs kept because they are younger than the grace period
    reachable: int  # blobs kept because a version or a live lease names them
    total: int  # blobs in the registry
    dead_leases: int
    dry_run: bool
    problems: list[str]


def gc(store: Store, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = True,
       on_delete: Callable[[KeyInfo], None] | None = None) -> GcResult:
    """Delete (unless ``dry_run``) every blob no version and no live lease names that is older than ``grace_s``."""
    if store.read_only:
        raise NestpruneError(f"{store.url} is read-only; run gc on the store that backs it")
    check_root = getattr(store, "check_root", None)
    if check_root is not None:
        check_root()
    started = time.time()
    blobs = [i for i in store.list_info(BLOBS) if _digest_of(i.key)]  # listed first: see the module doc
    reach = Reachable(store)
    keep = reach.refresh()
    unreferenced = [i for i in blobs if _digest_of(i.key) not in keep]
    old = [i for i in unreferenced if started - i.mtime > grace_s]
    deleted = freed = 0
    if not dry_run:
        for k in range(0, len(old), BATCH):
            keep = reach.refresh() if k else keep
            for info in old[k: k + BATCH]:
                if _digest_of(info.key) in keep:
                    continue
                store.delete(info.key)
                deleted += 1
                freed += info.size
                if on_delete:
                    on_delete(info)
        for info in reach.dead_leases:
            store.delete(info.key)
    else:
        freed = sum(i.size for i in old)
    return GcResult(candidates=old, deleted=deleted, freed=freed, young=len(unreferenced) - len(old),
                    reachable=len(blobs) - len(unreferenced), total=len(blobs), dead_leases=len(reach.dead_leases),
                    dry_run=dry_run, problems=reach.problems)


# --- versions and tags ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoveResult:
    name: str
    digest: str
    tags: list[str]  # tags that pointed at the version and were removed with it
    warnings: list[str]


def remove_version(store: Store, name: str, digest: str) -> RemoveResult:
    """Unpublish version ``digest`` of ``name``: its tags first, then its record. Its blobs stay until ``gc``."""
    if store.read_only:
        raise NestpruneError(f"{store.url} is read-only; remove versions on the store that backs it")
    if not store.exists(version_key(name, digest)):
        raise NestpruneError(f"{store.url}: {name} has no version sha256:{digest[:12]}")
    tags = []
    for key in store.list(f"models/{name}/tags"):
        tag = key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            t = read_tag(store, name, tag)
        except NestpruneError:
            continue
        if t is not None and t.digest == digest:
            store.delete(tag_key(name, tag))
            tags.append(tag)
    store.delete(version_key(name, digest))
    return RemoveResult(name=name, digest=digest, tags=sorted(tags), warnings=_refresh(store))


def remove_tag(store: Store, name: str, tag: str) -> tuple[str, list[str]]:
    """Delete tag ``tag`` of ``name`` (its version stays); returns (the digest it named, warnings)."""
    if store.read_only:
        raise NestpruneError(f"{store.url} is read-only; untag on the store that backs it")
    t = read_tag(store, name, check_tag(tag))
    if t is None:
        raise NestpruneError(f"{store.url}: {name} has no tag {tag!r}")
    store.delete(tag_key(name, tag))
    return t.digest, _refresh(store)


def _refresh(store: Store) -> list[str]:
    try:
        refresh_index(store)
        return []
    except (NestpruneError, OSError) as e:
        return [f"the registry index (for HTTP readers) was not updated: {e}"]


def age(info: KeyInfo, at: float | None = None) -> str:
    s = (time.time() if at is None else at) - info.mtime
    return datetime.fromtimestamp(info.mtime, UTC).strftime("%Y-%m-%d %H:%M") + f" ({s / 3600:.1f} h ago)"
