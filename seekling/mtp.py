"""Training the MTP modules on sampled text without touching the policy: what GRPO adds to its step.

The MTP modules draft the tokens of speculative decoding (`seekling.speculative`), so they must keep
up with the policy as RL changes it (the RL framework slime trains them online for this reason).
`mtp_backward` runs the modules' cross-entropy on the completions of a rollout batch with the main
model's states, embedding and head held fixed (`Transformer.mtp_loss`), so only the MTP modules get
gradients; the caller clips them apart from the policy's, leaving the policy update as it was.

    python -c "import torch; from seekling.model import Transformer; from seekling.config import ModelConfig; \
               from seekling.mtp import mtp_backward; m = Transformer(ModelConfig.from_name('tiny')); \
               print(mtp_backward(m, [[1, 2, 3]], [[4, 5, 6]], 0.1, 8, 0))"
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from seekling.model import IGNORE_INDEX


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows prompt + completion as right-padded inputs [B, T] (minus the last token) and targets [B, T]
    with IGNORE_INDEX everywhere but the completion's tokens."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs) - 1
    inputs_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets_BT = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        inputs_BT[b, : len(s) - 1] = torch.tensor(s[:-1])
        targets_BT[b, len(p) - 1: len(s) - 1] = torch.tensor(s[len(p):])  # target t is token t + 1
    return inputs_BT, targets_BT


def mtp_backward(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], weight: float,
                 micro_batch_size: int, pad_id: int) -> float:
    """Backward of `weight` x the MTP modules' cross-entropy on the completion tokens, in micro-batches of
    rows (each weighted by its share of the predicted tokens); returns the loss (without `weight`)."""
    pieces = []
    for start in range(0, len(completions), micro_batch_size):
        inputs_BT, targets_BT = completion_batch(prompts[start: start + micro_batch_size],
                                                 completions[start: start + micro_batch_size], pad_id)
        pieces.append((inputs_BT, targets_BT, int((targets_BT[:, 1:] != IGNORE_INDEX).sum())))
    total = sum(n for _, _, n in pieces)
    loss_sum = 0.0
    for inputs_BT, targets_BT, n in pieces:
        if n == 0:  # completions of one token: nothing for depth 1 to predict
            continue
        loss = model.mtp_loss(inputs_BT, targets_BT) * (n / total)
        (weight * loss).backward()
        loss_sum += loss.item()
    return loss_sum
