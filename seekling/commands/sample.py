"""seekling sample: rejection sampling from a teacher (R1's stage 3) into chat JSONL for SFT.

Samples --k completions per problem (a task's train split, or your rows of {"prompt", "answer",
["task", "id", "meta"]}: JSONL, Parquet, CSV or a Hugging Face dataset, renamed with --column)
with the batched sampler and keeps those that are well-formed (`<think> ... </think> <answer>
... </answer>`) and correct by the task's verifier, optionally no longer than --max-tokens-kept
and not duplicates. Kept samples are appended to --out as
{"messages": [...], "provenance": {"teacher", "prompt_id", "reward", "sampling"}}; OUT.stats.json
records the keep statistics and the problems done, so running the same command again continues
where it stopped. A file written from another teacher or other settings is refused unless --overwrite.

The teacher is a seekling run directory (final/ or the latest checkpoint), a seekling / DeepSeek-V3
Hugging Face directory, or any transformers causal LM directory (with its tokenizer). Examples:

    seekling sample --teacher runs/grpo --tasks countdown --num-problems 2000 --k 4 --out runs/kept.jsonl
    seekling sample --teacher Qwen2.5-0.5B-Instruct/ --problems my.jsonl --k 8 --max-tokens-kept 200 --out kept.jsonl
"""

from __future__ import annotations

import argparse
import json

from seekling.commands import add_column_argument, add_setting, add_threads, from_args
from seekling.datasets_io import PROBLEM_FIELDS, SOURCE_HELP, parse_columns
from seekling.distill import (SampleSettings, format_keep_stats, load_problems, load_teacher, rejection_sample,
                              stats_path_for)
from seekling.errors import ConfigError
from seekling.generate import SPECULATE, DecodeSettings, speculating_generate
from seekling.tasks import TEMPLATES, Problem, parse_difficulty
from seekling.threads import choose_threads

SETTINGS = (SampleSettings, DecodeSettings)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with `seekling distill`: teacher, problems, sampling and filters."""
    parser.add_argument("--teacher", required=True,
                        help="teacher: seekling run, checkpoint or HF directory (seekling/DeepSeek-V3), or a "
                             "transformers causal LM directory")
    parser.add_argument("--teacher-tokenizer", default=None, help="the teacher's tokenizer directory (default: the teacher's)")
    parser.add_argument("--tasks", default="", help="comma-separated tasks to sample (train split of the synthetic ones)")
    parser.add_argument("--problems", default=None,
                        help="problems instead, {\"prompt\", \"answer\"[, \"task\", \"id\", \"meta\"]} a row: " + SOURCE_HELP)
    add_column_argument(parser, PROBLEM_FIELDS)
    parser.add_argument("--num-problems", type=int, default=1000, help="problems per task (with --problems: the first N; 0: all)")
    parser.add_argument("--difficulty", nargs="*", default=[], metavar="TASK.SETTING=VALUE",
                        help="difficulty of the synthetic tasks, e.g. countdown.count=3")
    for name in ("k", "temperature", "top_p", "max_new_tokens"):
        add_setting(parser, SampleSettings, name)
    add_setting(parser, SampleSettings, "template", choices=TEMPLATES)
    for name in ("max_tokens_kept", "dedupe", "reward", "min_reward", "batch_size", "seed"):
        add_setting(parser, SampleSettings, name)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing samples file instead of resuming it")
    parser.add_argument("--device", default="cpu", help="device for the models (cpu, cuda)")
    add_threads(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    add_setting(parser, DecodeSettings, "speculate", choices=list(SPECULATE))
    parser.add_argument("--out", required=True, help="chat JSONL to write (appended to when resuming)")


def settings_and_problems(args: argparse.Namespace) -> tuple[SampleSettings, list[Problem]]:
    """The sampling settings (checked) and the problems to sample, from the flags `seekling distill` shares."""
    choose_threads(args.threads)
    settings = from_args(SampleSettings, args)
    settings.validate()
    tasks = [t for t in args.tasks.split(",") if t]
    if bool(tasks) == bool(args.problems):
        raise ConfigError("give either --tasks or --problems FILE.jsonl")
    problems = load_problems(tasks, args.num_problems, "train", args.seed, parse_difficulty(args.difficulty),
                             args.problems, parse_columns(args.column, PROBLEM_FIELDS))
    return settings, problems


def run(args: argparse.Namespace) -> int:
    settings, problems = settings_and_problems(args)
    teacher = load_teacher(args.teacher, args.teacher_tokenizer, args.device)
    if teacher.kind == "seekling":
        teacher.generate_fn = speculating_generate(teacher.model, args.speculate, settings.batch_size)
    print(f"teacher: {teacher.kind} model, {teacher.num_params / 1e6:.2f}M parameters, {teacher.path}")
    summary = rejection_sample(teacher, problems, args.out, settings, overwrite=args.overwrite)
    print(format_keep_stats(summary))
    print(f"kept {summary['total']['kept']} samples in {args.out}; statistics in {stats_path_for(args.out)}")
    print(json.dumps({"keep_rate": summary["total"]["keep_rate"],
                      "tasks": {t: s["keep_rate"] for t, s in summary["tasks"].items()}}))
    return 0
