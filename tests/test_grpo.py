"""GRPO: advantages, the clipped surrogate, the KL term and each loss aggregation against hand-computed
numbers; a step with a positive advantage raises that completion's log-probability; parameters change;
dynamic sampling; resume equals an uninterrupted run; bad input (G < 2, unknown reward, rows without
an answer, failing user rewards, tags never closed, NaN losses)."""

import json
import math
import sys

import pytest
import torch

import seekling.grpo as grpo
from seekling.config import ModelConfig
from seekling.errors import ConfigError, DataError
from seekling.grpo import (GRPOConfig, LossTotals, Rollouts, TrainingStopped, clipped_surrogate, fill_informative,
                           group_advantages, group_logprobs, grpo_loss, grpo_step, informative_groups,
                           kl_to_reference, pad_rollouts, seq_mean_token_mean,
                           seq_sum_constant, token_logprobs, token_mean, train_grpo)
from seekling.model import Transformer
from seekling.rewards import RewardError
from seekling.data import read_problems
from seekling.tasks import make_problems, render_prompt_ids
from seekling.train_state import list_checkpoints
from seekling.training import build_optimizer


pytestmark = pytest.mark.usefixtures("one_thread")




def tiny(tokenizer, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))


def small_cfg(**overrides):
    base = dict(prompts_per_step=2, group_size=4, max_new_tokens=6, lr=1e-3, steps=2, micro_batch_size=5,
                temperature=1.0, rewards={"correct": 1.0, "format": 0.2})
    return GRPOConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- the math, by hand
def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    std = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    a = group_advantages(rewards)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # an all-equal group carries no signal
    assert torch.allclose(group_advantages(rewards, scale_std=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ConfigError):
        group_advantages(torch.ones(3, 1))


def hand_batch():
    # ratios row 0: 1.5, 1.0 (A = +1); row 1: 0.5, 1.0, 1.1 (A = -1)
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 1.0], [0.5, 1.0, 1.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logp, old, torch.tensor([1.0, -1.0]), mask


def test_clipped_surrogate_by_hand():
    logp, old, adv, mask = hand_batch()
    objective, clipped = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # row 0: min(1.5, 1.28) = 1.28 (clip-higher bound), 1.0; row 1: min(-0.5, -0.8) = -0.8, -1.0, -1.1
    assert torch.allclose(objective[0, :2], torch.tensor([1.28, 1.0]))
    assert torch.allclose(objective[1], torch.tensor([-0.8, -1.0, -1.1]))
    assert clipped.tolist() == [[True, False, False], [True, False, False]]


def test_aggregations_by_hand():
    logp, old, adv, mask = hand_batch()
    per_token = -clipped_surrogate(logp, old, adv, 0.2, 0.28)[0]  # row 0: -1.28, -1.0; row 1: 0.8, 1.0, 1.1
    totals = LossTotals.of(mask, max_new_tokens=4)
    assert seq_mean_token_mean(per_token, mask, totals).item() == pytest.approx(((-2.28 / 2) + (2.9 / 3)) / 2)
    assert token_mean(per_token, mask, totals).item() == pytest.approx(0.62 / 5)
    assert seq_sum_constant(per_token, mask, totals).item() == pytest.approx(0.62 / (2 * 4))
    loss, stats = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="token_mean")
    assert loss.item() == pytest.approx(0.124) and stats["clip_fraction"] == pytest.approx(2 / 5)


def test_micro_batches_add_up_to_the_full_batch():
    logp, old, adv, mask = hand_batch()
    for name in grpo.LOSS_AGGREGATIONS:
        totals = LossTotals.of(mask, 3)
        full = grpo_loss(logp, old, adv, mask, aggregation=name, totals=totals)[0]
        parts = sum(grpo_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], aggregation=name,
                              totals=totals)[0] for i in range(2))
        assert torch.allclose(full, parts), name


def test_kl_term_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.2]]))
    kl = kl_to_reference(logp, ref)
    assert kl[0, 0].item() == pytest.approx(0.5 - math.log(0.5) - 1)  # pi_ref/pi - log(pi_ref/pi) - 1
    assert kl[0, 1].item() == 0.0
    kl[0, 1].backward()
    assert logp.grad[0, 1].item() == 0.0  # zero gradient where the policies agree
    mask, adv = torch.ones(1, 2), torch.zeros(1)
    loss, stats = grpo_loss(logp.detach(), logp.detach(), adv, mask, ref, beta=0.1, aggregation="token_mean")
    assert loss.item() == pytest.approx(0.1 * (0.5 - math.log(0.5) - 1) / 2)
    assert stats["kl"] == pytest.approx((0.5 - math.log(0.5) - 1) / 2)


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.2, 0.2]])
    assert informative_groups(rewards).tolist() == [False, True, False]


def fake_rollouts(name, rewards):
    """Groups of 2 completions named name0, name1, ... with the given [P, 2] rewards."""
    P = len(rewards)
    rows = [[i, j] for i in range(P) for j in range(2)]
    return Rollouts([f"{name}{i}" for i in range(P)], [[i] for i, _ in rows], [[j] for _, j in rows],
                    [[0.0] for _ in rows], [f"{name}{i}.{j}" for i, j in rows], torch.tensor(rewards, dtype=torch.float),
                    {"correct": [float(i) for i, _ in rows]}, [False] * 2 * P, [True] * 2 * P, [True] * 2 * P, 1.0)


def test_dynamic_sampling_refills_up_to_the_batch_size():
    first = fake_rollouts("a", [[1, 1], [0, 1], [0, 0]])  # one informative group of three
    extra = {1: fake_rollouts("b", [[1, 1], [1, 0], [0, 0]]), 2: fake_rollouts("c", [[0, 1], [1, 0], [1, 1]])}
    asked = []

    def more(r):
        asked.append(r)
        return extra[r]

    kept, used = fill_informative(first, more, target=3, rounds=5)
    assert used == 2 and asked == [1, 2]
    assert kept.problems == ["a1", "b1", "c0"]  # informative groups in order, cut at the target
    assert kept.texts == ["a1.0", "a1.1", "b1.0", "b1.1", "c0.0", "c0.1"]
    assert kept.rewards_PG.tolist() == [[0, 1], [1, 0], [0, 1]] and kept.components["correct"] == [1, 1, 1, 1, 0, 0]
    assert kept.sample_seconds == 3.0
    kept, used = fill_informative(first, more, target=3, rounds=1)  # the round budget ends the refill
    assert used == 1 and kept.problems == ["a1", "b1"]
    kept, used = fill_informative(first, more, target=1, rounds=5)  # already full: nothing more sampled
    assert used == 0 and kept.problems == ["a1"]


# ----------------------------------------------------------------------------- a real step on a tiny model
def hand_rollouts(tokenizer, rewards):
    problem = make_problems("arithmetic", "train", 1, 0)[0]
    prompt = tokenizer.render_prompt([{"role": "user", "content": problem.prompt}])
    completions = [tokenizer.encode(f"<think> {x} </think>") for x in ("1+1=2", "3*3=9")]
    return Rollouts([problem], [prompt, prompt], completions, [[0.0] * len(c) for c in completions],
                    ["", ""], torch.tensor([rewards]), {}, [False, False], [False, False], [True, True])


def completion_logprob(model, tokenizer, rollouts, row):
    inputs, targets, mask, _ = pad_rollouts([row], rollouts, tokenizer.pad_id)
    with torch.no_grad():
        logp, _ = token_logprobs(model, inputs, targets, 1.0)
    return float((logp * mask).sum())


@pytest.mark.parametrize("bucket_rows", [16, 3, 1])
def test_shared_prompt_scoring_equals_the_full_forward(tokenizer, bucket_rows):
    """group_logprobs (each prompt once, completions against its latent cache, in length buckets)
    against the slow path (prompt + completion through a full forward): same log-probs, entropies
    and gradients."""
    model = tiny(tokenizer)
    prompts, completions = [[5, 6, 7, 8, 9], [10, 11]], [[12, 13, 14], [15], [16, 17], [18, 19, 20, 21]]
    logp, mask, entropy = group_logprobs(model, prompts, completions, 2, 0.7, tokenizer.pad_id, with_entropy=True,
                                         bucket_rows=bucket_rows)
    (logp * mask).sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    rollouts = Rollouts([None, None], [prompts[0]] * 2 + [prompts[1]] * 2, completions,
                        [[0.0] * len(c) for c in completions], [""] * 4, torch.zeros(2, 2), {}, [False] * 4,
                        [False] * 4, [True] * 4)
    inputs, targets, ref_mask, _ = pad_rollouts(range(4), rollouts, tokenizer.pad_id)
    ref_logp, ref_entropy = token_logprobs(model, inputs, targets, 0.7, with_entropy=True)
    (ref_logp * ref_mask).sum().backward()
    for b in range(4):
        assert torch.allclose(logp[b][mask[b].bool()], ref_logp[b][ref_mask[b].bool()], atol=1e-5)
        assert torch.allclose(entropy[b][mask[b].bool()], ref_entropy[b][ref_mask[b].bool()], atol=1e-4)
    slow = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert fast.keys() == slow.keys()
    for name in fast:
        assert torch.allclose(fast[name], slow[name], atol=1e-5), name


def test_positive_advantage_raises_that_completion(tokenizer):
    model = tiny(tokenizer)
    rollouts = hand_rollouts(tokenizer, [1.0, 0.0])
    before = [completion_logprob(model, tokenizer, rollouts, r) for r in (0, 1)]
    for r in (0, 1):  # old log-probs = the current policy's, as the sampler would report
        inputs, targets, mask, _ = pad_rollouts([r], rollouts, tokenizer.pad_id)
        with torch.no_grad():
            logp = token_logprobs(model, inputs, targets, 1.0)[0][mask.bool()]
        rollouts.old_logprobs[r] = logp.tolist()
    cfg = small_cfg(group_size=2, lr=1e-2, grad_clip=0.0)
    optimizer = build_optimizer(model, cfg.lr, weight_decay=0.0)
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = grpo_step(model, optimizer, rollouts, cfg, tokenizer.pad_id)
    after = [completion_logprob(model, tokenizer, rollouts, r) for r in (0, 1)]
    assert after[0] > before[0] and after[1] < before[1]
    assert stats["clip_fraction"] == 0.0 and stats["nan"] == 0.0 and stats["entropy"] > 0
    # the "parameters changed" smoke test: everything the policy loss and the MTP loss reach moves
    grads = [n for n, p in model.named_parameters() if not torch.equal(p, before_params[n])]
    assert any(n.startswith("lm_head") for n in grads) and any(n.startswith("layers.0.") for n in grads)
    assert any(n.startswith("mtp.") for n in grads) and stats["mtp_loss"] > 0


def test_the_mtp_loss_trains_the_mtp_modules_and_leaves_the_policy_update_alone(tokenizer):
    """GRPO with mtp_weight > 0: every policy parameter takes exactly the step it takes with mtp_weight = 0
    (states, embedding and head detached, MTP clipped apart), the MTP modules move, and their loss on
    the completions falls over a few steps."""
    rollouts = hand_rollouts(tokenizer, [1.0, 0.0])
    after = {}
    for weight in (0.0, 1.0):
        model = tiny(tokenizer)
        cfg = small_cfg(group_size=2, lr=1e-2, grad_clip=0.5, mtp_weight=weight)
        optimizer = build_optimizer(model, cfg.lr, weight_decay=0.0)
        history = [grpo_step(model, optimizer, rollouts, cfg, tokenizer.pad_id) for _ in range(5)]
        after[weight] = dict(model.named_parameters())
    for name, p in after[0.0].items():
        if name.startswith("mtp."):
            assert not torch.equal(p, after[1.0][name]), name
        else:
            assert torch.equal(p, after[1.0][name]), name
    assert history[-1]["mtp_loss"] < history[0]["mtp_loss"]


def test_the_mtp_loss_reads_mtp_samples_completions_of_each_group(tokenizer, monkeypatch):
    import seekling.grpo as grpo_module

    rollouts = hand_rollouts(tokenizer, [1.0, 0.0])  # one group of two
    seen = []
    real = grpo_module.mtp_backward
    monkeypatch.setattr(grpo_module, "mtp_backward", lambda model, prompts, completions, *a: (
        seen.append([list(c) for c in completions]) or real(model, prompts, completions, *a)))
    for samples in (1, 2):
        model = tiny(tokenizer)
        cfg = small_cfg(group_size=2, lr=1e-2, mtp_samples=samples)
        grpo_step(model, build_optimizer(model, cfg.lr, weight_decay=0.0), rollouts, cfg, tokenizer.pad_id)
    assert seen == [[list(rollouts.completion_ids[0])], [list(c) for c in rollouts.completion_ids]]
    with pytest.raises(ConfigError, match="mtp_samples must be >= 1"):
        small_cfg(mtp_samples=0).validate()


def test_train_grpo_end_to_end_with_truncated_completions(tmp_path, tokenizer):
    model = tiny(tokenizer)
    problems = make_problems("arithmetic", "train", 8, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # a random tiny model never closes its tags in 6 tokens: scored 0 on format, not a crash
    cfg = small_cfg(rewards={"format": 1.0, "correct": 1.0, "tests_grpo_rewards:by_length": 0.1,
                             "tests_grpo_rewards:distinct": 1.0})
    lines = []
    summary = train_grpo(model, tokenizer, problems, cfg, tmp_path / "run", log=lines.append)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    progress = [line for line in lines if line.startswith("grpo step")]  # printed even where no bar shows
    assert len(progress) == 2 and progress[1].startswith("grpo step 2/2 | reward ") and "| accuracy " in progress[1]
    for key in ("reward", "reward/format", "reward/correct", "accuracy", "format", "response_length",
                "response_length_max", "clip_fraction", "entropy", "sample_tokens_per_s", "train_tokens_per_s"):
        assert key in records[0], key
    assert records[0]["format"] == 0.0 and records[0]["truncated"] > 0.5 and records[0]["groups_kept"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file() and summary["step"] == 2


@pytest.fixture()
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "tests_grpo_rewards.py").write_text(
        "def by_length(completion, answer, length):\n    return float(length)\n"
        "def constant(completion, answer, **meta):\n    return 1.0\n"
        "def distinct(completion, answer, **meta):\n    return float(len(set(completion)) % 3)\n"
        "def broken(completion, answer, **meta):\n    raise RuntimeError('boom')\n"
        "def not_a_number(completion, answer, **meta):\n    return 'high'\n"
        "calls = 0\n"
        "def flaky(completion, answer, **meta):\n    global calls\n    calls += 1\n"
        "    if calls == 1:\n        raise RuntimeError('once')\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tests_grpo_rewards", raising=False)  # this test's copy, fresh counters
    yield
    sys.modules.pop("tests_grpo_rewards", None)


@pytest.fixture(autouse=True)
def _user_rewards(user_rewards):
    pass


def test_dynamic_sampling_drops_all_equal_groups(tmp_path, tokenizer):
    model = tiny(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = small_cfg(rewards={"tests_grpo_rewards:constant": 1.0}, refill_rounds=2)
    train_grpo(model, tokenizer, make_problems("arithmetic", "train", 4, 0), cfg, tmp_path / "r", log=lambda s: None)
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["groups_kept"] == 0 and r["skipped"] == 1 and r["refill_rounds"] == 2 for r in records)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_failing_user_rewards_score_zero_and_are_counted(tmp_path, tokenizer):
    cfg = small_cfg(steps=1, rewards={"tests_grpo_rewards:flaky": 1.0, "tests_grpo_rewards:by_length": 1.0})
    summary = train_grpo(tiny(tokenizer), tokenizer, make_problems("arithmetic", "train", 4, 0), cfg,
                         tmp_path / "r", log=lambda s: None)
    assert summary["reward_failures"] == 1  # the first sample; the other P*G - 1 returned True
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    n = cfg.prompts_per_step * cfg.group_size
    assert record["reward/tests_grpo_rewards:flaky"] == pytest.approx((n - 1) / n) and record["reward_failures"] == 1


@pytest.mark.parametrize("broken", ["broken", "not_a_number"])
def test_a_reward_failing_on_every_sample_stops_the_run(tmp_path, tokenizer, broken):
    """Not `reward 0.000, groups_kept 0` as if it had trained: a clear error naming the reward."""
    cfg = small_cfg(steps=2, rewards={"correct": 1.0, f"tests_grpo_rewards:{broken}": 1.0})
    with pytest.raises(RewardError, match=f"tests_grpo_rewards:{broken}' failed on all"):
        train_grpo(tiny(tokenizer), tokenizer, make_problems("arithmetic", "train", 4, 0), cfg,
                   tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r" / "final").exists()


def test_resume_equals_uninterrupted(tmp_path, tokenizer):
    problems = make_problems("arithmetic", "train", 8, 0)
    cfg = small_cfg(steps=3, beta=0.05, save_every=1, rewards={"tests_grpo_rewards:distinct": 1.0})
    straight = tiny(tokenizer)
    train_grpo(straight, tokenizer, problems, cfg, tmp_path / "a", log=lambda s: None)

    first = tiny(tokenizer)
    train_grpo(first, tokenizer, problems, cfg, tmp_path / "b", max_seconds=0.0, log=lambda s: None)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_0000001"]
    resumed = tiny(tokenizer, seed=7)  # different weights: the checkpoint must restore everything
    torch.manual_seed(99)
    train_grpo(resumed, tokenizer, problems, cfg, tmp_path / "b", resume=True, log=lambda s: None)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(straight.lm_head.weight, tiny(tokenizer).lm_head.weight)  # it did train
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert [json.loads(x)["kl"] for x in lines] == [
        json.loads(x)["kl"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]


def test_nan_losses_skip_then_stop_keeping_the_last_good_checkpoint(tmp_path, tokenizer, monkeypatch):
    problems = make_problems("arithmetic", "train", 8, 0)
    model = tiny(tokenizer)
    cfg = small_cfg(steps=10, save_every=1, max_bad_steps=3, rewards={"tests_grpo_rewards:distinct": 1.0})
    train_grpo(model, tokenizer, problems, cfg, tmp_path / "r",
               max_seconds=0.0, log=lambda s: None)
    good = {n: p.detach().clone() for n, p in model.named_parameters()}
    real_loss = grpo.grpo_loss
    monkeypatch.setattr(grpo, "grpo_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), {"clip_fraction": 0.0}))
    messages = []
    with pytest.raises(TrainingStopped, match="not finite for 3 steps in a row.*step_0000001"):
        train_grpo(model, tokenizer, problems, cfg, tmp_path / "r", resume=True, log=messages.append)
    assert sum("update skipped" in m for m in messages) == 3
    assert all(torch.equal(p, good[n]) for n, p in model.named_parameters())  # no NaN ever applied
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step_0000001"]
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nan") for r in records[1:]] == [1.0, 1.0, 1.0]


def test_bad_input_is_explained(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="group_size .* must be >= 2"):
        small_cfg(group_size=1).validate()
    with pytest.raises(ConfigError, match="refill_rounds must be >= 0"):
        small_cfg(refill_rounds=-1).validate()
    with pytest.raises(ConfigError, match="unknown reward 'acuracy'; known: .*accuracy"):
        train_grpo(tiny(tokenizer), tokenizer, make_problems("arithmetic", "train", 2, 0),
                   small_cfg(rewards={"acuracy": 1.0}), tmp_path / "x")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1+1?", "answer": "2"}) + "\n"
                    + json.dumps({"prompt": "What is 2+2?"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: row has no 'answer'"):
        read_problems(str(data))


def test_r1zero_template(tokenizer):
    problem = make_problems("countdown", "train", 1, 0)[0]
    ids = render_prompt_ids(tokenizer, problem, "r1zero")
    text = tokenizer.decode(ids)
    assert ids[0] == tokenizer.bos_id and text.endswith(f"User: {problem.prompt}. Assistant:")
    assert render_prompt_ids(tokenizer, problem, "chat")[-1] == tokenizer.assistant_id


def test_cli_rejects_bad_flags_in_one_line(capsys):
    from seekling.cli import main

    assert main(["grpo", "--init-from", "m", "--out", "o", "--group-size", "1"]) == 2
    assert "group_size (G) must be >= 2" in capsys.readouterr().err
    assert main(["grpo", "--init-from", "m", "--out", "o", "--reward", "acuracy=1"]) == 2
    assert "known: accuracy" in capsys.readouterr().err
