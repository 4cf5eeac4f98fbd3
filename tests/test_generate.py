"""The sampler: greedy equals step-by-step argmax of full forwards, per-row seeds, stop tokens,
top-k/top-p truncation, log-probabilities, bad prompts."""

import math

import pytest
import torch

from seekling.config import ModelConfig
from seekling.errors import SeeklingError
from seekling.generate import SamplingParams, generate, sample_tokens
from seekling.model import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny")).eval()


def greedy_by_full_forward(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_batched_equals_full_forward(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 200, 300]]
    outs = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == greedy_by_full_forward(model, prompt, 12)
        assert out.finish_reason == "length"


@pytest.mark.parametrize("temperature", [0.7, 0.0])  # greedy rows report the unscaled distribution's
def test_logprobs_are_those_of_the_model(model, temperature):
    prompt = [1, 2, 3, 4]
    out = generate(model, [prompt], SamplingParams(max_new_tokens=6, temperature=temperature, seed=3))[0]
    seq = prompt + out.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0] / (temperature or 1.0), -1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert math.isclose(lp, logp[len(prompt) - 1 + i, tok].item(), abs_tol=1e-4)


def test_seeded_rows_do_not_depend_on_the_batch(model):
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    alone = generate(model, [[7, 8, 9]], [p])[0]
    batched = generate(model, [[1, 2], [7, 8, 9], [4, 4, 4, 4, 4]],
                       [SamplingParams(max_new_tokens=10, seed=1), p, SamplingParams(max_new_tokens=3, seed=2)])
    assert batched[1].token_ids == alone.token_ids
    again = generate(model, [[7, 8, 9]], [p])[0]
    assert again.token_ids == alone.token_ids


def test_stop_tokens_end_a_row(model):
    first = generate(model, [[9, 9, 9]], SamplingParams(max_new_tokens=8, temperature=0))[0].token_ids
    stop = first[3]
    out = generate(model, [[9, 9, 9]], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(stop,)))[0]
    assert out.token_ids == first[: first.index(stop) + 1]
    assert out.finish_reason == "stop"


def test_top_k_one_is_greedy_and_top_p_truncates():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 200)
    ones = torch.ones(200)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    tokens, _ = sample_tokens(logits, ones, ones, torch.ones(200, dtype=torch.long), gens)
    assert (tokens == 1).all()
    # probs ~ [0.032, 0.644, 0.087, 0.237]: top_p=0.8 keeps {1, 3}
    tokens, logprobs = sample_tokens(logits, ones, torch.full((200,), 0.8), torch.zeros(200, dtype=torch.long), gens)
    assert set(tokens.tolist()) == {1, 3}
    assert torch.allclose(logprobs[tokens == 1], torch.log_softmax(logits[0], -1)[1])
    tokens, _ = sample_tokens(logits, ones, ones, torch.zeros(200, dtype=torch.long), gens)
    assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_bad_prompts_are_named(model):
    with pytest.raises(SeeklingError, match="prompt 1 has 600 tokens"):
        generate(model, [[1], [1] * 600], SamplingParams(max_new_tokens=1))
    with pytest.raises(SeeklingError, match="outside the vocabulary"):
        generate(model, [[100000]], SamplingParams())
    with pytest.raises(SeeklingError, match="top_p"):
        generate(model, [[1]], SamplingParams(top_p=0))


def test_generation_stops_at_the_maximum_position(model):
    out = generate(model, [[1] * 500], SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_identical_prompts_prefill_once_and_sample_alike(model):
    p, q = [5, 6, 7, 8], [9, 10]
    batch = generate(model, [p, q, p, p], SamplingParams(max_new_tokens=6, temperature=0))
    alone = {tuple(x): generate(model, [x], SamplingParams(max_new_tokens=6, temperature=0))[0] for x in (p, q)}
    for prompt, out in zip([p, q, p, p], batch):
        assert out.token_ids == alone[tuple(prompt)].token_ids
        assert out.logprobs == pytest.approx(alone[tuple(prompt)].logprobs, abs=1e-5)
    # seeded rows: row b of a batch of copies is the row-b sample of the prompt alone with that seed
    copies = generate(model, [p] * 3, SamplingParams(max_new_tokens=6, temperature=1.0, seed=11))
    for b, out in enumerate(copies):
        single = generate(model, [p], SamplingParams(max_new_tokens=6, temperature=1.0, seed=11 + b))[0]
        assert out.token_ids == single.token_ids
