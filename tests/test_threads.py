"""seekling.threads: the thread count each command uses, decided from injected probe timings (no timing
asserts), cached briefly, overridden by --threads; and every command has the flag."""

import json
import time

import pytest
import torch

from seekling import threads
from seekling.cli import COMMANDS
from seekling.errors import ConfigError
from tests.test_cli import command_parser


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_busy_core_keeps_one_thread():
    # the collapse measured on a shared 2-core machine: 2 threads many times slower than 1
    assert threads.decide_threads({1: 1.0e-3, 2: 9.0e-3}) == 1


def test_an_idle_machine_uses_every_core():
    assert threads.decide_threads({1: 1.0e-3, 2: 0.55e-3}) == 2
    assert threads.decide_threads({1: 8.0, 2: 4.1, 4: 2.2, 8: 1.2}) == 8


def test_a_thread_that_gains_little_is_not_worth_its_core():
    assert threads.decide_threads({1: 1.0, 2: 0.97}) == 1  # 1.03x < MIN_SPEEDUP
    # 4 threads pay off against 2 even though 2 -> 4 goes past a count that did not
    assert threads.decide_threads({1: 1.0, 2: 0.98, 4: 0.4}) == 4
    assert threads.decide_threads({1: 1.0, 2: 0.5, 4: 0.49}) == 2  # the third and fourth cores are busy


def test_candidates_are_doublings_up_to_the_cores():
    assert threads.candidates(1) == [1]
    assert threads.candidates(2) == [1, 2]
    assert threads.candidates(6) == [1, 2, 4, 6]
    assert threads.candidates(8) == [1, 2, 4, 8]


def test_torchrun_ranks_share_the_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.available_cores() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.available_cores() == 1


def test_the_decision_is_measured_cached_and_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    calls = []

    def busy(counts):
        calls.append(counts)
        return {1: 2e-3, 2: 20e-3}

    lines = []
    path = str(tmp_path / "threads.json")
    assert threads.choose_threads(0, log=lines.append, measure=busy, path=path) == 1
    assert torch.get_num_threads() == 1
    assert calls == [[1, 2]]
    assert lines[0].startswith("torch threads: 1 (probe on 2 cores") and "2: 20.00 ms" in lines[0]
    assert json.loads(open(path).read())["threads"] == 1
    # a second command right after reads the cache, not the probe
    assert threads.choose_threads(None, log=lines.append, measure=busy, path=path) == 1
    assert len(calls) == 1
    # an old decision is measured again: the load may have changed
    entry = json.loads(open(path).read())
    entry["measured_at"] = time.time() - threads.CACHE_SECONDS - 1
    open(path, "w").write(json.dumps(entry))
    assert threads.choose_threads(0, log=lines.append, measure=lambda c: {1: 2e-3, 2: 1e-3}, path=path) == 2
    open(path, "w").write("{damaged")
    assert threads.choose_threads(0, log=lines.append, measure=lambda c: {1: 2e-3, 2: 1e-3}, path=path) == 2


def test_threads_flag_overrides_the_probe(tmp_path):
    def must_not_run(counts):
        raise AssertionError("--threads N must skip the probe")

    lines = []
    assert threads.choose_threads(2, log=lines.append, measure=must_not_run, path=str(tmp_path / "t.json")) == 2
    assert torch.get_num_threads() == 2 and lines == ["torch threads: 2 (--threads)"]
    with pytest.raises(ConfigError, match="--threads"):
        threads.choose_threads(-1, log=lines.append)


def test_one_core_needs_no_probe(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 1)
    assert threads.measured_threads(measure=lambda c: pytest.fail("probed one core")) == (1, "1 core available")


def test_the_real_probe_returns_a_time_per_count():
    seconds = threads.probe([1, 2], seconds=0.002, rounds=1)
    assert set(seconds) == {1, 2} and all(s > 0 for s in seconds.values())


TRAINERS_AND_SAMPLERS = ("speedrun", "pretrain", "sft", "grpo", "sample", "distill", "eval", "generate", "chat",
                         "serve")


@pytest.mark.parametrize("name", TRAINERS_AND_SAMPLERS)
def test_every_command_that_runs_a_model_has_threads(name):
    assert name in COMMANDS
    _, parser = command_parser(name)
    action = next((a for a in parser._actions if "--threads" in a.option_strings), None)
    assert action is not None, f"seekling {name} has no --threads"
    assert action.default == 0 and "probe" in action.help


def test_a_resume_keeps_the_recorded_count_and_omp_num_threads_is_honoured(tmp_path, monkeypatch):
    """A resumed trainer computes with the thread count its checkpoint was written with (bitwise resume),
    unless --threads says otherwise; OMP_NUM_THREADS set by the user is a choice too; neither probes."""
    from seekling.config import ModelConfig
    from seekling.model import Transformer
    from seekling.train_state import recorded_threads, save_training_checkpoint
    from seekling.training import build_optimizer

    def no_probe(counts):
        raise AssertionError("probed")

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model = Transformer(ModelConfig.from_name("tiny"))
        save_training_checkpoint(tmp_path, 3, model, build_optimizer(model, 1e-3))
        assert recorded_threads(tmp_path, resume=True) == 1 and recorded_threads(tmp_path, resume=False) is None
        lines = []
        assert threads.choose_threads(0, lines.append, measure=no_probe, recorded=1) == 1 and "recorded" in lines[0]
        assert threads.choose_threads(2, lines.append, measure=no_probe, recorded=1) == 2  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.choose_threads(0, lines.append, measure=no_probe) == 1 and "OMP_NUM_THREADS" in lines[-1]
    finally:
        torch.set_num_threads(before)
