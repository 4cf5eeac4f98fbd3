"""Training machinery shared by pre-training, SFT and GRPO: small pure functions and the run lifecycle.

- `param_groups` / `build_optimizer`: AdamW without weight decay on norms, biases, embeddings, 1-D params.
- `lr_at`: warm-up + cosine, or warm-up-stable-decay (WSD), as a pure function of the step.
- `clip_gradients`, `autocast_for`, `on_device`, `set_seed`, `peak_flops`, `loss_sums` (validation loss).
- `update_expert_bias` / `expert_imbalance`: DeepSeek-V3's auxiliary-loss-free balancing, applied
  after each optimiser step (the router's `e_score_correction_bias` moves against the expert load).
- `MetricsLogger` (metrics.jsonl, plus TensorBoard when it imports, plus Weights & Biases with a
  project: `--wandb PROJECT`, optional `wandb` package, WANDB_MODE=offline keeps the run on disk)
  and `progress_bar` (tqdm).
- `resume_point` and `start_run`: the lifecycle every trainer's run shares (refuse a run directory
  that holds a run unless resuming, restore the checkpoint, metrics, progress, periodic checkpoints,
  the time budget, the last checkpoint and `final/`); each trainer keeps its own loop.

The distributed wrap lives in `seekling.parallel`, the lossless checkpoints in `seekling.train_state`.

    python -c "from seekling.training import lr_at; print([lr_at(s, 'wsd', 1e-3, 2, 10, 0.1) for s in range(10)])"
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seekling.checkpoint import save_pretrained
from seekling.cost import PEAK_FLOPS, cpu_peak
from seekling.errors import CheckpointError, ConfigError
from seekling.files import write_text_atomic
from seekling.model import cross_entropy
from seekling.parallel import full_tensor
from seekling.train_state import (export_model, latest_checkpoint, latest_good_checkpoint,
                                  load_training_checkpoint, save_training_checkpoint, tokenizer_files)

SCHEDULES = ("cosine", "wsd", "constant")
WANDB_HELP = ("Weights & Biases project to log the metrics to (needs `pip install wandb`; WANDB_MODE=offline "
              "keeps the run on disk in OUT/wandb)")


# ----------------------------------------------------------------------------- seeds
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds CUDA


# ----------------------------------------------------------------------------- optimiser
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay on matrices (projections, experts, router, output head); none on norms,
    biases, embeddings and any other 1-D parameter (decaying them towards zero only hurts)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = type(module).__name__.endswith("Norm")
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if is_norm or isinstance(module, nn.Embedding) or name == "bias" or p.ndim < 2:
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `param_groups` (DeepSeek-V3: betas 0.9/0.95, weight decay 0.1). Build it after wrapping."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(step: int, schedule: str, base_lr: float, warmup: int, total: int, min_lr_ratio: float = 0.1,
          decay_fraction: float = 0.3) -> float:
    """Learning rate of optimiser step `step` (0-based) of `total`.

    Warm-up is linear: step s < warmup gets base_lr * (s + 1) / warmup. Then
    - "cosine": cosine from base_lr down to min_lr = base_lr * min_lr_ratio, reached at the last step;
    - "wsd" (warm-up-stable-decay): base_lr until the last `decay_fraction` of the steps, then the same
      cosine down to min_lr (DeepSeek-V3's shape: constant to 10T tokens, cosine decay over 4.3T of 14.8T);
    - "constant": base_lr after warm-up.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown lr schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    decay_start = warmup
    if schedule == "wsd":
        decay_start = max(warmup, total - round(decay_fraction * total))
        if step < decay_start:
            return base_lr
    progress = min(1.0, (step - decay_start) / max(1, total - 1 - decay_start))
    min_lr = base_lr * min_lr_ratio
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_schedule(schedule: str, base_lr: float, warmup: int, total: int, min_lr_ratio: float,
                   decay_fraction: float) -> None:
    """ConfigError for schedule settings that cannot work, naming the flag."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown lr schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if not base_lr > 0:
        raise ConfigError(f"--lr must be positive, got {base_lr}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    if not 0 <= min_lr_ratio <= 1:
        raise ConfigError(f"--min-lr-ratio must lie in [0, 1], got {min_lr_ratio}")
    if not 0 < decay_fraction <= 1:
        raise ConfigError(f"--decay-fraction must lie in (0, 1], got {decay_fraction}")
    if total < 1:
        raise ConfigError(f"--steps must be positive, got {total}")


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient 2-norm to `max_norm` (no clipping when <= 0); return the norm before."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    return float(full_tensor(norm))  # FSDP2: a DTensor


def autocast_for(device: str | torch.device, dtype: str | torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU and CUDA; a no-op context in fp32."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, dtype)  # type: ignore[arg-type]
    if name == "fp32":
        return contextlib.nullcontext()
    if name != "bf16":
        raise ConfigError(f"unknown dtype {dtype!r}; choose fp32 or bf16")
    device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --dtype fp32")
    if device_type not in ("cpu", "cuda"):
        raise ConfigError(f"bf16 autocast is not supported on {device_type}; use --dtype fp32")
    return torch.autocast(device_type, dtype=torch.bfloat16)


def on_device(device: str | torch.device) -> contextlib.AbstractContextManager:
    """SFT and GRPO build their batches with torch.full/zeros/tensor and never move them; on a GPU a
    default-device scope puts those batches next to the model (an adapter: untested without a GPU)."""
    return torch.device(device) if torch.device(device).type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def loss_sums(model: nn.Module, loader, batches: int, device: torch.device,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """[sum of the batch losses, number of batches] (float64) over the first `batches` batches of epoch 0
    of `loader` (the same ones every time), in eval mode; the caller sums them over ranks if it must."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in range(min(batches, loader.batches_in_epoch(0))):
        x, y = (t.to(device) for t in loader.batch_at(0, b))
        with autocast():
            logits = model(x).logits
        total[0] += cross_entropy(logits, y).double()
        total[1] += 1
    model.train(was_training)
    return total


def peak_flops(device: torch.device, dtype: str, world_size: int = 1) -> float | None:
    """Peak FLOP/s of all ranks together: this CPU's measured matmul peak at torch's thread count, or a
    GPU's datasheet figure (H200 counts as H100). None for a GPU seekling.cost does not know."""
    if device.type == "cpu":
        return float(cpu_peak(torch.get_num_threads())[dtype]) * world_size
    name = torch.cuda.get_device_name(device).lower()
    for key, peaks in {**PEAK_FLOPS, "h200": PEAK_FLOPS["h100"]}.items():
        if key in name:
            return peaks[dtype] * world_size
    return None


# ----------------------------------------------------------------------------- metrics and progress
class MetricsLogger:
    """One JSON object per step appended to `run_dir/metrics.jsonl`, and to TensorBoard if it imports,
    and to the Weights & Biases project `wandb` when one is given (numbers, nested ones as `a/b`;
    tables of samples with `log_table`).

    On resume pass `resume_step`: records past it (from a run killed after its last checkpoint) are
    dropped, so the file reads as one uninterrupted run, and the W&B run of `run_dir` continues.
    Only the main rank writes."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True, wandb: str | None = None, config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _record_step(line) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard is optional (ImportError, or a broken install)
                self._tb = None
        if wandb:
            self._wandb = open_wandb(wandb, Path(run_dir), config or {}, resuming=resume_step is not None)

    @property
    def tracking(self) -> bool:
        """Whether an experiment tracker (W&B) takes tables; callers skip building them otherwise."""
        return self._wandb is not None

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers(metrics), step=step)

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """Rows of equal keys (e.g. prompt, completion, reward) as a W&B table `name` at `step`."""
        if self._wandb is not None and rows:
            import wandb

            columns = list(rows[0])
            self._wandb.log({name: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                            step=step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of a metrics record, nested dicts flattened to `outer/inner` (W&B panels)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def open_wandb(project: str, run_dir: Path, config: dict[str, Any], resuming: bool):
    """A W&B run named after `run_dir`, its id kept in `run_dir/wandb_id` so that --resume continues it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb needs the wandb package: pip install wandb") from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else secrets.token_hex(4)
    try:
        run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                         config=config)
    except Exception as e:  # not logged in, no network: the library's own words, and the way out
        raise ConfigError(f"--wandb {project}: cannot start a W&B run ({type(e).__name__}: {e}); log in with "
                          "`wandb login`, or set WANDB_MODE=offline to keep the run on disk") from None
    write_text_atomic(id_file, run_id + "\n")
    return run


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
    """A tqdm bar with ETA on an interactive terminal (main rank only); a silent stand-in otherwise."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


# ----------------------------------------------------------------------------- the run lifecycle
def resume_point(run_dir: str | Path, resume: bool, log: Callable[[str], None] = print) -> str | None:
    """The checkpoint a run continues from: with `resume`, the newest intact one in `run_dir` (damaged
    newer ones are skipped, saying so; None when there is none: start afresh). Without it, a `run_dir`
    that already holds a run is refused, never overwritten."""
    if resume:
        return latest_good_checkpoint(run_dir, log)
    found = latest_checkpoint(run_dir)
    if found or (Path(run_dir) / "final").exists():
        raise CheckpointError(f"{run_dir} already holds a run ({Path(found).name if found else 'final'}); "
                              "pass --resume to continue it, or choose another --out")
    return None


@dataclass
class Run(contextlib.AbstractContextManager):
    """A training run's shared lifecycle, made by `start_run`: metrics.jsonl, the progress bar, the
    checkpoints every `save_every` steps and at the end, the time budget, and `final/`. The trainer
    keeps its own loop and calls `save_due`/`save`, `out_of_time` and `finish`. Use it in a `with`
    block, so the log and the bar are closed however the run ends."""

    dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    steps: int
    save_every: int  # 0: only at the end
    config: dict[str, Any]  # the trainer's settings, saved with each checkpoint
    extra_state: Callable[[], dict[str, Any]]  # the trainer's own state at a checkpoint (data position, ...)
    metrics: MetricsLogger
    bar: Any
    log: Callable[[str], None]
    tokenizer_dir: str | Path | None = None
    keep_last: int = 2
    max_seconds: float | None = None
    is_main: bool = True
    step: int = 0  # the first step to run: the checkpoint's, or 0
    resumed: dict[str, Any] = field(default_factory=dict)  # the checkpoint's extra_state ({} when fresh)
    started: tuple[float, float] = (0.0, 0.0)  # wall and CPU clock at step 0 (earlier runs included)

    def seconds(self) -> float:
        """Wall time of the run so far; the clocks carry on from where a resumed run stopped."""
        return time.perf_counter() - self.started[0]

    def cpu_seconds(self) -> float:
        """This process's CPU time of the run so far (the wall time on an idle machine, less on a shared one)."""
        return time.process_time() - self.started[1]

    def save_due(self, step: int) -> bool:
        """A periodic checkpoint after `step` (the last step's is `finish`'s)."""
        return bool(self.save_every) and step % self.save_every == 0 and step < self.steps

    def save(self, step: int) -> str | None:
        """A checkpoint of step `step` (call on every rank); its path on the main rank."""
        extra = {**self.extra_state(), "seconds": self.seconds(), "cpu_seconds": self.cpu_seconds()}
        return save_training_checkpoint(self.dir, step, self.model, self.optimizer, extra, self.config,
                                        self.tokenizer_dir, keep_last=self.keep_last)

    def out_of_time(self, step: int) -> bool:
        if self.max_seconds is not None and self.seconds() > self.max_seconds:
            self.log(f"time budget of {self.max_seconds:.0f}s reached at step {step}")
            return True
        return False

    def finish(self, step: int) -> tuple[str | None, str | None]:
        """The last checkpoint, then `final/`, an HF model directory with the tokenizer (call on every
        rank; the main rank writes). Returns both paths (None on the other ranks)."""
        checkpoint = self.save(step)
        exported = export_model(self.model)
        final = (save_pretrained(exported, str(self.dir / "final"), extra_files=tokenizer_files(self.tokenizer_dir))
                 if self.is_main else None)
        return checkpoint, final

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        self.metrics.close()


def start_run(run_dir: str | Path, checkpoint: str | None, model: nn.Module, optimizer: torch.optim.Optimizer,
              *, steps: int, save_every: int, config: dict[str, Any], extra_state: Callable[[], dict[str, Any]],
              desc: str, tokenizer_dir: str | Path | None = None, keep_last: int = 2,
              max_seconds: float | None = None, load_weights: bool = True, is_main: bool = True,
              progress: bool = True, tensorboard: bool = False, wandb: str | None = None,
              log: Callable[[str], None] = print) -> Run:
    """Restore `checkpoint` (from `resume_point`) into the model, the optimizer and the RNGs, then open
    the metrics log (and the W&B project `wandb`, with `config`) and the progress bar. `load_weights=False` when the weights were loaded before
    wrapping the model (FSDP2 shards them). The trainer restores its own state from `run.resumed`."""
    step, resumed = 0, {}
    if checkpoint:
        state = load_training_checkpoint(checkpoint, model, optimizer, load_weights=load_weights)
        step, resumed = state["step"], state["extra_state"]
        log(f"resumed from {checkpoint} at step {step}")
        saved_threads, threads = state["execution"].get("threads"), torch.get_num_threads()
        if saved_threads and saved_threads != threads and is_main:
            log(f"note: the checkpoint was written with {saved_threads} torch thread(s), this run uses {threads}: "
                "float rounding differs with the thread count, so the resumed run can differ in the last bits "
                f"from an uninterrupted one (pass --threads {saved_threads} to resume exactly)")
    metrics = MetricsLogger(run_dir, enabled=is_main, resume_step=step if checkpoint else None,
                            tensorboard=tensorboard, wandb=wandb, config=config)
    bar = progress_bar(steps, step, enabled=is_main and progress, desc=desc)
    started = (time.perf_counter() - resumed.get("seconds", 0.0), time.process_time() - resumed.get("cpu_seconds", 0.0))
    return Run(Path(run_dir), model, optimizer, steps, save_every, config, extra_state, metrics, bar, log,
               tokenizer_dir, keep_last, max_seconds, is_main, step, resumed, started)


# ----------------------------------------------------------------------------- auxiliary-loss-free balancing
@torch.no_grad()
def update_expert_bias(model, expert_load: torch.Tensor, gamma: float) -> None:
    """After an optimiser step: b_i -= gamma if expert i was above the mean load, += gamma if below.

    `expert_load` is [n_moe_layers, n_experts] tokens per expert over the whole (global) batch: sum it
    over micro-batches and all-reduce it across ranks before calling. Its rows follow `moe_gates`
    (main layers, then the MTP modules' when the forward ran them).
    """
    gates = model.moe_gates
    if expert_load.shape[0] > len(gates):
        raise ValueError(f"expert_load has {expert_load.shape[0]} layers, the model {len(gates)} MoE layers")
    for gate, load_E in zip(gates, expert_load.float()):
        gate.e_score_correction_bias -= gamma * torch.sign(load_E - load_E.mean()).to(gate.e_score_correction_bias)


def expert_imbalance(expert_load: torch.Tensor) -> float:
    """Max load over mean load, averaged over MoE layers (1.0 is perfectly balanced)."""
    load = expert_load.float()
    return float((load.max(-1).values / load.mean(-1).clamp_min(1e-9)).mean())
