"""Load benchmark for `seekling serve`, optionally against vLLM's OpenAI server on the same model and
requests: aggregate generated tokens/s and time to first token (p50/p95) with 1, 4 and 16 concurrent
streaming clients, seekling with MTP speculative decoding off and on (--speculate).

Each server runs as its own process, as it would in use, one after the other (never two at once):
`python -m seekling.cli serve`, then with --vllm PYTHON `PYTHON -m vllm.entrypoints.openai.api_server`
(vLLM lives in its own venv, see bench_vllm.py) with the same --max-num-seqs (the largest
--concurrency), --max-model-len (the model's context, which seekling's engine uses) and compute
threads (vLLM's OpenMP threads bound to the first --threads cores). The clients are asyncio + httpx
streaming /v1/completions; every request is a token-id prompt (the same ids to every server:
--prompt-words words of questions with random numbers, no two prompts alike, so no prefix cache helps) with
`ignore_eos` and `min_tokens`, so it generates exactly --max-tokens tokens (counted from the usage
chunk; a request that got another count is an error). TTFT is the time to the first streamed chunk
with text, for every engine.

Without --model it builds a random-weight model with a tokenizer trained on the built-in tasks:
preset "cpu-large", or with --vllm the small config with DeepSeek's MLA dims that vLLM's CPU MLA
backend takes (bench_vllm.MLA_576, bf16 weights, exported with `save_pretrained`), which both servers
then load from one directory (config.json + safetensors + tokenizer.json). With --vllm and no
--threads, both engines get all CPUs.

    python benchmarks/bench_serve.py                                  # preset "cpu-large", random weights
    python benchmarks/bench_serve.py --model runs/main/final --max-tokens 256
    python benchmarks/bench_serve.py --concurrency 1 2 4 8 16 --requests 64 --threads 1
    python benchmarks/bench_serve.py --vllm /work/venvs/vllm/bin/python --concurrency 1 4 16 --threads 1

It prints the load average before and after (other jobs may share the cores), one table (engine,
clients, requests, tokens, seconds, aggregate tok/s, per client, TTFT p50/p95), with --vllm the ratio
seekling / vLLM of aggregate tok/s at each client count, or, when vLLM does not come up or fails a
request, the exact error and the tail of its log (the seekling rows stay). --json PATH writes the
figures. Targets: 16 clients get at least 4x the aggregate throughput of one, and with --vllm
seekling (the better --speculate row) at least vLLM's at 16 clients; the exit status is 1 when
either is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
MODEL_NAME = "bench"  # the model id both servers answer to


def build_random_model(directory: str, preset: str, mla: bool) -> str:
    """A random-weight model of `preset` (or with `mla`, bench_vllm's MLA_576 in bf16) with a
    tokenizer trained on the built-in tasks, saved together."""
    import torch

    from bench_vllm import MLA_576, export_mla_model
    from seekling.checkpoint import save_pretrained
    from seekling.config import ModelConfig
    from seekling.model import Transformer
    from seekling.tasks import completion_text, make_mixture
    from seekling.tokenizer import Tokenizer

    vocab_size = MLA_576["vocab_size"] if mla else ModelConfig.from_name(preset).vocab_size
    problems = make_mixture(["arithmetic", "countdown", "linear", "wordproblem"], "train", 500, 0)
    texts = [t for p in problems for t in (p.prompt, completion_text(p))]
    tokenizer = Tokenizer.train(texts, vocab_size=vocab_size)
    if mla:
        export_mla_model(directory, vocab_size=tokenizer.vocab_size)
    else:
        torch.manual_seed(0)
        config = ModelConfig.from_name(preset, vocab_size=tokenizer.vocab_size)
        save_pretrained(Transformer(config), directory)
    tokenizer.save(directory)
    return directory


def make_prompts(tokenizer_dir: str, count: int, words: int) -> list[list[int]]:
    """`count` different prompts of `words` words (questions with random numbers), as token ids with BOS."""
    from seekling.tokenizer import Tokenizer

    tokenizer, rng = Tokenizer.load(tokenizer_dir), random.Random(0)
    prompts = []
    for _ in range(count):
        text = " ".join(f"What is {rng.randint(10, 99)} plus {rng.randint(10, 99)}, and then minus {rng.randint(1, 9)}?"
                        for _ in range(words // 9 + 1)).split()[:words]
        prompts.append([tokenizer.bos_id] + tokenizer.encode(" ".join(text)))
    return prompts


class ServerError(Exception):
    """A server that exited or did not answer /health in time; the message has the tail of its log."""


def start_server(cmd: list[str], url: str, timeout: float, log_path: str | None = None,
                 env: dict | None = None) -> subprocess.Popen:
    """Run `cmd` in its own process group (its output to `log_path`, or ours) until `url`/health answers 200."""
    log = open(log_path, "w") if log_path else None
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"the server exited with code {proc.returncode}{log_tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise ServerError(f"the server did not answer /health within {timeout:.0f} s{log_tail(log_path)}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM runs its engine in a child process), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(log_path: str | None, lines: int = 40) -> str:
    if not log_path or not os.path.exists(log_path):
        return ""
    with open(log_path, errors="replace") as f:
        tail = f.readlines()[-lines:]
    return f"; the last {len(tail)} lines of its log:\n" + "".join(tail)


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, seed: int) -> tuple[float, int]:
    """(time to the first chunk with text, completion tokens) of one streamed completion."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "ignore_eos": True, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(json.dumps(chunk["error"]))
            if first is None and any(c.get("text") for c in chunk.get("choices") or []):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != max_tokens:
        raise RuntimeError(f"a request generated {tokens} tokens, not max_tokens = {max_tokens}")
    return first if first is not None else float("nan"), tokens


async def load(url: str, clients: int, prompts: list[list[int]], max_tokens: int) -> dict:
    """`clients` concurrent clients sending `prompts` (client c: every clients-th one, one after another)."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(c: int) -> list[tuple[float, int]]:
            return [await one_request(client, prompts[i], max_tokens, seed=i) for i in range(c, len(prompts), clients)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def measure(engine: str, url: str, args, prompt_sets: dict[int, list[list[int]]], warmup: list[list[int]]) -> list[dict]:
    """Warm-up (the largest client count, 8 tokens each: first calls allocate and pick kernels), then one
    row per client count, each on its own prompts."""
    asyncio.run(load(url, len(warmup), warmup, 8))
    return [{"engine": engine, **asyncio.run(load(url, c, prompt_sets[c], args.max_tokens))} for c in args.concurrency]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model or run directory (default: random weights of --preset, "
                        "or with --vllm of bench_vllm's MLA_576 config)")
    parser.add_argument("--preset", default="cpu-large", help="preset for the random-weight model without --vllm")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="client counts to measure")
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per measurement, shared by the clients (each sends its share in turn)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--prompt-words", type=int, default=40, help="length of each prompt, in words")
    parser.add_argument("--threads", type=int, default=None,
                        help="compute threads of each server (default: seekling's choice; with --vllm all CPUs)")
    parser.add_argument("--speculate", nargs="+", default=["off", "on"], choices=["off", "on", "auto"],
                        help="seekling server runs to measure, one per --speculate value (MTP speculative decoding)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="seekling's weights dtype (`serve --dtype`; vLLM's CPU MLA runs bf16 only)")
    parser.add_argument("--vllm", default=None, metavar="PYTHON",
                        help="python of a venv with vLLM: also measure vLLM's OpenAI server on the same model")
    parser.add_argument("--vllm-timeout", type=float, default=900, help="seconds vLLM may take to come up")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.vllm and args.threads is None:
        args.threads = os.cpu_count()

    from bench_vllm import vllm_cpu_env
    from seekling.checkpoint import resolve_model_and_tokenizer

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    model_path = args.model or build_random_model(os.path.join(tmp.name, "model"), args.preset, bool(args.vllm))
    model_dir, tokenizer_dir = resolve_model_and_tokenizer(model_path)
    with open(os.path.join(model_dir, "config.json")) as f:
        context = json.load(f)["max_position_embeddings"]
    model_about = (args.model or ("bench_vllm.MLA_576 (random weights, bf16)" if args.vllm
                                  else f"preset {args.preset!r} (random weights)"))
    rows_needed = {c: max(1, args.requests // c) * c for c in args.concurrency}
    prompts = make_prompts(tokenizer_dir, sum(rows_needed.values()) + max(args.concurrency), args.prompt_words)
    prompt_sets, start = {}, 0
    for c, n in rows_needed.items():
        prompt_sets[c], start = prompts[start:start + n], start + n
    warmup = prompts[start:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    slots = max(args.concurrency)

    load_before = os.getloadavg()
    rows, vllm_error = [], None
    for speculate in args.speculate:
        cmd = [sys.executable, "-m", "seekling.cli", "serve", model_path, "--port", str(port), "--model-name", MODEL_NAME,
               "--max-concurrent", str(slots), "--max-queue", "256", "--speculate", speculate, "--dtype", args.dtype]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        try:
            server = start_server(cmd, url, 120)
        except ServerError as e:
            raise SystemExit(f"seekling serve: {e}") from None
        try:
            rows += measure(f"seekling spec={speculate}", url, args, prompt_sets, warmup)
        finally:
            stop_server(server)
    if args.vllm:
        cmd = [args.vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--tokenizer", tokenizer_dir,
               "--served-model-name", MODEL_NAME, "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port),
               "--max-num-seqs", str(slots), "--max-model-len", str(context), "--disable-log-stats",
               "--uvicorn-log-level", "warning"]
        log_path = os.path.join(tmp.name, "vllm.log")
        print(f"starting vLLM: {' '.join(cmd)}\n  log: {log_path}", file=sys.stderr, flush=True)
        try:
            server = start_server(cmd, url, args.vllm_timeout, log_path, env={**os.environ, **vllm_cpu_env(args.threads)})
        except ServerError as e:
            vllm_error = f"vLLM did not come up: {e}"
        else:
            try:
                rows += measure("vLLM", url, args, prompt_sets, warmup)
            except Exception as e:  # any failure of a request is reported, with vLLM's log
                vllm_error = f"vLLM failed a request: {type(e).__name__}: {e}{log_tail(log_path)}"
            finally:
                stop_server(server)
    load_after = os.getloadavg()

    print(f"\nmodel: {model_about}, context {context}; {args.max_tokens} tokens per request, prompts of "
          f"{args.prompt_words} words, {args.requests} requests per row; {slots} sequences at most; compute threads "
          f"per server: {args.threads or 'default'}; seekling {args.dtype}" + (", vLLM bfloat16" if args.vllm else ""))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1-minute), on {os.cpu_count()} CPUs\n")
    print(f"{'engine':>18} {'clients':>7} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'per client':>10} "
          f"{'TTFT p50':>9} {'TTFT p95':>9}")
    for r in rows:
        print(f"{r['engine']:>18} {r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['tokens_per_s'] / r['clients']:>10.1f} "
              f"{r['ttft_p50'] * 1000:>7.0f}ms {r['ttft_p95'] * 1000:>7.0f}ms")

    rate = {(r["engine"], r["clients"]): r["tokens_per_s"] for r in rows}
    ratios = {f"seekling spec={s}": {c: rate[(f"seekling spec={s}", c)] / rate[("vLLM", c)] for c in args.concurrency}
              for s in args.speculate if ("vLLM", args.concurrency[0]) in rate}
    if ratios:
        print("\nseekling / vLLM, aggregate tok/s:")
        for engine, by_clients in ratios.items():
            print(f"{engine:>18}  " + "  ".join(f"{c} clients {x:.2f}x" for c, x in by_clients.items()))
    if vllm_error:
        print(f"\n{vllm_error}")

    failed = False
    first = f"seekling spec={args.speculate[0]}"
    if (first, 1) in rate and (first, 16) in rate:
        speedup = rate[(first, 16)] / rate[(first, 1)]
        print(f"\n16 clients / 1 client aggregate throughput ({first}): {speedup:.1f}x "
              f"({'ok' if speedup >= 4 else 'BELOW the 4x target'})")
        failed |= speedup < 4
    if ratios and 16 in args.concurrency:
        best = max(by_clients[16] for by_clients in ratios.values())
        print(f"seekling (best --speculate) / vLLM at 16 clients: {best:.2f}x "
              f"({'ok' if best >= 1 else 'BELOW the target of vLLM'})")
        failed |= best < 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_about, "context": context, "max_tokens": args.max_tokens,
                       "prompt_words": args.prompt_words, "requests": args.requests, "threads": args.threads,
                       "seekling_dtype": args.dtype, "rows": rows, "seekling_over_vllm": ratios,
                       "vllm_error": vllm_error, "load_before": load_before, "load_after": load_after}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
