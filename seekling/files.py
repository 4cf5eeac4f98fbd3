"""Files written so that a kill at any moment leaves the old version or the new one, never half of one,
and the check that an output can be written, made before the work that produces it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from seekling.errors import SeeklingError


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary name next to `path`, fsync, and rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(new: str | Path, target: str | Path, old: str | Path) -> None:
    """Rename the directory `new` to `target`. An existing `target` is renamed to `old` first and deleted
    only once `new` is in its place, so a kill at any moment leaves one of the two whole."""
    if not os.path.exists(target):
        return os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | Path, obj: Any, **dump_kwargs: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, **dump_kwargs) + "\n")


def check_writable(path: str | Path, flag: str, directory: bool = False) -> None:
    """SeeklingError naming `flag` when `path` (a file, or with `directory` a directory) cannot be
    written, checked before any work: a probe file is written and removed in `path` (a directory)
    or the nearest directory above it that exists. Nothing is left behind, not even `path`."""
    path = Path(path)
    if not directory and path.is_dir():
        raise SeeklingError(f"{flag} {path}: is a directory; give a file name")
    if directory and path.exists() and not path.is_dir():
        raise SeeklingError(f"{flag} {path}: is a file, not a directory")
    where = path if directory and path.is_dir() else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise SeeklingError(f"{flag} {path}: {where} is a file, not a directory")
    probe = where / f".write-test.{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
        if path.is_file():
            with open(path, "a"):
                pass
    except OSError as e:
        raise SeeklingError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose a writable path") from None
