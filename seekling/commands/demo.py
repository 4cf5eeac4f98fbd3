"""Build a model preset with random weights, count its parameters and sample a few tokens from it.

A quick check that the install works (no data, no downloads):

    seekling demo --preset tiny --new-tokens 16
"""

from __future__ import annotations

import argparse
import time

import torch

from seekling.config import PRESETS, ModelConfig, count_parameters
from seekling.generate import SamplingParams, generate
from seekling.model import Transformer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=[p for p in PRESETS if p != "deepseek-v3"],
                        help="model size to build")
    parser.add_argument("--batch", type=int, default=4, help="prompts sampled together")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to sample per prompt")
    parser.add_argument("--seed", type=int, default=0, help="random seed (weights and sampling)")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_name(args.preset)
    counts = count_parameters(cfg)
    model = Transformer(cfg).eval()
    print(f"{args.preset}: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per token")
    prompts = [[cfg.bos_token_id or 0] + list(range(2, 2 + 3 * i + 1)) for i in range(args.batch)]
    t0 = time.perf_counter()
    outs = generate(model, prompts, SamplingParams(max_new_tokens=args.new_tokens, seed=args.seed))
    seconds = time.perf_counter() - t0
    for prompt, out in zip(prompts, outs):
        print(f"  prompt {prompt[:6]}{'...' if len(prompt) > 6 else ''} -> {out.token_ids[:12]}...")
    n = sum(len(o.token_ids) for o in outs)
    print(f"sampled {n} tokens in {seconds:.2f}s ({n / seconds:.0f} tokens/s, random weights)")
    return 0
