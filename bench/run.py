"""`make bench`: the appliance against llama.cpp's own llama-server, same model, side by side.

Both servers are built from the same pinned llama-cpp-python sdist with the same CPU flags, serve
the same GGUF (a realistic-shape ~400M-parameter Q8_0 model with a real vocab and seeded weights),
run on loopback with equal settings, and get the same OpenAI-compatible workload, alternating runs,
with `ignore_eos` so token counts match. Prints a table of ours/theirs ratios, writes JSON and a PNG
chart under bench/results/, and updates the table in the README.

Timing numbers are reported, never asserted in `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("APPLIANCE_CACHE", Path.home() / ".cache" / "appliance"))
RESULTS = ROOT / "bench" / "results"
WORDS = (
    "alpha river stone garden window silver market engine orange planet quiet forest "
    "harbor lantern meadow copper signal winter velvet canyon thunder bridge paper ocean"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_of(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict
    ready_path: str
    proc: subprocess.Popen | None = None
    port: int = 0
    model: str = "bench"
    log: Path | None = None
    config: Path | None = None
    """A config file written for this run only: removed when the server stops."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log = RESULTS / f"{self.name}.log"
        f = open(self.log, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited early; see {self.log}")
            try:
                if requests.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise SystemExit(f"{self.name} not ready in 300 s; see {self.log}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.config is not None:
            self.config.unlink(missing_ok=True)

    def cpu_backend(self) -> str:
        """The ggml CPU module this server loaded at startup (runtime dispatch), e.g. cpu-zen4."""
        for pid in [self.proc.pid] + _children(self.proc.pid):
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:
                continue
            m = re.search(r"/libggml-(cpu-[\w]+)\.so", maps)
            if m:
                return m.group(1)
        return "builtin"

    def peak_rss_mb(self) -> float:
        """VmHWM summed over the server's process tree (ours: gunicorn master + worker)."""
        total = 0
        pids = [self.proc.pid] + _children(self.proc.pid)
        for pid in pids:
            try:
                m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
                total += int(m.group(1)) if m else 0
            except OSError:
                pass
        return total / 1024


def _children(pid: int) -> list[int]:
    out = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out.append(int(k))
        out.extend(_children(int(k)))
    return out


def ours(
    model: Path, port: int, *, threads: int | None, parallel: int | None, n_ctx: int | None, cpu_backend: str = "auto"
) -> Server:
    cfg = RESULTS / f"ours-{port}.toml"
    lines = ["[server]", "log_level = \"warning\"", "access_log = false", f'cpu_backend = "{cpu_backend}"',
             "[limits]", "max_tokens = 100000",
             "[attestation]", "rate_per_minute = 0", "[[models]]", 'name = "bench"', f'path = "{model}"']
    if threads:
        lines.append(f"n_threads = {threads}")
    if parallel:
        lines.append(f"parallel = {parallel}")
    if n_ctx:
        lines.append(f"n_ctx = {n_ctx}")
    cfg.write_text("\n".join(lines) + "\n")
    cmd = [str(ROOT / ".venv/bin/appliance"), "-p", str(port), "--config", str(cfg)]
    s = Server("appliance", cmd, dict(os.environ), "/readiness", config=cfg)
    s.port = port
    return s


def theirs(
    binary: str, model: Path, port: int, *, threads: int | None, parallel: int | None, n_ctx: int | None,
    cpu_module: str | None = None, chat_template: str | None = None,
) -> Server:
    if cpu_module:
        binary = pinned_llama_server(binary, cpu_module)
    cmd = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--alias", "bench", "--no-webui"]
    if chat_template:  # llama.cpp's own built-in template, the one the appliance picks for a GGUF without one
        cmd += ["--no-jinja", "--chat-template", chat_template]
    if threads:
        cmd += ["-t", str(threads), "-tb", str(threads)]
    if parallel:
        # llama-server's -c is the total context, split across its slots (as ours, kv not unified).
        cmd += ["-np", str(parallel), "-c", str((n_ctx or 4096) * parallel)]
    s = Server("llama-server", cmd, dict(os.environ), "/health")
    s.port = port
    return s


def pinned_llama_server(binary: str, cpu_module: str) -> str:
    """A copy of llama-server in a directory whose only CPU build is `cpu_module` (llama-server loads
    every CPU build next to its executable and takes the best; a copy, since /proc/self/exe resolves
    links). Its other libraries are links to the cached build."""
    src = Path(binary).parent
    d = RESULTS / f"llama-server-{cpu_module}"
    d.mkdir(parents=True, exist_ok=True)
    for lib in src.glob("lib*.so*"):
        if lib.name.startswith("libggml-cpu-") and lib.name != f"libggml-{cpu_module}.so":
            continue
        link = d / lib.name
        if not link.exists():
            link.symlink_to(lib.resolve())
    exe = d / "llama-server"
    if not exe.exists():
        exe.write_bytes(Path(binary).read_bytes())
        exe.chmod(0o755)
    return str(exe)


# ---------------------------------------------------------------------------------------------
# Workloads


@dataclass
class StreamResult:
    tokens: int = 0
    ttft: float = 0.0
    total: float = 0.0
    prompt_tokens: int = 0


def stream_completion(url: str, prompt: str, max_tokens: int, seed: int, model: str = "bench") -> StreamResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.8, "top_k": 40, "top_p": 0.95,
            "min_p": 0.05, "seed": seed}
    res = StreamResult()
    t0 = time.perf_counter()
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                res.tokens = chunk["usage"]["completion_tokens"]
                res.prompt_tokens = chunk["usage"]["prompt_tokens"]
            choices = chunk.get("choices") or []
            # The first token's chunk; a lone token that is half a UTF-8 character can arrive with
            # empty text and its finish_reason, so that counts too.
            if choices and (choices[0].get("text") or choices[0].get("finish_reason")) and not res.ttft:
                res.ttft = time.perf_counter() - t0
    res.total = time.perf_counter() - t0
    return res


def all_at_once(run, clients: int) -> float:
    """run(0) ... run(clients - 1), each on its own thread, started together; the wall time."""
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def concurrent(
    url: str, clients: int, max_tokens: int, rng: random.Random, prompt_words: int = 24, model: str = "bench"
) -> dict:
    prompts = [prompt_of(prompt_words, rng) for _ in range(clients)]
    results: list[StreamResult] = [None] * clients  # type: ignore[list-item]

    def run(i: int) -> None:
        results[i] = stream_completion(url, prompts[i], max_tokens, 1000 + i, model=model)

    wall = all_at_once(run, clients)
    total = sum(r.tokens for r in results)
    if total != clients * max_tokens:
        raise SystemExit(f"{url}: expected {clients * max_tokens} tokens, got {total}")
    return {"tokens_per_s": total / wall, "wall_s": wall, "ttft_s": statistics.median(r.ttft for r in results)}


def single_stream(url: str, max_tokens: int, rng: random.Random) -> float:
    r = stream_completion(url, prompt_of(16, rng), max_tokens, 7)
    return (r.tokens - 1) / (r.total - r.ttft)  # generation only: from the first token to the last


def ttfts(url: str, words: int, reps: int, rng: random.Random) -> dict:
    vals, pps = [], []
    for i in range(reps):
        r = stream_completion(url, prompt_of(words, rng), 1, 50 + i)  # fresh words: no prefix cache hit
        vals.append(r.ttft)
        pps.append(r.prompt_tokens / r.ttft)
    vals.sort()
    p95 = vals[min(len(vals) - 1, int(round(0.95 * (len(vals) - 1))))]
    return {"median_ms": statistics.median(vals) * 1000, "p95_ms": p95 * 1000, "prompt_tokens_per_s": statistics.median(pps)}


def health_under_load(url: str, clients: int, max_tokens: int, rng: random.Random) -> dict:
    lat: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        s = requests.Session()
        while not stop.is_set():
            t0 = time.perf_counter()
            s.get(url + "/health", timeout=10)
            lat.append(time.perf_counter() - t0)
            time.sleep(0.01)

    t = threading.Thread(target=poll)
    t.start()
    try:
        concurrent(url, clients, max_tokens, rng)
    finally:
        stop.set()
        t.join()
    lat.sort()
    return {"p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1000, "max_ms": lat[-1] * 1000, "samples": len(lat)}


def multi_turn(url: str, rng: random.Random) -> dict:
    """TTFT of a chat's second turn, whose prefix is already cached, against a cold one of equal length."""
    system = prompt_of(400, rng)

    def chat(messages) -> tuple[float, str]:
        body = {"model": "bench", "messages": messages, "max_tokens": 8, "ignore_eos": True, "stream": True, "seed": 3}
        t0 = time.perf_counter()
        ttft, text = 0.0, ""
        with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    c = json.loads(line[6:])
                    d = (c.get("choices") or [{}])[0].get("delta", {}).get("content")
                    if d:
                        ttft = ttft or time.perf_counter() - t0
                        text += d
        return ttft, text

    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": prompt_of(20, rng)}]
    _, answer = chat(turn1)
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": prompt_of(20, rng)}]
    warm, _ = chat(turn2)
    cold_msgs = [{"role": "system", "content": prompt_of(400, rng)}] + turn2[1:]
    cold, _ = chat(cold_msgs)
    return {"warm_ttft_ms": warm * 1000, "cold_ttft_ms": cold * 1000, "speedup": cold / warm if warm else 0.0}


QUESTIONS = [
    "Write a short poem about the sea.",
    "Explain in a few sentences why the sky is blue.",
    "List three tips for writing clear emails.",
    "What is the capital of France, and what is it known for?",
]


def natural_chat(url: str, clients: int, max_tokens: int = 300) -> dict:
    """Chat requests that end where the model ends them (EOS, no ignore_eos), greedy so both servers
    generate the same tokens: `clients` at once, each asking every question in turn."""
    done: list[tuple[int, str]] = []

    def run(i: int) -> None:
        for q in QUESTIONS[i % len(QUESTIONS):] + QUESTIONS[: i % len(QUESTIONS)]:
            body = {"model": "bench", "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                    "temperature": 0}
            r = requests.post(url + "/v1/chat/completions", json=body, timeout=900)
            r.raise_for_status()
            j = r.json()
            done.append((j["usage"]["completion_tokens"], j["choices"][0]["finish_reason"]))

    wall = all_at_once(run, clients)
    tokens = sum(n for n, _ in done)
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "ended_by_model": sum(f == "stop" for _, f in done) / len(done)}


def conversations(url: str, n_conv: int = 16, turns: int = 6, answer_tokens: int = 48,
                  think_s: tuple[float, float] | None = None, seed: int = 7) -> dict:
    """`n_conv` chats at once, `turns` turns each, every turn sent when that chat's previous answer is in
    (after a pause of `think_s` seconds, uniform, where given: a person reading). With more chats than
    slots, a chat's slot has usually served another chat meanwhile. Each chat has its own system prompt
    (about 200 tokens), each user turn about 40 tokens, each answer `answer_tokens` tokens (greedy,
    ignore_eos, so both servers do equal work); every chat draws its words and pauses from its own
    seeded generator, so both servers get the same conversations. Returns times to first token by
    turn, the servers' own prompt-processing times (`timings.prompt_ms`) and the share of prompt
    tokens served from cache, for turns 2 on."""
    ttft: dict[int, list[float]] = {t: [] for t in range(turns)}
    prompt_ms: list[float] = []
    cached: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def run(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        messages = [{"role": "system", "content": f"You are assistant {i}. Context: " + prompt_of(150, rng)}]
        for t in range(turns):
            if t and think_s:
                time.sleep(rng.uniform(*think_s))
            messages.append({"role": "user", "content": prompt_of(30, rng) + "?"})
            body = {"model": "bench", "messages": messages, "max_tokens": answer_tokens, "ignore_eos": True,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first, text, usage, timings = 0.0, "", {}, {}
            try:
                with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=900) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith(b"data: {"):
                            continue
                        c = json.loads(line[6:])
                        usage = c.get("usage") or usage
                        timings = c.get("timings") or timings
                        d = (c.get("choices") or [{}])[0].get("delta", {}).get("content")
                        if d:
                            first = first or time.perf_counter() - t0
                            text += d
            except requests.RequestException as e:
                errors.append(str(e))
                return
            with lock:
                ttft[t].append(first)
                if t and usage.get("prompt_tokens"):
                    details = usage.get("prompt_tokens_details") or {}
                    cached.append(details.get("cached_tokens", 0) / usage["prompt_tokens"])
                if t and "prompt_ms" in timings:
                    prompt_ms.append(timings["prompt_ms"])
            messages.append({"role": "assistant", "content": text})

    all_at_once(run, n_conv)
    if errors:
        raise SystemExit(f"conversation workload failed: {errors[0]}")
    later = [x for t in range(1, turns) for x in ttft[t]]
    return {"ttft_first_ms": statistics.median(ttft[0]) * 1000, "ttft_later_ms": statistics.median(later) * 1000,
            "ttft_by_turn_ms": [statistics.median(ttft[t]) * 1000 for t in range(turns)],
            "prompt_ms_later": statistics.median(prompt_ms) if prompt_ms else 0.0,
            "cached_share": statistics.median(cached) if cached else None}


REWRITE = ("Rewrite the text below with these changes: say 'beacon' instead of 'lighthouse' (and 'beacons' "
           "instead of 'lighthouses'), 'ships' instead of 'sailors', and 'ocean' instead of 'sea'. Keep everything "
           "else exactly as it is. Answer with the rewritten text only.\n\n")


def predicted_outputs(url: str, prediction: str | None, max_tokens: int = 500) -> dict:
    """One greedy rewrite of a real ~400-token text (bench/texts/lighthouses.txt), where most of the
    answer repeats the text: with the text as the prediction, with an unrelated one, or with none.
    Tokens per second end to end (request sent to answer received)."""
    text = (ROOT / "bench" / "texts" / "lighthouses.txt").read_text()
    body: dict[str, Any] = {"model": "bench", "messages": [{"role": "user", "content": REWRITE + text}],
                            "temperature": 0, "max_tokens": max_tokens}
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    t0 = time.perf_counter()
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=900)
    took = time.perf_counter() - t0
    r.raise_for_status()
    out = r.json()
    n = out["usage"]["completion_tokens"]
    details = out["usage"].get("completion_tokens_details") or {}
    return {"tokens_per_s": n / took, "tokens": n, "text": out["choices"][0]["message"]["content"],
            "accepted": details.get("accepted_prediction_tokens", 0), "draft_n": out.get("timings", {}).get("draft_n", 0),
            "draft_n_accepted": out.get("timings", {}).get("draft_n_accepted", 0)}


def predicted_section(model: Path, args) -> tuple[str, dict]:
    """Predicted Outputs on the real model, ours only (llama-server has no such field): the rewrite with
    the text as the prediction, with an unrelated prediction of the same length, and with none, in turn,
    `args.predicted_reps` times. Greedy, so all three must give the same answer."""
    text = (ROOT / "bench" / "texts" / "lighthouses.txt").read_text()
    useless = " ".join(random.Random(5).choice(WORDS) for _ in range(len(text.split())))
    server = ours(model, free_port(), threads=args.threads, parallel=4, n_ctx=args.n_ctx)
    runs: dict[str, list[dict]] = {"none": [], "text": [], "useless": []}
    try:
        server.start()
        predicted_outputs(server.url, None, max_tokens=16)  # warm-up
        cases: list[tuple[str, str | None]] = [("none", None), ("text", text), ("useless", useless)]
        for i in range(args.predicted_reps):
            for what, pred in cases[i % 3:] + cases[:i % 3]:  # each case first in turn: no order favours one
                runs[what].append(predicted_outputs(server.url, pred))
    finally:
        server.stop()
    base = [r["tokens_per_s"] for r in runs["none"]]
    rows = [("the text as the prediction", runs["text"]), ("an unrelated prediction of its length", runs["useless"])]
    plain = runs["none"][0]
    info = {
        "identical_output": all(r["text"] == plain["text"] for rs in runs.values() for r in rs),
        "completion_tokens": plain["tokens"],
        "accepted_share": statistics.median(r["accepted"] / r["tokens"] for r in runs["text"]),
        "draft_n": statistics.median(r["draft_n"] for r in runs["text"]),
        "draft_n_accepted": statistics.median(r["draft_n_accepted"] for r in runs["text"]),
        "useless_draft_n": statistics.median(r["draft_n"] for r in runs["useless"]),
        "tokens_per_s": {k: [round(r["tokens_per_s"], 1) for r in v] for k, v in runs.items()},
    }
    table_md = ["| prediction | tok/s with it | tok/s without | with/without | each pair of runs |",
                "| --- | ---: | ---: | ---: | ---: |"]
    for label, rs in rows:
        with_it = [r["tokens_per_s"] for r in rs]
        paired = [a / b for a, b in zip(with_it, base)]
        table_md.append(f"| {label} | {statistics.median(with_it):.1f} | {statistics.median(base):.1f} | "
                        f"{statistics.median(with_it) / statistics.median(base):.2f}x | "
                        f"{min(paired):.2f}-{max(paired):.2f}x |")
    head = (f"Predicted Outputs (ours only; llama-server has no such field): {model.name}, {args.threads} threads, "
            f"greedy chat rewrite of a {len(text.split())}-word (425-token) text (bench/texts/lighthouses.txt, a "
            f"few words to swap), at most 500 tokens, {args.predicted_reps} runs of each (the order rotated), end-to-end tokens "
            "per second. (The 270M model does not make the swaps: it repeats the request's instruction, then the "
            "text, so most of its answer is the prediction, as in an edit that changes little.) "
            f"Answer: {info['completion_tokens']} tokens, identical with and without a prediction: "
            f"{'yes' if info['identical_output'] else 'NO'}; tokens of the answer at their place in the "
            f"prediction: {info['accepted_share']:.0%}; drafted {info['draft_n']:.0f}, kept {info['draft_n_accepted']:.0f}; "
            f"drafted with the unrelated prediction: {info['useless_draft_n']:.0f}.")
    return head + "\n\n" + "\n".join(table_md), info


def memory_bandwidth_gbs() -> float:
    """Copy bandwidth with one thread per CPU (numpy releases the GIL for large copies), best of 5."""
    import numpy as np

    n = len(os.sched_getaffinity(0))
    a = np.ones(512 * 1024 * 1024 // 8)  # 512 MiB, far beyond any cache
    b = np.empty_like(a)
    parts = np.array_split(np.arange(a.size), n)
    bounds = [(p[0], p[-1] + 1) for p in parts]
    best = 0.0
    for _ in range(5):
        threads = [threading.Thread(target=np.copyto, args=(b[lo:hi], a[lo:hi])) for lo, hi in bounds]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        best = max(best, 2 * a.nbytes / dt / 1e9)  # read + write
    return best


def weights_read_per_token(model: Path) -> int:
    """Bytes of weights one decode step reads: every tensor but the token embedding (only looked up)."""
    from gguf import GGUFReader

    r = GGUFReader(str(model))
    return sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight")


class EngineCeiling:
    """The bench's generation workloads run in-process straight on llama.cpp: no HTTP, no scheduler.

    A child process holds the model and a context with the servers' settings (threads, slots, context
    per slot, split KV cache) and runs one workload per command with the same sampler chain, prompt
    lengths and token counts; every stream's prompt is prefilled in one batch and every step decodes
    all streams together, sequence ids consecutive: llama.cpp's own rate for these workloads on this
    machine, with no server around it. measure() runs it in the same alternation as the two servers (ours,
    theirs, ceiling, ours, ...), so all three see the same host; it idles while the servers run.
    """

    def __init__(self, args, model: Path | None = None, slots: int | None = None) -> None:
        """`model`, `slots`: other than the synthetic bench model and --slots (the real-model section)."""
        cmd = [sys.executable, __file__, "--engine-ceiling", "--threads", str(args.threads),
               "--slots", str(slots or args.slots), "--n-ctx", str(args.n_ctx)]
        if model is not None:
            cmd += ["--ceiling-model", str(model)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)
        if self._read() != "ready":
            raise SystemExit("the engine-ceiling child did not start")

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the engine-ceiling child exited")
        return line.strip()

    def run(self, streams: int, max_tokens: int) -> float:
        """Generated tokens per second. streams=0: the single-stream workload, counted from its first
        token on (as single_stream() does); otherwise that many streams, the whole workload counted."""
        self.proc.stdin.write(f"{streams} {max_tokens}\n")
        return float(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _engine_ceiling_child(model: Path, args) -> None:
    sys.path.insert(0, str(ROOT))
    from appliance.engine.llama import Batch, LlamaContext, LlamaModel, SamplerChain, SamplingParams

    m = LlamaModel(model)
    ctx = LlamaContext(m, n_ctx_seq=args.n_ctx, n_seq=args.slots, n_batch=512, n_threads=args.threads,
                       n_threads_batch=args.threads)
    batch = Batch(512)
    rng = random.Random(99)
    print("ready", flush=True)
    for line in sys.stdin:
        streams, max_tokens = map(int, line.split())
        words = 16 if streams == 0 else 24  # 0: the single-stream workload
        n = max(streams, 1)
        prompts = [m.tokenize(prompt_of(words, rng)) for _ in range(n)]
        samplers = [SamplerChain(m, SamplingParams(seed=1000 + i)) for i in range(n)]
        for seq in range(args.slots):
            ctx.seq_rm(seq)
        t0 = time.perf_counter()
        batch.clear()
        idx = [batch.add(p, 0, i, True) for i, p in enumerate(prompts)]
        ctx.decode(batch)
        tokens = [s.sample(ctx, i) for s, i in zip(samplers, idx)]
        t_first = time.perf_counter()
        for step in range(1, max_tokens):
            batch.clear()
            idx = [batch.add_one(t, len(p) + step - 1, i) for i, (t, p) in enumerate(zip(tokens, prompts))]
            ctx.decode(batch)
            tokens = [s.sample(ctx, i) for s, i in zip(samplers, idx)]
        t_end = time.perf_counter()
        for s in samplers:
            s.close()
        rate = (max_tokens - 1) / (t_end - t_first) if streams == 0 else n * max_tokens / (t_end - t0)
        print(f"{rate:.6f}", flush=True)
    ctx.close()
    m.close()


def ceiling_table(rows: list[Row], ceiling: dict[str, float]) -> str:
    out = ["| workload (tok/s) | engine only | appliance | llama-server | highest ours/theirs possible |",
           "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.metric in ceiling:
            c = ceiling[r.metric]
            out.append(f"| {r.metric} | {c:.1f} | {r.ours:.1f} ({r.ours / c:.0%}) | {r.theirs:.1f} ({r.theirs / c:.0%}) "
                       f"| {c / r.theirs:.2f}x |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    ours: float
    theirs: float
    higher_is_better: bool = True
    unit: str = ""
    paired: list[float] = field(default_factory=list)
    """ours/theirs of each alternating pair of runs: their spread is the host's noise, made visible."""
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.ours / self.theirs if self.theirs else float("nan")

    @classmethod
    def of_runs(cls, metric: str, ours: list[float], theirs: list[float], higher_is_better: bool = True, unit: str = "") -> Row:
        paired = [a / b for a, b in zip(ours, theirs) if b]
        return cls(metric, statistics.median(ours), statistics.median(theirs), higher_is_better, unit, paired)


def alternate(pair: list[Server], reps: int, fn, *a, after_pair=None) -> dict[str, list]:
    """fn(url, *a) for ours, theirs, ours, theirs, ...: both servers see the same host moments;
    after_pair() after each pair (the engine ceiling, on the same host too)."""
    vals: dict[str, list] = {s.name: [] for s in pair}
    for _ in range(reps):
        for s in pair:
            vals[s.name].append(fn(s.url, *a))
        if after_pair is not None:
            after_pair()
    return vals


def alternate_with_ceiling(
    pair: list[Server], reps: int, fn, ceiling: EngineCeiling | None, workload: tuple[str, int, int] | None,
    ceilings: dict[str, float],
) -> dict[str, list]:
    """alternate(); given the engine ceiling and a generation workload (metric, streams, tokens), the
    ceiling runs it after each pair, and its median goes into `ceilings` under the metric."""
    ceil: list[float] = []
    after = (lambda: ceil.append(ceiling.run(*workload[1:]))) if ceiling and workload else None
    vals = alternate(pair, reps, fn, after_pair=after)
    if ceil and workload:
        ceilings[workload[0]] = statistics.median(ceil)
    return vals


def measure(
    pair: list[Server], args, rng: random.Random, label: str, ceiling: EngineCeiling | None = None
) -> tuple[list[Row], dict[str, float]]:
    """Rows of ours/theirs; and, given the engine ceiling, its median for each generation workload."""
    ceilings: dict[str, float] = {}

    def both(fn, *a, workload: tuple[str, int, int] | None = None):
        return alternate_with_ceiling(pair, args.reps, lambda url: fn(url, *a), ceiling, workload, ceilings)

    rows: list[Row] = []
    o, t = pair[0].name, pair[1].name

    def row(metric: str, v: dict, key: str | None = None, higher_is_better: bool = True, unit: str = "") -> Row:
        pick = (lambda x: x[key]) if key else (lambda x: x)
        return Row.of_runs(metric, [pick(x) for x in v[o]], [pick(x) for x in v[t]], higher_is_better, unit)

    metric = f"{label}single-stream generation"
    v = both(lambda url: single_stream(url, args.single_tokens, rng), workload=(metric, 0, args.single_tokens))
    rows.append(row(metric, v, unit="tok/s"))
    for c in args.clients:
        n = args.tokens // 2 if c > 1 else args.tokens
        metric = f"{label}aggregate, {c} stream(s)"
        v = both(lambda url, c=c, n=n: concurrent(url, c, n, rng), workload=(metric, c, n))
        rows.append(row(metric, v, "tokens_per_s", unit="tok/s"))
    if label:
        return rows, ceilings
    for words, name in ((12, "short"), (700, "long")):
        v = both(lambda url, w=words: ttfts(url, w, args.ttft_reps, rng))
        rows.append(row(f"TTFT median, {name} prompt", v, "median_ms", False, "ms"))
        rows.append(row(f"TTFT p95, {name} prompt", v, "p95_ms", False, "ms"))
        if name == "long":
            rows.append(row("prompt processing", v, "prompt_tokens_per_s", unit="tok/s"))
    v = both(lambda url: health_under_load(url, 8, args.tokens // 2, rng))
    rows.append(row("/health p99 during 8 streams", v, "p99_ms", False, "ms"))
    v = both(lambda url: multi_turn(url, rng))
    rows.append(row("multi-turn chat TTFT, 2nd turn (cached prefix)", v, "warm_ttft_ms", False, "ms"))
    rows.append(row("multi-turn chat TTFT, cold equal-length prompt", v, "cold_ttft_ms", False, "ms"))
    rows.append(Row("peak RSS", pair[0].peak_rss_mb(), pair[1].peak_rss_mb(), False, "MiB"))
    return rows, ceilings


def measure_real(
    pair: list[Server], args, rng: random.Random, ceiling: EngineCeiling | None = None
) -> tuple[list[Row], dict, dict[str, float]]:
    """The real model: fixed-length generation (ignore_eos), natural chat that ends at EOS, and many
    multi-turn conversations over few slots; given the engine ceiling, its median for the generation
    workloads."""
    o, t = pair[0].name, pair[1].name
    rows: list[Row] = []
    label = "real model: "
    ended: dict[str, Any] = {}
    ceilings: dict[str, float] = {}
    if not args.conversations_only:
        metric = f"{label}single-stream generation"
        v = alternate_with_ceiling(pair, args.real_reps, lambda url: single_stream(url, args.single_tokens, rng),
                                   ceiling, (metric, 0, args.single_tokens), ceilings)
        rows.append(Row.of_runs(metric, v[o], v[t], unit="tok/s"))
        for c in (4,):
            metric = f"{label}aggregate, {c} streams"
            v = alternate_with_ceiling(pair, args.real_reps, lambda url, c=c: concurrent(url, c, args.tokens // 2, rng),
                                       ceiling, (metric, c, args.tokens // 2), ceilings)
            rows.append(Row.of_runs(metric, [x["tokens_per_s"] for x in v[o]],
                                    [x["tokens_per_s"] for x in v[t]], unit="tok/s"))
        for c in (1, 4):
            v = alternate(pair, args.real_reps, lambda url, c=c: natural_chat(url, c))
            rows.append(Row.of_runs(f"{label}natural chat to EOS, {c} client(s)", [x["tokens_per_s"] for x in v[o]],
                                    [x["tokens_per_s"] for x in v[t]], unit="tok/s"))
            ended[f"{c} client(s)"] = {n: statistics.median(x["ended_by_model"] for x in v[n]) for n in (o, t)}
            ended[f"{c} client(s) tokens"] = {n: statistics.median(x["tokens"] for x in v[n]) for n in (o, t)}
    chats = "16 chats x 6 turns on 4 slots"
    ended["conversations"] = {}
    for think, what in () if args.skip_conversations else ((None, "back to back"), ((5.0, 15.0), "5-15 s pauses")):
        v = alternate(pair, args.conv_reps, lambda url, think=think: conversations(url, think_s=think))
        rows.append(Row.of_runs(f"{label}{chats}, {what}: median TTFT, turns 2-6",
                                [x["ttft_later_ms"] for x in v[o]], [x["ttft_later_ms"] for x in v[t]],
                                higher_is_better=False, unit="ms"))
        rows.append(Row.of_runs(f"{label}{chats}, {what}: median prompt time, turns 2-6",
                                [x["prompt_ms_later"] for x in v[o]], [x["prompt_ms_later"] for x in v[t]],
                                higher_is_better=False, unit="ms"))
        ended["conversations"][what] = {
            n: {"cached_share_turns_2_6": statistics.median(x["cached_share"] or 0 for x in v[n]),
                "ttft_by_turn_ms": [round(x) for x in v[n][-1]["ttft_by_turn_ms"]]} for n in (o, t)}
    if not args.conversations_only:
        v = alternate(pair, args.real_reps, lambda url: ttfts(url, 700, 2, rng))
        rows.append(Row.of_runs(f"{label}prompt processing", [x["prompt_tokens_per_s"] for x in v[o]],
                                [x["prompt_tokens_per_s"] for x in v[t]], unit="tok/s"))
    rows.append(Row(f"{label}peak RSS", pair[0].peak_rss_mb(), pair[1].peak_rss_mb(), False, "MiB"))
    return rows, ended, ceilings


def real_model_section(llama_server: str, args, rng: random.Random) -> tuple[str, dict]:
    """Gemma 3 270M Q4_K_M, both servers on the best CPU build both can run here."""
    model = Path(subprocess.run(["bash", str(ROOT / "scripts/real-model.sh")], check=True, capture_output=True,
                                text=True).stdout.strip())
    sys.path.insert(0, str(ROOT))
    import llama_cpp.llama_cpp as C

    from appliance.engine.cpuprobe import rank_modules

    levels = [tag for tag, _ in rank_modules(Path(C._base_path))]
    notes: list[str] = []
    equal = dict(threads=args.threads, parallel=4, n_ctx=args.n_ctx)
    for i, level in enumerate(levels):
        pin = None if i == 0 else level  # first: each server's own pick; after a failure, both pinned
        pair = [ours(model, free_port(), **equal, cpu_backend=(pin or "auto").removeprefix("cpu-")),
                theirs(llama_server, model, free_port(), **equal, cpu_module=pin, chat_template="gemma")]
        try:
            try:
                for s in pair:
                    s.start()
                for s in pair:
                    stream_completion(s.url, "warm up", 8, 1)
            except (SystemExit, requests.RequestException) as e:
                who = next((s for s in pair if s.proc and s.proc.poll() is not None), None)
                code = who.proc.returncode if who else None
                notes.append(f"{who.name if who else 'a server'} could not run {pin or 'its own pick'} here "
                             f"(exit {code}: {e}); both pinned to the next build")
                continue
            backends = {s.name: s.cpu_backend() for s in pair}
            engine = None if args.conversations_only else EngineCeiling(args, model=model, slots=4)
            try:
                rows, ended, ceilings = measure_real(pair, args, rng, engine)
            finally:
                if engine is not None:
                    engine.close()
            break
        finally:
            for s in pair:
                s.stop()
    else:
        raise SystemExit("no CPU build ran both servers on the real model: " + "; ".join(notes))
    head = (f"Real model: {model.name} ({model.stat().st_size / 1e6:.0f} MB, Gemma 3 270M, Q4_K_M), {args.threads} "
            f"threads, 4 slots, {args.n_ctx} tokens per slot, {args.real_reps} alternating runs. CPU build each server "
            f"ran: " + ", ".join(f"{k} {v}" for k, v in backends.items()) + ". "
            + (" ".join(notes) + " " if notes else "")
            + "Chat: llama.cpp's built-in `gemma` template in both (the GGUF has none; llama-server given "
            "`--chat-template gemma`)"
            + ("" if args.conversations_only else
               ", greedy, max 300 tokens, the same four questions per client; share of "
               "answers the model ended itself (EOS): " + ", ".join(
                   f"{k} ours {v['appliance']:.0%} / theirs {v['llama-server']:.0%}" for k, v in ended.items()
                   if "client" in k and "tokens" not in k)
               + "; completion tokens per run: " + ", ".join(
                   f"{k.removesuffix(' tokens')} {v['appliance']:.0f} / {v['llama-server']:.0f}" for k, v in ended.items()
                   if "client" in k and "tokens" in k))
            + (". (Conversations skipped.)" if args.skip_conversations else
               ". Conversations: 16 chats at once, 6 turns each, each turn sent when that chat's answer is in, "
            "4 slots; a system prompt of its own per chat (~200 tokens), ~40-token user turns, 48-token answers "
            "(greedy, ignore_eos); each server with its default prompt cache (ours: `cache_ram_mib` 512, KV "
            "copied out of a slot before another chat takes it; llama-server: `--cache-ram` 8192, idle slots "
            f"saved), {args.conv_reps} alternating runs; back to back, or after a pause of 5 to 15 s (seeded, the "
            "same for both) before each next turn, like a person reading. Prompt time: the server's own "
            "`timings.prompt_ms` (admission to first token, without the queue). "
            + " ".join(f"{what}: share of turns 2-6's prompt tokens served from cache "
                       + ", ".join(f"{k} {v['cached_share_turns_2_6']:.0%}" for k, v in runs.items())
                       + "; median TTFT by turn (ms), last run: "
                       + ", ".join(f"{k} {v['ttft_by_turn_ms']}" for k, v in runs.items()) + "."
                       for what, runs in ended["conversations"].items())))
    md = head + "\n\n" + table(rows)
    if ceilings:
        md += ("\n\nEngine-only ceiling on the real model (the generation workloads in-process straight on "
               "llama.cpp, its own CPU build choice, same threads and slots, run after each pair; see below):\n\n"
               + ceiling_table(rows, ceilings))
    return md, {"cpu_backends": backends, "rows": [r.__dict__ for r in rows], "notes": notes, "chat": ended,
                "engine_ceiling": ceilings}


def table(rows: list[Row]) -> str:
    out = ["| metric | appliance | llama-server | ours/theirs | each pair of runs |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        better = "" if (r.ratio >= 1) == r.higher_is_better else " (worse)"
        spread = f"{min(r.paired):.2f}-{max(r.paired):.2f}x" if r.paired else ""
        out.append(f"| {r.metric} ({r.unit}) | {r.ours:.1f} | {r.theirs:.1f} | {r.ratio:.2f}x{better} | {spread} |")
    return "\n".join(out)


def chart(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return
    tp = [r for r in rows if r.unit == "tok/s"]
    fig, ax = plt.subplots(figsize=(10, 5))
    xs = range(len(tp))
    ax.bar([x - 0.2 for x in xs], [r.ours for r in tp], 0.4, label="appliance")
    ax.bar([x + 0.2 for x in xs], [r.theirs for r in tp], 0.4, label="llama-server")
    ax.set_xticks(list(xs), [r.metric for r in tp], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.set_title("appliance vs llama-server, same model and settings")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def update_readme(text: str) -> None:
    readme = ROOT / "README.md"
    s = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start in s and end in s:
        s = s[: s.index(start) + len(start)] + "\n" + text + "\n" + s[s.index(end) :]
        readme.write_text(s)


def cpu_dispatch(model: Path, args, rng: random.Random) -> None:
    """Our server with the x86-64-v3 build pinned vs the build runtime dispatch picks, alternating."""
    equal = dict(threads=args.threads, parallel=args.slots, n_ctx=args.n_ctx)
    pair = [ours(model, free_port(), **equal), ours(model, free_port(), **equal, cpu_backend="haswell")]
    pair[0].name, pair[1].name = "auto", "haswell"  # measure() reports pair[0] / pair[1]
    try:
        for s in pair:
            s.start()
            stream_completion(s.url, "warm up", 8, 1)
        picked = pair[0].cpu_backend()
        rows, _ = measure(pair, args, rng, "dispatch: ")
        pp = {s.name: [] for s in pair}
        for _ in range(args.reps):
            for s in pair:
                pp[s.name].append(ttfts(s.url, 700, 2, rng)["prompt_tokens_per_s"])
        rows.append(Row.of_runs("dispatch: prompt processing", pp["auto"], pp["haswell"], unit="tok/s"))
    finally:
        for s in pair:
            s.stop()
    md = (f"Runtime CPU dispatch: the appliance with the build it picks here ({picked}) vs pinned to "
          f"cpu_backend = \"haswell\" (x86-64-v3), {args.threads} threads, {args.slots} slots, {args.reps} "
          f"alternating runs (median).\n\n" + table(rows).replace("| appliance | llama-server | ours/theirs |", f"| {picked} | cpu-haswell | ratio |"))
    print(md)
    (RESULTS / "cpu-dispatch.md").write_text(md + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=96, help="tokens per aggregate run (half per stream above one)")
    ap.add_argument("--single-tokens", type=int, default=256,
                    help="tokens of the single-stream run: long enough to average the host's sub-second noise")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ttft-reps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--skip-defaults", action="store_true", help="skip the run with each server's default settings")
    ap.add_argument("--cpu-dispatch", action="store_true",
                    help="instead: ours with the CPU build runtime dispatch picks vs the x86-64-v3 build")
    ap.add_argument("--real-reps", type=int, default=5, help="alternating runs on the real model")
    ap.add_argument("--real-only", action="store_true", help="only the real-model section (no README update)")
    ap.add_argument("--skip-real", action="store_true", help="skip the real-model section")
    ap.add_argument("--conv-reps", type=int, default=3, help="alternating runs of the conversation workload")
    ap.add_argument("--predicted-reps", type=int, default=3, help="runs of each Predicted Outputs case")
    ap.add_argument("--predicted-only", action="store_true", help="only the Predicted Outputs section")
    ap.add_argument("--skip-conversations", action="store_true",
                    help="the real-model section without its conversation workload (~10 minutes less)")
    ap.add_argument("--conversations-only", action="store_true",
                    help="only the real model's conversation workload (implies --real-only)")
    ap.add_argument("--engine-ceiling", action="store_true", help=argparse.SUPPRESS)  # EngineCeiling's child
    ap.add_argument("--ceiling-model", type=Path, default=None, help=argparse.SUPPRESS)  # its model, if not the bench's
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)

    model = CACHE / "bench-models" / "bench-q8_0.gguf"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "tools.modelgen", str(model), "--preset", "bench"], check=True, cwd=ROOT)
    if args.engine_ceiling:
        _engine_ceiling_child(args.ceiling_model or model, args)
        return
    if args.cpu_dispatch:
        cpu_dispatch(model, args, random.Random(1234))
        return
    llama_server = subprocess.run(["bash", str(ROOT / "scripts/llama-server.sh")], check=True, capture_output=True, text=True).stdout.strip()
    rng = random.Random(1234)
    if args.predicted_only:
        real_model = Path(subprocess.run(["bash", str(ROOT / "scripts/real-model.sh")], check=True,
                                         capture_output=True, text=True).stdout.strip())
        md, result = predicted_section(real_model, args)
        print(md)
        (RESULTS / "predicted.json").write_text(json.dumps(result, indent=2))
        (RESULTS / "predicted.md").write_text(md + "\n")
        return
    if args.real_only or args.conversations_only:
        md, result = real_model_section(llama_server, args, rng)
        print(md)
        stem = "conversations" if args.conversations_only else "real-model"
        (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (RESULTS / f"{stem}.md").write_text(md + "\n")
        return

    equal = dict(threads=args.threads, parallel=args.slots, n_ctx=args.n_ctx)
    pair = [ours(model, free_port(), **equal), theirs(llama_server, model, free_port(), **equal)]
    rows: list[Row] = []
    ceiling: dict[str, float] = {}
    backends: dict[str, str] = {}
    engine = None
    try:
        for s in pair:
            s.start()
        for s in pair:  # warm-up
            stream_completion(s.url, "warm up", 8, 1)
        backends = {s.name: s.cpu_backend() for s in pair}
        engine = EngineCeiling(args)
        rows, ceiling = measure(pair, args, rng, "", engine)
    finally:
        if engine:
            engine.close()
        for s in pair:
            s.stop()
    default_rows: list[Row] = []
    if not args.skip_defaults:
        pair = [ours(model, free_port(), threads=None, parallel=None, n_ctx=None),
                theirs(llama_server, model, free_port(), threads=None, parallel=None, n_ctx=None)]
        try:
            for s in pair:
                s.start()
            for s in pair:
                stream_completion(s.url, "warm up", 8, 1)
            default_rows, _ = measure(pair, args, rng, "defaults: ")
        finally:
            for s in pair:
                s.stop()

    real_md, real = ("", {}) if args.skip_real else real_model_section(llama_server, args, rng)
    if not args.skip_real:
        real_model = Path(subprocess.run(["bash", str(ROOT / "scripts/real-model.sh")], check=True,
                                         capture_output=True, text=True).stdout.strip())
        predicted_md, real["predicted_outputs"] = predicted_section(real_model, args)
        real_md += "\n\n" + predicted_md

    bw = memory_bandwidth_gbs()
    per_token = weights_read_per_token(model)
    limit = bw * 1e9 / per_token
    single = next(r for r in rows if r.metric == "single-stream generation")
    physical = (f"Physical limit: {bw:.1f} GB/s measured copy bandwidth / {per_token / 1e6:.0f} MB of weights read "
                f"per token = {limit:.1f} tok/s; achieved single-stream: appliance {single.ours:.1f}, "
                f"llama-server {single.theirs:.1f} ({single.ours / limit:.0%} of the limit).")
    settings = (f"Equal settings: {args.threads} threads, {args.slots} slots, {args.n_ctx} tokens of context per slot, "
                f"OpenMP wait policy: {os.environ.get('OMP_WAIT_POLICY') or 'libgomp default'} for both, "
                f"{args.single_tokens} generated tokens per single stream, {args.tokens} in the 1-stream aggregate run "
                f"({args.tokens // 2} per stream above one), ignore_eos, {args.reps} alternating runs each: the median of "
                f"each server's runs, and the range of ours/theirs over the pairs of runs. Model: {model.name}, "
                f"{model.stat().st_size / 1e6:.0f} MB. Machine: {os.cpu_count()} CPUs. Both built from the same "
                f"llama.cpp tree with runtime CPU dispatch; CPU backend loaded: "
                + ", ".join(f"{k} {v}" for k, v in backends.items()) + ".")
    ceiling_md = ("Engine-only ceiling: the same generation workloads run in-process straight on llama.cpp "
                  "(llama_decode and the same sampler chain; no HTTP, no scheduler; all prompts prefilled in one "
                  "batch, all streams decoded together), equal settings, run after each pair of server runs (the "
                  "median); in brackets, what each server reaches of it:"
                  "\n\n" + ceiling_table(rows, ceiling))
    md = "\n\n".join([settings, table(rows + default_rows), ceiling_md, physical] + ([real_md] if real_md else []))
    print(md)
    result = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": vars(args),
        "cpu_backends": backends,
        "rows": [r.__dict__ for r in rows + default_rows],
        "memory_bandwidth_gbs": bw,
        "weights_bytes_per_token": per_token,
        "physical_limit_tokens_per_s": limit,
        "engine_ceiling_tokens_per_s": ceiling,
        "real_model": real,
    }
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "latest.md").write_text(md + "\n")
    chart(rows + default_rows, RESULTS / "latest.png")
    update_readme(md)


if __name__ == "__main__":
    main()
