"""The demo end to end at a toy budget: train → build → inspect → materialize two sizes → load and generate."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    from nestprune.demo import main, sample_path, split_sample
    from nestprune.io.text import read_documents

    assert sample_path().exists()
    work = tmp_path / "demo"
    rc = main(["--workdir", str(work), "--tokens", "8192", "--samples", "8", "--sparsities", "0.2,0.4",
               "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "demo finished" in out
    assert json.loads((work / "model" / "training.json").read_text())["tokens"] == 8192
    for s in (20, 40):
        manifest = json.loads((work / f"variant-{s}" / "nestprune_variant.json").read_text())
        assert abs(manifest["achieved_sparsity"] - s / 100) < 0.02
    train, valid = split_sample(sample_path(), work / "data")
    train_docs, valid_docs = set(read_documents(train)), set(read_documents(valid))
    assert valid_docs and not train_docs & valid_docs  # held-out text is never trained or calibrated on
