"""Training machinery: schedules by hand, AdamW groups, clipping, autocast, RNG round trip, the metrics
log, and checkpoints that lose nothing (exact round trip, atomic under failure, keep-last, no pickle)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import seekling.training as training
from seekling.config import ModelConfig
from seekling.errors import CheckpointError, ConfigError
from seekling.model import Transformer
from seekling.training import (
    MetricsLogger, autocast_for, build_optimizer, capture_rng_state, clip_gradients, init_distributed,
    latest_checkpoint, load_training_checkpoint, lr_at, param_groups, restore_rng_state,
    save_training_checkpoint, wrap_model,
)


# ----------------------------------------------------------------------------- schedules
def test_cosine_schedule_by_hand():
    lr = [lr_at(s, "cosine", 1e-3, warmup=2, total=10, min_lr_ratio=0.1) for s in range(10)]
    assert lr[0] == pytest.approx(5e-4) and lr[1] == pytest.approx(1e-3)  # linear warm-up
    assert lr[2] == pytest.approx(1e-3)  # cosine starts at the peak...
    # step 5: progress 3/7, 1e-4 + 9e-4 * (1 + cos(3pi/7)) / 2, cos(3pi/7) = 0.2225209340
    assert lr[5] == pytest.approx(6.501344203e-4, rel=1e-8)
    assert lr[9] == pytest.approx(1e-4)  # ...and ends at min_lr on the last step
    assert all(a >= b for a, b in zip(lr[1:], lr[2:]))


def test_wsd_schedule_by_hand():
    lr = [lr_at(s, "wsd", 1e-3, warmup=2, total=10, min_lr_ratio=0.1, decay_fraction=0.3) for s in range(10)]
    assert lr[:2] == pytest.approx([5e-4, 1e-3])
    assert lr[2:8] == pytest.approx([1e-3] * 6)  # stable until the last 30% (steps 7, 8, 9) decay
    assert lr[8] == pytest.approx(5.5e-4)  # halfway down the cosine
    assert lr[9] == pytest.approx(1e-4)
    assert [lr_at(s, "constant", 1e-3, 2, 10) for s in (0, 5, 9)] == pytest.approx([5e-4, 1e-3, 1e-3])
    with pytest.raises(ConfigError, match="schedule"):
        lr_at(0, "linear", 1e-3, 0, 10)


# ----------------------------------------------------------------------------- optimiser pieces
def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny", **overrides))


def test_param_groups_no_decay_on_norms_biases_embeddings():
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed_tokens.weight" in no_decay_names
    assert all(n.endswith("norm.weight") or n == "embed_tokens.weight" for n in no_decay_names)
    assert {n for n in names.values() if n.endswith("norm.weight")} <= no_decay_names
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"lm_head.weight", "layers.1.mlp.gate.weight", "layers.1.mlp.experts.gate_up_proj"} <= decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # a bias and a LayerNorm in some other model
    other = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    d, nd = param_groups(other, 0.1)
    assert [p.shape for p in d["params"]] == [torch.Size([4, 4])] and len(nd["params"]) == 3
    opt = build_optimizer(model, 1e-3)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_clip_gradients_returns_norm_before_clipping():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([p], 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([p], 0.0) == pytest.approx(5.0)  # off: norm only
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0]))


def test_autocast_bf16_and_fp32():
    a = torch.randn(4, 4)
    with autocast_for("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
    with autocast_for("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with pytest.raises(ConfigError):
        autocast_for("cpu", "fp16")


def test_rng_capture_restore_round_trip():
    state = capture_rng_state()
    json.dumps({k: v for k, v in state.items() if k in ("python", "numpy")})  # JSON-friendly
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_single_process_distributed_helpers_are_no_ops():
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    model = tiny_model()
    assert wrap_model(model, "ddp", info) is model and wrap_model(model, "fsdp", info) is model
    with pytest.raises(ConfigError, match="distributed"):
        wrap_model(model, "zero3", info)
    t = torch.tensor([1.0, 2.0])
    assert training.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]


def test_metrics_logger_appends_and_truncates_on_resume(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log(step, loss=1.0 / step)
    log.close()
    log = MetricsLogger(tmp_path, resume_step=3, tensorboard=False)  # steps 4-5 came after the checkpoint
    log.log(4, loss=0.2)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.2
    MetricsLogger(tmp_path, tensorboard=False).close()  # a fresh run starts a fresh file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


# ----------------------------------------------------------------------------- checkpoints
def train_steps(model, opt, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        out = model(x, x)
        (out.loss + 0.3 * out.mtp_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        training_bias_update(model, out.expert_load)


def training_bias_update(model, load):
    from seekling.model import update_expert_bias

    update_expert_bias(model, load, 1e-3)


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
    assert state == {"step": 3, "extra_state": {"data": {"epoch": 0, "batch": 3}}, "config": {"lr": 1e-3}}
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

    monkeypatch.setattr(training, "save_file", disk_full)  # dies after the model, before the state
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
