"""Lossless training checkpoints, beside `seekling.checkpoint` (which reads and writes the model alone).

A checkpoint is the model in HF format (config.json + model.safetensors + tokenizer files) plus
`training_state.safetensors` (optimizer moments, every rank's RNG states) and `trainer_state.json`
(step, optimizer skeleton, data position, trainer args): nested state as JSON, each tensor a key into
the safetensors file, nothing pickled. It is written into a temporary directory and renamed into
place, so a kill at any moment leaves the previous checkpoint intact. Its SHA256SUMS (written last)
is checked on resume, and `latest_good_checkpoint` falls back to the newest intact checkpoint when a
newer one is damaged, saying so (as PyTorch's distributed checkpointing keeps the last good one usable).
`trainer_state.json` also records the execution settings that change the numbers (torch threads,
world size, torch version), so a resume can use the same ones (`execution_settings`).

    python -c "from seekling.train_state import latest_checkpoint; print(latest_checkpoint('runs/pt'))"
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from seekling.checkpoint import (WEIGHTS_NAME, check_finite, from_hf_state_dict, read_safetensors,
                                 read_safetensors_file, save_pretrained, verify_checksums, write_checksums)
from seekling.config import ModelConfig
from seekling.errors import CheckpointError, ConfigError
from seekling.files import replace_dir, write_json_atomic
from seekling.model import Transformer
from seekling.parallel import barrier, full_tensor, is_distributed, reshard, unwrap_model

CHECKPOINT_FORMAT = "seekling-training-v1"
STATE_JSON = "trainer_state.json"  # written last: its presence marks a complete checkpoint
STATE_TENSORS = "training_state.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_STEP_DIR = re.compile(r"step_(\d+)$")


# ----------------------------------------------------------------------------- RNG state
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


# ----------------------------------------------------------------------------- tensors in JSON, optimiser state
def _to_json_and_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by {"tensor": key}, collecting it in `tensors`.
    DTensors (FSDP2) are gathered whole first, so every rank must call this in the same order."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = full_tensor(obj).detach().to("cpu", copy=True).contiguous()
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {str(k): _to_json_and_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json_and_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _from_json_and_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"tensor"}:
            if obj["tensor"] not in tensors:
                raise CheckpointError(f"tensor {obj['tensor']!r} of {STATE_JSON} is missing from {STATE_TENSORS}")
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
    groups = [{**{k: tuple(v) if k == "betas" else v for k, v in g.items()}, "params": [index[n] for n in g["params"]]}
              for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, on every rank (each rank draws from its own generators)."""
    mine = capture_rng_state()
    if not is_distributed():
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
    return {name: full_tensor(t).detach().to("cpu") for name, t in unwrap_model(model).state_dict().items()}


def export_model(model: nn.Module) -> nn.Module:
    """A plain CPU Transformer with the model's weights, for `save_pretrained` (call on every rank)."""
    raw = unwrap_model(model)
    params = list(raw.parameters())
    if all(p.device.type == "cpu" and not hasattr(p, "full_tensor") for p in params):
        return raw
    state = _full_model_state(raw)
    with torch.device("meta"):
        copy = Transformer(raw.config)
    copy = copy.to_empty(device="cpu")
    copy.load_state_dict(state, strict=False)  # non-persistent buffers (inv_freq) are not saved anyway
    return copy


def _fsync_dir(path: Path) -> None:
    """Make the renames inside `path` durable (skipped where a directory cannot be opened or synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tokenizer_files(tokenizer_dir: str | Path | None) -> dict[str, str]:
    """The tokenizer's files in `tokenizer_dir` (those that exist), for `save_pretrained(extra_files=...)`."""
    if tokenizer_dir is None:
        return {}
    return {name: str(Path(tokenizer_dir) / name) for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()}


def first_tokenizer_dir(candidates) -> str | None:
    """The first of `candidates` (directories, or None) that holds a tokenizer.json."""
    return next((str(c) for c in candidates if c and (Path(c) / "tokenizer.json").is_file()), None)


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
    if not is_distributed() or dist.get_rank() == 0:
        root = Path(run_dir) / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".trash-*")]:  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        final = root / f"step_{step:07d}"
        tmp = root / f".tmp-step_{step:07d}"
        save_pretrained(exported, str(tmp), extra_files=tokenizer_files(tokenizer_dir))
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": CHECKPOINT_FORMAT})
        write_json_atomic(tmp / STATE_JSON, {
            "format": CHECKPOINT_FORMAT, "step": step, "time": time.time(),
            "optimizer": optim_json, "rng": rng_json,
            "extra_state": extra_state or {}, "config": config or {}, "execution": execution_settings(),
        }, sort_keys=True)
        write_checksums(tmp)
        _fsync_dir(tmp)
        replace_dir(tmp, final, root / f".trash-step_{step:07d}")  # the same step saved again (a resumed run)
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


def execution_settings() -> dict[str, Any]:
    """What, besides the seed and the settings, changes a run's numbers in their last bits."""
    return {"threads": torch.get_num_threads(), "world_size": dist.get_world_size() if is_distributed() else 1,
            "torch": torch.__version__}


def recorded_threads(run_dir: str | Path | None, resume: bool) -> int | None:
    """The torch thread count the newest checkpoint of `run_dir` was written with, when resuming (None
    otherwise, or when unrecorded): a resume at the same count continues bit for bit."""
    latest = latest_checkpoint(run_dir) if resume and run_dir and Path(run_dir).is_dir() else None
    try:
        threads = read_trainer_state(latest).get("execution", {}).get("threads") if latest else None
    except CheckpointError:
        return None  # a damaged newest checkpoint: the resume names it and falls back
    return threads if isinstance(threads, int) and threads > 0 else None


_STATE_TYPES = {"step": int, "optimizer": dict, "rng": list, "extra_state": dict, "config": dict}


def read_trainer_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """trainer_state.json, its keys and their types checked (a CheckpointError naming what is wrong)."""
    path = Path(checkpoint_dir) / STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no {STATE_JSON}, not a complete training checkpoint")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    for key, kind in _STATE_TYPES.items():
        if key not in state:
            raise CheckpointError(f"{path}: the key {key!r} is missing")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{path}: {key!r} is {type(state[key]).__name__}, expected {kind.__name__}")
    return state


def verify_training_checkpoint(checkpoint_dir: str | Path) -> None:
    """A CheckpointError naming the damaged file of a checkpoint: its trainer_state.json, a file whose
    sha256 differs from SHA256SUMS, or (checkpoints saved before the record) an unreadable tensor file."""
    read_trainer_state(checkpoint_dir)
    if not verify_checksums(checkpoint_dir):
        for name in (WEIGHTS_NAME, STATE_TENSORS):
            read_safetensors_file(Path(checkpoint_dir) / name)


def latest_good_checkpoint(run_dir: str | Path, log: Callable[[str], None] = print) -> str | None:
    """The newest intact checkpoint of a run. Damaged newer ones are skipped, saying which file is
    wrong and where the run resumes instead; they stay on disk for inspection (the run's later saves
    of the same step replace them). None when there is no intact checkpoint."""
    found = list_checkpoints(run_dir)
    for i, checkpoint in enumerate(reversed(found)):
        try:
            verify_training_checkpoint(checkpoint)
        except CheckpointError as e:
            older = found[-2 - i].name if i + 1 < len(found) else None
            log(f"checkpoint {checkpoint.name} is damaged: {e}; "
                + (f"resuming from the previous one, {older}" if older else "no intact checkpoint is left: "
                   "starting from scratch"))
            continue
        return str(checkpoint)
    return None


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
    verify_checksums(checkpoint_dir)
    raw = unwrap_model(model)
    check_same_config(checkpoint_dir, raw.config)
    if load_weights:
        from_hf_state_dict(raw, read_safetensors(str(checkpoint_dir)), source=str(checkpoint_dir))
    tensors_path = Path(checkpoint_dir) / STATE_TENSORS
    if optimizer is not None or restore_rng:
        if not tensors_path.is_file():
            raise CheckpointError(f"{checkpoint_dir}: {STATE_TENSORS} is missing")
        tensors = read_safetensors_file(tensors_path)
        check_finite(tensors, str(tensors_path))
        try:
            if optimizer is not None:
                _load_optimizer_state(model, optimizer, state["optimizer"], tensors, str(checkpoint_dir))
            if restore_rng:
                states = _from_json_and_tensors(state["rng"], tensors)
                rank = dist.get_rank() if is_distributed() else 0
                restore_rng_state(states[rank] if rank < len(states) else states[0])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{checkpoint_dir}: the optimizer or RNG state in {STATE_JSON} and "
                                  f"{STATE_TENSORS} is damaged ({type(e).__name__}: {e})") from None
    return {"step": int(state["step"]), "extra_state": state["extra_state"], "config": state["config"],
            "execution": state.get("execution", {})}
