"""Quick throughput check against a running appliance (or any OpenAI-compatible server).

    python bench/throughput.py URL MODEL [--tokens 128] [--clients 1 8]

Streams completions with ignore_eos so every request generates exactly --tokens tokens, and prints
single-stream and aggregate generation tokens/s. The side-by-side comparison with llama-server is
`make bench` (bench/run.py, whose streaming client this reuses).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import stream_completion  # noqa: E402


def run(url: str, model: str, tokens: int, clients: int) -> dict:
    out: list = []

    def one(i: int) -> None:
        out.append(stream_completion(url, f"Benchmark prompt {i}:", tokens, i, model=model))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(r.tokens for r in out)
    if total != tokens * clients:
        raise SystemExit(f"expected {tokens * clients} tokens, got {total}")
    return {"clients": clients, "tokens": total, "seconds": round(wall, 3), "tokens_per_s": round(total / wall, 1),
            "ttft_ms_median": round(statistics.median(r.ttft for r in out) * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    url = a.url.rstrip("/")
    run(url, a.model, 8, 1)  # warm-up
    for c in a.clients:
        print(json.dumps(run(url, a.model, a.tokens, c)))


if __name__ == "__main__":
    main()
