"""seekling pretrain: pre-train a DeepSeek-V3-style model on token shards (CE + MTP, aux-loss-free MoE balancing).

Writes RUN_DIR/metrics.jsonl (one JSON line per step: loss, mtp_loss, balance_loss, lr, grad_norm,
tokens/s, MFU, expert imbalance, val_loss), RUN_DIR/checkpoints/step_XXXXXXX/ (lossless: model in HF
format + optimizer, RNG, data position and these flags) and RUN_DIR/final/, an HF model directory with
the tokenizer that transformers' AutoModelForCausalLM and seekling's load_pretrained both read.
Defaults follow DeepSeek-V3 where they carry over to small models. Examples:

    seekling pretrain --data runs/data --tokenizer runs/tok --out runs/pt --preset tiny --steps 50 --batch-size 4 --seq-len 64
    seekling pretrain --data runs/data --tokenizer runs/tok --out runs/pt --preset cpu-large --steps 2000 --dtype bf16
    seekling pretrain --data runs/data --out runs/pt --resume          # continue after a crash or a kill
    torchrun --nproc_per_node=2 -m seekling.cli pretrain --data runs/data --tokenizer runs/tok --out runs/pt --distributed ddp
"""

from __future__ import annotations

import argparse

from seekling.commands import add_setting, add_threads, device_name, finite_float
from seekling.config import PRESETS
from seekling.data import LOSS_ON
from seekling.files import check_writable
from seekling.pretrain import DISTRIBUTED, DTYPES, PretrainArgs, pretrain
from seekling.threads import choose_threads
from seekling.train_state import recorded_threads
from seekling.training import SCHEDULES

SETTINGS = (PretrainArgs,)


def _betas(text: str) -> tuple[float, float]:
    try:
        b1, b2 = (finite_float(x) for x in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.95, got {text!r}") from None
    return b1, b2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def add(group, *names: str, **kwargs) -> None:
        for name in names:
            add_setting(group, PretrainArgs, name, **kwargs)

    io = parser.add_argument_group("data and run directory")
    add(io, "data", "out", required=True)
    add(io, "tokenizer", "resume")
    add(io, "init_from", metavar="DIR")
    model = parser.add_argument_group("model")
    add(model, "preset", choices=list(PRESETS))
    add(model, "config", metavar="CONFIG_JSON")
    add(model, "vocab_size")
    batch = parser.add_argument_group("batch (global batch = batch-size x grad-accum x ranks sequences)")
    add(batch, "steps", "batch_size", "seq_len", "grad_accum")
    opt = parser.add_argument_group("optimizer and schedule")
    add(opt, "lr", "min_lr_ratio", "warmup")
    add(opt, "schedule", choices=SCHEDULES)
    add(opt, "decay_fraction", "weight_decay")
    add(opt, "betas", type=_betas)
    add(opt, "grad_clip")
    add(opt, "loss_on", choices=LOSS_ON)
    moe = parser.add_argument_group("DeepSeek-V3 losses and balancing")
    add(moe, "mtp_lambda", "balance_alpha", "bias_gamma")
    run = parser.add_argument_group("evaluation, checkpoints, logging")
    add(run, "eval_every", "eval_batches", "save_every", "keep_last", "log_every", "seed", "quiet")
    add(run, "wandb", metavar="PROJECT")
    hw = parser.add_argument_group("hardware")
    add(hw, "device", type=device_name)
    add_threads(hw)
    add(hw, "dtype", choices=DTYPES)
    add(hw, "compile")
    add(hw, "distributed", choices=DISTRIBUTED)


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "--out", directory=True)  # before the data and the model are loaded
    choose_threads(args.threads, recorded=recorded_threads(args.out, args.resume))
    pretrain(args)
    return 0
