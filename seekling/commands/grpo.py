"""seekling grpo: reinforcement learning with GRPO on verifiable reasoning problems (DeepSeek-R1 stage 2).

Each step samples --group-size completions for each of --prompts-per-step problems, scores them with
rule-based rewards (--reward NAME=WEIGHT, a registered name or your own `module:function`), and
takes --mu optimiser steps on the clipped surrogate with group-relative advantages. Problems come
from the train split of the built-in tasks (--tasks) or from a JSONL file (--data, one
{"prompt", "answer", ["task", "meta"]} a line). Checkpoints in OUT/checkpoints, a JSON line of
metrics per step in OUT/metrics.jsonl (reward components, accuracy, format rate, lengths, KL, clip
fraction, entropy, tokens/s), the final model in OUT/final. --resume continues exactly. Examples:

    seekling grpo --init-from runs/sft/final --tasks countdown --steps 50 --out runs/grpo
    seekling grpo --init-from runs/sft/final --tasks arithmetic --beta 0.001 --eps-high 0.2 \\
        --loss seq_sum_constant --no-scale-std --out runs/drgrpo
    seekling grpo --init-from base --data problems.jsonl --template r1zero --reward correct=1 format=0.5 \\
        my_rewards:brevity=0.1 --out runs/r1zero
"""

from __future__ import annotations

import argparse
from pathlib import Path

from seekling.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-from", required=True, help="model directory to start from (and the KL reference)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: --init-from, when it holds tokenizer.json)")
    parser.add_argument("--tasks", default="countdown", help="comma-separated reasoning tasks (train split)")
    parser.add_argument("--num-problems", type=int, default=5000, help="problems per task in the training pool")
    parser.add_argument("--difficulty", nargs="*", default=[], metavar="TASK.SETTING=VALUE",
                        help="task difficulty, e.g. countdown.count=3")
    parser.add_argument("--data", default=None, help="JSONL of {prompt, answer, [task, meta]} instead of --tasks")
    parser.add_argument("--template", default="chat", choices=["chat", "r1zero"],
                        help="prompt format: the chat template, or R1-Zero's plain-text prompt")
    parser.add_argument("--reward", nargs="+", default=["correct=1.0", "format=0.2"], metavar="NAME=WEIGHT",
                        help="rewards and weights; names from seekling.rewards or module:function")
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    g = parser.add_argument_group("rollouts")
    g.add_argument("--prompts-per-step", type=int, default=16, help="questions per step (P)")
    g.add_argument("--group-size", type=int, default=8, help="completions per question (G, >= 2)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="completion length limit")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    g.add_argument("--no-dynamic-sampling", action="store_true",
                   help="keep groups whose rewards are all equal (DAPO drops them)")
    g.add_argument("--refill-rounds", type=int, default=0,
                   help="dynamic sampling: up to this many extra batches of P prompts per step to refill the "
                        "dropped groups, as DAPO over-samples until the batch is full (0: train on what is left)")
    g = parser.add_argument_group("loss")
    g.add_argument("--loss", default="seq_mean_token_mean",
                   choices=["seq_mean_token_mean", "token_mean", "seq_sum_constant"],
                   help="aggregation: R1/GRPO per-sequence mean, DAPO token mean, Dr. GRPO constant normaliser")
    g.add_argument("--no-scale-std", action="store_true", help="do not divide advantages by the group std (Dr. GRPO)")
    g.add_argument("--eps-low", type=float, default=0.2, help="lower clip range of the ratio")
    g.add_argument("--eps-high", type=float, default=0.28, help="upper clip range (DAPO clip-higher)")
    g.add_argument("--beta", type=float, default=0.0, help="KL coefficient to the reference (0: no reference)")
    g.add_argument("--mu", type=int, default=1, help="optimiser steps per rollout batch")
    g.add_argument("--micro-batch-size", type=int, default=64, help="sequences per forward/backward")
    g = parser.add_argument_group("optimisation and run")
    g.add_argument("--lr", type=float, default=1e-5, help="learning rate (constant after warm-up)")
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    g.add_argument("--steps", type=int, default=100, help="GRPO steps")
    g.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much time")
    g.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--max-bad-steps", type=int, default=3, help="stop after this many non-finite losses in a row")
    g.add_argument("--seed", type=int, default=0, help="seed for problems and sampling")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def parse_rewards(specs: list[str]) -> dict[str, float]:
    """["correct=1", "my.mod:fn=0.5"] -> {"correct": 1.0, "my.mod:fn": 0.5}; a bare name weighs 1."""
    out = {}
    for spec in specs:
        name, sep, weight = spec.rpartition("=")
        if not sep:
            name, weight = spec, "1"
        try:
            out[name] = float(weight)
        except ValueError:
            raise ConfigError(f"--reward {spec!r}: expected NAME=WEIGHT with a number, e.g. correct=1.0") from None
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from seekling.checkpoint import load_pretrained
    from seekling.grpo import GRPOConfig, read_problems, train_grpo
    from seekling.rewards import combine_rewards
    from seekling.tasks import make_mixture, parse_difficulty
    from seekling.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = GRPOConfig(
        prompts_per_step=args.prompts_per_step, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, template=args.template, rewards=parse_rewards(args.reward),
        dynamic_sampling=not args.no_dynamic_sampling, refill_rounds=args.refill_rounds, loss_aggregation=args.loss, scale_std=not args.no_scale_std,
        eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta, mu=args.mu,
        micro_batch_size=args.micro_batch_size, lr=args.lr, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, steps=args.steps, seed=args.seed,
        save_every=args.save_every, max_bad_steps=args.max_bad_steps)
    cfg.validate()  # G < 2, unknown rewards and friends fail before any loading
    combine_rewards(cfg.rewards)
    tokenizer_dir = args.tokenizer or args.init_from
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ConfigError(f"{tokenizer_dir}: no tokenizer.json; pass --tokenizer DIR")
    if args.data:
        problems = read_problems(args.data)
    else:
        tasks = [t for t in args.tasks.split(",") if t]
        problems = make_mixture(tasks, "train", args.num_problems, args.seed, parse_difficulty(args.difficulty))
    model = load_pretrained(args.init_from)
    summary = train_grpo(model, Tokenizer.load(tokenizer_dir), problems, cfg, args.out, tokenizer_dir=tokenizer_dir,
                         resume=args.resume, max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    last = summary["history"][-1] if summary["history"] else {}
    print(f"step {summary['step']} in {summary['seconds']:.0f}s: reward {last.get('reward', float('nan')):.3f}, "
          f"accuracy {last.get('accuracy', float('nan')):.3f}; final model in {summary['final']}")
    if summary["reward_failures"]:
        print(f"warning: {summary['reward_failures']} reward evaluations failed and scored 0")
    return 0
