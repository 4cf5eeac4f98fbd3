"""`--dtype auto` (seekling.precision): bf16 only where the measured matmuls of the model's shapes are
clearly faster in bf16 (decisions from injected timings, no timing asserts), fp32 elsewhere; a real
pre-training run under auto reports MFU against the peak of the dtype it chose, and the speedrun's cost
ledger prices pre-training at that dtype."""

import pytest
import torch

from seekling.config import ModelConfig
from seekling.errors import ConfigError
from seekling.precision import MIN_BF16_GAIN, choose_dtype, decide_dtype, matmul_shapes
from seekling.pretrain import PretrainArgs, pretrain
from seekling.presets import PRESETS
from seekling.rundir import new_state
from seekling.speedrun import Context, Stage, run_stages
from seekling.training import peak_flops
from tests.test_pretrain import COMMON, corpus  # noqa: F401 - a fixture

TINY = ModelConfig.from_name("tiny")


def fake_measure(fp32_seconds, bf16_seconds):
    calls = []

    def measure(shapes, dtype):
        calls.append((tuple(shapes), dtype))
        return fp32_seconds if dtype == torch.float32 else bf16_seconds

    return measure, calls


def test_native_bf16_is_chosen_emulated_bf16_is_not():
    lines = []
    amx, calls = fake_measure(fp32_seconds=6.0, bf16_seconds=1.0)  # 1,158 vs 179 GFLOP/s, as AMX-BF16 measures
    assert choose_dtype("auto", "cpu", TINY, 512, log=lines.append, measure=amx) == "bf16"
    assert {dtype for _, dtype in calls} == {torch.float32, torch.bfloat16}
    assert calls[0][0] == tuple(matmul_shapes(TINY, 512))  # the model's own shapes
    emulated, _ = fake_measure(fp32_seconds=1.0, bf16_seconds=100.0)  # a CPU without bf16 instructions
    assert choose_dtype(None, "cpu", TINY, 512, log=lines.append, measure=emulated) == "fp32"
    assert lines[0].startswith("dtype auto: bf16") and lines[1].startswith("dtype auto: fp32")
    assert "GFLOP/s in fp32" in lines[1] and "0.01x the fp32 speed" in lines[1]


def test_a_small_bf16_gain_does_not_pay_for_autocast():
    assert decide_dtype(1.2, 1.0) == "fp32"  # 1.2x faster matmuls, minus the casts: not worth it
    assert decide_dtype(MIN_BF16_GAIN, 1.0) == "bf16"


def test_an_explicit_dtype_is_kept_and_a_wrong_one_is_named():
    never, calls = fake_measure(1.0, 1.0)
    assert choose_dtype("fp32", "cpu", TINY, 512, measure=never) == "fp32"
    assert choose_dtype("bf16", "cpu", TINY, 512, measure=never) == "bf16"
    assert calls == []
    with pytest.raises(ConfigError, match="--dtype"):
        choose_dtype("fp16", "cpu", TINY, 512)


def test_probe_shapes_follow_the_model():
    cpu = ModelConfig.from_name("cpu")
    shapes = matmul_shapes(cpu, 16 * 128)
    assert all(k == cpu.hidden_size for _, k, _ in shapes)
    assert (128, cpu.hidden_size, cpu.vocab_size) in shapes  # rows capped, the output head's width kept
    assert shapes[2][0] == 128 * cpu.num_experts_per_tok // cpu.n_routed_experts  # one expert's share


def test_auto_pretraining_reports_mfu_against_the_peak_of_its_dtype(corpus, tmp_path):  # noqa: F811
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = pretrain(PretrainArgs(data=corpus["data"], tokenizer=corpus["tok"], out=str(tmp_path / "run"),
                                        **{**COMMON, "steps": 6, "eval_every": 0, "dtype": "auto"}))
        peak = peak_flops(torch.device("cpu"), summary["dtype"])
    finally:
        torch.set_num_threads(threads)
    assert summary["dtype"] in ("fp32", "bf16")
    per_token = summary["flops"] / summary["tokens"]
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s"] * per_token / peak)


def test_the_cost_ledger_prices_pretraining_at_the_dtype_it_ran(tmp_path):
    state = new_state(PRESETS["smoke"])
    ctx = Context(tmp_path, PRESETS["smoke"], state, say=lambda _: None)
    run_stages(ctx, [Stage("pretrain", "fake", lambda c: {"tokens": 10, "flops": 1e9, "dtype": "bf16"}),
                     Stage("sft", "fake", lambda c: {"tokens": 10, "flops": 1e9})])
    assert state["stages"]["pretrain"]["cost"]["dtype"] == "bf16"
    assert state["stages"]["sft"]["cost"]["dtype"] == "fp32"
