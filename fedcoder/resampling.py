"""Bootstrap error bars: resample problems (or examples) with replacement.

Used for pass@1 over benchmark problems and for held-out loss over examples. Two
statistics computed with the same `n` and `seed` see the same resamples, so a
paired difference (two models on the same problems) is the difference of their
draws. Hand-written because it is a few lines of numpy and scipy is no dependency.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 10_000


def resampled_means(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """The (weighted) mean of `values` in each of `resamples` bootstrap resamples.

    With weights, each resample's mean is sum(w * v) / sum(w): for per-example
    mean losses weighted by token counts, that is the per-token loss.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("need a non-empty 1-D sequence of values")
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    rows = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    picked = weights[rows]
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample of zero-weight rows only
        return (picked * values[rows]).sum(axis=1) / picked.sum(axis=1)


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap draws."""
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def summary(draws: np.ndarray) -> dict[str, float | list[float]]:
    """Standard error (spread of the draws) and 95 % percentile interval."""
    return {"stderr": float(np.nanstd(draws, ddof=1)), "ci95": list(interval(draws))}
