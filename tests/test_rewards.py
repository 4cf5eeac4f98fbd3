"""Rule-based rewards, answer extraction and the reward registry (seekling/rewards.py)."""

import math
import sys
import types
from fractions import Fraction

import pytest

from seekling.errors import ConfigError, SeeklingError
from seekling.rewards import (
    RewardError,
    RewardStats,
    answers_match,
    combine_rewards,
    countdown_reward,
    countdown_value,
    extract_answer,
    format_reward,
    known_rewards,
    load_reward,
    math_reward,
    normalize_answer,
    overlong_reward,
    parse_number,
    register_reward,
)

GOOD = "<think> 2 + 2 is 4 </think> <answer> 4 </answer>"


# ----------------------------------------------------------------------------- extraction, per mode

def test_extract_answer_tag_takes_the_last_one():
    text = "<answer>7</answer> then <answer> 8 </answer>"
    assert extract_answer(text, mode="answer") == "8"
    assert extract_answer("<answer>7", mode="answer") is None  # never closed
    assert extract_answer("no tags", mode="answer") is None


def test_extract_boxed_nested_braces_and_last():
    text = r"first \boxed{1} then \boxed{\frac{1}{\sqrt{2}}} done"
    assert extract_answer(text, mode="boxed") == r"\frac{1}{\sqrt{2}}"
    assert extract_answer(r"\boxed 5$", mode="boxed") == "5"
    assert extract_answer(r"\boxed{\frac{1}{2}", mode="boxed") is None  # unbalanced
    assert extract_answer(r"\fbox{9}", mode="boxed") == "9"


def test_extract_gsm8k_hashes():
    text = "She has 3*4=<<3*4=12>>12 apples.\n#### 1,234\n"
    assert extract_answer(text, mode="gsm8k") == "1,234"
    assert extract_answer("#### ", mode="gsm8k") is None


def test_extract_last_number():
    assert extract_answer("it costs $1,234.50, not 7", mode="last_number") == "7"
    assert extract_answer("so x = -3.", mode="last_number") == "-3"
    assert extract_answer("pages 3-4", mode="last_number") == "4"  # a hyphen is not a sign
    assert extract_answer("ratio 3/4", mode="last_number") == "3/4"
    assert extract_answer("no digits", mode="last_number") is None


def test_extract_answer_mode_order():
    assert extract_answer(r"\boxed{2} <answer>1</answer> #### 3 and 4") == "1"
    assert extract_answer(r"\boxed{2} #### 3 and 4") == "2"
    assert extract_answer("#### 3\nand 4") == "3"
    assert extract_answer("3 and 4") == "4"
    with pytest.raises(ConfigError, match="known: answer, boxed"):
        extract_answer("x", mode="nope")


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("text, value", [
    ("1,234", Fraction(1234)), ("$5", Fraction(5)), ("5.0", Fraction(5)), ("-3", Fraction(-3)),
    ("3/4", Fraction(3, 4)), ("0.75", Fraction(3, 4)), (r"\frac{3}{4}", Fraction(3, 4)),
    (r"-\dfrac{1}{2}", Fraction(-1, 2)), (".5", Fraction(1, 2)), ("1e3", Fraction(1000)),
    ("12.", Fraction(12)), (r"\$18", Fraction(18)), ("1.5e-1", Fraction(3, 20)),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["abc", "1,2", "1/0", "nan", "inf", "", "-", "1e99999", "1_000"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_answers_match():
    assert answers_match("1,234", "1234") and answers_match("5.0", "5") and answers_match("$5", "5")
    assert answers_match("3/4", "0.75") and answers_match("0.3333333", "1/3")  # 3.3e-8 < 1e-6
    assert not answers_match("0.333", "1/3") and not answers_match("-3", "3")
    assert answers_match("18 dollars", "18")  # exactly one number in it
    assert not answers_match("5 or 6", "6")  # hedging between numbers does not count
    assert answers_match(r"\text{ Evelyn }", "evelyn")  # string fallback, normalised
    assert not answers_match(None, "1")
    assert normalize_answer("5.0") == normalize_answer("5") == "5"


# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize("text", [
    GOOD,
    "<think>a</think><answer>b</answer>",
    "\n  <think>\nline\n</think>\n\n<answer>b</answer>  \n",
    "<think>a</think> <answer>b</answer><|end▁of▁sentence|>",
    "<think>a</think> <answer>b</answer> </s>\n",
])
def test_format_accepts(text):
    assert format_reward(text, "") == 1.0


@pytest.mark.parametrize("text", [
    "<think>a</think>",                                          # no answer
    "<answer>b</answer>",                                        # no think
    "<think>a <answer>b</answer>",                               # think never closed
    "<think>a</think> <answer>b",                                # answer never closed
    "<think>a</think> <answer>b</answer> more text",             # text after </answer>
    "hello <think>a</think> <answer>b</answer>",                 # text before <think>
    "<answer>b</answer> <think>a</think>",                       # wrong order
    "<think>a <think>b</think> c</think> <answer>d</answer>",    # nested
    "<think>a</think> <answer>b</answer> <answer>c</answer>",    # two answers
    "<think>a</think> x <answer>b</answer>",                     # text between
    "<think>a</think> <answer><think>b</think></answer>",        # tag inside answer
    "",
])
def test_format_rejects(text):
    assert format_reward(text, "") == 0.0


def test_format_custom_end_token():
    text = "<think>a</think> <answer>b</answer><|eot|>"
    assert format_reward(text, "") == 0.0
    assert format_reward(text, "", end_token="<|eot|>") == 1.0


# ----------------------------------------------------------------------------- accuracy

def test_accuracy():
    acc = load_reward("accuracy")
    assert acc("<think>x</think> <answer>1,234</answer>", "1234") == 1.0
    assert acc("<think>x</think> <answer>$5.00</answer>", "5") == 1.0
    assert acc(r"so \boxed{0.75}", "3/4") == 1.0
    assert acc("#### -3", "-3") == 1.0
    assert acc("<answer>4</answer>", "5") == 0.0
    assert acc("<answer>Paris</answer>", "paris") == 1.0
    assert acc("", "5") == 0.0


# ----------------------------------------------------------------------------- countdown

def test_countdown_value_is_exact_and_lists_numbers():
    assert countdown_value("(6 - 4/2) * 3") == (Fraction(12), [6, 4, 2, 3])
    assert countdown_value("1/3 + 1/3 + 1/3")[0] == 1  # exact, no 0.9999
    assert countdown_value("2 ** 3") is None and countdown_value("2 // 3") is None
    assert countdown_value("__import__('os')") is None and countdown_value("2.5 + 1") is None
    assert countdown_value("5 / (3 - 3)") is None  # division by zero is no answer
    assert countdown_value("(" * 300 + "1" + ")" * 300) is None  # too long, no RecursionError


@pytest.mark.parametrize("expression, score", [
    ("(25 - 5) * 3 + 4", 1.0),         # 64, all four numbers
    ("(25 - 5) x 3 + 4", 1.0),         # x read as *
    ("(25 - 5) × 3 + 4", 1.0),
    ("(25 - 5) * 3 + 4 = 64", 1.0),    # trailing "= target"
    ("(25 - 5) * 3 + 4 = 65", 0.0),
    ("25 * 3 - 5 - 4 - 2", 0.0),       # 2 not given
    ("(25 - 5) * 3 + 4 + 4 - 4", 0.0), # 4 used three times
    ("25 + 25 + 5 + 3 + 4 + 2", 0.0),  # 25 twice
    ("25 * 3 - 5 - 4", 0.0),           # 66, not 64
    ("eval('64')", 0.0),
    ("", 0.0),
])
def test_countdown_reward(expression, score):
    completion = f"<think>try</think> <answer>{expression}</answer>"
    assert countdown_reward(completion, "64", numbers=[25, 5, 3, 4], target=64) == score


def test_countdown_target_from_answer_and_needs_numbers():
    assert countdown_reward("<answer>6 / 4</answer>", "3/2", numbers=[4, 6]) == 1.0
    with pytest.raises(ConfigError, match="numbers"):
        countdown_reward("<answer>1</answer>", "1")


# ----------------------------------------------------------------------------- math (math_verify)

@pytest.mark.parametrize("completion, gold, score", [
    (r"<answer>\frac{1}{2}</answer>", r"\frac12", 1.0),
    (r"so the answer is $\boxed{0.5}$", r"\frac{1}{2}", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),  # exact
    (r"\boxed{(3, \pi/2)}", r"$\left( 3, \frac{\pi}{2} \right)$", 1.0),
    (r"\boxed{x^2 + 2x + 1}", r"\boxed{(x+1)^2}", 1.0),
    (r"\boxed{3}", r"\frac{1}{2}", 0.0),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{8}", 0.0),
    ("no answer here", r"\frac{1}{2}", 0.0),
])
def test_math_reward(completion, gold, score):
    assert math_reward(completion, gold) == score


# ----------------------------------------------------------------------------- overlong (DAPO)

def test_overlong_hand_computed():
    meta = dict(max_length=100, cache_length=20)  # penalty starts after 80 tokens
    assert overlong_reward("", "", length=50, **meta) == 0.0
    assert overlong_reward("", "", length=80, **meta) == 0.0
    assert overlong_reward("", "", length=85, **meta) == pytest.approx(-0.25)  # -(85-80)/20
    assert overlong_reward("", "", length=100, **meta) == pytest.approx(-1.0)
    assert overlong_reward("", "", length=130, **meta) == -1.0  # held at -1 past max_length
    with pytest.raises(ConfigError, match="cache_length"):
        overlong_reward("", "", length=5, max_length=100)


# ----------------------------------------------------------------------------- registry and combine

def test_combine_rewards_total_and_components():
    reward = combine_rewards({"accuracy": 1.0, "format": 0.2})
    total, parts = reward(GOOD, "4")
    assert parts == {"accuracy": 1.0, "format": 1.0} and total == pytest.approx(1.2)
    total, parts = reward("the answer is 4", "4")  # right answer, no format
    assert parts == {"accuracy": 1.0, "format": 0.0} and total == pytest.approx(1.0)
    total, _ = combine_rewards({"format": 0.5, "overlong": 1.0})(GOOD, "", length=90,
                                                                 max_length=100, cache_length=20)
    assert total == pytest.approx(0.5 - 0.5)


def test_unknown_reward_lists_known_ones():
    with pytest.raises(SeeklingError) as info:
        combine_rewards({"acuracy": 1.0})
    for name in ("accuracy", "correct", "format", "countdown", "math", "overlong"):
        assert name in str(info.value)
    assert set(known_rewards()) >= {"accuracy", "format", "countdown", "math", "overlong"}


@pytest.fixture
def user_module(monkeypatch):
    module = types.ModuleType("my_rewards")

    def length_bonus(completion, answer):  # no **meta: extra keys must be dropped, not fatal
        return len(completion) / 100

    def explodes(completion, answer, **meta):
        raise RuntimeError("boom")

    def not_a_number(completion, answer, **meta):
        return meta.get("value", "high")

    module.length_bonus, module.explodes, module.not_a_number = length_bonus, explodes, not_a_number
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    return module


def test_user_reward_by_module_path(user_module):
    reward = combine_rewards({"accuracy": 1.0, "my_rewards:length_bonus": 2.0})
    total, parts = reward("<answer>4</answer>", "4", length=3)
    assert parts["my_rewards:length_bonus"] == pytest.approx(0.18) and total == pytest.approx(1.36)
    with pytest.raises(ConfigError, match="no function 'missing'"):
        load_reward("my_rewards:missing")
    with pytest.raises(ConfigError, match="cannot import module"):
        load_reward("no_such_module_xyz:fn")


def test_failing_user_reward_scores_zero_and_is_counted(user_module):
    stats = RewardStats()
    reward = combine_rewards({"accuracy": 1.0, "my_rewards:explodes": 1.0,
                              "my_rewards:not_a_number": 1.0}, stats=stats)
    for value in ("high", math.nan, None):
        total, parts = reward("<answer>4</answer>", "4", value=value)
        assert total == 1.0 and parts["my_rewards:explodes"] == 0.0
    assert stats.errors["my_rewards:explodes"] == 3
    assert stats.bad_values["my_rewards:not_a_number"] == 3  # str, NaN and None refused
    assert stats.total == 6 and "boom" in stats.last_message["my_rewards:explodes"]
    total, parts = reward("<answer>4</answer>", "4", value=0.5)
    assert parts["my_rewards:not_a_number"] == 0.5 and stats.total == 7
    for verdict in (True, False):  # a bool is a verdict: 1 or 0, not a failure
        assert reward("<answer>4</answer>", "4", value=verdict).components["my_rewards:not_a_number"] == float(verdict)
    assert stats.bad_values["my_rewards:not_a_number"] == 3


def test_a_reward_that_fails_on_every_sample_stops_with_its_message(user_module):
    reward = combine_rewards({"accuracy": 1.0, "my_rewards:explodes": 1.0})
    before = reward.failure_counts()
    for _ in range(4):
        reward("<answer>4</answer>", "4")
    with pytest.raises(RewardError, match=r"'my_rewards:explodes' failed on all 4 samples.*boom.*\*\*meta"):
        reward.check_not_all_failed(before, 4)
    reward.check_not_all_failed(before, 5)  # one of five samples scored: not every one failed


def test_user_reward_from_the_current_directory(tmp_path, monkeypatch):
    """The console script does not put the current directory on sys.path; rewards are looked for there."""
    (tmp_path / "cwd_rewards_mod.py").write_text(
        "def exact(completion: str, answer: str, **meta) -> bool:\n"
        "    return completion.strip().endswith(f'<answer> {answer} </answer>')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    reward = combine_rewards({"cwd_rewards_mod:exact": 1.0})
    assert reward("<think> t </think> <answer> 4 </answer>", "4").total == 1.0
    assert reward("<answer> 5 </answer>", "4").total == 0.0 and reward.stats.total == 0


def test_misconfigured_reward_is_loud_not_zero():
    with pytest.raises(ConfigError, match="numbers"):
        combine_rewards({"countdown": 1.0})("<answer>1</answer>", "1")


def test_register_reward():
    @register_reward("test_always_one")
    def always_one(completion, answer, **meta):
        return 1.0

    assert load_reward("test_always_one") is always_one
    with pytest.raises(ConfigError, match="already registered"):
        register_reward("accuracy")(always_one)


def test_math_reward_in_worker_threads():
    # math_verify's timeout uses signal.alarm, which raises outside the main thread: we must not.
    from concurrent.futures import ThreadPoolExecutor

    cases = [(r"\boxed{\frac{2}{4}}", r"\frac{1}{2}"), (r"\boxed{3}", "4")] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        scores = list(pool.map(lambda case: math_reward(*case), cases))
    assert scores == [1.0, 0.0] * 4
