"""The lean decode step equals `forward_cached` for one token per row: logits, the cache it writes,
the lengths it advances, for every layout of the attention and the router, all rows or some, and each
way of running the routed experts (all of them densely, or expert by expert: one token's on a CPU,
several tokens' grouped)."""

import pytest
import torch

from seekling.config import ModelConfig
from seekling import decode
from seekling.decode import DecodeEngine
from seekling.model import LatentCache, Transformer

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 1.0, "mscale_all_dim": 0.8}
CONFIGS = {
    "q_lora, groups": {},
    "no q_lora, attention bias": dict(q_lora_rank=None, attention_bias=True),
    "q_lora, attention bias": dict(attention_bias=True),
    "yarn, one group, unnormalised, scaled": dict(rope_scaling=YARN, n_group=1, topk_group=1, norm_topk_prob=False,
                                                  routed_scaling_factor=2.5),
    "rotate-half rope, no shared expert": dict(rope_interleave=False, n_shared_experts=0),
}


def randomised(config: ModelConfig, dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases away from their 1 / 0 initialisation
            if p.dim() == 1:
                p.normal_(1.0 if p.abs().max() == 1 else 0.0, 0.2)
        for gate in model.moe_gates:
            gate.e_score_correction_bias.normal_(0, 0.05)
    return model.to(dtype)


@pytest.fixture(params=["dense experts", "expert by expert", "dense layout, more tokens than dense takes"])
def experts(request, monkeypatch):
    """The tiny preset's experts are small enough to run densely; the other runs make them too big to, or
    the steps' tokens too many (the folded layout holds the experts, the step takes the grouped path)."""
    assert decode.dense_experts(ModelConfig.from_name("tiny"))
    if request.param == "expert by expert":
        monkeypatch.setattr(decode, "DENSE_EXPERTS_BYTES", 0)
    elif request.param.startswith("dense layout"):
        monkeypatch.setattr(decode, "DENSE_EXPERTS_TOKENS", 1)
    return request.param


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_equals_forward_cached(name, experts):
    config = ModelConfig.from_name("tiny", **CONFIGS[name])
    model = randomised(config)
    engine = DecodeEngine(model)
    B = 3
    prompts = torch.randint(0, config.vocab_size, (B, 7))
    lengths = torch.tensor([7, 3, 5])
    ref, fast = LatentCache(config, B, 32), LatentCache(config, B, 32)
    with torch.inference_mode():
        model.forward_cached(prompts, ref, num_new=lengths)
        model.forward_cached(prompts, fast, num_new=lengths)
        for rows in [None, None, torch.tensor([2, 0]), None, torch.tensor([1]), torch.tensor([0])]:
            n = B if rows is None else len(rows)
            tokens = torch.randint(0, config.vocab_size, (n,))
            expected = model.forward_cached(tokens[:, None], ref, rows=rows)
            got = engine.step(tokens, fast, rows=rows)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
            assert torch.equal(fast.lengths, ref.lengths)
            for kv_fast, kv_ref in zip(fast.kv, ref.kv):
                torch.testing.assert_close(kv_fast, kv_ref, atol=2e-5, rtol=1e-5)


def test_step_in_bf16_stays_close(experts):
    config = ModelConfig.from_name("tiny")
    model = randomised(config, torch.bfloat16)
    engine = DecodeEngine(model)
    ref = LatentCache(config, 2, 16, dtype=torch.bfloat16)
    fast = LatentCache(config, 2, 16, dtype=torch.bfloat16)
    prompts = torch.randint(0, config.vocab_size, (2, 5))
    with torch.inference_mode():
        model.forward_cached(prompts, ref)
        model.forward_cached(prompts, fast)
        tokens = torch.tensor([3, 4])
        expected = model.forward_cached(tokens[:, None], ref).float()
        got = engine.step(tokens, fast).float()
    assert got.dtype == expected.dtype
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_engine_reads_the_weights_at_build_time():
    model = randomised(ModelConfig.from_name("tiny"))
    engine = DecodeEngine(model)
    cache = LatentCache(model.config, 1, 8)
    with torch.inference_mode():
        before = engine.step(torch.tensor([1]), cache)
        cache.reset()
        with torch.no_grad():
            model.lm_head.weight.mul_(2)
        assert torch.equal(engine.step(torch.tensor([1]), cache), before)  # a copy: rebuild after updates
        cache.reset()
        torch.testing.assert_close(DecodeEngine(model).step(torch.tensor([1]), cache), 2 * before)


@pytest.mark.parametrize("name", ["q_lora, groups", "no q_lora, attention bias", "rotate-half rope, no shared expert"])
def test_multi_token_step_and_the_mtp_draft_equal_the_reference(name, experts):
    """What speculative decoding runs: two new tokens per row with the final states, then the first MTP
    module over 1 or 2 positions per row, against `forward_cached` / `mtp_forward_cached`."""
    config = ModelConfig.from_name("tiny", num_nextn_predict_layers=1, **CONFIGS[name])
    model = randomised(config)
    engine = DecodeEngine(model)
    B, L = 3, config.num_hidden_layers
    prompts = torch.randint(0, config.vocab_size, (B, 6))
    lengths = torch.tensor([6, 2, 4])
    ref, fast = LatentCache(config, B, 32), LatentCache(config, B, 32)
    mtp_ref, mtp_fast = (LatentCache(config, B, 32, layers=range(L, L + 1)) for _ in range(2))
    with torch.inference_mode():
        for cache in (ref, fast):
            model.forward_cached(prompts, cache, num_new=lengths)
        h0 = torch.randn(B, 6, config.hidden_size)
        for cache in (mtp_ref, mtp_fast):
            model.mtp_forward_cached(1, prompts, h0, cache, num_new=lengths)
        for rows in [None, torch.tensor([2, 0])]:
            n = B if rows is None else len(rows)
            tokens = torch.randint(0, config.vocab_size, (n, 2))
            expected, h_ref = model.forward_cached(tokens, ref, rows=rows, all_logits=True, hidden=True)
            got, h_fast = engine.step(tokens, fast, rows=rows, hidden=True)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(h_fast, h_ref, atol=2e-5, rtol=1e-5)
            assert torch.equal(fast.lengths, ref.lengths)
            num_new = torch.tensor([2, 1, 2][:n])
            expected, _ = model.mtp_forward_cached(1, tokens, h_ref, mtp_ref, rows=rows, num_new=num_new)
            got = engine.mtp_step(tokens, h_fast, mtp_fast, num_new, rows=rows)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
            assert torch.equal(mtp_fast.lengths, mtp_ref.lengths)
            torch.testing.assert_close(mtp_fast.kv[L], mtp_ref.kv[L], atol=2e-5, rtol=1e-5)
