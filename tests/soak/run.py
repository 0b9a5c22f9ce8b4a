"""`make soak`: a long mixed load on the real model, then errors, memory, descriptors, threads, latencies.

    python -m tests.soak.run [--minutes 30] [--clients 8] [--seed 1] [--json FILE]

Starts the appliance with Gemma 3 270M (scripts/real-model.sh) and runs `--clients` threads, each picking
actions by a seeded draw: plain and streamed completions, plain and streamed chat, a stream cancelled
after a few events, a bad input (each must get its 4xx in the OpenAI shape), an attestation request
with a fresh nonce; and, one client at a time, a second model loaded, used and unloaded. Every answer
is checked (status, shape, a stream's [DONE]); anything else is an error.

The worker is sampled every 5 s (RSS, open descriptors, threads). After a warm-up (a tenth of the run,
at most 3 minutes), RSS growth compares the median of the samples in the window that follows with the
median of the samples in the run's last window of the same length (a tenth of the run, at most 3
minutes), both under load: a single sample moves by ~20 MiB with what requests and a second model's
load hold at that moment. The first sample after warm-up and the last one, after the load stops, are
reported too. Goals: 0 errors, 0 worker restarts, RSS growth under 5% (RSS less what the KV host cache
holds: a cache bounded by the model's cache_ram_mib, which fills as chats displace each other from slots;
both figures are reported). Exit status 1 if one is missed.
tests/integration/test_soak.py runs a 2-minute version in `make test` (errors and restarts only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.serve import appliance

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemma3-270m"

# (action, weight)
ACTIONS = [
    ("completion", 20),
    ("completion_stream", 20),
    ("chat", 15),
    ("chat_stream", 15),
    ("cancel_stream", 10),
    ("bad_input", 10),
    ("attestation", 5),
    ("load_unload", 1),
]

BAD_INPUTS: list[tuple[str, bytes, int]] = [
    ("/v1/completions", b'{"model": "gemma3-270m", "prompt": 5}', 400),
    ("/v1/completions", b'{"model": "gemma3-270m", "prompt": "x", "max_tokens": 0}', 400),
    ("/v1/completions", b'{"model": "nope", "prompt": "x"}', 404),
    ("/v1/completions", b'{"model": "gemma3-270m", "prompt": "x", "temperature": "hot"}', 400),
    ("/v1/completions", b'{"model": "gemma3-270m", "prompt": ', 400),
    ("/v1/chat/completions", b'{"model": "gemma3-270m", "messages": []}', 400),
    ("/v1/chat/completions", b'{"model": "gemma3-270m", "messages": [{"role": "wizard", "content": "x"}]}', 400),
    ("/v1/chat/completions", b'{"model": "gemma3-270m", "messages": "hi"}', 400),
    ("/load_model", b'{"model_name": "x", "model_path": "relative.gguf"}', 400),
    ("/unload_model", b'{"model_name": "never-loaded"}', 404),
]

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three laws of robotics are",
           "A haiku about the sea:", "Water boils at"]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def ok(self, action: str, seconds: float) -> None:
        with self.lock:
            self.latencies[action].append(seconds)
            self.counts[action] += 1

    def error(self, action: str, what: str) -> None:
        with self.lock:
            self.counts[action] += 1
            self.errors.append(f"{action}: {what}"[:300])


class Soak:
    def __init__(self, url: str, model_path: Path, rng: random.Random, tally: Tally, load_lock: threading.Lock) -> None:
        self.url = url
        self.model_path = model_path
        self.rng = rng
        self.tally = tally
        self.load_lock = load_lock
        self.session = requests.Session()

    def run_one(self) -> None:
        action = self.rng.choices([a for a, _ in ACTIONS], [w for _, w in ACTIONS])[0]
        t0 = time.perf_counter()
        try:
            problem = getattr(self, action)()
        except requests.RequestException as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            self.tally.ok(action, time.perf_counter() - t0)
        elif problem != "skipped":
            self.tally.error(action, problem)

    def _post(self, path: str, body: dict[str, Any], **kw: Any) -> requests.Response:
        return self.session.post(self.url + path, json=body, timeout=300, **kw)

    def _completion_body(self) -> dict[str, Any]:
        return {"model": MODEL, "prompt": self.rng.choice(PROMPTS), "max_tokens": self.rng.randint(8, 64),
                "temperature": self.rng.choice([0, 0.7]), "seed": self.rng.randint(0, 1000)}

    def _chat_body(self) -> dict[str, Any]:
        return {"model": MODEL, "max_tokens": self.rng.randint(8, 64),
                "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}]}

    @staticmethod
    def _plain(r: requests.Response, key: str) -> str | None:
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:160]}"
        choice = r.json()["choices"][0]
        return None if key in choice else f"no {key} in the choice"

    @staticmethod
    def _stream(r: requests.Response) -> str | None:
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:160]}"
        raw = b"".join(r.iter_content(chunk_size=None))
        if not raw.endswith(b"data: [DONE]\n\n"):
            return f"the stream did not end with [DONE]: ...{raw[-120:]!r}"
        if b'"error"' in raw:
            return "an error event in the stream"
        return None

    def completion(self) -> str | None:
        return self._plain(self._post("/v1/completions", self._completion_body()), "text")

    def completion_stream(self) -> str | None:
        return self._stream(self._post("/v1/completions", {**self._completion_body(), "stream": True}, stream=True))

    def chat(self) -> str | None:
        return self._plain(self._post("/v1/chat/completions", self._chat_body()), "message")

    def chat_stream(self) -> str | None:
        return self._stream(self._post("/v1/chat/completions", {**self._chat_body(), "stream": True}, stream=True))

    def cancel_stream(self) -> str | None:
        body = {**self._completion_body(), "max_tokens": 256, "ignore_eos": True, "stream": True}
        with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=300,
                           headers={"Connection": "close"}) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            events = 0
            for line in r.iter_lines():
                events += line.startswith(b"data: ")
                if events >= 3:
                    break  # the client goes away mid-stream
        return None

    def bad_input(self) -> str | None:
        path, raw, status = self.rng.choice(BAD_INPUTS)
        r = self.session.post(self.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=60)
        if r.status_code != status:
            return f"{path} {raw[:60]!r}: status {r.status_code}, expected {status}"
        err = r.json().get("error", {})
        if set(err) != {"message", "type", "param", "code"}:
            return f"{path}: not the OpenAI error shape: {r.text[:120]}"
        return None

    def attestation(self) -> str | None:
        r = self.session.get(self.url + "/v1/attestation", params={"nonce": secrets.token_hex(32)}, timeout=60)
        return None if r.status_code == 200 else f"status {r.status_code}: {r.text[:160]}"

    def load_unload(self) -> str | None:
        if not self.load_lock.acquire(blocking=False):
            return "skipped"
        try:
            r = self._post("/load_model", {"model_name": "extra", "model_path": str(self.model_path), "n_ctx": 1024,
                                           "parallel": 2})
            if r.status_code != 200:
                return f"load: status {r.status_code}: {r.text[:160]}"
            r = self._post("/v1/completions", {"model": "extra", "prompt": "Hello", "max_tokens": 8})
            if r.status_code != 200:
                return f"completion on the loaded model: status {r.status_code}"
            r = self._post("/unload_model", {"model_name": "extra"})
            return None if r.status_code == 200 else f"unload: status {r.status_code}: {r.text[:160]}"
        finally:
            self.load_lock.release()


def worker_pid(master: int) -> int | None:
    try:
        kids = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def sample(pid: int, url: str | None = None) -> dict[str, int]:
    """The worker's RSS, descriptors and threads; with `url`, also the bytes its models' KV host caches
    hold (/status), a bounded cache that fills as conversations displace each other from slots: RSS
    less those bytes is what must not grow."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    out = {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads, "kv_cache_kib": 0}
    if url is not None:
        try:
            models = requests.get(url + "/status", timeout=10).json().get("models", [])
            out["kv_cache_kib"] = sum((m.get("kv_host_cache") or {}).get("bytes", 0) for m in models) // 1024
        except (requests.RequestException, ValueError):
            pass
    out["rss_less_cache_kib"] = rss - out["kv_cache_kib"]
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def soak(minutes: float, clients: int, seed: int, *, appliance_command: list[str] | None = None, log=print) -> dict[str, Any]:
    model = Path(subprocess.run([str(ROOT / "scripts" / "real-model.sh")], check=True, capture_output=True, text=True,
                                env={**os.environ, "PYTHON": sys.executable}).stdout.strip().splitlines()[-1])
    config = (f'[attestation]\nprovider = "simulated"\nrate_per_minute = 0\n\n'
              f'[[models]]\nname = "{MODEL}"\npath = "{model}"\nparallel = 4\nn_ctx = 2048\n')
    with tempfile.TemporaryDirectory(prefix="appliance-soak-") as tmp, \
            appliance(config, Path(tmp), command=appliance_command) as (proc, url):
        pid = worker_pid(proc.pid)
        if pid is None:
            raise RuntimeError("no worker process")
        return _drive(url, pid, model, minutes, clients, seed, log)


def _drive(url: str, pid: int, model: Path, minutes: float, clients: int, seed: int, log) -> dict[str, Any]:
    tally = Tally()
    load_lock = threading.Lock()
    stop = threading.Event()
    samples: list[tuple[float, dict[str, int]]] = []
    t_start = time.monotonic()
    duration = minutes * 60
    warmup = min(duration / 10, 180)

    def client(i: int) -> None:
        s = Soak(url, model, random.Random(seed * 1000 + i), tally, load_lock)
        while not stop.is_set():
            s.run_one()

    def sampler() -> None:
        while not stop.wait(5):
            samples.append((time.monotonic() - t_start, sample(pid, url)))

    samples.append((0.0, sample(pid, url)))
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    for t in threads:
        t.start()
    next_report = 60.0
    while (elapsed := time.monotonic() - t_start) < duration:
        time.sleep(min(1.0, duration - elapsed))
        if elapsed >= next_report:
            last = samples[-1][1]
            log(f"[soak] {elapsed / 60:5.1f} min: {sum(tally.counts.values())} requests, {len(tally.errors)} errors, "
                f"RSS {last['rss_kib'] / 1024:.0f} MiB, fds {last['fds']}, threads {last['threads']}")
            next_report += 60
    stop.set()
    for t in threads:
        t.join(300)
    time.sleep(2)  # let the worker release what the last requests held
    end = sample(pid, url)
    base = next((s for t, s in samples if t >= warmup), samples[-1][1])
    first = [s for t, s in samples if warmup <= t < 2 * warmup] or [base]
    last = [s for t, s in samples if t >= duration - warmup] or [end]
    metrics = requests.get(url + "/metrics", timeout=10).text
    restarts = float(re.search(r"^appliance_worker_restarts_total (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    healthy = requests.get(url + "/health", timeout=10).status_code == 200
    latency = {a: {"n": len(v), "p50_ms": round(percentile(v, 0.5) * 1000, 1), "p99_ms": round(percentile(v, 0.99) * 1000, 1)}
               for a, v in sorted(tally.latencies.items())}
    def median(window: list[dict[str, int]], key: str) -> float:
        return statistics.median(s[key] for s in window)

    growth = median(last, "rss_less_cache_kib") / median(first, "rss_less_cache_kib") - 1
    raw_growth = median(last, "rss_kib") / median(first, "rss_kib") - 1
    sample_growth = (end["rss_less_cache_kib"] - base["rss_less_cache_kib"]) / base["rss_less_cache_kib"]
    return {
        "minutes": minutes, "clients": clients, "seed": seed,
        "requests": sum(tally.counts.values()), "by_action": dict(tally.counts),
        "errors": len(tally.errors), "error_samples": tally.errors[:20],
        "worker_restarts": restarts, "healthy_after": healthy,
        "start": samples[0][1], "after_warmup": base, "end": end, "warmup_s": round(warmup),
        "rss_growth_after_warmup": round(growth, 4),
        "rss_growth_after_warmup_with_cache": round(raw_growth, 4),
        "rss_less_cache_medians_kib": [median(first, "rss_less_cache_kib"), median(last, "rss_less_cache_kib")],
        "rss_growth_first_to_end_sample": round(sample_growth, 4),
        "rss_max_kib": max(s["rss_kib"] for _, s in samples),
        "latency": latency,
        "samples": [{"t": round(t, 1), **s} for t, s in samples],
    }


def report(r: dict[str, Any]) -> str:
    lines = [
        f"soak: {r['minutes']} min, {r['clients']} clients, seed {r['seed']}: {r['requests']} requests, "
        f"{r['errors']} errors, {r['worker_restarts']:.0f} worker restarts, healthy after: {r['healthy_after']}",
        f"  worker RSS: start {r['start']['rss_kib'] / 1024:.0f} MiB, after {r['warmup_s']} s warm-up "
        f"{r['after_warmup']['rss_kib'] / 1024:.0f} MiB, end {r['end']['rss_kib'] / 1024:.0f} MiB "
        f"({r['rss_growth_after_warmup_with_cache'] * 100:+.1f}% after warm-up, medians), max {r['rss_max_kib'] / 1024:.0f} MiB",
        f"  KV host cache: {r['after_warmup']['kv_cache_kib'] / 1024:.0f} MiB after warm-up, "
        f"{r['end']['kv_cache_kib'] / 1024:.0f} MiB at the end",
        f"  RSS less the cache, median of {r['warmup_s']} s after warm-up -> median of the last {r['warmup_s']} s: "
        f"{r['rss_less_cache_medians_kib'][0] / 1024:.0f} -> {r['rss_less_cache_medians_kib'][1] / 1024:.0f} MiB "
        f"({r['rss_growth_after_warmup'] * 100:+.1f}%, the goal's measure); first sample after warm-up -> "
        f"last, after the load: {r['after_warmup']['rss_less_cache_kib'] / 1024:.0f} -> "
        f"{r['end']['rss_less_cache_kib'] / 1024:.0f} MiB ({r['rss_growth_first_to_end_sample'] * 100:+.1f}%)",
        f"  open fds: {r['start']['fds']} -> {r['after_warmup']['fds']} -> {r['end']['fds']}; "
        f"threads: {r['start']['threads']} -> {r['after_warmup']['threads']} -> {r['end']['threads']}",
        "  action               n      p50 ms    p99 ms",
    ]
    for action, lat in r["latency"].items():
        lines.append(f"  {action:18} {lat['n']:6} {lat['p50_ms']:10} {lat['p99_ms']:9}")
    for e in r["error_samples"]:
        lines.append(f"  error: {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "30")))
    p.add_argument("--clients", type=int, default=int(os.environ.get("SOAK_CLIENTS", "8")))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the full report (with every sample) here")
    args = p.parse_args(argv)
    r = soak(args.minutes, args.clients, args.seed)
    print(report(r))
    if args.json is not None:
        args.json.write_text(json.dumps(r, indent=1))
    met = r["errors"] == 0 and r["worker_restarts"] == 0 and r["healthy_after"] and r["rss_growth_after_warmup"] < 0.05
    print("goals met" if met else "GOALS MISSED (0 errors, 0 restarts, RSS growth under 5% after warm-up)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
