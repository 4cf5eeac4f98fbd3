"""seekling export: write a trained model as a GGUF file that llama.cpp (and Ollama) run.

RUN_OR_MODEL_DIR is a seekling run directory (its final/ or latest checkpoint), a checkpoint or a
DeepSeek-V3-format Hugging Face directory. The GGUF file holds the model as llama.cpp's `deepseek2`
architecture reads it (MLA with the latent KV cache, sigmoid routing with the correction bias, the
shared expert, the leading dense layers), the tokenizer and the chat template; the MTP modules are
left out. Needs `pip install gguf`. An existing file is kept unless --overwrite. Examples:

    seekling export --gguf runs/speedrun/model.gguf runs/speedrun/grpo
    seekling export --gguf model-f16.gguf runs/sft/final --outtype f16 --overwrite
    llama-cli -m runs/speedrun/model.gguf -cnv     # chat with it in llama.cpp
"""

from __future__ import annotations

import argparse

from seekling.gguf_export import OUT_TYPES, export_gguf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN_OR_MODEL_DIR",
                        help="a run, checkpoint or model directory (a run's final/ or its latest checkpoint)")
    parser.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    parser.add_argument("--outtype", default="f32", choices=OUT_TYPES,
                        help="weight type (norms, the router and its bias stay f32)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the model's, or its run's tokenizer/)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")


def run(args: argparse.Namespace) -> int:
    result = export_gguf(args.model, args.gguf, args.outtype, args.tokenizer, args.overwrite)
    print(f"wrote {result['out']} ({result['bytes'] / 1e6:.1f} MB, {result['tensors']} tensors, {result['type']}) "
          f"from {result['model']}")
    return 0
