"""seekling data: build token shards for pre-training, or write chat JSONL for SFT.

`build` tokenizes the built-in reasoning tasks (rendered as user/assistant chats), text files and
JSONL records into train and val shards with an index.json (see `seekling.data`). `sft` writes task
problems as `{"messages": [...]}` lines with worked solutions, the input of the SFT loader.
`show` prints a data directory's index. Examples:

    seekling data build --tokenizer runs/tok --tasks arithmetic,linear --num-examples 5000 --out runs/data
    seekling data build --tokenizer runs/tok --text book.txt --jsonl web.jsonl --field text --out runs/data
    seekling data sft --tasks countdown --num-examples 1000 --out runs/sft.jsonl
"""

from __future__ import annotations

import argparse
import json

from seekling.commands import add_action, finite_float
from seekling.data import build_token_shards, load_index
from seekling.errors import ConfigError
from seekling.sft import make_cold_start
from seekling.tasks import parse_difficulty
from seekling.tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = add_action(actions, "build", "tokenize sources into train/val token shards")
    build.add_argument("--tokenizer", required=True, help="tokenizer directory (from `seekling tokenizer train`)")
    build.add_argument("--out", required=True, help="directory to write index.json and the .bin shards into")
    add_task_flags(build)
    build.add_argument("--text", nargs="*", default=[], metavar="FILE", help="UTF-8 text files, one document each")
    build.add_argument("--jsonl", nargs="*", default=[], metavar="FILE", help="JSONL files, one document a record")
    build.add_argument("--field", default="text", help="the JSON field holding each record's text")
    build.add_argument("--val-fraction", type=finite_float, default=0.1,
                       help="share held out for val: task test problems per train problem, the tail of "
                            "each text file, a hash bucket of JSONL records")
    build.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per .bin shard file at most")

    sft = add_action(actions, "sft", "write task problems as chat JSONL for SFT")
    sft.add_argument("--out", required=True, help="JSONL file to write")
    add_task_flags(sft)
    sft.add_argument("--split", default="train", choices=["train", "test"], help="which split of the tasks")

    show = add_action(actions, "show", "print the index of a data directory")
    show.add_argument("--data", required=True, help="data directory (from `seekling data build`)")


def add_task_flags(parser: argparse.ArgumentParser, num_examples: int = 1000,
                   tasks_help: str = "comma-separated built-in tasks, e.g. arithmetic,countdown") -> None:
    """The flags that pick generated task problems (also used by `seekling tokenizer train`)."""
    parser.add_argument("--tasks", default="", help=tasks_help)
    parser.add_argument("--num-examples", type=int, default=num_examples, help="problems per task")
    parser.add_argument("--difficulty", nargs="*", default=[], metavar="TASK.SETTING=VALUE",
                        help="task difficulty settings, e.g. arithmetic.digits=3 linear.both_sides=true")
    parser.add_argument("--seed", type=int, default=0, help="seed for the generated problems")


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        print(json.dumps(load_index(args.data), indent=2))
        return 0
    tasks = [t for t in args.tasks.split(",") if t]
    difficulty = parse_difficulty(args.difficulty)
    if args.action == "sft":
        if not tasks:
            raise ConfigError("--tasks is required for `data sft`")
        n = make_cold_start(tasks, args.num_examples, args.out, args.seed, difficulty, split=args.split)
        print(f"wrote {n} conversations to {args.out}")
        return 0
    tokenizer = Tokenizer.load(args.tokenizer)
    index = build_token_shards(args.out, tokenizer, tasks=tasks, num_examples=args.num_examples,
                               difficulty=difficulty, text_files=args.text, jsonl_files=args.jsonl,
                               field=args.field, val_fraction=args.val_fraction, seed=args.seed,
                               shard_tokens=args.shard_tokens)
    for split, info in index["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens in {info['documents']:,} documents, {len(info['shards'])} shard(s)")
    print(f"wrote {args.out}/index.json ({index['dtype']}, vocab {index['vocab_size']})")
    return 0
