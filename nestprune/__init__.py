"""nestprune: prune once, deploy many."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy exports, so ``import nestprune`` stays light (no torch / transformers until used)."""
    if name == "load_variant":
        from nestprune.variant import load_variant

        return load_variant
    raise AttributeError(f"module 'nestprune' has no attribute {name!r}")
