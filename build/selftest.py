"""Self-test of a frozen binary: it loads a model, generates tokens and shuts down cleanly.

    python build/selftest.py dist/appliance [--model path.gguf] [--runs N]

Starts the binary on a free loopback port with TMPDIR pointing at a private directory, waits for
/readiness, checks the embedded model and the compute devices (the CPU backend module ggml picked
for this CPU; a GPU with --expect-device gpu) in /status, runs one completion, sends SIGTERM and expects exit 0
with the onefile extraction directory gone. Also checks that the source CLI's runtime behaviour survived
freezing: an operator's OMP_WAIT_POLICY reaches libgomp, and llama.cpp's INFO chatter stays out of the logs.
Prints the startup-to-ready time. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, body: dict, timeout: float = 120.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def fail(msg: str, stderr: Path | None = None) -> None:
    print(f"selftest: FAIL: {msg}", file=sys.stderr)
    if stderr is not None and stderr.exists():
        print("--- binary stderr (tail) ---\n" + stderr.read_text(errors="replace")[-4000:], file=sys.stderr)
    sys.exit(1)


def run_once(binary: Path, extra: list[str], scratch: Path, check: bool, expect: str = "cpu") -> float:
    tmpdir = scratch / "tmp"
    tmpdir.mkdir(exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_DISPLAY_ENV": "TRUE", "OMP_WAIT_POLICY": "passive"}
    err_path = scratch / "stderr.log"
    t0 = time.monotonic()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [str(binary), "-p", str(port), "--host", "127.0.0.1", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
        )
    try:
        deadline = t0 + 120
        while True:
            if proc.poll() is not None:
                fail(f"exited with {proc.returncode} before /readiness", err_path)
            try:
                status, _ = get(base + "/readiness", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                fail("not ready within 120 s", err_path)
            time.sleep(0.02)
        ready = time.monotonic() - t0
        if not check:
            return ready

        status, body = get(base + "/status")
        devices = json.loads(body).get("devices", []) if status == 200 else []
        kinds = {d["type"] for d in devices}
        if expect not in kinds:
            fail(f"/status devices {devices} include no {expect} device", err_path)
        cpu = [d["module"] for d in devices if d["type"] == "cpu"]
        print(f"selftest: devices {', '.join(d['name'] + ' (' + d['module'] + ')' for d in devices)}")
        if not cpu or not cpu[0].startswith("cpu-"):
            fail(f"no CPU backend module selected at run time: {devices}", err_path)
        models = json.loads(body)["models"] if status == 200 else []
        if not models:
            fail(f"/status lists no model: {status} {body[:300]!r}", err_path)
        model = models[0]
        for key in ("name", "sha256"):
            if not model.get(key):
                fail(f"/status model without {key}: {model}", err_path)
        status, body = post(
            base + "/v1/completions",
            {"model": model["name"], "prompt": "The appliance says", "max_tokens": 8, "seed": 1, "temperature": 0},
        )
        if status != 200:
            fail(f"completion: {status} {body[:300]!r}", err_path)
        out = json.loads(body)
        generated = out["usage"]["completion_tokens"]
        if generated < 1:
            fail(f"no tokens generated: {out}", err_path)
        print(f"selftest: model {model['name']} sha256 {model['sha256'][:16]}… generated {generated} tokens")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            fail("did not exit within 60 s of SIGTERM", err_path)

    if code != 0:
        fail(f"exit code {code} after SIGTERM (want 0)", err_path)
    left = sorted(p.name for p in tmpdir.iterdir())
    if left:
        fail(f"extraction directory left behind in TMPDIR: {left}", err_path)
    log = err_path.read_text(errors="replace")
    if "OMP_WAIT_POLICY = 'PASSIVE'" not in log:
        fail("the operator's OMP_WAIT_POLICY=passive did not reach libgomp (OMP_DISPLAY_ENV shows otherwise)", err_path)
    chatter = [ln for ln in log.splitlines() if ln.startswith(("llama_model_loader:", "load_tensors:", "print_info:"))]
    if chatter:
        fail(f"llama.cpp INFO logs leaked to stderr: {chatter[:3]}", err_path)
    return ready


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", type=Path)
    ap.add_argument("--model", help="serve this GGUF as model 'demo' (for a binary without an embedded model)")
    ap.add_argument("--runs", type=int, default=3, help="startups to time after the checked run")
    ap.add_argument("--expect-device", default="cpu", choices=["cpu", "gpu"],
                    help="a device of this type must be in use (gpu: the CUDA variant on a GPU host)")
    args = ap.parse_args()
    binary = args.binary.resolve()
    extra = ["--model", f"demo={Path(args.model).resolve()}"] if args.model else []
    with tempfile.TemporaryDirectory(prefix="appliance-selftest-") as d:
        first = run_once(binary, extra, Path(d), check=True, expect=args.expect_device)
        times = [first] + [run_once(binary, extra, Path(d), check=False) for _ in range(args.runs)]
    times.sort()
    print(
        f"selftest: OK — exit 0 after SIGTERM, extraction dir removed; startup to /readiness "
        f"{times[len(times) // 2]:.2f} s median of {len(times)} (min {times[0]:.2f}, max {times[-1]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
