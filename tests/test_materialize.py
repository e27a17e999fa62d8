"""materialize: the output directory, sharding, byte-identity across sources, safety, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_slicing import synthetic_ranking
from test_variant import model_arch, ranking_for, reference, write_variant
from typer.testing import CliRunner

import nestprune.variant.hf as hf
from nestprune.build import BuildConfig, build_artifact
from nestprune.errors import NestpruneError
from nestprune.io.weights import SafetensorsSource
from nestprune.schemas.variant import VARIANT_MANIFEST_NAME, VariantManifest
from nestprune.variant.hf import INDEX_NAME, safetensors_header
from nestprune.variant.load import load_variant
from nestprune.variant.materialize import materialize, materialize_variant
from nestprune.variant.widths import is_nested, plan_variant


def file_digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


class DictSource:
    """An in-memory TensorSource with its names in reverse order (as a registry might list them)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self):
        return list(reversed(self.tensors))

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return self.tensors[name].dtype

    def take(self, name, axis=0, index=None):
        t = self.tensors[name]
        return t if index is None else t.index_select(axis, index)


@pytest.fixture
def llama_gqa(tiny_model_dir):
    base = tiny_model_dir("llama-gqa")
    return base, ranking_for(base, "query", seed=9, prunable_layers=[1, 2])


def test_output_directory(llama_gqa, tmp_path):
    base, ranking = llama_gqa
    out = tmp_path / "v"
    spec = write_variant(base, ranking, out, 0.3, artifact_digest="sha256:" + "ab" * 32)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["config.json", "model.safetensors", VARIANT_MANIFEST_NAME, "tokenizer.json",
                            "tokenizer_config.json", "generation_config.json"])
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert h.metadata() == {"format": "pt"}
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((base / "config.json").read_text())
    assert cfg["num_attention_heads"] == base_cfg["num_attention_heads"]  # global config untouched
    widths = cfg["nestprune"]["layers"]
    assert [w["num_attention_heads"] for w in widths] == [k.num_heads for k in spec.layers]
    assert [w["intermediate_size"] for w in widths] == [k.intermediate_size for k in spec.layers]
    assert widths[1]["kv_of_head"] == spec.layers[1].kv_of_head.tolist()
    m = VariantManifest.model_validate_json((out / VARIANT_MANIFEST_NAME).read_text())
    assert m.artifact_digest == "sha256:" + "ab" * 32
    assert m.layers[2].channels == spec.layers[2].channels.tolist()
    assert m.achieved_sparsity == spec.achieved_sparsity >= 0.3
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_written_tensors_are_the_kept_rows_and_columns(llama_gqa, tmp_path):
    base, ranking = llama_gqa
    spec = write_variant(base, ranking, tmp_path / "v", 0.3)
    got, full = load_file(str(tmp_path / "v" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert set(got) == set(full)
    rows_q, ch = torch.from_numpy(spec.rows(1, "q")), torch.from_numpy(spec.rows(1, "mlp"))
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"], full["model.layers.1.self_attn.q_proj.weight"][rows_q])
    assert torch.equal(got["model.layers.1.self_attn.o_proj.weight"], full["model.layers.1.self_attn.o_proj.weight"][:, rows_q])
    assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], full["model.layers.1.mlp.down_proj.weight"][:, ch])
    assert torch.equal(got["model.embed_tokens.weight"], full["model.embed_tokens.weight"])
    assert got["model.layers.1.mlp.gate_proj.weight"].shape == (len(ch), 32)


def test_header_is_aligned_and_readable():
    plans = [hf.TensorPlan("b", 0, None, (3,), torch.float16), hf.TensorPlan("a", 0, None, (2, 2), torch.float32)]
    raw = safetensors_header(plans)
    assert len(raw) % 8 == 0 and raw[8:9] == b"{"
    header = json.loads(raw[8:])
    assert header["b"]["data_offsets"] == [0, 6] and header["a"]["data_offsets"] == [6, 22]


def test_sharded_output(tiny_model_dir, tmp_path):
    base = tiny_model_dir("qwen2")
    ranking = ranking_for(base, "query", seed=2, prunable_layers=[1, 2])
    spec = write_variant(base, ranking, tmp_path / "v", 0.25, shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "v").glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "v" / INDEX_NAME).read_text())
    sizes = {}
    for s in shards:
        for k, t in load_file(str(tmp_path / "v" / s)).items():
            assert index["weight_map"][k] == s
            sizes[k] = t.numel() * t.element_size()
    assert set(sizes) == set(index["weight_map"]) and index["metadata"]["total_size"] == sum(sizes.values())
    variant = load_variant(tmp_path / "v")
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        diff = (variant(input_ids=ids).logits - reference(base, spec, ranking)(input_ids=ids).logits).abs().max()
    assert diff <= 1e-5


def test_sharded_uniform_loads_with_from_pretrained(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("llama")
    ranking = ranking_for(base, "query", seed=2, prunable_layers=[1, 2])
    write_variant(base, ranking, tmp_path / "u", 0.3, "uniform", shard_bytes=30_000)
    assert (tmp_path / "u" / INDEX_NAME).exists()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "u"))
    assert model.model.layers[3].self_attn.q_proj.out_features < 32


def test_byte_identical_whatever_the_source(llama_gqa, tmp_path):
    base, ranking = llama_gqa
    spec = plan_variant(ranking, 0.35, "per-layer", multiple_of=4)
    with SafetensorsSource(base) as src:
        materialize_variant(src, ranking, spec, base, tmp_path / "a", shard_bytes=50_000)
    materialize_variant(DictSource(load_file(str(base / "model.safetensors"))), ranking, spec, base, tmp_path / "b",
                        shard_bytes=50_000)
    a, b = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert a == b and len([n for n in a if n.endswith(".safetensors")]) >= 2


def test_local_fast_paths_write_the_same_bytes_as_take(llama_gqa, tmp_path, monkeypatch):
    base, ranking = llama_gqa
    write_variant(base, ranking, tmp_path / "fast", 0.3, multiple_of=4)
    pieces = []
    real_spans = hf.FileSpans.spans
    monkeypatch.setattr(hf.FileSpans, "spans", lambda self, p: pieces.append(p.name) or real_spans(self, p))
    monkeypatch.setattr(hf.FileSpans, "columns", lambda self, p: None)  # columns through take()

    def unsupported(*a, **k):
        raise OSError("copy_file_range not supported")

    monkeypatch.setattr(hf.os, "copy_file_range", unsupported)
    write_variant(base, ranking, tmp_path / "slow", 0.3, multiple_of=4)
    assert "model.embed_tokens.weight" in pieces
    assert file_digests(tmp_path / "fast") == file_digests(tmp_path / "slow")


def test_row_runs():
    assert hf.row_runs(np.array([3, 4, 5, 9, 11, 12])) == [(3, 6), (9, 10), (11, 13)]
    assert hf.row_runs(np.array([], np.int64)) == []


def test_refuses_existing_out_and_force_replaces(llama_gqa, tmp_path):
    base, ranking = llama_gqa
    out = tmp_path / "v"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(NestpruneError, match="already exists"):
        write_variant(base, ranking, out, 0.2)
    assert (out / "keep.txt").read_text() == "mine"
    write_variant(base, ranking, out, 0.2, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path, "v") == []


def test_interrupted_write_leaves_nothing(llama_gqa, tmp_path, monkeypatch):
    base, ranking = llama_gqa
    calls = []
    real_write_all = hf.write_all

    def failing_write_all(fd, data):
        calls.append(len(data))
        if len(calls) == 5:  # midway: some shards and tensors are already on disk
            raise KeyboardInterrupt
        return real_write_all(fd, data)

    monkeypatch.setattr(hf, "write_all", failing_write_all)
    with pytest.raises(KeyboardInterrupt):
        write_variant(base, ranking, tmp_path / "v", 0.3, shard_bytes=20_000)
    assert len(calls) == 5
    assert not (tmp_path / "v").exists() and leftovers(tmp_path, "v") == []
    # and through take() (a registry's source): the same
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        materialize_variant(DictSource(load_file(str(base / "model.safetensors"))), ranking,
                            plan_variant(ranking, 0.3), base, tmp_path / "w", shard_bytes=20_000)
    assert not (tmp_path / "w").exists() and leftovers(tmp_path, "w") == []


def test_force_replaces_with_no_moment_where_out_is_missing(llama_gqa, tmp_path, monkeypatch):
    from test_atomic import record_states

    base, ranking = llama_gqa
    out = tmp_path / "v"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def state() -> str:
        names = set(os.listdir(out)) if out.is_dir() else set()
        return "old" if names == {"keep.txt"} else "new" if "model.safetensors" in names else f"broken {names}"

    seen = record_states(monkeypatch, state)
    write_variant(base, ranking, out, 0.2, force=True)
    assert seen and set(seen) <= {"old", "new"} and seen[0] == "old" and seen[-1] == "new", seen
    assert leftovers(tmp_path, "v") == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_variant_honours_the_umask_like_cp(llama_gqa, tmp_path, mask):
    base, ranking = llama_gqa
    old = os.umask(mask)
    try:
        write_variant(base, ranking, tmp_path / "v", 0.2)
    finally:
        os.umask(old)
    assert (tmp_path / "v").stat().st_mode & 0o777 == 0o777 & ~mask
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "v").iterdir()} == {0o666 & ~mask}


def test_a_second_writer_to_the_same_out_fails_at_once(llama_gqa, tmp_path):
    from nestprune.io import atomic

    base, ranking = llama_gqa
    out = tmp_path / "v"
    with atomic.lock(out), pytest.raises(NestpruneError, match="being written by another nestprune process"):
        write_variant(base, ranking, out, 0.2)
    assert not out.exists() and leftovers(tmp_path, "v") == []
    write_variant(base, ranking, out, 0.2)  # once the first writer is done
    assert leftovers(tmp_path, "v") == []


def test_stale_temporaries_of_a_killed_writer_are_swept(llama_gqa, tmp_path):
    from test_atomic import dead_pid

    from nestprune.io import atomic

    base, ranking = llama_gqa
    stale = tmp_path / f".v.nestprune-tmp.{atomic.HOST}.{dead_pid()}.0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    write_variant(base, ranking, tmp_path / "v", 0.2)
    assert leftovers(tmp_path, "v") == []


def test_source_returning_wrong_shape_is_refused(llama_gqa, tmp_path):
    base, ranking = llama_gqa
    tensors = load_file(str(base / "model.safetensors"))

    class Liar(DictSource):
        def take(self, name, axis=0, index=None):
            return self.tensors[name]  # ignores the index

    spec = plan_variant(ranking, 0.3)
    with pytest.raises(NestpruneError, match="expected"):
        materialize_variant(Liar(tensors), ranking, spec, base, tmp_path / "v")
    assert not (tmp_path / "v").exists() and leftovers(tmp_path, "v") == []


def test_spec_from_another_ranking_is_refused(llama_gqa, tmp_path):
    base, ranking = llama_gqa
    other = synthetic_ranking(model_arch(base), "group", seed=1)
    with SafetensorsSource(base) as src, pytest.raises(NestpruneError, match="not planned from this ranking"):
        materialize_variant(src, ranking, plan_variant(other, 0.2), base, tmp_path / "v")


# --- end to end: a real artifact ----------------------------------------------------------------------------

@pytest.fixture
def built(tiny_model_dir, sample_text_file, tmp_path):
    base = tiny_model_dir("mistral")
    cfg = BuildConfig(method="random", samples=2, seq_len=8, batch_size=2, max_sparsity=0.5)
    return base, build_artifact(base, sample_text_file, tmp_path / "art", cfg)


def test_artifact_honours_the_umask_and_never_replaces_its_base(tiny_model_dir, sample_text_file, tmp_path):
    base = tiny_model_dir("llama")
    cfg = BuildConfig(method="random", samples=2, seq_len=8, batch_size=2, max_sparsity=0.5)
    old = os.umask(0o022)
    try:
        art = build_artifact(base, sample_text_file, tmp_path / "art", cfg)
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in (art, *art.rglob("*")) if p.is_dir()} == {0o755}
    before = file_digests(base)
    for out in (base, tmp_path):
        with pytest.raises(NestpruneError, match="the input"):
            build_artifact(base, sample_text_file, out, cfg, force=True)
    assert file_digests(base) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "art", "calib.txt", "llama-0"]


def test_materialize_from_artifact_nested_and_verified(built, tmp_path):
    base, art = built
    r1 = materialize(art, base, tmp_path / "v1", sparsity=0.15, verify=True)
    r2 = materialize(art, base, tmp_path / "v2", sparsity=0.3, verify=True, full_check=True)
    assert r1.max_abs_diff is not None and r1.max_abs_diff <= 1e-5 and r2.max_abs_diff <= 1e-5
    assert is_nested(r1.spec, r2.spec) and r2.spec.kept_decoder_params < r1.spec.kept_decoder_params
    m1 = VariantManifest.model_validate_json((tmp_path / "v1" / VARIANT_MANIFEST_NAME).read_text())
    from nestprune.artifact import read_manifest

    am = read_manifest(art)
    assert m1.artifact_digest == am.digest() and m1.base == am.base
    u = materialize(art, base, tmp_path / "u", sparsity=0.3, layout="uniform", multiple_of=8, verify=True)
    assert all(k.intermediate_size % 8 == 0 for k in u.spec.layers)


def test_params_target_from_artifact(built, tmp_path):
    base, art = built
    total = sum(t.numel() for t in load_file(str(base / "model.safetensors")).values())
    r = materialize(art, base, tmp_path / "v", params=int(total * 0.85))
    assert r.spec.total_params <= int(total * 0.85) and r.manifest.requested_params == int(total * 0.85)
    with pytest.raises(NestpruneError, match="exactly one target"):
        materialize(art, base, tmp_path / "w", sparsity=0.1, params=10)


def test_out_of_range_sparsity(built, tmp_path):
    base, art = built
    with pytest.raises(NestpruneError, match="beyond what this artifact ranked"):
        materialize(art, base, tmp_path / "v", sparsity=0.95)
    assert not (tmp_path / "v").exists()


def test_fingerprint_mismatch(built, tmp_path, tiny_model_dir):
    base, art = built
    other = tiny_model_dir("mistral", seed=1)  # same config, other weights: same sizes, other sha256
    with pytest.raises(NestpruneError, match="39 of 39 tensors hold other values"):  # the default check tells
        materialize(art, other, tmp_path / "fast", sparsity=0.1)
    with pytest.raises(NestpruneError, match="sha256 differs"):
        materialize(art, other, tmp_path / "full", sparsity=0.1, full_check=True)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NestpruneError, match="config.json differs"):
        materialize(art, other, tmp_path / "cfg", sparsity=0.1)
    assert not any((tmp_path / n).exists() for n in ("fast", "full", "cfg"))


def test_force_never_replaces_an_input(built, tmp_path):
    base, art = built

    def tree(d: Path) -> dict[str, str]:
        return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}

    before = tree(tmp_path)
    for out in (base, art, tmp_path):
        with pytest.raises(NestpruneError, match="the input"):
            materialize(art, base, out, sparsity=0.2, force=True)
    assert tree(tmp_path) == before


def test_a_missing_artifact_creates_no_directories(built, tmp_path):
    base, _ = built
    with pytest.raises(NestpruneError, match="not a nestprune artifact"):
        materialize(tmp_path / "nope", base, tmp_path / "new" / "deeper" / "v", sparsity=0.2)
    assert not (tmp_path / "new").exists()


def test_verify_needs_a_format_load_variant_reads(built, tmp_path, monkeypatch):
    from nestprune.variant import writers

    monkeypatch.setitem(writers.WRITERS, "opaque", writers.Writer("opaque", lambda: None, "test"))
    base, art = built
    with pytest.raises(NestpruneError, match="--verify .* cannot read --format opaque"):
        materialize(art, base, tmp_path / "v", sparsity=0.2, verify=True, format="opaque")
    with pytest.raises(NestpruneError, match="unknown format 'gguf2' \\(use hf"):
        materialize(art, base, tmp_path / "v", sparsity=0.2, format="gguf2")
    assert not (tmp_path / "v").exists()


SIGTERM_CHILD = """
import sys, time, pathlib
import nestprune.variant.hf as hf
real, calls = hf.write_all, []

def slow(fd, data):
    real(fd, data)
    calls.append(1)
    if len(calls) == 3:  # mid-write
        pathlib.Path(sys.argv[1]).write_text("writing")
        time.sleep(120)

hf.write_all = slow
from nestprune.cli.main import app
app(sys.argv[2:], prog_name="nestprune")
"""


@pytest.mark.parametrize("signum,code,word", [(15, 143, "terminated"), (2, 130, "interrupted")])
def test_sigterm_or_sigint_during_cli_materialize_leaves_nothing(built, tmp_path, signum, code, word):
    import subprocess
    import sys
    import time

    base, art = built
    out, marker = tmp_path / "variants" / "v", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(marker), "materialize", str(art), "--base",
                              str(base), "--sparsity", "0.3", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        assert any(p.name.startswith(".v.nestprune-tmp.") for p in out.parent.iterdir())
        child.send_signal(signum)  # SIGTERM or SIGINT (Ctrl-C)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == code, err
    assert word in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_cli_refuses_a_second_writer_and_an_input_with_one_line(built, tmp_path):
    from nestprune.cli.main import app
    from nestprune.io import atomic

    base, art = built
    runner = CliRunner()
    with atomic.lock(tmp_path / "v"):
        res = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", "0.3",
                                  "--out", str(tmp_path / "v")])
    assert res.exit_code == 2 and res.output.startswith("error:") and "being written" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", "0.3",
                              "--out", str(base), "--force"])
    assert res.exit_code == 2 and res.output.startswith("error:") and "the input" in res.output
    assert (base / "model.safetensors").exists()


def test_cli_choices_come_from_the_registries():
    from nestprune.cli.materialize import FormatChoice, LayoutChoice
    from nestprune.variant.widths import WIDTH_POLICIES
    from nestprune.variant.writers import WRITERS

    assert [c.value for c in LayoutChoice] == list(WIDTH_POLICIES) == ["per-layer", "uniform"]
    assert [c.value for c in FormatChoice] == list(WRITERS) == ["hf", "gguf"]


# --- CLI ----------------------------------------------------------------------------------------------------

def test_cli_materialize(built, tmp_path):
    from nestprune.cli.main import app

    base, art = built
    runner = CliRunner()
    res = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", "0.3",
                              "--out", str(tmp_path / "v"), "--layout", "uniform", "--verify"])
    assert res.exit_code == 0, res.output
    assert "requested sparsity 0.3000" in res.output and "achieved" in res.output
    assert "verified" in res.output
    m = VariantManifest.model_validate_json((tmp_path / "v" / VARIANT_MANIFEST_NAME).read_text())
    assert m.layout == "uniform" and f"{m.total_params:,}" in res.output

    res = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", "0.3",
                              "--out", str(tmp_path / "v")])
    assert res.exit_code == 2 and "already exists" in res.output and "Traceback" not in res.output

    res = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--params", "20K",
                              "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "error:" in res.output

    total = sum(t.numel() for t in load_file(str(base / "model.safetensors")).values())
    res = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--params", f"{total * 0.9 / 1e3:.1f}K",
                              "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p" / "config.json").exists()


def test_parse_params():
    from nestprune.cli.materialize import parse_params

    assert parse_params("4.5B") == 4_500_000_000
    assert parse_params("120M") == 120_000_000
    assert parse_params("1200") == 1200
    assert parse_params("3k") == 3000
    with pytest.raises(NestpruneError):
        parse_params("lots")


def test_variant_manifest_round_trip_and_exported_schema(llama_gqa, tmp_path):
    from pydantic import ValidationError

    from nestprune.schemas.export import HERE, render

    base, ranking = llama_gqa
    write_variant(base, ranking, tmp_path / "v", 0.3, requested_params=12345)
    text = (tmp_path / "v" / VARIANT_MANIFEST_NAME).read_text()
    m = VariantManifest.model_validate_json(text)
    assert json.loads(m.model_dump_json()) == json.loads(text)
    assert m.schema_version == "1" and m.kind == "nestprune.variant" and m.requested_params == 12345
    with pytest.raises(ValidationError):
        VariantManifest.model_validate({**json.loads(text), "schema_version": "2"})
    assert (HERE / "variant.schema.json").read_text() == render(VariantManifest)
