"""Load benchmark for `seekling serve`: aggregate generated tokens/s and time to first token (p50/p95)
with 1, 4 and 16 concurrent streaming clients, with MTP speculative decoding off and on (--speculate).

The server runs as its own process (`python -m seekling.cli serve`), as it would in use; the clients
are asyncio + httpx streaming /v1/completions with `ignore_eos`, so every request generates exactly
--max-tokens tokens. Without --model it serves the larger CPU model preset ("cpu-large") with random weights
and a tokenizer trained on the built-in tasks. With continuous batching, 16 clients should get at
least 4x the aggregate throughput of one (the script exits 1 when they do not). The load average is
printed before and after, since other jobs may share the cores.

    python benchmarks/bench_serve.py                                  # preset "cpu-large", random weights
    python benchmarks/bench_serve.py --model runs/main/final --max-tokens 256
    python benchmarks/bench_serve.py --concurrency 1 2 4 8 16 --requests 64 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def build_random_model(directory: str, preset: str) -> str:
    """A random-weight model of `preset` with a tokenizer trained on the built-in tasks, saved together."""
    import torch

    from seekling.checkpoint import save_pretrained
    from seekling.config import ModelConfig
    from seekling.model import Transformer
    from seekling.tasks import completion_text, make_mixture
    from seekling.tokenizer import Tokenizer

    config = ModelConfig.from_name(preset)
    problems = make_mixture(["arithmetic", "countdown", "linear", "wordproblem"], "train", 500, 0)
    texts = [t for p in problems for t in (p.prompt, completion_text(p))]
    tokenizer = Tokenizer.train(texts, vocab_size=config.vocab_size)
    torch.manual_seed(0)
    save_pretrained(Transformer(config.replace(vocab_size=tokenizer.vocab_size)), directory)
    tokenizer.save(directory)
    return directory


def start_server(model_dir: str, port: int, slots: int, threads: int | None, speculate: str = "auto") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "seekling.cli", "serve", model_dir, "--port", str(port),
           "--max-concurrent", str(slots), "--max-queue", "256", "--speculate", speculate]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=os.path.join(os.path.dirname(__file__), ".."))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up within 120 s")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, seed: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else float("nan"), tokens


async def load(url: str, clients: int, rounds: int, prompt: str, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `rounds` requests one after another."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(c: int) -> list[tuple[float, int]]:
            return [await one_request(client, prompt, max_tokens, seed=1000 * c + r) for r in range(rounds)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model or run directory (default: random weights of --preset)")
    parser.add_argument("--preset", default="cpu-large", help="preset for the random-weight model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="client counts to measure")
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per measurement, shared by the clients (each sends its share in turn)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--prompt-words", type=int, default=40, help="length of the prompt, in words")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: torch's)")
    parser.add_argument("--speculate", nargs="+", default=["off", "on"], choices=["off", "on", "auto"],
                        help="server runs to measure, one per --speculate value (MTP speculative decoding)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    model_dir = args.model or build_random_model(os.path.join(tmp.name, args.preset), args.preset)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_before = os.getloadavg()
    url = f"http://127.0.0.1:{port}"
    prompt = " ".join(["What is 47 plus 38, and then minus 9?"] * (args.prompt_words // 9 + 1)).split()
    prompt = " ".join(prompt[: args.prompt_words])
    rows = []
    for speculate in args.speculate:
        server = start_server(model_dir, port, max(args.concurrency), args.threads, speculate)
        try:
            asyncio.run(load(url, 1, 1, prompt, 8))  # warm-up: first calls allocate and pick kernels
            rows += [{"speculate": speculate, **asyncio.run(load(url, c, max(1, args.requests // c), prompt,
                                                                  args.max_tokens))} for c in args.concurrency]
        finally:
            server.terminate()
            server.wait(30)
    load_after = os.getloadavg()

    print(f"\nmodel: {args.model or 'preset ' + repr(args.preset) + ' (random weights)'}; "
          f"{args.max_tokens} tokens per request, prompt of {args.prompt_words} words, "
          f"{args.requests} requests per row; server torch threads: {args.threads or 'default'}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1-minute), on {os.cpu_count()} CPUs\n")
    print(f"{'speculate':>9} {'clients':>7} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'per client':>10} "
          f"{'TTFT p50':>9} {'TTFT p95':>9}")
    for r in rows:
        print(f"{r['speculate']:>9} {r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['tokens_per_s'] / r['clients']:>10.1f} "
              f"{r['ttft_p50'] * 1000:>7.0f}ms {r['ttft_p95'] * 1000:>7.0f}ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "load_before": load_before, "load_after": load_after}, f, indent=2)
    by_clients = {r["clients"]: r for r in rows if r["speculate"] == args.speculate[0]}
    if 1 in by_clients and 16 in by_clients:
        speedup = by_clients[16]["tokens_per_s"] / by_clients[1]["tokens_per_s"]
        verdict = "ok" if speedup >= 4 else "BELOW the 4x target"
        print(f"\n16 clients / 1 client aggregate throughput: {speedup:.1f}x ({verdict})")
        return 0 if speedup >= 4 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
