"""Paired comparisons over examples or entries: wins, ties and losses, and a seeded bootstrap interval."""

from __future__ import annotations

from typing import Sequence

import numpy as np

TIE = 0.01
RESAMPLES = 2000
LEVEL = 0.95


def wins_ties_losses(a: Sequence[float], b: Sequence[float], tie: float = TIE) -> tuple[int, int, int]:
    """Entries where a beats b by at least `tie`, is within `tie` of it, loses by at least `tie`."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return int((d >= tie).sum()), int((np.abs(d) < tie).sum()), int((d <= -tie).sum())


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> tuple[float, float, float]:
    """Mean of a − b over entries and its percentile bootstrap interval (entries resampled with replacement)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(d.mean()), float(lo), float(hi)
