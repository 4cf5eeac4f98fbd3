"""seekling grpo: reinforcement learning with GRPO on verifiable reasoning problems (DeepSeek-R1 stage 2).

Each step samples --group-size completions for each of --prompts-per-step problems, scores them with
rule-based rewards (--reward NAME=WEIGHT, a registered name or your own `module:function`), and
takes --mu optimiser steps on the clipped surrogate with group-relative advantages. Problems come
from the train split of the built-in tasks (--tasks) or from your data (--data: JSONL, Parquet,
CSV or a Hugging Face dataset, one {"prompt", "answer", ["task", "meta"]} a row; --column maps
yours, e.g. --column prompt=question). Checkpoints in OUT/checkpoints, a JSON line of
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

import torch

from seekling.checkpoint import load_pretrained, resolve_model_and_tokenizer
from seekling.commands import add_column_argument, add_setting, from_args
from seekling.data import read_problems
from seekling.datasets_io import PROBLEM_FIELDS, SOURCE_HELP, parse_columns
from seekling.grpo import LOSS_AGGREGATIONS, GRPOConfig, train_grpo
from seekling.rewards import combine_rewards
from seekling.tasks import TEMPLATES, make_mixture, parse_difficulty
from seekling.tokenizer import Tokenizer

SETTINGS = (GRPOConfig,)


def parse_reward(spec: str) -> tuple[str, float]:
    """"correct=1" -> ("correct", 1.0); "my.mod:fn=0.5" -> ("my.mod:fn", 0.5); a bare name weighs 1."""
    name, sep, weight = spec.rpartition("=")
    if not sep:
        name, weight = spec, "1"
    try:
        return name, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=WEIGHT with a number, e.g. correct=1.0") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def add(group, *names: str, **kwargs) -> None:
        for name in names:
            add_setting(group, GRPOConfig, name, **kwargs)

    parser.add_argument("--init-from", required=True,
                        help="model to start from (and the KL reference): a model, checkpoint or run directory")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the model's, or its run's tokenizer/)")
    parser.add_argument("--tasks", default="countdown", help="comma-separated reasoning tasks (train split)")
    parser.add_argument("--num-problems", type=int, default=5000, help="problems per task in the training pool")
    parser.add_argument("--difficulty", nargs="*", default=[], metavar="TASK.SETTING=VALUE",
                        help="task difficulty, e.g. countdown.count=3")
    parser.add_argument("--data", default=None,
                        help="problems instead of --tasks, {prompt, answer, [task, meta]} a row: " + SOURCE_HELP)
    add_column_argument(parser, PROBLEM_FIELDS)
    add(parser, "template", choices=TEMPLATES)
    add_setting(parser, GRPOConfig, "rewards", "--reward", nargs="+", type=parse_reward, metavar="NAME=WEIGHT")
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    g = parser.add_argument_group("rollouts")
    add(g, "prompts_per_step", "group_size", "max_new_tokens", "temperature", "top_p", "dynamic_sampling",
        "refill_rounds")
    g = parser.add_argument_group("loss")
    add_setting(g, GRPOConfig, "loss_aggregation", "--loss", choices=list(LOSS_AGGREGATIONS))
    add(g, "scale_std", "eps_low", "eps_high", "beta", "mu", "micro_batch_size")
    g = parser.add_argument_group("optimisation and run")
    add(g, "lr")
    add_setting(g, GRPOConfig, "warmup_steps", "--warmup")
    add(g, "weight_decay", "grad_clip", "steps")
    g.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much time")
    add(g, "save_every", "max_bad_steps", "seed")
    add(g, "wandb", metavar="PROJECT")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = from_args(GRPOConfig, args, rewards=dict(args.rewards))
    cfg.validate()  # G < 2, unknown rewards and friends fail before any loading
    combine_rewards(cfg.rewards)
    model_dir, tokenizer_dir = resolve_model_and_tokenizer(args.init_from, args.tokenizer)
    if args.data:
        problems = read_problems(args.data, columns=parse_columns(args.column, PROBLEM_FIELDS))
    else:
        tasks = [t for t in args.tasks.split(",") if t]
        problems = make_mixture(tasks, "train", args.num_problems, args.seed, parse_difficulty(args.difficulty))
    model = load_pretrained(model_dir)
    summary = train_grpo(model, Tokenizer.load(tokenizer_dir), problems, cfg, args.out, tokenizer_dir=tokenizer_dir,
                         resume=args.resume, max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    last = summary["history"][-1] if summary["history"] else {}
    print(f"step {summary['step']} in {summary['seconds']:.0f}s: reward {last.get('reward', float('nan')):.3f}, "
          f"accuracy {last.get('accuracy', float('nan')):.3f}; final model in {summary['final']}")
    if summary["reward_failures"]:
        print(f"warning: {summary['reward_failures']} reward evaluations failed and scored 0")
    return 0
