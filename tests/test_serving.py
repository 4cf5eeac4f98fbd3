"""The serving engine: streamed text, reasoning splits, continuous batching against `generate`, cancel,
failures that stay inside one request, the queue bound, and finding a model in a run directory.

Also the helpers the server and web tests share: a tiny tokenizer, and a tiny Transformer wired so
that after `<|assistant|>` it always says SCRIPT (a fixed R1-style answer) while other prompts get
ordinary random-model samples.
"""

from __future__ import annotations

import contextlib
import io
import json
import queue
import socket
import threading
import time

import pytest
import torch

from seekling.checkpoint import save_pretrained
from seekling.cli import main
from seekling.commands.chat import DIM, RESET, ChatSession
from seekling.config import ModelConfig
from seekling.errors import SeeklingError
from seekling.generate import SamplingParams, generate
from seekling.model import Transformer
from seekling.serving import (
    Engine,
    Job,
    QueueFullError,
    ReasoningSplitter,
    TextStream,
    load_for_serving,
    split_reasoning,
)
from seekling.tokenizer import Tokenizer

SCRIPT = "<think>Two plus two makes four.</think><answer>4</answer>"
REASONING, ANSWER = "Two plus two makes four.", "4"
CORPUS = (["Two plus two makes four. What is two plus two?"] * 40
          + ["The quick brown fox jumps over the lazy dog 123."] * 20)


# ----------------------------------------------------------------------------- shared helpers
def make_tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=300)


def wire_script(model: Transformer, chain: list[int]) -> None:
    """Make `model` follow chain[k] -> chain[k+1] whatever the temperature, leaving other contexts random.

    Residual dimensions 0..K-1 are reserved: no weight writes into them except the chain tokens'
    embeddings (100 * e_k), and lm_head maps e_k to the next chain token with a logit of ~80.
    """
    K = len(chain) - 1
    assert len(set(chain)) == len(chain) and K <= model.config.hidden_size // 2
    with torch.no_grad():
        model.embed_tokens.weight[:, :K] = 0
        for layer in model.layers:
            layer.self_attn.o_proj.weight[:K] = 0
            if layer.is_moe:
                layer.mlp.experts.down_proj[:, :K] = 0
                layer.mlp.shared_experts.down_proj.weight[:K] = 0
            else:
                layer.mlp.down_proj.weight[:K] = 0
        for k, (a, b) in enumerate(zip(chain, chain[1:])):
            model.embed_tokens.weight[a] = 0
            model.embed_tokens.weight[a, k] = 100.0
            model.lm_head.weight[b] = 0
            model.lm_head.weight[b, k] = 10.0


def build_model_dir(path: str) -> str:
    """A tiny scripted model + tokenizer saved as a Hugging Face-format directory."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size))
    wire_script(model, [tok.assistant_id] + tok.encode(SCRIPT) + [tok.eos_id])
    save_pretrained(model, path)
    tok.save(path)
    return path


@contextlib.contextmanager
def live_server(app):
    """Run a FastAPI app under uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ----------------------------------------------------------------------------- fixtures
# Tiny models run fastest on one thread, and a second OpenMP team on a loaded 2-core machine (the
# engine thread's) can make each small matmul wait milliseconds for a descheduled worker.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = build_model_dir(str(tmp_path_factory.mktemp("model") / "tiny"))
    model, tok, model_dir = load_for_serving(path)
    assert model_dir == path
    return model, tok, path


def run_alone(engine: Engine, job: Job) -> tuple[str, str]:
    text, final = engine.run_to_completion(job.prompt_ids, job.params, job.stop)
    return text, final.finish_reason


def run_together(engine: Engine, jobs: list[Job]):
    done: queue.Queue = queue.Queue()
    texts, finals = [""] * len(jobs), [None] * len(jobs)

    def sink(i, ev):
        texts[i] += ev.text
        if ev.finish_reason:
            finals[i] = ev
            done.put(i)

    handles = engine.submit(jobs, sink)
    for _ in jobs:
        done.get(timeout=30)
    return texts, finals, handles


# ----------------------------------------------------------------------------- text
def test_text_stream_equals_whole_decode_for_split_characters(served):
    _, tok, _ = served
    text = "naïve café → 数学 🙂 done"
    ids = tok.encode(text) + [tok.eos_id]
    stream = TextStream(tok)
    parts = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)  # a character appears only once whole


def test_text_stream_stop_strings_are_held_then_cut(served):
    _, tok, _ = served
    ids = tok.encode("The quick brown fox jumps")
    stream = TextStream(tok, stop=("brown fax", "fox"))
    shown = ""
    for i in ids:
        shown += stream.push(i)
        assert "fox" not in shown and not stream.stopped or shown == "The quick brown "
        if stream.stopped:
            break
    assert stream.stopped and shown + stream.flush() == "The quick brown "
    with pytest.raises(SeeklingError):
        TextStream(tok, stop=("",))


def test_reasoning_split_streamed_at_every_cut_equals_whole():
    text = "  <think> step one\n step two </think> <answer> 42 </answer> "
    assert split_reasoning(text) == ("step one\n step two", "42")
    for cut in range(len(text) + 1):
        for cut2 in range(cut, len(text) + 1, 7):
            s = ReasoningSplitter()
            parts = [s.push(text[:cut]), s.push(text[cut:cut2]), s.push(text[cut2:]), s.finish()]
            assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == split_reasoning(text)
    assert split_reasoning("no tags <b>bold</b> a<b") == ("", "no tags <b>bold</b> a<b")
    assert split_reasoning("<think>unfinished thought") == ("unfinished thought", "")


# ----------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("speculate", [False, True])
def test_engine_matches_generate_alone_and_batched(served, speculate):
    """Requests joining and leaving one batch sample what `generate` samples for each alone (with
    speculative decoding: what speculative `generate` samples, one or two tokens a step)."""
    model, tok, _ = served
    prompts = [tok.encode(t) for t in ("The quick", "lazy dog 1", "What is", "brown fox jumps over the")]
    jobs = [Job(prompts[i % 4], SamplingParams(max_new_tokens=8 + i, temperature=[0, 0.7, 1.0, 1.3][i % 4],
                                                top_p=[1.0, 0.9][i % 2], top_k=[0, 0, 50][i % 3],
                                                stop_token_ids=(tok.eos_id,), seed=100 + i))
            for i in range(16)]
    reference = [generate(model, [j.prompt_ids], [j.params], speculate=speculate)[0] for j in jobs]
    engine = Engine(model, tok, max_concurrent=16, speculate=speculate).start()
    try:
        texts, finals, _ = run_together(engine, jobs)
        for job, ref, text, final in zip(jobs, reference, texts, finals):
            ids = ref.token_ids[:-1] if ref.finish_reason == "stop" else ref.token_ids
            assert text == tok.decode(ids, skip_special=True)
            assert (final.finish_reason, final.completion_tokens) == (ref.finish_reason, len(ref.token_ids))
            assert run_alone(engine, job) == (text, final.finish_reason)
        assert engine.stats()["active"] == 0 and engine.counters["steps"] > 0
    finally:
        engine.close()


def test_chat_prompt_gives_the_scripted_answer(served):
    model, tok, _ = served
    engine = Engine(model, tok, max_concurrent=2).start()
    prompt = tok.render_prompt([{"role": "user", "content": "What is 2+2?"}])
    text, final = engine.run_to_completion(prompt, SamplingParams(max_new_tokens=50, temperature=1.0,
                                                                  stop_token_ids=(tok.eos_id,)))
    engine.close()
    assert text == SCRIPT and final.finish_reason == "stop" and final.completion_tokens == 12
    assert split_reasoning(text) == (REASONING, ANSWER)


def test_cancel_frees_the_slot_and_one_failure_stays_inside_its_request(served):
    model, tok, _ = served
    engine = Engine(model, tok, max_concurrent=3).start()
    try:
        long_job = Job(tok.encode("The quick"), SamplingParams(max_new_tokens=450, seed=1))
        got: queue.Queue = queue.Queue()
        (handle,) = engine.submit([long_job], lambda i, ev: got.put(ev))
        assert wait_for(lambda: engine.counters["tokens"] >= 3)
        handle.cancel()
        assert wait_for(lambda: engine.stats()["active"] == 0, 2)
        final = got.get(timeout=5)
        while not final.finish_reason:
            final = got.get(timeout=5)
        assert final.finish_reason == "cancelled" and final.completion_tokens < 450

        jobs = [Job(tok.encode(p), SamplingParams(max_new_tokens=20, seed=s, stop_token_ids=(tok.eos_id,)))
                for s, p in enumerate(["The quick", "lazy dog", "What is"])]
        alone = [run_alone(engine, j) for j in jobs]
        original_init = TextStream.__init__

        def init(self, tokenizer, stop=()):
            original_init(self, tokenizer, stop)
            if stop == ("boom",):  # this request's text handling breaks after its first token
                self.push = lambda token_id: 1 / 0
        jobs[1].stop = ("boom",)
        TextStream.__init__ = init
        try:
            texts, finals, _ = run_together(engine, jobs)
        finally:
            TextStream.__init__ = original_init
        assert finals[1].finish_reason == "error" and "ZeroDivisionError" in finals[1].error
        assert [(texts[i], finals[i].finish_reason) for i in (0, 2)] == [alone[0], alone[2]]
        assert engine.stats()["active"] == 0 and engine._thread.is_alive()
    finally:
        engine.close()


def test_an_engine_bug_fails_the_running_requests_and_the_engine_goes_on(served):
    model, tok, _ = served
    engine = Engine(model, tok).start()
    original, calls = engine._decode_step, []

    def broken_once():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("bug")
        original()

    engine._decode_step = broken_once
    prompt = tok.encode("The quick")
    try:
        _, final = engine.run_to_completion(prompt, SamplingParams(max_new_tokens=20, seed=1))
        assert final.finish_reason == "error" and "RuntimeError: bug" in final.error
        _, final = engine.run_to_completion(prompt, SamplingParams(max_new_tokens=5, seed=1))
        assert final.finish_reason == "length" and engine.stats()["running"]
    finally:
        engine.close()
    assert not engine.stats()["running"]


def test_queue_bound_and_context_clamp(served):
    model, tok, _ = served
    engine = Engine(model, tok, max_concurrent=2, max_queue=1, max_len=64)  # not started: nothing leaves
    job = Job(tok.encode("The quick"), SamplingParams(max_new_tokens=10))
    engine.submit([job, job], lambda i, ev: None)  # the two slots
    engine.submit([job], lambda i, ev: None)  # one waiting
    with pytest.raises(QueueFullError):
        engine.submit([job], lambda i, ev: None)
    with pytest.raises(SeeklingError, match="context holds 64"):
        engine.submit([Job(list(range(64)), SamplingParams())], lambda i, ev: None)
    assert engine.stats()["queued"] == 3

    engine = Engine(model, tok, max_concurrent=1, max_len=32).start()
    prompt = tok.encode("The quick brown fox")
    text, final = engine.run_to_completion(prompt, SamplingParams(max_new_tokens=1000, seed=3))
    engine.close()
    assert final.finish_reason == "length" and final.completion_tokens == 32 - len(prompt)


# ----------------------------------------------------------------------------- the commands
def test_generate_command(served, capsys):
    model, tok, path = served
    assert main(["generate", path, "--prompt", "What is 2+2?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["text"], out["reasoning_content"], out["content"]) == (SCRIPT, REASONING, ANSWER)
    assert (out["finish_reason"], out["completion_tokens"]) == ("stop", 12)
    assert main(["generate", path, "--prompt", "The quick", "--raw", "--seed", "4", "--temperature", "1",
                 "--top-p", "1", "--max-tokens", "15"]) == 0
    engine = Engine(model, tok).start()
    text, _ = engine.run_to_completion([tok.bos_id] + tok.encode("The quick"),
                                       SamplingParams(max_new_tokens=15, seed=4, stop_token_ids=(tok.eos_id,)))
    engine.close()
    assert capsys.readouterr().out == text + "\n"
    assert main(["generate", path, "--prompt", "x", "--max-tokens", "0"]) == 2


def test_chat_command_streams_dimmed_reasoning_and_takes_commands(served, capsys, monkeypatch):
    _, _, path = served
    lines = ["What is 2+2?", "/temp 0.5", "/max 7", "again?", "/temp hot", "/reset", "/bogus", "/quit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", path, "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert f"seekling> {DIM}{REASONING}{RESET}\n\n{ANSWER}\n" in out
    assert "(temperature 0.5)" in out and "(at most 7 tokens per answer)" in out
    assert f"seekling> {DIM}{REASONING}{RESET} [stopped at 7 tokens]\n" in out  # 7 tokens end inside the thinking
    assert "bad value 'hot'" in out and "(conversation cleared)" in out and "unknown command '/bogus'" in out
    assert "never read" not in out


def test_chat_history_keeps_answers_without_reasoning(served):
    model, tok, _ = served
    engine = Engine(model, tok, max_concurrent=1).start()
    session = ChatSession(engine, SamplingParams(max_new_tokens=40, stop_token_ids=(tok.eos_id,)), out=io.StringIO())
    assert session.reply("What is 2+2?") == SCRIPT
    session.reply("And 3+3?")
    engine.close()
    assert session.messages == [{"role": "user", "content": "What is 2+2?"},
                                {"role": "assistant", "content": "<answer>4</answer>"},
                                {"role": "user", "content": "And 3+3?"},
                                {"role": "assistant", "content": "<answer>4</answer>"}]
