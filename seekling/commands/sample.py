"""seekling sample: rejection sampling from a teacher (R1's stage 3) into chat JSONL for SFT.

Samples --k completions per problem (a task's train split, or a JSONL of {"prompt", "answer",
["task", "id", "meta"]} rows) with the batched sampler and keeps those that are well-formed
(`<think> ... </think> <answer> ... </answer>`) and correct by the task's verifier, optionally no
longer than --max-tokens-kept and not duplicates. Kept samples are appended to --out as
{"messages": [...], "provenance": {"teacher", "prompt_id", "reward", "sampling"}}; OUT.stats.json
records the keep statistics and the problems done, so running the same command again continues
where it stopped. A file written from another teacher or other settings is refused unless --overwrite.

The teacher is a seekling run directory (final/ or the latest checkpoint), a seekling / DeepSeek-V3
Hugging Face directory, or any transformers causal LM directory (with its tokenizer). Examples:

    seekling sample --teacher runs/grpo --tasks countdown --num-problems 2000 --k 4 --out runs/kept.jsonl
    seekling sample --teacher Qwen2.5-0.5B-Instruct/ --problems my.jsonl --k 8 --max-tokens-kept 200 --out kept.jsonl
"""

from __future__ import annotations

import argparse
import json


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with `seekling distill`: teacher, problems, sampling and filters."""
    parser.add_argument("--teacher", required=True,
                        help="teacher: seekling run directory, seekling/DeepSeek-V3 HF directory or transformers causal LM")
    parser.add_argument("--teacher-tokenizer", default=None, help="the teacher's tokenizer directory (default: the teacher's)")
    parser.add_argument("--tasks", default="", help="comma-separated tasks to sample (train split of the synthetic ones)")
    parser.add_argument("--problems", default=None, help="JSONL of problems instead: {\"prompt\", \"answer\"[, \"task\", \"id\", \"meta\"]}")
    parser.add_argument("--num-problems", type=int, default=1000, help="problems per task (with --problems: the first N; 0: all)")
    parser.add_argument("--difficulty", nargs="*", default=[], metavar="TASK.SETTING=VALUE",
                        help="difficulty of the synthetic tasks, e.g. countdown.count=3")
    parser.add_argument("--k", type=int, default=4, help="completions sampled per problem")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="completion length limit in tokens")
    parser.add_argument("--template", default="chat", choices=["chat", "r1zero"], help="the teacher's prompt template")
    parser.add_argument("--max-tokens-kept", type=int, default=None,
                        help="drop correct completions longer than this many teacher tokens")
    parser.add_argument("--no-dedupe", action="store_true", help="keep identical completions of the same prompt")
    parser.add_argument("--reward", default=None,
                        help="grade with this reward (name or module:function) instead of the task's verifier")
    parser.add_argument("--min-reward", type=float, default=1.0, help="verifier score that counts as correct")
    parser.add_argument("--batch-size", type=int, default=256, help="completions per sampler call")
    parser.add_argument("--seed", type=int, default=0, help="seed for problems and sampling")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing samples file instead of resuming it")
    parser.add_argument("--device", default="cpu", help="device for the models (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    parser.add_argument("--out", required=True, help="chat JSONL to write (appended to when resuming)")


def sample_settings(args: argparse.Namespace):
    from seekling.distill import SampleSettings

    return SampleSettings(k=args.k, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, template=args.template, seed=args.seed,
                          max_tokens_kept=args.max_tokens_kept, dedupe=not args.no_dedupe, reward=args.reward,
                          min_reward=args.min_reward, batch_size=args.batch_size)


def problems_from(args: argparse.Namespace):
    from seekling.distill import load_problems
    from seekling.errors import ConfigError
    from seekling.tasks import parse_difficulty

    tasks = [t for t in args.tasks.split(",") if t]
    if bool(tasks) == bool(args.problems):
        raise ConfigError("give either --tasks or --problems FILE.jsonl")
    return load_problems(tasks, args.num_problems, "train", args.seed, parse_difficulty(args.difficulty), args.problems)


def run(args: argparse.Namespace) -> int:
    import torch

    from seekling.distill import format_keep_stats, load_teacher, rejection_sample, stats_path_for

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = sample_settings(args)
    settings.validate()
    problems = problems_from(args)
    teacher = load_teacher(args.teacher, args.teacher_tokenizer, args.device)
    print(f"teacher: {teacher.kind} model, {teacher.num_params / 1e6:.2f}M parameters, {teacher.path}")
    summary = rejection_sample(teacher, problems, args.out, settings, overwrite=args.overwrite)
    print(format_keep_stats(summary))
    print(f"kept {summary['total']['kept']} samples in {args.out}; statistics in {stats_path_for(args.out)}")
    print(json.dumps({"keep_rate": summary["total"]["keep_rate"],
                      "tasks": {t: s["keep_rate"] for t, s in summary["tasks"].items()}}))
    return 0
