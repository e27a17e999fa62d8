"""nestprune: prune once, deploy many."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# The command line and the document schemas live in the top-level folders ``cli/`` and ``schemas/`` of
# the source tree and are installed as ``nestprune.cli`` and ``nestprune.schemas`` (pyproject's
# package-dir). Run from a source checkout without installing (PYTHONPATH=.), the same names resolve
# through the checkout's root.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "cli").is_dir() and (_root / "cli" / "main.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]  # noqa: F821


def __getattr__(name: str):
    """Lazy exports, so ``import nestprune`` stays light (no torch / transformers until used)."""
    if name == "load_variant":
        from nestprune.variant.load import load_variant

        return load_variant
    raise AttributeError(f"module 'nestprune' has no attribute {name!r}")
