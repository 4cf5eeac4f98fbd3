"""GRPO, the reinforcement learning of DeepSeek-R1, with the DAPO and Dr. GRPO variants.

One step: take P prompts, sample G completions of each with the fast sampler (all P*G rows in one
`generate` call), score them with rule-based rewards, turn the rewards of each group into
advantages (`group_advantages`), and maximise the clipped surrogate

    1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_it ]

for `mu` optimiser steps over that rollout batch, with rho the ratio to the sampling policy and
KL_it = pi_ref/pi - log(pi_ref/pi) - 1 to a frozen reference (beta = 0 never builds it). The sum
over tokens is aggregated by one of three small functions: `seq_mean_token_mean` (R1 / GRPO),
`token_mean` (DAPO) or `seq_sum_constant` (Dr. GRPO). Groups whose rewards are all equal carry no
signal and are dropped (DAPO's dynamic sampling); with `refill_rounds` more prompts are sampled until
P informative groups are kept, as DAPO does (`fill_informative`).

Read top to bottom: the pure pieces (advantages, per-token terms, aggregations, the loss), the
rollout (prompting, sampling, rewards), `grpo_step`, then `train_grpo`, the loop with checkpoints,
resume and metrics.

    seekling grpo --init-from runs/sft --tokenizer runs/tok --tasks countdown --steps 50 --out runs/grpo
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from seekling.checkpoint import load_pretrained, save_pretrained
from seekling.config import setting
from seekling.errors import ConfigError, DataError, SeeklingError, check_choice
from seekling.generate import SPECULATE, SPECULATE_HELP, SamplingParams, generate, pad_right
from seekling.model import IGNORE_INDEX, LatentCache
from seekling.mtp import completion_batch, mtp_backward
from seekling.rewards import CombinedReward, combine_rewards, correct_reward, format_reward
from seekling.rl_health import HealthMonitor, informative_groups, rollout_metrics, sample_rows
from seekling.tasks import Problem, check_template, render_prompt_ids
from seekling.training import (WANDB_HELP, build_optimizer, clip_gradients, lr_at, resume_point, set_lr, set_seed,
                               start_run)


# ----------------------------------------------------------------------------- configuration
SEEDS_PER_STEP = 65_536  # sampling seeds reserved per step: row b of round r draws from seed + r * P * G + b


@dataclass
class GRPOConfig:
    """GRPO's settings; each field's help is the `seekling grpo` flag's help."""

    # rollouts
    prompts_per_step: int = setting(16, "questions per step (P)")
    group_size: int = setting(8, "completions per question (G, >= 2)")
    max_new_tokens: int = setting(128, "completion length limit")
    temperature: float = setting(1.0, "sampling temperature (R1-Zero samples at 1)")
    top_p: float = setting(1.0, "nucleus sampling threshold")
    speculate: str = setting("auto", SPECULATE_HELP)
    template: str = setting("chat", "prompt format: the chat template, or R1-Zero's plain-text prompt")
    rewards: dict[str, float] = setting(help="rewards and weights: registered names or your own MODULE:FUNCTION "
                                             "(found in the current directory too; see above)",
                                        factory=lambda: {"correct": 1.0, "format": 0.2})
    dynamic_sampling: bool = setting(True, "drop groups whose rewards are all equal (DAPO); the flag keeps them")
    refill_rounds: int = setting(0, "dynamic sampling: up to this many extra batches of P prompts per step to "
                                    "refill the dropped groups, as DAPO over-samples until the batch is full "
                                    "(0: train on what is left)")
    # loss
    loss_aggregation: str = setting("seq_mean_token_mean", "aggregation: R1/GRPO per-sequence mean, DAPO token "
                                                           "mean, Dr. GRPO constant normaliser")
    scale_std: bool = setting(True, "divide advantages by the group std; the flag turns it off (Dr. GRPO)")
    eps_low: float = setting(0.2, "lower clip range of the ratio")
    eps_high: float = setting(0.28, "upper clip range (DAPO clip-higher; equal to eps_low: GRPO's symmetric clip)")
    beta: float = setting(0.0, "KL coefficient to the reference (R1-Zero: 0.001; 0: no reference model)")
    mu: int = setting(1, "optimiser steps per rollout batch")
    micro_batch_size: int = setting(64, "sequences per forward/backward (gradient accumulation)")
    # optimisation
    lr: float = setting(1e-5, "learning rate (constant after warm-up)")
    warmup_steps: int = setting(0, "linear warm-up steps")
    weight_decay: float = setting(0.0, "AdamW weight decay on matrices")
    grad_clip: float = setting(1.0, "global gradient-norm clip (0: none)")
    mtp_weight: float = setting(0.1, "weight of the MTP modules' loss on the sampled completions, the policy's "
                                     "states detached so the policy gradient is unchanged (keeps speculative "
                                     "drafts accurate; 0: MTP modules left as they are)")
    mtp_samples: int = setting(1, "completions of each group the MTP loss is taken on (a group's samples share "
                                  "the prompt and mostly the answer; each costs a forward of prompt + completion)")
    # run
    steps: int = setting(100, "GRPO steps")
    seed: int = setting(0, "seed for problems and sampling")
    save_every: int = setting(10, "checkpoint every N steps (0: only at the end)")
    log_every: int = setting(10, "print a line of reward, accuracy, format rate and length every N steps")
    max_bad_steps: int = setting(3, "stop after this many non-finite losses in a row")
    wandb: str | None = setting(None, WANDB_HELP)

    def validate(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"group_size (G) must be >= 2: a group of {self.group_size} has no relative "
                              "advantage (every reward minus its own mean is 0)")
        for name in ("prompts_per_step", "max_new_tokens", "mu", "micro_batch_size", "steps", "max_bad_steps",
                     "log_every", "mtp_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.refill_rounds < 0:
            raise ConfigError(f"refill_rounds must be >= 0, got {self.refill_rounds}")
        if (self.refill_rounds + 1) * self.prompts_per_step * self.group_size > SEEDS_PER_STEP:
            raise ConfigError(f"(refill_rounds + 1) x P x G must be at most {SEEDS_PER_STEP} sampled rows per step")
        check_choice(self.loss_aggregation, LOSS_AGGREGATIONS, "loss aggregation")
        check_template(self.template)
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ConfigError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for GRPO sampling, got {self.temperature}")
        check_choice(self.speculate, SPECULATE, "speculate setting")
        if not self.rewards:
            raise ConfigError("give at least one reward, e.g. correct=1.0")


# ----------------------------------------------------------------------------- advantages
def group_advantages(rewards_PG: torch.Tensor, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) within each group (row) of G rewards.

    The std is the sample std (Bessel-corrected, as TRL and DeepSeekMath compute it); with
    `scale_std=False` only the mean is removed (Dr. GRPO, which finds the std division biases the
    update toward too-easy and too-hard questions). A group of equal rewards gets A = 0.
    """
    if rewards_PG.dim() != 2 or rewards_PG.shape[1] < 2:
        raise ConfigError(f"rewards must be [groups, G] with G >= 2, got shape {tuple(rewards_PG.shape)}")
    centred_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    return centred_PG / (rewards_PG.std(dim=1, keepdim=True) + eps) if scale_std else centred_PG


# ----------------------------------------------------------------------------- per-token terms
def kl_to_reference(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """The unbiased, always non-negative KL estimator of R1 (Schulman's k3):
    pi_ref/pi - log(pi_ref/pi) - 1, per token."""
    log_ratio_BT = ref_logp_BT - logp_BT
    return torch.exp(log_ratio_BT) - log_ratio_BT - 1


def clipped_surrogate(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO/GRPO objective min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), and a mask
    of the tokens where the clip is active (their gradient is zero)."""
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    adv_B1 = advantages_B[:, None]
    unclipped_BT = ratio_BT * adv_B1
    clipped_BT = torch.clamp(ratio_BT, 1 - eps_low, 1 + eps_high) * adv_B1
    objective_BT = torch.minimum(unclipped_BT, clipped_BT)
    is_clipped_BT = ((ratio_BT < 1 - eps_low) & (adv_B1 < 0)) | ((ratio_BT > 1 + eps_high) & (adv_B1 > 0))
    return objective_BT, is_clipped_BT


# ----------------------------------------------------------------------------- loss aggregation
@dataclass
class LossTotals:
    """Batch-wide counts an aggregation divides by, so that micro-batches add up to the full-batch loss."""

    num_seqs: int
    num_tokens: int
    max_new_tokens: int

    @classmethod
    def of(cls, mask_BT: torch.Tensor, max_new_tokens: int | None = None) -> "LossTotals":
        return cls(mask_BT.shape[0], int(mask_BT.sum()), max_new_tokens or mask_BT.shape[1])


def seq_mean_token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, totals: LossTotals) -> torch.Tensor:
    """GRPO as written in DeepSeekMath and the R1 paper: average the tokens of each completion
    (1/|o_i|), then average the completions (1/G, here over the whole batch of groups).

    A long completion's tokens weigh less than a short one's, which Dr. GRPO (Liu et al. 2025)
    shows rewards long wrong answers less harshly, so lengths of failures tend to grow.
    """
    per_seq_B = (loss_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1)
    return per_seq_B.sum() / totals.num_seqs


def token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, totals: LossTotals) -> torch.Tensor:
    """DAPO (Yu et al. 2025): one mean over every completion token of the batch, so each token
    counts the same whatever the length of the completion it is in."""
    return (loss_BT * mask_BT).sum() / max(totals.num_tokens, 1)


def seq_sum_constant(loss_BT: torch.Tensor, mask_BT: torch.Tensor, totals: LossTotals) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): the sum over each completion's tokens divided by a constant,
    the number of completions times the generation budget `max_new_tokens`, instead of |o_i|;
    this removes the length bias of the 1/|o_i| factor (their code's `masked_mean` with a constant
    normaliser; the paper pairs it with `scale_std=False`)."""
    return (loss_BT * mask_BT).sum() / (totals.num_seqs * totals.max_new_tokens)


LOSS_AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "seq_mean_token_mean": seq_mean_token_mean,
    "token_mean": token_mean,
    "seq_sum_constant": seq_sum_constant,
}


def grpo_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor,
              mask_BT: torch.Tensor, ref_logp_BT: torch.Tensor | None = None, beta: float = 0.0,
              eps_low: float = 0.2, eps_high: float = 0.2, aggregation: str = "seq_mean_token_mean",
              totals: LossTotals | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss (the negated objective) of a batch or micro-batch, and its statistics.

    `mask_BT` is 1 on completion tokens; `totals` are the counts of the whole rollout batch when
    this is one micro-batch of several (default: this batch alone).
    """
    mask_BT = mask_BT.to(logp_BT.dtype)
    totals = totals or LossTotals.of(mask_BT)
    objective_BT, is_clipped_BT = clipped_surrogate(logp_BT, old_logp_BT, advantages_B, eps_low, eps_high)
    per_token_BT = -objective_BT
    n = mask_BT.sum().clamp(min=1)
    stats = {"clip_fraction": float((is_clipped_BT.to(mask_BT.dtype) * mask_BT).sum() / n)}
    if beta > 0 and ref_logp_BT is None:
        raise ConfigError("beta > 0 needs the reference log-probabilities")
    if ref_logp_BT is not None:  # measured whatever beta: the drift from the start is a health signal
        kl_BT = kl_to_reference(logp_BT, ref_logp_BT)
        if beta > 0:
            per_token_BT = per_token_BT + beta * kl_BT
        stats["kl"] = float((kl_BT.detach() * mask_BT).sum() / n)
    loss = LOSS_AGGREGATIONS[aggregation](per_token_BT, mask_BT, totals)
    return loss, stats


# ----------------------------------------------------------------------------- rollouts
@dataclass
class Rollouts:
    """P*G sampled completions, group-major (rows g*G .. g*G + G - 1 answer problem g)."""

    problems: list[Problem]
    prompt_ids: list[list[int]]  # per row
    completion_ids: list[list[int]]
    old_logprobs: list[list[float]]  # the sampler's log-probs: the ratio's denominator
    texts: list[str]
    rewards_PG: torch.Tensor
    components: dict[str, list[float]]  # each reward's unweighted value per row
    correct: list[bool]
    formatted: list[bool]
    finished: list[bool]  # ended with the stop token rather than the length limit
    sample_seconds: float = 0.0

    @property
    def group_size(self) -> int:
        return self.rewards_PG.shape[1]

    def select_groups(self, keep_P: torch.Tensor) -> "Rollouts":
        G = self.group_size
        groups = [g for g in range(len(self.problems)) if bool(keep_P[g])]
        rows = [g * G + i for g in groups for i in range(G)]
        pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
        return Rollouts([self.problems[g] for g in groups], pick(self.prompt_ids), pick(self.completion_ids),
                        pick(self.old_logprobs), pick(self.texts), self.rewards_PG[keep_P],
                        {k: pick(v) for k, v in self.components.items()}, pick(self.correct),
                        pick(self.formatted), pick(self.finished), self.sample_seconds)

    @staticmethod
    def concat(parts: Sequence["Rollouts"]) -> "Rollouts":
        """The groups of several rollout batches (of the same G) as one batch."""
        cat = lambda name: [x for r in parts for x in getattr(r, name)]  # noqa: E731
        return Rollouts(cat("problems"), cat("prompt_ids"), cat("completion_ids"), cat("old_logprobs"), cat("texts"),
                        torch.cat([r.rewards_PG for r in parts]),
                        {k: [x for r in parts for x in r.components[k]] for k in parts[0].components},
                        cat("correct"), cat("formatted"), cat("finished"), sum(r.sample_seconds for r in parts))


def fill_informative(first: Rollouts, sample_more: Callable[[int], Rollouts], target: int,
                     rounds: int) -> tuple[Rollouts, int]:
    """DAPO's dynamic sampling: keep the groups whose rewards are not all equal; while fewer than
    `target` are kept, sample another batch (`sample_more(round)`, round = 1..`rounds`) and keep its
    informative groups too. Returns (at most `target` informative groups, extra rounds sampled)."""
    parts = [first.select_groups(informative_groups(first.rewards_PG))]
    kept = len(parts[0].problems)
    used = 0
    while kept < target and used < rounds:
        used += 1
        more = sample_more(used)
        parts.append(more.select_groups(informative_groups(more.rewards_PG)))
        kept += len(parts[-1].problems)
    batch = Rollouts.concat(parts)
    if kept > target:
        batch = batch.select_groups(torch.arange(kept) < target)
    return batch, used


def sample_rollouts(model, tokenizer, problems: Sequence[Problem], cfg: GRPOConfig, reward: CombinedReward,
                    seed: int) -> Rollouts:
    """G completions per problem in one batched `generate` call, decoded and scored.

    A completion that hits `max_new_tokens` without closing its tags is scored like any other (the
    format reward gives it 0); only the tokens sampled are trained on.
    """
    G = cfg.group_size
    prompts = [render_prompt_ids(tokenizer, p, cfg.template) for p in problems]
    rows = [ids for ids in prompts for _ in range(G)]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop_token_ids=(tokenizer.eos_id,), seed=seed)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    completions = generate(model, rows, params, speculate=cfg.speculate)
    seconds = time.perf_counter() - start
    model.train(was_training)
    texts = [tokenizer.decode(c.token_ids, skip_special=True) for c in completions]
    totals, components = [], {name: [] for name in reward.weights}
    correct, formatted = [], []
    failures_before = reward.failure_counts()
    for r, (c, text) in enumerate(zip(completions, texts)):
        problem = problems[r // G]
        meta = {**problem.meta, "task": problem.task, "length": len(c.token_ids), "max_length": cfg.max_new_tokens}
        meta.setdefault("cache_length", max(1, cfg.max_new_tokens // 4))
        result = reward(text, problem.answer, **meta)
        totals.append(result.total)
        for name, value in result.components.items():
            components[name].append(value)
        correct.append(bool(correct_reward(text, problem.answer, **meta)))
        formatted.append(format_reward(text) == 1.0)
    reward.check_not_all_failed(failures_before, len(texts))  # a broken reward stops the run here
    return Rollouts(list(problems), rows, [c.token_ids for c in completions], [c.logprobs for c in completions],
                    texts, torch.tensor(totals, dtype=torch.float32).view(len(problems), G), components,
                    correct, formatted, [c.finish_reason == "stop" for c in completions], seconds)


# ----------------------------------------------------------------------------- scoring under the policy
# The slow obvious path: each row's prompt + completion through a full forward. Kept as the reference
# that `group_logprobs` (the path training uses) is tested against.
def pad_rollouts(rows: Sequence[int], rollouts: Rollouts, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Rows `rows` as right-padded tensors: inputs [B, T] (prompt + completion minus the last token),
    targets [B, T], a completion mask [B, T] and the old log-probs [B, T] aligned with the targets."""
    inputs_BT, targets_BT = completion_batch([rollouts.prompt_ids[r] for r in rows],
                                             [rollouts.completion_ids[r] for r in rows], pad_id)
    mask_BT = (targets_BT != IGNORE_INDEX).float()
    old_BT = torch.zeros_like(mask_BT)
    old_BT[mask_BT.bool()] = torch.tensor([lp for r in rows for lp in rollouts.old_logprobs[r]])
    return inputs_BT, targets_BT.clamp_min(0), mask_BT, old_BT


def token_logprobs(model, inputs_BT: torch.Tensor, targets_BT: torch.Tensor, temperature: float,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target | prefix) under logits / temperature (what the sampler reports), [B, T]; and
    the entropy of that distribution per position when asked (no gradient)."""
    logits_BTV = model(inputs_BT).logits.float() / temperature
    logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
    logp_BT = logp_BTV.gather(-1, targets_BT[..., None]).squeeze(-1)
    entropy_BT = None
    if with_entropy:
        with torch.no_grad():
            entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    return logp_BT, entropy_BT


def group_logprobs(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], group_size: int,
                   temperature: float, pad_id: int, with_entropy: bool = False, bucket_rows: int = 16):
    """Log-probs of every completion token [B, Tc] (and the entropy there), each group's prompt run once.

    The G completions of a group share their prompt, so the prompt goes through the model once per
    group (P rows, not P*G), its latent cache is copied to the group's G rows, and the completions
    run against it with `forward_cached`, gradients flowing through both. This is the same
    computation as a full forward of prompt + completion (`token_logprobs`, the slow reference
    path, checked against this in the tests) with the prompt's share of the work divided by G.
    Rows run in buckets of `bucket_rows`, sorted by length. Returns (logp_BT, mask_BT, entropy_BT or
    None), aligned with the completion tokens.
    """
    G, P, B = group_size, len(prompts), len(completions)
    if B != P * G:
        raise ConfigError(f"{B} completions for {P} prompts is not {G} per prompt")
    device = next(model.parameters()).device
    prompt_PT, prompt_len_P = pad_right(prompts, pad_id, device)
    Tp, Tc = prompt_PT.shape[1], max(1, max(len(c) for c in completions))  # empty ones: masked
    completion_BT, completion_len_B = pad_right(completions, pad_id, device, width=Tc)
    cache = LatentCache(model.config, P, Tp + Tc, device=device)
    # explicit rows make the cache reads copies, so autograd never sees a buffer change under it
    last_PV = model.forward_cached(prompt_PT, cache, rows=torch.arange(P, device=device), num_new=prompt_len_P)
    per_row = LatentCache(model.config, 0, Tp + Tc, device=device)
    per_row.kv = [kv.repeat_interleave(G, dim=0) for kv in cache.kv]
    per_row.lengths = cache.lengths.repeat_interleave(G)
    last_BV = last_PV.repeat_interleave(G, dim=0)
    # Completions differ in length: rows sorted by length run in buckets, each padded to its own
    # longest, so little compute goes to padding. Token 0 is predicted by the prompt's last
    # position, token t by completion position t - 1.
    order = sorted(range(B), key=lambda b: len(completions[b]))
    pieces, entropies = [], []
    for start in range(0, B, bucket_rows):
        rows = torch.tensor(order[start : start + bucket_rows], device=device)
        Tb = max(1, int(completion_len_B[rows].max()))
        tokens_bT = completion_BT[rows, :Tb]
        logits_bTV = model.forward_cached(tokens_bT, per_row, rows=rows, num_new=completion_len_B[rows],
                                          all_logits=True)
        logits_bTV = torch.cat([last_BV[rows, None], logits_bTV[:, :-1]], dim=1)
        logp_bTV = torch.log_softmax(logits_bTV.float() / temperature, dim=-1)
        pieces.append(F.pad(logp_bTV.gather(-1, tokens_bT[..., None]).squeeze(-1), (0, Tc - Tb)))
        if with_entropy:
            with torch.no_grad():
                entropies.append(F.pad(-(logp_bTV.exp() * logp_bTV).sum(-1), (0, Tc - Tb)))
    inverse = torch.tensor(order, device=device).argsort()  # row b sits at position inverse[b] of the buckets
    logp_BT = torch.cat(pieces)[inverse]
    mask_BT = (torch.arange(Tc, device=device)[None] < completion_len_B[:, None]).float()
    entropy_BT = torch.cat(entropies)[inverse] if with_entropy else None
    return logp_BT, mask_BT, entropy_BT


# ----------------------------------------------------------------------------- one optimisation step
def grpo_step(model, optimizer, rollouts: Rollouts, cfg: GRPOConfig, pad_id: int,
              ref_model=None) -> dict[str, float]:
    """`mu` optimiser steps on one rollout batch; returns the loss statistics of the last one.

    Micro-batches hold whole groups (`group_logprobs` runs each prompt once); each micro-batch's
    loss is divided by batch-wide totals, so the accumulated gradient is the full-batch gradient.
    A non-finite loss or gradient skips the update and reports `nan: 1`.
    """
    G = rollouts.group_size
    advantages_B = group_advantages(rollouts.rewards_PG, cfg.scale_std).flatten()
    n_groups = len(rollouts.problems)
    per_chunk = max(1, cfg.micro_batch_size // G)
    chunks = []  # (prompts, completions, old log-probs [B, Tc], advantages [B])
    for start in range(0, n_groups, per_chunk):
        groups = range(start, min(start + per_chunk, n_groups))
        rows = [g * G + i for g in groups for i in range(G)]
        completions = [rollouts.completion_ids[r] for r in rows]
        old_BT = torch.zeros(len(rows), max(len(c) for c in completions))
        for b, r in enumerate(rows):
            old_BT[b, : len(rollouts.old_logprobs[r])] = torch.tensor(rollouts.old_logprobs[r])
        chunks.append(([rollouts.prompt_ids[g * G] for g in groups], completions, old_BT, advantages_B[rows]))
    totals = LossTotals(len(advantages_B), sum(len(c) for c in rollouts.completion_ids), cfg.max_new_tokens)
    ref_logps = []
    if ref_model is not None:
        with torch.no_grad():
            ref_logps = [group_logprobs(ref_model, prompts, completions, G, cfg.temperature, pad_id)[0]
                         for prompts, completions, _, _ in chunks]
    model.train()
    stats: dict[str, float] = {}
    entropy_mean = 0.0  # of the sampling policy: measured on the first pass only
    for iteration in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0}
        for i, (prompts, completions, old_BT, adv_B) in enumerate(chunks):
            logp_BT, mask_BT, entropy_BT = group_logprobs(model, prompts, completions, G, cfg.temperature, pad_id,
                                                          with_entropy=iteration == 0)
            loss, s = grpo_loss(logp_BT, old_BT, adv_B, mask_BT, ref_logps[i] if ref_logps else None,
                                cfg.beta, cfg.eps_low, cfg.eps_high, cfg.loss_aggregation, totals)
            loss.backward()
            share = float(mask_BT.sum()) / max(totals.num_tokens, 1)  # token-weighted means of the stats
            sums["loss"] += loss.item()
            sums["clip_fraction"] += s["clip_fraction"] * share
            sums["kl"] += s.get("kl", 0.0) * share
            if entropy_BT is not None:
                entropy_mean += float((entropy_BT * mask_BT).sum()) / max(totals.num_tokens, 1)
        sums["entropy"] = entropy_mean
        mtp_params = [p for m in model.mtp for p in m.parameters()] if cfg.mtp_weight > 0 else []
        if mtp_params:  # the MTP modules clipped apart, so they leave the policy's update as it was
            rows = [r for r in range(len(rollouts.completion_ids)) if r % G < cfg.mtp_samples]
            sums["mtp_loss"] = mtp_backward(model, [rollouts.prompt_ids[r] for r in rows],
                                            [rollouts.completion_ids[r] for r in rows], cfg.mtp_weight,
                                            cfg.micro_batch_size, pad_id)
            clip_gradients(mtp_params, cfg.grad_clip)
        mtp_ids = {id(p) for p in mtp_params}
        grad_norm = clip_gradients([p for p in model.parameters() if id(p) not in mtp_ids], cfg.grad_clip)
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            return {**sums, "grad_norm": grad_norm, "nan": 1.0}
        optimizer.step()
        stats = {**sums, "grad_norm": grad_norm, "nan": 0.0}
    return stats


# ----------------------------------------------------------------------------- the loop
class TrainingStopped(SeeklingError):
    """The run cannot go on (e.g. the loss kept coming out NaN); the last good checkpoint is kept."""


def problems_for_step(problems: Sequence[Problem], step: int, per_step: int, seed: int) -> list[Problem]:
    """The `per_step` problems of `step`: consecutive slices of a per-epoch shuffle, a pure function of
    (seed, step), so a resumed run sees exactly the prompts it would have seen."""
    n = len(problems)
    orders: dict[int, np.ndarray] = {}
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(problems[int(orders[epoch][index])])
    return out


def build_reference(model, run_dir: Path, resume: bool):
    """The frozen reference policy: the starting weights, kept in `run_dir/reference` so a resumed
    run compares against the same model whatever became of the --init-from directory."""
    path = run_dir / "reference"
    if resume and (path / "config.json").is_file():
        ref = load_pretrained(str(path))
    else:
        ref = copy.deepcopy(model)
        save_pretrained(ref, str(path))
    return ref.eval().requires_grad_(False)


def train_grpo(model, tokenizer, problems: Sequence[Problem], cfg: GRPOConfig, run_dir: str | Path,
               tokenizer_dir: str | Path | None = None, resume: bool = False, max_seconds: float | None = None,
               on_step: Callable[[int, dict[str, float]], None] | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run GRPO on `problems` for `cfg.steps` steps (or `max_seconds`); returns a summary.

    Checkpoints (model, optimizer, RNG, step) go to `run_dir/checkpoints`, one JSON line of metrics
    per step to `run_dir/metrics.jsonl`, the final model to `run_dir/final`. A step whose loss or
    gradient is not finite is skipped and logged; `cfg.max_bad_steps` of them in a row stop the run
    with `TrainingStopped`, leaving the last good checkpoint as it was. `on_step(step, record)` is
    called after each step; a true return value ends the run there (saved like a finished one).
    """
    cfg.validate()
    run_dir = Path(run_dir)
    if not problems:
        raise DataError("GRPO needs at least one problem")
    for i, p in enumerate(problems):
        if p.answer is None or str(p.answer).strip() == "":
            raise DataError(f"problem {i} ({p.id}) has no answer; GRPO needs a verifiable answer per prompt")
    reward = combine_rewards(cfg.rewards)  # unknown names raise here, listing the known ones
    set_seed(cfg.seed)
    checkpoint = resume_point(run_dir, resume)
    ref_model = build_reference(model, run_dir, checkpoint is not None)  # KL to it is logged even at beta 0
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    bad_steps, last_good = 0, checkpoint
    run = start_run(run_dir, checkpoint, model, optimizer, steps=cfg.steps, save_every=cfg.save_every,
                    config={"kind": "grpo", **asdict(cfg)}, extra_state=lambda: {"bad_steps": bad_steps},
                    desc="grpo", tokenizer_dir=tokenizer_dir, max_seconds=max_seconds, wandb=cfg.wandb, log=log)
    step = run.step
    history: list[dict[str, float]] = []
    health = HealthMonitor(log)
    with run:
        while step < cfg.steps:
            lr = lr_at(step, "constant", cfg.lr, cfg.warmup_steps, cfg.steps)
            set_lr(optimizer, lr)
            P, rows_per_round = cfg.prompts_per_step, cfg.prompts_per_step * cfg.group_size
            batch = problems_for_step(problems, step, P, cfg.seed)
            seed = (cfg.seed * 100_003 + step) * SEEDS_PER_STEP
            rollouts = sample_rollouts(model, tokenizer, batch, cfg, reward, seed=seed)
            record = rollout_metrics(rollouts, reward)  # of the step's own P prompts
            if cfg.dynamic_sampling:
                def more(r: int) -> Rollouts:  # refill round r: P prompts of another fixed order, own seeds
                    extra = problems_for_step(problems, step, P, cfg.seed + 7_919 * r)
                    return sample_rollouts(model, tokenizer, extra, cfg, reward, seed=seed + r * rows_per_round)

                kept, record["refill_rounds"] = fill_informative(rollouts, more, P, cfg.refill_rounds)
            else:
                kept = rollouts
            record["groups_kept"] = len(kept.problems)
            record["sample_tokens_per_s"] = sum(map(len, rollouts.completion_ids)) / max(rollouts.sample_seconds, 1e-9)
            if kept.problems:
                t0 = time.perf_counter()
                stats = grpo_step(model, optimizer, kept, cfg, tokenizer.pad_id, ref_model)
                seconds = time.perf_counter() - t0
                trained = sum(len(p) + len(c) for p, c in zip(kept.prompt_ids, kept.completion_ids)) * cfg.mu
                record.update(stats, train_tokens_per_s=trained / max(seconds, 1e-9))
            else:
                record.update(skipped=1)  # every group was all-right or all-wrong: nothing to learn
            # wall time, and this process's CPU time (the same on an idle machine; less on a shared one)
            record.update(lr=lr, seconds=run.seconds(), cpu_seconds=run.cpu_seconds())
            step += 1
            if record.get("nan"):
                bad_steps += 1
                log(f"step {step}: loss or gradient not finite, update skipped ({bad_steps} in a row)")
                run.metrics.log(step, **record)
                health.update({"step": step, **record})
                if bad_steps >= cfg.max_bad_steps:
                    raise TrainingStopped(
                        f"the loss was not finite for {bad_steps} steps in a row (up to step {step}); stopped. "
                        f"The last good checkpoint is {last_good or 'none (no checkpoint was saved yet)'}; "
                        "lower --lr or check the rewards")
                continue
            bad_steps = 0
            run.metrics.log(step, **record)
            if run.metrics.tracking and (run.save_due(step) or step == cfg.steps):  # completions to read in W&B
                run.metrics.log_table(step, "samples", sample_rows(rollouts, groups=2))
            history.append({"step": step, **record})
            health.update(history[-1])
            run.bar.update(1)
            run.bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}",
                                len=f"{record['response_length']:.0f}")
            if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:  # also where no bar shows
                log(f"grpo step {step}/{cfg.steps} | reward {record['reward']:.3f} | accuracy {record['accuracy']:.2f} "
                    f"| format {record['format']:.2f} | length {record['response_length']:.0f} | groups kept "
                    f"{record['groups_kept']}/{cfg.prompts_per_step} | {record['seconds']:.0f} s")
            stop = bool(on_step(step, record)) if on_step is not None else False
            if run.save_due(step) and not stop:
                last_good = run.save(step)
            if run.out_of_time(step):
                break
            if stop:
                log(f"stopped by on_step at step {step}")
                break
        last_good, final = run.finish(step)
        if health.history and not health.summary()["trained_steps"]:
            log(f"warning: GRPO trained nothing: none of the {len(health.history)} steps updated the model")
        return {"step": step, "seconds": run.seconds(), "final": final, "checkpoint": last_good,
                "history": history, "reward_failures": reward.stats.total, "health": health.summary()}
