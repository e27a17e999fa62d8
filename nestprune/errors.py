"""User-facing errors: one clear line, no traceback (the CLI prints ``error: <message>``)."""


class NestpruneError(Exception):
    """Bad input or a refused operation. The message is a complete sentence for the user."""


def validation_message(error: object) -> str:
    """'at <field path>: <message>' of a pydantic ValidationError's first error."""
    first = error.errors()[0]  # type: ignore[attr-defined]
    return f"at {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
