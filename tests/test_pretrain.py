"""Pre-training end to end on the tiny preset: a SIGKILLed run resumed equals an uninterrupted one
bitwise; torchrun with 2 processes (gloo) matches 1 process with the same global batch; the final
directory loads in transformers and in seekling; bad input fails cleanly without touching a run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_pretrain_corpus
import torch
from safetensors.torch import load_file

from seekling.cli import main
from seekling.config import ModelConfig
from seekling.data import build_token_shards
from seekling.pretrain import PretrainArgs, pretrain
from seekling.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
# tiny model, 4 x 32 tokens a step: ~15 ms a step on one thread; fp32 pinned, as the runs are compared bitwise
COMMON = dict(preset="tiny", steps=STEPS, batch_size=4, seq_len=32, warmup=4, lr=3e-3, eval_every=20,
              eval_batches=2, save_every=4, keep_last=2, log_every=1000, seed=3, quiet=True, dtype="fp32")


def cli_flags(**kw) -> list[str]:
    out = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def env_one_thread() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 512-token tokenizer trained on task text and ~19K tokens of arithmetic/linear problems."""
    return make_pretrain_corpus(tmp_path_factory.mktemp("corpus"), num_examples=200, val_fraction=0.1)


@pytest.fixture(scope="module")
def reference(corpus):
    """An uninterrupted run, in this process on one thread (as the subprocesses below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = corpus["root"] / "reference"
        summary = pretrain(PretrainArgs(data=corpus["data"], tokenizer=corpus["tok"], out=str(out), **COMMON))
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "summary": summary}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_checkpoints_and_final(reference):
    out, summary = reference["out"], reference["summary"]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_imbalance"):
        assert all(r[key] is not None for r in rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # it learns
    assert rows[-1]["tokens"] == STEPS * 4 * 32
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_0000036", "step_0000040"]  # keep_last=2, nothing temporary left
    assert summary["final_loss"] == rows[-1]["loss"] and summary["steps"] == STEPS
    files = {p.name for p in (out / "checkpoints" / "step_0000040").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_state.safetensors",
            "trainer_state.json"} <= files
    assert not any(name.endswith((".pt", ".bin", ".pkl")) for name in files)  # nothing pickled


def test_kill_and_resume_equals_uninterrupted_run_bitwise(corpus, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "seekling.cli", "pretrain", *cli_flags(
        data=corpus["data"], tokenizer=corpus["tok"], out=out, **COMMON)]
    proc = subprocess.Popen(cmd, env=env_one_thread(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (out / "checkpoints").is_dir() or not any((out / "checkpoints").glob("step_*")):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.005)
        time.sleep(0.05)  # a few steps further, perhaps in the middle of the next save
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    killed_at = max(r["step"] for r in metrics(out))
    assert killed_at < STEPS

    result = subprocess.run(cmd + ["--resume"], env=env_one_thread(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

    ref, got = load_file(reference["out"] / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    ref_state = load_file(reference["out"] / "checkpoints" / "step_0000040" / "training_state.safetensors")
    got_state = load_file(out / "checkpoints" / "step_0000040" / "training_state.safetensors")
    for name in ref_state:
        if name.startswith("optimizer."):
            assert torch.equal(ref_state[name], got_state[name]), name
    # the log reads as one run: each step once, the same numbers
    ref_rows, got_rows = metrics(reference["out"]), metrics(out)
    assert [r["step"] for r in got_rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got_rows] == [r["loss"] for r in ref_rows]
    assert [r.get("val_loss") for r in got_rows] == [r.get("val_loss") for r in ref_rows]


def test_two_processes_match_one_process(corpus, reference, tmp_path):
    """torchrun (gloo, DDP) with 2 x 2 sequences per step against the reference's 1 x 4: the same
    global batch, the expert load all-reduced before the bias update."""
    out = tmp_path / "ddp"
    flags = cli_flags(data=corpus["data"], tokenizer=corpus["tok"], out=out, **{**COMMON, "batch_size": 2,
                                                                               "steps": 8, "save_every": 0,
                                                                               "schedule": "constant"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "seekling.cli", "pretrain", *flags]
    result = subprocess.run(cmd, env=env_one_thread(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    # the reference's first 8 steps have the same lr: warm-up over 4, then WSD's stable phase
    ref_rows, got_rows = metrics(reference["out"])[:8], metrics(out)
    assert len(got_rows) == 8
    for ref, got in zip(ref_rows, got_rows):
        assert got["lr"] == ref["lr"]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert got["mtp_loss"] == pytest.approx(ref["mtp_loss"], abs=1e-5)
        assert got["expert_imbalance"] == pytest.approx(ref["expert_imbalance"], abs=1e-6)  # same global load


def test_final_directory_loads_in_transformers_and_seekling(reference):
    transformers = pytest.importorskip("transformers")
    from seekling.checkpoint import load_pretrained

    final = reference["out"] / "final"
    ours = load_pretrained(str(final))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(final))
    ids = torch.tensor([tok("What is 47+38?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    # the exported weights are the trained ones (checkpoint and final agree)
    ckpt = load_file(reference["out"] / "checkpoints" / "step_0000040" / "model.safetensors")
    final_weights = load_file(final / "model.safetensors")
    assert all(torch.equal(ckpt[k], final_weights[k]) for k in ckpt)


# ----------------------------------------------------------------------------- bad input
def run_cli(corpus, out, capsys, **kw) -> tuple[int, str]:
    args = {"data": corpus["data"], "tokenizer": corpus["tok"], "out": out, **COMMON, "steps": 2, **kw}
    code = main(["pretrain", *cli_flags(**args)])
    return code, capsys.readouterr().err


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_tokenizer_vocab_mismatch_is_a_clear_error(corpus, tmp_path, capsys):
    code, err = run_cli(corpus, tmp_path / "run", capsys, vocab_size=1024)
    assert code == 2
    assert "512 tokens" in err and "vocab_size is 1024" in err
    assert not (tmp_path / "run").exists()


def test_empty_data_dir_and_too_small_corpus(corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(corpus, tmp_path / "run", capsys, data=tmp_path / "empty")
    assert code == 2 and "index.json" in err
    build_token_shards(tmp_path / "small", Tokenizer.load(corpus["tok"]), tasks=["arithmetic"], num_examples=1)
    code, err = run_cli(corpus, tmp_path / "run", capsys, data=tmp_path / "small")
    assert code == 2 and "fewer than one global batch" in err
    assert not (tmp_path / "run").exists()


def test_resume_from_another_config_or_rerun_leaves_the_run_untouched(corpus, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference["out"], run)
    before = snapshot(run)
    other = tmp_path / "other"
    ModelConfig.from_name("tiny", hidden_size=32).save(str(other))
    code, err = run_cli(corpus, run, capsys, config=other / "config.json", preset=None, resume=True, steps=STEPS + 4)
    assert code == 2 and "another model config" in err and "hidden_size" in err
    code, err = run_cli(corpus, run, capsys)  # no --resume into a finished run
    assert code == 2 and "--resume" in err
    assert snapshot(run) == before


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_bitwise(corpus, reference, tmp_path):
    """FSDP2 (fully_shard per block, gloo on CPU): same losses as one process; a run resumed from its
    step-4 checkpoint ends with the same weights as the uninterrupted FSDP run."""
    def torchrun(out, steps, resume=False):
        flags = cli_flags(data=corpus["data"], tokenizer=corpus["tok"], out=out, resume=resume,
                          **{**COMMON, "batch_size": 2, "steps": steps, "schedule": "constant"})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "seekling.cli", "pretrain", *flags, "--distributed", "fsdp"]
        result = subprocess.run(cmd, env=env_one_thread(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun(tmp_path / "fsdp", 8)
    for ref, got in zip(metrics(reference["out"])[:8], metrics(tmp_path / "fsdp")):
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step_0000008")
    torchrun(resumed, 8, resume=True)
    a, b = load_file(tmp_path / "fsdp" / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
