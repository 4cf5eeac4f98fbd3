"""Tokenizer: fixed special ids, digit splitting, exact round trip, chat rendering and mask, and
parity with transformers (AutoTokenizer ids, the Jinja chat template, assistant masks)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seekling.cli import main
from seekling.errors import ConfigError, DataError
from seekling.tasks import completion_text, make_mixture, to_sft_example
from seekling.tokenizer import FIXED_TOKENS, MIN_VOCAB_SIZE, Tokenizer

TRICKY = [
    "", " ", "  leading spaces", "trailing  ", "\n", "\n\nnew\r\nlines\t\ttabs\n",
    "emoji 🙂👍🏽 and zwj 👩‍👩‍👧", "中文 日本語 한국어", "accents: héllo naïve", "numbers 3.14159 -42 1,000,000",
    "<think> 7+8=15 </think> <answer> 85 </answer>", "<|end_of_text|>literal<|user|>", "\x00\x01 control",
]


def corpus() -> list[str]:
    problems = make_mixture(["arithmetic", "countdown", "linear", "wordproblem"], "train", 100, seed=0)
    english = ["The quick brown fox jumps over the lazy dog.\n", "She sells sea shells by the sea shore.\n"] * 20
    return [p.prompt for p in problems] + [completion_text(p) for p in problems] + english


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus(), vocab_size=512)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    return tok.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 47+38?"},
    {"role": "assistant", "content": "<think> 7+8=15, write 5 carry 1. 4+3+1=8. 47+38=85 </think> <answer> 85 </answer>"},
    {"role": "user", "content": " And 2+2? 🙂"},
    {"role": "assistant", "content": "<answer> 4 </answer>"},
]


def test_fixed_ids_and_size(tok):
    assert tok.vocab_size == 512
    for i, token in enumerate(FIXED_TOKENS):
        assert tok.token_to_id(token) == i and tok.id_to_token(i) == token
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.user_id, tok.assistant_id, tok.system_id) == (3, 4, 5)
    assert (tok.think_id, tok.think_end_id, tok.answer_id, tok.answer_end_id) == (6, 7, 8, 9)


def test_reasoning_tags_are_single_tokens_and_survive_skip_special(tok):
    ids = tok.encode("x<think>y</think><answer>z</answer>")
    for tag_id in (6, 7, 8, 9):
        assert ids.count(tag_id) == 1
    text = tok.decode([tok.bos_id, *ids, tok.eos_id], skip_special=True)
    assert text == "x<think>y</think><answer>z</answer>"
    assert tok.decode([tok.bos_id, tok.user_id, tok.eos_id], skip_special=False) == "<|begin_of_text|><|user|><|end_of_text|>"


def test_digits_are_single_tokens(tok):
    ids = tok.encode("12345+2024")
    assert [tok.decode([i]) for i in ids] == list("12345+2024")
    # the same digit is the same id wherever it appears
    assert tok.encode(" 7")[-1] == tok.encode("77")[0] == tok.encode("x7")[-1]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_training_is_deterministic_and_learns_merges(tok):
    again = Tokenizer.train(corpus(), vocab_size=512)
    assert again.fingerprint == tok.fingerprint
    # merges were learned: a frequent word is one token, far fewer tokens than bytes
    assert len(tok.encode(" carry")) == 1
    text = "Ana buys 3 pens for 4 dollars each and a bag for 12 dollars."
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_save_and_load(tok, tok_dir):
    files = {p.name for p in tok_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == FIXED_TOKENS[:3]
    loaded = Tokenizer.load(tok_dir)
    assert loaded.fingerprint == tok.fingerprint and loaded.vocab_size == tok.vocab_size
    for text in TRICKY:
        assert loaded.encode(text) == tok.encode(text)


def test_render_chat_mask_by_hand(tok):
    user, reply = "What is 2+2?", "<answer> 4 </answer>"
    ids, mask = tok.render_chat([{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
    expected = [0, 3, *tok.encode(user), 1, 4, *tok.encode(reply), 1]
    assert ids == expected
    n_reply = len(tok.encode(reply))
    assert mask == [0] * (len(expected) - n_reply - 1) + [1] * (n_reply + 1)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == reply + "<|end_of_text|>"
    prompt = tok.render_prompt([{"role": "user", "content": user}])
    assert prompt == [0, 3, *tok.encode(user), 1, 4]


def test_render_chat_equals_whole_text_encoding(tok):
    ids, mask = tok.render_chat(CHAT)
    assert ids == tok.encode(tok.chat_text(CHAT))
    assert len(mask) == len(ids)
    # two assistant turns: the masked text is both replies, each closed by eos
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked == CHAT[2]["content"] + "<|end_of_text|>" + CHAT[4]["content"] + "<|end_of_text|>"


def test_transformers_encodes_the_same(tok, hf):
    for text in TRICKY:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    tagged = [0, *tok.encode("<think> a </think> <answer> b </answer>"), 1]
    assert hf.decode(tagged, skip_special_tokens=True) == tok.decode(tagged, skip_special=True) \
        == "<think> a </think> <answer> b </answer>"
    assert len(hf) == tok.vocab_size


def test_chat_template_matches_render_chat(tok, hf):
    conversations = [CHAT, CHAT[1:3]] + [to_sft_example(p)["messages"] for p in
                                         make_mixture(["arithmetic", "countdown"], "test", 3, seed=1)]
    for messages in conversations:
        ids, mask = tok.render_chat(messages)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids
        assert out["assistant_masks"] == mask
        assert hf.apply_chat_template(messages, tokenize=False) == tok.chat_text(messages)
        prompt = messages[:1]
        assert hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                      return_dict=True)["input_ids"] == tok.render_prompt(prompt)


def test_errors(tmp_path, tok):
    with pytest.raises(DataError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path)
    with pytest.raises(DataError, match="empty corpus"):
        Tokenizer.train([], vocab_size=512)
    with pytest.raises(DataError, match="empty corpus"):
        Tokenizer.train(["", "  \n"], vocab_size=512)
    with pytest.raises(ConfigError, match=str(MIN_VOCAB_SIZE)):
        Tokenizer.train(["hello"], vocab_size=100)
    with pytest.raises(DataError, match="unknown role"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(DataError, match="message 0"):
        tok.render_chat([{"role": "user"}])


def test_cli_train_on_corpus_and_tasks(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("It was the best of times, it was the worst of times.\n" * 50)
    records = tmp_path / "web.jsonl"
    records.write_text("\n".join(json.dumps({"text": f"record {i} about foxes"}) for i in range(30)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(text), str(records), "--tasks", "linear",
                 "--num-examples", "50", "--vocab-size", "400", "--out", str(out)]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size <= 400
    assert len(tok.encode(" times")) == 1 and len(tok.encode(" foxes")) == 1  # learned from both files
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "x=12"]) == 0
    assert "4 tokens" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
