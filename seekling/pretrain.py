"""Pre-training: next-token + multi-token prediction with auxiliary-loss-free MoE balancing.

One optimiser step, top to bottom:
    for each of grad_accum micro-batches (each torchrun rank reads its own slice of the global batch):
        loss = CE + mtp_lambda * L_MTP + balance_alpha * L_bal;  (loss / grad_accum).backward()
    clip the gradient norm; AdamW step at lr_at(step); sum the expert load over micro-batches and
    ranks; update_expert_bias(model, load, gamma); log one JSON line to metrics.jsonl.
Every `eval_every` steps the val loss, every `save_every` steps a lossless checkpoint
(`seekling.train_state`), and at the end `RUN_DIR/final/`, an HF-format model directory with the tokenizer.

    seekling pretrain --data runs/data --tokenizer runs/tok --out runs/pt --preset tiny --steps 50 \
        --batch-size 4 --seq-len 64 --eval-every 25 --save-every 25
    torchrun --nproc_per_node=2 -m seekling.cli pretrain --data runs/data --out runs/pt ...   # DDP
    seekling pretrain ... --resume     # continue from the newest checkpoint in --out

Library use (the speedrun pipeline): `pretrain(PretrainArgs(data=..., out=..., ...)) -> summary dict`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seekling.checkpoint import from_hf_state_dict, read_safetensors
from seekling.config import ModelConfig, count_parameters, setting
from seekling.cost import format_seconds
from seekling.data import LOSS_ON, TokenLoader, check_tokenizer, load_index
from seekling.errors import ConfigError, DataError, SeeklingError
from seekling.files import write_json_atomic
from seekling.flops import flops_per_token
from seekling.model import Transformer
from seekling.parallel import (DistInfo, all_reduce_sum, destroy_distributed, grad_sync, init_distributed, reshard,
                               unwrap_model, wrap_model)
from seekling.precision import DTYPES, choose_dtype
from seekling.tokenizer import Tokenizer
from seekling.train_state import first_tokenizer_dir, load_training_checkpoint
from seekling.training import (WANDB_HELP, autocast_for, build_optimizer, check_schedule, clip_gradients,
                               expert_imbalance, loss_sums, lr_at, peak_flops, resume_point, set_lr, set_seed,
                               start_run, update_expert_bias)

DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class PretrainArgs:
    """Everything a pre-training run needs; each field's help is the `seekling pretrain` flag's help."""

    data: str = setting(help="token-shard directory from `seekling data build`")
    out: str = setting(help="run directory: metrics.jsonl, checkpoints/, final/")
    tokenizer: str | None = setting(None, "tokenizer directory the data was built with (default: DATA/tokenizer, "
                                          "or the checkpoint's / --init-from's tokenizer)")
    preset: str = setting("cpu-large", "model size (a model preset of seekling.config)")
    config: str | None = setting(None, "a config.json instead of --preset")
    vocab_size: int | None = setting(None, "override the preset's vocab_size; it must equal the tokenizer's "
                                           "vocabulary (default: the preset's)")
    init_from: str | None = setting(None, "start from the weights (and config) of an HF-format model directory "
                                          "(with --resume: only when --out has no checkpoint yet)")
    resume: bool = setting(False, "continue from the newest checkpoint in --out")
    # batch: global batch = batch_size * grad_accum * world_size sequences of seq_len tokens
    steps: int = setting(1000, "optimizer steps in the whole run")
    batch_size: int = setting(8, "sequences per micro-batch per rank")
    seq_len: int = setting(256, "tokens per sequence")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    # optimiser and schedule
    lr: float = setting(1e-3, "peak learning rate (DeepSeek-V3: 2.2e-4 at 671B; small models take ~10x more)")
    min_lr_ratio: float = setting(0.1, "final lr / peak lr (DeepSeek-V3: 2.2e-5 / 2.2e-4 = 0.1)")
    warmup: int = setting(100, "linear warm-up steps (DeepSeek-V3: 2000 of ~3.5M steps; short runs want ~5%)")
    schedule: str = setting("wsd", "cosine decay after warm-up, or warm-up-stable-decay (DeepSeek-V3's shape)")
    decay_fraction: float = setting(0.3, "wsd: share of the steps spent decaying (DeepSeek-V3: 4.3T of 14.8T tokens)")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices (DeepSeek-V3: 0.1); none on norms and "
                                       "embeddings")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas (DeepSeek-V3: 0.9,0.95)")
    grad_clip: float = setting(1.0, "max gradient norm, 0 = off (DeepSeek-V3: 1.0)")
    loss_on: str = setting("all", "tokens the loss is taken on: all, or responses (chat documents: not the "
                                  "user and system turns, e.g. a problem's random numbers, which no model can predict)")
    # DeepSeek-V3 losses and balancing
    mtp_lambda: float = setting(0.3, "weight of the multi-token-prediction loss (DeepSeek-V3: 0.3, then 0.1 late)")
    balance_alpha: float = setting(1e-4, "weight of the sequence-wise balance loss (DeepSeek-V3: 1e-4)")
    bias_gamma: float = setting(1e-3, "expert-bias update speed of aux-loss-free balancing (DeepSeek-V3: 1e-3; "
                                      "0 = off)")
    # evaluation, checkpoints, logging
    eval_every: int = setting(100, "val loss every N steps (0 = never)")
    eval_batches: int = setting(8, "val batches per evaluation")
    save_every: int = setting(200, "checkpoint every N steps (0 = only at the end)")
    keep_last: int = setting(2, "checkpoints to keep (0 = all)")
    log_every: int = setting(10, "print a line every N steps")
    wandb: str | None = setting(None, WANDB_HELP)
    seed: int = setting(0, "seed for the weights and the data order")
    quiet: bool = setting(False, "print nothing but errors")
    # hardware
    device: str | None = setting(None, "cpu or cuda (default: cuda when available)")
    dtype: str | None = setting("auto", "auto: bf16 autocast (fp32 master weights) where a probe of the model's "
                                        "matmuls finds bf16 at least 1.5x faster, else fp32; or fp32, bf16")
    compile: bool = setting(False, "torch.compile each decoder block")
    distributed: str = setting("ddp", "under torchrun: DDP, or FSDP2 (fully_shard per block, then the root)")
    extra: dict[str, Any] = setting(help="free-form, saved with the checkpoints", factory=dict)

    def validate(self) -> None:
        """ConfigError for settings that cannot run, before anything is read or written."""
        positive = {"steps": self.steps, "batch_size": self.batch_size, "seq_len": self.seq_len,
                    "grad_accum": self.grad_accum, "eval_batches": self.eval_batches, "log_every": self.log_every}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every", "keep_last", "mtp_lambda", "balance_alpha", "bias_gamma",
                     "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"--betas must be two numbers in [0, 1), got {self.betas}")
        if self.dtype not in (None, *DTYPES):
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.distributed not in DISTRIBUTED:
            raise ConfigError(f"--distributed must be ddp or fsdp, got {self.distributed!r}")
        if self.loss_on not in LOSS_ON:
            raise ConfigError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        check_schedule(self.schedule, self.lr, self.warmup, self.steps, self.min_lr_ratio, self.decay_fraction)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def as_args(args: PretrainArgs | argparse.Namespace | dict[str, Any]) -> PretrainArgs:
    """A PretrainArgs from the dataclass itself, an argparse Namespace or a dict (unknown keys ignored)."""
    if isinstance(args, PretrainArgs):
        return args
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    known = {f.name for f in dataclasses.fields(PretrainArgs)}
    return PretrainArgs(**{k: v for k, v in values.items() if k in known and not k.startswith("_")})


# ----------------------------------------------------------------------------- setup
def resolve_tokenizer_dir(a: PretrainArgs, checkpoint: str | None) -> str:
    found = first_tokenizer_dir([a.tokenizer] if a.tokenizer else [Path(a.data) / "tokenizer", checkpoint, a.init_from])
    if found:
        return found
    if a.tokenizer:
        raise DataError(f"{a.tokenizer}: no tokenizer.json here")
    raise DataError(f"no tokenizer: pass --tokenizer DIR (the one {a.data} was built with)")


def resolve_model_config(a: PretrainArgs) -> ModelConfig:
    """--init-from's config.json, else --config, else the preset; then --vocab-size."""
    if a.init_from:
        config = ModelConfig.from_file(a.init_from)
    elif a.config:
        config = ModelConfig.from_file(a.config)
    else:
        config = ModelConfig.from_name(a.preset)
    if a.vocab_size is not None:
        config = config.replace(vocab_size=a.vocab_size)
    return config


def check_vocab(config: ModelConfig, tokenizer: Tokenizer, tokenizer_dir: str, index: dict[str, Any]) -> None:
    if tokenizer.vocab_size != config.vocab_size:
        raise ConfigError(
            f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size}; retrain the tokenizer with --vocab-size {config.vocab_size}, or pass "
            f"--vocab-size {tokenizer.vocab_size} to size the model to it")
    for name in ("bos_token_id", "eos_token_id"):
        ours = getattr(config, name)
        theirs = index.get(name.replace("_token", ""))
        if ours is not None and theirs is not None and ours != theirs:
            raise ConfigError(f"model {name}={ours} but the data's documents use {theirs}")


def val_loader_or_none(a: PretrainArgs, info: DistInfo, say) -> TokenLoader | None:
    if a.eval_every == 0:
        return None
    try:
        return TokenLoader(a.data, a.batch_size, a.seq_len, seed=a.seed, rank=info.rank,
                           world_size=info.world_size, split="val", shuffle=False, loss_on=a.loss_on)
    except DataError as e:
        say(f"note: validation is off ({e})")
        return None


def evaluate(model: torch.nn.Module, loader: TokenLoader, batches: int, device: torch.device, autocast) -> float:
    """Mean next-token loss over the first `batches` val batches (the same ones every time), all ranks."""
    total = loss_sums(model, loader, batches, device, autocast)
    reshard(model)
    all_reduce_sum(total)
    return float(total[0] / total[1])


def compile_blocks(model: Transformer) -> None:
    """torch.compile each decoder block in place (parameter names unchanged, so checkpoints are too)."""
    for block in list(model.layers) + [m.block for m in model.mtp]:
        block.compile()


# ----------------------------------------------------------------------------- the run
def pretrain(args: PretrainArgs | argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """Train; returns a summary dict (steps, tokens, tokens_per_s, mfu, losses, final_dir, ...)."""
    a = as_args(args)
    a.validate()
    info = init_distributed(a.device)
    try:
        return _pretrain(a, info)
    finally:
        destroy_distributed(info)


def _pretrain(a: PretrainArgs, info: DistInfo) -> dict[str, Any]:
    def say(message: str) -> None:
        if info.is_main and not a.quiet:
            run.bar.write(message) if run is not None else print(message, flush=True)

    run = None
    set_seed(a.seed)
    device = info.device
    if a.dtype not in (None, "auto"):
        autocast_for(device, a.dtype)  # bf16 where it is unsupported: fail now, not in the loop
    run_dir = Path(a.out)

    # 1. Every check a user's input can fail, before anything is written into --out.
    checkpoint = resume_point(run_dir, a.resume, say)
    index = load_index(a.data)
    tokenizer_dir = resolve_tokenizer_dir(a, checkpoint)
    tokenizer = Tokenizer.load(tokenizer_dir)
    check_tokenizer(index, tokenizer)
    config = resolve_model_config(a)
    check_vocab(config, tokenizer, tokenizer_dir, index)
    dtype = choose_dtype(a.dtype, device, config, a.batch_size * a.seq_len, log=say)
    votes = all_reduce_sum(torch.tensor([float(dtype == "bf16")], device=device))  # ranks must agree: bf16 if all do
    dtype = "bf16" if int(votes.item()) == info.world_size else "fp32"
    autocast = lambda: autocast_for(device, dtype)  # noqa: E731
    if a.seq_len > config.max_position_embeddings:
        raise ConfigError(f"--seq-len {a.seq_len} exceeds the model's max_position_embeddings "
                          f"{config.max_position_embeddings}")
    train_loader = TokenLoader(a.data, a.batch_size, a.seq_len, seed=a.seed, rank=info.rank,
                               world_size=info.world_size, split="train", loss_on=a.loss_on)
    val_loader = val_loader_or_none(a, info, say)

    # 2. The model: fresh (seeded), from HF weights, or the checkpoint's; then parallelism and optimiser.
    with torch.device(device):
        model = Transformer(config)
    if checkpoint:
        load_training_checkpoint(checkpoint, model, None, load_weights=True, restore_rng=False)
    elif a.init_from:  # with --resume too: the same command line restarts a run that has no checkpoint yet
        from_hf_state_dict(model, read_safetensors(a.init_from), source=a.init_from)
    if a.compile:
        compile_blocks(model)
    model = wrap_model(model, a.distributed, info)
    raw_model = unwrap_model(model)
    optimizer = build_optimizer(model, a.lr, a.weight_decay, tuple(a.betas))
    run = start_run(run_dir, checkpoint, model, optimizer, steps=a.steps, save_every=a.save_every,
                    config=a.to_json(), desc="train", tokenizer_dir=tokenizer_dir, keep_last=a.keep_last,
                    extra_state=lambda: {"data": train_loader.state_dict(), "world_size": info.world_size},
                    load_weights=False, is_main=info.is_main, progress=not a.quiet, tensorboard=True, wandb=a.wandb,
                    log=say)
    start_step = run.step
    if checkpoint:
        train_loader.load_state_dict(run.resumed["data"])
    elif a.resume:
        say(f"note: no checkpoint in {run_dir}; starting from scratch")

    tokens_per_step = a.batch_size * a.seq_len * a.grad_accum * info.world_size
    use_mtp = config.num_nextn_predict_layers > 0
    train_flops_per_token = flops_per_token(config, a.seq_len, training=True, include_mtp=use_mtp)["total"]
    peak = peak_flops(device, dtype, info.world_size)
    params = count_parameters(config)
    say(f"model: {params['total'] / 1e6:.2f}M parameters ({params['active'] / 1e6:.2f}M active), "
        f"{info.world_size} rank(s) on {device.type} {dtype}, {tokens_per_step:,} tokens/step, "
        f"{a.steps} steps, {train_loader.tokens:,} train tokens")
    n_loads = len(raw_model.moe_gates)

    # 3. The loop.
    model.train()
    record: dict[str, Any] = {}
    timed_tokens, timed_seconds, train_seconds, val_loss = 0, 0.0, 0.0, None
    recent_step_seconds = None  # moving average for the ETA (the first steps pay for compilation)
    with run:
        for step in range(start_step, a.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, a.schedule, a.lr, a.warmup, a.steps, a.min_lr_ratio, a.decay_fraction)
            set_lr(optimizer, lr)
            # [ce, mtp, balance] summed over micro-batches, then the expert load; one all-reduce for all
            sums = torch.zeros(3 + n_loads * max(config.n_routed_experts, 1), dtype=torch.float64, device=device)
            for micro in range(a.grad_accum):
                x, y = (t.to(device, non_blocking=True) for t in next(train_loader))
                with grad_sync(model, sync=micro == a.grad_accum - 1):
                    with autocast():
                        out = model(x, y)
                    loss = out.loss
                    if out.mtp_loss is not None:
                        loss = loss + a.mtp_lambda * out.mtp_loss
                    if out.balance_loss is not None:
                        loss = loss + a.balance_alpha * out.balance_loss
                    (loss / a.grad_accum).backward()
                sums[0] += out.loss.detach().double()
                sums[1] += out.mtp_loss.detach().double() if out.mtp_loss is not None else 0.0
                sums[2] += out.balance_loss.detach().double() if out.balance_loss is not None else 0.0
                if out.expert_load is not None:
                    sums[3:3 + out.expert_load.numel()] += out.expert_load.flatten().double()
            grad_norm = clip_gradients(model.parameters(), a.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            all_reduce_sum(sums)
            load = sums[3:].view(n_loads, -1) if n_loads else None
            if load is not None and a.bias_gamma > 0:
                update_expert_bias(raw_model, load, a.bias_gamma)
            losses = (sums[:3] / (a.grad_accum * info.world_size)).tolist()  # also syncs a GPU for the timing
            if not all(math.isfinite(v) for v in losses):
                raise SeeklingError(f"step {step + 1}: the loss is {losses[0]} (diverged); lower --lr or use --grad-clip")
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            if step > start_step or a.steps - start_step == 1:  # the first step pays for warm-up/compilation
                timed_tokens, timed_seconds = timed_tokens + tokens_per_step, timed_seconds + seconds
                recent_step_seconds = seconds if recent_step_seconds is None else 0.9 * recent_step_seconds + 0.1 * seconds
            done = step + 1
            record = {
                "loss": losses[0], "mtp_loss": losses[1], "balance_loss": losses[2],
                "total_loss": losses[0] + a.mtp_lambda * losses[1] + a.balance_alpha * losses[2],
                "lr": lr, "grad_norm": grad_norm, "tokens": done * tokens_per_step,
                "tokens_per_s": tokens_per_step / seconds,
                "mfu": tokens_per_step * train_flops_per_token / seconds / peak if peak else None,
                "expert_imbalance": expert_imbalance(load) if load is not None else None,
                "step_seconds": seconds, "time": time.time(),  # wall clock: loop throughput incl. logging
            }
            if val_loader is not None and a.eval_every and (done % a.eval_every == 0 or done == a.steps):
                val_loss = record["val_loss"] = evaluate(model, val_loader, a.eval_batches, device, autocast)
            run.metrics.log(done, **record)
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{losses[0]:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if done % a.log_every == 0 or done == a.steps or "val_loss" in record:
                say(format_record(done, a.steps, record, recent_step_seconds or seconds))
            if run.save_due(done):
                run.save(done)

        # 4. The final checkpoint and the HF model directory.
        checkpoint_path, _ = run.finish(a.steps)
    final_dir = run_dir / "final"
    tokens_per_s = timed_tokens / timed_seconds if timed_seconds else None
    summary = {
        "run_dir": str(run_dir), "final_dir": str(final_dir), "checkpoint": checkpoint_path,
        "resumed_from": checkpoint, "steps": a.steps, "steps_run": a.steps - start_step,
        "tokens": (a.steps - start_step) * tokens_per_step, "train_seconds": train_seconds,
        "tokens_per_s": tokens_per_s, "flops": (a.steps - start_step) * tokens_per_step * train_flops_per_token,
        "mfu": tokens_per_s * train_flops_per_token / peak if tokens_per_s and peak else None,
        "final_loss": record.get("loss"), "val_loss": val_loss, "world_size": info.world_size,
        "device": device.type, "dtype": dtype,
    }
    if info.is_main:
        write_json_atomic(run_dir / "summary.json", summary)
        say(f"done: {final_dir} (tokens/s {tokens_per_s or 0:,.0f}"
            + (f", MFU {summary['mfu']:.1%})" if summary["mfu"] else ")"))
    return summary


def format_record(step: int, total: int, r: dict[str, Any], seconds_per_step: float) -> str:
    parts = [f"step {step}/{total}", f"loss {r['loss']:.4f}", f"mtp {r['mtp_loss']:.4f}", f"lr {r['lr']:.2e}",
             f"gnorm {r['grad_norm']:.2f}", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("mfu"):
        parts.append(f"MFU {r['mfu']:.1%}")
    if r.get("expert_imbalance"):
        parts.append(f"imbalance {r['expert_imbalance']:.2f}")
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}")
    parts.append(f"eta {format_seconds(seconds_per_step * (total - step))}")
    return " | ".join(parts)
