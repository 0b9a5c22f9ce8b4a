"""Quick throughput check against a running appliance (or any OpenAI-compatible server).

    python bench/throughput.py URL MODEL [--tokens 128] [--clients 1 8]

Streams completions with ignore_eos so every request generates exactly --tokens tokens, and prints
single-stream and aggregate generation tokens/s. The side-by-side comparison with llama-server is
`make bench` (the performance issue); this is the measurement the core issue reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import requests


def one(url: str, model: str, tokens: int, seed: int, out: list) -> None:
    body = {"model": model, "prompt": f"Benchmark prompt {seed}:", "max_tokens": tokens, "ignore_eos": True,
            "temperature": 0.8, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    n = 0
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter()
    out.append((n, time.perf_counter() - t0, (first or t0) - t0))


def run(url: str, model: str, tokens: int, clients: int) -> dict:
    out: list = []
    threads = [threading.Thread(target=one, args=(url, model, tokens, i, out)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(n for n, _, _ in out)
    if total != tokens * clients:
        raise SystemExit(f"expected {tokens * clients} tokens, got {total}")
    return {"clients": clients, "tokens": total, "seconds": round(wall, 3), "tokens_per_s": round(total / wall, 1),
            "ttft_ms_median": round(statistics.median(f for _, _, f in out) * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    run(a.url, a.model, 8, 1)  # warm-up
    for c in a.clients:
        print(json.dumps(run(a.url.rstrip("/"), a.model, a.tokens, c)))


if __name__ == "__main__":
    main()
