"""A speedrun's run directory: its state file (what ran, with which settings) and the checks made
on `--out` before any work starts (writable, enough disk, this run or none)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from seekling.config import ModelConfig, count_parameters
from seekling.errors import ConfigError, SeeklingError
from seekling.presets import SpeedrunPreset
from seekling.report import environment

STATE_FILE = "state.json"
STATE_FORMAT = "seekling-speedrun-v1"


# ----------------------------------------------------------------------------- state.json
def new_state(preset: SpeedrunPreset) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "preset": preset.name, "config": preset.to_json(), "finished": [],
            "stages": {}, "created": time.time(), "environment": environment()}


def read_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); it is damaged or not a speedrun state file: restore it, "
                          "or choose another --out") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{path} is not a seekling speedrun state file; choose another --out")
    check_state(state, path)
    return state


_STATE_TYPES = {"preset": str, "config": dict, "finished": list, "stages": dict}


def check_state(state: dict[str, Any], path: Path) -> None:
    """ConfigError naming a key of state.json that is missing or of the wrong type."""
    for key, kind in _STATE_TYPES.items():
        if key not in state:
            raise ConfigError(f"{path}: the key {key!r} is missing; the file is damaged (restore it, or choose "
                              "another --out)")
        if not isinstance(state[key], kind):
            raise ConfigError(f"{path}: {key!r} is {type(state[key]).__name__} ({state[key]!r:.40}), expected "
                              f"{kind.__name__}; the file is damaged")
    bad = [s for s in state["finished"] if not isinstance(s, str)]
    if bad:
        raise ConfigError(f"{path}: 'finished' holds {bad[0]!r}, not a stage name; the file is damaged")
    if "execution" in state and not isinstance(state["execution"], dict):
        raise ConfigError(f"{path}: 'execution' is {type(state['execution']).__name__}, expected dict")


def suggest_out(run_dir: Path) -> str:
    n = 2
    while Path(f"{run_dir}-{n}").exists():
        n += 1
    return f"{run_dir}-{n}"


def check_same_run(state: dict[str, Any], preset: SpeedrunPreset, run_dir: Path) -> None:
    """ConfigError when `run_dir` holds a run of another preset or other settings: never mix two runs."""
    ours = preset.to_json()
    if state["preset"] != preset.name:
        raise ConfigError(
            f"{run_dir} holds a speedrun of preset {state['preset']!r}, not {preset.name!r}. Resume that one "
            f"with `seekling speedrun --preset {state['preset']} --out {run_dir}`, or start this one in a new "
            f"directory: --out {suggest_out(run_dir)}")
    saved = state["config"]
    # A field newer than the run (absent from its state) matches when it keeps its default behaviour.
    defaults = {f.name: f.default for f in dataclasses.fields(preset)}
    diff = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in ours.items()
            if k != "about" and (saved[k] != v if k in saved else v != defaults.get(k))]
    if diff:
        raise ConfigError(
            f"{run_dir} holds a {preset.name!r} speedrun with other settings ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}); resuming would mix two runs. Rerun with the old settings, "
            f"or start a new run: --out {suggest_out(run_dir)}")


# ----------------------------------------------------------------------------- up-front checks
def required_bytes(preset: SpeedrunPreset) -> int:
    """A generous estimate of the disk a run needs at its peak: checkpoints (weights + two AdamW
    moments) of pre-training (all kept until the expert loads are measured), SFT and GRPO (two each),
    four final models, the token shards and the JSONL files; then 50% on top."""
    params = count_parameters(ModelConfig.from_name(preset.model))
    weights = 4 * (params["total"] + params.get("mtp", 0))
    checkpoint = 3 * weights
    checkpoints = (preset.pretrain_checkpoints + 2 + 2 + 2) * checkpoint + 5 * weights
    shards = 2 * 120 * preset.pretrain_examples * len(preset.pretrain_tasks)
    return int(1.5 * (checkpoints + shards) + 50e6)


def check_run_dir(run_dir: Path, preset: SpeedrunPreset) -> dict[str, Any] | None:
    """Everything about `--out` that can fail, before any work: writability, free space and whether it
    holds this run, another run or something else. Returns the saved state when resuming."""
    state = read_state(run_dir) if run_dir.is_dir() else None
    if state is not None:
        check_same_run(state, preset, run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} already exists and is not a speedrun directory (no {STATE_FILE}); "
                          f"choose a new --out, e.g. --out {suggest_out(run_dir)}")
    elif run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a directory; choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SeeklingError(f"cannot write to {run_dir} ({e.strerror or e}); choose a writable --out") from None
    free = shutil.disk_usage(run_dir).free
    need = required_bytes(preset)
    if free < need:
        raise SeeklingError(f"{run_dir}: only {free / 1e9:.2f} GB free on that disk, and the {preset.name!r} "
                            f"speedrun needs about {need / 1e9:.2f} GB; free some space or choose another --out")
    return state
