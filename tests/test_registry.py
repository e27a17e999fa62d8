"""The registry: push/pull round trips on local, S3 (moto server) and HTTP (Range server) registries;
pulled == materialized byte for byte; only needed bytes read; cache; tags; concurrency; corruption."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_model, save_tiny_model
from registry_helpers import materialized
from registry_servers import http_server, s3_server

from nestprune.build import BuildConfig, build_artifact
from nestprune.errors import NestpruneError
from nestprune.io.weights import SafetensorsSource
from nestprune.registry import (
    ChunkCache,
    RegistrySource,
    list_registry,
    open_store,
    parse_reference,
    push,
    resolve,
)
from nestprune.registry.pull import pull
from nestprune.registry.stores import LocalStore
from nestprune.registry.versions import Reference, blob_key, canonical, read_manifest, set_tag
from nestprune.schemas.registry import RegistryIndex, TagRecord, VersionManifestV1, VersionRecord
from nestprune.variant.materialize import materialize


def _build(tmp: Path, base: Path, name: str, seed: int = 0, gqa_mode: str = "query") -> Path:
    data = tmp / "calib.txt"
    if not data.exists():
        data.write_text(SAMPLE_TEXT)
    cfg = BuildConfig(samples=4, seq_len=16, steps=4, batch_size=4, seed=seed, gqa_mode=gqa_mode, max_sparsity=0.6)
    return build_artifact(base, data, tmp / name, cfg)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Bases and artifacts: llama-gqa (query mode, two rankings), qwen2 (group mode, biases), llama bf16,
    phi3 (fused qkv_proj / gate_up_proj, query mode), gemma2 (query mode), gemma3 (group mode, tied)."""
    tmp = tmp_path_factory.mktemp("registry-models")
    out = {}
    base = save_tiny_model(make_tiny_model("llama-gqa", vocab_size=len(tokenizer)), tokenizer, tmp / "llama-gqa")
    out["gqa"] = (base, _build(tmp, base, "art-gqa"))
    out["gqa-seed1"] = (base, _build(tmp, base, "art-gqa-seed1", seed=1))
    base = save_tiny_model(make_tiny_model("qwen2", vocab_size=len(tokenizer)), tokenizer, tmp / "qwen2")
    out["qwen2-group"] = (base, _build(tmp, base, "art-qwen2", gqa_mode="group"))
    model = make_tiny_model("llama", seed=3, vocab_size=len(tokenizer)).to(torch.bfloat16)
    base = save_tiny_model(model, tokenizer, tmp / "llama-bf16")
    out["bf16"] = (base, _build(tmp, base, "art-bf16"))
    for key, family, mode in (("phi3", "phi3", "query"), ("gemma2", "gemma2", "query"), ("gemma3-group", "gemma3", "group")):
        base = save_tiny_model(make_tiny_model(family, vocab_size=len(tokenizer)), tokenizer, tmp / family)
        out[key] = (base, _build(tmp, base, f"art-{family}", gqa_mode=mode))
    return out


@pytest.fixture(scope="module")
def expected(models, tmp_path_factory):
    """materialize's output per (model, sparsity, layout, multiple_of), made once."""
    return materialized(models, tmp_path_factory.mktemp("registry-expected"))


@pytest.fixture(scope="module")
def s3():
    with s3_server("registry") as endpoint:
        yield endpoint


def assert_same_dir(got: Path, want: Path) -> None:
    names = sorted(p.name for p in got.iterdir())
    assert names == sorted(p.name for p in want.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "nestprune_variant.json" in names
    for n in names:
        assert (got / n).read_bytes() == (want / n).read_bytes(), n


def tensor_bytes(variant: Path) -> int:
    """Bytes of the variant's tensor data (its safetensors files less their headers)."""
    with SafetensorsSource(variant) as s:
        return sum(s.take(n).numel() * s.take(n).element_size() for n in s.names())


# --- layout ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["gqa", "qwen2-group", "bf16", "phi3", "gemma3-group"])
def test_registry_source_takes_what_safetensors_takes(models, tmp_path, key):
    base, art = models[key]
    reg = tmp_path / "reg"
    push(reg, art, base, name="m", channel_block=8)
    store = open_store(reg)
    manifest = read_manifest(store, resolve(store, parse_reference("m")).digest)
    src = RegistrySource(store, manifest, cache=None)
    g = torch.Generator().manual_seed(0)
    with SafetensorsSource(base) as ref:
        assert sorted(src.names()) == sorted(ref.names())
        for name in ref.names():
            whole = src.take(name)
            assert whole.dtype == ref.dtype(name) and torch.equal(whole, ref.take(name)), name
            for axis in range(whole.dim()):
                n = whole.shape[axis]
                idx = torch.randperm(n, generator=g)[: max(1, n // 3)].sort().values
                got, want = src.take(name, axis, idx), ref.take(name, axis, idx)
                assert got.dtype == want.dtype and torch.equal(got, want), (name, axis)
    # nested layout: the most important head of a pruned layer is stored first, o_proj transposed
    o = manifest.tensors["model.layers.1.self_attn.o_proj.weight"]
    assert o.transposed and o.stored_shape == [o.shape[1], o.shape[0]] and o.segments is None
    assert manifest.tensors["model.embed_tokens.weight"].space is None
    if key == "phi3":  # fused: q, k, v segments of 4, 2, 2 heads of 8 rows; gate, up segments of 48 channels
        qkv = manifest.tensors["model.layers.1.self_attn.qkv_proj.weight"]
        assert [(g.space, g.rows) for g in qkv.segments] == [("q", 32), ("kv", 16), ("kv", 16)]
        assert qkv.space == "q" and qkv.chunk_rows == qkv.unit_rows == 8 and len(qkv.chunks) == 8
        gate_up = manifest.tensors["model.layers.1.mlp.gate_up_proj.weight"]
        assert [(g.space, g.rows) for g in gate_up.segments] == [("mlp", 48), ("mlp", 48)]
        assert "segments" not in json.loads(canonical(manifest))["tensors"]["model.layers.1.self_attn.o_proj.weight"]
        return
    q = manifest.tensors["model.layers.1.self_attn.q_proj.weight"]
    assert not q.transposed and q.segments is None
    assert q.space == "q" and q.chunk_rows == q.unit_rows == (16 if key.startswith("gemma") else 8)
    assert len(q.chunks) == 4
    if key == "bf16":
        assert q.dtype == "BF16"


# --- round trips per backend ----------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity,layout,multiple_of", [(0.1, "per-layer", None), (0.3, "uniform", None),
                                                         (0.5, "per-layer", 8)])
def test_local_pull_equals_materialize(models, expected, tmp_path, sparsity, layout, multiple_of):
    base, art = models["gqa"]
    pushed = push(tmp_path / "reg", art, base, name="llama-gqa")
    assert pushed.record.digest == resolve(open_store(tmp_path / "reg"), parse_reference("llama-gqa")).digest
    res = pull(f"{tmp_path / 'reg'}/llama-gqa:latest", tmp_path / "out", sparsity=sparsity, layout=layout,
               multiple_of=multiple_of, cache=ChunkCache(tmp_path / "cache"))
    assert_same_dir(tmp_path / "out", expected("gqa", sparsity, layout, multiple_of))
    assert res.spec.layout == layout and abs(res.manifest.achieved_sparsity - res.spec.achieved_sparsity) < 1e-12
    assert res.stats.fetched > 10 * res.stats.cached  # only identical small files come from the cache


@pytest.mark.parametrize("layout", ["per-layer", "uniform"])
@pytest.mark.parametrize("key", ["phi3", "gemma2", "gemma3-group"])
def test_pull_equals_materialize_for_every_new_family(models, expected, tmp_path, key, layout):
    base, art = models[key]
    push(tmp_path / "reg", art, base, name="m", channel_block=8)
    pull(f"{tmp_path / 'reg'}/m", tmp_path / "out", sparsity=0.3, layout=layout, cache=None)
    assert_same_dir(tmp_path / "out", expected(key, 0.3, layout))


def test_sharded_pull_equals_sharded_materialize(models, tmp_path):
    base, art = models["bf16"]
    push(tmp_path / "reg", art, base, name="m")
    materialize(art, base, tmp_path / "want", sparsity=0.2, shard_bytes=60_000)
    pull(f"{tmp_path / 'reg'}/m", tmp_path / "got", sparsity=0.2, shard_bytes=60_000, cache=None)
    names = sorted(p.name for p in (tmp_path / "got").iterdir())
    assert "model.safetensors.index.json" in names and "model-00002-of-00002.safetensors" in names
    assert names == sorted(p.name for p in (tmp_path / "want").iterdir())
    for n in names:
        assert (tmp_path / "got" / n).read_bytes() == (tmp_path / "want" / n).read_bytes(), n


def test_s3_round_trip(models, expected, tmp_path, s3):
    base, art = models["qwen2-group"]
    url = "s3://registry/team/models"
    r = push(url, art, base, name="qwen2")
    assert 0.9 * r.bytes_total < r.bytes_written <= r.bytes_total  # identical small files are stored once
    assert open_store(url).exists(f"models/qwen2/versions/{r.record.digest}.json")
    res = pull(f"{url}/qwen2@{r.record.digest[:12]}", tmp_path / "out", sparsity=0.3,
               cache=ChunkCache(tmp_path / "cache"))
    assert_same_dir(tmp_path / "out", expected("qwen2-group", 0.3))
    assert res.record.digest == r.record.digest
    # pushing the same thing again writes no new blob and makes no new version
    again = push(url, art, base, name="qwen2", tag="v1")
    assert again.bytes_written == 0 and again.record == r.record
    index = list_registry(open_store(url))
    assert [v.digest for v in index.models["qwen2"].versions] == [r.record.digest]
    assert index.models["qwen2"].tags == {"latest": r.record.digest, "v1": r.record.digest}


def test_http_round_trip_reads_ranges(models, expected, tmp_path):
    base, art = models["bf16"]
    reg = tmp_path / "reg"
    r = push(reg, art, base, name="llama-bf16", channel_block=1)
    with http_server(reg) as (url, server):
        res = pull(f"{url}/llama-bf16", tmp_path / "out", sparsity=0.4, cache=ChunkCache(tmp_path / "cache"))
        assert_same_dir(tmp_path / "out", expected("bf16", 0.4))
        assert server.ranged_requests > 0 and res.stats.fetched <= server.bytes_sent < r.bytes_total
        index = list_registry(open_store(url))  # HTTP cannot list: answered from index.json
        assert index.models["llama-bf16"].tags == {"latest": r.record.digest}
        with pytest.raises(NestpruneError, match="read-only"):
            push(url, art, base, name="x")
    # bf16 bits survive exactly
    with SafetensorsSource(tmp_path / "out") as got:
        assert got.dtype("model.layers.0.mlp.up_proj.weight") == torch.bfloat16


# --- bytes read and the cache ---------------------------------------------------------------------------

def test_pull_reads_only_the_variant_and_nothing_twice(models, expected, tmp_path):
    base, art = models["gqa"]
    reg = tmp_path / "reg"
    r = push(reg, art, base, name="m", channel_block=1)
    manifest = read_manifest(open_store(reg), r.record.digest)
    files = sum(f.size for f in (*manifest.artifact.values(), *manifest.aux.values()))
    cache = ChunkCache(tmp_path / "cache")
    half = pull(f"{reg}/m", tmp_path / "s50", sparsity=0.5, cache=cache)
    # one chunk per head / channel: the tensor bytes read are exactly the variant's tensor bytes
    # (identical aux/artifact files are read once, then come from the cache)
    assert half.stats.fetched + half.stats.cached == tensor_bytes(tmp_path / "s50") + files
    assert tensor_bytes(tmp_path / "s50") < 0.75 * tensor_bytes(expected("gqa", 0.1))
    third = pull(f"{reg}/m", tmp_path / "s30", sparsity=0.3, cache=cache)
    # nested: the 30% variant's chunks include the 50% variant's; only the difference is read
    assert third.stats.fetched == tensor_bytes(tmp_path / "s30") - tensor_bytes(tmp_path / "s50")
    assert third.stats.cached == tensor_bytes(tmp_path / "s50") + files
    again = pull(f"{reg}/m", tmp_path / "s30b", sparsity=0.3, cache=cache)
    assert again.stats.fetched == 0 and again.stats.requests == 0
    assert_same_dir(tmp_path / "s30b", expected("gqa", 0.3))


def test_damaged_cache_entry_is_fetched_again(models, expected, tmp_path):
    base, art = models["gqa"]
    reg = tmp_path / "reg"
    push(reg, art, base, name="m")
    cache = ChunkCache(tmp_path / "cache")
    pull(f"{reg}/m", tmp_path / "a", sparsity=0.3, cache=cache)
    entries = sorted((tmp_path / "cache").rglob("*"))
    victim = max((p for p in entries if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(b"\0" + victim.read_bytes()[1:])
    res = pull(f"{reg}/m", tmp_path / "b", sparsity=0.3, cache=cache)
    assert res.stats.fetched == victim.stat().st_size
    assert_same_dir(tmp_path / "b", expected("gqa", 0.3))


# --- versions and tags ----------------------------------------------------------------------------------

def test_tags_move_and_versions_stay(models, expected, tmp_path):
    (base, art0), (_, art1) = models["gqa"], models["gqa-seed1"]
    reg = tmp_path / "reg"
    store = open_store(reg)
    v0 = push(reg, art0, base, name="m").record
    v1 = push(reg, art1, base, name="m").record
    assert v0.digest != v1.digest
    assert resolve(store, parse_reference("m")).digest == v1.digest  # latest moved
    set_tag(store, Reference(None, "m", digest=v0.digest), "stable")
    pull(f"{reg}/m:stable", tmp_path / "stable", sparsity=0.3, cache=None)
    assert_same_dir(tmp_path / "stable", expected("gqa", 0.3))
    pull(f"{reg}/m:latest", tmp_path / "latest", sparsity=0.3, cache=None)
    assert_same_dir(tmp_path / "latest", expected("gqa-seed1", 0.3))
    set_tag(store, Reference(None, "m", tag="latest"), "stable")  # move stable to latest's version
    index = list_registry(store)
    assert index.models["m"].tags == {"latest": v1.digest, "stable": v1.digest}
    assert {v.digest for v in index.models["m"].versions} == {v0.digest, v1.digest}
    assert json.loads((reg / "index.json").read_text())["models"]["m"]["tags"]["stable"] == v1.digest


def test_unknown_name_tag_digest_are_clear_errors(models, tmp_path):
    base, art = models["gqa"]
    reg = tmp_path / "reg"
    push(reg, art, base, name="m", tag="v1")
    out = tmp_path / "out"
    with pytest.raises(NestpruneError, match=r"no model named 'nope' \(models there: m\)"):
        pull(f"{reg}/nope", out, sparsity=0.3)
    with pytest.raises(NestpruneError, match=r"m has no tag 'v2' \(its tags: latest, v1\)"):
        pull(f"{reg}/m:v2", out, sparsity=0.3)
    with pytest.raises(NestpruneError, match=r"m has no version sha256:abcdef"):
        pull(f"{reg}/m@sha256:abcdef", out, sparsity=0.3)
    with pytest.raises(NestpruneError, match=r"m has no version sha256:0000000000"):
        pull(f"{reg}/m@{'0' * 64}", out, sparsity=0.3)
    with pytest.raises(NestpruneError, match="beyond what this artifact ranked"):
        pull(f"{reg}/m", out, sparsity=0.95, cache=ChunkCache(tmp_path / "cache"))
    with pytest.raises(NestpruneError, match="not valid"):
        parse_reference(f"{reg}/Bad Name")
    assert not out.exists()


def test_parse_reference():
    assert parse_reference("s3://b/p/llama-3-8b:v2") == Reference("s3://b/p", "llama-3-8b", tag="v2")
    assert parse_reference("https://cdn.example/reg/m@sha256:ABCDEF12") == Reference(
        "https://cdn.example/reg", "m", digest="abcdef12")
    assert parse_reference("/data/reg/m") == Reference("/data/reg", "m")
    assert parse_reference("m:latest") == Reference(None, "m", tag="latest")
    assert parse_reference("localhost:8000/x/m:1.0").tag == "1.0"


# --- concurrency ----------------------------------------------------------------------------------------

def test_concurrent_pushes_of_one_model_are_both_intact(models, expected, tmp_path):
    (base, art0), (_, art1) = models["gqa"], models["gqa-seed1"]
    reg = tmp_path / "reg"
    jobs = [(art0, "a"), (art1, "b"), (art0, "c"), (art1, "d")]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda j: push(reg, j[0], base, name="m", tag=j[1]), jobs))
    assert results[0].record.digest == results[2].record.digest != results[1].record.digest
    index = list_registry(open_store(reg))
    assert len(index.models["m"].versions) == 2
    assert index.models["m"].tags["latest"] in {r.record.digest for r in results}
    for tag, key in (("c", "gqa"), ("d", "gqa-seed1")):
        pull(f"{reg}/m:{tag}", tmp_path / tag, sparsity=0.3, cache=None)
        assert_same_dir(tmp_path / tag, expected(key, 0.3))
    assert not list(reg.rglob("*.tmp"))


def test_eight_concurrent_pulls(models, expected, tmp_path, s3):
    base, art = models["gqa"]
    url = "s3://registry/concurrent"
    push(url, art, base, name="m")
    cache = ChunkCache(tmp_path / "cache")
    targets = [(0.1, "per-layer"), (0.3, "per-layer"), (0.5, "per-layer"), (0.3, "uniform")] * 2
    for s, layout in targets:
        expected("gqa", s, layout)

    def one(i: int):
        s, layout = targets[i]
        return pull(f"{url}/m", tmp_path / f"out{i}", sparsity=s, layout=layout, cache=cache)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for i, (s, layout) in enumerate(targets):
        assert_same_dir(tmp_path / f"out{i}", expected("gqa", s, layout))
    assert len({r.record.digest for r in results}) == 1


# --- damage ---------------------------------------------------------------------------------------------

def test_flipped_byte_in_a_chunk_is_detected_and_nothing_written(models, tmp_path):
    base, art = models["gqa"]
    reg = tmp_path / "reg"
    r = push(reg, art, base, name="m")
    manifest = read_manifest(open_store(reg), r.record.digest)
    entry = manifest.tensors["model.layers.2.self_attn.q_proj.weight"]
    blob = reg / blob_key(entry.blob)
    data = bytearray(blob.read_bytes())
    data[5] ^= 0x01  # inside chunk 0: the most important head, which every variant keeps
    blob.write_bytes(bytes(data))
    out = tmp_path / "variants" / "out"
    with pytest.raises(NestpruneError, match=r"chunk 0 of tensor model.layers.2.self_attn.q_proj.weight .* sha256"):
        pull(f"{reg}/m", out, sparsity=0.3, cache=ChunkCache(tmp_path / "cache"))
    assert not out.exists() and list((tmp_path / "variants").iterdir()) == []
    blob.unlink()
    with pytest.raises(NestpruneError, match="is missing; the registry is damaged"):
        pull(f"{reg}/m", out, sparsity=0.3, cache=ChunkCache(tmp_path / "cache"))
    assert not out.exists()


class _DyingStore(LocalStore):
    """Dies at the ``budget``-th write, or at the version record, like a push killed there."""

    def __init__(self, root: Path, budget: int | None = None):
        super().__init__(root)
        self.budget = budget

    def write(self, key: str, data: bytes) -> None:
        if self.budget == 0 or (self.budget is None and "/versions/" in key):
            raise KeyboardInterrupt
        if self.budget is not None:
            self.budget -= 1
        super().write(key, data)


def test_interrupted_push_leaves_no_visible_version(models, expected, tmp_path):
    base, art = models["gqa"]
    reg = tmp_path / "reg"
    push(reg, models["qwen2-group"][1], models["qwen2-group"][0], name="other")
    with pytest.raises(KeyboardInterrupt):  # half-way through the blobs
        push(None, art, base, name="m", store=_DyingStore(reg, budget=20))
    assert list(list_registry(open_store(reg)).models) == ["other"]
    with pytest.raises(NestpruneError, match="no model named 'm'"):
        pull(f"{reg}/m", tmp_path / "out", sparsity=0.3)
    with pytest.raises(KeyboardInterrupt):  # every blob and the manifest written, not the version record
        push(None, art, base, name="m", store=_DyingStore(reg))
    assert list(list_registry(open_store(reg)).models) == ["other"]
    assert not list(reg.rglob("*.tmp"))
    retry = push(reg, art, base, name="m")  # a retry reuses the uploaded blobs
    assert retry.bytes_written == 0 and retry.bytes_total > 0
    pull(f"{reg}/m", tmp_path / "out", sparsity=0.3, cache=None)
    assert_same_dir(tmp_path / "out", expected("gqa", 0.3))


# --- atomic outputs -----------------------------------------------------------------------------------------

def test_pull_never_replaces_the_registry_or_the_cache(models, expected, tmp_path):
    base, art = models["gqa"]
    reg = tmp_path / "reg"
    push(reg, art, base, name="m")
    cache = ChunkCache(tmp_path / "cache")
    pull(f"{reg}/m", tmp_path / "first", sparsity=0.3, cache=cache)
    for out in (reg, tmp_path / "cache", tmp_path):
        with pytest.raises(NestpruneError, match="the input"):
            pull(f"{reg}/m", out, sparsity=0.3, force=True, cache=cache)
    assert list_registry(open_store(reg)).models["m"]
    pull(f"{reg}/m", tmp_path / "again", sparsity=0.3, cache=None)
    assert_same_dir(tmp_path / "again", expected("gqa", 0.3))


def test_pull_second_writer_fails_at_once_and_force_swaps(models, expected, tmp_path):
    from nestprune.io import atomic

    base, art = models["gqa"]
    reg = tmp_path / "reg"
    push(reg, art, base, name="m")
    out = tmp_path / "variants" / "v"
    out.parent.mkdir()
    with atomic.lock(out), pytest.raises(NestpruneError, match="being written by another nestprune process"):
        pull(f"{reg}/m", out, sparsity=0.3, cache=None)
    assert list((tmp_path / "variants").iterdir()) == []  # no scratch directory, no lock file
    pull(f"{reg}/m", out, sparsity=0.5, cache=None)
    pull(f"{reg}/m", out, sparsity=0.3, cache=None, force=True)
    assert_same_dir(out, expected("gqa", 0.3))
    assert [p.name for p in (tmp_path / "variants").iterdir()] == ["v"]


def test_a_killed_push_or_pull_leaves_temporaries_the_next_run_sweeps(models, expected, tmp_path):
    from test_atomic import dead_pid

    from nestprune.io import atomic

    base, art = models["gqa"]
    reg, cache_dir = tmp_path / "reg", tmp_path / "cache"
    first = push(reg, art, base, name="m")
    manifest = read_manifest(open_store(reg), first.record.digest)
    blob = reg / blob_key(manifest.tensors["model.layers.1.mlp.up_proj.weight"].blob)
    pid = dead_pid()
    stale_blob = blob.with_name(f".{blob.name}.nestprune-tmp.{atomic.HOST}.{pid}.0a")
    stale_blob.write_bytes(b"half a blob")
    blob.unlink()  # as if the push had died writing it
    stale_scratch = tmp_path / f".v.nestprune-scratch.{atomic.HOST}.{pid}.0b"
    stale_scratch.mkdir()
    chunk = manifest.tensors["model.embed_tokens.weight"].chunks[0]
    stale_chunk = cache_dir / "sha256" / chunk[:2] / f".{chunk}.nestprune-tmp.{atomic.HOST}.{pid}.0c"
    stale_chunk.parent.mkdir(parents=True)
    stale_chunk.write_bytes(b"half a chunk")
    atomic._SWEPT.clear()  # as in a new process
    push(reg, art, base, name="m")
    assert blob.exists() and not stale_blob.exists()
    assert not [p for p in reg.rglob(".*") if "nestprune-" in p.name]
    res = pull(f"{reg}/m", tmp_path / "v", sparsity=0.3, cache=ChunkCache(cache_dir))
    assert res.variant_bytes == tensor_bytes(tmp_path / "v")
    assert not stale_scratch.exists() and not stale_chunk.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "reg", "v"]
    assert_same_dir(tmp_path / "v", expected("gqa", 0.3))


def test_registry_cache_and_pull_honour_the_umask(models, tmp_path):
    import os

    base, art = models["gqa"]
    old = os.umask(0o022)
    try:
        push(tmp_path / "reg", art, base, name="m")
        pull(f"{tmp_path / 'reg'}/m", tmp_path / "v", sparsity=0.3, cache=ChunkCache(tmp_path / "cache"))
    finally:
        os.umask(old)
    made = [*(tmp_path / "reg").rglob("*"), *(tmp_path / "cache").rglob("*"), tmp_path / "v",
            *(tmp_path / "v").iterdir()]
    assert {p.stat().st_mode & 0o777 for p in made if p.is_dir()} == {0o755}
    assert {p.stat().st_mode & 0o777 for p in made if p.is_file()} == {0o644}


def test_pull_with_another_writer_equals_materialize_with_it(models, tmp_path):
    from test_writers import write_single_file

    from nestprune.variant import writers

    base, art = models["qwen2-group"]
    push(tmp_path / "reg", art, base, name="m")
    entry = writers.register_writer(writers.Writer("safetensors-file", lambda: write_single_file, "one file"))
    try:
        materialize(art, base, tmp_path / "want.safetensors", sparsity=0.3, format="safetensors-file")
        pull(f"{tmp_path / 'reg'}/m", tmp_path / "got.safetensors", sparsity=0.3, cache=None,
             format="safetensors-file")
    finally:
        del writers.WRITERS[entry.name]
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()
    with pytest.raises(NestpruneError, match="unknown format"):
        pull(f"{tmp_path / 'reg'}/m", tmp_path / "x", sparsity=0.3, format="safetensors-file")
    assert not (tmp_path / "x").exists()


# --- schemas and CLI ------------------------------------------------------------------------------------

def test_registry_documents_round_trip(models, tmp_path):
    base, art = models["gqa"]
    r = push(tmp_path / "reg", art, base, name="m")
    store = open_store(tmp_path / "reg")
    man = read_manifest(store, r.record.digest)
    assert VersionManifestV1.model_validate_json(man.model_dump_json()) == man
    for doc, key in ((VersionRecord, f"models/m/versions/{r.record.digest}.json"),
                     (TagRecord, "models/m/tags/latest.json"), (RegistryIndex, "index.json")):
        d = doc.model_validate_json(store.read(key))
        assert doc.model_validate_json(d.model_dump_json()) == d
    assert sorted(man.orders["1"].mlp) == list(range(48))
    assert man.total_size == sum(e.size for e in man.tensors.values()) + sum(
        f.size for f in (*man.artifact.values(), *man.aux.values()))


def test_cli_push_list_tag_pull(models, expected, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from nestprune.cli.main import app

    monkeypatch.setenv("NESTPRUNE_CACHE", str(tmp_path / "cache"))
    base, art = models["gqa"]
    reg = tmp_path / "reg"
    runner = CliRunner()
    res = runner.invoke(app, ["push", str(art), "--base", str(base), str(reg), "--name", "m", "--tag", "v1"])
    assert res.exit_code == 0, res.output
    digest = resolve(open_store(reg), parse_reference("m:v1")).digest
    assert digest[:12] in res.output
    res = runner.invoke(app, ["tag", f"{reg}/m:v1", "prod"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["list", str(reg)])
    assert res.exit_code == 0 and "m" in res.output and digest[:12] in res.output and "prod" in res.output
    res = runner.invoke(app, ["pull", f"{reg}/m:prod", "--sparsity", "0.3", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert_same_dir(tmp_path / "out", expected("gqa", 0.3))
    res = runner.invoke(app, ["pull", f"{reg}/nope", "--sparsity", "0.3", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no model named 'nope'" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["pull", f"{reg}/m", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--sparsity or --params" in res.output
