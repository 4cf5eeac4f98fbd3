"""Byte-level BPE tokenizer with the chat format, saved in the Hugging Face layout.

The vocabulary starts with ten fixed ids: six special tokens for documents and chat turns, then the
four reasoning tags, which are ordinary added tokens (not "special") so that they always encode as
one id and survive `decode(..., skip_special=True)` for the reward functions:

    0 <|begin_of_text|>  1 <|end_of_text|>  2 <|pad|>  3 <|user|>  4 <|assistant|>  5 <|system|>
    6 <think>  7 </think>  8 <answer>  9 </answer>

Pre-tokenization splits every digit into its own piece before the ByteLevel step (small models learn
arithmetic far better when "1234" is four tokens, not one or two arbitrary chunks). ByteLevel
encoding covers all 256 bytes, so `decode(encode(s)) == s` for any text.

The chat format (the same text the Jinja `chat_template` in `tokenizer_config.json` produces):

    <|begin_of_text|><|system|>...<|end_of_text|><|user|>...<|end_of_text|><|assistant|>...<|end_of_text|>

`render_chat` returns the ids with a loss mask that is 1 on the assistant's content and on the
`<|end_of_text|>` that closes each assistant turn (so the model learns to stop), 0 elsewhere.

Run: `seekling tokenizer train --tasks arithmetic,countdown --num-examples 2000 --vocab-size 512 --out runs/tok`
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from seekling.errors import ConfigError, DataError
from seekling.files import write_json_atomic

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
ROLE_TOKENS = {"user": "<|user|>", "assistant": "<|assistant|>", "system": "<|system|>"}
SPECIAL_TOKENS = (BOS, EOS, PAD, ROLE_TOKENS["user"], ROLE_TOKENS["assistant"], ROLE_TOKENS["system"])
# The reasoning tags of the R1 format `<think> ... </think> <answer> ... </answer>`, defined here once.
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAG_TOKENS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
FIXED_TOKENS = SPECIAL_TOKENS + TAG_TOKENS  # in id order: FIXED_TOKENS[i] has id i
MIN_VOCAB_SIZE = len(FIXED_TOKENS) + 256  # the fixed tokens plus one token per byte

# `{% generation %}` marks what transformers reports in `return_assistant_tokens_mask`: the same
# span as our loss mask (assistant content plus its closing eos).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class Tokenizer:
    """A trained byte-level BPE tokenizer plus the chat format. Build it with `train` or `load`."""

    def __init__(self, backend: _HFTokenizer, source: str = "<memory>"):
        for i, token in enumerate(FIXED_TOKENS):
            if backend.token_to_id(token) != i:
                raise DataError(f"{source}: expected {token!r} at id {i}, found id "
                                f"{backend.token_to_id(token)}; not a seekling tokenizer")
        self._backend = backend
        self.bos_id, self.eos_id, self.pad_id = 0, 1, 2
        self.user_id, self.assistant_id, self.system_id = 3, 4, 5
        self.think_id, self.think_end_id, self.answer_id, self.answer_end_id = 6, 7, 8, 9
        self._role_ids = {"user": self.user_id, "assistant": self.assistant_id, "system": self.system_id}

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Learn BPE merges from `texts`. The result can be smaller than `vocab_size` when the corpus
        has too few distinct pairs; `vocab_size` on the result is the real size."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(f"vocab_size {vocab_size} is too small: the fixed tokens and the 256 "
                              f"byte tokens alone need {MIN_VOCAB_SIZE}")
        backend = _HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            # The trainer puts these first, in order, which fixes ids 0..9.
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in FIXED_TOKENS], show_progress=False)
        non_empty = (text for text in texts if text.strip())
        first = next(non_empty, None)
        if first is None:
            raise DataError("cannot train a tokenizer on an empty corpus (no non-blank text)")
        backend.train_from_iterator(itertools.chain([first], non_empty), trainer)
        # The trainer marks every reserved token special; the reasoning tags must not be, or
        # decode(skip_special=True) would delete them. `add_tokens` would flip the flag but not the
        # set decode consults, so edit the serialised form instead (ids stay as they are).
        state = json.loads(backend.to_str())
        for entry in state["added_tokens"]:
            if entry["content"] in TAG_TOKENS:
                entry["special"] = False
        return cls(_HFTokenizer.from_str(json.dumps(state)))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load `directory/tokenizer.json` written by `save` (the other files are for transformers)."""
        path = Path(directory) / "tokenizer.json"
        if not Path(directory).is_dir():
            raise DataError(f"{directory}: tokenizer directory does not exist")
        if not path.is_file():
            raise DataError(f"{directory}: no tokenizer.json here (train one with `seekling tokenizer train`)")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception for bad JSON
            raise DataError(f"{path}: not a valid tokenizer file ({e})") from None
        return cls(backend, source=str(path))

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out / "tokenizer.json"))
        special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        write_json_atomic(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", **special_map, "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False, "padding_side": "right"})
        write_json_atomic(out / "special_tokens_map.json", special_map)
        return out

    # -- ids and text --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: data shards record it so a mismatch can be caught."""
        return hashlib.sha256(self._backend.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no bos/eos added. Special-token strings in the text (such as a
        literal "<|end_of_text|>") become their single ids, as in transformers."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def max_token_bytes(self) -> int:
        """The most bytes any one token stands for (special-token strings included)."""
        return max(len(t) for t in self._backend.get_vocab(with_added_tokens=True))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel inside the Rust library."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`. `skip_special` drops ids 0-5 (document and chat markers) but keeps the
        reasoning tags."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # -- chat ----------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """Ids of a conversation and its loss mask (1 on assistant content and its closing eos).

        Each message is encoded on its own; since every message is bracketed by special tokens,
        the result equals encoding the whole `chat_text` at once (tested against transformers).
        """
        ids, mask = [self.bos_id], [0]
        for i, message in enumerate(messages):
            role, content = _check_message(message, i)
            piece = [self._role_ids[role]] + self.encode(content) + [self.eos_id]
            ids += piece
            on = 1 if role == "assistant" else 0
            mask += [0] + [on] * (len(piece) - 1)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Ids to feed a model for generation: the conversation followed by `<|assistant|>`."""
        return self.render_chat(messages, add_generation_prompt=True)[0]

    def chat_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text: exactly what the Jinja `chat_template` renders."""
        parts = [BOS]
        for i, message in enumerate(messages):
            role, content = _check_message(message, i)
            parts.append(ROLE_TOKENS[role] + content + EOS)
        if add_generation_prompt:
            parts.append(ROLE_TOKENS["assistant"])
        return "".join(parts)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"


def _check_message(message: dict, index: int) -> tuple[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise DataError(f"message {index}: expected {{'role': ..., 'content': str}}, got {message!r:.80}")
    role = message.get("role")
    if role not in ROLE_TOKENS:
        raise DataError(f"message {index}: unknown role {role!r} (expected one of {sorted(ROLE_TOKENS)})")
    return role, message["content"]
