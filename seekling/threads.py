"""How many torch threads a command uses: measured on this machine, as loaded as it is now.

torch's default (one thread per core) is right on an idle machine and badly wrong on a shared one:
its threads wait for each other at every operation, so one thread held up by another program stalls
them all (measured on a 2-core machine: `seekling grpo` took 78 s for 5 steps with 2 threads and
7.4 s with 1). No core count or load average says which case one is in, so `choose_threads` times a
short loop of model-sized matmuls at 1, 2, 4, ... threads (alternating, about 0.5 s in all), keeps
the smallest count that each doubling speeds up by at least `MIN_SPEEDUP`, sets it, logs it and
returns it as a plain int. The decision is cached for `CACHE_SECONDS` (<cache_dir()>/threads.json),
so commands started one after another do not probe each time. `--threads N` (`requested`) skips the
probe. Under torchrun each rank probes within its share of the cores (cores / LOCAL_WORLD_SIZE).

    python -m seekling.threads      # probe now and print the decision
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import torch

from seekling.cost import cache_dir
from seekling.errors import ConfigError
from seekling.files import write_json_atomic

MIN_SPEEDUP = 1.05  # a doubling of the threads must make the probe at least this much faster to be used: a
# busy core makes 2 threads slower than 1 (down to 9x), while on the idle 2-core machine fresh probes gave
# 1.07-2.0x and pre-training ran 1.15-1.6x faster with 2 threads (at 1.2 a run chose 1 and missed 10 min)
CACHE_SECONDS = 120.0  # load changes: a decision older than this is measured again
PROBE_SHAPE = (1024, 256, 256)  # tokens x dim @ dim x hidden: a cpu-preset training matmul (256^3 was too
# small: on an idle 2-core machine it often showed no gain from a second thread where training gained 1.4x)
PROBE_SECONDS = 0.03  # per measurement; each thread count is measured ROUNDS times, interleaved
ROUNDS = 5
WARMUP_SECONDS = 0.15  # matmuls at the largest count first, not measured


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), shared out among torchrun's local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, ranks))


def candidates(cores: int) -> list[int]:
    """1, 2, 4, ... up to `cores`, and `cores` itself."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + [cores]


def decide_threads(seconds_by_threads: dict[int, float], min_speedup: float = MIN_SPEEDUP) -> int:
    """The thread count to use, from the probe's seconds per matmul at each count.

    Walk up from the fewest threads and move to a larger count only when it is at least `min_speedup`
    times faster than the count chosen so far: a thread that gains less is not worth the risk of the
    stalls a busy core causes."""
    if not seconds_by_threads:
        raise ConfigError("decide_threads needs at least one measurement")
    counts = sorted(seconds_by_threads)
    chosen = counts[0]
    for n in counts[1:]:
        if seconds_by_threads[chosen] >= min_speedup * seconds_by_threads[n]:
            chosen = n
    return chosen


def probe(counts: list[int], seconds: float = PROBE_SECONDS, rounds: int = ROUNDS) -> dict[int, float]:
    """Median seconds per model-sized matmul at each thread count, the counts measured in turn `rounds`
    times so that a burst of load elsewhere does not fall on one count alone, after `WARMUP_SECONDS` at
    the largest count (in a fresh process without it, 2 of 5 probes found 2 threads ~1.07x faster
    where the rest, and training, found 1.4-2x: the new thread pool takes a while to spread out)."""
    previous = torch.get_num_threads()
    m, k, n = PROBE_SHAPE
    a, b = torch.ones(m, k), torch.ones(k, n)  # a probe must not move the global RNG
    runs: dict[int, list[float]] = {c: [] for c in counts}
    try:
        torch.set_num_threads(max(counts))
        start = time.perf_counter()
        while time.perf_counter() - start < WARMUP_SECONDS:
            torch.mm(a, b)
        for _ in range(rounds):
            for c in counts:
                torch.set_num_threads(c)
                torch.mm(a, b)  # wake the thread pool at this size
                calls, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < seconds:
                    torch.mm(a, b)
                    calls += 1
                runs[c].append(elapsed / max(calls, 1))
    finally:
        torch.set_num_threads(previous)
    return {c: sorted(v)[len(v) // 2] for c, v in runs.items()}


def _cached(path: str, cores: int) -> dict | None:
    try:
        with open(path) as f:
            entry = json.load(f)
        fresh = 0 <= time.time() - float(entry["measured_at"]) < CACHE_SECONDS
        if fresh and entry["cores"] == cores and 1 <= int(entry["threads"]) <= cores:
            return entry
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing, damaged or from another layout: measure again
    return None


def measured_threads(cores: int | None = None, path: str | None = None,
                     measure: Callable[[list[int]], dict[int, float]] = probe) -> tuple[int, str]:
    """(threads, why) for `cores` cores (default: `available_cores()`), from the cache or a new probe."""
    cores = cores or available_cores()
    if cores == 1:
        return 1, "1 core available"
    path = path or os.path.join(cache_dir(), "threads.json")
    entry = _cached(path, cores)
    if entry is None:
        seconds = measure(candidates(cores))
        entry = {"cores": cores, "threads": decide_threads(seconds), "measured_at": time.time(),
                 "ms_per_matmul": {str(c): round(s * 1e3, 4) for c, s in seconds.items()}}
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            write_json_atomic(path, entry)
        except OSError:
            pass  # an unwritable cache only costs the next command a probe
    timings = ", ".join(f"{c}: {ms:.2f} ms" for c, ms in entry["ms_per_matmul"].items())
    age = time.time() - entry["measured_at"]
    return int(entry["threads"]), (f"probe on {cores} cores, ms per {'x'.join(map(str, PROBE_SHAPE))} matmul "
                                   f"by threads {timings}" + (f"; measured {age:.0f}s ago" if age >= 1 else ""))


def choose_threads(requested: int | None = None, log: Callable[[str], None] | None = None,
                   measure: Callable[[list[int]], dict[int, float]] = probe, path: str | None = None,
                   recorded: int | None = None) -> int:
    """Set torch's thread count, `requested` (--threads N), else `recorded` (what the run being resumed
    used: the count changes float rounding, so a resume keeps it), else measured; log it and return it.

    `requested` 0 or None: not given (see the module docstring for the measurement). The log line goes
    to stderr by default, so a command's stdout stays clean for scripts."""
    log = log or (lambda line: print(line, file=sys.stderr))
    if requested is not None and requested < 0:
        raise ConfigError(f"--threads must be >= 0 (0: measure), got {requested}")
    if requested:
        threads, why = requested, "--threads"
    elif recorded:
        threads, why = recorded, "as the run being resumed recorded; --threads N to change it"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        threads, why = measured_threads(path=path, measure=measure)
    torch.set_num_threads(threads)
    log(f"torch threads: {threads} ({why})")
    return threads


if __name__ == "__main__":
    choose_threads(log=print)
