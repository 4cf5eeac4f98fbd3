"""Cost ledger, CPU peak cache, DeepSeek-V3's table and the `seekling cost` command."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from seekling import cost
from seekling.cli import main
from seekling.config import ModelConfig
from seekling.cost import CostLedger, estimate, mfu, parse_count
from seekling.errors import SeeklingError
from seekling.flops import model_flops

DEEPSEEK_ARGS = ["cost", "--preset", "deepseek-v3", "--tokens", "14.8T", "--device", "h800", "--devices", "2048"]


@pytest.fixture(autouse=True)
def _fake_cpu(monkeypatch, tmp_path):
    """Keep the CPU peak cache in a temporary directory and make the 'benchmark' instant."""
    monkeypatch.setenv("SEEKLING_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_benchmark(threads, **kwargs):
        calls.append(threads)
        return {"fp32": 50e9 * threads, "bf16": 20e9 * threads}

    monkeypatch.setattr(cost, "benchmark_cpu_peak", fake_benchmark)
    return calls


# ----------------------------------------------------------------------------- small pieces
def test_mfu_and_its_errors():
    assert mfu(989e12 * 10, 10, 989e12) == pytest.approx(1.0)
    assert mfu(6e15, 3600, 2 * 989e12) == pytest.approx(6e15 / (3600 * 1978e12))
    for bad in [(1e12, 0, 1e12), (1e12, 1, 0), (-1, 1, 1)]:
        with pytest.raises(SeeklingError):
            mfu(*bad)


@pytest.mark.parametrize("text, value", [
    ("14.8T", 14.8e12), ("2e9", 2e9), ("500M", 5e8), ("1,000,000", 1e6), ("2664K", 2.664e6), ("1.5b", 1.5e9), (7, 7.0),
])
def test_parse_count(text, value):
    assert parse_count(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "-3", "-1M", "abc", "1.5X", "", "nan", 0, -2.0])
def test_parse_count_rejects(text):
    with pytest.raises(SeeklingError):
        parse_count(text, "--tokens")


def test_cpu_peak_is_measured_once_per_cpu_and_thread_count(tmp_path, _fake_cpu):
    path = str(tmp_path / "peak.json")
    first = cost.cpu_peak(threads=2, path=path)
    again = cost.cpu_peak(threads=2, path=path)
    assert _fake_cpu == [2] and again["fp32"] == first["fp32"] == 100e9
    cost.cpu_peak(threads=1, path=path)
    assert _fake_cpu == [2, 1]
    with open(path) as f:
        table = json.load(f)
    assert sorted(table) == sorted(f"{cost.cpu_model()} | threads={n}" for n in (1, 2))
    with open(path, "w") as f:
        f.write("{not json")
    cost.cpu_peak(threads=2, path=path)  # a damaged cache is measured again, not an error
    assert _fake_cpu == [2, 1, 2]
    assert cost.device_peak("cpu", "bf16", threads=2) == pytest.approx(20e9)  # per core


def test_a_peak_measured_on_a_busy_machine_is_measured_again_and_the_best_kept(tmp_path, _fake_cpu):
    path = str(tmp_path / "peak.json")
    cost.cpu_peak(threads=1, path=path)  # 50 GFLOP/s
    with open(path) as f:
        table = json.load(f)
    table[f"{cost.cpu_model()} | threads=2"] = {"cpu": "x", "threads": 2, "fp32": 30e9, "bf16": 50e9}  # busy then
    with open(path, "w") as f:
        json.dump(table, f)
    entry = cost.cpu_peak(threads=2, path=path)
    assert _fake_cpu == [1, 2]  # two threads below one thread's peak: measured again
    assert entry["fp32"] == 100e9 and entry["bf16"] == 50e9  # the best of the two measurements, per dtype
    cost.cpu_peak(threads=2, path=path)
    assert _fake_cpu == [1, 2]  # plausible now: taken from the cache


def test_real_matmul_benchmark_measures_something():
    import torch

    from seekling.cost import _matmul_rate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a second one stalls badly when other jobs share the cores
    try:
        fp32 = _matmul_rate(torch.float32, 128, 0.05)
        bf16 = _matmul_rate(torch.bfloat16, 128, 0.05)
    finally:
        torch.set_num_threads(threads)
    assert 1e8 < fp32 < 1e14 and 1e7 < bf16 < 1e14  # a CPU core does between 0.1 GFLOP/s and 100 TFLOP/s


# ----------------------------------------------------------------------------- ledger
def test_ledger_prices_a_gpu_stage_by_hand():
    ledger = CostLedger()
    # 2 H800s for 30 minutes at half of 989 TFLOP/s each
    flops = 0.5 * 2 * 989e12 * 1800
    row = ledger.record("pretrain", seconds=1800, flops=flops, tokens=1_000_000, devices=2, device="h800")
    assert row.device_hours == pytest.approx(1.0)
    assert row.dollars == pytest.approx(2.0)
    assert row.mfu == pytest.approx(0.5)
    eq = row.gpu_equivalent(0.5)
    assert eq["h800"]["gpu_hours"] == pytest.approx(1.0)
    assert eq["a100"]["gpu_hours"] == pytest.approx(989 / 312)
    assert eq["h100"]["dollars"] == pytest.approx(cost.PRICES["h100"])


def test_ledger_cpu_stage_dict_and_markdown():
    ledger = CostLedger(prices={"cpu": 0.1})
    ledger.record("sft", seconds=7200, flops=1e15, tokens=5_000, devices=4, device="cpu", peak_per_device=50e9)
    ledger.record("grpo", seconds=3600, flops=2e14, tokens=1_000, devices=4, device="cpu")  # fake probe: 50 GFLOP/s
    d = ledger.to_dict()
    sft, grpo = d["stages"]
    assert sft["device_hours"] == pytest.approx(8.0) and sft["dollars"] == pytest.approx(0.8)
    assert sft["mfu"] == pytest.approx(1e15 / (7200 * 4 * 50e9))
    assert grpo["dtype"] == "fp32" and grpo["peak_per_device"] == pytest.approx(50e9)
    assert d["totals"]["device_hours"] == pytest.approx(12.0)
    assert d["totals"]["tokens"] == 6_000
    json.dumps(d)  # plain data
    md = ledger.to_markdown()
    assert md.count("\n") == 4  # header, rule, two stages, total
    assert "| sft | 4 x cpu (fp32) | 2.0 hours |" in md and "**total**" in md and "$1.20" in md


def test_ledger_stage_context_manager_times_the_block():
    ledger = CostLedger()
    with ledger.stage("eval", device="h100", devices=1) as s:
        s.add(tokens=10, flops=1e9)
        s.add(tokens=5, flops=1e9)
    (row,) = ledger.stages
    assert (row.tokens, row.flops, row.dtype) == (15, 2e9, "bf16")
    assert 0 <= row.seconds < 5


def test_ledger_rejects_bad_stages():
    ledger = CostLedger()
    with pytest.raises(SeeklingError, match="unknown device"):
        ledger.record("x", 1, 1, device="tpu")
    with pytest.raises(SeeklingError, match="devices"):
        ledger.record("x", 1, 1, devices=0, device="h800")
    with pytest.raises(SeeklingError):
        CostLedger(reference_mfu=0)


# ----------------------------------------------------------------------------- DeepSeek-V3
def test_deepseek_v3_table_adds_up():
    assert sum(cost.DEEPSEEK_V3_GPU_HOURS.values()) == cost.DEEPSEEK_V3_TOTAL_GPU_HOURS == 2_788_000
    assert cost.DEEPSEEK_V3_TOTAL_GPU_HOURS * cost.DEEPSEEK_V3_PRICE == pytest.approx(cost.DEEPSEEK_V3_TOTAL_DOLLARS)
    table = cost.deepseek_v3_table()
    for text in ("| pre-training | 2,664K | $5.328M | 54.2 |", "$0.238M", "| **total** | 2,788K | $5.576M |",
                 "180K GPU-hours per trillion tokens (3.7 days"):
        assert text in table


def _field(out: str, label: str) -> str:
    m = re.search(rf"^{label}\s+(.+)$", out, re.MULTILINE)
    assert m, f"no {label!r} line in:\n{out}"
    return m.group(1)


def test_cli_implies_deepseek_mfu_and_reproduces_their_pretraining_row(capsys):
    assert main([*DEEPSEEK_ARGS, "--gpu-hours", "2664000"]) == 0
    out = capsys.readouterr().out
    implied = float(_field(out, "MFU").split()[0])
    c = ModelConfig.from_name("deepseek-v3")
    expected = model_flops(c, 14.8e12, 4096) / (2_664_000 * 3600 * 989e12)
    assert implied == pytest.approx(expected, abs=1e-4)
    assert 0.3 < implied < 0.5  # a plausible MFU for bf16-peak accounting of an FP8 run
    assert _field(out, "GPU-hours") == "2,664K"

    assert main([*DEEPSEEK_ARGS, "--mfu", str(implied)]) == 0
    out = capsys.readouterr().out
    gpu_hours = float(_field(out, "GPU-hours").rstrip("K").replace(",", "")) * 1e3
    dollars = float(_field(out, "cost").strip("$M")) * 1e6
    days = float(_field(out, "wall-clock").split()[0])
    assert gpu_hours == pytest.approx(2_664_000, rel=0.05)
    assert dollars == pytest.approx(5.328e6, rel=0.05)
    assert days == pytest.approx(54.2, rel=0.05)


def test_estimate_by_hand_on_tiny():
    c = ModelConfig.from_name("tiny")
    est = estimate(c, 1e9, seq_len=128, device="h100", devices=4, mfu=0.5)
    flops = model_flops(c, 1e9, 128)
    assert est["total_flops"] == pytest.approx(flops)
    assert est["device_hours"] == pytest.approx(flops / (989e12 * 0.5) / 3600)
    assert est["wall_days"] == pytest.approx(est["device_hours"] / 4 / 24)
    assert est["dollars"] == pytest.approx(est["device_hours"] * cost.PRICES["h100"])
    fwd = estimate(c, 1e9, seq_len=128, device="h100", mfu=0.5, training=False)
    assert fwd["total_flops"] == pytest.approx(flops / 3)
    cpu = estimate(c, 1e6, device="cpu", devices=2, mfu=0.25)  # fake probe: 50 GFLOP/s fp32 per core
    assert cpu["seq_len"] == 512 and cpu["dtype"] == "fp32"
    assert cpu["device_hours"] == pytest.approx(model_flops(c, 1e6, 512) / (50e9 * 0.25) / 3600)


def test_cli_deepseek_table_and_cpu_run(capsys):
    assert main(["cost", "--deepseek-table"]) == 0
    assert "| context extension | 119K | $0.238M | 2.4 |" in capsys.readouterr().out
    assert main(["cost", "--preset", "tiny", "--tokens", "2M", "--device", "cpu", "--devices", "2"]) == 0
    out = capsys.readouterr().out
    assert "core-hours" in out and "assumed" in out


@pytest.mark.parametrize("args, message", [
    (["--preset", "tiny", "--tokens", "0"], "--tokens must be positive"),
    (["--preset", "tiny", "--tokens=-5M"], "--tokens must be positive"),
    (["--preset", "tiny", "--tokens", "1M", "--devices", "0"], "--devices must be positive"),
    (["--preset", "tiny", "--tokens", "1M", "--mfu", "1.2"], "MFU must lie in (0, 1]"),
    (["--preset", "tiny", "--tokens", "1M", "--mfu", "0"], "MFU must lie in (0, 1]"),
    (["--preset", "tiny", "--tokens", "1M", "--gpu-hours", "-3"], "--gpu-hours must be positive"),
    (["--preset", "tiny", "--tokens", "1M", "--device", "tpu"], "unknown device 'tpu'; known: h800, h100, a100, cpu"),
    (["--preset", "gpt5", "--tokens", "1M"], "unknown model preset 'gpt5'; known: tiny, cpu"),
    (["--preset", "tiny", "--tokens", "1M", "--seq-len", "4096"], "max_position_embeddings=512"),
    (["--preset", "tiny", "--tokens", "1M", "--mfu", "0.4", "--gpu-hours", "10"], "not both"),
    (["--tokens", "1M"], "give --preset NAME"),
    (["--preset", "tiny"], "give --tokens"),
])
def test_cli_bad_input_exits_2_with_a_clear_message(args, message, capsys):
    assert main(["cost", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no traceback


def test_every_flag_has_help():
    from seekling.commands import cost as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    for action in parser._actions:
        assert action.help, action.option_strings
    assert command.__doc__ and command.run


def test_docs_show_what_the_command_prints(capsys):
    import os

    doc_path = os.path.join(os.path.dirname(__file__), "..", "docs", "cost.md")
    if not os.path.exists(doc_path):
        pytest.skip("docs/cost.md is not in this checkout")
    with open(doc_path) as f:
        doc = f.read()
    assert main([*DEEPSEEK_ARGS, "--gpu-hours", "2664K", "--deepseek-table"]) == 0
    assert capsys.readouterr().out.rstrip() in doc
