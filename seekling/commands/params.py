"""Print the total and per-token active parameters of a model preset or a config.json.

    seekling params --preset deepseek-v3      # 671B total, ~37B active
    seekling params --config runs/x/final/config.json
"""

from __future__ import annotations

import argparse

from seekling.config import PRESETS, ModelConfig, count_parameters
from seekling.errors import SeeklingError


def add_model_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--preset and --config, the two ways to name a model (also used by `seekling cost`)."""
    parser.add_argument("--preset", default=None, help=f"a named model size: {', '.join(PRESETS)}")
    parser.add_argument("--config", default=None, help="a config.json (or a checkpoint directory holding one) instead")


def model_config(args: argparse.Namespace) -> ModelConfig | None:
    """The config --preset or --config names; None when neither is given."""
    if args.preset and args.config:
        raise SeeklingError("give --preset or --config, not both")
    if args.config:
        return ModelConfig.from_file(args.config)
    return ModelConfig.from_name(args.preset) if args.preset else None  # unknown names list the presets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    parser.add_argument("--all", action="store_true", help="print every preset")


def describe(name: str, cfg: ModelConfig) -> str:
    c = count_parameters(cfg)
    moe = f"{cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared experts, top-{cfg.num_experts_per_tok}"
    return (f"{name:12s} total {c['total'] / 1e6:12,.2f}M  active {c['active'] / 1e6:10,.2f}M  "
            f"MTP {c['mtp'] / 1e6:9,.2f}M   {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {moe}")


def run(args: argparse.Namespace) -> int:
    if args.all:
        for name in PRESETS:
            print(describe(name, ModelConfig.from_name(name)))
        return 0
    name = "config" if args.config else args.preset or "cpu"
    print(describe(name, model_config(args) or ModelConfig.from_name(name)))
    return 0
