"""Fleet speed and hygiene: parallel writer jobs stay byte-identical, transfers retry without ever accepting a
wrong byte, multipart uploads, registry listing and push robustness, gc / rm / untag, the cache's size cap,
command startup, and a small load test (concurrent pulls + pushes + gc) on local, S3 and HTTP registries."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SAMPLE_TEXT, make_tiny_model, save_tiny_model
from registry_helpers import materialized
from registry_servers import http_server, s3_server
from typer.testing import CliRunner

from nestprune.build import BuildConfig, build_artifact
from nestprune.cli.main import app
from nestprune.errors import NestpruneError
from nestprune.registry import ChunkCache, list_registry, open_store, push
from nestprune.registry import source as source_mod
from nestprune.registry.gc import gc, remove_tag, remove_version
from nestprune.registry.pull import pull
from nestprune.registry.stores import LocalStore, S3Store, Transient, retry
from nestprune.registry.versions import blob_key, read_manifest, tag_key
from nestprune.variant import hf
from nestprune.variant.materialize import materialize

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """One llama-gqa base with two rankings (two versions of one model), and a qwen2 (group mode) model."""
    tmp = tmp_path_factory.mktemp("fleet-models")
    (tmp / "calib.txt").write_text(SAMPLE_TEXT)
    out = {}
    base = save_tiny_model(make_tiny_model("llama-gqa", vocab_size=len(tokenizer)), tokenizer, tmp / "llama-gqa")
    for key, seed in (("a", 0), ("b", 1)):
        cfg = BuildConfig(samples=4, seq_len=16, steps=4, batch_size=4, seed=seed, max_sparsity=0.6)
        out[key] = (base, build_artifact(base, tmp / "calib.txt", tmp / f"art-{key}", cfg))
    base = save_tiny_model(make_tiny_model("qwen2", vocab_size=len(tokenizer)), tokenizer, tmp / "qwen2")
    cfg = BuildConfig(samples=4, seq_len=16, steps=4, batch_size=4, gqa_mode="group", max_sparsity=0.6)
    out["q"] = (base, build_artifact(base, tmp / "calib.txt", tmp / "art-q", cfg))
    return out


@pytest.fixture(scope="module")
def expected(models, tmp_path_factory):
    """materialize's output per (model, sparsity, layout, multiple_of), made once."""
    return materialized(models, tmp_path_factory.mktemp("fleet-expected"))


@pytest.fixture(scope="module")
def s3():
    with s3_server("fleet") as endpoint:
        yield endpoint


def digests(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def same(got: Path, want: Path) -> None:
    g, w = digests(got), digests(want)
    assert sorted(g) == sorted(w)
    for n in w:
        assert g[n] == w[n], n


# --- the writer's jobs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["per-layer", "uniform"])
def test_parallel_small_block_jobs_write_the_same_bytes(models, expected, tmp_path, monkeypatch, layout):
    """Every job kind (kernel copies, coalesced spans, column blocks by unit) on 4 threads, with blocks so small
    that every tensor is many jobs, writes what the sequential writer and ``take`` write."""
    base, art = models["q"]
    monkeypatch.setattr(hf, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(hf, "PARALLEL_MIN_BYTES", 0)
    materialize(art, base, tmp_path / "v", sparsity=0.3, layout=layout)
    same(tmp_path / "v", expected("q", 0.3, layout))


def test_unit_of_finds_whole_heads():
    import numpy as np

    assert hf.unit_of(np.r_[np.arange(8, 16), np.arange(32, 48)], 64) == 8
    assert hf.unit_of(np.array([0, 1, 5]), 64) == 1
    assert hf.unit_of(np.array([], np.int64), 64) == 1


def test_registry_jobs_spill_and_blocks_write_the_same_bytes(models, expected, tmp_path, monkeypatch):
    """The registry's writer jobs — whole tensors in blocks, permuted tensors held in a temporary file — and the
    part-split parallel fetches write what materialize writes."""
    base, art = models["a"]
    reg = tmp_path / "reg"
    push(reg, art, base, name="m", channel_block=1)
    monkeypatch.setattr(source_mod, "SPILL_BYTES", 0)
    monkeypatch.setattr(source_mod, "BLOCK_BYTES", 1024)
    monkeypatch.setattr(source_mod, "PART_BYTES", 512)
    monkeypatch.setattr(hf, "PARALLEL_MIN_BYTES", 0)
    res = pull(f"{reg}/m", tmp_path / "v", sparsity=0.3, cache=ChunkCache(tmp_path / "cache"), jobs=4)
    same(tmp_path / "v", expected("a", 0.3))
    assert res.stats.requests > 50  # parts of at most 512 bytes


# --- transfers: retries, multipart ------------------------------------------------------------------------

def test_retry_backs_off_then_gives_up():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Transient("HTTP 503")
        return "ok"

    assert retry("GET x", flaky, sleep=sleeps.append) == "ok" and len(calls) == 3
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.6
    with pytest.raises(NestpruneError, match="GET y failed after 5 attempts: boom"):
        retry("GET y", lambda: (_ for _ in ()).throw(Transient("boom")), sleep=lambda s: None)


@pytest.mark.parametrize("fault", ["503", "reset", "truncate", "flip"])
def test_http_pull_survives_transient_faults_and_never_takes_a_wrong_byte(models, expected, tmp_path, fault,
                                                                          monkeypatch):
    monkeypatch.setattr("nestprune.registry.stores.time.sleep", lambda s: None)
    base, art = models["a"]
    reg = tmp_path / "reg"
    push(reg, art, base, name="m")
    with http_server(reg) as (url, server):
        server.faults = [fault, fault]
        res = pull(f"{url}/m", tmp_path / "v", sparsity=0.3, cache=None, jobs=2)
        same(tmp_path / "v", expected("a", 0.3))
        assert not server.faults
        if fault == "flip":  # a corrupt body is a complete answer: re-read after the sha256 check fails
            assert res.stats.retries == 2
        server.faults = ["flip"] * 50  # corrupt every time: the pull fails, nothing is written
        with pytest.raises(NestpruneError, match="fails its sha256 check"):
            pull(f"{url}/m", tmp_path / "w", sparsity=0.3, cache=None, jobs=1)
        assert not (tmp_path / "w").exists()


def test_s3_multipart_upload_round_trip(models, expected, tmp_path, s3):
    base, art = models["q"]
    url = "s3://fleet/multipart"
    store = S3Store(url, jobs=3, part_bytes=5 * 1024 * 1024)
    calls = []
    real = store.client.upload_part
    store.client.upload_part = lambda **kw: calls.append(kw["PartNumber"]) or real(**kw)  # type: ignore[method-assign]
    big = bytes(range(256)) * (11 * 4096 + 7)  # 11 MiB + 1792 bytes: three parts
    store.write("blobs/x", big)
    assert sorted(calls) == [1, 2, 3] and store.read("blobs/x") == big
    assert store.read_range("blobs/x", 5 * 2**20 - 3, 5 * 2**20 + 3) == big[5 * 2**20 - 3: 5 * 2**20 + 3]
    store.delete("blobs/x")
    assert not store.exists("blobs/x")
    push(None, art, base, name="q", store=store)
    pull(f"{url}/q", tmp_path / "v", sparsity=0.3, cache=None)
    same(tmp_path / "v", expected("q", 0.3))


# --- listing and publishing (issue 15) --------------------------------------------------------------------

def test_list_skips_a_corrupt_tag_with_a_warning(models, tmp_path):
    base, art = models["a"]
    reg = tmp_path / "reg"
    r = push(reg, art, base, name="m", tag="v1")
    push(reg, models["q"][1], models["q"][0], name="other")
    (reg / tag_key("m", "v1")).write_text("{not json")
    problems: list[str] = []
    index = list_registry(open_store(reg), problems)
    assert sorted(index.models) == ["m", "other"] and index.models["m"].tags == {"latest": r.record.digest}
    assert len(problems) == 1 and "models/m/tags/v1.json" in problems[0]
    res = runner.invoke(app, ["list", str(reg)])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "models/m/tags/v1.json" in res.output and "other" in res.output


def test_list_of_a_missing_registry_is_an_error(tmp_path):
    res = runner.invoke(app, ["list", str(tmp_path / "nope")])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0]
    (tmp_path / "file").write_text("x")
    res = runner.invoke(app, ["list", str(tmp_path / "file")])
    assert res.exit_code == 2 and "is not a directory" in res.output


class _TagsFail(LocalStore):
    """Writes of tags and of the index fail, as a full disk or a revoked permission would after the version."""

    def write(self, key: str, data: bytes) -> None:
        if "/tags/" in key or key == "index.json":
            raise NestpruneError(f"{self.url}: cannot write {key}: No space left on device")
        super().write(key, data)


def test_push_never_fails_after_the_version_is_published(models, expected, tmp_path, monkeypatch):
    base, art = models["a"]
    reg = tmp_path / "reg"
    res = push(None, art, base, name="m", tag="v1", store=_TagsFail(reg))
    assert len(res.warnings) == 3 and "tag m:v1 was not moved" in res.warnings[0]
    assert "nestprune tag" in res.warnings[0] and "index" in res.warnings[2]
    assert (reg / f"models/m/versions/{res.record.digest}.json").exists()
    pull(f"{reg}/m@{res.record.digest}", tmp_path / "v", sparsity=0.3, cache=None)
    same(tmp_path / "v", expected("a", 0.3))
    # the CLI: exit 0, the digest on stdout, a warning line per problem
    push_mod = sys.modules["nestprune.registry.push"]  # (the package's ``push`` is the function)
    real_open = push_mod.open_store
    monkeypatch.setattr(push_mod, "open_store", lambda loc, jobs=8: _TagsFail(loc) if loc else real_open(loc))
    out = runner.invoke(app, ["push", str(art), "--base", str(base), str(tmp_path / "reg2"), "--name", "m"])
    assert out.exit_code == 0, out.output
    assert out.output.count("warning:") == 2 and res.record.digest in out.output


# --- gc, rm, untag -------------------------------------------------------------------------------------

def _blobs(reg: Path) -> set[str]:
    return {p.name for p in (reg / "blobs/sha256").rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_gc_rm_untag(models, expected, tmp_path):
    (base, art_a), (_, art_b) = models["a"], models["b"]
    reg = tmp_path / "reg"
    store = open_store(reg)
    va = push(reg, art_a, base, name="m", tag="a").record
    vb = push(reg, art_b, base, name="m", tag="b").record
    before = _blobs(reg)
    orphan = reg / blob_key("f" * 64)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by an interrupted push")
    assert gc(store, grace_s=3600, dry_run=False).deleted == 0  # young: kept
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    dry = gc(store, grace_s=3600)
    assert dry.dry_run and [i.key for i in dry.candidates] == [blob_key("f" * 64)] and orphan.exists()
    res = runner.invoke(app, ["gc", str(reg)])
    assert res.exit_code == 0 and "would free" in res.output and "--yes" in res.output and orphan.exists()
    res = runner.invoke(app, ["gc", str(reg), "--yes"])
    assert res.exit_code == 0 and "freed 0.0 MiB in 1 unreferenced blob(s)" in res.output
    assert not orphan.exists() and _blobs(reg) == before

    res = runner.invoke(app, ["untag", f"{reg}/m:a"])
    assert res.exit_code == 0, res.output
    assert "a" not in list_registry(store).models["m"].tags
    with pytest.raises(NestpruneError, match="has no tag 'a'"):
        remove_tag(store, "m", "a")
    res = runner.invoke(app, ["rm", f"{reg}/m@{va.digest[:12]}"])
    assert res.exit_code == 0, res.output
    assert [v.digest for v in list_registry(store).models["m"].versions] == [vb.digest]
    with pytest.raises(NestpruneError, match="has no version"):
        remove_version(store, "m", va.digest)
    freed = gc(store, grace_s=0, dry_run=False)
    man_b = read_manifest(store, vb.digest)
    only_a = before - {vb.digest} - {e.blob for e in man_b.tensors.values()} - {
        f.digest for f in (*man_b.artifact.values(), *man_b.aux.values())}
    assert freed.deleted == len(only_a) > 0 and _blobs(reg) == before - only_a
    pull(f"{reg}/m:b", tmp_path / "v", sparsity=0.3, cache=None)
    same(tmp_path / "v", expected("b", 0.3))
    res = runner.invoke(app, ["rm", f"{reg}/m:latest"])  # by tag: removes the version and its tags
    assert res.exit_code == 0 and "latest" in res.output and "b" in res.output
    assert list_registry(store).models == {}


class _Paused(LocalStore):
    """Stops a push just before its version record, until released."""

    def __init__(self, root: Path, reached: threading.Event, go: threading.Event):
        super().__init__(root)
        self.reached, self.go = reached, go

    def write(self, key: str, data: bytes) -> None:
        if "/versions/" in key:
            self.reached.set()
            assert self.go.wait(60)
        super().write(key, data)


def test_gc_never_breaks_a_push_in_flight(models, expected, tmp_path):
    """gc with no grace at all, run while a push has uploaded everything but not yet published, and while
    that push reuses blobs an earlier (removed) version left: the push's lease keeps them all."""
    base, art = models["a"]
    reg = tmp_path / "reg"
    store = open_store(reg)
    old = push(reg, art, base, name="m").record
    remove_version(store, "m", old.digest)  # its blobs are now unreferenced ...
    reached, go = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(push, None, art, base, "m", store=_Paused(reg, reached, go))  # ... and reused here
        assert reached.wait(60)
        res = gc(store, grace_s=0, dry_run=False)
        go.set()
        new = fut.result()
    assert res.deleted == 0 and res.reachable == res.total > 0
    assert new.record.digest == old.digest and new.bytes_written == 0
    pull(f"{reg}/m", tmp_path / "v", sparsity=0.3, cache=None)
    same(tmp_path / "v", expected("a", 0.3))
    assert not (reg / "leases").exists() or not list((reg / "leases").iterdir())  # the lease was released


class _GcStrikes(LocalStore):
    """Deletes each of the first blobs a push finds already present right after telling it so, as a gc that
    read the leases just before the push leased them would."""

    def __init__(self, root: Path, strikes: int):
        super().__init__(root)
        self.strikes, self.struck = strikes, []

    def exists(self, key: str) -> bool:
        found = super().exists(key)
        if found and key.startswith("blobs/") and len(self.struck) < self.strikes:
            self.delete(key)
            self.struck.append(key)
        return found


def test_push_rewrites_reused_blobs_a_gc_removed_meanwhile(models, expected, tmp_path):
    base, art = models["a"]
    reg = tmp_path / "reg"
    old = push(reg, art, base, name="m").record
    remove_version(open_store(reg), "m", old.digest)
    store = _GcStrikes(reg, strikes=3)  # two tensor packs and whatever comes third
    again = push(None, art, base, name="m", store=store)
    assert len(store.struck) == 3 and all((reg / k).exists() for k in store.struck)
    pull(f"{reg}/m@{again.record.digest}", tmp_path / "v", sparsity=0.3, cache=None)
    same(tmp_path / "v", expected("a", 0.3))


def test_gc_refuses_http_and_missing_registries(tmp_path):
    with http_server(tmp_path) as (url, _):
        with pytest.raises(NestpruneError, match="read-only"):
            gc(open_store(url))
    res = runner.invoke(app, ["gc", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output


# --- the chunk cache's size cap ------------------------------------------------------------------------

def test_cache_keeps_the_most_recently_used_within_its_cap(tmp_path):
    import hashlib

    cache = ChunkCache(tmp_path / "c", max_bytes=250)
    blobs = [bytes([i]) * 100 for i in range(4)]
    keys = [hashlib.sha256(b).hexdigest() for b in blobs]
    for i, (k, b) in enumerate(zip(keys, blobs, strict=True)):
        cache.put(k, b)
        t = 1_000_000 + i
        os.utime(cache._path(k), (t, t))
    assert cache.get(keys[0]) == blobs[0]  # used now: the most recent
    res = cache.trim()
    assert (res.removed, res.freed, res.kept) == (2, 200, 200)
    assert [cache.get(k) is not None for k in keys] == [True, False, False, True]
    res = runner.invoke(app, ["cache", "prune", "--cache", str(tmp_path / "c"), "--max-size", "0"])
    assert res.exit_code == 0 and "removed 2 entries" in res.output
    res = runner.invoke(app, ["cache", "prune", "--cache", str(tmp_path / "c"), "--max-size", "lots"])
    assert res.exit_code == 2 and "not a size" in res.output


def test_a_pull_trims_the_cache_to_its_cap(models, tmp_path, monkeypatch):
    base, art = models["a"]
    reg = tmp_path / "reg"
    push(reg, art, base, name="m")
    monkeypatch.setenv("NESTPRUNE_CACHE_MAX", "64K")
    cache = ChunkCache(tmp_path / "cache")
    assert cache.max_bytes == 65536
    pull(f"{reg}/m", tmp_path / "v", sparsity=0.3, cache=cache)
    assert 0 < sum(size for _, size, _ in cache.entries()) <= 65536


# --- startup ---------------------------------------------------------------------------------------------

def test_help_materialize_and_pull_do_not_import_transformers(models, tmp_path):
    base, art = models["a"]
    reg = tmp_path / "reg"
    push(reg, art, base, name="m")
    script = f"""
import sys
from nestprune.cli.main import app
for args in (["--help"], ["materialize", {str(art)!r}, "--base", {str(base)!r}, "--out", {str(tmp_path / "v")!r},
              "--sparsity", "0.3"], ["pull", {str(reg)!r} + "/m", "--out", {str(tmp_path / "p")!r}, "--sparsity", "0.3"]):
    try:
        app(args)
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
    print("@@", args[0], "transformers" in sys.modules, flush=True)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)
    assert res.returncode == 0, res.stderr
    marks = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("@@ ")]
    assert marks == [["--help", "False"], ["materialize", "False"], ["pull", "False"]]
    assert digests(tmp_path / "v") == digests(tmp_path / "p")


# --- load test: concurrent pulls, pushes and gc --------------------------------------------------------

@pytest.mark.parametrize("backend", ["local", "s3", "http"])
def test_load_concurrent_pulls_pushes_and_gc(models, expected, tmp_path, backend, request):
    """Pulls of different sizes, pushes of new versions and a gc (no grace) all at once: every pull equals
    materialize, every version pushed is listed and complete, gc deletes nothing reachable."""
    from nestprune.registry.gc import Reachable

    (base, art_a), (_, art_b) = models["a"], models["b"]
    targets = [("a", 0.1), ("a", 0.3), ("a", 0.5), ("a", 0.3)]
    for key, s in targets:
        expected(key, s)
    if backend == "s3":
        request.getfixturevalue("s3")
        write_url = f"s3://fleet/load-{time.time_ns()}"
    else:
        write_url = str(tmp_path / "reg")
    push(write_url, art_a, base, name="m", tag="stable")
    junk = push(write_url, art_b, base, name="m", tag="junk", channel_block=2).record  # garbage for gc:
    remove_version(open_store(write_url), "m", junk.digest)  # its manifest (the packs are art_b's, reused below)
    ctx = http_server(Path(write_url)) if backend == "http" else None
    read_url = ctx.__enter__()[0] if ctx else write_url
    try:
        cache = ChunkCache(tmp_path / "cache") if backend != "local" else None
        jobs = [("pull", i) for i in range(len(targets))] + [("push", 8), ("push", 4), ("gc", 0)]

        def run(job):
            kind, arg = job
            if kind == "pull":
                key, s = targets[arg]
                return pull(f"{read_url}/m:stable", tmp_path / f"out{arg}", sparsity=s, cache=cache, jobs=2)
            if kind == "push":
                return push(write_url, art_b, base, name="m", tag=f"cb{arg}", channel_block=arg, jobs=2)
            results = []
            for _ in range(3):
                results.append(gc(open_store(write_url), grace_s=0, dry_run=False))
            return results

        with ThreadPoolExecutor(len(jobs)) as pool:
            done = list(pool.map(run, jobs))
        for i, (key, s) in enumerate(targets):
            same(tmp_path / f"out{i}", expected(key, s))
        store = open_store(write_url)
        index = list_registry(store)
        pushed = {done[len(targets)].record.digest, done[len(targets) + 1].record.digest}
        assert pushed | {done[0].record.digest} == {v.digest for v in index.models["m"].versions}
        assert len(pushed) == 2
        keep = Reachable(store).refresh()
        have = {k.rsplit("/", 1)[-1] for k in store.list("blobs/sha256")}
        assert keep <= have  # gc deleted nothing reachable ...
        assert junk.digest not in have and sum(r.deleted for r in done[-1]) >= 1  # ... and did delete garbage
        for tag in ("cb8", "cb4"):
            pull(f"{read_url}/m:{tag}", tmp_path / tag, sparsity=0.3, cache=cache)
            same(tmp_path / tag, expected("b", 0.3))
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
