"""Experiment tracking: with --wandb every metric of metrics.jsonl also reaches Weights & Biases (checked in
offline mode by reading the run's own .wandb file back), GRPO's sample completions as a table."""

import json
import struct
import sys
import time

import pytest
import torch

from seekling.config import ModelConfig
from seekling.errors import ConfigError
from seekling.grpo import GRPOConfig, train_grpo
from seekling.model import Transformer
from seekling.tasks import make_problems
from seekling.training import numbers, open_wandb

pytestmark = pytest.mark.usefixtures("one_thread")


def wandb_records(path):
    """(kind, record) of each protobuf record of an offline `.wandb` file (a LevelDB-style log of 32 KiB
    blocks: a 7-byte header, then chunks of crc32, length, type (1 full, 2 first, 3 middle, 4 last))."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, chunk, out = path.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos: pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        if pos + 7 + length > len(raw):  # a record still being written
            break
        chunk += raw[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append((record.WhichOneof("record_type"), record))
            chunk = b""
    return out


def test_numbers_keeps_numbers_and_flattens_nested_ones():
    record = {"loss": 1.5, "steps": 3, "nan": False, "note": "x", "reward": {"format": 0.5, "correct": 1}}
    assert numbers(record) == {"loss": 1.5, "steps": 3, "reward/format": 0.5, "reward/correct": 1}


def test_grpo_metrics_and_sample_table_reach_wandb_offline(tmp_path, tokenizer, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))
    cfg = GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=6, lr=1e-3, steps=2, micro_batch_size=8,
                     dynamic_sampling=False, rewards={"correct": 1.0, "format": 0.2}, wandb="seekling-test")
    run = tmp_path / "run"
    train_grpo(model, tokenizer, make_problems("arithmetic", "train", 4, 0), cfg, run, log=lambda s: None)

    local = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    [wandb_file] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    for _ in range(120):  # wandb's own process may still be writing the file when finish() returns
        records = wandb_records(wandb_file)
        if any(kind == "exit" for kind, _ in records):
            break
        time.sleep(0.5)
    history = {}
    for kind, r in records:
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    assert sorted(history) == [1, 2], [kind for kind, _ in records]
    for record in local:  # every number of metrics.jsonl, the reward components and health signals included
        expected = numbers({k: v for k, v in record.items() if k != "step"})
        assert {"reward", "accuracy", "loss", "kl", "clip_fraction", "entropy"} <= expected.keys()
        logged = history[record["step"]]
        assert {k: logged[k] for k in expected} == pytest.approx(expected)
    config = next(r.run.config for kind, r in records if kind == "run")  # the settings, as W&B's run config
    assert {i.key: json.loads(i.value_json) for i in config.update}["group_size"] == 4

    # the completions of the last step as a table: P * G rows whose rewards average to the step's reward
    assert history[2]["samples/_type"] == "table-file"
    table = json.loads((wandb_file.parent / "files" / history[2]["samples/path"]).read_text())
    assert table["columns"] == ["prompt", "answer", "completion", "reward", "correct"]
    rewards = [row[3] for row in table["data"]]
    assert len(rewards) == 8 and sum(rewards) / 8 == pytest.approx(local[-1]["reward"])
    assert (run / "wandb_id").read_text().strip() in wandb_file.name  # --resume continues this W&B run


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match="--wandb needs the wandb package: pip install wandb"):
        open_wandb("project", tmp_path, {}, resuming=False)
