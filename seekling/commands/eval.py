"""seekling eval: pass@1 (mean of k samples), pass@k, cons@k, format adherence and length, per task.

Samples k completions per held-out problem (temperature 0.6, top-p 0.95 by default, as DeepSeek-R1
reports) and grades them with each task's verifier. Tasks: the test split of the synthetic tasks
(arithmetic, countdown, linear, wordproblem) and gsm8k, math500, aime2024 (shipped in the package, or
from any JSONL of the same layout with --path TASK=FILE). Prints a table; --out writes the JSON.

    seekling eval runs/grpo/final --tokenizer runs/tok --tasks arithmetic,countdown --n 200 --k 4
    seekling eval runs/sft --tasks gsm8k --path gsm8k=my_gsm8k.jsonl --n 50 --k 1 --temperature 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from seekling.checkpoint import load_pretrained, resolve_model_and_tokenizer
from seekling.commands import add_setting, from_args
from seekling.errors import ConfigError
from seekling.evaluate import EvalSettings, evaluate, format_table, known_tasks
from seekling.tasks import TEMPLATES, parse_difficulty
from seekling.tokenizer import Tokenizer

SETTINGS = (EvalSettings,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model, checkpoint or run directory (its final/ or latest checkpoint)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the model's, or its run's tokenizer/)")
    parser.add_argument("--tasks", default="arithmetic,countdown", help=f"comma-separated tasks: {', '.join(known_tasks())}")
    parser.add_argument("--n", type=int, default=100, help="problems per task (0: the whole published set)")
    for name in ("k", "temperature", "top_p", "max_new_tokens"):
        add_setting(parser, EvalSettings, name)
    add_setting(parser, EvalSettings, "template", choices=TEMPLATES)
    add_setting(parser, EvalSettings, "batch_size")
    parser.add_argument("--difficulty", nargs="*", default=[], metavar="TASK.SETTING=VALUE",
                        help="difficulty of the synthetic tasks, e.g. countdown.count=3")
    parser.add_argument("--path", nargs="*", default=[], metavar="TASK=FILE",
                        help="read a published set from FILE (JSONL, Parquet, CSV, a saved `datasets` DIR[@SPLIT] or "
                             "hf:OWNER/NAME[/CONFIG][@SPLIT], in the set's own columns) instead of the packaged copy")
    add_setting(parser, EvalSettings, "seed")
    parser.add_argument("--keep-samples", type=int, default=3, help="problems per task whose completions go in the JSON")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    paths = {}
    for spec in args.path:
        task, _, file = spec.partition("=")
        if not file:
            raise ConfigError(f"--path {spec!r}: expected TASK=FILE, e.g. gsm8k=data/gsm8k.jsonl")
        paths[task] = file
    model_dir, tokenizer_dir = resolve_model_and_tokenizer(args.model, args.tokenizer)
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = load_pretrained(model_dir)
    result = evaluate(model, tokenizer, tasks, n=args.n or None, **dataclasses.asdict(from_args(EvalSettings, args)),
                      difficulty=parse_difficulty(args.difficulty), paths=paths, keep_samples=args.keep_samples)
    result["model"] = str(args.model)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
