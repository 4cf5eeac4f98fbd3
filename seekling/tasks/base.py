"""The shared pieces of the reasoning tasks: the `Problem` record, the `Task` entry and the split rule.

A task is a function `generate(rng, **difficulty) -> Problem` plus its default difficulty. The
train/test split is a property of the problem itself, not of the order it was drawn in: a problem is
in `test` iff a sha256 of its canonical key (task + operands) falls in a fixed 10% bucket, so the two
splits can never share a problem, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TEST_BUCKET_PERMILLE = 100  # 10% of all possible problems belong to the test split
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One problem. `solution` is the worked reasoning (the `<think>` content), `answer` the final
    answer string, `meta` what a reward function needs besides the answer (e.g. countdown numbers)."""

    id: str
    task: str
    prompt: str
    answer: str
    solution: str
    meta: dict[str, Any] = field(default_factory=dict)  # always holds "key", see `make_problem`


@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable[..., Problem]  # generate(rng: random.Random, **difficulty) -> Problem
    defaults: dict[str, Any]  # every difficulty knob the task accepts, with its default
    description: str


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's `hash` is salted per run)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(task: str, key: str) -> str:
    """'test' for the fixed 10% bucket of canonical keys, 'train' for the rest."""
    return "test" if stable_hash(f"{task}|{key}") % 1000 < TEST_BUCKET_PERMILLE else "train"


def make_problem(task: str, key: str, prompt: str, answer: Any, solution: str,
                 meta: dict[str, Any] | None = None) -> Problem:
    """Build a Problem whose id is derived from its canonical key (kept in `meta["key"]`), so one
    problem has one id everywhere."""
    digest = hashlib.sha256(f"{task}|{key}".encode()).hexdigest()[:12]
    return Problem(id=f"{task}-{digest}", task=task, prompt=prompt, answer=str(answer),
                   solution=solution, meta={**(meta or {}), "key": key})


def rand_number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """A number whose digit count is uniform in [min_digits, max_digits], then uniform within it, so
    short and long operands are equally common."""
    n = rng.randint(min_digits, max_digits)
    low = 0 if n == 1 else 10 ** (n - 1)
    return rng.randint(low, 10**n - 1)
