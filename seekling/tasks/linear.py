"""Linear equations in one unknown with an integer solution, solved step by step.

    Solve for x: 3x+5=20.          3x=20-5=15. x=15/3=5                  answer: 5
    Solve for x: 5x+3=2x+12.       5x-2x=12-3. 3x=9. x=9/3=3             answer: 3   (both_sides=True)

The problem is built backwards from a chosen solution x, so it is always an integer.

Try: `python -c "from seekling.tasks import make_problems; print(make_problems('linear', 'train', 3, 0))"`
"""

from __future__ import annotations

import random

from seekling.errors import ConfigError
from seekling.tasks.base import Problem, Task, make_problem

NAME = "linear"
DEFAULTS = {"max_coef": 9, "max_constant": 20, "max_solution": 10, "both_sides": False}


def x_term(a: int) -> str:
    """3x, -3x, x, -x."""
    return {1: "x", -1: "-x"}.get(a, f"{a}x")


def signed(n: int) -> str:
    """+5, -5, or nothing for 0: a constant written after another term."""
    return f"{n:+d}" if n else ""


def signed_x_term(a: int) -> str:
    """+3x, -3x, +x, -x: an x term written after another term."""
    return x_term(a) if a < 0 else "+" + x_term(a)


def divide_step(coef: int, rhs: int) -> str:
    """x=15/3=5; a negative divisor is parenthesised (x=15/(-3)=-5); nothing to do when coef is 1."""
    if coef == 1:
        return f"x={rhs}"
    divisor = f"({coef})" if coef < 0 else str(coef)
    return f"x={rhs}/{divisor}={rhs // coef}"


def _nonzero(rng: random.Random, bound: int) -> int:
    return rng.choice([v for v in range(-bound, bound + 1) if v != 0])


def generate(rng: random.Random, max_coef: int, max_constant: int, max_solution: int,
             both_sides: bool) -> Problem:
    if max_coef < 2 or max_constant < 1 or max_solution < 1:
        raise ConfigError(f"linear: need max_coef >= 2, max_constant >= 1, max_solution >= 1, got "
                          f"{max_coef}, {max_constant}, {max_solution}")
    x = rng.randint(-max_solution, max_solution)
    a = _nonzero(rng, max_coef)
    b = rng.randint(-max_constant, max_constant)
    if not both_sides:
        if a == 1 and b == 0:  # "x=c" would need no steps at all
            b = rng.randint(1, max_constant)
        c = a * x + b
        equation = f"{x_term(a)}{signed(b)}={c}"
        steps = [f"{x_term(a)}={c}{signed(-b)}={c - b}"] if b else []
        if a != 1:
            steps.append(divide_step(a, c - b))
        key = f"{a},{b},{c}"
    else:
        d = _nonzero(rng, max_coef)
        while d == a:
            d = _nonzero(rng, max_coef)
        e = a * x + b - d * x
        equation = f"{x_term(a)}{signed(b)}={x_term(d)}{signed(e)}"
        steps = [f"{x_term(a)}{signed_x_term(-d)}={e}{signed(-b)}",
                 f"{x_term(a - d)}={e - b}"]
        if a - d != 1:
            steps.append(divide_step(a - d, e - b))
        key = f"{a},{b},{d},{e}"
    return make_problem(NAME, key=key, prompt=f"Solve for x: {equation}.", answer=x,
                        solution=". ".join(steps),
                        meta={"equation": equation})


TASK = Task(NAME, generate, DEFAULTS, "solve a*x+b=c (or a*x+b=d*x+e) for an integer x")
