"""Bootstrap error bars (fedcoder.resampling) and where they show up in eval reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcoder.evaluation.report import build_results, task_scores
from fedcoder.resampling import interval, resampled_means, summary


def test_bootstrap_of_a_mean_matches_the_binomial_standard_error():
    values = [1.0] * 30 + [0.0] * 70
    stats = summary(resampled_means(values))
    assert stats["stderr"] == pytest.approx(math.sqrt(0.3 * 0.7 / 100), rel=0.05)
    assert stats["ci95"][0] < 0.3 < stats["ci95"][1]


def test_weighted_resamples_are_ratios_and_pair_up_by_seed():
    means, weights = np.array([1.0, 3.0]), np.array([3, 1])
    draws = resampled_means(means, weights, resamples=500, seed=7)
    # Every resample is one of the three token-weighted means of two picks from two rows.
    assert set(np.round(draws, 9)) <= {1.0, 3.0, 1.5}
    shifted = resampled_means(means + 1, weights, resamples=500, seed=7)
    np.testing.assert_allclose(shifted - draws, 1.0)  # same resamples: the pair's gap is exact
    assert interval(np.array([5.0] * 10)) == (5.0, 5.0)


def _samples(passed: int, failed: int) -> list[list[dict]]:
    return [[{"status": "passed"}]] * passed + [[{"status": "failed"}]] * failed


def test_reports_carry_a_bootstrap_interval_and_the_average_error():
    humaneval, mbpp = task_scores(_samples(20, 60)), task_scores(_samples(50, 50))
    low, high = humaneval["pass@1_ci95"]
    assert low < humaneval["pass@1"] == 0.25 < high
    # About two standard errors either side, as for any near-normal mean.
    assert high - low == pytest.approx(4 * humaneval["pass@1_stderr"], rel=0.15)
    results = build_results({"humaneval": humaneval, "mbpp": mbpp}, {"tasks": ["humaneval"]})
    expected = math.hypot(humaneval["pass@1_stderr"], mbpp["pass@1_stderr"]) / 2
    assert results["average_stderr"] == pytest.approx(expected)
