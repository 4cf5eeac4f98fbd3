"""Evaluation: metric math against hand-computed values with a fake model that emits known
completions, the JSON shape, and the real sampler plumbing on a tiny model."""

import json

import pytest
import torch

from seekling.config import ModelConfig
from seekling.errors import ConfigError
from seekling.evaluate import evaluate, format_table, score_task
from seekling.generate import Completion
from seekling.model import Transformer
from seekling.tasks import Problem, make_problems
from hypothesis import given, settings
from hypothesis import strategies as st


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(task_tokenizer):
    return task_tokenizer(("arithmetic", "countdown"), per_task=200)


def test_score_task_hand_computed():
    problems = make_problems("arithmetic", "test", 3, 0)
    a = [p.answer for p in problems]
    right = lambda ans: f"<think> x </think> <answer> {ans} </answer>"  # noqa: E731
    completions = [
        [right(a[0]), right(a[0]), right(a[0]), right(int(a[0]) + 1)],  # 3/4 right, majority right
        [right(int(a[1]) + 1), right(int(a[1]) + 1), right(a[1]), "no tags " + a[1]],  # 2/4, majority wrong
        ["<think> x </think> <answer> 1000001", right(999999), right(999998), right(999997)],  # 0/4, unclosed
    ]
    m = score_task("arithmetic", problems, completions, lengths_PK=[[1, 2, 3, 4]] * 3)
    assert m["pass@1"] == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)  # k = n: any correct sample
    assert m["cons@4"] == pytest.approx(1 / 3)
    assert m["format"] == pytest.approx(10 / 12)  # the untagged and the unclosed ones fail
    assert m["mean_length"] == 2.5
    assert m["correct"][0] == [True, True, True, False]


def test_cons_at_k_votes_over_what_the_verifier_grades():
    """math500/9: gold 4. Two badly formatted completions hold a "#### 4" that the math verifier does
    not accept (it reads the last formula, 5); they must not vote 4 in: cons@4 above pass@4 was the bug."""
    problem = Problem(id="math500/9", task="math500", prompt="How many values?", answer="4", solution="")
    untagged = "<think> count them </think> #### 4\n so $5$"
    completions = [[untagged, untagged, "<think> a </think> <answer> 3 </answer>",
                    "<think> b </think> <answer> 7 </answer>"]]
    m = score_task("math500", [problem], completions)
    assert m["correct"] == [[False, False, False, False]]
    assert m["pass@4"] == 0.0 and m["cons@4"] == 0.0
    # the same answer inside <answer> tags is graded correct, so it votes and wins
    m = score_task("math500", [problem], [[completions[0][2], "<answer> 4 </answer>", "<answer> 4 </answer>"]])
    assert m["cons@3"] == 1.0 and m["pass@3"] == 1.0


_ANSWERS = st.sampled_from(["3", "4", "4.0", "$4$", "\\frac{8}{2}", "5", "x"])
_COMPLETION = st.one_of(
    _ANSWERS.map(lambda a: f"<think> t </think> <answer> {a} </answer>"),
    _ANSWERS.map(lambda a: f"<think> t </think> \\boxed{{{a}}}"),
    st.tuples(_ANSWERS, _ANSWERS).map(lambda ab: f"#### {ab[0]}\n then ${ab[1]}$"),
    _ANSWERS.map(lambda a: f"so it is {a} or so"),
    _ANSWERS.map(lambda a: f"<answer> {a}"),
)


@settings(max_examples=60, deadline=None)
@given(task=st.sampled_from(["math500", "arithmetic", "gsm8k"]), rows=st.lists(st.lists(_COMPLETION, min_size=3, max_size=3),
                                                                             min_size=1, max_size=3))
def test_cons_at_k_never_exceeds_pass_at_k(task, rows):
    problems = [Problem(id=f"p{i}", task=task, prompt="q", answer="4", solution="") for i in range(len(rows))]
    m = score_task(task, problems, rows)
    assert m["cons@3"] <= m["pass@3"] + 1e-12
    assert m["pass@1"] <= m["pass@3"] + 1e-12


def test_score_task_rejects_ragged_rows():
    problems = make_problems("arithmetic", "test", 2, 0)
    with pytest.raises(ConfigError):
        score_task("arithmetic", problems, [["a", "b"], ["c"]])


def test_evaluate_with_fake_model_matches_hand_values(tokenizer):
    """A fake sampler answers problem i correctly in the first (i mod 3) of its k=3 samples."""
    problems = make_problems("countdown", "test", 6, 0)
    by_prompt = {tuple(tokenizer.render_prompt([{"role": "user", "content": p.prompt}])): i
                 for i, p in enumerate(problems)}
    seen = {}

    def fake_generate(model, prompts, params):
        assert params.temperature == 0.6 and params.top_p == 0.95  # R1's evaluation protocol
        out = []
        for ids in prompts:
            i = by_prompt[tuple(ids)]
            j = seen.get(i, 0)
            seen[i] = j + 1
            answer = problems[i].answer if j < i % 3 else "1+1"
            text = f"<think> try </think> <answer> {answer} </answer>"
            out.append(Completion(token_ids=tokenizer.encode(text) + [tokenizer.eos_id], logprobs=[], finish_reason="stop"))
        return out

    result = evaluate(object(), tokenizer, ["countdown"], k=3, batch_size=4, generate_fn=fake_generate,
                      problems={"countdown": problems}, keep_samples=1)
    m = result["tasks"]["countdown"]
    right_per_problem = [i % 3 for i in range(6)]  # 0,1,2,0,1,2 correct of 3
    assert m["pass@1"] == pytest.approx(sum(r / 3 for r in right_per_problem) / 6)
    assert m["pass@3"] == pytest.approx(4 / 6)
    assert m["cons@3"] == pytest.approx(2 / 6)  # only 2 of 3 correct wins the vote
    assert m["format"] == 1.0
    assert set(result) == {"settings", "tasks", "mean"}
    assert result["mean"]["pass@1"] == m["pass@1"]
    assert m["samples"][0]["completions"][0].startswith("<think>")
    json.dumps(result)  # the whole result is JSON
    assert "countdown" in format_table(result)


def test_evaluate_tiny_model_plumbing(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)).eval()
    result = evaluate(model, tokenizer, ["arithmetic", "countdown"], n=3, k=2, max_new_tokens=8)
    for task in ("arithmetic", "countdown"):
        m = result["tasks"][task]
        assert m["n"] == 3 and m["k"] == 2
        assert 0 <= m["pass@1"] <= m["pass@2"] <= 1
        assert 1 <= m["mean_length"] <= 8
    assert set(result["mean"]) == {"pass@1", "pass@2", "cons@2", "format", "mean_length"}


def test_unknown_task_is_named(tokenizer):
    with pytest.raises(ConfigError, match="known: .*gsm8k"):
        evaluate(object(), tokenizer, ["nope"], n=1, k=1)


def test_published_set_from_any_path(tmp_path, tokenizer):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}) + "\n")

    def fake_generate(model, prompts, params):
        return [Completion(tokenizer.encode("<think> 2+2=4 </think> <answer> 4 </answer>"), [], "stop") for _ in prompts]

    result = evaluate(object(), tokenizer, ["gsm8k"], n=None, k=2, paths={"gsm8k": str(path)},
                      generate_fn=fake_generate)
    assert result["tasks"]["gsm8k"]["pass@1"] == 1.0 and result["tasks"]["gsm8k"]["n"] == 1


def test_any_task_name_with_a_prompt_answer_file_is_graded_as_grpo_grades_it(tmp_path, tokenizer):
    """`--tasks mysum --path mysum=FILE`: the {prompt, answer} rows `grpo --data` takes; a row naming
    its own task is graded by that task's verifier (countdown checks the expression), others by number."""
    path = tmp_path / "mysum.jsonl"
    rows = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "What is 4+4?", "answer": "8"},
            {"prompt": "Use 3, 8 to make 24.", "answer": "24", "task": "countdown", "meta": {"numbers": [3, 8]}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    replies = {"What is 2+3?": "5", "What is 4+4?": "9", "Use 3, 8 to make 24.": "3*8"}
    by_prompt = {tuple(tokenizer.render_prompt([{"role": "user", "content": q}])): a for q, a in replies.items()}

    def fake_generate(model, prompts, params):
        return [Completion(tokenizer.encode(f"<think> t </think> <answer> {by_prompt[tuple(ids)]} </answer>"), [], "stop")
                for ids in prompts]

    result = evaluate(object(), tokenizer, ["mysum"], n=None, k=2, paths={"mysum": str(path)},
                      generate_fn=fake_generate, keep_samples=3)
    m = result["tasks"]["mysum"]
    assert m["n"] == 3 and m["pass@1"] == pytest.approx(2 / 3)  # 5 right, 9 wrong, 3*8 = 24 with 3 and 8
    assert [s["correct"] for s in m["samples"]] == [[True, True], [False, False], [True, True]]
    with pytest.raises(ConfigError, match="--path mysum=FILE"):
        evaluate(object(), tokenizer, ["mysum"], n=None, k=1, generate_fn=fake_generate)


def test_eval_command_on_a_speedrun_directory(tmp_path, tokenizer, capsys):
    """`seekling eval RUN_DIR` finds the run's best stage and its tokenizer, and evaluates the task
    the run trained on unless --tasks says otherwise; other tasks come from {prompt, answer} files."""
    from seekling.checkpoint import save_pretrained
    from seekling.cli import main

    run = tmp_path / "speedrun-cpu"
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))
    for stage, score in (("sft", 0.1), ("grpo", 0.3)):
        save_pretrained(model, str(run / stage / "final"))
        (run / "eval").mkdir(exist_ok=True)
        (run / "eval" / f"{stage}.json").write_text(json.dumps({"mean": {"pass@1": score}}))
    tokenizer.save(run / "tokenizer")
    (run / "state.json").write_text(json.dumps({"format": "seekling-speedrun-v1", "config": {"rl_task": "linear"},
                                                "finished": ["eval_sft", "eval_grpo"]}))
    fast = ["--n", "2", "--k", "1", "--max-new-tokens", "2"]
    assert main(["eval", str(run), *fast]) == 0
    out = capsys.readouterr().out
    assert f"model: {run / 'grpo' / 'final'}" in out and "30.0%" in out
    assert "tasks: linear" in out and "\nlinear " in out and "countdown" not in out
    (tmp_path / "mysum.jsonl").write_text(json.dumps({"prompt": "What is 2+3?", "answer": "5"}) + "\n")
    assert main(["eval", str(run), "--tasks", "mysum", "--path", f"mysum={tmp_path / 'mysum.jsonl'}", *fast]) == 0
    assert "\nmysum " in capsys.readouterr().out
