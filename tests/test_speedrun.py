"""seekling speedrun: the `smoke` preset end to end (report, tables, plots filled from that run), resume
after a kill, the resumable stage loop with fake stages, and every bad input refused before any work.

    .venv/bin/python -m pytest -q tests/test_speedrun.py              # ~1-2 minutes on 2 cores
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seekling.cli import main
from seekling.errors import ConfigError, SeeklingError
from seekling.files import write_json_atomic
from seekling.rundir import check_run_dir, new_state, read_state
from seekling.presets import PRESETS, get_preset, validate_preset
from seekling.speedrun import Context, Stage, run_speedrun, run_stages

ROOT = Path(__file__).resolve().parents[1]
ALL_STAGES = ["data", "tokenizer", "pretrain", "eval_pretrain", "sft", "eval_sft", "grpo", "eval_grpo", "distill",
              "eval_distill"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One real `smoke` speedrun, shared by the tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("speedrun") / "smoke"
    lines: list[str] = []
    start = time.perf_counter()
    state = run_speedrun(PRESETS["smoke"], run_dir, threads=1, say=lines.append)
    return {"dir": run_dir, "state": state, "lines": lines, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- end to end
def test_smoke_preset_runs_every_stage_and_fills_the_report(smoke_run):
    run_dir, state = smoke_run["dir"], smoke_run["state"]
    assert smoke_run["seconds"] < 120
    assert state["finished"] == ALL_STAGES
    assert read_state(run_dir)["finished"] == ALL_STAGES  # what is on disk, not only in memory
    # one line as each stage starts and one as it ends, numbered
    for i, name in enumerate(ALL_STAGES, start=1):
        assert sum(line.startswith(f"[{i}/10] {name}:") for line in smoke_run["lines"]) == 2

    md = (run_dir / "report.md").read_text()
    # the results table holds this run's numbers: each row equals eval/STAGE.json
    for stage, label in (("pretrain", "after pre-training"), ("sft", "after cold-start SFT"), ("grpo", "after GRPO")):
        m = json.loads((run_dir / "eval" / f"{stage}.json").read_text())["mean"]
        row = f"| {label} | {100 * m['pass@1']:.1f}% | {100 * m['cons@2']:.1f}% | {100 * m['format']:.1f}% " \
              f"| {m['mean_length']:.1f} |"
        assert row in md
        assert m["mean_length"] > 0
    distill = state["stages"]["distill"]
    if "skipped" in distill:  # a teacher with no verified sample leaves nothing to distil: said so
        assert "| after distillation | skipped (see Notes) |" in md and f"distill: skipped ({distill['skipped']})" in md
    else:
        assert (run_dir / "eval" / "distill.json").is_file() and distill["tokens"] > 0
    # the environment and the cost table
    assert f"| torch / python | {torch.__version__}" in md
    assert "| torch threads / ranks | 1 / 1 |" in md
    # GRPO's health: the signals of its first and last step, and what it concluded
    assert "## GRPO health" in md and re.search(r"^\| groups with equal rewards \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$",
                                                  md, re.M)
    trained = sum(not r.get("skipped") for r in map(json.loads, (run_dir / "grpo" / "metrics.jsonl").open()))
    assert (f"{trained} of 3 steps updated the model" if trained else "**Nothing was trained**") in md
    if trained:  # KL to the start is measured at beta 0 on the steps that trained
        assert re.search(r"^\| KL to the starting policy \| .* \| [0-9.]+ \|$", md, re.M)
    for stage in ("pretrain", "sft", "grpo", "eval_pretrain"):
        assert re.search(rf"^\| {stage} \| 1 x cpu \(fp32\) \|", md, re.M)

    # the cost ledger: pre-training's tokens and FLOPs by hand
    from seekling.config import ModelConfig
    from seekling.flops import flops_per_token

    p = PRESETS["smoke"]
    cost = json.loads((run_dir / "cost.json").read_text())
    pretrain_row = next(s for s in cost["stages"] if s["stage"] == "pretrain")
    tokens = p.pretrain_steps * p.pretrain_batch_size * p.seq_len
    vocab = state["stages"]["tokenizer"]["vocab_size"]
    per_token = flops_per_token(ModelConfig.from_name("tiny", vocab_size=vocab), p.seq_len)["total"]
    assert pretrain_row["tokens"] == tokens
    assert pretrain_row["flops"] == pytest.approx(tokens * per_token)
    assert 0 < pretrain_row["mfu"] < 1
    assert pretrain_row["seconds"] == pytest.approx(state["stages"]["pretrain"]["seconds"])
    assert cost["totals"]["dollars"] > 0


def test_smoke_report_plots_and_self_contained_html(smoke_run):
    run_dir = smoke_run["dir"]
    for name in ("pretrain_loss.png", "grpo.png", "expert_load.png", "pass_at_1.png"):
        data = (run_dir / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    page = (run_dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert not re.search(r'src="(?!data:)', page)  # nothing to fetch: one file carries everything
    assert "<table>" in page and "after cold-start SFT" in page


def test_smoke_report_reads_as_a_person_needs_it(smoke_run):
    """Dollars and hours in plain decimals, the wide GRPO figure at full width without a caption that
    repeats its title, the distillation funnel, the settings as a table, and what to run next."""
    run_dir, state = smoke_run["dir"], smoke_run["state"]
    md, page = (run_dir / "report.md").read_text(), (run_dir / "report.html").read_text()
    cost = md[md.index("## Cost per stage"):md.index("## Plots")]
    assert "$" in cost
    for row in re.findall(r"^\| \w+ \| \d+ x .*$", cost, re.M):  # the stages' rows
        hours, dollars = row.split(" | ")[-2:]
        assert "e-" not in hours and "e-" not in dollars, row
    assert "<figcaption>" not in page and page.count('<figure class="wide">') == 1
    assert "## Distillation data" in md and "| arithmetic | 16 | 32 |" in md
    assert "| setting | value | setting | value |" in md and "| `grpo_steps` | 3 |" in md
    best = max(("pretrain", "sft", "grpo"), key=lambda s: (state["stages"][f"eval_{s}"]["metrics"]["pass@1"],
                                                            ("pretrain", "sft", "grpo").index(s)))
    assert f"The best model of this run is **{best}**" in md and f"seekling chat {run_dir}" in md

    # the per-expert load heatmap's data: every checkpoint, each token routed to top-k experts
    loads = json.loads((run_dir / "pretrain" / "expert_load.json").read_text())
    p = PRESETS["smoke"]
    every = p.pretrain_steps // p.pretrain_checkpoints
    assert loads["steps"] == list(range(every, p.pretrain_steps + 1, every))
    top_k = 2  # the tiny model's num_experts_per_tok
    for checkpoint in loads["load"]:
        for layer in checkpoint:
            assert len(layer) == 8 and sum(layer) == pytest.approx(top_k * loads["tokens_per_checkpoint"])
    # measured, then only the last pre-training checkpoint is kept
    assert [d.name for d in (run_dir / "pretrain" / "checkpoints").iterdir() if d.name.startswith("step_")] == \
        [f"step_{p.pretrain_steps:07d}"]
    # the GRPO plot is drawn from this run's metrics
    grpo = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grpo] == list(range(1, p.grpo_steps + 1))


def test_rerunning_a_finished_run_only_rewrites_the_report(smoke_run):
    run_dir = smoke_run["dir"]
    before = {name: (run_dir / "eval" / f"{name}.json").read_text() for name in ("pretrain", "sft", "grpo")}
    lines: list[str] = []
    state = run_speedrun(PRESETS["smoke"], run_dir, threads=1, say=lines.append)
    assert sum("finished earlier, skipped" in line for line in lines) == len(ALL_STAGES)
    assert state["finished"] == ALL_STAGES
    assert {name: (run_dir / "eval" / f"{name}.json").read_text() for name in before} == before


def test_kill_during_pretraining_then_rerun_resumes_and_matches(smoke_run, tmp_path):
    """SIGKILL the command once pre-training has saved a checkpoint; the same command resumes from it and
    ends where the uninterrupted run ended (pre-training's resume is exact)."""
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "seekling.cli", "speedrun", "--preset", "smoke", "--out", str(run_dir),
           "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoints = run_dir / "pretrain" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints.is_dir() and any(d.name.startswith("step_") for d in checkpoints.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "pre-training never saved a checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = read_state(run_dir)
    assert "tokenizer" in state["finished"] and "pretrain" not in state["finished"]

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[1/10] data: finished earlier, skipped" in out.stdout
    state = read_state(run_dir)
    assert state["finished"] == ALL_STAGES
    assert state["stages"]["pretrain"]["resumed_from"] is not None
    assert state["stages"]["pretrain"]["steps_run"] < PRESETS["smoke"].pretrain_steps
    ours = (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    reference = (smoke_run["dir"] / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in ours] == [json.loads(r)["loss"] for r in reference]
    assert (run_dir / "report.html").is_file()


# ----------------------------------------------------------------------------- the stage loop, with fake stages
def _fake_stages(calls: list[str], fail_at: str | None = None, error: BaseException = KeyboardInterrupt()):
    def make(name: str):
        def run(ctx):
            calls.append(name)
            if name == fail_at:
                raise error
            return {"tokens": 10, "flops": 1e6, "summary": f"{name} ok"}
        return run
    return [Stage(name, f"fake {name}", make(name)) for name in ("a", "b", "c")]


def _context(tmp_path, rank: int = 0) -> Context:
    preset = PRESETS["smoke"]
    state = new_state(preset)
    write_json_atomic(tmp_path / "state.json", state)
    return Context(tmp_path, preset, state, say=lambda _: None, rank=rank)


def test_interrupted_stage_is_not_marked_finished_and_rerun_continues_there(tmp_path):
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_stages(_context(tmp_path), _fake_stages(calls, fail_at="b"))
    assert calls == ["a", "b"]
    state = read_state(tmp_path)
    assert state["finished"] == ["a"] and state["stages"]["a"]["cost"]["tokens"] == 10
    assert not list(tmp_path.glob(".*.tmp"))  # the state was replaced whole

    calls.clear()
    ctx = Context(tmp_path, PRESETS["smoke"], read_state(tmp_path), say=lambda _: None)
    run_stages(ctx, _fake_stages(calls))
    assert calls == ["b", "c"]  # a is not run twice
    assert read_state(tmp_path)["finished"] == ["a", "b", "c"]


def test_full_disk_during_a_stage_is_a_clear_error_and_keeps_finished_stages(tmp_path):
    calls: list[str] = []
    full = OSError(errno.ENOSPC, "No space left on device", "x.safetensors")
    with pytest.raises(SeeklingError, match="disk is full.*run the same command to resume"):
        run_stages(_context(tmp_path), _fake_stages(calls, fail_at="c", error=full))
    assert read_state(tmp_path)["finished"] == ["a", "b"]


def test_other_ranks_run_only_multi_rank_stages_and_stop_after_the_last(tmp_path):
    calls: list[str] = []
    stages = _fake_stages(calls)
    stages[1].all_ranks = True
    events = []
    run_stages(_context(tmp_path, rank=1), stages, barrier=lambda: events.append("barrier"),
               leave=lambda: events.append("leave"))
    assert calls == ["b"]
    assert events == ["barrier", "barrier", "leave"]  # after a (rank 0's) and b, then out of the group
    assert read_state(tmp_path)["finished"] == []  # only rank 0 writes the state

    calls.clear()
    events.clear()  # rank 0 meets the same barriers, leaves the group, then runs c alone
    (tmp_path / "rank0").mkdir()
    run_stages(_context(tmp_path / "rank0"), stages, barrier=lambda: events.append("barrier"),
               leave=lambda: events.append("leave"))
    assert calls == ["a", "b", "c"] and events == ["barrier", "barrier", "leave"]


# ----------------------------------------------------------------------------- bad input
def test_unknown_preset_lists_the_known_ones(capsys):
    assert main(["speedrun", "--preset", "laptop"]) == 2
    err = capsys.readouterr().err
    assert "unknown speedrun preset 'laptop'" in err
    for name in PRESETS:
        assert name in err


def test_bad_override_names_the_settable_fields():
    with pytest.raises(ConfigError, match="FIELD one of: .*grpo_steps"):
        get_preset("smoke", ["grpo_stepz=3"])
    with pytest.raises(ConfigError, match="not a valid int"):
        get_preset("smoke", ["grpo_steps=many"])
    assert get_preset("smoke", ["grpo_steps=7", "pretrain_tasks=linear"]).grpo_steps == 7
    assert get_preset("smoke", ["grpo_distinct=true"]).grpo_distinct and not get_preset("smoke", ["grpo_distinct=0"]).grpo_distinct
    with pytest.raises(ConfigError, match="not a valid bool"):
        get_preset("smoke", ["grpo_distinct=maybe"])
    with pytest.raises(ConfigError, match=r"group_size \(G\) must be >= 2"):
        run_speedrun(get_preset("smoke", ["group_size=1"]), "/nonexistent/never-created")


def test_presets_build_the_trainers_configs_and_check_them_there():
    for preset in PRESETS.values():
        validate_preset(preset)
    p = PRESETS["smoke"]
    assert (p.grpo_config().save_every, p.grpo_config().loss_aggregation) == (p.grpo_save_every, p.grpo_loss)
    assert p.sft_config(p.distill_steps).steps == p.distill_steps and p.eval_settings().k == p.eval_k
    assert p.sft_config(p.distill_steps, p.distill_lr).lr == p.sft_lr  # distill_lr None: the cold start's lr
    assert get_preset("smoke", ["distill_lr=2e-5"]).distill_lr == 2e-5
    for bad, message in [("grpo_loss=nope", "unknown loss aggregation 'nope'"), ("dtype=fp16", "--dtype must be"),
                         ("distributed=tp", "--distributed must be ddp or fsdp"), ("eval_k=0", "k must be >= 1"),
                         ("model=huge", "unknown model preset 'huge'"), ("sft_seq_len=4096", "exceed the 'tiny'"),
                         ("distill_student=teacher", "distill_student must be one of pretrain, sft, grpo"),
                         ("pretrain_difficulty=countdown.count=3", "pretrain_difficulty is set for .'countdown'."),
                         ("pretrain_difficulty=arithmetic.worked=2", "worked must be in")]:
        with pytest.raises(ConfigError, match=message):
            validate_preset(get_preset("smoke", [bad]))


def test_directory_of_another_preset_or_config_is_refused_with_a_new_out(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json_atomic(run_dir / "state.json", new_state(PRESETS["smoke"]))
    with pytest.raises(ConfigError, match=r"preset 'smoke', not 'cpu'.*--out .*run-2"):
        check_run_dir(run_dir, PRESETS["cpu"])
    with pytest.raises(ConfigError, match=r"other settings \(grpo_steps: 3 there, 9 now\).*--out .*run-2"):
        check_run_dir(run_dir, get_preset("smoke", ["grpo_steps=9"]))
    assert check_run_dir(run_dir, PRESETS["smoke"])["preset"] == "smoke"  # the same run resumes
    # a run started before a field existed resumes if the field keeps its default, and not otherwise
    state = new_state(PRESETS["smoke"])
    del state["config"]["distributed"], state["config"]["distill_steps"]  # smoke: default ddp, but 6 not 40
    write_json_atomic(run_dir / "state.json", state)
    with pytest.raises(ConfigError, match=r"\(distill_steps: None there, 6 now\)"):
        check_run_dir(run_dir, PRESETS["smoke"])


def test_non_run_directory_file_and_unwritable_out_are_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a speedrun directory"):
        check_run_dir(tmp_path / "notes", PRESETS["smoke"])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SeeklingError, match="cannot write to"):  # as root too: a file is in the way
        check_run_dir(tmp_path / "afile" / "run", PRESETS["smoke"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a speedrun state file"):
        check_run_dir(tmp_path / "bad", PRESETS["smoke"])
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_too_little_free_space_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    run_dir = tmp_path / "run"
    assert main(["speedrun", "--preset", "smoke", "--out", str(run_dir)]) == 2
    assert "GB free" in capsys.readouterr().err
    assert not (run_dir / "state.json").exists()


# ----------------------------------------------------------------------------- the golden file
def test_smoke_run_reproduces_the_golden_file(smoke_run):
    """Per-step losses, GRPO rewards, eval numbers and sampled texts equal those recorded before the refactor."""
    import golden_record

    fingerprint = golden_record.numerics_fingerprint()
    record = golden_record.record_of(smoke_run["dir"])
    if os.environ.get("SEEKLING_RECORD_GOLDEN"):
        golden_record.save(fingerprint, record)
    golden = golden_record.load()
    assert golden, f"no golden file at {golden_record.GOLDEN}"
    if fingerprint in golden:
        expected = golden[fingerprint]
        for stage, rows in expected["stages"].items():
            assert record["stages"][stage] == rows, f"{stage}: per-step metrics differ from the golden file"
        assert record["eval"] == expected["eval"]
        assert record.get("distill_samples") == expected.get("distill_samples")
        return
    # Another CPU's rounding: the structure and the first pre-training loss (before any update) still hold.
    any_record = next(iter(golden.values()))
    assert [r["step"] for r in record["stages"]["grpo"]] == [r["step"] for r in any_record["stages"]["grpo"]]
    assert record["stages"]["pretrain"][0]["loss"] == pytest.approx(any_record["stages"]["pretrain"][0]["loss"],
                                                                    rel=1e-4)
    pytest.skip(f"numerics fingerprint {fingerprint} has no golden record; see tests/golden_record.py")
