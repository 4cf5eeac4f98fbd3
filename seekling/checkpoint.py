"""The Hugging Face format: `config.json` + `model.safetensors` with released DeepSeek-V3 tensor names.

What `save_pretrained` writes loads in transformers' `AutoModelForCausalLM.from_pretrained`, and a
directory saved by transformers (or a released DeepSeek-V3-format checkpoint, sharded or not) loads
with `load_pretrained`. Weights only travel through safetensors: nothing is ever unpickled.
Every directory saved here carries an integrity record, `SHA256SUMS` (`sha256sum -c` format), checked
when it is loaded, and loaded weights must be finite: a damaged file is named, never used.

    python -c "from seekling.checkpoint import *; from seekling.model import Transformer; \
               from seekling.config import ModelConfig; save_pretrained(Transformer(ModelConfig.from_name('tiny')), '/tmp/t'); \
               print(load_pretrained('/tmp/t').config.hidden_size)"
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from seekling.config import ModelConfig
from seekling.errors import CheckpointError, ConfigError
from seekling.files import replace_dir, write_text_atomic
from seekling.model import Transformer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CHECKSUMS_NAME = "SHA256SUMS"  # one "<sha256>  <file>" line per file, written last by every save
FP32_NAMES = ("e_score_correction_bias",)  # kept in fp32 whatever the save dtype, as released checkpoints do
_MTP_COPIES = (".embed_tokens.weight", ".shared_head.head.weight")  # an MTP layer's copies of the model's own


# ----------------------------------------------------------------------------- name mapping
def hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Released checkpoint name -> the model's tensor under it, detached (experts split per expert, MTP as
    layer L + k): one table read by the save (`to_hf_state_dict`) and written by the load (`_assign`)."""
    c = model.config
    L = c.num_hidden_layers
    out = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    blocks = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.layers)]
    for k, mtp in enumerate(model.mtp):
        prefix = f"model.layers.{L + k}"
        blocks.append((prefix, mtp.block))
        for name in ("enorm", "hnorm"):
            out[f"{prefix}.{name}.weight"] = getattr(mtp, name).weight
        out[f"{prefix}.eh_proj.weight"] = mtp.eh_proj.weight
        out[f"{prefix}.shared_head.norm.weight"] = mtp.shared_head.norm.weight
        out[f"{prefix}.embed_tokens.weight"] = model.embed_tokens.weight  # copies, as released weights carry them
        out[f"{prefix}.shared_head.head.weight"] = model.lm_head.weight
    for prefix, block in blocks:
        for name, t in block.state_dict(keep_vars=True).items():
            m = re.fullmatch(r"mlp\.experts\.(gate_up_proj|down_proj)", name)
            if m is None:
                out[f"{prefix}.{name}"] = t
            elif m.group(1) == "gate_up_proj":
                F_ = block.mlp.experts.inter_dim
                for e in range(t.shape[0]):
                    out[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = t[e, :F_]
                    out[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = t[e, F_:]
            else:
                for e in range(t.shape[0]):
                    out[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = t[e]
    return {name: t.detach() for name, t in out.items()}


def to_hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our module tree -> released checkpoint names, `dtype` for floating tensors (the routing bias stays
    fp32); a tensor saved under two names is cloned for the second."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in hf_tensors(model).items():
        if dtype is not None and t.is_floating_point() and not name.endswith(FP32_NAMES):
            t = t.to(dtype)
        out[name] = t.contiguous().clone() if t.data_ptr() in seen else t.contiguous()
        seen.add(t.data_ptr())
    return out


def from_hf_state_dict(model: Transformer, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy released-name tensors into `model`, naming every missing, unexpected or mis-shaped tensor."""
    c = model.config
    L = c.num_hidden_layers
    expected = hf_tensors(model)
    # Accept transformers' fused in-memory expert layout too.
    tensors = dict(tensors)
    for name in [n for n in tensors if re.search(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", n)]:
        t = tensors.pop(name)
        prefix, kind = name.rsplit(".", 1)
        for e in range(t.shape[0]):
            if kind == "gate_up_proj":
                gate, up = t[e].chunk(2, dim=0)
                tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"] = gate, up
            else:
                tensors[f"{prefix}.{e}.down_proj.weight"] = t[e]
    mtp_prefixes = tuple(f"model.layers.{L + k}." for k in range(c.num_nextn_predict_layers))
    missing = [n for n in expected if n not in tensors and not (n.startswith(mtp_prefixes) and n.endswith(_MTP_COPIES))]
    unexpected = [n for n in tensors if n not in expected and not n.endswith("weight_scale_inv")]
    unexpected = [n for n in unexpected if not n.endswith("rotary_emb.inv_freq")]
    if c.tie_word_embeddings:
        unexpected = [n for n in unexpected if n != "lm_head.weight"]
    missing_mtp = [n for n in missing if n.startswith(mtp_prefixes)]
    if missing_mtp and len(missing_mtp) == sum(1 for n in expected if n.startswith(mtp_prefixes)
                                               and not n.endswith(_MTP_COPIES)):
        # Checkpoints saved by transformers drop the MTP modules: keep ours freshly initialised.
        warnings.warn(f"{source}: no multi-token-prediction weights; the MTP modules keep their initial values")
        missing = [n for n in missing if not n.startswith(mtp_prefixes)]
    if any(n.endswith("weight_scale_inv") for n in tensors):
        raise CheckpointError(f"{source}: FP8 block-quantised weights (weight_scale_inv) are not supported; "
                              "dequantise to bf16 first")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_short(unexpected)}")
    mismatched = [f"{n} {tuple(tensors[n].shape)} (expected {tuple(expected[n].shape)})"
                  for n in expected if n in tensors and tensors[n].shape != expected[n].shape]
    if mismatched:
        problems.append(f"shape mismatch: {_short(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not match the config: " + "; ".join(problems))
    _assign(model, tensors)


def _assign(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into the model, in place; the MTP modules' copies of the embedding and the head
    are never read (the model's own are)."""
    mtp = tuple(f"model.layers.{model.config.num_hidden_layers + k}." for k in range(len(model.mtp)))
    with torch.no_grad():
        for name, dst in hf_tensors(model).items():
            if name in tensors and not (name.startswith(mtp) and name.endswith(_MTP_COPIES)):
                dst.copy_(tensors[name].to(dst.dtype))


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# ----------------------------------------------------------------------------- save / load
def save_pretrained(model: Transformer, directory: str, dtype: torch.dtype | None = None,
                    extra_files: dict[str, str] | None = None) -> str:
    """Write config.json + model.safetensors atomically: a temporary directory renamed into place."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the final directory gets normal permissions
    try:
        model.config.save(tmp)
        save_file(to_hf_state_dict(model, dtype), os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        for name, path in (extra_files or {}).items():
            shutil.copy(path, os.path.join(tmp, name))
        write_checksums(tmp)
        replace_dir(tmp, directory, directory + ".old")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ----------------------------------------------------------------------------- integrity
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: str | os.PathLike) -> None:
    """Record the sha256 of every file of `directory` in its SHA256SUMS (call once the files are final)."""
    names = sorted(n for n in os.listdir(directory)
                   if n != CHECKSUMS_NAME and os.path.isfile(os.path.join(directory, n)))
    write_text_atomic(os.path.join(directory, CHECKSUMS_NAME),
                      "".join(f"{file_sha256(os.path.join(directory, n))}  {n}\n" for n in names))


def verify_checksums(directory: str | os.PathLike) -> bool:
    """CheckpointError naming the first file of `directory` that differs from its SHA256SUMS record.
    False when there is no record (a directory saved by another program, or by an older seekling)."""
    record = os.path.join(directory, CHECKSUMS_NAME)
    if not os.path.isfile(record):
        return False
    try:
        with open(record, encoding="utf-8") as f:
            entries = [line.rstrip("\n").split("  ", 1) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{record}: unreadable integrity record ({e})") from None
    if not entries:
        raise CheckpointError(f"{record}: the integrity record is empty (damaged)")
    for entry in entries:
        if len(entry) != 2 or not re.fullmatch(r"[0-9a-f]{64}", entry[0]):
            raise CheckpointError(f"{record}: damaged integrity record (a line is not '<sha256>  <file>')")
        digest, name = entry
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (listed in {CHECKSUMS_NAME})")
        if file_sha256(path) != digest:
            raise CheckpointError(
                f"{path} is damaged: its sha256 differs from the one recorded in {CHECKSUMS_NAME} when it was "
                f"saved (if you changed it on purpose, delete {record})")
    return True


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the first tensor with NaN or infinite values (how many, of how many)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor {name} has {bad} NaN/infinite value(s) of {t.numel()}; "
                                  "the weights are damaged (or training diverged before this save)")


def read_safetensors_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; a CheckpointError naming it when it is truncated or garbled."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip() or type(e).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file, it is truncated or damaged "
                              f"({reason})") from None


def read_safetensors(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a directory: model.safetensors, or the shards listed by model.safetensors.index.json.
    Weights with NaN or infinite values are refused, naming the tensor."""
    index = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a shard index ({type(e).__name__}: {e})") from None
    elif os.path.exists(os.path.join(directory, WEIGHTS_NAME)):
        files = [WEIGHTS_NAME]
    else:
        found = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {', '.join(found)}: pickled weights are never loaded)" if found else ""
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{directory}: shard {name} listed in {INDEX_NAME} is missing")
        shard = read_safetensors_file(path)
        check_finite(shard, path)
        tensors.update(shard)
    return tensors


def load_pretrained(directory: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """A seekling Transformer from a DeepSeek-V3-format directory (ours, transformers', or released)."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory")
    verify_checksums(directory)
    try:
        config = ModelConfig.from_file(directory)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    with torch.device(device):
        model = Transformer(config)
    from_hf_state_dict(model, read_safetensors(directory), source=directory)
    model = model.to(dtype)
    for gate in model.moe_gates:  # the routing bias stays fp32
        gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
    return model.eval()


# ----------------------------------------------------------------------------- finding the model in a directory
def is_model_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face-format model directory: config.json and safetensors weights (one file or shards)."""
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, WEIGHTS_NAME)) or os.path.isfile(os.path.join(path, INDEX_NAME)))


def _step_number(name: str) -> int:
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else -1


def best_evaluated_stage(run_dir: str | os.PathLike) -> tuple[str, float, dict[str, float]] | None:
    """(stage, its pass@1, every evaluated stage's pass@1) of the stage in `run_dir` whose final model
    scored best in the run's own held-out evaluations (`eval/STAGE.json`, as `seekling speedrun`
    writes them, with a `STAGE/final` model beside them); None when there are none. Ties go to the
    stage evaluated later in the run (its state.json order), which trained the longest. Unreadable
    result files are passed over: they do not say which model is better."""
    run_dir = os.fspath(run_dir)
    scores: dict[str, float] = {}
    eval_dir = os.path.join(run_dir, "eval")
    for name in sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else []:
        stage = name[:-len(".json")]
        if not name.endswith(".json") or not is_model_dir(os.path.join(run_dir, stage, "final")):
            continue
        try:
            with open(os.path.join(eval_dir, name)) as f:
                score = json.load(f)["mean"]["pass@1"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(score, (int, float)) and not isinstance(score, bool) and score == score:
            scores[stage] = float(score)
    if not scores:
        return None
    try:
        with open(os.path.join(run_dir, "state.json")) as f:
            finished = list(json.load(f).get("finished", []))
    except (OSError, ValueError, AttributeError):
        finished = []
    order = {stage: finished.index(f"eval_{stage}") if f"eval_{stage}" in finished else -1 for stage in scores}
    best = max(scores, key=lambda stage: (scores[stage], order[stage]))
    return best, scores[best], scores


def choose_model_dir(path: str | os.PathLike) -> tuple[str, str]:
    """(model directory, why it was chosen) in `path`, by the same rules for every command:

    1. `path` itself when it is a model directory (an HF directory, a final/ or a checkpoint);
    2. `path/final`;
    3. in a run directory holding several stages' models and their held-out evaluations (a speedrun:
       `eval/STAGE.json` beside `STAGE/final`), the final model of the stage with the best pass@1;
    4. the checkpoint directory up to two levels down (e.g. `RUN/checkpoints/step_0000500`) with the
       highest step number in its name, the most recently written one on a tie.
    Hidden directories (`.tmp-*`, saves in progress) and `*.old` ones are skipped. A CheckpointError
    says what was looked for."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    if is_model_dir(path):
        return path, "the model directory given"
    final = os.path.join(path, "final")
    if is_model_dir(final):
        return final, "the run's final model"
    best = best_evaluated_stage(path)
    if best is not None:
        stage, score, scores = best
        others = ", ".join(f"{s} {100 * v:.1f}%" for s, v in scores.items() if s != stage)
        return (os.path.join(path, stage, "final"),
                f"{stage}: the best held-out pass@1 of this run, {100 * score:.1f}%"
                + (f"; also evaluated: {others}" if others else "") + "; give STAGE/final for another")
    candidates = []
    for root, dirs, _ in os.walk(path):
        depth = os.path.relpath(root, path).count(os.sep) + (root != path)
        if depth >= 2:
            dirs.clear()
        dirs[:] = [d for d in dirs if not d.startswith(".") and not d.endswith(".old")]  # half-written saves
        candidates += [os.path.join(root, d) for d in dirs if is_model_dir(os.path.join(root, d))]
    if not candidates:
        pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        raise CheckpointError(
            f"{path}: not a model directory: looked for a seekling run directory (final/ or checkpoints/step_*/), "
            f"a seekling / DeepSeek-V3 Hugging Face directory and a transformers causal LM directory (each: "
            f"config.json + {WEIGHTS_NAME} or {INDEX_NAME})"
            + (f"; found {', '.join(pickled)}, but pickled weights are never loaded" if pickled else ""))
    return max(candidates, key=lambda d: (_step_number(os.path.basename(d)), os.path.getmtime(d))), \
        "the newest model directory in it (highest step)"


def run_state(path: str | os.PathLike) -> tuple[str, dict] | None:
    """(run directory, its state.json) of the speedrun that `path` is or lies in (a stage's final model
    or checkpoint, up to three levels down), or None."""
    directory = os.path.abspath(os.fspath(path))
    for _ in range(4):
        try:
            with open(os.path.join(directory, "state.json")) as f:
                state = json.load(f)
            if isinstance(state, dict) and str(state.get("format", "")).startswith("seekling-speedrun"):
                return directory, state
        except (OSError, ValueError):
            pass
        directory = os.path.dirname(directory)
    return None


def trained_tasks(path: str | os.PathLike) -> list[str] | None:
    """The reasoning tasks the model in `path` was trained to answer in the chat format (a speedrun's
    cold-start, GRPO and evaluation task), when its run says so; None when it does not."""
    found = run_state(path)
    task = (found[1].get("config") or {}).get("rl_task") if found else None
    return [task] if isinstance(task, str) and task else None


def resolve_model_dir(path: str | os.PathLike) -> str:
    """The model directory in `path` by `choose_model_dir`'s rules."""
    return choose_model_dir(path)[0]


def model_kind(model_dir: str | os.PathLike) -> str:
    """"seekling" for a DeepSeek-V3-format config.json (ours or released), else "transformers"."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a JSON object ({e})") from None
    if not model_type:
        raise CheckpointError(f"{path} has no model_type; not a model config")
    return "seekling" if model_type == "deepseek_v3" else "transformers"


def find_tokenizer_dir(model_dir: str, given_path: str) -> str:
    """The model directory when it holds tokenizer.json, else the run directory, RUN/tokenizer or the
    model directory's parent (a checkpoint's run)."""
    candidates = list(dict.fromkeys([model_dir, given_path, os.path.join(given_path, "tokenizer"),
                                     os.path.dirname(model_dir)]))
    for d in candidates:
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return d
    raise CheckpointError(f"{model_dir}: no tokenizer.json in {', '.join(candidates)}; pass --tokenizer DIR "
                          "(or save the tokenizer into the model directory)")


def resolve_model_and_tokenizer(path: str, tokenizer: str | None = None,
                                say: Callable[[str], None] | None = None) -> tuple[str, str]:
    """(model directory, tokenizer directory) of a model, run or checkpoint directory; `tokenizer` wins.
    `say`, when given, is told which model was chosen and why."""
    model_dir, why = choose_model_dir(path)
    if say is not None:
        say(f"model: {model_dir} ({why})")
    return model_dir, tokenizer or find_tokenizer_dir(model_dir, path)
