"""Model invariants: config validation, parameter counts, MoE dispatch vs the naive path, losses by hand,
bias updates, cached decoding vs full forward, absorbed vs expanded attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from seekling.config import PRESETS, ModelConfig, count_parameters
from seekling.errors import ConfigError, SeeklingError
from seekling.model import Gate, LatentCache, Transformer, causal_bias, sequence_balance_loss
from seekling.training import expert_imbalance, update_expert_bias
from seekling.ops import grouped_linear_op


def tiny(**kw):
    return ModelConfig.from_name("tiny", **kw)


@pytest.mark.parametrize("bad, message", [
    (dict(n_group=3), "not divisible by n_group"),
    (dict(topk_group=3), "larger than n_group"),
    (dict(num_experts_per_tok=5), "more than the 4 experts"),
    (dict(hidden_size=0), "hidden_size must be a positive"),
    (dict(kv_lora_rank=-4), "kv_lora_rank must be a positive"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "unknown rope scaling type"),
    (dict(qk_rope_head_dim=7), "must be even"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
])
def test_impossible_configs_are_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**bad)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="known: tiny"):
        ModelConfig.from_name("huge")


def test_config_json_round_trip(tmp_path):
    cfg = tiny(q_lora_rank=None)
    cfg.save(str(tmp_path))
    assert ModelConfig.from_file(str(tmp_path)) == cfg


def test_config_of_another_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        ModelConfig.from_file(str(tmp_path))


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "deepseek-v3"])
def test_parameter_count_matches_the_module(name):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    n_buffers = sum(g.e_score_correction_bias.numel() for g in model.moe_gates)
    n = sum(p.numel() for p in model.parameters()) + n_buffers
    assert n == count_parameters(cfg)["total_with_mtp"]


def test_deepseek_v3_counts():
    cfg = ModelConfig.from_name("deepseek-v3")
    counts = count_parameters(cfg)
    assert round(counts["total"] / 1e9) == 671
    assert 36.5e9 < counts["active"] < 38e9
    with torch.device("meta"):
        model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters()) + sum(g.e_score_correction_bias.numel() for g in model.moe_gates)
    assert n == counts["total_with_mtp"]
    assert PRESETS["tiny"] and count_parameters(tiny())["total"] < 1_000_000


def test_moe_dispatch_equals_naive_path():
    cfg = tiny(num_experts_per_tok=3, n_group=1, topk_group=1)
    model = Transformer(cfg)
    moe = model.layers[1].mlp
    x = torch.randn(3, 10, cfg.hidden_size, requires_grad=True)
    fast, _ = moe(x)
    moe.naive = True
    slow, _ = moe(x)
    assert torch.allclose(fast, slow, atol=1e-6)
    g_fast = torch.autograd.grad(fast.square().sum(), moe.experts.gate_up_proj)[0]
    g_slow = torch.autograd.grad(slow.square().sum(), moe.experts.gate_up_proj)[0]
    assert torch.allclose(g_fast, g_slow, atol=1e-5)


def test_expert_dispatch_adds_into_a_given_output_and_counts_the_load():
    cfg = tiny()
    experts = Transformer(cfg).layers[1].mlp.experts
    T, K, E = 9, cfg.num_experts_per_tok, cfg.n_routed_experts
    x, weights = torch.randn(T, cfg.hidden_size), torch.rand(T, K)
    topk_idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    y, load = experts(x, weights, topk_idx)
    residual = torch.randn(T, cfg.hidden_size)
    into_residual, _ = experts(x, weights, topk_idx, out_TD=residual.clone())  # as the decode step calls it
    torch.testing.assert_close(into_residual, residual + y)
    torch.testing.assert_close(y, experts.forward_naive(x, weights, topk_idx)[0])
    assert torch.equal(load, torch.bincount(topk_idx.flatten(), minlength=E)) and int(load.sum()) == T * K

def test_gate_by_hand():
    cfg = tiny(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=2.0)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor([1.0, 2.0, -1.0, 3.0])
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    weights, idx, scores = gate(x)
    s = torch.sigmoid(torch.tensor([1.0, 2.0, -1.0, 3.0]))
    # biased scores: group0 = {s0, s1}, group1 = {s2 + 5, s3}; group 1 wins; experts 2 and 3 chosen
    assert sorted(idx[0].tolist()) == [2, 3]
    expected = torch.stack([s[2], s[3]]) / (s[2] + s[3]) * 2.0  # unbiased scores, normalised, scaled
    got = weights[0][idx[0].argsort()]
    assert torch.allclose(got, expected)


def test_sequence_balance_loss_by_hand():
    # one sequence, 2 tokens, 2 experts, top-1: token 0 -> expert 0, token 1 -> expert 0
    scores = torch.tensor([[[0.6, 0.2], [0.3, 0.1]]])
    idx = torch.tensor([[[0], [0]]])
    # f = N/(K*T) * count = 2/(1*2) * [2, 0] = [2, 0]; P = mean([0.75, 0.25], [0.75, 0.25]) = [0.75, 0.25]
    assert math.isclose(sequence_balance_loss(scores, idx).item(), 2 * 0.75, rel_tol=1e-6)


def test_losses_and_bias_update():
    cfg = tiny()
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    y = torch.randint(0, cfg.vocab_size, (2, 12))
    y[0, :3] = -100
    out = model(x, targets=y)
    ref = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), y.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref)
    assert out.mtp_loss is not None and out.mtp_loss > 0 and out.balance_loss > 0
    assert out.expert_load.shape == (2, cfg.n_routed_experts)  # main MoE layer + the MTP block
    assert out.expert_load[0].sum() == 2 * 12 * cfg.num_experts_per_tok
    load = torch.tensor([[5.0, 1, 1, 1, 1, 1, 1, 5]])
    update_expert_bias(model, load, gamma=0.01)
    bias = model.moe_gates[0].e_score_correction_bias
    assert torch.allclose(bias, torch.tensor([-0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, -0.01]))
    assert expert_imbalance(load) == pytest.approx(5 / 2)


def test_bias_steers_routing_toward_idle_experts():
    cfg = tiny(n_group=1, topk_group=1, num_nextn_predict_layers=0)
    model = Transformer(cfg)
    gate = model.moe_gates[0]
    with torch.no_grad():  # start badly skewed: experts 0 and 1 take almost every token
        gate.e_score_correction_bias[:2] = 0.3
    x = torch.randint(0, cfg.vocab_size, (4, 32))
    first = expert_imbalance(model(x).expert_load)
    history = []
    for _ in range(150):
        load = model(x).expert_load
        history.append(expert_imbalance(load))
        update_expert_bias(model, load, gamma=0.005)
    assert first > 3.0
    assert sum(history[-20:]) / 20 < 1.6


@pytest.mark.parametrize("q_lora_rank", [None, 32])
def test_cached_decoding_equals_full_forward(q_lora_rank):
    cfg = tiny(q_lora_rank=q_lora_rank, rope_scaling={
        "type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 16})
    model = Transformer(cfg).eval()
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (11, 7, 15)]
    with torch.no_grad():
        full = [model(s[None]).logits[0] for s in seqs]
        cache = LatentCache(cfg, 3, 32)
        prompt_len = [5, 3, 6]
        padded = torch.zeros(3, 6, dtype=torch.long)
        for b, s in enumerate(seqs):
            padded[b, : prompt_len[b]] = s[: prompt_len[b]]
        logits = model.forward_cached(padded, cache, num_new=torch.tensor(prompt_len))
        for b in range(3):
            assert torch.allclose(logits[b], full[b][prompt_len[b] - 1], atol=1e-5)
        # then one token at a time, each row at its own position; row 1 stops early
        for step in range(8):
            rows = [b for b in range(3) if prompt_len[b] + step < len(seqs[b])]
            tok = torch.stack([seqs[b][prompt_len[b] + step] for b in rows])[:, None]
            logits = model.forward_cached(tok, cache, rows=torch.tensor(rows))
            for j, b in enumerate(rows):
                assert torch.allclose(logits[j], full[b][prompt_len[b] + step], atol=1e-5)


def test_absorbed_attention_equals_expanded():
    """A chunk of 5 tokens after a cached prefix of 4: absorbed (default), naive expanded, full forward.
    The prefill of empty rows takes the plain causal path; it too must equal the full forward."""
    cfg = tiny()
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(x).logits
        chunks = {}
        for naive in (False, True):
            cache = LatentCache(cfg, 2, 16)
            prefill = model.forward_cached(x[:, :4], cache, all_logits=True)
            assert torch.allclose(prefill, full[:, :4], atol=1e-5)
            chunks[naive] = model.forward_cached(x[:, 4:], cache, all_logits=True, naive=naive)
    assert torch.allclose(chunks[False], chunks[True], atol=1e-5)
    assert torch.allclose(chunks[False], full[:, 4:], atol=1e-5)


def test_causal_bias_by_hand():
    inf = float("-inf")
    bias = causal_bias(torch.tensor([[0, 2], [1, 1]]), 3)
    assert torch.equal(bias, torch.tensor([[[0, inf, inf], [0, 0, 0]], [[0, 0, inf], [0, 0, inf]]]))

def test_latent_cache_is_small():
    cfg = ModelConfig.from_name("deepseek-v3")
    per_token_cached = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    per_token_expanded = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    assert per_token_cached == 576 and per_token_expanded / per_token_cached > 70


def test_position_past_the_maximum_is_refused():
    cfg = tiny(max_position_embeddings=16)
    model = Transformer(cfg)
    with pytest.raises(SeeklingError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_grouped_linear_op_gradients_match_a_loop():
    counts = torch.tensor([3, 0, 5, 4])
    x = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(4, 8, 12, requires_grad=True)
    y = grouped_linear_op(x, w, counts)
    chunks = torch.split(x, counts.tolist())
    ref = torch.cat([c @ w[e] for e, c in enumerate(chunks) if c.shape[0]])
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)
