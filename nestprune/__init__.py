"""nestprune: prune once, deploy many."""

__version__ = "0.1.0"
