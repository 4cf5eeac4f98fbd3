"""Fault injection: damaged files, kill points, bad invocations and bad requests (the harness is
tests/fault_cases.py). The default tests try each kind once; `-m slow` runs the full matrix and
prints the table (trials, named error, recovered, unclear, silent, traceback) that must show no
silent acceptance and no traceback:

    .venv/bin/python -m pytest -q tests/test_faults.py                 # each kind once, < 1 minute
    .venv/bin/python -m pytest -q -s -m slow tests/test_faults.py -k full  # the whole table
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import random
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import make_pretrain_corpus
import torch

import fault_cases as fc
from test_serving import ANSWER, build_model_dir, live_server

from seekling.checkpoint import load_pretrained
from seekling.cli import COMMANDS, build_parser
from seekling.commands import finite_float, serve
from seekling.config import ModelConfig
from seekling.errors import CheckpointError, SeeklingError
from seekling.files import write_json_atomic
from seekling.model import Transformer
from seekling.presets import PRESETS
from seekling.pretrain import PretrainArgs, pretrain
from seekling.rundir import new_state
from seekling.server import create_app
from seekling.serving import Engine, load_for_serving
from seekling.speedrun import Stage, eval_stage, measure_expert_load, run_speedrun
from seekling.tasks import make_problems
from seekling.train_state import list_checkpoints, save_training_checkpoint
from seekling.training import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 12
SMOKE = PRESETS["smoke"].replace(eval_n=4)  # the speedrun settings of the damaged-output trials
COMMON = dict(preset="tiny", steps=STEPS, batch_size=4, seq_len=32, warmup=2, lr=3e-3, eval_every=6,
              eval_batches=2, save_every=4, keep_last=0, log_every=1000, seed=3)


# ----------------------------------------------------------------------------- a run to damage
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_pretrain_corpus(tmp_path_factory.mktemp("faults"), num_examples=150, val_fraction=0.15)


@pytest.fixture(scope="module")
def reference(corpus):
    """An uninterrupted 12-step run, checkpoints at steps 4, 8 and 12 all kept."""
    out = corpus["root"] / "reference"
    pretrain(PretrainArgs(data=corpus["data"], tokenizer=corpus["tok"], out=str(out), quiet=True, **COMMON))
    return out


def pretrain_argv(corpus, out: Path, resume: bool = True, threads: int = 1) -> list[str]:
    argv = ["pretrain", "--data", corpus["data"], "--tokenizer", corpus["tok"], "--out", str(out),
            "--threads", str(threads)]
    for key, value in COMMON.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + (["--resume"] if resume else [])


def copy_model(reference: Path, dest: Path, record: bool = True) -> Path:
    shutil.copytree(reference / "final", dest)
    if not record:
        fc.drop_record(dest)
    return dest


def interrupted_copy(reference: Path, dest: Path) -> Path:
    """The reference run as if killed after its step-8 checkpoint: no step_12, no final/."""
    shutil.copytree(reference, dest)
    shutil.rmtree(dest / "checkpoints" / "step_0000012")
    shutil.rmtree(dest / "final")
    return dest


def resumed_outcome(corpus, reference: Path, run: Path, damaged: Path | None) -> tuple[str, str]:
    """pretrain --resume of a damaged run: recovered when it says so and ends equal to the reference."""
    result = fc.run_cli(pretrain_argv(corpus, run))
    if result.exception:
        return "traceback", result.exception.strip().splitlines()[-1]
    if result.code != 0:
        named = damaged is not None and str(damaged) in result.err
        return ("named" if named else "unclear"), result.err.strip()[-300:]
    differ = fc.same_weights(reference / "final" / "model.safetensors", run / "final" / "model.safetensors")
    said = "damaged" in result.out + result.err
    if differ or (damaged is not None and not said):
        return "silent", f"{len(differ)} tensors differ; said: {said}"
    return "recovered", next(line for line in (result.out + result.err).splitlines() if "damaged" in line) \
        if said else "no damage"


# ----------------------------------------------------------------------------- damaged files
def model_dir_trial(corpus, reference, tmp: Path, damage: str, target: str, entry: str, record: bool) -> fc.Trial:
    directory = copy_model(reference, tmp / f"{target}-{damage}-{entry}-{record}", record)
    path = directory / target
    if damage == "wrong_type":
        (path).write_text(json.dumps({**json.loads(path.read_text()), "rms_norm_eps": "small"}))
    elif damage == "not_object":
        path.write_text("[1, 2]")
    else:
        fc.DAMAGES[damage](path)
    if entry == "serve":
        outcome, detail = fc.classify_call(lambda: load_for_serving(str(directory)), (str(path),))
    elif entry == "generate":
        result = fc.run_cli(["generate", str(directory), "--prompt", "1+1=", "--max-tokens", "4", "--seed", "0"])
        outcome, detail = fc.classify_error(result, (str(path),))
    else:
        result = fc.run_cli(["eval", str(directory), "--tasks", "arithmetic", "--n", "2", "--k", "1",
                             "--max-new-tokens", "4"])
        outcome, detail = fc.classify_error(result, (str(path),))
    name = f"final/{target} {damage}{'' if record else ' (no record)'} via {entry}"
    return fc.Trial("damaged file", name, outcome, detail)


def checkpoint_trial(corpus, reference, tmp: Path, target: str, damage: str, both: bool = False) -> fc.Trial:
    """A damaged file in the newest checkpoint of a killed run: pretrain --resume falls back."""
    run = interrupted_copy(reference, tmp / f"ckpt-{target}-{damage}-{both}")
    victims = list_checkpoints(run) if both else list_checkpoints(run)[-1:]
    for checkpoint in victims:
        path = checkpoint / target
        if damage == "missing_key":
            state = json.loads(path.read_text())
            del state["optimizer"]
            path.write_text(json.dumps(state))
        elif damage == "wrong_type":
            path.write_text(json.dumps({**json.loads(path.read_text()), "step": "eight"}))
        else:
            fc.DAMAGES[damage](path)
    outcome, detail = resumed_outcome(corpus, reference, run, victims[-1] / target)
    where = "both checkpoints" if both else "the newest checkpoint"
    return fc.Trial("damaged file", f"{target} {damage} in {where} via pretrain --resume", outcome, detail)


def state_json_trial(tmp: Path, damage: str) -> fc.Trial:
    run = tmp / f"state-{damage}"
    run.mkdir()
    state = new_state(PRESETS["smoke"])
    if damage == "missing_key":
        del state["preset"]
    elif damage == "finished_all":
        state["finished"] = "all"
    elif damage == "stages_list":
        state["stages"] = []
    write_json_atomic(run / "state.json", state)
    if damage in fc.JSON_DAMAGES:
        fc.DAMAGES[damage](run / "state.json")
    result = fc.run_cli(["speedrun", "--preset", "smoke", "--out", str(run)])
    outcome, detail = fc.classify_error(result, (str(run / "state.json"),))
    return fc.Trial("damaged file", f"state.json {damage} via speedrun", outcome, detail)


@pytest.fixture(scope="module")
def speedrun_dir(corpus, reference):
    """A speedrun directory whose GRPO stage is 'finished' (the reference model stands in for it) and
    whose pre-training is the reference run: enough for eval_grpo and the expert-load measurement."""
    run = corpus["root"] / "speedrun"
    preset = SMOKE
    state = new_state(preset)
    state["finished"] = ["data", "tokenizer", "pretrain", "sft", "grpo"]
    run.mkdir()
    write_json_atomic(run / "state.json", state)
    shutil.copytree(corpus["tok"], run / "tokenizer")
    shutil.copytree(corpus["data"], run / "shards")
    shutil.copytree(reference, run / "pretrain")
    shutil.copytree(reference / "final", run / "grpo" / "final")
    (run / "data").mkdir()
    with open(run / "data" / "eval_problems.jsonl", "w") as f:
        for q in make_problems(preset.rl_task, "test", 4, preset.seed):
            f.write(json.dumps({"id": q.id, "task": q.task, "prompt": q.prompt, "answer": q.answer,
                                "meta": q.meta}) + "\n")
    loads = measure_expert_load(run / "pretrain", run / "shards", preset.pretrain_batch_size, preset.seq_len,
                                torch.device("cpu"))
    write_json_atomic(run / "pretrain" / "expert_load.json", loads)
    run_speedrun(preset, run, threads=1, stages=STAGES, say=lambda _: None)
    return run


STAGES = [Stage("eval_grpo", "held-out evaluation after GRPO", eval_stage("grpo"))]


def without_timing(result: dict) -> dict:
    return {**result, "tasks": {t: {k: v for k, v in m.items() if k not in ("seconds", "tokens_per_s")}
                                for t, m in result["tasks"].items()}}


def speedrun_output_trial(speedrun_dir: Path, target: str, damage: str) -> fc.Trial:
    path = speedrun_dir / target
    before = json.loads(path.read_text())
    fc.DAMAGES[damage](path)
    lines: list[str] = []
    try:
        run_speedrun(SMOKE, speedrun_dir, threads=1, stages=STAGES, say=lines.append)
    except Exception as e:  # noqa: BLE001
        named = str(path) in str(e)
        return fc.Trial("damaged file", f"{target} {damage} via speedrun resume", "named" if named else "traceback",
                        str(e))
    after = json.loads(path.read_text())
    equal = without_timing(after) == without_timing(before) if target.startswith("eval") else after == before
    said = [line for line in lines if str(path) in line and "damaged" in line]
    outcome = "recovered" if equal and said else "silent"
    return fc.Trial("damaged file", f"{target} {damage} via speedrun resume", outcome, (said or ["nothing said"])[0])


DEFAULT_MODEL_CASES = [  # (damage, file, entry point, integrity record kept)
    ("truncated", "model.safetensors", "generate", True), ("empty", "model.safetensors", "eval", True),
    ("garbled", "model.safetensors", "serve", True), ("xor", "model.safetensors", "generate", True),
    ("nan", "model.safetensors", "generate", False), ("nan_projection", "model.safetensors", "serve", False),
    ("truncated", "model.safetensors", "eval", False), ("garbled", "config.json", "generate", False),
    ("wrong_type", "config.json", "serve", False), ("not_object", "config.json", "generate", True),
]
DEFAULT_CHECKPOINT_CASES = [("training_state.safetensors", "truncated"), ("model.safetensors", "xor"),
                            ("trainer_state.json", "missing_key"), ("SHA256SUMS", "garbled")]


def test_each_damaged_file_kind_is_named_or_recovered(corpus, reference, speedrun_dir, tmp_path):
    trials = [model_dir_trial(corpus, reference, tmp_path, *case) for case in DEFAULT_MODEL_CASES]
    trials += [checkpoint_trial(corpus, reference, tmp_path, *case) for case in DEFAULT_CHECKPOINT_CASES]
    trials.append(checkpoint_trial(corpus, reference, tmp_path, "model.safetensors", "truncated", both=True))
    trials += [state_json_trial(tmp_path, damage) for damage in ("missing_key", "finished_all", "truncated")]
    trials.append(speedrun_output_trial(speedrun_dir, "eval/grpo.json", "truncated"))
    trials.append(speedrun_output_trial(speedrun_dir, "pretrain/expert_load.json", "garbled"))
    print("\n" + fc.table(trials))
    assert {t.outcome for t in trials} <= {"named", "recovered"}, fc.table(trials)
    recovered = [t.name for t in trials if t.outcome == "recovered"]
    assert len(recovered) == len(DEFAULT_CHECKPOINT_CASES) + 3  # every damaged checkpoint, both JSON outputs


def test_a_damaged_checkpoint_is_skipped_saying_which_file(corpus, reference, tmp_path):
    run = interrupted_copy(reference, tmp_path / "run")
    fc.truncate(run / "checkpoints" / "step_0000008" / "training_state.safetensors")
    result = fc.run_cli(pretrain_argv(corpus, run))
    assert result.code == 0, result.err
    assert ("checkpoint step_0000008 is damaged" in result.out and "training_state.safetensors" in result.out
            and "resuming from the previous one, step_0000004" in result.out)
    assert "resumed from" in result.out and "step_0000004 at step 4" in result.out
    assert fc.same_weights(reference / "final" / "model.safetensors", run / "final" / "model.safetensors") == []


# ----------------------------------------------------------------------------- kill points
def kill_trials(corpus, reference, tmp: Path, sequences: list[list[tuple[str, int]]]) -> list[fc.Trial]:
    """Kill a pre-training run at each point of a sequence in turn (resuming it each time), then resume
    it to the end: recovered when its weights and losses equal the uninterrupted run's. The runs of
    all sequences are killed side by side, one round per position in the sequences."""
    names = [" then ".join(f"{where} #{n}" for where, n in points) for points in sequences]
    runs = [tmp / name.replace(" ", "_").replace("#", "") for name in names]
    for i in range(max(map(len, sequences))):
        jobs = [(pretrain_argv(corpus, run), *points[i]) for run, points in zip(runs, sequences) if i < len(points)]
        assert all(code == -9 for code in fc.killed_runs(jobs)), "a run finished before its kill point"
    trials = []
    ref_loss = [json.loads(r)["loss"] for r in (reference / "metrics.jsonl").read_text().splitlines()]
    for name, run in zip(names, runs):
        result = fc.run_cli(pretrain_argv(corpus, run))
        if result.exception or result.code != 0:
            trials.append(fc.Trial("kill", name, "traceback" if result.exception else "unclear", result.err[-300:]))
            continue
        differ = fc.same_weights(reference / "final" / "model.safetensors", run / "final" / "model.safetensors")
        got_loss = [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]
        ok = not differ and ref_loss == got_loss
        trials.append(fc.Trial("kill", name, "recovered" if ok else "silent", f"{len(differ)} tensors differ"))
    return trials


def reachable(first: tuple[str, int], second: tuple[str, int]) -> bool:
    """Whether a run killed at `first` and resumed reaches `second` (saves at steps 4, 8 and 12; a run
    resumed at step 12 saves once more, then writes final/)."""
    where, n = first
    complete = {"after_save": n, "writing_final": 3}.get(where, n - 1)  # the checkpoints it left
    saves_left = max(3 - complete, 1)
    return second[0] == "writing_final" or second[1] <= saves_left


def test_killed_at_a_handful_of_points_resumes_bitwise(corpus, reference, tmp_path):
    points = [[("mid_save", 2)], [("before_record", 1)], [("writing_final", 1)]]
    trials = kill_trials(corpus, reference, tmp_path, points)
    assert [t.outcome for t in trials] == ["recovered"] * len(trials), fc.table(trials)


# ----------------------------------------------------------------------------- settings and the CLI
def all_actions():
    """(argv prefix, action) for every flag of every command and sub-command."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices

    def walk(prefix: list[str], p: argparse.ArgumentParser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk([*prefix, name], sub)
            elif action.option_strings:
                yield prefix, action

    for name, (module, _) in COMMANDS.items():
        importlib.import_module(module).add_arguments(commands[name])
        yield from walk([name], commands[name])


def test_no_flag_parses_floats_with_nan():
    plain = [f"{' '.join(prefix)} {a.option_strings[0]}" for prefix, a in all_actions() if a.type is float]
    assert plain == []  # float() accepts "nan" and "inf": every float flag uses finite_float


NAN_CASES = [  # flags whose own parser reads a number inside a larger value
    (["grpo", "--init-from", "x", "--out", "y", "--reward", "correct=nan"], ("--reward", "finite")),
    (["pretrain", "--data", "x", "--out", "y", "--betas", "0.9,nan"], ("--betas",)),
    (["speedrun", "--preset", "smoke", "--set", "pretrain_lr=nan"], ("pretrain_lr=nan", "finite")),
    (["speedrun", "--preset", "smoke", "--set", "grpo_max_minutes=inf"], ("grpo_max_minutes", "finite")),
]


def nan_trials(values=("nan",)) -> list[fc.Trial]:
    trials = []
    cases = [([*prefix, f"{action.option_strings[0]}={value}"], (action.option_strings[0], "finite"))
             for prefix, action in all_actions() if action.type is finite_float for value in values]
    for argv, names in cases + NAN_CASES:
        outcome, detail = fc.classify_error(fc.run_cli(argv), names)
        trials.append(fc.Trial("CLI", " ".join(argv), outcome, detail))
    return trials


def test_every_nan_setting_is_refused_where_it_is_parsed():
    trials = nan_trials()
    assert len(trials) > 40  # every float flag of every command, not a sample
    assert {t.outcome for t in trials} == {"named"}, fc.table(trials)


def bad_invocation_trials(corpus, reference, tmp: Path) -> list[fc.Trial]:
    """The issue's item-8 invocations: each a clear error, before any work."""
    model = str(reference / "final")
    latin1 = tmp / "gsm8k-latin1.jsonl"
    latin1.write_bytes('{"question": "caf\xe9", "answer": "#### 1"}\n'.encode("latin-1"))
    (tmp / "empty.jsonl").write_text("")
    cases = [
        (["eval", model, "--out", "/proc/x.json", "--tasks", "arithmetic", "--n", "2"], ("--out", "/proc/x.json")),
        (["pretrain", "--data", corpus["data"], "--out", "/proc/x"], ("--out", "/proc/x")),
        (["speedrun", "--threads", "-1"], ("--threads", "negative")),
        (["speedrun", "--device", "tpu"], ("--device", "tpu")),
        (["serve", model, "--port", "70000"], ("--port", "70000")),
        (["eval", model, "--n", "-1"], ("--n", "negative")),
        (["eval", model, "--tasks", "gsm8k", "--path", f"gsm8k={latin1}", "--n", "2"], (f"{latin1}:1", "UTF-8")),
        (["eval", model, "--tasks", "gsm8k", "--path", f"gsm8k={tmp / 'empty.jsonl'}"], ("empty.jsonl", "no problems")),
        (["serve", model, "--api-key-file", str(tmp / "no-such-key")], ("--api-key-file", "no-such-key")),
    ]
    trials = []
    for argv, names in cases:
        outcome, detail = fc.classify_error(fc.run_cli(argv), names)
        trials.append(fc.Trial("CLI", " ".join(argv), outcome, detail))
    outcome, detail = fc.classify_error(fc.run_cli(["generate", model, "--prompt", "-"], stdin=b"caf\xe9 \xff"),
                                        ("stdin", "UTF-8"))
    trials.append(fc.Trial("CLI", "generate --prompt - (non-UTF-8 stdin)", outcome, detail))
    return trials


def test_bad_invocations_are_clear_errors_before_any_work(corpus, reference, tmp_path):
    trials = bad_invocation_trials(corpus, reference, tmp_path)
    assert {t.outcome for t in trials} == {"named"}, fc.table(trials)


# ----------------------------------------------------------------------------- bad requests
BAD_REQUESTS = [  # (name, raw JSON body, expected status)
    ("top_k 1e30", '{"messages": [{"role": "user", "content": "hi"}], "top_k": 1e30}', 400),
    ("temperature NaN", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    ("lone surrogate", '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("unknown model", '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}', 404),
    ("prompt too long", json.dumps({"messages": [{"role": "user", "content": "12345 " * 20_000}]}), 400),
]


def request_trials(url: str, cases=BAD_REQUESTS) -> list[fc.Trial]:
    """Each bad request beside an innocent one on the same connection: a 4xx for it, the same answer
    for its neighbour as alone."""
    innocent = {"messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 1.0}
    trials = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for name, body, status in cases:
            r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            neighbour = c.post("/v1/chat/completions", json=innocent)
            fine = neighbour.status_code == 200 and neighbour.json()["choices"][0]["message"]["content"] == ANSWER
            if r.status_code >= 500:
                outcome = "traceback"
            elif r.status_code == status and r.json().get("error", {}).get("message") and fine:
                outcome = "named"
            else:
                outcome = "silent"
            trials.append(fc.Trial("request", name, outcome, f"{r.status_code} {r.text[:200]}; neighbour "
                                                             f"{neighbour.status_code}"))
    return trials


def test_each_bad_request_kind_is_a_4xx_and_hurts_no_neighbour(tmp_path):
    model, tok, _ = load_for_serving(build_model_dir(str(tmp_path / "tiny")))
    with live_server(create_app(Engine(model, tok, max_concurrent=4), tok, "tiny")) as url:
        trials = request_trials(url)
    assert {t.outcome for t in trials} == {"named"}, fc.table(trials)


# ----------------------------------------------------------------------------- execution settings
def test_speedrun_records_its_threads_and_reuses_them_on_resume(tmp_path):
    seen = []

    def stage(ctx):
        seen.append(torch.get_num_threads())
        return {}

    def killed(ctx):
        raise KeyboardInterrupt

    stages = [Stage("one", "records the thread count", stage), Stage("two", "again", stage)]
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):  # stopped in stage two
        run_speedrun(PRESETS["smoke"], tmp_path, threads=1, stages=[stages[0], Stage("two", "stopped", killed)],
                     say=lines.append)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["execution"] == {"threads": 1, "device": "cpu", "dtype": "fp32", "ranks": 1}
    torch.set_num_threads(2)
    run_speedrun(PRESETS["smoke"], tmp_path, stages=stages, say=lines.append)  # no --threads: the recorded one
    assert seen == [1, 1] and any("resuming with 1 torch thread(s), as recorded in state.json" in x for x in lines)
    lines.clear()
    run_speedrun(PRESETS["smoke"], tmp_path, threads=2, stages=stages, say=lines.append)  # overridden, said
    assert any("started with 1 torch thread(s), now --threads 2" in x for x in lines)
    assert json.loads((tmp_path / "state.json").read_text())["execution"]["threads"] == 2


def test_trainer_checkpoints_record_threads_and_a_resume_at_another_count_says_so(corpus, reference, tmp_path):
    state = json.loads((reference / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["execution"]["threads"] == 1 and state["execution"]["world_size"] == 1
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")  # killed while writing final/: the resume runs no step, only the export
    result = fc.run_cli(pretrain_argv(corpus, run, threads=2))
    torch.set_num_threads(1)
    assert result.code == 0 and "written with 1 torch thread(s), this run uses 2" in result.out


def test_nan_weights_saved_by_a_diverged_run_are_refused_on_load(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny"))
    with torch.no_grad():
        model.layers[0].self_attn.o_proj.weight[0, :3] = float("inf")
    path = save_training_checkpoint(tmp_path, 1, model, build_optimizer(model, 1e-3))  # the record matches
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.o_proj.weight has 3 NaN/infinite"):
        load_pretrained(path)


# ----------------------------------------------------------------------------- the full table
@pytest.mark.slow
def test_full_fault_table(corpus, reference, speedrun_dir, tmp_path):
    """Every damage x file x entry point, every kill point once and in pairs, every float flag with
    NaN and inf, the item-8 invocations and the bad requests: 0 silent, 0 traceback, 0 unclear."""
    trials = []
    for record in (True, False):
        # flipped bytes that stay finite are only detectable with the record: not a no-record case
        for damage in [d for d in fc.DAMAGES if record or d != "xor"]:
            for entry in ("generate", "eval", "serve"):
                trials.append(model_dir_trial(corpus, reference, tmp_path, damage, "model.safetensors", entry, record))
        for damage in (*fc.JSON_DAMAGES, "wrong_type", "not_object"):
            trials.append(model_dir_trial(corpus, reference, tmp_path, damage, "config.json", "generate", record))
    for target in ("model.safetensors", "training_state.safetensors"):
        for damage in fc.DAMAGES:
            trials.append(checkpoint_trial(corpus, reference, tmp_path, target, damage))
    for damage in (*fc.JSON_DAMAGES, "missing_key", "wrong_type"):
        trials.append(checkpoint_trial(corpus, reference, tmp_path, "trainer_state.json", damage))
    trials += [checkpoint_trial(corpus, reference, tmp_path, "SHA256SUMS", d) for d in fc.JSON_DAMAGES]
    trials += [checkpoint_trial(corpus, reference, tmp_path, "config.json", d) for d in fc.JSON_DAMAGES]
    trials.append(checkpoint_trial(corpus, reference, tmp_path, "model.safetensors", "truncated", both=True))
    trials += [state_json_trial(tmp_path, d) for d in (*fc.JSON_DAMAGES, "missing_key", "finished_all", "stages_list")]
    for target in ("eval/grpo.json", "pretrain/expert_load.json"):
        trials += [speedrun_output_trial(speedrun_dir, target, d) for d in fc.JSON_DAMAGES]

    singles = [(where, n) for where in fc.KILL_POINTS for n in ((1,) if where == "writing_final" else (1, 2, 3))]
    pairs = [[a, b] for a in singles for b in singles if reachable(a, b)]  # killed again in the resumed run
    pairs = random.Random(0).sample(pairs, min(len(pairs), 42 - len(singles)))  # 42 kill trials, as the issue's
    trials += kill_trials(corpus, reference, tmp_path, [[p] for p in singles] + pairs)

    trials += nan_trials(("nan", "inf", "-inf"))
    trials += bad_invocation_trials(corpus, reference, tmp_path)

    model, tok, _ = load_for_serving(build_model_dir(str(tmp_path / "tiny")))
    more = BAD_REQUESTS + [
        ("top_k 2**63", '{"messages": [{"role": "user", "content": "hi"}], "top_k": 9223372036854775808}', 400),
        ("top_p Infinity", '{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400),
        ("seed 2**70", '{"messages": [{"role": "user", "content": "hi"}], "seed": 1180591620717411303424}', 400),
        ("max_tokens -5", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', 400),
        ("n 0", '{"messages": [{"role": "user", "content": "hi"}], "n": 0}', 400),
        ("not JSON", "{not json", 400),
    ]
    with live_server(create_app(Engine(model, tok, max_concurrent=4), tok, "tiny")) as url:
        trials += request_trials(url, more)
    print("\n" + fc.table(trials))
    assert not [t for t in trials if t.outcome in ("silent", "traceback", "unclear")], fc.table(trials)


def test_table_counts_each_outcome():
    trials = [fc.Trial("a", "x", "named"), fc.Trial("a", "y", "silent", "oops"), fc.Trial("b", "z", "recovered")]
    text = fc.table(trials)
    assert text.splitlines()[2].split() == ["a", "2", "1", "0", "0", "1", "0"]
    assert text.splitlines()[4].split() == ["all", "3", "1", "1", "0", "1", "0"] and "silent: a / y: oops" in text
    assert dataclasses.asdict(trials[0])["outcome"] == "named"


def test_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    """A key `ps` cannot show: --api-key-file's first line, or $SEEKLING_API_KEY (the flag's default)."""
    (tmp_path / "key").write_text("s3cret\nignored\n")
    assert serve.read_api_key(str(tmp_path / "key")) == "s3cret"
    (tmp_path / "blank").write_text("\n")
    with pytest.raises(SeeklingError, match="first line is empty"):
        serve.read_api_key(str(tmp_path / "blank"))
    monkeypatch.setenv("SEEKLING_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert parser.parse_args(["model"]).api_key == "from-env"
    with pytest.raises(SystemExit):  # one or the other
        parser.parse_args(["model", "--api-key", "a", "--api-key-file", "k"])
