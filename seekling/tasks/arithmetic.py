"""Multi-digit addition, subtraction and multiplication with the column method written out.

The solution is short and regular on purpose, so that a model of a few million parameters can learn
to imitate it: one sentence per column, right to left, then the result.

    What is 47+38?   7+8=15, write 5 carry 1. 4+3+1=8. 47+38=85
    What is 83-47?   13-7=6, write 6 borrow 1. 8-1-4=3. 83-47=36
    What is 47*8?    7*8=56, write 6 carry 5. 4*8=32, 32+5=37. 47*8=376
    What is 8*47?    7*8=56, write 6 carry 5. 4*8=32, 32+5=37. 8*47=376       (longer number on top)
    What is 47*38?   47*8=376. 47*30=1410. 376+1410=1786. 47*38=1786

With more than two operands the expression is evaluated left to right (parentheses are written where
precedence would say otherwise) and each binary step is worked in turn. `worked` (default 1) is the
share of solutions that show these steps; the others answer at once, with an empty `<think>`, as
text in the wild often does. (Not `47+38=85` alone: that is the worked solution's last step, and a
model trained on both learns to guess it there instead of reading the columns above.) The speedrun's
`cpu` pre-training corpus mixes the two half and half, and GRPO then learns to write the working out.

Try: `python -c "from seekling.tasks import make_problems; print(make_problems('arithmetic', 'train', 3, 0))"`
"""

from __future__ import annotations

import random

from seekling.errors import ConfigError
from seekling.tasks.base import Problem, Task, make_problem, rand_number

NAME = "arithmetic"
DEFAULTS = {"digits": 2, "min_digits": 1, "operands": 2, "ops": "+-*", "worked": 1.0}


def _digits_low_first(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def _column(terms: str, value: int, last: bool, written: str) -> str:
    """One column's sentence: what is written (and carried or borrowed), or the last column whole."""
    return f"{terms}={value}" if last else f"{terms}={value}, write {written}"


def add_steps(a: int, b: int) -> list[str]:
    """Column addition; the last column is written whole (it may be two digits)."""
    da, db = _digits_low_first(a), _digits_low_first(b)
    width = max(len(da), len(db))
    steps, carry = [], 0
    for i in range(width if width > 1 else 0):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        total = x + y + carry
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        steps.append(_column(terms, total, i == width - 1, f"{total % 10}" + (" carry 1" if total >= 10 else "")))
        carry = total // 10
    return steps + [f"{a}+{b}={a + b}"]


def sub_steps(a: int, b: int) -> list[str]:
    """Column subtraction with borrows, for a >= b. A borrowing column writes its top digit with a
    leading 1 ("13-7"), the column that repays it subtracts the 1 ("8-1-4")."""
    assert a >= b
    da, db = _digits_low_first(a), _digits_low_first(b)
    steps, borrow = [], 0
    for i in range(len(da) if len(da) > 1 else 0):
        x, y = da[i], (db[i] if i < len(db) else 0)
        need = x - borrow < y
        value = x - borrow + (10 if need else 0) - y
        terms = ("1" if need else "") + f"{x}" + ("-1" if borrow else "") + f"-{y}"
        steps.append(_column(terms, value, i == len(da) - 1, f"{value}" + (" borrow 1" if need else "")))
        borrow = int(need)
    return steps + [f"{a}-{b}={a - b}"]


def mul_steps(a: int, b: int) -> list[str]:
    """Long multiplication of the longer number by the shorter. A one-digit multiplier is worked
    digit by digit with carries; a longer one is split into partial products (one per digit,
    shifted), which are then summed. The last step restates the product in the prompt's order."""
    top, multiplier = (a, b) if len(str(a)) >= len(str(b)) else (b, a)
    if multiplier >= 10:
        shifted = [d * 10**i for i, d in enumerate(_digits_low_first(multiplier))]
        steps = [f"{top}*{m}={top * m}" for m in shifted]
        running = top * shifted[0]
        for partial in (top * m for m in shifted[1:]):
            steps.append(f"{running}+{partial}={running + partial}")
            running += partial
        return steps + [f"{a}*{b}={a * b}"]
    digits = _digits_low_first(top)
    steps, carry = [], 0
    for i in range(len(digits) if len(digits) > 1 else 0):
        fact = digits[i] * multiplier
        product = fact + carry
        # the table fact first, then the carry added to it: "4*8=32, 32+5=37", two lookups a small model
        # learns, where "4*8+5=37" in one step was where nearly all of its 1-digit x 2-digit errors were
        terms = f"{digits[i]}*{multiplier}" + (f"={fact}, {fact}+{carry}" if carry else "")
        carried = f" carry {product // 10}" if product >= 10 else ""
        steps.append(_column(terms, product, i == len(digits) - 1, f"{product % 10}{carried}"))
        carry = product // 10
    return steps + [f"{a}*{b}={a * b}"]


STEP_FUNCTIONS = {"+": add_steps, "-": sub_steps, "*": mul_steps}
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def generate(rng: random.Random, digits: int, min_digits: int, operands: int, ops: str, worked: float) -> Problem:
    if not 1 <= min_digits <= digits:
        raise ConfigError(f"arithmetic: need 1 <= min_digits <= digits, got {min_digits} and {digits}")
    if operands < 2:
        raise ConfigError(f"arithmetic: operands must be at least 2, got {operands}")
    if not ops or set(ops) - set("+-*"):
        raise ConfigError(f"arithmetic: ops must be a non-empty string over '+-*', got {ops!r}")
    if not 0 <= worked <= 1:
        raise ConfigError(f"arithmetic: worked must be in [0, 1], got {worked}")
    numbers = [rand_number(rng, min_digits, digits) for _ in range(operands)]
    value, expr, last_op, steps = numbers[0], str(numbers[0]), "", []
    for i, b in enumerate(numbers[1:]):
        op = rng.choice(ops)
        if op == "-" and b > value:
            if i == 0:  # swap the first two operands so the result stays non-negative
                value, b = b, value
                expr = str(value)
            else:
                op = "+"
        if op == "*" and last_op in ("+", "-"):
            expr = f"({expr})"  # left-to-right order overrides precedence
        steps += STEP_FUNCTIONS[op](value, b)
        value, expr, last_op = APPLY[op](value, b), f"{expr}{op}{b}", op
    if operands > 2:
        steps.append(f"{expr}={value}")
    if worked < 1 and rng.random() >= worked:  # the answer at once (no draw at all when every solution is worked)
        steps = []
    return make_problem(NAME, key=expr, prompt=f"What is {expr}?", answer=value,
                        solution=". ".join(steps), meta={"expression": expr})


TASK = Task(NAME, generate, DEFAULTS, "multi-digit + - * with the column method written out")
