"""The fault-injection harness of tests/test_faults.py: ways to damage a file, the points where a
training process is killed, and what seekling did with each trial, in the issue's columns.

A trial ends in one of:
    named      a clear error (exit 2, or a 4xx answer) that names the file, flag or field at fault
    recovered  the work completed from what was intact (the previous checkpoint, a rerun stage),
               said so, and equals what an undamaged run computes
    unclear    a clear error that does not name what is wrong
    silent     accepted: exit 0 / 200 with nothing said, or a result that differs
    traceback  an exception that is not a SeeklingError (a raw traceback for the user), or a 500

    python -c "import fault_cases as f; print(f.DAMAGES)"      # (from tests/)
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from seekling.cli import main
from seekling.errors import SeeklingError

ROOT = Path(__file__).resolve().parents[1]
OUTCOMES = ("named", "recovered", "unclear", "silent", "traceback")


# ----------------------------------------------------------------------------- recording trials
@dataclass
class Trial:
    group: str  # "damaged file", "CLI", "request", "kill"
    name: str
    outcome: str
    detail: str = ""


def table(trials: list[Trial]) -> str:
    """The issue's table: per group, how many trials ended in each outcome."""
    header = f"{'group':<14} {'trials':>6} " + " ".join(f"{o:>9}" for o in OUTCOMES)
    lines = [header, "-" * len(header)]
    groups = list(dict.fromkeys(t.group for t in trials))
    for group in [*groups, "all"]:
        chosen = [t for t in trials if group in ("all", t.group)]
        counts = Counter(t.outcome for t in chosen)
        lines.append(f"{group:<14} {len(chosen):>6} " + " ".join(f"{counts[o]:>9}" for o in OUTCOMES))
    bad = [t for t in trials if t.outcome in ("silent", "traceback", "unclear")]
    lines += [f"  {t.outcome}: {t.group} / {t.name}: {t.detail[-300:]}" for t in bad]
    return "\n".join(lines)


@dataclass
class CliResult:
    code: int | None
    out: str
    err: str
    exception: str | None = None  # the traceback of an exception main() let through


def run_cli(argv: list[str], stdin: bytes | None = None) -> CliResult:
    """`seekling ARGV` in this process, its output captured; argparse's exit is a code, not a crash."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
    except Exception:  # noqa: BLE001 - what a user would see as a traceback
        return CliResult(None, out.getvalue(), err.getvalue(), traceback.format_exc())
    finally:
        sys.stdin = old_stdin
    return CliResult(code, out.getvalue(), err.getvalue())


def classify_error(result: CliResult, names: tuple[str, ...]) -> tuple[str, str]:
    """A case that must fail: named when it exits 2 naming every one of `names`."""
    if result.exception:
        return "traceback", result.exception.strip().splitlines()[-1]
    message = (result.err or result.out).strip().splitlines()[-1:] or [""]
    if result.code == 0:
        return "silent", "exit 0: " + (result.out.strip()[-200:] or "(no output)")
    if result.code == 2 and all(n in result.err for n in names):
        return "named", message[0]
    return "unclear", f"exit {result.code}: {message[0]} (expected to name {names})"


def classify_call(call: Callable[[], object], names: tuple[str, ...]) -> tuple[str, str]:
    """A library call that must raise a SeeklingError naming `names`."""
    try:
        call()
    except SeeklingError as e:
        ok = all(n in str(e) for n in names)
        return ("named" if ok else "unclear"), str(e)
    except Exception:  # noqa: BLE001
        return "traceback", traceback.format_exc().strip().splitlines()[-1]
    return "silent", "no error"


# ----------------------------------------------------------------------------- damaging files
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garble(path: Path) -> None:
    """Overwrite the first 64 bytes (a safetensors header, the start of a JSON file) with 0xff."""
    data = bytearray(path.read_bytes())
    data[:64] = b"\xff" * min(64, len(data))
    path.write_bytes(bytes(data))


def xor_bytes(path: Path) -> None:
    """Flip 256 bytes in the second half: tensor data in a safetensors file (the header stays valid)."""
    data = bytearray(path.read_bytes())
    start = len(data) * 3 // 4
    for i in range(start, min(start + 256, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def nan_weights(path: Path, count: int = 1024) -> None:
    """Set `count` values of the largest floating tensor to NaN, keeping a valid safetensors file."""
    tensors = load_file(str(path))
    name = max((n for n, t in tensors.items() if t.is_floating_point()), key=lambda n: tensors[n].numel())
    flat = tensors[name].flatten().clone()
    flat[: min(count, flat.numel())] = float("nan")
    tensors[name] = flat.view_as(tensors[name])
    save_file(tensors, str(path), metadata={"format": "pt"})


def nan_one_projection(path: Path) -> None:
    """NaN in every value of one attention projection (or its optimizer moment)."""
    tensors = load_file(str(path))
    name = next(n for n, t in tensors.items() if "self_attn.o_proj.weight" in n and t.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata={"format": "pt"})


def drop_record(directory: Path) -> None:
    """As a directory saved by an older seekling or another program: no integrity record."""
    with contextlib.suppress(FileNotFoundError):
        (directory / "SHA256SUMS").unlink()


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated": truncate, "empty": empty, "garbled": garble, "xor": xor_bytes, "nan": nan_weights,
    "nan_projection": nan_one_projection,
}
JSON_DAMAGES = ("truncated", "empty", "garbled")  # the others need a tensor file


# ----------------------------------------------------------------------------- killing a training process
KILL_SCRIPT = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
import seekling.train_state as ts, seekling.training as tr
where, n = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}

def killer(original, after=False):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls["n"] == n and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

if where == "before_save":
    tr.save_training_checkpoint = killer(tr.save_training_checkpoint)
elif where == "after_save":
    tr.save_training_checkpoint = killer(tr.save_training_checkpoint, after=True)
elif where == "mid_save":  # the model files written into the temporary directory, not yet the state
    ts.save_file = killer(ts.save_file)
elif where == "before_record":  # everything written but the integrity record; not yet renamed
    ts.write_checksums = killer(ts.write_checksums)
elif where == "writing_final":
    tr.save_pretrained = killer(tr.save_pretrained)
from seekling.cli import main
from seekling.errors import SeeklingError
sys.exit(main(sys.argv[3:]))
"""
KILL_POINTS = ("before_save", "mid_save", "before_record", "after_save", "writing_final")


def killed_runs(jobs: list[tuple[list[str], str, int]], parallel: int = 4, timeout: float = 300) -> list[int]:
    """Run each `seekling ARGV` of `jobs` (argv, kill point, n) in a subprocess that SIGKILLs itself at
    the n-th call of the kill point, `parallel` at a time (their start-up, importing torch, overlaps);
    returns their exit codes (-9 where the kill point was reached)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    codes: list[int] = []
    for start in range(0, len(jobs), parallel):
        procs = [subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, where, str(n), *argv], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for argv, where, n in jobs[start: start + parallel]]
        for proc in procs:
            _, err = proc.communicate(timeout=timeout)
            if proc.returncode not in (0, -signal.SIGKILL):
                raise AssertionError(f"the killed run failed otherwise ({proc.returncode}): {err[-2000:]}")
            codes.append(proc.returncode)
    return codes


def same_weights(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two model.safetensors files ([] when equal bitwise)."""
    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return sorted(set(x) ^ set(y))
    return [n for n in x if not torch.equal(x[n], y[n])]
