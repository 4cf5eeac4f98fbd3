"""Evaluation-set loaders and graders (seekling/evalsets.py), checked on the real data sets.

The gold solutions must grade as correct against their own answers, and answers altered to be wrong
must be rejected; the packaged copies match their recorded sha256 sums. Measured on the packaged copies (a few seconds on 2 cores): GSM8K test 1319/1319
gold solutions correct, 0/1319 with the gold +1 accepted; MATH-500 500/500 gold solutions correct,
0/1000 accepted with the first number of the answer +1 (in the answer, and in the solution's box);
AIME 2024 30/30.
"""

import dataclasses
import gzip
import hashlib
import json
import re

import pytest

from seekling.errors import DataError
from seekling.evalsets import (
    PACKAGED,
    Problem,
    data_dir,
    gsm8k_gold,
    load_aime2024,
    load_evalset,
    load_gsm8k,
    load_math500,
)
from seekling.rewards import extract_answer, format_reward, grade
from seekling.tasks import TASKS, completion_text, make_problems

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def gsm8k():
    return load_gsm8k()


@pytest.fixture(scope="module")
def math500():
    return load_math500()


def bump_first_number(answer: str) -> str | None:
    """The answer with its first integer increased by one ("\\frac{3}{56}" -> "\\frac{4}{56}")."""
    match = re.search(r"\d+", answer)
    if match is None:
        return None
    return answer[:match.start()] + str(int(match.group()) + 1) + answer[match.end():]


def rebox(solution: str, new_answer: str) -> str:
    """The solution with the content of its last \\boxed{} replaced."""
    start = solution.rfind("\\boxed{") + len("\\boxed{")
    old = extract_answer(solution, "boxed")
    at = solution.index(old, start)
    return solution[:at] + new_answer + solution[at + len(old):]


# ----------------------------------------------------------------------------- loaders

def test_the_packaged_sets_are_the_published_files():
    """sha256 of each decompressed file against SHA256SUMS (recorded from the published copies), and the
    licence and sources shipped beside them."""
    sums = dict(reversed(line.split()) for line in (PACKAGED / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"gsm8k/test.jsonl", "gsm8k/train.jsonl", "math500/test.jsonl", "aime2024/test.jsonl"}
    for name, digest in sums.items():
        data = gzip.decompress((PACKAGED / f"{name}.gz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == digest, name
    assert "MIT License" in (PACKAGED / "gsm8k" / "LICENSE").read_text()
    readme = (PACKAGED / "README.md").read_text()
    assert all(word in readme for word in ("grade-school-math", "prm800k", "AIME 2024", "licence"))


def test_loaders_read_the_packaged_sets_and_seekling_data_overrides(gsm8k, math500, tmp_path, monkeypatch):
    assert data_dir() == PACKAGED
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "so\\n#### 2"}\n')
    monkeypatch.setenv("SEEKLING_DATA", str(tmp_path))
    assert [p.answer for p in load_gsm8k()] == ["2"]
    monkeypatch.delenv("SEEKLING_DATA")
    assert len(gsm8k) == 1319 and len(math500) == 500 and len(load_aime2024()) == 30
    first = gsm8k[0]
    assert isinstance(first, Problem) and first.task == "gsm8k" and first.id == "gsm8k/test/0"
    assert first.answer == "18" and first.solution.endswith("#### 18")
    assert first.prompt.startswith("Janet")
    assert math500[0].answer == r"\left( 3, \frac{\pi}{2} \right)" and math500[0].meta["level"] == 2
    aime = load_aime2024()[0]
    assert aime.answer == "204" and aime.task == "aime2024" and aime.id == "aime2024/60"
    assert len(load_evalset("gsm8k", limit=5)) == 5
    assert len({p.id for p in gsm8k}) == 1319  # ids unique


def test_gsm8k_gold_strips_commas():
    assert gsm8k_gold("a lot\n#### 1,450,000") == "1450000"
    assert gsm8k_gold("#### -10") == "-10"
    assert any(p.answer == "1450000" for p in load_gsm8k())  # the real row written "1,450,000"


def test_data_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "aime2024").mkdir()
    (tmp_path / "aime2024" / "test.jsonl").write_text('{"problem": "p", "answer": "7"}\n')
    monkeypatch.setenv("SEEKLING_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    assert load_aime2024()[0].answer == "7"
    monkeypatch.setenv("SEEKLING_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="SEEKLING_DATA"):
        data_dir()


def test_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n\n{"problem": "q"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: missing field 'answer'"):
        load_math500(path)
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_aime2024(path)
    path.write_text('{"question": "q", "answer": "no hashes here"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*####"):
        load_gsm8k(path)
    with pytest.raises(DataError, match="no such file"):
        load_gsm8k(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="known: gsm8k, math500, aime2024"):
        load_evalset("mmlu")


# ----------------------------------------------------------------------------- graders on real data

def test_gsm8k_gold_solutions_all_correct_and_bumped_all_rejected(gsm8k):
    assert sum(grade("gsm8k", p.solution, p) for p in gsm8k) == len(gsm8k)
    wrong = [dataclasses.replace(p, answer=str(int(p.answer) + 1)) for p in gsm8k]
    assert sum(grade("gsm8k", p.solution, p) for p in wrong) == 0


def test_math500_gold_solutions_correct(math500):
    correct = sum(grade("math500", p.solution, p) for p in math500)
    assert correct / len(math500) >= 0.99
    assert correct == 500  # measured: 500/500


def test_math500_altered_answers_rejected(math500):
    # A number changed (in the gold, and in the solution's box), or for the 11 answers without a
    # digit ("\text{(C)}", "p - q", "\pi") the next such answer.
    no_digit = [p.answer for p in math500 if bump_first_number(p.answer) is None]
    accepted, tried = [], 0
    for p in math500:
        wrong = bump_first_number(p.answer) or no_digit[(no_digit.index(p.answer) + 1) % len(no_digit)]
        tried += 2
        if grade("math500", p.solution, dataclasses.replace(p, answer=wrong)):
            accepted.append((p.answer, wrong))
        if grade("math500", rebox(p.solution, wrong), p):
            accepted.append(("boxed", p.answer, wrong))
    assert tried == 1000
    assert len(accepted) / tried <= 0.01, accepted
    assert accepted == []  # measured: 0/1000


def test_math500_other_problems_answers_rejected(math500):
    # Each solution against the next problem's answer, where the two answers differ as strings. The
    # one that passes is "5" against "x=5", which math_verify rightly counts as the same value.
    accepted, tried = [], 0
    for p, other in zip(math500, math500[1:] + math500[:1]):
        if p.answer.replace(" ", "") == other.answer.replace(" ", ""):
            continue
        tried += 1
        if grade("math500", p.solution, dataclasses.replace(p, answer=other.answer)):
            accepted.append((p.answer, other.answer))
    assert tried == 498 and accepted == [("5", "x=5")]


def test_aime_gold_solutions_correct():
    problems = load_aime2024()
    # The AoPS solutions box answers as "\textbf{(073)}", "104." or not at all (graded by the
    # last expression then); all 30 pass.
    assert sum(grade("aime2024", p.solution, p) for p in problems) == 30
    assert not grade("aime2024", r"\boxed{205}", problems[0])


# ----------------------------------------------------------------------------- grader dispatch

def test_grade_picks_the_verifier():
    math_problem = Problem("m", "math500", "?", r"\frac{1}{2}", solution="")
    assert grade("math500", r"<answer>0.5</answer>", math_problem)
    assert grade("math500", r"<answer>\dfrac{2}{4}</answer>", math_problem)
    assert not grade("gsm8k", r"<answer>\dfrac{2}{4}</answer>", {"answer": "5"})
    base = {"answer": "52_8", "meta": {}}
    assert grade("math500", r"\boxed{52_8}", base) and grade("math500", r"\boxed{52}", base)
    assert not grade("math500", r"\boxed{52_9}", base) and not grade("math500", r"\boxed{53_8}", base)
    countdown = {"answer": "24", "meta": {"numbers": [3, 5, 3], "target": 24}}
    assert grade("countdown", "<answer>(3 + 5) * 3</answer>", countdown)
    assert not grade("countdown", "<answer>(3 + 5) * 3 * 1</answer>", countdown)
    assert not grade("countdown", "<answer>24</answer>", countdown)  # 24 is not among the numbers
    synthetic = {"id": "a1", "task": "arithmetic", "answer": "-7", "meta": {}}
    assert grade("arithmetic", "<think>..</think> <answer>-7.0</answer>", synthetic)
    assert not grade("arithmetic", "<answer>7</answer>", synthetic)


def test_problem_round_trips_as_json():
    problem = load_aime2024(limit=1)[0]
    again = Problem(**json.loads(json.dumps(dataclasses.asdict(problem))))
    assert again == problem


@pytest.mark.parametrize("task", sorted(TASKS))
def test_synthetic_gold_completions_graded_correct(task):
    problems = make_problems(task, "test", 40, seed=0)
    for problem in problems:
        gold = completion_text(problem)
        assert format_reward(gold, problem.answer) == 1.0
        assert grade(task, gold, problem), (problem.prompt, gold)
        if task != "countdown":  # a number one off is wrong
            wrong = gold.replace(f"<answer> {problem.answer} </answer>",
                                 f"<answer> {bump_first_number(problem.answer)} </answer>")
            assert wrong != gold and not grade(task, wrong, problem), wrong
    if task == "countdown":  # the target itself is not an allowed expression
        p = problems[0]
        assert not grade(task, f"<answer> {p.meta['target']} </answer>", p)
