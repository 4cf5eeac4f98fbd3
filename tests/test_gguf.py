"""GGUF export: the file read back with the `gguf` package holds llama.cpp's deepseek2 layout (names,
shapes, MLA split, stacked experts, metadata, tokenizer); bad input writes nothing. The slow test runs
the file in llama.cpp (llama-cpp-python) and holds its greedy tokens to seekling's, in f32 and f16."""

import os

import numpy as np
import pytest
import torch

from seekling.checkpoint import read_safetensors, save_pretrained
from seekling.cli import main
from seekling.config import ModelConfig
from seekling.errors import CheckpointError, ConfigError
from seekling.generate import SamplingParams, generate
from seekling.gguf_export import export_gguf
from seekling.model import Transformer

gguf = pytest.importorskip("gguf")


def perturb(model: Transformer) -> Transformer:
    """Norms away from 1 and router biases away from 0, so a mapping slip cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        for gate in model.moe_gates:
            gate.e_score_correction_bias.copy_(0.5 * torch.randn_like(gate.e_score_correction_bias))
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = perturb(Transformer(ModelConfig.from_name("tiny")))  # vocab 512 > the tokenizer's 300: padded
    out = tmp_path_factory.mktemp("gguf") / "model"
    tok_dir = tokenizer.save(out.parent / "tok")
    save_pretrained(model, str(out), extra_files={n: str(tok_dir / n) for n in os.listdir(tok_dir)})
    return out


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                fields[name] = [bytes(field.parts[i]).decode() for i in field.data]
            else:
                fields[name] = [field.parts[i][0].item() for i in field.data]
        elif field.types and field.types[0] == gguf.GGUFValueType.STRING:
            fields[name] = bytes(field.parts[-1]).decode()
        elif field.types:
            fields[name] = field.parts[-1][0].item()
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def array(t) -> np.ndarray:
    """A tensor of the file in torch layout (GGUF lists the dimensions innermost first)."""
    return np.asarray(t.data).reshape(list(reversed([int(d) for d in t.shape])))


def test_the_file_holds_deepseek2_as_llama_cpp_reads_it(model_dir, tokenizer, tmp_path):
    out = tmp_path / "tiny.gguf"
    export_gguf(str(model_dir), str(out))
    fields, tensors = read(out)
    c = ModelConfig.from_file(str(model_dir))
    assert fields["general.architecture"] == "deepseek2"
    expected = {
        "deepseek2.block_count": c.num_hidden_layers, "deepseek2.embedding_length": c.hidden_size,
        "deepseek2.attention.head_count": c.num_attention_heads, "deepseek2.attention.head_count_kv": 1,
        "deepseek2.attention.q_lora_rank": c.q_lora_rank, "deepseek2.attention.kv_lora_rank": c.kv_lora_rank,
        "deepseek2.attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim,
        "deepseek2.attention.value_length": c.kv_lora_rank,
        "deepseek2.attention.key_length_mla": c.qk_nope_head_dim + c.qk_rope_head_dim,
        "deepseek2.attention.value_length_mla": c.v_head_dim, "deepseek2.rope.dimension_count": c.qk_rope_head_dim,
        "deepseek2.leading_dense_block_count": c.first_k_dense_replace,
        "deepseek2.expert_count": c.n_routed_experts, "deepseek2.expert_used_count": c.num_experts_per_tok,
        "deepseek2.expert_shared_count": c.n_shared_experts, "deepseek2.expert_group_count": c.n_group,
        "deepseek2.expert_group_used_count": c.topk_group, "deepseek2.expert_gating_func": 2,  # sigmoid
        "deepseek2.expert_weights_norm": True, "deepseek2.expert_feed_forward_length": c.moe_intermediate_size,
        "deepseek2.feed_forward_length": c.intermediate_size, "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["deepseek2.expert_weights_scale"] == pytest.approx(c.routed_scaling_factor)

    hf = read_safetensors(str(model_dir))
    # the MLA split: k_b^T and v_b per head rebuild kv_b_proj exactly
    H, nope, v, C = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    k_b, v_b = array(tensors["blk.1.attn_k_b.weight"]), array(tensors["blk.1.attn_v_b.weight"])
    assert k_b.shape == (H, C, nope) and v_b.shape == (H, v, C)
    rebuilt = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(H * (nope + v), C)
    np.testing.assert_array_equal(rebuilt, hf["model.layers.1.self_attn.kv_b_proj.weight"].numpy())
    # experts stacked in order; the correction bias as exp_probs_b; the dense first layer
    np.testing.assert_array_equal(array(tensors["blk.1.ffn_down_exps.weight"])[5],
                                  hf["model.layers.1.mlp.experts.5.down_proj.weight"].numpy())
    np.testing.assert_array_equal(array(tensors["blk.1.exp_probs_b.bias"]),
                                  hf["model.layers.1.mlp.gate.e_score_correction_bias"].numpy())
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_inp.weight" not in tensors
    np.testing.assert_array_equal(array(tensors["blk.1.ffn_gate_shexp.weight"]),
                                  hf["model.layers.1.mlp.shared_experts.gate_proj.weight"].numpy())
    assert not any(name.startswith(f"blk.{c.num_hidden_layers}.") for name in tensors)  # MTP left out
    # tokenizer: the vocabulary in id order, padded to the embedding's rows; the template without markers
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == c.vocab_size
    assert [tokens[i] for i in range(tokenizer.vocab_size)] == [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.CONTROL and types[6] == gguf.TokenType.USER_DEFINED  # <think> not special
    assert types[-1] == gguf.TokenType.UNUSED and tokens[-1] == f"[PAD{c.vocab_size - 1}]"
    assert "{% generation %}" not in fields["tokenizer.chat_template"] and "<|assistant|>" in fields["tokenizer.chat_template"]


def test_f16_keeps_norms_and_router_in_f32(model_dir, tmp_path):
    out = tmp_path / "tiny-f16.gguf"
    export_gguf(str(model_dir), str(out), "f16")
    _, tensors = read(out)
    kinds = {name: t.tensor_type for name, t in tensors.items()}
    assert kinds["blk.1.attn_q_b.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.1.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.F16
    for name in ("blk.1.attn_norm.weight", "blk.1.ffn_gate_inp.weight", "blk.1.exp_probs_b.bias", "output_norm.weight"):
        assert kinds[name] == gguf.GGMLQuantizationType.F32, name


def test_bad_input_writes_nothing(model_dir, tmp_path, capsys):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    out = tmp_path / "x.gguf"
    with pytest.raises(CheckpointError, match="not a model directory"):
        export_gguf(str(not_a_model), str(out))
    assert main(["export", "--gguf", str(out), str(not_a_model)]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["notes"]  # no output, no temporary file

    out.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export_gguf(str(model_dir), str(out))
    assert main(["export", "--gguf", str(out), str(model_dir)]) == 2
    assert out.read_bytes() == b"keep me"
    assert main(["export", "--gguf", str(out), str(model_dir), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(os.listdir(tmp_path)) == ["notes", "x.gguf"]


# ---------------------------------------------------------------------------------------------- llama.cpp
def train_tiny(tokenizer, steps: int = 150) -> Transformer:
    """A tiny model fitted to arithmetic chats for a few seconds, so greedy decoding has clear winners."""
    from seekling.tasks import make_problems, to_sft_example

    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    model = perturb(Transformer(config))
    ids = [i for p in make_problems("arithmetic", "train", 400, 0)
           for i in tokenizer.render_chat(to_sft_example(p)["messages"])[0]]
    data = torch.tensor(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T, B = 64, 16
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (B,))
        x = torch.stack([data[s: s + T] for s in starts])
        y = torch.stack([data[s + 1: s + T + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return perturb(model).eval()  # the router biases moved again: selection differs from the raw scores


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("out_type", ["f32", "f16"])
def test_llama_cpp_greedy_tokens_equal_seeklings(out_type, tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from seekling.tasks import make_problems, render_prompt_ids

    model = train_tiny(tokenizer)
    tok_dir = tokenizer.save(tmp_path / "tok")
    model_dir = save_pretrained(model, str(tmp_path / "model"),
                                extra_files={n: str(tok_dir / n) for n in os.listdir(tok_dir)})
    out = tmp_path / f"tiny-{out_type}.gguf"
    assert main(["export", "--gguf", str(out), model_dir, "--outtype", out_type]) == 0
    if out_type == "f16":  # seekling with the same rounded weights (llama.cpp computes in f32 on them)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim > 1 and "gate.weight" not in name:
                    p.copy_(p.half().float())
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, logits_all=True, verbose=False)  # fills scores

    texts = ["What is 12 + 7?", "A 3 digit number: 405, then <think> and </answer>.\n  spaces"]
    for text in texts:  # llama.cpp's tokenizer (smollm pre-tokenizer) splits as ours does
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)

    n = 24
    prompts = [render_prompt_ids(tokenizer, p) for p in make_problems("arithmetic", "test", 3, 1)]
    ours = generate(model, prompts, SamplingParams(max_new_tokens=n, temperature=0.0))
    for prompt, completion in zip(prompts, ours):
        theirs = llama_greedy(llm, prompt, n)
        assert theirs == completion.token_ids, (tokenizer.decode(theirs), tokenizer.decode(completion.token_ids))
        # the next-token logits agree, not just their argmax
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0, -1].numpy()
        llm.reset()
        llm.eval(prompt)
        assert np.abs(np.asarray(llm.scores[llm.n_tokens - 1]) - ref).max() < (1e-3 if out_type == "f32" else 5e-2)
