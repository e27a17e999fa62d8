"""Shared CLI plumbing: friendly errors, consoles, parsing of sizes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from nestprune.errors import NestpruneError

console = Console(stderr=True)
out = Console()


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NestpruneError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted:[/] nothing was written", highlight=False)
            raise typer.Exit(130) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            console.print(f"[bold red]error:[/] {e.strerror or e}: {e.filename}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def is_tty() -> bool:
    return sys.stderr.isatty()
