"""Throughput of `seekling pretrain`'s loop against the bare forward + backward + AdamW loop.

Both sides train the same model config on the same batch shape in one process: the bare loop is
`train_rate` from benchmarks/bench_model.py (random tokens, one AdamW group, nothing else); the
trainer is `seekling.pretrain.pretrain` reading token shards, with the balance loss, gradient clipping,
the expert-bias update, the load all-reduce and a metrics.jsonl line per step. The trainer's rate is
measured from the wall-clock stamps of its metrics lines, so data loading and logging count. MTP is
off on both sides (bench_model's loop has none); a third line shows the trainer with MTP on.

Other engineers may share the cores: the load average is printed before and after, and each side's
figure is its best single step (median in brackets) over --repeats alternating rounds of --steps.
Last, the pieces of work the trainer adds around forward + backward + AdamW are timed one by one,
which load from other users barely moves.

    python benchmarks/bench_pretrain.py                 # cpu preset, fp32 and bf16 (a few minutes on 2 cores)
    python benchmarks/bench_pretrain.py --quick         # fewer steps, one repeat
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_model import train_rate  # noqa: E402

from seekling.config import ModelConfig  # noqa: E402
from seekling.cost import cpu_peak  # noqa: E402
from seekling.data import TokenLoader, build_token_shards, read_jsonl  # noqa: E402
from seekling.flops import flops_per_token  # noqa: E402
from seekling.model import Transformer  # noqa: E402
from seekling.pretrain import PretrainArgs, pretrain  # noqa: E402
from seekling.tasks import completion_text, make_mixture  # noqa: E402
from seekling.tokenizer import Tokenizer  # noqa: E402

TASKS = ["arithmetic", "countdown", "linear", "wordproblem"]
GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k", "train.jsonl")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_corpus(root: str, vocab_size: int, tokens_needed: int) -> tuple[str, str, int]:
    """A tokenizer of the preset's size (GSM8K's English gives task text enough variety) and task shards."""
    problems = make_mixture(TASKS, "train", 1500, seed=0)
    texts = [p.prompt for p in problems] + [completion_text(p) for p in problems]
    if os.path.exists(GSM8K):
        texts += [t for _, r in read_jsonl(GSM8K) for t in (r["question"], r["answer"])]
    tok = Tokenizer.train(texts, vocab_size)
    tok.save(os.path.join(root, "tok"))
    n = 500
    while True:
        index = build_token_shards(os.path.join(root, "data"), tok, tasks=TASKS, num_examples=n, val_fraction=0.05)
        if index["splits"]["train"]["tokens"] > tokens_needed:
            return os.path.join(root, "tok"), os.path.join(root, "data"), tok.vocab_size
        n *= 2


def trainer_rates(cfg_path: str, tok: str, data: str, out: str, args, dtype: str) -> list[float]:
    """Tokens/s of each of the trainer's steps after warm-up, from the wall-clock stamps of its
    metrics lines: everything the loop does between two lines counts (data, logging included)."""
    pretrain(PretrainArgs(
        data=data, tokenizer=tok, out=out, config=cfg_path, steps=args.warmup + args.steps, batch_size=args.batch,
        seq_len=args.seq_len, warmup=1, eval_every=0, save_every=0, keep_last=1, log_every=10**9,
        quiet=True, dtype=dtype, device="cpu"))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    timed = rows[args.warmup - 1:]  # the first line closes the warm-up steps
    return [(b["tokens"] - a["tokens"]) / (b["time"] - a["time"]) for a, b in zip(timed, timed[1:])]


def bare_rates(cfg: ModelConfig, batches, args, bf16: bool) -> list[float]:
    """Tokens/s of single steps of bench_model's loop (each call: one untimed step, then one timed)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    return [train_rate(model, batches, 1, 1, bf16, False) for _ in range(args.steps)]


def loop_parts_ms(cfg: ModelConfig, data: str, args, reps: int = 5) -> dict[str, float]:
    """Best-of-`reps` milliseconds of each piece of work the trainer adds around forward + backward +
    AdamW, timed on their own: unlike two whole loops, this barely moves with load from other users."""
    from seekling.training import expert_imbalance, update_expert_bias
    from seekling.training import MetricsLogger, clip_gradients

    loader = TokenLoader(data, args.batch, args.seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x, y = next(loader)
    out = model(x, y)
    (out.loss + 1e-4 * out.balance_loss).backward()
    load = out.expert_load.double()
    logger = MetricsLogger(tempfile.mkdtemp(), tensorboard=False)
    record = {k: 1.0 for k in ("loss", "mtp_loss", "balance_loss", "total_loss", "lr", "grad_norm", "tokens",
                               "tokens_per_s", "mfu", "expert_imbalance", "step_seconds", "time")}

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)

    parts = {
        "batch from TokenLoader": best(lambda: next(loader)),
        "gradient clipping": best(lambda: clip_gradients(model.parameters(), 1.0)),
        "expert-bias update + imbalance": best(lambda: (update_expert_bias(model, load, 1e-3), expert_imbalance(load))),
        "metrics.jsonl line": best(lambda: logger.log(1, **record)),
    }
    logger.close()
    return parts


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-large", help="model preset")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=2, help="alternating measurements; the best counts")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--quick", action="store_true", help="3 timed steps, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 3, 1
    torch.set_num_threads(args.threads)
    print(f"load average before: {load_average()} ({os.cpu_count()} cores)")

    root = tempfile.mkdtemp(prefix="bench_pretrain-")
    base = ModelConfig.from_name(args.preset)
    total_steps = args.warmup + args.steps
    tok, data, vocab = make_corpus(root, base.vocab_size, total_steps * args.batch * (args.seq_len + 1))
    configs = {"no MTP": base.replace(vocab_size=vocab, num_nextn_predict_layers=0), "MTP": base.replace(vocab_size=vocab)}
    paths = {}
    for name, cfg in configs.items():
        paths[name] = os.path.join(root, name.replace(" ", "_"))
        cfg.save(paths[name])
    cfg = configs["no MTP"]
    peak = cpu_peak(args.threads)
    fpt = {name: flops_per_token(c, args.seq_len, training=True, include_mtp=c.num_nextn_predict_layers > 0)["total"]
           for name, c in configs.items()}
    print(f"preset {args.preset} (vocab {vocab}), batch {args.batch} x {args.seq_len}, {args.threads} threads, "
          f"CPU peak fp32 {peak['fp32'] / 1e9:.0f} / bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")

    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        seq = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=g)
        batches.append((seq[:, :-1], seq[:, 1:]))

    print("\ntokens/s per step, best (median) over the timed steps")
    print(f"{'':6s} {'bare loop':>16s} {'trainer':>16s} {'overhead':>9s} {'MFU bare':>9s} {'MFU trainer':>12s}"
          f" {'trainer+MTP':>16s} {'MFU':>6s}")
    best_bare = {}
    for dtype in ("fp32", "bf16"):
        bare, trainer, trainer_mtp = [], [], []
        for r in range(args.repeats):  # alternate, so a burst of load from others hits all three
            bare += bare_rates(cfg, batches, args, dtype == "bf16")
            trainer += trainer_rates(os.path.join(paths["no MTP"], "config.json"), tok, data,
                                     os.path.join(root, f"run-{dtype}-{r}"), args, dtype)
            trainer_mtp += trainer_rates(os.path.join(paths["MTP"], "config.json"), tok, data,
                                         os.path.join(root, f"run-mtp-{dtype}-{r}"), args, dtype)
        a, b, c = max(bare), max(trainer), max(trainer_mtp)
        best_bare[dtype] = a
        p = peak[dtype]
        print(f"{dtype:6s} {a:8,.0f} ({median(bare):5,.0f}) {b:8,.0f} ({median(trainer):5,.0f}) {a / b - 1:9.1%} "
              f"{a * fpt['no MTP'] / p:9.1%} {b * fpt['no MTP'] / p:12.1%} {c:8,.0f} ({median(trainer_mtp):5,.0f}) "
              f"{c * fpt['MTP'] / p:6.1%}", flush=True)
    parts = loop_parts_ms(cfg, data, args)
    step_ms = 1e3 * args.batch * args.seq_len / best_bare["fp32"]
    print(f"\nthe trainer's own work per step (fp32, best of 5), against the bare loop's best step of {step_ms:.0f} ms:")
    for name, ms in parts.items():
        print(f"  {name:32s} {ms:8.3f} ms")
    print(f"  {'total':32s} {sum(parts.values()):8.3f} ms = {sum(parts.values()) / step_ms:.2%} of a step")
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
