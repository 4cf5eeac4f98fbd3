"""Evaluation as DeepSeek-R1 reports it: k samples per problem, pass@1, pass@k, cons@k, format, length.

For each problem the model samples k completions (temperature 0.6, top-p 0.95 by default, as R1);
each is graded by the task's verifier (`seekling.rewards.grade`). Per task this gives

    pass@1        mean over problems of the share of the k samples that are correct (R1's pass@1)
    pass@k        the unbiased estimator of Chen et al. 2021 from the same k samples (= any correct)
    cons@k        correctness of the majority-vote answer among the k samples (as the verifier read them)
    format        share of completions that are exactly `<think> ... </think> <answer> ... </answer>`
    mean_length   mean completion length in tokens (the closing end-of-text included)

Tasks are the held-out (test) split of every synthetic reasoning task (`seekling.tasks`) and the
published sets GSM8K, MATH-500 and AIME 2024 (`seekling.evalsets`, shipped in the package, or any JSONL
path). Sampling and scoring are separate: `score_task` is pure and tested with hand-computed numbers;
`evaluate` samples with `seekling.generate.generate` (or any function of the same signature).

    seekling eval runs/grpo/final --tasks countdown,gsm8k --n 100 --k 4 --out runs/eval.json
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from seekling.config import setting
from seekling.data import read_problems
from seekling.errors import ConfigError, DataError
from seekling.evalsets import EVALSETS, load_evalset, question_text
from seekling.generate import Completion, SamplingParams, generate
from seekling.metrics import consensus_correct, pass_at_1_mean, pass_at_k_mean
from seekling.rewards import format_reward, grade, graded_answer
from seekling.tasks import TASKS, Problem, check_template, make_problems, render_prompt_ids

GenerateFn = Callable[[Any, list[list[int]], SamplingParams], list[Completion]]


@dataclass
class EvalSettings:
    """Evaluation's settings; each field's help is the `seekling eval` flag's help."""

    k: int = setting(4, "samples per problem")
    temperature: float = setting(0.6, "sampling temperature, R1's evaluation protocol (0: greedy)")
    top_p: float = setting(0.95, "nucleus sampling threshold")
    max_new_tokens: int = setting(256, "completion length limit in tokens")
    template: str = setting("chat", "prompt template (see seekling.tasks.render_prompt_ids)")
    batch_size: int = setting(256, "completions sampled per batch")
    seed: int = setting(0, "seed for problems and sampling")

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_template(self.template)


def known_tasks() -> list[str]:
    return list(TASKS) + list(EVALSETS)


def load_task_problems(task: str, n: int | None, seed: int = 0, path: str | None = None,
                       difficulty: dict[str, Any] | None = None) -> list[Problem]:
    """`n` held-out problems of `task`: the test split of a synthetic task, a published set, or (any
    other name with a `path`) a JSONL of `{prompt, answer, [task, meta]}` rows, the file `grpo --data`
    and `sample` read, each row graded as GRPO grades it (by its own `task`'s verifier, else by number)."""
    if task in TASKS and path is None:
        if n is None:
            raise ConfigError(f"{task}: give the number of problems (synthetic tasks have no fixed size)")
        return make_problems(task, "test", n, seed, **(difficulty or {}))
    if task in EVALSETS:
        if difficulty:
            raise ConfigError(f"{task}: difficulty settings only apply to the synthetic tasks")
        problems = load_evalset(task, path=path, limit=n)
    elif path is not None:
        if difficulty:
            raise ConfigError(f"{task}: difficulty settings only apply to the synthetic tasks, not to {path}")
        problems = read_problems(path)[:n]
    else:
        raise ConfigError(f"unknown evaluation task {task!r}; known: {', '.join(known_tasks())}, or any name "
                          f"with a JSONL of {{prompt, answer}} rows (seekling eval --path {task}=FILE)")
    if not problems:
        raise DataError(f"{task}: {path or 'the evaluation set'} holds no problems (an empty file?)")
    return problems


def score_task(task: str, problems: Sequence[Problem], completions_PK: Sequence[Sequence[str]],
               lengths_PK: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Metrics of one task from k completion texts per problem (pure: no model involved).

    cons@k votes over the answers the task's verifier read (`graded_answer`; normalised so "5.0" and
    "5" vote together) and takes that verifier's verdict on the winning group's first sample, so it
    grades exactly what pass@k grades and cons@k <= pass@k.
    """
    if len(problems) != len(completions_PK) or not problems:
        raise ConfigError(f"{task}: {len(problems)} problems but {len(completions_PK)} rows of completions")
    k = len(completions_PK[0])
    if k == 0 or any(len(row) != k for row in completions_PK):
        raise ConfigError(f"{task}: every problem needs the same number k >= 1 of completions")
    # each problem is graded by its own task's verifier (a file may mix tasks), as GRPO's reward does
    verifiers = [p.task or task for p in problems]
    correct_PK = [[grade(v, c, p) for c in row] for v, p, row in zip(verifiers, problems, completions_PK)]
    consensus = [consensus_correct([graded_answer(v, c) for c in row], correct)
                 for v, row, correct in zip(verifiers, completions_PK, correct_PK)]
    flat = [c for row in completions_PK for c in row]
    out = {
        "n": len(problems), "k": k,
        "pass@1": pass_at_1_mean(correct_PK),
        f"pass@{k}": pass_at_k_mean(correct_PK, k),
        f"cons@{k}": sum(consensus) / len(consensus),
        "format": sum(format_reward(c) for c in flat) / len(flat),
    }
    if lengths_PK is not None:
        flat_lengths = [n for row in lengths_PK for n in row]
        out["mean_length"] = sum(flat_lengths) / len(flat_lengths)
    out["correct"] = correct_PK
    return out


def sample_completions(model, tokenizer, problems: Sequence[Problem], settings: EvalSettings,
                       generate_fn: GenerateFn = generate) -> tuple[list[list[str]], list[list[int]]]:
    """k completions per problem: (texts [P][k], token lengths [P][k]), `batch_size` rows per call."""
    rows = [(i, render_prompt_ids(tokenizer, question_text(p), settings.template)) for i, p in enumerate(problems)
            for _ in range(settings.k)]
    texts: list[str] = []
    lengths: list[int] = []
    for start in range(0, len(rows), settings.batch_size):
        chunk = rows[start: start + settings.batch_size]
        params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p, stop_token_ids=(tokenizer.eos_id,),
                                seed=settings.seed * 1_000_003 + start)
        for completion in generate_fn(model, [ids for _, ids in chunk], params):
            texts.append(tokenizer.decode(completion.token_ids, skip_special=True))
            lengths.append(len(completion.token_ids))
    k = settings.k
    return ([texts[i * k: (i + 1) * k] for i in range(len(problems))],
            [lengths[i * k: (i + 1) * k] for i in range(len(problems))])


def evaluate(model, tokenizer, tasks: Sequence[str], n: int | None = 100, k: int = 4, *,
             temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 256,
             template: str = "chat", batch_size: int = 256, seed: int = 0,
             difficulty: dict[str, dict[str, Any]] | None = None, paths: dict[str, str] | None = None,
             problems: dict[str, list[Problem]] | None = None, keep_samples: int = 0,
             generate_fn: GenerateFn = generate) -> dict[str, Any]:
    """Evaluate `model` on each task; returns {"settings", "tasks": {task: metrics}, "mean"}.

    `n` problems per task (None: the whole published set); `problems` overrides the problems of a
    task; `keep_samples` keeps that many problems' completions in the result for inspection.
    """
    settings = EvalSettings(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            template=template, batch_size=batch_size, seed=seed)
    settings.validate()
    if not tasks:
        raise ConfigError("no tasks to evaluate")
    difficulty, paths, problems = difficulty or {}, paths or {}, problems or {}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    results: dict[str, Any] = {}
    try:
        for task in tasks:
            task_problems = problems.get(task) or load_task_problems(task, n, seed, paths.get(task),
                                                                     difficulty.get(task))
            start = time.perf_counter()
            texts_PK, lengths_PK = sample_completions(model, tokenizer, task_problems, settings, generate_fn)
            seconds = time.perf_counter() - start
            metrics = score_task(task, task_problems, texts_PK, lengths_PK)
            correct = metrics.pop("correct")
            metrics["seconds"] = round(seconds, 2)
            metrics["tokens_per_s"] = round(sum(map(sum, lengths_PK)) / max(seconds, 1e-9), 1)
            if keep_samples:
                metrics["samples"] = [{"id": p.id, "prompt": p.prompt, "answer": p.answer,
                                       "completions": texts, "correct": ok}
                                      for p, texts, ok in list(zip(task_problems, texts_PK, correct))[:keep_samples]]
            results[task] = metrics
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    keys = list(dict.fromkeys(["pass@1", f"pass@{k}", f"cons@{k}", "format", "mean_length"]))
    mean = {key: sum(r[key] for r in results.values()) / len(results) for key in keys}
    return {"settings": vars(settings), "tasks": results, "mean": mean}


def format_table(result: dict[str, Any]) -> str:
    """The per-task metrics as a fixed-width text table (percentages, lengths in tokens)."""
    k = result["settings"]["k"]
    columns = list(dict.fromkeys(["pass@1", f"pass@{k}", f"cons@{k}", "format", "mean_length"]))  # k = 1: one pass@1
    header = f"{'task':<12} {'n':>5} " + " ".join(f"{c:>11}" for c in columns)
    lines = [header, "-" * len(header)]
    rows = list(result["tasks"].items()) + ([("mean", {"n": "", **result["mean"]})] if len(result["tasks"]) > 1 else [])
    for task, m in rows:
        cells = [f"{100 * m[c]:>10.1f}%" if c != "mean_length" else f"{m[c]:>11.1f}" for c in columns]
        lines.append(f"{task:<12} {m['n']!s:>5} " + " ".join(cells))
    return "\n".join(lines)
