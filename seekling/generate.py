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

import functools
import math
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from seekling.config import setting
from seekling.decode import DecodeEngine
from seekling.errors import SeeklingError
from seekling.model import LatentCache, Transformer
from seekling.speculative import Speculator

SPECULATE = {"auto": None, "on": True, "off": False}  # the --speculate flag's values
# Auto speculation: on CUDA up to this many rows a step (DeepSeek-V3 measured 1.8x tokens/s with one MTP
# draft on GPUs; not measured by this project yet); never on a CPU, where the verify step ([B, 2] tokens)
# plus the MTP step cost 1.7-2.1x a plain step at batch 1-64 on the `cpu` model (the step is bound by
# kernel launches, not bytes), more than the 1 + acceptance tokens a step they bring.
AUTO_SPECULATE_MAX_BATCH = 32
SPECULATE_HELP = ("MTP speculative decoding (exact: the same distribution, greedy output identical): on, off, or "
                  f"auto = on where measured faster (CUDA, batch <= {AUTO_SPECULATE_MAX_BATCH}; never on a CPU) "
                  "when the model has MTP modules")
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
class DecodeSettings:
    """How the decoding core runs, whatever is sampled; each field's help is its flag's help."""

    speculate: str = setting("auto", SPECULATE_HELP)


_said: set[str] = set()


def resolve_speculate(model: Transformer, speculate: bool | str | None, batch: int,
                      say: Callable[[str], None] | None = None) -> bool:
    """Whether to decode speculatively: True/False as given ("on"/"off"), None or "auto" by device and
    batch size. "auto" (and "on" from a flag: `say` given) on a model without MTP modules is off, said
    once through `say`; `speculate=True` from code on such a model is refused by the `Decoder`."""
    if isinstance(speculate, str):
        if speculate not in SPECULATE:
            raise SeeklingError(f"speculate must be one of {', '.join(SPECULATE)}, got {speculate!r}")
        speculate = SPECULATE[speculate]
    has_mtp = len(model.mtp) > 0
    if speculate is True and (has_mtp or say is None):
        return True
    if not has_mtp:
        if speculate is True and "no-mtp" not in _said:
            _said.add("no-mtp")
            say("speculative decoding off: the model has no MTP modules (num_nextn_predict_layers = 0)")
        return False
    if speculate is False:
        return False
    return next(model.parameters()).device.type == "cuda" and batch <= AUTO_SPECULATE_MAX_BATCH


def speculating_generate(model: Transformer, speculate: str, batch: int, say: Callable[[str], None] = print):
    """`generate` with a --speculate flag resolved once for `model` at `batch` rows a call (a generate_fn
    for evaluation and rejection sampling)."""
    return functools.partial(generate, speculate=resolve_speculate(model, speculate, batch, say))


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
    if bool((temperature <= 0).all()):
        return greedy_tokens(logits_BV)
    scaled_BV, masked_BV, greedy_B = truncate(logits_BV, temperature, top_p, top_k)
    logprobs_BV = torch.log_softmax(scaled_BV, dim=-1)
    tokens_B = torch.where(greedy_B, scaled_BV.argmax(-1), gumbel_argmax(masked_BV, generators))
    return tokens_B, logprobs_BV.gather(1, tokens_B[:, None]).squeeze(1)


def greedy_tokens(logits_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens` for rows that are all greedy: the argmax and its log-probability, in 4 kernels."""
    logits_BV = logits_BV.float()
    tokens_B = logits_BV.argmax(-1)
    return tokens_B, torch.log_softmax(logits_BV, dim=-1).gather(1, tokens_B[:, None]).squeeze(1)


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


def check_draft_depth(model: Transformer, depth: int) -> None:
    """Speculative decoding drafts `depth` tokens with the first `depth` MTP modules: the model must have
    them, and the decoder drafts one (depth 1)."""
    n = len(model.mtp)
    if n == 0:
        raise SeeklingError("speculative decoding drafts with the MTP modules, and this model has none "
                            "(num_nextn_predict_layers = 0)")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise SeeklingError(f"draft depth must be an integer >= 1, got {depth!r}")
    if depth > n:
        raise SeeklingError(f"draft depth {depth} exceeds the model's MTP depth {n} (num_nextn_predict_layers = {n})")
    if depth > 1:
        raise SeeklingError(f"draft depth {depth}: speculative decoding drafts one token a step (depth 1)")


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

    def __init__(self, model: Transformer, slots: int, max_len: int | None = None, cache_len: int | None = None,
                 speculate: bool = False, draft_depth: int = 1):
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.max_len = max_len or model.config.max_position_embeddings  # the context: prompt + completion
        cache_len = cache_len or self.max_len
        self.cache = LatentCache(model.config, slots, cache_len, device=param.device, dtype=param.dtype)
        self.step_fn = DecodeEngine(model)
        if speculate:
            check_draft_depth(model, draft_depth)
        self.speculate = speculate
        self.counters = {"drafted": 0, "accepted": 0}
        self.speculator = Speculator(self, cache_len) if speculate else None

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
                tokens_BT, n_B = pad_right([s.prompt_ids[1:] + s.token_ids[:1] for s, _ in drafting], device=self.device)
                h_BTD = h_UTD[torch.tensor([u for _, u in drafting], device=self.device), : tokens_BT.shape[1]]
                self.speculator.prefill([s for s, _ in drafting], tokens_BT, n_B, h_BTD)

    def step(self, seqs: Seq[Sequence]) -> None:
        """New tokens for each sequence (its last one goes into the cache), sampled and appended: one,
        or with speculative decoding one or two (the draft, if accepted, and the token after it)."""
        if self.speculate:
            return self.speculator.step(seqs)
        tokens_B = torch.tensor([s.token_ids[-1] for s in seqs], device=self.device)
        self._sample(seqs, self.step_fn.step(tokens_B, self.cache, rows=self._rows(seqs)))

    def _settings(self, seqs: Seq[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        params = [s.params for s in seqs]
        return (torch.tensor([p.temperature for p in params], device=self.device),
                torch.tensor([p.top_p for p in params], device=self.device),
                torch.tensor([p.top_k for p in params], device=self.device))

    def _sample(self, seqs: Seq[Sequence], logits_BV: torch.Tensor) -> None:
        if all(s.params.temperature <= 0 for s in seqs):  # no settings tensors to build
            tokens, logprobs = greedy_tokens(logits_BV)
        else:
            tokens, logprobs = sample_tokens(logits_BV, *self._settings(seqs), [s.generator for s in seqs])
        for s, token, logprob in zip(seqs, tokens.tolist(), logprobs.tolist()):
            s.append(token, logprob)

    def _distribution(self, seqs: Seq[Sequence], logits_BV: torch.Tensor, settings=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the distribution each row samples from [B, V] (one-hot for greedy rows), the log-probs it reports)."""
        scaled_BV, masked_BV, greedy_B = truncate(logits_BV, *(settings or self._settings(seqs)))
        probs_BV = masked_BV.softmax(-1)
        if bool(greedy_B.any()):
            one_hot = F.one_hot(scaled_BV.argmax(-1), probs_BV.shape[1]).to(probs_BV.dtype)
            probs_BV = torch.where(greedy_B[:, None], one_hot, probs_BV)
        return probs_BV, torch.log_softmax(scaled_BV, dim=-1)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             progress=None, speculate: bool | str | None = None, stats: dict | None = None) -> list[Completion]:
    """Sample a completion for every prompt. `params` is one for all rows or one per row.

    A single seed seeds row b with seed + b, so a batch is reproducible and row b's sample does not
    depend on the other rows. `progress(n)` is called after each step with the tokens it sampled.
    `speculate`: draft with the MTP module and verify (same distribution, greedy output identical);
    None or "auto": where it is faster (`resolve_speculate`). `stats`, when given, receives the
    decoder's counters (drafted, accepted) and whether it speculated.
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
    speculate = resolve_speculate(model, speculate, B)
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
        stats.update(decoder.counters, speculate=speculate)
    return [s.out for s in seqs]
