"""The pass@k estimator against direct combinatorics, and its summary over problems."""

from __future__ import annotations

import math

import pytest

from fedcoder.evaluation.passk import pass_at_k, summarize


def _by_counting(n: int, c: int, k: int) -> float:
    # The probability that k samples drawn without replacement are all wrong, complemented.
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_known_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 1, 10) == 1.0


def test_matches_combinatorics_on_a_grid():
    for n in range(1, 31):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_by_counting(n, c, k), abs=1e-12)


def test_large_n_stays_finite_where_binomials_are_huge():
    # C(1000, 100) has 140 digits; the product form never builds it.
    assert pass_at_k(1000, 5, 100) == pytest.approx(_by_counting(1000, 5, 100), rel=1e-9)


def test_too_few_wrong_samples_to_fill_k_is_certain_success():
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_summary_reports_only_k_every_problem_can_support():
    summary = summarize([(10, 3), (12, 0), (10, 10)])
    assert set(summary) == {"pass@1", "pass@1_stderr", "pass@10", "pass@10_stderr"}
    per_problem = [pass_at_k(10, 3, 10), pass_at_k(12, 0, 10), pass_at_k(10, 10, 10)]
    assert summary["pass@10"] == pytest.approx(sum(per_problem) / 3)


def test_stderr_of_single_samples_is_the_binomial_one():
    # One sample per problem: 3 of 8 pass; s.e. = sqrt(p (1 - p) / (N - 1)).
    summary = summarize([(1, 1)] * 3 + [(1, 0)] * 5)
    assert summary["pass@1"] == pytest.approx(3 / 8)
    assert summary["pass@1_stderr"] == pytest.approx(math.sqrt(3 / 8 * 5 / 8 / 7))
    assert set(summary) == {"pass@1", "pass@1_stderr"}


def test_one_problem_has_no_stderr_and_none_has_no_scores():
    assert summarize([(1, 1)]) == {"pass@1": 1.0, "pass@1_stderr": None}
    assert summarize([]) == {}
