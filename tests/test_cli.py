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
    parser = argparse.ArgumentParser(prog=f"seekling {name}", formatter_class=HelpFormatter,
                                     description=(module.__doc__ or "").strip())  # as seekling.cli.main sets it
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


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_flag_states_its_default_once_and_required_ones_none(name):
    """The cases the first-hour report found: required flags printed "(default: None)", `tokenizer
    train --tasks` "(default: )" after its own text, speedrun's --preset and demo's flags no default."""
    _, parser = command_parser(name)
    for owner, action in flags(parser):
        if isinstance(action, argparse._SubParsersAction) or not action.option_strings:
            continue
        where = f"seekling {name} {'/'.join(action.option_strings)}"
        formatter = owner._get_formatter()
        shown = " ".join(formatter._expand_help(action).split()) if action.help else ""
        assert "(default: )" not in shown and shown.count("default") <= 1 + action.help.count("default"), where
        if action.required:
            assert "default" not in shown, f"{where}: required, yet its help speaks of a default"
        elif action.nargs != 0 and action.default not in (None, [], "", argparse.SUPPRESS):
            assert "default" in shown, f"{where}: default {action.default!r} not shown"
    for owner, _ in flags(parser):
        assert owner.description, f"{owner.prog}: no description"


def test_the_cases_named_in_the_first_hour_report():
    text = lambda name: " ".join(command_parser(name)[1].format_help().split())  # noqa: E731
    assert "--preset PRESET stage settings: cpu, smoke, gpu, gpu-node (see --list) (default: cpu)" in text("speedrun")
    assert "model size to build (default: tiny)" in text("demo")
    _, parser = command_parser("tokenizer")
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    shown = " ".join(train.format_help().split())
    assert "(default when no --corpus: arithmetic,countdown,linear,wordproblem)" in shown and "(default: )" not in shown
    assert "--out OUT directory to write the tokenizer files into" in shown  # required: no default
    grpo = text("grpo")
    for flag in ("--tasks TASKS comma-separated reasoning tasks (train split) (default: countdown)",
                 "(default: 1e-05)", "sampling temperature (R1-Zero samples at 1) (default: 1.0)",
                 "completion length limit (default: 128)"):
        assert flag in grpo
    assert "(default: None)" not in grpo and "--init-from INIT_FROM model to start from" in grpo
