"""Speedrun presets: the settings of every stage of `seekling speedrun`, and the trainers' configs built
from them.

A `SpeedrunPreset` is a flat, frozen dataclass (what state.json records and `--set FIELD=VALUE`
changes); its methods build the configs the trainers take (`PretrainArgs`, `SFTConfig`, `GRPOConfig`,
`SampleSettings`, `EvalSettings`), and `validate_preset` checks a preset through those configs' own
`validate()`, so a setting is declared and checked in one place. `PRESETS` names them:

    python -c "from seekling.presets import PRESETS; print(PRESETS['cpu'].grpo_config())"
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from typing import Any

from seekling.config import ModelConfig, parse_like
from seekling.distill import SampleSettings
from seekling.errors import ConfigError
from seekling.evaluate import EvalSettings
from seekling.grpo import GRPOConfig
from seekling.pretrain import PretrainArgs
from seekling.sft import SFTConfig
from seekling.tasks import get_task, parse_difficulty


DISTILL_STUDENTS = ("pretrain", "sft", "grpo")  # the stages whose final model can be the distillation student


@dataclass(frozen=True)
class SpeedrunPreset:
    """Settings of every stage. Changing any field makes a different run (its directory is refused)."""

    name: str
    about: str
    # model and hardware (model presets live in seekling.config)
    model: str = "cpu"
    dtype: str | None = None  # pre-training; None: auto (bf16 where measured faster, see seekling.precision)
    distributed: str = "ddp"  # pre-training under torchrun: ddp, or fsdp (FSDP2) for models too big to replicate
    seed: int = 0
    # task data: pre-training sees worked solutions of several tasks (as a base model has seen math);
    # cold start, GRPO and evaluation use one of them, `rl_task` (train split; test split held out)
    pretrain_tasks: tuple[str, ...] = ("arithmetic", "linear", "wordproblem")
    rl_task: str = "arithmetic"
    difficulty: tuple[str, ...] = ()  # e.g. ("arithmetic.digits=3",): TASK.SETTING=VALUE
    # settings of the pre-training corpus alone, over `difficulty`: e.g. ("arithmetic.worked=0.5",), half the
    # solutions with their working shown and half answering at once, as text found in the wild mixes them
    pretrain_difficulty: tuple[str, ...] = ()
    tokenizer_examples: int = 3000  # problems per task the tokenizer learns from
    vocab_size: int = 1024  # at most: BPE stops earlier when the task text has no more pairs worth merging
    # pre-training (tokens per step = batch * seq_len * ranks)
    pretrain_examples: int = 8000  # problems per pre-training task
    pretrain_steps: int = 800
    pretrain_batch_size: int = 16
    seq_len: int = 128
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 40
    pretrain_loss_on: str = "all"  # or "responses": no loss on the problems' text (their numbers are random)
    pretrain_checkpoints: int = 8  # saved over the run: resume points and the expert-load heatmap
    # cold-start SFT on R1-format worked solutions of the RL task
    sft_examples: int = 2000
    sft_steps: int = 40
    sft_batch_size: int = 16
    sft_seq_len: int = 256
    sft_lr: float = 3e-4
    # GRPO on the RL task
    grpo_steps: int = 200
    prompts_per_step: int = 16
    group_size: int = 8
    grpo_lr: float = 1e-4  # measured on the `cpu` model: 2e-5 barely moves, 3e-4 collapses
    grpo_loss: str = "token_mean"
    grpo_temperature: float = 1.0  # sampling temperature of the rollouts (R1-Zero samples at 1)
    max_new_tokens: int = 64
    grpo_save_every: int = 20
    grpo_max_minutes: float | None = 6.0  # a cap for slow or busy machines (the report notes when it hit)
    grpo_problems: int = 20000
    grpo_distinct: bool = False  # GRPO's problems drawn as the held-out split is (distinct, so in its mix of sizes)
    # rejection-sampling distillation: a student fine-tuned on verified GRPO samples
    distill_samples: int = 4  # completions per problem; only verified-correct ones are kept
    distill_problems: int = 300
    distill_steps: int = 40
    distill_student: str = "pretrain"  # the stage whose final model is the student: pretrain (R1's base), sft or grpo
    distill_lr: float | None = None  # None: sft_lr
    # evaluation after every model stage
    eval_n: int = 1000  # held-out problems per stage (x eval_k samples: about 20 s on 2 cores)
    eval_k: int = 4
    eval_batch_size: int = 512

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes: Any) -> "SpeedrunPreset":
        return dataclasses.replace(self, **changes)

    # -- the trainers' configs ---------------------------------------------------------------------
    def pretrain_args(self, data: str, out: str, tokenizer: str, vocab_size: int | None = None,
                      device: str | None = None, quiet: bool = False) -> PretrainArgs:
        """Pre-training: `pretrain_checkpoints` resume points kept to the end (for the expert-load heatmap)."""
        steps = self.pretrain_steps
        return PretrainArgs(
            data=data, out=out, tokenizer=tokenizer, preset=self.model, vocab_size=vocab_size, resume=True,
            steps=steps, batch_size=self.pretrain_batch_size, seq_len=self.seq_len, lr=self.pretrain_lr,
            warmup=self.pretrain_warmup, loss_on=self.pretrain_loss_on, eval_every=max(1, steps // 10), eval_batches=4,
            save_every=max(1, steps // self.pretrain_checkpoints), keep_last=0, log_every=max(1, steps // 4),
            seed=self.seed, device=device, dtype=self.dtype, distributed=self.distributed, quiet=quiet)

    def sft_config(self, steps: int, lr: float | None = None) -> SFTConfig:
        """SFT for `steps` steps at `lr` (None: `sft_lr`): the cold start (`sft_steps`) and the distilled
        student (`distill_steps`, `distill_lr`)."""
        return SFTConfig(seq_len=self.sft_seq_len, batch_size=self.sft_batch_size, steps=steps,
                         lr=self.sft_lr if lr is None else lr,
                         warmup_steps=max(1, steps // 10), save_every=max(1, steps // 3),
                         log_every=max(1, steps // 10), seed=self.seed)

    def grpo_config(self) -> GRPOConfig:
        return GRPOConfig(prompts_per_step=self.prompts_per_step, group_size=self.group_size,
                          max_new_tokens=self.max_new_tokens, temperature=self.grpo_temperature, lr=self.grpo_lr,
                          loss_aggregation=self.grpo_loss, steps=self.grpo_steps, save_every=self.grpo_save_every,
                          seed=self.seed, rewards={"correct": 1.0, "format": 0.2})

    def sample_settings(self) -> SampleSettings:
        """Rejection sampling of the GRPO model for the distillation stage."""
        return SampleSettings(k=self.distill_samples, max_new_tokens=self.max_new_tokens, seed=self.seed,
                              batch_size=512)

    def eval_settings(self) -> EvalSettings:
        return EvalSettings(k=self.eval_k, max_new_tokens=self.max_new_tokens, batch_size=self.eval_batch_size,
                            seed=self.seed)


PRESETS: dict[str, SpeedrunPreset] = {
    # Chosen by measurement (docs/speedrun.md, "Choosing the cpu preset"): pre-training on arithmetic
    # alone, 30,000 distinct problems, half of the solutions worked and half answering at once (as text in
    # the wild mixes them), no loss on the problems' random digits, 1,800 steps at lr 1.4e-3; a gentle cold
    # start; GRPO, which learns to write the working out (the R1-Zero signature: accuracy and response
    # length rising together); and the GRPO model as the distillation student.
    "cpu": SpeedrunPreset(
        name="cpu", about="the main job: under 10 minutes on an idle 2-core CPU (docs/speedrun.md), a ~1M-parameter "
                         "DeepSeek-V3 (MLA, MoE, MTP; the `cpu` model) trained for held-out arithmetic; GRPO learns "
                         "to show its work",
        pretrain_tasks=("arithmetic",), pretrain_difficulty=("arithmetic.worked=0.5",), pretrain_examples=30000,
        pretrain_steps=1800, pretrain_lr=1.4e-3, pretrain_loss_on="responses", sft_lr=3e-5, grpo_steps=60,
        distill_student="grpo", distill_lr=1e-5, eval_n=1000),
    "smoke": SpeedrunPreset(
        name="smoke", about="every stage at toy size in under 2 minutes (the end-to-end test)",
        model="tiny", tokenizer_examples=300, vocab_size=400, pretrain_examples=300, pretrain_steps=24,
        pretrain_batch_size=8, seq_len=64, pretrain_warmup=2, pretrain_checkpoints=4, sft_examples=64,
        sft_steps=6, sft_batch_size=8, sft_seq_len=96, grpo_steps=3, prompts_per_step=4, group_size=4,
        max_new_tokens=24, grpo_save_every=1, grpo_max_minutes=None, grpo_problems=200, distill_problems=16, distill_samples=2, distill_steps=6,
        eval_n=12, eval_k=2, eval_batch_size=64, dtype="fp32"),  # fp32 pinned: the golden file's numbers
    "gpu": SpeedrunPreset(
        name="gpu", about="one GPU: the `gpu` model (~1.2B total, ~0.24B active), longer stages",
        model="gpu", tokenizer_examples=20000, vocab_size=4096, pretrain_examples=100000,
        pretrain_steps=3000, pretrain_batch_size=64, seq_len=256, pretrain_lr=6e-4, pretrain_warmup=200,
        pretrain_checkpoints=4, sft_examples=4000, sft_steps=300, sft_batch_size=64, sft_lr=1e-4,
        grpo_steps=200, prompts_per_step=64, group_size=16, grpo_lr=3e-6, max_new_tokens=128,
        grpo_save_every=20, grpo_max_minutes=None, grpo_problems=50000, distill_problems=4000, distill_samples=8, distill_steps=300,
        eval_n=500, eval_k=8, eval_batch_size=2048),
    "gpu-node": SpeedrunPreset(
        name="gpu-node", about="8 GPUs under torchrun: the `gpu-node` model (~6.6B total, ~1.2B active)",
        model="gpu-node", distributed="fsdp", tokenizer_examples=20000, vocab_size=4096, pretrain_examples=200000,
        pretrain_steps=5000, pretrain_batch_size=32, seq_len=512, pretrain_lr=4e-4, pretrain_warmup=300,
        pretrain_checkpoints=4, sft_examples=8000, sft_steps=400, sft_batch_size=64, sft_lr=5e-5,
        grpo_steps=300, prompts_per_step=64, group_size=16, grpo_lr=2e-6, max_new_tokens=192,
        grpo_save_every=20, grpo_max_minutes=None, grpo_problems=100000, distill_problems=8000, distill_samples=8, distill_steps=400,
        eval_n=1000, eval_k=8, eval_batch_size=4096),
}


def get_preset(name: str, overrides: list[str] | None = None) -> SpeedrunPreset:
    """A named preset with `FIELD=VALUE` overrides (parsed as the field's type)."""
    if name not in PRESETS:
        known = "; ".join(f"{n} ({p.about})" for n, p in PRESETS.items())
        raise ConfigError(f"unknown speedrun preset {name!r}; known presets: {known}")
    preset = PRESETS[name]
    types = {f.name: f.type for f in dataclasses.fields(SpeedrunPreset)}
    changes: dict[str, Any] = {}
    for spec in overrides or []:
        key, sep, text = spec.partition("=")
        if not sep or key not in types or key in ("name", "about"):
            settable = ", ".join(k for k in types if k not in ("name", "about"))
            raise ConfigError(f"--set {spec!r}: expected FIELD=VALUE with FIELD one of: {settable}")
        current = getattr(preset, key)
        try:
            if isinstance(current, tuple):
                value: Any = tuple(t for t in text.split(",") if t)
            elif text.lower() == "none" and (current is None or isinstance(current, (float, str))):
                value = None
            else:  # a None field other than dtype holds a number (distill_lr, grpo_max_minutes)
                value = parse_like(0.0 if current is None and key != "dtype" else current, text)
        except ValueError:
            raise ConfigError(f"--set {spec!r}: {text!r} is not a valid {type(current).__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--set {spec!r}: {text!r} is not a finite number")
        changes[key] = value
    return preset.replace(**changes) if changes else preset


def validate_preset(p: SpeedrunPreset) -> None:
    """ConfigError for settings that cannot run, before any work: each stage's config checks itself
    (`validate()`); what only the speedrun has (tasks, data sizes, the model's length) is checked here."""
    model = ModelConfig.from_name(p.model)
    for task in (*p.pretrain_tasks, p.rl_task):
        get_task(task)
    unknown = set(parse_difficulty(list(p.difficulty))) - {*p.pretrain_tasks, p.rl_task}
    if unknown:
        raise ConfigError(f"difficulty is set for {sorted(unknown)}, which this run does not use")
    unknown = set(parse_difficulty(list(p.pretrain_difficulty))) - set(p.pretrain_tasks)
    if unknown:
        raise ConfigError(f"pretrain_difficulty is set for {sorted(unknown)}, which pre-training does not use")
    for task, settings in parse_difficulty([*p.difficulty, *p.pretrain_difficulty]).items():
        spec = get_task(task)
        spec.generate(random.Random(0), **{**spec.defaults, **settings})  # values out of range: ConfigError now
    for name in ("eval_n", "pretrain_checkpoints", "pretrain_examples", "sft_examples", "tokenizer_examples"):
        if getattr(p, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(p, name)}")
    p.pretrain_args("data", "out", "tokenizer").validate()
    if p.distill_student not in DISTILL_STUDENTS:
        raise ConfigError(f"distill_student must be one of {', '.join(DISTILL_STUDENTS)}, got {p.distill_student!r}")
    for config in (p.sft_config(p.sft_steps), p.sft_config(p.distill_steps, p.distill_lr), p.grpo_config(),
                   p.sample_settings(), p.eval_settings()):
        config.validate()
    if max(p.seq_len, p.sft_seq_len) > model.max_position_embeddings:
        raise ConfigError(f"seq_len/sft_seq_len exceed the {p.model!r} model's {model.max_position_embeddings} positions")
