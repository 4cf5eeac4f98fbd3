"""seekling serve: an OpenAI-compatible HTTP server with continuous batching, and a chat page at /.

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions (streaming or not; chat
answers carry the reasoning in `reasoning_content` and the answer in `content`, as DeepSeek's API
does for R1), GET /health, and the web chat at /. Requests share the model through one engine
thread that runs all active requests in each decode step (--max-concurrent of them; up to
--max-queue more wait). It listens on 127.0.0.1 unless --host says otherwise; give it an API key
before exposing it: from a file (--api-key-file) or the SEEKLING_API_KEY environment variable, which
other users of the machine cannot see, unlike --api-key (visible in `ps`). See docs/serving.md.

    seekling serve runs/main/final
    openssl rand -hex 16 > key && chmod 600 key
    seekling serve runs/main --host 0.0.0.0 --port 8080 --max-concurrent 16 --api-key-file key
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "What is 2+2?"}]}'
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from seekling.commands import add_setting, add_threads, port
from seekling.commands.generate import DTYPES
from seekling.generate import SPECULATE, DecodeSettings
from seekling.errors import SeeklingError
from seekling.checkpoint import trained_tasks
from seekling.serving import Engine, load_for_serving, served_model_name, suggested_prompts
from seekling.threads import choose_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model directory or seekling run directory")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on; 0.0.0.0 is every interface (default: %(default)s)")
    net.add_argument("--port", type=port, default=8000, help="TCP port (default: %(default)s)")
    key = net.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", default=None, metavar="FILE",
                     help="require 'Authorization: Bearer KEY' on /v1/*, KEY being this file's first line "
                          "(the way to pass a key that `ps` does not show)")
    key.add_argument("--api-key", default=os.environ.get("SEEKLING_API_KEY"),
                     help="the key itself (visible to other users in `ps`: prefer --api-key-file or the "
                          "environment; default: $SEEKLING_API_KEY, else none)")
    net.add_argument("--model-name", default=None,
                     help="the model id reported by /v1/models; requests may also name it 'seekling' "
                          "(default: the run and stage, e.g. speedrun-cpu-grpo, else the directory name)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-concurrent", type=int, default=8,
                        help="requests decoded together, one cache slot each (default: %(default)s)")
    engine.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a slot; more get 429 (default: %(default)s)")
    engine.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights dtype (default: %(default)s)")
    add_setting(engine, DecodeSettings, "speculate", choices=list(SPECULATE))
    add_threads(engine)
    limits = parser.add_argument_group("limits per request")
    limits.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longest prompt in tokens (default: the model's context minus one)")
    limits.add_argument("--max-tokens-cap", type=int, default=None,
                        help="largest max_tokens a request may ask for (default: the model's context)")
    limits.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest request body in bytes (default: %(default)s)")
    limits.add_argument("--max-n", type=int, default=16,
                        help="most completions (n, times the prompts) per request (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import uvicorn  # fastapi and uvicorn are imported only by the command that serves

    from seekling.server import Limits, create_app

    for flag in ("max_concurrent", "port", "max_body_bytes", "max_n", "max_prompt_tokens", "max_tokens_cap"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SeeklingError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.max_queue < 0:
        raise SeeklingError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.api_key_file:
        args.api_key = read_api_key(args.api_key_file)
    choose_threads(args.threads)
    model, tokenizer, model_dir = load_for_serving(args.model_dir, dtype=DTYPES[args.dtype],
                                                   say=lambda line: print(line, file=sys.stderr))
    name = args.model_name or served_model_name(model_dir)
    engine = Engine(model, tokenizer, max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                    speculate=args.speculate, say=lambda line: print(line, file=sys.stderr))
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens_cap=args.max_tokens_cap,
                    max_body_bytes=args.max_body_bytes, max_n=args.max_n)
    app = create_app(engine, tokenizer, name, api_key=args.api_key, limits=limits,
                     suggestions=suggested_prompts(trained_tasks(model_dir)))
    if not args.api_key and not _is_loopback(args.host):
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"seekling: serving {model_dir} as {name!r} on http://{shown}:{args.port} "
          f"({args.max_concurrent} slots, {engine.max_len} tokens of context)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def read_api_key(path: str) -> str:
    """The first line of `path`, stripped: the key (a SeeklingError when it is unreadable or empty)."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SeeklingError(f"--api-key-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not key:
        raise SeeklingError(f"--api-key-file {path}: the first line is empty; put the key there")
    return key


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
