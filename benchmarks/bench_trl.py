"""Seconds per GRPO step: seekling against TRL's GRPOTrainer, the same configuration, the same CPU.

Both run the same model (a seekling model directory, exported in HF format: transformers loads it
as DeepseekV3ForCausalLM), the same tokenizer and prompt template, the same task prompts in the
same order, P prompts x G completions per step at temperature 1 with at most --max-new-tokens,
rewards `correct` + 0.2 `format` (seekling.rewards, wrapped for TRL), the DAPO token-mean loss with
eps 0.2 / 0.28, no KL (beta 0), one optimiser step per generation, AdamW at the same lr. seekling's
dynamic sampling is off, so both train on every completion. Each side runs --steps steps; the first
(warm-up) step is left out of the mean. Reported: CPU seconds of the process per step (what a step
costs on an idle core) and wall seconds.

Two configurations, differing only in the prompt: R1-Zero's plain-text template (the R1-Zero
recipe; ~90 prompt tokens) and the chat template of a cold-started model (~20 prompt tokens).
Where the time goes: seekling prefills each group's prompt once and samples all P*G rows from the
latent cache with the folded decode step (`seekling.decode`), then scores each group's prompt once
and the completions in length-sorted buckets (`seekling.grpo.group_logprobs`); TRL samples with
transformers' `generate` (every row prefills its own copy of the prompt) and runs prompt +
completion through the model for every completion. So the gap grows with the prompt. With the
short chat prompts both sides spend most of the step on the same completion-token FLOPs, and
seekling's forward + backward alone runs near this CPU's matmul peak: the ratio there is ~2x.

TRL is not a seekling dependency: install it into the venv without touching torch/transformers,

    .venv/bin/pip install --no-deps trl==1.16.0 && .venv/bin/pip install -c constraints.txt accelerate datasets
    .venv/bin/python benchmarks/bench_trl.py --model runs/bench_grpo/sft/final --steps 6
    .venv/bin/python benchmarks/bench_trl.py --templates chat          # one configuration only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seekling.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from seekling.config import ModelConfig  # noqa: E402
from seekling.grpo import GRPOConfig, train_grpo  # noqa: E402
from seekling.model import Transformer  # noqa: E402
from seekling.rewards import combine_rewards  # noqa: E402
from seekling.tasks import completion_text, make_mixture, make_problems, parse_difficulty, to_chat  # noqa: E402
from seekling.tokenizer import Tokenizer  # noqa: E402

REWARDS = {"correct": 1.0, "format": 0.2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/bench_grpo/sft/final",
                   help="seekling model directory with tokenizer files (default: bench_grpo's cold-started "
                        "model; a fresh `cpu-large`-preset model when it does not exist)")
    p.add_argument("--task", default="arithmetic", help="the reasoning task the prompts come from")
    p.add_argument("--difficulty", nargs="*", default=["arithmetic.ops=+-"], metavar="TASK.SETTING=VALUE",
                   help="task difficulty (bench_grpo's RL task by default)")
    p.add_argument("--templates", nargs="+", default=["r1zero", "chat"], choices=["chat", "r1zero"],
                   help="the configurations to run, by prompt format: R1-Zero's plain-text prompt (the R1-Zero "
                        "recipe, ~90 prompt tokens) and the chat template of the cold-started model (~20)")
    p.add_argument("--preset", default="cpu-large", help="preset of the fresh model used when --model does not exist")
    p.add_argument("--steps", type=int, default=6, help="GRPO steps per side (the first is warm-up)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="P")
    p.add_argument("--group-size", type=int, default=8, help="G")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion budget")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, both sides (1: on cores shared with other jobs a second thread mostly spins)")
    p.add_argument("--out", default="runs/bench_trl.json", help="where to write the numbers")
    return p.parse_args(argv)


def prepare_model(path: str, preset: str, work: Path) -> Path:
    """The model directory both sides load: `path`, or a fresh model of `preset` with a new tokenizer."""
    if (Path(path) / "model.safetensors").is_file() and (Path(path) / "tokenizer.json").is_file():
        return Path(path)
    print(f"{path} not found: using a fresh {preset!r} model (completions then run to the length limit)")
    texts = [p.prompt + " " + completion_text(p) for p in make_mixture(["countdown", "arithmetic"], "train", 2000, 1)]
    tok = Tokenizer.train(texts, vocab_size=1024 if preset != "tiny" else 512)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=tok.vocab_size))
    out = work / "model"
    save_pretrained(model, str(out))
    tok.save(out)
    return out


def run_seekling(model_dir: Path, problems, args, work: Path) -> list[float]:
    tokenizer = Tokenizer.load(model_dir)
    model = load_pretrained(str(model_dir))
    cfg = GRPOConfig(prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                     max_new_tokens=args.max_new_tokens, temperature=1.0, lr=args.lr, beta=0.0, eps_low=0.2,
                     eps_high=0.28, loss_aggregation="token_mean", mu=1, steps=args.steps, save_every=0,
                     dynamic_sampling=False, weight_decay=0.0, template=args.template, micro_batch_size=args.prompts_per_step * args.group_size,
                     rewards=dict(REWARDS))
    summary = train_grpo(model, tokenizer, problems, cfg, work / "seekling", tokenizer_dir=model_dir, log=print)
    lengths = [r["response_length"] for r in summary["history"]]
    print("seekling mean response length per step:", [round(x, 1) for x in lengths])
    per_step = {}
    for clock in ("seconds", "cpu_seconds"):
        ends = [r[clock] for r in summary["history"]]
        per_step[clock] = [b - a for a, b in zip([0.0] + ends[:-1], ends)]
    return per_step, lengths


def run_trl(model_dir: Path, problems, args, work: Path) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    reward = combine_rewards(dict(REWARDS))

    def seekling_reward(prompts, completions, answer, meta, task, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [reward(t, a, **{**json.loads(m), "task": k}).total for t, a, m, k in zip(texts, answer, meta, task)]

    n = args.steps * args.prompts_per_step
    def prompt(p):  # what seekling.grpo.prompt_ids renders, in the form TRL takes
        return to_chat(p, "chat") if args.template == "chat" else "<|begin_of_text|>" + to_chat(p, "r1zero")

    dataset = Dataset.from_list([{"prompt": prompt(p), "answer": p.answer,
                                  "meta": json.dumps(p.meta),
                                  "task": p.task} for p in problems[:n]])
    batch = args.prompts_per_step * args.group_size
    config = TRLConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        logging_steps=1, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=1.0,
        top_p=1.0, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
        num_iterations=1, shuffle_dataset=False, dataloader_num_workers=0, seed=0, disable_dropout=True,
    )
    times: dict[str, list[float]] = {"seconds": [], "cpu_seconds": []}
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times["seconds"].append(time.perf_counter() - self.t0)
            times["cpu_seconds"].append(time.process_time() - self.c0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                          reward_funcs=seekling_reward, args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(str(model_dir)), callbacks=[Timer()])
    trainer.train()
    print("TRL mean response length per step:", [round(x, 1) for x in lengths])
    return times, lengths


def compare(model_dir: Path, problems, args, work: Path) -> dict:
    """One configuration (args.template) through both trainers; the first step of each is warm-up."""
    ours, our_lengths = run_seekling(model_dir, problems, args, work)
    trl, trl_lengths = run_trl(model_dir, problems, args, work)
    # CPU time of the process is what a step costs on an idle core; wall time is what this (shared)
    # machine gave it.
    mean = {side: {clock: statistics.mean(times[clock][1:]) for clock in times}
            for side, times in (("seekling", ours), ("trl", trl))}
    return {
        "template": args.template,
        "seekling_cpu_seconds_per_step": round(mean["seekling"]["cpu_seconds"], 3),
        "trl_cpu_seconds_per_step": round(mean["trl"]["cpu_seconds"], 3),
        "speedup_cpu": round(mean["trl"]["cpu_seconds"] / mean["seekling"]["cpu_seconds"], 2),
        "seekling_wall_seconds_per_step": round(mean["seekling"]["seconds"], 3),
        "trl_wall_seconds_per_step": round(mean["trl"]["seconds"], 3),
        "speedup_wall": round(mean["trl"]["seconds"] / mean["seekling"]["seconds"], 2),
        "seekling_steps": {k: [round(x, 3) for x in v] for k, v in ours.items()},
        "trl_steps": {k: [round(x, 3) for x in v] for k, v in trl.items()},
        "seekling_mean_length": round(statistics.mean(our_lengths), 1) if our_lengths else None,
        "trl_mean_length": round(statistics.mean(trl_lengths), 1) if trl_lengths else None,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = prepare_model(args.model, args.preset, work)
        difficulty = parse_difficulty(args.difficulty).get(args.task, {})
        problems = make_problems(args.task, "train", args.steps * args.prompts_per_step, 0, **difficulty)
        for template in args.templates:
            results.append(compare(model_dir, problems, argparse.Namespace(**{**vars(args), "template": template}),
                                   work / template))
    summary = {
        "model": str(args.model), "threads": args.threads, "P": args.prompts_per_step, "G": args.group_size,
        "max_new_tokens": args.max_new_tokens, "steps": args.steps, "loss": "token_mean (TRL loss_type='dapo')",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nseconds per GRPO step (CPU time / wall time), P={args.prompts_per_step} x G={args.group_size}, "
          f"{args.max_new_tokens} new tokens, {args.threads} thread(s):")
    for r in results:
        print(f"  {r['template']:7s} seekling {r['seekling_cpu_seconds_per_step']:.2f} / "
              f"{r['seekling_wall_seconds_per_step']:.2f}, TRL {r['trl_cpu_seconds_per_step']:.2f} / "
              f"{r['trl_wall_seconds_per_step']:.2f}: seekling {r['speedup_cpu']:.1f}x faster in CPU time, "
              f"{r['speedup_wall']:.1f}x in wall time (mean completion length {r['seekling_mean_length']} vs "
              f"{r['trl_mean_length']} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
