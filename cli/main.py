"""The ``nestprune`` command: each sub-command lives in its own module and registers itself here."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="nestprune",
    help="Prune once, deploy many: GISP global structured pruning into one nested, versioned artifact.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines ``register(app)``; the order here is the order of ``nestprune --help``.
COMMAND_MODULES = ("nestprune.cli.build", "nestprune.cli.inspect", "nestprune.cli.materialize", "nestprune.cli.eval",
                   "nestprune.cli.lm_eval", "nestprune.cli.registry")

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
