"""GGUF export for llama.cpp: a seekling (DeepSeek-V3-format) model as llama.cpp's `deepseek2` architecture.

llama.cpp runs DeepSeek-V3 as `deepseek2` and reads it in its MLA form: the latent KV projection
`attn_kv_a_mqa` (c_KV and the shared RoPE key, one "KV head"), and `kv_b_proj` split per head into
`attn_k_b` (stored transposed, to absorb into the query) and `attn_v_b` (to expand the attended
latent), so its cache holds the latent, as seekling's does. The MoE layers carry the router
(`ffn_gate_inp`, sigmoid scoring), the correction bias used for selection only (`exp_probs_b`),
the stacked routed experts (`ffn_{gate,up,down}_exps`) and the shared expert (`*_shexp`), with
the group-limited routing, top-k normalisation and routed scaling as metadata; the first
`first_k_dense_replace` layers are dense. The MTP modules are left out (llama.cpp does not use them
for DeepSeek-V3). The tokenizer (byte-level BPE with individual digits, llama.cpp's `smollm`
pre-tokenizer) and the chat template travel in the file.

The layout follows what llama.cpp's own converter writes for DeepSeek-V3; the names come from the
`gguf` package (`pip install gguf`, published by llama.cpp). Weights are f32 or f16; norms, the
router and its bias stay f32. The file is written under a temporary name and renamed into place.

    seekling export --gguf runs/speedrun/model.gguf runs/speedrun/grpo
    llama-cli -m runs/speedrun/model.gguf -p "What is 2+3?" -n 64
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seekling.checkpoint import find_tokenizer_dir, model_kind, read_safetensors, resolve_model_dir
from seekling.config import ModelConfig
from seekling.errors import CheckpointError, ConfigError, DataError
from seekling.tokenizer import CHAT_TEMPLATE, FIXED_TOKENS, Tokenizer

ARCH = "deepseek2"
PRE_TOKENIZER = "smollm"  # llama.cpp's name for "each digit alone, then the GPT-2 split": ours
OUT_TYPES = ("f32", "f16")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


def _block_tensors(g) -> dict[str, Any]:
    """Per-block HF names (after `model.layers.N.`) -> llama.cpp tensors; kv_b and experts are handled apart."""
    T = g.MODEL_TENSOR
    return {
        "input_layernorm.weight": T.ATTN_NORM,
        "self_attn.q_proj.weight": T.ATTN_Q,  # q_lora_rank None (DeepSeek-V2-Lite style)
        "self_attn.q_a_proj.weight": T.ATTN_Q_A,
        "self_attn.q_a_layernorm.weight": T.ATTN_Q_A_NORM,
        "self_attn.q_b_proj.weight": T.ATTN_Q_B,
        "self_attn.kv_a_proj_with_mqa.weight": T.ATTN_KV_A_MQA,
        "self_attn.kv_a_layernorm.weight": T.ATTN_KV_A_NORM,
        "self_attn.o_proj.weight": T.ATTN_OUT,
        "post_attention_layernorm.weight": T.FFN_NORM,
        "mlp.gate_proj.weight": T.FFN_GATE,  # dense layers
        "mlp.up_proj.weight": T.FFN_UP,
        "mlp.down_proj.weight": T.FFN_DOWN,
        "mlp.gate.weight": T.FFN_GATE_INP,  # router
        "mlp.gate.e_score_correction_bias": T.FFN_EXP_PROBS_B,
        "mlp.shared_experts.gate_proj.weight": T.FFN_GATE_SHEXP,
        "mlp.shared_experts.up_proj.weight": T.FFN_UP_SHEXP,
        "mlp.shared_experts.down_proj.weight": T.FFN_DOWN_SHEXP,
    }


def _name(g, tensor, block: int | None = None) -> str:
    """`blk.3.attn_q_a.weight`; the correction bias is a `.bias`."""
    base = g.TENSOR_NAMES[tensor].format(bid=block)
    return base + (".bias" if tensor == g.MODEL_TENSOR.FFN_EXP_PROBS_B else ".weight")


def gguf_tensors(config: ModelConfig, hf: dict[str, torch.Tensor], g) -> dict[str, torch.Tensor]:
    """llama.cpp name -> tensor (torch layout: a GGUF shape is the reverse of it), from released names.
    Every tensor of the trunk must be used; MTP layers (index >= num_hidden_layers) are dropped."""
    T, L, H = g.MODEL_TENSOR, config.num_hidden_layers, config.num_attention_heads
    table = _block_tensors(g)
    out: dict[str, torch.Tensor] = {_name(g, T.TOKEN_EMBD): hf.pop("model.embed_tokens.weight"),
                                    _name(g, T.OUTPUT_NORM): hf.pop("model.norm.weight")}
    if "lm_head.weight" in hf:  # absent when tied: llama.cpp then reuses token_embd
        out[_name(g, T.OUTPUT)] = hf.pop("lm_head.weight")
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key in list(hf):
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if m is None:
            continue
        block, rest = int(m.group(1)), m.group(2)
        if block >= L:
            del hf[key]  # MTP module
            continue
        tensor = hf.pop(key)
        if rest in table:
            out[_name(g, table[rest], block)] = tensor
        elif rest == "self_attn.kv_b_proj.weight":
            # [H * (nope + v), C] -> per head: k_b^T [H, C, nope] (absorbed into q), v_b [H, v, C]
            kv_b = tensor.view(H, config.qk_nope_head_dim + config.v_head_dim, config.kv_lora_rank)
            k_b, v_b = kv_b.split([config.qk_nope_head_dim, config.v_head_dim], dim=1)
            out[_name(g, T.ATTN_K_B, block)] = k_b.transpose(1, 2).contiguous()
            out[_name(g, T.ATTN_V_B, block)] = v_b.contiguous()
        elif e := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", rest):
            experts.setdefault((block, e.group(2)), {})[int(e.group(1))] = tensor
        else:
            raise CheckpointError(f"tensor {key} has no place in llama.cpp's {ARCH} layout")
    stacked = {"gate": T.FFN_GATE_EXP, "up": T.FFN_UP_EXP, "down": T.FFN_DOWN_EXP}
    for (block, kind), per_expert in sorted(experts.items()):
        if sorted(per_expert) != list(range(config.n_routed_experts)):
            raise CheckpointError(f"layer {block}: {kind}_proj of experts {sorted(per_expert)}, expected "
                                  f"0..{config.n_routed_experts - 1}")
        out[_name(g, stacked[kind], block)] = torch.stack([per_expert[i] for i in range(config.n_routed_experts)])
    if hf:
        raise CheckpointError(f"tensors with no place in llama.cpp's {ARCH} layout: {', '.join(sorted(hf)[:6])}")
    return out


def _keep_f32(name: str, tensor: torch.Tensor) -> bool:
    """Norms, biases and the router stay f32 in an f16 file (llama.cpp's converter does the same)."""
    return tensor.ndim == 1 or ".ffn_gate_inp." in name


def add_hparams(writer, config: ModelConfig, name: str, out_type: str, g) -> None:
    """The deepseek2 metadata: MLA as MQA over the latent (one KV head of width kv_lora_rank + rope)."""
    c = config
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(g.LlamaFileType.ALL_F32 if out_type == "f32" else g.LlamaFileType.MOSTLY_F16)
    # mla
    writer.add_q_lora_rank(c.q_lora_rank or 0)  # 0: a plain attn_q
    writer.add_kv_lora_rank(c.kv_lora_rank)
    writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    writer.add_value_length(c.kv_lora_rank)
    writer.add_key_length_mla(c.qk_head_dim)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    # moe
    writer.add_leading_dense_block_count(c.first_k_dense_replace)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_expert_shared_count(c.n_shared_experts)
    if c.num_moe_layers and c.n_routed_experts:
        writer.add_expert_count(c.n_routed_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_group_count(c.n_group)
        writer.add_expert_group_used_count(c.topk_group)
        writer.add_expert_gating_func(g.ExpertGatingFuncType.SIGMOID)
        writer.add_expert_weights_scale(c.routed_scaling_factor)
        writer.add_expert_weights_norm(c.norm_topk_prob)
    # yarn
    if c.rope_scaling and c.yarn_factor > 1:
        s = c.rope_scaling
        writer.add_rope_scaling_type(g.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(c.yarn_factor)
        writer.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(s.get("beta_fast") or 32))
        writer.add_rope_scaling_yarn_beta_slow(float(s.get("beta_slow") or 1))
        if s.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(0.1 * float(s["mscale_all_dim"]))  # llama.cpp reads it /0.1


def add_tokenizer(writer, tokenizer_dir: str, vocab_size: int, g) -> None:
    """The byte-level BPE vocabulary and merges, the special ids and the chat template."""
    Tokenizer.load(tokenizer_dir)  # a seekling tokenizer: the fixed ids are where the template expects them
    path = Path(tokenizer_dir) / "tokenizer.json"
    state = json.loads(path.read_text())
    model = state.get("model") or {}
    if model.get("type") != "BPE":
        raise DataError(f"{path}: a {model.get('type')} model; GGUF export supports byte-level BPE")
    pre = [p.get("type") for p in (state.get("pre_tokenizer") or {}).get("pretokenizers", [])]
    if pre != ["Digits", "ByteLevel"]:
        raise DataError(f"{path}: pre-tokenizer {pre} is not seekling's (Digits, ByteLevel), which llama.cpp "
                        f"knows as {PRE_TOKENIZER!r}")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {entry["id"]: entry for entry in state.get("added_tokens", [])}
    if max(by_id) >= vocab_size:
        raise DataError(f"{path}: token id {max(by_id)} does not fit the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer never produces pad the table to the embedding's rows
        entry = added.get(i)
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if entry is not None:
            types.append(g.TokenType.CONTROL if entry["special"] else g.TokenType.USER_DEFINED)
        else:
            types.append(g.TokenType.NORMAL if i in by_id else g.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(FIXED_TOKENS.index("<|begin_of_text|>"))
    writer.add_eos_token_id(FIXED_TOKENS.index("<|end_of_text|>"))
    writer.add_pad_token_id(FIXED_TOKENS.index("<|pad|>"))
    writer.add_add_bos_token(False)  # the chat template writes <|begin_of_text|> itself
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template(tokenizer_dir))


def chat_template(tokenizer_dir: str) -> str:
    """The tokenizer's Jinja chat template without transformers' `{% generation %}` markers (loss-mask
    bookkeeping that llama.cpp's template engine does not know)."""
    config_path = Path(tokenizer_dir) / "tokenizer_config.json"
    template = CHAT_TEMPLATE
    if config_path.is_file():
        template = json.loads(config_path.read_text()).get("chat_template") or CHAT_TEMPLATE
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def export_gguf(model_path: str, out: str, out_type: str = "f32", tokenizer_dir: str | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Write `out` (a .gguf file) from a model, run or checkpoint directory; returns what was written.
    Nothing is written when the input is not a model or `out` exists without `overwrite`."""
    g = _gguf()
    if out_type not in OUT_TYPES:
        raise ConfigError(f"--outtype {out_type!r}: choose one of {', '.join(OUT_TYPES)}")
    out_path = Path(out)
    if out_path.is_dir():
        raise ConfigError(f"--gguf {out}: is a directory; give a file name such as model.gguf")
    if out_path.exists() and not overwrite:
        raise ConfigError(f"--gguf {out}: already exists; pass --overwrite to replace it")
    model_dir = resolve_model_dir(model_path)
    if model_kind(model_dir) != "seekling":
        raise CheckpointError(f"{model_dir}: not a DeepSeek-V3-format model (model_type deepseek_v3); "
                              "llama.cpp's own convert_hf_to_gguf.py converts other transformers models")
    config = ModelConfig.from_file(model_dir)
    if config.attention_bias:
        raise CheckpointError(f"{model_dir}: attention_bias=true has no place in llama.cpp's {ARCH} layout")
    if not config.rope_interleave:  # llama.cpp rotates adjacent channel pairs, as DeepSeek does
        raise CheckpointError(f"{model_dir}: rope_interleave=false (RoPE on halves) is not llama.cpp's {ARCH} RoPE")
    tokenizer_dir = tokenizer_dir or find_tokenizer_dir(model_dir, model_path)
    tensors = gguf_tensors(config, read_safetensors(model_dir), g)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        writer = g.GGUFWriter(str(tmp), ARCH)
        add_hparams(writer, config, out_path.stem, out_type, g)
        add_tokenizer(writer, tokenizer_dir, config.vocab_size, g)
        for name, tensor in tensors.items():
            dtype = np.float32 if out_type == "f32" or _keep_f32(name, tensor) else np.float16
            writer.add_tensor(name, tensor.detach().float().numpy().astype(dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"out": str(out_path), "model": model_dir, "tokenizer": tokenizer_dir, "type": out_type,
            "tensors": len(tensors), "bytes": out_path.stat().st_size}
