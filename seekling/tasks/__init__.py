"""Synthetic reasoning tasks with verifiable answers and worked solutions, for SFT and RL on a CPU.

    arithmetic   What is 47+38?                      7+8=15, write 5 carry 1. 4+3+1=8. 47+38=85
    countdown    Use 3, 5, 4, 7 to make 32 ...       3+5=8. 8*4=32. (3+5)*4=32
    linear       Solve for x: 3x+5=20.               3x=20-5=15. x=15/3=5
    wordproblem  Ana buys 3 pens for 4 dollars ...   3*4=12. 12+12=24

`make_problems(task, split, n, seed, **difficulty)` is deterministic in its arguments, its first
n problems do not depend on n, and any n of them follow the same difficulty distribution (the unique
test draw comes in shuffled pools: see `make_problems`). The train and test splits are disjoint by construction (see
`base.split_of`). Prompts are kept short: these train models of a few million parameters with
sequences of about 256 tokens.

Try: `python -c "from seekling.tasks import *; p = make_problems('arithmetic', 'test', 1, 0)[0]; print(to_sft_example(p))"`
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from seekling.config import parse_like
from seekling.errors import ConfigError, check_choice
from seekling.tasks import arithmetic, countdown, linear, wordproblem
from seekling.tasks.base import SPLITS, Problem, Task, split_of, stable_hash
from seekling.tokenizer import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

__all__ = ["TASKS", "Problem", "Task", "get_task", "make_problems", "make_mixture", "to_chat", "render_prompt_ids",
           "TEMPLATES", "check_template", "to_sft_example", "completion_text", "parse_difficulty", "split_of",
           "stable_hash", "R1_ZERO_PROMPT"]

TASKS: dict[str, Task] = {t.name: t for t in (arithmetic.TASK, countdown.TASK, linear.TASK, wordproblem.TASK)}

# The R1-Zero template, verbatim from the DeepSeek-R1 paper (docs/deepseek-reference.md).
R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {prompt}. Assistant:"
)

TEMPLATES = ("chat", "r1zero")  # the prompt formats: the chat template, or R1-Zero's plain-text prompt

# Consecutive rejected draws before giving up. The test split keeps ~1 draw in 10, so this many
# failures in a row only happens when the difficulty leaves too few distinct problems for `unique`.
MAX_REJECTS_IN_A_ROW = 20_000


def get_task(name: str) -> Task:
    return TASKS[check_choice(name, TASKS, "task")]


def make_problems(task: str, split: str, n: int, seed: int = 0, unique: bool | None = None,
                  **difficulty: Any) -> list[Problem]:
    """`n` problems of `task` from `split` ('train' or 'test'), drawn by rejection: a candidate is
    kept only if its canonical key belongs to the split. `unique` drops repeated problems (default:
    on for 'test', so an evaluation never counts a problem twice; off for 'train', where small
    difficulty settings have fewer distinct problems than one wants examples).

    Draws with repeats are independent, so any n of them follow the task's distribution. Unique draws
    are not: the few distinct small problems come early and run out, so the later ones are harder
    (the first 200 of a test split scored 29.5% where its first 1,000 scored 18.9%). They are taken
    in pools of `UNIQUE_POOL` problems, each shuffled with its own seed (`unique_pools`): any n up to
    UNIQUE_POOL is a uniform sample of the first pool, whatever n is; beyond it, the next pools."""
    spec = get_task(task)
    check_choice(split, SPLITS, "split")
    unknown = set(difficulty) - set(spec.defaults)
    if unknown:
        raise ConfigError(f"{task}: unknown difficulty setting(s) {sorted(unknown)}; "
                          f"valid: {', '.join(f'{k}={v}' for k, v in spec.defaults.items())}")
    settings = {**spec.defaults, **difficulty}
    unique = split == "test" if unique is None else unique
    if unique:
        problems = unique_pools(task, split, seed, settings, n)
    else:
        problems = _draw(spec, split, random.Random(f"{task}/{split}/{seed}"), n, None, **settings)
    if len(problems) >= n:
        return problems[:n]
    raise ConfigError(f"{task}: found only {len(problems)} of {n} {'distinct ' if unique else ''}{split} "
                      f"problems with {settings}; make the task harder or ask for fewer")


def _draw(spec: Task, split: str, rng: random.Random, n: int, seen: set[str] | None, **settings: Any) -> list[Problem]:
    """Up to `n` problems of `split` from `rng` (fewer when `MAX_REJECTS_IN_A_ROW` draws in a row are
    rejected); with `seen`, only keys not in it, which are added to it."""
    problems: list[Problem] = []
    rejects = 0
    while len(problems) < n and rejects < MAX_REJECTS_IN_A_ROW:
        problem = spec.generate(rng, **settings)
        key = problem.meta["key"]
        if split_of(spec.name, key) != split or (seen is not None and key in seen):
            rejects += 1
            continue
        rejects = 0
        if seen is not None:
            seen.add(key)
        problems.append(problem)
    return problems


# Unique problems come in shuffled pools of this many: the speedrun evaluates 1,000 problems, and any n
# up to this is a uniform sample of one pool.
UNIQUE_POOL = 1_000
_POOLS: dict[tuple, dict[str, Any]] = {}  # (task, split, seed, settings) -> draw state, the most recent few


def unique_pools(task: str, split: str, seed: int, settings: dict[str, Any], n: int) -> list[Problem]:
    """At least `n` distinct problems (fewer if the split runs out): pool k is the next `UNIQUE_POOL`
    distinct problems of the seeded rejection draw, shuffled by its own seed. Pools are kept for the
    process (the first one takes a few seconds), and each call gets its own copies."""
    spec = get_task(task)
    key = (task, split, seed, tuple(sorted(settings.items())))
    state = _POOLS.pop(key, None) or {"rng": random.Random(f"{task}/{split}/{seed}"), "seen": set(), "problems": [],
                                      "exhausted": False}
    _POOLS[key] = state  # most recently used last
    while len(_POOLS) > 16:
        _POOLS.pop(next(iter(_POOLS)))
    while len(state["problems"]) < n and not state["exhausted"]:
        pool = _draw(spec, split, state["rng"], UNIQUE_POOL, state["seen"], **settings)
        state["exhausted"] = len(pool) < UNIQUE_POOL
        random.Random(f"{task}/{split}/{seed}/pool{len(state['problems']) // UNIQUE_POOL}").shuffle(pool)
        state["problems"] += pool
    return [dataclasses.replace(p, meta=dict(p.meta)) for p in state["problems"][:n]]


def make_mixture(tasks: list[str], split: str, n_per_task: int, seed: int = 0,
                 difficulty: dict[str, dict[str, Any]] | None = None) -> list[Problem]:
    """`n_per_task` problems of each task, interleaved round-robin (task 1, task 2, ..., task 1, ...)."""
    difficulty = difficulty or {}
    unknown = set(difficulty) - set(tasks)
    if unknown:
        raise ConfigError(f"difficulty given for task(s) {sorted(unknown)} that are not in {tasks}")
    per_task = [make_problems(t, split, n_per_task, seed, **difficulty.get(t, {})) for t in tasks]
    return [p for group in zip(*per_task) for p in group]


def completion_text(problem: Problem) -> str:
    """The target assistant turn: worked solution in <think> (empty for a solution without working),
    final answer in <answer>."""
    think = f"{THINK_OPEN} {problem.solution} {THINK_CLOSE}" if problem.solution else f"{THINK_OPEN} {THINK_CLOSE}"
    return f"{think} {ANSWER_OPEN} {problem.answer} {ANSWER_CLOSE}"


def check_template(template: str) -> None:
    check_choice(template, TEMPLATES, "prompt template")


def to_chat(problem: Problem | str, template: str = "chat") -> list[dict[str, str]] | str:
    """The prompt side of a problem (or of a question's text): chat messages (template 'chat') or the
    R1-Zero plain-text prompt (template 'r1zero'), after which a base model continues with <think> ..."""
    question = problem if isinstance(problem, str) else problem.prompt
    if template == "chat":
        return [{"role": "user", "content": question}]
    check_template(template)
    return R1_ZERO_PROMPT.format(prompt=question)


def render_prompt_ids(tokenizer, prompt: Problem | str | Sequence[dict], template: str = "chat",
                      system: str | None = None) -> list[int]:
    """The token ids a model generates from, for every caller (GRPO, evaluation, rejection sampling,
    `seekling generate`): a problem or a question's text put through `template` ('chat': the chat
    format ending in `<|assistant|>`, after an optional `system` message; 'r1zero': bos + the R1-Zero
    text; 'raw': bos + the text as it is), or a whole conversation (a list of messages, chat format).
    Works with any tokenizer that has `render_prompt`, `encode` and `bos_id` (None: no bos)."""
    if not isinstance(prompt, (str, Problem)):  # a conversation
        chat: list[dict[str, str]] | str = list(prompt)
    elif template == "raw":
        chat = prompt if isinstance(prompt, str) else prompt.prompt
    else:
        chat = to_chat(prompt, template)
    if isinstance(chat, str):
        return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(chat)
    return tokenizer.render_prompt(([{"role": "system", "content": system}] if system else []) + chat)


def to_sft_example(problem: Problem) -> dict[str, list[dict[str, str]]]:
    """A chat example for supervised fine-tuning, in the JSONL layout the SFT loader reads."""
    return {"messages": [*to_chat(problem), {"role": "assistant", "content": completion_text(problem)}]}


def parse_difficulty(specs: list[str] | None) -> dict[str, dict[str, Any]]:
    """Parse command-line settings such as `arithmetic.digits=3 linear.both_sides=true` into
    {"arithmetic": {"digits": 3}, "linear": {"both_sides": True}}. Values become int or bool when
    they look like one; names are checked against each task's settings."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs or []:
        name, _, value = spec.partition("=")
        task, _, knob = name.partition(".")
        if not value or not knob:
            raise ConfigError(f"difficulty {spec!r}: expected TASK.SETTING=VALUE, e.g. arithmetic.digits=3")
        defaults = get_task(task).defaults
        if knob not in defaults:
            raise ConfigError(f"difficulty {spec!r}: {task} has no setting {knob!r}; valid: {', '.join(defaults)}")
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(type(defaults[knob]))
        try:
            parsed = parse_like(defaults[knob], value)
        except ValueError:
            raise ConfigError(f"difficulty {spec!r}: expected {expected}") from None
        out.setdefault(task, {})[knob] = parsed
    return out
