"""A build over several processes (``nestprune.rank.distributed``): two gloo ranks on the CPU rank exactly what
one process ranks, data parallel and ``--shard`` (FSDP2); failures end every rank; per-GPU plans for N GPUs.

Launches are slow (two Python processes start and meet), so there is one: a torchrun launch of 2 ranks
(``distributed_worker.py``) that runs every build below, the library's and the command line's, in turn."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nestprune.artifact import read_artifact, read_manifest
from nestprune.build import BuildConfig, build_artifact
from nestprune.errors import NestpruneError
from nestprune.rank import distributed as D
from nestprune.rank.score import per_unit

HERE = Path(__file__).parent
SMALL = dict(samples=4, seq_len=16, batch_size=2, steps=4, device="cpu")  # one micro-batch per rank and step
UNEVEN = dict(samples=6, seq_len=16, batch_size=2, steps=4, device="cpu")  # 3 micro-batches: 2 + 1


def torchrun(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", D.TIMEOUT_ENV: "120", "PYTHONPATH": str(HERE)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_process(model_dir: Path, data: Path, out: Path, **options) -> Path:
    """The reference: the same build in this process, one thread (as each torchrun rank runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_artifact(model_dir, data, out, BuildConfig(**options))
    finally:
        torch.set_num_threads(threads)


def same_order(a, b) -> bool:
    return all((getattr(a, f) == getattr(b, f)).all() for f in ("layer", "kind", "index", "step"))


# ---------------------------------------------------------------------------------------------
# Two ranks == one process (one launch, many builds)
# ---------------------------------------------------------------------------------------------

CASES = {
    # name: (family, model overrides, options, expectation)
    "dp": ("llama-gqa", {}, SMALL, "sha"),
    "dp-no-compact": ("llama-gqa", {}, {**SMALL, "no_compact": True}, "sha"),
    "dp-uneven": ("qwen2", {}, {**UNEVEN, "gqa_mode": "group"}, "close"),
    "shard": ("llama-gqa", {}, {**SMALL, "shard": True}, "sha"),
    "shard-fused": ("phi3", {}, {**SMALL, "shard": True}, "sha"),
    "shard-group-uneven": ("qwen2", {}, {**UNEVEN, "gqa_mode": "group", "shard": True}, "close"),
    # 3 heads of 8 rows on 2 ranks: a head's rows are cut by the shard boundary (summed in two parts)
    "shard-cut-head": ("llama", {"hidden_size": 24, "num_attention_heads": 3, "num_key_value_heads": 3},
                       {**SMALL, "shard": True}, "close"),
    "failing": ("llama", {}, SMALL, "fails"),
    "differs": ("llama", {}, SMALL, "differs"),
}


CLI_OPTIONS = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--steps", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tokenizer):
    """Every case of CASES built by 2 gloo ranks in one torchrun launch, then the command line twice (a sharded
    build, a failing rank), each rank's status and output recorded."""
    from conftest import SAMPLE_TEXT, make_tiny_model, save_tiny_model

    root = tmp_path_factory.mktemp("dist")
    data = root / "calib.txt"
    data.write_text(SAMPLE_TEXT)
    out = root / "out"
    out.mkdir()
    models, cases = {}, []

    def model(family: str, overrides: dict) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in models:
            made = make_tiny_model(family, vocab_size=len(tokenizer), **overrides)
            models[key] = save_tiny_model(made, tokenizer, root / f"model-{len(models)}")
        return models[key]

    for name, (family, overrides, options, expect) in CASES.items():
        case = {"name": name, "model": str(model(family, overrides)), "data": str(data), "options": options}
        if expect in ("fails", "differs"):
            case["objective"] = {"fails": "failing", "differs": "differs"}[expect]
        cases.append(case)
    # a build that fails at its second step, then resumed from the checkpoint rank 0 wrote after its first
    llama = str(model("llama-gqa", {}))
    cases.append({"name": "interrupted", "model": llama, "data": str(data), "options": SMALL, "objective": "failing",
                  "out": "resumed"})
    cases.append({"name": "resumed", "model": llama, "data": str(data), "options": SMALL, "objective": "plain",
                  "resume": True})
    build = ["build", "--data", str(data), *CLI_OPTIONS]
    cases.append({"name": "cli-shard", "model": str(model("qwen3", {})),
                  "argv": [*build, str(model("qwen3", {})), "--out", str(out / "cli-shard"), "--shard"]})
    cases.append({"name": "cli-failing", "argv": [*build, str(model("llama", {})), "--out", str(out / "cli-failing"),
                                                  "--objective-fn", f"{HERE / 'distributed_worker.py'}:failing"]})
    spec = root / "spec.json"
    spec.write_text(json.dumps({"cases": cases}))
    res = torchrun([str(HERE / "distributed_worker.py"), str(spec), str(out)], cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [{r["name"]: r for r in json.loads((out / f"rank{i}.json").read_text())} for i in (0, 1)]
    return root, {c["name"]: c for c in cases}, ranks


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[3] in ("sha", "close")])
def test_two_ranks_rank_what_one_process_ranks(launched, name):
    root, cases, ranks = launched
    case, expect = cases[name], CASES[name][3]
    assert ranks[0][name]["ok"] and ranks[1][name]["ok"], (ranks[0][name], ranks[1][name])
    options = {k: v for k, v in case["options"].items() if k != "shard"}  # the reference: one process, and
    if case["options"].get("shard"):  # --shard builds without compaction: the --no-compact path
        options["no_compact"] = True
    ref = one_process(Path(case["model"]), Path(case["data"]), root / f"ref-{name}", **options)
    m2, r2 = read_artifact(root / "out" / name)
    m1, r1 = read_artifact(ref)
    assert ranks[0][name]["sha256"] == m2.ranking.sha256
    if expect == "sha":  # the same additions: the same bits
        assert m2.ranking.sha256 == m1.ranking.sha256
    else:  # the same sums grouped differently: rounding apart, the same removals
        assert same_order(r1, r2)
        np.testing.assert_allclose(r2.score, r1.score, rtol=1e-5, atol=0)
    assert [s.structures_removed for s in m2.trajectory] == [s.structures_removed for s in m1.trajectory]
    assert [s.loss for s in m2.trajectory] == pytest.approx([s.loss for s in m1.trajectory], rel=1e-6)
    assert m2.schedule.batch_size == m1.schedule.batch_size


def test_a_failing_rank_ends_every_rank_with_its_message(launched):
    root, _, ranks = launched
    r0, r1 = ranks[0]["failing"], ranks[1]["failing"]
    assert r1 == {**r1, "ok": False, "error": "RuntimeError", "message": "boom on rank 1"}
    assert r0["ok"] is False and r0["error"] == "PeerFailed" and r0["code"] == 1
    assert r0["message"] == "rank 1: RuntimeError: boom on rank 1"
    assert not (root / "out" / "failing").exists()
    # inputs that differ between ranks are refused on every rank before the model is loaded
    for r in (ranks[0]["differs"], ranks[1]["differs"]):
        assert r["ok"] is False and r["error"] == "Disagreement" and r["code"] == 1
        assert "the ranks disagree on the inputs" in r["message"] and "rank 1 differs from rank 0" in r["message"]
    assert not (root / "out" / "differs").exists()
    # and the launch went on: the builds after a failure ran, their groups intact
    assert list(ranks[0]) == [*CASES, "interrupted", "resumed", "cli-shard", "cli-failing"]


def test_a_distributed_build_resumes_from_rank_0s_checkpoint(launched):
    from nestprune.resume import resume_dir

    root, cases, ranks = launched
    assert ranks[0]["interrupted"]["error"] == "PeerFailed" and ranks[1]["interrupted"]["error"] == "RuntimeError"
    assert ranks[0]["resumed"]["ok"] and ranks[1]["resumed"]["ok"], (ranks[0]["resumed"], ranks[1]["resumed"])
    assert ranks[0]["resumed"]["checkpoint_before"]  # the failed build kept its checkpoint after step 0
    out = root / "out" / "resumed"
    assert not resume_dir(out).exists()  # removed once the artifact is complete
    ref = one_process(Path(cases["resumed"]["model"]), root / "calib.txt", root / "ref-resumed", **SMALL)
    assert read_manifest(out).ranking.sha256 == read_manifest(ref).ranking.sha256


def test_command_line_under_torchrun_rank_0_alone_prints(launched):
    root, cases, ranks = launched
    r0, r1 = ranks[0]["cli-shard"], ranks[1]["cli-shard"]
    assert r0["code"] == 0 and r1["code"] == 0, (r0, r1)
    assert r0["stderr"].count("wrote ") == 1 and r0["stderr"].count("memory plan:") == 1
    assert r1["stdout"] == r1["stderr"] == ""  # the other ranks stay quiet
    model_dir = Path(cases["cli-shard"]["model"])
    ref = one_process(model_dir, root / "calib.txt", root / "ref-cli", samples=4, seq_len=16, batch_size=2, steps=3,
                      device="cpu", no_compact=True)
    assert read_manifest(root / "out" / "cli-shard").ranking.sha256 == read_manifest(ref).ranking.sha256


def test_command_line_failure_is_one_line_and_every_rank_fails(launched):
    root, _, ranks = launched
    r0, r1 = ranks[0]["cli-failing"], ranks[1]["cli-failing"]
    assert r0["code"] == r1["code"] == 1  # an internal error on rank 1: its status, on every rank
    lines = [line for r in (r0, r1) for line in (r["stdout"] + r["stderr"]).splitlines() if line.startswith("error:")]
    assert lines == ["error: rank 1: RuntimeError: boom on rank 1"]  # printed by rank 0 alone
    assert r1["stdout"] == r1["stderr"] == ""
    assert not (root / "out" / "cli-failing").exists()


# ---------------------------------------------------------------------------------------------
# The pieces, in one process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_split_is_a_contiguous_balanced_partition(world):
    for n in range(0, 13):
        shares = [D.Group(rank=r, world=world).split(n) for r in range(world)]
        assert [i for s in shares for i in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert max(map(len, shares)) == math.ceil(n / world)


class _Batches:
    name = "counting"

    def __init__(self, n: int):
        self.n = n

    def batches(self, batch_size: int):
        for i in range(self.n):
            yield {"input_ids": torch.full((batch_size, 3), i)}

    def loss(self, model, batch):
        return batch["input_ids"].float().sum() + 1.0

    def provenance(self):
        return {}


def test_share_runs_this_ranks_micro_batches_and_pads_under_shard():
    obj = _Batches(5)
    assert D.SINGLE.share(obj) is obj
    seen = [[int(b["input_ids"][0, 0]) for b in D.Group(rank=r, world=2).share(obj).batches(2)] for r in (0, 1)]
    assert seen == [[0, 1, 2], [3, 4]]
    padded = [list(D.Group(rank=r, world=2, shard=True).share(obj).batches(2)) for r in (0, 1)]
    assert [len(p) for p in padded] == [3, 3]  # every rank in every forward/backward
    filler = padded[1][-1]
    share = D.Group(rank=1, world=2, shard=True).share(obj)
    assert D.PAD in filler and float(share.loss(None, filler)) == 0.0
    assert float(share.loss(None, padded[1][0])) == float(obj.loss(None, padded[1][0])) != 0.0
    few = [list(D.Group(rank=r, world=4, shard=True).share(_Batches(2)).batches(1)) for r in range(4)]
    assert [len(p) for p in few] == [1, 1, 1, 1] and all(D.PAD in p[0] for p in few[2:])


def test_unit_sums_of_shard_pieces_add_up_to_the_whole():
    """Per-unit sums of the pieces a segment is cut into (shard boundaries anywhere) are the whole segment's:
    to the bit where the cuts fall between units."""
    from nestprune.arch import TensorSlice

    torch.manual_seed(0)
    for axis in (0, 1):
        s = TensorSlice("x.weight", "q", axis)
        units, width = 5, 4
        metric = torch.rand((units * width, 7) if axis == 0 else (7, units * width))
        whole = per_unit(s, metric, units, width).double()
        for cuts in ([0, 20], [0, 8, 20], [0, 3, 9, 10, 17, 20], [0, 1, 2, 19, 20]):
            out = torch.zeros(units, dtype=torch.float64)
            for a, b in zip(cuts, cuts[1:], strict=False):
                D._unit_sums(s, metric.narrow(axis, a, b - a), a, width, out)
            if all(c % width == 0 for c in cuts):
                assert torch.equal(out, whole)
            else:
                torch.testing.assert_close(out, whole, rtol=1e-6, atol=0)


def test_shard_range_is_torch_chunk():
    for length in (1, 5, 7, 8, 48):
        for world in (1, 2, 3, 4, 6):
            pieces = torch.arange(length).chunk(world)
            for r in range(world):
                lo, hi = D.shard_range(length, D.Group(rank=r, world=world))
                expect = pieces[r].tolist() if r < len(pieces) else []
                assert list(range(lo, hi)) == expect


def test_launch_environment_is_read_and_checked():
    assert D.launch_env({}) is None
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert D.launch_env(env) == D.Launch(rank=3, world=8, local_rank=1, local_world=4)
    assert D.launch_env({"RANK": "0", "WORLD_SIZE": "1"}) == D.Launch(0, 1, 0, 1)
    for bad, match in [({"RANK": "x", "WORLD_SIZE": "2"}, "must be integers"), ({"WORLD_SIZE": "2"}, "incomplete"),
                       ({"RANK": "2", "WORLD_SIZE": "2"}, "inconsistent"),
                       ({**env, "LOCAL_RANK": "4"}, "inconsistent")]:
        with pytest.raises(NestpruneError, match=match):
            D.launch_env(bad)
    assert D.timeout_seconds({}) == D.DEFAULT_TIMEOUT and D.timeout_seconds({D.TIMEOUT_ENV: "60"}) == 60.0
    for bad in ("0", "-1", "soon"):
        with pytest.raises(NestpruneError, match=D.TIMEOUT_ENV):
            D.timeout_seconds({D.TIMEOUT_ENV: bad})
    cpu = torch.device("cpu")
    assert D.rank_device(cpu, D.Launch(1, 2, 1, 2)) == cpu and D.rank_device(cpu, None) == cpu


def test_single_process_group_does_nothing():
    g = D.SINGLE
    assert g.main and g.world == 1 and g.split(3) == range(3)
    grads = {"w": torch.ones(3)}
    assert g.reduce(2.5, grads) == 2.5 and torch.equal(grads["w"], torch.ones(3))
    g.agree("anything", b"x")
    g.agree_step(0, np.zeros(2), np.zeros(2), np.array([1]))
    with g.guard():
        pass
    assert list(g.stagger()) == [None]


def test_build_refuses_shard_where_it_cannot_work(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    model_dir = tiny_model_dir("llama")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    plain = dict(samples=4, seq_len=16, device="cpu")
    for method, options, match in [("gisp", dict(SMALL, shard=True), "launch the build with torchrun"),
                                   ("magnitude", dict(plain, shard=True), "--shard is for the gradient methods"),
                                   ("gisp", dict(SMALL, shard=True, accumulator="bf16-stochastic"),
                                    "accumulates the gradient shards")]:
        with pytest.raises(NestpruneError, match=match):
            build_artifact(model_dir, sample_text_file, tmp_path / "a", BuildConfig(method, **options))
        assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------
# Per-GPU plans for N GPUs
# ---------------------------------------------------------------------------------------------

# Llama-3-70B's layer shapes (8192 wide, 64 heads in 8 KV groups, 28672 channels, 128256 tokens), 8 layers
# instead of 80 to keep the meta runs short: the per-GPU arithmetic is the same
LLAMA70_SHAPE = dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                     num_hidden_layers=8, num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, tie_word_embeddings=False)
GiB = 1 << 30


@pytest.fixture(scope="module")
def estimator():
    from nestprune.rank.plan import Estimator

    return Estimator(LLAMA70_SHAPE, torch.bfloat16, 256)


def test_data_parallel_plan_is_one_gpus_with_a_share_of_the_windows(estimator):
    from nestprune.rank.plan import plan_build

    kw = dict(seq_len=256, dtype="bfloat16", steps=28, accumulator="fp32", throughput=1000.0, estimator=estimator)
    one = plan_build(LLAMA70_SHAPE, "1TiB", samples=64, **kw)
    for n in (2, 4, 8):
        p = plan_build(LLAMA70_SHAPE, "1TiB", samples=64, ranks=n, **kw)
        alone = plan_build(LLAMA70_SHAPE, "1TiB", samples=math.ceil(64 / n), **kw)  # one GPU, its share
        assert (p.peak_bytes, p.breakdown, p.micro_batch) == (alone.peak_bytes, alone.breakdown, alone.micro_batch)
        assert p.breakdown.weights == one.breakdown.weights  # every rank holds the whole model ...
        assert p.breakdown.accumulators == one.breakdown.accumulators  # ... and every accumulator
        assert p.breakdown.activations < one.breakdown.activations  # of a smaller micro-batch (its share)
        assert p.samples_per_rank == math.ceil(64 / n) and p.micro_batches_per_step == 1
        assert p.projected_seconds_dense == pytest.approx(one.projected_seconds_dense / n)  # ideal scaling
        assert "data parallel" in p.summary() and "ideal scaling" in p.summary()


def test_sharded_plan_divides_weights_and_accumulators_over_the_gpus(estimator):
    from nestprune.rank.memory import ShardSizes
    from nestprune.rank.plan import plan_build

    kw = dict(samples=64, seq_len=256, dtype="bfloat16", steps=28, batch_size=1, estimator=estimator)
    single = plan_build(LLAMA70_SHAPE, "1TiB", accumulator="fp32", **kw)
    sizes = ShardSizes.of(estimator.model, LLAMA70_SHAPE)
    layer = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672 + 2 * 8192  # q, o + k, v + MLP + norms
    assert sizes.largest_layer == layer and sizes.layers == 8 * layer
    assert sizes.scored == 8 * (2 * 8192 * 8192 + 3 * 8192 * 28672)  # query mode: q, o, gate, up, down
    peaks = []
    for n in (1, 2, 4, 8, 16):
        p = plan_build(LLAMA70_SHAPE, "1TiB", ranks=n, shard=True, **kw)
        b = p.breakdown
        rest = single.breakdown.weights - 2 * sizes.layers  # embeddings, output layer, final norm: whole, bf16
        assert b.weights == rest + -(-4 * sizes.layers // n) + 2 * 2 * sizes.largest_layer
        assert b.accumulators == -(-4 * sizes.scored // n) + 6 * sizes.scored_largest_layer
        assert (b.activations, b.logits, b.workspace) == (single.breakdown.activations, single.breakdown.logits,
                                                          single.breakdown.workspace)
        assert p.peak_bytes == b.total and p.accumulator == "fp32" and p.step_cost == 1.0  # no compaction
        peaks.append(p.peak_bytes)
    assert all(a > b for a, b in zip(peaks, peaks[1:], strict=False))
    # the sharded master copy costs more than the whole bf16 model on one GPU; from 2 GPUs on it saves
    assert peaks[0] > single.peak_bytes > peaks[1]


def test_scaling_table_says_how_many_gpus_a_model_needs(estimator):
    from nestprune.rank.plan import BuildPlan, plan_build, scaling_summary, scaling_table

    ranks = (1, 2, 4, 8, 16, 32, 64)
    rows = scaling_table(estimator, "16GiB", ranks=ranks)
    dp = [r for r in rows if not r.shard]
    sharded = [r for r in rows if r.shard]
    assert tuple(r.ranks for r in dp) == tuple(r.ranks for r in sharded) == ranks
    assert len({r.peak_bytes for r in dp}) == 1 and not any(r.fits for r in dp)  # 16.7 GiB of bf16 weights alone
    assert dp[0].accumulator == "fp32-host"  # the least memory, as nothing fits
    assert all(a.peak_bytes > b.peak_bytes for a, b in zip(sharded, sharded[1:], strict=False))
    need = min(r.ranks for r in sharded if r.fits)
    assert need > 8 and not any(r.fits for r in sharded if r.ranks < need)
    text = scaling_summary(rows, int(16 * GiB * 0.9))
    assert f"needs --shard over at least {need} GPUs" in text and "data parallel" in text
    assert "fits" in scaling_summary(scaling_table(estimator, "1TiB", ranks=(1, 2)), GiB << 10)
    p = plan_build(LLAMA70_SHAPE, "16GiB", samples=64, seq_len=256, dtype="bfloat16", steps=28, ranks=need, shard=True,
                   estimator=estimator, scaling=rows)
    assert p.fits and f"{need} GPUs (--shard), per GPU" in p.summary() and "GPU count" in p.summary()
    d = json.loads(p.to_json())
    assert d["ranks"] == need and d["shard"] is True and d["samples_per_rank"] == math.ceil(64 / need)
    assert [(r["ranks"], r["shard"]) for r in d["scaling"]] == [(r.ranks, r.shard) for r in rows]
    assert BuildPlan.from_json(p.to_json()) == p


def test_plan_for_n_gpus_on_the_command_line(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from nestprune.cli.main import app

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_model_dir("llama-gqa") / "config.json").read_text())
    runner = CliRunner()
    base = ["build", str(bare), "--plan", "--device-memory", "2GiB", "--samples", "64", "--seq-len", "32"]
    res = runner.invoke(app, [*base, "--json", "--nproc", "4", "--shard"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["ranks"] == 4 and d["shard"] is True and d["samples_per_rank"] == 16 and d["micro_batch"] <= 16
    assert {r["ranks"] for r in d["scaling"]} == {1, 2, 4, 8, 16, 32, 64}
    one = json.loads(runner.invoke(app, [*base, "--json"]).output)
    assert one["ranks"] == 1 and one["shard"] is False and one["samples_per_rank"] == 64
    res = runner.invoke(app, [*base, "--nproc", "3"])
    assert res.exit_code == 0 and "3 GPUs (data parallel), per GPU" in res.output and "GPU count" in res.output
    for bad, match in [(["--nproc", "0"], "--nproc"), (["--nproc", "2", "--shard", "--accumulator", "fp32-host"],
                                                  "accumulates fp32 gradient shards")]:
        res = runner.invoke(app, [*base, *bad])
        assert res.exit_code == 2 and match in res.output, res.output
    res = runner.invoke(app, ["build", str(bare), "--nproc", "2"])
    assert res.exit_code == 2 and "--nproc goes with --plan" in res.output
