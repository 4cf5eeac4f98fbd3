"""Countdown: reach a target from given numbers with + - * /, each number used at most once.

The generator guarantees a solution by building the target from a random expression over a random
subset of the numbers: it repeatedly combines two values with an operation whose result is a
positive integer (so divisions are exact), and records each step. The answer is that expression
with the fewest parentheses that keep its meaning; any other correct expression is also right, which
is why a reward must check the expression itself (meta `numbers` and `target`), not compare strings.

    Use 3, 5, 4, 7 to make 32 with + - * /, each number at most once.
    solution: 3+5=8. 8*4=32. (3+5)*4=32      answer: (3+5)*4

Try: `python -c "from seekling.tasks import make_problems; print(make_problems('countdown', 'train', 3, 0))"`
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from seekling.errors import ConfigError
from seekling.tasks.base import Problem, Task, make_problem

NAME = "countdown"
DEFAULTS = {"count": 4, "max_number": 20, "max_target": 100}
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
LEAF = 3
# Division is only ever applied where it is exact (see _pick_op), so // loses nothing.
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


@dataclass(frozen=True)
class Node:
    value: int
    text: str
    precedence: int  # of the outermost operation; LEAF for a bare number


def combine(left: Node, op: str, right: Node) -> Node:
    """`left op right` as a node, parenthesising a child only where precedence or the
    non-associativity of - and / requires it."""
    p = PRECEDENCE[op]
    left_text = f"({left.text})" if left.precedence < p else left.text
    right_needs = right.precedence < p or (right.precedence == p and op in "-/")
    right_text = f"({right.text})" if right_needs else right.text
    return Node(APPLY[op](left.value, right.value), f"{left_text}{op}{right_text}", p)


def _pick_op(rng: random.Random, a: int, b: int) -> str:
    """A random operation that keeps `a op b` a positive integer and is not a no-op (x*1, x/1)."""
    choices = ["+"]
    if a > b:
        choices.append("-")
    if a > 1 and b > 1:
        choices.append("*")
    if b > 1 and a % b == 0:
        choices.append("/")
    return rng.choice(choices)


def generate(rng: random.Random, count: int, max_number: int, max_target: int) -> Problem:
    if count < 2:
        raise ConfigError(f"countdown: count must be at least 2, got {count}")
    if max_number < 2 or max_target < 3:
        raise ConfigError(f"countdown: need max_number >= 2 and max_target >= 3, got {max_number}, {max_target}")
    for _ in range(10_000):
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        pool = [Node(n, str(n), LEAF) for n in rng.sample(numbers, rng.randint(2, count))]
        steps = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            left, right = pool[i], pool[j]
            if left.value < right.value:  # larger value first so - and / stay positive and exact
                left, right = right, left
            op = _pick_op(rng, left.value, right.value)
            node = combine(left, op, right)
            steps.append(f"{left.value}{op}{right.value}={node.value}")
            pool = [n for k, n in enumerate(pool) if k not in (i, j)] + [node]
        target = pool[0]
        if 1 <= target.value <= max_target and target.value not in numbers:
            break
    else:
        raise ConfigError(f"countdown: no target in 1..{max_target} found for count={count}, "
                          f"max_number={max_number}; raise max_target")
    key = ",".join(map(str, sorted(numbers))) + f"->{target.value}"
    prompt = (f"Use {', '.join(map(str, numbers))} to make {target.value} with + - * /, "
              "each number at most once.")
    # With one step the step already is the answer; more steps end by restating the expression.
    solution = ". ".join(steps + ([f"{target.text}={target.value}"] if len(steps) > 1 else []))
    return make_problem(NAME, key=key, prompt=prompt, answer=target.text, solution=solution,
                        meta={"numbers": numbers, "target": target.value})


TASK = Task(NAME, generate, DEFAULTS, "reach a target from given numbers with + - * /")
