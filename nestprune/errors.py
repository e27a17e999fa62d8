"""User-facing errors: one clear line, no traceback (the CLI prints ``error: <message>``).

Exit statuses of the command line (``nestprune.cli.common``):

0    success
1    a fault: the input was fine but the run could not finish (disk full, I/O error, a registry that cannot
     be reached, a failed ``--verify``, an internal error)
2    usage or bad input: a bad option or value, a path that is missing, unreadable or not writable, an input
     that is corrupt or of the wrong kind, a refused operation (an existing ``--out`` without ``--force``)
130  interrupted (Ctrl-C / SIGINT); 143 terminated (SIGTERM). Nothing is left behind in either case.
"""

EXIT_FAULT = 1
EXIT_USAGE = 2


class NestpruneError(Exception):
    """Bad input or a refused operation. The message is a complete sentence for the user."""

    exit_code = EXIT_USAGE


class Fault(NestpruneError):
    """The inputs were acceptable but the run failed (exit status 1)."""

    exit_code = EXIT_FAULT


def validation_message(error: object) -> str:
    """'at <field path>: <message>' of a pydantic ValidationError's first error."""
    first = error.errors()[0]  # type: ignore[attr-defined]
    return f"at {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
