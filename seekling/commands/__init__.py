"""Subcommands of the `seekling` CLI, one module each (see seekling/cli.py), their help formatter, and
the two helpers that make a trainer's settings dataclass the one declaration of its flags:
`add_setting` adds the flag of a field (default, type and help from the field), `from_args` builds
the dataclass from parsed flags, and the number types every flag parses with (`finite_float`: NaN
and infinity are never a setting; `non_negative_int`, `port`, `device_name`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from typing import Any


def finite_float(text: str) -> float:
    """A float flag's type: a number, never NaN or +-inf (Python's float() accepts "nan" and "inf")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _integer(text: str, low: int, high: int | None, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{text!r} is {expected}")
    return value


def non_negative_int(text: str) -> int:
    """An integer flag that counts something (threads, problems): 0 or more."""
    return _integer(text, 0, None, "negative; expected 0 or more")


def port(text: str) -> int:
    """A TCP port: 0 (any free port) to 65535."""
    return _integer(text, 0, 65535, "not a TCP port (0-65535)")


def device_name(text: str) -> str:
    """A torch device a run can use: cpu, cuda or cuda:N."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda or cuda:N")
    return text


_TYPES = {"int": int, "float": finite_float, "str": str}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (a command's module docstring) and each flag's real default after
    its help; none for required flags, switches, None, empty lists and strings (nothing to show) and
    flags whose help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.required or action.nargs == 0 or default is None or default is argparse.SUPPRESS
                or default in ([], "") or "default" in text):
            return text
        return text + " (default: %(default)s)"


def setting_default(config: type, name: str) -> Any:
    """The default of field `name` of the dataclass `config` (None for a required field)."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    if f.default is dataclasses.MISSING:
        return None if f.default_factory is dataclasses.MISSING else f.default_factory()
    return f.default


def add_setting(parser: argparse.ArgumentParser | Any, config: type, name: str, flag: str | None = None,
                **kwargs: Any) -> argparse.Action:
    """Add the flag of field `name` of `config`, a dataclass declared with `seekling.config.setting`.

    The default and the help come from the field; the type from its annotation (`int | None` -> int).
    `flag` defaults to --NAME; a bool field becomes a switch: --NAME when it defaults to False,
    --no-NAME when it defaults to True. `kwargs` go to argparse (choices, metavar, nargs, dest, type)."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    default = setting_default(config, name)
    kwargs.setdefault("dest", name)
    kwargs.setdefault("help", f.metadata.get("help", "").replace("%", "%%"))  # argparse formats help with %
    if isinstance(default, bool):
        flag = flag or f"--{'no-' if default else ''}{name.replace('_', '-')}"
        action = parser.add_argument(flag, action="store_false" if default else "store_true", **kwargs)
    else:
        flag = flag or f"--{name.replace('_', '-')}"
        kwargs.setdefault("type", _TYPES.get(str(f.type).split("|")[0].strip()))
        kwargs.setdefault("metavar", None if "choices" in kwargs else flag.lstrip("-").replace("-", "_").upper())
        action = parser.add_argument(flag, default=default, **kwargs)
    action.setting = (config, name)  # for the test that holds every flag to its field
    return action


def add_column_argument(parser: argparse.ArgumentParser | Any, fields: Sequence[str]) -> argparse.Action:
    """`--column FIELD=COLUMN ...`: where the fields a command reads sit in the user's data
    (`seekling.datasets_io.parse_columns` turns it into a dict)."""
    return parser.add_argument("--column", nargs="*", default=[], metavar="FIELD=COLUMN",
                               help=f"read FIELD ({', '.join(fields)}) from COLUMN of your data, "
                                    "e.g. --column prompt=question answer=final")


def from_args(config: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """`config` built from the parsed flags named like its fields, then `overrides`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    return config(**{**values, **overrides})


def add_threads(parser: argparse.ArgumentParser | Any) -> argparse.Action:
    """The --threads flag every command shares; the command passes its value to
    `seekling.threads.choose_threads`."""
    return parser.add_argument("--threads", type=non_negative_int, default=0, metavar="N",
                               help="torch CPU threads (0: measured by a short probe of the free cores, see "
                                    "seekling.threads; a resumed speedrun reuses the count it started with)")


def add_action(actions: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A sub-command (`seekling data build`): listed with `text`, and its --help opens with it."""
    return actions.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
