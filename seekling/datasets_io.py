"""The one reader of the user's data: JSON Lines, Parquet, CSV, or a Hugging Face `datasets` dataset.

Every loader of records (chat conversations for SFT, problems for GRPO, sampling and evaluation)
reads through `read_rows`, which returns `Row(number, where, data)`: the row's number (the line of
a JSON Lines or CSV file, the 1-based row of Parquet and datasets), the place an error message
names (`data.jsonl:7`, `data.parquet row 7`, `hf:openai/gsm8k/main@test row 7`) and the record as
a dict. A source is

    data.jsonl, data.jsonl.gz   one JSON object a line
    data.parquet                via pyarrow (`pip install pyarrow`)
    data.csv, data.tsv          a header line; a `messages` cell holds the JSON list
    DIR                         a dataset saved with `datasets`' `save_to_disk` (offline)
    hf:OWNER/NAME[/CONFIG]      a dataset on the Hugging Face hub (needs `datasets` and the network)

and a dataset (saved or on the hub) takes its split after `@` (`DIR@test`); without it the split
the caller asks for is read, or the only one there is. `columns` maps the fields seekling reads to
the columns of the data (`{"prompt": "question"}`: the prompt is in column `question`); the CLI's
`--column FIELD=COLUMN` builds it. A missing column names the row and the column.

    python -c "from seekling.datasets_io import read_rows; print(read_rows('seekling/evaldata/gsm8k/test.jsonl.gz')[0].where)"
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from seekling.errors import ConfigError, DataError

HUB_PREFIX = "hf:"
CHAT_FIELDS = ("messages", "prompt", "answer")  # what `--column` may rename, per kind of data
PROBLEM_FIELDS = ("prompt", "answer", "messages", "id", "task", "meta")
SOURCE_HELP = ("a JSONL, Parquet or CSV file, a dataset saved with `datasets` (DIR[@SPLIT]) or "
               "hf:OWNER/NAME[/CONFIG][@SPLIT]")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}


class Row(NamedTuple):
    number: int  # line of a JSONL / CSV file, 1-based row of Parquet and datasets
    where: str  # what an error message names: "file:line" or "source row N"
    data: dict[str, Any]


# ----------------------------------------------------------------------------- plain files
def read_text_file(path: str | Path) -> str:
    """The whole file as text (gzip-compressed when it ends in .gz); a DataError naming the line and byte
    if it is not UTF-8."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})") from None


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file.
    A line that is not JSON, not an object or lacks a `required` field raises a DataError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        missing = [key for key in required if key not in row]
        if missing:
            raise DataError(f"{path}:{number}: missing field {', '.join(map(repr, missing))}")
        rows.append((number, row))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid (not Parquet) or OSError (unreadable)
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [Row(i, f"{path} row {i}", record) for i, record in enumerate(table.to_pylist(), start=1)]


def _read_csv(path: Path) -> list[Row]:
    text = read_text_file(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=CSV_DELIMITERS[_csv_suffix(path)])
    if not reader.fieldnames:
        raise DataError(f"{path}: empty CSV file (no header line)")
    rows = []
    for record in reader:
        line = reader.line_num
        if None in record:
            raise DataError(f"{path}:{line}: more cells than the {len(reader.fieldnames)} columns of the header")
        rows.append(Row(line, f"{path}:{line}", dict(record)))
    return rows


def _csv_suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


# ----------------------------------------------------------------------------- datasets
def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("reading a Hugging Face dataset needs the `datasets` package (pip install datasets)") from None
    return datasets


def _pick_split(dataset, source: str, split: str | None, default_split: str):
    """A Dataset from a Dataset or DatasetDict: the asked split, else the default, else the only one."""
    if not hasattr(dataset, "keys"):  # a single Dataset: there is nothing to choose
        if split is not None:
            raise DataError(f"{source}: a single dataset with no splits; drop '@{split}'")
        return dataset
    splits = list(dataset.keys())
    chosen = split or (default_split if default_split in splits else (splits[0] if len(splits) == 1 else None))
    if chosen not in splits:
        raise DataError(f"{source}: no split {chosen or default_split!r}; it has {', '.join(splits)} "
                        f"(choose one with {source.split('@')[0]}@SPLIT)")
    return dataset[chosen]


def _read_dataset(source: str, default_split: str) -> list[Row]:
    base, _, split = source.partition("@")
    datasets = _datasets()
    if base.startswith(HUB_PREFIX):
        parts = base[len(HUB_PREFIX):].split("/")
        if not 1 <= len(parts) <= 3 or not all(parts):
            raise ConfigError(f"{source}: expected hf:OWNER/NAME[/CONFIG][@SPLIT], e.g. hf:openai/gsm8k/main@test")
        name, config = ("/".join(parts[:2]), parts[2]) if len(parts) == 3 else ("/".join(parts), None)
        try:
            dataset = datasets.load_dataset(name, config, split=split or default_split)
        except Exception as e:  # offline, unknown id, unknown split: the library's own words
            raise DataError(f"{source}: cannot load from the Hugging Face hub ({type(e).__name__}: {e})") from None
    else:
        try:
            dataset = _pick_split(datasets.load_from_disk(base), source, split or None, default_split)
        except FileNotFoundError as e:
            raise DataError(f"{base}: not a dataset saved with save_to_disk ({e})") from None
    return [Row(i, f"{source} row {i}", record) for i, record in enumerate(dataset, start=1)]


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (
        path / "state.json").is_file()


# ----------------------------------------------------------------------------- the one entry point
def read_rows(source: str | Path, required: Sequence[str] = (), columns: dict[str, str] | None = None,
              default_split: str = "train") -> list[Row]:
    """The records of `source` (see the module docstring) with `columns` renamed to the fields seekling
    reads; each `required` field must be there (a DataError naming the row and the column otherwise)."""
    source = str(source)
    base = source.partition("@")[0]
    path = Path(source)
    if source.startswith(HUB_PREFIX) or (Path(base).is_dir() and is_saved_dataset(Path(base))):
        rows = _read_dataset(source, default_split)
    elif path.is_dir():
        raise DataError(f"{path}: a directory, but not a dataset saved with save_to_disk (no dataset_info.json "
                        "or dataset_dict.json)")
    elif not path.is_file():
        raise DataError(f"{path}: no such file")
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    elif _csv_suffix(path) in CSV_DELIMITERS:
        rows = _read_csv(path)
    else:  # .jsonl, .jsonl.gz, and any other name: JSON Lines is the format of the project's own files
        rows = [Row(n, f"{path}:{n}", r) for n, r in read_jsonl(path)]
    return [Row(r.number, r.where, rename(r, columns or {}, required)) for r in rows]


def rename(row: Row, columns: dict[str, str], required: Iterable[str] = ()) -> dict[str, Any]:
    """`row.data` with column `columns[field]` also under `field`; each `required` field present."""
    data = dict(row.data)
    for field, column in columns.items():
        if column not in row.data:
            raise DataError(f"{row.where}: no column {column!r} (given for {field!r} by --column {field}={column}); "
                            f"the row has {', '.join(map(repr, row.data)) or 'no columns'}")
        data[field] = row.data[column]
    missing = [f for f in required if f not in data]
    if missing:
        raise DataError(f"{row.where}: missing field {', '.join(map(repr, missing))} (the row has "
                        f"{', '.join(map(repr, row.data)) or 'no columns'}; map yours with --column FIELD=COLUMN)")
    return data


def field_name(field: str, columns: dict[str, str] | None) -> str:
    """How an error message names a field: `'prompt'`, or `'question' (as prompt)` when mapped."""
    column = (columns or {}).get(field)
    return f"{column!r} (as {field})" if column and column != field else repr(field)


def parse_columns(specs: Sequence[str], fields: Sequence[str]) -> dict[str, str]:
    """["prompt=question", "answer=final"] -> {"prompt": "question", "answer": "final"}; fields checked."""
    columns = {}
    for spec in specs:
        field, sep, column = spec.partition("=")
        if not sep or not field or not column:
            raise ConfigError(f"--column {spec!r}: expected FIELD=COLUMN, e.g. prompt=question")
        if field not in fields:
            raise ConfigError(f"--column {spec!r}: unknown field {field!r}; this command reads {', '.join(fields)}")
        columns[field] = column
    return columns
