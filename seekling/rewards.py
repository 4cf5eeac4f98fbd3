"""Rule-based rewards for GRPO and the answer extraction the graders share.

DeepSeek-R1 trains its reasoning with rewards computed by rules, not by a neural reward model: an
accuracy reward (the final answer checked by a verifier) and a format reward (reasoning inside
`<think>` tags). This file holds those rewards as small pure functions with the signature
`fn(completion: str, answer: str, **meta) -> float` (extra meta keys ignored), a registry keyed by
name, and `combine_rewards`, which turns `{"accuracy": 1.0, "format": 0.2}` into one callable.

A user plugs their own reward with a `"module:function"` spec (the module on sys.path or in the
current directory), a function `fn(completion: str, answer: str, **meta) -> float` (a bool counts as
1/0; meta holds the problem's `task`, its meta fields and the completion's `length`), e.g. in
./my_rewards.py, used as `seekling grpo ... --reward correct=1 my_rewards:exact=0.5`:

    def exact(completion: str, answer: str, **meta) -> bool:
        return completion.strip().endswith(f"<answer> {answer} </answer>")

A reward that raises (other than a `SeeklingError`, which means a misconfiguration and is re-raised)
or returns something that is not a finite number or a bool scores that sample 0, and the failure is
counted in `RewardStats`, so one bad sample never stops a run but the count is there to see; a
reward that fails on every sample of a step stops the run (`RewardError`).

Try it:
    .venv/bin/python -c "from seekling.rewards import combine_rewards as c; \
print(c({'accuracy': 1.0, 'format': 0.2})('<think>2+2</think> <answer>4</answer>', '4'))"
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import math
import operator
import os
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any, Callable, NamedTuple

from seekling.errors import ConfigError, SeeklingError
from seekling.tokenizer import ANSWER_CLOSE, ANSWER_OPEN, TAG_TOKENS, THINK_CLOSE, THINK_OPEN

RewardFn = Callable[..., float]
logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- answer extraction

EXTRACT_MODES = ("answer", "boxed", "gsm8k", "last_number")

_ANSWER_RE = re.compile(rf"{ANSWER_OPEN}(.*?){ANSWER_CLOSE}", re.DOTALL)
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
# A number as people write it: "-1,234.5", "$5", "3/4", ".5". Thousands commas only in groups of 3
# so that a list "1,-2" is not read as one number.
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?")
# In running text a "-" right after a word or a ")" is a hyphen or a minus sign, not a sign: "3-4".
_NUMBER_SEARCH_RE = re.compile(r"(?:(?<![\w)])-)?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)")


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), matching nested braces."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if rest.startswith(" "):  # `\boxed 5` is valid LaTeX for a single token
        token = rest.split(maxsplit=1)
        if not token:
            return None
        return token[0].rstrip("$.") or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip()
    return None  # never closed


def extract_answer(text: str, mode: str | None = None) -> str | None:
    """The final answer in `text`, or None.

    With `mode=None` the modes are tried in order and the first that finds something wins:
    `answer` (the last `<answer>...</answer>`), `boxed` (the last `\\boxed{...}`, nested braces
    handled), `gsm8k` (what follows the last `####` on its line), `last_number` (the last number in
    the text, commas and a `/` fraction kept).
    """
    if mode is None:
        for each in EXTRACT_MODES:
            found = extract_answer(text, each)
            if found is not None:
                return found
        return None
    if mode == "answer":
        matches = _ANSWER_RE.findall(text)
        return matches[-1].strip() if matches else None
    if mode == "boxed":
        return _last_boxed(text)
    if mode == "gsm8k":
        matches = _GSM8K_RE.findall(text)
        return matches[-1].strip() if matches and matches[-1].strip() else None
    if mode == "last_number":
        matches = _NUMBER_SEARCH_RE.findall(text)
        return matches[-1] if matches else None
    raise ConfigError(f"unknown extraction mode {mode!r}; known: {', '.join(EXTRACT_MODES)}")


# ----------------------------------------------------------------------------- answer comparison

_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}")
_BOLD_RE = re.compile(r"\\(?:textbf|mathbf)\{([^{}]*)\}")
# An answer in another base, "52_8" or "4210_{5}": math_verify reads the subscript as decoration.
_BASE_RE = re.compile(r"([0-9A-F]+)_\{?(\d+)\}?")
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")
_SCIENTIFIC_RE = re.compile(r"-?(?:\d+\.?\d*|\.\d+)[eE][+-]?\d{1,3}")  # 3-digit exponents at most


def _strip_decoration(s: str) -> str:
    s = s.strip()
    s = _TEXT_WRAP_RE.sub(r"\1", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\left", "").replace("\\right", "")
    return s.strip().rstrip(".").strip()


def parse_number(s: str) -> Fraction | None:
    """`s` as an exact number, or None: "1,234", "$5", "5.0", "-3", "3/4", "\\frac{3}{4}", "1e3"."""
    s = _strip_decoration(s).replace(" ", "")
    frac = _FRAC_RE.match(s)
    if frac:
        sign, num, den = frac.groups()
        return None if int(den) == 0 else Fraction(int(num), int(den)) * (-1 if sign else 1)
    if _NUMBER_RE.fullmatch(s) and any(ch.isdigit() for ch in s):
        s = s.replace(",", "")
        num, _, den = s.partition("/")
        try:
            value = Fraction(num)
            return value / Fraction(den) if den else value
        except (ValueError, ZeroDivisionError):
            return None
    if _SCIENTIFIC_RE.fullmatch(s):  # exact, unlike float: "1.5e-1" is 3/20
        return Fraction(s)
    return None


def normalize_answer(s: str | None) -> str | None:
    """A canonical key for an answer: the exact number if it is one, else the cleaned-up string."""
    if s is None:
        return None
    number = parse_number(s)
    if number is not None:
        return str(number)  # Fraction prints "5", "3/4", "-3": equal values give equal keys
    return re.sub(r"\s+", "", _strip_decoration(s)).lower() or None


def answers_match(pred: str | None, gold: str, rel_tol: float = 1e-6) -> bool:
    """Numbers by value (integers exactly, other numbers to a relative `rel_tol`), else normalised
    strings.

    A numeric gold also accepts a prediction with exactly one number in it ("18 dollars"), but not
    one that hedges between several ("5 or 6").
    """
    if pred is None:
        return False
    a, b = parse_number(pred), parse_number(gold)
    if a is None and b is not None:
        numbers = _NUMBER_SEARCH_RE.findall(pred)
        a = parse_number(numbers[0]) if len(numbers) == 1 else None
    if a is not None and b is not None:
        if a == b:
            return True
        if a.denominator == 1 or b.denominator == 1:
            return False  # integers are exact: 1,450,001 is not 1,450,000 however large they get
        # Two non-integers: allow a rounded repeating decimal ("0.3333333" for 1/3).
        return abs(float(a) - float(b)) <= rel_tol * max(1.0, abs(float(b)))
    return normalize_answer(pred) == normalize_answer(gold)


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to `combine_rewards` and `load_reward` under `name`."""

    def decorator(fn: RewardFn) -> RewardFn:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != fn.__qualname__:
            raise ConfigError(f"reward {name!r} is already registered ({existing.__module__}.{existing.__qualname__})")
        _REGISTRY[name] = fn
        return fn

    return decorator


def known_rewards() -> list[str]:
    return sorted(_REGISTRY)


def _accepting_meta(fn: RewardFn) -> RewardFn:
    """Wrap a user function that takes no `**meta` so that extra meta keys are dropped, not fatal."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn
    named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def wrapper(completion: str, answer: str, **meta) -> float:
        return fn(completion, answer, **{k: v for k, v in meta.items() if k in named})

    wrapper.__name__ = getattr(fn, "__name__", "reward")
    return wrapper


def _import_reward_module(name: str):
    """The module of a `module:function` reward spec. The current directory is searched too (last, so
    it never shadows an installed module): `--reward my_rewards:exact=1` finds ./my_rewards.py from
    the console script, which, unlike `python -m`, does not put it on sys.path."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    return importlib.import_module(name)


def load_reward(spec: str) -> RewardFn:
    """A reward by registered name (`"accuracy"`) or by import path (`"my_pkg.rewards:length"`, the
    module found on sys.path or in the current directory)."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = _import_reward_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"reward {spec!r}: cannot import module {module_name!r} ({exc}); it is looked for "
                              f"on sys.path and in the current directory {os.getcwd()}") from exc
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ConfigError(f"reward {spec!r}: module {module_name!r} has no function {attr!r}")
        return _accepting_meta(fn)
    if spec not in _REGISTRY:
        raise ConfigError(f"unknown reward {spec!r}; known: {', '.join(known_rewards())} "
                          "(or your own as 'module:function', e.g. my_rewards:exact for exact() in ./my_rewards.py)")
    return _REGISTRY[spec]


class RewardError(SeeklingError):
    """A reward cannot score the samples (it failed on every one): a broken reward function."""


@dataclass
class RewardStats:
    """Per-reward counts of samples scored 0 because the function raised or returned a non-number."""

    errors: Counter = field(default_factory=Counter)
    bad_values: Counter = field(default_factory=Counter)
    last_message: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.errors.values()) + sum(self.bad_values.values())


class RewardResult(NamedTuple):
    total: float
    components: dict[str, float]  # unweighted value of each reward, by its name or spec


class CombinedReward:
    """`sum(weight * reward(completion, answer, **meta))` over named rewards, failures scored 0."""

    def __init__(self, weights: dict[str, float], stats: RewardStats | None = None):
        if not weights:
            raise ConfigError("combine_rewards needs at least one reward, e.g. {'accuracy': 1.0}")
        self.weights = {name: float(w) for name, w in weights.items()}
        self.functions = {name: load_reward(name) for name in weights}
        self.stats = stats if stats is not None else RewardStats()
        self._lock = threading.Lock()  # rewards may be scored from a thread pool

    def _score(self, name: str, completion: str, answer: str, meta: dict) -> float:
        try:
            value = self.functions[name](completion, answer, **meta)
        except SeeklingError:
            raise  # a misconfiguration (say, missing meta) must stop the run, not score zeros
        except Exception as exc:  # noqa: BLE001 - a user function may fail in any way
            self._count(name, self.stats.errors, f"{type(exc).__name__}: {exc}")
            return 0.0
        if isinstance(value, bool):  # True/False: a verdict, scored 1/0
            return float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            self._count(name, self.stats.bad_values, f"returned {value!r}, not a finite number or a bool")
            return 0.0
        return float(value)

    def _count(self, name: str, counter: Counter, message: str) -> None:
        with self._lock:
            first = self.stats.errors[name] + self.stats.bad_values[name] == 0
            counter[name] += 1
            self.stats.last_message[name] = message
        if first:  # warn once per reward; the counter keeps the rest
            logger.warning("reward %r scored a sample 0: %s (further failures only counted)", name, message)

    def failure_counts(self) -> dict[str, int]:
        """Samples each reward has failed on so far (raised, or returned a non-number)."""
        return {name: self.stats.errors[name] + self.stats.bad_values[name] for name in self.weights}

    def check_not_all_failed(self, before: dict[str, int], samples: int) -> None:
        """RewardError when a reward failed on every one of the `samples` scored since `before`
        (`failure_counts()` then): every sample would score 0 and training would learn nothing."""
        for name, count in self.failure_counts().items():
            if samples and count - before.get(name, 0) >= samples:
                raise RewardError(
                    f"reward {name!r} failed on all {samples} samples of this step, so every one scored 0 and there "
                    f"is nothing to learn; stopped. Last failure: {self.stats.last_message.get(name, '?')}. "
                    "A reward is fn(completion: str, answer: str, **meta) -> float (or bool)")

    def __call__(self, completion: str, answer: str, **meta) -> RewardResult:
        components = {name: self._score(name, completion, answer, meta) for name in self.weights}
        total = sum(self.weights[name] * value for name, value in components.items())
        return RewardResult(total, components)


def combine_rewards(weights: dict[str, float], stats: RewardStats | None = None) -> CombinedReward:
    """`combine_rewards({"accuracy": 1.0, "format": 0.2})(completion, answer, **meta)` ->
    `RewardResult(total, {"accuracy": ..., "format": ...})`. Unknown names raise `ConfigError`."""
    return CombinedReward(weights, stats)


# ----------------------------------------------------------------------------- the rewards

DEFAULT_END_TOKENS = ("<|end▁of▁sentence|>", "<|endoftext|>", "<|im_end|>", "</s>", "<eos>")
_FORMAT_RE = re.compile(rf"\s*{THINK_OPEN}(.*?){THINK_CLOSE}\s*{ANSWER_OPEN}(.*?){ANSWER_CLOSE}\s*(.*)", re.DOTALL)


@register_reward("format")
def format_reward(completion: str, answer: str = "", **meta) -> float:
    """1.0 iff the completion is `<think> ... </think> <answer> ... </answer>` and nothing else.

    Whitespace is allowed around and between the blocks; after `</answer>` only whitespace and an
    optional end token (meta `end_token`, default the common ones). A tag inside a block (nesting,
    a second block, a missing closing tag) fails, as in R1's format reward.
    """
    if any(completion.count(tag) != 1 for tag in TAG_TOKENS):
        return 0.0
    match = _FORMAT_RE.fullmatch(completion)
    if match is None:
        return 0.0
    tail = match.group(3).strip()
    end_tokens = meta.get("end_token") or DEFAULT_END_TOKENS
    end_tokens = (end_tokens,) if isinstance(end_tokens, str) else tuple(end_tokens)
    return 1.0 if tail == "" or tail in end_tokens else 0.0


@register_reward("accuracy")
def accuracy_reward(completion: str, answer: str, **meta) -> float:
    """1.0 iff the extracted answer equals `answer`: numbers compared by value ("1,234" == "1234",
    "3/4" == "0.75", "$5" == "5.0"), anything else by normalised string."""
    return 1.0 if answers_match(extract_answer(completion), answer) else 0.0


_COUNTDOWN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class _CountdownParser:
    """Whitelist walk over Python's AST: integers, + - * / and parentheses, evaluated exactly."""

    def __init__(self) -> None:
        self.used: list[int] = []

    def value(self, node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return self.value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            self.used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _COUNTDOWN_OPS:  # a zero division: caught by the caller
            return _COUNTDOWN_OPS[type(node.op)](self.value(node.left), self.value(node.right))
        raise ValueError(f"not allowed in a countdown answer: {type(node).__name__}")


def countdown_value(expression: str) -> tuple[Fraction, list[int]] | None:
    """Exact value of an arithmetic expression and the integers it uses, or None if not one."""
    expression = expression.replace("×", "*").replace("÷", "/").replace("x", "*").replace("X", "*")
    # Characters first (no names, calls or decimals can get through), then the AST whitelist.
    if len(expression) > 500 or not re.fullmatch(r"[\d\s+\-*/()]+", expression):
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        parser = _CountdownParser()
        return parser.value(tree), parser.used
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


@register_reward("countdown")
def countdown_reward(completion: str, answer: str, **meta) -> float:
    """1.0 iff the answer expression uses only the numbers in meta `numbers` (each at most once) with
    + - * / ( ) (x and × read as *) and equals meta `target` (default: `answer`) exactly.

    The answer is taken from `<answer>` tags or `\\boxed{}`; a trailing `= <target>` is allowed.
    """
    if "numbers" not in meta:
        raise ConfigError("countdown reward needs meta 'numbers' (the numbers the answer may use)")
    target = parse_number(str(meta.get("target", answer)))
    if target is None:
        raise ConfigError(f"countdown reward: target {meta.get('target', answer)!r} is not a number")
    expression = extract_answer(completion, "answer") or extract_answer(completion, "boxed")
    if expression is None:
        return 0.0
    if "=" in expression:  # "(3 + 5) * 3 = 24": accept only if the right side is the target
        expression, _, right = expression.partition("=")
        if parse_number(right) != target:
            return 0.0
    result = countdown_value(expression)
    if result is None:
        return 0.0
    value, used = result
    allowed = Counter(int(n) for n in meta["numbers"])
    if Counter(used) - allowed:  # some number not given, or used more often than given
        return 0.0
    return 1.0 if value == target else 0.0


# math_verify's timeout uses signal.alarm, which only works in the main thread: elsewhere (a thread
# pool scoring rewards) it raises, so there we run without a timeout.
def _math_timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import parse

    text = gold.strip()
    if "\\boxed" not in text and "$" not in text:
        text = "\\boxed{" + text + "}"
    return parse(text, parsing_timeout=_math_timeout())


def math_equal(completion: str, gold: str) -> bool:
    """Whether the final answer of `completion` equals `gold` as mathematics (Hugging Face math_verify).

    The prediction is the last `<answer>` or `\\boxed{}` in the completion; without either,
    math_verify looks for the last LaTeX or plain expression itself. Exact string match is checked
    first because it is free and math_verify takes milliseconds.
    """
    from math_verify import parse, verify

    pred_text = extract_answer(completion, "answer") or extract_answer(completion, "boxed")
    if pred_text is not None:
        pred_text = _BOLD_RE.sub(r"\1", pred_text).strip().rstrip(".").strip()  # "\textbf{(073)}."
        if re.sub(r"\s+", "", pred_text) == re.sub(r"\s+", "", gold):
            return True
        gold_base = _BASE_RE.fullmatch(re.sub(r"\s+", "", gold).strip("$"))
        if gold_base is not None:  # same digits, and the same base if the prediction names one
            pred_base = _BASE_RE.fullmatch(re.sub(r"\s+", "", pred_text).strip("$"))
            digits, base = pred_base.groups() if pred_base else (pred_text.strip("$ "), gold_base[2])
            return digits.lower() == gold_base[1].lower() and int(base) == int(gold_base[2])
        if "$" not in pred_text and "\\boxed" not in pred_text:
            pred_text = "\\boxed{" + pred_text + "}"
    timeout = _math_timeout()
    pred = parse(pred_text if pred_text is not None else completion, parsing_timeout=timeout)
    gold_parsed = _parse_gold(gold)
    if not pred or not gold_parsed:
        return False
    return bool(verify(gold_parsed, pred, timeout_seconds=timeout))


@register_reward("math")
def math_reward(completion: str, answer: str, **meta) -> float:
    """1.0 iff the answer is mathematically equal to `answer` (LaTeX allowed); see `math_equal`."""
    return 1.0 if math_equal(completion, answer) else 0.0


@register_reward("overlong")
def overlong_reward(completion: str, answer: str = "", **meta) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), in [-1, 0].

    0 up to `max_length - cache_length` tokens, then falling linearly to -1 at `max_length`:
    `min(-(L - (L_max - L_cache)) / L_cache, 0)`, held at -1 past `max_length` as DAPO does.
    Meta: `length` (completion length in tokens), `max_length`, `cache_length`.
    """
    missing = [k for k in ("length", "max_length", "cache_length") if k not in meta]
    if missing:
        raise ConfigError(f"overlong reward needs meta {', '.join(missing)}")
    length, max_length, cache = int(meta["length"]), int(meta["max_length"]), int(meta["cache_length"])
    if not 0 < cache <= max_length:
        raise ConfigError(f"overlong reward: cache_length {cache} must be in 1..max_length ({max_length})")
    return max(min(-(length - (max_length - cache)) / cache, 0.0), -1.0)


# ----------------------------------------------------------------------------- grading a task's answer
# The verifier per task; any other task (the synthetic arithmetic ones) is graded by number.
GRADERS: dict[str, Callable[..., float]] = {
    "math500": math_reward,
    "math": math_reward,
    "aime2024": math_reward,
    "aime": math_reward,
    "gsm8k": accuracy_reward,
    "countdown": countdown_reward,
}


def grade(task_name: str, completion: str, problem: Any) -> bool:
    """Whether `completion` answers `problem` correctly, by the verifier that fits the task."""
    if isinstance(problem, dict):
        answer, meta = str(problem["answer"]), problem.get("meta") or {}
    else:
        answer, meta = str(problem.answer), problem.meta or {}
    verifier = GRADERS.get(task_name, accuracy_reward)
    return verifier(completion, answer, **meta) == 1.0


@register_reward("correct")
def correct_reward(completion: str, answer: str, **meta) -> float:
    """1.0 iff the task's own verifier accepts the answer (`grade` with meta `task`): countdown checks
    the expression, math sets use math_verify, the rest compare numbers."""
    return 1.0 if grade(meta.get("task", ""), completion, {"answer": answer, "meta": meta}) else 0.0


def graded_answer(task_name: str, completion: str) -> str | None:
    """The answer the task's verifier reads from `completion`, or None (what majority voting counts).

    The number-comparing tasks read `extract_answer` in every mode; countdown and the math sets read
    only a tagged answer (`<answer>` or `\\boxed{}`), so a stray number in an untagged completion
    never votes for an answer the verifier would not accept."""
    if GRADERS.get(task_name, accuracy_reward) is accuracy_reward:
        return extract_answer(completion)
    return extract_answer(completion, "answer") or extract_answer(completion, "boxed")
