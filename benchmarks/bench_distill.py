"""The distillation effect on a CPU: does SFT on a GRPO teacher's verified samples beat SFT on cold-start data?

The teacher is the GRPO-trained `cpu-large` model of benchmarks/bench_grpo.py (GRPO_WORK/grpo/final; run
that benchmark first, or pass --make-teacher to run it). The student is the smaller `cpu`
preset, pre-trained on the teacher's pre-training corpus. Each stage is cached in --work:

    0. inputs       GRPO_WORK/{grpo/final,tok,data,cold.jsonl} copied into WORK/inputs (frozen for reruns)
    1. student      pre-train `cpu` with the teacher's tokenizer, as many steps as the teacher, on the
                    general corpus (arithmetic, linear, wordproblem: not the RL task, as R1's students never
                    saw R1's RL data) or, with --student-corpus teacher, on the teacher's own shards
    2. sample       rejection sampling from the teacher on --num-problems train problems, --k each
                    (seekling.distill.rejection_sample: well-formed and verified correct, deduplicated)
    3. distilled    the student after --sft-steps of SFT on the kept samples
    4. cold         the same student after the same SFT steps on the cold-start data alone
                    (GRPO_WORK/cold.jsonl, what the teacher's own cold start used)
    5. cold_matched control: the same again on as many cold-start conversations as samples were kept
    6. eval         pass@1 over k samples (temperature 0.6, top-p 0.95) on >= 500 held-out problems
                    of teacher, pre-trained student, distilled, cold, cold_matched

Pass criterion of issue 5: distilled pass@1 >= cold pass@1 + 5 points, on >= 500 problems, k >= 4.
Writes WORK/result.json and prints the table.

    .venv/bin/python benchmarks/bench_distill.py                      # ~15 min on one core after bench_grpo
    .venv/bin/python benchmarks/bench_distill.py --redo distilled     # SFT + evals again
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seekling.checkpoint import load_pretrained  # noqa: E402
from seekling.data import build_token_shards  # noqa: E402
from seekling.distill import NothingKept, SampleSettings, format_keep_stats, load_teacher, rejection_sample  # noqa: E402
from seekling.evaluate import evaluate  # noqa: E402
from seekling.pretrain import PretrainArgs, pretrain  # noqa: E402
from seekling.sft import SFTConfig, make_cold_start, train_sft  # noqa: E402
from seekling.teachers import weights_fingerprint  # noqa: E402
from seekling.tasks import make_problems, parse_difficulty  # noqa: E402
from seekling.tokenizer import Tokenizer  # noqa: E402

STAGES = ["student", "sample", "distilled", "cold", "cold_matched", "eval"]
MODELS = ["teacher", "student", "distilled", "cold", "cold_matched"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench_distill", help="directory for every stage's output")
    p.add_argument("--grpo-work", default="runs/bench_grpo", help="bench_grpo.py's --work: teacher, tokenizer, data")
    p.add_argument("--make-teacher", action="store_true", help="run bench_grpo.py first when its teacher is missing")
    p.add_argument("--redo", default="", help=f"comma-separated stages to redo (and all after): {','.join(STAGES)}; "
                   "redoing 'student' also copies the teacher's pipeline from --grpo-work again")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the cores are shared)")
    p.add_argument("--task", default="countdown", help="the task (the teacher's RL task)")
    p.add_argument("--difficulty", nargs="*", default=["countdown.count=3", "countdown.max_number=15",
                                                       "countdown.max_target=50"],
                   metavar="TASK.SETTING=VALUE", help="difficulty (the same as bench_grpo's)")
    p.add_argument("--student-preset", default="cpu", help="the student's model preset")
    p.add_argument("--student-corpus", default="general", choices=["general", "teacher"],
                   help="pre-train the student on --student-pretrain-tasks (general) or on the teacher's own shards")
    p.add_argument("--student-pretrain-tasks", default="arithmetic,linear,wordproblem",
                   help="tasks of the general corpus: the reasoning tasks without the RL task, as R1's students "
                        "never saw R1's RL data")
    p.add_argument("--pretrain-examples", type=int, default=20000, help="problems per task of the general corpus")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="student pre-training steps of 16 x 128 tokens (0: as many as the teacher's, else 300)")
    p.add_argument("--num-problems", type=int, default=4000, help="train problems sampled from the teacher")
    p.add_argument("--k", type=int, default=4, help="teacher samples per problem")
    p.add_argument("--temperature", type=float, default=0.6, help="teacher sampling temperature")
    p.add_argument("--sft-steps", type=int, default=150, help="SFT steps, the same for every student")
    p.add_argument("--sft-batch-size", type=int, default=16, help="SFT rows of 256 tokens per step")
    p.add_argument("--sft-lr", type=float, default=5e-4, help="SFT peak learning rate")
    p.add_argument("--eval-n", type=int, default=500, help="held-out problems")
    p.add_argument("--eval-k", type=int, default=4, help="samples per held-out problem")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion budget (sampling and evaluation)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work, grpo_work = Path(args.work), Path(args.grpo_work)
    work.mkdir(parents=True, exist_ok=True)
    redo = {s for s in args.redo.split(",") if s}
    if redo - set(STAGES):
        raise SystemExit(f"unknown stage(s) {sorted(redo - set(STAGES))}; stages: {', '.join(STAGES)}")
    first_redo = min((STAGES.index(s) for s in redo), default=len(STAGES))
    difficulty = parse_difficulty(args.difficulty)
    task_difficulty = difficulty.get(args.task, {})
    # The teacher's pipeline is copied into WORK/inputs once: bench_grpo may be rerun meanwhile.
    inputs = work / "inputs"
    if not (inputs / "grpo_final" / "model.safetensors").is_file() or "student" in redo:
        if not (grpo_work / "grpo" / "final" / "model.safetensors").is_file():
            if not args.make_teacher:
                raise SystemExit(f"no teacher at {grpo_work}/grpo/final: run benchmarks/bench_grpo.py --work "
                                 f"{grpo_work} first, or pass --make-teacher")
            import bench_grpo  # noqa: PLC0415 - the sibling benchmark builds the whole teacher pipeline

            bench_grpo.main(["--work", str(grpo_work)])
        shutil.rmtree(inputs, ignore_errors=True)
        for src, dst in (("grpo/final", "grpo_final"), ("tok", "tok"), ("data", "data"), ("cold.jsonl", "cold.jsonl"),
                         ("eval_after.json", "teacher_eval_bench_grpo.json"), ("pretrain/summary.json", "pretrain.json")):
            if (grpo_work / src).is_dir():
                shutil.copytree(grpo_work / src, inputs / dst)
            elif (grpo_work / src).is_file():
                shutil.copy(grpo_work / src, inputs / dst)
    teacher_dir, tok_dir = inputs / "grpo_final", inputs / "tok"
    tokenizer = Tokenizer.load(tok_dir)
    timings: dict[str, float] = {}

    def stage(name: str, marker: Path, fn, label: str | None = None) -> None:
        """Run `fn` unless `marker` exists and neither stage `name` nor an earlier one is redone."""
        if marker.exists() and STAGES.index(name) < first_redo:
            return
        t0 = time.perf_counter()
        fn()
        timings[label or name] = round(time.perf_counter() - t0, 1)
        print(f"[{label or name}] {timings[label or name]:.0f}s", flush=True)

    # 1. the student: the smaller preset, pre-trained like the teacher was
    student_dir = work / "student"

    def pretrain_student() -> None:
        shutil.rmtree(student_dir, ignore_errors=True)
        data_dir = inputs / "data"
        if args.student_corpus == "general":
            data_dir = work / "student_data"
            shutil.rmtree(data_dir, ignore_errors=True)
            build_token_shards(data_dir, tokenizer, tasks=[t for t in args.student_pretrain_tasks.split(",") if t],
                               num_examples=args.pretrain_examples, val_fraction=0.05, seed=0)
        teacher_steps = json.loads((inputs / "pretrain.json").read_text())["steps"] if (inputs / "pretrain.json").is_file() else 300
        pretrain(PretrainArgs(data=str(data_dir), out=str(student_dir), tokenizer=str(tok_dir),
                              preset=args.student_preset, vocab_size=tokenizer.vocab_size,
                              steps=args.pretrain_steps or teacher_steps,
                              batch_size=16, seq_len=128, lr=2e-3, warmup=30, eval_every=100, save_every=10_000,
                              quiet=True))

    stage("student", student_dir / "final" / "model.safetensors", pretrain_student)

    # 2. rejection sampling from the teacher
    samples = work / "samples.jsonl"

    def sample() -> None:
        problems = make_problems(args.task, "train", args.num_problems, 1, **task_difficulty)
        settings = SampleSettings(k=args.k, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                  batch_size=512)
        try:
            summary = rejection_sample(load_teacher(teacher_dir), problems, samples, settings, overwrite=True)
        except NothingKept as e:
            raise SystemExit(f"{e}\n{format_keep_stats(e.summary)}") from None
        (work / "sample_summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    stage("sample", work / "sample_summary.json", sample)
    keep = json.loads((work / "sample_summary.json").read_text())
    print(format_keep_stats(keep), flush=True)
    kept = keep["total"]["kept"]

    # 3-5. the same student, the same SFT steps, three data sets
    cfg = dict(seq_len=256, batch_size=args.sft_batch_size, steps=args.sft_steps, lr=args.sft_lr, warmup_steps=10, save_every=0,
               log_every=25)
    matched = work / "cold_matched.jsonl"
    data = {"distilled": samples, "cold": inputs / "cold.jsonl", "cold_matched": matched}
    for name in ("distilled", "cold", "cold_matched"):
        def run_sft(name=name) -> None:
            if name == "cold_matched":
                make_cold_start([args.task], kept, matched, seed=2, difficulty=difficulty)
            shutil.rmtree(work / name, ignore_errors=True)
            model = load_pretrained(str(student_dir / "final"))
            summary = train_sft(model, tokenizer, data[name], SFTConfig(**cfg), work / name, tokenizer_dir=tok_dir)
            print(f"{name}: SFT loss {summary['loss']:.3f} after {summary['step']} steps", flush=True)

        stage(name, work / name / "final" / "model.safetensors", run_sft)

    # 6. held-out evaluation, the same problems and sampling for every model
    eval_problems = make_problems(args.task, "test", args.eval_n, 0, **task_difficulty)
    dirs = {"teacher": teacher_dir, "student": student_dir / "final", "distilled": work / "distilled" / "final",
            "cold": work / "cold" / "final", "cold_matched": work / "cold_matched" / "final"}
    evals = {}
    for name in MODELS:
        path = work / f"eval_{name}.json"

        def run_eval(name=name, path=path) -> None:
            model = load_pretrained(str(dirs[name]))
            result = evaluate(model, tokenizer, [args.task], k=args.eval_k, max_new_tokens=args.max_new_tokens,
                              problems={args.task: eval_problems}, keep_samples=3, batch_size=512)
            result["params"] = sum(p.numel() for p in model.parameters())
            path.write_text(json.dumps(result, indent=2) + "\n")

        stage("eval", path, run_eval, label=f"eval_{name}")
        evals[name] = json.loads(path.read_text())

    k = args.eval_k
    head = f"{'model':<13} {'params':>8} {'pass@1':>8} {f'pass@{k}':>8} {f'cons@{k}':>8} {'format':>8} {'length':>7}"
    print(head + "\n" + "-" * len(head))
    for name in MODELS:
        m = evals[name]["tasks"][args.task]
        print(f"{name:<13} {evals[name]['params'] / 1e6:>7.2f}M {100 * m['pass@1']:>7.1f}% {100 * m[f'pass@{k}']:>7.1f}% "
              f"{100 * m[f'cons@{k}']:>7.1f}% {100 * m['format']:>7.1f}% {m['mean_length']:>7.1f}")
    pass1 = {name: evals[name]["tasks"][args.task]["pass@1"] for name in MODELS}
    gain = round(100 * (pass1["distilled"] - pass1["cold"]), 2)
    result = {"task": args.task, "difficulty": difficulty, "student_corpus": args.student_corpus, "eval_n": args.eval_n, "k": k, "pass@1": pass1,
              "gain_over_cold_points": gain,
              "gain_over_cold_matched_points": round(100 * (pass1["distilled"] - pass1["cold_matched"]), 2),
              "keep_rate": keep["total"]["keep_rate"], "kept": kept, "sampled": keep["total"]["sampled"],
              "cold_start_conversations": sum(1 for _ in open(data["cold"])), "sft_steps": args.sft_steps,
              "teacher_fingerprint": weights_fingerprint(teacher_dir), "stage_seconds": timings, "args": vars(args),
              "load_average": _load()}
    result["pass"] = gain >= 5 and args.eval_n >= 500 and k >= 4
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nkeep rate {100 * result['keep_rate']:.1f}% ({kept}/{result['sampled']}); student pass@1: distilled "
          f"{100 * pass1['distilled']:.1f}% vs cold-start only {100 * pass1['cold']:.1f}% ({gain:+.1f} points; "
          f"{result['gain_over_cold_matched_points']:+.1f} vs {kept} cold-start conversations): "
          f"{'PASS' if result['pass'] else 'FAIL'}")
    return 0 if result["pass"] else 1


def _load() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
