"""The method and objective registries: versioned configs, JSON round trips, flat options, the manifest
records, the command line's generated options, and the two worked examples of docs/ARCHITECTURE.md."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nestprune.arch import KIND_CODES
from nestprune.artifact import parse_manifest, read_artifact
from nestprune.build import BuildConfig, build_artifact
from nestprune.cli.main import app
from nestprune.config import Registry, config, option, params, record
from nestprune.errors import NestpruneError
from nestprune.objectives import (
    OBJECTIVES,
    AnswerConfig,
    CustomConfig,
    LmConfig,
    MarginConfig,
    register_objective,
)
from nestprune.rank.methods import (
    RANKERS,
    GispConfig,
    GispOneShotConfig,
    MagnitudeConfig,
    RandomConfig,
    RankJob,
    RankResult,
    WandaSpConfig,
    register_ranker,
)

HERE = Path(__file__).parent
runner = CliRunner()

# A non-default instance of every registered config: adding a method or an objective means adding one here.
EXAMPLES = {
    GispConfig: GispConfig(r_max=0.5, steps=9, normalisation="none"),
    GispOneShotConfig: GispOneShotConfig(r_max=0.3, normalisation="none"),
    WandaSpConfig: WandaSpConfig(convention="full", steps=12),
    MagnitudeConfig: MagnitudeConfig(normalisation="none"),
    RandomConfig: RandomConfig(),
    LmConfig: LmConfig(samples=64, seq_len=128, max_tokens=4096),
    MarginConfig: MarginConfig(samples=10, seq_len=64, max_tokens=900, prompt_template="Q: {prompt}\nA:",
                               separator="\t", percentile=95.0, batch_tokens=512),
    AnswerConfig: AnswerConfig(samples=3, seq_len=32, max_tokens=100, chat_template=False, separator=" ",
                               append_eos=True, percentile=90.0, batch_tokens=64),
    CustomConfig: CustomConfig(fn="pkg.mod:make", options={"copies": 3, "xs": [1, 2], "name": "a"}, samples=7,
                               seq_len=16, max_tokens=32, chat_template=False),
}


@pytest.mark.parametrize("registry", [RANKERS, OBJECTIVES], ids=["methods", "objectives"])
def test_every_config_round_trips_through_json(registry):
    assert set(registry.classes()) <= set(EXAMPLES), "add a non-default example of the new config to EXAMPLES"
    for cls in registry.classes():
        for cfg in ([cls()] if cls is not CustomConfig else []) + [EXAMPLES[cls]]:
            text = json.dumps(record(cfg))
            back = registry.from_record(json.loads(text))
            assert back == cfg and type(back) is cls
            assert json.loads(text)["version"] == cls.version >= 1
        if cls is not RandomConfig:
            assert EXAMPLES[cls] != cls(**({"fn": "pkg.mod:make"} if cls is CustomConfig else {}))


def test_records_are_checked_on_load():
    good = record(GispConfig(steps=4))
    with pytest.raises(NestpruneError, match="--method must be one of .*; got 'obs'"):
        RANKERS.from_record({**good, "name": "obs"})
    with pytest.raises(NestpruneError, match="method 'gisp' version 2 is not supported .* reads version 1"):
        RANKERS.from_record({**good, "version": 2})
    with pytest.raises(NestpruneError, match="has no option 'momentum'"):
        RANKERS.from_record({**good, "options": {**good["options"], "momentum": 0.9}})
    with pytest.raises(NestpruneError, match=r"--r-max must be in \(0, 1\], got 1.5"):
        RANKERS.from_record({**good, "options": {**good["options"], "r_max": 1.5}})
    with pytest.raises(NestpruneError, match="--normalisation must be one of reference, none"):
        RANKERS.from_record({**good, "options": {**good["options"], "normalisation": "l2"}})
    with pytest.raises(NestpruneError, match="unknown objective 'ppl'; choose one of lm, margin, answer, custom"):
        OBJECTIVES.from_record({"name": "ppl", "version": 1, "options": {}})
    with pytest.raises(NestpruneError, match="name, version and options"):
        OBJECTIVES.from_record(["lm"])


def test_configs_check_themselves():
    for make, message in [
        (lambda: GispConfig(r_max=0.0), r"--r-max must be in \(0, 1\]"),
        (lambda: GispConfig(steps=0), "--steps must be at least 1"),
        (lambda: WandaSpConfig(convention="sum"), "--convention must be one of flap, full"),
        (lambda: LmConfig(seq_len=1), "--seq-len must be at least 2"),
        (lambda: MarginConfig(percentile=0.0), r"--percentile must be in \(0, 100\]"),
        (lambda: CustomConfig(), "needs a callable"),
        (lambda: GispConfig(r_max="high"), "--r-max must be a number"),
    ]:
        with pytest.raises(NestpruneError, match=message):
            make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        GispConfig().r_max = 0.5  # type: ignore[misc]


def test_registry_binds_each_class_to_an_importable_function():
    for registry in (RANKERS, OBJECTIVES):
        for cls in registry.classes():
            assert callable(registry.function(cls() if cls is not CustomConfig else EXAMPLES[cls]))
    assert RANKERS.names() == ("gisp", "gisp-oneshot", "wanda-sp", "magnitude", "random")
    assert OBJECTIVES.names() == ("lm", "margin", "answer", "custom")

    @config("gisp")
    class Clash:
        pass

    with pytest.raises(ValueError, match="'gisp' is already registered"):
        RANKERS.register(Clash)
    with pytest.raises(TypeError, match="not a config class"):
        RANKERS.register(dict)
    with pytest.raises(NestpruneError, match="no method is registered for Clash"):
        RANKERS.function(Clash())


# ------------------------------------------------------------------------------------------ flat options


def test_flat_options_route_to_the_method_and_objective():
    cfg = BuildConfig("gisp", steps=8, samples=64, r_max=0.5, batch_size=4, max_sparsity=0.4)
    assert cfg == BuildConfig(GispConfig(steps=8, r_max=0.5), LmConfig(samples=64), batch_size=4, max_sparsity=0.4)
    assert cfg.method == GispConfig(r_max=0.5, steps=8) and cfg.objective == LmConfig(samples=64)
    assert (cfg.batch_size, cfg.max_sparsity, cfg.seed, cfg.gqa_mode) == (4, 0.4, 0, "query")
    assert BuildConfig() == BuildConfig("gisp", "lm") and BuildConfig().method == GispConfig()
    assert BuildConfig(method="wanda-sp", convention="full", steps=5).method == WandaSpConfig("full", 5)
    assert BuildConfig(objective="answer", no_chat_template=True).objective == AnswerConfig(chat_template=False)
    assert BuildConfig(objective_fn="m:f", objective_arg={"k": 1}).objective == CustomConfig(fn="m:f", options={"k": 1})
    assert BuildConfig(objective="lm", objective_fn="m:f").objective.name == "custom"  # as --objective-fn alone
    assert BuildConfig(GispConfig(steps=3), steps=5).method.steps == 5  # a flat option updates a given config
    again = dataclasses.replace(cfg, max_sparsity=0.2)
    assert again.method == cfg.method and again.objective == cfg.objective and again.max_sparsity == 0.2
    assert dataclasses.asdict(cfg)["method"] == {"r_max": 0.5, "steps": 8, "normalisation": "reference"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="magnitude", steps=3), "--steps does not apply to --method magnitude"),
    (dict(method="gisp-oneshot", steps=3), "--steps does not apply to --method gisp-oneshot"),
    (dict(method="random", normalisation="none"), r"--normalisation does not apply to --method random \(it takes no options\)"),
    (dict(method="wanda-sp", r_max=0.5), r"--r-max does not apply to --method wanda-sp \(it takes --convention, --steps\)"),
    (dict(objective="margin", no_chat_template=True), "--no-chat-template does not apply to --objective margin"),
    (dict(objective="answer", prompt_template="Q: {prompt}"), "--prompt-template does not apply to --objective answer"),
    (dict(objective="margin", objective_fn="m:f"), "--objective-fn does not apply to --objective margin"),
    (dict(objective="lm", objective_arg={"k": 1}), "--objective-arg does not apply to --objective lm"),
    (dict(method="obs"), "--method must be one of gisp, gisp-oneshot, wanda-sp, magnitude, random; got 'obs'"),
    (dict(objective="nope"), "unknown objective 'nope'"),
    (dict(max_sparsity=1.0), r"--max-sparsity must be in \(0, 1\), got 1.0"),
    (dict(gqa_mode="kv"), "--gqa-mode must be one of query, group"),
    (dict(dtype="int8"), "--dtype must be one of auto, float32, bfloat16, float16"),
    (dict(skip_last=-1), "--skip-last must be at least 0"),
])
def test_flat_options_are_refused_in_one_line(kwargs, message):
    with pytest.raises(NestpruneError, match=message) as err:
        BuildConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected option 'stepz'"):
        BuildConfig(stepz=3)


def test_option_keys_do_not_collide_across_groups():
    shared = {p.key for p in params(BuildConfig)}
    assert not shared & RANKERS.keys() and not shared & OBJECTIVES.keys() and not RANKERS.keys() & OBJECTIVES.keys()


def test_the_command_line_imports_no_torch():
    code = "import sys, nestprune.cli.main; print(sorted(m for m in ('torch', 'transformers', 'zarr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_records_both_configs_and_old_manifests_still_read(tiny_model_dir, sample_text_file, tmp_path):
    cfg = BuildConfig("gisp-oneshot", r_max=0.4, samples=4, seq_len=16, batch_size=2)
    path = build_artifact(tiny_model_dir("llama"), sample_text_file, tmp_path / "a", cfg)
    m, _ = read_artifact(path)
    assert RANKERS.from_record(m.schedule.method_config.model_dump()) == cfg.method
    assert OBJECTIVES.from_record(m.objective.config.model_dump()) == cfg.objective
    assert m.schedule.method == "gisp-oneshot" and m.schedule.r_max == 0.4 and not m.schedule.iterative
    old = m.model_dump(mode="json")
    del old["schedule"]["method_config"], old["objective"]["config"]  # what earlier nestprune wrote
    parsed = parse_manifest(old)
    assert parsed.schedule.method_config is None and parsed.objective.config is None
    assert parsed.ranking == m.ranking


def test_an_objective_object_records_no_config(tiny_model_dir, sample_text_file, tmp_path, tokenizer):
    from nestprune.objectives import make_objective

    objective = make_objective(LmConfig(samples=3, seq_len=16), sample_text_file, tokenizer, seed=0)
    path = build_artifact(tiny_model_dir("llama"), None, tmp_path / "a", BuildConfig("random"), objective=objective)
    m, _ = read_artifact(path)
    assert m.objective.config is None and m.objective.provenance["samples"] == 3
    assert m.schedule.method_config.model_dump() == record(RandomConfig())


# ------------------------------------------------------------------------------------------ command line


def _cli(model_dir, data, out, *extra):
    return runner.invoke(app, ["build", str(model_dir), "--data", str(data), "--out", str(out), "--samples", "4",
                               "--seq-len", "16", "--batch-size", "2", *extra])


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--method", "magnitude", "--steps", "3"], "--steps does not apply to --method magnitude (it takes --normalisation)"),
    (["--objective", "margin", "--no-chat-template"], "--no-chat-template does not apply to --objective margin"),
    (["--objective", "answer", "--prompt-template", "Q: {prompt}"], "--prompt-template does not apply to --objective answer"),
    (["--r-max", "0"], "--r-max must be in (0, 1], got 0.0"),
    (["--max-sparsity", "1.5"], "--max-sparsity must be in (0, 1), got 1.5"),
    (["--objective-fn", "m:f", "--objective-arg", "novalue"], "objective option 'novalue' must look like KEY=VALUE"),
    (["--method", "wanda-sp", "--convention", "sum"], "--convention must be one of flap, full; got 'sum'"),
])
def test_cli_refuses_options_in_one_line(extra, message, tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "art"
    assert message in _error(_cli(tiny_model_dir("llama"), sample_text_file, out, *extra))
    assert not out.exists()


def test_cli_options_reach_the_configs(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    model_dir = tiny_model_dir("llama")
    r = _cli(model_dir, sample_text_file, tmp_path / "w", "--method", "wanda-sp", "--convention", "full",
             "--steps", "6", "--seed", "3")
    assert r.exit_code == 0, r.output
    m, _ = read_artifact(tmp_path / "w")
    assert RANKERS.from_record(m.schedule.method_config.model_dump()) == WandaSpConfig("full", 6)
    assert m.schedule.steps_planned == 6 and m.schedule.seed == 3 and m.objective.provenance["seed"] == 3
    monkeypatch.syspath_prepend(str(HERE))
    r = _cli(model_dir, sample_text_file, tmp_path / "c", "--steps", "2", "--objective-fn", "objective_plugin:make",
             "--objective-arg", "copies=2", "--no-chat-template")
    assert r.exit_code == 0, r.output
    m, _ = read_artifact(tmp_path / "c")
    assert m.objective.name == "first-words" and m.objective.provenance["objective"] == "custom"
    assert m.objective.provenance["options"] == {"samples": 4, "seq_len": 16, "seed": 0, "chat_template": False,
                                                 "max_tokens": None, "copies": 2}
    assert OBJECTIVES.from_record(m.objective.config.model_dump()) == CustomConfig(
        fn="objective_plugin:make", options={"copies": 2}, samples=4, seq_len=16, chat_template=False)


# ------------------------------------------------------------------------------------------ the GISP loop


def test_gisp_state_carries_everything_between_steps(tokenizer):
    """Two steps run one by one, then the loop continued from their state, equal one uninterrupted run."""
    from conftest import make_tiny_model
    from test_build import _arch, _calib

    from nestprune.arch import Structures
    from nestprune.objectives.lm import LanguageModeling
    from nestprune.rank.gisp import GispState, Workspace, plan_gisp, run_gisp, run_step
    from nestprune.rank.methods import SilentReporter

    objective = LanguageModeling(_calib(tokenizer))
    runs = []
    for split in (False, True):
        model = make_tiny_model("llama", vocab_size=len(tokenizer))
        job = RankJob(model=model, structures=Structures(_arch(model)), objective=objective, batch_size=3, seed=0,
                      max_sparsity=None, skip_first_frac=0.1, skip_last=1)
        plan = plan_gisp(job, r_max=0.6, steps=5, one_shot=False, normalisation="reference")
        state = GispState.start(len(plan.table))
        if split:
            work = Workspace(model, plan)
            for _ in range(2):
                run_step(work, objective, plan, state, SilentReporter())
            work.restore()  # back to full width, removed structures zeroed: the loop re-syncs from the state
            assert state.t == 2 and len(state.trajectory) == 2
        ranking, state = run_gisp(model, objective, plan, SilentReporter(), state=state)
        runs.append((ranking, state))
    (a, sa), (b, sb) = runs
    for f in ("layer", "kind", "index", "step", "score", "raw_score"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert [t.param_sparsity for t in sa.trajectory] == [t.param_sparsity for t in sb.trajectory]
    assert len(sa.trajectory) == 5


# ------------------------------------------------------------------------------------------ worked examples
# docs/ARCHITECTURE.md, "Adding a method" and "Adding an objective": these two tests are those examples.


@config("deepest-first", version=1)
class DeepestFirstConfig:
    """A toy method: the deepest prunable layer empties first; within a layer, channels before heads."""

    heads_first: bool = option(False, help="within a layer, attention units before channels")


def rank_deepest_first(cfg: DeepestFirstConfig, job: RankJob) -> RankResult:
    from nestprune.arch import decoder_param_count
    from nestprune.rank.baselines import global_order, thin_trajectory
    from nestprune.ranking import structure_table

    table = structure_table(job.structures, job.prunable_layers())
    late = (table.kind == KIND_CODES["channel"]) if cfg.heads_first else (table.kind != KIND_CODES["channel"])
    score = late - 2.0 * table.layer  # ascending score leaves first
    ranking = global_order(job.structures, decoder_param_count(job.model, job.structures.arch), table, score, score)
    return RankResult(ranking=ranking, trajectory=thin_trajectory(ranking, 1, 0.0), steps_planned=1)


def test_worked_example_adding_a_method(tiny_model_dir, sample_text_file, tmp_path):
    register_ranker(DeepestFirstConfig)(rank_deepest_first)
    try:
        model_dir = tiny_model_dir("llama", num_hidden_layers=5)
        for heads_first in (False, True):
            cfg = BuildConfig("deepest-first", heads_first=heads_first, samples=2, seq_len=16)
            path = build_artifact(model_dir, sample_text_file, tmp_path / str(heads_first), cfg)
            m, ranking = read_artifact(path)
            assert m.schedule.method == "deepest-first"
            assert RANKERS.from_record(m.schedule.method_config.model_dump()) == DeepestFirstConfig(heads_first)
            layers, kinds = ranking.layer[: ranking.num_removed], ranking.kind[: ranking.num_removed]
            assert layers[0] == max(ranking.arch.prunable_layers()) and (np.diff(layers) <= 0).all()
            assert (kinds[0] == KIND_CODES["channel"]) != heads_first
        with pytest.raises(NestpruneError, match="--steps does not apply to --method deepest-first"):
            BuildConfig("deepest-first", steps=3)
    finally:
        RANKERS.unregister(DeepestFirstConfig)
    with pytest.raises(NestpruneError, match="--method must be one of"):
        BuildConfig("deepest-first")


@config("last-tokens", version=1)
class LastTokensConfig:
    """A toy objective: the LM loss of the last ``tokens`` tokens of the calibration text, one window."""

    tokens: int = option(32, ge=2, help="tokens at the end of the text")


def make_last_tokens(cfg: LastTokensConfig, data_path, tokenizer, seed: int):
    from nestprune.io.text import read_documents, sha256_file
    from nestprune.objectives.base import token_nll
    from nestprune.rank.calibration import tokenize_documents

    ids = tokenize_documents(read_documents(data_path), tokenizer)[-cfg.tokens :]

    class LastTokens:
        name = "last-tokens"

        def batches(self, batch_size):
            yield {"input_ids": ids[None]}

        def loss(self, model, batch):
            return token_nll(model, batch["input_ids"], batch["input_ids"]).sum()

        def provenance(self):
            return {"objective": "last-tokens", "source": str(data_path), "sha256": sha256_file(data_path),
                    "tokens_used": int(ids.numel())}

    return LastTokens()


def test_worked_example_adding_an_objective(tiny_model_dir, sample_text_file, tmp_path):
    register_objective(LastTokensConfig)(make_last_tokens)
    try:
        cfg = BuildConfig("gisp", "last-tokens", tokens=24, steps=2)  # the new option, flat as on the command line
        assert cfg.objective == LastTokensConfig(tokens=24)
        path = build_artifact(tiny_model_dir("llama"), sample_text_file, tmp_path / "a", cfg)
        m, _ = read_artifact(path)
        assert m.objective.name == "last-tokens" and m.objective.provenance["tokens_used"] == 24
        assert OBJECTIVES.from_record(m.objective.config.model_dump()) == LastTokensConfig(tokens=24)
        # the first step's loss is this objective on the dense model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nestprune.objectives.base import token_nll

        model_dir = tiny_model_dir("llama")
        objective = make_last_tokens(LastTokensConfig(24), sample_text_file, AutoTokenizer.from_pretrained(model_dir), 0)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        batch = next(objective.batches(1))
        with torch.no_grad():
            expected = float(token_nll(model, batch["input_ids"], batch["input_ids"])[0])
        assert m.trajectory[0].loss == pytest.approx(expected, rel=1e-4)
    finally:
        OBJECTIVES.unregister(LastTokensConfig)


def test_registry_is_generic():
    r: Registry = Registry("thing", "--thing", {LastTokensConfig: len})
    assert r.names() == ("last-tokens",) and r.function(LastTokensConfig()) is len
    assert r.resolve("last-tokens", {"tokens": 5}) == LastTokensConfig(5)
    with pytest.raises(NestpruneError, match="--thing must be one of last-tokens; got 'x'"):
        r.config_class("x")
