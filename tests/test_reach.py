"""``--layout uniform`` reaches the nearest size a nested uniform variant can; the summary says requested vs
reached and warns beyond ``REACH_MARGIN``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_TEXT, make_tiny_model, save_tiny_model
from test_slicing import synthetic_ranking
from typer.testing import CliRunner

from nestprune.arch import arch_from_config
from nestprune.variant.widths import REACH_MARGIN, Uniform, is_nested, plan_variant, uniform_sparsity

QWEN_LIKE = dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=300, head_dim=8)


def uneven_ranking(mode: str = "query"):
    """GQA 14/2 heads (7 per group, as Qwen2.5-0.5B); the heads of layers 1-4 go first, so the per-layer
    subnetwork loses attention unevenly and its mean width rounds far from the target."""
    arch = arch_from_config(QWEN_LIKE)
    kind = "head" if mode == "query" else "group"
    units = 14 if mode == "query" else 2
    first = [(layer, kind, h) for h in range(units - 2) for layer in (1, 2, 3, 4)]
    return synthetic_ranking(arch, mode, seed=0, prunable_layers=[1, 2, 3, 4], first=first)


@pytest.mark.parametrize("mode", ["query", "group"])
@pytest.mark.parametrize("multiple_of", [None, 8])
def test_uniform_is_the_nearest_reachable_size(mode, multiple_of):
    r = uneven_ranking(mode)
    cfg = Uniform(multiple_of=multiple_of)
    reachable = np.array([uniform_sparsity(r, p, cfg) for p in range(r.num_removed + 1)])  # brute force
    assert np.all(np.diff(reachable) >= 0)  # non-decreasing in the prefix: what the bisection relies on
    specs = []
    for target in np.linspace(0, r.max_sparsity, 41):
        spec = plan_variant(r, float(target), "uniform", multiple_of)
        best = np.abs(reachable - target).min()
        assert abs(spec.achieved_sparsity - target) == pytest.approx(best, abs=1e-12), target
        assert spec.requested_sparsity == float(target)
        assert reachable[spec.prefix_len] == pytest.approx(spec.achieved_sparsity, abs=1e-12)
        specs.append(spec)
    for larger, smaller in zip(specs, specs[1:], strict=False):  # still nested
        assert is_nested(larger, smaller)


def test_the_old_rule_landed_far_and_the_new_one_does_not():
    r = uneven_ranking()
    cfg = Uniform()
    for target in (0.3, 0.5):
        old = uniform_sparsity(r, r.prefix_for_sparsity(target), cfg)  # widths of the per-layer prefix, as before
        new = plan_variant(r, target, "uniform").achieved_sparsity
        assert abs(old - target) > REACH_MARGIN  # 0.3 -> 0.2845, 0.5 -> 0.5239
        assert abs(new - target) < abs(old - target) and abs(new - target) <= REACH_MARGIN


def test_a_target_beyond_the_ranking_is_still_refused():
    from nestprune.errors import NestpruneError

    r = uneven_ranking()
    with pytest.raises(NestpruneError, match="beyond what this artifact ranked"):
        plan_variant(r, r.max_sparsity + 0.01, "uniform")


def test_cli_summary_reports_requested_and_reached_and_warns_beyond_the_margin(tmp_path, tokenizer):
    from nestprune.artifact import read_artifact
    from nestprune.build import BuildConfig, build_artifact
    from nestprune.cli.main import app

    base = save_tiny_model(make_tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, tmp_path / "base")
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    art = build_artifact(base, tmp_path / "calib.txt", tmp_path / "art",
                         BuildConfig(method="random", samples=2, seq_len=8, batch_size=2, max_sparsity=0.6))
    _, ranking = read_artifact(art)
    gaps = {float(s): plan_variant(ranking, float(s), "uniform") for s in np.linspace(0.05, 0.55, 21)}
    far = next(s for s, spec in gaps.items() if abs(spec.achieved_sparsity - s) > REACH_MARGIN)  # tiny: coarse
    near = next(s for s, spec in gaps.items() if abs(spec.achieved_sparsity - s) <= REACH_MARGIN)
    runner = CliRunner()
    for target, warned in ((far, True), (near, False)):
        out = tmp_path / f"v{target}"
        r = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", f"{target!r}",
                                "--layout", "uniform", "--out", str(out)])
        assert r.exit_code == 0, r.output
        spec = gaps[target]
        assert (f"requested sparsity {target:.4f}, achieved sparsity {spec.achieved_sparsity:.4f} "
                f"({spec.total_params:,} parameters)") in r.output
        assert ("warning: --layout uniform reached sparsity" in r.output) == warned, r.output
        if warned:
            assert f"more than {REACH_MARGIN:g} away" in r.output
