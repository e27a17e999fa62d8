"""Artifact format, schemas, calibration input, the build/inspect CLI and every build error path."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import nestprune.schemas as schemas
from nestprune.artifact import MANIFEST_KEY, parse_manifest, read_artifact, read_manifest
from nestprune.build import BuildConfig, build_artifact
from nestprune.cli.main import app
from nestprune.errors import NestpruneError
from nestprune.io.text import read_documents
from nestprune.rank.calibration import sample_windows
from nestprune.schemas.artifact import ArtifactManifest
from nestprune.schemas.export import documents, render

runner = CliRunner()
SCHEMA_DIR = Path(schemas.__file__).parent
FAST = BuildConfig(samples=4, seq_len=16, batch_size=2, steps=4)


@pytest.fixture
def artifact(tiny_model_dir, sample_text_file, tmp_path):
    return build_artifact(tiny_model_dir("llama-gqa"), sample_text_file, tmp_path / "art", FAST)


def test_manifest_round_trip_and_json_schema(artifact):
    m, ranking = read_artifact(artifact)
    dumped = m.model_dump(mode="json")
    assert ArtifactManifest.model_validate_json(json.dumps(dumped)) == m
    schema = json.loads((SCHEMA_DIR / "artifact.schema.json").read_text())
    jsonschema.validate(dumped, schema)
    assert m.ranking.num_structures == len(ranking)
    assert m.digest().startswith("sha256:") and m.digest() == parse_manifest(dumped).digest()
    assert [t.step for t in m.trajectory] == list(range(m.schedule.steps_run))


def test_committed_json_schemas_are_current():
    for stem, model in documents().items():
        path = SCHEMA_DIR / f"{stem}.schema.json"
        assert path.exists(), f"{path} missing: run `make schemas`"
        assert path.read_text() == render(model), f"{path} is stale: run `make schemas`"


def test_unknown_schema_version_refused(artifact):
    g = zarr.open_group(str(artifact), mode="r+")
    data = dict(g.attrs[MANIFEST_KEY])
    data["schema_version"] = "99"
    g.attrs[MANIFEST_KEY] = data
    with pytest.raises(NestpruneError, match="schema version '99' is not supported"):
        read_manifest(artifact)


def test_corrupt_ranking_detected(artifact):
    g = zarr.open_group(str(artifact), mode="r+")
    idx = g["ranking/index"][:]
    idx[0], idx[1] = idx[1], idx[0] + 1
    g["ranking/index"][:] = idx
    with pytest.raises(NestpruneError, match="corrupt"):
        read_artifact(artifact)


def test_not_an_artifact(tmp_path):
    with pytest.raises(NestpruneError, match="not a nestprune artifact"):
        read_artifact(tmp_path)


def test_calibration_formats(tmp_path, tokenizer):
    docs = ["first doc line\nmore", "second doc", "third"]
    (tmp_path / "a.txt").write_text("first doc line\nmore\n<|doc|>\nsecond doc\n<|doc|>\nthird\n")
    with lzma.open(tmp_path / "a.txt.xz", "wt") as f:
        f.write((tmp_path / "a.txt").read_text())
    (tmp_path / "b.txt").write_text("first doc line\nmore\n\nsecond doc\n\n\nthird\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    for name in ("a.txt", "a.txt.xz", "b.txt", "c.jsonl"):
        assert read_documents(tmp_path / name) == docs, name
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(NestpruneError, match="bad.jsonl:2"):
        read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(NestpruneError, match="no string field 'text'"):
        read_documents(tmp_path / "notext.jsonl")


def test_windows_seeded():
    import torch

    stream = torch.arange(1000)
    a, b, c = sample_windows(stream, 5, 10, 0), sample_windows(stream, 5, 10, 0), sample_windows(stream, 5, 10, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows
    with pytest.raises(NestpruneError, match="fewer than one window"):
        sample_windows(torch.arange(5), 1, 10, 0)


# ----------------------------------------------------------------------------- error paths


def _err(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _build_cli(model_dir, data, out, *extra):
    return runner.invoke(app, ["build", str(model_dir), "--data", str(data), "--out", str(out), "--samples", "4",
                               "--seq-len", "16", "--batch-size", "2", "--steps", "3", *extra])


def test_cli_build_and_inspect(tiny_model_dir, sample_text_file, tmp_path):
    model_dir = tiny_model_dir("llama")
    r = _build_cli(model_dir, sample_text_file, tmp_path / "art")
    assert r.exit_code == 0, r.output
    assert "structures ranked" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "art")])
    assert r.exit_code == 0, r.output
    assert "kept heads/channels per layer" in r.output and "achieved" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "art"), "--levels", "0.05,0.1"])
    assert r.exit_code == 0 and "10%" in r.output


@pytest.mark.parametrize("case", ["missing_model", "unsupported", "bin_only", "missing_data", "empty_data",
                                  "short_data", "bad_option", "exists", "bad_method", "dir_data"])
def test_cli_build_errors(case, tiny_model_dir, sample_text_file, tmp_path):
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "art"
    data = sample_text_file
    extra: list[str] = []
    if case == "missing_model":
        model_dir = tmp_path / "nope"
        expect = "does not exist"
    elif case == "unsupported":
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (model_dir / "config.json").write_text(json.dumps(cfg))
        expect = "not supported; nestprune supports: llama, mistral, qwen2, qwen3"
    elif case == "bin_only":
        (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
        expect = "never unpickles"
    elif case == "missing_data":
        data = tmp_path / "nope.txt"
        expect = "does not exist"
    elif case == "empty_data":
        data = tmp_path / "empty.txt"
        data.write_text("\n\n")
        expect = "holds no text"
    elif case == "short_data":
        data = tmp_path / "short.txt"
        data.write_text("tiny")
        expect = "fewer than one window"
    elif case == "bad_option":
        extra = ["--max-sparsity", "1.5"]
        r = _build_cli(model_dir, data, out, *extra)
        assert r.exit_code != 0 and "Traceback" not in r.output and not out.exists()
        return
    elif case == "exists":
        out.mkdir()
        expect = "already exists; pass --force"
    elif case == "bad_method":
        extra = ["--method", "obs"]
        expect = "--method must be one of"
    elif case == "dir_data":
        data = tmp_path
        expect = "is a directory"
    line = _err(_build_cli(model_dir, data, out, *extra))
    assert expect in line
    if case != "exists":
        assert not out.exists()
    assert not list(tmp_path.glob(".art.*"))  # no temporary leftovers


def test_out_may_not_be_an_input(tiny_model_dir, sample_text_file, tmp_path):
    model_dir = tiny_model_dir("llama")
    for out, what in ((model_dir, "is the input"), (tmp_path, "holds the input"), (sample_text_file, "is the input")):
        line = _err(_build_cli(model_dir, sample_text_file, out, "--force"))
        assert f"--out {out} {what}" in line
    assert (model_dir / "model.safetensors").exists() and sample_text_file.exists()


def test_interrupted_build_leaves_nothing(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    import nestprune.artifact as artifact_mod

    real = artifact_mod.zarr.open_group

    def boom(*a, **k):
        g = real(*a, **k)
        if k.get("mode") == "w":
            g.create_array("ranking/partial", data=np.zeros(3))
            raise KeyboardInterrupt
        return g

    monkeypatch.setattr(artifact_mod.zarr, "open_group", boom)
    r = _build_cli(tiny_model_dir("llama"), sample_text_file, tmp_path / "art")
    assert r.exit_code == 130 and "interrupted" in r.output
    # nothing half-written: no artifact, no temporary; the build's last complete checkpoint (all 3 steps) is
    # kept beside --out for --resume (tests/test_resume.py), and the message says so
    assert not (tmp_path / "art").exists() and [p.name for p in tmp_path.glob(".art.*")] == [".art.nestprune-resume"]
    assert sorted(p.name for p in (tmp_path / ".art.nestprune-resume").iterdir()) == \
        ["checkpoint.json", "state-000003.safetensors"]
    assert "the checkpoint after 3 of 3 step(s) is kept" in " ".join(r.output.split())


def test_force_replaces(tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "junk").write_text("x")
    r = _build_cli(tiny_model_dir("llama"), sample_text_file, out, "--force")
    assert r.exit_code == 0, r.output
    assert not (out / "junk").exists() and (out / "zarr.json").exists()
    assert not list(tmp_path.glob("art.old-nestprune"))


def test_cli_build_margin_objective_recorded(tiny_model_dir, tmp_path):
    items = [{"prompt": f"the kernel{i} maps", "choices": ["page", "file", "python"], "answer": i % 3}
             for i in range(6)]
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in items) + "\n")
    r = runner.invoke(app, ["build", str(tiny_model_dir("llama")), "--data", str(data), "--out", str(tmp_path / "a"),
                            "--objective", "margin", "--steps", "2", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    m, _ = read_artifact(tmp_path / "a")
    assert m.objective.name == "margin"
    assert m.objective.provenance["sha256"] == __import__("hashlib").sha256(data.read_bytes()).hexdigest()
    r = runner.invoke(app, ["build", str(tiny_model_dir("llama")), "--data", str(data), "--out", str(tmp_path / "b"),
                            "--objective", "nope"])
    assert "unknown objective 'nope'" in _err(r)
