"""The user's data in the formats people have: JSONL, Parquet, CSV, a saved `datasets` dataset, a hub id;
columns renamed with --column; a missing column or a wrong type names the file, the row and the column."""

import csv
import json

import pytest

from seekling.cli import main
from seekling.data import read_chat_jsonl, read_problems
from seekling.datasets_io import parse_columns, read_rows
from seekling.errors import ConfigError, DataError
from seekling.evalsets import load_gsm8k

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

ROWS = [{"question": "What is 1+1?", "final": "2", "level": 1},
        {"question": "What is 2+3?", "final": "5", "level": 2},
        {"question": "What is 4*4?", "final": "16", "level": 3}]
CHATS = [{"chat": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
         {"chat": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
COLUMNS = {"prompt": "question", "answer": "final"}


def write_all(tmp_path, rows, name="p"):
    """The same rows as JSONL, Parquet, CSV, a saved Dataset and a saved DatasetDict (train/test)."""
    jsonl = tmp_path / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    csv_path = tmp_path / f"{name}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    saved = tmp_path / f"{name}-ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    split = tmp_path / f"{name}-dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(split))
    return {"jsonl": jsonl, "parquet": parquet, "csv": csv_path, "saved": saved, "dict": split}


def test_every_format_gives_the_same_problems(tmp_path):
    sources = write_all(tmp_path, ROWS)
    expected = [(p.prompt, p.answer, p.id) for p in read_problems(sources["jsonl"], columns=COLUMNS)]
    assert [a for _, a, _ in expected] == ["2", "5", "16"]
    for kind in ("parquet", "csv", "saved"):
        got = [(p.prompt, p.answer, p.id) for p in read_problems(sources[kind], columns=COLUMNS)]
        assert got == expected, kind
    # a DatasetDict: the split asked for by the caller, or named after '@'
    assert [p.answer for p in read_problems(sources["dict"], columns=COLUMNS)] == ["2", "5"]
    assert [p.answer for p in read_problems(f"{sources['dict']}@test", columns=COLUMNS)] == ["16"]
    assert [p.answer for p in read_problems(sources["dict"], columns=COLUMNS, default_split="test")] == ["16"]
    with pytest.raises(DataError, match=r"no split 'validation'; it has train, test"):
        read_problems(f"{sources['dict']}@validation", columns=COLUMNS)


def test_rows_say_where_they_come_from(tmp_path):
    sources = write_all(tmp_path, ROWS)
    assert read_rows(sources["jsonl"])[1].where == f"{sources['jsonl']}:2"
    assert read_rows(sources["parquet"])[1].where == f"{sources['parquet']} row 2"
    assert read_rows(sources["csv"])[1].where == f"{sources['csv']}:3"  # line 1 is the header
    assert read_rows(f"{sources['dict']}@test")[0].where == f"{sources['dict']}@test row 1"


def test_conversations_from_every_format(tmp_path):
    sources = write_all(tmp_path, CHATS, "chat")
    expected = [c["chat"] for c in CHATS]
    for kind in ("jsonl", "parquet", "csv", "saved"):  # CSV: the list as a JSON cell
        assert read_chat_jsonl(sources[kind], {"messages": "chat"}) == expected, kind
    # a prompt and an answer make a user turn and the assistant's reply
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "hi", "output": "hello"}]), pairs)
    assert read_chat_jsonl(pairs, {"prompt": "instruction", "answer": "output"}) == [expected[0]]


def test_a_missing_column_or_a_wrong_type_names_file_row_and_column(tmp_path):
    sources = write_all(tmp_path, ROWS)
    with pytest.raises(DataError, match=r"p\.parquet row 1: no column 'problem' \(given for 'prompt' by --column "
                                        r"prompt=problem\); the row has 'question', 'final', 'level'"):
        read_problems(sources["parquet"], columns={"prompt": "problem", "answer": "final"})
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match=r"ragged\.jsonl:3: no column 'final'"):
        read_problems(ragged, columns=COLUMNS)
    with pytest.raises(DataError, match=r"p\.parquet row 1: row has no 'answer'; each problem needs"):
        read_problems(sources["parquet"], columns={"prompt": "question"})
    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "final": 16}]), typed)
    assert read_problems(typed, columns=COLUMNS)[0].answer == "16"  # a number column is an answer too
    pq.write_table(pa.Table.from_pylist([{"question": 7, "final": "1"}]), typed)
    with pytest.raises(DataError, match=r"typed\.parquet row 1: 'question' \(as prompt\) is int, not a string"):
        read_problems(typed, columns=COLUMNS)
    pq.write_table(pa.Table.from_pylist([{"question": "q", "final": [1]}, {"question": "q", "final": [1, 2]}]), typed)
    with pytest.raises(DataError, match=r"typed\.parquet row 1: 'final' \(as answer\) is list, not a string or a number"):
        read_problems(typed, columns=COLUMNS)
    with pytest.raises(DataError, match=r"chat\.csv:2: expected \{\"messages\": \[\.\.\.\]\}"):
        (tmp_path / "chat.csv").write_text("text\nhello\n")
        read_chat_jsonl(tmp_path / "chat.csv")


def test_files_that_are_not_what_they_say(tmp_path):
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"prompt": "not parquet"}\n')
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable Parquet file"):
        read_rows(fake)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match=r"folder: a directory, but not a dataset saved with save_to_disk"):
        read_rows(folder)
    with pytest.raises(DataError, match=r"missing\.csv: no such file"):
        read_rows(tmp_path / "missing.csv")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prompt,answer\nq,1,extra\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: more cells than the 2 columns"):
        read_rows(bad_csv)
    with pytest.raises(ConfigError, match=r"--column 'prompt': expected FIELD=COLUMN"):
        parse_columns(["prompt"], ("prompt", "answer"))
    with pytest.raises(ConfigError, match=r"unknown field 'question'; this command reads prompt, answer"):
        parse_columns(["question=prompt"], ("prompt", "answer"))


def test_hub_ids_reach_load_dataset_with_their_config_and_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS[:1])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = read_problems("hf:openai/gsm8k/main@test", columns=COLUMNS)
    read_rows("hf:someone/problems")
    assert calls == [("openai/gsm8k", "main", "test"), ("someone/problems", None, "train")]
    assert problems[0].answer == "2"

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"hf:someone/problems: cannot load from the Hugging Face hub \(ConnectionError"):
        read_rows("hf:someone/problems")
    with pytest.raises(ConfigError, match=r"expected hf:OWNER/NAME\[/CONFIG\]\[@SPLIT\]"):
        read_rows("hf:a/b/c/d")


def test_published_sets_read_from_parquet(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}]
    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    problem = load_gsm8k(path)[0]
    assert (problem.answer, problem.prompt) == ("7", rows[0]["question"])


def test_the_cli_reports_a_missing_column_and_exits_2(tmp_path, capsys):
    sources = write_all(tmp_path, CHATS, "chat")
    code = main(["sft", "--data", str(sources["parquet"]), "--column", "messages=conversation",
                 "--init-from", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "chat.parquet row 1: no column 'conversation'" in err and "'chat'" in err
    assert not (tmp_path / "run").exists()
