"""The unbiased pass@k estimator (Chen et al., 2021) and its standard error.

With n samples of a problem of which c pass, the chance that at least one of k
samples drawn without replacement passes is 1 - C(n-c, k) / C(n, k). The ratio
is computed as a product of c factors, so no binomial (which can have hundreds
of digits) is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Estimate pass@k for one problem from n samples, c of them correct."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean over problems and its standard error (None when fewer than two problems)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def summarize(counts: Iterable[tuple[int, int]], ks: Iterable[int] = KS) -> dict[str, float | None]:
    """pass@k and `pass@k_stderr` over problems, given (n, c) per problem.

    A k is reported only if every problem has at least k samples, as a
    mixture of estimators with different k would not mean anything.
    """
    counts = list(counts)
    if not counts:
        return {}
    fewest = min(n for n, _ in counts)
    summary: dict[str, float | None] = {}
    for k in ks:
        if k > fewest:
            continue
        mean, stderr = mean_and_stderr([pass_at_k(n, c, k) for n, c in counts])
        summary[f"pass@{k}"] = mean
        summary[f"pass@{k}_stderr"] = stderr
    return summary
