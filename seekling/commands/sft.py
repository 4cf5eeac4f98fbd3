"""seekling sft: supervised fine-tuning on chat JSONL (loss on assistant tokens), or write cold-start data.

Fine-tunes a model directory on `{"messages": [...]}` lines, conversations packed into rows of
--seq-len, with checkpoints (optimizer, RNG, data position) in OUT/checkpoints, metrics in
OUT/metrics.jsonl and the final model (with the tokenizer) in OUT/final. --resume continues the
latest checkpoint exactly. With --make-cold-start it instead writes R1-format cold-start data
(`<think> worked solution </think> <answer> answer </answer>`) from the reasoning tasks. Examples:

    seekling sft --make-cold-start --tasks arithmetic,countdown --num-examples 2000 --out runs/cold.jsonl
    seekling sft --data runs/cold.jsonl --init-from runs/pretrain/final --out runs/sft --steps 300
    seekling sft --data runs/cold.jsonl --init-from runs/pretrain/final --out runs/sft --steps 300 --resume
"""

from __future__ import annotations

import argparse
from pathlib import Path

from seekling.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run directory (or, with --make-cold-start, the JSONL to write)")
    parser.add_argument("--data", default=None, help="chat JSONL to train on, one {\"messages\": [...]} a line")
    parser.add_argument("--val-data", default=None, help="chat JSONL whose loss is measured at each save")
    parser.add_argument("--init-from", default=None, help="model directory to fine-tune (config.json + model.safetensors)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: --init-from, when it holds tokenizer.json)")
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per optimiser step")
    parser.add_argument("--no-pack", action="store_true", help="one conversation per row instead of packing")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "wsd", "constant"], help="lr schedule")
    parser.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    parser.add_argument("--mtp-weight", type=float, default=0.1, help="weight of the multi-token-prediction loss")
    parser.add_argument("--bias-update-speed", type=float, default=0.001,
                        help="gamma of the auxiliary-loss-free expert balancing (0 freezes routing)")
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--log-every", type=int, default=10, help="metrics line every N steps")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much time")
    parser.add_argument("--seed", type=int, default=0, help="seed for data order and initialisation")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    cold = parser.add_argument_group("cold-start data")
    cold.add_argument("--make-cold-start", action="store_true",
                      help="write R1-format SFT data from the reasoning tasks to --out and exit")
    cold.add_argument("--tasks", default="arithmetic,countdown", help="comma-separated reasoning tasks")
    cold.add_argument("--num-examples", type=int, default=1000, help="problems per task")
    cold.add_argument("--difficulty", nargs="*", default=[], metavar="TASK.SETTING=VALUE",
                      help="task difficulty, e.g. countdown.count=3 arithmetic.digits=2")


def run(args: argparse.Namespace) -> int:
    from seekling.sft import make_cold_start

    if args.make_cold_start:
        from seekling.tasks import parse_difficulty

        tasks = [t for t in args.tasks.split(",") if t]
        n = make_cold_start(tasks, args.num_examples, args.out, args.seed, parse_difficulty(args.difficulty))
        print(f"wrote {n} cold-start conversations to {args.out}")
        return 0

    import torch

    from seekling.checkpoint import load_pretrained
    from seekling.sft import SFTConfig, train_sft
    from seekling.tokenizer import Tokenizer

    if args.data is None or args.init_from is None:
        raise ConfigError("training needs --data FILE.jsonl and --init-from MODEL_DIR (or use --make-cold-start)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer_dir = args.tokenizer or args.init_from
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ConfigError(f"{tokenizer_dir}: no tokenizer.json; pass --tokenizer DIR")
    cfg = SFTConfig(seq_len=args.seq_len, batch_size=args.batch_size, pack=not args.no_pack, steps=args.steps,
                    lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio,
                    weight_decay=args.weight_decay, grad_clip=args.grad_clip, mtp_weight=args.mtp_weight,
                    bias_update_speed=args.bias_update_speed, seed=args.seed, save_every=args.save_every,
                    log_every=args.log_every)
    torch.manual_seed(args.seed)
    model = load_pretrained(args.init_from)
    summary = train_sft(model, Tokenizer.load(tokenizer_dir), args.data, cfg, args.out, tokenizer_dir=tokenizer_dir,
                        resume=args.resume, val_conversations=args.val_data,
                        max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    print(f"step {summary['step']}: loss {summary['loss']:.4f} in {summary['seconds']:.0f}s; "
          f"final model in {summary['final']}")
    return 0
