"""The smoke speedrun's numbers that a refactor must not change, and the CPU numerics they depend on.

`tests/test_speedrun.py::test_smoke_run_reproduces_the_golden_file` compares a fresh smoke run with
`tests/golden/smoke_speedrun.json`, exactly (floats as JSON writes them). Float rounding depends on
the CPU's kernels and the thread count, so each record is keyed by a numerics fingerprint measured
here; a machine whose fingerprint was never recorded compares what does not depend on rounding.

Record this machine's golden numbers from a commit whose behaviour is the reference (before a refactor):
    SEEKLING_RECORD_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_speedrun.py -k golden
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "smoke_speedrun.json"
STAGE_KEYS = {  # per-step numbers of each trainer's metrics.jsonl that training determines
    "pretrain": ("loss", "mtp_loss", "balance_loss", "grad_norm", "expert_imbalance", "val_loss"),
    "sft": ("loss", "mtp_loss", "grad_norm"),
    "grpo": ("reward", "accuracy", "format", "response_length", "truncated", "groups_kept", "loss", "kl",
             "entropy", "grad_norm", "clip_fraction"),
}


def numerics_fingerprint() -> str:
    """A hash of the bytes a few seeded matmuls, a softmax and a backward give on this CPU, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(1234)
        parts = []
        for m, k, n in ((1, 96, 80), (8, 256, 64), (64, 128, 256), (128, 48, 100)):
            a = torch.randn(m, k, generator=g, requires_grad=True)
            b = torch.randn(k, n, generator=g)
            y = (a @ b).softmax(-1)
            y.square().sum().backward()
            parts += [y.detach().numpy().tobytes(), a.grad.numpy().tobytes()]
        bf = (torch.randn(32, 64, generator=g).bfloat16() @ torch.randn(64, 32, generator=g).bfloat16())
        parts.append(bf.float().numpy().tobytes())
        return hashlib.sha256(b"".join(parts)).hexdigest()[:16]
    finally:
        torch.set_num_threads(threads)


def record_of(run_dir: Path) -> dict:
    """What the golden file keeps of one smoke run: per-step losses and rewards, eval numbers and samples."""
    out: dict = {"stages": {}, "eval": {}}
    for stage, keys in STAGE_KEYS.items():
        rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        out["stages"][stage] = [{k: r[k] for k in ("step",) + keys if k in r} for r in rows]
    for path in sorted((run_dir / "eval").glob("*.json")):
        data = json.loads(path.read_text())
        out["eval"][path.stem] = {
            "mean": data["mean"],
            "tasks": {t: {"completions": [s["completions"] for s in v.get("samples", [])],
                          **{k: v[k] for k in v if k not in ("samples", "seconds", "tokens_per_s")}}
                      for t, v in data["tasks"].items()},
        }
    stats = run_dir / "distill" / "samples.stats.json"
    if stats.is_file():
        out["distill_samples"] = json.loads(stats.read_text())["tasks"]
    return out


def load() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


def save(fingerprint: str, record: dict) -> None:
    data = load()
    data[fingerprint] = record
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
