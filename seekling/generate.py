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

from seekling.decode import DecodeEngine
from seekling.errors import SeeklingError
from seekling.model import LatentCache, Transformer

MAX_TOP_K = 2**31 - 1  # beyond any vocabulary; larger values would overflow the sampler's int64 tensors
MAX_SEED = 2**63 - 1


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


def sample_tokens(logits_BV: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  generators: list[torch.Generator | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row, each row with its own temperature / top-p / top-k / random stream.

    Returns (tokens [B], logprobs [B]); the log-probability is that of the temperature-scaled
    distribution before truncation (what GRPO's importance ratio needs). Rows with temperature 0
    take the argmax and report log-probabilities of the unscaled logits.
    """
    logits_BV = logits_BV.float()
    B, V = logits_BV.shape
    greedy_B = temperature <= 0
    scaled_BV = logits_BV / torch.where(greedy_B, torch.ones_like(temperature), temperature)[:, None]
    logprobs_BV = torch.log_softmax(scaled_BV, dim=-1)
    if bool(greedy_B.all()):
        tokens_B = scaled_BV.argmax(-1)
        return tokens_B, logprobs_BV.gather(1, tokens_B[:, None]).squeeze(1)
    # Gumbel-max over the truncated distribution: argmax(logit + g) is a sample of softmax(logit).
    masked_BV = scaled_BV
    if bool((top_p < 1).any()) or bool((top_k > 0).any()):
        sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
        rank_V = torch.arange(V, device=logits_BV.device)
        drop_BV = (top_k[:, None] > 0) & (rank_V[None] >= top_k[:, None])
        probs_BV = sorted_BV.softmax(-1)
        drop_BV |= (probs_BV.cumsum(-1) - probs_BV) >= top_p[:, None]  # keep the smallest set reaching top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        masked_BV = torch.full_like(scaled_BV, float("-inf")).scatter(1, order_BV, sorted_BV)
    uniform_BV = torch.empty_like(masked_BV)
    for b in range(B):
        g = generators[b] if generators is not None else None
        uniform_BV[b].uniform_(1e-10, 1.0, generator=g)
    gumbel_BV = -torch.log(-torch.log(uniform_BV))
    tokens_B = torch.where(greedy_B, scaled_BV.argmax(-1), (masked_BV + gumbel_BV).argmax(-1))
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

    def __init__(self, model: Transformer, slots: int, max_len: int | None = None, cache_len: int | None = None):
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.max_len = max_len or model.config.max_position_embeddings  # the context: prompt + completion
        self.cache = LatentCache(model.config, slots, cache_len or self.max_len, device=param.device,
                                 dtype=param.dtype)
        self.step_fn = DecodeEngine(model)

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
        logits_UV = self.model.forward_cached(padded_UT, self.cache, rows=slots_U, num_new=lengths_U)
        if len(unique) < len(seqs):
            dest = torch.tensor([s.slot for s in seqs], device=self.device)
            src = torch.tensor([u.slot for u in source], device=self.device)
            filled = padded_UT.shape[1]
            for kv in self.cache.kv:
                kv[dest, :filled] = kv[src, :filled]
            self.cache.lengths[dest] = self.cache.lengths[src]
            index = {id(u): i for i, u in enumerate(unique)}
            logits_UV = logits_UV[torch.tensor([index[id(u)] for u in source], device=self.device)]
        live = [i for i, s in enumerate(seqs) if not s.done]
        if live:
            self._sample([seqs[i] for i in live], logits_UV if len(live) == len(seqs) else logits_UV[live])

    def step(self, seqs: Seq[Sequence]) -> None:
        """One new token for each sequence (its last one goes into the cache), sampled and appended."""
        tokens_B = torch.tensor([s.token_ids[-1] for s in seqs], device=self.device)
        self._sample(seqs, self.step_fn.step(tokens_B, self.cache, rows=self._rows(seqs)))

    def _sample(self, seqs: Seq[Sequence], logits_BV: torch.Tensor) -> None:
        params = [s.params for s in seqs]
        tokens, logprobs = sample_tokens(
            logits_BV, torch.tensor([p.temperature for p in params], device=self.device),
            torch.tensor([p.top_p for p in params], device=self.device),
            torch.tensor([p.top_k for p in params], device=self.device), [s.generator for s in seqs])
        for s, token, logprob in zip(seqs, tokens.tolist(), logprobs.tolist()):
            s.append(token, logprob)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             progress=None) -> list[Completion]:
    """Sample a completion for every prompt. `params` is one for all rows or one per row.

    A single seed seeds row b with seed + b, so a batch is reproducible and row b's sample does not
    depend on the other rows. `progress(n)` is called after each step with the rows it sampled.
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
    decoder = Decoder(model, B, cache_len=max(longest, 1))
    seqs = []
    for b, (prompt, p) in enumerate(zip(prompts, per_row)):
        seed = None if p.seed is None else p.seed + (b if not isinstance(params, list) else 0)
        seqs.append(decoder.sequence(prompt, p, seed))
        seqs[-1].slot = b
    decoder.prefill(seqs)
    live = [s for s in seqs if s.token_ids]
    while live:
        if progress is not None:
            progress(len(live))
        live = [s for s in live if not s.done]
        if live:
            decoder.step(live)
    return [s.out for s in seqs]
