"""Verified clients across replicas behind a real load balancer (spec/attestation.md §10).

Real appliances (simulated evidence, real llama.cpp, each with its own signing key) on loopback behind
Debian's HAProxy, started here with a generated configuration (`haproxy_config`): round-robin, a
request carrying `Appliance-Route: sN` goes to server sN, every response gets `Appliance-Route: <the
server that answered>`, L7 retries with redispatch, and health checks on /health. The client is the
verifying openai client; every answer must verify against the key of an attested replica, and each
replica must be attested exactly once (counted on the wire under the verifying transport, by the
transport itself, and by each replica's own /metrics).

* 30 calls (chat and completions, half of them streamed) over three replicas: all verified, each
  replica attested once, through its route;
* an impostor in the pool (a genuine appliance serving another model file than the policy pins): the
  client raises `ReplicaAttestationFailed` naming it (route and key id) and never returns its answers;
* a replica stopped while it is generating and calls continue: SIGTERM loses no call (in-flight calls
  finish, the balancer sends what the stopping replica refuses elsewhere); SIGKILL of the replica's
  processes loses no non-streamed call (the balancer replays it, or closes the connection without a
  response and the openai client retries it), and a stream cut off mid-way raises, never returns a
  short answer. No replica is attested twice.

Skipped, with the reason, where /usr/sbin/haproxy is not installed (Debian package `haproxy`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import httpx2
import openai
import pytest
import requests
from appliance_it import Server, free_port, sha256_file, wait_for

from attestation.client import (
    ROUTE_HEADER,
    ReplicaAttestationFailed,
    VerificationError,
    VerifyingTransport,
    response_key_id,
    verified_openai_client,
)
from attestation.policy import Policy

pytestmark = pytest.mark.integration

HAPROXY = Path("/usr/sbin/haproxy")
MODEL = "m"
CONFIG = """
[attestation]
provider = "simulated"
rate_per_minute = 0
"""
MESSAGES = [{"role": "user", "content": "Name three rivers in Europe."}]
TOKENS = 48  # per call while a replica is stopped: long enough to be caught generating


# ---------------------------------------------------------------------------------------------
# HAProxy


def haproxy_config(port: int, stats_port: int, servers: dict[str, int]) -> str:
    """The configuration the tests run (and spec/attestation.md §10 shows)."""
    routes = "\n".join(f"    use-server {n} if {{ req.hdr({ROUTE_HEADER}) -m str {n} }}" for n in servers)
    lines = "\n".join(f"    server {n} 127.0.0.1:{p} check inter 250ms fall 1 rise 2" for n, p in servers.items())
    return f"""global
    maxconn 256
    log stdout format raw local0

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 180s
    timeout server 180s
    timeout check 2s
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response response-timeout

frontend appliance
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk
    http-check send meth GET uri /health
    http-check expect status 200
    http-response set-header {ROUTE_HEADER} %[srv_name]
{routes}
{lines}

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


class Balancer:
    """HAProxy in the foreground over `servers` ({name: Server}); `.url`, `.states()`, `.stop()`. Its
    configuration and its log (one line per request, with HAProxy's termination state) are in `workdir`."""

    def __init__(self, servers: dict[str, Server], workdir: Path) -> None:
        self.servers = servers
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = haproxy_config(self.port, self.stats_port, {n: s.port for n, s in servers.items()})
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(self.config)
        check = subprocess.run([str(HAPROXY), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = workdir / "haproxy.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(HAPROXY), "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: self.states() == {n: "UP" for n in servers}, 30, 0.1, "HAProxy to see every replica UP")
        except BaseException:
            self.stop()
            raise

    def states(self) -> dict[str, str]:
        assert self.proc.poll() is None, f"haproxy exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
        try:
            text = requests.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).text
        except requests.RequestException:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r["status"].split()[0] for r in rows if r["pxname"] == "replicas" and r["svname"] in self.servers}

    def stats(self) -> dict[str, dict[str, str]]:
        """The stats page's rows for the backend and its servers, by name (`BACKEND` for the backend)."""
        text = requests.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).text
        return {r["svname"]: r for r in csv.DictReader(io.StringIO(text.lstrip("# "))) if r["pxname"] == "replicas"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def haproxy_installed() -> None:
    if not os.access(HAPROXY, os.X_OK):
        pytest.skip(f"{HAPROXY} is not installed (Debian package haproxy): the load-balancer tests need it")


@pytest.fixture
def balancer(tmp_path, haproxy_installed):
    started: list[Balancer] = []

    def make(servers: dict[str, Server]) -> Balancer:
        b = Balancer(servers, tmp_path)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture(scope="module")
def replicas(start_server, model_files, haproxy_installed) -> dict[str, Server]:
    return {f"s{i}": start_server(models={MODEL: model_files.main}, config=CONFIG, name=f"replica-s{i}") for i in (1, 2, 3)}


@pytest.fixture(scope="module")
def policy(model_files) -> Policy:
    """Simulated evidence allowed (no TEE here), the model file pinned: only replicas serving it pass."""
    return Policy(allow_simulated=True, model_sha256=(sha256_file(model_files.main),), required_models=(MODEL,))


# ---------------------------------------------------------------------------------------------
# Helpers


def kid_of(server: Server) -> str:
    return server.get("/v1/keys").json()["kid"]


def attestations_served(server: Server) -> int:
    """GET /v1/attestation answered 200 by this replica, from its own /metrics."""
    text = server.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("appliance_requests_total{") and 'route="/v1/attestation"' in line and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


class Recorder(httpx2.BaseTransport):
    """Under the verifying transport: what went over the wire (method, path, routing header sent,
    status, routing header and key id of the answer). It sees raw responses, verified or not, and
    counts requests that got no response at all (`failed`: the openai client retries those)."""

    def __init__(self) -> None:
        self.inner = httpx2.HTTPTransport()
        self.seen: list[tuple[str, str, str | None, int, str | None, str | None]] = []
        self.failed: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            resp = self.inner.handle_request(request)
        except httpx2.TransportError as e:
            with self._lock:
                self.failed.append((request.method, request.url.path, type(e).__name__))
            raise
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in resp.headers.raw}
        with self._lock:
            self.seen.append((request.method, request.url.path, request.headers.get(ROUTE_HEADER), resp.status_code,
                              resp.headers.get(ROUTE_HEADER), response_key_id(headers)))
        return resp

    def attestations(self) -> list[tuple[str | None, str | None]]:
        """(route asked for, route that answered) of every attestation request."""
        return [(asked, got) for _, path, asked, _, got, _ in self.seen if path == "/v1/attestation"]

    def close(self) -> None:
        self.inner.close()


def call(c: openai.OpenAI, i: int, tokens: int = 6) -> tuple[str | None, str]:
    """Call number i: chat, completion, streamed chat, streamed completion in turn. Returns the route
    that answered (from the verified response's headers) and the text, checked to be complete."""
    kind = i % 4
    common = {"model": MODEL, "max_tokens": tokens, "seed": i, "extra_body": {"ignore_eos": True}}
    if kind == 0:
        raw = c.chat.completions.with_raw_response.create(messages=MESSAGES, **common)
        r = raw.parse()
        assert r.usage.completion_tokens == tokens
        return raw.headers.get(ROUTE_HEADER), r.choices[0].message.content or ""
    if kind == 1:
        raw = c.completions.with_raw_response.create(prompt=f"Count to {i}:", **common)
        r = raw.parse()
        assert r.usage.completion_tokens == tokens
        return raw.headers.get(ROUTE_HEADER), r.choices[0].text
    stream_opts = {"stream": True, "stream_options": {"include_usage": True}}
    if kind == 2:
        raw = c.chat.completions.with_raw_response.create(messages=MESSAGES, **common, **stream_opts)
        chunks = list(raw.parse())
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    else:
        raw = c.completions.with_raw_response.create(prompt=f"Count to {i}:", **common, **stream_opts)
        chunks = list(raw.parse())
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert chunks[-1].usage.completion_tokens == tokens  # the stream ran to its verified end
    return raw.headers.get(ROUTE_HEADER), text


def client_over(url: str, policy: Policy, *, max_retries: int = 3) -> tuple[openai.OpenAI, VerifyingTransport, Recorder]:
    """The openai client on a VerifyingTransport we keep a handle on (verified_openai_client hides it)."""
    rec = Recorder()
    vt = VerifyingTransport(url, policy=policy, transport=rec)
    hooks = {"request": [lambda r: r.headers.pop("authorization", None)]}
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=max_retries, timeout=120.0,
                      http_client=httpx2.Client(transport=vt, event_hooks=hooks))
    return c, vt, rec


# ---------------------------------------------------------------------------------------------
# Three replicas


def test_thirty_verified_calls_attest_each_replica_once(replicas, balancer, policy):
    lb = balancer(replicas)
    kids = {n: kid_of(s) for n, s in replicas.items()}
    assert len(set(kids.values())) == 3  # one key per replica
    before = {n: attestations_served(s) for n, s in replicas.items()}
    rec = Recorder()
    routes: list[str | None] = []
    with verified_openai_client(lb.url, policy=policy, transport=rec, max_retries=2, timeout=120.0) as c:
        for i in range(30):
            route, text = call(c, i)
            assert text
            routes.append(route)
    # every answer came back verified (or the call would have raised), from every replica in turn
    assert Counter(routes) == {"s1": 10, "s2": 10, "s3": 10}, routes
    inference = [s for s in rec.seen if s[1] != "/v1/attestation"]
    assert len(inference) == 30 and {(r, k) for *_, r, k in inference} == {(n, kids[n]) for n in replicas}
    # each replica attested exactly once: the first by whoever answered, the others through their route
    attested = rec.attestations()
    assert len(attested) == 3 and attested[0][0] is None
    assert sorted(got for _, got in attested) == ["s1", "s2", "s3"]
    assert all(asked == got for asked, got in attested[1:])
    assert {n: attestations_served(s) - before[n] for n, s in replicas.items()} == {"s1": 1, "s2": 1, "s3": 1}


def test_an_impostor_replica_is_refused_by_name(replicas, start_server, model_files, balancer, policy):
    impostor = start_server(models={MODEL: model_files.other}, config=CONFIG, name="replica-impostor")
    try:
        lb = balancer({**replicas, "s4": impostor})
        bad_kid = kid_of(impostor)
        c, vt, rec = client_over(lb.url, policy)
        answered: list[str | None] = []
        refused: list[ReplicaAttestationFailed] = []
        with c:
            for i in range(12):
                try:
                    route, text = call(c, i)
                except ReplicaAttestationFailed as e:
                    refused.append(e)
                else:
                    assert text
                    answered.append(route)
        assert refused, "the impostor was never met"
        for e in refused:
            assert (e.route, e.kid) == ("s4", bad_kid), str(e)
            assert "'s4'" in str(e) and bad_kid in str(e)
            assert [f.name for f in e.report.failures()] == ["models"]  # genuine evidence, the wrong model file
        assert answered and set(answered) <= {"s1", "s2", "s3"}  # no answer of the impostor's was returned
        assert bad_kid not in vt.replicas and set(vt.replicas) == {kid_of(s) for s in replicas.values()}
        # the impostor did answer prompts (the balancer sent them) and was asked to attest, every time
        impostor_answers = [s for s in rec.seen if s[4] == "s4" and s[1] != "/v1/attestation"]
        assert impostor_answers and all(k == bad_kid for *_, k in impostor_answers)
        assert attestations_served(impostor) == len(refused)
    finally:
        impostor.stop()


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def _stop(server: Server, how: signal.Signals) -> int:
    """SIGTERM (a graceful stop), or SIGKILL to the master and its worker (which would otherwise notice
    the master gone and drain gracefully). The exit status."""
    if how == signal.SIGKILL:
        for pid in [server.proc.pid, *_children(server.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return server.stop()


def busy_slots(server: Server) -> float:
    with contextlib.suppress(requests.RequestException):
        for line in server.get("/metrics", timeout=2).text.splitlines():
            if line.startswith("appliance_busy_slots{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_replica_stopped_mid_run(replicas, start_server, model_files, balancer, policy, how):
    victim = start_server(models={MODEL: model_files.main}, config=CONFIG, name=f"replica-victim-{how.name}")
    pool = {"s1": replicas["s1"], "s2": replicas["s2"], "s3": victim}
    lb = balancer(pool)
    c, vt, rec = client_over(lb.url, policy, max_retries=3)
    kids = {n: kid_of(s) for n, s in pool.items()}
    with c:
        for i in range(3):  # every replica met, and attested, before the stop
            call(c, i)
        assert set(vt.replicas) == set(kids.values())

        done: list[tuple[int, str | None]] = []
        lost: list[tuple[int, BaseException]] = []
        lock = threading.Lock()

        def worker(w: int) -> None:
            for j in range(8):
                i = 3 + w * 8 + j
                try:
                    route, text = call(c, i, TOKENS)
                    assert text
                except BaseException as e:  # every failure is collected and judged below
                    with lock:
                        lost.append((i, e))
                else:
                    with lock:
                        done.append((i, route))

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        # Stop the victim while it is generating an answer (and the others keep being called).
        wait_for(lambda: len(done) >= 3 and busy_slots(victim) >= 1, 120, 0.05, "the victim to be generating")
        status = _stop(victim, how)
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        # once HAProxy has seen it down, answers come from the replicas still up, verified as before
        wait_for(lambda: lb.states().get("s3") not in (None, "UP"), 10, 0.1, "HAProxy to mark the stopped replica down")
        after = [call(c, 1 + 4 * k)[0] for k in range(4)]
        assert set(after) == {"s1", "s2"}

    assert len(done) + len(lost) == 24
    if how == signal.SIGTERM:
        assert status == 0 and lost == []  # in-flight calls finished, new ones went to the others
    else:
        assert status == -signal.SIGKILL
        # the kill caught a call under way: HAProxy replayed it elsewhere, the client retried it (the
        # connection closed with no response), or it was a stream already answering (below)
        assert int(lb.stats()["s3"]["wredis"]) + len(rec.failed) + len(lost) >= 1
        # A non-streamed call the killed replica never answered is replayed by the balancer (or retried by
        # the client); a stream already under way cannot be: it raises, and nothing past its last verified
        # checkpoint was returned (the cut shows as a failed verification, or as the connection closing
        # before the body ended).
        for i, e in lost:
            assert i % 4 in (2, 3), f"non-streamed call {i} lost: {e!r}"
            # (the SDK reports a cut transport as APIConnectionError, wrapping the transport's error)
            assert (isinstance(e, VerificationError) and "stream" in str(e)) or isinstance(
                e, (httpx2.TransportError, openai.APIConnectionError)), repr(e)
    assert done and all(route in pool for _, route in done)
    assert set(vt.replicas) == set(kids.values()) and vt.attestations == 3  # no replica attested twice


def test_the_config_routes_by_header(replicas, balancer):
    """The routing rule itself: a request naming sN is answered by sN, whatever the round-robin."""
    lb = balancer(replicas)
    kids = {n: kid_of(s) for n, s in replicas.items()}
    for name in ("s2", "s2", "s3", "s1", "s3"):
        r = requests.get(lb.url + "/v1/keys", headers={ROUTE_HEADER: name, "Connection": "close"}, timeout=10)
        assert r.headers[ROUTE_HEADER] == name and r.json()["kid"] == kids[name]
    seen = [requests.get(lb.url + "/v1/keys", headers={"Connection": "close"}, timeout=10).headers[ROUTE_HEADER]
            for _ in range(6)]
    assert Counter(seen) == {"s1": 2, "s2": 2, "s3": 2}
    assert re.search(r"use-server s1 if \{ req.hdr\(appliance-route\) -m str s1 \}", lb.config)
