"""seekling eval: pass@1 (mean of k samples), pass@k, cons@k, format adherence and length, per task.

Samples k completions per held-out problem (temperature 0.6, top-p 0.95 by default, as DeepSeek-R1
reports) and grades them with each task's verifier. Tasks: the test split of the synthetic tasks
(arithmetic, countdown, linear, wordproblem) and gsm8k, math500, aime2024 (from ../shared/data, or
from any JSONL of the same layout with --path TASK=FILE). Prints a table; --out writes the JSON.

    seekling eval runs/grpo/final --tokenizer runs/tok --tasks arithmetic,countdown --n 200 --k 4
    seekling eval runs/sft --tasks gsm8k --path gsm8k=my_gsm8k.jsonl --n 50 --k 1 --temperature 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seekling.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (config.json + model.safetensors)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the model directory if it holds tokenizer.json)")
    parser.add_argument("--tasks", default="arithmetic,countdown",
                        help="comma-separated tasks: arithmetic, countdown, linear, wordproblem, gsm8k, math500, aime2024")
    parser.add_argument("--n", type=int, default=100, help="problems per task (0: the whole published set)")
    parser.add_argument("--k", type=int, default=4, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="completion length limit in tokens")
    parser.add_argument("--template", default="chat", choices=["chat", "r1zero"], help="prompt template")
    parser.add_argument("--batch-size", type=int, default=256, help="completions sampled per batch")
    parser.add_argument("--difficulty", nargs="*", default=[], metavar="TASK.SETTING=VALUE",
                        help="difficulty of the synthetic tasks, e.g. countdown.count=3")
    parser.add_argument("--path", nargs="*", default=[], metavar="TASK=FILE",
                        help="read a published set from this JSONL instead of ../shared/data")
    parser.add_argument("--seed", type=int, default=0, help="seed for problems and sampling")
    parser.add_argument("--keep-samples", type=int, default=3, help="problems per task whose completions go in the JSON")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    import torch

    from seekling.checkpoint import load_pretrained
    from seekling.evaluate import evaluate, format_table
    from seekling.tasks import parse_difficulty
    from seekling.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    paths = {}
    for spec in args.path:
        task, _, file = spec.partition("=")
        if not file:
            raise ConfigError(f"--path {spec!r}: expected TASK=FILE, e.g. gsm8k=data/gsm8k.jsonl")
        paths[task] = file
    tokenizer_dir = args.tokenizer or args.model
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ConfigError(f"{tokenizer_dir}: no tokenizer.json; pass --tokenizer DIR")
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = load_pretrained(args.model)
    result = evaluate(model, tokenizer, tasks, n=args.n or None, k=args.k, temperature=args.temperature,
                      top_p=args.top_p, max_new_tokens=args.max_new_tokens, template=args.template,
                      batch_size=args.batch_size, seed=args.seed, difficulty=parse_difficulty(args.difficulty),
                      paths=paths, keep_samples=args.keep_samples)
    result["model"] = str(args.model)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
