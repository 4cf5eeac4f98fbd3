"""Data pipeline: shards hold exactly the rendered documents, the token loader serves every window
once per epoch and resumes exactly, ranks split global batches, and the SFT loader supervises the
assistant tokens only. Bad inputs fail with DataError naming file and line."""

import json

import numpy as np
import pytest
import torch

from seekling.cli import main
from seekling.data import (
    IGNORE_INDEX,
    SFTLoader,
    TokenLoader,
    build_token_shards,
    check_tokenizer,
    load_index,
    read_chat_jsonl,
    split_text,
    token_dtype,
)
from seekling.errors import DataError
from seekling.tasks import completion_text, make_mixture, make_problems, to_sft_example
from seekling.tokenizer import Tokenizer

TASKS = ["arithmetic", "linear"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    problems = make_mixture(["arithmetic", "countdown", "linear", "wordproblem"], "train", 100, seed=0)
    texts = [p.prompt for p in problems] + [completion_text(p) for p in problems]
    return Tokenizer.train(texts + ["the quick brown fox jumps over the lazy dog\n"] * 20, vocab_size=400)


@pytest.fixture(scope="module")
def task_data(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    build_token_shards(out, tok, tasks=TASKS, num_examples=200, val_fraction=0.1, seed=0)
    return out


def stream(directory, split="train") -> np.ndarray:
    index = load_index(directory)
    return np.concatenate([np.fromfile(directory / s["file"], dtype=index["dtype"])
                           for s in index["splits"][split]["shards"]])


def documents(tokens: np.ndarray, bos: int) -> list[list[int]]:
    """Split a stream at each bos (chat documents hold an eos after every turn, not just the last)."""
    starts = np.flatnonzero(tokens == bos)
    assert starts[0] == 0
    return [tokens[a:b].tolist() for a, b in zip(starts, np.r_[starts[1:], len(tokens)])]


def test_task_shards_hold_the_rendered_problems(tok, task_data):
    index = load_index(task_data)
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size
    assert index["tokenizer_hash"] == tok.fingerprint
    check_tokenizer(index, tok)
    for split, source_split, n in (("train", "train", 200), ("val", "test", 20)):
        problems = make_mixture(TASKS, source_split, n, seed=0)
        tokens = stream(task_data, split)
        assert len(tokens) == index["splits"][split]["tokens"]
        assert index["splits"][split]["documents"] == len(problems)
        docs = documents(tokens, tok.bos_id)
        assert [tok.decode(d) for d in docs] == [tok.chat_text(to_sft_example(p)["messages"]) for p in problems]


def test_dtype_choice():
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(129280) == np.uint32


def test_loader_windows_shapes_and_epoch_coverage(task_data):
    B, T = 4, 32
    tokens = stream(task_data)
    loaders = [TokenLoader(task_data, B, T, seed=1, rank=r, world_size=2) for r in range(2)]
    per_epoch = loaders[0].batches_in_epoch(0)
    assert per_epoch == (len(tokens) - 1) // T // (2 * B)
    starts = []
    for _ in range(per_epoch):
        for loader in loaders:
            x, y = next(loader)
            assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])
            for row in range(B):  # each row is one window of the stream, cut at a multiple of T
                start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
                    tokens, T)[::T] == x[row].numpy(), axis=1))[0]) * T
                assert torch.equal(y[row], torch.from_numpy(tokens[start + 1: start + T + 1].astype(np.int64)))
                starts.append(start)
    assert len(starts) == len(set(starts)) == per_epoch * 2 * B  # no window twice within an epoch
    assert loaders[0].state_dict()["epoch"] == 0
    next(loaders[0])
    assert loaders[0].state_dict()["epoch"] == 1 and loaders[0].state_dict()["batch_in_epoch"] == 1


def test_ranks_split_the_global_batch(task_data):
    single = TokenLoader(task_data, 6, 16, seed=3)
    ranks = [TokenLoader(task_data, 2, 16, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_loader_is_deterministic_and_resumes_mid_epoch(task_data):
    def run(loader, n):
        return [next(loader) for _ in range(n)]

    reference = run(TokenLoader(task_data, 4, 64, seed=5), 40)  # spans several epochs
    assert reference[0][0].tolist() != run(TokenLoader(task_data, 4, 64, seed=6), 1)[0][0].tolist()
    first = TokenLoader(task_data, 4, 64, seed=5)
    run(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = TokenLoader(task_data, 4, 64, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(reference[13:], run(resumed, 27)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(task_data, 4, 32, seed=5).load_state_dict(state)


def test_shards_are_read_across_boundaries(tok, task_data, tmp_path):
    build_token_shards(tmp_path, tok, tasks=TASKS, num_examples=200, val_fraction=0.1, shard_tokens=1000)
    index = load_index(tmp_path)
    assert len(index["splits"]["train"]["shards"]) > 3
    assert np.array_equal(stream(tmp_path), stream(task_data))
    a, b = TokenLoader(task_data, 8, 100, seed=0), TokenLoader(tmp_path, 8, 100, seed=0)
    for _ in range(10):
        assert torch.equal(next(a)[0], next(b)[0])
    val = TokenLoader(tmp_path, 2, 16, split="val", shuffle=False)
    x, _ = next(val)
    assert x[0].tolist() == stream(tmp_path, "val")[:16].tolist()  # unshuffled: in order


def test_loss_on_responses_takes_no_loss_inside_prompt_turns(tok, task_data, tmp_path, monkeypatch):
    """loss_on="responses": exactly the targets inside a user turn (after <|user|>, up to <|assistant|>)
    are -100, checked against a token-by-token reading of the stream, also where a shard boundary and
    a chunk of the mask computation fall inside a turn; inputs and every other target are unchanged."""
    import seekling.data as data

    monkeypatch.setattr(data, "MASK_CHUNK_TOKENS", 7)
    build_token_shards(tmp_path, tok, tasks=TASKS, num_examples=200, val_fraction=0.1, shard_tokens=1000)
    user, assistant = tok.token_to_id("<|user|>"), tok.token_to_id("<|assistant|>")
    inside, expected = False, []
    for t in stream(tmp_path).tolist():
        inside = {user: True, assistant: False}.get(t, inside)
        expected.append(inside and t not in (user, assistant))
    plain = TokenLoader(tmp_path, 4, 50, seed=1, shuffle=False)
    masked = TokenLoader(tmp_path, 4, 50, seed=1, shuffle=False, loss_on="responses")
    for batch in range(5):
        (x, y), (mx, my) = next(plain), next(masked)
        assert torch.equal(x, mx)
        for row in range(4):
            start = (batch * 4 + row) * 50 + 1  # the targets' positions in the stream
            no_loss = np.array(expected[start: start + 50])
            assert (my[row] == IGNORE_INDEX).tolist() == no_loss.tolist()
            assert my[row][~torch.from_numpy(no_loss)].tolist() == y[row][~torch.from_numpy(no_loss)].tolist()
    assert 0.1 < np.mean(expected) < 0.5  # some, not most, tokens are the problems' text
    state = TokenLoader(tmp_path, 4, 50, seed=1, loss_on="responses").state_dict()
    with pytest.raises(DataError, match="loss_on"):  # a resume checks the setting
        TokenLoader(tmp_path, 4, 50, seed=1).load_state_dict(state)
    TokenLoader(tmp_path, 4, 50, seed=1).load_state_dict({k: v for k, v in state.items() if k != "loss_on"})
    with pytest.raises(DataError, match="loss_on must be one of"):
        TokenLoader(tmp_path, 4, 50, loss_on="prompts")


def test_text_and_jsonl_sources(tok, tmp_path):
    book = "".join(f"Line {i} of the book, with a fox.\n" for i in range(200))
    (tmp_path / "book.txt").write_text(book)
    records = [f"record {i}: the lazy dog sleeps" for i in range(300)]
    (tmp_path / "web.jsonl").write_text("\n".join(json.dumps({"body": r}) for r in records) + "\n")
    out = tmp_path / "data"
    index = build_token_shards(out, tok, text_files=[tmp_path / "book.txt"], jsonl_files=[tmp_path / "web.jsonl"],
                               field="body", val_fraction=0.1)
    train, val = documents(stream(out), tok.bos_id), documents(stream(out, "val"), tok.bos_id)
    text = [tok.decode(d, skip_special=True) for d in train + val]
    assert text[0] + text[len(train)] == book  # the book's tail is its val part
    assert text[0].endswith("\n") and text[len(train)].startswith("Line ")  # cut at a line break
    assert 0.08 < len(text[len(train)]) / len(book) < 0.11
    assert sorted(text[1:len(train)] + text[len(train) + 1:]) == sorted(records)
    assert 10 < index["splits"]["val"]["documents"] - 1 < 60  # ~10% of 300 records by hash
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in train + val)
    assert split_text("abc", 0.0) == ("abc", "")


def test_bad_inputs(tok, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("ok line\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:2: not UTF-8"):
        build_token_shards(tmp_path / "o", tok, text_files=[tmp_path / "latin1.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        build_token_shards(tmp_path / "o", tok, jsonl_files=[tmp_path / "bad.jsonl"])
    (tmp_path / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:2: missing field 'text'"):
        build_token_shards(tmp_path / "o", tok, jsonl_files=[tmp_path / "nofield.jsonl"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        build_token_shards(tmp_path / "o", tok, text_files=[tmp_path / "empty.txt"])
    with pytest.raises(DataError, match="no data"):
        build_token_shards(tmp_path / "o", tok)
    (tmp_path / "small.txt").write_text("a short text\n")
    build_token_shards(tmp_path / "small", tok, text_files=[tmp_path / "small.txt"], val_fraction=0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        TokenLoader(tmp_path / "small", 4, 64)
    with pytest.raises(DataError, match="no index.json"):
        TokenLoader(tmp_path, 4, 64)
    other = Tokenizer.train(["completely different text"] * 10, vocab_size=300)
    with pytest.raises(DataError, match="rebuild the data"):
        check_tokenizer(load_index(tmp_path / "small"), other)


def test_sft_loader_masks_everything_but_the_replies(tok):
    problems = make_problems("wordproblem", "train", 30, seed=0)
    loader = SFTLoader([to_sft_example(p) for p in problems], tok, batch_size=3, seq_len=128, seed=0, pack=False)
    seen = set()
    for _ in range(loader.batches_in_epoch(0)):
        x, y = next(loader)
        assert x.shape == y.shape == (3, 128) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x, y):
            supervised = row_y[row_y != IGNORE_INDEX].tolist()
            reply = tok.decode(supervised)
            assert reply.endswith("<|end_of_text|>") and reply.startswith("<think>")
            seen.add(reply.removesuffix("<|end_of_text|>"))
            # inputs are the chat; targets are the inputs shifted by one, where supervised
            n = int((row_x != tok.pad_id).sum())
            assert tok.decode(row_x[:n].tolist()).startswith("<|begin_of_text|><|user|>")
            keep = row_y[: n - 1] != IGNORE_INDEX
            assert torch.equal(row_y[: n - 1][keep], row_x[1:n][keep])
            assert bool((row_y[n:] == IGNORE_INDEX).all())
    assert seen == {completion_text(p) for p in problems}


def test_sft_packing_keeps_every_supervised_token(tok):
    examples = [to_sft_example(p) for p in make_problems("arithmetic", "train", 40, seed=1)]
    packed = SFTLoader(examples, tok, batch_size=2, seq_len=256, seed=0, pack=True)
    rows = packed._num_rows(0)
    assert rows < len(examples) / 2  # several conversations per row
    _, y = packed._rows(0, np.arange(rows))
    expected = sum(sum(tok.render_chat(e["messages"])[1][1:]) for e in examples)
    assert int((y != IGNORE_INDEX).sum()) == expected
    # resume in the middle gives the same batches as running straight through
    straight = [next(packed) for _ in range(6)]
    again = SFTLoader(examples, tok, batch_size=2, seq_len=256, seed=0, pack=True)
    [next(again) for _ in range(2)]
    resumed = SFTLoader(examples, tok, batch_size=2, seq_len=256, seed=0, pack=True)
    resumed.load_state_dict(again.state_dict())
    for (x, y), (rx, ry) in zip(straight[2:], [next(resumed) for _ in range(4)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_sft_truncation_and_errors(tok, tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "fox " * 100}, {"role": "assistant", "content": "ok"}]}
    short = to_sft_example(make_problems("linear", "train", 1, seed=0)[0])
    loader = SFTLoader([long_prompt, short, short], tok, batch_size=1, seq_len=64, pack=False)
    assert loader.dropped == 1 and len(loader.examples) == 2
    with pytest.raises(DataError, match="no conversation with an assistant turn"):
        SFTLoader([long_prompt], tok, batch_size=1, seq_len=64)
    with pytest.raises(DataError, match="fewer than one global batch"):
        SFTLoader([short], tok, batch_size=2, seq_len=64, pack=False)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(short) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: message 0 needs a role"):
        read_chat_jsonl(path)
    path.write_text(json.dumps(short) + "\n" + json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: expected"):
        SFTLoader(path, tok, batch_size=1, seq_len=64)


def test_cli_end_to_end(tmp_path, capsys):
    tok_dir, data_dir, sft = tmp_path / "tok", tmp_path / "data", tmp_path / "sft.jsonl"
    assert main(["tokenizer", "train", "--tasks", "countdown,linear", "--num-examples", "100",
                 "--vocab-size", "320", "--out", str(tok_dir)]) == 0
    assert main(["data", "build", "--tokenizer", str(tok_dir), "--tasks", "countdown,linear",
                 "--num-examples", "100", "--difficulty", "linear.both_sides=true", "--out", str(data_dir)]) == 0
    assert "train:" in capsys.readouterr().out
    tok = Tokenizer.load(tok_dir)
    check_tokenizer(load_index(data_dir), tok)
    x, _ = next(TokenLoader(data_dir, 2, 32, split="val"))
    assert x.shape == (2, 32)
    assert main(["data", "sft", "--tasks", "countdown", "--num-examples", "8", "--out", str(sft)]) == 0
    assert len(read_chat_jsonl(sft)) == 8
    x, y = next(SFTLoader(sft, tok, batch_size=2, seq_len=128))
    assert (y != IGNORE_INDEX).any()
    assert main(["data", "show", "--data", str(data_dir)]) == 0
    assert main(["data", "build", "--tokenizer", str(tmp_path), "--tasks", "linear", "--out", str(data_dir)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
