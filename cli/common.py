"""Shared CLI plumbing: friendly errors, signals, consoles, parsing of sizes."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console

from nestprune.errors import NestpruneError
from nestprune.io import atomic

console = Console(stderr=True)
out = Console()


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


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and a non-zero exit, never a traceback; on SIGTERM or
    Ctrl-C remove every temporary the command made (``atomic.cleanup``) and exit 143 / 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with terminate_cleanly():
                return fn(*args, **kwargs)
        except NestpruneError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (KeyboardInterrupt, Terminated) as e:
            atomic.cleanup()
            what, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
            console.print(f"[bold red]{what}:[/] nothing was written", highlight=False)
            raise typer.Exit(code) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            console.print(f"[bold red]error:[/] {e.strerror or e}: {e.filename}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def is_tty() -> bool:
    return sys.stderr.isatty()
