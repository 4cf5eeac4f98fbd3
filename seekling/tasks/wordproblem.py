"""Templated word problems in the style of GSM8K: two or three steps of integer arithmetic.

Each template draws its numbers so that every intermediate result is a positive integer, and its
solution is the chain of equations, one per step:

    Ana buys 3 pens for 4 dollars each and a bag for 12 dollars. How many dollars does she spend?
    solution: 3*4=12. 12+12=24      answer: 24

The canonical key is the template and its numbers (not the names or objects), so the same arithmetic
never appears in both splits under a different name.

Try: `python -c "from seekling.tasks import make_problems; print(make_problems('wordproblem', 'train', 3, 0))"`
"""

from __future__ import annotations

import random
from collections.abc import Callable

from seekling.errors import ConfigError
from seekling.tasks.base import Problem, Task, make_problem

NAME = "wordproblem"
DEFAULTS = {"max_value": 12, "templates": "all"}

PEOPLE = [("Ana", "she"), ("Ben", "he"), ("Cara", "she"), ("Dev", "he"), ("Eva", "she"),
          ("Finn", "he"), ("Gia", "she"), ("Hugo", "he"), ("Ivy", "she"), ("Jon", "he"),
          ("Kim", "she"), ("Leo", "he")]
POSSESSIVE = {"she": "her", "he": "his"}
ITEMS = ["pen", "apple", "book", "toy", "card", "cup"]
EXTRAS = ["bag", "hat", "lamp", "box"]
FOODS = ["cookies", "grapes", "candies", "nuts"]
VEHICLES = ["car", "bus", "train", "truck"]
CRAFTS = ["toys", "cakes", "chairs", "kites"]

# A template returns (numbers that define the arithmetic, prompt, steps, answer).
Template = Callable[[random.Random, int], tuple[tuple[int, ...], str, list[str], int]]


def shopping(rng: random.Random, m: int):
    (name, pr), item, extra = rng.choice(PEOPLE), rng.choice(ITEMS), rng.choice(EXTRAS)
    n, p, q = rng.randint(2, m), rng.randint(2, m), rng.randint(1, 2 * m)
    prompt = (f"{name} buys {n} {item}s for {p} dollars each and a {extra} for {q} dollars. "
              f"How many dollars does {pr} spend?")
    return (n, p, q), prompt, [f"{n}*{p}={n * p}", f"{n * p}+{q}={n * p + q}"], n * p + q


def change(rng: random.Random, m: int):
    (name, pr), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    n, p, left = rng.randint(2, m), rng.randint(2, m), rng.randint(1, 5 * m)
    money = n * p + left
    prompt = (f"{name} has {money} dollars and buys {n} {item}s for {p} dollars each. "
              f"How many dollars does {pr} have left?")
    return (money, n, p), prompt, [f"{n}*{p}={n * p}", f"{money}-{n * p}={left}"], left


def sharing(rng: random.Random, m: int):
    (name, pr), food = rng.choice(PEOPLE), rng.choice(FOODS)
    friends, each, eaten = rng.randint(2, m), rng.randint(2, m), rng.randint(1, m)
    total = friends * each + eaten
    prompt = (f"{name} has {total} {food}. {pr.capitalize()} eats {eaten} and shares the rest equally "
              f"among {friends} friends. How many {food} does each friend get?")
    steps = [f"{total}-{eaten}={friends * each}", f"{friends * each}/{friends}={each}"]
    return (total, eaten, friends), prompt, steps, each


def trip(rng: random.Random, m: int):
    vehicle = rng.choice(VEHICLES)
    s1, s2 = 5 * rng.randint(2, m), 5 * rng.randint(2, m)
    h1, h2 = rng.randint(1, 5), rng.randint(1, 5)
    prompt = (f"A {vehicle} goes {s1} km each hour for {h1} hours, then {s2} km each hour for {h2} "
              "hours. How many km does it go in all?")
    steps = [f"{s1}*{h1}={s1 * h1}", f"{s2}*{h2}={s2 * h2}", f"{s1 * h1}+{s2 * h2}={s1 * h1 + s2 * h2}"]
    return (s1, h1, s2, h2), prompt, steps, s1 * h1 + s2 * h2


def work_rate(rng: random.Random, m: int):
    (name, pr), craft = rng.choice(PEOPLE), rng.choice(CRAFTS)
    rate, hours = rng.randint(2, m), rng.randint(2, m)
    prompt = f"{name} makes {rate} {craft} per hour. How many hours does {pr} need to make {rate * hours} {craft}?"
    return (rate, rate * hours), prompt, [f"{rate * hours}/{rate}={hours}"], hours


def ages(rng: random.Random, m: int):
    name, pr = rng.choice(PEOPLE)
    age, times, years = rng.randint(2, m), rng.randint(2, 5), rng.randint(1, m)
    poss = POSSESSIVE[pr]
    prompt = (f"{name} is {age} years old. {poss.capitalize()} mother is {times} times as old. "
              f"How old will {poss} mother be in {years} years?")
    steps = [f"{age}*{times}={age * times}", f"{age * times}+{years}={age * times + years}"]
    return (age, times, years), prompt, steps, age * times + years


def together(rng: random.Random, m: int):
    (a, _), (b, _) = rng.sample(PEOPLE, 2)
    x, times = rng.randint(2, m), rng.randint(2, 5)
    prompt = f"{a} has {x} marbles. {b} has {times} times as many. How many marbles do they have together?"
    return (x, times), prompt, [f"{x}*{times}={x * times}", f"{x * times}+{x}={x * times + x}"], x * times + x


def orchard(rng: random.Random, m: int):
    rows, per_row = rng.randint(2, m), rng.randint(2, m)
    cut = rng.randint(1, rows * per_row - 1)
    prompt = f"A farm has {rows} rows of {per_row} trees. {cut} trees are cut down. How many trees are left?"
    steps = [f"{rows}*{per_row}={rows * per_row}", f"{rows * per_row}-{cut}={rows * per_row - cut}"]
    return (rows, per_row, cut), prompt, steps, rows * per_row - cut


def savings(rng: random.Random, m: int):
    name, pr = rng.choice(PEOPLE)
    start, weekly, weeks = rng.randint(1, 5 * m), rng.randint(2, m), rng.randint(2, m)
    goal = start + weekly * weeks
    prompt = (f"{name} has {start} dollars and saves {weekly} dollars each week. "
              f"After how many weeks will {pr} have {goal} dollars?")
    return (start, weekly, goal), prompt, [f"{goal}-{start}={weekly * weeks}", f"{weekly * weeks}/{weekly}={weeks}"], weeks


TEMPLATES: dict[str, Template] = {f.__name__: f for f in
                                  (shopping, change, sharing, trip, work_rate, ages, together, orchard, savings)}


def generate(rng: random.Random, max_value: int, templates: str) -> Problem:
    if max_value < 2:
        raise ConfigError(f"wordproblem: max_value must be at least 2, got {max_value}")
    names = list(TEMPLATES) if templates == "all" else [t.strip() for t in str(templates).split(",")]
    unknown = [t for t in names if t not in TEMPLATES]
    if unknown or not names:
        raise ConfigError(f"wordproblem: unknown templates {unknown}; choose from {sorted(TEMPLATES)} or 'all'")
    template = rng.choice(names)
    numbers, prompt, steps, answer = TEMPLATES[template](rng, max_value)
    key = f"{template}:" + ",".join(map(str, numbers))
    return make_problem(NAME, key=key, prompt=prompt, answer=answer, solution=". ".join(steps),
                        meta={"template": template})


TASK = Task(NAME, generate, DEFAULTS, "GSM8K-style templated word problems (shopping, sharing, rates, ages...)")
