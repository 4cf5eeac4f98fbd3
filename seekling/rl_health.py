"""Is GRPO learning? The per-step signals of a run and the warnings when one of them goes bad.

RL fails quietly: rewards that are the same for every sample of every group (nothing to learn), a
policy whose entropy collapses, completions pinned at the length cap, a format reward that climbs
while accuracy falls (the reward is being gamed), a reward function that raises or returns a
non-number (scored 0, so the run looks merely slow). `rollout_metrics` puts the signals in each
step's metrics record (with those `grpo_step` adds: entropy, clip fraction, KL to the starting
policy); `check_history` replays a run's records and says when each signal went bad for `WINDOW`
steps in a row; `HealthMonitor` does the same live, logging each warning once, and
`seekling.report` prints the same warnings from metrics.jsonl in the report card.

    python -c "from seekling.rl_health import check_history; print(check_history([{'step': 1, 'zero_variance_groups': 1.0}] * 5))"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # tensors come in; the report card imports this module without torch
    import torch

WINDOW = 5  # consecutive bad steps before a signal warns
ENTROPY_FLOOR = 0.05  # nats per token: below this the policy samples nearly one answer
ENTROPY_DROP = 0.1  # ... or below this share of its entropy over the first WINDOW steps
PINNED_TRUNCATION = 0.9  # share of completions cut at max_new_tokens
FORMAT_RISE, ACCURACY_FALL = 0.1, 0.05  # window-over-window changes that flag a gamed format reward


def informative_groups(rewards_PG: torch.Tensor) -> torch.Tensor:
    """[P] bool: groups whose rewards are not all equal, the only ones with a non-zero advantage
    (DAPO's dynamic sampling keeps only these)."""
    return (rewards_PG.max(dim=1).values - rewards_PG.min(dim=1).values) > 1e-9


def rollout_metrics(rollouts, reward) -> dict[str, float]:
    """Per-step means over every sampled completion (before dynamic sampling drops any group), with
    the share of zero-variance groups and, per reward that failed so far, its failure count."""
    lengths = [len(c) for c in rollouts.completion_ids]
    n = len(lengths)
    out = {"reward": float(rollouts.rewards_PG.mean()), "accuracy": sum(rollouts.correct) / n,
           "format": sum(rollouts.formatted) / n, "response_length": sum(lengths) / n,
           "response_length_max": max(lengths), "truncated": 1 - sum(rollouts.finished) / n,
           "zero_variance_groups": 1 - float(informative_groups(rollouts.rewards_PG).float().mean())}
    for name, values in rollouts.components.items():
        out[f"reward/{name}"] = sum(values) / n
    out["reward_failures"] = reward.stats.total
    for name in reward.weights:
        failed = reward.stats.errors[name] + reward.stats.bad_values[name]
        if failed:
            out[f"reward_failed/{name}"] = failed
    return out


@dataclass
class HealthWarning:
    step: int  # the step at which the signal had been bad for long enough
    signal: str
    message: str


def trained(record: dict[str, Any]) -> bool:
    """Whether this step updated the model (not skipped for want of informative groups, not NaN)."""
    return not record.get("skipped") and not record.get("nan")


def health_mean(records: Sequence[dict], key: str) -> float | None:
    """The mean of `key` over the records that have it as a number (None when none has)."""
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return sum(values) / len(values) if values else None


def _bad_signals(history: Sequence[dict], i: int, window: int) -> dict[str, str]:
    """The signals that are bad at record i, given the records before it: name -> what is wrong."""
    r, bad = history[i], {}
    if r.get("zero_variance_groups", 0.0) >= 1 - 1e-9:
        bad["uninformative"] = ("every group's rewards were equal (all right or all wrong): no advantage, nothing "
                                "is learning; use problems nearer the model's level, a larger group or a higher "
                                "temperature")
    entropy = r.get("entropy")
    if isinstance(entropy, (int, float)):
        start = health_mean(history[: min(i + 1, window)], "entropy") or 0.0
        if entropy < ENTROPY_FLOOR or (i >= window and entropy < ENTROPY_DROP * start):
            bad["entropy_collapse"] = (f"policy entropy {entropy:.3f} nats/token (it started at {start:.3f}): the "
                                       "policy samples nearly one completion, exploration has stopped; lower --lr or "
                                       "raise eps_low / beta")
    if r.get("truncated", 0.0) >= PINNED_TRUNCATION:
        bad["length_pinned"] = (f"{r['truncated']:.0%} of completions were cut at max_new_tokens: lengths are pinned at "
                                "the cap, the answers are never reached; raise max_new_tokens or penalise length")
    if i + 1 >= 2 * window:
        before, after = history[i + 1 - 2 * window: i + 1 - window], history[i + 1 - window: i + 1]
        fmt = (health_mean(before, "format"), health_mean(after, "format"))
        acc = (health_mean(before, "accuracy"), health_mean(after, "accuracy"))
        if None not in fmt and None not in acc and fmt[1] - fmt[0] >= FORMAT_RISE and acc[0] - acc[1] >= ACCURACY_FALL:
            bad["format_up_accuracy_down"] = (
                f"format rose {fmt[0]:.0%} -> {fmt[1]:.0%} while accuracy fell {acc[0]:.0%} -> {acc[1]:.0%} over "
                f"the last {2 * window} steps: the format reward is being gamed; weigh it less")
    previous = history[i - 1] if i else {}
    for key, count in r.items():
        if key.startswith("reward_failed/") and count > previous.get(key, 0):
            name = key.split("/", 1)[1]
            bad[f"reward_failed:{name}"] = (f"reward {name!r} raised an exception or returned a non-number for "
                                            f"{count} sample(s) so far (each scored 0); fix the function")
    return bad


# how many bad steps in a row each signal needs before it warns; the others need `window`
IMMEDIATE = ("format_up_accuracy_down", "reward_failed")


def check_history(history: Sequence[dict[str, Any]], window: int = WINDOW) -> list[HealthWarning]:
    """The warnings of a run, from its per-step metrics records in order: a signal warns once when it
    has been bad for `window` steps in a row (a trend or a failing reward at once), and again only after
    it recovered."""
    warnings, streak = [], {}
    for i, record in enumerate(history):
        bad = _bad_signals(history, i, window)
        streak = {name: streak.get(name, 0) + 1 for name in bad}  # a signal that recovered starts again
        for name, what in bad.items():
            needed = 1 if name.split(":")[0] in IMMEDIATE else window
            if streak[name] == needed:
                steps = f" for {needed} steps" if needed > 1 else ""
                warnings.append(HealthWarning(int(record.get("step", i + 1)), name.split(":")[0], what + steps))
    return warnings


def health_summary(history: Sequence[dict[str, Any]], window: int = WINDOW) -> dict[str, Any]:
    """{"steps", "trained_steps", "warnings": [{"step", "signal", "message"}, ...]} of a run's records."""
    return {"steps": len(history), "trained_steps": sum(trained(r) for r in history),
            "warnings": [asdict(w) for w in check_history(history, window)]}


class HealthMonitor:
    """`check_history` live: `update(record)` after each step logs the warnings that step raised."""

    def __init__(self, log: Callable[[str], None] = print, window: int = WINDOW):
        self.log, self.window = log, window
        self.history: list[dict[str, Any]] = []
        self.warned = 0

    def update(self, record: dict[str, Any]) -> list[HealthWarning]:
        self.history.append(record)
        new = check_history(self.history, self.window)[self.warned:]
        self.warned += len(new)
        for w in new:
            self.log(f"warning: grpo step {w.step}: {w.signal}: {w.message}")
        return new

    def summary(self) -> dict[str, Any]:
        return health_summary(self.history, self.window)


def sample_rows(rollouts, groups: int = 2) -> list[dict[str, Any]]:
    """The completions of the first `groups` groups as table rows (prompt, answer, completion, reward,
    correct): what a person reads to see what the policy writes."""
    G, rewards = rollouts.group_size, rollouts.rewards_PG.flatten().tolist()
    return [{"prompt": rollouts.problems[r // G].prompt, "answer": rollouts.problems[r // G].answer,
             "completion": rollouts.texts[r], "reward": rewards[r], "correct": rollouts.correct[r]}
            for r in range(min(len(rollouts.texts), groups * G))]
