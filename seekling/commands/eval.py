"""seekling eval: pass@1 (mean of k samples), pass@k, cons@k, format adherence and length, per task.

Samples k completions per held-out problem (temperature 0.6, top-p 0.95 by default, as DeepSeek-R1
reports) and grades them with each task's verifier. Tasks: the test split of the synthetic tasks
(arithmetic, countdown, linear, wordproblem), gsm8k, math500, aime2024 (shipped in the package, or
from any JSONL of the same layout with --path TASK=FILE), and any name given a JSONL of
{prompt, answer} rows with --path NAME=FILE. MODEL is found as `chat` and `serve` find it (a speedrun
directory: its best evaluated stage). Prints a table; --out writes the JSON.

    seekling eval runs/grpo/final --tokenizer runs/tok --tasks arithmetic,countdown --n 200 --k 4
    seekling eval runs/sft --tasks gsm8k --path gsm8k=my_gsm8k.jsonl --n 50 --k 1 --temperature 0
    seekling eval runs/speedrun-cpu                       # its best stage, on the task the run trained on
    seekling eval runs/speedrun-cpu --tasks mysum --path mysum=problems.jsonl   # {prompt, answer} rows
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from seekling.checkpoint import load_pretrained, resolve_model_and_tokenizer, trained_tasks
from seekling.commands import add_setting, add_threads, from_args, non_negative_int
from seekling.errors import ConfigError
from seekling.evaluate import EvalSettings, evaluate, format_table, known_tasks
from seekling.files import check_writable
from seekling.generate import SPECULATE, DecodeSettings, speculating_generate
from seekling.tasks import TEMPLATES, parse_difficulty
from seekling.threads import choose_threads
from seekling.tokenizer import Tokenizer

SETTINGS = (EvalSettings, DecodeSettings)
FALLBACK_TASKS = "arithmetic,countdown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model, checkpoint or run directory (its final/ or latest checkpoint)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the model's, or its run's tokenizer/)")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated tasks: {', '.join(known_tasks())}, or a name given a file with --path "
                             f"(default: the tasks the model was trained on when its run says so, else {FALLBACK_TASKS})")
    parser.add_argument("--n", type=non_negative_int, default=100, help="problems per task (0: the whole published set)")
    for name in ("k", "temperature", "top_p", "max_new_tokens"):
        add_setting(parser, EvalSettings, name)
    add_setting(parser, EvalSettings, "template", choices=TEMPLATES)
    add_setting(parser, EvalSettings, "batch_size")
    add_setting(parser, DecodeSettings, "speculate", choices=list(SPECULATE))
    parser.add_argument("--difficulty", nargs="*", default=[], metavar="TASK.SETTING=VALUE",
                        help="difficulty of the synthetic tasks, e.g. countdown.count=3")
    parser.add_argument("--path", nargs="*", default=[], metavar="TASK=FILE",
                        help="read TASK's problems from FILE (JSONL, Parquet, CSV, a saved `datasets` DIR[@SPLIT] or "
                             "hf:OWNER/NAME[/CONFIG][@SPLIT]): a published set in its own columns instead of the copy "
                             "shipped in the package, or for any other name {prompt, answer, [task, meta]} rows (what "
                             "grpo --data takes), graded as GRPO grades them")
    add_setting(parser, EvalSettings, "seed")
    parser.add_argument("--keep-samples", type=int, default=3, help="problems per task whose completions go in the JSON")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    add_threads(parser)


def run(args: argparse.Namespace) -> int:
    choose_threads(args.threads)
    paths = {}
    for spec in args.path:
        task, _, file = spec.partition("=")
        if not file:
            raise ConfigError(f"--path {spec!r}: expected TASK=FILE, e.g. gsm8k=data/gsm8k.jsonl")
        paths[task] = file
    if args.out:
        check_writable(args.out, "--out")  # before the evaluation, not after it
    model_dir, tokenizer_dir = resolve_model_and_tokenizer(args.model, args.tokenizer, say=print)
    tasks = [t for t in (args.tasks or "").split(",") if t]
    if args.tasks is None:
        trained = trained_tasks(model_dir)
        tasks = trained or FALLBACK_TASKS.split(",")
        print(f"tasks: {','.join(tasks)} " + ("(what this run trained on; --tasks for others)" if trained else
                                             "(the run does not say what it trained on; --tasks to choose)"))
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = load_pretrained(model_dir)
    result = evaluate(model, tokenizer, tasks, n=args.n or None, **dataclasses.asdict(from_args(EvalSettings, args)),
                      difficulty=parse_difficulty(args.difficulty), paths=paths, keep_samples=args.keep_samples,
                      generate_fn=speculating_generate(model, args.speculate, args.batch_size))
    result["model"] = str(args.model)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
