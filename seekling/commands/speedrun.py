"""seekling speedrun: the whole DeepSeek-R1 recipe end to end, with a report card, in one run directory.

Stages: task data -> tokenizer -> pre-training -> cold-start SFT -> GRPO -> rejection-sampling
distillation, a held-out evaluation after each model stage, then
RUN_DIR/report.md and a self-contained RUN_DIR/report.html (results, cost per stage, plots).
Interrupted (Ctrl-C, kill), the same command resumes from the last finished stage and that stage's
last checkpoint. Presets (`--list` prints what each is and how long it runs): cpu (the default, the
main job), smoke, gpu, gpu-node. Examples:

    seekling speedrun                                   # preset cpu into runs/speedrun-cpu
    seekling speedrun --preset smoke --out /tmp/smoke
    seekling speedrun --preset cpu --set grpo_steps=80 --out runs/longer-grpo
    seekling speedrun --set pretrain_difficulty=arithmetic.worked=1 --out runs/worked   # every solution worked
    seekling speedrun --preset gpu                      # one GPU
    torchrun --nproc_per_node=8 -m seekling.cli speedrun --preset gpu-node   # pre-training on 8 GPUs
    seekling speedrun --list                            # the presets and their settings
"""

from __future__ import annotations

import argparse
import json
import signal

from seekling.commands import add_threads, device_name
from seekling.presets import PRESETS, get_preset
from seekling.speedrun import run_speedrun


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", help=f"stage settings: {', '.join(PRESETS)} (see --list)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/speedrun-PRESET)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", dest="overrides",
                        help="change a preset setting, e.g. grpo_steps=80 eval_n=500 (a new run directory)")
    add_threads(parser)
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--list", action="store_true", help="print the presets and their settings, then exit")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name}: {preset.about}")
            print("   " + json.dumps({k: v for k, v in preset.to_json().items() if k not in ("name", "about")}))
        return 0
    preset = get_preset(args.preset, args.overrides)

    def stop(signum, frame):  # `kill` gets the same resume message as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    run_speedrun(preset, args.out or f"runs/speedrun-{preset.name}", threads=args.threads or None,
                 device=args.device)
    return 0
