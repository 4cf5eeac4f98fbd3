"""SFT: assistant-only loss against a hand-masked cross-entropy, loss goes down, resume equals an
uninterrupted run, cold-start data in the R1 format, refusing to overwrite a run."""

import json

import pytest
import torch
import torch.nn.functional as F

from seekling.checkpoint import load_pretrained
from seekling.cli import main
from seekling.config import ModelConfig
from seekling.data import SFTLoader, read_chat_jsonl
from seekling.errors import CheckpointError
from seekling.model import Transformer
from seekling.rewards import format_reward
from seekling.sft import SFTConfig, make_cold_start, sft_loss, train_sft


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def cold_start(tmp_path_factory):
    path = tmp_path_factory.mktemp("cold") / "cold.jsonl"
    make_cold_start(["arithmetic"], 64, path, seed=0, difficulty={"arithmetic": {"digits": 1}})
    return path


def tiny(tokenizer):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))


def test_cold_start_is_r1_format(cold_start):
    conversations = read_chat_jsonl(cold_start)
    assert len(conversations) == 64
    for messages in conversations:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert format_reward(messages[1]["content"]) == 1.0


def test_loss_is_on_assistant_tokens_only(tokenizer, cold_start):
    model = tiny(tokenizer)
    loader = SFTLoader(cold_start, tokenizer, batch_size=4, seq_len=64, pack=True)
    inputs, targets = next(loader)
    loss, _ = sft_loss(model, inputs, targets, mtp_weight=0.0)
    logits = model(inputs).logits
    # by hand: the mean CE over positions whose target is an assistant token
    keep = targets != -100
    manual = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, manual, atol=1e-6)
    # and those positions are exactly the assistant content (+ its closing eos) of the render
    ids, mask = tokenizer.render_chat(read_chat_jsonl(cold_start)[0])
    assert mask.count(1) == len(tokenizer.encode(read_chat_jsonl(cold_start)[0][1]["content"])) + 1


def test_sft_lowers_the_loss_and_writes_a_loadable_model(tmp_path, tokenizer, cold_start):
    model = tiny(tokenizer)
    loader = SFTLoader(cold_start, tokenizer, batch_size=8, seq_len=64)
    before = sft_loss(model, *loader.batch_at(0, 0), mtp_weight=0.0)[0].item()
    cfg = SFTConfig(seq_len=64, batch_size=8, steps=12, lr=3e-3, warmup_steps=2, save_every=0, log_every=4)
    summary = train_sft(model, tokenizer, cold_start, cfg, tmp_path / "run")
    after = sft_loss(model, *loader.batch_at(0, 0), mtp_weight=0.0)[0].item()
    assert after < before - 0.5
    reloaded = load_pretrained(summary["final"])
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12] and "assistant_tokens_per_s" in records[0]


def test_validation_loss_is_the_mean_over_the_first_batches(tmp_path, tokenizer, cold_start):
    cfg = SFTConfig(seq_len=64, batch_size=4, steps=4, lr=1e-3, warmup_steps=1, save_every=2, log_every=4,
                    val_batches=3)
    model = tiny(tokenizer)
    summary = train_sft(model, tokenizer, cold_start, cfg, tmp_path / "run", val_conversations=cold_start)
    loader = SFTLoader(cold_start, tokenizer, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    with torch.no_grad():  # by hand: the assistant-token loss of each of the first 3 batches, averaged
        by_hand = sum(float(model(*loader.batch_at(0, b)).loss) for b in range(3)) / 3
    assert summary["val_loss"] == pytest.approx(by_hand, rel=1e-12) and model.training
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]  # at each save and at the end


def test_resume_equals_uninterrupted(tmp_path, tokenizer, cold_start):
    cfg = SFTConfig(seq_len=64, batch_size=4, steps=6, lr=1e-3, warmup_steps=1, save_every=3, log_every=1)
    straight = tiny(tokenizer)
    train_sft(straight, tokenizer, cold_start, cfg, tmp_path / "a")

    first = tiny(tokenizer)
    train_sft(first, tokenizer, cold_start, SFTConfig(**{**vars(cfg), "steps": 6}), tmp_path / "b",
              max_seconds=0.0)  # stops (and saves) after its first step
    with pytest.raises(CheckpointError, match="--resume"):
        train_sft(tiny(tokenizer), tokenizer, cold_start, cfg, tmp_path / "b")
    resumed = tiny(tokenizer)
    torch.manual_seed(123)  # whatever the RNG now holds, the checkpoint restores it
    train_sft(resumed, tokenizer, cold_start, cfg, tmp_path / "b", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4, 5, 6] or steps == [1, 2, 3, 4, 5, 6]


def test_cli_cold_start_and_bad_input(tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    assert main(["sft", "--make-cold-start", "--tasks", "countdown", "--num-examples", "3", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert main(["sft", "--make-cold-start", "--tasks", "nope", "--out", str(out)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["sft", "--out", str(tmp_path / "r")]) == 2
