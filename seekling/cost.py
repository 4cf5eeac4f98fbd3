"""What a run costs: device peaks, prices, MFU, a per-stage ledger and DeepSeek-V3's own bill.

Every training stage records into a `CostLedger` (wall seconds, devices, tokens, FLOPs from
`seekling.flops`); the ledger turns that into device-hours, dollars and MFU, and into what the same
FLOPs would cost on rented GPUs. The CPU's peak is not on a datasheet, so it is measured once by a
quick matmul benchmark and cached under ~/.cache/seekling/ (one entry per CPU model and thread count):

    >>> ledger = CostLedger()
    >>> row = ledger.record("sft", seconds=3600, flops=989e12 * 3600 * 0.5, devices=1, device="h800")
    >>> round(row.mfu, 3), row.dollars
    (0.5, 2.0)

`python -m seekling.cost` probes (or reads the cached) CPU peak and prints DeepSeek-V3's table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch

from seekling.errors import SeeklingError, check_choice
from seekling.files import write_json_atomic
from seekling.flops import flops_per_token

# ------------------------------------------------------------------------- prices and peaks
# Dollars per device-hour (for "cpu": per core, i.e. per torch thread, hour).
PRICES: dict[str, float] = {
    "h800": 2.00,  # the rental price DeepSeek-V3's report assumes
    "h100": 2.99,  # typical on-demand H100 SXM 80GB at GPU clouds (e.g. Lambda, 2025); hyperscalers ask more
    "a100": 1.79,  # typical on-demand A100 SXM 80GB at the same clouds (2025)
    "cpu": 0.045,  # one vCPU of an on-demand compute-optimised cloud VM (AWS c7i: ~$0.089 per 2 vCPUs)
}

# Dense (no sparsity) datasheet peaks in FLOP/s per device. H800 is an H100 SXM with cut interconnect:
# same compute. fp32 is the plain (non-tensor-core) rate; TF32 tensor cores would give 495 / 156 TFLOP/s.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h800": {"bf16": 989e12, "fp32": 67e12},
    "h100": {"bf16": 989e12, "fp32": 67e12},
    "a100": {"bf16": 312e12, "fp32": 19.5e12},
}
GPUS = tuple(PEAK_FLOPS)
DEVICES = (*GPUS, "cpu")
DTYPES = ("bf16", "fp32")
DEVICE_UNIT = {"cpu": "core"}  # what one "device" is, for printing; GPUs are "GPU"

# The ledger prices a stage's FLOPs on GPUs too, at this MFU: roughly what a well-tuned large run gets
# (DeepSeek-V3's pre-training works out at ~0.41 by `seekling cost`'s count).
REFERENCE_MFU = 0.4


def device_and_dtype(device: str, dtype: str | None) -> tuple[str, str]:
    """The checked device and the peak's dtype: default bf16 on GPUs, fp32 on the CPU."""
    device = check_choice(device.lower(), DEVICES, "device")
    return device, check_choice(dtype or ("fp32" if device == "cpu" else "bf16"), DTYPES, "dtype")


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over `peak` (the FLOP/s of all devices together)."""
    if not seconds > 0:
        raise SeeklingError(f"seconds must be positive to compute MFU, got {seconds!r}")
    if not peak > 0:
        raise SeeklingError(f"peak FLOP/s must be positive, got {peak!r}")
    if flops < 0:
        raise SeeklingError(f"flops must be >= 0, got {flops!r}")
    return flops / (seconds * peak)


# ------------------------------------------------------------------------- CPU peak, measured once
def cache_dir() -> str:
    """~/.cache/seekling, or $SEEKLING_CACHE_DIR, or $XDG_CACHE_HOME/seekling."""
    if os.environ.get("SEEKLING_CACHE_DIR"):
        return os.environ["SEEKLING_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "seekling")


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def _matmul_rate(dtype: Any, size: int, seconds: float) -> float:
    """Best FLOP/s of size x size matmuls over about `seconds` (best, not mean: we want the peak)."""
    a = torch.ones(size, size, dtype=dtype)  # a probe must not move the global RNG (seeded runs)
    b = torch.ones(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool, packing buffers
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        torch.mm(a, b)
        elapsed = time.perf_counter() - start
        best = max(best, 2.0 * size**3 / max(elapsed, 1e-9))
        if time.perf_counter() > deadline:
            return best


def benchmark_cpu_peak(threads: int, seconds_per_dtype: float = 0.6, size: int = 1024) -> dict[str, float]:
    """Measure fp32 and bf16 matmul FLOP/s of this CPU at `threads` threads (all threads together)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {name: _matmul_rate(dtype, size, seconds_per_dtype)
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    finally:
        torch.set_num_threads(previous)


def cpu_peak(threads: int | None = None, path: str | None = None, refresh: bool = False) -> dict[str, Any]:
    """The CPU's measured peak at `threads` threads (default: torch's current count), from the cache.

    Returns {"cpu", "threads", "fp32", "bf16"} with FLOP/s of all threads together. The first call on a
    machine runs `benchmark_cpu_peak` (~1-2 s) and stores the result in `path`
    (default <cache_dir()>/cpu_peak.json), keyed by CPU model and thread count.
    """
    if threads is None:
        threads = torch.get_num_threads()
    if threads <= 0:
        raise SeeklingError(f"threads must be positive, got {threads}")
    path = path or os.path.join(cache_dir(), "cpu_peak.json")
    key = f"{cpu_model()} | threads={threads}"
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, json.JSONDecodeError):
        table = {}  # none yet, or a damaged one: it is only a cache, so measure again
    entry = table.get(key)
    valid = isinstance(entry, dict) and all(entry.get(d, 0) > 0 for d in DTYPES)
    one = table.get(f"{cpu_model()} | threads=1")
    # More threads measured slower than one: the machine was busy then. A peak is a maximum, so measure
    # again and keep the better of the two (otherwise one busy first run would skew every MFU after it).
    busy = valid and threads > 1 and isinstance(one, dict) and entry["fp32"] < one.get("fp32", 0)
    if refresh or busy or not valid:
        rates = benchmark_cpu_peak(threads)
        if busy:
            rates = {d: max(rates[d], entry[d]) for d in DTYPES}
        entry = {"cpu": cpu_model(), "threads": threads, **rates, "measured_at": time.time()}
        table[key] = entry
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_json_atomic(path, table, sort_keys=True)
    return entry


def device_peak(device: str, dtype: str = "bf16", threads: int | None = None) -> float:
    """Peak FLOP/s of ONE device: a GPU's datasheet figure, or one CPU core's share of the measured peak."""
    device, dtype = device_and_dtype(device, dtype)
    if device == "cpu":
        entry = cpu_peak(threads)
        return float(entry[dtype]) / entry["threads"]
    return PEAK_FLOPS[device][dtype]


# ------------------------------------------------------------------------- the ledger
@dataclass
class StageCost:
    """One stage of a run (pre-training, SFT, GRPO, ...): what it did and what it cost."""

    stage: str
    seconds: float
    flops: float
    tokens: int
    devices: int
    device: str
    dtype: str
    peak_per_device: float  # FLOP/s
    price_per_device_hour: float

    @property
    def device_hours(self) -> float:
        return self.seconds * self.devices / 3600.0

    @property
    def dollars(self) -> float:
        return self.device_hours * self.price_per_device_hour

    @property
    def mfu(self) -> float:
        return mfu(self.flops, self.seconds, self.peak_per_device * self.devices) if self.seconds > 0 else 0.0

    def gpu_equivalent(self, reference_mfu: float = REFERENCE_MFU) -> dict[str, dict[str, float]]:
        """GPU-hours and dollars the same FLOPs would take on each GPU (bf16 peak) at `reference_mfu`."""
        out = {}
        for gpu in GPUS:
            hours = self.flops / (PEAK_FLOPS[gpu]["bf16"] * reference_mfu) / 3600.0
            out[gpu] = {"gpu_hours": hours, "dollars": hours * PRICES[gpu]}
        return out

    def to_dict(self, reference_mfu: float = REFERENCE_MFU) -> dict[str, Any]:
        return {**asdict(self), "device_hours": self.device_hours, "dollars": self.dollars, "mfu": self.mfu,
                "gpu_equivalent": self.gpu_equivalent(reference_mfu)}


@dataclass
class _StageTimer:
    """What `CostLedger.stage` yields: add tokens and FLOPs as the stage runs."""

    tokens: int = 0
    flops: float = 0.0

    def add(self, tokens: int = 0, flops: float = 0.0) -> None:
        self.tokens += int(tokens)
        self.flops += float(flops)


class CostLedger:
    """Stages of a run, each priced and set against its device's peak.

    `prices` overrides `PRICES` per device; `reference_mfu` is used for the GPU-equivalent columns.
    """

    def __init__(self, prices: dict[str, float] | None = None, reference_mfu: float = REFERENCE_MFU) -> None:
        self.prices = {**PRICES, **(prices or {})}
        if not 0 < reference_mfu <= 1:
            raise SeeklingError(f"reference_mfu must lie in (0, 1], got {reference_mfu}")
        self.reference_mfu = reference_mfu
        self.stages: list[StageCost] = []

    def record(self, stage: str, seconds: float, flops: float, tokens: int = 0, devices: int = 1,
               device: str = "cpu", dtype: str | None = None, peak_per_device: float | None = None) -> StageCost:
        """Add one stage. On "cpu", `devices` is the number of threads (cores) the stage used; `dtype`
        picks the peak MFU is measured against (see `device_and_dtype`)."""
        device, dtype = device_and_dtype(device, dtype)
        if seconds < 0 or flops < 0 or tokens < 0:
            raise SeeklingError(f"stage {stage!r}: seconds, flops and tokens must be >= 0")
        if devices <= 0:
            raise SeeklingError(f"stage {stage!r}: devices must be positive, got {devices}")
        if peak_per_device is None:
            peak_per_device = device_peak(device, dtype, threads=devices if device == "cpu" else None)
        row = StageCost(stage, float(seconds), float(flops), int(tokens), int(devices), device, dtype,
                        float(peak_per_device), self.prices[device])
        self.stages.append(row)
        return row

    @contextlib.contextmanager
    def stage(self, name: str, **record_kwargs: Any) -> Iterator[_StageTimer]:
        """Time a block: `with ledger.stage("sft", devices=2) as s: ... s.add(tokens=n, flops=f)`."""
        timer = _StageTimer()
        start = time.perf_counter()
        yield timer
        self.record(name, time.perf_counter() - start, timer.flops, timer.tokens, **record_kwargs)

    def totals(self) -> dict[str, float]:
        totals = {key: sum(getattr(s, key) for s in self.stages)
                  for key in ("seconds", "flops", "tokens", "device_hours", "dollars")}
        totals["h800_hours_equivalent"] = sum(s.gpu_equivalent(self.reference_mfu)["h800"]["gpu_hours"]
                                              for s in self.stages)
        return totals

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference_mfu": self.reference_mfu,
            "prices": dict(self.prices),
            "stages": [s.to_dict(self.reference_mfu) for s in self.stages],
            "totals": self.totals(),
        }

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())

    def to_markdown(self) -> str:
        ref = f"{self.reference_mfu:.0%}"
        lines = [
            f"| stage | device | wall | tokens | FLOPs | device-hours | cost | MFU | H800-hours at {ref} MFU "
            f"| cost on H800 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in self.stages:
            h800 = s.gpu_equivalent(self.reference_mfu)["h800"]
            lines.append(
                f"| {s.stage} | {s.devices} x {s.device} ({s.dtype}) | {format_seconds(s.seconds)} "
                f"| {format_count(s.tokens)} | {s.flops:.3g} | {format_hours(s.device_hours)} "
                f"| {format_dollars(s.dollars)} | {s.mfu:.1%} | {format_hours(h800['gpu_hours'])} "
                f"| {format_dollars(h800['dollars'])} |"
            )
        t = self.totals()
        lines.append(
            f"| **total** | | {format_seconds(t['seconds'])} | {format_count(t['tokens'])} | {t['flops']:.3g} "
            f"| {format_hours(t['device_hours'])} | {format_dollars(t['dollars'])} | "
            f"| {format_hours(t['h800_hours_equivalent'])} "
            f"| {format_dollars(t['h800_hours_equivalent'] * self.prices['h800'])} |"
        )
        return "\n".join(lines)


# ------------------------------------------------------------------------- planning a run
DEFAULT_SEQ_LEN = 4096  # DeepSeek-V3's pre-training length; capped at a config's max_position_embeddings


def estimate(config: Any, tokens: float, seq_len: int | None = None, device: str = "h800", devices: int = 1,
             mfu: float | None = None, device_hours: float | None = None, dtype: str | None = None,
             price: float | None = None, training: bool = True, include_mtp: bool = True) -> dict[str, Any]:
    """What processing `tokens` tokens with `config` takes on `devices` x `device`.

    Give `mfu` to get device-hours, or `device_hours` to get the MFU they imply; with neither,
    REFERENCE_MFU is assumed. `dtype` picks the peak (see `device_and_dtype`; the CPU's per-core peak
    is measured on this machine). Returns FLOPs per token by part, total FLOPs, MFU, device-hours,
    wall-clock days and dollars.
    """
    device, dtype = device_and_dtype(device, dtype)
    if not (isinstance(tokens, (int, float)) and tokens > 0 and math.isfinite(tokens)):
        raise SeeklingError(f"tokens must be positive, got {tokens!r}")
    if not isinstance(devices, int) or isinstance(devices, bool) or devices <= 0:
        raise SeeklingError(f"devices must be a positive integer, got {devices!r}")
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, config.max_position_embeddings)
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise SeeklingError(f"seq_len must be a positive integer, got {seq_len!r}")
    if seq_len > config.max_position_embeddings:
        raise SeeklingError(f"seq_len {seq_len} is past the model's "
                            f"max_position_embeddings={config.max_position_embeddings}")
    if mfu is not None and device_hours is not None:
        raise SeeklingError("give either an MFU (to get device-hours) or device-hours (to get the MFU), not both")
    if mfu is not None and not 0 < mfu <= 1:
        raise SeeklingError(f"MFU must lie in (0, 1], got {mfu}")
    if device_hours is not None and not device_hours > 0:
        raise SeeklingError(f"device-hours must be positive, got {device_hours}")
    if price is not None and not price >= 0:
        raise SeeklingError(f"price must be >= 0 dollars per device-hour, got {price}")

    per_token = flops_per_token(config, seq_len, training=training, include_mtp=include_mtp)
    total = per_token["total"] * float(tokens)
    peak = device_peak(device, dtype)
    if device_hours is not None:
        mfu_source = "implied"
        mfu = total / (device_hours * 3600.0 * peak)
    else:
        mfu_source = "given" if mfu is not None else "assumed"
        mfu = REFERENCE_MFU if mfu is None else mfu
        device_hours = total / (peak * mfu) / 3600.0
    price = PRICES[device] if price is None else price
    return {
        "device": device, "devices": devices, "dtype": dtype, "seq_len": seq_len, "tokens": float(tokens),
        "training": training, "include_mtp": include_mtp,
        "flops_per_token": per_token, "total_flops": total,
        "peak_per_device": peak, "mfu": mfu, "mfu_source": mfu_source,
        "device_hours": device_hours, "wall_days": device_hours / devices / 24.0,
        "price_per_device_hour": price, "dollars": device_hours * price,
    }


# ------------------------------------------------------------------------- DeepSeek-V3's bill
# Table 1 of the DeepSeek-V3 report (arXiv 2412.19437): H800 GPU-hours by stage, at $2 per GPU-hour.
DEEPSEEK_V3_GPU_HOURS: dict[str, float] = {"pre-training": 2_664_000, "context extension": 119_000,
                                           "post-training": 5_000}
DEEPSEEK_V3_TOTAL_GPU_HOURS = 2_788_000
DEEPSEEK_V3_TOTAL_DOLLARS = 5.576e6
DEEPSEEK_V3_PRICE = 2.0  # $/H800-hour
DEEPSEEK_V3_GPUS = 2048
DEEPSEEK_V3_PRETRAIN_TOKENS = 14.8e12  # in sequences of DEFAULT_SEQ_LEN


def deepseek_v3_table() -> str:
    """DeepSeek-V3's training cost as a Markdown table, with the wall-clock days on 2,048 H800s."""
    lines = ["| stage | H800 GPU-hours | USD at $2/GPU-hour | days on 2,048 H800s |", "|---|---:|---:|---:|"]
    for stage, hours in [*DEEPSEEK_V3_GPU_HOURS.items(), ("**total**", DEEPSEEK_V3_TOTAL_GPU_HOURS)]:
        days = hours / DEEPSEEK_V3_GPUS / 24
        lines.append(f"| {stage} | {hours / 1e3:,.0f}K | ${hours * DEEPSEEK_V3_PRICE / 1e6:.3f}M | {days:.1f} |")
    per_trillion = DEEPSEEK_V3_GPU_HOURS["pre-training"] / (DEEPSEEK_V3_PRETRAIN_TOKENS / 1e12)
    lines += ["", f"Pre-training: {format_count(DEEPSEEK_V3_PRETRAIN_TOKENS)} tokens, {per_trillion / 1e3:.0f}K "
              f"GPU-hours per trillion tokens ({per_trillion / DEEPSEEK_V3_GPUS / 24:.1f} days on the cluster). "
              "Excludes research and ablations."]
    return "\n".join(lines)


# ------------------------------------------------------------------------- parsing and printing
_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}


def parse_count(text: str | float | int, what: str = "count") -> float:
    """'14.8T', '2e9', '500M', '1,000' -> a positive number (K, M, B/G, T, P suffixes, any case)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([+-]?[0-9][0-9_,]*\.?[0-9]*(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtTpP]?)\s*", text)
        if not m:
            raise SeeklingError(f"{what} {text!r} is not a number like 14.8T, 2e9 or 500M")
        value = float(m.group(1).replace(",", "").replace("_", "")) * _SUFFIXES[m.group(2).upper()]
    if not (value > 0 and math.isfinite(value)):
        raise SeeklingError(f"{what} must be positive, got {text!r}")
    return value


# Each formatter is a table of (threshold, unit, format): the first threshold |x| reaches prints x / unit,
# and x below them all is printed with the last format.
_COUNT = ((1e12, 1e12, "{:.3g}T"), (1e9, 1e9, "{:.3g}B"), (1e6, 1e6, "{:.3g}M"), (1e3, 1e3, "{:.3g}K"))
_FLOPS = ((1e15, 1e15, "{:.4g} PFLOP"), (1e12, 1e12, "{:.4g} TFLOP"), (1e9, 1e9, "{:.4g} GFLOP"),
          (1e6, 1e6, "{:.4g} MFLOP"), (1e3, 1e3, "{:.4g} KFLOP"))
_DOLLARS = ((1e6, 1e6, "${:.3f}M"), (100, 1, "${:,.0f}"), (0.01, 1, "${:.2f}"))
_HOURS = ((1e5, 1e3, "{:,.0f}K"), (100, 1, "{:,.0f}"))
_SECONDS = ((2 * 86400, 86400, "{:,.1f} days"), (2 * 3600, 3600, "{:.1f} hours"), (120, 60, "{:.1f} min"))


def _scaled(x: float, table: tuple[tuple[float, float, str], ...], last: str) -> str:
    return next((fmt.format(x / unit) for threshold, unit, fmt in table if abs(x) >= threshold), last.format(x))


def format_count(x: float) -> str:
    return _scaled(x, _COUNT, "{:.3g}" if x != int(x) else "{:.0f}")


def format_flops(x: float) -> str:
    return _scaled(x, _FLOPS, "{:.4g} FLOP")


def _plain(x: float, digits: int) -> str:
    """`x` to `digits` significant digits as a plain decimal, never in scientific notation: a person
    reads $0.0000039 at a glance, $3.9e-06 not."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def format_dollars(x: float) -> str:
    return _scaled(x, _DOLLARS, "$" + _plain(x, 2))  # below a cent: a plain decimal, never 3.9e-06


def format_hours(h: float) -> str:
    return _scaled(h, _HOURS, _plain(h, 3))


def format_seconds(s: float) -> str:
    return _scaled(s, _SECONDS, "{:.3g} s")


if __name__ == "__main__":
    peak = cpu_peak()
    print(f"{peak['cpu']}, {peak['threads']} threads: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s (cached in {cache_dir()})")
    print(deepseek_v3_table())
