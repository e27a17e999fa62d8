"""The ``nestprune`` command: each sub-command lives in its own module and registers itself here.

Exit statuses (``nestprune.errors``): 0 success, 1 fault, 2 usage or bad input, 130 interrupted, 143
terminated. Every failure prints one line starting with ``error:`` on stderr: option parsing errors here
(``NestpruneGroup``), everything a command raises in ``nestprune.cli.common.friendly``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from nestprune import __version__
from nestprune.cli.common import click_impl, report, set_invocation
from nestprune.errors import EXIT_FAULT, EXIT_USAGE

_exceptions = click_impl.exceptions


class _Never(Exception):
    pass


NoArgsIsHelp = getattr(_exceptions, "NoArgsIsHelpError", _Never)  # click >= 8.2
EXITS = tuple({typer.Exit, getattr(_exceptions, "Exit", typer.Exit)})
ABORTS = tuple({typer.Abort, getattr(_exceptions, "Abort", typer.Abort)})


class NestpruneGroup(TyperGroup):
    """Typer's group with the one error path: a usage error is ``error: <what> (try '<cmd> --help')``, exit 2,
    instead of a boxed panel."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        set_invocation(list(args) if args is not None else sys.argv[1:])
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
            code = rv if isinstance(rv, int) else 0
        except NoArgsIsHelp as e:  # `nestprune` or `nestprune push` alone: the help, as a usage error
            typer.echo(e.ctx.get_help(), err=True)
            code = EXIT_USAGE
        except _exceptions.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "nestprune")
            hint = f" (try '{where} --help')"
            code = report(e.format_message() + hint, EXIT_USAGE).exit_code
        except _exceptions.ClickException as e:
            code = report(e.format_message(), EXIT_USAGE if e.exit_code == EXIT_USAGE else EXIT_FAULT).exit_code
        except ABORTS:
            code = report("aborted", EXIT_FAULT).exit_code
        except EXITS as e:
            code = e.exit_code
        if not standalone_mode:
            return code
        sys.exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nestprune {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    name="nestprune",
    cls=NestpruneGroup,
    help="Prune once, deploy many: GISP global structured pruning into one nested, versioned artifact.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no boxes, no <bool> after flags, readable in a pipe
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Prune once, deploy many: GISP global structured pruning into one nested, versioned artifact."""


# Each module defines ``register(app)``; the order here is the order of ``nestprune --help``.
COMMAND_MODULES = ("nestprune.cli.build", "nestprune.cli.inspect", "nestprune.cli.materialize", "nestprune.cli.eval",
                   "nestprune.cli.lm_eval", "nestprune.cli.registry")

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app(prog_name="nestprune")


if __name__ == "__main__":
    main()
