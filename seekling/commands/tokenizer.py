"""seekling tokenizer: train a byte-level BPE tokenizer, or show how one splits a text.

Trains on text files (`.txt`, or `.jsonl` records with a text field) and/or on generated problems
of the built-in reasoning tasks (their prompts and worked solutions), and writes tokenizer.json,
tokenizer_config.json (with the chat template) and special_tokens_map.json, loadable by
`transformers.AutoTokenizer.from_pretrained(DIR)`. Examples:

    seekling tokenizer train --tasks arithmetic,countdown,linear,wordproblem --num-examples 2000 --vocab-size 512 --out runs/tok
    seekling tokenizer train --corpus book.txt notes.jsonl --vocab-size 4096 --out runs/tok
    seekling tokenizer encode --tokenizer runs/tok "What is 47+38?"
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from seekling.commands import add_action
from seekling.commands.data import add_task_flags
from seekling.data import read_jsonl_texts, read_text_file
from seekling.errors import ConfigError
from seekling.tasks import TASKS, completion_text, make_mixture, parse_difficulty
from seekling.tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = add_action(actions, "train", "train a tokenizer and save it in a directory")
    train.add_argument("--corpus", nargs="*", default=[], metavar="FILE",
                       help="text files to train on (.jsonl files contribute the --field of each record)")
    train.add_argument("--field", default="text", help="the JSON field holding the text in .jsonl corpus files")
    add_task_flags(train, num_examples=2000, tasks_help="comma-separated built-in tasks to add as training text "
                   f"(default when no --corpus: {','.join(TASKS)})")
    train.add_argument("--vocab-size", type=int, default=512, help="target vocabulary size (at least 266)")
    train.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge it")
    train.add_argument("--out", required=True, help="directory to write the tokenizer files into")
    encode = add_action(actions, "encode", "print the tokens and ids of a text")
    encode.add_argument("--tokenizer", required=True, help="tokenizer directory")
    encode.add_argument("text", help="text to encode")


def _corpus_texts(args: argparse.Namespace) -> Iterator[str]:
    for path in args.corpus:
        if Path(path).suffix == ".jsonl":
            yield from read_jsonl_texts(path, args.field)
        else:
            # Line by line keeps each training text small; BPE never merges across a newline anyway.
            yield from read_text_file(path).splitlines(keepends=True)
    tasks = [t for t in args.tasks.split(",") if t] or ([] if args.corpus else list(TASKS))
    if tasks:
        for problem in make_mixture(tasks, "train", args.num_examples, args.seed, parse_difficulty(args.difficulty)):
            yield problem.prompt
            yield completion_text(problem)


def run(args: argparse.Namespace) -> int:
    if args.action == "encode":
        tokenizer = Tokenizer.load(args.tokenizer)
        ids = tokenizer.encode(args.text)
        print(f"{len(ids)} tokens")
        print(" ".join(f"{tokenizer.decode([i])!r}:{i}" for i in ids))
        return 0
    if args.num_examples < 1:
        raise ConfigError(f"--num-examples must be positive, got {args.num_examples}")
    tokenizer = Tokenizer.train(_corpus_texts(args), vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    out = tokenizer.save(args.out)
    print(f"trained {tokenizer!r}, saved to {out}")
    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the corpus only supported {tokenizer.vocab_size} of the {args.vocab_size} tokens asked for")
    return 0
