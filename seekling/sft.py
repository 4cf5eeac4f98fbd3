"""Supervised fine-tuning on chat conversations, and the cold-start data of DeepSeek-R1.

SFT trains on `{"messages": [...]}` JSONL with the loss on the assistant's tokens only (the loss
mask of `Tokenizer.render_chat`), conversations packed into rows of `seq_len` (`SFTLoader`). It uses
the machinery and run lifecycle of pre-training (`seekling.training`): AdamW param groups, warm-up +
cosine lr, gradient clipping, atomic checkpoints with optimizer, RNG and data position, exact resume,
a metrics.jsonl and a progress bar. The MoE keeps its auxiliary-loss-free balancing during SFT.

Cold start (R1's stage 1) is SFT on worked solutions in the R1 format
`<think> reasoning </think> <answer> answer </answer>`; `make_cold_start` writes them from the
reasoning tasks.

    seekling sft --make-cold-start --tasks arithmetic,countdown --num-examples 2000 --out runs/cold.jsonl
    seekling sft --data runs/cold.jsonl --init-from runs/pretrain/final --out runs/sft --steps 300
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from seekling.config import setting
from seekling.data import SFTLoader
from seekling.errors import ConfigError
from seekling.model import Transformer, cross_entropy
from seekling.tasks import make_mixture, to_sft_example
from seekling.tokenizer import Tokenizer
from seekling.training import (WANDB_HELP, build_optimizer, check_schedule, clip_gradients, loss_sums, lr_at,
                               resume_point, set_lr, set_seed, start_run, update_expert_bias)


@dataclass
class SFTConfig:
    """SFT's settings; each field's help is the `seekling sft` flag's help."""

    seq_len: int = setting(256, "tokens per row")
    batch_size: int = setting(16, "rows per optimiser step")
    pack: bool = setting(True, "pack several conversations per row (they attend to each other, as in nanochat); "
                               "the flag puts one conversation per row")
    steps: int = setting(300, "optimiser steps")
    lr: float = setting(3e-4, "peak learning rate")
    schedule: str = setting("cosine", "lr schedule")
    warmup_steps: int = setting(20, "linear warm-up steps")
    min_lr_ratio: float = setting(0.1, "final lr as a fraction of the peak lr")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices")
    grad_clip: float = setting(1.0, "global gradient-norm clip (0: none)")
    mtp_weight: float = setting(0.1, "weight of the multi-token-prediction loss (0 skips the MTP modules)")
    bias_update_speed: float = setting(0.001, "gamma of the auxiliary-loss-free expert balancing (0 freezes routing)")
    seed: int = setting(0, "seed for data order and initialisation")
    save_every: int = setting(100, "checkpoint every N steps (0: only at the end)")
    log_every: int = setting(10, "metrics line every N steps")
    val_batches: int = setting(4, "batches of the validation set measured at each save")
    wandb: str | None = setting(None, WANDB_HELP)

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_schedule(self.schedule, self.lr, self.warmup_steps, self.steps, self.min_lr_ratio, 0.3)


def make_cold_start(tasks: Sequence[str], num_examples: int, out: str | Path, seed: int = 0,
                    difficulty: dict[str, dict[str, Any]] | None = None, split: str = "train") -> int:
    """Write `num_examples` problems of each task (its `split`) as R1-format chat JSONL; returns the count."""
    if not tasks:
        raise ConfigError("cold-start data needs at least one task, e.g. --tasks arithmetic,countdown")
    problems = make_mixture(list(tasks), split, num_examples, seed, difficulty)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for problem in problems:
            f.write(json.dumps({**to_sft_example(problem), "id": problem.id}) + "\n")
    return len(problems)


def sft_loss(model: Transformer, inputs_BT: torch.Tensor, targets_BT: torch.Tensor,
             mtp_weight: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy on the assistant tokens (targets -100 elsewhere) + lambda * MTP loss."""
    out = model(inputs_BT, targets_BT if mtp_weight > 0 else None)
    if mtp_weight <= 0:
        out.loss = cross_entropy(out.logits, targets_BT)
    loss = out.loss + (mtp_weight * out.mtp_loss if out.mtp_loss is not None else 0.0)
    return loss, {"loss": out.loss.item(), "mtp_loss": out.mtp_loss.item() if out.mtp_loss is not None else None,
                  "expert_load": out.expert_load}


def validation_loss(model: Transformer, loader: SFTLoader, batches: int) -> float:
    """Mean assistant-token loss over the first `batches` batches of epoch 0 of `loader`."""
    total = loss_sums(model, loader, batches, next(model.parameters()).device)
    return float(total[0] / total[1].clamp(min=1))


def train_sft(model: Transformer, tokenizer: Tokenizer, conversations: str | Path | Sequence, cfg: SFTConfig,
              run_dir: str | Path, tokenizer_dir: str | Path | None = None, resume: bool = False,
              val_conversations: str | Path | Sequence | None = None, max_seconds: float | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune `model` in place; checkpoints in `run_dir/checkpoints`, final model in `run_dir/final`.

    With `resume`, continue from the latest checkpoint of `run_dir` (model, optimizer, RNG, data
    position, step): the result equals an uninterrupted run. Without it, a `run_dir` that already
    holds a run is refused rather than overwritten. Returns a summary dict.
    """
    cfg.validate()
    checkpoint = resume_point(run_dir, resume)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                          f"vocab_size={model.config.vocab_size}")
    set_seed(cfg.seed)
    loader = SFTLoader(conversations, tokenizer, cfg.batch_size, cfg.seq_len, seed=cfg.seed, pack=cfg.pack)
    val_loader = (SFTLoader(val_conversations, tokenizer, cfg.batch_size, cfg.seq_len, seed=cfg.seed, pack=cfg.pack)
                  if val_conversations is not None else None)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    run = start_run(run_dir, checkpoint, model, optimizer, steps=cfg.steps, save_every=cfg.save_every,
                    config={"kind": "sft", **asdict(cfg)}, extra_state=lambda: {"loader": loader.state_dict()},
                    desc="sft", tokenizer_dir=tokenizer_dir, max_seconds=max_seconds, wandb=cfg.wandb, log=log)
    step = run.step
    if checkpoint:
        loader.load_state_dict(run.resumed["loader"])
    model.train()
    started, tokens, last_loss = time.perf_counter(), 0, math.nan  # this process's throughput
    with run:
        while step < cfg.steps:
            lr = lr_at(step, cfg.schedule, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
            set_lr(optimizer, lr)
            inputs, targets = next(loader)
            loss, stats = sft_loss(model, inputs, targets, cfg.mtp_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if cfg.bias_update_speed > 0 and stats["expert_load"] is not None:
                update_expert_bias(model, stats["expert_load"], cfg.bias_update_speed)
            step += 1
            tokens += int((targets != -100).sum())
            last_loss = stats["loss"]
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{last_loss:.3f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"loss": last_loss, "lr": lr, "grad_norm": grad_norm, "epoch": loader.epoch,
                          "assistant_tokens_per_s": tokens / max(time.perf_counter() - started, 1e-9)}
                if stats["mtp_loss"] is not None:
                    record["mtp_loss"] = stats["mtp_loss"]
                run.metrics.log(step, **record)
            if run.save_due(step):
                if val_loader is not None:
                    run.metrics.log(step, val_loss=validation_loss(model, val_loader, cfg.val_batches))
                run.save(step)
            if run.out_of_time(step):
                break
        _, final = run.finish(step)
        summary = {"step": step, "loss": last_loss, "seconds": run.seconds(), "dropped_conversations": loader.dropped}
        if val_loader is not None:
            summary["val_loss"] = validation_loss(model, val_loader, cfg.val_batches)
            run.metrics.log(step, val_loss=summary["val_loss"])
        summary["final"] = final
        return summary
