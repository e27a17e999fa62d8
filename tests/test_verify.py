"""``--verify``: passes on exact variants of a trained model at every sparsity and layout, fails on a variant with
one wrong row, and its tolerance scales with the logits (a fixed fp32 tolerance does neither)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_model, save_tiny_model
from safetensors.torch import load_file, save_file
from test_variant import ranking_for, write_variant
from typer.testing import CliRunner

from nestprune.errors import Fault
from nestprune.variant.load import load_variant
from nestprune.variant.verify import TOLERANCE, compare_logits, fixed_prompts, masked_base, verify_variant


def train_briefly(model: torch.nn.Module, tokenizer, steps: int = 80) -> torch.nn.Module:
    """A few seconds of AdamW on the sample text: logits grow to ~10+ (a random tiny model's stay ~1)."""
    ids = torch.tensor(tokenizer(SAMPLE_TEXT)["input_ids"])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 33, (8,), generator=g)
            batch = torch.stack([ids[s:s + 33] for s in starts])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = train_briefly(make_tiny_model("llama-gqa", vocab_size=len(tokenizer)), tokenizer)
    base = save_tiny_model(model, tokenizer, tmp_path_factory.mktemp("trained") / "base")
    with torch.no_grad():
        top = model(input_ids=fixed_prompts(len(tokenizer))).logits.abs().max().item()
    assert top > 8, top  # trained: far from a random model's logits of ~1
    return base, ranking_for(base, "query", seed=4)


@pytest.mark.parametrize("layout", ["per-layer", "uniform"])
def test_passes_on_every_sparsity_of_a_trained_model(trained, tmp_path, layout):
    base, ranking = trained
    for s in np.linspace(0.0, ranking.max_sparsity - 0.01, 8):
        spec = write_variant(base, ranking, tmp_path / f"v{s:.3f}", float(s), layout)
        v = verify_variant(base, tmp_path / f"v{s:.3f}", spec)
        assert v.passed and v.scale > 8 and v.max_abs_diff <= 1e-12 * v.scale, (s, v)


def corrupt_one_row(variant, name: str, row: int) -> None:
    tensors = load_file(str(variant / "model.safetensors"))
    t = tensors[name]
    t[row] = t[(row + 1) % t.shape[0]]  # the row of a neighbour: what an off-by-one in slicing would write
    save_file(tensors, str(variant / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.layers.2.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                                  "model.layers.3.mlp.down_proj.weight"])
def test_fails_on_a_variant_with_one_wrong_row(trained, tmp_path, name):
    base, ranking = trained
    spec = write_variant(base, ranking, tmp_path / "v", 0.3)
    corrupt_one_row(tmp_path / "v", name, row=3)
    with pytest.raises(Fault, match="verification failed: the variant's fp64 logits differ") as e:
        verify_variant(base, tmp_path / "v", spec)
    assert "do not use it" in str(e.value)
    # the margin: a wrong row moves the logits by far more than the tolerance allows
    got = compare_logits(load_variant(tmp_path / "v", dtype=torch.float64, attn_implementation="eager"),
                         masked_base(base, spec), fixed_prompts(spec.arch.vocab_size))
    assert got.max_abs_diff > 100 * TOLERANCE * got.scale


def test_tolerance_follows_the_logit_scale(trained, tmp_path):
    """Logits of ~1000 (lm_head scaled): fp32 rounding alone exceeds the old fixed 1e-5, fp64 stays exact."""
    base, ranking = trained
    big = tmp_path / "big"
    big.mkdir()
    for f in base.iterdir():
        (big / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(big / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 100
    save_file(tensors, str(big / "model.safetensors"), metadata={"format": "pt"})
    spec = write_variant(big, ranking, tmp_path / "v", 0.3)
    ids = fixed_prompts(spec.arch.vocab_size)
    fp32 = compare_logits(load_variant(tmp_path / "v", dtype=torch.float32, attn_implementation="eager"),
                          masked_base(big, spec, dtype=torch.float32), ids)
    assert fp32.scale > 500 and fp32.max_abs_diff > 1e-5  # the old check (fp32, |diff| <= 1e-5) fails here
    v = verify_variant(big, tmp_path / "v", spec)
    assert v.passed and v.scale > 500


def test_cli_verify_reports_and_fails_with_one_line(trained, tmp_path, monkeypatch):
    import nestprune.variant.load as load_mod
    from nestprune.cli.main import app

    base, _ = trained
    art = _artifact(base, tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", "0.2", "--verify",
                            "--out", str(tmp_path / "v")])
    assert r.exit_code == 0, r.output
    assert "verified: fp64 logits match the masked base model's" in r.output and "logit scale" in r.output
    real = load_mod.load_variant

    def broken(path, **kw):  # a variant whose load is off by one row
        model = real(path, **kw)
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[0] += 1
        return model

    monkeypatch.setattr(load_mod, "load_variant", broken)
    r = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", "0.2", "--verify",
                            "--out", str(tmp_path / "w")])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: verification failed"), r.output


def _artifact(base, tmp_path):
    from nestprune.build import BuildConfig, build_artifact

    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    cfg = BuildConfig(method="magnitude", max_sparsity=0.4)
    return build_artifact(base, tmp_path / "calib.txt", tmp_path / "art", cfg)
