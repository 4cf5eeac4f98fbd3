"""The HTTP server, driven by the official `openai` client and raw httpx against live uvicorn servers.

The model is the tiny scripted one from test_serving: chat prompts always get SCRIPT (so reasoning
and content are known), raw completion prompts get seeded random-model text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import openai
import pytest
from test_serving import ANSWER, REASONING, build_model_dir, live_server, wait_for

from seekling.generate import SamplingParams
from seekling.server import Limits, create_app
from seekling.serving import Engine, Job, load_for_serving

pytestmark = pytest.mark.usefixtures("one_thread")
LIMITS = Limits(max_prompt_tokens=200, max_tokens_cap=300, max_body_bytes=64 * 1024, max_n=8)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_serving(build_model_dir(str(tmp_path_factory.mktemp("srv") / "tiny")))


@pytest.fixture(scope="module")
def server(loaded):
    model, tok, _ = loaded
    engine = Engine(model, tok, max_concurrent=16, max_queue=32)
    with live_server(create_app(engine, tok, "tiny", limits=LIMITS)) as url:
        yield url, engine, tok


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def ask(text: str = "What is 2+2?") -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


# ----------------------------------------------------------------------------- the happy paths
def test_models_health_and_page(server, client):
    url, engine, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["running"] and health["slots"] == 16
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<details" in page.text and "reasoning_content" in page.text


def test_chat_splits_reasoning_from_content(server, client):
    _, _, tok = server
    r = client.chat.completions.create(model="tiny", messages=ask(), temperature=1.0)
    message = r.choices[0].message
    assert (message.reasoning_content, message.content) == (REASONING, ANSWER)
    assert r.choices[0].finish_reason == "stop"
    prompt_tokens = len(tok.render_prompt([{"role": m["role"], "content": m["content"]} for m in ask()]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12)  # 11 script tokens + the end-of-text token


def test_chat_stream_deltas(client):
    reasoning, content, finish, usage, first = "", "", None, None, None
    for chunk in client.chat.completions.create(model="tiny", messages=ask(), stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            first = first or choice.delta.role
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert (first, reasoning, content, finish) == ("assistant", REASONING, ANSWER, "stop")
    assert usage.completion_tokens == 12


def test_completions_n_seed_and_stream_agree(client):
    kw = dict(model="tiny", prompt="The quick", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    many = client.completions.create(n=3, seed=5, **kw)
    singles = [client.completions.create(seed=5 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == singles
    assert len(set(singles)) == 3 and many.usage.completion_tokens == 48
    streamed = [""] * 3
    for chunk in client.completions.create(n=3, seed=5, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == singles


def test_stop_strings(client):
    kw = dict(model="tiny", prompt="lazy dog", max_tokens=40, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[12:15]
    cut = client.completions.create(stop=[stop, "never-there"], **kw).choices[0]
    assert (cut.text, cut.finish_reason) == (full[: full.index(stop)], "stop")
    chat = client.chat.completions.create(model="tiny", messages=ask(), stop="four")
    assert (chat.choices[0].message.reasoning_content, chat.choices[0].message.content) == ("Two plus two makes", "")
    assert chat.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams_equal_their_runs_alone(server):
    url, engine, _ = server
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    prompts = ["The quick", "lazy dog 1", "What is", "brown fox jumps over the"]

    async def one(i: int) -> tuple[str, str]:
        text, finish = "", None
        stream = await aclient.completions.create(model="tiny", prompt=prompts[i % 4], max_tokens=20 + i % 5,
                                                  temperature=[0.8, 1.0, 1.2][i % 3], top_p=[1.0, 0.9][i % 2],
                                                  seed=1000 + i, stream=True)
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def scenario():
        alone = [await one(i) for i in range(16)]
        steps, tokens = engine.counters["steps"], engine.counters["tokens"]
        together = await asyncio.gather(*(one(i) for i in range(16)))
        return alone, together, engine.counters["steps"] - steps, engine.counters["tokens"] - tokens

    alone, together, steps, tokens = asyncio.run(scenario())
    assert together == alone
    assert tokens / steps > 4  # the decode steps really ran many requests at once


# ----------------------------------------------------------------------------- errors
def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, status, param, code", [
    ("{not json", 400, None, "invalid_json"),
    ("[1, 2]", 400, None, "invalid_json"),
    ({"model": "tiny"}, 400, "messages", "missing_required_parameter"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": "hi"}, 400, "messages", "invalid_type"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "invalid_type"),
    ({"messages": ask(), "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"messages": ask(), "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"messages": ask(), "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"messages": ask(), "max_tokens": 1.5}, 400, "max_tokens", "invalid_type"),
    ({"messages": ask(), "max_tokens": 301}, 400, "max_tokens", "invalid_value"),
    ({"messages": ask(), "n": 9}, 400, "n", "invalid_value"),
    ({"messages": ask(), "n": True}, 400, "n", "invalid_type"),
    ({"messages": ask(), "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"messages": ask(), "stop": ["a", ""]}, 400, "stop", "invalid_value"),
    ({"messages": ask(), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"messages": ask(), "stop": 7}, 400, "stop", "invalid_type"),
    ({"messages": ask("two " * 250)}, 400, "messages", "context_length_exceeded"),
    ({"messages": ask("x" * 70_000)}, 413, None, "request_too_large"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature", "invalid_value"),
    ('{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, "top_p", "invalid_value"),
    ({"messages": ask(), "top_k": 10 ** 30}, 400, "top_k", "invalid_value"),
    ({"messages": ask(), "top_k": 1e30}, 400, "top_k", "invalid_type"),
    ({"messages": ask(), "seed": 2 ** 70}, 400, "seed", "invalid_value"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None, "invalid_json"),
])
def test_bad_chat_requests_get_openai_errors(server, body, status, param, code):
    url = server[0]
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"})
    err = error_of(r)
    assert (r.status_code, err["param"], err["code"]) == (status, param, code), err["message"]
    assert err["type"] == "invalid_request_error" and err["message"]


def test_more_errors_and_the_client_exceptions(server, client):
    url = server[0]
    r = httpx.post(url + "/v1/completions", json={"prompt": [], "model": "tiny"})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    r = httpx.post(url + "/v1/completions", json={"prompt": ["a", "b", "c"], "n": 3})
    assert r.status_code == 400 and error_of(r)["param"] == "n"
    r = httpx.post(url + "/v1/completions", json={"prompt": [5, 10 ** 6]})
    assert r.status_code == 400 and "token ids" in error_of(r)["message"]
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="must not be empty"):
        client.chat.completions.create(model="tiny", messages=[])
    # a refused request leaves the server working
    assert client.chat.completions.create(model="tiny", messages=ask()).choices[0].message.content == ANSWER


def test_unknown_model_is_404_and_the_connection_survives_bad_requests(server):
    url = server[0]
    with httpx.Client(base_url=url) as c:  # one keep-alive connection for every request below
        r = c.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": ask()})
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found" and error_of(r)["param"] == "model"
        r = c.post("/v1/completions", json={"model": "nope", "prompt": "The"})
        assert r.status_code == 404
        surrogate = '{"messages": [{"role": "user", "content": "\\ud800"}]}'
        r = c.post("/v1/chat/completions", content=surrogate, headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        for name in ("tiny", "seekling"):  # the served name and the generic one
            r = c.post("/v1/chat/completions", json={"model": name, "messages": ask()})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWER


def test_a_huge_prompt_is_refused_before_tokenizing_and_never_stalls_the_server(loaded):
    """A ~1 MB prompt under the body limit: refused at once; /health and a running stream carry on."""
    model, tok, _ = loaded
    engine = Engine(model, tok, max_concurrent=2)
    with live_server(create_app(engine, tok, "tiny")) as url:
        huge = {"messages": [{"role": "user", "content": "1234567 " * 125_000}]}
        start = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=huge, timeout=30)
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
        assert time.perf_counter() - start < 2.0  # tokenizing it takes 2.5 s or more
        r = httpx.post(url + "/v1/completions", json={"prompt": ["The", "x" * 900_000]}, timeout=30)
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"

        async def health_during_huge_requests():
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                posts = [asyncio.ensure_future(c.post("/v1/chat/completions", json=huge)) for _ in range(4)]
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    assert (await c.get("/health")).status_code == 200
                    times.append(time.perf_counter() - t0)
                await asyncio.gather(*posts)
                return max(times)

        # tokenizing one such prompt on the event loop stalled it 2.5 s; the bound leaves room for a loaded CI
        assert asyncio.run(health_during_huge_requests()) < 1.0


def test_one_failing_row_fails_alone(loaded):
    """A row whose sampling raises (settings that slipped past validation) fails; its batch-mates finish
    with the same tokens they get alone."""
    model, tok, _ = loaded
    prompt = tok.encode("The quick")
    good = [Job(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=s, stop_token_ids=())) for s in (1, 2)]
    engine = Engine(model, tok, max_concurrent=3).start()
    try:
        alone = [engine.run_to_completion(job.prompt_ids, job.params)[0] for job in good]
    finally:
        engine.close()
    engine = Engine(model, tok, max_concurrent=3)  # started once the bad row is in place
    bad = Job(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=3))
    events: dict[int, list] = {0: [], 1: [], 2: []}
    requests = engine.submit([good[0], bad, good[1]], lambda i, ev: events[i].append(ev))
    requests[1].seq.params.top_k = 2 ** 70  # past validate(): sampling a batch with it raises
    engine.start()
    try:
        assert wait_for(lambda: all(evs and evs[-1].finish_reason for evs in events.values()))
    finally:
        engine.close()
    assert events[1][-1].finish_reason == "error"
    for i, text in ((0, alone[0]), (2, alone[1])):
        assert events[i][-1].finish_reason == "length"
        assert "".join(ev.text for ev in events[i]) == text


def test_api_key(loaded):
    model, tok, _ = loaded
    engine = Engine(model, tok, max_concurrent=2)
    with live_server(create_app(engine, tok, "tiny", api_key="s3cret")) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=ask()).choices[0].message.content == ANSWER


def test_full_queue_is_429(loaded):
    model, tok, _ = loaded
    engine = Engine(model, tok, max_concurrent=1, max_queue=0)  # never started: the one slot stays taken
    engine.submit([Job(tok.encode("The quick"), SamplingParams())], lambda i, ev: None)

    async def post():
        transport = httpx.ASGITransport(app=create_app(engine, tok, "tiny"))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post("/v1/chat/completions", json={"messages": ask(), "stream": True})

    r = asyncio.run(post())
    assert r.status_code == 429 and error_of(r)["code"] == "queue_full"


# ----------------------------------------------------------------------------- disconnects
def test_disconnect_mid_stream_frees_the_slot(server):
    url, engine, _ = server
    cancelled = engine.counters["finished_cancelled"]
    body = {"prompt": "The quick", "max_tokens": 300, "temperature": 1.0, "seed": 3, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=10) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert engine.stats()["active"] == 1
        # leaving the `with` closes the connection mid-stream
    assert wait_for(lambda: engine.stats()["active"] == 0, 3)
    assert engine.counters["finished_cancelled"] == cancelled + 1
    # the slot is usable again
    assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200


def test_disconnect_while_waiting_for_a_whole_response_cancels_it(server):
    url, engine, _ = server
    cancelled = engine.counters["finished_cancelled"]
    body = {"prompt": "The quick", "max_tokens": 300, "n": 8, "seed": 1, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=body, timeout=0.1)
    assert wait_for(lambda: engine.stats()["active"] == 0, 3)
    assert engine.counters["finished_cancelled"] == cancelled + 8


def test_defaults_match_the_cli_and_the_page_suggests_only_trained_tasks(loaded, tmp_path):
    """The server samples as `seekling chat` does unless told otherwise; the chat page offers
    questions of the tasks the model was trained on only; the model id names the run and stage."""
    from fastapi.testclient import TestClient

    from seekling.commands import chat
    from seekling.server import parse_sampling
    from seekling.serving import served_model_name, suggested_prompts

    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    cli = parser.parse_args(["somewhere"])
    sampling = parse_sampling({"messages": ask()}, Limits())
    assert (sampling.temperature, sampling.top_p) == (cli.temperature, cli.top_p) == (0.6, 0.95)
    model, tok, _ = loaded
    questions = suggested_prompts(["arithmetic"])
    assert questions and all(q.startswith("What is") for q in questions)
    page = TestClient(create_app(Engine(model, tok), tok, "x", suggestions=questions + ["</script>"])).get("/").text
    assert json.dumps(questions)[1:-1] in page and "make 24" not in page and "</script>\"" not in page
    assert "make 24" not in TestClient(create_app(Engine(model, tok), tok, "x")).get("/").text
    run = tmp_path / "speedrun-cpu"
    (run / "grpo" / "final").mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"format": "seekling-speedrun-v1"}))
    assert served_model_name(str(run / "grpo" / "final")) == "speedrun-cpu-grpo"
    assert served_model_name(str(tmp_path / "runs" / "grpo" / "final")) == "grpo"
