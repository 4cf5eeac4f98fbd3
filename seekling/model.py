"""The DeepSeek-V3 model: multi-head latent attention, DeepSeekMoE, multi-token prediction.

Read top to bottom in the order of DeepSeek's own file: RMSNorm -> RoPE/YaRN -> MLA (with its latent
cache) -> MLP -> Gate -> Experts/MoE -> Block -> Transformer -> MTP; the experts' grouped matmul is a
custom op in `seekling.ops`, the auxiliary-loss-free bias update is `seekling.training.update_expert_bias`.
It computes exactly what transformers' `DeepseekV3ForCausalLM` computes (tests/test_parity.py), with a
training path (expanded keys, fused attention) and a generation path that caches only the compressed
latent and attends in absorbed form.

    python -c "from seekling.model import Transformer; from seekling.config import ModelConfig; \
               import torch; m = Transformer(ModelConfig.from_name('tiny')); \
               print(m(torch.randint(0, 512, (2, 16))).logits.shape)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seekling.config import ModelConfig
from seekling.errors import SeeklingError
from seekling.ops import grouped_linear

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- primitives
class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype (as DeepSeek and transformers do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:  # fused kernel; accumulates in fp32 for bf16 inputs too
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        if torch.is_autocast_enabled(x.device.type):  # keep activations in the autocast dtype
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ----------------------------------------------------------------------------- RoPE with YaRN
def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the decoupled RoPE key, with the YaRN blend; returns (inv_freq, cos/sin scale)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    original_len = scaling["original_max_position_embeddings"]
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over L_orig
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate by `factor`
    inv_freq = inv_freq / factor * (1 - smooth) + inv_freq * smooth

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return inv_freq, float(attention_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate channel pairs of x [..., rope_dim] by angles with cos/sin [..., rope_dim/2] (broadcast).

    DeepSeek pairs adjacent channels (x0, x1), (x2, x3), ...; the result is written with the even
    halves first, as transformers does. Queries and keys get the same layout, so q.k is unchanged.
    """
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ----------------------------------------------------------------------------- MLA and its latent KV cache
class LatentCache:
    """What generation keeps per layer: normalised c_KV and the RoPE'd k_pe, side by side.

    `kv[layer]` is [batch, max_len, kv_lora_rank + qk_rope_head_dim]; `lengths[b]` is how many
    positions of row b are filled. Rows are independent: a batch of prompts of different lengths,
    or the slots of a continuous-batching server.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 layers: range | None = None):
        if max_len > config.max_position_embeddings:
            raise SeeklingError(
                f"cache length {max_len} exceeds max_position_embeddings={config.max_position_embeddings}"
            )
        width = config.kv_lora_rank + config.qk_rope_head_dim
        layers = range(config.num_hidden_layers) if layers is None else layers  # an MTP module's: its block's index
        self.kv = [torch.zeros(batch_size, max_len, width, device=device, dtype=dtype) if i in layers else None
                   for i in range(layers.stop)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def reset(self, rows: torch.Tensor | None = None) -> None:
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0


def causal_bias(pos_BT: torch.Tensor, S: int, dtype: torch.dtype | None = None, heads: int = 1) -> torch.Tensor:
    """The additive attention mask over the cache, 0 up to each new token's position and -inf after: [B, T, S],
    or with `heads` one row per (token, head) as absorbed attention lays out its queries, [B, T * heads, S].
    Shared by `forward_cached` and the decode step, so both attend to exactly the same positions."""
    bias = torch.zeros(*pos_BT.shape, S, dtype=dtype, device=pos_BT.device).masked_fill_(
        torch.arange(S, device=pos_BT.device) > pos_BT[..., None], float("-inf"))
    return bias if heads == 1 else bias.repeat_interleave(heads, dim=1)


@dataclass
class CacheStep:
    """What every layer of one `forward_cached` call shares: rows, positions, the visibility mask."""

    cache: LatentCache
    rows: torch.Tensor | None  # cache rows of the batch (None: all rows, in order)
    row_idx: torch.Tensor  # [B]
    pos_BT: torch.Tensor  # absolute positions of the new tokens
    S: int  # length of the cache prefix attended
    naive: bool = False
    fresh: bool = False  # every row starts at position 0 (and, right-padded, attends causally to itself)

    def __post_init__(self):
        self.bias_BTS = causal_bias(self.pos_BT, self.S)
        self._bias: dict[int, torch.Tensor] = {}

    def bias_BXS(self, n_heads: int) -> torch.Tensor:
        """The additive mask laid out as [B, T * heads, S] (built once, reused by every layer)."""
        if n_heads not in self._bias:
            self._bias[n_heads] = causal_bias(self.pos_BT, self.S, heads=n_heads)
        return self._bias[n_heads]


class MLA(nn.Module):
    """Multi-head latent attention: low-rank queries, a shared compressed KV latent, a decoupled RoPE key."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.n_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.qk_dim = c.qk_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.scale = c.softmax_scale
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + self.rope_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, the normalised latent and the RoPE'd parts (q_pe and k_pe rotated together)."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.config.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.n_heads, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        # k_pe rides along as one more "head", so both are rotated by a single call
        # cos/sin in the hidden states' dtype, as transformers does (bf16 models rotate in bf16)
        pe = apply_rope(torch.cat([q_pe, k_pe.unsqueeze(2)], dim=2), cos.unsqueeze(-2).to(x.dtype),
                        sin.unsqueeze(-2).to(x.dtype), self.config.rope_interleave)
        return q_nope, pe[:, :, :-1], c_kv, pe[:, :, -1]  # [B,T,H,nope], [B,T,H,rope], [B,T,C], [B,T,rope]

    def forward(self, x, cos, sin, step: CacheStep | None = None, layer_idx: int = 0) -> torch.Tensor:
        """Without a step (training, scoring): expand the latent into per-head keys and values, fused causal attention."""
        if step is None:
            return self._expanded_attention(x, *self._project(x, cos, sin))
        return self._forward_cached(x, cos, sin, step, layer_idx)

    def _expanded_attention(self, x, q_nope, q_pe, c_kv, k_pe):
        B, T, _ = x.shape
        H = self.n_heads
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, qk]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.rope_dim)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if self.v_dim < self.qk_dim:  # the fused CPU kernel wants equal head dims: pad v, slice after
            v = F.pad(v, (0, self.qk_dim - self.v_dim))
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # the CPU flash kernel is faster in fp32 than in bf16 at these head sizes
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        out = out[..., : self.v_dim].to(q.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _forward_cached(self, x, cos, sin, step: CacheStep, layer_idx: int):
        """Generation path: write the new latents into the cache, attend over it in absorbed form.

        Absorption folds the key half of kv_b_proj into the query (q_latent = q_nope @ W_UK) and
        the value half into the output, so per cached token only kv_lora_rank + rope values are read,
        and every head reads the one shared latent (heads fold into the query axis: no expansion).
        """
        B, T, _ = x.shape
        H, C, S = self.n_heads, self.kv_lora_rank, step.S
        q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin)
        store = step.cache.kv[layer_idx]
        store[step.row_idx[:, None], step.pos_BT] = torch.cat([c_kv, k_pe], dim=-1).to(store.dtype)
        if step.fresh:  # a prefill of empty rows sees only its own tokens: plain causal attention is cheaper
            return self._expanded_attention(x, q_nope, q_pe, c_kv, k_pe)
        kv_BSD = (store[:, :S] if step.rows is None else store[step.rows, :S]).to(x.dtype)
        w_kv_b = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, C)
        w_uk, w_uv = w_kv_b[:, : self.nope_dim], w_kv_b[:, self.nope_dim :]
        if step.naive:  # reference: expand keys and values from the cached latent
            c_all, k_pe_all = kv_BSD.split([C, self.rope_dim], dim=-1)
            k_nope, v = self.kv_b_proj(c_all).view(B, S, H, -1).split([self.nope_dim, self.v_dim], dim=-1)
            scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe_all)
            probs = (scores * self.scale + step.bias_BTS[:, None]).softmax(-1)
            out = torch.einsum("bhts,bshv->bthv", probs, v)
        else:
            q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
            q_cat = (torch.cat([q_latent, q_pe], dim=-1) * self.scale).view(B, T * H, C + self.rope_dim).to(x.dtype)
            probs = torch.baddbmm(step.bias_BXS(H).to(x.dtype), q_cat, kv_BSD.transpose(1, 2)).softmax(-1)  # [B, T*H, S]
            out = torch.einsum("bthc,hvc->bthv", torch.bmm(probs, kv_BSD[..., :C]).view(B, T, H, C), w_uv)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))


# ----------------------------------------------------------------------------- MLP and MoE
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """DeepSeekMoE router: sigmoid scores in fp32, bias for selection only, group-limited top-k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.norm_topk_prob, self.scaling = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        # Adjusted by `update_expert_bias` after each optimiser step, never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor):
        with torch.autocast(x_TD.device.type, enabled=False):
            scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        weights_TK, topk_idx_TK = self.route(scores_TE)
        return weights_TK, topk_idx_TK, scores_TE

    def route(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the sigmoid scores: the experts' weights [T, K] and indices [T, K]."""
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.n_group > 1:
            choice_TGX = choice_TE.view(scores_TE.shape[0], self.n_group, -1)
            group_scores_TG = choice_TGX.topk(2, dim=-1).values.sum(-1)
            top_groups_TG = group_scores_TG.topk(self.topk_group, dim=-1, sorted=False).indices
            drop_TG = torch.ones_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TG, False)
            choice_TE = choice_TGX.masked_fill(drop_TG[:, :, None], float("-inf")).view_as(choice_TE)
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        weights_TK = scores_TE.gather(1, topk_idx_TK)  # unbiased scores weight the experts
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        return weights_TK * self.scaling if self.scaling != 1.0 else weights_TK, topk_idx_TK


class Experts(nn.Module):
    """All routed experts' weights stacked ([E, 2F, D] gate+up, [E, D, F] down), as transformers keeps them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, F_ = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts, self.inter_dim = E, F_
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    def count_tokens(self, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        """Tokens routed to each expert, [E] (long)."""
        flat_N = topk_idx_TK.reshape(-1)
        return torch.zeros(self.n_experts, dtype=torch.long, device=flat_N.device).scatter_add_(0, flat_N, torch.ones_like(flat_N))

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, topk_idx_TK: torch.Tensor,
                out_TD: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert dispatch of the model and of the decode step: returns (out_TD + experts(x_TD), load_E).

        The (token, expert) pairs are sorted by expert so each expert's rows are contiguous; one grouped
        matmul runs every expert's gate+up, SwiGLU, one more every down projection, and the weighted
        rows are added back to their tokens, into out_TD in place (fresh zeros when None; the decode
        step passes its residual stream). load_E [E] is how many tokens each expert got.
        """
        T, K = topk_idx_TK.shape
        order_N = topk_idx_TK.reshape(-1).argsort(stable=True)
        token_N = order_N // K
        load_E = self.count_tokens(topk_idx_TK)
        w_gate_up, w_down, x = self.gate_up_proj, self.down_proj, x_TD
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_gate_up, w_down = x.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
        gate_NF, up_NF = grouped_linear(x[token_N], w_gate_up.transpose(1, 2), load_E).chunk(2, dim=-1)
        y_ND = grouped_linear(F.silu(gate_NF) * up_NF, w_down.transpose(1, 2), load_E)
        y_ND = y_ND * weights_TK.reshape(-1)[order_N, None].to(y_ND.dtype)
        if out_TD is None:
            out_TD = torch.zeros(T, x_TD.shape[1], dtype=y_ND.dtype, device=x.device)
        return out_TD.index_add_(0, token_N, y_ND), load_E

    def forward_naive(self, x_TD, weights_TK, topk_idx_TK):
        """Reference: every expert on the tokens that chose it, one expert at a time."""
        out = torch.zeros_like(x_TD)
        for e in range(self.n_experts):
            token_idx, slot = torch.where(topk_idx_TK == e)
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(x_TD[token_idx], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * weights_TK[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out, self.count_tokens(topk_idx_TK)


@dataclass
class RouterStats:
    load_E: torch.Tensor  # tokens routed to each expert in this forward (no grad)
    balance_loss: torch.Tensor  # the sequence-wise balance loss of this layer (without alpha)


def sequence_balance_loss(scores_BTE: torch.Tensor, topk_idx_BTK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss sum_i f_i * P_i, averaged over sequences.

    f_i = N_r / (K_r * T) * (tokens of the sequence that chose i); P_i = mean over the sequence of the
    scores normalised to sum to one per token. The caller multiplies by alpha.
    """
    B, T, E = scores_BTE.shape
    K = topk_idx_BTK.shape[-1]
    chosen_BE = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
        1, topk_idx_BTK.reshape(B, -1), torch.ones(B, T * K, device=scores_BTE.device)
    )
    f_BE = chosen_BE * E / (K * T)
    p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * p_BE).sum(-1).mean()


class MoE(nn.Module):
    """Shared experts always on, routed experts chosen by the gate; no token dropping."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
            if config.n_shared_experts > 0 else None
        )
        self.naive = False

    def forward(self, x: torch.Tensor, with_stats: bool = True) -> tuple[torch.Tensor, RouterStats | None]:
        B, T, D = x.shape
        x_TD = x.reshape(-1, D)
        weights_TK, topk_idx_TK, scores_TE = self.gate(x_TD)
        experts = self.experts.forward_naive if self.naive else self.experts
        y, load_E = experts(x_TD, weights_TK, topk_idx_TK)
        y = y.view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if not with_stats:
            return y.to(x.dtype), None
        stats = RouterStats(load_E.detach(), sequence_balance_loss(scores_TE.view(B, T, -1), topk_idx_TK.view(B, T, -1)))
        return y.to(x.dtype), stats


# ----------------------------------------------------------------------------- blocks
class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, step: CacheStep | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, self.layer_idx)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, stats = self.mlp(h, with_stats=step is None)
            return x + y, stats
        return x + self.mlp(h), None


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab] (only the last position when `last_only`)
    loss: torch.Tensor | None = None  # main next-token cross-entropy
    mtp_loss: torch.Tensor | None = None  # 1/D * sum_k CE_k over the MTP depths (without lambda)
    balance_loss: torch.Tensor | None = None  # sequence-wise balance loss summed over MoE layers (without alpha)
    expert_load: torch.Tensor | None = None  # [n_moe_layers, n_routed_experts] tokens per expert
    hidden: torch.Tensor | None = None  # final normalised hidden states


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------- the model
class Transformer(nn.Module):
    """DeepSeek-V3: embeddings, `num_hidden_layers` blocks, final norm, output head, MTP modules."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Block(c, i) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList([MTPModule(c, c.num_hidden_layers + k) for k in range(c.num_nextn_predict_layers)])
        inv_freq, self.rope_attention_factor = rope_inv_freq(c)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Gate):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
                nn.init.normal_(module.down_proj, mean=0.0, std=std)

    @property
    def moe_gates(self) -> list[Gate]:
        """The gates of the main MoE layers, then those of MoE blocks inside the MTP modules."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.mlp.gate for b in blocks if b.is_moe]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., rope_dim/2] at the given integer positions."""
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= self.config.max_position_embeddings:
            raise SeeklingError(
                f"position {int(positions.max())} is past max_position_embeddings="
                f"{self.config.max_position_embeddings}: the prompt plus the tokens to generate is too long"
            )
        angles = positions[..., None].float() * self.inv_freq.float()
        return angles.cos() * self.rope_attention_factor, angles.sin() * self.rope_attention_factor

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                last_only: bool = False) -> ModelOutput:
        """Full-sequence forward (training, scoring). targets [B, T] with -100 where no loss is taken."""
        B, T = input_ids.shape
        cos, sin = self.rope(torch.arange(T, device=input_ids.device))
        x, stats = self.embed_tokens(input_ids), []
        for layer in self.layers:
            x, s = layer(x, cos, sin)
            if s is not None:
                stats.append(s)
        h = self.norm(x)
        out = ModelOutput(logits=self.lm_head(h[:, -1:] if last_only else h), hidden=h)
        if stats:
            out.expert_load = torch.stack([s.load_E for s in stats])
            out.balance_loss = torch.stack([s.balance_loss for s in stats]).sum()
        if targets is not None:
            out.loss = cross_entropy(out.logits, targets)
            if self.mtp:
                out.mtp_loss = self._mtp_loss(input_ids, targets, h, cos, sin, out)
        return out

    def _mtp_loss(self, input_ids, targets, h, cos, sin, out: ModelOutput, frozen: bool = False) -> torch.Tensor:
        """Depth k predicts token t+k+1 from the depth k-1 state at t and the embedding of token t+k.
        `frozen`: the shared embedding and output head get no gradient from it."""
        losses, T = [], input_ids.shape[1]
        head = (lambda x: F.linear(x, self.lm_head.weight.detach())) if frozen else self.lm_head  # a module: counted
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            emb = self.embed_tokens(input_ids[:, k:])
            h, s = module(emb.detach() if frozen else emb, h[:, :-1], cos[: T - k], sin[: T - k])
            losses.append(cross_entropy(head(module.shared_head.norm(h)), targets[:, k:]))
            if s is not None and out.balance_loss is not None:
                out.balance_loss = out.balance_loss + s.balance_loss
                out.expert_load = torch.cat([out.expert_load, s.load_E[None]])
        return torch.stack(losses).mean() if losses else torch.zeros((), device=input_ids.device)

    def mtp_loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The MTP modules' loss with the main model's states, embedding and head held fixed, so only the MTP
        modules learn (GRPO trains them so on its completions). targets [B, T], -100 where no loss is taken."""
        with torch.no_grad():
            h = self(input_ids).hidden
        cos, sin = self.rope(torch.arange(input_ids.shape[1], device=input_ids.device))
        return self._mtp_loss(input_ids, targets, h, cos, sin, ModelOutput(logits=h), frozen=True)

    def forward_cached(self, input_ids: torch.Tensor, cache: LatentCache, rows: torch.Tensor | None = None,
                       num_new: torch.Tensor | None = None, naive: bool = False,
                       all_logits: bool = False, hidden: bool = False):
        """Run new tokens [B, T] through the model against the latent cache; return next-token logits.

        Row b of the batch is cache row `rows[b]` (all rows when None), at positions
        `lengths[row] .. lengths[row] + T - 1`. With right-padded prompts, `num_new[b]` is how many of
        the T tokens are real: the cache length advances by that much and the returned logits [B, V]
        are those of each row's last real token (or [B, T, V] with `all_logits`). With `hidden`, also
        the final normalised hidden states [B, T, D] (what the first MTP module reads).
        """
        step, cos, sin = self._cache_step(input_ids, cache, rows, naive)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x, _ = layer(x, cos, sin, step)
        return self._cached_output(x, self.norm, step, num_new, all_logits, hidden)

    def mtp_forward_cached(self, k: int, input_ids: torch.Tensor, h: torch.Tensor, cache: LatentCache,
                           rows: torch.Tensor | None = None, num_new: torch.Tensor | None = None):
        """MTP module k (1-based) against its own cache: at position t it reads the depth k-1 state h[t]
        [B, T, D] and token t+k (input_ids [B, T]) and predicts token t+k+1, as in training.
        Returns (logits of each row's last real position [B, V], its states [B, T, D] for depth k+1)."""
        module = self.mtp[k - 1]
        step, cos, sin = self._cache_step(input_ids, cache, rows)
        x, _ = module(self.embed_tokens(input_ids), h, cos, sin, step)
        return self._cached_output(x, module.shared_head.norm, step, num_new, False, True)

    def _cache_step(self, input_ids, cache, rows, naive=False):
        B, T = input_ids.shape
        row_idx = torch.arange(B, device=input_ids.device) if rows is None else rows
        start = cache.lengths[row_idx]
        pos_BT = start[:, None] + torch.arange(T, device=input_ids.device)
        cos, sin = self.rope(pos_BT)
        fresh = T > 1 and not naive and not bool(start.any())
        return CacheStep(cache, rows, row_idx, pos_BT, int(pos_BT.max()) + 1, naive, fresh), cos, sin

    def _cached_output(self, x, norm, step: CacheStep, num_new, all_logits: bool, hidden: bool):
        B, T, _ = x.shape
        num_new = torch.full((B,), T, device=x.device) if num_new is None else num_new
        step.cache.lengths[step.row_idx] = step.pos_BT[:, 0] + num_new
        last = torch.arange(B, device=x.device), num_new - 1
        if hidden:
            h = norm(x)
            return self.lm_head(h if all_logits else h[last]), h
        return self.lm_head(norm(x) if all_logits else norm(x[last]))


# ----------------------------------------------------------------------------- multi-token prediction
class SharedHead(nn.Module):
    """The MTP module's own final norm; the output projection is the main model's lm_head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(nn.Module):
    """Depth-k multi-token prediction: h' = Block(eh_proj([enorm(emb(t+k)); hnorm(h_{k-1})]))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer_idx)
        self.shared_head = SharedHead(config)

    def forward(self, emb, h, cos, sin, step: CacheStep | None = None):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, cos, sin, step)
