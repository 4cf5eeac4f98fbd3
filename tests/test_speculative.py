"""MTP speculative decoding is exact: greedy output is token for token the plain greedy output, sampled
output has the model's distribution (a chi-square test on the joint law of the first two tokens), the
log-probs are the model's own, and a model without MTP modules is refused."""

import math

import pytest
import torch

from seekling.config import ModelConfig
from seekling.errors import SeeklingError
from seekling.generate import Decoder, SamplingParams, generate, resolve_speculate
from seekling.model import Transformer
from seekling.speculative import inverse_cdf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A tiny model (main head and MTP module) trained on a cyclic sequence, so drafts are mostly right."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=32, num_nextn_predict_layers=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cycle = torch.tensor([3, 9, 4, 17, 5, 22, 8, 11, 30, 6])
    for _ in range(60):
        starts = torch.randint(0, 10, (8,))
        x = torch.stack([cycle[(s + torch.arange(33)) % 10] for s in starts])
        out = model(x[:, :-1], targets=x[:, 1:])
        optimizer.zero_grad()
        (out.loss + out.mtp_loss).backward()
        optimizer.step()
    return model.eval()


def small_vocab_model(vocab: int = 8, **overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=vocab, num_nextn_predict_layers=1, **overrides))
    with torch.no_grad():  # a spread-out distribution: larger logits than the initialisation gives
        model.lm_head.weight.mul_(3)
    return model.eval()


@pytest.mark.parametrize("which", ["trained", "random"])
def test_greedy_speculation_is_plain_greedy(which, trained):
    model = trained if which == "trained" else small_vocab_model(300)
    prompts = [[3, 9, 4], [17], [5, 22, 8, 11, 30], [3, 9, 4]]
    params = SamplingParams(max_new_tokens=40, temperature=0)
    plain = generate(model, prompts, params)
    stats = {}
    fast = generate(model, prompts, params, speculate=True, stats=stats)
    for a, b in zip(plain, fast):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    if which == "trained":  # the accepting path ran, and most of the time
        assert stats["accepted"] > 0.8 * stats["drafted"]


def test_both_draft_outcomes_happen_and_log_probs_are_the_models():
    model = small_vocab_model()
    decoder = Decoder(model, 4, cache_len=64, speculate=True)
    seqs = []
    for b in range(4):
        seqs.append(decoder.sequence([1, 2, 3], SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9), seed=b))
        seqs[-1].slot = b
    with torch.inference_mode():
        decoder.prefill(seqs)
        while not all(s.done for s in seqs):
            decoder.step([s for s in seqs if not s.done])
    assert 0 < decoder.counters["accepted"] < decoder.counters["drafted"]
    for s in seqs:
        seq = s.prompt_ids + s.token_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        expected = [logp[len(s.prompt_ids) - 1 + i, t].item() for i, t in enumerate(s.token_ids)]
        assert s.out.logprobs == pytest.approx(expected, abs=1e-4)
        assert len(s.token_ids) == 30


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 5  # cells too rare for the approximation are pooled
    pooled = torch.cat([counts[keep], counts[~keep].sum()[None]])
    pooled_e = torch.cat([expected[keep], expected[~keep].sum()[None]])
    return float(((pooled - pooled_e) ** 2 / pooled_e.clamp_min(1e-9)).sum()), int(keep.sum())


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.8, top_p=0.85, top_k=6)])
def test_sampled_tokens_have_the_models_joint_distribution(settings):
    """20,000 seeded rows of two tokens: the joint histogram against p(t1) p(t2 | t1) from full forwards."""
    model = small_vocab_model()
    V, N, prompt = 8, 20_000, [1, 2, 3]
    params = SamplingParams(max_new_tokens=2, seed=1234, **settings)

    def truncated(logits):
        from seekling.generate import truncate

        t = torch.tensor([params.temperature])
        _, masked, _ = truncate(logits[None], t, torch.tensor([params.top_p]), torch.tensor([params.top_k]))
        return masked[0].softmax(-1)

    with torch.no_grad():
        p1 = truncated(model(torch.tensor([prompt])).logits[0, -1])
        seqs = torch.tensor([prompt + [a] for a in range(V)])
        p2 = torch.stack([truncated(row) for row in model(seqs).logits[:, -1]])
    joint = (p1[:, None] * p2).reshape(-1)
    for speculate in (False, True):
        outs = generate(model, [prompt] * N, params, speculate=speculate)
        counts = torch.zeros(V * V)
        for o in outs:
            counts[o.token_ids[0] * V + o.token_ids[1]] += 1
        stat, cells = chi_square(counts, joint)
        # 99.99th percentile of chi-square with `cells` degrees of freedom (Wilson-Hilferty)
        z, k = 3.72, cells
        bound = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
        assert stat < bound, f"speculate={speculate}: chi-square {stat:.1f} over {cells} cells, bound {bound:.1f}"


def test_a_model_without_mtp_cannot_speculate():
    model = Transformer(ModelConfig.from_name("tiny", num_nextn_predict_layers=0)).eval()
    with pytest.raises(SeeklingError, match="has none"):
        generate(model, [[1, 2]], SamplingParams(max_new_tokens=3), speculate=True)


def test_draft_depth_beyond_the_mtp_depth_is_refused():
    model = small_vocab_model()  # one MTP module
    with pytest.raises(SeeklingError, match="exceeds the model's MTP depth 1"):
        Decoder(model, 1, cache_len=16, speculate=True, draft_depth=2)
    with pytest.raises(SeeklingError, match="integer >= 1"):
        Decoder(model, 1, cache_len=16, speculate=True, draft_depth=0)


def test_auto_speculation_and_the_flag_on_a_model_without_mtp():
    """auto is off on a CPU (measured slower there); --speculate on for a model with no MTP modules turns it
    off and says so once; from code, speculate=True on such a model is an error (above)."""
    model = small_vocab_model()
    assert resolve_speculate(model, None, 1) is False and resolve_speculate(model, "auto", 64) is False
    assert resolve_speculate(model, "on", 1) is True and resolve_speculate(model, "off", 1) is False
    with pytest.raises(SeeklingError, match="one of auto, on, off"):
        resolve_speculate(model, "yes", 1)
    bare = Transformer(ModelConfig.from_name("tiny", num_nextn_predict_layers=0)).eval()
    said = []
    assert resolve_speculate(bare, "on", 1, said.append) is False
    assert resolve_speculate(bare, "on", 1, said.append) is False
    assert len(said) == 1 and "no MTP modules" in said[0]
    stats = {}
    generate(bare, [[1, 2]], SamplingParams(max_new_tokens=3), stats=stats)  # auto: plain decoding
    assert stats["speculate"] is False and stats["drafted"] == 0


def test_inverse_cdf_draws_in_proportion_and_never_a_token_of_no_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]]).expand(60_000, 6)
    tokens = inverse_cdf(probs, torch.rand(60_000, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(tokens, minlength=6).float() / 60_000
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts[[1, 3, 4]], torch.tensor([0.5, 0.25, 0.25]), atol=0.01)
    edge = inverse_cdf(torch.tensor([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([1 - 1e-12, 0.999999]))
    assert edge.tolist() == [1, 0]
