"""The decode step of generation, lean: one new token per row, 30-45 kernels per layer.

`Transformer.forward_cached` is the readable reference (any number of new tokens, training-safe).
When every row brings exactly one new token, as in every decode step, the same computation can be
reorganised so that a layer is a handful of matmuls and a few elementwise kernels: at batch 1-64 a
CPU spends a decode step streaming weights and launching kernels, not computing, so fewer and
bigger kernels win. `DecodeEngine` folds, once, from the model's current weights:

  - RMSNorm's weight (and sqrt(dim)) into the matrix that follows it; the per-row 1/rms is applied
    to the matmul's output, since a per-row scalar commutes with the product;
  - the layer's first projections into one matrix: x -> [c_q | c_KV | k_pe | rot(k_pe)] (or, with no
    q_lora_rank, x -> [query | c_KV | k_pe | rot(k_pe)]);
  - absorption: q_latent_h = W_UK_h^T q_nope_h = (W_UK_h^T W_q,nope_h) c_q, with the softmax scale,
    so the query comes out per head as [q_latent | q_pe], ready to meet the cached [c_KV | k_pe];
  - RoPE's channel pairing: the rows of q_pe and k_pe are permuted so a rotation is
    x * cos + rot(x) * sin, with rot(x) (a signed permutation of x) produced by the same matmul;
  - the value half of kv_b_proj into o_proj: o = W_O [W_UV_h ctx_h]_h = (W_O W_UV) ctx, and the
    residual add rides on addmm;
  - the MoE gate's rows and the shared experts' gate/up rows into one matrix (fp32 models); with
    small routed experts (`dense_experts`) every routed expert's rows too, so that at up to
    DENSE_EXPERTS_TOKENS tokens a MoE layer is two matmuls whatever the routing: each expert's
    SwiGLU output is weighted by its routing weight, 0 where the router did not choose it.

Other routed experts run one token's K experts from their own weights on a CPU (no gather copy),
else through the model's own dispatch (`Experts.forward`). The rows' lengths are read on the host
once a step and positions, slots and the mask (the model's `causal_bias`) built from them. The
folded matrices are copies taken at build time (the embedding and the non-dense routed experts are
read from the model), so build an engine after the last weight update: `generate` builds one per
call, a server once. Results equal `forward_cached`'s to float rounding (tested, each expert path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seekling.model import MLA, LatentCache, Transformer, causal_bias

DENSE_EXPERTS_BYTES = 2 << 20  # routed experts of a layer this small (fp32 bytes) run densely...
DENSE_EXPERTS_TOKENS = 32  # ... at up to this many tokens per step


def dense_experts(config) -> bool:
    """Whether the decode step runs a MoE layer's routed experts densely: every expert on every token, in the
    same two matmuls as the shared experts, each expert's output weighted by its routing weight (0 where not
    chosen). Small experts at a small batch: one matmul over all of them costs less than a kernel or two per
    busy expert (measured on a 2-core CPU: the `cpu` preset's 8 x 1.2 MB, 1.1-4x faster than the per-expert
    paths at 1-32 tokens); larger ones (`cpu-large`'s 16 x 6.3 MB) would read many idle experts' weights."""
    E, D, F_ = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    return 0 < E * 3 * D * F_ * 4 <= DENSE_EXPERTS_BYTES


@dataclass
class _Attention:
    w_in: torch.Tensor  # [q_lora | C | rope | rope, D] (or [query | C | rope | rope, D]), norm folded in
    b_in: torch.Tensor | None
    eps_in: torch.Tensor  # sqrt(eps * D) of input_layernorm: 1/rms(x) = sqrt(D) / hypot(|x|, sqrt(eps * D))
    w_q: torch.Tensor | None  # [H*(C+rope) + H*rope, q_lora]; None when the query comes out of w_in
    eps_q: torch.Tensor | None
    kv_norm: torch.Tensor  # kv_a_layernorm weight * sqrt(C)
    eps_kv: torch.Tensor
    w_out_t: torch.Tensor  # [H*C, D]: (W_O W_UV)^T
    b_out: torch.Tensor | None


@dataclass
class _FeedForward:
    w_in: torch.Tensor | None  # [E gate rows (fp32 models) | gate | up, D], norm folded in; dense: see `w_front`
    eps: torch.Tensor
    norm: torch.Tensor  # post_attention_layernorm weight * sqrt(D), for the routed experts' input
    w_down_t: torch.Tensor | None  # the dense MLP's or the shared experts' down projection, [inter, D] (dense: below it
    # every routed expert's, [inter + E*F, D])
    inter: int  # the dense MLP's / shared experts' intermediate size
    moe: bool = True
    n_gate_rows: int = 0  # gate logits at the front of w_in's output
    gate_w: torch.Tensor | None = None  # a separate fp32 gate (models not in fp32)
    # `dense_experts`: w_in is [E gate rows | shared gate | every expert's gate | shared up | every expert's up], so
    # one SwiGLU covers all of them; w_front holds the rows without the routed experts, for steps past its batch
    dense: bool = False
    w_front: torch.Tensor | None = None


@dataclass
class _MTP:
    w_emb: torch.Tensor  # eh_proj's embedding half, enorm folded in
    eps_emb: torch.Tensor
    w_h: torch.Tensor  # eh_proj's state half, hnorm folded in
    eps_h: torch.Tensor
    layer: tuple  # (_Attention, _FeedForward) of the module's block
    head: torch.Tensor  # lm_head with the module's own final norm folded in
    norm: torch.Tensor  # that norm's weight * sqrt(D), for the states handed to the next depth
    eps: torch.Tensor


class DecodeEngine:
    """`step(tokens, cache, rows)` = `model.forward_cached(tokens, cache, rows)` for a few new tokens per
    row ([B] or [B, T], T small: a decode step, or the tokens a speculative step verifies), and
    `mtp_step` = `model.mtp_forward_cached` for the first MTP module (the draft of speculative decoding)."""

    def __init__(self, model: Transformer):
        self.model = model
        self.config = c = model.config
        D = c.hidden_size
        with torch.no_grad():
            self.layers = [(self._fold_attention(layer), self._fold_feed_forward(layer)) for layer in model.layers]
            head = model.lm_head.weight
            self.head, self.head_norm = self._fold_norm(head, model.norm.weight)
            self.head_eps = self._eps(model.norm.eps, D, head)
            self.mtp = [self._fold_mtp(m) for m in model.mtp]
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def _fold_norm(self, w: torch.Tensor, norm_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w with an RMSNorm weight and sqrt(dim) folded into its columns, that norm's weight * sqrt(dim))."""
        dim = norm_w.shape[0]
        folded = w.detach().float() * norm_w.detach().float() * math.sqrt(dim)
        return folded.to(w.dtype), (norm_w.detach().float() * math.sqrt(dim)).to(w.dtype)

    def _fold_mtp(self, m) -> _MTP:
        D = self.config.hidden_size
        w = m.eh_proj.weight
        w_emb, _ = self._fold_norm(w[:, :D], m.enorm.weight)
        w_h, _ = self._fold_norm(w[:, D:], m.hnorm.weight)
        head, norm = self._fold_norm(self.model.lm_head.weight, m.shared_head.norm.weight)
        return _MTP(w_emb, self._eps(m.enorm.eps, D, w), w_h, self._eps(m.hnorm.eps, D, w),
                    (self._fold_attention(m.block), self._fold_feed_forward(m.block)), head, norm,
                    self._eps(m.shared_head.norm.eps, D, w))

    # -------------------------------------------------------------------------------- folding
    @staticmethod
    def _eps(eps: float, dim: int, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(math.sqrt(eps * dim), dtype=like.dtype, device=like.device)

    def _rope_rows(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of a RoPE'd projection [rope, ...] -> (rows giving x in the rotated layout, rows giving rot(x))."""
        r = w.shape[0]
        if self.config.rope_interleave:  # pairs (0, 1), (2, 3)...: evens first, as apply_rope writes them
            perm = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])
        else:
            perm = torch.arange(r)
        a = w[perm]
        return a, torch.cat([-a[r // 2:], a[: r // 2]])

    def _fold_attention(self, layer) -> _Attention:
        attn: MLA = layer.self_attn
        c = self.config
        H, C, r, n = attn.n_heads, attn.kv_lora_rank, attn.rope_dim, attn.nope_dim
        D = c.hidden_size
        like = attn.kv_b_proj.weight
        f32 = lambda t: t.detach().float()  # noqa: E731
        w_kv_b = f32(attn.kv_b_proj.weight).view(H, n + attn.v_dim, C)
        w_uk, w_uv = w_kv_b[:, :n], w_kv_b[:, n:]

        def fold_query(w_q: torch.Tensor) -> torch.Tensor:  # [H*qk, in] -> [H*(C+r) + H*r, in], scaled
            w = w_q.view(H, n + r, -1)
            latent = torch.einsum("hdc,hdi->hci", w_uk, w[:, :n])  # W_UK_h^T W_q,nope_h
            pe, rot = zip(*(self._rope_rows(w[h, n:]) for h in range(H)))
            per_head = torch.cat([latent, torch.stack(pe)], dim=1).reshape(H * (C + r), -1)
            return torch.cat([per_head, torch.cat(rot)]) * attn.scale

        w_kv_a = f32(attn.kv_a_proj_with_mqa.weight)
        kv_rows = [w_kv_a[:C], *self._rope_rows(w_kv_a[C:])]
        w_q, eps_q = None, None
        if c.q_lora_rank is None:
            w_in = torch.cat([fold_query(f32(attn.q_proj.weight))] + kv_rows)
        else:
            w_in = torch.cat([f32(attn.q_a_proj.weight)] + kv_rows)
            q_norm = f32(attn.q_a_layernorm.weight) * math.sqrt(c.q_lora_rank)
            w_q = (fold_query(f32(attn.q_b_proj.weight)) * q_norm).to(like.dtype)
            eps_q = self._eps(attn.q_a_layernorm.eps, c.q_lora_rank, like)
        b_in = None
        if attn.kv_a_proj_with_mqa.bias is not None:  # attention_bias: the query's bias (q_a_proj's, or none)
            b_kv = f32(attn.kv_a_proj_with_mqa.bias)
            q_bias = f32(attn.q_a_proj.bias) if c.q_lora_rank is not None else w_in.new_zeros(w_in.shape[0] - C - 2 * r)
            b_in = torch.cat([q_bias, b_kv[:C], *self._rope_rows(b_kv[C:])]).to(like.dtype)
        w_o = f32(attn.o_proj.weight).view(D, H, attn.v_dim)
        w_out = torch.einsum("dhv,hvc->dhc", w_o, w_uv).reshape(D, H * C)
        in_norm = f32(layer.input_layernorm.weight) * math.sqrt(D)
        return _Attention(
            w_in=(w_in * in_norm).to(like.dtype), b_in=b_in, eps_in=self._eps(layer.input_layernorm.eps, D, like),
            w_q=w_q, eps_q=eps_q,
            kv_norm=(f32(attn.kv_a_layernorm.weight) * math.sqrt(C)).to(like.dtype),
            eps_kv=self._eps(attn.kv_a_layernorm.eps, C, like),
            w_out_t=w_out.t().contiguous().to(like.dtype),
            b_out=None if attn.o_proj.bias is None else attn.o_proj.bias.detach(),
        )

    def _fold_feed_forward(self, layer) -> _FeedForward:
        D = self.config.hidden_size
        like = layer.post_attention_layernorm.weight
        norm = like.detach().float() * math.sqrt(D)
        eps = self._eps(layer.post_attention_layernorm.eps, D, like)
        if not layer.is_moe:
            mlp = layer.mlp
            w_in = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float() * norm
            return _FeedForward(w_in.to(like.dtype), eps, norm.to(like.dtype), mlp.down_proj.weight.t().contiguous(),
                                mlp.gate_proj.out_features, moe=False)
        moe = layer.mlp
        gates, ups, downs, inter = [], [], [], 0
        if moe.shared_experts is not None:
            s = moe.shared_experts
            gates, ups = [s.gate_proj.weight.float() * norm], [s.up_proj.weight.float() * norm]
            inter, downs = s.gate_proj.out_features, [s.down_proj.weight.t()]
        front = gates + ups
        dense = dense_experts(self.config)
        if dense:  # every routed expert's gate rows after the shared expert's, their up rows likewise, downs below
            ex, F_ = moe.experts, moe.experts.inter_dim
            gate_up = ex.gate_up_proj.detach().float() * norm  # [E, 2F, D]: gate rows, then up rows
            gates.append(gate_up[:, :F_].reshape(-1, D))
            ups.append(gate_up[:, F_:].reshape(-1, D))
            downs.append(ex.down_proj.detach().transpose(1, 2).reshape(-1, D))  # [E * F, D]: expert-major
        w_down_t = torch.cat(downs).contiguous().to(like.dtype) if downs else None
        gate_w = moe.gate.weight.detach().float() * norm
        if like.dtype == torch.float32:  # the gate's logits come out of the same matmul, in fp32
            w_front = torch.cat([gate_w] + front) if dense else None
            return _FeedForward(torch.cat([gate_w] + gates + ups), eps, norm, w_down_t, inter,
                                n_gate_rows=gate_w.shape[0], dense=dense, w_front=w_front)
        w_in = torch.cat(gates + ups).to(like.dtype) if gates else None
        w_front = torch.cat(front).to(like.dtype) if front and dense else None
        return _FeedForward(w_in, eps, norm.to(like.dtype), w_down_t, inter, gate_w=gate_w, dense=dense,
                            w_front=w_front)

    # -------------------------------------------------------------------------------- the step
    @staticmethod
    def _rms_divisor(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """hypot(|x|, sqrt(eps * dim)) per row = rms(x) / sqrt(dim), so rms_norm(x) = x * sqrt(dim) / this."""
        return torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), eps)

    @staticmethod
    def _normed_matmul(x: torch.Tensor, w: torch.Tensor, eps: torch.Tensor, bias: torch.Tensor | None = None):
        """rms_norm(x) @ w.T for a w holding the norm's weight * sqrt(dim); also returns the row divisor."""
        denom = DecodeEngine._rms_divisor(x, eps)
        out = F.linear(x, w).div_(denom)
        return (out if bias is None else out.add_(bias)), denom

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: LatentCache, rows: torch.Tensor | None = None,
             hidden: bool = False):
        """Logits of the next token after appending `tokens` ([B], or [B, T]: logits [B, T, V]) to cache
        rows `rows` (all rows when None); with `hidden`, also the final normalised states."""
        x = self._run(tokens, cache, rows, self.layers, F.embedding(tokens.reshape(-1), self.model.embed_tokens.weight))
        logits, denom = self._normed_matmul(x, self.head, self.head_eps)
        if tokens.dim() == 2:
            logits = logits.view(*tokens.shape, -1)
        return (logits, (x * self.head_norm / denom).view(*tokens.shape, -1)) if hidden else logits

    @torch.no_grad()
    def mtp_step(self, tokens_BT: torch.Tensor, h_BTD: torch.Tensor, cache: LatentCache, num_new: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """The first MTP module over right-padded tokens [B, T] (`num_new[b]` real) and the main model's states
        [B, T, D]; the logits [B, V] of each row's last real position, its cache advanced by `num_new`."""
        m = self.mtp[0]
        emb = F.embedding(tokens_BT.reshape(-1), self.model.embed_tokens.weight)
        h = h_BTD.reshape(emb.shape)
        x = self._normed_matmul(emb, m.w_emb, m.eps_emb)[0].add_(self._normed_matmul(h, m.w_h, m.eps_h)[0])
        x = self._run(tokens_BT, cache, rows, [m.layer], x, first=self.config.num_hidden_layers,
                         blocks=[self.model.mtp[0].block])
        B, T = tokens_BT.shape
        last = torch.arange(B, device=x.device) * T + num_new - 1
        cache.lengths[torch.arange(B, device=x.device) if rows is None else rows] += num_new - T
        return self._normed_matmul(x[last], m.head, m.eps)[0]

    def _rope_table(self, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [positions, rope_dim] (each half twice, in the model's dtype) for positions 0 .. >= S-1,
        computed by the model's own `rope` and kept, grown by doubling: two lookups a step instead of ~10 ops."""
        if self._rope is None or self._rope[0].shape[0] < S:
            limit = self.config.max_position_embeddings
            if S > limit:
                self.model.rope(torch.tensor([S - 1]))  # the model's own error: past max_position_embeddings
            n = min(limit, max(S, 2 * (0 if self._rope is None else self._rope[0].shape[0]), 256))
            cos, sin = self.model.rope(torch.arange(n, device=self.head.device))
            dtype = self.head.dtype
            self._rope = (torch.cat([cos, cos], -1).to(dtype), torch.cat([sin, sin], -1).to(dtype))
        return self._rope

    def _run(self, tokens, cache, rows, layers, x, first: int = 0, blocks=None):
        """x [N = B*T, D] through `layers` (cache layers first, first+1, ...); advances the rows' lengths by T.

        The rows' lengths are read on the host once, and the positions, slots and mask built from them there:
        a handful of small tensors instead of ~25 kernels a step. When every row is at the same position and
        brings one token (batch 1, or prompts of one length), nothing needs masking and RoPE's rows are a slice.
        """
        B, T = tokens.shape[0], (tokens.shape[1] if tokens.dim() == 2 else 1)
        device = tokens.device
        starts = (cache.lengths if rows is None else cache.lengths[rows]).tolist()
        S = max(starts) + T
        cos_table, sin_table = self._rope_table(S)
        if T == 1 and min(starts) == S - 1:  # [1, 1, rope] broadcasts over the rows; every position is visible
            cos, sin, bias = cos_table[S - 1 : S], sin_table[S - 1 : S], None
        else:
            pos_BT = torch.tensor([[p + t for t in range(T)] for p in starts], device=device)
            pos_N = pos_BT.view(-1)
            cos, sin = cos_table[pos_N], sin_table[pos_N]
            # [B, 1, S] broadcasts over the heads of one token; T > 1: one row per (token, head), as the queries
            bias = causal_bias(pos_BT, S, self.head.dtype, heads=self.config.num_attention_heads if T > 1 else 1)
        rope = (cos[:, None], sin[:, None], cos, sin)  # [N or 1, 1, rope] for the queries' heads; [N or 1, rope]: k_pe
        row_ids = range(B) if rows is None else rows.tolist()
        slot = torch.tensor([r * cache.max_len + p + t for r, p in zip(row_ids, starts) for t in range(T)],
                            device=device)  # where each new latent goes in the flattened cache
        blocks = blocks if blocks is not None else self.model.layers
        for i, (attn, ff) in enumerate(layers):
            x = self._attention(x, attn, cache.kv[first + i], rows, slot, S, bias, rope)
            x = self._feed_forward(x, ff, blocks[i].mlp)
        if rows is None:
            cache.lengths.add_(T)
        else:
            cache.lengths[rows] = torch.tensor([p + T for p in starts], device=device)
        return x

    def _attention(self, x, a: _Attention, store, rows, slot_N, S, bias, rope):
        c = self.config
        N, H, C, r = x.shape[0], c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
        cos_N1R, sin_N1R, cos_NR, sin_NR = rope
        h, _ = self._normed_matmul(x, a.w_in, a.eps_in, a.b_in)
        if a.w_q is None:
            q_full, c_kv, k_pe, k_rot = h.split([H * (C + 2 * r), C, r, r], dim=-1)
        else:
            c_q, c_kv, k_pe, k_rot = h.split([h.shape[1] - C - 2 * r, C, r, r], dim=-1)
            q_full, _ = self._normed_matmul(c_q, a.w_q, a.eps_q)
        q_NHX = q_full[:, : H * (C + r)].view(N, H, C + r)  # per head [q_latent | q_pe]
        q_NHX[..., C:].mul_(cos_N1R).addcmul_(q_full[:, H * (C + r):].view(N, H, r), sin_N1R)
        k_pe = torch.addcmul(k_pe * cos_NR, k_rot, sin_NR)
        entry = torch.cat([c_kv * a.kv_norm / self._rms_divisor(c_kv, a.eps_kv), k_pe], dim=-1)
        if entry.dtype != store.dtype:
            entry = entry.to(store.dtype)
        store.view(-1, store.shape[-1]).index_copy_(0, slot_N, entry)
        kv_BSX = store[:, :S] if rows is None else store[:, :S].index_select(0, rows)
        if kv_BSX.dtype != x.dtype:
            kv_BSX = kv_BSX.to(x.dtype)
        B = kv_BSX.shape[0]
        q_BQX = q_NHX.reshape(B, N // B * H, C + r)  # the T tokens' heads of a row side by side (a view when T = 1)
        k_BXS = kv_BSX.transpose(1, 2)
        probs = (torch.bmm(q_BQX, k_BXS) if bias is None else torch.baddbmm(bias, q_BQX, k_BXS)).softmax(-1)
        x = torch.addmm(x, torch.bmm(probs, kv_BSX[..., :C]).view(N, H * C), a.w_out_t)
        return x if a.b_out is None else x.add_(a.b_out)

    @staticmethod
    def _few_experts(x_TD, weights_TK, topk_idx_TK, experts, out_TD):
        """out += the routed experts, for at most E (token, expert) pairs (batch 1-few decoding): each pair's
        expert weights gathered and applied in two batched products, with no sort, no per-expert loop and no
        read of the routing on the host (a dozen kernels; an accelerator's path: it never waits for the device)."""
        T, K = topk_idx_TK.shape
        idx_N = topk_idx_TK.reshape(-1)
        x_N1D = x_TD.repeat_interleave(K, dim=0)[:, None]
        gate_N1F, up_N1F = torch.bmm(x_N1D, experts.gate_up_proj[idx_N].transpose(1, 2)).chunk(2, dim=-1)
        y_ND = torch.bmm(F.silu(gate_N1F) * up_N1F, experts.down_proj[idx_N].transpose(1, 2))[:, 0]
        y_TD = (y_ND * weights_TK.reshape(-1, 1).to(y_ND.dtype)).view(T, K, -1).sum(1)
        return out_TD.add_(y_TD)

    @staticmethod
    def _busy_experts(x_1D, weights_1K, topk_idx_1K, experts, out_1D):
        """out += the routed experts of one token on a CPU: its K experts' own weights, read in place (the
        routing read on the host, free there). Gathering them first (`_few_experts`) copies their matrices,
        which on a CPU costs more than the products."""
        gate_up, down, F_ = experts.gate_up_proj, experts.down_proj, experts.inter_dim
        w_1K = weights_1K.to(x_1D.dtype)
        for k, e in enumerate(topk_idx_1K[0].tolist()):
            h = F.linear(x_1D, gate_up[e])
            h = F.silu(h[:, :F_]).mul_(h[:, F_:]).mul_(w_1K[:, k : k + 1])
            out_1D.addmm_(h, down[e].t())
        return out_1D

    def _feed_forward(self, x, f: _FeedForward, mlp):
        if not f.moe:  # dense SwiGLU
            h, _ = self._normed_matmul(x, f.w_in, f.eps)
            return torch.addmm(x, F.silu(h[:, : f.inter]) * h[:, f.inter:], f.w_down_t)
        T, G = x.shape[0], f.n_gate_rows
        dense = f.dense and T <= DENSE_EXPERTS_TOKENS
        w_in = f.w_in if dense or not f.dense else f.w_front
        if f.gate_w is None:
            h, denom = self._normed_matmul(x, w_in, f.eps)
            logits = h[:, :G]
        else:
            logits, denom = self._normed_matmul(x.float(), f.gate_w, f.eps.float())
            h = self._normed_matmul(x, w_in, f.eps)[0] if w_in is not None else None
            denom = denom.to(x.dtype)
        weights_TK, topk_idx_TK = mlp.gate.route(logits.sigmoid())
        if dense:  # one SwiGLU over the shared and every routed expert, each routed one weighted by its gate
            E, F_ = mlp.experts.n_experts, mlp.experts.inter_dim
            n = f.inter + E * F_
            act = F.silu(h[:, G : G + n]).mul_(h[:, G + n :])
            w_TE = torch.zeros(T, E, dtype=x.dtype, device=x.device).scatter_(1, topk_idx_TK, weights_TK.to(x.dtype))
            act[:, f.inter :].view(T, E, F_).mul_(w_TE[:, :, None])
            return torch.addmm(x, act, f.w_down_t)
        shared = h[:, G : G + 2 * f.inter] if f.inter else None
        routed_in = x * f.norm / denom
        if T == 1 and x.device.type == "cpu":
            x = self._busy_experts(routed_in, weights_TK, topk_idx_TK, mlp.experts, x)
        elif topk_idx_TK.numel() <= mlp.experts.n_experts and x.device.type != "cpu":
            x = self._few_experts(routed_in, weights_TK, topk_idx_TK, mlp.experts, x)
        else:
            x, _ = mlp.experts(routed_in, weights_TK, topk_idx_TK, out_TD=x)  # x += routed experts, in place
        if shared is not None:
            x = torch.addmm(x, F.silu(shared[:, : f.inter]) * shared[:, f.inter:], f.w_down_t[: f.inter])
        return x
