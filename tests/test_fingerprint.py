"""The base's content fingerprint: any changed tensor is refused by materialize, push and pull; an edited
``arch`` is refused; old (schema 1) artifacts still materialize with the old check and say so."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import SAMPLE_TEXT, make_tiny_model, save_tiny_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nestprune.artifact import MANIFEST_KEY, read_manifest
from nestprune.build import BuildConfig, build_artifact
from nestprune.cli.main import app
from nestprune.errors import NestpruneError
from nestprune.io import fingerprint as fp
from nestprune.variant.materialize import materialize

runner = CliRunner()
LAYER = "model.layers.2"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """A mistral base (GQA, untied) and its artifact (random method: fast)."""
    tmp = tmp_path_factory.mktemp("fingerprint")
    base = save_tiny_model(make_tiny_model("mistral", vocab_size=len(tokenizer)), tokenizer, tmp / "base")
    (tmp / "calib.txt").write_text(SAMPLE_TEXT)
    cfg = BuildConfig(method="random", samples=2, seq_len=8, batch_size=2, max_sparsity=0.5)
    return base, build_artifact(base, tmp / "calib.txt", tmp / "art", cfg)


def edited_copy(base: Path, into: Path, edit) -> Path:
    """A copy of ``base`` whose tensors went through ``edit(dict)`` (same names, shapes, dtypes, files)."""
    shutil.copytree(base, into)
    tensors = load_file(str(base / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(into / "model.safetensors"), metadata={"format": "pt"})
    return into


def full_finetune(t):
    g = torch.Generator().manual_seed(1)
    for k in t:
        t[k] = t[k] + 1e-3 * torch.randn(t[k].shape, generator=g)


def partial_finetune(t):  # the MLP of one layer only
    for k in (f"{LAYER}.mlp.up_proj.weight", f"{LAYER}.mlp.down_proj.weight"):
        t[k] = t[k] * 1.01


def merged_adapter(t):  # W += B @ A (rank 2) on q_proj and v_proj of one layer, as merging a LoRA does
    g = torch.Generator().manual_seed(2)
    for k in (f"{LAYER}.self_attn.q_proj.weight", f"{LAYER}.self_attn.v_proj.weight"):
        out_f, in_f = t[k].shape
        t[k] = t[k] + 1e-2 * torch.randn(out_f, 2, generator=g) @ torch.randn(2, in_f, generator=g)


def one_row(t):
    t[f"{LAYER}.mlp.gate_proj.weight"][17] += 1e-4


def one_bit(t):  # the lowest mantissa bit of one element of one tensor
    w = t["model.norm.weight"]
    w.view(torch.int32)[5] ^= 1


def swapped_rows(t):  # a permutation: same multiset of values, other order
    w = t["model.embed_tokens.weight"]
    w[[3, 4]] = w[[4, 3]]


EDITS = {"full fine-tune": (full_finetune, "39 of 39"), "partial fine-tune": (partial_finetune, "2 of 39"),
         "merged adapter": (merged_adapter, "2 of 39"), "one row": (one_row, "1 of 39"),
         "one bit": (one_bit, "1 of 39"), "swapped rows": (swapped_rows, "1 of 39")}


@pytest.mark.parametrize("case", list(EDITS))
def test_same_shape_other_weights_is_refused_by_default(built, tmp_path, case):
    base, art = built
    edit, count = EDITS[case]
    other = edited_copy(base, tmp_path / "other", edit)
    assert (other / "model.safetensors").stat().st_size == (base / "model.safetensors").stat().st_size
    with pytest.raises(NestpruneError, match=f"is not the model this artifact was built from: {count} tensors hold "
                                             "other values"):
        materialize(art, other, tmp_path / "v", sparsity=0.2)
    assert not (tmp_path / "v").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_the_message_names_the_tensor_that_differs(built, tmp_path):
    base, art = built
    other = edited_copy(base, tmp_path / "other", one_row)
    with pytest.raises(NestpruneError, match=f"\\({LAYER}.mlp.gate_proj.weight\\); same shapes, other weights"):
        fp.check_base(other, read_manifest(art))


def test_the_right_base_passes_and_any_file_layout_of_it_too(built, tmp_path, tokenizer):
    base, art = built
    m = read_manifest(art)
    assert m.schema_version == "2" and m.base.content is not None
    assert set(m.base.content.tensors) == set(load_file(str(base / "model.safetensors")))
    assert fp.check_base(base, m) == fp.BaseCheck.CONTENT
    assert fp.check_base(base, m, full=True) == fp.BaseCheck.FILES
    # the same weights saved in three shards: the same content, other files
    resharded = tmp_path / "resharded"
    shutil.copytree(base, resharded)
    (resharded / "model.safetensors").unlink()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(base)).save_pretrained(str(resharded), max_shard_size="40KB")
    assert len(list(resharded.glob("model-*.safetensors"))) >= 3
    assert fp.content_fingerprint(resharded) == m.base.content
    assert fp.check_base(resharded, m) == fp.BaseCheck.CONTENT
    with pytest.raises(NestpruneError, match="weight files differ"):
        fp.check_base(resharded, m, full=True)


def test_dtype_or_shape_changes_are_named(built, tmp_path):
    base, art = built
    m = read_manifest(art)

    def to_bf16(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.bfloat16)

    other = edited_copy(base, tmp_path / "bf16", to_bf16)
    with pytest.raises(NestpruneError, match="tensor model.norm.weight is BF16 \\[32\\] there, F32 \\[32\\] in the "
                                             "artifact's base"):
        fp.check_base(other, m)

    def extra(t):
        t["extra.weight"] = torch.zeros(2)

    with pytest.raises(NestpruneError, match="has 1 tensor\\(s\\) the artifact's base has not: extra.weight"):
        fp.check_base(edited_copy(base, tmp_path / "extra", extra), m)


def test_digest_of_a_tensor_in_memory_equals_its_digest_on_disk(built):
    base, art = built
    content = read_manifest(art).base.content
    tensors = load_file(str(base / "model.safetensors"))
    for name, t in tensors.items():
        assert fp.digest_tensor(t, content.block_bytes) == content.tensors[name].digest
    # blocks smaller than a tensor: the digest changes with the block size, never with the reading
    small = fp.content_fingerprint(base, block_bytes=1000, threads=3)
    name = "model.embed_tokens.weight"
    assert small.tensors[name].digest == fp.digest_tensor(tensors[name], 1000) != content.tensors[name].digest


def test_every_bit_of_a_tensor_counts(built):
    t = load_file(str(built[0] / "model.safetensors"))["model.layers.1.self_attn.o_proj.weight"]
    ref = fp.digest_tensor(t, 256)
    raw = t.clone().view(torch.uint8).reshape(-1)
    rng = np.random.default_rng(0)
    for pos in rng.choice(raw.numel(), 64, replace=False):
        for bit in (0, 7):
            flipped = raw.clone()
            flipped[int(pos)] ^= 1 << bit
            assert fp.digest_tensor(flipped.view(torch.float32).reshape(t.shape), 256) != ref


# --- old artifacts --------------------------------------------------------------------------------------------

def as_schema_1(art: Path, into: Path) -> Path:
    """A copy of ``art`` as nestprune wrote it before content fingerprints (schema version 1)."""
    shutil.copytree(art, into)
    g = zarr.open_group(str(into), mode="r+")
    data = dict(g.attrs[MANIFEST_KEY])
    data["schema_version"] = "1"
    data["base"] = {k: v for k, v in data["base"].items() if k != "content"}
    g.attrs[MANIFEST_KEY] = data
    return into


def test_schema_1_artifact_materializes_with_the_old_check_and_says_so(built, tmp_path):
    base, art = built
    old = as_schema_1(art, tmp_path / "old-art")
    m = read_manifest(old)
    assert m.schema_version == "1" and m.base.content is None
    assert "content" not in m.model_dump(mode="json")["base"]  # its digest is what it always was
    res = materialize(old, base, tmp_path / "v", sparsity=0.2)
    assert res.base_check == "sizes"
    r = runner.invoke(app, ["materialize", str(old), "--base", str(base), "--sparsity", "0.2",
                            "--out", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "predates content fingerprints" in r.output and "--full-check" in r.output
    r = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", "0.2",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 0 and "predates" not in r.output
    # the old check cannot see other weights; --full-check can
    other = edited_copy(base, tmp_path / "other", one_row)
    assert materialize(old, other, tmp_path / "y", sparsity=0.2).base_check == "sizes"
    with pytest.raises(NestpruneError, match="sha256 differs"):
        materialize(old, other, tmp_path / "z", sparsity=0.2, full_check=True)


def test_schema_versions_and_content_go_together(built):
    from pydantic import ValidationError

    from nestprune.schemas.artifact import ArtifactManifest

    data = read_manifest(built[1]).model_dump(mode="json")
    with pytest.raises(ValidationError, match="base.content is required in schema version 2"):
        ArtifactManifest.model_validate({**data, "base": {k: v for k, v in data["base"].items() if k != "content"}})
    with pytest.raises(ValidationError, match="absent in version 1"):
        ArtifactManifest.model_validate({**data, "schema_version": "1"})


# --- an edited manifest arch -----------------------------------------------------------------------------------

ARCH_EDITS = {"num_kv_heads": 1, "tie_word_embeddings": True, "decoder_params": 12345, "family": "qwen2",
              "vocab_size": 100, "present_optional": ["self_attn.q_proj.bias"]}


@pytest.mark.parametrize("key", list(ARCH_EDITS))
def test_an_edited_arch_is_refused_with_one_line(built, tmp_path, key):
    base, art = built
    edited = tmp_path / "edited"
    shutil.copytree(art, edited)
    g = zarr.open_group(str(edited), mode="r+")
    data = dict(g.attrs[MANIFEST_KEY])
    data["arch"] = {**data["arch"], key: ARCH_EDITS[key]}
    g.attrs[MANIFEST_KEY] = data
    r = runner.invoke(app, ["materialize", str(edited), "--base", str(base), "--sparsity", "0.2",
                            "--out", str(tmp_path / "v")])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert f"manifest says {key} = " in lines[0] and "the artifact is not of this base (an edited manifest, or another model)" in lines[0]
    assert not (tmp_path / "v").exists()


# --- push and pull --------------------------------------------------------------------------------------------

def test_push_refuses_other_weights_before_writing_anything(built, tmp_path):
    from nestprune.registry import push

    base, art = built
    other = edited_copy(base, tmp_path / "other", merged_adapter)
    reg = tmp_path / "reg"
    with pytest.raises(NestpruneError, match="2 of 39 tensors hold other values"):
        push(reg, art, other, name="m")
    assert not reg.exists() or not any(p.is_file() for p in reg.rglob("*"))


def test_pull_refuses_a_registry_copy_of_other_weights(built, tmp_path, monkeypatch):
    from nestprune.registry import push
    from nestprune.registry.pull import pull

    push_module = sys.modules["nestprune.registry.push"]

    base, art = built
    other = edited_copy(base, tmp_path / "other", full_finetune)
    reg = tmp_path / "reg"
    # a version published without the check (as nestprune did before content fingerprints)
    monkeypatch.setattr(push_module, "check_base", lambda *a, **k: None)
    push(reg, art, other, name="m")
    monkeypatch.undo()
    with pytest.raises(NestpruneError, match="does not hold what the artifact's base held"):
        pull(f"{reg}/m", tmp_path / "v", sparsity=0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "reg"]
    # the right weights pull fine, byte for byte what materialize writes
    push(reg, art, base, name="good")
    pull(f"{reg}/good", tmp_path / "v", sparsity=0.2)
    materialize(art, base, tmp_path / "w", sparsity=0.2)
    for f in (tmp_path / "w").iterdir():
        assert (tmp_path / "v" / f.name).read_bytes() == f.read_bytes()


def test_pull_refuses_stored_tensors_that_are_not_the_fingerprinted_ones(built, tmp_path, monkeypatch):
    from nestprune.registry import push
    from nestprune.registry.pull import pull

    base, art = built

    def drop_a_tensor(t):
        del t["model.norm.weight"]

    trimmed = edited_copy(base, tmp_path / "trimmed", drop_a_tensor)
    push_module = sys.modules["nestprune.registry.push"]
    monkeypatch.setattr(push_module, "check_base", lambda *a, **k: None)
    push(tmp_path / "reg", art, trimmed, name="m")
    with pytest.raises(NestpruneError, match="the stored weights are not the artifact's base: it lacks 1 tensor"):
        pull(f"{tmp_path / 'reg'}/m", tmp_path / "v", sparsity=0.2)
    assert not (tmp_path / "v").exists()


def test_cli_materialize_and_push_refuse_a_fine_tune_in_one_line(built, tmp_path):
    base, art = built
    other = edited_copy(base, tmp_path / "other", partial_finetune)
    for argv in (["materialize", str(art), "--base", str(other), "--sparsity", "0.2", "--out", str(tmp_path / "v")],
                 ["push", str(art), "--base", str(other), str(tmp_path / "reg"), "--name", "m"]):
        r = runner.invoke(app, argv)
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert lines[0].startswith("error:") and "2 of 39 tensors hold other values" in lines[0]
    assert not (tmp_path / "v").exists()


def test_a_corrupt_header_is_one_line(built, tmp_path):
    base, art = built
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["data_offsets"][1] -= 4
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    raw[8:8 + n] = text
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(NestpruneError, match="is not a valid safetensors file \\(tensor 'model.norm.weight' holds"):
        fp.check_base(bad, read_manifest(art))
