"""seekling chat: talk to a model in the terminal, token by token.

The reasoning (between <think> and </think>) is shown dimmed as it is sampled, the answer plain.
Every turn goes through the chat template with the whole conversation; as DeepSeek-R1's template
does, earlier answers are fed back without their reasoning. Commands at the prompt:

    /reset       forget the conversation          /temp 0.6   set the temperature (0: greedy)
    /max 512     set the most tokens per answer   /quit       leave (Ctrl-D too)

Ctrl-C stops an answer and keeps the session. MODEL_DIR is a model directory or a run directory (of a
speedrun: the stage with the best held-out pass@1; the model chosen is printed).

    seekling chat runs/main/final
    seekling chat runs/main --system "Answer briefly." --temperature 0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import sys
from dataclasses import replace

from seekling.commands.generate import DTYPES, add_sampling_arguments
from seekling.errors import SeeklingError
from seekling.generate import SamplingParams
from seekling.serving import Engine, Job, ReasoningSplitter, load_for_serving
from seekling.tasks import render_prompt_ids
from seekling.tokenizer import THINK_CLOSE
from seekling.threads import choose_threads

DIM, RESET = "\033[2m", "\033[0m"
HELP = "commands: /reset, /temp VALUE, /max TOKENS, /quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model directory or seekling run directory")
    parser.add_argument("--system", default=None, help="a system message at the start of the conversation")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                        help="dim the reasoning with ANSI codes; auto: when stdout is a terminal and NO_COLOR is "
                             "unset (default: %(default)s)")
    add_sampling_arguments(parser)


class ChatSession:
    """The conversation and its slash commands, separate from the terminal loop."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None, color: bool = False,
                 out=None):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.params, self.system = params, system
        self.dim, self.reset = (DIM, RESET) if color else ("", "")
        self.out = out or sys.stdout
        self.messages: list[dict[str, str]] = []

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def command(self, line: str) -> bool:
        """Handle a /command; False when the session should end."""
        name, _, value = line.strip().partition(" ")
        try:
            if name == "/quit":
                return False
            if name == "/reset":
                self.messages.clear()
                self.write("(conversation cleared)\n")
            elif name == "/temp":
                self.params = replace(self.params, temperature=float(value))
                self.params.validate()
                self.write(f"(temperature {self.params.temperature:g})\n")
            elif name == "/max":
                tokens = int(value)
                if tokens < 1:
                    raise ValueError
                self.params = replace(self.params, max_new_tokens=tokens)
                self.write(f"(at most {tokens} tokens per answer)\n")
            else:
                self.write(f"unknown command {name!r}; {HELP}\n")
        except (ValueError, SeeklingError):
            self.write(f"bad value {value!r} for {name}; {HELP}\n")
        return True

    def reply(self, text: str) -> str:
        """Send a user turn, stream the answer, keep it in the history; returns the raw completion."""
        self.messages.append({"role": "user", "content": text})
        prompt = render_prompt_ids(self.tokenizer, self.messages, system=self.system)
        events: queue.Queue = queue.Queue()
        try:
            (handle,) = self.engine.submit([Job(prompt, self.params)], lambda i, ev: events.put(ev))
        except SeeklingError as e:
            self.messages.pop()
            self.write(f"error: {e} (try /reset)\n")
            return ""
        splitter, raw, mode, finish = ReasoningSplitter(), [], None, None
        try:
            while finish is None:
                ev = events.get()
                raw.append(ev.text)
                finish = ev.finish_reason
                reasoning, content = splitter.push(ev.text)
                if finish:
                    r2, c2 = splitter.finish()
                    reasoning, content = reasoning + r2, content + c2
                if reasoning:
                    self.write(("" if mode == "reasoning" else self.dim) + reasoning)
                    mode = "reasoning"
                if content:
                    self.write((self.reset + "\n\n" if mode == "reasoning" else "") + content)
                    mode = "content"
                if finish == "error":
                    self.write(f"\nerror: {ev.error}")
        except KeyboardInterrupt:
            handle.cancel()
            finish = "interrupted"
        notes = {"length": f" [stopped at {self.params.max_new_tokens} tokens]", "interrupted": " [stopped]"}
        self.write((self.reset if mode == "reasoning" else "") + notes.get(finish, "") + "\n")
        completion = "".join(raw)
        # What follows </think> (the answer with its tags) becomes the assistant turn.
        self.messages.append({"role": "assistant", "content": completion.split(THINK_CLOSE)[-1].strip()})
        return completion


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise SeeklingError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    choose_threads(args.threads)
    model, tokenizer, model_dir = load_for_serving(args.model_dir, dtype=DTYPES[args.dtype], say=print)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop_token_ids=(tokenizer.eos_id,), seed=args.seed)
    params.validate()
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
    engine = Engine(model, tokenizer, max_concurrent=1, max_queue=0).start()
    session = ChatSession(engine, params, args.system, color)
    print(f"seekling chat with {model_dir} ({model.config.max_position_embeddings} tokens of context). {HELP}")
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            if not interactive:
                print(f"you> {line}")
            if not line.strip():
                continue
            if line.startswith("/"):
                if not session.command(line):
                    break
                continue
            session.write("seekling> ")
            session.reply(line)
    except KeyboardInterrupt:
        print()
    finally:
        engine.close()
    return 0
