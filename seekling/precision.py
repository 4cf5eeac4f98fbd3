"""`--dtype auto`: bf16 compute where it pays on this machine, fp32 where it does not, by measurement.

bf16 autocast keeps the weights and optimiser state in fp32 (the master copy) and runs the matmuls in
bf16. On a CPU with native bf16 matmuls (AMX-BF16, AVX512-BF16) those run several times faster than
fp32; on one without, torch emulates them and they run slower than fp32. No flag list or CPU name is
trusted: `choose_dtype` times the model's own matmul shapes (one training batch's tokens against the
attention, feed-forward, expert and output-head weights) in fp32 and in bf16 and takes bf16 only
when it is at least `MIN_BF16_GAIN` times faster, since autocast adds a cast before every matmul
and leaves the elementwise work in fp32. On CUDA, auto is bf16 where the GPU supports it. The
decision and the measured figures are logged; MFU is then reported against the peak of the dtype
chosen (`seekling.training.peak_flops`).

    python -m seekling.precision cpu       # the probe for the `cpu` model preset, printed
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch

from seekling.config import ModelConfig
from seekling.errors import ConfigError

DTYPES = ("auto", "fp32", "bf16")
_MEASURED: dict[tuple, tuple[float, float]] = {}  # (shapes, threads) -> (fp32, bf16) seconds
MIN_BF16_GAIN = 1.5  # bf16 matmuls must beat fp32 by this much to pay for autocast's casts
PROBE_SECONDS = 0.05  # per shape and dtype
MAX_PROBE_TOKENS = 128  # rows of the probe's activations: a batch's tokens, capped so that emulated
# bf16 (about 100x slower than fp32 on a CPU without it) keeps the probe under a second


def matmul_shapes(config: ModelConfig, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the matmuls that dominate a training step: attention's query and output
    projections, the dense feed-forward, one routed expert's share of the tokens, the output head."""
    T, D = max(1, min(tokens, MAX_PROBE_TOKENS)), config.hidden_size
    heads = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
    per_expert = max(1, T * config.num_experts_per_tok // max(1, config.n_routed_experts))
    return [(T, D, heads), (T, D, 2 * config.intermediate_size), (per_expert, D, 2 * config.moe_intermediate_size),
            (T, D, config.vocab_size)]


def time_matmuls(shapes: list[tuple[int, int, int]], dtype: torch.dtype, seconds: float = PROBE_SECONDS) -> float:
    """Seconds for one matmul of each shape in `dtype` (the best of repeated timings: we want the rate)."""
    total = 0.0
    for m, k, n in shapes:
        a, b = torch.ones(m, k, dtype=dtype), torch.ones(k, n, dtype=dtype)  # never the global RNG
        best, deadline = float("inf"), time.perf_counter() + seconds
        while best == float("inf") or time.perf_counter() < deadline:  # the first call warms up, and counts
            start = time.perf_counter()  # when it alone takes longer than the budget (emulated bf16)
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        total += best
    return total


def decide_dtype(fp32_seconds: float, bf16_seconds: float, min_gain: float = MIN_BF16_GAIN) -> str:
    """"bf16" when its matmuls take at most 1/min_gain of fp32's time, else "fp32"."""
    return "bf16" if fp32_seconds >= min_gain * bf16_seconds else "fp32"


def choose_dtype(requested: str | None, device: torch.device | str, config: ModelConfig, tokens: int,
                 log: Callable[[str], None] | None = None,
                 measure: Callable[[list[tuple[int, int, int]], torch.dtype], float] = time_matmuls) -> str:
    """"fp32" or "bf16" for training: `requested` as given, or for "auto" (and None) measured (CPU) or
    bf16 where supported (CUDA); logs an auto decision with its figures."""
    log = log or (lambda line: print(line, file=sys.stderr))
    requested = requested or "auto"
    if requested not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        chosen = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        log(f"dtype auto: {chosen} ({'bf16 supported' if chosen == 'bf16' else 'no bf16'} on this GPU)")
        return chosen
    if device.type != "cpu":
        log(f"dtype auto: fp32 (bf16 autocast is not supported on {device.type})")
        return "fp32"
    shapes = matmul_shapes(config, tokens)
    key = (tuple(shapes), torch.get_num_threads())
    if measure is time_matmuls and key in _MEASURED:  # the ratio is the CPU's: once per process is enough
        fp32, bf16 = _MEASURED[key]
    else:
        fp32, bf16 = measure(shapes, torch.float32), measure(shapes, torch.bfloat16)
        if measure is time_matmuls:
            _MEASURED[key] = fp32, bf16
    chosen = decide_dtype(fp32, bf16)
    flops = sum(2 * m * k * n for m, k, n in shapes)
    log(f"dtype auto: {chosen} (bf16 autocast with fp32 master weights pays only at >= {MIN_BF16_GAIN}x): "
        f"the model's matmuls run at {flops / fp32 / 1e9:.1f} GFLOP/s in fp32 and {flops / bf16 / 1e9:.1f} in bf16 "
        f"(bf16 at {fp32 / bf16:.3g}x the fp32 speed) on {torch.get_num_threads()} thread(s)")
    return chosen


if __name__ == "__main__":
    choose_dtype("auto", "cpu", ModelConfig.from_name(sys.argv[1] if len(sys.argv) > 1 else "cpu"), 2048, log=print)
