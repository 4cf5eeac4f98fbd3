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
and the stage that was running continues from its last intact checkpoint (the trainers' own exact
resume; a damaged newer checkpoint is skipped, saying so). A finished stage whose output is damaged
(eval/STAGE.json, pretrain/expert_load.json) is run or measured again. The execution settings that
change the numbers (torch threads, device, ranks) are recorded in state.json and reused on resume
unless given again, so a resumed run computes what an uninterrupted one would.
A preset is a `SpeedrunPreset` (`seekling.presets`), a flat dataclass of stage settings that builds
each trainer's config; `PRESETS` names them, and each one's description says how long it runs:

    seekling speedrun                         # the `cpu` preset, the main job (`seekling speedrun --list`)
    seekling speedrun --preset smoke --out /tmp/smoke     # under 2 minutes, the end-to-end test
    torchrun --nproc_per_node=8 -m seekling.cli speedrun --preset gpu-node   # pre-training on 8 GPUs

Library use: `run_speedrun(PRESETS["smoke"], "runs/x")`; `run_stages` is the resumable loop alone.
"""

from __future__ import annotations

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

from seekling.checkpoint import load_pretrained
from seekling.cost import GPUS
from seekling.data import TokenLoader, build_token_shards, read_problems
from seekling.distill import speedrun_stage
from seekling.errors import CheckpointError, ConfigError, DataError, SeeklingError
from seekling.evalsets import question_text
from seekling.evaluate import evaluate
from seekling.files import write_json_atomic
from seekling.flops import flops_per_token, forward_flops_per_token
from seekling.generate import SamplingParams, generate
from seekling.grpo import train_grpo
from seekling.presets import SpeedrunPreset, validate_preset
from seekling.pretrain import pretrain
from seekling.report import read_eval, read_expert_load, write_report
from seekling.rundir import STATE_FILE, check_run_dir, new_state, read_state
from seekling.sft import make_cold_start, train_sft
from seekling.tasks import completion_text, make_mixture, make_problems, parse_difficulty, render_prompt_ids
from seekling.threads import choose_threads
from seekling.tokenizer import Tokenizer
from seekling.parallel import barrier, destroy_distributed, init_distributed
from seekling.train_state import latest_good_checkpoint, list_checkpoints, read_trainer_state
from seekling.training import on_device, progress_bar


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
                              **ledger_device(ctx, ctx.world_size if stage.all_ranks else 1),
                              **({"dtype": result["dtype"]} if result.get("dtype") else {})}  # MFU at its peak
        ctx.state["stages"][stage.name] = result
        ctx.state["finished"].append(stage.name)
        ctx.save_state()
    outcome = f"skipped: {result['skipped']}" if "skipped" in result else "done"
    ctx.say(f"{tag}: {outcome} in {result['seconds']:.1f}s" + (f" | {result['summary']}" if result.get("summary") else ""))


# ----------------------------------------------------------------------------- the stages
def _difficulty(p: SpeedrunPreset, tasks: list[str] | tuple[str, ...], pretraining: bool = False
                ) -> dict[str, dict[str, Any]]:
    """The task settings of `tasks`; `pretraining`: with the corpus-only `pretrain_difficulty` over them."""
    specs = [*p.difficulty, *(p.pretrain_difficulty if pretraining else ())]
    return {t: d for t, d in parse_difficulty(specs).items() if t in tasks}


def _write_problems(path: Path, problems: list) -> None:
    with open(path, "w") as f:
        for q in problems:
            f.write(json.dumps({"id": q.id, "task": q.task, "prompt": q.prompt, "answer": q.answer,
                                "meta": q.meta}) + "\n")


def _latest_step(run_dir: Path) -> int:
    found = latest_good_checkpoint(run_dir, log=lambda _: None)  # the trainer says which one it resumes from
    return int(read_trainer_state(found)["step"]) if found else 0


def stage_data(ctx: Context) -> dict[str, Any]:
    p, data = ctx.preset, ctx.path("data")
    data.mkdir(exist_ok=True)
    rl = _difficulty(p, [p.rl_task]).get(p.rl_task, {})
    n_cold = make_cold_start([p.rl_task], p.sft_examples, data / "cold_start.jsonl", p.seed, _difficulty(p, [p.rl_task]))
    rl_problems = make_problems(p.rl_task, "train", p.grpo_problems, p.seed, unique=p.grpo_distinct, **rl)
    _write_problems(data / "grpo_problems.jsonl", rl_problems)
    _write_problems(data / "eval_problems.jsonl", make_problems(p.rl_task, "test", p.eval_n, p.seed, **rl))
    return {"summary": f"{n_cold} cold-start conversations, {p.grpo_problems} GRPO problems, "
                       f"{p.eval_n} held-out {p.rl_task} problems"}


def stage_tokenizer(ctx: Context) -> dict[str, Any]:
    p = ctx.preset
    tasks = list(dict.fromkeys([*p.pretrain_tasks, p.rl_task]))
    texts = [q.prompt + " " + completion_text(q)
             for q in make_mixture(tasks, "train", p.tokenizer_examples, p.seed + 1, _difficulty(p, tasks, True))]
    tokenizer = Tokenizer.train(texts, vocab_size=p.vocab_size)
    # Build both into temporary directories and rename: a kill never leaves half a tokenizer or shard set.
    for name in ("tokenizer", "shards"):
        shutil.rmtree(ctx.path(f".{name}.tmp"), ignore_errors=True)
        shutil.rmtree(ctx.path(name), ignore_errors=True)
    tokenizer.save(ctx.path(".tokenizer.tmp"))
    os.replace(ctx.path(".tokenizer.tmp"), ctx.path("tokenizer"))
    index = build_token_shards(ctx.path(".shards.tmp"), tokenizer, tasks=list(p.pretrain_tasks),
                               num_examples=p.pretrain_examples, difficulty=_difficulty(p, p.pretrain_tasks, True),
                               val_fraction=0.05, seed=p.seed)
    os.replace(ctx.path(".shards.tmp"), ctx.path("shards"))
    train, val = index["splits"]["train"]["tokens"], index["splits"]["val"]["tokens"]
    return {"vocab_size": tokenizer.vocab_size, "train_tokens": train, "val_tokens": val, "tokens": train + val,
            "summary": f"vocabulary {tokenizer.vocab_size}"
                       + (f" (of {p.vocab_size} asked: the task text has no more pairs worth merging)"
                          if tokenizer.vocab_size < p.vocab_size else "") + f", {train:,} train + {val:,} val tokens"}


def stage_pretrain(ctx: Context) -> dict[str, Any]:
    p, out = ctx.preset, ctx.path("pretrain")
    vocab = Tokenizer.load(ctx.path("tokenizer")).vocab_size
    summary = pretrain(p.pretrain_args(str(ctx.path("shards")), str(out), str(ctx.path("tokenizer")), vocab,
                                       device=ctx.device.type, quiet=not ctx.is_main))
    if not ctx.is_main:
        return {}
    loads = measure_expert_load(out, ctx.path("shards"), p.pretrain_batch_size, p.seq_len, ctx.device, say=ctx.say)
    write_json_atomic(out / "expert_load.json", loads)
    for old in list_checkpoints(out)[:-1]:  # measured; only the last is worth its disk space now
        shutil.rmtree(old, ignore_errors=True)
    kept = ("tokens", "flops", "steps_run", "resumed_from", "final_loss", "val_loss", "tokens_per_s", "mfu", "dtype")
    return {**{k: summary[k] for k in kept},
            "summary": f"loss {summary['final_loss']:.3f}, val loss {summary['val_loss'] or float('nan'):.3f}, "
                       f"{summary['tokens']:,} tokens"}


@torch.no_grad()
def measure_expert_load(run_dir: Path, data_dir: Path, batch_size: int, seq_len: int, device: torch.device,
                        batches: int = 4, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokens routed to each expert of each MoE layer, at every saved checkpoint, on the same val
    batches: the per-expert load over training (pretrain's metrics.jsonl keeps only the imbalance).
    A damaged checkpoint is left out, saying so."""
    loader = TokenLoader(data_dir, batch_size, seq_len, split="val", shuffle=False)
    n = min(batches, loader.batches_in_epoch(0))
    steps, loads = [], []
    for checkpoint in list_checkpoints(run_dir):
        try:
            model = load_pretrained(str(checkpoint), device=device)
        except CheckpointError as e:
            say(f"expert load: checkpoint {checkpoint.name} left out, it is damaged: {e}")
            continue
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
    p, out = ctx.preset, ctx.path("sft")
    start_step = _latest_step(out)
    cfg = p.sft_config(p.sft_steps)
    model = load_pretrained(str(ctx.path("pretrain", "final")), device=ctx.device)
    with on_device(ctx.device):
        summary = train_sft(model, Tokenizer.load(ctx.path("tokenizer")), ctx.path("data", "cold_start.jsonl"), cfg,
                            out, tokenizer_dir=ctx.path("tokenizer"), resume=True, log=ctx.say)
    tokens = (summary["step"] - start_step) * cfg.batch_size * cfg.seq_len
    per_token = flops_per_token(model.config, cfg.seq_len, training=True, include_mtp=cfg.mtp_weight > 0)["total"]
    return {"tokens": tokens, "flops": tokens * per_token, "final_loss": summary["loss"],
            "resumed_from_step": start_step, "summary": f"loss {summary['loss']:.3f} after {summary['step']} steps"}


def stage_grpo(ctx: Context) -> dict[str, Any]:
    p, out = ctx.preset, ctx.path("grpo")
    tokenizer = Tokenizer.load(ctx.path("tokenizer"))
    problems = read_problems(str(ctx.path("data", "grpo_problems.jsonl")))
    cfg = p.grpo_config()
    start_step = _latest_step(out)
    model = load_pretrained(str(ctx.path("sft", "final")), device=ctx.device)
    with on_device(ctx.device):
        summary = train_grpo(model, tokenizer, problems, cfg, out, tokenizer_dir=ctx.path("tokenizer"), resume=True,
                             max_seconds=p.grpo_max_minutes * 60 if p.grpo_max_minutes else None, log=ctx.say)
    # FLOPs from each step's mean lengths: sampling is a forward over prompt + completion for all P*G
    # rows, the update 3x forward (mu times) over the rows of the groups kept.
    prompt_len = sum(len(render_prompt_ids(tokenizer, q, cfg.template)) for q in problems[:200]) / min(200, len(problems))
    tokens = flops = 0.0
    for r in summary["history"]:
        rows, length = cfg.prompts_per_step * cfg.group_size, prompt_len + r["response_length"]
        per_token = _forward_flops(model.config, length)
        trained = r.get("groups_kept", 0) * cfg.group_size * length * cfg.mu if not r.get("skipped") else 0
        tokens += rows * length + trained
        flops += rows * length * per_token + 3 * trained * per_token
    last = summary["history"][-1] if summary["history"] else {}
    capped = summary["step"] < cfg.steps
    health = summary["health"]
    nothing = bool(health["steps"]) and not health["trained_steps"]
    return {"tokens": int(tokens), "flops": flops, "steps": summary["step"], "resumed_from_step": start_step,
            "time_capped": capped, "last_reward": last.get("reward"), "last_accuracy": last.get("accuracy"),
            "trained_steps": health["trained_steps"], "health_warnings": len(health["warnings"]),
            "summary": ("NOTHING TRAINED: no step updated the model; " if nothing else "")
                       + f"{summary['step']} steps, last reward {last.get('reward', float('nan')):.3f}, "
                       f"train accuracy {last.get('accuracy', float('nan')):.2f}"
                       + (f", {len(health['warnings'])} health warning(s)" if health["warnings"] else "")
                       + (f" (stopped by the {p.grpo_max_minutes} min cap)" if capped else "")}


def _forward_flops(config, context_len: float) -> float:
    return forward_flops_per_token(config, max(1, round(context_len)), include_mtp=False)["total"]


def stage_distill(ctx: Context) -> dict[str, Any]:
    """R1's stage 3: sample from the GRPO model, keep the verified-correct answers, fine-tune the
    student on them (`seekling.distill.speedrun_stage`). The student is the final model of the stage
    `distill_student` names: the pre-trained base as in R1, or the GRPO model itself (rejection-sampling
    fine-tuning), which keeps GRPO's gain when the samples are too few to teach the base."""
    p = ctx.preset
    return dict(speedrun_stage(
        teacher_dir=str(ctx.path("grpo", "final")), tokenizer_dir=str(ctx.path("tokenizer")),
        problems_path=str(ctx.path("data", "grpo_problems.jsonl")), out_dir=str(ctx.path("distill")),
        problems=p.distill_problems, sample=p.sample_settings(), sft=p.sft_config(p.distill_steps, p.distill_lr),
        device=ctx.device, resume=True, student_init=str(ctx.path(p.distill_student, "final")), log=ctx.say))


def eval_stage(model_stage: str) -> Callable[[Context], dict[str, Any]]:
    """The held-out evaluation of `model_stage`'s final model (skipped when that stage was)."""

    def run(ctx: Context) -> dict[str, Any]:
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
            result = evaluate(model, tokenizer, [p.rl_task], **dataclasses.asdict(p.eval_settings()),
                              problems={p.rl_task: problems}, keep_samples=3, generate_fn=generate_with_bar)
        finally:
            bar.close()
        result["model"] = model_stage
        result["mtp_acceptance"] = mtp_acceptance(model, tokenizer, problems, p)
        ctx.path("eval").mkdir(exist_ok=True)
        write_json_atomic(ctx.path("eval", f"{model_stage}.json"), result)
        m = result["mean"]
        prompt_len = sum(len(render_prompt_ids(tokenizer, question_text(q))) for q in problems) / len(problems)
        tokens = len(problems) * p.eval_k * (prompt_len + m["mean_length"])
        k = p.eval_k
        return {"tokens": int(tokens), "flops": tokens * _forward_flops(model.config, prompt_len + m["mean_length"]),
                "metrics": m, "summary": f"pass@1 {m['pass@1']:.1%}, cons@{k} {m[f'cons@{k}']:.1%}, "
                                         f"format {m['format']:.1%}, mean length {m['mean_length']:.1f}"
                                         + (f", MTP acceptance {result['mtp_acceptance']:.1%}"
                                            if result["mtp_acceptance"] is not None else "")}

    return run


ACCEPTANCE_PROMPTS = 16  # evaluation prompts decoded speculatively to measure the MTP acceptance rate


def mtp_acceptance(model, tokenizer: Tokenizer, problems, preset: SpeedrunPreset) -> float | None:
    """Share of the first MTP module's drafts the model accepts when decoding speculatively at the
    evaluation's sampling settings, over the first `ACCEPTANCE_PROMPTS` problems (None: no MTP modules)."""
    if not len(model.mtp):
        return None
    settings = preset.eval_settings()
    prompts = [render_prompt_ids(tokenizer, question_text(q)) for q in problems[:ACCEPTANCE_PROMPTS]]
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_p=settings.top_p, stop_token_ids=(tokenizer.eos_id,), seed=settings.seed)
    stats: dict = {}
    generate(model, prompts, params, speculate=True, stats=stats)
    return stats["accepted"] / max(stats["drafted"], 1)


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
    """Run (or resume) a whole speedrun in `out` and write its report; returns the final state.
    `threads`: torch CPU threads (None: the count recorded when the run started, else `free_cores()`)."""

    validate_preset(preset)
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1 (or None: choose), got {threads}")
    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: expected cpu or cuda (cuda:N for one GPU)")
    run_dir = Path(out)
    info = init_distributed(device)
    previous_threads = torch.get_num_threads()
    try:
        state = check_run_dir(run_dir, preset) if info.is_main else None
        if info.is_main:
            resuming = state is not None
            execution = choose_execution((state or {}).get("execution"), threads, info, preset, say)
            state = state or new_state(preset)  # its environment records the threads just set
            state["execution"] = execution
            if resuming:
                recheck_outputs(run_dir, state, preset, info.device, say)
            write_json_atomic(run_dir / STATE_FILE, state)
            done = len(state["finished"])
            say(f"speedrun {preset.name!r} in {run_dir}: {preset.about}; "
                + (f"{info.world_size} ranks on {info.device.type}" if info.world_size > 1 else
                   f"{torch.get_num_threads()} torch thread(s) on {info.device.type}")
                + (f" (resuming: {done} stage(s) finished earlier)" if resuming else ""))
        barrier()
        if state is None:
            state = read_state(run_dir)
            torch.set_num_threads(state["execution"]["threads"])  # every rank computes as rank 0 chose
        ctx = Context(run_dir, preset, state, say if info.is_main else (lambda _: None), info.device,
                      info.rank, info.world_size)
        start = time.perf_counter()
        run_stages(ctx, stages if stages is not None else pipeline_stages(), barrier,
                   leave=lambda: destroy_distributed(info))
        if info.is_main:

            state.setdefault("runs", []).append({"seconds": time.perf_counter() - start, "ended": time.time()})
            ctx.save_state()
            md, html = write_report(run_dir)
            say(f"report: {md} and {html}")
        return state
    finally:
        torch.set_num_threads(previous_threads)
        destroy_distributed(info)


def choose_execution(recorded: dict[str, Any] | None, threads: int | None, info, preset: SpeedrunPreset,
                       say: Callable[[str], None]) -> dict[str, Any]:
    """The settings this run computes with, set and returned for state.json: torch threads (the thread
    count changes float rounding, so a resume at another count would differ in the last bits), the
    device, its dtype and the number of ranks. On resume the recorded thread count is reused unless
    `threads` is given; any difference is said."""
    recorded = recorded or {}
    if threads is None and recorded.get("threads"):
        threads = int(recorded["threads"])
        say(f"resuming with {threads} torch thread(s), as recorded in state.json when this run started "
            "(the thread count changes float rounding; pass --threads N to override)")
    elif threads is not None and recorded.get("threads") not in (None, threads):
        say(f"note: this run started with {recorded['threads']} torch thread(s), now --threads {threads}: "
            "the stages run from here can differ in the last bits from an uninterrupted run")
    if threads is None:  # measured (seekling.threads); on a GPU, torch's default for the host side
        threads = choose_threads(None, log=say) if info.device.type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)
    now = {"threads": threads, "device": info.device.type,
           "dtype": preset.dtype or ("bf16" if info.device.type == "cuda" else "fp32"), "ranks": info.world_size}
    changed = [f"{k} {recorded[k]} then, {now[k]} now" for k in ("device", "dtype", "ranks")
               if k in recorded and recorded[k] != now[k]]
    if changed:
        say(f"note: this run started with other execution settings ({'; '.join(changed)}): the stages run "
            "from here can differ from an uninterrupted run")
    return now


def recheck_outputs(run_dir: Path, state: dict[str, Any], preset: SpeedrunPreset, device: torch.device,
                    say: Callable[[str], None]) -> None:
    """Before resuming: a finished evaluation whose eval/STAGE.json is damaged is marked unfinished (it
    runs again, with the same draws); a damaged pretrain/expert_load.json is measured again from the
    pre-training checkpoints left."""
    for name in list(state["finished"]):
        if not name.startswith("eval_"):
            continue
        path = run_dir / "eval" / f"{name.removeprefix('eval_')}.json"
        try:
            if read_eval(path) is not None or "skipped" in state["stages"].get(name, {}):
                continue
            problem = f"{path} is missing"
        except DataError as e:
            problem = str(e)
        say(f"{problem}: running {name} again")
        state["finished"].remove(name)
        state["stages"].pop(name, None)
    path = run_dir / "pretrain" / "expert_load.json"
    try:
        read_expert_load(path)
    except DataError as e:
        say(f"{e}: measuring it again from the pre-training checkpoints left")
        loads = measure_expert_load(run_dir / "pretrain", run_dir / "shards", preset.pretrain_batch_size,
                                    preset.seq_len, device, say=say)
        write_json_atomic(path, loads)
