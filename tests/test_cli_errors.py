"""The one error path of the command line: every bad option, path and fault is one ``error:`` line with a
documented exit status (2 usage / bad input, 1 fault), nothing written, nothing left behind; -h, --version,
plain help, pipes; read-only destinations and full disks (simulated, and real tmpfs mounts where possible)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_model, save_tiny_model
from typer.testing import CliRunner

from nestprune.build import BuildConfig, build_artifact
from nestprune.cli.main import COMMAND_MODULES, app

runner = CliRunner()
COMMANDS = ["build", "inspect", "materialize", "eval", "lm-eval", "push", "pull", "list", "tag"]


def one_error_line(result, code: int = 2) -> str:
    """The output is exactly one non-empty line, starting with ``error:``; the exit status is ``code``."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and "╭" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("cli-errors")
    base = save_tiny_model(make_tiny_model("llama-gqa", vocab_size=len(tokenizer)), tokenizer, tmp / "base")
    (tmp / "calib.txt").write_text(SAMPLE_TEXT)
    cfg = BuildConfig(method="random", samples=2, seq_len=8, batch_size=2, max_sparsity=0.6)
    return base, build_artifact(base, tmp / "calib.txt", tmp / "art", cfg), tmp / "calib.txt"


@pytest.fixture(scope="module")
def registry(built, tmp_path_factory):
    from nestprune.registry import push

    base, art, _ = built
    reg = tmp_path_factory.mktemp("cli-errors-reg") / "reg"
    push(reg, art, base, name="m")
    return reg


# --- help, version, usage ---------------------------------------------------------------------------------

def test_every_command_is_registered_and_has_plain_help():
    assert len(COMMAND_MODULES) == 6
    for flag in ("-h", "--help"):
        r = runner.invoke(app, [flag])
        assert r.exit_code == 0 and r.output.startswith("Usage: ") and all(c in r.output for c in COMMANDS)
        for cmd in COMMANDS:
            r = runner.invoke(app, [cmd, flag])
            assert r.exit_code == 0 and r.output.startswith(f"Usage: nestprune {cmd} "), (cmd, r.output)
            # plain help: no boxes, no "<bool>" after flags such as --force
            assert "╭" not in r.output and "<bool>" not in r.output


def test_version():
    from nestprune import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"nestprune {__version__}"


def test_no_arguments_prints_the_help_as_a_usage_error():
    r = runner.invoke(app, [])
    assert r.exit_code == 2 and "Usage: " in r.output and "error" not in r.output


def test_help_and_checks_agree_on_the_sparsity_range(built, tmp_path):
    base, art, _ = built
    for cmd in ("materialize", "pull"):
        assert "in [0, 1)" in " ".join(runner.invoke(app, [cmd, "-h"]).output.split())
    for value in ("1.0", "1", "-0.1", "nan", "inf"):
        r = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", value,
                                "--out", str(tmp_path / "v")])
        assert "is not in [0, 1)" in one_error_line(r)
    assert not (tmp_path / "v").exists()


USAGE_ERRORS = [
    (["materialize", "A", "--out", "o"], "Missing option '--base'"),
    (["materialize", "--bogus"], "No such option: --bogus"),
    (["materialize", "A", "--base", "b", "--out", "o", "--sparsity", "x"], "Invalid value for '--sparsity'"),
    (["materialize", "A", "--base", "b", "--out", "o", "--layout", "diagonal"], "Invalid value for '--layout'"),
    (["materialize", "A", "--base", "b", "--out", "o", "--multiple-of", "0"], "Invalid value for '--multiple-of'"),
    (["materialize", "A", "--base", "b", "--out", "o", "--format", "onnx"], "Invalid value for '--format'"),
    (["materialize", "A", "--base", "b", "--out", "o", "--force", "yes"], "unexpected extra argument"),
    (["build", "M", "--steps", "many"], "Invalid value for '--steps'"),
    (["eval", "M", "--seq-len", "1"], "Invalid value for '--seq-len'"),
    (["push"], "Missing argument 'ARTIFACT'"),
    (["pull", "r", "--out", "o", "--params"], "Option '--params' requires an argument"),
    (["tag", "r"], "Missing argument 'NEW_TAG'"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
]


@pytest.mark.parametrize("argv,expect", USAGE_ERRORS, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in
                                                           enumerate(USAGE_ERRORS)])
def test_usage_errors_are_one_line_with_exit_2(argv, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(runner.invoke(app, argv))
    assert expect.lower() in line.lower() and "--help" in line
    assert list(tmp_path.iterdir()) == []


def test_markup_in_a_message_is_printed_as_is(tmp_path):
    odd = tmp_path / "model [red]v2[/red] [bold]"
    line = one_error_line(runner.invoke(app, ["inspect", str(odd)]))
    assert f"{odd} is not a nestprune artifact" in line


def test_inspect_is_not_cut_at_80_columns_in_a_pipe(built, tmp_path, tokenizer):
    _, _, calib = built
    base = save_tiny_model(make_tiny_model("llama", num_layers=2, intermediate_size=2048, vocab_size=len(tokenizer)),
                           tokenizer, tmp_path / "wide")
    art = build_artifact(base, calib, tmp_path / "art", BuildConfig(method="random", samples=2, seq_len=8,
                                                                    batch_size=2, max_sparsity=0.6))
    levels = ",".join(f"{x / 100:.2f}" for x in range(4, 48, 4))  # 11 columns of "4/2048": wider than 80
    r = runner.invoke(app, ["inspect", str(art), "--levels", levels])
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if "layer" in line and "%" in line)
    assert len(header) > 80 and all(f"{x}%" in header for x in range(4, 48, 4))
    assert not any("…" in line for line in r.output.splitlines() if "┃" in line or "│" in line)
    achieved = next(line for line in r.output.splitlines() if "achieved" in line)
    assert achieved.count("%") == 11 and "…" not in achieved


# --- library errors, faults ---------------------------------------------------------------------------------

def test_internal_errors_are_one_line_with_exit_1(built, tmp_path, monkeypatch):
    import nestprune.variant.materialize as mat

    base, art, _ = built

    def boom(*a, **k):
        raise RuntimeError("something [nobody] expected\nsecond line")

    monkeypatch.setattr(mat, "plan_target", boom)
    r = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", "0.2",
                            "--out", str(tmp_path / "v")])
    line = one_error_line(r, 1)
    assert "internal error (RuntimeError: something [nobody] expected)" in line and "NESTPRUNE_TRACEBACK" in line
    monkeypatch.setenv("NESTPRUNE_TRACEBACK", "1")
    r = runner.invoke(app, ["materialize", str(art), "--base", str(base), "--sparsity", "0.2",
                            "--out", str(tmp_path / "v")])
    assert isinstance(r.exception, RuntimeError)


def _raise(code: int, path: object):
    raise OSError(code, os.strerror(code), str(path))


def read_only(monkeypatch, root: Path) -> None:
    """Simulate a read-only file system at ``root``: creating anything below it fails with EROFS."""
    real_open, real_mkdir = os.open, os.mkdir
    root = str(root)

    def below(path) -> bool:
        return os.path.abspath(os.fsdecode(path)).startswith(root + os.sep)

    def guarded_open(path, flags, *a, **k):
        if below(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            _raise(errno.EROFS, path)
        return real_open(path, flags, *a, **k)

    def guarded_mkdir(path, *a, **k):
        if below(path):
            _raise(errno.EROFS, path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def full_disk(monkeypatch, after: int = 2) -> None:
    """Simulate a disk that fills up: every os.write / pwrite / pwritev of more than 64 bytes after the first
    ``after`` fails (ENOSPC), and copy_file_range with it."""
    calls = []

    def failing(real, size):
        def write(fd, data, *rest):
            if size(data) > 64:
                calls.append(1)
                if len(calls) > after:
                    _raise(errno.ENOSPC, None)
            return real(fd, data, *rest)

        return write

    def copy_file_range(*a, **k):
        _raise(errno.ENOSPC, None)

    monkeypatch.setattr(os, "write", failing(os.write, len))
    monkeypatch.setattr(os, "pwrite", failing(os.pwrite, len))
    monkeypatch.setattr(os, "pwritev", failing(os.pwritev, lambda bufs: sum(len(memoryview(b)) for b in bufs)))
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)


def nothing_left(directory: Path, allowed: set[str] = frozenset()) -> None:
    left = {p.name for p in directory.iterdir()} - set(allowed)
    assert not left, left


def test_read_only_destination_simulated(built, registry, tmp_path, monkeypatch):
    base, art, calib = built
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    cases = [["materialize", str(art), "--base", str(base), "--sparsity", "0.2", "--out", str(ro / "v")],
             ["pull", f"{registry}/m", "--sparsity", "0.2", "--out", str(ro / "p")],
             ["push", str(art), "--base", str(base), str(ro / "reg"), "--name", "m"],
             ["build", str(base), "--data", str(calib), "--out", str(ro / "art"), "--method", "random",
              "--samples", "2", "--seq-len", "8", "--batch-size", "2"]]
    for argv in cases:
        line = one_error_line(runner.invoke(app, argv), 2)
        assert line.startswith("error: Read-only file system: ") and str(ro) in line, line
        assert ".nestprune-" not in line  # the output's name, not a temporary's
        nothing_left(ro)


def test_full_disk_simulated(built, registry, tmp_path, monkeypatch):
    base, art, _ = built
    out = tmp_path / "out"
    out.mkdir()
    full_disk(monkeypatch)
    for argv in (["materialize", str(art), "--base", str(base), "--sparsity", "0.2", "--out", str(out / "v")],
                 ["pull", f"{registry}/m", "--sparsity", "0.2", "--out", str(out / "p")]):
        line = one_error_line(runner.invoke(app, argv), 1)
        assert "No space left on device" in line and "the disk is full; nothing was written" in line
        nothing_left(out)


# --- real file systems: a tiny tmpfs and a read-only one (in a user and mount namespace) ---------------------

NAMESPACE_SCRIPT = r"""
import json, os, sys
from pathlib import Path
from typer.testing import CliRunner
from nestprune.cli.main import app

base, art, calib, registry, full, ro = sys.argv[1:7]
runs = {
    "materialize": ["materialize", art, "--base", base, "--sparsity", "0.2", "--out", "{d}/v"],
    "pull": ["pull", registry + "/m", "--sparsity", "0.2", "--out", "{d}/p", "--no-cache"],
    "build": ["build", base, "--data", calib, "--out", "{d}/art", "--method", "random", "--samples", "2",
              "--seq-len", "8", "--batch-size", "2"],
    "push": ["push", art, "--base", base, "{d}/reg", "--name", "m"],
}
results = []
for name, argv in runs.items():
    for d in (full, ro):
        before = {str(p.relative_to(d)) for p in Path(d).rglob("*")}
        r = CliRunner().invoke(app, [a.format(d=d) for a in argv])
        left = sorted({str(p.relative_to(d)) for p in Path(d).rglob("*")} - before)
        results.append({"cmd": name, "where": "full" if d == full else "ro", "code": r.exit_code,
                        "output": r.output, "left": left})
print("RESULTS " + json.dumps(results))
"""


def namespaces_work() -> bool:
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not namespaces_work(), reason="needs unprivileged user + mount namespaces (unshare -rm)")
def test_full_and_read_only_file_systems_for_real(built, registry, tmp_path):
    base, art, calib = built
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    script = tmp_path / "inner.py"
    script.write_text(NAMESPACE_SCRIPT)
    shell = (f"mount -t tmpfs -o size=8k tmpfs {full} && mount -t tmpfs -o size=1m tmpfs {ro} && "
             f"mount -o remount,ro {ro} && exec {sys.executable} {script} {base} {art} {calib} {registry} {full} {ro}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, timeout=600,
                          env=env)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and marker, proc.stderr[-3000:]
    results = json.loads(marker[0].removeprefix("RESULTS "))
    assert len(results) == 8
    for r in results:
        lines = [line for line in r["output"].splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r["output"], r
        if r["where"] == "ro":
            assert r["code"] == 2 and "Read-only file system" in lines[0], r
            assert r["left"] == [], r
        else:
            assert r["code"] == 1 and "No space left on device" in lines[0], r
            # a push may keep the complete blobs it uploaded (content-addressed, reused by a retry), never a
            # temporary, a lease or a version record (the empty leases/ folder is the registry's own); everything
            # else leaves nothing at all
            left = [p for p in r["left"]
                    if not (r["cmd"] == "push" and (p.startswith("reg/blobs") or p in ("reg", "reg/leases")))]
            assert left == [] and not any("nestprune-" in p for p in r["left"]), r
    assert not any(p.exists() for p in (full / "v", ro / "v"))  # the mounts are gone: nothing was written here


# --- pickles ---------------------------------------------------------------------------------------------------

def test_eval_and_load_variant_never_unpickle(tmp_path, tokenizer, monkeypatch):
    from nestprune.errors import NestpruneError
    from nestprune.variant.load import load_variant

    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    d = save_tiny_model(model, tokenizer, tmp_path / "m")
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(NestpruneError, match="nestprune never unpickles. Convert them once"):
        load_variant(d)
    (tmp_path / "ppl.txt").write_text(SAMPLE_TEXT)
    line = one_error_line(runner.invoke(app, ["eval", str(d), "--ppl", str(tmp_path / "ppl.txt")]))
    assert "holds only pickled weights" in line and "save_pretrained(safe_serialization=True)" in line
    # a .pt next to the safetensors is never read either
    save_tiny_model(model, tokenizer, tmp_path / "both")
    torch.save(model.state_dict(), tmp_path / "both" / "pytorch_model.bin")
    assert load_variant(tmp_path / "both") is not None


def test_corrupt_config_of_a_variant_is_one_line(tmp_path, tokenizer):
    d = save_tiny_model(make_tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, tmp_path / "m")
    (tmp_path / "ppl.txt").write_text(SAMPLE_TEXT)
    (d / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in one_error_line(
        runner.invoke(app, ["eval", str(d), "--ppl", str(tmp_path / "ppl.txt")]))
    cfg = json.loads(json.dumps({"model_type": "llama", "nestprune": {"layout": "per-layer", "layers": [{}]}}))
    (d / "config.json").write_text(json.dumps(cfg))
    line = one_error_line(runner.invoke(app, ["eval", str(d), "--ppl", str(tmp_path / "ppl.txt")]))
    assert line.startswith("error: ")
