"""R1's stage 3 and distillation: rejection sampling from a teacher, then SFT of a student on what was kept.

DeepSeek-R1 samples many answers from its RL checkpoint, keeps the verified-correct, readable ones
and fine-tunes on them; its distilled models are small students fine-tuned on those samples, no RL.

    load_teacher       a seekling run directory (final/ or latest checkpoint), a seekling / DeepSeek-V3
                       Hugging Face directory, or any transformers causal LM directory
    rejection_sample   k completions per problem (batched), each judged in order: well-formed, correct
                       by the task's verifier, not too long, not a duplicate; kept ones appended to chat
                       JSONL with provenance, `.stats.json` beside it listing the prompts done (resume)
    distill            sample, SFT a student (a preset such as `cpu`, or a model directory) with
                       `seekling.sft`, evaluate teacher, student before and student after
    speedrun_stage     what `seekling.speedrun.stage_distill` calls

Each completion is seeded by (seed, problem id, sample index), so a resumed run writes what an
uninterrupted one would (seekling teachers; transformers' `generate` is seeded per batch).

    seekling sample --teacher runs/grpo --tasks countdown --num-problems 2000 --k 4 --out runs/kept.jsonl
    seekling distill --teacher runs/grpo --tasks countdown --student-preset cpu --out runs/distill
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from seekling.checkpoint import load_pretrained, save_pretrained
from seekling.config import PRESETS, ModelConfig, setting
from seekling.data import SFTLoader, read_problems
from seekling.errors import CheckpointError, ConfigError, DataError, SeeklingError
from seekling.evalsets import EVALSETS, load_evalset, question_text
from seekling.evaluate import EvalSettings, evaluate
from seekling.files import write_json_atomic, write_text_atomic
from seekling.flops import flops_per_token, forward_flops_per_token
from seekling.generate import SamplingParams, generate
from seekling.model import Transformer
from seekling.rewards import GRADERS, format_reward, grade, known_rewards, load_reward
from seekling.sft import SFTConfig, train_sft
from seekling.tasks import TASKS, Problem, check_template, make_problems, render_prompt_ids, stable_hash
from seekling.teachers import Teacher, load_teacher, resolve_teacher
from seekling.tokenizer import Tokenizer
from seekling.train_state import first_tokenizer_dir, tokenizer_files
from seekling.training import on_device, progress_bar, resume_point

SAMPLES_FORMAT = "seekling-samples-v1"


# ----------------------------------------------------------------------------- problems and verifiers
def load_problems(tasks: Sequence[str] = (), n: int = 100, split: str = "train", seed: int = 0,
                  difficulty: dict[str, dict[str, Any]] | None = None, path: str | Path | None = None,
                  columns: dict[str, str] | None = None) -> list[Problem]:
    """`n` problems of each task (synthetic tasks: the `split`; published sets: the set), or a file or
    dataset (`columns` mapping its columns to the problem's fields)."""
    if path is not None:
        problems = read_problems(path, unique=True, columns=columns, default_split=split)
        return problems[:n] if n else problems
    if not tasks:
        raise ConfigError("give tasks (e.g. --tasks countdown) or a problems file (--problems FILE.jsonl)")
    difficulty = difficulty or {}
    out: list[Problem] = []
    for task in tasks:
        if task in TASKS:
            out += make_problems(task, split, n, seed, **difficulty.get(task, {}))
        elif task in EVALSETS:
            out += load_evalset(task, limit=n or None)
        else:
            raise ConfigError(f"unknown task {task!r}; known: {', '.join([*TASKS, *EVALSETS])} "
                              "(or give your own problems with --problems FILE.jsonl)")
    return out


def verifier_for(task: str, reward: str | None = None) -> Callable[[str, Problem], float]:
    """The correctness score of a completion: `reward` (a registered name or module:function) when
    given, else the task's own verifier (`seekling.rewards.grade`); rows with no task are graded
    by `accuracy`. A task with neither is a ConfigError."""
    if reward:
        fn = load_reward(reward)
        return lambda text, p: float(fn(text, p.answer, **{**p.meta, "task": p.task}))
    if task and task not in TASKS and task not in GRADERS:
        raise ConfigError(f"task {task!r} has no reward function: tasks with verifiers are "
                          f"{', '.join(sorted({*TASKS, *GRADERS}))}; pass a reward (--reward NAME, one of "
                          f"{', '.join(known_rewards())}, or module:function) to grade it")
    return lambda text, p: 1.0 if grade(task, text, p) else 0.0


# ----------------------------------------------------------------------------- rejection sampling
@dataclass
class SampleSettings:
    """Rejection sampling's settings; each field's help is the `seekling sample` flag's help."""

    k: int = setting(4, "completions sampled per problem")
    temperature: float = setting(0.6, "sampling temperature (R1's evaluation protocol: readable, still varied)")
    top_p: float = setting(0.95, "nucleus sampling threshold")
    max_new_tokens: int = setting(256, "completion length limit in tokens")
    template: str = setting("chat", "the teacher's prompt template (the samples are always chats)")
    seed: int = setting(0, "seed for problems and sampling")
    max_tokens_kept: int | None = setting(None, "drop correct completions longer than this many teacher tokens "
                                                "(stop excluded; default: no limit)")
    dedupe: bool = setting(True, "drop a completion identical (up to whitespace) to one kept for the same "
                                 "prompt text; the flag keeps them")
    reward: str | None = setting(None, "grade with this reward (name or module:function) instead of the task's "
                                       "verifier (default: the verifier)")
    min_reward: float = setting(1.0, "verifier score that counts as correct")
    batch_size: int = setting(256, "completions per sampler call (not part of what a samples file records)")

    def validate(self) -> None:
        for name in ("k", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_template(self.template)
        if self.max_tokens_kept is not None and self.max_tokens_kept < 1:
            raise ConfigError(f"max_tokens_kept must be >= 1, got {self.max_tokens_kept}")
        SamplingParams(self.max_new_tokens, self.temperature, self.top_p).validate()

    def recorded(self) -> dict[str, Any]:
        """What a samples file is made with: resuming under other settings would mix two data sets."""
        return {k: v for k, v in asdict(self).items() if k != "batch_size"}


@dataclass
class KeepStats:
    """Counts over the sampled completions of one task. `kept` passed every filter, in order:
    well-formed and correct, then at most max_tokens_kept, then not a duplicate."""

    prompts: int = 0
    sampled: int = 0
    well_formed: int = 0
    correct: int = 0
    correct_and_well_formed: int = 0
    too_long: int = 0
    duplicates: int = 0
    kept: int = 0
    prompts_with_kept: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def keep_rate(self) -> float:
        return self.kept / self.sampled if self.sampled else 0.0

    def add(self, other: "KeepStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "keep_rate": round(self.keep_rate, 6)}


class NothingKept(SeeklingError):
    """Every sampled completion was dropped: there is nothing to train on."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


def stats_path_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".stats.json")


def dedupe_key(problem: Problem, text: str) -> str:
    return question_text(problem) + "\x00" + " ".join(text.split())


def judge(text: str, n_tokens: int, problem: Problem, verifier: Callable[[str, Problem], float],
          settings: SampleSettings, seen: set[str]) -> tuple[str, float, float]:
    """(verdict, correctness score, format score) of one completion; the verdict is 'kept',
    'unformatted', 'wrong', 'too_long' or 'duplicate'. A kept completion's key joins `seen`."""
    fmt = format_reward(text)
    score = verifier(text, problem)
    if fmt < 1.0:
        return "unformatted", score, fmt
    if score < settings.min_reward:
        return "wrong", score, fmt
    if settings.max_tokens_kept is not None and n_tokens > settings.max_tokens_kept:
        return "too_long", score, fmt
    key = dedupe_key(problem, text)
    if settings.dedupe and key in seen:
        return "duplicate", score, fmt
    seen.add(key)
    return "kept", score, fmt


def row_seed(seed: int, problem_id: str, sample: int) -> int:
    return stable_hash(f"{seed}/{problem_id}/{sample}") % (2**62)


def _read_samples(out: Path, fingerprint: str) -> list[dict]:
    """The rows of an existing samples file; a half-written last line (a kill mid-write) is dropped,
    rows of another teacher are refused."""
    rows: list[dict] = []
    lines = out.read_text().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the unfinished tail of an interrupted append
                continue
            raise DataError(f"{out}:{number}: not valid JSON; not a samples file (pass --overwrite to replace it)") from None
        teacher = (row.get("provenance") or {}).get("teacher") if isinstance(row, dict) else None
        if not isinstance(teacher, dict) or "fingerprint" not in teacher:
            raise DataError(f"{out}:{number}: no provenance.teacher; not a samples file (pass --overwrite to replace it)")
        if teacher["fingerprint"] != fingerprint:
            raise ConfigError(f"{out} holds samples of another teacher ({teacher.get('path')}, line {number}); "
                              "pass --overwrite to replace them, or write to another file")
        rows.append(row)
    return rows


def _resume(out: Path, teacher: Teacher, settings: SampleSettings, overwrite: bool
            ) -> tuple[set[str], dict[str, KeepStats], set[str]]:
    """(done problem ids, stats so far, dedupe keys) from an existing samples file and its stats.

    Rows of problems that the stats file does not list as done (a batch interrupted between the two
    writes) are removed, and those problems sampled again."""
    stats_path = stats_path_for(out)
    if overwrite:
        out.unlink(missing_ok=True)
        stats_path.unlink(missing_ok=True)
    if not out.exists() and not stats_path.exists():
        return set(), {}, set()
    done: set[str] = set()
    stats: dict[str, KeepStats] = {}
    if stats_path.exists():
        try:
            saved = json.loads(stats_path.read_text())
        except json.JSONDecodeError:
            saved = None
        if not isinstance(saved, dict) or saved.get("format") != SAMPLES_FORMAT:
            raise DataError(f"{stats_path}: not a seekling samples stats file; pass --overwrite to start again")
        if saved["teacher"]["fingerprint"] != teacher.fingerprint:
            raise ConfigError(f"{out} holds samples of another teacher ({saved['teacher']['path']}); "
                              "pass --overwrite to replace them, or write to another file")
        if saved["settings"] != settings.recorded():
            diff = [f"{k}: {saved['settings'].get(k)!r} there, {v!r} now"
                    for k, v in settings.recorded().items() if saved["settings"].get(k) != v]
            raise ConfigError(f"{out} was sampled with other settings ({'; '.join(diff)}); resuming would mix "
                              "two data sets: pass --overwrite, or write to another file")
        done = set(saved["done"])
        stats = {task: KeepStats(**{k: v for k, v in s.items() if k != "keep_rate"})
                 for task, s in saved["tasks"].items()}
    rows = _read_samples(out, teacher.fingerprint) if out.exists() else []
    if not stats_path.exists():  # the stats are lost: what was kept is what the file holds
        for row in rows:
            p = row["provenance"]
            done.add(p["prompt_id"])
            stats.setdefault(p.get("task", ""), KeepStats()).kept += 1
    keep = [row for row in rows if row["provenance"]["prompt_id"] in done]
    if len(keep) != len(rows) or (out.exists() and not out.read_text().endswith("\n") and out.stat().st_size):
        write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in keep))
    seen = {row["messages"][0]["content"] + "\x00" + " ".join(row["messages"][-1]["content"].split()) for row in keep}
    return done, stats, seen


def rejection_sample(teacher: Teacher, problems: Sequence[Problem], out: str | Path, settings: SampleSettings,
                     overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Sample `settings.k` completions of each problem not done yet, keep the good ones, append them to
    `out` (chat JSONL with provenance). Returns {"out", "teacher", "tasks": {task: stats}, "total",
    "sampled_now"}; raises NothingKept when the file ends up with no sample at all."""
    settings.validate()
    if not problems:
        raise DataError("no problems to sample")
    verifiers = {task: verifier_for(task, settings.reward) for task in dict.fromkeys(p.task for p in problems)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done, stats, seen = _resume(out, teacher, settings, overwrite)
    pending = [p for p in dict((p.id, p) for p in problems).values() if p.id not in done]
    if done:
        log(f"{out}: {len(done)} problem(s) sampled earlier, {len(pending)} to go")
    per_call = max(1, settings.batch_size // settings.k)
    tok, model = teacher.tokenizer, teacher.model
    was_training = model.training
    model.eval()
    bar = progress_bar(len(pending) * settings.k, desc="sample")
    try:
        with open(out, "a") as f:
            for start in range(0, len(pending), per_call):
                chunk = pending[start: start + per_call]
                rows = [(p, j) for p in chunk for j in range(settings.k)]
                prompts = {p.id: render_prompt_ids(tok, question_text(p), settings.template) for p in chunk}
                params = [SamplingParams(settings.max_new_tokens, settings.temperature, settings.top_p,
                                         stop_token_ids=(tok.eos_id,), seed=row_seed(settings.seed, p.id, j))
                          for p, j in rows]
                completions = teacher.generate_fn(model, [prompts[p.id] for p, _ in rows], params)
                lines = []
                for (p, j), c in zip(rows, completions):
                    s = stats.setdefault(p.task, KeepStats())
                    text = tok.decode(c.token_ids, skip_special=True)
                    n_tokens = len(c.token_ids) - (c.finish_reason == "stop")
                    verdict, score, fmt = judge(text, n_tokens, p, verifiers[p.task], settings, seen)
                    s.sampled += 1
                    s.prompt_tokens += len(prompts[p.id])
                    s.completion_tokens += len(c.token_ids)
                    s.well_formed += fmt >= 1.0
                    s.correct += score >= settings.min_reward
                    s.correct_and_well_formed += verdict in ("kept", "too_long", "duplicate")
                    s.too_long += verdict == "too_long"
                    s.duplicates += verdict == "duplicate"
                    if verdict == "kept":
                        s.kept += 1
                        lines.append({"id": f"{p.id}/{j}", "messages": [
                            {"role": "user", "content": question_text(p)},
                            {"role": "assistant", "content": text.strip()}],
                            "provenance": {"teacher": teacher.identity, "prompt_id": p.id, "task": p.task,
                                           "sample": j, "reward": score, "format": fmt,
                                           "completion_tokens": n_tokens, "sampling": settings.recorded()}})
                for p in chunk:
                    s = stats.setdefault(p.task, KeepStats())
                    s.prompts += 1
                    s.prompts_with_kept += any(r["provenance"]["prompt_id"] == p.id for r in lines)
                    done.add(p.id)
                # samples first, then the stats that mark their problems done (see _resume)
                f.write("".join(json.dumps(r) + "\n" for r in lines))
                f.flush()
                os.fsync(f.fileno())
                _write_stats(out, teacher, settings, done, stats)
                bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    total = KeepStats()
    for s in stats.values():
        total.add(s)
    summary = {"out": str(out), "teacher": teacher.identity, "teacher_params": teacher.num_params,
               "sampled_now": len(pending) * settings.k,
               "tasks": {t: s.to_json() for t, s in stats.items()}, "total": total.to_json()}
    if total.kept == 0:
        raise NothingKept(f"no sample was kept, nothing to train on: {format_keep_stats(summary, one_line=True)}; "
                          "a stronger teacher, more problems, more samples (--k) or looser filters may help",
                          summary)
    return summary


def _write_stats(out: Path, teacher: Teacher, settings: SampleSettings, done: set[str],
                 stats: dict[str, KeepStats]) -> None:
    write_text_atomic(stats_path_for(out), json.dumps({
        "format": SAMPLES_FORMAT, "teacher": teacher.identity, "settings": settings.recorded(),
        "tasks": {t: s.to_json() for t, s in stats.items()}, "done": sorted(done)}) + "\n")


def format_keep_stats(summary: dict[str, Any], one_line: bool = False) -> str:
    """Keep statistics per task (and in total), as a table or one line."""
    rows = list(summary["tasks"].items()) + ([("total", summary["total"])] if len(summary["tasks"]) > 1 else [])
    if one_line:
        return "; ".join(f"{task or 'problems'}: {s['sampled']} sampled from {s['prompts']} prompts, "
                         f"{s['well_formed']} well-formed, {s['correct']} correct, {s['kept']} kept "
                         f"({100 * s['keep_rate']:.1f}%)" for task, s in rows)
    head = f"{'task':<12} {'prompts':>8} {'sampled':>8} {'formed':>7} {'correct':>8} {'long':>6} {'dupes':>6} {'kept':>7} {'rate':>7} {'prompts+':>8}"
    lines = [head, "-" * len(head)]
    for task, s in rows:
        lines.append(f"{task or 'problems':<12} {s['prompts']:>8} {s['sampled']:>8} {s['well_formed']:>7} "
                     f"{s['correct']:>8} {s['too_long']:>6} {s['duplicates']:>6} {s['kept']:>7} "
                     f"{100 * s['keep_rate']:>6.1f}% {s['prompts_with_kept']:>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- distillation
def build_student(tokenizer, preset: str | None = None, init: str | Path | None = None, seed: int = 0,
                  device: str | torch.device = "cpu"):
    """A student: the model in `init`, or a fresh `preset` sized to the tokenizer's vocabulary."""
    _check_student(preset, init)
    if init is not None:
        model = load_pretrained(str(init), device=device)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"student {init} has vocab_size {model.config.vocab_size}, the tokenizer "
                              f"{tokenizer.vocab_size} tokens")
        return model
    torch.manual_seed(seed)
    with torch.device(device):
        return Transformer(ModelConfig.from_name(preset, vocab_size=tokenizer.vocab_size))


def _check_student(preset: str | None, init: str | Path | None) -> None:
    if (preset is None) == (init is None):
        raise ConfigError("give exactly one student: a preset (--student-preset cpu) or a model "
                          "directory (--student-init DIR)")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown student preset {preset!r}; known: {', '.join(PRESETS)}")
    if init is not None and not (Path(init) / "config.json").is_file():
        raise CheckpointError(f"student {init}: no config.json there")


def distill(teacher_path: str | Path, out_dir: str | Path, problems: Sequence[Problem], *,
            student_preset: str | None = None, student_init: str | Path | None = None,
            tokenizer_dir: str | Path | None = None, teacher_tokenizer: str | Path | None = None,
            sample: SampleSettings | None = None, sft=None, eval_problems: dict[str, list[Problem]] | None = None,
            eval_settings=None, resume: bool = False, overwrite: bool = False, device: str = "cpu",
            fit_batch: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rejection-sample `problems` from the teacher into OUT/samples.jsonl, SFT the student on them
    (OUT/checkpoints, OUT/metrics.jsonl, OUT/final), then evaluate teacher, student before and
    student after on `eval_problems` (OUT/eval.json; skipped when None). Returns a summary.
    `fit_batch` lowers the SFT batch size when the kept samples fill fewer rows than one batch."""
    out = Path(out_dir)
    sample = sample or SampleSettings()
    sft = sft or SFTConfig()
    sft.validate()
    resume_point(out, resume)  # a run directory that holds a run needs --resume, before any sampling
    _check_student(student_preset, student_init)  # every check that can fail before the sampling
    tok_dir = first_tokenizer_dir([tokenizer_dir, student_init, resolve_teacher(teacher_path)[0]])
    if tok_dir is None:
        raise ConfigError("the student needs a seekling tokenizer (tokenizer.json): pass --tokenizer DIR")
    tokenizer = Tokenizer.load(tok_dir)
    teacher = load_teacher(teacher_path, teacher_tokenizer, device)
    log(f"teacher: {teacher.kind} model, {teacher.num_params / 1e6:.2f}M parameters, {teacher.path}")
    samples = rejection_sample(teacher, problems, out / "samples.jsonl", sample, overwrite=overwrite, log=log)
    log(format_keep_stats(samples))
    del teacher
    init_dir = out / "student_init"  # kept for the 'before' evaluation and for resuming
    if resume and (init_dir / "config.json").is_file():
        student = build_student(tokenizer, init=init_dir, device=device)
    else:
        student = build_student(tokenizer, student_preset, student_init, sft.seed, device)
        save_pretrained(student, str(init_dir), extra_files=tokenizer_files(tok_dir))
    if fit_batch:
        rows = SFTLoader(out / "samples.jsonl", tokenizer, 1, sft.seq_len, seed=sft.seed, pack=sft.pack).batches_in_epoch(0)
        if rows < sft.batch_size:
            log(f"the kept samples fill {rows} rows: SFT batch size lowered from {sft.batch_size} to {rows}")
            sft = dataclasses.replace(sft, batch_size=rows)
    log(f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters "
        f"({student_preset or student_init}), SFT for {sft.steps} steps on {samples['total']['kept']} samples")
    with on_device(device):
        sft_summary = train_sft(student, tokenizer, out / "samples.jsonl", sft, out, tokenizer_dir=tok_dir,
                                resume=resume, log=log)
    result = {"samples": samples, "sft": sft_summary, "sft_config": asdict(sft),
              "student": str(student_preset or student_init), "tokenizer": str(tok_dir)}
    if eval_problems:
        settings = eval_settings or EvalSettings()
        result["eval"] = evaluate_three(teacher_path, teacher_tokenizer, init_dir, out / "final", tokenizer,
                                        eval_problems, settings, device, log)
        write_json_atomic(out / "eval.json", result["eval"])
        log(format_comparison(result["eval"]))
    write_json_atomic(out / "distill.json", result, default=str)
    return result


def evaluate_three(teacher_path, teacher_tokenizer, before_dir, after_dir, tokenizer, problems, settings,
                   device="cpu", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Teacher, student before and student after SFT on the same problems with the same sampling."""
    out = {}
    for name in ("teacher", "student_before", "student_after"):
        if name == "teacher":
            t = load_teacher(teacher_path, teacher_tokenizer, device)
            model, tok, gen = t.model, t.tokenizer, t.generate_fn
        else:
            model = load_pretrained(str(before_dir if name == "student_before" else after_dir), device=device)
            tok, gen = tokenizer, generate
        log(f"evaluating the {name.replace('_', ' ')} on {sum(map(len, problems.values()))} problems, k={settings.k}")
        result = evaluate(model, tok, list(problems), **asdict(settings), problems=problems, generate_fn=gen)
        result["params"] = sum(p.numel() for p in model.parameters())
        out[name] = result
    return out


def format_comparison(evals: dict[str, Any]) -> str:
    """One line per (model, task): parameters, pass@1, pass@k, cons@k, format and mean length."""
    k = next(iter(evals.values()))["settings"]["k"]
    cols = ["pass@1"] + [f"pass@{k}"] * (k > 1) + [f"cons@{k}", "format"]
    head = f"{'model':<15} {'params':>8} {'task':<12} {'n':>5} " + " ".join(f"{c:>8}" for c in cols) + f" {'length':>7}"
    lines = [head, "-" * len(head)]
    for name, result in evals.items():
        for task, m in result["tasks"].items():
            cells = " ".join(f"{100 * m[c]:>7.1f}%" for c in cols)
            lines.append(f"{name.replace('_', ' '):<15} {result['params'] / 1e6:>7.2f}M {task or 'problems':<12} "
                         f"{m['n']:>5} {cells} {m['mean_length']:>7.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the speedrun's stage
def speedrun_stage(teacher_dir: str, tokenizer_dir: str, problems_path: str, out_dir: str, problems: int,
                   sample: SampleSettings, sft: SFTConfig, device: str | torch.device = "cpu", resume: bool = True, *,
                   student_init: str | None = None, student_preset: str | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """R1's stage 3 inside `seekling speedrun`: `sample.k` completions of the first `problems` problems of
    `problems_path` from the GRPO model, verified, then SFT of the student (`sft`), leaving OUT/final.

    The student defaults to the speedrun's pre-trained base (`out_dir/../pretrain/final`), as R1
    fine-tunes its base model on the rejection samples. Returns `tokens` and `flops` for the cost
    ledger, the keep statistics and a one-line `summary`. The speedrun evaluates OUT/final itself.
    """
    if student_init is None and student_preset is None:
        student_init = str(Path(out_dir).parent / "pretrain" / "final")
        if not (Path(student_init) / "config.json").is_file():
            raise ConfigError(f"no student: {student_init} does not exist; pass student_init or student_preset")
    try:
        result = distill(teacher_dir, out_dir, read_problems(problems_path, unique=True)[:problems], student_init=student_init,
                         student_preset=student_preset, tokenizer_dir=tokenizer_dir, sample=sample, sft=sft,
                         resume=resume, device=str(device), fit_batch=True, log=log)
    except NothingKept as e:  # a weak teacher: the run goes on, the report says why this stage is empty
        return {"skipped": f"no verified sample to train on ({format_keep_stats(e.summary, one_line=True)})",
                "keep_stats": e.summary["tasks"]}
    # FLOPs: a forward over prompt + completion of every sampled row, then 3x forward per SFT token
    total, trained = result["samples"]["total"], result["sft"]
    sample_tokens = total["prompt_tokens"] + total["completion_tokens"]
    teacher_dir, kind = resolve_teacher(teacher_dir)
    per_token = (forward_flops_per_token(ModelConfig.from_file(str(teacher_dir)), max(1, round(
        sample_tokens / max(total["sampled"], 1))), include_mtp=False)["total"]
                 if kind == "seekling" else 2.0 * result["samples"]["teacher_params"])
    sft_tokens = trained["step"] * result["sft_config"]["batch_size"] * sft.seq_len
    student = ModelConfig.from_file(str(Path(out_dir) / "final"))
    flops = sample_tokens * per_token + sft_tokens * flops_per_token(student, sft.seq_len, training=True)["total"]
    return {"tokens": sample_tokens + sft_tokens, "flops": flops, "kept": total["kept"], "sampled": total["sampled"],
            "keep_rate": total["keep_rate"], "keep_stats": result["samples"]["tasks"], "final_loss": trained["loss"],
            "sft_batch_size": result["sft_config"]["batch_size"],
            "student": student_init or student_preset,
            "summary": f"kept {total['kept']}/{total['sampled']} samples ({100 * total['keep_rate']:.1f}%), "
                       f"SFT loss {trained['loss']:.3f} after {trained['step']} steps"}
