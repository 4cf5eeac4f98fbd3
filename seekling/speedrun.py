"""The whole DeepSeek-R1 recipe in one command: task data -> tokenizer -> pre-training -> cold-start SFT
-> GRPO -> rejection-sampling distillation, with an evaluation after every model stage and a report card.

Every stage writes into one run directory (default `runs/speedrun-<preset>`):

    state.json          the preset, its settings and the finished stages (written atomically)
    data/               cold-start conversations, GRPO and evaluation problems (JSONL)
    tokenizer/ shards/  the BPE tokenizer and the pre-training token shards
    pretrain/ sft/ grpo/ distill/   each trainer's run directory (metrics.jsonl, checkpoints/, final/)
    eval/STAGE.json     held-out pass@1, cons@k, format and length after each model stage
    report.md report.html cost.json plots/   the report card (`seekling.report`)

Stopped at any point (Ctrl-C, kill, a crash), the same command resumes: finished stages are skipped
and the stage that was running continues from its last checkpoint (the trainers' own exact resume).
A preset is a `SpeedrunPreset`, a flat dataclass of stage settings; `PRESETS` names them:

    seekling speedrun                         # the `cpu` preset: 7-15 minutes on a 2-core machine
    seekling speedrun --preset smoke --out /tmp/smoke     # under 2 minutes, the end-to-end test
    torchrun --nproc_per_node=8 -m seekling.cli speedrun --preset gpu-node   # pre-training on 8 GPUs

Library use: `run_speedrun(PRESETS["smoke"], "runs/x")`; `run_stages` is the resumable loop alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from seekling.errors import ConfigError, SeeklingError
from seekling.files import write_json_atomic
from seekling.rundir import STATE_FILE, check_run_dir, new_state, read_state


# ----------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class SpeedrunPreset:
    """Settings of every stage. Changing any field makes a different run (its directory is refused)."""

    name: str
    about: str
    # model and hardware (model presets live in seekling.config)
    model: str = "cpu-small"
    dtype: str | None = None  # None: bf16 on GPU, fp32 on CPU
    distributed: str = "ddp"  # pre-training under torchrun: ddp, or fsdp (FSDP2) for models too big to replicate
    seed: int = 0
    # task data: pre-training sees worked solutions of several tasks (as a base model has seen math);
    # cold start, GRPO and evaluation use one of them, `rl_task` (train split; test split held out)
    pretrain_tasks: tuple[str, ...] = ("arithmetic", "linear", "wordproblem")
    rl_task: str = "arithmetic"
    difficulty: tuple[str, ...] = ()  # e.g. ("arithmetic.digits=3",): TASK.SETTING=VALUE
    tokenizer_examples: int = 3000  # problems per task the tokenizer learns from
    vocab_size: int = 1024
    # pre-training (tokens per step = batch * seq_len * ranks)
    pretrain_examples: int = 8000  # problems per pre-training task
    pretrain_steps: int = 800
    pretrain_batch_size: int = 16
    seq_len: int = 128
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 40
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
    grpo_lr: float = 1e-4  # measured on `cpu`: 2e-5 barely moves, 3e-4 collapses
    grpo_loss: str = "token_mean"
    max_new_tokens: int = 64
    grpo_save_every: int = 20
    grpo_max_minutes: float | None = 6.0  # a cap for slow or busy machines (the report notes when it hit)
    grpo_problems: int = 20000
    # rejection-sampling distillation: the pre-trained base fine-tuned on verified GRPO samples
    distill_samples: int = 4  # completions per problem; only verified-correct ones are kept
    distill_problems: int = 300
    distill_steps: int = 40
    # evaluation after every model stage
    eval_n: int = 200
    eval_k: int = 4
    eval_batch_size: int = 512

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes: Any) -> "SpeedrunPreset":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, SpeedrunPreset] = {
    "cpu": SpeedrunPreset(
        name="cpu", about="the main job: ~10-15 minutes on 2 CPU cores, a ~1M-parameter DeepSeek-V3 "
                         "(MLA, MoE, MTP) that GRPO makes better at held-out arithmetic"),
    "smoke": SpeedrunPreset(
        name="smoke", about="every stage at toy size in under 2 minutes (the end-to-end test)",
        model="tiny", tokenizer_examples=300, vocab_size=400, pretrain_examples=300, pretrain_steps=24,
        pretrain_batch_size=8, seq_len=64, pretrain_warmup=2, pretrain_checkpoints=4, sft_examples=64,
        sft_steps=6, sft_batch_size=8, sft_seq_len=96, grpo_steps=3, prompts_per_step=4, group_size=4,
        max_new_tokens=24, grpo_save_every=1, grpo_max_minutes=None, grpo_problems=200, distill_problems=16, distill_samples=2, distill_steps=6,
        eval_n=12, eval_k=2, eval_batch_size=64),
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
            elif isinstance(current, int):
                value = int(text)
            elif isinstance(current, float) or (current is None and key != "dtype"):
                value = None if text.lower() == "none" else float(text)
            else:
                value = None if text.lower() == "none" else text
        except ValueError:
            raise ConfigError(f"--set {spec!r}: {text!r} is not a valid {type(current).__name__}") from None
        changes[key] = value
    return preset.replace(**changes) if changes else preset


# ----------------------------------------------------------------------------- the resumable loop
@dataclass
class Stage:
    """One step of the pipeline. `run(ctx)` returns a dict for state.json: its numbers, and for the cost
    ledger `tokens` and `flops`; {"skipped": reason} when it could not run. `all_ranks`: under torchrun
    every rank runs it (pre-training); the other stages run on rank 0 alone."""

    name: str
    about: str
    run: Callable[["Context"], dict[str, Any]]
    all_ranks: bool = False


@dataclass
class Context:
    run_dir: Path
    preset: SpeedrunPreset
    state: dict[str, Any]
    say: Callable[[str], None] = print
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> str:
        return self.preset.dtype or ("bf16" if self.device.type == "cuda" else "fp32")

    def save_state(self) -> None:
        if self.is_main:
            write_json_atomic(self.path(STATE_FILE), self.state)


def ledger_device(ctx: Context, ranks: int) -> dict[str, Any]:
    """How the cost ledger prices a stage on `ranks` processes: CPU cores (torch threads) or GPUs by name."""
    if ctx.device.type != "cuda":
        return {"device": "cpu", "devices": torch.get_num_threads() * ranks, "dtype": "fp32"}
    from seekling.cost import GPUS

    name = torch.cuda.get_device_name(ctx.device).lower()
    gpu = next((g for g in GPUS if g in name), "h100")  # H200 and unknown GPUs priced as an H100
    return {"device": gpu, "devices": ranks, "dtype": ctx.dtype}


def run_stages(ctx: Context, stages: list[Stage], barrier: Callable[[], None] = lambda: None,
               leave: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run the stages not yet in `state["finished"]`, in order, recording each one atomically as it ends.

    One line per stage. A stage interrupted (Ctrl-C, kill, error) is not marked finished, so the next
    call runs it again, and the trainers inside continue from their last checkpoint. Under torchrun all
    ranks meet at `barrier` after each stage up to the last multi-rank one, then call `leave` (drop the
    process group: the trainers after it would otherwise wait for ranks that have gone) and only rank 0
    goes on.
    """
    n = len(stages)
    last_collective = max((i for i, s in enumerate(stages) if s.all_ranks), default=-1)
    for i, stage in enumerate(stages):
        if not ctx.is_main and i > last_collective:
            break
        tag = f"[{i + 1}/{n}] {stage.name}"
        if stage.name in ctx.state["finished"]:
            ctx.say(f"{tag}: finished earlier, skipped")
        elif ctx.is_main or stage.all_ranks:
            run_stage(ctx, stage, tag)
        if i <= last_collective:
            barrier()
        if i == last_collective:
            leave()
    return ctx.state


def run_stage(ctx: Context, stage: Stage, tag: str) -> None:
    ctx.say(f"{tag}: {stage.about}")
    start = time.perf_counter()
    try:
        result = stage.run(ctx) or {}
    except KeyboardInterrupt:
        ctx.say(f"\n{tag}: interrupted; run the same command again to resume this stage from its last checkpoint")
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SeeklingError(
                f"stage {stage.name}: the disk is full ({e.filename or ctx.run_dir}). Finished stages and "
                "checkpoints are kept: free some space and run the same command to resume") from None
        raise
    result["seconds"] = time.perf_counter() - start
    if ctx.is_main:
        if "skipped" not in result:
            result["cost"] = {"seconds": result["seconds"], "tokens": int(result.get("tokens", 0)),
                              "flops": float(result.get("flops", 0.0)),
                              **ledger_device(ctx, ctx.world_size if stage.all_ranks else 1)}
        ctx.state["stages"][stage.name] = result
        ctx.state["finished"].append(stage.name)
        ctx.save_state()
    outcome = f"skipped: {result['skipped']}" if "skipped" in result else "done"
    ctx.say(f"{tag}: {outcome} in {result['seconds']:.1f}s" + (f" | {result['summary']}" if result.get("summary") else ""))


# ----------------------------------------------------------------------------- the stages
def validate_preset(p: SpeedrunPreset) -> None:
    """ConfigError for settings that cannot run, before any work (the trainers check again, later)."""
    from seekling.config import PRESETS as MODEL_PRESETS, ModelConfig
    from seekling.grpo import LOSS_AGGREGATIONS
    from seekling.tasks import get_task, parse_difficulty

    if p.model not in MODEL_PRESETS:
        raise ConfigError(f"model {p.model!r}: known model presets are {', '.join(MODEL_PRESETS)}")
    for task in (*p.pretrain_tasks, p.rl_task):
        get_task(task)
    unknown = set(parse_difficulty(list(p.difficulty))) - {*p.pretrain_tasks, p.rl_task}
    if unknown:
        raise ConfigError(f"difficulty is set for {sorted(unknown)}, which this run does not use")
    counts = {k: getattr(p, k) for k in ("pretrain_steps", "pretrain_batch_size", "seq_len", "sft_steps",
                                         "sft_batch_size", "sft_seq_len", "grpo_steps", "prompts_per_step",
                                         "max_new_tokens", "eval_n", "eval_k", "pretrain_checkpoints",
                                         "pretrain_examples", "sft_examples", "tokenizer_examples")}
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if p.group_size < 2:
        raise ConfigError(f"group_size must be >= 2 (a group of one has no relative advantage), got {p.group_size}")
    if p.grpo_loss not in LOSS_AGGREGATIONS:
        raise ConfigError(f"grpo_loss {p.grpo_loss!r}: known {', '.join(LOSS_AGGREGATIONS)}")
    if p.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"distributed must be ddp or fsdp, got {p.distributed!r}")
    if p.dtype not in (None, "fp32", "bf16"):
        raise ConfigError(f"dtype must be fp32 or bf16, got {p.dtype!r}")
    max_pos = ModelConfig.from_name(p.model).max_position_embeddings
    if max(p.seq_len, p.sft_seq_len) > max_pos:
        raise ConfigError(f"seq_len/sft_seq_len exceed the {p.model!r} model's {max_pos} positions")


def _difficulty(p: SpeedrunPreset, tasks: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    from seekling.tasks import parse_difficulty

    return {t: d for t, d in parse_difficulty(list(p.difficulty)).items() if t in tasks}


def _write_problems(path: Path, problems: list) -> None:
    with open(path, "w") as f:
        for q in problems:
            f.write(json.dumps({"id": q.id, "task": q.task, "prompt": q.prompt, "answer": q.answer,
                                "meta": q.meta}) + "\n")


def _latest_step(run_dir: Path) -> int:
    from seekling.train_state import latest_checkpoint, read_trainer_state

    found = latest_checkpoint(run_dir)
    return int(read_trainer_state(found)["step"]) if found else 0


def _on_device(ctx: Context):
    """SFT and GRPO build their batches with torch.full/zeros/tensor and never move them; on a GPU a
    default-device scope puts those batches next to the model (an adapter: untested without a GPU)."""
    return torch.device(ctx.device) if ctx.device.type == "cuda" else contextlib.nullcontext()


def stage_data(ctx: Context) -> dict[str, Any]:
    from seekling.sft import make_cold_start
    from seekling.tasks import make_problems

    p, data = ctx.preset, ctx.path("data")
    data.mkdir(exist_ok=True)
    rl = _difficulty(p, [p.rl_task]).get(p.rl_task, {})
    n_cold = make_cold_start([p.rl_task], p.sft_examples, data / "cold_start.jsonl", p.seed, _difficulty(p, [p.rl_task]))
    _write_problems(data / "grpo_problems.jsonl", make_problems(p.rl_task, "train", p.grpo_problems, p.seed, **rl))
    _write_problems(data / "eval_problems.jsonl", make_problems(p.rl_task, "test", p.eval_n, p.seed, **rl))
    return {"summary": f"{n_cold} cold-start conversations, {p.grpo_problems} GRPO problems, "
                       f"{p.eval_n} held-out {p.rl_task} problems"}


def stage_tokenizer(ctx: Context) -> dict[str, Any]:
    from seekling.data import build_token_shards
    from seekling.tasks import completion_text, make_mixture
    from seekling.tokenizer import Tokenizer

    p = ctx.preset
    tasks = list(dict.fromkeys([*p.pretrain_tasks, p.rl_task]))
    texts = [q.prompt + " " + completion_text(q)
             for q in make_mixture(tasks, "train", p.tokenizer_examples, p.seed + 1, _difficulty(p, tasks))]
    tokenizer = Tokenizer.train(texts, vocab_size=p.vocab_size)
    # Build both into temporary directories and rename: a kill never leaves half a tokenizer or shard set.
    for name in ("tokenizer", "shards"):
        shutil.rmtree(ctx.path(f".{name}.tmp"), ignore_errors=True)
        shutil.rmtree(ctx.path(name), ignore_errors=True)
    tokenizer.save(ctx.path(".tokenizer.tmp"))
    os.replace(ctx.path(".tokenizer.tmp"), ctx.path("tokenizer"))
    index = build_token_shards(ctx.path(".shards.tmp"), tokenizer, tasks=list(p.pretrain_tasks),
                               num_examples=p.pretrain_examples, difficulty=_difficulty(p, p.pretrain_tasks),
                               val_fraction=0.05, seed=p.seed)
    os.replace(ctx.path(".shards.tmp"), ctx.path("shards"))
    train, val = index["splits"]["train"]["tokens"], index["splits"]["val"]["tokens"]
    return {"vocab_size": tokenizer.vocab_size, "train_tokens": train, "val_tokens": val, "tokens": train + val,
            "summary": f"vocabulary {tokenizer.vocab_size}, {train:,} train + {val:,} val tokens"}


def stage_pretrain(ctx: Context) -> dict[str, Any]:
    from seekling.pretrain import PretrainArgs, pretrain
    from seekling.tokenizer import Tokenizer

    p, out = ctx.preset, ctx.path("pretrain")
    vocab = Tokenizer.load(ctx.path("tokenizer")).vocab_size
    save_every = max(1, p.pretrain_steps // p.pretrain_checkpoints)
    summary = pretrain(PretrainArgs(
        data=str(ctx.path("shards")), out=str(out), tokenizer=str(ctx.path("tokenizer")), preset=p.model,
        vocab_size=vocab, resume=True, steps=p.pretrain_steps, batch_size=p.pretrain_batch_size, seq_len=p.seq_len,
        lr=p.pretrain_lr, warmup=p.pretrain_warmup, eval_every=max(1, p.pretrain_steps // 10), eval_batches=4,
        save_every=save_every, keep_last=0, log_every=max(1, p.pretrain_steps // 4), seed=p.seed,
        device=ctx.device.type, dtype=p.dtype, distributed=p.distributed, quiet=not ctx.is_main))
    if not ctx.is_main:
        return {}
    loads = measure_expert_load(out, ctx.path("shards"), p.pretrain_batch_size, p.seq_len, ctx.device)
    write_json_atomic(out / "expert_load.json", loads)
    from seekling.train_state import list_checkpoints

    for old in list_checkpoints(out)[:-1]:  # measured; only the last is worth its disk space now
        shutil.rmtree(old, ignore_errors=True)
    return {"tokens": summary["tokens"], "flops": summary["flops"], "steps_run": summary["steps_run"],
            "resumed_from": summary["resumed_from"], "final_loss": summary["final_loss"],
            "val_loss": summary["val_loss"], "tokens_per_s": summary["tokens_per_s"], "mfu": summary["mfu"],
            "summary": f"loss {summary['final_loss']:.3f}, val loss {summary['val_loss'] or float('nan'):.3f}, "
                       f"{summary['tokens']:,} tokens"}


@torch.no_grad()
def measure_expert_load(run_dir: Path, data_dir: Path, batch_size: int, seq_len: int, device: torch.device,
                        batches: int = 4) -> dict[str, Any]:
    """Tokens routed to each expert of each MoE layer, at every saved checkpoint, on the same val
    batches: the per-expert load over training (pretrain's metrics.jsonl keeps only the imbalance)."""
    from seekling.checkpoint import load_pretrained
    from seekling.data import TokenLoader
    from seekling.train_state import list_checkpoints, read_trainer_state

    loader = TokenLoader(data_dir, batch_size, seq_len, split="val", shuffle=False)
    n = min(batches, loader.batches_in_epoch(0))
    steps, loads = [], []
    for checkpoint in list_checkpoints(run_dir):
        model = load_pretrained(str(checkpoint), device=device)
        if not model.moe_gates:
            break
        total_LE = None
        for b in range(n):
            x, _ = loader.batch_at(0, b)
            load_LE = model(x.to(device)).expert_load.float().cpu()
            total_LE = load_LE if total_LE is None else total_LE + load_LE
        steps.append(int(read_trainer_state(checkpoint)["step"]))
        loads.append(total_LE.tolist())
    first_moe = model.config.first_k_dense_replace if steps else 0
    return {"steps": steps, "load": loads, "layers": [first_moe + i for i in range(len(loads[0]) if loads else 0)],
            "tokens_per_checkpoint": n * batch_size * seq_len,
            "source": "measured on the first val batches at each pre-training checkpoint"}


def stage_sft(ctx: Context) -> dict[str, Any]:
    from seekling.checkpoint import load_pretrained
    from seekling.flops import flops_per_token
    from seekling.sft import SFTConfig, train_sft
    from seekling.tokenizer import Tokenizer

    p, out = ctx.preset, ctx.path("sft")
    start_step = _latest_step(out)
    cfg = SFTConfig(seq_len=p.sft_seq_len, batch_size=p.sft_batch_size, steps=p.sft_steps, lr=p.sft_lr,
                    warmup_steps=max(1, p.sft_steps // 10), save_every=max(1, p.sft_steps // 3),
                    log_every=max(1, p.sft_steps // 10), seed=p.seed)
    model = load_pretrained(str(ctx.path("pretrain", "final")), device=ctx.device)
    with _on_device(ctx):
        summary = train_sft(model, Tokenizer.load(ctx.path("tokenizer")), ctx.path("data", "cold_start.jsonl"), cfg,
                            out, tokenizer_dir=ctx.path("tokenizer"), resume=True, log=ctx.say)
    tokens = (summary["step"] - start_step) * cfg.batch_size * cfg.seq_len
    per_token = flops_per_token(model.config, cfg.seq_len, training=True, include_mtp=cfg.mtp_weight > 0)["total"]
    return {"tokens": tokens, "flops": tokens * per_token, "final_loss": summary["loss"],
            "resumed_from_step": start_step, "summary": f"loss {summary['loss']:.3f} after {summary['step']} steps"}


def stage_grpo(ctx: Context) -> dict[str, Any]:
    from seekling.checkpoint import load_pretrained
    from seekling.grpo import GRPOConfig, prompt_ids, read_problems, train_grpo
    from seekling.tokenizer import Tokenizer

    p, out = ctx.preset, ctx.path("grpo")
    tokenizer = Tokenizer.load(ctx.path("tokenizer"))
    problems = read_problems(str(ctx.path("data", "grpo_problems.jsonl")))
    cfg = GRPOConfig(prompts_per_step=p.prompts_per_step, group_size=p.group_size, max_new_tokens=p.max_new_tokens,
                     temperature=1.0, lr=p.grpo_lr, loss_aggregation=p.grpo_loss, steps=p.grpo_steps,
                     save_every=p.grpo_save_every, seed=p.seed, rewards={"correct": 1.0, "format": 0.2})
    start_step = _latest_step(out)
    model = load_pretrained(str(ctx.path("sft", "final")), device=ctx.device)
    with _on_device(ctx):
        summary = train_grpo(model, tokenizer, problems, cfg, out, tokenizer_dir=ctx.path("tokenizer"), resume=True,
                             max_seconds=p.grpo_max_minutes * 60 if p.grpo_max_minutes else None, log=ctx.say)
    # FLOPs from each step's mean lengths: sampling is a forward over prompt + completion for all P*G
    # rows, the update 3x forward (mu times) over the rows of the groups kept.
    prompt_len = sum(len(prompt_ids(tokenizer, q, cfg.template)) for q in problems[:200]) / min(200, len(problems))
    tokens = flops = 0.0
    for r in summary["history"]:
        rows, length = cfg.prompts_per_step * cfg.group_size, prompt_len + r["response_length"]
        per_token = _forward_flops(model.config, length)
        trained = r.get("groups_kept", 0) * cfg.group_size * length * cfg.mu if not r.get("skipped") else 0
        tokens += rows * length + trained
        flops += rows * length * per_token + 3 * trained * per_token
    last = summary["history"][-1] if summary["history"] else {}
    capped = summary["step"] < cfg.steps
    return {"tokens": int(tokens), "flops": flops, "steps": summary["step"], "resumed_from_step": start_step,
            "time_capped": capped, "last_reward": last.get("reward"), "last_accuracy": last.get("accuracy"),
            "summary": f"{summary['step']} steps, last reward {last.get('reward', float('nan')):.3f}, "
                       f"train accuracy {last.get('accuracy', float('nan')):.2f}"
                       + (f" (stopped by the {p.grpo_max_minutes} min cap)" if capped else "")}


def _forward_flops(config, context_len: float) -> float:
    from seekling.flops import forward_flops_per_token

    return forward_flops_per_token(config, max(1, round(context_len)), include_mtp=False)["total"]


def stage_distill(ctx: Context) -> dict[str, Any]:
    """R1's stage 3: sample from the GRPO model, keep the verified-correct answers, fine-tune the
    pre-trained base on them (`seekling.distill.speedrun_stage`)."""
    from seekling.distill import speedrun_stage

    p = ctx.preset
    return dict(speedrun_stage(
        teacher_dir=str(ctx.path("grpo", "final")), tokenizer_dir=str(ctx.path("tokenizer")),
        problems_path=str(ctx.path("data", "grpo_problems.jsonl")), out_dir=str(ctx.path("distill")),
        samples=p.distill_samples, problems=p.distill_problems, device=ctx.device, resume=True,
        sft_steps=p.distill_steps, sft_batch_size=p.sft_batch_size, sft_seq_len=p.sft_seq_len, sft_lr=p.sft_lr,
        max_new_tokens=p.max_new_tokens, seed=p.seed, log=ctx.say))


def eval_stage(model_stage: str) -> Callable[[Context], dict[str, Any]]:
    """The held-out evaluation of `model_stage`'s final model (skipped when that stage was)."""

    def run(ctx: Context) -> dict[str, Any]:
        from seekling.checkpoint import load_pretrained
        from seekling.evaluate import evaluate, prompt_ids
        from seekling.generate import generate
        from seekling.grpo import read_problems
        from seekling.tokenizer import Tokenizer
        from seekling.training import progress_bar

        if "skipped" in ctx.state["stages"].get(model_stage, {}):
            return {"skipped": f"no {model_stage} model"}
        p = ctx.preset
        tokenizer = Tokenizer.load(ctx.path("tokenizer"))
        problems = read_problems(str(ctx.path("data", "eval_problems.jsonl")))
        model = load_pretrained(str(ctx.path(model_stage, "final")), device=ctx.device)
        bar = progress_bar(len(problems) * p.eval_k, desc="eval")

        def generate_with_bar(model, prompts, params):
            completions = generate(model, prompts, params)
            bar.update(len(prompts))
            return completions

        try:
            result = evaluate(model, tokenizer, [p.rl_task], k=p.eval_k, max_new_tokens=p.max_new_tokens,
                              batch_size=p.eval_batch_size, seed=p.seed, problems={p.rl_task: problems},
                              keep_samples=3, generate_fn=generate_with_bar)
        finally:
            bar.close()
        result["model"] = model_stage
        ctx.path("eval").mkdir(exist_ok=True)
        write_json_atomic(ctx.path("eval", f"{model_stage}.json"), result)
        m = result["mean"]
        prompt_len = sum(len(prompt_ids(tokenizer, q)) for q in problems) / len(problems)
        tokens = len(problems) * p.eval_k * (prompt_len + m["mean_length"])
        k = p.eval_k
        return {"tokens": int(tokens), "flops": tokens * _forward_flops(model.config, prompt_len + m["mean_length"]),
                "metrics": m, "summary": f"pass@1 {m['pass@1']:.1%}, cons@{k} {m[f'cons@{k}']:.1%}, "
                                         f"format {m['format']:.1%}, mean length {m['mean_length']:.1f}"}

    return run


def pipeline_stages() -> list[Stage]:
    return [
        Stage("data", "task problems: cold-start conversations, GRPO and held-out evaluation sets", stage_data),
        Stage("tokenizer", "byte-level BPE on the task text, then the pre-training token shards", stage_tokenizer),
        Stage("pretrain", "pre-training: next-token + MTP loss, aux-loss-free MoE balancing", stage_pretrain,
              all_ranks=True),
        Stage("eval_pretrain", "held-out evaluation of the pre-trained model", eval_stage("pretrain")),
        Stage("sft", "cold-start SFT on R1-format worked solutions", stage_sft),
        Stage("eval_sft", "held-out evaluation after cold-start SFT", eval_stage("sft")),
        Stage("grpo", "GRPO with rule-based rewards (correct + format)", stage_grpo),
        Stage("eval_grpo", "held-out evaluation after GRPO", eval_stage("grpo")),
        Stage("distill", "rejection-sampling distillation (SFT on verified GRPO samples)", stage_distill),
        Stage("eval_distill", "held-out evaluation after distillation", eval_stage("distill")),
    ]


def run_speedrun(preset: SpeedrunPreset, out: str | Path, threads: int | None = None, device: str | None = None,
                 stages: list[Stage] | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a whole speedrun in `out` and write its report; returns the final state."""
    from seekling.parallel import barrier, destroy_distributed, init_distributed

    validate_preset(preset)
    run_dir = Path(out)
    info = init_distributed(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or (free_cores() if info.device.type == "cpu" else previous_threads))
    try:
        state = check_run_dir(run_dir, preset) if info.is_main else None
        if info.is_main:
            resuming = state is not None
            state = state or new_state(preset)
            write_json_atomic(run_dir / STATE_FILE, state)
            done = len(state["finished"])
            say(f"speedrun {preset.name!r} in {run_dir}: {preset.about}; "
                + (f"{info.world_size} ranks on {info.device.type}" if info.world_size > 1 else
                   f"{torch.get_num_threads()} torch thread(s) on {info.device.type}")
                + (f" (resuming: {done} stage(s) finished earlier)" if resuming else ""))
        barrier()
        if state is None:
            state = read_state(run_dir)
        ctx = Context(run_dir, preset, state, say if info.is_main else (lambda _: None), info.device,
                      info.rank, info.world_size)
        start = time.perf_counter()
        run_stages(ctx, stages if stages is not None else pipeline_stages(), barrier,
                   leave=lambda: destroy_distributed(info))
        if info.is_main:
            from seekling.report import write_report

            state.setdefault("runs", []).append({"seconds": time.perf_counter() - start, "ended": time.time()})
            ctx.save_state()
            md, html = write_report(run_dir)
            say(f"report: {md} and {html}")
        return state
    finally:
        torch.set_num_threads(previous_threads)
        destroy_distributed(info)


def free_cores() -> int:
    """torch's thread count less the cores other programs keep busy (1-minute load average), at least 1.

    On cores shared with other jobs, torch's spinning threads make a step several times slower than one
    thread alone (measured 4x with 2 threads on a 2-core machine under load 4); on an idle machine this is
    torch's default."""
    cores = torch.get_num_threads()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))
