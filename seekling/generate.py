"""The decoding core: every token seekling samples goes through `Decoder` (one latent cache, one step).

`generate`, the server's continuous-batching engine (`seekling.serving.Engine`), GRPO rollouts,
rejection sampling and evaluation all sample here. A `Sequence` is one row being generated: its
prompt, its `SamplingParams`, its own random stream, its budget and what it has produced so far.
A `Decoder` owns the model's folded decode step (`seekling.decode.DecodeEngine`) and a
`LatentCache` of `slots` rows; sequences occupy slots. `Decoder.prefill` runs prompts into their
slots (identical prompts once), `Decoder.step` runs one new token per sequence; both then sample
each row with its own temperature / top-p / top-k / generator, append the token and its
log-probability, and mark the rows a stop token or the budget ended. `generate` is the whole-batch
loop over it; the server's engine is a scheduler that lets sequences join and leave between steps.

    python -c "import torch; from seekling.model import Transformer; from seekling.config import ModelConfig; \
               from seekling.generate import generate, SamplingParams; \
               m = Transformer(ModelConfig.from_name('tiny')).eval(); \
               print(generate(m, [[1, 2, 3], [4]], SamplingParams(max_new_tokens=5, seed=0))[0])"
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from seekling.decode import DecodeEngine
from seekling.errors import SeeklingError
from seekling.model import LatentCache, Transformer

MAX_TOP_K = 2**31 - 1  # beyond any vocabulary; larger values would overflow the sampler's int64 tensors
MAX_SEED = 2**63 - 1
# What `seekling generate`, `chat` and the server sample with unless told otherwise: DeepSeek's
# suggestion for R1 (temperature 0.6, top-p 0.95).
CHAT_TEMPERATURE = 0.6
CHAT_TOP_P = 0.95


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        """Every field checked, so that sampling a batch can never fail because of one row's settings."""
        def integer(name: str, lo: int, hi: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise SeeklingError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SeeklingError(f"{name} must be a finite number, got {value!r}")
            return value

        integer("max_new_tokens", 0, MAX_TOP_K)
        if number("temperature") < 0:
            raise SeeklingError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < number("top_p") <= 1:
            raise SeeklingError(f"top_p must be in (0, 1], got {self.top_p}")
        integer("top_k", 0, MAX_TOP_K)
        if self.seed is not None:
            integer("seed", 0, MAX_SEED)


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)  # includes the stop token when one ended it
    logprobs: list[float] = field(default_factory=list)  # log p(token) under logits / temperature
    finish_reason: str = "length"  # "stop" or "length"


def pad_right(seqs: Seq[Seq[int]], pad_id: int = 0, device: torch.device | str | None = None,
              width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one right-padded tensor [B, T] (T = the longest, or `width`) and their lengths [B]."""
    lengths = [len(s) for s in seqs]
    out = torch.full((len(seqs), max(lengths) if width is None else width), pad_id, dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
    return out, torch.tensor(lengths, device=device)


def truncate(logits_BV: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits / temperature, the same with the tokens top-p / top-k drop at -inf, greedy rows [B])."""
    logits_BV = logits_BV.float()
    V = logits_BV.shape[1]
    greedy_B = temperature <= 0
    scaled_BV = logits_BV / torch.where(greedy_B, torch.ones_like(temperature), temperature)[:, None]
    masked_BV = scaled_BV
    if bool((top_p < 1).any()) or bool((top_k > 0).any()):
        sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
        rank_V = torch.arange(V, device=logits_BV.device)
        drop_BV = (top_k[:, None] > 0) & (rank_V[None] >= top_k[:, None])
        probs_BV = sorted_BV.softmax(-1)
        drop_BV |= (probs_BV.cumsum(-1) - probs_BV) >= top_p[:, None]  # keep the smallest set reaching top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        masked_BV = torch.full_like(scaled_BV, float("-inf")).scatter(1, order_BV, sorted_BV)
    return scaled_BV, masked_BV, greedy_B


def gumbel_argmax(logits_BV: torch.Tensor, generators: Seq[torch.Generator | None] | None) -> torch.Tensor:
    """A sample of softmax(logits) per row (argmax(logit + Gumbel noise)), row b from generators[b]."""
    uniform_BV = torch.empty_like(logits_BV)
    for b in range(logits_BV.shape[0]):
        uniform_BV[b].uniform_(1e-10, 1.0, generator=generators[b] if generators is not None else None)
    return (logits_BV - torch.log(-torch.log(uniform_BV))).argmax(-1)


def sample_tokens(logits_BV: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  generators: list[torch.Generator | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row, each row with its own temperature / top-p / top-k / random stream.

    Returns (tokens [B], logprobs [B]); the log-probability is that of the temperature-scaled
    distribution before truncation (what GRPO's importance ratio needs). Rows with temperature 0
    take the argmax and report log-probabilities of the unscaled logits.
    """
    scaled_BV, masked_BV, greedy_B = truncate(logits_BV, temperature, top_p, top_k)
    logprobs_BV = torch.log_softmax(scaled_BV, dim=-1)
    if bool(greedy_B.all()):
        tokens_B = scaled_BV.argmax(-1)
    else:
        tokens_B = torch.where(greedy_B, scaled_BV.argmax(-1), gumbel_argmax(masked_BV, generators))
    return tokens_B, logprobs_BV.gather(1, tokens_B[:, None]).squeeze(1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def check_prompt(config, prompt_ids: Seq[int], where: str, max_len: int) -> None:
    """A prompt that cannot be generated from (in a context of `max_len`) raises SeeklingError naming `where`."""
    if len(prompt_ids) == 0:
        raise SeeklingError(f"{where} is empty")
    if len(prompt_ids) >= max_len:
        raise SeeklingError(f"{where} has {len(prompt_ids)} tokens; the context holds {max_len}, "
                            "leaving no room to generate")
    if min(prompt_ids) < 0 or max(prompt_ids) >= config.vocab_size:
        raise SeeklingError(f"{where} has a token id outside the vocabulary [0, {config.vocab_size})")


class Sequence:
    """One row being generated: prompt, settings, random stream (None: torch's global one), output so far."""

    def __init__(self, prompt_ids: Seq[int], params: SamplingParams, seed: int | None = None, max_len: int = 0,
                 device: torch.device | str = "cpu"):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.generator = make_generator(seed, device)
        self.stop_ids = set(params.stop_token_ids)
        self.budget = max(0, min(params.max_new_tokens, max_len - len(self.prompt_ids)))  # new tokens allowed
        self.out = Completion()
        self.slot = -1
        self.done = self.budget == 0
        self.draft: int | None = None  # speculative decoding: the MTP module's guess at the next token,
        self.draft_probs: torch.Tensor | None = None  # and the distribution [V] it was drawn from

    @property
    def token_ids(self) -> list[int]:
        return self.out.token_ids

    def append(self, token: int, logprob: float) -> None:
        self.out.token_ids.append(token)
        self.out.logprobs.append(logprob)
        if token in self.stop_ids:
            self.out.finish_reason, self.done = "stop", True
        elif len(self.out.token_ids) >= self.budget:
            self.done = True


class Decoder:
    """The model's decode step over a latent cache of `slots` rows (sequence `s` lives in row `s.slot`).

    The folded step copies the weights when the decoder is built: build one after the last weight
    update (`generate` builds one per call, a server once).
    """

    def __init__(self, model: Transformer, slots: int, max_len: int | None = None, cache_len: int | None = None,
                 speculate: bool = False):
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.max_len = max_len or model.config.max_position_embeddings  # the context: prompt + completion
        cache_len = cache_len or self.max_len
        self.cache = LatentCache(model.config, slots, cache_len, device=param.device, dtype=param.dtype)
        self.step_fn = DecodeEngine(model)
        if speculate and not len(model.mtp):
            raise SeeklingError("speculative decoding drafts with the MTP modules, and this model has none "
                                "(num_nextn_predict_layers = 0)")
        self.speculate = speculate
        self.counters = {"drafted": 0, "accepted": 0}
        if speculate:  # the first MTP module keeps its own cache of its block's latents
            L = model.config.num_hidden_layers
            self.mtp_cache = LatentCache(model.config, slots, cache_len, device=param.device, dtype=param.dtype,
                                         layers=range(L, L + 1))

    @property
    def acceptance_rate(self) -> float | None:
        """Share of MTP drafts the model accepted (speculative decoding), None before any."""
        return self.counters["accepted"] / self.counters["drafted"] if self.counters["drafted"] else None

    def check_prompt(self, prompt_ids: Seq[int], where: str) -> None:
        check_prompt(self.model.config, prompt_ids, where, self.max_len)

    def sequence(self, prompt_ids: Seq[int], params: SamplingParams, seed: int | None = None) -> Sequence:
        return Sequence(prompt_ids, params, seed, self.max_len, self.device)

    def _rows(self, seqs: Seq[Sequence]) -> torch.Tensor | None:
        """The cache rows of `seqs`; None when they are the whole cache in order (no gather needed)."""
        slots = [s.slot for s in seqs]
        if slots == list(range(self.cache.batch_size)):
            return None
        return torch.tensor(slots, device=self.device)

    def prefill(self, seqs: Seq[Sequence]) -> None:
        """Run each sequence's prompt into its (emptied) slot, then sample its first token.

        Identical prompts (the G completions of a GRPO group, the k samples of an evaluation) run
        once: the other slots get copies of the first one's cache rows.
        """
        first: dict[tuple[int, ...], Sequence] = {}
        source = [first.setdefault(tuple(s.prompt_ids), s) for s in seqs]
        unique = list(first.values())
        slots_U = torch.tensor([s.slot for s in unique], device=self.device)
        self.cache.reset(slots_U)
        padded_UT, lengths_U = pad_right([s.prompt_ids for s in unique], device=self.device)
        if self.speculate:
            logits_UV, h_UTD = self.model.forward_cached(padded_UT, self.cache, rows=slots_U, num_new=lengths_U,
                                                         hidden=True)
        else:
            logits_UV = self.model.forward_cached(padded_UT, self.cache, rows=slots_U, num_new=lengths_U)
        index = {id(u): i for i, u in enumerate(unique)}
        if len(unique) < len(seqs):
            dest = torch.tensor([s.slot for s in seqs], device=self.device)
            src = torch.tensor([u.slot for u in source], device=self.device)
            filled = padded_UT.shape[1]
            for kv in self.cache.kv:
                kv[dest, :filled] = kv[src, :filled]
            self.cache.lengths[dest] = self.cache.lengths[src]
            logits_UV = logits_UV[torch.tensor([index[id(u)] for u in source], device=self.device)]
        live = [i for i, s in enumerate(seqs) if not s.done]
        if live:
            self._sample([seqs[i] for i in live], logits_UV if len(live) == len(seqs) else logits_UV[live])
        if self.speculate:
            drafting = [(s, index[id(u)]) for s, u in zip(seqs, source) if not s.done]
            if drafting:
                self._prefill_drafts(drafting, h_UTD)

    def _prefill_drafts(self, drafting: list[tuple[Sequence, int]], h_UTD: torch.Tensor) -> None:
        """The MTP module over each prompt (position t reads the state at t and token t+1, the last one
        the token just sampled), which drafts the token after that."""
        seqs = [s for s, _ in drafting]
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        self.mtp_cache.reset(slots)
        tokens_BT, n_B = pad_right([s.prompt_ids[1:] + s.token_ids[:1] for s in seqs], device=self.device)
        h_BTD = h_UTD[torch.tensor([u for _, u in drafting], device=self.device), : tokens_BT.shape[1]]
        logits_BV, _ = self.model.mtp_forward_cached(1, tokens_BT, h_BTD, self.mtp_cache, rows=slots, num_new=n_B)
        self._draft(seqs, logits_BV)

    def step(self, seqs: Seq[Sequence]) -> None:
        """New tokens for each sequence (its last one goes into the cache), sampled and appended: one,
        or with speculative decoding one or two (the draft, if accepted, and the token after it)."""
        if self.speculate:
            return self._speculative_step(seqs)
        tokens_B = torch.tensor([s.token_ids[-1] for s in seqs], device=self.device)
        self._sample(seqs, self.step_fn.step(tokens_B, self.cache, rows=self._rows(seqs)))

    def _settings(self, seqs: Seq[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        params = [s.params for s in seqs]
        return (torch.tensor([p.temperature for p in params], device=self.device),
                torch.tensor([p.top_p for p in params], device=self.device),
                torch.tensor([p.top_k for p in params], device=self.device))

    def _sample(self, seqs: Seq[Sequence], logits_BV: torch.Tensor) -> None:
        tokens, logprobs = sample_tokens(logits_BV, *self._settings(seqs), [s.generator for s in seqs])
        for s, token, logprob in zip(seqs, tokens.tolist(), logprobs.tolist()):
            s.append(token, logprob)

    def _distribution(self, seqs: Seq[Sequence], logits_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the distribution each row samples from [B, V] (one-hot for greedy rows), the log-probs it reports)."""
        scaled_BV, masked_BV, greedy_B = truncate(logits_BV, *self._settings(seqs))
        probs_BV = masked_BV.softmax(-1)
        if bool(greedy_B.any()):
            one_hot = F.one_hot(scaled_BV.argmax(-1), probs_BV.shape[1]).to(probs_BV.dtype)
            probs_BV = torch.where(greedy_B[:, None], one_hot, probs_BV)
        return probs_BV, torch.log_softmax(scaled_BV, dim=-1)

    def _draw(self, seqs: Seq[Sequence], probs_BV: torch.Tensor) -> torch.Tensor:
        return gumbel_argmax(probs_BV.log(), [s.generator for s in seqs])

    def _draft(self, seqs: Seq[Sequence], logits_BV: torch.Tensor) -> None:
        q_BV, _ = self._distribution(seqs, logits_BV)
        for s, d, q_V in zip(seqs, self._draw(seqs, q_BV).tolist(), q_BV):
            s.draft, s.draft_probs = d, q_V

    def _speculative_step(self, seqs: Seq[Sequence]) -> None:
        """Verify each row's draft d with one forward of [last token, d]: accept d with probability
        min(1, p(d) / q(d)), else resample from normalise(max(0, p - q)); after an accepted draft the
        token after it comes from the same forward. Every token is distributed exactly as without
        speculation (the standard speculative-sampling rule), greedy rows take exactly the argmax,
        and the log-probs reported are the model's own."""
        B, rows = len(seqs), self._rows(seqs)
        draft_B = torch.tensor([s.draft for s in seqs], device=self.device)
        tokens_B2 = torch.stack([torch.tensor([s.token_ids[-1] for s in seqs], device=self.device), draft_B], 1)
        start_B = self.cache.lengths[torch.arange(B, device=self.device) if rows is None else rows].clone()
        logits_B2V, h_B2D = self.step_fn.step(tokens_B2, self.cache, rows=rows, hidden=True)
        p_BV, logp_BV = self._distribution(seqs, logits_B2V[:, 0])
        q_BV = torch.stack([s.draft_probs for s in seqs])
        p_d, q_d = p_BV.gather(1, draft_B[:, None])[:, 0], q_BV.gather(1, draft_B[:, None])[:, 0]
        uniform_B = torch.stack([torch.rand((), generator=s.generator, device=self.device) for s in seqs])
        accept_B = uniform_B * q_d < p_d
        residual_BV = (p_BV - q_BV).clamp_min(0)
        residual_BV = torch.where(residual_BV.sum(-1, keepdim=True) > 0, residual_BV, p_BV)
        resampled_B = self._draw(seqs, residual_BV)
        next_B, next_logp_B = sample_tokens(logits_B2V[:, 1], *self._settings(seqs), [s.generator for s in seqs])
        self.counters["drafted"] += B
        self.counters["accepted"] += int(accept_B.sum())
        new_tokens, n_new = [], []
        for b, s in enumerate(seqs):
            if bool(accept_B[b]):
                s.append(int(draft_B[b]), float(logp_BV[b, draft_B[b]]))
                if not s.done:
                    s.append(int(next_B[b]), float(next_logp_B[b]))
                new_tokens.append([int(draft_B[b]), s.token_ids[-1]])
                n_new.append(2)
            else:
                r = int(resampled_B[b])
                s.append(r, float(logp_BV[b, r]))
                new_tokens.append([r, r])
                n_new.append(1)
        n_B = torch.tensor(n_new, device=self.device)
        row_idx = torch.arange(B, device=self.device) if rows is None else rows
        self.cache.lengths[row_idx] = start_B + n_B  # a rejected draft's latents are overwritten next step
        live = [b for b, s in enumerate(seqs) if not s.done]
        if live:
            idx = torch.tensor(live, device=self.device)
            live_rows = self._rows([seqs[b] for b in live])
            logits_BV = self.step_fn.mtp_step(torch.tensor(new_tokens, device=self.device)[idx], h_B2D[idx],
                                              self.mtp_cache, n_B[idx], rows=live_rows)
            self._draft([seqs[b] for b in live], logits_BV)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             progress=None, speculate: bool = False, stats: dict | None = None) -> list[Completion]:
    """Sample a completion for every prompt. `params` is one for all rows or one per row.

    A single seed seeds row b with seed + b, so a batch is reproducible and row b's sample does not
    depend on the other rows. `progress(n)` is called after each step with the tokens it sampled.
    `speculate`: draft with the MTP module and verify (same distribution, greedy output identical);
    `stats`, when given, receives the decoder's counters (steps, drafted, accepted).
    """
    B = len(prompts)
    if B == 0:
        return []
    per_row = params if isinstance(params, list) else [params] * B
    if len(per_row) != B:
        raise SeeklingError(f"got {len(per_row)} sampling params for {B} prompts")
    for p in per_row:
        p.validate()
    max_pos = model.config.max_position_embeddings
    for b, prompt in enumerate(prompts):
        check_prompt(model.config, prompt, f"prompt {b}", max_pos)
    longest = max(len(prompt) + min(p.max_new_tokens, max_pos - len(prompt)) for prompt, p in zip(prompts, per_row))
    decoder = Decoder(model, B, cache_len=max(longest, 1), speculate=speculate)
    seqs = []
    for b, (prompt, p) in enumerate(zip(prompts, per_row)):
        seed = None if p.seed is None else p.seed + (b if not isinstance(params, list) else 0)
        seqs.append(decoder.sequence(prompt, p, seed))
        seqs[-1].slot = b
    decoder.prefill(seqs)
    live, produced = [s for s in seqs if s.token_ids], 0
    while live:
        if progress is not None:
            total = sum(len(s.token_ids) for s in seqs)
            progress(total - produced)
            produced = total
        live = [s for s in live if not s.done]
        if live:
            decoder.step(live)
    if stats is not None:
        stats.update(decoder.counters)
    return [s.out for s in seqs]
