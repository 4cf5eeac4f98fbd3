"""Rejection sampling and distillation: keep/drop decisions on scripted completions (checked one by one),
dedupe and length filters, resume (done prompts skipped, an interrupted batch redone, batching does not
change the samples), a transformers teacher of another family (a tiny Qwen2 that memorised an answer),
a tiny distillation end to end through the CLI, the speedrun hook, and bad input."""

import inspect
import json
import re

import pytest
import torch

from seekling import distill as D
from seekling.checkpoint import load_pretrained, save_pretrained
from seekling.cli import main
from seekling.config import ModelConfig
from seekling.errors import CheckpointError, ConfigError
from seekling.generate import Completion
from seekling.model import Transformer
from seekling.presets import PRESETS
from seekling.tasks import Problem, completion_text, make_problems, render_prompt_ids
from seekling.tokenizer import Tokenizer
from seekling.train_state import TOKENIZER_FILES


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    problems = make_problems("arithmetic", "train", 200, 0) + make_problems("countdown", "train", 100, 0)
    tokenizer = Tokenizer.train([completion_text(p) + " " + p.prompt for p in problems], vocab_size=320)
    return tokenizer.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return Tokenizer.load(tok_dir)


def save_tiny(directory, tokenizer, tok_dir, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))
    return save_pretrained(model, str(directory), extra_files={n: str(tok_dir / n) for n in TOKENIZER_FILES})


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tokenizer, tok_dir):
    """A seekling run directory: the teacher is its final/."""
    run = tmp_path_factory.mktemp("teacher_run")
    save_tiny(run / "final", tokenizer, tok_dir)
    return run


def scripted(teacher, problems, k, script, seed=0, calls=None):
    """Make `teacher` answer row (problem, j) with the text `script(problem, j)`: the row is found
    from its per-row seed, which `rejection_sample` derives from (seed, problem id, j)."""
    rows = {D.row_seed(seed, p.id, j): (p, j) for p in problems for j in range(k)}
    tok = teacher.tokenizer

    def generate_fn(model, prompts, params):
        if calls is not None:
            calls.append(len(prompts))
        out = []
        for prompt, param in zip(prompts, params):
            problem, j = rows[param.seed]
            assert prompt == render_prompt_ids(tok, problem)
            out.append(Completion(tok.encode(script(problem, j)) + [tok.eos_id], [], "stop"))
        return out

    teacher.generate_fn = generate_fn
    return teacher


def good(p, think="reasoning"):
    return f"<think> {think} </think> <answer> {p.answer} </answer>"


def five_kinds(p, j):
    """j=0 kept, 1 the same up to whitespace, 2 wrong, 3 right but unformatted, 4 right but long."""
    return [good(p), "  " + good(p).replace(" </think>", "\n</think>") + " ",
            f"<think> guess </think> <answer> {int(p.answer) + 1 if p.answer.isdigit() else 'x'} </answer>",
            f"the answer is {p.answer}", good(p, " ".join(["step"] * 40))][j]


def test_keep_and_drop_decisions_exactly(tmp_path, teacher_run):
    problems = make_problems("arithmetic", "train", 3, 0)
    teacher = scripted(D.load_teacher(teacher_run), problems, 5, five_kinds)
    out = tmp_path / "kept.jsonl"
    summary = D.rejection_sample(teacher, problems, out, D.SampleSettings(k=5, max_tokens_kept=30))
    s = summary["tasks"]["arithmetic"]
    assert (s["prompts"], s["sampled"], s["well_formed"], s["correct"]) == (3, 15, 12, 12)
    assert (s["correct_and_well_formed"], s["too_long"], s["duplicates"], s["kept"]) == (9, 3, 3, 3)
    assert s["keep_rate"] == pytest.approx(3 / 15) and s["prompts_with_kept"] == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["provenance"]["prompt_id"] for r in rows] == [p.id for p in problems]
    for row, p in zip(rows, problems):
        assert row["messages"] == [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": good(p)}]
        prov = row["provenance"]
        assert prov["teacher"] == teacher.identity and prov["sample"] == 0 and prov["reward"] == 1.0
        assert prov["sampling"]["k"] == 5 and prov["sampling"]["temperature"] == 0.6
    # without the length limit and dedupe, the long and the respaced copies are kept too
    loose = D.rejection_sample(teacher, problems, tmp_path / "loose.jsonl", D.SampleSettings(k=5, dedupe=False))
    assert loose["tasks"]["arithmetic"]["kept"] == 9


def test_countdown_is_graded_by_its_verifier_not_by_string(tmp_path, teacher_run):
    problems = make_problems("countdown", "train", 2, 0, count=3, max_number=15, max_target=50)
    # the numbers in reverse order make the same value: correct, though not the stored answer string
    def script(p, j):
        numbers = p.meta["numbers"]
        alt = "+".join(str(n) for n in reversed(numbers))
        return (good(p) if j == 0 else f"<think> t </think> <answer> {alt} </answer>")
    teacher = scripted(D.load_teacher(teacher_run), problems, 2, script)
    summary = D.rejection_sample(teacher, problems, tmp_path / "cd.jsonl", D.SampleSettings(k=2))
    sums_hit = sum(sum(p.meta["numbers"]) == int(p.meta.get("target", p.answer)) for p in problems)
    assert summary["tasks"]["countdown"]["kept"] == 2 + sums_hit


def test_resume_skips_done_prompts_and_redoes_an_interrupted_batch(tmp_path, teacher_run):
    problems = make_problems("arithmetic", "train", 6, 0)
    settings = D.SampleSettings(k=2, batch_size=4)  # two problems per sampler call
    script = lambda p, j: good(p, f"way {j}")  # noqa: E731
    whole = tmp_path / "whole.jsonl"
    D.rejection_sample(scripted(D.load_teacher(teacher_run), problems, 2, script), problems, whole, settings)

    out, calls = tmp_path / "parts.jsonl", []
    teacher = scripted(D.load_teacher(teacher_run), problems, 2, script, calls=calls)
    D.rejection_sample(teacher, problems[:4], out, settings)
    assert sum(calls) == 8
    calls.clear()
    summary = D.rejection_sample(teacher, problems, out, settings)
    assert sum(calls) == 4  # only the two new problems were sampled
    assert out.read_text() == whole.read_text()
    assert summary["total"]["kept"] == 12 and summary["total"]["prompts"] == 6
    # a kill between writing the samples and the stats: the last problem is not marked done, and a
    # half-written line follows; the rerun drops both and samples that problem again
    stats_path = D.stats_path_for(out)
    stats = json.loads(stats_path.read_text())
    stats["done"].remove(problems[-1].id)
    stats["tasks"]["arithmetic"]["prompts"] -= 1
    stats["tasks"]["arithmetic"]["sampled"] -= 2
    stats["tasks"]["arithmetic"]["kept"] -= 2
    stats_path.write_text(json.dumps(stats))
    with open(out, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "What')
    calls.clear()
    summary = D.rejection_sample(teacher, problems, out, settings)
    assert sum(calls) == 2
    assert out.read_text() == whole.read_text() and summary["total"]["kept"] == 12


def test_batching_does_not_change_the_samples(tmp_path, teacher_run):
    """Per-row seeds from (seed, problem, j): one problem per call or all at once, the same tokens."""
    problems = make_problems("arithmetic", "train", 3, 0)
    teacher = D.load_teacher(teacher_run)
    stats = []
    for batch in (2, 64):
        settings = D.SampleSettings(k=2, max_new_tokens=12, temperature=1.0, top_p=1.0, batch_size=batch)
        with pytest.raises(D.NothingKept):  # a random model: nothing is well-formed
            D.rejection_sample(teacher, problems, tmp_path / f"b{batch}.jsonl", settings)
        stats.append(json.loads(D.stats_path_for(tmp_path / f"b{batch}.jsonl").read_text())["tasks"])
    assert stats[0] == stats[1] and stats[0]["arithmetic"]["sampled"] == 6


def test_another_teacher_or_other_settings_are_refused(tmp_path, teacher_run, tokenizer, tok_dir):
    problems = make_problems("arithmetic", "train", 2, 0)
    out = tmp_path / "kept.jsonl"
    D.rejection_sample(scripted(D.load_teacher(teacher_run), problems, 2, five_kinds), problems, out,
                       D.SampleSettings(k=2))
    other_dir = save_tiny(tmp_path / "other", tokenizer, tok_dir, seed=1)
    other = scripted(D.load_teacher(other_dir), problems, 2, five_kinds)
    with pytest.raises(ConfigError, match="another teacher"):
        D.rejection_sample(other, problems, out, D.SampleSettings(k=2))
    D.stats_path_for(out).unlink()  # the rows alone still name their teacher
    with pytest.raises(ConfigError, match="another teacher"):
        D.rejection_sample(other, problems, out, D.SampleSettings(k=2))
    summary = D.rejection_sample(other, problems, out, D.SampleSettings(k=2), overwrite=True)
    assert summary["teacher"]["path"] == other_dir and summary["total"]["sampled"] == 4
    with pytest.raises(ConfigError, match="other settings.*temperature"):
        D.rejection_sample(other, problems, out, D.SampleSettings(k=2, temperature=1.0))


@pytest.fixture(scope="module")
def qwen_teacher(tmp_path_factory, tokenizer, tok_dir):
    """A tiny random Qwen2 (transformers), taught by a few hundred Adam steps to answer one question."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    model = Qwen2ForCausalLM(config)
    problem = Problem("q1", "arithmetic", "What is 2+3?", "5", "2+3=5", {})
    ids, mask = tokenizer.render_chat([{"role": "user", "content": problem.prompt},
                                       {"role": "assistant", "content": good(problem, "2+3=5")}])
    x = torch.tensor([ids])
    labels = torch.where(torch.tensor([mask]).bool(), x, torch.full_like(x, -100))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory, problem


def test_transformers_teacher_of_another_family(tmp_path, qwen_teacher, tokenizer):
    directory, problem = qwen_teacher
    teacher = D.load_teacher(directory)
    assert teacher.kind == "transformers" and type(teacher.model).__name__ == "Qwen2ForCausalLM"
    # AutoTokenizer's chat template renders what seekling's tokenizer renders
    assert render_prompt_ids(teacher.tokenizer, problem) == tokenizer.render_prompt(
        [{"role": "user", "content": problem.prompt}])
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"id": "q1", "task": "arithmetic", "prompt": problem.prompt, "answer": "5"}) + "\n")
    code = main(["sample", "--teacher", str(directory), "--problems", str(path), "--k", "2", "--temperature", "0",
                 "--max-new-tokens", "24", "--out", str(tmp_path / "kept.jsonl")])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert len(rows) == 1  # greedy twice: the second is a duplicate
    assert rows[0]["messages"][1]["content"] == good(problem, "2+3=5")
    stats = json.loads(D.stats_path_for(tmp_path / "kept.jsonl").read_text())["tasks"]["arithmetic"]
    assert (stats["sampled"], stats["duplicates"], stats["kept"]) == (2, 1, 1)
    assert rows[0]["provenance"]["teacher"]["kind"] == "transformers"


def test_sampled_hf_rows_stop_at_eos(qwen_teacher):
    directory, problem = qwen_teacher
    teacher = D.load_teacher(directory)
    ids = render_prompt_ids(teacher.tokenizer, problem)
    from seekling.generate import SamplingParams

    params = SamplingParams(max_new_tokens=24, temperature=1.0, stop_token_ids=(teacher.tokenizer.eos_id,), seed=3)
    first = teacher.generate_fn(teacher.model, [ids, [ids[0]] + ids[:5]], params)
    again = teacher.generate_fn(teacher.model, [ids, [ids[0]] + ids[:5]], params)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]  # seeded
    for c in first:
        assert len(c.token_ids) <= 24
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == teacher.tokenizer.eos_id)
        assert teacher.tokenizer.eos_id not in c.token_ids[:-1]


def test_distill_from_a_transformers_teacher(tmp_path, qwen_teacher, tok_dir):
    from seekling.evaluate import EvalSettings
    from seekling.sft import SFTConfig

    directory, problem = qwen_teacher
    result = D.distill(directory, tmp_path / "d", [problem], student_preset="tiny", tokenizer_dir=tok_dir,
                       sample=D.SampleSettings(k=2, temperature=0, max_new_tokens=24),
                       sft=SFTConfig(seq_len=64, batch_size=1, steps=2, warmup_steps=1, save_every=0),
                       eval_problems={"arithmetic": [problem]},
                       eval_settings=EvalSettings(k=2, temperature=0, max_new_tokens=24), log=lambda _: None)
    assert result["samples"]["total"]["kept"] == 1
    evals = result["eval"]
    assert evals["teacher"]["params"] == sum(p.numel() for p in D.load_teacher(directory).model.parameters())
    assert evals["teacher"]["tasks"]["arithmetic"]["pass@1"] == 1.0  # it memorised this answer, greedy
    assert set(evals) == {"teacher", "student_before", "student_after"}


def correct_teacher(monkeypatch):
    """Make every loaded teacher answer "What is a+b?" prompts right (a perfect arithmetic teacher)."""
    real = D.load_teacher

    def load(path, tokenizer_dir=None, device="cpu"):
        teacher = real(path, tokenizer_dir, device)
        tok = teacher.tokenizer

        def generate_fn(model, prompts, params):
            out = []
            for ids in prompts:
                a, op, b = re.search(r"What is (\d+)([-+*])(\d+)\?", tok.decode(ids)).groups()
                value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
                text = f"<think> {a}{op}{b}={value} </think> <answer> {value} </answer>"
                out.append(Completion(tok.encode(text) + [tok.eos_id], [], "stop"))
            return out

        teacher.generate_fn = generate_fn
        return teacher

    monkeypatch.setattr(D, "load_teacher", load)


def test_tiny_distill_end_to_end(tmp_path, teacher_run, tok_dir, monkeypatch, capsys):
    correct_teacher(monkeypatch)
    out = tmp_path / "distill"
    args = ["distill", "--teacher", str(teacher_run), "--tasks", "arithmetic", "--difficulty", "arithmetic.digits=1",
            "--num-problems", "24", "--k", "2", "--max-new-tokens", "12", "--student-preset", "tiny",
            "--steps", "6", "--sft-batch-size", "4", "--seq-len", "64", "--lr", "3e-3", "--warmup", "1",
            "--save-every", "3", "--eval-n", "4", "--eval-k", "1", "--json", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "student before" in printed and "student after" in printed and "teacher" in printed
    evals = json.loads((out / "eval.json").read_text())
    assert set(evals) == {"teacher", "student_before", "student_after"}
    assert all(r["tasks"]["arithmetic"]["n"] == 4 for r in evals.values())
    assert evals["teacher"]["tasks"]["arithmetic"]["pass@1"] == 1.0  # the scripted teacher is always right
    kept = (out / "samples.jsonl").read_text().splitlines()
    distinct = {p.prompt for p in make_problems("arithmetic", "train", 24, 0, digits=1)}
    assert len(kept) == len(distinct) < 24  # both samples of a problem, and repeated problems, are duplicates
    before, after = load_pretrained(str(out / "student_init")), load_pretrained(str(out / "final"))
    assert not torch.equal(before.embed_tokens.weight, after.embed_tokens.weight)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6
    # a second run without --resume is refused; with it, nothing is sampled or trained again
    assert main(args) == 2
    assert main(args + ["--resume"]) == 0
    assert (out / "samples.jsonl").read_text().splitlines() == kept


def test_speedrun_hook(tmp_path, teacher_run, tokenizer, tok_dir, monkeypatch):
    correct_teacher(monkeypatch)
    run = tmp_path / "speedrun"
    save_tiny(run / "pretrain" / "final", tokenizer, tok_dir, seed=2)  # the base model R1 fine-tunes
    problems = make_problems("arithmetic", "train", 20, 0, digits=1)
    (run / "data").mkdir()
    (run / "data" / "grpo_problems.jsonl").write_text("".join(  # the layout seekling.speedrun writes
        json.dumps({"id": q.id, "task": q.task, "prompt": q.prompt, "answer": q.answer, "meta": q.meta}) + "\n"
        for q in problems))
    call = dict(teacher_dir=str(teacher_run / "final"), tokenizer_dir=str(tok_dir),
                problems_path=str(run / "data" / "grpo_problems.jsonl"), out_dir=str(run / "distill"),
                problems=16, device=torch.device("cpu"), resume=True)
    preset = PRESETS["smoke"].replace(distill_samples=2, sft_batch_size=64, sft_seq_len=64, max_new_tokens=12)
    call.update(sample=preset.sample_settings(), sft=preset.sft_config(3))  # as seekling.speedrun.stage_distill
    inspect.signature(D.speedrun_stage).bind(**call)
    result = D.speedrun_stage(**call)
    assert result["kept"] == 16 and result["sampled"] == 32 and result["keep_rate"] == 0.5
    assert result["tokens"] > 0 and result["flops"] > 0 and "kept 16/32" in result["summary"]
    assert result["sft_batch_size"] < 64  # 16 short samples fill fewer rows than a batch: it was lowered
    assert load_pretrained(str(run / "distill" / "final")).config.vocab_size == tokenizer.vocab_size
    # a teacher whose samples all fail: the stage is skipped with the statistics, the speedrun goes on
    monkeypatch.undo()
    skipped = D.speedrun_stage(**{**call, "out_dir": str(run / "distill2"),
                                  "sample": D.SampleSettings(k=2, max_new_tokens=6, batch_size=512)})
    assert "no verified sample to train on" in skipped["skipped"] and "32 sampled from 16 prompts" in skipped["skipped"]


def test_bad_input_is_explained(tmp_path, teacher_run, tok_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="looked for a seekling run directory.*pickled weights are never"):
        D.load_teacher(empty)
    with pytest.raises(CheckpointError, match="no such directory"):
        D.load_teacher(tmp_path / "missing")
    with pytest.raises(ConfigError, match="'poetry' has no reward function"):
        D.verifier_for("poetry")
    assert D.verifier_for("poetry", "accuracy")("<answer> 4 </answer>", Problem("x", "poetry", "q", "4", "")) == 1.0
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"prompt": "Write a poem", "answer": "roses", "task": "poetry"}) + "\n")
    out = str(tmp_path / "o.jsonl")
    assert main(["sample", "--teacher", str(teacher_run), "--problems", str(problems), "--out", out]) == 2
    assert "has no reward function" in capsys.readouterr().err
    # a random teacher keeps nothing: the command stops with the statistics
    assert main(["sample", "--teacher", str(teacher_run), "--tasks", "arithmetic", "--num-problems", "3", "--k", "2",
                 "--max-new-tokens", "6", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "no sample was kept" in err and "6 sampled from 3 prompts" in err and "0 kept" in err
    # ... and distill stops before training on nothing
    assert main(["distill", "--teacher", str(teacher_run), "--tasks", "arithmetic", "--num-problems", "3",
                 "--k", "2", "--max-new-tokens", "6", "--student-preset", "tiny", "--out", str(tmp_path / "d")]) == 2
    assert "no sample was kept" in capsys.readouterr().err and not (tmp_path / "d" / "final").exists()
    # a student that cannot be built is refused before any sampling
    assert main(["distill", "--teacher", str(teacher_run), "--tasks", "arithmetic", "--student-preset", "nope",
                 "--out", str(tmp_path / "d2")]) == 2
    assert "unknown student preset 'nope'" in capsys.readouterr().err and not (tmp_path / "d2").exists()
    assert main(["sample", "--teacher", str(teacher_run), "--out", out]) == 2
    assert "either --tasks or --problems" in capsys.readouterr().err
    problems.write_text(json.dumps({"prompt": "What is 1+1?"}) + "\n")
    assert main(["sample", "--teacher", str(teacher_run), "--problems", str(problems), "--out", out]) == 2
    assert "row has no 'answer'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="exactly one student"):
        D.build_student(Tokenizer.load(tok_dir))
