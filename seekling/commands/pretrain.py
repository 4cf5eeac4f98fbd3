"""seekling pretrain: pre-train a DeepSeek-V3-style model on token shards (CE + MTP, aux-loss-free MoE balancing).

Writes RUN_DIR/metrics.jsonl (one JSON line per step: loss, mtp_loss, balance_loss, lr, grad_norm,
tokens/s, MFU, expert imbalance, val_loss), RUN_DIR/checkpoints/step_XXXXXXX/ (lossless: model in HF
format + optimizer, RNG, data position and these flags) and RUN_DIR/final/, an HF model directory with
the tokenizer that transformers' AutoModelForCausalLM and seekling's load_pretrained both read.
Defaults follow DeepSeek-V3 where they carry over to small models. Examples:

    seekling pretrain --data runs/data --tokenizer runs/tok --out runs/pt --preset tiny --steps 50 --batch-size 4 --seq-len 64
    seekling pretrain --data runs/data --tokenizer runs/tok --out runs/pt --preset cpu --steps 2000 --dtype bf16
    seekling pretrain --data runs/data --out runs/pt --resume          # continue after a crash or a kill
    torchrun --nproc_per_node=2 -m seekling.cli pretrain --data runs/data --tokenizer runs/tok --out runs/pt --distributed ddp
"""

from __future__ import annotations

import argparse

from seekling.errors import ConfigError


def _betas(text: str) -> tuple[float, float]:
    try:
        b1, b2 = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.95, got {text!r}") from None
    return b1, b2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("data and run directory")
    io.add_argument("--data", required=True, help="token-shard directory from `seekling data build`")
    io.add_argument("--tokenizer", default=None,
                    help="tokenizer directory the data was built with (default: DATA/tokenizer, or the "
                         "checkpoint's / --init-from's tokenizer)")
    io.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/, final/")
    io.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    io.add_argument("--init-from", default=None, metavar="DIR",
                    help="start from the weights (and config) of an HF-format model directory (with --resume: "
                         "only when --out has no checkpoint yet)")

    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="cpu", help="model size: tiny, cpu, cpu-small, gpu, gpu-node")
    model.add_argument("--config", default=None, metavar="CONFIG_JSON", help="a config.json instead of --preset")
    model.add_argument("--vocab-size", type=int, default=None,
                       help="override the preset's vocab_size; it must equal the tokenizer's vocabulary")

    batch = parser.add_argument_group("batch (global batch = batch-size x grad-accum x ranks sequences)")
    batch.add_argument("--steps", type=int, default=1000, help="optimizer steps in the whole run")
    batch.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per rank")
    batch.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    batch.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")

    opt = parser.add_argument_group("optimizer and schedule")
    opt.add_argument("--lr", type=float, default=1e-3,
                     help="peak learning rate (DeepSeek-V3: 2.2e-4 at 671B; small models take ~10x more)")
    opt.add_argument("--min-lr-ratio", type=float, default=0.1,
                     help="final lr / peak lr (DeepSeek-V3: 2.2e-5 / 2.2e-4 = 0.1)")
    opt.add_argument("--warmup", type=int, default=100,
                     help="linear warm-up steps (DeepSeek-V3: 2000 of ~3.5M steps; short runs want ~5%%)")
    opt.add_argument("--schedule", default="wsd", choices=["cosine", "wsd", "constant"],
                     help="cosine decay after warm-up, or warm-up-stable-decay (DeepSeek-V3's shape)")
    opt.add_argument("--decay-fraction", type=float, default=0.3,
                     help="wsd: share of the steps spent decaying (DeepSeek-V3: 4.3T of 14.8T tokens)")
    opt.add_argument("--weight-decay", type=float, default=0.1,
                     help="AdamW weight decay on matrices (DeepSeek-V3: 0.1); none on norms and embeddings")
    opt.add_argument("--betas", type=_betas, default=(0.9, 0.95), help="AdamW betas (DeepSeek-V3: 0.9,0.95)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (DeepSeek-V3: 1.0)")

    moe = parser.add_argument_group("DeepSeek-V3 losses and balancing")
    moe.add_argument("--mtp-lambda", type=float, default=0.3,
                     help="weight of the multi-token-prediction loss (DeepSeek-V3: 0.3, then 0.1 late)")
    moe.add_argument("--balance-alpha", type=float, default=1e-4,
                     help="weight of the sequence-wise balance loss (DeepSeek-V3: 1e-4)")
    moe.add_argument("--bias-gamma", type=float, default=1e-3,
                     help="expert-bias update speed of aux-loss-free balancing (DeepSeek-V3: 1e-3; 0 = off)")

    run = parser.add_argument_group("evaluation, checkpoints, logging")
    run.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (0 = never)")
    run.add_argument("--eval-batches", type=int, default=8, help="val batches per evaluation")
    run.add_argument("--save-every", type=int, default=200,
                     help="checkpoint every N steps (0 = only at the end)")
    run.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (0 = all)")
    run.add_argument("--log-every", type=int, default=10, help="print a line every N steps")
    run.add_argument("--seed", type=int, default=0, help="seed for the weights and the data order")
    run.add_argument("--quiet", action="store_true", help="print nothing but errors")

    hw = parser.add_argument_group("hardware")
    hw.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    hw.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                    help="fp32, or bf16 autocast (default: bf16 on GPU, fp32 on CPU)")
    hw.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    hw.add_argument("--distributed", default="ddp", choices=["ddp", "fsdp"],
                    help="under torchrun: DDP, or FSDP2 (fully_shard per block, then the root)")
    for action in parser._actions:  # the CLI prints this docstring raw, so show the defaults here
        if action.help and action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"


def run(args: argparse.Namespace) -> int:
    from seekling.pretrain import pretrain

    if args.steps < 1:
        raise ConfigError(f"--steps must be positive, got {args.steps}")
    pretrain(args)
    return 0
