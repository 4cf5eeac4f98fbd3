"""GRPO's health signals and warnings (seekling.rl_health): each warning triggered by a scripted run
of per-step metrics, the live monitor logging it once, real tiny runs that log the signals (KL to the
start even at beta 0), warn about a failing reward, and end without a success message when nothing
was trained; the report card's health section."""

import json

import pytest

from seekling.checkpoint import save_pretrained
from seekling.cli import main
from seekling.grpo import train_grpo
from seekling.report import health_blocks
from seekling.rl_health import WINDOW, HealthMonitor, check_history, health_summary
from seekling.tasks import make_problems
from tests.test_grpo import small_cfg, tiny, user_rewards  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_thread", "user_rewards")


def healthy(step, **changes):
    """A step of a run that is learning: mixed groups, entropy well up, short answers."""
    return {"step": step, "zero_variance_groups": 0.25, "entropy": 1.2, "truncated": 0.05, "format": 0.9,
            "accuracy": 0.5, "response_length": 40.0, "clip_fraction": 0.01, "kl": 0.002, **changes}


def run_of(n, bad_from=None, **bad):
    return [healthy(s, **(bad if bad_from is not None and s >= bad_from else {})) for s in range(1, n + 1)]


def signals(history):
    return [(w.step, w.signal) for w in check_history(history)]


def test_a_healthy_run_raises_nothing():
    assert signals(run_of(30)) == []


def test_all_groups_uninformative_for_window_steps():
    history = run_of(12, bad_from=4, zero_variance_groups=1.0, skipped=1)
    assert signals(history) == [(4 + WINDOW - 1, "uninformative")]  # once, when the streak reaches WINDOW
    assert signals(run_of(12, bad_from=9, zero_variance_groups=1.0)) == []  # 4 bad steps: not yet


def test_a_signal_that_recovers_warns_again_when_it_goes_bad_again():
    history = run_of(30, bad_from=1, zero_variance_groups=1.0)
    for r in history[10:15]:
        r["zero_variance_groups"] = 0.5
    assert signals(history) == [(WINDOW, "uninformative"), (15 + WINDOW, "uninformative")]


def test_entropy_collapse_absolute_and_relative():
    assert signals(run_of(12, bad_from=3, entropy=0.01)) == [(3 + WINDOW - 1, "entropy_collapse")]
    # 1.2 -> 0.1 nats is above the floor but below a tenth of where it started
    assert signals(run_of(14, bad_from=7, entropy=0.1)) == [(7 + WINDOW - 1, "entropy_collapse")]


def test_length_pinned_at_the_cap():
    assert signals(run_of(10, bad_from=2, truncated=1.0, response_length=64.0)) == [(2 + WINDOW - 1, "length_pinned")]


def test_format_rising_while_accuracy_falls():
    history = run_of(2 * WINDOW)
    for r in history[WINDOW:]:
        r.update(format=1.0, accuracy=0.3)
    history[0]["format"] = 0.2  # the first window averages well below the second
    for r in history[1:WINDOW]:
        r["format"] = 0.5
    assert signals(history) == [(2 * WINDOW, "format_up_accuracy_down")]
    for r in history[WINDOW:]:
        r["accuracy"] = 0.6  # format up with accuracy up is learning, not gaming
    assert signals(history) == []


def test_a_failing_reward_warns_at_once_and_names_itself():
    history = run_of(6)
    for r in history[2:]:
        r["reward_failed/my_mod:brevity"] = 8 * (r["step"] - 2)
    warnings = check_history(history)
    assert [(w.step, w.signal) for w in warnings] == [(3, "reward_failed")]
    assert "'my_mod:brevity'" in warnings[0].message and "non-number" in warnings[0].message


def test_the_live_monitor_logs_each_warning_once():
    lines = []
    monitor = HealthMonitor(lines.append)
    for record in run_of(3 * WINDOW, bad_from=1, zero_variance_groups=1.0, skipped=1):
        monitor.update(record)
    assert len(lines) == 1 and lines[0].startswith(f"warning: grpo step {WINDOW}: uninformative")
    assert monitor.summary()["trained_steps"] == 0 and monitor.summary()["steps"] == 3 * WINDOW


def test_the_report_card_has_a_health_section():
    md = health_blocks(run_of(3 * WINDOW, bad_from=1, zero_variance_groups=1.0, skipped=1))
    assert md[0] == ("h2", "GRPO health")
    assert "Nothing was trained" in md[2][1]
    assert any("uninformative" in line for line in md[3][1])
    assert health_blocks([]) == []
    ok = health_blocks(run_of(4))
    assert "4 of 4 steps updated the model" in ok[2][1] and "No warnings" in ok[2][1]
    assert ["KL to the starting policy", "0.002", "0.002", "0.002"] in ok[1][2]


# ----------------------------------------------------------------------------- real tiny runs
def test_signals_are_logged_and_kl_to_the_start_is_measured_at_beta_zero(tmp_path, tokenizer):
    cfg = small_cfg(steps=3, beta=0.0, rewards={"tests_grpo_rewards:distinct": 1.0}, lr=1e-2)
    summary = train_grpo(tiny(tokenizer), tokenizer, make_problems("arithmetic", "train", 8, 0), cfg,
                         tmp_path / "r", log=lambda s: None)
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for key in ("entropy", "clip_fraction", "kl", "zero_variance_groups", "truncated", "response_length",
                "reward/tests_grpo_rewards:distinct"):
        assert all(key in r for r in records if not r.get("skipped")), key
    trained = [r for r in records if not r.get("skipped")]
    assert trained[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout comes from the start itself
    assert trained[-1]["kl"] > 0 and trained[-1]["step"] > 1  # updated weights have drifted from it
    assert summary["health"]["trained_steps"] == len(trained) > 0


def test_a_raising_reward_is_warned_about_in_the_console(tmp_path, tokenizer):
    """A reward that raises on some samples is warned about (one failing on all of them stops the run:
    tests/test_grpo.py)."""
    lines = []
    cfg = small_cfg(steps=1, rewards={"tests_grpo_rewards:flaky": 1.0, "tests_grpo_rewards:distinct": 1.0})
    summary = train_grpo(tiny(tokenizer), tokenizer, make_problems("arithmetic", "train", 4, 0), cfg,
                         tmp_path / "r", log=lines.append)
    assert any("reward_failed" in line and "tests_grpo_rewards:flaky" in line for line in lines)
    assert summary["health"]["warnings"][0]["signal"] == "reward_failed"


def test_a_run_that_trained_nothing_does_not_end_in_success(tmp_path, tokenizer, capsys):
    model_dir, tok_dir = tmp_path / "model", tmp_path / "tok"
    save_pretrained(tiny(tokenizer), str(model_dir))
    tokenizer.save(tok_dir)
    code = main(["grpo", "--init-from", str(model_dir), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "r"),
                 "--tasks", "arithmetic", "--num-problems", "8", "--reward", "tests_grpo_rewards:constant=1",
                 "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--steps", str(WINDOW),
                 "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "GRPO trained nothing" in out and "final model in" not in out
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert health_summary(records)["warnings"][0]["signal"] == "uninformative"
