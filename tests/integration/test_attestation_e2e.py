"""Attestation end to end against the real server (simulated provider, real llama.cpp):

* `appliance verify URL --allow-simulated` prints the factor table and exits 0; without the opt-in 1;
  `--complete "Hello"` sends a completion and verifies the answer against the attested key;
* the official openai client over `VerifyingTransport`: chat and streaming completions, verified;
* a tampering HTTP proxy on loopback between client and server (a flipped character in a JSON body,
  an altered SSE event, a dropped SSE event, a truncated stream, an earlier response replayed for a
  new request, a replayed attestation): the verifying client raises and `appliance verify
  --complete` exits non-zero, every time; through the same proxy left alone, everything verifies.
"""

from __future__ import annotations

import http.client
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import openai
import pytest
from appliance_it import ROOT, server_command

from appliance.web.streams import CHECKPOINT_EVERY
from attestation.client import AttestationFailed, VerificationError, VerifyingTransport, attest, verified_openai_client
from attestation.policy import Policy

pytestmark = pytest.mark.integration

MODEL = "m"
ALLOW = Policy(allow_simulated=True)
MESSAGES = [{"role": "user", "content": "Name three rivers in Europe."}]
CONFIG = """
[attestation]
provider = "simulated"
rate_per_minute = 0
"""
INFERENCE = ("/v1/completions", "/v1/chat/completions")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
              "host", "content-length"}


@pytest.fixture(scope="module")
def att_server(start_server, model_files):
    return start_server(models={MODEL: model_files.main}, config=CONFIG, name="attest")


# ---------------------------------------------------------------------------------------------
# A tampering proxy


Mutation = Callable[[str, str, int, list, bytes], tuple[int, list, bytes]]


class TamperingProxy:
    """A threaded HTTP proxy on loopback: forwards each request to `upstream` as received (method,
    target, headers, body), reads the whole answer, lets `mutate(method, path, status, headers, body)`
    rewrite it, and sends it on with a Content-Length (one request per connection)."""

    def __init__(self, upstream_port: int, mutate: Mutation | None = None) -> None:
        self.upstream_port = upstream_port
        self.mutate = mutate
        self.seen: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

            do_POST = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _forward(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
        try:
            conn.request(h.command, h.path, body=body if (body or h.command == "POST") else None, headers=headers)
            resp = conn.getresponse()
            status, rheaders, data = resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()
        path = h.path.split("?", 1)[0]
        self.seen.append((h.command, path))
        if self.mutate is not None:
            status, rheaders, data = self.mutate(h.command, path, status, list(rheaders), data)
        h.send_response_only(status)
        for k, v in rheaders:
            if k.lower() not in HOP_BY_HOP:
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(data)
        h.close_connection = True

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy(att_server):
    proxies: list[TamperingProxy] = []

    def make(mutate: Mutation | None = None) -> TamperingProxy:
        p = TamperingProxy(att_server.port, mutate)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


def on_inference(fn):
    """Apply `fn(status, headers, body)` to inference answers only (the attestation passes untouched)."""

    def mutate(method, path, status, headers, body):
        if path not in INFERENCE:
            return status, headers, body
        return fn(status, headers, body)

    return mutate


def flip_value(data: bytes, keys=(b"text", b"content")) -> bytes:
    """Change one character of the first non-empty "text"/"content" string value."""
    for key in keys:
        m = re.search(rb'"' + key + rb'":\s*"(?=[^"\\])', data)
        if m:
            i = m.end()
            new = b"Y" if data[i : i + 1] != b"Y" else b"Z"
            return data[:i] + new + data[i + 1 :]
    raise AssertionError(f"no text to flip in {data[:300]!r}")


def sse_split(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-100:]
    return [e + b"\n\n" for e in body[:-2].split(b"\n\n")]


def data_indexes(events: list[bytes]) -> list[int]:
    return [i for i, e in enumerate(events) if e.startswith(b"data: {")]


def is_sse(headers) -> bool:
    return any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers)


def flip_json(status, headers, body):
    return (status, headers, body if is_sse(headers) else flip_value(body))


def alter_sse(status, headers, body):
    if not is_sse(headers):
        return status, headers, body
    evs = sse_split(body)
    i = next(i for i in data_indexes(evs) if re.search(rb'"(text|content)":\s*"[^"\\]', evs[i]))
    evs[i] = flip_value(evs[i])
    return status, headers, b"".join(evs)


def drop_sse(status, headers, body):
    if not is_sse(headers):
        return status, headers, body
    evs = sse_split(body)
    del evs[data_indexes(evs)[2]]
    return status, headers, b"".join(evs)


def truncate_sse(status, headers, body):
    if not is_sse(headers):
        return status, headers, body
    evs = sse_split(body)
    return status, headers, b"".join(evs[: data_indexes(evs)[-1] + 1])  # no final checkpoint, no [DONE]


def replay_first():
    """Record the first answer per inference path; serve it again for every later request there."""
    saved: dict[str, tuple] = {}

    def mutate(method, path, status, headers, body):
        if path not in INFERENCE:
            return status, headers, body
        return saved.setdefault(path, (status, headers, body))

    return mutate


def replay_attestation():
    saved: dict[str, tuple] = {}

    def mutate(method, path, status, headers, body):
        if path != "/v1/attestation":
            return status, headers, body
        return saved.setdefault(path, (status, headers, body))

    return mutate


# ---------------------------------------------------------------------------------------------
# Helpers


def verify_cli(url: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*server_command(), "verify", url, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def verifying_client(url: str, **kw) -> tuple[openai.OpenAI, VerifyingTransport]:
    vt = VerifyingTransport(url, policy=ALLOW)
    hooks = {"request": [lambda r: r.headers.pop("authorization", None)]}  # no API keys on this server
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120.0,
                      http_client=httpx2.Client(transport=vt, event_hooks=hooks), **kw)
    return c, vt


def chat(c, **kw):
    return c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, seed=3,
                                     extra_body={"ignore_eos": True}, **kw)


def stream_completion(c, max_tokens: int = 40):
    return c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=max_tokens, seed=3, stream=True,
                                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})


# ---------------------------------------------------------------------------------------------
# The CLI


def test_cli_verify_allow_simulated_exits_0_with_the_table(att_server):
    out = verify_cli(att_server.url, "--allow-simulated")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "provider: simulated (simulated-v1)" in lines
    assert re.match(r"^factor\s+status\s+detail$", lines[2])
    table = {m.group(1): m.group(2) for m in (re.match(r"^(\S+)\s+(pass|fail|skip)\s", ln) for ln in lines) if m}
    assert table["report-data"] == table["nonce"] == table["provider"] == table["signing-key"] == "pass"
    assert table["response-signature"] == "pass" and table["evidence-signature"] == "skip"
    assert "fail" not in table.values()
    assert lines[-1].startswith("result: OK")


def test_cli_verify_without_opt_in_exits_1(att_server):
    out = verify_cli(att_server.url)
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"^provider\s+fail\s+SIMULATED", out.stdout, re.M)
    assert "result: FAILED (provider)" in out.stdout


def test_cli_verify_complete_verifies_the_answer(att_server):
    out = verify_cli(att_server.url, "--allow-simulated", "--complete", "Hello", "--max-tokens", "8")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"(model {MODEL}, max_tokens 8)" in out.stdout  # the first model in the claims
    assert out.stdout.rstrip().endswith("signature: verified")


def test_python_m_attestation_verify_stream(att_server):
    out = subprocess.run(
        [sys.executable, "-m", "attestation", "verify", att_server.url, "--allow-simulated", "--complete", "Hello",
         "--stream", "--max-tokens", "20", "--model", MODEL],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "signature: verified (stream" in out.stdout


# ---------------------------------------------------------------------------------------------
# The openai client, verified


def test_openai_chat_and_streaming_completion_verified(att_server):
    c, vt = verifying_client(att_server.url)
    with c:
        r = chat(c)
        assert r.choices[0].message.content and r.usage.completion_tokens == 8
        chunks = list(stream_completion(c))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text and chunks[-1].usage.completion_tokens == 40
        streamed_chat = list(chat(c, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed_chat if ch.choices) == r.choices[0].message.content
    assert (vt.verified_responses, vt.verified_streams) == (1, 2)
    assert vt.appliance.claims["models"][0]["name"] == MODEL
    assert vt.appliance.signing_key.public_bytes_raw()  # the key /v1/keys serves, now bound to evidence
    keys = httpx2.get(att_server.url + "/v1/keys", headers={"Connection": "close"}).json()
    assert keys["kid"] == vt.appliance.kid


def test_verified_openai_client_helper(att_server):
    with verified_openai_client(att_server.url, policy=ALLOW, max_retries=0) as c:
        assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_attest_refuses_simulated_by_default(att_server):
    with pytest.raises(AttestationFailed) as info:
        attest(att_server.url, policy=Policy())
    assert [f.name for f in info.value.report.failures()] == ["provider"]


# ---------------------------------------------------------------------------------------------
# A tampering proxy between client and server


def test_untouched_proxy_verifies(proxy):
    p = proxy()
    c, vt = verifying_client(p.url)
    with c:
        chat(c)
        list(stream_completion(c, 20))
    assert (vt.verified_responses, vt.verified_streams) == (1, 1)
    assert ("POST", "/v1/chat/completions") in p.seen and ("GET", "/v1/attestation") in p.seen
    out = verify_cli(p.url, "--allow-simulated", "--complete", "Hello")
    assert out.returncode == 0, out.stdout + out.stderr


def test_proxy_flipping_a_json_character_is_detected(proxy):
    p = proxy(on_inference(flip_json))
    c, vt = verifying_client(p.url)
    with c, pytest.raises(VerificationError, match="content-digest"):
        chat(c)
    out = verify_cli(p.url, "--allow-simulated", "--complete", "Hello")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "signature: FAILED" in out.stdout


@pytest.mark.parametrize("mutation", [alter_sse, drop_sse, truncate_sse], ids=["alter-event", "drop-event", "truncate"])
def test_proxy_tampering_with_a_stream_is_detected(proxy, mutation):
    p = proxy(on_inference(mutation))
    c, vt = verifying_client(p.url)
    got = []
    with c, pytest.raises(VerificationError, match="stream"):
        for chunk in stream_completion(c):
            got.append(chunk)
    # Only what a verified checkpoint covered came through: nothing when the tampering is before the first
    # checkpoint, whole checkpoint intervals when the end of the stream is missing.
    if mutation is truncate_sse:
        assert got and len(got) % CHECKPOINT_EVERY == 0
    else:
        assert got == []
    out = verify_cli(p.url, "--allow-simulated", "--complete", "Hello", "--stream", "--max-tokens", "20")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "signature: FAILED" in out.stdout


def test_proxy_replaying_an_earlier_response_is_detected(proxy):
    p = proxy(replay_first())
    c, vt = verifying_client(p.url)
    with c:
        first = chat(c)  # recorded on its way through: genuine
        assert first.choices[0].message.content
        with pytest.raises(VerificationError, match="does not verify"):
            chat(c)  # the very same answer again, for a new request with a new nonce
        list(stream_completion(c, 20))
        with pytest.raises(VerificationError):
            list(stream_completion(c, 20))
    p = proxy(replay_first())  # a fresh recording for the CLI
    first_cli = verify_cli(p.url, "--allow-simulated", "--complete", "Hello")
    assert first_cli.returncode == 0, first_cli.stdout + first_cli.stderr  # recorded
    again = verify_cli(p.url, "--allow-simulated", "--complete", "Hello")
    assert again.returncode == 1 and "signature: FAILED" in again.stdout, again.stdout + again.stderr


def test_proxy_replaying_an_attestation_is_detected(proxy):
    p = proxy(replay_attestation())
    attest(p.url, policy=ALLOW)  # recorded
    with pytest.raises(AttestationFailed) as info:
        attest(p.url, policy=ALLOW)
    assert "nonce" in {f.name for f in info.value.report.failures()}
    out = verify_cli(p.url, "--allow-simulated")
    assert out.returncode == 1 and re.search(r"^nonce\s+fail", out.stdout, re.M), out.stdout + out.stderr
