"""Checkpoint directories: atomic saves, and clear errors for everything that does not fit."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from seekling.checkpoint import (best_evaluated_stage, load_pretrained, model_kind, resolve_model_and_tokenizer,
                                 resolve_model_dir, save_pretrained, trained_tasks)
from seekling.config import ModelConfig
from seekling.errors import CheckpointError
from seekling.model import Transformer


@pytest.fixture()
def saved(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny"))
    path = tmp_path / "ckpt"
    save_pretrained(model, str(path))
    return model, path


def edited(path):
    """The directory as a person (or another program) who edits its files leaves it: no integrity record."""
    (path / "SHA256SUMS").unlink()
    return path


def test_round_trip_is_exact(saved):
    model, path = saved
    back = load_pretrained(str(path))
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    names = load_file(str(path / "model.safetensors")).keys()
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.2.eh_proj.weight" in names and "model.layers.2.shared_head.head.weight" in names
    assert load_file(str(path / "model.safetensors"))["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_bf16_save_keeps_the_bias_in_fp32(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny"))
    save_pretrained(model, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_missing_tensors_are_named(saved):
    _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.0.self_attn.kv_b_proj.weight"]
    save_file(tensors, str(edited(path) / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensor.*layers.0.self_attn.kv_b_proj.weight"):
        load_pretrained(str(path))


def test_mismatched_shapes_are_named(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["kv_lora_rank"] = 16
    (edited(path) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch.*kv_a_proj_with_mqa"):
        load_pretrained(str(path))


def test_other_model_type_is_refused(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (edited(path) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 'qwen2'"):
        load_pretrained(str(path))


def test_pickled_weights_are_never_loaded(tmp_path):
    ModelConfig.from_name("tiny").save(str(tmp_path))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_pretrained(str(tmp_path))


def test_save_is_atomic(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()
    import seekling.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_pretrained(Transformer(ModelConfig.from_name("tiny")), str(path))
    assert (path / "model.safetensors").read_bytes() == before
    assert not [p for p in os.listdir(path.parent) if p.startswith(".tmp-")]


def test_saved_directory_has_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_pretrained(Transformer(ModelConfig.from_name("tiny")), str(tmp_path / "perm"))
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "perm").st_mode & 0o777) == 0o755


# ----------------------------------------------------------------------------- finding the model in a directory
def test_resolve_model_dir(tmp_path):
    def fake_model(d, model_type="deepseek_v3"):
        os.makedirs(d)
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
        (d / "model.safetensors").write_text("")
        return str(d)

    run = tmp_path / "run"
    fake_model(run / "checkpoints" / "step_000900")
    newest = fake_model(run / "checkpoints" / "step_001200")
    fake_model(run / "checkpoints" / "step_000300")
    fake_model(run / "checkpoints" / ".tmp-step_009999")  # a save in progress
    assert resolve_model_dir(str(run)) == newest
    final = fake_model(run / "final")
    assert resolve_model_dir(run) == final
    assert resolve_model_dir(final) == final
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    assert resolve_model_and_tokenizer(str(run)) == (final, str(run / "tokenizer"))
    assert model_kind(final) == "seekling" and model_kind(fake_model(tmp_path / "qwen", "qwen2")) == "transformers"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a model directory: looked for a seekling run directory.*"
                                              "pickled weights are never loaded"):
        resolve_model_dir(str(empty))
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="no tokenizer.json in .*pass --tokenizer"):
        resolve_model_and_tokenizer(str(tmp_path / "qwen"))


def test_speedrun_directory_serves_its_best_evaluated_stage(tmp_path, capsys):
    """A speedrun directory holds four stages' final models; the one chosen is the stage with the best
    held-out pass@1 in the run's own eval/*.json, whatever the files' modification times say."""
    run = tmp_path / "speedrun-cpu"
    scores = {"pretrain": 0.02, "sft": 0.181, "grpo": 0.295, "distill": 0.256}
    for stage, score in scores.items():
        d = run / stage / "final"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
        (d / "model.safetensors").write_text("")
        (run / "eval").mkdir(exist_ok=True)
        (run / "eval" / f"{stage}.json").write_text(json.dumps({"mean": {"pass@1": score}}))
    os.utime(run / "distill" / "final", (2e9, 2e9))  # distill written last: the old tie-break chose it
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    (run / "state.json").write_text(json.dumps({"format": "seekling-speedrun-v1", "config": {"rl_task": "arithmetic"},
                                                "finished": [f"eval_{s}" for s in scores]}))
    assert resolve_model_dir(run) == str(run / "grpo" / "final")
    said = []
    assert resolve_model_and_tokenizer(str(run), say=said.append) == (str(run / "grpo" / "final"), str(run / "tokenizer"))
    assert "grpo" in said[0] and "29.5%" in said[0] and "distill 25.6%" in said[0]
    assert best_evaluated_stage(run)[:2] == ("grpo", 0.295)
    # a tie goes to the stage evaluated later in the run; a damaged result file does not count
    (run / "eval" / "distill.json").write_text(json.dumps({"mean": {"pass@1": 0.295}}))
    (run / "eval" / "sft.json").write_text("{not json")
    assert resolve_model_dir(run) == str(run / "distill" / "final")
    # a stage named explicitly, or a run without evaluations, keeps the other rules
    assert resolve_model_dir(run / "sft") == str(run / "sft" / "final")
    shutil.rmtree(run / "eval")
    assert resolve_model_dir(run) == str(run / "distill" / "final")  # newest of the final/ directories
    assert trained_tasks(run / "grpo" / "final") == ["arithmetic"] and trained_tasks(tmp_path) is None
