"""Training machinery shared by pre-training, SFT and GRPO: small pure functions and lossless checkpoints.

- `param_groups` / `build_optimizer`: AdamW without weight decay on norms, biases, embeddings, 1-D params.
- `lr_at`: warm-up + cosine, or warm-up-stable-decay (WSD), as a pure function of the step.
- `clip_gradients`, `autocast_for`, `set_seed`, `capture_rng_state` / `restore_rng_state`.
- `init_distributed` (torchrun env: gloo on CPU, NCCL on GPU), `wrap_model` (DDP, or FSDP2 per block then
  the root), `grad_sync`, `all_reduce_sum` (the expert load is summed over ranks before the bias update).
- `MetricsLogger` (metrics.jsonl, plus TensorBoard when it imports) and `progress_bar` (tqdm).
- `save_training_checkpoint` / `latest_checkpoint` / `load_training_checkpoint`: a checkpoint is the model
  in HF format (config.json + model.safetensors + tokenizer files) plus `training_state.safetensors`
  (optimizer moments, RNG states) and `trainer_state.json` (step, optimizer skeleton, data position,
  trainer args). Nothing is pickled. It is written into a temporary directory and renamed into place, so
  a kill at any moment leaves the previous checkpoint intact.

    python -c "from seekling.training import lr_at; print([lr_at(s, 'wsd', 1e-3, 2, 10, 0.1) for s in range(10)])"
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from seekling.checkpoint import from_hf_state_dict, read_safetensors, save_pretrained
from seekling.config import ModelConfig
from seekling.errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = "seekling-training-v1"
STATE_JSON = "trainer_state.json"  # written last: its presence marks a complete checkpoint
STATE_TENSORS = "training_state.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SCHEDULES = ("cosine", "wsd", "constant")
_STEP_DIR = re.compile(r"step_(\d+)$")


# ----------------------------------------------------------------------------- seeds and RNG state
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds CUDA


def capture_rng_state() -> dict[str, Any]:
    """Every generator a training step could draw from: python, numpy, torch CPU and CUDA."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(words), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in state["cuda"]])


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
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


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


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (gloo on CPU, NCCL on
    GPU). Without torchrun it is one process on `device` (default: cuda when available, else cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for, but torch sees no GPU")
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistInfo(rank, world, local, dev, owns)


def destroy_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op in one process)."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if _distributed():
        dist.barrier()


def wrap_model(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """Data parallelism applied after the model is built (and weights loaded): DDP, or FSDP2
    `fully_shard` on each block and MTP module, then on the root. A no-op in one process."""
    if mode not in ("ddp", "fsdp"):
        raise ConfigError(f"unknown --distributed mode {mode!r}; choose ddp or fsdp")
    if info.world_size == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The routing bias is a buffer every rank updates identically from the all-reduced load, so
        # there is nothing to broadcast before each forward.
        import inspect

        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None, **no_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    # The MTP module's block only: its shared_head.norm runs outside the module's forward, so it stays
    # with the root (unsharded for the whole root forward).
    blocks = list(getattr(model, "layers", [])) + [m.block for m in getattr(model, "mtp", [])]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward (an evaluation);
    shard them again so the registered parameters are the ones the optimiser holds. No-op otherwise."""
    if hasattr(model, "reshard"):
        model.reshard()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module with the model's own parameter names (DDP keeps it in `.module`)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches before the last of a gradient-accumulation step."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def peak_flops(device: torch.device, dtype: str, world_size: int = 1) -> float | None:
    """Peak FLOP/s of all ranks together: this CPU's measured matmul peak at torch's thread count, or a
    GPU's datasheet figure (H200 counts as H100). None for a GPU seekling.cost does not know."""
    from seekling.cost import PEAK_FLOPS, cpu_peak

    if device.type == "cpu":
        return float(cpu_peak(torch.get_num_threads())[dtype]) * world_size
    name = torch.cuda.get_device_name(device).lower()
    for key, peaks in {**PEAK_FLOPS, "h200": PEAK_FLOPS["h100"]}.items():
        if key in name:
            return peaks[dtype] * world_size
    return None


# ----------------------------------------------------------------------------- metrics and progress
class MetricsLogger:
    """One JSON object per step appended to `run_dir/metrics.jsonl`, and to TensorBoard if it imports.

    On resume pass `resume_step`: records past it (from a run killed after its last checkpoint) are
    dropped, so the file reads as one uninterrupted run. Only the main rank writes."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _record_step(line) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard is optional (ImportError, or a broken install)
                self._tb = None

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


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


# ----------------------------------------------------------------------------- checkpoints
def _to_json_and_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by {"tensor": key}, collecting it in `tensors`.
    DTensors (FSDP2) are gathered whole first, so every rank must call this in the same order."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "full_tensor"):
            obj = obj.full_tensor()
        tensors[prefix] = obj.detach().to("cpu", copy=True).contiguous()
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {str(k): _to_json_and_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json_and_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _from_json_and_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"tensor"}:
            return tensors[obj["tensor"]]
        return {k: _from_json_and_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json_and_tensors(v, tensors) for v in obj]
    return obj


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimiser's order (its state_dict numbers them 0, 1, ...)."""
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    try:
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    except KeyError:
        raise CheckpointError("the optimizer holds a parameter the model does not have") from None


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict) -> dict[str, Any]:
    """The optimiser state keyed by parameter name (not position), tensors moved into `tensors`."""
    names = _optimizer_param_names(model, optimizer)
    sd = optimizer.state_dict()
    state = {names[i]: _to_json_and_tensors(s, f"optimizer.{names[i]}", tensors) for i, s in sd["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                          tensors: dict[str, torch.Tensor], source: str) -> None:
    names = _optimizer_param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    saved_names = [n for g in saved["param_groups"] for n in g["params"]]
    if saved_names != names:
        diff = sorted(set(saved_names) ^ set(names))
        raise CheckpointError(f"{source}: the optimizer state is for other parameters or groups"
                              + (f" ({', '.join(diff[:4])}...)" if diff else " (a different grouping)"))
    params = {n: p for n, p in unwrap_model(model).named_parameters()}
    state = {}
    for name, entry in saved["state"].items():
        values = _from_json_and_tensors(entry, tensors)
        p = params[name]
        for key, value in values.items():
            if hasattr(p, "device_mesh") and isinstance(value, torch.Tensor) and value.shape == p.shape:
                from torch.distributed.tensor import distribute_tensor

                values[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        state[index[name]] = values
    groups = []
    for g in saved["param_groups"]:
        group = {k: tuple(v) if k == "betas" else v for k, v in g.items()}
        group["params"] = [index[n] for n in g["params"]]
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, on every rank (each rank draws from its own generators)."""
    mine = capture_rng_state()
    if not _distributed():
        return [mine]
    mine["torch"], mine["cuda"] = mine["torch"].tolist(), [t.tolist() for t in mine["cuda"]]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for s in everyone:
        s["torch"] = torch.tensor(s["torch"], dtype=torch.uint8)
        s["cuda"] = [torch.tensor(t, dtype=torch.uint8) for t in s["cuda"]]
    return everyone


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor whole and on the CPU (gathers FSDP2 shards)."""
    out = {}
    for name, t in unwrap_model(model).state_dict().items():
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.detach().to("cpu")
    return out


def export_model(model: nn.Module) -> nn.Module:
    """A plain CPU Transformer with the model's weights, for `save_pretrained` (call on every rank)."""
    raw = unwrap_model(model)
    params = list(raw.parameters())
    if all(p.device.type == "cpu" and not hasattr(p, "full_tensor") for p in params):
        return raw
    state = _full_model_state(raw)
    from seekling.model import Transformer

    with torch.device("meta"):
        copy = Transformer(raw.config)
    copy = copy.to_empty(device="cpu")
    copy.load_state_dict(state, strict=False)  # non-persistent buffers (inv_freq) are not saved anyway
    return copy


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def tokenizer_files(tokenizer_dir: str | Path | None) -> dict[str, str]:
    if tokenizer_dir is None:
        return {}
    return {name: str(Path(tokenizer_dir) / name) for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()}


def save_training_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                             extra_state: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                             tokenizer_dir: str | Path | None = None, keep_last: int = 2) -> str | None:
    """Write `run_dir/checkpoints/step_XXXXXXX/` atomically; keep the newest `keep_last` (0: keep all).

    Call on every rank (FSDP2 shards and per-rank RNG states are gathered); rank 0 writes and gets the
    path, other ranks get None. `extra_state` (data-loader position, ...) and `config` (the trainer's
    args) must be JSON-serialisable. The model is saved in HF format, loadable by transformers."""
    reshard(model)
    tensors: dict[str, torch.Tensor] = {}
    optim_json = _optimizer_state(model, optimizer, tensors)
    rng_json = _to_json_and_tensors(_gather_rng_states(), "rng", tensors)
    exported = export_model(model)
    path = None
    if not _distributed() or dist.get_rank() == 0:
        root = Path(run_dir) / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob(".trash-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = root / f"step_{step:07d}"
        tmp = root / f".tmp-step_{step:07d}"
        save_pretrained(exported, str(tmp), extra_files=tokenizer_files(tokenizer_dir))
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": CHECKPOINT_FORMAT})
        _write_json(tmp / STATE_JSON, {
            "format": CHECKPOINT_FORMAT, "step": step, "time": time.time(),
            "optimizer": optim_json, "rng": rng_json,
            "extra_state": extra_state or {}, "config": config or {},
        })
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run): swap, never delete first
            old = root / f".trash-step_{step:07d}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last > 0:
            for old_dir in list_checkpoints(run_dir)[:-keep_last]:
                trash = root / f".trash-{old_dir.name}"
                os.replace(old_dir, trash)  # renamed first, so a kill mid-delete leaves no half checkpoint
                shutil.rmtree(trash, ignore_errors=True)
        path = str(final)
    barrier()
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / STATE_JSON).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> str | None:
    found = list_checkpoints(run_dir)
    return str(found[-1]) if found else None


def read_trainer_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no {STATE_JSON}, not a complete training checkpoint")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return state


def check_same_config(checkpoint_dir: str | Path, config: ModelConfig) -> None:
    """CheckpointError naming the fields where the checkpoint's model config differs from `config`."""
    try:
        saved = ModelConfig.from_file(str(checkpoint_dir)).to_dict()
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    ours = config.to_dict()
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {ours.get(k)!r}"
            for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    if diff:
        raise CheckpointError(f"cannot resume from {checkpoint_dir}: it holds another model config ("
                              + "; ".join(diff[:6]) + (f"; ... {len(diff) - 6} more" if len(diff) > 6 else "")
                              + ")")


def load_training_checkpoint(checkpoint_dir: str | Path, model: nn.Module,
                             optimizer: torch.optim.Optimizer | None = None, load_weights: bool = True,
                             restore_rng: bool = True) -> dict[str, Any]:
    """Restore what `save_training_checkpoint` wrote; returns {"step", "extra_state", "config"}.

    The model's config must equal the checkpoint's (CheckpointError naming the fields otherwise).
    Load the weights into the plain model before `wrap_model` (FSDP2 shards them), and the optimizer
    state after building the optimizer on the wrapped model: two calls with load_weights=False the second
    time. Each rank restores its own RNG state (rank 0's when the world size changed)."""
    state = read_trainer_state(checkpoint_dir)
    raw = unwrap_model(model)
    check_same_config(checkpoint_dir, raw.config)
    if load_weights:
        from_hf_state_dict(raw, read_safetensors(str(checkpoint_dir)), source=str(checkpoint_dir))
    tensors_path = Path(checkpoint_dir) / STATE_TENSORS
    if optimizer is not None or restore_rng:
        if not tensors_path.is_file():
            raise CheckpointError(f"{checkpoint_dir}: {STATE_TENSORS} is missing")
        tensors = load_file(str(tensors_path))
        if optimizer is not None:
            _load_optimizer_state(model, optimizer, state["optimizer"], tensors, str(checkpoint_dir))
        if restore_rng:
            states = _from_json_and_tensors(state["rng"], tensors)
            rank = dist.get_rank() if _distributed() else 0
            restore_rng_state(states[rank] if rank < len(states) else states[0])
    return {"step": int(state["step"]), "extra_state": state["extra_state"], "config": state["config"]}
