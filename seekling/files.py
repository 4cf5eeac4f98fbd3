"""Files written so that a kill at any moment leaves the old version or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary name next to `path`, fsync, and rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any, **dump_kwargs: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, **dump_kwargs) + "\n")
