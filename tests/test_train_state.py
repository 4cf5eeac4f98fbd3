"""Lossless training checkpoints: the RNG round trip, an exact round trip of model, optimizer and
routing bias, atomic under failure, keep-last, no pickle, and a clear error for another config."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

import seekling.train_state as train_state
from seekling.config import ModelConfig
from seekling.errors import CheckpointError
from seekling.model import Transformer
from seekling.train_state import (capture_rng_state, execution_settings, latest_checkpoint, load_training_checkpoint,
                                  restore_rng_state, save_training_checkpoint)
from seekling.training import update_expert_bias
from seekling.training import build_optimizer


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny", **overrides))


# ----------------------------------------------------------------------------- RNG state
def test_rng_capture_restore_round_trip():
    state = capture_rng_state()
    json.dumps({k: v for k, v in state.items() if k in ("python", "numpy")})  # JSON-friendly
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


# ----------------------------------------------------------------------------- checkpoints
def train_steps(model, opt, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        out = model(x, x)
        (out.loss + 0.3 * out.mtp_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model, out.expert_load, 1e-3)


def test_checkpoint_round_trip_is_exact_and_keeps_last(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, 1e-3)
    train_steps(model, opt, 2)
    for step in (1, 2, 3):
        path = save_training_checkpoint(tmp_path, step, model, opt, extra_state={"data": {"epoch": 0, "batch": step}},
                                        config={"lr": 1e-3}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    assert latest_checkpoint(tmp_path) == path
    files = {p.name for p in (tmp_path / "checkpoints" / "step_0000003").iterdir()}
    assert not any(f.endswith((".pt", ".bin", ".pkl")) for f in files)

    restored = tiny_model()
    restored.reset_parameters()
    ropt = build_optimizer(restored, 1e-3)
    state = load_training_checkpoint(path, restored, ropt)
    assert state == {"step": 3, "extra_state": {"data": {"epoch": 0, "batch": 3}}, "config": {"lr": 1e-3},
                     "execution": execution_settings()}
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name  # includes the routing bias buffers
    pairs = zip(opt.param_groups[0]["params"] + opt.param_groups[1]["params"],
                ropt.param_groups[0]["params"] + ropt.param_groups[1]["params"])
    for p, q in pairs:
        assert all(torch.equal(opt.state[p][k], ropt.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert ropt.param_groups[0]["betas"] == (0.9, 0.95)
    # and the next step is the same on both
    train_steps(model, opt, 1, seed=5)
    train_steps(restored, ropt, 1, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = tiny_model()
    opt = build_optimizer(model, 1e-3)
    train_steps(model, opt, 1)
    good = save_training_checkpoint(tmp_path, 1, model, opt)
    before = (tmp_path / "checkpoints" / "step_0000001" / "model.safetensors").read_bytes()
    train_steps(model, opt, 1)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(train_state, "save_file", disk_full)  # dies after the model, before the state
    with pytest.raises(OSError):
        save_training_checkpoint(tmp_path, 2, model, opt)
    assert latest_checkpoint(tmp_path) == good
    assert (tmp_path / "checkpoints" / "step_0000001" / "model.safetensors").read_bytes() == before
    (tmp_path / "checkpoints" / "step_0000009").mkdir()  # a directory without trainer_state.json
    assert latest_checkpoint(tmp_path) == good
    monkeypatch.undo()
    save_training_checkpoint(tmp_path, 2, model, opt, keep_last=0)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the next save cleans up


def test_resume_into_another_config_is_a_clear_error(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, 1e-3)
    path = save_training_checkpoint(tmp_path, 1, model, opt)
    other = Transformer(ModelConfig.from_name("tiny", n_routed_experts=4))
    with pytest.raises(CheckpointError, match="n_routed_experts: checkpoint 8, this run 4"):
        load_training_checkpoint(path, other, build_optimizer(other, 1e-3))
    state = json.loads((tmp_path / "checkpoints" / "step_0000001" / "trainer_state.json").read_text())
    assert state["format"] == "seekling-training-v1" and state["step"] == 1
    assert math.isfinite(state["time"])
