"""The OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, and a web page.

A thin FastAPI layer over `seekling.serving.Engine`: it checks each request (every problem is a 4xx
with an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`), renders chat messages
with the tokenizer's template, submits one engine job per choice and streams the engine's text as
server-sent events. Chat responses carry the reasoning in `reasoning_content` and the answer in
`content`, as DeepSeek's API does for R1. A client that disconnects cancels its jobs, which frees
their slots before the next decode step. Start it with `seekling serve MODEL_DIR`, or:

    python -c "import uvicorn; from seekling.serving import *; from seekling.server import create_app; \
               m, tok, d = load_for_serving('runs/x/final'); \
               uvicorn.run(create_app(Engine(m, tok), tok, 'x'), port=8000)"
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from seekling.errors import SeeklingError
from seekling.generate import CHAT_TEMPERATURE, CHAT_TOP_P, MAX_TOP_K, SamplingParams
from seekling.serving import Engine, Event, Job, QueueFullError, ReasoningSplitter, split_reasoning
from seekling.tokenizer import Tokenizer

log = logging.getLogger("seekling.server")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Limits:
    """What one request may ask for. None: the model's context decides."""
    max_prompt_tokens: int | None = None
    max_tokens_cap: int | None = None
    max_body_bytes: int = 1 << 20
    max_n: int = 16
    max_stop: int = 4
    max_stop_chars: int = 200


class APIError(Exception):
    """An error returned to the client as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(status_code=self.status, headers=headers, content=error_body(
            self.message, self.type, self.param, self.code))


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ----------------------------------------------------------------------------- request checking
def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {type(value).__name__}", name, "invalid_type")
    if not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number, got {value}", name, "invalid_value")
    if value < low or (low_open and value == low) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"'{name}' must be in {interval}, got {value}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {type(value).__name__}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise APIError(400, f"'{name}' must be {bound}, got {value}", name, "invalid_value")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be a boolean, got {type(value).__name__}", name, "invalid_type")
    return value


def _stop(body: dict, limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > limits.max_stop:
        raise APIError(400, f"'stop' takes at most {limits.max_stop} strings, got {len(stops)}", "stop",
                       "invalid_value")
    if any(not s or len(s) > limits.max_stop_chars for s in stops):
        raise APIError(400, f"each stop string must have 1 to {limits.max_stop_chars} characters", "stop",
                       "invalid_value")
    return tuple(stops)


@dataclass
class Sampling:
    """The sampling fields shared by both completion endpoints, checked."""
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int | None
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def parse_sampling(body: dict, limits: Limits, max_tokens_field: str = "max_tokens") -> Sampling:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    max_tokens = _integer(body, max_tokens_field, None, 1, limits.max_tokens_cap)
    if max_tokens_field != "max_tokens" and max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, 1, limits.max_tokens_cap)
    return Sampling(
        temperature=_number(body, "temperature", CHAT_TEMPERATURE, 0.0, 2.0),  # as `seekling chat` samples
        top_p=_number(body, "top_p", CHAT_TOP_P, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 0, MAX_TOP_K),
        max_tokens=max_tokens,
        n=_integer(body, "n", 1, 1, limits.max_n),
        seed=_integer(body, "seed", None, -(2**63), 2**64 - 1),
        stop=_stop(body, limits),
        stream=_boolean(body, "stream"),
        include_usage=_boolean(options or {}, "include_usage"),
        ignore_eos=_boolean(body, "ignore_eos"),
    )


def parse_messages(body: dict) -> list[dict[str, str]]:
    """OpenAI chat messages -> [{'role', 'content': str}]; text parts are joined, 'developer' is 'system'."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise APIError(400, "'messages' must be a list of messages", "messages",
                       "invalid_type" if messages is not None else "missing_required_parameter")
    if not messages:
        raise APIError(400, "'messages' must not be empty", "messages", "invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {sorted(ROLES)}, got {role!r}", f"{where}.role",
                           "invalid_value")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content parts must be {{'type': 'text', 'text': str}}",
                               f"{where}.content", "invalid_type")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string", f"{where}.content", "invalid_type")
        out.append({"role": ROLES[role], "content": content})
    return out


def parse_prompts(body: dict, vocab_size: int) -> list[str | list[int]]:
    """/v1/completions `prompt`: a string, a list of strings, token ids, or a list of token-id lists,
    checked; strings are tokenized later (`encode_prompts`), off the event loop."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a non-empty string, list of strings, or list of token ids",
                       "prompt", "invalid_type" if prompt is not None else "missing_required_parameter")
    for p in prompts:
        if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if any(t < 0 or t >= vocab_size for t in p):
                raise APIError(400, f"'prompt' token ids must be in [0, {vocab_size})", "prompt", "invalid_value")
        elif not isinstance(p, str):
            raise APIError(400, "each prompt must be a string or a list of token ids", "prompt", "invalid_type")
        if not p:
            raise APIError(400, "a prompt is empty", "prompt", "invalid_value")
    return prompts


def encode_prompts(prompts: list[str | list[int]], tokenizer: Tokenizer) -> list[list[int]]:
    """Strings get the bos token in front (a document starts with bos, as in pre-training); ids stay."""
    return [[tokenizer.bos_id] + tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]


async def read_json(request: Request, max_bytes: int) -> dict:
    """The request body as a JSON object, refusing bodies over `max_bytes` before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes}", None,
                       "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes", None, "request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", None, "invalid_json")
    try:  # JSON may spell lone UTF-16 surrogates ("\ud800"), which no text can hold
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text",
                       None, "invalid_json") from None
    return body


# ----------------------------------------------------------------------------- the app
SUGGESTIONS_SLOT = "[/* suggestions */]"  # in web/index.html: the example questions, filled in per model

def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               limits: Limits | None = None, suggestions: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app over a started or unstarted engine (its lifespan starts and closes it);
    `suggestions` are the example questions the chat page offers (`seekling.serving.suggested_prompts`
    of the tasks the model was trained on; none when that is not known)."""
    limits = limits or Limits()
    context = engine.max_len
    max_prompt = min(limits.max_prompt_tokens or context - 1, context - 1)
    created = int(time.time())
    # No token is longer than this many bytes, so a text of more bytes than max_prompt times it is too
    # long for certain: refused before any tokenizing, which for a big prompt would take seconds.
    max_token_bytes = max(1, tokenizer.max_token_bytes())
    names = (model_name, "seekling")
    # `<` escaped so that no suggestion can close the page's <script>
    page = resources.files("seekling").joinpath("web/index.html").read_text(encoding="utf-8").replace(
        SUGGESTIONS_SLOT, json.dumps(list(suggestions)).replace("<", "\\u003c"))

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and name not in names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found", type="not_found_error")

    def check_text_size(text: str, param: str) -> None:
        """One prompt's text: refused unread when it must be more tokens than the server takes."""
        n_bytes = len(text.encode("utf-8"))
        if n_bytes > max_prompt * max_token_bytes:
            raise APIError(400, f"the prompt has {n_bytes} bytes, at least {n_bytes // max_token_bytes} tokens; "
                           f"this server takes at most {max_prompt}", param, "context_length_exceeded")

    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="seekling", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(status_code=exc.status_code, content=error_body(str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path, exc_info=exc)
        return JSONResponse(status_code=500, content=error_body("internal server error (logged)", "server_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key")
        if not hmac.compare_digest(header[len("Bearer "):].encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", None, "invalid_api_key")

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        stats = engine.stats()
        body = {"status": "ok" if stats["running"] else "engine stopped", "model": model_name, **stats}
        return JSONResponse(body, status_code=200 if stats["running"] else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "seekling", "max_model_len": context}]}

    def jobs_for(prompt_ids: list[int], s: Sampling, param: str) -> list[Job]:
        if len(prompt_ids) > max_prompt:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most {max_prompt}",
                           param, "context_length_exceeded")
        # Past the end of the context a completion stops with finish_reason "length" (OpenAI refuses
        # such requests instead; with contexts of a few hundred tokens, stopping is more useful).
        room = context - len(prompt_ids)
        max_tokens = min(s.max_tokens or limits.max_tokens_cap or room, room)
        stop_ids = () if s.ignore_eos else (tokenizer.eos_id,)
        return [Job(prompt_ids, SamplingParams(max_new_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p,
                                               top_k=s.top_k, stop_token_ids=stop_ids,
                                               seed=None if s.seed is None else (s.seed + i) % 2**64), s.stop)
                for i in range(s.n)]

    def submit(jobs: list[Job]) -> tuple[list, asyncio.Queue]:
        """Hand the jobs to the engine now (so a full queue is a 429, not a broken stream)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(i: int, ev: Event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

        try:
            return engine.submit(jobs, sink), queue
        except QueueFullError as e:
            raise APIError(429, str(e), None, "queue_full", type="server_overloaded") from None
        except SeeklingError as e:
            raise APIError(400, str(e), None, "invalid_value") from None

    async def events(handles: list, queue: asyncio.Queue):
        """(job index, Event) until every job has finished; leaving early cancels what is left."""
        remaining = len(handles)
        try:
            while remaining:
                i, ev = await queue.get()
                remaining -= ev.finish_reason is not None
                yield i, ev
        finally:
            for h in handles:
                h.cancel()

    async def until_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(request: Request, jobs: list[Job]) -> tuple[list[str], list[Event]]:
        """Whole texts and final events; a client gone before the end cancels the jobs."""
        handles, queue = submit(jobs)
        texts, finals = [""] * len(jobs), [Event()] * len(jobs)

        async def drain() -> None:
            async for i, ev in events(handles, queue):
                texts[i] += ev.text
                if ev.finish_reason:
                    finals[i] = ev

        work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            for h in handles:  # no-ops for finished jobs; frees the slots of a client that left
                h.cancel()
        if not work.done():
            work.cancel()
            raise APIError(499, "the client closed the request", None, "client_closed")
        work.result()
        failed = [ev for ev in finals if ev.finish_reason == "error"]
        if failed:
            raise APIError(500, failed[0].error or "generation failed", None, "generation_failed", type="server_error")
        return texts, finals

    def usage(prompt_tokens: int, finals: list[Event]) -> dict:
        completion = sum(ev.completion_tokens for ev in finals)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def stream(jobs: list[Job], prompt_tokens: int, make_chunk, include_usage: bool, usage_chunk) -> StreamingResponse:
        """Server-sent events; `make_chunk(i, ev)` gives the chunks of one engine event (ev None: the opening)."""
        handles, queue = submit(jobs)

        async def body():
            finals: list[Event] = [Event()] * len(jobs)
            stream_events = events(handles, queue)
            try:
                for i in range(len(jobs)):
                    for chunk in make_chunk(i, None):
                        yield sse(chunk)
                async for i, ev in stream_events:
                    if ev.finish_reason == "error":
                        message = ev.error or "generation failed"
                        yield sse(error_body(message, "server_error", None, "generation_failed"))
                        return
                    if ev.finish_reason:
                        finals[i] = ev
                    for chunk in make_chunk(i, ev):
                        yield sse(chunk)
                if include_usage:
                    yield sse(usage_chunk(usage(prompt_tokens, finals)))
                yield "data: [DONE]\n\n"
            finally:  # also when Starlette cancels us because the client went away
                for h in handles:
                    h.cancel()
                await stream_events.aclose()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_json(request, limits.max_body_bytes)
        check_model(body)
        messages = parse_messages(body)
        s = parse_sampling(body, limits, "max_completion_tokens")
        check_text_size("".join(m["content"] for m in messages), "messages")
        prompt = await asyncio.to_thread(tokenizer.render_prompt, messages)
        jobs = jobs_for(prompt, s, "messages")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                "system_fingerprint": None}
        if s.stream:
            splitters = [ReasoningSplitter() for _ in jobs]

            def make_chunk(i: int, ev: Event | None) -> list[dict]:
                if ev is None:
                    return [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}]
                reasoning, content = splitters[i].push(ev.text)
                if ev.finish_reason:
                    r2, c2 = splitters[i].finish()
                    reasoning, content = reasoning + r2, content + c2
                chunks = []
                delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
                if delta:
                    chunks.append({**head, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                        "finish_reason": None}]})
                if ev.finish_reason:
                    chunks.append({**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                        "finish_reason": ev.finish_reason}]})
                return chunks

            return stream(jobs, len(prompt), make_chunk, s.include_usage,
                          lambda u: {**head, "choices": [], "usage": u})
        texts, finals = await collect(request, jobs)
        choices = []
        for i, (text, ev) in enumerate(zip(texts, finals)):
            reasoning, content = split_reasoning(text)
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": ev.finish_reason})
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "system_fingerprint": None, "choices": choices, "usage": usage(len(prompt), finals)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = await read_json(request, limits.max_body_bytes)
        check_model(body)
        raw = parse_prompts(body, tokenizer.vocab_size)
        s = parse_sampling(body, limits)
        for p in raw:
            if isinstance(p, str):
                check_text_size(p, "prompt")
        prompts = await asyncio.to_thread(encode_prompts, raw, tokenizer)
        if len(prompts) * s.n > limits.max_n:
            raise APIError(400, f"{len(prompts)} prompts x n={s.n} is more than {limits.max_n} completions", "n",
                           "invalid_value")
        jobs = [job for p in prompts for job in jobs_for(p, s, "prompt")]
        prompt_tokens = sum(len(p) for p in prompts)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "system_fingerprint": None}
        if s.stream:
            def make_chunk(i: int, ev: Event | None) -> list[dict]:
                if ev is None or not (ev.text or ev.finish_reason):
                    return []
                return [{**head, "choices": [{"index": i, "text": ev.text, "logprobs": None,
                                              "finish_reason": ev.finish_reason}]}]

            return stream(jobs, prompt_tokens, make_chunk, s.include_usage,
                          lambda u: {**head, "choices": [], "usage": u})
        texts, finals = await collect(request, jobs)
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": ev.finish_reason}
                   for i, (text, ev) in enumerate(zip(texts, finals))]
        return {**head, "choices": choices, "usage": usage(prompt_tokens, finals)}

    return app
