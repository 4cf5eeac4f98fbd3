"""The serving engine: continuous batching over one latent cache, plus streaming text and reasoning splits.

One background thread owns the model and a `LatentCache` of `max_concurrent` rows ("slots"). Between
decode steps, waiting requests are prefilled into free slots and finished or cancelled ones leave;
each decode step then runs every active slot in one batched `forward_cached` call and samples each
row with its own temperature / top-p / top-k and its own `torch.Generator`, so a seeded request
samples the same tokens alone or next to fifteen others. Requests beyond the slots wait in a bounded
queue. The engine speaks token ids in and text deltas out: `TextStream` turns tokens into text
(holding back split UTF-8 characters and anything that might begin a stop string) and
`ReasoningSplitter` separates `<think>` reasoning from the answer the way DeepSeek's API does for R1.

    python -c "from seekling.serving import *; from seekling.generate import SamplingParams; \
               m, tok, _ = load_for_serving('runs/x/final'); e = Engine(m, tok).start(); \
               print(e.run_to_completion(tok.render_prompt([{'role': 'user', 'content': '2+2?'}]), \
                                         SamplingParams(max_new_tokens=64)))"
"""

from __future__ import annotations

import collections
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from seekling.checkpoint import load_pretrained, resolve_model_and_tokenizer, run_state
from seekling.errors import CheckpointError, SeeklingError
from seekling.generate import Decoder, SamplingParams, resolve_speculate
from seekling.model import Transformer
from seekling.tasks import make_problems
from seekling.tokenizer import TAG_TOKENS as TAGS, THINK_CLOSE, THINK_OPEN, Tokenizer

class QueueFullError(SeeklingError):
    """Every slot is busy and the waiting queue is at its bound."""


# ----------------------------------------------------------------------------- finding and loading a model
def load_for_serving(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                     say: Callable[[str], None] | None = None) -> tuple[Transformer, Tokenizer, str]:
    """(model in eval mode, tokenizer, model directory) from a model or run directory (the model by
    `seekling.checkpoint.choose_model_dir`'s rules; `say` is told which one and why)."""
    model_dir, tokenizer_dir = resolve_model_and_tokenizer(path, say=say)
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = load_pretrained(model_dir, device=device, dtype=dtype)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {model.config.vocab_size}")
    return model, tokenizer, model_dir


def served_model_name(model_dir: str) -> str:
    """The model id the server reports: the run and stage rather than "final", e.g. speedrun-cpu-grpo
    for runs/speedrun-cpu/grpo/final, grpo-step_000050 for a checkpoint, the directory name otherwise."""
    parts = os.path.normpath(os.path.abspath(model_dir)).split(os.sep)
    if parts[-1] == "final":
        parts, name = parts[:-1], parts[-2]
    elif len(parts) > 2 and parts[-2] == "checkpoints":
        parts, name = parts[:-2], f"{parts[-3]}-{parts[-1]}"
    else:
        name = parts[-1]
    in_speedrun = len(parts) > 2 and run_state(os.sep.join(parts[:-1])) is not None
    return f"{parts[-2]}-{name}" if in_speedrun else name


def suggested_prompts(tasks: Sequence[str] | None, per_task: int = 2) -> list[str]:
    """Example questions for the chat page: held-out problems of the tasks the model was trained on
    (in the very wording it learned), or none when it is not known what it was trained on."""
    return [p.prompt for task in tasks or [] for p in make_problems(task, "test", per_task, seed=1)]


# ----------------------------------------------------------------------------- tokens -> text
class TextStream:
    """Generated token ids -> text deltas for one request.

    Each token is decoded in a small window (as vLLM does) so a character split across tokens
    appears only once complete, special tokens (ids 0-5) vanish, and the reasoning tags stay.
    Text that could be the start of a stop string is held until it cannot; a matched stop string
    and everything after it are never shown, as in OpenAI's API.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        if any(not isinstance(s, str) or not s for s in stop):
            raise SeeklingError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decoded to the last released chunk of text
        self._read = 0
        self._held = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Text that can be shown now; sets `stopped` when a stop string appeared."""
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special=True)
        new_text = self.tokenizer.decode(self.ids[self._prefix:], skip_special=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._held += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """At the end: what is still held, incomplete characters included."""
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special=True)
        self._held += self.tokenizer.decode(self.ids[self._prefix:], skip_special=True)[len(prefix_text):]
        self._prefix = self._read = len(self.ids)
        out = self._release()
        out, self._held = out + ("" if self.stopped else self._held), ""
        return out

    def _release(self) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self._held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._held, self.stopped = self._held[: min(hits)], "", True
            return out
        keep = max((k for s in self.stop for k in range(1, len(s)) if self._held.endswith(s[:k])), default=0)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
        return out


class ReasoningSplitter:
    """Completion text -> (reasoning, content) deltas, as DeepSeek's API returns R1's output.

    Text between `<think>` and `</think>` is reasoning, the rest is content; the `<answer>` tags are
    dropped from the content. Leading and trailing whitespace of each part is trimmed (trailing
    whitespace is held until more text follows), so the streamed deltas concatenate to exactly what
    `split_reasoning` returns for the whole text. A partial tag at the end waits for the next delta.
    """

    def __init__(self):
        self._buf = ""
        self._channel = "content"
        self._started = {"reasoning": False, "content": False}
        self._space = {"reasoning": "", "content": ""}

    def push(self, text: str) -> tuple[str, str]:
        out = {"reasoning": [], "content": []}
        self._buf += text
        while self._buf:
            i = self._buf.find("<")
            if i != 0:
                piece = self._buf if i < 0 else self._buf[:i]
                self._emit(piece, out)
                self._buf = self._buf[len(piece):]
                continue
            tag = next((t for t in TAGS if self._buf.startswith(t)), None)
            if tag is not None:
                if tag in (THINK_OPEN, THINK_CLOSE):
                    self._channel = "reasoning" if tag == THINK_OPEN else "content"
                self._buf = self._buf[len(tag):]
            elif any(t.startswith(self._buf) for t in TAGS):
                break  # maybe the start of a tag: wait for more text
            else:
                self._emit("<", out)
                self._buf = self._buf[1:]
        return "".join(out["reasoning"]), "".join(out["content"])

    def finish(self) -> tuple[str, str]:
        out = {"reasoning": [], "content": []}
        self._emit(self._buf, out)  # an unfinished tag is plain text
        self._buf = ""
        return "".join(out["reasoning"]), "".join(out["content"])

    def _emit(self, text: str, out: dict[str, list[str]]) -> None:
        ch = self._channel
        text = self._space[ch] + text
        if not self._started[ch]:
            text = text.lstrip()
        body = text.rstrip()
        self._space[ch] = text[len(body):]
        if body:
            out[ch].append(body)
            self._started[ch] = True


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning_content, content) of a whole completion."""
    splitter = ReasoningSplitter()
    r1, c1 = splitter.push(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2


# ----------------------------------------------------------------------------- the engine
@dataclass
class Job:
    """One completion to generate: prompt ids, sampling settings, stop strings."""
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What a request's sink receives: new text, and on the last event why it finished."""
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" on the last event
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Request:
    """A job inside the engine: its `Sequence` in the decoding core, its text stream and its sink.

    `cancel()` frees its slot before the next decode step.
    """

    def __init__(self, job: Job, index: int, sink: Callable[[int, Event], None], tokenizer: Tokenizer,
                 decoder: Decoder):
        self.id = secrets.token_hex(6)
        self.job, self.index, self.sink = job, index, sink
        seed = job.params.seed if job.params.seed is not None else secrets.randbits(63)  # never the global RNG
        self.seq = decoder.sequence(job.prompt_ids, job.params, seed)
        self.text = TextStream(tokenizer, job.stop)
        self.shown = 0  # tokens of seq.token_ids handed to the text stream
        self.finished = False
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Engine:
    """Continuous batching over `max_concurrent` cache slots, on one background thread.

    `submit(jobs, sink)` queues jobs (all or none; `QueueFullError` past `max_queue` waiting);
    `sink(job_index, event)` is called on the engine thread, so a server hands events to its event
    loop with `loop.call_soon_threadsafe`. `prefill_tokens` bounds a batched prefill's padded size.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_concurrent: int = 8, max_queue: int = 64,
                 max_len: int | None = None, prefill_tokens: int = 4096, speculate: bool | str | None = None,
                 say: Callable[[str], None] | None = None):
        if max_concurrent < 1 or max_queue < 0:
            raise SeeklingError(f"max_concurrent must be >= 1 and max_queue >= 0, got {max_concurrent}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.max_len = max_len or model.config.max_position_embeddings
        self.prefill_tokens = prefill_tokens
        self.speculate = resolve_speculate(model, speculate, max_concurrent, say)  # None: auto
        self.decoder = Decoder(model, max_concurrent, self.max_len, speculate=self.speculate)
        self._slots: list[Request | None] = [None] * max_concurrent
        self._pending: collections.deque[Request] = collections.deque()
        self._n_active = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Every key exists from the start, so `stats()` can copy it while the engine thread counts.
        self.counters = collections.Counter({k: 0 for k in (
            "steps", "prefills", "tokens", "finished_stop", "finished_length", "finished_cancelled", "finished_error")})

    # -- the public side (any thread) -------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="seekling-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, jobs: Sequence[Job], sink: Callable[[int, Event], None]) -> list[Request]:
        for i, job in enumerate(jobs):
            job.params.validate()
            self.decoder.check_prompt(job.prompt_ids, f"job {i}: the prompt")
        requests = [Request(job, i, sink, self.tokenizer, self.decoder) for i, job in enumerate(jobs)]
        with self._cond:
            waiting = len(self._pending) + self._n_active - self.max_concurrent
            if waiting + len(requests) > self.max_queue:
                raise QueueFullError(f"server busy: {self._n_active} requests running, {len(self._pending)} "
                                     f"waiting (max_queue={self.max_queue}); retry later")
            self._pending.extend(requests)
            self._cond.notify_all()
        return requests

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        with self._cond:
            return {"running": self.running, "slots": self.max_concurrent, "active": self._n_active,
                    "queued": len(self._pending), **dict(self.counters)}

    def run_to_completion(self, prompt_ids: list[int], params: SamplingParams, stop: tuple[str, ...] = ()
                          ) -> tuple[str, Event]:
        """Blocking helper: (whole text, final event) of one job."""
        import queue

        events: queue.Queue = queue.Queue()
        self.submit([Job(prompt_ids, params, stop)], lambda i, ev: events.put(ev))
        parts = []
        while True:
            ev = events.get()
            parts.append(ev.text)
            if ev.finish_reason:
                return "".join(parts), ev

    # -- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._pending and self._n_active == 0:
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    self._release_cancelled()
                    self._admit()
                    if self._n_active:
                        self._decode_step()
                except Exception as e:  # noqa: BLE001 - a bug here must fail the running requests, not hang them
                    for r in [r for r in self._slots if r is not None]:
                        self._finish(r, "error", f"engine error: {type(e).__name__}: {e}")
        for r in [r for r in self._slots if r is not None] + list(self._pending):
            self._finish(r, "error", "the server is shutting down")

    def _release_cancelled(self) -> None:
        for r in self._slots:
            if r is not None and r.cancelled:
                self._finish(r, "cancelled")
        with self._cond:
            dropped = [r for r in self._pending if r.cancelled]
            self._pending = collections.deque(r for r in self._pending if not r.cancelled)
        for r in dropped:
            self._finish(r, "cancelled")

    def _admit(self) -> None:
        """Prefill waiting requests into free slots, several at once while the padded batch stays small."""
        free = [i for i, r in enumerate(self._slots) if r is None]
        batch: list[Request] = []
        with self._cond:
            while self._pending and len(batch) < len(free):
                longest = max(len(r.seq.prompt_ids) for r in batch + [self._pending[0]])
                if batch and longest * (len(batch) + 1) > self.prefill_tokens:
                    break
                r = self._pending.popleft()
                r.seq.slot = free[len(batch)]
                self._slots[r.seq.slot] = r
                self._n_active += 1
                batch.append(r)
        for r in [r for r in batch if r.seq.budget == 0]:
            self._finish(r, "length")
        batch = [r for r in batch if not r.finished]
        if batch:
            self._call("prefill", batch, self.decoder.prefill)
            self.counters["prefills"] += len(batch)

    def _decode_step(self) -> None:
        self._call("decode step", [r for r in self._slots if r is not None], self.decoder.step)
        self.counters["steps"] += 1

    def _call(self, what: str, batch: list[Request], fn: Callable) -> None:
        """One call of the decoding core for `batch`, then each request's new token to its client.

        When the call fails, each request is retried alone from the same cache state, so only a
        request that fails by itself is failed: one request never fails its neighbours.
        """
        lengths = self.decoder.cache.lengths.clone()
        try:
            fn([r.seq for r in batch])
        except Exception as e:  # noqa: BLE001 - reported to the requests concerned, the engine goes on
            self.decoder.cache.lengths.copy_(lengths)
            if len(batch) == 1:
                return self._finish(batch[0], "error", f"{what} failed: {e}")
            for r in batch:
                self._call(what, [r], fn)
            return
        self.counters["tokens"] += len(batch)
        for r in batch:
            try:
                self._advance(r)
            except Exception as e:  # noqa: BLE001 - one request's failure never reaches the others
                self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _advance(self, r: Request) -> None:
        """The step's new tokens (one, or two with speculative decoding) through the request's text stream."""
        seq, text = r.seq, ""
        for token in seq.token_ids[r.shown:]:
            r.shown += 1
            if token in seq.stop_ids:  # the stop token: never shown
                return self._finish(r, "stop", text=text)
            text += r.text.push(token)
            if r.text.stopped:
                return self._finish(r, "stop", text=text)
        if seq.done:
            return self._finish(r, "length", text=text)
        if text:
            r.sink(r.index, Event(text=text, prompt_tokens=len(seq.prompt_ids), completion_tokens=r.shown))

    def _finish(self, r: Request, reason: str, error: str | None = None, text: str = "") -> None:
        if r.finished:
            return
        r.finished = True
        with self._cond:
            if r.seq.slot >= 0 and self._slots[r.seq.slot] is r:
                self._slots[r.seq.slot] = None
                self._n_active -= 1
        self.counters[f"finished_{reason}"] += 1
        if reason in ("stop", "length"):
            try:
                text += r.text.flush()
            except Exception as e:  # noqa: BLE001
                reason, error = "error", f"{type(e).__name__}: {e}"
        try:
            r.sink(r.index, Event(text=text, finish_reason=reason, error=error, prompt_tokens=len(r.seq.prompt_ids),
                                  completion_tokens=r.shown))
        except Exception:  # noqa: BLE001 - a sink that cannot take events belongs to a gone client
            pass

