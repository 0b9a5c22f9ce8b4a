"""`make fuzz`: schemathesis against spec/openapi.yaml and a real appliance on loopback.

    python -m tests.fuzz.run [--examples N] [--seed S] [--model NAME=PATH] [--url URL]

Starts a server (the synthetic demo model unless --model or --url says otherwise), runs every phase
(examples, coverage, fuzzing, stateful) with every check on plus tests/fuzz/hooks.py (every response
signed), then requires the server still healthy with the same worker. Exits non-zero on any failure.
tests/integration/test_fuzz.py runs a short seeded version in `make test`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.serve import appliance

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "spec" / "openapi.yaml"
CONFIG = Path(__file__).with_name("schemathesis.toml")
DEMO = ROOT / "var" / "models" / "demo.gguf"
# The server: signing on (the default); attestation simulated so /v1/attestation answers; a 512-token
# context per slot, so a chat request without max_tokens (which may run to the end of its context, as
# OpenAI's does) takes seconds on the synthetic model, not minutes. The operator's limits are set to the
# largest the schemas allow, so a schema-valid body refused is a mismatch between parser and spec, not a
# deployment's choice (each such limit is a 400 naming its field, documented in the spec).
SERVER_CONFIG = """\
[attestation]
provider = "simulated"

[model_defaults]
n_ctx = 512
embeddings = true

[limits]
max_tokens = 1048576
max_stop = 64
max_stop_length = 4096
max_top_logprobs = 100
"""


@dataclass
class FuzzResult:
    returncode: int
    output: str
    cases: int
    failures: int
    healthy_after: bool
    no_worker_restart: bool

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.failures == 0 and self.healthy_after and self.no_worker_restart


def _worker_restarts(url: str) -> float | None:
    """appliance_worker_restarts_total: a worker that died under the fuzz shows here."""
    try:
        text = requests.get(url + "/metrics", timeout=10).text
    except requests.RequestException:
        return None
    m = re.search(r"^appliance_worker_restarts_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


def fuzz(url: str, *, model_name: str, model_path: Path, examples: int, seed: int,
         timeout: float = 3600, extra: list[str] | None = None) -> FuzzResult:
    """Run schemathesis against a running server at `url` serving `model_name` (loaded from `model_path`)."""
    restarts_before = _worker_restarts(url)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "APPLIANCE_FUZZ_URL": url,
        "APPLIANCE_FUZZ_MODEL_NAME": model_name,
        "APPLIANCE_FUZZ_MODEL_PATH": str(model_path),
        "NO_COLOR": "1",
    }
    st = Path(sys.executable).with_name("st")
    argv = [str(st), "--config-file", str(CONFIG), "--no-color", "run", str(SPEC), "--url", url,
            "--max-examples", str(examples), "--seed", str(seed), "--workers", "1",
            "--request-timeout", "120", "--no-shrink", *(extra or [])]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    cases = failures = 0
    if m := re.search(r"(\d+) generated", output):
        cases = int(m.group(1))
    if m := re.search(r"(\d+) found (\d+) unique failure", output):
        failures = int(m.group(2))
    if m := re.search(r"(\d+) errored", output):  # a check or hook that raised: never a pass
        failures += int(m.group(1))
    try:
        healthy = requests.get(url + "/health", timeout=10).status_code == 200
    except requests.RequestException:
        healthy = False
    restarts_after = _worker_restarts(url)
    same = restarts_before is not None and restarts_before == restarts_after
    return FuzzResult(done.returncode, output, cases, failures, healthy, same)


def status_table(log: Path) -> str:
    """Answers per route and status, from the server's access log (what the fuzz actually reached)."""
    counts: dict[str, Counter[int]] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("logger") == "appliance.access" and "status" in entry:
            counts.setdefault(str(entry.get("route")), Counter())[int(entry["status"])] += 1
    rows = [f"{route:36} " + " ".join(f"{status}:{n}" for status, n in sorted(c.items()))
            for route, c in sorted(counts.items())]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=int(os.environ.get("FUZZ_EXAMPLES", "200")),
                   help="cases per operation and phase (default 200: thousands of requests in all)")
    p.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", "1")))
    p.add_argument("--model", default=None, help="NAME=PATH of the model to serve (default demo=var/models/demo.gguf)")
    p.add_argument("--url", default=None, help="fuzz a server already running there (with --model naming what it serves)")
    args, extra = p.parse_known_args(argv)
    name, path = ("demo", DEMO) if args.model is None else (args.model.split("=", 1)[0], Path(args.model.split("=", 1)[1]))
    with tempfile.TemporaryDirectory(prefix="appliance-fuzz-") as tmp:
        with contextlib.ExitStack() as stack:
            url = args.url
            if url is None:
                _, url = stack.enter_context(appliance(SERVER_CONFIG, Path(tmp), "--model", f"{name}={path}", timeout=120))
            t0 = time.monotonic()
            result = fuzz(url, model_name=name, model_path=path, examples=args.examples, seed=args.seed, extra=extra)
        print(result.output)
        if args.url is None:
            print(status_table(Path(tmp) / "server.log"))
        print(f"fuzz: {result.cases} cases in {time.monotonic() - t0:.0f} s, {result.failures} failures, "
              f"healthy after: {result.healthy_after}, no worker restart: {result.no_worker_restart}")
        return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
