"""The R1-Zero effect on a CPU: does GRPO raise held-out pass@1 of a small cold-started model?

The pipeline, each stage cached in --work so a rerun only redoes what changed:

    1. tokenizer   byte-level BPE on the reasoning tasks' text
    2. pretrain    the `cpu-large` preset (DeepSeek-V3 architecture, ~7M parameters) on the reasoning tasks
                   rendered as chats (seekling.data + seekling.pretrain), a few minutes
    3. cold start  a little SFT on R1-format worked solutions of the RL task (seekling.sft): the
                   model writes the format but mostly gets the answer wrong
    4. eval        pass@1 over k samples (temperature 0.6, top-p 0.95) on >= 500 held-out problems
    5. GRPO        on the RL task's train split for --grpo-minutes (seekling.grpo)
    6. eval        the same problems, the same sampling, the final GRPO model

It prints the per-step curve (reward, accuracy, response length) and the before/after table, and
writes WORK/result.json (and WORK/curve.png when matplotlib imports). Pass criterion of issue 4:
pass@1 up by >= 10 points absolute, format adherence >= 95% at the end, GRPO <= 10 minutes.

    .venv/bin/python benchmarks/bench_grpo.py --work runs/bench_grpo            # ~30 min on 2 cores
    .venv/bin/python benchmarks/bench_grpo.py --work runs/bench_grpo --redo grpo  # GRPO + evals again
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seekling.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from seekling.data import build_token_shards  # noqa: E402
from seekling.evaluate import evaluate, format_table  # noqa: E402
from seekling.grpo import GRPOConfig, train_grpo  # noqa: E402
from seekling.pretrain import PretrainArgs, pretrain  # noqa: E402
from seekling.sft import SFTConfig, make_cold_start, train_sft  # noqa: E402
from seekling.tasks import TASKS, completion_text, make_mixture, make_problems, parse_difficulty  # noqa: E402
from seekling.tokenizer import Tokenizer  # noqa: E402

STAGES = ["tokenizer", "data", "pretrain", "sft", "eval_before", "grpo", "eval_after"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench_grpo", help="directory for every stage's output")
    p.add_argument("--redo", default="", help=f"comma-separated stages to redo (and all after): {','.join(STAGES)}")
    p.add_argument("--task", default="arithmetic", help="the RL task")
    p.add_argument("--difficulty", nargs="*", default=["arithmetic.ops=+-"],
                   metavar="TASK.SETTING=VALUE", help="difficulty of the RL task (cold start, GRPO and eval)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on cores shared with other jobs a second thread mostly spins, "
                        "we measured 10x slower training steps with 2)")
    # pretraining
    p.add_argument("--pretrain-tasks", default="arithmetic,countdown",
                   help="tasks of the pretraining corpus (rendered as chats with worked solutions)")
    p.add_argument("--pretrain-examples", type=int, default=20000, help="problems per pretraining task")
    p.add_argument("--pretrain-difficulty", nargs="*", default=["countdown.count=3", "countdown.max_number=15",
                                                                "countdown.max_target=50"],
                   metavar="TASK.SETTING=VALUE", help="difficulty of the pretraining tasks")
    p.add_argument("--pretrain-steps", type=int, default=1200, help="pretraining steps (16 x 128 tokens each)")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary")
    # cold start
    p.add_argument("--sft-examples", type=int, default=1000, help="cold-start conversations of the RL task")
    p.add_argument("--sft-steps", type=int, default=40, help="cold-start SFT steps (16 packed rows each)")
    p.add_argument("--sft-lr", type=float, default=2e-5, help="cold-start SFT learning rate")
    p.add_argument("--seq-len", type=int, default=128,
                   help="rows of pretraining and SFT: SFT must not pack past the positions pretraining saw "
                        "(at 256 the packed loss of a 128-pretrained model was 0.95 against 0.10 unpacked)")
    # evaluation
    p.add_argument("--eval-n", type=int, default=500, help="held-out problems")
    p.add_argument("--eval-k", type=int, default=4, help="samples per problem")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion budget, evaluation and GRPO")
    # GRPO
    p.add_argument("--grpo-minutes", type=float, default=10.0, help="GRPO time budget")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                   help="what the budget counts: the GRPO process's CPU time (equal to wall time on an idle "
                        "machine, fair when other jobs share the cores) or wall-clock time")
    p.add_argument("--grpo-steps", type=int, default=1000, help="GRPO step limit (the time budget usually ends it)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="P")
    p.add_argument("--group-size", type=int, default=8, help="G")
    p.add_argument("--lr", type=float, default=1e-4, help="GRPO learning rate")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient")
    p.add_argument("--loss", default="token_mean", help="loss aggregation")
    p.add_argument("--mu", type=int, default=1, help="optimiser steps per rollout batch")
    p.add_argument("--grpo-temperature", type=float, default=1.0, help="GRPO sampling temperature")
    p.add_argument("--numbers-reward", type=float, default=0.0,
                   help="weight of `valid_numbers`, partial credit for a countdown answer that uses only the "
                        "given numbers (a user reward plugged in as module:function)")
    p.add_argument("--eps-high", type=float, default=0.28, help="upper clip range")
    p.add_argument("--snapshot-every", type=int, default=50,
                   help="save the policy every N GRPO steps; each snapshot is evaluated afterwards for the "
                        "held-out curve (0: none)")
    return p.parse_args(argv)


# The flags each stage depends on: a stage is redone when one of them changed since it last ran,
# when an earlier stage was redone, when its output is missing, or when --redo names it.
STAGE_ARGS = {
    "tokenizer": ["vocab_size"],
    "data": ["pretrain_tasks", "pretrain_examples", "pretrain_difficulty"],
    "pretrain": ["pretrain_steps", "seq_len"],
    "sft": ["task", "difficulty", "sft_examples", "sft_steps", "sft_lr", "seq_len"],
    "eval_before": ["eval_n", "eval_k", "max_new_tokens"],
    "grpo": ["grpo_minutes", "grpo_steps", "prompts_per_step", "group_size", "lr", "beta", "loss", "mu",
             "grpo_temperature", "eps_high", "snapshot_every", "numbers_reward", "clock"],
    "eval_after": [],
}


class Stages:
    def __init__(self, work: Path, args: argparse.Namespace, redo: set[str]):
        self.path, self.args, self.redo = work / "stages.json", args, redo
        self.saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.dirty = False  # an earlier stage ran, so every later one must run too

    def key(self, stage: str) -> dict:
        return {name: getattr(self.args, name) for name in STAGE_ARGS[stage]}

    def needed(self, stage: str, marker: Path) -> bool:
        need = self.dirty or stage in self.redo or not marker.exists() or self.saved.get(stage) != self.key(stage)
        self.dirty |= need
        return need

    def done(self, stage: str) -> None:
        self.saved[stage] = self.key(stage)
        self.path.write_text(json.dumps(self.saved, indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    redo = {s for s in args.redo.split(",") if s}
    unknown = redo - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
    difficulty = parse_difficulty(args.difficulty)
    timings: dict[str, float] = {}
    stages = Stages(work, args, redo)

    def timed(stage: str, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[stage] = round(time.perf_counter() - t0, 1)
        print(f"[{stage}] {timings[stage]:.0f}s", flush=True)
        stages.done(stage)
        return out

    # 1. tokenizer on every task's prompts and solutions
    tok_dir = work / "tok"
    if stages.needed("tokenizer", tok_dir / "tokenizer.json"):
        mix = {t: d for t, d in parse_difficulty(args.pretrain_difficulty).items()}
        texts = [p.prompt + " " + completion_text(p) for p in make_mixture(list(TASKS), "train", 3000, 1, mix)]
        timed("tokenizer", lambda: Tokenizer.train(texts, vocab_size=args.vocab_size).save(tok_dir))
    tokenizer = Tokenizer.load(tok_dir)

    # 2-3. pretraining corpus and pretraining
    data_dir, pt_dir = work / "data", work / "pretrain"
    if stages.needed("data", data_dir / "index.json"):
        shutil.rmtree(data_dir, ignore_errors=True)
        tasks = [t for t in args.pretrain_tasks.split(",") if t]
        timed("data", lambda: build_token_shards(data_dir, tokenizer, tasks=tasks, num_examples=args.pretrain_examples,
                                                 difficulty={t: d for t, d in parse_difficulty(
                                                     args.pretrain_difficulty).items() if t in tasks},
                                                 val_fraction=0.01, seed=0))
    if stages.needed("pretrain", pt_dir / "final" / "model.safetensors"):
        shutil.rmtree(pt_dir, ignore_errors=True)
        timed("pretrain", lambda: pretrain(PretrainArgs(
            data=str(data_dir), out=str(pt_dir), tokenizer=str(tok_dir), preset="cpu-large",
            vocab_size=tokenizer.vocab_size, steps=args.pretrain_steps, batch_size=16, seq_len=args.seq_len, lr=2e-3,
            warmup=30, eval_every=100, save_every=10_000, quiet=True)))

    # 4. cold start: a little SFT on R1-format solutions of the RL task
    sft_dir, cold = work / "sft", work / "cold.jsonl"
    if stages.needed("sft", sft_dir / "final" / "model.safetensors"):
        shutil.rmtree(sft_dir, ignore_errors=True)
        make_cold_start([args.task], args.sft_examples, cold, seed=0, difficulty=difficulty)
        model = load_pretrained(str(pt_dir / "final"))
        cfg = SFTConfig(seq_len=args.seq_len, batch_size=16, steps=args.sft_steps, lr=args.sft_lr, warmup_steps=10,
                        save_every=0, log_every=10)
        timed("sft", lambda: train_sft(model, tokenizer, cold, cfg, sft_dir, tokenizer_dir=tok_dir, log=print))

    eval_problems = make_problems(args.task, "test", args.eval_n, 0, **difficulty.get(args.task, {}))

    def run_eval(model_dir: Path, out: Path | None) -> dict:
        model = load_pretrained(str(model_dir))
        result = evaluate(model, tokenizer, [args.task], k=args.eval_k, max_new_tokens=args.max_new_tokens,
                          problems={args.task: eval_problems}, keep_samples=3, batch_size=512)
        if out is not None:
            out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    # 5. before
    before_path = work / "eval_before.json"
    if stages.needed("eval_before", before_path):
        timed("eval_before", lambda: run_eval(sft_dir / "final", before_path))
    before = json.loads(before_path.read_text())
    print("before GRPO (the cold-started model):\n" + format_table(before), flush=True)

    # 6. GRPO
    grpo_dir = work / "grpo"
    if stages.needed("grpo", grpo_dir / "final" / "model.safetensors"):
        shutil.rmtree(grpo_dir, ignore_errors=True)
        problems = make_problems(args.task, "train", 20_000, 0, **difficulty.get(args.task, {}))
        cfg = GRPOConfig(prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                         max_new_tokens=args.max_new_tokens, temperature=args.grpo_temperature, lr=args.lr,
                         beta=args.beta, eps_high=args.eps_high,
                         loss_aggregation=args.loss, mu=args.mu, steps=args.grpo_steps, save_every=0,
                         micro_batch_size=64, rewards={"correct": 1.0, "format": 0.2})
        if args.numbers_reward:
            cfg.rewards[f"{__name__}:valid_numbers"] = args.numbers_reward
        model = load_pretrained(str(sft_dir / "final"))

        def show(step: int, r: dict) -> None:
            print(f"step {step:4d}  {r['seconds']:6.0f}s wall {r['cpu_seconds']:6.0f}s cpu  reward {r['reward']:.3f}  acc {r['accuracy']:.3f}  "
                  f"format {r['format']:.2f}  len {r['response_length']:5.1f}  kept {r['groups_kept']:2d}  "
                  f"clip {r.get('clip_fraction', 0):.3f}  ent {r.get('entropy', 0):.3f}", flush=True)
            if args.snapshot_every and step % args.snapshot_every == 0:  # ~0.1 s, inside the time budget
                save_pretrained(model, str(grpo_dir / "snapshots" / f"step_{step:05d}"))
            return r["cpu_seconds" if args.clock == "cpu" else "seconds"] >= args.grpo_minutes * 60

        summary = timed("grpo", lambda: train_grpo(model, tokenizer, problems, cfg, grpo_dir, tokenizer_dir=tok_dir,
                                                   on_step=show))
        (work / "grpo_summary.json").write_text(json.dumps({k: v for k, v in summary.items()}, indent=1) + "\n")
    history = json.loads((work / "grpo_summary.json").read_text())["history"]

    # 7. after
    after_path = work / "eval_after.json"
    if stages.needed("eval_after", after_path):
        timed("eval_after", lambda: run_eval(grpo_dir / "final", after_path))
    after = json.loads(after_path.read_text())
    print("after GRPO:\n" + format_table(after), flush=True)

    # the held-out curve: every snapshot on the same problems (not part of the GRPO time)
    curve_path = work / "heldout_curve.json"
    if not curve_path.exists() or stages.dirty:
        start = before["tasks"][args.task]
        heldout = [{"step": 0, "pass@1": start["pass@1"], "format": start["format"]}]
        for snap in sorted((grpo_dir / "snapshots").glob("step_*")):
            m = run_eval(snap, None)["tasks"][args.task]
            heldout.append({"step": int(snap.name[5:]), "pass@1": m["pass@1"], "format": m["format"]})
            print(f"held-out pass@1 at GRPO step {heldout[-1]['step']}: {100 * m['pass@1']:.1f}%", flush=True)
        heldout.append({"step": len(history), "pass@1": after["tasks"][args.task]["pass@1"],
                        "format": after["tasks"][args.task]["format"]})
        curve_path.write_text(json.dumps(heldout, indent=1) + "\n")
    heldout = json.loads(curve_path.read_text())

    b, a = before["tasks"][args.task], after["tasks"][args.task]
    grpo_minutes = history[-1]["cpu_seconds" if args.clock == "cpu" else "seconds"] / 60 if history else 0.0
    wall_minutes = history[-1]["seconds"] / 60 if history else 0.0
    result = {
        "task": args.task, "difficulty": difficulty, "eval_n": args.eval_n, "k": args.eval_k,
        "before": {key: b[key] for key in ("pass@1", f"pass@{args.eval_k}", f"cons@{args.eval_k}", "format", "mean_length")},
        "after": {key: a[key] for key in ("pass@1", f"pass@{args.eval_k}", f"cons@{args.eval_k}", "format", "mean_length")},
        "gain_pass@1_points": round(100 * (a["pass@1"] - b["pass@1"]), 2),
        "grpo_steps": len(history), "grpo_minutes": round(grpo_minutes, 2), "clock": args.clock,
        "grpo_wall_minutes": round(wall_minutes, 2),
        "curve": [{k: r.get(k) for k in ("step", "seconds", "reward", "accuracy", "format", "response_length",
                                         "entropy", "clip_fraction", "groups_kept")} for r in history],
        "heldout_curve": heldout,
        "stage_seconds": timings, "args": vars(args),
    }
    result["pass"] = (result["gain_pass@1_points"] >= 10 and a["format"] >= 0.95 and grpo_minutes <= 10.5)
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\npass@1 {100 * b['pass@1']:.1f}% -> {100 * a['pass@1']:.1f}% ({result['gain_pass@1_points']:+.1f} points), "
          f"format {100 * a['format']:.1f}%, {len(history)} GRPO steps in {grpo_minutes:.1f} min "
          f"({args.clock} time; {wall_minutes:.1f} min wall): "
          f"{'PASS' if result['pass'] else 'FAIL'}")
    plot(history, heldout, work / "curve.png")
    return 0 if result["pass"] else 1


def valid_numbers(completion: str, answer: str, numbers=(), **meta) -> float:
    """1.0 iff the `<answer>` is an arithmetic expression over the given numbers (each at most as often
    as given), whatever its value: the first thing a small model gets wrong in countdown is copying."""
    from collections import Counter

    from seekling.rewards import countdown_value, extract_answer

    parsed = countdown_value(extract_answer(completion, "answer") or "")
    if parsed is None or len(parsed[1]) < 2:
        return 0.0
    return 0.0 if Counter(parsed[1]) - Counter(int(n) for n in numbers) else 1.0


def plot(history: list[dict], heldout: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not history:
        return
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, key, title in zip(axes, ("reward", "accuracy", "response_length"),
                              ("mean reward", "train accuracy (T=1)", "response length (tokens)")):
        values = [r[key] for r in history]
        window = max(1, len(values) // 25)  # a running mean over ~4% of the run, drawn over the raw values
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, values, alpha=0.3)
        ax.plot(steps, smooth)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
    axes[3].plot([h["step"] for h in heldout], [100 * h["pass@1"] for h in heldout], marker="o")
    axes[3].set_title("held-out pass@1 % (T=0.6, k samples)")
    axes[3].set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
