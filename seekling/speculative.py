"""MTP speculative decoding inside the decoding core: the first MTP module drafts one token, the model
verifies it in the same folded step that produces the token after it, and the standard rule (accept
the draft d with probability min(1, p(d) / q(d)), else sample normalise(max(0, p - q))) keeps every
token distributed exactly as plain sampling's; greedy rows take exactly the argmax.

`Speculator` is owned by a `seekling.generate.Decoder` built with `speculate=True`: it keeps the MTP
module's own latent cache, each slot's draft and the distribution q it was drawn from, and each
slot's random numbers. A step is one verify forward of [last token, draft] per row, one batched
sampling pass (one uniform for the accept test, one for whichever of the residual or the next token
is needed, one for the next draft: inverse-CDF draws, no per-row Gumbel noise over the vocabulary)
and one MTP forward. A row's uniforms come from its own generator in blocks (`NOISE_BLOCK` steps at
a time), so what a row samples depends on its seed alone, never on the rows beside it.

    python -c "import torch; from seekling.model import Transformer; from seekling.config import ModelConfig; \
               from seekling.generate import generate, SamplingParams; \
               m = Transformer(ModelConfig.from_name('tiny')).eval(); s = {}; \
               generate(m, [[1, 2, 3]], SamplingParams(max_new_tokens=9, seed=0), speculate=True, stats=s); print(s)"
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from seekling.model import LatentCache

if TYPE_CHECKING:
    from seekling.generate import Decoder, Sequence

NOISE_BLOCK = 32  # steps of uniforms drawn per row at a time: one generator call per row every 32 steps


def inverse_cdf(probs_BV: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """One token per row from the (unnormalised) distribution probs [B, V], given a uniform in [0, 1) each.

    The first token whose cumulative mass exceeds u * total, in float64; never a token of zero mass
    (capped at the last token holding any)."""
    cdf_BV = probs_BV.double().cumsum(-1)
    total_B1 = cdf_BV[:, -1:].contiguous()
    pick_B1 = torch.searchsorted(cdf_BV, uniform_B[:, None].double() * total_B1, right=True)
    return torch.minimum(pick_B1, torch.searchsorted(cdf_BV, total_B1))[:, 0]


class Speculator:
    """The speculative half of a `Decoder`: the MTP cache, per-slot drafts, q and uniforms, and the step."""

    def __init__(self, decoder: Decoder, cache_len: int):
        self.decoder = decoder
        config, device = decoder.model.config, decoder.device
        slots, L = decoder.cache.batch_size, config.num_hidden_layers
        # the first MTP module keeps its own cache of its block's latents
        self.cache = LatentCache(config, slots, cache_len, device=device, dtype=decoder.cache.kv[0].dtype,
                                 layers=range(L, L + 1))
        self.draft_S = torch.zeros(slots, dtype=torch.long, device=device)
        self.q_SV = torch.zeros(slots, config.vocab_size, device=device)  # what each draft was drawn from
        self.noise_SN3 = torch.zeros(slots, NOISE_BLOCK, 3, device=device)
        self.noise_used = [NOISE_BLOCK] * slots  # per slot: how many of its block's steps are spent

    # ------------------------------------------------------------------------------- per slot state
    def _slots(self, seqs: Seq[Sequence]) -> torch.Tensor:
        return torch.tensor([s.slot for s in seqs], device=self.decoder.device)

    def _uniforms(self, seqs: Seq[Sequence], slots_B: torch.Tensor) -> torch.Tensor:
        """[B, 3] uniforms, each row's next three from its own generator (torch's global one when None)."""
        index = []
        for s in seqs:
            if self.noise_used[s.slot] == NOISE_BLOCK:
                self.noise_SN3[s.slot].uniform_(generator=s.generator)
                self.noise_used[s.slot] = 0
            index.append(self.noise_used[s.slot])
            self.noise_used[s.slot] += 1
        return self.noise_SN3[slots_B, torch.tensor(index, device=slots_B.device)]

    def _draft(self, seqs: Seq[Sequence], slots_B: torch.Tensor, logits_BV: torch.Tensor,
               uniform_B: torch.Tensor) -> None:
        """Draw each row's draft from the MTP logits under its own settings; keep it and its q."""
        temperature, top_p, top_k = self.decoder._settings(seqs)
        greedy_B = temperature <= 0
        if bool(greedy_B.all()):  # no q needed: a greedy row's q is one-hot at its draft
            self.draft_S[slots_B] = logits_BV.argmax(-1)
            return
        q_BV, _ = self.decoder._distribution(seqs, logits_BV, (temperature, top_p, top_k))
        self.draft_S[slots_B] = inverse_cdf(q_BV, uniform_B)
        self.q_SV[slots_B] = q_BV

    # ------------------------------------------------------------------------------- prefill, step
    def prefill(self, seqs: Seq[Sequence], tokens_BT: torch.Tensor, n_B: torch.Tensor, h_BTD: torch.Tensor) -> None:
        """The MTP module over each prompt (tokens_BT: each prompt from its second token on, then the token
        just sampled, right-padded, n_B real; h_BTD: the main model's states there), which drafts the next."""
        slots_B = self._slots(seqs)
        for s in seqs:
            self.noise_used[s.slot] = NOISE_BLOCK  # a new sequence in this slot: its own stream from here
        self.cache.reset(slots_B)
        logits_BV, _ = self.decoder.model.mtp_forward_cached(1, tokens_BT, h_BTD, self.cache, rows=slots_B,
                                                             num_new=n_B)
        self._draft(seqs, slots_B, logits_BV, self._uniforms(seqs, slots_B)[:, 2])

    def step(self, seqs: Seq[Sequence]) -> None:
        """Verify each row's draft d with one forward of [last token, d]; append d and the token after it
        (accepted) or the residual's sample (rejected); draft the next token. The log-probs reported
        are the model's own (temperature-scaled, before truncation, as plain sampling reports)."""
        d = self.decoder
        B, rows = len(seqs), d._rows(seqs)
        slots_B = self._slots(seqs)
        draft_B = self.draft_S[slots_B]
        last_B = torch.tensor([s.token_ids[-1] for s in seqs], device=d.device)
        start_B = d.cache.lengths[slots_B]
        logits_B2V, h_B2D = d.step_fn.step(torch.stack([last_B, draft_B], 1), d.cache, rows=rows, hidden=True)
        settings = d._settings(seqs)
        uniform_B3 = None
        if bool((settings[0] <= 0).all()):  # all greedy: accept iff the draft is the argmax
            logp_B2V = torch.log_softmax(logits_B2V.float(), -1)
            best_B2 = logp_B2V.argmax(-1)
            accept_B, sampled_B = best_B2[:, 0] == draft_B, best_B2[:, 1]
            first_B = best_B2[:, 0]
        else:
            uniform_B3 = self._uniforms(seqs, slots_B)
            both = tuple(x.repeat_interleave(2) for x in settings)
            p_B2V, logp_B2V = d._distribution(seqs, logits_B2V.reshape(2 * B, -1), both)
            p_B2V, logp_B2V = p_B2V.view(B, 2, -1), logp_B2V.view(B, 2, -1)
            p0_BV, p1_BV = p_B2V.unbind(1)
            q_BV = self.q_SV[slots_B]
            greedy_B = settings[0] <= 0
            if bool(greedy_B.any()):
                q_BV = torch.where(greedy_B[:, None], F.one_hot(draft_B, q_BV.shape[1]).to(q_BV.dtype), q_BV)
            p_d, q_d = p0_BV.gather(1, draft_B[:, None])[:, 0], q_BV.gather(1, draft_B[:, None])[:, 0]
            accept_B = uniform_B3[:, 0] * q_d < p_d
            residual_BV = (p0_BV - q_BV).clamp_min_(0)
            residual_BV = torch.where(residual_BV.sum(-1, keepdim=True) > 0, residual_BV, p0_BV)
            # one draw per row: the token after an accepted draft, or the residual's sample
            sampled_B = inverse_cdf(torch.where(accept_B[:, None], p1_BV, residual_BV), uniform_B3[:, 1])
            first_B = torch.where(accept_B, draft_B, sampled_B)
        logp_first = logp_B2V[:, 0].gather(1, first_B[:, None])[:, 0]
        logp_second = logp_B2V[:, 1].gather(1, sampled_B[:, None])[:, 0]
        firsts, seconds, accepts = torch.stack([first_B, sampled_B, accept_B.long()]).tolist()
        logp_firsts, logp_seconds = torch.stack([logp_first, logp_second]).tolist()
        for b, s in enumerate(seqs):
            s.append(firsts[b], logp_firsts[b])
            if accepts[b] and not s.done:
                s.append(seconds[b], logp_seconds[b])
        n_B = 1 + accept_B.long()
        d.cache.lengths[slots_B] = start_B + n_B  # a rejected draft's latents are overwritten next step
        d.counters["drafted"] += B
        d.counters["accepted"] += sum(accepts)
        live = [b for b, s in enumerate(seqs) if not s.done]
        if not live:
            return
        tokens_B2 = torch.stack([first_B, torch.where(accept_B, sampled_B, first_B)], 1)
        if uniform_B3 is None:
            uniform_B3 = torch.zeros(B, 3, device=d.device)  # all greedy: the draft draws nothing
        if len(live) < B:
            idx = torch.tensor(live, device=d.device)
            tokens_B2, h_B2D, n_B, uniform_B3, slots_B = (t[idx] for t in (tokens_B2, h_B2D, n_B, uniform_B3, slots_B))
        live_seqs = [seqs[b] for b in live]
        logits_BV = d.step_fn.mtp_step(tokens_B2, h_B2D, self.cache, n_B, rows=d._rows(live_seqs))
        self._draft(live_seqs, slots_B, logits_BV, uniform_B3[:, 2])
