"""seekling cost: FLOPs, device-hours, days and dollars to train a model on a number of tokens.

FLOPs come from `seekling.flops` (matmuls only, training = 3 x forward, causal attention, MTP
included); device peaks and prices from `seekling.cost`. Give an MFU to get GPU-hours, or GPU-hours
to get the MFU they imply. Examples:

    seekling cost --preset cpu --tokens 50M --device cpu --devices 2 --mfu 0.3
    seekling cost --preset deepseek-v3 --tokens 14.8T --device h800 --devices 2048 --gpu-hours 2664K
    seekling cost --deepseek-table
"""

from __future__ import annotations

import argparse

from seekling.commands import finite_float
from seekling.commands.params import add_model_flags, model_config
from seekling.config import PRESETS, ModelConfig, count_parameters
from seekling.cost import (DEFAULT_SEQ_LEN, DEVICE_UNIT, DEVICES, DTYPES, PEAK_FLOPS, REFERENCE_MFU, deepseek_v3_table,
                           estimate, format_count, format_dollars, format_flops, format_hours, format_seconds,
                           parse_count)
from seekling.errors import SeeklingError
from seekling.flops import group_parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser.add_argument_group("model"))
    run = parser.add_argument_group("run")
    run.add_argument("--tokens", help="training tokens, e.g. 14.8T, 2e9, 500M, 1,000,000")
    run.add_argument("--seq-len", type=int, default=None, help=f"sequence length (default: {DEFAULT_SEQ_LEN}, "
                     "or the model's max_position_embeddings if smaller)")
    run.add_argument("--no-mtp", action="store_true", help="leave the multi-token-prediction modules out")
    run.add_argument("--forward-only", action="store_true",
                     help="count the forward pass only (scoring, prefill), not forward + backward")
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--device", default="h800", help=f"device type: {', '.join(DEVICES)} (cpu: one device = one core)")
    hw.add_argument("--devices", default="1", help="number of devices (GPUs, or CPU cores) working together")
    hw.add_argument("--dtype", default=None, choices=DTYPES,
                    help="which peak MFU is measured against (default bf16 on GPUs, fp32 on the CPU)")
    hw.add_argument("--price", type=finite_float, default=None,
                    help="dollars per device-hour (default: the table in seekling/cost.py; H800 $2 as DeepSeek)")
    eff = parser.add_argument_group("efficiency (give one)")
    eff.add_argument("--mfu", type=finite_float, default=None,
                     help=f"model FLOPs utilisation in (0, 1] to turn FLOPs into time (default {REFERENCE_MFU})")
    eff.add_argument("--gpu-hours", "--device-hours", dest="device_hours", default=None,
                     help="device-hours the run took (e.g. 2664K): prints the MFU they imply instead")
    parser.add_argument("--deepseek-table", action="store_true",
                        help="print DeepSeek-V3's reported training cost table (H800 GPU-hours and dollars)")


def _positive_int(text: str, flag: str) -> int:
    value = parse_count(text, flag)
    if value != int(value):
        raise SeeklingError(f"{flag} must be a whole number, got {text!r}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    config = model_config(args)
    if args.deepseek_table:
        print("DeepSeek-V3 training cost (technical report, Table 1):\n")
        print(deepseek_v3_table())
        if config is None:
            return 0
        print()
    if config is None:
        raise SeeklingError(f"give --preset NAME ({', '.join(PRESETS)}) or --config PATH, or --deepseek-table")
    if args.tokens is None:
        raise SeeklingError("give --tokens, e.g. --tokens 14.8T")
    tokens = parse_count(args.tokens, "--tokens")
    devices = _positive_int(args.devices, "--devices")
    device_hours = parse_count(args.device_hours, "--gpu-hours") if args.device_hours is not None else None
    if args.seq_len is not None and args.seq_len <= 0:
        raise SeeklingError(f"--seq-len must be positive, got {args.seq_len}")
    est = estimate(config, tokens, seq_len=args.seq_len, device=args.device, devices=devices, mfu=args.mfu,
                   device_hours=device_hours, dtype=args.dtype, price=args.price, training=not args.forward_only,
                   include_mtp=not args.no_mtp)
    print(render(est, config, args.preset or args.config))
    return 0


def render(est: dict, config: ModelConfig, name: str) -> str:
    params = count_parameters(config)
    unit = DEVICE_UNIT.get(est["device"], "GPU")
    per_token = est["flops_per_token"]
    mode = "forward only" if not est["training"] else "training: forward + backward = 3 x forward"
    mtp = f", +{format_count(params['mtp'])} MTP" if params["mtp"] and est["include_mtp"] else ""
    lines = [
        f"model            {name}: {format_count(params['total'])} parameters, "
        f"{format_count(params['active'])} active per token{mtp}",
        f"tokens           {format_count(est['tokens'])} in sequences of {est['seq_len']:,} "
        f"({mode}; causal attention, mean context (T+1)/2)",
        f"FLOPs per token  {format_flops(per_token['total'])}, of which:",
    ]
    for part, value in group_parts(per_token).items():
        if value:
            lines.append(f"  {part:<29} {format_flops(value):>12}  {value / per_token['total']:6.1%}")
    peak = est["peak_per_device"]
    where = (f"{est['device'].upper()} at {peak / 1e12:,.4g} TFLOP/s dense {est['dtype']} each"
             if est["device"] in PEAK_FLOPS else
             f"CPU cores at {peak / 1e9:,.4g} GFLOP/s {est['dtype']} each (measured on this machine)")
    mfu_note = {
        "implied": f"implied by {est['device_hours']:,.0f} {unit}-hours",
        "given": "given",
        "assumed": "assumed; pass --mfu, or --gpu-hours to get the MFU a run implies",
    }[est["mfu_source"]]
    impossible = "  (above 1: more FLOPs than the devices' peak allows)" if est["mfu"] > 1 else ""
    lines += [
        f"total FLOPs      {est['total_flops']:.4g}",
        f"devices          {est['devices']:,} x {where}, ${est['price_per_device_hour']:.3g} per {unit}-hour",
        f"MFU              {est['mfu']:.4f} ({est['mfu']:.2%}, {mfu_note}){impossible}",
        f"{unit}-hours{' ' * (16 - len(unit) - 6)} {format_hours(est['device_hours'])}",
        f"wall-clock       {format_seconds(est['wall_days'] * 86400)} on {est['devices']:,} {unit}"
        f"{'s' if est['devices'] > 1 else ''}",
        f"cost             {format_dollars(est['dollars'])}",
    ]
    return "\n".join(lines)
