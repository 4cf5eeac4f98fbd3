"""seekling vs transformers on the same weights and batches, in one process: training and sampling.

Prints tokens/s of both and their ratio for
  - training (forward + backward + AdamW step) on the CPU main-job preset, fp32 and bf16 autocast,
  - sampling (new tokens/s) at batch 1, 8 and 64 with 128 new tokens: transformers, seekling, and
    seekling with MTP speculative decoding (its acceptance rate and speed-up over plain seekling),
    against two ceilings of this machine: the weight bytes a step reads at the bandwidth a matrix-vector
    product streams them, and the matmul floor, the step's own matrix products replayed alone (the
    BLAS's speed at these shapes, with no other kernel and no Python),
and the training MFU against this machine's measured matmul peak. When llama-cpp-python imports, the
same weights are exported to GGUF (`seekling export --gguf`) and llama.cpp's greedy decode at batch 1
(f32 and f16) is printed as a reference line: llama.cpp is what people run small models on CPUs with.

    python benchmarks/bench_model.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_model.py --quick    # fewer steps, smaller sampling batches
    python benchmarks/bench_model.py --no-train --checkpoint runs/main/grpo/final   # trained MTP drafts
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from seekling.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from seekling.config import ModelConfig  # noqa: E402
from seekling.cost import cpu_peak  # noqa: E402
from seekling.decode import DecodeEngine  # noqa: E402
from seekling.flops import flops_per_token  # noqa: E402
from seekling.generate import SamplingParams, generate  # noqa: E402
from seekling.gguf_export import export_gguf  # noqa: E402
from seekling.model import LatentCache, Transformer  # noqa: E402
from seekling.tasks import make_problems, to_chat  # noqa: E402
from seekling.tokenizer import Tokenizer  # noqa: E402


def load_transformers(path: str):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def train_rate(model, batches, steps: int, warmup: int, bf16: bool, is_hf: bool, compiled=None) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()
    run = compiled or model

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = run(x, labels=y).loss if is_hf else run(x, targets=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(*batches[i % len(batches)])
    t0 = time.perf_counter()
    tokens = 0
    for i in range(steps):
        x, y = batches[i % len(batches)]
        step(x, y)
        tokens += x.numel()
    return tokens / (time.perf_counter() - t0)


def sample_rate(model, prompts, new_tokens: int, is_hf: bool, speculate: bool = False,
                stats: dict | None = None) -> float:
    """New tokens/s of greedy sampling (`stats` receives seekling's speculation counters)."""
    model.eval()
    t0 = time.perf_counter()
    if is_hf:
        x = torch.tensor(prompts)
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        produced = (out.shape[1] - x.shape[1]) * x.shape[0]
    else:
        outs = generate(model, prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0),
                        speculate=speculate, stats=stats)
        produced = sum(len(o.token_ids) for o in outs)
    return produced / (time.perf_counter() - t0)


def task_prompts(checkpoint: str, task: str) -> list[list[int]]:
    """Held-out problems of `task` as the checkpoint's tokenizer renders them for generation, those of
    the most common length only (one batch needs no padding): what a speedrun's model was trained on,
    so that its MTP drafts are measured where they are used."""
    tokenizer = Tokenizer.load(checkpoint)
    ids = [tokenizer.render_prompt(to_chat(p)) for p in make_problems(task, "test", 1000, seed=0)]
    common = max(set(map(len, ids)), key=[len(x) for x in ids].count)
    return [x for x in ids if len(x) == common]


def acceptance(stats: dict) -> str:
    return f"{stats['accepted'] / stats['drafted']:.0%}" if stats.get("drafted") else "-"


def llama_cpp_rate(gguf_path: str, prompt: list[int], new_tokens: int, threads: int) -> float:
    """llama.cpp's greedy decode (new tokens/s at batch 1) through llama-cpp-python, prompt excluded."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, logits_all=True,
                verbose=False)  # logits_all: llm.scores holds the logits greedy decoding reads
    for timed in (False, True):  # a warm-up pass, then the timed one
        llm.reset()
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(new_tokens if timed else 4):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return new_tokens / (time.perf_counter() - t0)


def export_for_llama_cpp(model: Transformer, out_type: str) -> str:
    """The model as a GGUF file (with a small tokenizer, which llama.cpp needs to load it)."""
    directory = tempfile.mkdtemp()
    texts = [p.prompt for p in make_problems("arithmetic", "train", 200, 0)]
    tokenizer_dir = Tokenizer.train(texts, vocab_size=min(512, model.config.vocab_size)).save(directory + "/tok")
    save_pretrained(model, directory + "/model", extra_files={n: str(tokenizer_dir / n) for n in os.listdir(tokenizer_dir)})
    return export_gguf(directory + "/model", f"{directory}/model-{out_type}.gguf", out_type)["out"]


def weight_bandwidth(threads: int) -> float:
    """Bytes/s at which this machine streams weight matrices it has not touched lately through a
    matrix-vector product (what decoding one token per row is): 64 MB of 256x256 fp32 matrices."""
    import torch.nn.functional as F

    mats = [torch.randn(256, 256) for _ in range(256)]
    x = torch.randn(1, 256)
    for w in mats:
        F.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(3):
        for w in mats:
            F.linear(x, w)
    return 3 * sum(w.numel() * 4 for w in mats) / (time.perf_counter() - t0)


class _Products(TorchDispatchMode):
    """Records the matrix products one decode step runs, with their operands, to replay them alone."""

    OPS = {"linear", "matmul", "mm", "addmm", "addmm_", "bmm", "baddbmm", "_grouped_mm"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.OPS:  # in-place ones replay on a copy, leaving the step's own alone
            inplace = func.overloadpacket.__name__.endswith("_")
            self.calls.append((func, (args[0].clone(), *args[1:]) if inplace else args, kwargs or {}))
        return out


def matmul_floor(engine: DecodeEngine, prompts: list[list[int]], repeats: int = 30) -> tuple[float, int]:
    """(seconds, count) of the matrix products of one decode step of `engine` at these prompts, replayed alone on
    the same operands: what any implementation that runs these products through this torch's BLAS pays per step
    with every other kernel and all Python gone (the median of 5 rounds)."""
    config = engine.config
    cache = LatentCache(config, len(prompts), len(prompts[0]) + 2, dtype=engine.head.dtype)
    tokens = torch.tensor(prompts)
    with torch.inference_mode():
        engine.model.forward_cached(tokens, cache)
        with _Products() as products:
            engine.step(tokens[:, -1], cache)
        rounds = []
        for _ in range(6):
            t0 = time.perf_counter()
            for _ in range(repeats):
                for func, args, kwargs in products.calls:
                    func(*args, **kwargs)
            rounds.append((time.perf_counter() - t0) / repeats)
    return sorted(rounds[1:])[2], len(products.calls)


def decode_bytes(engine: DecodeEngine, batch: int) -> float:
    """Weight bytes one decode step reads at `batch` rows: every folded matrix, the head, and the
    routed experts that at least one row picks (uniform routing: E * (1 - (1 - K/E)^batch) of them)."""
    c = engine.config
    tensors = [engine.head]
    for attn, ff in engine.layers:
        w_in, w_down_t = ff.w_in, ff.w_down_t
        if ff.dense:  # the routed experts folded in with the shared ones: counted below, as routing picks them
            w_in, w_down_t = ff.w_front, w_down_t[: ff.inter] if ff.inter else None
        tensors += [t for t in (attn.w_in, attn.w_q, attn.w_out_t, w_in, w_down_t, ff.gate_w) if t is not None]
    total = sum(t.numel() * t.element_size() for t in tensors)
    E, K = c.n_routed_experts, c.num_experts_per_tok
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size * engine.head.element_size()
    n_moe = sum(layer.is_moe for layer in engine.model.layers)
    return total + n_moe * E * (1 - (1 - K / E) ** batch) * per_expert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-large", help="model preset to benchmark")
    ap.add_argument("--batch", type=int, default=8, help="training batch size (sequences)")
    ap.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per measurement")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens to sample per sequence")
    ap.add_argument("--sample-batches", default="1,8,64", help="comma-separated sampling batch sizes")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt length for sampling")
    ap.add_argument("--task-prompts", metavar="TASK", help="with --checkpoint: sample from held-out problems of this "
                    "task (e.g. arithmetic) instead of random tokens; keep --new-tokens under the answers' length "
                    "(about 40 for a speedrun's arithmetic), since a finished row stops")
    ap.add_argument("--quick", action="store_true", help="fewer steps and smaller batches (smoke run)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--checkpoint", default=None,
                    help="sample this seekling model (e.g. a speedrun's grpo/final: trained MTP drafts) instead of "
                         "random weights of --preset; transformers loads the same files")
    ap.add_argument("--no-train", action="store_true", help="skip the training comparison (sampling only)")
    ap.add_argument("--compile", action="store_true",
                    help="also measure seekling training under torch.compile (compile time excluded, reported apart)")
    args = ap.parse_args()
    if args.task_prompts and not args.checkpoint:
        ap.error("--task-prompts needs --checkpoint (a model trained on the task, with its tokenizer)")
    if args.quick:
        args.steps, args.sample_batches, args.new_tokens = 2, "1,8", 32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # Training without MTP: transformers' DeepseekV3ForCausalLM has none, so both sides do the same work.
    # Sampling: the same main model; seekling's copy keeps one MTP module for speculative decoding.
    tmp = tempfile.mkdtemp()
    if args.checkpoint:
        drafting = load_pretrained(args.checkpoint)
        cfg = drafting.config.replace(num_nextn_predict_layers=0)
        ours = Transformer(cfg)
        ours.load_state_dict(drafting.state_dict(), strict=False)
    else:
        cfg = ModelConfig.from_name(args.preset, num_nextn_predict_layers=0)
        ours = Transformer(cfg)
        drafting = Transformer(cfg.replace(num_nextn_predict_layers=1))
        drafting.load_state_dict(ours.state_dict(), strict=False)  # the same main model, a random MTP module
    save_pretrained(ours, tmp)
    hf = load_transformers(tmp)
    peak = cpu_peak(args.threads)
    fpt = flops_per_token(cfg, args.seq_len, training=True, include_mtp=False)["total"]
    name = args.checkpoint or f"preset {args.preset}"
    print(f"{name}: {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters, "
          f"{args.threads} threads, CPU peak fp32 {peak['fp32'] / 1e9:.0f} / bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s, "
          f"{fpt / 1e6:.1f} MFLOP per training token")

    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        seq = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
        batches.append((seq[:, :-1], seq[:, 1:]))
    hf_batches = [(x, x.clone()) for x, _ in batches]  # transformers shifts labels itself

    print("\ntraining (forward + backward + AdamW), tokens/s" + (": skipped (--no-train)" if args.no_train else ""))
    for name, bf16 in () if args.no_train else (("fp32", False), ("bf16 autocast", True)):
        dtype_peak = peak["bf16" if bf16 else "fp32"]
        b = train_rate(hf, hf_batches, args.steps, 2, bf16, True)
        a = train_rate(ours, batches, args.steps, 2, bf16, False)
        line = (f"  {name:14s} transformers {b:7.0f} ({b * fpt / dtype_peak:4.1%} MFU)   "
                f"seekling {a:7.0f} ({a * fpt / dtype_peak:4.1%} MFU, {a / b:4.2f}x)")
        if args.compile:
            compiled = torch.compile(ours)
            c = train_rate(ours, batches, args.steps, 2, bf16, False, compiled=compiled)
            line += f"   seekling compiled {c:7.0f} ({c * fpt / dtype_peak:4.1%} MFU, {c / b:4.2f}x)"
        print(line, flush=True)

    print(f"\nsampling ({args.new_tokens} new tokens, greedy), new tokens/s; seekling without and with MTP "
          f"speculation ({'trained MTP module of ' + args.checkpoint if args.checkpoint else 'random weights: a random MTP module, whose drafts are rarely accepted'}), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    bandwidth = weight_bandwidth(args.threads)
    engine = DecodeEngine(ours)
    print(f"  (weights stream through a matrix-vector product at {bandwidth / 1e9:.1f} GB/s here: a decode step "
          "cannot beat batch * bandwidth / weight bytes read, the bandwidth ceiling below)")
    ours_batch1 = None
    pool = task_prompts(args.checkpoint, args.task_prompts) if args.task_prompts else None
    if pool:
        print(f"  prompts: {len(pool)} held-out {args.task_prompts} problems of {len(pool[0])} tokens, chat-rendered")
    for bs in [int(s) for s in args.sample_batches.split(",")]:
        if pool:
            prompts = [pool[i % len(pool)] for i in range(bs)]
        else:
            prompts = torch.randint(0, cfg.vocab_size, (bs, args.prompt_len), generator=g).tolist()
        sample_rate(ours, prompts, 4, False)  # warm-up
        sample_rate(drafting, prompts, 4, False, speculate=True)
        b = sample_rate(hf, prompts, args.new_tokens, True)
        a = sample_rate(ours, prompts, args.new_tokens, False)
        stats: dict = {}
        sp = sample_rate(drafting, prompts, args.new_tokens, False, speculate=True, stats=stats)
        floor = bs * bandwidth / decode_bytes(engine, bs)
        products_s, n_products = matmul_floor(engine, prompts)
        line = (f"  batch {bs:3d}   transformers {b:7.0f}   seekling {a:7.0f} ({a / b:5.2f}x)   "
                f"speculative {sp:7.0f} ({sp / a:4.2f}x plain, {acceptance(stats)} accepted)\n"
                f"             bandwidth ceiling {floor:7.0f} ({decode_bytes(engine, bs) / 1e6:.1f} MB/step, at most "
                f"{floor / b:5.2f}x, seekling at {a / floor:4.0%} of it)   "
                f"matmul floor {bs / products_s:7.0f} (the step's {n_products} products alone {products_s * 1e3:.2f} ms, "
                f"at most {bs / products_s / b:5.2f}x, seekling at {a * products_s / bs:4.0%} of it)")
        print(line, flush=True)
        if bs == 1:
            ours_batch1, prompt1 = a, prompts[0]

    if importlib.util.find_spec("llama_cpp") is None:
        print("\nllama.cpp: llama-cpp-python is not installed; skipped the reference line")
        return
    import llama_cpp

    if ours_batch1 is None:  # batch 1 was not among --sample-batches
        prompt1 = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).tolist()[0]
        ours_batch1 = sample_rate(ours, [prompt1], args.new_tokens, False)
    print(f"\nreference: llama.cpp (llama-cpp-python {llama_cpp.__version__}, {args.threads} threads) on the same "
          f"weights, batch 1, {args.new_tokens} new tokens, greedy")
    for out_type in ("f32", "f16"):
        rate = llama_cpp_rate(export_for_llama_cpp(ours, out_type), prompt1, args.new_tokens, args.threads)
        print(f"  llama.cpp {out_type}   {rate:7.0f} tokens/s   seekling fp32 batch 1 {ours_batch1:7.0f} "
              f"({ours_batch1 / rate:5.2f}x llama.cpp)", flush=True)


if __name__ == "__main__":
    main()
