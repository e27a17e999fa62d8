"""nestprune.io.atomic: outputs appear whole or not at all; temporaries are named, listed, swept; a lock; a swap
with no moment where the output is missing; inputs never replaced; the umask honoured."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nestprune.errors import NestpruneError
from nestprune.io import atomic

TESTS = Path(__file__).resolve().parent


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def record_states(monkeypatch, state) -> list:
    """Record ``state()`` before and after every call that renames or deletes (os.rename, os.replace,
    shutil.rmtree, atomic.rename2) from now on; returns the list it fills."""
    import shutil

    seen: list = []

    def watch(fn):
        def wrapped(*a, **k):
            seen.append(state())
            r = fn(*a, **k)
            seen.append(state())
            return r
        return wrapped

    for mod, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree"), (atomic, "rename2")):
        monkeypatch.setattr(mod, name, watch(getattr(mod, name)))
    return seen


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def write_dir(out: Path, marker: str, **kw) -> None:
    with atomic.output_dir(out, **kw) as tmp:
        (tmp / marker).write_text(marker)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("x")


# --- names ---------------------------------------------------------------------------------------------------

def test_temporaries_carry_host_and_pid_and_are_recognised(tmp_path):
    t = atomic.temp_path(tmp_path / "v.d")
    assert t.parent == tmp_path and t.name.startswith(".v.d.nestprune-tmp.")
    assert atomic.writer_of(t) == (atomic.HOST, os.getpid())
    assert not atomic.is_stale(t)  # this process is alive
    stale = tmp_path / f".v.d.nestprune-tmp.{atomic.HOST}.{dead_pid()}.0a1b"
    assert atomic.is_stale(stale)
    assert not atomic.is_stale(tmp_path / f".v.d.nestprune-tmp.another-host.{dead_pid()}.0a1b")
    assert atomic.writer_of(tmp_path / ".v.d.nestprune-lock") is None
    assert atomic.writer_of(tmp_path / ".v.d.4f2a.tmp") is None
    long = "x" * 300
    assert len(atomic.temp_path(tmp_path / long).name) < 255
    assert atomic.stem(long) == atomic.stem(long) != atomic.stem(long[:-1] + "y")


# --- output_dir ----------------------------------------------------------------------------------------------

def test_output_dir_appears_whole_and_leaves_nothing_else(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    write_dir(out, "new")
    assert entries(out) == ["new", "sub"] and entries(out.parent) == ["out"]
    assert atomic.live() == []


def test_exception_removes_the_temporary_and_publishes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic.output_dir(out) as tmp:
        (tmp / "half").write_text("x")
        assert atomic.live() == [tmp]
        raise RuntimeError("boom")
    assert entries(tmp_path) == [] and atomic.live() == []


def test_existing_out_is_refused_without_force_and_replaced_with_it(tmp_path):
    out = tmp_path / "out"
    write_dir(out, "old")
    with pytest.raises(NestpruneError, match="already exists; pass --force"):
        write_dir(out, "new")
    assert entries(out) == ["old", "sub"]
    write_dir(out, "new", force=True)
    assert entries(out) == ["new", "sub"] and entries(tmp_path) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NestpruneError, match="is not a directory"):
        write_dir(tmp_path / "file", "new", force=True)
    assert (tmp_path / "file").read_text() == "x"


def test_force_swaps_with_no_moment_where_out_is_missing(tmp_path, monkeypatch):
    """Every rename and delete happens while ``out`` holds the whole old or the whole new output."""
    out = tmp_path / "out"
    write_dir(out, "old")

    def state() -> str:
        names = set(os.listdir(out)) if out.is_dir() else set()
        return "old" if names == {"old", "sub"} else "new" if names == {"new", "sub"} else f"broken {names}"

    seen = record_states(monkeypatch, state)
    write_dir(out, "new", force=True)
    assert seen and set(seen) <= {"old", "new"}, seen
    assert seen[0] == "old" and seen[-1] == "new" and entries(tmp_path) == ["out"]


def test_force_without_renameat2_falls_back_to_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", None)
    out = tmp_path / "out"
    write_dir(out, "old")
    write_dir(out, "new", force=True)
    assert entries(out) == ["new", "sub"] and entries(tmp_path) == ["out"]
    write_dir(tmp_path / "fresh", "new")
    assert entries(tmp_path / "fresh") == ["new", "sub"]


def test_file_system_refusing_the_exchange_falls_back(tmp_path, monkeypatch):
    import ctypes
    import errno

    flags_seen = []

    def refusing_renameat2(olddirfd, old, newdirfd, new, flags):  # like a file system without the flags
        flags_seen.append(flags)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(atomic, "_renameat2", refusing_renameat2)
    out = tmp_path / "out"
    write_dir(out, "old")
    write_dir(out, "new", force=True)
    assert entries(out) == ["new", "sub"] and entries(tmp_path) == ["out"]
    assert flags_seen == [atomic.RENAME_NOREPLACE, atomic.RENAME_EXCHANGE]


def test_renameat2_is_used_on_linux(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    assert atomic._renameat2 is not None
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("A")
    b.write_text("B")
    assert atomic.rename2(a, b, atomic.RENAME_EXCHANGE)
    assert a.read_text() == "B" and b.read_text() == "A"
    with pytest.raises(FileExistsError):
        atomic.rename2(a, b, atomic.RENAME_NOREPLACE)


def test_out_appearing_meanwhile_is_not_clobbered(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NestpruneError, match="appeared while it was being written"), atomic.output_dir(out) as tmp:
        (tmp / "new").write_text("x")
        out.mkdir()  # another program made it
        (out / "theirs").write_text("keep")
    assert entries(out) == ["theirs"] and entries(tmp_path) == ["out"]


@pytest.mark.parametrize("mask,dirs,files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640), (0o002, 0o775, 0o664)])
def test_outputs_honour_the_umask(tmp_path, mask, dirs, files):
    with umask(mask):
        write_dir(tmp_path / "out", "new")
        atomic.write_file(tmp_path / "keys" / "k", b"data")
    assert (tmp_path / "out").stat().st_mode & 0o777 == dirs
    assert (tmp_path / "out" / "new").stat().st_mode & 0o777 == files
    assert (tmp_path / "keys" / "k").stat().st_mode & 0o777 == files


# --- inputs ---------------------------------------------------------------------------------------------------

def test_an_input_or_a_folder_holding_one_is_never_replaced(tmp_path):
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (base / "w").write_text("weights")
    for out in (base, tmp_path / "models", tmp_path):
        with pytest.raises(NestpruneError, match="the input"):
            write_dir(out, "new", force=True, inputs=[base])
    link = tmp_path / "link"
    link.symlink_to(base)
    with pytest.raises(NestpruneError, match="is the input"):
        write_dir(link, "new", force=True, inputs=[base])
    assert (base / "w").read_text() == "weights" and entries(base) == ["w"]
    write_dir(base / "variant", "new", inputs=[base])  # inside an input is fine: nothing is replaced
    assert entries(base) == ["variant", "w"]


def test_check_out_creates_nothing(tmp_path):
    atomic.check_out(tmp_path / "a" / "b" / "out")
    assert entries(tmp_path) == []


# --- the lock -------------------------------------------------------------------------------------------------

def test_a_second_writer_fails_at_once(tmp_path):
    out = tmp_path / "out"
    with atomic.output_dir(out) as tmp:
        (tmp / "first").write_text("x")
        started = time.perf_counter()
        with pytest.raises(NestpruneError, match=rf"{out} is being written by another nestprune process \(pid "
                                                 rf"{os.getpid()} on {atomic.HOST}\)"):
            write_dir(out, "second")
        assert time.perf_counter() - started < 1.0
    assert entries(out) == ["first"] and entries(tmp_path) == ["out"]  # the lock file is gone too


def test_a_writer_in_another_process_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, pathlib
        from nestprune.io import atomic
        with atomic.lock(pathlib.Path({str(out)!r})):
            pathlib.Path({str(ready)!r}).write_text("locked")
            time.sleep(60)
    """)])
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        with pytest.raises(NestpruneError, match=f"pid {holder.pid}"):
            write_dir(out, "mine")
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    write_dir(out, "mine")  # the lock died with its holder; its lock file does not block
    assert entries(out) == ["mine", "sub"] and sorted(entries(tmp_path)) == ["out", "ready"]


# --- temporaries: cleanup and sweeping ------------------------------------------------------------------------

def test_cleanup_removes_every_live_temporary(tmp_path):
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(atomic.tracked(atomic.temp_path(tmp_path / "d")))
        d.mkdir()
        (d / "f").write_text("x")
        f = stack.enter_context(atomic.tracked(atomic.temp_path(tmp_path / "f")))
        f.write_text("x")
        assert set(atomic.live()) == {d, f}
        assert set(atomic.cleanup()) == {d, f}
        assert entries(tmp_path) == [] and atomic.live() == []


def test_stale_temporaries_are_swept_by_the_next_writer_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    pid = dead_pid()
    stale_dir = tmp_path / f".out.nestprune-tmp.{atomic.HOST}.{pid}.aa"
    stale_old = tmp_path / f".out.nestprune-old.{atomic.HOST}.{pid}.bb"
    stale_scratch = tmp_path / f".out.nestprune-scratch.{atomic.HOST}.{pid}.cc"
    alive = tmp_path / f".out.nestprune-tmp.{atomic.HOST}.{os.getppid()}.dd"
    elsewhere = tmp_path / f".out.nestprune-tmp.other-host.{pid}.ee"
    other_output = tmp_path / f".out2.nestprune-tmp.{atomic.HOST}.{pid}.ff"
    for p in (stale_dir, stale_old, stale_scratch, alive, elsewhere, other_output):
        p.mkdir()
        (p / "x").write_text("x")
    (tmp_path / ".out.nestprune-lock").write_text(f"{atomic.HOST} {pid}\n")  # left by a killed writer
    write_dir(out, "new")
    assert entries(tmp_path) == sorted([alive.name, elsewhere.name, other_output.name, "out"])


def test_write_file_sweeps_its_directory_once(tmp_path):
    keys = tmp_path / "blobs"
    keys.mkdir()
    stale = keys / f".abc.nestprune-tmp.{atomic.HOST}.{dead_pid()}.01"
    stale.write_bytes(b"half")
    atomic.write_file(keys / "abc", b"whole")
    assert entries(keys) == ["abc"] and (keys / "abc").read_bytes() == b"whole"
    stale.write_bytes(b"half")  # the same process does not list the directory again
    atomic.write_file(keys / "abd", b"x")
    assert stale.exists()


def test_write_file_failure_leaves_the_old_bytes(tmp_path, monkeypatch):
    path = tmp_path / "k"
    atomic.write_file(path, b"old")

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", broken)
    with pytest.raises(OSError):
        atomic.write_file(path, b"new")
    assert path.read_bytes() == b"old" and entries(tmp_path) == ["k"]


def test_scratch_dir_is_removed_whatever_happens(tmp_path):
    with atomic.scratch_dir(tmp_path / "sub" / "out") as work:
        (work / "f").write_text("x")
        assert work.name.startswith(".out.nestprune-scratch.")
    with pytest.raises(RuntimeError), atomic.scratch_dir(tmp_path / "sub" / "out") as work:
        raise RuntimeError
    assert entries(tmp_path / "sub") == []


# --- a real writer killed with SIGKILL ------------------------------------------------------------------------

CHILD = """
import pathlib, sys, time
sys.path.insert(0, {tests!r})
from test_variant import ranking_for
import nestprune.variant.hf as hf
from nestprune.io.weights import SafetensorsSource
from nestprune.variant.materialize import materialize_variant
from nestprune.variant.widths import plan_variant

base, out, marker = (pathlib.Path(a) for a in sys.argv[1:4])
ranking = ranking_for(base, "query", seed=9, prunable_layers=[1, 2])
real, calls = hf.write_all, []

def slow(fd, data):
    real(fd, data)
    calls.append(1)
    if len(calls) == 3:  # mid-write: a shard is half on disk
        marker.write_text("writing")
        time.sleep(120)

hf.write_all = slow
with SafetensorsSource(base) as src:
    materialize_variant(src, ranking, plan_variant(ranking, 0.3), base, out, shard_bytes=20_000)
"""


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never started writing"
        time.sleep(0.05)


def test_sigkill_mid_write_leaves_a_temporary_the_next_run_sweeps(tiny_model_dir, tmp_path):
    from test_variant import ranking_for, write_variant

    base = tiny_model_dir("llama-gqa")
    out, marker = tmp_path / "variants" / "v", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS)), str(base), str(out), str(marker)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(marker, child)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    left = entries(out.parent)
    temp = f".v.nestprune-tmp.{atomic.HOST}.{child.pid}."
    assert not out.exists() and any(n.startswith(temp) for n in left), left
    assert ".v.nestprune-lock" in left  # a lock file with no holder: it does not block the next run
    ranking = ranking_for(base, "query", seed=9, prunable_layers=[1, 2])
    write_variant(base, ranking, out, 0.3, shard_bytes=20_000)
    assert entries(out.parent) == ["v"]
    assert (out / "model.safetensors.index.json").exists()


def test_fallback_puts_the_old_output_back_if_the_new_cannot_be_renamed_in(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", None)
    out = tmp_path / "out"
    write_dir(out, "old")
    real_rename = os.rename

    def failing_second_rename(src, dst):
        if Path(src).name.startswith(".out.nestprune-tmp."):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="Input/output"):
        write_dir(out, "new", force=True)
    assert entries(out) == ["old", "sub"] and entries(tmp_path) == ["out"]
