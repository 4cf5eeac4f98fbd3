"""Training machinery: schedules by hand, AdamW groups, clipping, autocast, the metrics log, the
single-process distributed helpers, and the run lifecycle the trainers share (refuse or resume,
periodic and final checkpoints, the time budget, clocks carried over a resume)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from seekling.config import ModelConfig
from seekling.errors import CheckpointError, ConfigError
from seekling.model import Transformer
from seekling.parallel import all_reduce_sum, init_distributed, wrap_model
from seekling.train_state import list_checkpoints, read_trainer_state
from seekling.training import (MetricsLogger, autocast_for, build_optimizer, clip_gradients, lr_at, param_groups,
                               resume_point, start_run)


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


def test_single_process_distributed_helpers_are_no_ops():
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    model = tiny_model()
    assert wrap_model(model, "ddp", info) is model and wrap_model(model, "fsdp", info) is model
    with pytest.raises(ConfigError, match="distributed"):
        wrap_model(model, "zero3", info)
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]


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


# ----------------------------------------------------------------------------- the run lifecycle
def test_run_refuses_saves_finishes_and_resumes_with_its_clocks(tmp_path):
    model = tiny_model()
    assert resume_point(tmp_path, resume=False) is None and resume_point(tmp_path, resume=True) is None
    position, messages = {"batch": 0}, []
    settings = dict(steps=5, save_every=2, config={"kind": "test"}, extra_state=lambda: dict(position),
                    desc="test", progress=False, log=messages.append)
    with start_run(tmp_path, None, model, build_optimizer(model, 1e-3), **settings) as run:
        assert (run.step, run.resumed) == (0, {})
        assert [s for s in range(1, 6) if run.save_due(s)] == [2, 4]  # the last step's checkpoint is finish's
        position["batch"] = 2
        run.metrics.log(2, loss=1.0)
        run.save(2)
        run.metrics.log(3, loss=0.5)
        assert not run.out_of_time(3)
        run.max_seconds = 0.0
        assert run.out_of_time(3) and messages[-1] == "time budget of 0s reached at step 3"
        checkpoint, final = run.finish(3)
    assert (tmp_path / "final" / "model.safetensors").is_file() and final == str((tmp_path / "final").resolve())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    state = read_trainer_state(checkpoint)
    assert state["step"] == 3 and state["config"] == {"kind": "test"}
    assert state["extra_state"]["batch"] == 2 and state["extra_state"]["seconds"] > 0

    with pytest.raises(CheckpointError, match="already holds a run .step_0000003.; pass --resume"):
        resume_point(tmp_path, resume=False)
    assert resume_point(tmp_path, resume=True) == checkpoint
    other = tiny_model(n_routed_experts=4)
    with pytest.raises(CheckpointError, match="n_routed_experts"):
        start_run(tmp_path, checkpoint, other, build_optimizer(other, 1e-3), **settings)
    model = tiny_model()
    with start_run(tmp_path, checkpoint, model, build_optimizer(model, 1e-3), **settings) as run:
        assert run.step == 3 and run.resumed["batch"] == 2
        assert messages[-1] == f"resumed from {checkpoint} at step 3"
        assert run.seconds() >= state["extra_state"]["seconds"]  # the clock carries on from the checkpoint
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    for d in list_checkpoints(tmp_path):  # a run with only final/ left is still a run
        shutil.rmtree(d)
    with pytest.raises(CheckpointError, match="already holds a run .final."):
        resume_point(tmp_path, resume=False)
