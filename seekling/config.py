"""Model configuration: one dataclass whose field names are those of transformers' DeepseekV3Config.

A `config.json` written by `ModelConfig.save` loads in transformers, and a DeepSeek-V3 `config.json`
(released or saved by transformers) loads here. Named sizes live in `PRESETS`:

    >>> from seekling.config import ModelConfig
    >>> cfg = ModelConfig.from_name("tiny")
    >>> count_parameters(cfg)["total"] < 1_000_000
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from seekling.errors import ConfigError, check_choice
from seekling.files import write_json_atomic

MODEL_TYPE = "deepseek_v3"
ROPE_SCALING_TYPES = ("yarn",)


def parse_like(example: Any, text: str) -> Any:
    """`text` as a value of `example`'s type (bool: true/false/1/0; int; float; else the text itself);
    ValueError when it is not one. How `--set FIELD=VALUE` and task settings read their values."""
    if isinstance(example, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    if isinstance(example, int):
        return int(text)
    if isinstance(example, float):
        return float(text)
    return text


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A field of a trainer's settings dataclass with its help text: the one declaration that the
    `seekling` command's flag takes its default and help from (`seekling.commands.add_setting`)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class ModelConfig:
    # vocabulary and trunk
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    intermediate_size: int = 18432  # dense SwiGLU width of the first `first_k_dense_replace` layers
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006  # DeepSeek-V3 init std
    max_position_embeddings: int = 163840

    # mla: multi-head latent attention
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: a plain q_proj (DeepSeek-V2-Lite style)
    kv_lora_rank: int = 512  # width of the cached latent c_KV
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # the decoupled RoPE key, one per token shared by all heads
    v_head_dim: int = 128
    attention_bias: bool = False

    # moe: DeepSeekMoE with shared experts and auxiliary-loss-free balancing
    first_k_dense_replace: int = 3  # layers [0, k) are dense, the rest MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    n_group: int = 8  # experts are split into groups; a token may use experts of `topk_group` groups
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"

    # mtp: multi-token prediction depth (0 turns it off)
    num_nextn_predict_layers: int = 1

    # rope/yarn
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: dict(
        type="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
        original_max_position_embeddings=4096))
    rope_interleave: bool = True

    # special tokens (ids in the tokenizer that goes with the model)
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def yarn_factor(self) -> float:
        return float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim ** -0.5, times mscale**2 when YaRN is on (as transformers and DeepSeek do)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling:
            mscale_all_dim = float(self.rope_scaling.get("mscale_all_dim", 0) or 0)
            factor = self.yarn_factor
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError(f"q_lora_rank must be a positive integer or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (DeepSeek-V3 uses 'silu')")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"first_k_dense_replace={self.first_k_dense_replace} must lie in [0, "
                              f"num_hidden_layers={self.num_hidden_layers}]")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise ConfigError(f"intermediate_size must be positive for dense layers, got {self.intermediate_size}")
        if self.num_moe_layers > 0:
            self._validate_moe()
        if self.num_nextn_predict_layers < 0:
            raise ConfigError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        for name in ("rms_norm_eps", "initializer_range", "routed_scaling_factor", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ROPE_SCALING_TYPES:
                raise ConfigError(f"unknown rope scaling type {kind!r}; supported: {', '.join(ROPE_SCALING_TYPES)} "
                                  "(or None)")
            if float(self.rope_scaling.get("factor", 0)) < 1:
                raise ConfigError(f"rope_scaling factor must be >= 1, got {self.rope_scaling.get('factor')!r}")
            if "original_max_position_embeddings" not in self.rope_scaling:
                raise ConfigError("rope_scaling needs original_max_position_embeddings")
        if self.vocab_size > 2**31:
            raise ConfigError(f"vocab_size {self.vocab_size} is too large")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    def _validate_moe(self) -> None:
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer for MoE layers, got {value!r}")
        if self.n_shared_experts < 0:
            raise ConfigError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} is larger than n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if per_group < 2 and self.n_group > 1:
            raise ConfigError(f"each expert group needs at least 2 experts (a group is scored by its top-2), got "
                              f"{per_group} = n_routed_experts {self.n_routed_experts} / n_group {self.n_group}")
        reachable = per_group * self.topk_group
        if self.num_experts_per_tok > reachable:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} is more than the {reachable} experts "
                              f"in topk_group={self.topk_group} groups of {per_group}")
        if self.scoring_func != "sigmoid":
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported (DeepSeek-V3 uses 'sigmoid')")
        if self.topk_method != "noaux_tc":
            raise ConfigError(f"topk_method {self.topk_method!r} is not supported (DeepSeek-V3 uses 'noaux_tc')")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        return cls(**{**PRESETS[check_choice(name, PRESETS, "model preset")], **overrides})

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers' DeepseekV3Config reads (old and new rope keys both written)."""
        d = self.to_dict()
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            scaling = dict(self.rope_scaling)
            scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type", "yarn"))
            rope_parameters.update(scaling)
        d.update(model_type=MODEL_TYPE, architectures=["DeepseekV3ForCausalLM"], dtype="float32",
                 num_key_value_heads=self.num_attention_heads, rope_parameters=rope_parameters)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {model_type!r}, but seekling models are {MODEL_TYPE!r} "
                              "(DeepSeek-V3)")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        rope_parameters = d.get("rope_parameters")
        if rope_parameters:
            rope_parameters = dict(rope_parameters)
            kwargs.setdefault("rope_theta", rope_parameters.pop("rope_theta", 10000.0))
            kind = rope_parameters.pop("rope_type", rope_parameters.pop("type", "default"))
            if "rope_scaling" not in d:
                kwargs["rope_scaling"] = None if kind == "default" else {"type": kind, **rope_parameters}
        if kwargs.get("rope_scaling"):
            scaling = dict(kwargs["rope_scaling"])
            scaling["type"] = scaling.pop("rope_type", scaling.get("type"))
            kwargs["rope_scaling"] = scaling
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kwargs["num_nextn_predict_layers"] = d["num_mtp_layers"]
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0] if kwargs[key] else None
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong type, e.g. "rms_norm_eps": "x"
            raise ConfigError(f"{source}: a field has the wrong type ({e})") from None

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        write_json_atomic(path, self.to_hf_dict(), sort_keys=True)
        return path

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"no config.json at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); the file is damaged") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf_dict(d, source=path)


# ------------------------------------------------------------------------- named sizes
# Shared by every small preset: one dense layer, one shared expert, one MTP module, and no YaRN (they
# train at their full length, so need no extension).
_SMALL = dict(first_k_dense_replace=1, n_shared_experts=1, num_nextn_predict_layers=1, rope_scaling=None)

PRESETS: dict[str, dict[str, Any]] = {
    # tests: well under 1M parameters, every feature on (q_lora, groups, shared expert, MTP)
    "tiny": dict(
        **_SMALL, vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1, routed_scaling_factor=1.0,
        max_position_embeddings=512, initializer_range=0.02),
    # the main job (`seekling speedrun`, preset cpu) on a 2-core CPU, and the distillation student
    "cpu": dict(
        **_SMALL, vocab_size=2048, hidden_size=128, num_hidden_layers=3, intermediate_size=384, num_attention_heads=4,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=96, n_group=2, topk_group=1, routed_scaling_factor=1.0,
        max_position_embeddings=1024, initializer_range=0.02),
    # the larger CPU model (benchmarks, longer CPU runs): a few million parameters
    "cpu-large": dict(
        **_SMALL, vocab_size=2048, hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        num_experts_per_tok=2, moe_intermediate_size=128, n_group=4, topk_group=2, routed_scaling_factor=1.0,
        max_position_embeddings=1024, initializer_range=0.02),
    # one GPU: ~1.2B total / ~0.24B active per token
    "gpu": dict(
        **_SMALL, vocab_size=32768, hidden_size=1024, num_hidden_layers=12, intermediate_size=4096,
        num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=512, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, max_position_embeddings=4096, initializer_range=0.006),
    # one node of 8 GPUs (torchrun + FSDP2): ~6.6B total / ~1.2B active per token
    "gpu-node": dict(
        **_SMALL, vocab_size=65536, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
        num_attention_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1024, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, max_position_embeddings=8192, initializer_range=0.006),
    # the real thing: build it on the meta device, for counting and costing only
    "deepseek-v3": dict(),
}


# ------------------------------------------------------------------------- parameter counting
def matmul_weights(c: ModelConfig, moe: bool) -> dict[str, int]:
    """The weights each token meets in one decoder block's matrix multiplies, by part (routed experts: the
    `num_experts_per_tok` a token uses). `seekling.flops` counts 2 FLOPs a weight; `count_parameters`
    adds the norms, the router's correction bias and the idle experts."""
    h, nh = c.hidden_size, c.num_attention_heads
    q = h * nh * c.qk_head_dim if c.q_lora_rank is None else (h + nh * c.qk_head_dim) * c.q_lora_rank
    attention = {"q_proj": q, "kv_a_proj": h * (c.kv_lora_rank + c.qk_rope_head_dim),
                 "kv_b_proj": c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim),
                 "o_proj": nh * c.v_head_dim * h}
    if not moe:
        return {**attention, "dense_mlp": 3 * h * c.intermediate_size}
    expert = 3 * h * c.moe_intermediate_size  # SwiGLU: gate, up and down projections
    return {**attention, "moe_gate": h * c.n_routed_experts, "moe_routed": c.num_experts_per_tok * expert,
            "moe_shared": c.n_shared_experts * expert}


def _block_params(c: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, active per token) parameters of one decoder block."""
    norms = 2 * c.hidden_size + c.kv_lora_rank + (c.q_lora_rank or 0)  # the block's two, kv_a's and q_a's
    active = sum(matmul_weights(c, moe).values()) + norms + (c.n_routed_experts if moe else 0)  # + correction bias
    idle = (c.n_routed_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size if moe else 0
    return active + idle, active


def count_parameters(c: ModelConfig) -> dict[str, int]:
    """Total and per-token active parameters, split as DeepSeek reports them (MTP apart).

    For `deepseek-v3` this gives 671B total and ~37B active (the embedding counted once, the output
    head counted as active since every token uses it).
    """
    blocks = [_block_params(c, c.is_moe_layer(i)) for i in range(c.num_hidden_layers)]
    embed = c.vocab_size * c.hidden_size
    outside = embed + (0 if c.tie_word_embeddings else embed) + c.hidden_size  # embedding, head, final norm
    total = sum(t for t, _ in blocks) + outside
    active = sum(a for _, a in blocks) + outside
    # Each MTP module: enorm, hnorm, eh_proj, a full block, shared_head.norm (embedding and head shared);
    # the depth-k block sits at layer index num_hidden_layers + k - 1, as in released checkpoints.
    mtp = sum(3 * c.hidden_size + 2 * c.hidden_size**2 + _block_params(c, c.is_moe_layer(c.num_hidden_layers + k))[0]
              for k in range(c.num_nextn_predict_layers))
    return {"total": total, "active": active, "mtp": mtp, "total_with_mtp": total + mtp}
