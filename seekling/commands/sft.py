"""seekling sft: supervised fine-tuning on chat JSONL (loss on assistant tokens), or write cold-start data.

Fine-tunes a model directory on `{"messages": [...]}` rows (or a prompt and an answer; JSONL,
Parquet, CSV or a Hugging Face dataset, columns renamed with --column), conversations packed
into rows of --seq-len, with checkpoints (optimizer, RNG, data position) in OUT/checkpoints, metrics in
OUT/metrics.jsonl and the final model (with the tokenizer) in OUT/final. --resume continues the
latest checkpoint exactly. With --make-cold-start it instead writes R1-format cold-start data
(`<think> worked solution </think> <answer> answer </answer>`) from the reasoning tasks. Examples:

    seekling sft --make-cold-start --tasks arithmetic,countdown --num-examples 2000 --out runs/cold.jsonl
    seekling sft --data runs/cold.jsonl --init-from runs/pretrain/final --out runs/sft --steps 300
    seekling sft --data runs/cold.jsonl --init-from runs/pretrain/final --out runs/sft --steps 300 --resume
"""

from __future__ import annotations

import argparse

import torch

from seekling.checkpoint import load_pretrained, resolve_model_and_tokenizer
from seekling.commands import add_column_argument, add_setting, add_threads, finite_float, from_args
from seekling.data import read_chat_jsonl
from seekling.datasets_io import CHAT_FIELDS, SOURCE_HELP, parse_columns
from seekling.errors import ConfigError
from seekling.sft import SFTConfig, make_cold_start, train_sft
from seekling.tasks import parse_difficulty
from seekling.threads import choose_threads
from seekling.train_state import recorded_threads
from seekling.tokenizer import Tokenizer
from seekling.training import SCHEDULES

SETTINGS = (SFTConfig,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run directory (or, with --make-cold-start, the JSONL to write)")
    parser.add_argument("--data", default=None,
                        help="conversations to train on, {\"messages\": [...]} (or a prompt and an answer) a row: "
                             + SOURCE_HELP)
    parser.add_argument("--val-data", default=None, help="conversations whose loss is measured at each save (same forms)")
    add_column_argument(parser, CHAT_FIELDS)
    parser.add_argument("--init-from", default=None,
                        help="model to fine-tune: a model, checkpoint or run directory (its final/ or latest checkpoint)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the model's, or its run's tokenizer/)")
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    for name in ("seq_len", "batch_size", "pack", "steps", "lr"):
        add_setting(parser, SFTConfig, name)
    add_setting(parser, SFTConfig, "schedule", choices=SCHEDULES)
    add_setting(parser, SFTConfig, "warmup_steps", "--warmup")
    for name in ("min_lr_ratio", "weight_decay", "grad_clip", "mtp_weight", "bias_update_speed", "save_every",
                 "log_every", "val_batches"):
        add_setting(parser, SFTConfig, name)
    add_setting(parser, SFTConfig, "wandb", metavar="PROJECT")
    parser.add_argument("--max-minutes", type=finite_float, default=None, help="stop (and save) after this much time")
    add_setting(parser, SFTConfig, "seed")
    add_threads(parser)
    cold = parser.add_argument_group("cold-start data")
    cold.add_argument("--make-cold-start", action="store_true",
                      help="write R1-format SFT data from the reasoning tasks to --out and exit")
    cold.add_argument("--tasks", default="arithmetic,countdown", help="comma-separated reasoning tasks")
    cold.add_argument("--num-examples", type=int, default=1000, help="problems per task")
    cold.add_argument("--difficulty", nargs="*", default=[], metavar="TASK.SETTING=VALUE",
                      help="task difficulty, e.g. countdown.count=3 arithmetic.digits=2")


def run(args: argparse.Namespace) -> int:
    if args.make_cold_start:
        tasks = [t for t in args.tasks.split(",") if t]
        n = make_cold_start(tasks, args.num_examples, args.out, args.seed, parse_difficulty(args.difficulty))
        print(f"wrote {n} cold-start conversations to {args.out}")
        return 0
    if args.data is None or args.init_from is None:
        raise ConfigError("training needs --data FILE.jsonl and --init-from MODEL_DIR (or use --make-cold-start)")
    choose_threads(args.threads, recorded=recorded_threads(args.out, args.resume))
    cfg = from_args(SFTConfig, args)
    columns = parse_columns(args.column, CHAT_FIELDS)
    data, val_data = args.data, args.val_data
    if columns:  # renamed columns: read here (without them the loader reads the file and names it in errors)
        data = read_chat_jsonl(data, columns)
        val_data = read_chat_jsonl(val_data, columns) if val_data else None
    model_dir, tokenizer_dir = resolve_model_and_tokenizer(args.init_from, args.tokenizer, say=print)
    torch.manual_seed(args.seed)
    model = load_pretrained(model_dir)
    summary = train_sft(model, Tokenizer.load(tokenizer_dir), data, cfg, args.out, tokenizer_dir=tokenizer_dir,
                        resume=args.resume, val_conversations=val_data,
                        max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    print(f"step {summary['step']}: loss {summary['loss']:.4f} in {summary['seconds']:.0f}s; "
          f"final model in {summary['final']}")
    return 0
