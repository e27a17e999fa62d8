"""Shared CLI plumbing: the one error path, signals, consoles, parsing of sizes.

Every failure of every command ends the same way: one line on stderr starting with ``error:`` and an exit
status from ``nestprune.errors`` — 2 for usage and bad input, 1 for faults — never a traceback (set
``NESTPRUNE_TRACEBACK=1`` to see one for an unexpected error). Option parsing errors are turned into that
line by ``nestprune.cli.main.NestpruneGroup``; everything raised by a command, by ``friendly`` here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from nestprune.errors import EXIT_FAULT, EXIT_USAGE, NestpruneError
from nestprune.io import atomic

# typer >= 0.2x vendors click as typer._click (its exceptions are not click's); older typer uses click itself
click_impl: Any = getattr(typer.core, "_click", None) or __import__("click")
ClickException = click_impl.exceptions.ClickException

console = Console(stderr=True, highlight=False)
# stdout: in a pipe or a file, as wide as a table needs (rich would cut it at 80 columns)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 100_000)

# OSErrors about a path the user gave (usage: exit 2); any other OSError is a fault (exit 1)
PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
               errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY, errno.EXDEV, errno.ETXTBSY}
FAULT_HINTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EIO: "an I/O error", errno.ENOMEM: "out of memory"}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``with`` block on the way out cleans up."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """While the block runs, SIGTERM unwinds like Ctrl-C (SIGINT) does, instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_INVOCATION: list[str] = []


def set_invocation(args: list[str]) -> None:
    """Record the arguments the command line was given (``nestprune.cli.main`` does), for messages that
    repeat the command (``build``'s resume hint)."""
    _INVOCATION[:] = args


def invocation() -> list[str]:
    """The arguments after ``nestprune`` of the running command."""
    return list(_INVOCATION) if _INVOCATION else sys.argv[1:]


def error_line(message: object) -> str:
    """The one line of a failure: ``error: <message>`` with newlines folded (the message is plain text)."""
    text = " ".join(str(message).split())
    return f"error: {text}"


def report(message: object, code: int) -> typer.Exit:
    """Print the error line on stderr; returns the ``typer.Exit`` to raise."""
    line = error_line(message)
    console.print(f"[bold red]error:[/] {escape(line.removeprefix('error: '))}", soft_wrap=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.nestprune-(?:lock|tmp|old|scratch|resume)(?:\..*)?$")


def user_path(path: object) -> str:
    """The path to name in a message: the output a nestprune temporary, lock file or build checkpoint stands
    for (the user never named ``.v.nestprune-lock``), else the path itself."""
    p = Path(os.fsdecode(path)) if isinstance(path, str | bytes | os.PathLike) else None
    if p is None:
        return str(path)
    for part in (p, *p.parents):
        found = _TEMPORARY.match(part.name)
        if found:
            name = found.group("name")
            while inner := _TEMPORARY.match(name):  # the lock of a build's checkpoint folder
                name = inner.group("name")
            return str(part.parent / name)
    return str(p)


def os_error_message(e: OSError) -> tuple[str, int]:
    """(message, exit status) of an OSError: the path and what went wrong, in one line."""
    what = e.strerror or str(e) or type(e).__name__
    where = " -> ".join(user_path(p) for p in (e.filename, e.filename2) if p is not None)
    hint = FAULT_HINTS.get(e.errno) if e.errno is not None else None
    text = f"{what}: {where}" if where else what
    if hint:
        text += f" ({hint}; nothing was written)"
    code = EXIT_USAGE if e.errno in PATH_ERRNOS else EXIT_FAULT
    return text, code


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every failure of a command into one line on stderr and its exit status, never a traceback; on
    SIGTERM or Ctrl-C remove every temporary the command made (``atomic.cleanup``) and exit 143 / 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with terminate_cleanly():
                return fn(*args, **kwargs)
        except (typer.Exit, ClickException):  # an exit status, or a usage error for NestpruneGroup to print
            raise
        except NestpruneError as e:
            atomic.cleanup()
            raise report(e, e.exit_code) from None
        except (KeyboardInterrupt, Terminated) as e:
            atomic.cleanup()
            what, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
            # a command may say what it keeps (a build: its checkpoint, and how to resume) in a note
            said = " ".join(getattr(e, "__notes__", ())) or "nothing was written"
            console.print(f"[bold red]{what}:[/] {escape(said)}", soft_wrap=True)
            raise typer.Exit(code) from None
        except OSError as e:
            atomic.cleanup()
            text, code = os_error_message(e)
            raise report(text, code) from None
        except Exception as e:  # a bug, or a library failing in a way nobody anticipated: still one line
            atomic.cleanup()
            if os.environ.get("NESTPRUNE_TRACEBACK"):
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            raise report(f"internal error ({type(e).__name__}{': ' + first if first else ''}); nothing was "
                         "written. Please report it (NESTPRUNE_TRACEBACK=1 shows the traceback)",
                         EXIT_FAULT) from None

    return wrapper


def is_tty() -> bool:
    return sys.stderr.isatty()
