"""Atomic outputs: what nestprune writes appears whole at its path or not at all, and leaves nothing behind.

One module for every writer (variants, artifacts, registry keys, the chunk cache, proxies):

checks       ``check_out`` refuses an existing path without ``force``, and — with or without it — a path that
             is an input of the run or an ancestor of one (replacing it would delete what is being read). It
             creates nothing, so a run that fails its checks leaves no directory behind.
temporaries  ``.{name}.nestprune-{kind}.{host}.{pid}.{token}`` next to the output ``name``: the writer's host
             and pid are in the name, so a later run can tell a stale one (its writer is dead) from a live
             one. Every temporary is listed in a process-wide table while it exists; ``cleanup()`` removes
             what is listed (the CLI calls it when SIGTERM/SIGINT stops a command), and an exception inside
             ``output_dir`` / ``write_file`` / ``scratch_dir`` removes it too.
sweeping     a run that writes to a place first removes the temporaries there whose writer ran on this host
             and is dead (what a SIGKILL leaves; nothing else can leave one).
locking      ``output_dir`` holds an advisory lock (``fcntl.flock`` on ``.{name}.nestprune-lock``, deleted
             when done) while it writes: a second writer to the same path fails at once with one line.
replacing    with ``force`` the finished output is swapped in with ``renameat2(RENAME_EXCHANGE)`` (Linux ≥ 3.15
             with glibc ≥ 2.28, on ext4, xfs, btrfs, tmpfs …), so the path never stops existing; then the old
             output is deleted. Where the exchange is not offered (other systems, file systems that refuse it)
             the old output is renamed aside and the new one renamed in: the path is missing for the time
             between two renames (microseconds), and nothing else.
modes        directories are made with mode 0o777 and files with 0o666, less the umask (0755 / 0644 under the
             default umask), like ``cp``; ``tempfile.mkdtemp`` would make 0700.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from nestprune.errors import NestpruneError

HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "localhost"
KINDS = ("tmp", "old", "scratch")
_TEMP_RE = re.compile(r"\.nestprune-(?:tmp|old|scratch)\.([A-Za-z0-9_-]+)\.(\d+)\.[0-9a-f]+$")
_LIVE: dict[Path, None] = {}  # temporaries this process has made and not yet removed or published (ordered)
_SWEPT: set[Path] = set()  # directories ``write_file`` has swept in this process

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


# --- names ----------------------------------------------------------------------------------------------------

def stem(name: str) -> str:
    """The output's name as temporaries carry it (long names shortened, so a temporary's name stays < 255)."""
    return name if len(name) <= 120 else f"{name[:80]}~{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """A fresh temporary's path next to ``target``, named with this host and pid."""
    if kind not in KINDS:
        raise ValueError(f"unknown temporary kind {kind!r}")
    target = Path(target)
    return target.parent / f".{stem(target.name)}.nestprune-{kind}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}"


def lock_path(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{stem(target.name)}.nestprune-lock"


def writer_of(path: Path) -> tuple[str, int] | None:
    """(host, pid) of the process that made temporary ``path``, or None if ``path`` is not one."""
    found = _TEMP_RE.search(Path(path).name)
    return (found.group(1), int(found.group(2))) if found else None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, OSError):
        return False
    return True


def is_stale(path: Path) -> bool:
    """A temporary whose writer ran on this host and is no longer running."""
    who = writer_of(path)
    return who is not None and who[0] == HOST and not pid_alive(who[1])


# --- the table of live temporaries -----------------------------------------------------------------------------

def remove(path: Path) -> None:
    """Delete a file, link or directory tree; nothing if it is gone."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            path.unlink()


def live() -> list[Path]:
    """The temporaries this process holds now."""
    return list(_LIVE)


def cleanup() -> list[Path]:
    """Remove every temporary this process holds (for signal handlers and last-resort exits)."""
    removed = []
    for path in tuple(_LIVE):
        remove(path)
        _LIVE.pop(path, None)
        removed.append(path)
    return removed


@contextlib.contextmanager
def tracked(path: Path) -> Iterator[Path]:
    """List ``path`` as a live temporary while the block runs; remove it if the block raises."""
    _LIVE[path] = None
    try:
        yield path
    except BaseException:
        remove(path)
        raise
    finally:
        _LIVE.pop(path, None)


def sweep(target: Path) -> list[Path]:
    """Remove the stale temporaries of ``target`` (same name, this host, writer dead); returns them."""
    target = Path(target)
    prefix = f".{stem(target.name)}.nestprune-"
    return _sweep(target.parent, lambda name: name.startswith(prefix))


def sweep_dir(directory: Path) -> list[Path]:
    """Remove every stale temporary in ``directory`` (whatever output it was for)."""
    return _sweep(Path(directory), lambda name: name.startswith("."))


def _sweep(directory: Path, wanted) -> list[Path]:
    try:
        entries = [Path(e.path) for e in os.scandir(directory) if wanted(e.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    stale = [p for p in entries if is_stale(p)]
    for p in stale:
        remove(p)
    return stale


# --- checks ----------------------------------------------------------------------------------------------------

def check_out(out: Path, force: bool = False, inputs: Iterable[Path | str | None] = (),
              directory: bool = True) -> Path:
    """Refuse ``out`` if it exists (unless ``force``), if it is an input or holds one, or (``directory``) if it
    exists and is not a directory. Creates nothing."""
    out = Path(out)
    where = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        held = Path(inp).resolve()
        if held == where or where in held.parents:
            what = "is" if held == where else "holds"
            raise NestpruneError(f"--out {out} {what} the input {inp}; writing there would delete it, "
                                 "choose another --out")
    if os.path.lexists(out):
        if not force:
            raise NestpruneError(f"{out} already exists; pass --force to replace it")
        if directory and not out.is_dir():
            raise NestpruneError(f"{out} exists and is not a directory")
    return out


# --- renames ---------------------------------------------------------------------------------------------------

def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl < 1.2.?
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where this system or file system does not offer it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(dst))


def publish(tmp: Path, out: Path, force: bool = False) -> None:
    """Rename the finished ``tmp`` to ``out``. An existing ``out`` is refused, or with ``force`` exchanged with
    ``tmp`` in one step and then deleted (fallback: renamed aside just before ``tmp`` is renamed in)."""
    if force and os.path.lexists(out):
        if rename2(tmp, out, RENAME_EXCHANGE):
            remove(tmp)  # the old output, now at the temporary's name
            return
        aside = temp_path(out, "old")
        os.rename(out, aside)
        try:
            os.rename(tmp, out)  # the path is missing between these two renames
        except BaseException:
            os.rename(aside, out)  # put the old output back
            raise
        remove(aside)
        return
    try:
        done = rename2(tmp, out, RENAME_NOREPLACE)
    except FileExistsError:
        if force:
            return publish(tmp, out, force)
        raise NestpruneError(f"{out} appeared while it was being written; pass --force to replace it") from None
    if not done:
        if os.path.lexists(out) and not force:
            raise NestpruneError(f"{out} appeared while it was being written; pass --force to replace it")
        os.replace(tmp, out)


# --- locks -----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def lock(target: Path) -> Iterator[None]:
    """Hold the advisory write lock of ``target`` (its parent must exist), or fail at once with one line."""
    path = lock_path(target)
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f" (pid {holder[1]} on {holder[0]})" if len(holder) == 2 else ""
            raise NestpruneError(f"{target} is being written by another nestprune process{who}; "
                                 "wait for it to finish or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the file locked must still be the one at ``path``: a finishing writer deletes it
            st, now = os.fstat(fd), os.stat(path)
            current = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    else:  # pragma: no cover - only if other writers keep replacing the lock file
        raise NestpruneError(f"cannot lock {target}: its lock file keeps changing")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{HOST} {os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: a writer that opened it will see it is gone and retry
        os.close(fd)


# --- the three ways to write ----------------------------------------------------------------------------------

@contextlib.contextmanager
def output_dir(out: Path, *, force: bool = False, inputs: Iterable[Path | str | None] = ()) -> Iterator[Path]:
    """Write a directory atomically: yields an empty temporary directory; when the block ends without an
    exception it becomes ``out`` (replacing an existing one only with ``force``; never an input)."""
    inputs = tuple(inputs)
    out = check_out(out, force, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)  # only now: every check has passed
    with lock(out):
        check_out(out, force, inputs)  # again, under the lock
        sweep(out)
        with tracked(temp_path(out)) as tmp:
            os.mkdir(tmp, 0o777)
            yield tmp
            publish(tmp, out, force)


@contextlib.contextmanager
def output_file(out: Path, *, force: bool = False, inputs: Iterable[Path | str | None] = ()) -> Iterator[Path]:
    """Write a single file atomically: yields a temporary path (not yet created) to write; when the block ends
    without an exception that file becomes ``out`` (the same checks, lock and replacement as ``output_dir``)."""
    inputs = tuple(inputs)
    out = check_out(out, force, inputs, directory=False)
    out.parent.mkdir(parents=True, exist_ok=True)  # only now: every check has passed
    with lock(out):
        check_out(out, force, inputs, directory=False)
        sweep(out)
        with tracked(temp_path(out)) as tmp:
            yield tmp
            if not tmp.exists():
                raise NestpruneError(f"internal: nothing was written for {out}")
            publish(tmp, out, force)


@contextlib.contextmanager
def scratch_dir(near: Path) -> Iterator[Path]:
    """A temporary working directory next to ``near`` (created with its parents), removed when the block ends."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    with tracked(temp_path(near, "scratch")) as tmp:
        os.mkdir(tmp, 0o777)
        try:
            yield tmp
        finally:
            remove(tmp)


def write_file(path: Path, data: bytes | bytearray | memoryview, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (temporary sibling + rename; a reader sees old or new bytes, never
    part). No lock: for keys whose concurrent writers write the same bytes or where the last writer wins.
    ``durable``: the bytes reach the disk before the rename, and the rename before this returns (fsync of the
    file, then of its folder), so that a power cut leaves the old file or the new one, never an empty one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _SWEPT:
        sweep_dir(path.parent)
        _SWEPT.add(path.parent)
    with tracked(temp_path(path)) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (where the system lets a folder be opened and synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
