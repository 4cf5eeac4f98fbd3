"""seekling generate: complete one or more prompts and print the result, for scripts.

MODEL_DIR is a Hugging Face-format directory (config.json, model.safetensors, tokenizer files) or a
seekling run directory: its final/, in a speedrun directory the stage with the best held-out pass@1
in its eval/ results, else its latest checkpoint; which one is printed on stderr. Each prompt is a user message put
through the chat template, unless --raw feeds the text as it is (after the bos token). The output
is the completion as generated, reasoning tags included; --json prints one JSON object per prompt
with the reasoning and the answer split apart. The same settings and --seed give the same text as
the server (`seekling serve`) does for a request with that seed.

    seekling generate runs/main/final --prompt "What is 47+38?" --temperature 0.6 --seed 1
    seekling generate runs/main --prompt "A conversation between User and Assistant." --raw --max-tokens 64
    echo "What is 2+2?" | seekling generate runs/main/final --prompt - --json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from seekling.commands import add_threads, finite_float
from seekling.errors import SeeklingError
from seekling.commands import add_setting
from seekling.generate import (CHAT_TEMPERATURE, CHAT_TOP_P, SPECULATE, DecodeSettings, SamplingParams, generate,
                               resolve_speculate)
from seekling.serving import load_for_serving, split_reasoning
from seekling.tasks import render_prompt_ids
from seekling.threads import choose_threads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `generate` and `chat`."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=finite_float, default=CHAT_TEMPERATURE,
                       help="softmax temperature; 0 is greedy, DeepSeek suggests 0.6 for R1 (default: %(default)s)")
    group.add_argument("--top-p", type=finite_float, default=CHAT_TOP_P,
                       help="nucleus sampling: keep the smallest set of tokens whose probability reaches this "
                            "(default: %(default)s)")
    group.add_argument("--top-k", type=int, default=0,
                       help="keep only the k most likely tokens; 0 keeps all (default: %(default)s)")
    group.add_argument("--max-tokens", type=int, default=512,
                       help="most tokens to generate per answer (default: %(default)s)")
    group.add_argument("--seed", type=int, default=None,
                       help="random seed; with several --prompt, prompt i uses seed + i (default: unseeded)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights dtype (default: %(default)s)")
    add_setting(group, DecodeSettings, "speculate", choices=list(SPECULATE))
    add_threads(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model directory or seekling run directory")
    parser.add_argument("--prompt", action="append", required=True,
                        help="the prompt; repeat for several, '-' reads one from stdin")
    parser.add_argument("--system", default=None, help="a system message before each prompt (chat template only)")
    parser.add_argument("--raw", action="store_true", help="skip the chat template: continue the text as it is")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (text, reasoning_content, content, token counts)")
    add_sampling_arguments(parser)


def read_stdin() -> str:
    """The prompt piped in for `--prompt -`, as UTF-8 text (SeeklingError naming the first bad byte)."""
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SeeklingError(f"--prompt -: stdin is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})") from None


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise SeeklingError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    choose_threads(args.threads)
    texts = [read_stdin() if p == "-" else p for p in args.prompt]
    model, tokenizer, _ = load_for_serving(args.model_dir, dtype=DTYPES[args.dtype],
                                           say=lambda line: print(line, file=sys.stderr))
    prompts = [render_prompt_ids(tokenizer, t, "raw" if args.raw else "chat", args.system) for t in texts]
    params = [SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, stop_token_ids=(tokenizer.eos_id,),
                             seed=None if args.seed is None else args.seed + i) for i in range(len(prompts))]
    outputs = generate(model, prompts, params, speculate=resolve_speculate(model, args.speculate, len(prompts), print))
    for text, prompt, out in zip(texts, prompts, outputs):
        ids = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
        completion = tokenizer.decode(ids, skip_special=True)
        if args.json:
            reasoning, content = split_reasoning(completion)
            print(json.dumps({"prompt": text, "text": completion, "reasoning_content": reasoning, "content": content,
                              "finish_reason": out.finish_reason, "prompt_tokens": len(prompt),
                              "completion_tokens": len(out.token_ids)}, ensure_ascii=False))
        else:
            print(completion)
    return 0
