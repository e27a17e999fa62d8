"""`nestprune lm-eval`: lm-evaluation-harness on variants of either layout, offline, on the shipped example
tasks, cross-checked against `nestprune eval` on the same items and text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_slicing import synthetic_ranking
from typer.testing import CliRunner

from nestprune.arch import arch_from_config
from nestprune.cli.main import app
from nestprune.io.weights import SafetensorsSource
from nestprune.variant.materialize import materialize_variant
from nestprune.variant.widths import plan_variant

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's HF model needs it (the lm-eval[hf] extra)

TASKS = Path(__file__).resolve().parent.parent / "examples" / "lm_eval_tasks"
runner = CliRunner()


def variant(tiny_model_dir, tmp_path, layout: str, name: str = "llama-gqa") -> Path:
    base = tiny_model_dir(name, max_position_embeddings=512)
    cfg = json.loads((base / "config.json").read_text())
    out = tmp_path / f"{name}-{layout}"
    with SafetensorsSource(base) as src:
        arch = arch_from_config(cfg, set(src.names()))
        ranking = synthetic_ranking(arch)
        materialize_variant(src, ranking, plan_variant(ranking, 0.4, layout), base, out)
    return out


def cli_json(*args: str) -> dict:
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("layout", ["per-layer", "uniform"])
def test_multiple_choice_example_matches_nestprune_eval(tiny_model_dir, tmp_path, layout):
    var = variant(tiny_model_dir, tmp_path, layout)
    out_file = tmp_path / "results.json"
    got = cli_json("lm-eval", str(var), "--tasks", "nestprune_mc", "--include-path", str(TASKS),
                   "--bootstrap-iters", "0", "--output-path", str(out_file))["tasks"]["nestprune_mc"]
    ours = cli_json("eval", str(var), "--mc", str(TASKS / "mc.jsonl"))["results"][0]
    assert got["samples"] == ours["items"] == 6
    assert got["acc"] == pytest.approx(ours["acc"]) and got["acc_norm"] == pytest.approx(ours["acc_norm"])
    saved = json.loads(out_file.read_text())
    assert saved["results"]["nestprune_mc"]["acc,none"] == got["acc"]


def test_rolling_perplexity_equals_nestprune_eval(tiny_model_dir, tmp_path):
    """One document that fits one window: lm-eval predicts all its tokens after the prefix token (BOS);
    `nestprune eval --ppl` on BOS + the same text, as one window, predicts exactly the same tokens."""
    from transformers import AutoTokenizer

    from nestprune.evaluate.lm_eval import run_lm_eval

    var = variant(tiny_model_dir, tmp_path, "per-layer")
    res = run_lm_eval(var, ["nestprune_text"], include_path=[TASKS], limit=1, bootstrap_iters=0)
    row = res["tasks"]["nestprune_text"]
    doc = json.loads((TASKS / "text.jsonl").read_text().splitlines()[0])["text"]
    tok = AutoTokenizer.from_pretrained(str(var))
    n = len(tok(doc, add_special_tokens=False)["input_ids"])
    assert row["tokens"] == n and n + 1 <= 512  # one lm-eval window
    text = tmp_path / "doc.txt"
    text.write_text(tok.bos_token + doc)
    ours = cli_json("eval", str(var), "--ppl", str(text), "--seq-len", str(n + 1))["results"][0]
    assert ours["windows"] == 1 and ours["tokens"] == n
    print(f"[lm-eval] token ppl {row['token_perplexity']!r}, nestprune eval ppl {ours['ppl']!r}")
    assert row["token_perplexity"] == pytest.approx(ours["ppl"], rel=1e-3)
    assert abs(row["token_perplexity"] / ours["ppl"] - 1) < 1e-5  # in fact equal up to float rounding


def test_unknown_task_and_bad_paths_are_one_line_errors(tiny_model_dir, tmp_path):
    var = variant(tiny_model_dir, tmp_path, "uniform")
    res = runner.invoke(app, ["lm-eval", str(var), "--tasks", "hellaswag", "--include-path", str(TASKS)])
    assert res.exit_code == 2 and "unknown lm-eval task(s) hellaswag" in res.output
    assert "nestprune_mc" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["lm-eval", str(var), "--tasks", "nestprune_mc", "--include-path", str(tmp_path / "no")])
    assert res.exit_code == 2 and "is not a directory" in res.output
    res = runner.invoke(app, ["lm-eval", str(tmp_path), "--tasks", "nestprune_mc", "--include-path", str(TASKS)])
    assert res.exit_code == 2 and "no config.json" in res.output


def test_relative_data_files_are_read_from_the_task_folder(tmp_path):
    from nestprune.evaluate.lm_eval import resolve_data_files

    cfg = {"task": "t", "dataset_kwargs": {"data_files": {"test": "a.jsonl", "train": ["/abs/b.jsonl", "c.jsonl"]}}}
    got = resolve_data_files(cfg, tmp_path)["dataset_kwargs"]["data_files"]
    assert got == {"test": str(tmp_path / "a.jsonl"), "train": ["/abs/b.jsonl", str(tmp_path / "c.jsonl")]}
    assert cfg["dataset_kwargs"]["data_files"]["test"] == "a.jsonl"  # the input is not modified
