"""Token shards for pre-training and chat batches for SFT: building, reading, deterministic loading.

On disk a data directory holds flat token files and one JSON index:

    index.json           {"format", "dtype", "vocab_size", "tokenizer_hash", "splits": {"train": {...}, "val": {...}}}
    train-00000.bin ...  raw uint16 tokens (uint32 when the vocabulary exceeds 65535), read with np.memmap
    val-00000.bin

Every document is stored as `<|begin_of_text|> ... <|end_of_text|>`, back to back, so the
end-of-text id separates documents (task problems are rendered in the chat format, which already
has this shape). The val split comes from the tasks' test split, from the last `val_fraction` of
each text file (cut at a line break, as nanoGPT does with Shakespeare) and from the JSONL records
whose text hashes into the `val_fraction` bucket.

`TokenLoader` cuts the token stream into windows of seq_len + 1 tokens, shuffles the windows once
per epoch from (seed, epoch), and serves global batches of batch_size * world_size windows, rank r
taking rows [r*B, (r+1)*B). Its position is (epoch, batch): `state_dict()` saved with a checkpoint
makes a resumed run see exactly the batches it would have seen. `SFTLoader` does the same for chat
conversations, with targets set to -100 wherever the loss mask is 0.

Run: `seekling data build --tokenizer runs/tok --tasks arithmetic,linear --num-examples 5000 --out runs/data`
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seekling.datasets_io import field_name, read_jsonl, read_rows, read_text_file  # noqa: F401 (re-exported)
from seekling.errors import DataError
from seekling.tasks import Problem, make_mixture, stable_hash, to_sft_example
from seekling.tokenizer import FIXED_TOKENS, ROLE_TOKENS, Tokenizer

INDEX_FILE = "index.json"
FORMAT = "seekling-tokens-v1"
IGNORE_INDEX = -100  # target value that torch's cross_entropy skips
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens, 256 MB as uint16
# what pre-training takes its loss on: every token, or not a chat document's user and system turns
LOSS_ON = ("all", "responses")
PROMPT_ROLE_IDS = [FIXED_TOKENS.index(ROLE_TOKENS[r]) for r in ("user", "system")]
ASSISTANT_ID = FIXED_TOKENS.index(ROLE_TOKENS["assistant"])
MASK_CHUNK_TOKENS = 1 << 22  # the prompt mask is computed this many tokens at a time


# ----------------------------------------------------------------------------- reading source files
def read_jsonl_texts(path: str | Path, field: str = "text") -> Iterator[str]:
    """The string `field` of each record of a JSONL file."""
    for number, record in read_jsonl(path, (field,)):
        if not isinstance(record[field], str):
            raise DataError(f"{path}:{number}: field {field!r} is {type(record[field]).__name__}, not a string")
        yield record[field]


def _json_cell(value: Any) -> Any:
    """A list or object stored as JSON text (a CSV cell, a string column) decoded; anything else as it is."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_chat_jsonl(source: str | Path, columns: dict[str, str] | None = None,
                    default_split: str = "train") -> list[list[dict[str, str]]]:
    """The conversations of a chat file or dataset (any source `read_rows` reads): a `messages` list of
    {"role", "content"} a row, or a `prompt` and an `answer` (a user turn and the assistant's reply);
    `columns` maps them to the data's own columns."""
    conversations = []
    for number, where, record in read_rows(source, columns=columns, default_split=default_split):
        messages = _json_cell(record.get("messages"))
        if messages is None and isinstance(record.get("prompt"), str) and isinstance(record.get("answer"), str):
            messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["answer"]}]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: expected {{\"messages\": [...]}} with at least one message in column "
                            f"{field_name('messages', columns)} (or string columns {field_name('prompt', columns)} "
                            f"and {field_name('answer', columns)})")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: message {i} needs a role (system, user or assistant) "
                                f"and a string content, got {json.dumps(m, default=str)[:80]}")
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return conversations


def read_problems(source: str | Path, unique: bool = False, columns: dict[str, str] | None = None,
                  default_split: str = "train") -> list[Problem]:
    """Problems from a file or dataset (any source `read_rows` reads), one `{"prompt", "answer", ["id",
    "task", "meta"]}` a row, `columns` mapping those fields to the data's own columns (a `messages`
    list may stand in for `prompt`: its last user turn is the question). A row without an id gets one
    from its prompt and answer, stable across runs. `unique` keeps the first row of each id (task
    files repeat problems; rejection sampling samples each once); GRPO keeps every row of its pool."""
    problems: dict[str, Problem] = {}
    for number, where, row in read_rows(source, columns=columns, default_split=default_split):
        prompt = row.get("prompt")
        messages = _json_cell(row.get("messages"))
        if prompt is None and isinstance(messages, list):
            users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            prompt = users[-1] if users else None
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{where}: {field_name('prompt', columns)} is {type(prompt).__name__}, not a string")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: row has no {field_name('prompt', columns)} (a non-empty string, or a user message)")
        answer = row.get("answer")
        if answer is None or str(answer).strip() == "":
            raise DataError(f"{where}: row has no {field_name('answer', columns)}; each problem needs a verifiable answer")
        if isinstance(answer, (list, dict, bool)):
            raise DataError(f"{where}: {field_name('answer', columns)} is {type(answer).__name__}, "
                            "not a string or a number")
        meta = _json_cell(row.get("meta")) or {}
        if not isinstance(meta, dict):
            raise DataError(f"{where}: {field_name('meta', columns)} must be an object")
        pid = str(row.get("id") or f"p-{stable_hash(prompt + '|' + str(answer)):016x}")
        problem = Problem(pid, str(row.get("task") or ""), prompt, str(answer), "", meta)
        problems.setdefault(pid if unique else str(number), problem)
    if not problems:
        raise DataError(f"{source}: no problems")
    return list(problems.values())


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the last `val_fraction` of the text, starting at a line break when there is one."""
    if val_fraction <= 0:
        return text, ""
    cut = int(len(text) * (1 - val_fraction))
    newline = text.find("\n", cut)
    cut = newline + 1 if 0 <= newline < len(text) - 1 else cut
    return text[:cut], text[cut:]


def in_val_bucket(text: str, val_fraction: float) -> bool:
    return stable_hash(text) % 1_000_000 < val_fraction * 1_000_000


# ----------------------------------------------------------------------------- writing shards
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents to `{split}-NNNNN.bin` files, starting a new file every `shard_tokens`."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._file = None

    def write(self, ids: Sequence[int]) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        self.documents += 1
        while len(array):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            array[:room].tofile(self._file)
            self.shards[-1]["tokens"] += len(array[:room])
            array = array[room:]

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> dict[str, Any]:
        if self._file is not None:
            self._file.close()
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "shards": self.shards}


def as_document(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """Wrap ids as `bos ... eos` unless they already are (chat renderings are)."""
    if not ids or ids[0] != tokenizer.bos_id:
        ids = [tokenizer.bos_id] + ids
    if ids[-1] != tokenizer.eos_id:
        ids = ids + [tokenizer.eos_id]
    return ids


def _encode_texts(tokenizer: Tokenizer, texts: Iterable[str], batch: int = 256) -> Iterator[list[int]]:
    chunk: list[str] = []
    for text in texts:
        if text:
            chunk.append(text)
        if len(chunk) == batch:
            yield from tokenizer.encode_batch(chunk)
            chunk = []
    if chunk:
        yield from tokenizer.encode_batch(chunk)


def build_token_shards(out_dir: str | Path, tokenizer: Tokenizer, tasks: Sequence[str] = (), num_examples: int = 0,
                       difficulty: dict[str, dict[str, Any]] | None = None, text_files: Sequence[str | Path] = (),
                       jsonl_files: Sequence[str | Path] = (), field: str = "text", val_fraction: float = 0.1,
                       seed: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict[str, Any]:
    """Tokenize every source into train and val shards under `out_dir`; returns the index written.

    Tasks contribute `num_examples` train problems each, and round(num_examples * val_fraction)
    (at least 1) test problems each to val, rendered as user/assistant chats."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not (tasks and num_examples > 0) and not text_files and not jsonl_files:
        raise DataError("no data: give tasks with num_examples > 0, text files or JSONL files")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}

    if tasks and num_examples > 0:
        n_val = max(1, round(num_examples * val_fraction)) if val_fraction > 0 else 0
        for split, n, writer in (("train", num_examples, writers["train"]), ("test", n_val, writers["val"])):
            for problem in (make_mixture(list(tasks), split, n, seed, difficulty) if n else []):
                writer.write(tokenizer.render_chat(to_sft_example(problem)["messages"])[0])
    for path in text_files:
        train_text, val_text = split_text(read_text_file(path), val_fraction)
        for text, writer in ((train_text, writers["train"]), (val_text, writers["val"])):
            if text:
                writer.write(as_document(tokenizer, tokenizer.encode(text)))
    for path in jsonl_files:
        texts = list(read_jsonl_texts(path, field))
        for split in ("train", "val"):
            chosen = (t for t in texts if in_val_bucket(t, val_fraction) == (split == "val"))
            for ids in _encode_texts(tokenizer, chosen):
                writers[split].write(as_document(tokenizer, ids))

    splits = {split: writer.close() for split, writer in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise DataError("the corpus is empty: no text to tokenize in the given sources")
    index = {
        "format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "tokenizer_hash": tokenizer.fingerprint,
        "sources": {"tasks": list(tasks), "num_examples": num_examples, "text": [str(p) for p in text_files],
                    "jsonl": [str(p) for p in jsonl_files], "val_fraction": val_fraction, "seed": seed},
        "splits": splits,
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def load_index(path: str | Path) -> dict[str, Any]:
    """The index of a data directory (or of the index file itself)."""
    path = Path(path)
    index_path = path / INDEX_FILE if path.is_dir() else path
    if not index_path.is_file():
        raise DataError(f"{path}: no {INDEX_FILE} (build one with `seekling data build`)")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{index_path}: not a {FORMAT} index")
    return index


def check_tokenizer(index: dict[str, Any], tokenizer: Tokenizer) -> None:
    """DataError when shards were written by another tokenizer than the one about to be used."""
    if index["tokenizer_hash"] != tokenizer.fingerprint:
        raise DataError(f"data was tokenized with tokenizer {index['tokenizer_hash'][:12]}, "
                        f"not with this one ({tokenizer.fingerprint[:12]}); rebuild the data")


# ----------------------------------------------------------------------------- loaders
class _EpochLoader:
    """Shared position logic: rows are shuffled per epoch from (seed, epoch); a global batch is
    `batch_size * world_size` consecutive rows of that order, and this rank takes its own slice."""

    def __init__(self, batch_size: int, seq_len: int, seed: int, rank: int, world_size: int):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.epoch, self.batch_in_epoch = 0, 0

    def _num_rows(self, epoch: int) -> int:
        raise NotImplementedError

    def _rows(self, epoch: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def batches_in_epoch(self, epoch: int) -> int:
        return self._num_rows(epoch) // self.global_batch

    def _order(self, epoch: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def batch_at(self, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) of global batch `batch` of `epoch`, each [B, T] int64."""
        start = batch * self.global_batch + self.rank * self.batch_size
        return self._rows(epoch, np.arange(start, start + self.batch_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; epochs follow one another without end (the trainer decides when to stop)."""
        if self.batch_in_epoch >= self.batches_in_epoch(self.epoch):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self.batches_in_epoch(self.epoch) == 0:
                raise DataError(f"epoch {self.epoch} has fewer rows than one global batch of {self.global_batch}")
        batch = self.batch_at(self.epoch, self.batch_in_epoch)
        self.batch_in_epoch += 1
        return batch

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise DataError(f"cannot resume the data loader: saved {key}={state.get(key)!r}, "
                                f"this loader has {key}={value!r}")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])


class TokenLoader(_EpochLoader):
    """Random windows of seq_len + 1 tokens from a split of a data directory.

    Windows are fixed, non-overlapping cuts of the token stream (window i starts at i * seq_len);
    each epoch visits every window in a fresh order and drops the last partial global batch.
    """

    def __init__(self, path: str | Path, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, split: str = "train", shuffle: bool = True, loss_on: str = "all"):
        super().__init__(batch_size, seq_len, seed, rank, world_size)
        if loss_on not in LOSS_ON:
            raise DataError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
        self.loss_on = loss_on
        self.index = load_index(path)
        directory = Path(path) if Path(path).is_dir() else Path(path).parent
        if split not in self.index["splits"]:
            raise DataError(f"{directory}: no {split!r} split (have {sorted(self.index['splits'])})")
        info = self.index["splits"][split]
        dtype = np.dtype(self.index["dtype"])
        self.shards = []
        for shard in info["shards"]:
            file = directory / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"{file}: missing or not {shard['tokens']} tokens long as {INDEX_FILE} says")
            if shard["tokens"]:
                self.shards.append(np.memmap(file, dtype=dtype, mode="r"))
        self.tokens = int(info["tokens"])
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.shuffle = shuffle
        self.num_windows = max(self.tokens - 1, 0) // seq_len
        needed = self.global_batch * seq_len + 1
        if self.num_windows < self.global_batch:
            raise DataError(f"{directory} {split}: {self.tokens} tokens, fewer than one global batch needs "
                            f"({self.global_batch} x {seq_len} + 1 = {needed}); use more data or a smaller batch")
        self._cached_order: tuple[int, np.ndarray] | None = None
        self._in_prompt = self._prompt_mask() if loss_on == "responses" else None

    def _num_rows(self, epoch: int) -> int:
        return self.num_windows

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "tokens": self.tokens, "shuffle": self.shuffle, "loss_on": self.loss_on}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict({"loss_on": "all", **state})  # checkpoints from before loss_on: "all"

    def _prompt_mask(self) -> np.ndarray:
        """[tokens] bool, one byte per token: True inside a user or system turn of a chat document
        (after its role token, up to the next role token), where `loss_on="responses"` takes no loss."""
        mask, state, start = np.zeros(self.tokens, dtype=bool), False, 0
        for shard in self.shards:
            for lo in range(0, len(shard), MASK_CHUNK_TOKENS):
                ids = np.asarray(shard[lo: lo + MASK_CHUNK_TOKENS])
                role = np.isin(ids, PROMPT_ROLE_IDS) | (ids == ASSISTANT_ID)
                last = np.maximum.accumulate(np.where(role, np.arange(len(ids)), -1))
                in_prompt = np.where(last >= 0, np.isin(ids[np.maximum(last, 0)], PROMPT_ROLE_IDS), state)
                mask[start: start + len(ids)] = in_prompt & ~role
                state, start = bool(in_prompt[-1]), start + len(ids)
        return mask

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split, across shard boundaries."""
        parts = []
        while length > 0:
            shard = int(np.searchsorted(self._starts, start, side="right")) - 1
            offset = start - int(self._starts[shard])
            piece = self.shards[shard][offset: offset + length]
            parts.append(piece)
            start, length = start + len(piece), length - len(piece)
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])

    def _rows(self, epoch: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.shuffle:
            windows = rows
        else:
            if self._cached_order is None or self._cached_order[0] != epoch:
                self._cached_order = (epoch, self._order(epoch, self.num_windows))
            windows = self._cached_order[1][rows]
        T = self.seq_len
        chunk_BT1 = np.stack([self._read(int(w) * T, T + 1) for w in windows]).astype(np.int64)
        chunk_BT1 = torch.from_numpy(chunk_BT1)
        targets_BT = chunk_BT1[:, 1:].contiguous()
        if self._in_prompt is not None:  # targets inside a prompt turn: no loss
            no_loss_BT = np.stack([self._in_prompt[int(w) * T + 1: int(w) * T + T + 1] for w in windows])
            targets_BT.masked_fill_(torch.from_numpy(no_loss_BT), IGNORE_INDEX)
        return chunk_BT1[:, :-1].contiguous(), targets_BT


class SFTLoader(_EpochLoader):
    """Batches of chat conversations with the loss on assistant tokens only.

    Each conversation is rendered with `Tokenizer.render_chat` and cut to seq_len + 1 tokens;
    conversations with no assistant token left after the cut are dropped. With `pack`, each epoch's
    shuffled conversations are laid greedily into rows of seq_len + 1 without splitting one (they
    attend to each other inside a row, as in nanochat's SFT); without it each row holds one
    conversation. Rows are padded with `<|pad|>` inputs and -100 targets.
    """

    def __init__(self, conversations: str | Path | Sequence, tokenizer: Tokenizer, batch_size: int,
                 seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1, pack: bool = True):
        super().__init__(batch_size, seq_len, seed, rank, world_size)
        source = str(conversations) if isinstance(conversations, (str, Path)) else "conversations"
        if isinstance(conversations, (str, Path)):
            conversations = read_chat_jsonl(conversations)
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        self.dropped = 0
        for conversation in conversations:
            messages = conversation["messages"] if isinstance(conversation, dict) else conversation
            ids, mask = tokenizer.render_chat(messages)
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            if not any(mask[1:]):  # nothing left to learn from: every target would be -100
                self.dropped += 1
                continue
            self.examples.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
        if not self.examples:
            raise DataError(f"{source}: no conversation with an assistant turn within seq_len={seq_len}")
        self.pad_id, self.pack = tokenizer.pad_id, pack
        self._cached_rows: tuple[int, list[list[int]]] | None = None
        if self._num_rows(0) < self.global_batch:
            raise DataError(f"{source}: {self._num_rows(0)} rows of {len(self.examples)} conversations, "
                            f"fewer than one global batch of {self.global_batch}")

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "examples": len(self.examples), "pack": self.pack}

    def _layout(self, epoch: int) -> list[list[int]]:
        """The example indices in each row of `epoch`, in row order."""
        if self._cached_rows is None or self._cached_rows[0] != epoch:
            order = self._order(epoch, len(self.examples)).tolist()
            if not self.pack:
                rows = [[i] for i in order]
            else:
                rows, current, used = [], [], 0
                for i in order:
                    length = len(self.examples[i][0])
                    if current and used + length > self.seq_len + 1:
                        rows.append(current)
                        current, used = [], 0
                    current.append(i)
                    used += length
                rows.append(current)
            self._cached_rows = (epoch, rows)
        return self._cached_rows[1]

    def _num_rows(self, epoch: int) -> int:
        return len(self._layout(epoch))

    def _rows(self, epoch: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self._layout(epoch)
        T = self.seq_len
        inputs_BT = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        targets_BT = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for b, row in enumerate(rows):
            ids = np.concatenate([self.examples[i][0] for i in layout[row]])
            mask = np.concatenate([self.examples[i][1] for i in layout[row]])
            targets = np.where(mask[1:], ids[1:], IGNORE_INDEX)
            inputs_BT[b, : len(ids) - 1] = torch.from_numpy(ids[:-1])
            targets_BT[b, : len(ids) - 1] = torch.from_numpy(targets)
        return inputs_BT, targets_BT
