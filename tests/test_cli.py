"""The `seekling` command's flags: every flag has help, shows its real default, and takes the default
of the settings dataclass it configures, so a setting is declared once (seekling.commands.add_setting)."""

import argparse
import dataclasses
import importlib

import pytest

from seekling.cli import COMMANDS
from seekling.commands import HelpFormatter, from_args, setting_default
from seekling.grpo import GRPOConfig
from seekling.sft import SFTConfig


def command_parser(name: str) -> tuple[object, argparse.ArgumentParser]:
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"seekling {name}", formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return module, parser


def flags(parser: argparse.ArgumentParser):
    """(parser, action) for every flag, those of sub-commands (`seekling data build`) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from flags(sub)
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield parser, action


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_flag_has_help_and_its_dataclass_default(name):
    module, parser = command_parser(name)
    by_field = {}
    for config in getattr(module, "SETTINGS", ()):
        for f in dataclasses.fields(config):
            by_field.setdefault(f.name, config)
    for owner, action in flags(parser):
        where = f"seekling {name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help, f"{where}: no help"
        config, field = getattr(action, "setting", (by_field.get(action.dest), action.dest))
        if config is not None:
            assert action.default == setting_default(config, field), \
                f"{where}: default {action.default!r}, but {config.__name__}.{field} is {setting_default(config, field)!r}"
        text = owner.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, f"{where}: a default that says nothing"


def test_the_help_shows_the_real_defaults():
    _, parser = command_parser("grpo")
    text = " ".join(parser.format_help().split())
    assert "checkpoint every N steps (0: only at the end) (default: 10)" in text  # once 0 here and 10 there
    assert "{seq_mean_token_mean,token_mean,seq_sum_constant}" in text  # the choices are the loss table
    _, parser = command_parser("pretrain")
    assert "--data DATA token-shard directory from `seekling data build` --out" in " ".join(parser.format_help().split())


def test_parsed_flags_build_the_dataclass_defaults():
    _, parser = command_parser("grpo")
    args = parser.parse_args(["--init-from", "m", "--out", "o"])
    assert from_args(GRPOConfig, args, rewards=dict(args.rewards)) == GRPOConfig()
    args = parser.parse_args(["--init-from", "m", "--out", "o", "--reward", "correct=2", "format", "--loss",
                              "token_mean", "--no-scale-std", "--warmup", "3"])
    cfg = from_args(GRPOConfig, args, rewards=dict(args.rewards))
    assert (cfg.rewards, cfg.loss_aggregation, cfg.scale_std, cfg.warmup_steps) == (
        {"correct": 2.0, "format": 1.0}, "token_mean", False, 3)
    _, parser = command_parser("sft")
    args = parser.parse_args(["--out", "o", "--no-pack", "--schedule", "wsd"])
    assert from_args(SFTConfig, args) == SFTConfig(pack=False, schedule="wsd")
