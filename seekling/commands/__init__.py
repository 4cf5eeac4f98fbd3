"""Subcommands of the `seekling` CLI, one module each (see seekling/cli.py), their help formatter, and
the two helpers that make a trainer's settings dataclass the one declaration of its flags:
`add_setting` adds the flag of a field (default, type and help from the field), `from_args` builds
the dataclass from parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

_TYPES = {"int": int, "float": float, "str": str}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (a command's module docstring) and each flag's real default after
    its help; none for required flags, switches, None, empty lists and flags whose help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.required or action.nargs == 0 or default is None or default is argparse.SUPPRESS
                or default == [] or "default" in text):
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
