"""Fast sampling: batched prompts of any lengths against the latent cache, in absorbed form.

The engine knows only token ids. Prompts are right-padded and prefilled together; each row then
decodes at its own position, finished rows leave the batch, and every sampled token comes with its
log-probability. Per-row seeds make a row's sample independent of what else is in the batch.

    python -c "import torch; from seekling.model import Transformer; from seekling.config import ModelConfig; \
               from seekling.generate import generate, SamplingParams; \
               m = Transformer(ModelConfig.from_name('tiny')).eval(); \
               print(generate(m, [[1, 2, 3], [4]], SamplingParams(max_new_tokens=5, seed=0))[0])"
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seekling.decode import DecodeEngine
from seekling.errors import SeeklingError
from seekling.model import LatentCache, Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise SeeklingError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SeeklingError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SeeklingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SeeklingError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)  # includes the stop token when one ended it
    logprobs: list[float] = field(default_factory=list)  # log p(token) under logits / temperature
    finish_reason: str = "length"  # "stop" or "length"


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


_COMPILED: dict[int, object] = {}


def compiled_decode_step(model: Transformer):
    """`model.forward_cached` compiled for one new token per row over a fixed-size cache.

    Shapes never change (the whole batch decodes every step, attention spans the whole buffer), so
    it compiles once per batch size and cache length; worth it for long or repeated sampling.
    """
    key = id(model)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(model.forward_cached, dynamic=False)
    return _COMPILED[key]


def prefill(model: Transformer, prompts: list[list[int]], cache: LatentCache) -> torch.Tensor:
    """Run the prompts into empty cache rows 0..B-1; returns each row's next-token logits [B, V].

    Identical prompts (the G completions of a GRPO group, the k samples of an evaluation) run once:
    their cache rows are copies of the first one's.
    """
    device = cache.lengths.device
    first: dict[tuple[int, ...], int] = {}
    source = [first.setdefault(tuple(p), b) for b, p in enumerate(prompts)]
    unique = sorted(set(source))
    padded = torch.zeros(len(unique), max(len(prompts[b]) for b in unique), dtype=torch.long, device=device)
    for i, b in enumerate(unique):
        padded[i, : len(prompts[b])] = torch.tensor(prompts[b], device=device)
    rows_U = torch.tensor(unique, device=device)
    lengths_U = torch.tensor([len(prompts[b]) for b in unique], device=device)
    logits_UV = model.forward_cached(padded, cache, rows=rows_U, num_new=lengths_U)
    if len(unique) == len(prompts):
        return logits_UV
    source_B = torch.tensor(source, device=device)
    filled = padded.shape[1]
    for kv in cache.kv:
        kv[:, :filled] = kv[source_B, :filled]
    cache.lengths[:] = cache.lengths[source_B]
    slot = {b: i for i, b in enumerate(unique)}
    return logits_UV[torch.tensor([slot[b] for b in source], device=device)]


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             progress=None, compile: bool = False) -> list[Completion]:
    """Sample a completion for every prompt. `params` is one for all rows or one per row.

    A single seed seeds row b with seed + b, so a batch is reproducible and row b's sample does not
    depend on the other rows. With `compile`, decode steps run through torch.compile (fixed shapes:
    finished rows keep a slot but are not sampled); results are the same.
    """
    B = len(prompts)
    if B == 0:
        return []
    per_row = params if isinstance(params, list) else [params] * B
    if len(per_row) != B:
        raise SeeklingError(f"got {len(per_row)} sampling params for {B} prompts")
    for p in per_row:
        p.validate()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    max_pos = model.config.max_position_embeddings
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise SeeklingError(f"prompt {i} is empty")
        if len(prompt) >= max_pos:
            raise SeeklingError(
                f"prompt {i} has {len(prompt)} tokens; the model's maximum position is {max_pos} "
                "(max_position_embeddings), so nothing can be generated"
            )
        if max(prompt) >= model.config.vocab_size or min(prompt) < 0:
            raise SeeklingError(f"prompt {i} has a token id outside the vocabulary [0, {model.config.vocab_size})")
    lengths = [len(p) for p in prompts]
    budget = [min(p.max_new_tokens, max_pos - n) for p, n in zip(per_row, lengths)]
    max_len = max(n + m for n, m in zip(lengths, budget))
    cache = LatentCache(model.config, B, max(max_len, 1), device=device, dtype=dtype)
    cache.static = compile
    engine = None if compile else DecodeEngine(model)

    temperature = torch.tensor([p.temperature for p in per_row], device=device)
    top_p = torch.tensor([p.top_p for p in per_row], device=device)
    top_k = torch.tensor([p.top_k for p in per_row], device=device)
    generators = [make_generator(None if p.seed is None else p.seed + (b if not isinstance(params, list) else 0), device)
                  for b, p in enumerate(per_row)]
    stops = [set(p.stop_token_ids) for p in per_row]
    out = [Completion() for _ in range(B)]

    logits = prefill(model, prompts, cache)

    active = [b for b in range(B) if budget[b] > 0]
    rows = torch.arange(B, device=device)
    while active:
        idx = torch.tensor(active, device=device)
        tokens, logprobs = sample_tokens(logits, temperature[idx], top_p[idx], top_k[idx],
                                         [generators[b] for b in active])
        still = []
        for j, (b, tok, lp) in enumerate(zip(active, tokens.tolist(), logprobs.tolist())):
            out[b].token_ids.append(tok)
            out[b].logprobs.append(lp)
            if tok in stops[b]:
                out[b].finish_reason = "stop"
            elif len(out[b].token_ids) < budget[b]:
                still.append(j)
        if progress is not None:
            progress(len(active))
        if not still:
            break
        keep = torch.tensor(still, device=device)
        active = [active[j] for j in still]
        if compile:  # every row steps; finished rows rewrite their last slot and are not sampled
            frozen = cache.lengths.clone()
            step_tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
            step_tokens[idx, 0] = tokens
            logits = compiled_decode_step(model)(step_tokens, cache)
            done = torch.ones(B, dtype=torch.bool, device=device)
            done[torch.tensor(active, device=device)] = False
            cache.lengths[done] = frozen[done]
            logits = logits[torch.tensor(active, device=device)]
            continue
        next_rows = rows[idx[keep]]
        full = len(active) == B
        logits = engine.step(tokens if full else tokens[keep], cache, rows=None if full else next_rows)
    return out
