"""VerifyingTransport behind a load balancer, in process: the replica cache by key id.

Each replica is the real Falcon app with its own identity (simulated evidence) behind httpx2's
WSGITransport; `Balancer` stands in for HAProxy: round-robin, a request carrying `Appliance-Route`
goes to that replica, and every response gets `Appliance-Route: <replica>` (what the HAProxy
configuration of tests/integration/test_replicas.py does). The balancer can also misbehave: strip
the routing header, or name another replica than the one that answered.
"""

from __future__ import annotations

import itertools
import threading
import time

import httpx2
import openai
import pytest

from appliance.settings import Settings
from appliance.trust.identity import Identity
from appliance.web.app import create_app
from attestation.client import (
    ROUTE_HEADER,
    AttestationFailed,
    ReplicaAttestationFailed,
    VerificationError,
    VerifyingTransport,
    attest,
    response_key_id,
    response_route,
)
from attestation.policy import Policy
from attestation.signing import RequestInfo
from tests.conftest import FakeRegistry

URL = "http://appliance.test"
GENUINE_MODEL = "ab" * 32  # the digest FakeRegistry gives its models
POLICY = Policy(allow_simulated=True, model_sha256=(GENUINE_MODEL,))
MESSAGES = [{"role": "user", "content": "hi"}]


class Env:
    """One replica: the real app, its own identity, a fake model registry (as tests/unit/attestation/test_client.py)."""

    def __init__(self) -> None:
        self.registry = FakeRegistry()
        self.registry.add("tiny")
        self.identity = Identity()
        settings = Settings.model_validate({"attestation": {"provider": "simulated", "rate_per_minute": 0}})
        self.app, self.state = create_app(settings, models=self.registry, identity=self.identity)
        self.wsgi = httpx2.WSGITransport(app=self.app)


def impostor() -> Env:
    """A replica whose attestation is genuine but fails POLICY: it serves another model file."""
    env = Env()
    env.registry.records()[0].sha256 = "cd" * 32
    return env


class Balancer(httpx2.BaseTransport):
    """Round-robin over named replicas; honours and sets the routing header; records what each got."""

    def __init__(self, replicas: dict[str, Env], *, set_route=None, attest_delay: float = 0.0) -> None:
        self.replicas = replicas
        self.names = list(replicas)
        self._next = itertools.cycle(self.names)
        self._lock = threading.Lock()
        self.set_route = set_route if set_route is not None else (lambda served: served)
        self.attest_delay = attest_delay
        self.log: list[tuple[str, str, str | None]] = []  # (replica, path, routing header sent)

    def handle_request(self, request):
        asked = request.headers.get(ROUTE_HEADER)
        with self._lock:
            name = asked if asked in self.replicas else next(self._next)
            self.log.append((name, request.url.path, asked))
        if request.url.path == "/v1/attestation" and self.attest_delay:
            time.sleep(self.attest_delay)  # widens the window in which threads meet a new replica together
        resp = self.replicas[name].wsgi.handle_request(request)
        data = b"".join(resp.stream)
        headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() != ROUTE_HEADER]
        route = self.set_route(name)
        if route is not None:
            headers.append((ROUTE_HEADER, route))
        return httpx2.Response(resp.status_code, headers=headers, stream=httpx2.ByteStream(data))

    def attestations(self) -> dict[str, int]:
        return {n: sum(1 for r, p, _ in self.log if r == n and p == "/v1/attestation") for n in self.names}

    def served(self, path_prefix: str = "/v1/c") -> set[str]:
        return {r for r, p, _ in self.log if p.startswith(path_prefix)}


def pool(n: int = 3, **kw) -> tuple[dict[str, Env], Balancer]:
    envs = {f"s{i + 1}": Env() for i in range(n)}
    return envs, Balancer(envs, **kw)


def oai(transport, answered: list[str | None] | None = None) -> openai.OpenAI:
    """An openai client over `transport`; `answered` collects the route of every response it returned."""
    hooks: dict[str, list] = {"request": [lambda r: r.headers.pop("authorization", None)]}
    if answered is not None:
        hooks["response"] = [lambda r: answered.append(r.headers.get(ROUTE_HEADER))]
    return openai.OpenAI(base_url=URL + "/v1", api_key="none", max_retries=0,
                         http_client=httpx2.Client(transport=transport, event_hooks=hooks))


def call(c: openai.OpenAI, i: int) -> str:
    """One of chat, completion, streamed chat, streamed completion; the text it returned."""
    kind = i % 4
    if kind == 0:
        return c.chat.completions.create(model="tiny", messages=MESSAGES).choices[0].message.content
    if kind == 1:
        return c.completions.create(model="tiny", prompt="Hi", max_tokens=3).choices[0].text
    if kind == 2:
        chunks = c.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    chunks = c.completions.create(model="tiny", prompt="Hi", stream=True)
    return "".join(ch.choices[0].text for ch in chunks if ch.choices)


EXPECTED = {0: "Hello, wörld!", 1: "Hello, wörld", 2: "Hello, wörld!", 3: "Hello, wörld!"}


# ---------------------------------------------------------------------------------------------
# The happy path


def test_each_replica_is_attested_once_and_verifies_its_own_answers():
    envs, lb = pool(3)
    vt = VerifyingTransport(URL, policy=POLICY, transport=lb)
    with oai(vt) as c:
        for i in range(12):
            assert call(c, i) == EXPECTED[i % 4]
    kids = {name: env.identity.kid for name, env in envs.items()}
    assert set(vt.replicas) == set(kids.values())
    assert {a.kid: a.route for a in vt.replicas.values()} == {kid: name for name, kid in kids.items()}
    assert lb.attestations() == {"s1": 1, "s2": 1, "s3": 1} and vt.attestations == 3
    assert lb.served() == {"s1", "s2", "s3"}
    assert (vt.verified_responses, vt.verified_streams) == (6, 6)
    # a replica met through an answer is attested through its route; the first one without
    sent = [(r, asked) for r, p, asked in lb.log if p == "/v1/attestation"]
    assert sent == [("s1", None), ("s2", "s2"), ("s3", "s3")]
    assert all(a.report.ok and a.claims["models"][0]["sha256"] == GENUINE_MODEL for a in vt.replicas.values())


def test_a_stream_from_a_new_replica_is_attested_before_any_byte_is_returned():
    envs, lb = pool(2)
    vt = VerifyingTransport(URL, policy=POLICY, transport=lb)
    with oai(vt) as c:
        c.completions.create(model="tiny", prompt="Hi", max_tokens=1)  # attests s1, answered by s1
        stream = c.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)  # s2's answer
        assert envs["s2"].identity.kid in vt.replicas  # before the first chunk is read
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == "Hello, wörld!"
    assert lb.attestations() == {"s1": 1, "s2": 1}


def test_concurrent_callers_attest_each_replica_exactly_once():
    envs, lb = pool(3, attest_delay=0.05)
    vt = VerifyingTransport(URL, policy=POLICY, transport=lb)
    errors: list[BaseException] = []
    texts: list[str] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        with oai(vt) as c:
            for i in range(4):
                try:
                    text = call(c, t + i)
                except BaseException as e:  # collected, and asserted on below
                    with lock:
                        errors.append(e)
                else:
                    with lock:
                        texts.append(text)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(texts) == 32
    assert lb.attestations() == {"s1": 1, "s2": 1, "s3": 1} and vt.attestations == 3
    assert set(vt.replicas) == {e.identity.kid for e in envs.values()}


def test_the_single_appliance_api_is_unchanged():
    """Without a balancer (no routing header, one key): one attestation, every answer verified."""
    env = Env()
    vt = VerifyingTransport(URL, policy=POLICY, transport=env.wsgi)
    with oai(vt) as c:
        for i in range(4):
            assert call(c, i) == EXPECTED[i]
    assert vt.attestations == 1 and list(vt.replicas) == [env.identity.kid] and vt.appliance.route is None


# ---------------------------------------------------------------------------------------------
# Replicas that must not be trusted


def test_an_impostor_replica_fails_attestation_named_and_its_answers_never_return():
    envs = {"s1": Env(), "s2": impostor(), "s3": Env()}
    lb = Balancer(envs)
    vt = VerifyingTransport(URL, policy=POLICY, transport=lb)
    bad_kid = envs["s2"].identity.kid
    ok, failed, answered = [], [], []
    with oai(vt, answered) as c:
        for i in range(9):
            try:
                ok.append(call(c, i))
            except ReplicaAttestationFailed as e:
                failed.append(e)
    assert len(ok) == 6 and len(failed) == 3  # every third answer is the impostor's: refused, each time
    for e in failed:
        assert (e.kid, e.route) == (bad_kid, "s2")
        assert "'s2'" in str(e) and bad_kid in str(e) and "models" in str(e)
        assert [f.name for f in e.report.failures()] == ["models"]
    assert bad_kid not in vt.replicas and set(vt.replicas) == {envs["s1"].identity.kid, envs["s3"].identity.kid}
    assert sorted(answered) == ["s1"] * 3 + ["s3"] * 3  # no answer of s2's ever reached the caller
    assert lb.attestations() == {"s1": 1, "s2": 3, "s3": 1}  # never trusted: tried again, refused again


def test_a_failed_first_attestation_names_the_replica():
    envs = {"s1": impostor(), "s2": Env(), "s3": Env()}
    lb = Balancer(envs)
    vt = VerifyingTransport(URL, policy=POLICY, transport=lb)
    with oai(vt) as c:
        with pytest.raises(ReplicaAttestationFailed) as info:
            c.completions.create(model="tiny", prompt="secret", max_tokens=1)
        assert (info.value.kid, info.value.route) == (envs["s1"].identity.kid, "s1")  # the kid its claims name
        assert [p for _, p, _ in lb.log] == ["/v1/attestation"]  # no prompt left before an attestation passed
        # the next use attests again (s2 this time), and s3 answers, attested through its route
        assert c.completions.create(model="tiny", prompt="Hi", max_tokens=1).choices[0].text == "Hello"
    assert vt.appliance.route == "s2" and set(vt.replicas) == {envs["s2"].identity.kid, envs["s3"].identity.kid}
    assert [(r, p) for r, p, _ in lb.log] == [("s1", "/v1/attestation"), ("s2", "/v1/attestation"),
                                              ("s3", "/v1/completions"), ("s3", "/v1/attestation")]


def test_an_unknown_key_without_a_route_is_refused():
    envs, lb = pool(2, set_route=lambda served: None)
    vt = VerifyingTransport(URL, policy=POLICY, transport=lb)
    with oai(vt) as c:  # the attestation goes to s1, then the answers alternate s2, s1, s2
        with pytest.raises(VerificationError, match=f"{envs['s2'].identity.kid}.*names no {ROUTE_HEADER}"):
            c.completions.create(model="tiny", prompt="Hi", max_tokens=1)
        assert call(c, 3) == EXPECTED[3]  # s1's stream: attested, verified
        got = []
        with pytest.raises(VerificationError, match="names no"):
            for ch in c.completions.create(model="tiny", prompt="Hi", stream=True):  # s2's: refused before a byte
                got.append(ch)
    assert got == [] and vt.verified_streams == 1 and vt.verified_responses == 0 and vt.attestations == 1


def test_a_route_that_leads_to_another_replica_is_refused():
    """The balancer names s1 on s2's answers: attesting s1 gives s1's key, not the one that signed."""
    envs, lb = pool(2, set_route=lambda served: "s1")
    vt = VerifyingTransport(URL, policy=POLICY, transport=lb)
    with oai(vt) as c:  # the attestation goes to s1, then the answers alternate s2, s1
        with pytest.raises(VerificationError, match=f"signed by key id {envs['s2'].identity.kid}.*not attested"):
            c.completions.create(model="tiny", prompt="Hi", max_tokens=1)
        assert c.completions.create(model="tiny", prompt="Hi", max_tokens=1).choices[0].text == "Hello"
    assert list(vt.replicas) == [envs["s1"].identity.kid] and vt.verified_responses == 1
    assert lb.attestations() == {"s1": 2, "s2": 0}


def test_a_response_re_signed_by_a_man_in_the_middle_is_refused():
    """Another key signs, and the balancer offers a route: that route attests a genuine replica whose
    key is not the signer's, so the answer is refused (and the genuine replica is kept)."""
    envs, inner = pool(2)
    mitm = Identity()

    class Resign(httpx2.BaseTransport):
        def handle_request(self, request):
            body = request.read()
            resp = inner.handle_request(request)
            data = resp.read()
            if request.url.path != "/v1/completions":
                return resp
            drop = ("signature", "signature-input", "content-digest", "appliance-request-digest")
            kept = {k.lower(): v for k, v in resp.headers.items() if k.lower() not in drop}
            info = RequestInfo("POST", request.url.raw_path.decode(), body, request.headers["appliance-nonce"])
            signed = mitm.sign_response(info, resp.status_code, kept, data)
            return httpx2.Response(resp.status_code, headers={**kept, **signed}, stream=httpx2.ByteStream(data))

    vt = VerifyingTransport(URL, policy=POLICY, transport=Resign())
    with oai(vt) as c, pytest.raises(VerificationError, match=f"signed by key id {mitm.kid}"):
        c.completions.create(model="tiny", prompt="Hi", max_tokens=1)
    assert set(vt.replicas) == {envs["s1"].identity.kid, envs["s2"].identity.kid}  # genuine, attested in full
    assert vt.verified_responses == 0


def test_the_number_of_replicas_is_bounded():
    envs, lb = pool(3)
    vt = VerifyingTransport(URL, policy=POLICY, transport=lb, max_replicas=2)
    with oai(vt) as c:  # the attestation goes to s1, then the answers: s2 (attested), s3 (one too many)
        assert call(c, 1) == EXPECTED[1]
        with pytest.raises(VerificationError, match="more than 2 replicas"):
            call(c, 1)
    assert set(vt.replicas) == {envs["s1"].identity.kid, envs["s2"].identity.kid} and vt.attestations == 2


def test_a_given_appliance_without_a_policy_cannot_attest_others():
    envs, lb = pool(2)
    first = attest(URL, policy=POLICY, http=lb, route="s1")  # routed: the round-robin has not moved
    vt = VerifyingTransport(appliance=first, transport=lb)
    with oai(vt) as c:
        assert c.completions.create(model="tiny", prompt="Hi", max_tokens=1).choices[0].text == "Hello"  # s1
        with pytest.raises(VerificationError, match="no policy"):
            c.completions.create(model="tiny", prompt="Hi", max_tokens=1)  # s2
    assert vt.verified_responses == 1 and list(vt.replicas) == [first.kid] and vt.attestations == 0


# ---------------------------------------------------------------------------------------------
# The pieces


def test_attest_sends_the_route_and_records_the_one_answered():
    envs, lb = pool(3)
    a = attest(URL, policy=POLICY, http=lb, route="s3")
    assert a.kid == envs["s3"].identity.kid and a.route == "s3"
    assert lb.log == [("s3", "/v1/attestation", "s3")]
    with pytest.raises(ValueError, match="route"):
        attest(URL, policy=POLICY, http=lb, route="s1, s2")


def test_an_attestation_failure_without_a_route_is_a_plain_attestation_failure():
    env = impostor()
    with pytest.raises(AttestationFailed) as info:
        attest(URL, policy=POLICY, http=env.wsgi)
    assert not isinstance(info.value, ReplicaAttestationFailed)


@pytest.mark.parametrize(("headers", "kid"), [
    ({"Signature": "appliance=:AA==:", "Signature-Input": 'appliance=("@status");keyid="k1";alg="ed25519"'}, "k1"),
    ({"signature": "x=:AA==:, appliance=:AA==:", "signature-input": 'x=();keyid="a", appliance=();keyid="k2"'}, "k2"),
    ({"Signature-Input": 'appliance=("@status");keyid="k1"'}, None),  # no Signature
    ({"Signature": "appliance=:AA==:", "Signature-Input": 'other=("@status");keyid="k1"'}, None),
    ({"Signature": "appliance=:AA==:", "Signature-Input": "appliance=(("}, None),
    ({"Signature": "appliance=:AA==:", "Signature-Input": "appliance=1;keyid=2"}, None),
    ({"Signature": "appliance=:AA==:", "Signature-Input": 'appliance=();keyid="é"'}, None),
    ({}, None),
])
def test_response_key_id(headers, kid):
    assert response_key_id(headers) == kid


@pytest.mark.parametrize(("value", "route"), [
    ("s1", "s1"), (" replica-2.zone_a ", "replica-2.zone_a"), ("s1, s2", None), ("", None), ("a b", None),
    ("x" * 129, None), ("s1\r\nx: y", None),
])
def test_response_route(value, route):
    assert response_route({"Appliance-Route": value}) == route
    assert response_route({}) is None
