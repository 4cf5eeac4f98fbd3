"""Evaluation sets (GSM8K, MATH-500, AIME 2024) as `Problem`s, and `grade`, the verifier per task.

The sets ship inside the package (`seekling/evaldata/`, compressed JSON Lines exactly as published, with
their sources, licences and sha256 sums); `SEEKLING_DATA=DIR` (the same layout, `.jsonl` or `.jsonl.gz`)
or an explicit path reads other copies (JSONL, Parquet, CSV or a `datasets` dataset: `seekling.datasets_io`). Each loader returns the same
`Problem` shape the synthetic tasks use: `id, task, prompt, answer (str), solution (str), meta`.
The prompt is the bare question; `question_text` adds the instruction a model is asked it with.

Their verifiers are `seekling.rewards.grade` (math_verify for MATH-500 and AIME, numbers for GSM8K).

Try it:
    .venv/bin/python -c "from seekling.evalsets import load_evalset; from seekling.rewards import grade; \
p = load_evalset('gsm8k', limit=1)[0]; print(p.answer, grade('gsm8k', p.solution, p))"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from seekling.datasets_io import read_rows
from seekling.errors import DataError
from seekling.rewards import parse_number
from seekling.tasks import Problem  # one record for synthetic and published problems

DATA_ENV = "SEEKLING_DATA"
# R1's evaluation prompt for math ("Please reason step by step, ..."), adapted to our answer tags:
# the graders read `<answer>` first and `\boxed{}` second, so either way of answering is scored.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within <answer> </answer>."


PACKAGED = Path(__file__).parent / "evaldata"


def data_dir() -> Path:
    """Where the evaluation sets are read from: `$SEEKLING_DATA`, else the copies shipped in the package."""
    if os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV]).expanduser()
        if not path.is_dir():
            raise DataError(f"{DATA_ENV}={path} is not a directory")
        return path
    return PACKAGED


def set_file(name: str, split: str) -> Path:
    """`DIR/name/split.jsonl`, or its `.jsonl.gz` (the packaged form) when only that exists."""
    plain = data_dir() / name / f"{split}.jsonl"
    return plain if plain.is_file() or not plain.with_suffix(".jsonl.gz").is_file() else plain.with_suffix(".jsonl.gz")


def gsm8k_gold(solution: str, where: str = "") -> str:
    """The number after `####` in a GSM8K solution, commas stripped ("1,234" -> "1234")."""
    if "####" not in solution:
        raise DataError(f"{where}: GSM8K answer has no '#### <number>' line")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if parse_number(gold) is None:
        raise DataError(f"{where}: GSM8K answer after '####' is not a number: {gold!r}")
    return gold


def load_gsm8k(path: str | Path | None = None, split: str = "test", limit: int | None = None) -> list[Problem]:
    path = Path(path) if path is not None else set_file("gsm8k", split)
    problems = []
    for line_no, where, row in read_rows(path, ("question", "answer"), default_split=split)[:limit]:
        problems.append(Problem(
            id=f"gsm8k/{split}/{line_no - 1}",
            task="gsm8k",
            prompt=row["question"],
            answer=gsm8k_gold(row["answer"], where),
            solution=row["answer"],
            meta={"line": line_no},
        ))
    return problems


def load_math500(path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    path = Path(path) if path is not None else set_file("math500", "test")
    problems = []
    for line_no, where, row in read_rows(path, ("problem", "answer"), default_split="test")[:limit]:
        problems.append(Problem(
            id=str(row.get("unique_id", f"math500/{line_no - 1}")),
            task="math500",
            prompt=row["problem"],
            answer=str(row["answer"]),
            solution=row.get("solution", ""),
            meta={"line": line_no, "subject": row.get("subject"), "level": row.get("level")},
        ))
    return problems


def load_aime2024(path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    path = Path(path) if path is not None else set_file("aime2024", "test")
    problems = []
    for line_no, where, row in read_rows(path, ("problem", "answer"), default_split="test")[:limit]:
        answer = str(row["answer"]).strip()
        if parse_number(answer) is None:
            raise DataError(f"{where}: AIME answer is not an integer: {answer!r}")
        problems.append(Problem(
            id=f"aime2024/{row.get('id', line_no - 1)}",
            task="aime2024",
            prompt=row["problem"],
            answer=answer,
            solution=row.get("solution", ""),
            meta={"line": line_no, "url": row.get("url")},
        ))
    return problems


EVALSETS: dict[str, Callable[..., list[Problem]]] = {
    "gsm8k": load_gsm8k,
    "math500": load_math500,
    "aime2024": load_aime2024,
}


def question_text(problem: Problem) -> str:
    """The question as a model is asked it: published math sets get R1's step-by-step instruction."""
    return f"{problem.prompt}\n{MATH_INSTRUCTION}" if problem.task in EVALSETS else problem.prompt


def load_evalset(name: str, path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """`load_evalset("math500")`; `path` reads another JSONL of the same layout."""
    if name not in EVALSETS:
        raise DataError(f"unknown evaluation set {name!r}; known: {', '.join(EVALSETS)}")
    return EVALSETS[name](path=path, limit=limit)
