"""pass@k, pass@1, cons@k and the small helpers (seekling/metrics.py), against hand-computed values."""

from fractions import Fraction
from math import comb

import pytest

from seekling.errors import ConfigError
from seekling.metrics import (
    cons_at_k,
    format_adherence,
    majority_answer,
    mean_length,
    pass_at_1_mean,
    pass_at_k,
    pass_at_k_mean,
)
from seekling.rewards import math_equal


@pytest.mark.parametrize("n, c, k, expected", [
    (10, 3, 2, 24 / 45),   # 1 - C(7,2)/C(10,2) = 1 - 21/45
    (4, 1, 3, 0.75),       # 1 - C(3,3)/C(4,3) = 1 - 1/4
    (16, 4, 1, 0.25),      # pass@1 is c/n
    (5, 0, 1, 0.0),
    (5, 5, 3, 1.0),
    (4, 2, 3, 1.0),        # n - c < k: every 3-subset holds a correct sample
    (8, 1, 8, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_exact_binomials_where_floats_would_overflow():
    n, c, k = 1200, 37, 600  # C(1200, 600) ~ 1e359, beyond float range
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(64, 1, 32) == pytest.approx(0.5)  # one correct in 64: half the 32-subsets


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ConfigError, match="pass@k"):
        pass_at_k(n, c, k)


def test_pass_at_1_mean_and_pass_at_k_mean():
    matrix = [[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert pass_at_1_mean(matrix) == pytest.approx((0.5 + 1 + 0) / 3)
    assert pass_at_1_mean([[True], [False, True]]) == pytest.approx(0.75)  # rows may differ in length
    # k=2: problem 1: 1 - C(2,2)/C(4,2) = 5/6; problem 2: 1; problem 3: 0.
    assert pass_at_k_mean(matrix, 2) == pytest.approx((5 / 6 + 1 + 0) / 3)
    assert pass_at_k_mean([[1, 0, 0, 0], [0, 0, 0, 0]], 2) == pytest.approx(0.25)
    with pytest.raises(ConfigError):
        pass_at_1_mean([])
    with pytest.raises(ConfigError):
        pass_at_1_mean([[1], []])


def test_majority_vote_normalises_and_breaks_ties_by_first_occurrence():
    answers = ["6", "5", "5.0", "6", None, None, None]  # 5 and 6 have two votes each; None does not vote
    assert majority_answer(answers) == "6"
    assert cons_at_k(answers, "6") and not cons_at_k(answers, "5")
    assert majority_answer(["1/2", "3", "0.5"]) == "1/2"  # 1/2 and 0.5 vote together
    assert cons_at_k(["1/2", "3", "0.5"], "0.50")
    assert majority_answer(["$1,000", "7", "1000"]) == "$1,000"
    assert majority_answer([None, None]) is None and not cons_at_k([None, None], "1")
    assert not cons_at_k([], "1")


def test_cons_at_k_with_a_math_equal_fn():
    answers = [r"\sqrt{8}", r"\sqrt{8}", "3"]
    assert not cons_at_k(answers, r"2\sqrt{2}")  # the default compare is numeric/string
    assert cons_at_k(answers, r"2\sqrt{2}", equal_fn=lambda a, gold: math_equal(rf"\boxed{{{a}}}", gold))


def test_format_adherence_and_mean_length():
    good = "<think> x </think> <answer> 1 </answer>"
    assert format_adherence([good, "1", good, "<think> x </think>"]) == 0.5
    assert mean_length([3, 4, 8]) == 5.0
    assert mean_length([[1, 2], [1, 2, 3, 4]]) == 3.0  # token id lists
    assert mean_length(["ab", "abcd"]) == 3.0
    with pytest.raises(ConfigError):
        mean_length([])
    with pytest.raises(ConfigError):
        format_adherence([])
