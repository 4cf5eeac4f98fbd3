"""The `seekling` command. Each subcommand lives in its own module under `seekling.commands`.

A command module has a docstring (its first line is the one-line help), `add_arguments(parser)` and
`run(args) -> int | None`. Modules are imported only when their command runs, so `seekling --help`
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from seekling import __version__
from seekling.commands import HelpFormatter
from seekling.errors import SeeklingError

# name -> (module, one-line help). Keep the help here so `seekling --help` imports nothing heavy.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("seekling.commands.demo", "build a model preset, count its parameters and sample from it"),
    "params": ("seekling.commands.params", "print total and active parameter counts of a preset or config.json"),
    "cost": ("seekling.commands.cost", "FLOPs, GPU-hours, days and dollars to train a preset or config.json on N tokens"),
    "tokenizer": ("seekling.commands.tokenizer", "train a byte-level BPE tokenizer (with the chat template) or encode a text"),
    "data": ("seekling.commands.data", "build token shards for pre-training, or chat JSONL for SFT, from tasks and text"),
    "chat": ("seekling.commands.chat", "talk to a model in the terminal, reasoning dimmed, answers streamed"),
    "generate": ("seekling.commands.generate", "complete prompts with a model and print the text (or JSON), for scripts"),
    "serve": ("seekling.commands.serve", "OpenAI-compatible HTTP server with continuous batching and a web chat page"),
    "sft": ("seekling.commands.sft", "supervised fine-tuning on chat JSONL (assistant-only loss), or write cold-start data"),
    "grpo": ("seekling.commands.grpo", "reinforcement learning with GRPO on the reasoning tasks (R1-Zero style)"),
    "pretrain": ("seekling.commands.pretrain", "pre-train a model on token shards: CE + MTP, aux-loss-free MoE balancing, lossless checkpoints"),
    "eval": ("seekling.commands.eval", "pass@1 / pass@k / cons@k, format and length on held-out tasks and GSM8K/MATH-500/AIME"),
    "sample": ("seekling.commands.sample", "rejection sampling: keep a teacher's verified, well-formed completions as chat JSONL"),
    "distill": ("seekling.commands.distill", "rejection-sample a teacher, SFT a smaller student on it, evaluate all three"),
    "export": ("seekling.commands.export", "write a model as a GGUF file for llama.cpp and Ollama (deepseek2 layout, tokenizer, chat template)"),
    "speedrun": ("seekling.commands.speedrun", "the whole R1 recipe end to end (data, pre-training, SFT, GRPO, distillation) with a report card; resumable"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seekling",
        description="DeepSeek-V3/R1 at small scale: train, reason, evaluate, serve and cost.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `seekling COMMAND --help` for the flags of one command.",
    )
    parser.add_argument("--version", action="version", version=f"seekling {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # First pass: find the command, then let its module add its own flags and parse again.
    first_pass = [a for a in argv if a not in ("-h", "--help")]
    known, _ = parser.parse_known_args(first_pass) if first_pass else (argparse.Namespace(command=None), [])
    if known.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[known.command][0])
    sub_parser = parser._subparsers._group_actions[0].choices[known.command]  # type: ignore[union-attr]
    if module.__doc__:
        sub_parser.description = module.__doc__.strip()
    module.add_arguments(sub_parser)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except SeeklingError as e:
        print(f"seekling {known.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
