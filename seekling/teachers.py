"""Teachers for rejection sampling: a seekling run or HF-format directory, or any transformers causal LM.

`load_teacher(path)` finds what `path` holds and returns a `Teacher` with a tokenizer and a batched
`generate`; anything else is refused with what was looked for. Used by `seekling.distill`.

    python -c "from seekling.teachers import resolve_teacher; print(resolve_teacher('runs/speedrun-cpu/grpo'))"
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from seekling.checkpoint import load_pretrained, model_kind, resolve_model_dir
from seekling.errors import CheckpointError, ConfigError, DataError
from seekling.generate import Completion, generate
from seekling.tokenizer import Tokenizer

GenerateFn = Callable[[Any, list[list[int]], Any], list[Completion]]


class HFTokenizer:
    """A transformers tokenizer behind the few methods seekling's sampling and evaluation call."""

    def __init__(self, tokenizer, source: str):
        if tokenizer.eos_token_id is None:
            raise CheckpointError(f"{source}: the tokenizer has no eos token, so sampling could never stop")
        self.backend = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.bos_id = tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False)

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """The chat template with the generation prompt; without a template, the user text after bos."""
        if getattr(self.backend, "chat_template", None):
            ids = self.backend.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in transformers >= 5
            return list(ids)
        text = "\n".join(m["content"] for m in messages)
        return ([self.bos_id] if self.bos_id is not None else []) + self.encode(text)


def make_hf_generate(pad_id: int) -> GenerateFn:
    """A `generate`-compatible function for a transformers model: left-padded batch, `model.generate`.

    Rows must share their sampling settings (seeds aside: transformers draws one stream per batch,
    seeded by the first row's seed). Log-probabilities are not reported (`Completion.logprobs` is empty).
    """

    @torch.inference_mode()
    def hf_generate(model, prompts: list[list[int]], params) -> list[Completion]:
        per_row = params if isinstance(params, list) else [params] * len(prompts)
        if not prompts:
            return []
        first = per_row[0]
        if any(dataclasses.replace(p, seed=None) != dataclasses.replace(first, seed=None) for p in per_row):
            raise ConfigError("a transformers teacher samples a batch with one set of settings (seeds aside)")
        device = next(model.parameters()).device
        B, T = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        for b, ids in enumerate(prompts):
            input_ids[b, T - len(ids):] = torch.tensor(ids)
            attention[b, T - len(ids):] = 1
        stops = set(first.stop_token_ids)
        kwargs: dict[str, Any] = {"max_new_tokens": first.max_new_tokens, "pad_token_id": pad_id,
                                  "eos_token_id": sorted(stops) or None}
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=first.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if first.seed is not None:
                torch.manual_seed(first.seed)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        ends = [next((i + 1 for i, t in enumerate(row) if t in stops), None) for row in out[:, T:].tolist()]
        return [Completion(row[:end], [], "length" if end is None else "stop")
                for row, end in zip(out[:, T:].tolist(), ends)]

    return hf_generate


@dataclass
class Teacher:
    """A model that can be sampled: `generate_fn(model, prompt_ids, params)`, texts via `tokenizer`."""

    model: Any
    tokenizer: Any  # seekling.tokenizer.Tokenizer or HFTokenizer
    generate_fn: GenerateFn
    kind: str  # "seekling" or "transformers"
    path: str  # the model directory actually loaded
    fingerprint: str  # sha256 over config and weights: which teacher wrote a samples file

    @property
    def identity(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "fingerprint": self.fingerprint}

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_teacher(path: str | Path) -> tuple[Path, str]:
    """(model directory, kind) for a teacher path, by `seekling.checkpoint.resolve_model_dir`'s rules."""
    directory = resolve_model_dir(path)
    return Path(directory), model_kind(directory)


def weights_fingerprint(directory: str | Path) -> str:
    """sha256 of config.json and the safetensors files: the same weights anywhere, other weights never."""
    digest = hashlib.sha256()
    for name in ["config.json"] + sorted(f.name for f in Path(directory).iterdir() if f.suffix == ".safetensors"):
        digest.update(name.encode())
        with open(Path(directory) / name, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def load_teacher(path: str | Path, tokenizer_dir: str | Path | None = None,
                 device: str | torch.device = "cpu") -> Teacher:
    """A teacher from any directory `resolve_teacher` accepts. Seekling models sample with the fast
    latent-cache sampler and the seekling tokenizer; other models through transformers'
    AutoModelForCausalLM + AutoTokenizer (safetensors weights only: nothing is unpickled)."""
    directory, kind = resolve_teacher(path)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else directory
    if kind == "seekling":
        model = load_pretrained(str(directory), device=device)
        tokenizer = _seekling_or_hf_tokenizer(tok_dir)
        generate_fn = generate  # the latent-cache sampler: token ids in, whatever the tokenizer
    else:
        try:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(str(directory), use_safetensors=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{directory}: transformers cannot load it as a causal LM ({e})") from None
        model = model.to(device).eval()
        tokenizer = _hf_tokenizer(tok_dir)
        generate_fn = make_hf_generate(tokenizer.pad_id)
    return Teacher(model, tokenizer, generate_fn, kind, str(directory.resolve()), weights_fingerprint(directory))


def _hf_tokenizer(directory: Path) -> HFTokenizer:
    try:
        from transformers import AutoTokenizer
        return HFTokenizer(AutoTokenizer.from_pretrained(str(directory)), str(directory))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: no tokenizer transformers can load ({e}); pass --teacher-tokenizer") from None


def _seekling_or_hf_tokenizer(directory: Path):
    if (directory / "tokenizer.json").is_file():
        try:
            return Tokenizer.load(directory)
        except DataError:
            pass  # not a seekling vocabulary (a released DeepSeek-V3 one, say): transformers reads it
    return _hf_tokenizer(directory)
