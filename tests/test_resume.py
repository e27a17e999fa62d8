"""Resume after pre-emption (issue 12): builds killed with SIGKILL at named points (during a step, during the
checkpoint write, during the artifact write), then resumed, end with the uninterrupted build's ranking, byte for
byte; a resume with other inputs is refused naming them; SIGTERM / SIGINT keep the last checkpoint, remove what
was half written and print the command that resumes; the checkpoint is removed once the artifact is complete.

The killed builds run in forks of one helper process that has imported torch and transformers once (each
scenario would otherwise pay the imports again): a fork arms its kill point, runs the command line, and dies
there. Tiny llama (intermediate 96: compaction cuts 96 -> 64 -> 32 on the CPU), fp32, CPU.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_model, save_tiny_model
from typer.testing import CliRunner

from nestprune.artifact import read_manifest
from nestprune.cli.main import app
from nestprune.errors import NestpruneError
from nestprune.io import atomic
from nestprune.resume import CHECKPOINT_JSON, load_checkpoint, read_doc, resume_dir

runner = CliRunner()
STEPS, SAMPLES, BATCH = 4, 4, 2  # 2 micro-batches per step; compaction cuts the MLPs at steps 1, 2 and 3
BATCHES_PER_STEP = SAMPLES // BATCH


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer):
    """A tiny llama whose MLPs compaction cuts, and its calibration text."""
    root = tmp_path_factory.mktemp("resume-inputs")
    model = make_tiny_model("llama", vocab_size=len(tokenizer), intermediate_size=96)
    base = save_tiny_model(model, tokenizer, root / "base")
    data = root / "calib.txt"
    data.write_text(SAMPLE_TEXT)
    return base, data


def build_args(base: Path, data: Path, out: Path, *extra: str, samples: int = SAMPLES,
               steps: int | None = STEPS, batch: int | str = BATCH) -> list[str]:
    return ["build", str(base), "--data", str(data), "--out", str(out), "--samples", str(samples), "--seq-len", "16",
            "--batch-size", str(batch), *(["--steps", str(steps)] if steps else []), *extra]


def build(args: list[str]):
    return runner.invoke(app, args)


def sha(out: Path) -> str:
    return read_manifest(out).ranking.sha256


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The uninterrupted builds' ranking sha256, with and without compaction."""
    base, data = inputs
    root = tmp_path_factory.mktemp("resume-reference")
    shas = {}
    for name, extra in (("compact", ()), ("no-compact", ("--no-compact",))):
        out = root / name / "art"
        r = build(build_args(base, data, out, *extra))
        assert r.exit_code == 0, r.output
        assert sorted(os.listdir(out.parent)) == ["art"]  # no checkpoint left beside it
        shas[name] = sha(out)
    return shas


# ---------------------------------------------------------------------------------------------
# The killed builds: forks of one helper process
# ---------------------------------------------------------------------------------------------

FORK_SERVER = r"""
import json, os, signal, sys
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer  # the heavy imports, once, before any fork
import transformers.models.llama.modeling_llama
import zarr
import nestprune.artifact, nestprune.build, nestprune.resume, nestprune.objectives.lm, nestprune.rank.gisp
from nestprune.cli.main import app

torch.set_num_threads(int(sys.argv[2]))  # as the test process: the same sums


def arm(point, signum):
    # stop this process with ``signum`` at ``point``: "step:N" (the 2nd micro-batch of step N), "ckpt-write:N"
    # (the arrays of the N-th checkpoint written to their temporary, not yet renamed), "ckpt-commit:N" (the N-th
    # checkpoint.json the same), "artifact-write" (the artifact's temporary holds some of its arrays)
    kind, _, n = point.partition(":")
    n = int(n or 0)
    seen = {"count": 0}

    def fire():
        os.kill(os.getpid(), signum)

    if kind == "step":
        lm = nestprune.objectives.lm.LanguageModeling
        real = lm.loss

        def loss(self, model, batch):
            seen["count"] += 1
            if seen["count"] == n * int(sys.argv[3]) + 2:
                fire()
            return real(self, model, batch)

        lm.loss = loss
    elif kind in ("ckpt-write", "ckpt-commit"):
        real_fsync = os.fsync
        prefix = ".state-" if kind == "ckpt-write" else ".checkpoint.json."

        def fsync(fd):
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            if name.startswith(prefix) and ".nestprune-tmp." in name:
                seen["count"] += 1
                if seen["count"] == n:
                    fire()
            return real_fsync(fd)

        os.fsync = fsync
    elif kind == "artifact-write":
        real_create = zarr.Group.create_array

        def create_array(self, *a, **k):
            out = real_create(self, *a, **k)
            seen["count"] += 1
            if seen["count"] == 3:
                fire()
            return out

        zarr.Group.create_array = create_array
    else:
        raise SystemExit(f"unknown point {point}")


results = []
for spec in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        arm(spec["point"], spec["signal"])
        try:
            app(spec["args"], prog_name="nestprune")
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    results.append({"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                    "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None})
print(json.dumps(results))
"""


def start_stopped(specs: list[dict]) -> subprocess.Popen:
    """Start the helper on ``[{"args", "point", "signal", "log"}]``: it runs each in a fork of itself."""
    return subprocess.Popen([sys.executable, "-c", FORK_SERVER, json.dumps(specs), str(torch.get_num_threads()),
                             str(BATCHES_PER_STEP)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent)


def stopped_results(proc: subprocess.Popen, specs: list[dict]) -> list[dict]:
    """What each stopped build ended with (its signal or exit status, and its log)."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    results = json.loads(out.strip().splitlines()[-1])
    for spec, res in zip(specs, results, strict=True):
        res["log"] = Path(spec["log"]).read_text()
    return results


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


# mode -> (point, signal, the checkpoint's steps the stop leaves: the last complete one)
STOPS = {
    "compact": [("step:2", signal.SIGKILL, 2), ("ckpt-write:1", signal.SIGKILL, None),
                ("ckpt-commit:3", signal.SIGKILL, 2), ("artifact-write", signal.SIGKILL, STEPS)],
    "no-compact": [("step:1", signal.SIGKILL, 1), ("ckpt-write:2", signal.SIGKILL, 1),
                   ("artifact-write", signal.SIGKILL, STEPS)],
    "signals": [("step:3", signal.SIGTERM, 3), ("step:2", signal.SIGINT, 2),
                ("ckpt-write:3", signal.SIGTERM, 2),  # its half-written temporary goes, the second checkpoint stays
                ("step:0", signal.SIGINT, None)],  # before the first step completes: nothing at all is left
}


@pytest.fixture(scope="module")
def helper(inputs, tmp_path_factory):
    """The helper running every stopped build, started at once (it runs while this process builds the
    reference): (cases, process, specs)."""
    base, data = inputs
    root = tmp_path_factory.mktemp("resume-stopped")
    cases, specs = {}, []
    for mode, stops in STOPS.items():
        extra = ("--no-compact",) if mode == "no-compact" else ()
        for i, (point, signum, kept) in enumerate(stops):
            out = root / f"{mode}-{i}" / "art"
            args = build_args(base, data, out, *extra)
            specs.append({"args": args, "point": point, "signal": int(signum), "log": str(root / f"{mode}-{i}.log")})
            cases.setdefault(mode, []).append([point, signum, kept, out, args])
    proc = start_stopped(specs)
    yield cases, proc, specs
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def stopped(helper):
    """Every stopped build: mode -> [(point, signal, kept, out, args, result)]."""
    cases, proc, specs = helper
    results = iter(stopped_results(proc, specs))
    return {mode: [(*case, next(results)) for case in mode_cases] for mode, mode_cases in cases.items()}


@pytest.mark.parametrize("mode", ["compact", "no-compact"])
def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_ranking(helper, reference, stopped, mode):
    for point, _, kept, out, args, res in stopped[mode]:
        folder = resume_dir(out)
        assert res["signal"] == signal.SIGKILL, (point, res)
        assert not out.exists(), point  # never a half artifact at --out
        # what a kill leaves: the last complete checkpoint (full width: every structure of the table), and
        # temporaries of a dead writer, swept by the next run
        saved = load_checkpoint(folder)
        if kept is None:
            assert saved is None, point
        else:
            assert saved is not None and saved.doc.steps_done == kept, point
            state = saved.state()
            assert len(state.pruned) == saved.doc.structures == 4 * (4 + 96)
            assert int(state.pruned.sum()) == saved.doc.trajectory[-1].structures_removed
        if point.startswith("artifact-write"):
            assert any(n.startswith(".art.nestprune-tmp.") for n in entries(out.parent)), entries(out.parent)
        r = build([*args, "--resume"])
        assert r.exit_code == 0, (point, r.output)
        said = "resuming from the checkpoint" if kept else "no checkpoint of"
        assert said in r.output, (point, r.output)
        assert sha(out) == reference[mode], point
        assert entries(out.parent) == ["art"], (point, entries(out.parent))  # checkpoint, locks, temporaries gone
        assert read_manifest(out).schedule.steps_run == STEPS


# ---------------------------------------------------------------------------------------------
# SIGTERM / SIGINT
# ---------------------------------------------------------------------------------------------


def test_sigterm_and_sigint_keep_the_checkpoint_and_say_how_to_resume(helper, reference, stopped):
    for point, signum, kept, out, args, res in stopped["signals"]:
        folder = resume_dir(out)
        code, word = (143, "terminated") if signum == signal.SIGTERM else (130, "interrupted")
        assert res["code"] == code, (point, res)
        lines = [line for line in res["log"].splitlines() if line.startswith(word)]
        assert len(lines) == 1 and "Traceback" not in res["log"], res["log"]
        if kept is None:
            assert lines[0] == f"{word}: nothing was written"
            assert entries(out.parent) == []
            continue
        # no half-written temporary: the last complete checkpoint; beside --out no artifact, temporary or lock
        assert entries(folder) == ["checkpoint.json", f"state-{kept:06d}.safetensors"], point
        assert entries(out.parent) == [folder.name]
        assert lines[0].startswith(f"{word}: the artifact was not written; the checkpoint after {kept} of {STEPS} "
                                   f"step(s) is kept in {folder}. Resume with: "), lines[0]
        hint = lines[0].split("Resume with: ", 1)[1]
        assert shlex.split(hint) == ["nestprune", *args, "--resume"]
        r = build(shlex.split(hint)[1:])  # the command it prints continues the build
        assert r.exit_code == 0, r.output
        assert sha(out) == reference["compact"]
        assert entries(out.parent) == ["art"]


# ---------------------------------------------------------------------------------------------
# Refusals, messages and the checkpoint's life (in this process: an interrupt raised at a step)
# ---------------------------------------------------------------------------------------------


def interrupt_at_step(monkeypatch, step: int, batches_per_step: int = BATCHES_PER_STEP) -> None:
    """The build's next run raises KeyboardInterrupt in step ``step`` (after ``step`` checkpoints)."""
    from nestprune.objectives.lm import LanguageModeling

    real, seen = LanguageModeling.loss, {"n": 0}

    def loss(self, model, batch):
        seen["n"] += 1
        if seen["n"] == (step + 1) * batches_per_step:
            monkeypatch.setattr(LanguageModeling, "loss", real)
            raise KeyboardInterrupt
        return real(self, model, batch)

    monkeypatch.setattr(LanguageModeling, "loss", loss)


@pytest.fixture
def interrupted(inputs, tmp_path, monkeypatch):
    """A build to tmp_path/art interrupted in step 3: its checkpoint (3 steps) is beside --out."""
    base, data = inputs
    out = tmp_path / "art"
    interrupt_at_step(monkeypatch, 3)
    r = build(build_args(base, data, out))
    assert r.exit_code == 130, r.output
    assert read_doc(resume_dir(out)).steps_done == 3
    return out


def error_of(r) -> str:
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_a_resume_with_other_inputs_is_refused_naming_what_differs(inputs, interrupted, reference, tmp_path,
                                                                   tokenizer):
    base, data = inputs
    out = interrupted
    other_data = tmp_path / "other.txt"
    other_data.write_text(SAMPLE_TEXT.replace("kernel", "colonel"))
    other_base = save_tiny_model(make_tiny_model("llama", seed=1, vocab_size=len(tokenizer), intermediate_size=96),
                                 tokenizer, tmp_path / "other-base")
    cases = [
        (build_args(base, data, out, "--r-max", "0.5"), "--r-max (0.7 in the checkpoint, 0.5 now)"),
        (build_args(base, data, out, "--seed", "3"), "--seed (0 in the checkpoint, 3 now)"),
        (build_args(base, data, out, "--no-compact"), "--no-compact (false in the checkpoint, true now)"),
        (build_args(base, data, out, "--skip-last", "2"), "--skip-last (1 in the checkpoint, 2 now)"),
        (build_args(base, data, out, samples=6), "--samples (4 in the checkpoint, 6 now)"),
        (build_args(base, data, out, "--method", "gisp-oneshot", steps=None),
         '--method ("gisp" in the checkpoint, "gisp-oneshot" now)'),
        (build_args(base, data, out, "--batch-size", "4"), "the micro-batch (--batch-size) (2 in the checkpoint, 4 now)"),
        (build_args(base, other_data, out), "the calibration batches (data, tokenizer or window options) changed"),
        (build_args(other_base, data, out), "the base model's weights (content fingerprint) changed"),
    ]
    for args, said in cases:
        r = build([*args, "--resume"])
        assert r.exit_code == 2, (args, r.output)
        line = error_of(r)
        assert line.startswith(f"error: cannot resume from the checkpoint in {resume_dir(out)}"), line
        assert said in line, (said, line)
        assert line.count(" now)") + line.count(" changed") == 1, line  # only what differs is named
        assert not out.exists() and read_doc(resume_dir(out)).steps_done == 3  # the checkpoint is untouched
    # several differences: each named, in one line
    line = error_of(build([*build_args(base, data, out, "--r-max", "0.5", "--seed", "3"), "--resume"]))
    assert "--r-max (0.7" in line and "--seed (0" in line
    # the same inputs continue it
    r = build([*build_args(base, data, out), "--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming from the checkpoint" in r.output and f"3 of {STEPS} step(s) done" in r.output
    assert sha(out) == reference["compact"]
    assert entries(out.parent) == sorted(["art", "other.txt", "other-base"])


def test_a_rerun_without_resume_is_refused_in_one_line_and_force_starts_over(inputs, interrupted, reference):
    base, data = inputs
    out = interrupted
    folder = resume_dir(out)
    r = build(build_args(base, data, out))
    assert r.exit_code == 2
    assert error_of(r) == (f"error: {out} has the checkpoint of an interrupted build (3 of {STEPS} step(s) done) in "
                           f"{folder}; pass --resume to continue it, or --force to start over")
    assert read_doc(folder).steps_done == 3
    # --force without --resume: the checkpoint is discarded, the build starts over (and ends like the reference)
    r = build(build_args(base, data, out, "--force"))
    assert r.exit_code == 0, r.output
    assert "starting over: the build discards the checkpoint" in r.output
    assert sha(out) == reference["compact"] and entries(out.parent) == ["art"]


def test_resume_without_a_checkpoint_starts_from_the_beginning_and_says_so(inputs, reference, tmp_path):
    base, data = inputs
    out = tmp_path / "art"
    r = build([*build_args(base, data, out), "--resume"])
    assert r.exit_code == 0, r.output
    assert f"--resume: no checkpoint of {out} in {resume_dir(out)}; starting from the beginning" in \
        " ".join(r.output.split())
    assert sha(out) == reference["compact"] and entries(tmp_path) == ["art"]
    # a method without gradients keeps no checkpoint: --resume builds it from the beginning too
    r = build(["build", str(base), "--data", str(data), "--out", str(tmp_path / "mag"), "--method", "magnitude",
               "--samples", "4", "--seq-len", "16", "--resume"])
    assert r.exit_code == 0, r.output
    assert "starting from the beginning" in r.output and entries(tmp_path) == ["art", "mag"]


def test_a_damaged_checkpoint_is_refused_in_one_line(inputs, interrupted):
    base, data = inputs
    out = interrupted
    folder = resume_dir(out)
    state = next(folder.glob("state-*.safetensors"))
    raw = state.read_bytes()
    state.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # one bit
    line = error_of(build([*build_args(base, data, out), "--resume"]))
    assert line == (f"error: the checkpoint in {folder} is damaged ({state.name} does not match its sha256); remove "
                    "that folder, or rerun without --resume and with --force to start over")
    (folder / CHECKPOINT_JSON).write_text("{")
    assert "is damaged (checkpoint.json is not JSON" in error_of(build([*build_args(base, data, out), "--resume"]))
    # without --resume it is still a checkpoint: refused, and --force discards it
    assert "has a damaged checkpoint in" in error_of(build(build_args(base, data, out)))
    assert build(build_args(base, data, out, "--force")).exit_code == 0
    assert entries(out.parent) == ["art"]


def test_an_auto_batch_size_resumes_with_the_micro_batch_the_interrupted_run_chose(inputs, tmp_path, monkeypatch):
    """``--batch-size auto`` picks 4 windows (one micro-batch a step) here; the resumed run's plan would pick 2
    (a smaller cap): it continues with 4, so its gradient sums, and its ranking, are the uninterrupted run's."""
    import nestprune.rank.plan as plan_mod

    base, data = inputs
    assert build(build_args(base, data, tmp_path / "whole", batch="auto")).exit_code == 0
    out = tmp_path / "art"
    args = build_args(base, data, out, batch="auto")
    interrupt_at_step(monkeypatch, 2, batches_per_step=1)
    assert build(args).exit_code == 130
    assert read_doc(resume_dir(out)).inputs.run["micro_batch"] == 4
    monkeypatch.setattr(plan_mod, "CPU_MICRO_BATCH_TOKENS", 32)  # now auto would pick 32 // 16 = 2
    r = build([*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert "micro-batch 4" in r.output and sha(out) == sha(tmp_path / "whole")
    assert read_manifest(out).schedule.batch_size == 4


def test_a_second_build_to_the_same_out_is_refused_at_once(inputs, tmp_path):
    base, data = inputs
    out = tmp_path / "art"
    with atomic.lock(resume_dir(out)):  # what a running build holds
        r = build(build_args(base, data, out))
    assert r.exit_code == 2
    assert error_of(r) == (f"error: {out} is being built by another nestprune process; wait for it to finish or "
                           "choose another --out")


# ---------------------------------------------------------------------------------------------
# The checkpoint itself
# ---------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_the_state_and_every_generator(tmp_path):
    import random

    from nestprune.rank.gisp import GispState
    from nestprune.resume import capture_rng, restore_rng, save_checkpoint
    from nestprune.schemas.artifact import StepRecord
    from nestprune.schemas.resume import RunInputs

    n = 10
    state = GispState.start(n)
    for t, newly in enumerate((np.array([3, 1]), np.array([7]))):
        state.order.append(newly)
        state.pruned[newly] = True
        state.step[newly], state.score[newly], state.raw[newly] = t, 0.1 * (t + 1), 0.2 * (t + 1)
        state.trajectory.append(StepRecord(step=t, ratio=0.1, structures_removed=int(state.pruned.sum()),
                                           param_sparsity=0.1, loss=1.5, seconds=0.01))
    state.last_score, state.last_raw, state.t = np.linspace(0, 1, n), np.linspace(1, 2, n), 2
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    rng, rng_tensors = capture_rng(gen)
    expected = (random.random(), np.random.random(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    inputs = RunInputs(base_config_sha256="a" * 64, base_content_sha256="b" * 64, objective="lm",
                       objective_config=None, batches_sha256="c" * 64, method={"name": "gisp", "version": 1,
                                                                              "options": {}},
                       options={}, run={}, versions={})
    folder = tmp_path / ".art.nestprune-resume"
    save_checkpoint(folder, out=tmp_path / "art", inputs=inputs, state=state, steps_planned=4, rng=rng,
                    tensors={**rng_tensors, "calibration.windows": torch.arange(6).view(2, 3)}, elapsed=1.5)
    save_checkpoint(folder, out=tmp_path / "art", inputs=inputs, state=state, steps_planned=4, rng=rng,
                    tensors=rng_tensors, elapsed=1.5)  # the same step again: one arrays file
    assert entries(folder) == ["checkpoint.json", "state-000002.safetensors"]
    saved = load_checkpoint(folder)
    back = saved.state()
    for f in ("pruned", "step", "score", "raw", "last_score", "last_raw"):
        np.testing.assert_array_equal(getattr(back, f), getattr(state, f))
    assert [o.tolist() for o in back.order] == [[3, 1], [7]] and back.t == 2 and back.trajectory == state.trajectory
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    other = torch.Generator().manual_seed(9)
    restore_rng(saved.doc.rng, saved.tensors, other)
    assert (random.random(), np.random.random(), torch.rand(1).item(), torch.rand(1, generator=other).item()) == expected
    # an order that does not match the removed structures is a damaged checkpoint
    state.pruned[0] = True
    save_checkpoint(folder, out=tmp_path / "art", inputs=inputs, state=state, steps_planned=4, rng=rng,
                    tensors=rng_tensors, elapsed=1.5)
    with pytest.raises(NestpruneError, match="removal order does not match"):
        load_checkpoint(folder)


def test_replay_rebuilds_the_compacted_layout_step_by_step_and_the_run_continues_exactly(tokenizer, tmp_path):
    """Compaction's cuts depend on the widths before them (a block is cut only when it shrinks enough): from the
    base weights, one sync to the saved state would cut other widths and pad with other positions than the run
    did. ``Workspace.replay`` syncs once per saved step, reaching the run's very layout, and the run resumed
    from a checkpoint (``StepCheckpoints``) ends with the uninterrupted ranking, every score equal."""
    from nestprune.arch import Structures, arch_from_config
    from nestprune.objectives.lm import LanguageModeling
    from nestprune.rank.calibration import CalibrationSet, sample_windows, tokenize_documents
    from nestprune.rank.compact import CompactPolicy
    from nestprune.rank.gisp import Workspace, plan_gisp, run_gisp
    from nestprune.rank.methods import RankJob, SilentReporter
    from nestprune.resume import StepCheckpoints
    from nestprune.schemas.resume import RunInputs

    stream = tokenize_documents(SAMPLE_TEXT.split("\n\n"), tokenizer)
    objective = LanguageModeling(CalibrationSet(windows=sample_windows(stream, 4, 16, 0), source="mem", sha256="0" * 64,
                                                seed=0, documents=1, tokens_available=len(stream)))
    policy = CompactPolicy(channel_multiple=8, min_shrink=0.3)  # cuts whose widths depend on the history

    def fresh():
        model = make_tiny_model("llama", vocab_size=len(tokenizer), intermediate_size=96)
        arch = arch_from_config(model.config.to_dict(), set(model.state_dict()))
        job = RankJob(model=model, structures=Structures(arch), objective=objective, batch_size=2, seed=0,
                      max_sparsity=None, skip_first_frac=0.1, skip_last=1, compact_policy=policy)
        return model, plan_gisp(job, r_max=0.9, steps=6, one_shot=False, normalisation="reference")

    inputs = RunInputs(base_config_sha256="a" * 64, base_content_sha256="b" * 64, objective="lm", objective_config=None,
                       batches_sha256="c" * 64, method={"name": "gisp", "version": 1, "options": {}}, options={},
                       run={}, versions={})
    folder = tmp_path / ".art.nestprune-resume"
    layouts = []

    class UpToStep5(StepCheckpoints):  # the checkpoint a kill in step 5 leaves; the layout after each step
        def step_done(self, plan, state, work):
            layouts.append({layer: (lay.attn.copy(), lay.mlp.copy()) for layer, lay in work.layout.items()})
            if state.t <= 5:
                super().step_done(plan, state, work)

    model, plan = fresh()
    whole, _ = run_gisp(model, objective, plan, SilentReporter(), hooks=UpToStep5(folder, tmp_path / "art", inputs))
    saved = load_checkpoint(folder)
    assert saved.doc.steps_done == 5 and len(layouts) == 6

    def same(work, layout):
        return all(np.array_equal(work.layout[k].attn, a) and np.array_equal(work.layout[k].mlp, m)
                   for k, (a, m) in layout.items())

    model, plan = fresh()
    once = Workspace(model, plan)
    once.sync(saved.state())
    assert not same(once, layouts[4])  # the control: one sync from the base reaches another layout
    once.restore()
    model, plan = fresh()
    replayed = Workspace(model, plan)
    replayed.replay(saved.state())
    assert same(replayed, layouts[4])
    replayed.restore()
    model, plan = fresh()
    resumed, state = run_gisp(model, objective, plan, SilentReporter(),
                              hooks=StepCheckpoints(folder, tmp_path / "art", inputs, saved))
    assert state.t == 6 and len(state.trajectory) == 6
    for f in ("layer", "kind", "index", "step", "score", "raw_score"):
        np.testing.assert_array_equal(getattr(resumed, f), getattr(whole, f))


def test_a_checkpoint_write_that_fails_before_its_commit_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """The arrays are written, the document is not (Ctrl-C, a full disk): the new arrays go, the previous
    checkpoint stays exactly as it was, and nothing else is left in the folder."""
    from nestprune.rank.gisp import GispState
    from nestprune.resume import capture_rng, save_checkpoint
    from nestprune.schemas.artifact import StepRecord
    from nestprune.schemas.resume import RunInputs

    inputs = RunInputs(base_config_sha256="a" * 64, base_content_sha256="b" * 64, objective="lm", objective_config=None,
                       batches_sha256="c" * 64, method={"name": "gisp", "version": 1, "options": {}}, options={},
                       run={}, versions={})
    state = GispState.start(4)
    state.last_score, state.last_raw = np.zeros(4), np.zeros(4)
    rng, rng_tensors = capture_rng(None)
    folder = tmp_path / ".art.nestprune-resume"

    def step(t: int) -> None:
        state.order.append(np.array([t]))
        state.pruned[t] = True
        state.trajectory.append(StepRecord(step=t, ratio=0.1, structures_removed=t + 1, param_sparsity=0.1, loss=None,
                                           seconds=0.0))
        state.t = t + 1
        save_checkpoint(folder, out=tmp_path / "art", inputs=inputs, state=state, steps_planned=4, rng=rng,
                        tensors=rng_tensors, elapsed=0.0)

    step(0)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = atomic.write_file

    def interrupted(path, data, **kw):
        if Path(path).name == CHECKPOINT_JSON:
            raise KeyboardInterrupt
        return real(path, data, **kw)

    monkeypatch.setattr(atomic, "write_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        step(1)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert load_checkpoint(folder).doc.steps_done == 1


def test_the_resume_hint_under_torchrun_relaunches_as_many_ranks(monkeypatch):
    from nestprune.cli import build as cli_build

    monkeypatch.setattr(cli_build, "invocation", lambda: ["build", "m", "--data", "d x", "--out", "a"])
    assert cli_build.resume_command({}) == "nestprune build m --data 'd x' --out a --resume"
    one_node = cli_build.resume_command({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "RANK": "0"})
    assert one_node == "torchrun --nproc-per-node=4 -m nestprune build m --data 'd x' --out a --resume"
    two_nodes = cli_build.resume_command({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "RANK": "0"})
    assert two_nodes.startswith("torchrun --nproc-per-node=8 --nnodes=2 -m nestprune build m ")
    assert two_nodes.endswith("--resume (with the same rendezvous options)")
