"""Quick throughput check against a running appliance (or any OpenAI-compatible server).

    python bench/throughput.py URL MODEL [--tokens 128] [--clients 1 8]

Streams completions with ignore_eos so every request generates exactly --tokens tokens, and prints
single-stream and aggregate generation tokens/s. The side-by-side comparison with llama-server is
`make bench` (bench/run.py, whose concurrent streaming client this reuses).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import concurrent


def run(url: str, model: str, tokens: int, clients: int) -> dict:
    r = concurrent(url, clients, tokens, random.Random(clients), model=model)
    return {"clients": clients, "tokens": tokens * clients, "seconds": round(r["wall_s"], 3),
            "tokens_per_s": round(r["tokens_per_s"], 1), "ttft_ms_median": round(r["ttft_s"] * 1000, 1)}


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
