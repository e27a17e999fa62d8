"""GISP's global schedule (pure): ratios, the global threshold, and the removal order.

At step t with target structure ratio r_t, every structure whose normalised score is ≤ the k-th
smallest (k = N − int(N·(1 − r_t)) + 1, over all N structures, never-pruned ones included but never
selected) is pruned. Pruned structures score exactly 0 afterwards (their weights are zero), so they
stay pruned: masks are nested by construction.
"""

from __future__ import annotations

import numpy as np


def ratio_step(r_max: float, steps: int) -> float:
    """Δ of r_t = t·Δ, i.e. linspace(0, r_max, T) (the reference's schedule), continued past r_max when a
    parameter-sparsity target needs it."""
    return r_max / (steps - 1) if steps > 1 else r_max


def threshold_k(n: int, ratio: float) -> int:
    """The reference's k: prune scores ≤ the k-th smallest. Clamped to [1, n]."""
    return min(max(n - int(n * (1.0 - ratio)) + 1, 1), n)


def select_pruned(scores: np.ndarray, pruned: np.ndarray, protected: np.ndarray, ratio: float) -> np.ndarray:
    """New pruned mask (N,) after one step at ``ratio``; a superset of ``pruned``.

    scores: (N,) normalised scores of all structures (pruned ones are 0);
    protected: (N,) structures of never-pruned layers (count in N, never selected).
    """
    s = np.where(protected, np.inf, scores.astype(np.float64))
    kth = np.partition(s, threshold_k(len(s), ratio) - 1)[threshold_k(len(s), ratio) - 1]
    return pruned | ((s <= kth) & ~protected)


def order_within_step(new: np.ndarray, scores: np.ndarray, layer: np.ndarray, kind: np.ndarray,
                      index: np.ndarray) -> np.ndarray:
    """Positions of newly pruned structures, by ascending score (ties: layer, kind, index)."""
    pos = np.flatnonzero(new)
    return pos[np.lexsort((index[pos], kind[pos], layer[pos], scores[pos]))]
