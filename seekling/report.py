"""The report card of a speedrun: report.md and a self-contained report.html (plots embedded as base64).

Everything comes from the run directory that `seekling.speedrun` filled: state.json (stages, their
times, tokens and FLOPs, the environment), the trainers' metrics.jsonl files, pretrain/expert_load.json
and eval/*.json. The cost table is a `seekling.cost.CostLedger` rebuilt from the stages' records.
Plots are PNGs (matplotlib, Agg backend) in RUN_DIR/plots/; without matplotlib the report says so.

    python -m seekling.report runs/speedrun-cpu     # (re)write the report of a run directory
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from seekling import __version__
from seekling.cost import CostLedger, cpu_model, format_count, format_dollars, format_hours, format_seconds
from seekling.rl_health import health_mean, health_summary
from seekling.errors import DataError

MODEL_STAGES = (("pretrain", "after pre-training"), ("sft", "after cold-start SFT"), ("grpo", "after GRPO"),
                ("distill", "after distillation"))
PLOTS = ("pretrain_loss.png", "grpo.png", "expert_load.png", "pass_at_1.png")
WIDE_PLOTS = ("grpo.png",)  # three panels side by side: shown at the page's full width, not the text's


# ----------------------------------------------------------------------------- environment
def git_commit() -> str | None:
    """The seekling source's git commit (with -dirty when files differ from it), or None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) if commit else None


def environment() -> dict[str, Any]:
    env = {"seekling": __version__, "commit": git_commit(), "torch": torch.__version__,
           "python": platform.python_version(), "platform": platform.platform(terse=True), "cpu": cpu_model(),
           "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
           "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if hasattr(os, "getloadavg"):
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return env


# ----------------------------------------------------------------------------- reading a run
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a missing file is empty and a torn last line is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():  # a garbled line is skipped like a torn one
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_json(path: Path) -> Any:
    """The JSON in `path` (None when there is no such file); a DataError naming a damaged file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: damaged, not valid JSON ({e})") from None


def _read_record(path: Path, valid: Callable[[dict], bool], what: str) -> dict[str, Any] | None:
    """The JSON object in `path` (None when there is no such file); a DataError naming it, as `what`, when
    `valid` says it is not one."""
    data = read_json(path)
    if data is not None and not (isinstance(data, dict) and valid(data)):
        raise DataError(f"{path}: damaged, not {what}")
    return data


def read_eval(path: Path) -> dict[str, Any] | None:
    """An eval/STAGE.json with the numbers the report shows; a DataError naming it when they are not there."""
    return _read_record(path, lambda d: isinstance(d.get("mean"), dict) and isinstance(d.get("tasks"), dict)
                        and isinstance(d.get("settings"), dict) and "pass@1" in d["mean"],
                        "an evaluation result (no settings, tasks and mean pass@1)")


def read_expert_load(path: Path) -> dict[str, Any] | None:
    """pretrain/expert_load.json; a DataError naming it when its steps and loads do not line up."""
    return _read_record(path, lambda d: isinstance(d.get("steps"), list) and isinstance(d.get("load"), list)
                        and len(d["steps"]) == len(d["load"]) and isinstance(d.get("layers"), list)
                        and isinstance(d.get("source"), str) and isinstance(d.get("tokens_per_checkpoint"), int),
                        "an expert-load record (steps, load, layers, source, tokens)")


def build_ledger(state: dict[str, Any]):
    """The run's CostLedger, one row per costed stage, in the order the stages ran."""
    ledger = CostLedger()
    for name, stage in state["stages"].items():
        c = stage.get("cost")
        if c:
            ledger.record(name, c["seconds"], c["flops"], c["tokens"], devices=c["devices"], device=c["device"],
                          dtype=c["dtype"])
    return ledger


# ----------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, path: Path, tight: bool = True) -> bool:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_pretrain_loss(metrics: list[dict], path: Path, tokens_per_step: int | None = None) -> bool:
    plt = _pyplot()
    rows = [r for r in metrics if "loss" in r]
    if plt is None or not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], lw=1, color="tab:blue", alpha=0.8, label="train loss (next token)")
    if any(r.get("mtp_loss") for r in rows):
        ax.plot(steps, [r.get("mtp_loss") for r in rows], lw=1, color="tab:orange", alpha=0.6,
                label="train MTP loss (token after next)")
    val = [(r["step"], r["val_loss"]) for r in metrics if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", color="tab:red", ms=4, label="validation loss (next token)")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.set_yscale("log")  # plain numbers at round values, not 6 x 10^0 and crowded minor labels
    ax.yaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10]))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("optimiser step" + (f" ({tokens_per_step:,} tokens each)" if tokens_per_step else ""))
    ax.set_ylabel("cross-entropy (nats/token, log scale)")
    ax.set_title("Pre-training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(plt, fig, path)


def plot_grpo(metrics: list[dict], path: Path) -> bool:
    plt = _pyplot()
    rows = [r for r in metrics if "reward" in r]
    if plt is None or not rows:
        return False
    steps = [r["step"] for r in rows]
    window = max(1, len(rows) // 10)
    panels = (("reward", "mean reward (correct + 0.2 format)", "reward", None),
              ("accuracy", "accuracy of the sampled answers", "share correct", (0, 1.05)),
              ("response_length", "mean response length", "tokens", None))
    from matplotlib.ticker import MaxNLocator

    # drawn for the page's full width (WIDE_PLOTS): fonts sized to stay readable there
    plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 10})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (key, title, ylabel, ylim) in zip(axes, panels):
        values = [r.get(key, float("nan")) for r in rows]
        if window > 1:
            ax.plot(steps, values, lw=1, alpha=0.35, color="tab:blue", label="per step")
            ax.plot(steps, _smooth(values, window), lw=2, color="tab:blue", label=f"moving mean of {window} steps")
        else:
            ax.plot(steps, values, "o-", lw=2, color="tab:blue", label="per step")
        if key == "accuracy" and any("format" in r for r in rows):
            ax.plot(steps, _smooth([r.get("format", float("nan")) for r in rows], window), lw=2,
                    color="tab:green", label="format rate" + (" (moving mean)" if window > 1 else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("GRPO training (rollouts at temperature 1)", fontsize=14)
    _save(plt, fig, path)
    plt.rcdefaults()
    return True


def plot_expert_load(loads: dict[str, Any] | None, metrics: list[dict], path: Path) -> bool:
    """One heatmap per MoE layer (expert x checkpoint, load / mean load) over the imbalance per step."""
    plt = _pyplot()
    if plt is None or not loads or not loads.get("steps"):
        return False
    from matplotlib.colors import TwoSlopeNorm

    steps, load = loads["steps"], loads["load"]  # load [checkpoint][layer][expert]
    n_layers = len(load[0])
    share = [[[e / max(sum(layer) / len(layer), 1e-9) for e in layer] for layer in ckpt] for ckpt in load]
    vmax = max(2.0, max(v for ckpt in share for layer in ckpt for v in layer))
    imbalance = [(r["step"], r["expert_imbalance"]) for r in metrics if r.get("expert_imbalance") is not None]
    n_rows = n_layers + (1 if imbalance else 0)
    fig, axes = plt.subplots(n_rows, 1, figsize=(7.5, 2.4 * n_layers + (2.4 if imbalance else 0) + 0.6),
                             squeeze=False, layout="constrained")
    image = None
    for layer in range(n_layers):
        ax = axes[layer][0]
        grid = [[share[c][layer][e] for c in range(len(steps))] for e in range(len(share[0][layer]))]
        image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0, vcenter=1, vmax=vmax),
                          interpolation="nearest")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps])
        ax.set_ylabel("expert")
        name = f"decoder layer {loads['layers'][layer]} (MoE)" if "layers" in loads else f"MoE layer {layer + 1}"
        ax.set_title(f"{name}: tokens per expert / mean (1 = balanced)", fontsize=10)
    axes[n_layers - 1][0].set_xlabel("pre-training step of the checkpoint")
    fig.colorbar(image, ax=[axes[i][0] for i in range(n_layers)], label="load / mean load")
    if imbalance:
        ax = axes[-1][0]
        ax.plot(*zip(*imbalance), lw=1, color="tab:purple")
        ax.set_xlabel("pre-training step")
        ax.set_ylabel("max / mean load")
        ax.set_title("imbalance per training batch (mean over layers, from metrics.jsonl)", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("Per-expert load during pre-training (aux-loss-free balancing)")
    return _save(plt, fig, path, tight=False)  # a constrained layout already


def plot_pass_at_1(evals: dict[str, dict], path: Path) -> bool:
    plt = _pyplot()
    stages = [(label, evals[name]["mean"], evals[name]["settings"]["k"]) for name, label in MODEL_STAGES
              if name in evals]
    if plt is None or not stages:
        return False
    k = stages[0][2]
    series = (("pass@1", "pass@1", "tab:blue"), (f"cons@{k}", f"cons@{k} (majority vote)", "tab:orange"),
              ("format", "format rate", "tab:green"))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for j, (key, label, color) in enumerate(series):
        xs = [i + (j - 1) * width for i in range(len(stages))]
        values = [100 * m[key] for _, m, _ in stages]
        bars = ax.bar(xs, values, width, label=label, color=color)
        ax.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(stages)), [label for label, _, _ in stages])
    ax.set_ylim(0, 119)
    ax.set_ylabel("% of held-out problems")
    ax.set_title("Held-out accuracy by stage")
    ax.set_yticks(range(0, 101, 20))
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


# ----------------------------------------------------------------------------- the document
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


HEALTH_SIGNALS = (("entropy", "policy entropy (nats/token)"), ("clip_fraction", "clip fraction"),
                  ("kl", "KL to the starting policy"), ("zero_variance_groups", "groups with equal rewards"),
                  ("truncated", "truncated at the cap"), ("response_length", "mean length (tokens)"))


def health_blocks(records: list[dict]) -> list[tuple]:
    """The "GRPO health" section: the signals at the first and last step, and `seekling.rl_health`'s
    warnings (none: a line that says so); nothing before GRPO has run."""
    if not records:
        return []
    health = health_summary(records)
    first, last = records[0], records[-1]
    keys = list(HEALTH_SIGNALS) + [(k, f"reward `{k.split('/', 1)[1]}` (mean)") for k in last if k.startswith("reward/")]
    shown = lambda r, k: f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "-"  # noqa: E731
    means = {k: health_mean(records, k) for k, _ in keys}  # skipped steps have no entropy, clip or KL
    blocks: list[tuple] = [("h2", "GRPO health"),
                           ("table", ["signal", f"step {first.get('step', 1)}", f"step {last.get('step', len(records))}",
                                      "mean of the steps that have it"],
                            [[label, shown(first, k), shown(last, k), shown(means, k)] for k, label in keys])]
    trained = f"{health['trained_steps']} of {health['steps']} steps updated the model."
    if not health["trained_steps"]:
        trained = f"**Nothing was trained**: none of the {health['steps']} steps updated the model."
    if health["warnings"]:
        blocks.append(("p", trained + " Warnings:"))
        blocks.append(("ul", [f"step {w['step']}, {w['signal']}: {w['message']}" for w in health["warnings"]]))
    else:
        blocks.append(("p", trained + " No warnings: no signal stayed bad (`seekling.rl_health`)."))
    return blocks


def report_blocks(run_dir: Path, plots_made: dict[str, bool]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p"|"pre", text), ("table", header, rows), ("img", file, alt)."""
    state = json.loads((run_dir / "state.json").read_text())
    config, stages = state["config"], state["stages"]
    evals = {name: read_eval(run_dir / "eval" / f"{name}.json") for name, _ in MODEL_STAGES}
    evals = {k: v for k, v in evals.items() if v}
    blocks: list[tuple] = [("h1", f"seekling speedrun report: preset `{state['preset']}`")]
    k = config["eval_k"]
    task = config["rl_task"]
    if "sft" in evals and "grpo" in evals:
        before, after = evals["sft"]["mean"]["pass@1"], evals["grpo"]["mean"]["pass@1"]
        blocks.append(("p", f"Held-out {task} pass@1 went from **{_pct(before)}** after cold-start SFT to "
                            f"**{_pct(after)}** after GRPO ({100 * (after - before):+.1f} points), "
                            f"{config['eval_n']} problems x {k} samples each at temperature 0.6."))
    ledger = build_ledger(state)
    totals = ledger.totals()
    blocks.append(("p", f"Wall time of the stages: **{format_seconds(totals['seconds'])}**; "
                        f"{format_count(totals['tokens'])} tokens, {totals['flops']:.3g} FLOPs, "
                        f"{format_hours(totals['device_hours'])} device-hours, {format_dollars(totals['dollars'])}."))

    env = state["environment"]
    blocks.append(("h2", "Environment"))
    gpu = f"{env['gpus']} x {env['gpu']}" if env.get("gpu") else "none"
    load = env.get("load_average")
    blocks.append(("table", ["", "this run"], [
        ["seekling", f"{env['seekling']} (commit {env['commit'] or 'unknown'})"],
        ["torch / python", f"{env['torch']} / {env['python']}"],
        ["hardware", f"{env['cpu']}, {env['cpu_cores']} cores; GPU: {gpu}"],
        ["torch threads / ranks", f"{env['torch_threads']} / {env.get('world_size', 1)}"],
        ["load average at start", ", ".join(map(str, load)) + " (1, 5, 15 min)" if load else "-"],
        ["platform", env["platform"]]]))
    if env.get("commit") != git_commit():
        blocks.append(("p", f"Note: the run started at commit {env.get('commit')}; this report was written at "
                            f"{git_commit()}."))

    blocks.append(("h2", "Results (held-out problems)"))
    rows = []
    for name, label in MODEL_STAGES:
        if name in evals:
            m = evals[name]["mean"]
            acceptance = evals[name].get("mtp_acceptance")
            rows.append([label, _pct(m["pass@1"]), _pct(m[f"cons@{k}"]), _pct(m["format"]),
                         f"{m['mean_length']:.1f}", "-" if acceptance is None else _pct(acceptance)])
        elif "skipped" in stages.get(name, {}):
            rows.append([label, "skipped (see Notes)", "", "", "", ""])
        else:
            rows.append([label, "not run yet", "", "", "", ""])
    blocks.append(("table", ["model", "pass@1", f"cons@{k}", "format", "mean length (tokens)",
                             "MTP acceptance"], rows))
    blocks.append(("p", f"Task `{task}` ({', '.join(config['difficulty']) or 'default difficulty'}), test split: "
                        f"{config['eval_n']} problems, k = {k} samples each (temperature 0.6, top-p 0.95, "
                        f"at most {config['max_new_tokens']} new tokens). pass@1 is the mean correctness of the "
                        f"samples, cons@{k} grades the majority answer, format is the share of samples written as "
                        "`<think> ... </think> <answer> ... </answer>`. MTP acceptance is the share of the MTP "
                        "module's drafts the model accepts in speculative decoding at these settings (first 16 "
                        "problems): how much the module kept up with each stage's training."))

    blocks += health_blocks(read_jsonl(run_dir / "grpo" / "metrics.jsonl"))

    blocks.append(("h2", "Cost per stage"))
    cost_rows = [[s.stage, f"{s.devices} x {s.device} ({s.dtype})", format_seconds(s.seconds),
                  format_count(s.tokens), f"{s.flops:.3g}", f"{s.mfu:.1%}" if s.flops else "-",
                  format_hours(s.device_hours), format_dollars(s.dollars)] for s in ledger.stages]
    cost_rows.append(["**total**", "", format_seconds(totals["seconds"]), format_count(totals["tokens"]),
                      f"{totals['flops']:.3g}", "", format_hours(totals["device_hours"]),
                      format_dollars(totals["dollars"])])
    blocks.append(("table", ["stage", "devices", "wall", "tokens", "FLOPs", "MFU", "device-hours", "cost"],
                   cost_rows))
    blocks.append(("p", "Tokens are those the model processed (training tokens; prompt + completion tokens for "
                        "sampling). FLOPs count matrix multiplications (`seekling.flops`: training = 3 x forward); "
                        "GRPO's and evaluation's come from mean lengths, so they are estimates. On a CPU one device "
                        "is one core (a torch thread) and MFU is against its measured matmul peak "
                        "(`seekling.cost`). A resumed stage's row counts only its last attempt."))

    # alt text only: each figure carries its own title, so a caption under it would say it twice
    captions = {"pretrain_loss.png": "Pre-training loss", "grpo.png": "GRPO reward, accuracy and length per step",
                "expert_load.png": "Per-expert load over pre-training", "pass_at_1.png": "pass@1 by stage"}
    blocks.append(("h2", "Plots"))
    for name in PLOTS:
        if plots_made.get(name):
            blocks.append(("img", f"plots/{name}", captions[name]))
    if not any(plots_made.values()):
        blocks.append(("p", "No plots: matplotlib is not installed (`pip install matplotlib`)."))

    stage = next((n for n in ("grpo", "sft", "pretrain") if n in evals), None)
    samples = evals[stage]["tasks"][task].get("samples") or [] if stage else []
    if samples:
        label = dict(MODEL_STAGES)[stage]
        blocks.append(("h2", f"Held-out problems {label}"))
        lines = []
        for s in samples:
            lines.append(f"{s['prompt']}   (answer {s['answer']}; {sum(s['correct'])} of {len(s['correct'])} "
                         "samples correct)")
            shown = {ok: c for c, ok in zip(s["completions"], s["correct"])}  # one right and one wrong, if any
            lines += [f"  {'right' if ok else 'wrong'}: {c}" for ok, c in sorted(shown.items(), reverse=True)]
        blocks.append(("pre", "\n".join(lines)))

    blocks += distill_blocks(stages.get("distill", {}))
    notes = [f"{name}: skipped ({s['skipped']})" for name, s in stages.items() if "skipped" in s]
    notes += [f"{name}: resumed from step {s['resumed_from_step']}" for name, s in stages.items()
              if s.get("resumed_from_step")]
    notes += [f"pretrain: resumed from {stages['pretrain']['resumed_from']}"] if stages.get("pretrain", {}).get(
        "resumed_from") else []
    if stages.get("grpo", {}).get("time_capped"):
        notes.append(f"grpo: stopped by the {config['grpo_max_minutes']}-minute cap at step {stages['grpo']['steps']}")
    loads = read_expert_load(run_dir / "pretrain" / "expert_load.json")
    if loads:
        notes.append(f"per-expert loads are {loads['source']} ({loads['tokens_per_checkpoint']:,} tokens each): "
                     "pre-training's metrics.jsonl records only the max/mean imbalance per step")
    if notes:
        blocks.append(("h2", "Notes"))
        blocks.append(("ul", notes))
    blocks += next_steps(run_dir, state)
    settings = [(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in config.items()
                if k not in ("name", "about")]
    half = (len(settings) + 1) // 2  # two setting/value column pairs: half the length of one long table
    pairs = [[*settings[i], *(settings[i + half] if i + half < len(settings) else ("", ""))] for i in range(half)]
    blocks.append(("h2", "Settings"))
    blocks.append(("p", f"The `{state['preset']}` preset as this run used it (`seekling speedrun --list`; "
                        "`--set FIELD=VALUE` changes one, in a new run directory)."))
    blocks.append(("table", ["setting", "value", "setting", "value"], [[f"`{a}`", b, f"`{c}`" if c else "", d]
                                                                       for a, b, c, d in pairs]))
    return blocks


def distill_blocks(stage: dict[str, Any]) -> list[tuple]:
    """The rejection-sampling funnel of the distillation stage: what was sampled, and what was kept."""
    keep = stage.get("keep_stats") or {}
    if not keep:
        return []
    rows = [[task or "problems", f"{s['prompts']:,}", f"{s['sampled']:,}", f"{s['well_formed']:,}", f"{s['correct']:,}",
             f"{s['too_long']:,}", f"{s['duplicates']:,}", f"**{s['kept']:,}**", _pct(s["keep_rate"]),
             f"{s['prompts_with_kept']:,}"] for task, s in keep.items()]
    return [("h2", "Distillation data"),
            ("table", ["task", "prompts", "sampled", "well-formed", "correct", "too long", "duplicates", "kept",
                       "keep rate", "prompts with a kept sample"], rows),
            ("p", "Rejection sampling of the GRPO model: a sample is kept when it is well formed, correct, fits the "
                  "SFT length and is not a duplicate; the pre-trained base is then fine-tuned on the kept ones.")]


def next_steps(run_dir: Path, state: dict[str, Any]) -> list[tuple]:
    """Which model to talk to (the best evaluated stage, which `chat`, `serve` and `eval` load from the
    run directory) and what to run next."""
    from seekling.checkpoint import best_evaluated_stage

    best = best_evaluated_stage(run_dir)
    if best is None:
        return []
    stage, score, _ = best
    run = str(run_dir)
    task = state["config"]["rl_task"]
    commands = [(f"seekling chat {run}", "talk to it in the terminal"),
                (f"seekling serve {run}", "OpenAI-compatible API and a chat page on :8000"),
                (f"seekling eval {run} --n 500 --k 8", f"a larger held-out evaluation of {task}"),
                (f"seekling eval {run} --tasks gsm8k --n 50", "a published set (expect ~0% from a model this small)"),
                (f"seekling grpo --init-from {run}/{stage}/final --tasks {task} --steps 200 --out runs/more-grpo",
                 "more GRPO from the best model"),
                (f"seekling speedrun --preset {state['preset']} --set grpo_steps=400 --out runs/longer-grpo",
                 "the whole run again, with more GRPO")]
    width = max((len(c) for c, _ in commands if len(c) <= 60), default=0)
    return [("h2", "Next steps"),
            ("p", f"The best model of this run is **{stage}** ({_pct(score)} held-out pass@1); `chat`, `generate`, "
                  f"`serve` and `eval` load it when given the run directory (give `{run}/STAGE/final` for another). "
                  f"It was trained on `{task}` problems only: ask it those, worded as they are above."),
            ("pre", "\n".join(f"{command:<{width}}  # {why}" for command, why in commands))]


def _inline_md_to_html(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}")
        elif kind == "h2":
            out.append(f"## {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "pre":
            out.append("```\n" + block[1] + "\n```")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


HTML_STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
              "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;"
              "text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1rem 0}"
              "pre{background:#f6f6f6;padding:.8rem;overflow-x:auto;white-space:pre-wrap}code{background:#f3f3f3}"
              "figure{margin:1rem 0}figure.wide{width:min(96vw,1430px);position:relative;left:50%;"
              "transform:translateX(-50%)}figure.wide img{width:100%;max-width:none}")


def to_html(blocks: list[tuple], run_dir: Path) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{_inline_md_to_html(block[1])}</{kind}>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_md_to_html(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode((run_dir / block[1]).read_bytes()).decode()
            wide = ' class="wide"' if Path(block[1]).name in WIDE_PLOTS else ""
            body.append(f'<figure{wide}><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}"></figure>')
        elif kind == "table":
            head = "".join(f"<th>{_inline_md_to_html(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_md_to_html(str(c))}</td>" for c in row) + "</tr>"
                           for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    title = html.escape(blocks[0][1].replace("`", "")) if blocks else "report"
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Draw the plots and write report.md, report.html and cost.json into `run_dir`."""
    run_dir = Path(run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    pretrain_metrics = read_jsonl(run_dir / "pretrain" / "metrics.jsonl")
    config = state["config"]
    evals = {name: read_eval(run_dir / "eval" / f"{name}.json") for name, _ in MODEL_STAGES}
    made = {
        "pretrain_loss.png": plot_pretrain_loss(pretrain_metrics, plots / "pretrain_loss.png",
                                                config["pretrain_batch_size"] * config["seq_len"]),
        "grpo.png": plot_grpo(read_jsonl(run_dir / "grpo" / "metrics.jsonl"), plots / "grpo.png"),
        "expert_load.png": plot_expert_load(read_expert_load(run_dir / "pretrain" / "expert_load.json"),
                                            pretrain_metrics, plots / "expert_load.png"),
        "pass_at_1.png": plot_pass_at_1({k: v for k, v in evals.items() if v}, plots / "pass_at_1.png"),
    }
    build_ledger(state).save(str(run_dir / "cost.json"))
    blocks = report_blocks(run_dir, made)
    md, page = run_dir / "report.md", run_dir / "report.html"
    md.write_text(to_markdown(blocks))
    page.write_text(to_html(blocks, run_dir))
    return md, page


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m seekling.report RUN_DIR")
    start = time.perf_counter()
    try:
        written = write_report(sys.argv[1])
    except DataError as e:  # a damaged eval/*.json or expert_load.json, named
        sys.exit(f"seekling report: error: {e}; rerun the speedrun command to redo what it held")
    for path in written:
        print(path)
    print(f"{time.perf_counter() - start:.1f}s")
