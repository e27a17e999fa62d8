"""User-facing errors: one clear line, no traceback (the CLI prints ``error: <message>``)."""


class NestpruneError(Exception):
    """Bad input or a refused operation. The message is a complete sentence for the user."""
