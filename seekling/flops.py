"""FLOPs of a DeepSeek-V3-style model, counted part by part from a `ModelConfig`.

This is the numerator of every MFU and every dollar figure in `seekling.cost`. Conventions:

- Only matrix multiplications count. A matmul of an [m, k] by a [k, n] matrix is 2*m*n*k FLOPs
  (one multiply and one add per term), so a linear layer costs 2 * in_features * out_features per
  token. Norms, RoPE, softmax, SiLU, the router's top-k and the embedding lookup are left out: they are
  a rounding error at scale and torch's `FlopCounterMode` does not see them either.
- Attention's quadratic term is QK^T over qk_head_dim (nope + rope) and AV over v_head_dim, per head.
  With causal masking, the token at position t (1-based) attends to t keys, so over a sequence of
  length T the *average* context is (T+1)/2; that is what a kernel that skips masked blocks does, and
  what DeepSeek-style MFU figures assume. `causal=False` counts the full T x T square instead, which
  is what a dense (math) attention kernel computes and what `FlopCounterMode` reports on CPU.
- MoE layers count the gate (hidden -> n_routed_experts), the `num_experts_per_tok` routed experts a
  token actually uses (not all of them) and the shared experts; experts are SwiGLU (3 matrices).
- Multi-token prediction (MTP): the module at depth k sees the first T-k positions (it predicts token
  t+k+1 from the hidden state at t and the embedding of t+k), and costs eh_proj (2h -> h), one decoder
  block (layer index num_hidden_layers + k - 1, so an MoE block whenever the model has routed experts,
  as in released checkpoints and vLLM) and the shared output head. Its cost is spread over the T
  tokens of the sequence, so every figure is "per token of training data".
- Training = 3 x forward: the backward pass does two matmuls of the forward's size for each forward
  matmul (gradient with respect to the input and to the weight). Activation recomputation is *not*
  counted: these are model FLOPs (MFU), not hardware FLOPs (HFU).

    >>> from seekling.config import ModelConfig, matmul_weights
    >>> f = flops_per_token(ModelConfig.from_name("deepseek-v3"), seq_len=4096)
    >>> round(f["total"] / 1e9)  # training FLOPs per token, about 6 x 37B active parameters + attention
    261

Run `seekling cost --preset cpu --tokens 50M` for the same numbers priced in GPU-hours and dollars.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from seekling.config import ModelConfig, matmul_weights
from seekling.errors import SeeklingError

TRAINING_MULTIPLIER = 3  # forward + backward (2x forward)

# Keys of `flops_per_token`, in the order they are printed. Every key but "total" is summed over layers.
PARTS = (
    "q_proj",  # q_a_proj + q_b_proj (or the plain q_proj when q_lora_rank is None)
    "kv_a_proj",  # kv_a_proj_with_mqa: hidden -> kv_lora_rank + qk_rope_head_dim
    "kv_b_proj",  # c_KV -> per-head k_nope and v
    "o_proj",
    "attn_scores",  # QK^T
    "attn_values",  # softmax(QK^T) V
    "dense_mlp",
    "moe_gate",
    "moe_routed",
    "moe_shared",
    "lm_head",
    "mtp_eh_proj",
    "mtp_block",
    "mtp_head",
)


def _linear(in_features: int, out_features: int) -> float:
    """Forward FLOPs per token of a bias-free linear layer."""
    return 2.0 * in_features * out_features


def block_flops(c: ModelConfig, moe: bool, context: float) -> dict[str, float]:
    """One decoder block (MLA + dense MLP or MoE), per token, forward; `context` is the number of keys
    this token attends to. In the order of PARTS."""
    parts = {name: 2.0 * weights for name, weights in matmul_weights(c, moe).items()}
    parts["attn_scores"] = 2.0 * c.num_attention_heads * c.qk_head_dim * context
    parts["attn_values"] = 2.0 * c.num_attention_heads * c.v_head_dim * context
    return {name: parts[name] for name in PARTS if name in parts}


def _average_context(seq_len: int, causal: bool) -> float:
    return (seq_len + 1) / 2 if causal else float(seq_len)


def forward_flops_per_token(config: ModelConfig, seq_len: int, include_mtp: bool = True,
                            causal: bool = True) -> dict[str, float]:
    """Forward FLOPs per token of a length-`seq_len` sequence, by part (summed over layers) and "total"."""
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise SeeklingError(f"seq_len must be a positive integer, got {seq_len!r}")
    c = config
    parts = dict.fromkeys(PARTS, 0.0)
    context = _average_context(seq_len, causal)
    for layer in range(c.num_hidden_layers):
        for name, value in block_flops(c, c.is_moe_layer(layer), context).items():
            parts[name] += value
    parts["lm_head"] = _linear(c.hidden_size, c.vocab_size)

    if include_mtp:
        for depth in range(1, min(c.num_nextn_predict_layers, seq_len - 1) + 1):
            positions = seq_len - depth
            share = positions / seq_len  # its per-position cost, spread over all seq_len tokens
            block = block_flops(c, c.is_moe_layer(c.num_hidden_layers + depth - 1), _average_context(positions, causal))
            parts["mtp_eh_proj"] += share * _linear(2 * c.hidden_size, c.hidden_size)
            parts["mtp_block"] += share * sum(block.values())
            parts["mtp_head"] += share * _linear(c.hidden_size, c.vocab_size)

    parts["total"] = sum(parts[name] for name in PARTS)
    return parts


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True, include_mtp: bool = True,
                    causal: bool = True) -> dict[str, float]:
    """FLOPs per token by part plus "total": forward only, or forward + backward (3x) when training."""
    forward = forward_flops_per_token(config, seq_len, include_mtp=include_mtp, causal=causal)
    multiplier = TRAINING_MULTIPLIER if training else 1
    return {name: multiplier * value for name, value in forward.items()}


def model_flops(config: ModelConfig, tokens: float, seq_len: int, training: bool = True, include_mtp: bool = True,
                causal: bool = True) -> float:
    """Total FLOPs to process `tokens` tokens in sequences of `seq_len` (training: forward + backward)."""
    if not tokens > 0:
        raise SeeklingError(f"tokens must be positive, got {tokens!r}")
    per_token = flops_per_token(config, seq_len, training=training, include_mtp=include_mtp, causal=causal)
    return per_token["total"] * float(tokens)


# The coarser view `seekling cost` prints: label -> the PARTS it sums.
GROUPS = {"attention projections": ("q_proj", "kv_a_proj", "kv_b_proj", "o_proj"),
          "attention QK^T + AV": ("attn_scores", "attn_values"), "dense MLP": ("dense_mlp",),
          "MoE gate": ("moe_gate",), "MoE routed experts (active)": ("moe_routed",),
          "MoE shared experts": ("moe_shared",), "output head": ("lm_head",),
          "MTP": ("mtp_eh_proj", "mtp_block", "mtp_head")}


def group_parts(parts: dict[str, float]) -> dict[str, float]:
    return {label: sum(parts[name] for name in names) for label, names in GROUPS.items()}


def _grouped_mm_flops(a_shape, b_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """torch._grouped_mm (the model's MoE kernel), which FlopCounterMode does not know: 2 * out * K."""
    if len(a_shape) == 2 and len(b_shape) == 2:  # groups split K: out [G, M, N], K summed over groups
        return 2 * out_shape[-2] * out_shape[-1] * a_shape[-1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def measure_flops(fn: Any, *args: Any, math_attention: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Matmul FLOPs torch's `FlopCounterMode` sees while running `fn(*args, **kwargs)` (a check, not a cost).

    Returns {"total": FLOPs, "modules": {module path: FLOPs, submodules included}}. `math_attention`
    runs `scaled_dot_product_attention` on its math path, where the counter sees QK^T and AV over the
    full T x T square (the fused CPU kernel is invisible to it): compare with `causal=False`.
    `torch._grouped_mm` (the model's MoE kernel) is counted too, which the stock counter does not do.
    """
    aten = torch.ops.aten
    mapping = {aten._grouped_mm: _grouped_mm_flops} if hasattr(aten, "_grouped_mm") else {}
    backend = sdpa_kernel([SDPBackend.MATH]) if math_attention else contextlib.nullcontext()
    with backend, FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args, **kwargs)
    modules = {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items() if name != "Global"}
    return {"total": float(counter.get_total_flops()), "modules": modules}
