"""seekling distill: rejection-sample a teacher, SFT a smaller student on the kept samples, compare the three.

Runs `seekling sample` into OUT/samples.jsonl (resumable), fine-tunes the student on those samples
with seekling's SFT (OUT/checkpoints, OUT/metrics.jsonl, OUT/final), then evaluates the teacher,
the student before and the student after on the same held-out problems (the test split of the
tasks, or --eval-problems FILE) and prints a table; OUT/eval.json and OUT/distill.json hold it all.
The student is a fresh model preset (--student-preset cpu) or a model directory
(--student-init DIR); its tokenizer is --tokenizer (default: the student's, then the teacher's).
With zero kept samples it stops before training, printing the keep statistics. Examples:

    seekling distill --teacher runs/grpo --tasks countdown --difficulty countdown.count=3 \\
        --num-problems 2000 --student-preset cpu --steps 300 --out runs/distill
    seekling distill --teacher runs/grpo --tasks countdown --student-init runs/small/final --out runs/d --resume
"""

from __future__ import annotations

import argparse
import json

from seekling.commands import add_setting
from seekling.commands.sample import add_sampling_arguments, settings_and_problems
from seekling.data import read_problems
from seekling.datasets_io import PROBLEM_FIELDS, parse_columns
from seekling.distill import SampleSettings, distill, load_problems
from seekling.evaluate import EvalSettings
from seekling.sft import SFTConfig
from seekling.tasks import TASKS, parse_difficulty

SETTINGS = (SampleSettings, SFTConfig, EvalSettings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    parser.add_argument("--out", required=True, help="run directory: samples.jsonl, checkpoints/, final/, eval.json")
    student = parser.add_argument_group("student")
    student.add_argument("--student-preset", default=None, help="fresh student of this model preset, e.g. cpu")
    student.add_argument("--student-init", default=None, help="student model directory to fine-tune instead")
    student.add_argument("--tokenizer", default=None, help="the student's seekling tokenizer directory")
    add_setting(student, SFTConfig, "steps", help="SFT optimiser steps")
    add_setting(student, SFTConfig, "batch_size", "--sft-batch-size", dest="sft_batch_size", help="SFT rows per step")
    add_setting(student, SFTConfig, "seq_len", help="SFT tokens per row")
    add_setting(student, SFTConfig, "lr", help="SFT peak learning rate")
    add_setting(student, SFTConfig, "warmup_steps", "--warmup", help="SFT warm-up steps")
    add_setting(student, SFTConfig, "save_every", help="SFT checkpoint every N steps (0: at the end)")
    add_setting(student, SFTConfig, "wandb", metavar="PROJECT", help="Weights & Biases project for the SFT metrics "
                                                                      "(WANDB_MODE=offline keeps them on disk)")
    student.add_argument("--resume", action="store_true", help="continue the SFT run in --out from its last checkpoint")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval-n", type=int, default=200, help="held-out problems per task (0: skip the evaluation)")
    ev.add_argument("--eval-problems", default=None,
                    help="held-out problems instead of the tasks' test split (the same forms as --problems; "
                         "a dataset's test split by default)")
    add_setting(ev, EvalSettings, "k", "--eval-k", dest="eval_k", help="samples per held-out problem")
    ev.add_argument("--eval-max-new-tokens", type=int, default=None, help="evaluation length limit (default: --max-new-tokens)")
    ev.add_argument("--json", action="store_true", help="also print the comparison as JSON")


def run(args: argparse.Namespace) -> int:
    settings, problems = settings_and_problems(args)
    eval_problems = None
    if args.eval_problems:
        eval_problems = {}
        columns = parse_columns(args.column, PROBLEM_FIELDS)
        for p in read_problems(args.eval_problems, unique=True, columns=columns, default_split="test")[: args.eval_n or None]:
            eval_problems.setdefault(p.task, []).append(p)
    elif args.eval_n:
        tasks = list(dict.fromkeys(p.task for p in problems if p.task in TASKS))
        eval_problems = {t: load_problems([t], args.eval_n, "test", args.seed, parse_difficulty(args.difficulty))
                         for t in tasks} or None
        if eval_problems is None:
            print("no synthetic task among the problems and no --eval-problems: skipping the evaluation")
    sft = SFTConfig(seq_len=args.seq_len, batch_size=args.sft_batch_size, steps=args.steps, lr=args.lr,
                    warmup_steps=args.warmup_steps, save_every=args.save_every, seed=args.seed,
                    log_every=max(1, args.steps // 10), wandb=args.wandb)
    evals = EvalSettings(k=args.eval_k, max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens,
                         template=args.template, batch_size=args.batch_size, seed=args.seed)
    result = distill(args.teacher, args.out, problems, student_preset=args.student_preset,
                     student_init=args.student_init, tokenizer_dir=args.tokenizer,
                     teacher_tokenizer=args.teacher_tokenizer, sample=settings, sft=sft, eval_problems=eval_problems,
                     eval_settings=evals, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if args.json and "eval" in result:
        print(json.dumps({name: r["mean"] | {"params": r["params"]} for name, r in result["eval"].items()}, indent=2))
    print(f"student after SFT in {result['sft']['final']}")
    return 0
