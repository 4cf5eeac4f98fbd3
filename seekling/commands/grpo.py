"""seekling grpo: reinforcement learning with GRPO on verifiable reasoning problems (DeepSeek-R1 stage 2).

Each step samples --group-size completions for each of --prompts-per-step problems, scores them with
rule-based rewards (--reward NAME=WEIGHT, a registered name or your own `module:function`), and
takes --mu optimiser steps on the clipped surrogate with group-relative advantages. Problems come
from the train split of the built-in tasks (--tasks) or from your data (--data: JSONL, Parquet,
CSV or a Hugging Face dataset, one {"prompt", "answer", ["task", "meta"]} a row; --column maps
yours, e.g. --column prompt=question). Checkpoints in OUT/checkpoints, a JSON line of metrics per
step in OUT/metrics.jsonl (reward components, accuracy, format rate, lengths, truncation, groups
with equal rewards, KL to the starting model even at --beta 0, clip fraction, entropy, tokens/s),
the final model in OUT/final. A signal that stays bad (nothing to learn, entropy collapse, lengths
at the cap, a gamed format reward, a failing reward) is warned about (seekling.rl_health); a run in
which no step updated the model exits with status 1. --resume continues exactly. Examples:

    seekling grpo --init-from runs/sft/final --tasks countdown --steps 50 --out runs/grpo
    seekling grpo --init-from runs/sft/final --tasks arithmetic --beta 0.001 --eps-high 0.2 \\
        --loss seq_sum_constant --no-scale-std --out runs/drgrpo
    seekling grpo --init-from base --data problems.jsonl --template r1zero --reward correct=1 format=0.5 \\
        my_rewards:brevity=0.1 --out runs/r1zero

Rewards: the registered ones are accuracy, correct, countdown, format, math and overlong
(seekling/rewards.py). Your own is a function in a module on sys.path or in the current directory,
given as MODULE:FUNCTION=WEIGHT; it takes the completion text, the problem's answer and its meta
(task, the problem's meta fields, length) and returns a number or a bool. In ./my_rewards.py:

    def exact(completion: str, answer: str, **meta) -> bool:
        return completion.strip().endswith(f"<answer> {answer} </answer>")

    seekling grpo --init-from runs/sft --tasks arithmetic --reward correct=1 my_rewards:exact=0.5 --out runs/g

A sample whose reward raises or returns a non-number scores 0 (counted and reported); a reward that
fails on every sample of a step stops the run.
"""

from __future__ import annotations

import argparse

from seekling.checkpoint import load_pretrained, resolve_model_and_tokenizer
from seekling.commands import add_column_argument, add_setting, add_threads, finite_float, from_args
from seekling.data import read_problems
from seekling.datasets_io import PROBLEM_FIELDS, SOURCE_HELP, parse_columns
from seekling.generate import SPECULATE
from seekling.grpo import LOSS_AGGREGATIONS, GRPOConfig, train_grpo
from seekling.rewards import combine_rewards
from seekling.tasks import TEMPLATES, make_mixture, parse_difficulty
from seekling.threads import choose_threads
from seekling.train_state import recorded_threads
from seekling.tokenizer import Tokenizer

SETTINGS = (GRPOConfig,)


def parse_reward(spec: str) -> tuple[str, float]:
    """"correct=1" -> ("correct", 1.0); "my.mod:fn=0.5" -> ("my.mod:fn", 0.5); a bare name weighs 1."""
    name, sep, weight = spec.rpartition("=")
    if not sep:
        name, weight = spec, "1"
    try:
        return name, finite_float(weight)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: expected NAME=WEIGHT with a finite number, e.g. correct=1.0") from None


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
    add(g, "speculate", choices=list(SPECULATE))
    g = parser.add_argument_group("loss")
    add_setting(g, GRPOConfig, "loss_aggregation", "--loss", choices=list(LOSS_AGGREGATIONS))
    add(g, "scale_std", "eps_low", "eps_high", "beta", "mu", "micro_batch_size", "mtp_weight")
    g = parser.add_argument_group("optimisation and run")
    add(g, "lr")
    add_setting(g, GRPOConfig, "warmup_steps", "--warmup")
    add(g, "weight_decay", "grad_clip", "steps")
    g.add_argument("--max-minutes", type=finite_float, default=None, help="stop (and save) after this much time")
    add(g, "save_every", "log_every", "max_bad_steps", "seed")
    add(g, "wandb", metavar="PROJECT")
    add_threads(g)


def run(args: argparse.Namespace) -> int:
    choose_threads(args.threads, recorded=recorded_threads(args.out, args.resume))
    cfg = from_args(GRPOConfig, args, rewards=dict(args.rewards))
    cfg.validate()  # G < 2, unknown rewards and friends fail before any loading
    combine_rewards(cfg.rewards)
    model_dir, tokenizer_dir = resolve_model_and_tokenizer(args.init_from, args.tokenizer, say=print)
    if args.data:
        problems = read_problems(args.data, columns=parse_columns(args.column, PROBLEM_FIELDS))
    else:
        tasks = [t for t in args.tasks.split(",") if t]
        problems = make_mixture(tasks, "train", args.num_problems, args.seed, parse_difficulty(args.difficulty))
    model = load_pretrained(model_dir)
    summary = train_grpo(model, Tokenizer.load(tokenizer_dir), problems, cfg, args.out, tokenizer_dir=tokenizer_dir,
                         resume=args.resume, max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    last = summary["history"][-1] if summary["history"] else {}
    health = summary["health"]
    if health["steps"] and not health["trained_steps"]:
        print(f"GRPO trained nothing: none of the {health['steps']} steps updated the model (see the warnings "
              f"above); {summary['final']} holds the starting weights")
        return 1
    print(f"step {summary['step']} in {summary['seconds']:.0f}s: reward {last.get('reward', float('nan')):.3f}, "
          f"accuracy {last.get('accuracy', float('nan')):.3f}; final model in {summary['final']}")
    if summary["reward_failures"]:
        print(f"warning: {summary['reward_failures']} reward evaluations failed and scored 0")
    if health["warnings"]:
        print(f"{len(health['warnings'])} health warning(s) during the run (above; signals in metrics.jsonl)")
    return 0
