"""Evaluation metrics over sampled completions: pass@k, pass@1, cons@k, format adherence, length.

DeepSeek-R1 reports pass@1 as the mean correctness over k samples per question (temperature 0.6)
and cons@64 as the correctness of the majority answer. pass@k uses the unbiased estimator of
Chen et al. 2021 (Codex): from n samples of which c are correct, the chance that a random subset of
k holds at least one correct one.

Try it:
    .venv/bin/python -c "from seekling.metrics import pass_at_k; print(pass_at_k(10, 3, 2))"
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

from seekling.errors import ConfigError
from seekling.rewards import answers_match, format_reward, normalize_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """`1 - C(n-c, k) / C(n, k)`, computed as `1 - prod_{i=n-c+1..n} (1 - k/i)`.

    The product form never builds the huge binomials (n = 64, k = 32 overflows floats otherwise).
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _check_matrix(correct_matrix: Sequence[Sequence[bool]]) -> None:
    if not correct_matrix or any(len(row) == 0 for row in correct_matrix):
        raise ConfigError("metrics need at least one problem with at least one sample")


def pass_at_1_mean(correct_matrix: Sequence[Sequence[bool]]) -> float:
    """R1's pass@1: mean over problems of the share of that problem's samples that are correct."""
    _check_matrix(correct_matrix)
    return sum(sum(map(bool, row)) / len(row) for row in correct_matrix) / len(correct_matrix)


def pass_at_k_mean(correct_matrix: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems (rows: problems, columns: samples)."""
    _check_matrix(correct_matrix)
    return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct_matrix) / len(correct_matrix)


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of the first answer of the most common group after normalisation ("5.0" and "5" vote
    together); ties go to the group seen first; missing answers (None) do not vote."""
    keys = [normalize_answer(a) for a in answers]
    votes = Counter(key for key in keys if key is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(i for i, key in enumerate(keys) if key is not None and votes[key] == best)


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most common answer (see `majority_index`): the first raw answer of the winning group."""
    i = majority_index(answers)
    return None if i is None else answers[i]


def consensus_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """cons@k of one problem from the grader's own verdicts: `answers[i]` is the answer the task's
    verifier read from sample i (`seekling.rewards.graded_answer`) and `correct[i]` its verdict on
    that sample. The vote is over those answers and the winner is right when the verifier accepted
    the sample that cast the group's first vote, so cons@k never exceeds pass@k (a group can only
    win for a correct answer through a sample graded correct)."""
    if len(answers) != len(correct):
        raise ConfigError(f"consensus needs one verdict per answer, got {len(answers)} and {len(correct)}")
    i = majority_index(answers)
    return i is not None and bool(correct[i])


def cons_at_k(answers: Sequence[str | None], gold: str, equal_fn: Callable[[str, str], bool] = answers_match) -> bool:
    """Whether the majority-vote answer among `answers` (one problem's extracted answers) is correct."""
    winner = majority_answer(answers)
    return winner is not None and bool(equal_fn(winner, gold))


def format_adherence(completions: Sequence[str], **meta) -> float:
    """Share of completions that follow `<think> ... </think> <answer> ... </answer>` exactly."""
    if not completions:
        raise ConfigError("format_adherence needs at least one completion")
    return sum(format_reward(c, "", **meta) for c in completions) / len(completions)


def mean_length(lengths: Sequence[int | Sequence]) -> float:
    """Mean length: of the numbers given, or of the sequences given (token id lists, strings)."""
    if not lengths:
        raise ConfigError("mean_length needs at least one length")
    values = [x if isinstance(x, (int, float)) else len(x) for x in lengths]
    return sum(values) / len(values)
