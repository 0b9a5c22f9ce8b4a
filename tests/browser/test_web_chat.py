"""The web chat in a real Chromium against a real appliance (simulated attestation, real llama.cpp).

What the page must do, seen from the browser: load under its strict CSP with no violation, attest
the appliance (the simulated provider shown as SIMULATED, the UI digest it was served equal to the
claimed one), stream answers and mark each **Verified** only when the signature, the chain and the
final signed line check out; edit-and-resend, regenerate, the model picker and dark mode work; through
a proxy that alters one byte of a streamed event the answer is **Not verified**; and in an insecure
context (no `crypto.subtle`) the pure-JS path still verifies.

`APPLIANCE_SCREENSHOTS=1` also writes docs/screenshots/chat-light.png and chat-dark.png.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

import pytest
import requests
from tamper_proxy import TamperingProxy

from appliance.web.resources.ui import PAGE_CSP
from attestation.signing import RequestInfo, public_key_from_b64, verify_response

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CSP_WATCH = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""
ANSWER_TIMEOUT_MS = 120_000
MAX_TOKENS = "40"


def open_chat(context, url: str):
    page = context.new_page()
    page.bring_to_front()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.add_init_script(CSP_WATCH)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)
    page.fill("#max-tokens", MAX_TOKENS)  # the test model babbles until its context is full otherwise
    page.console_log = console  # type: ignore[attr-defined]
    return page


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_answer(page, index: int):
    """The badge of the assistant message at `index`, once its verification has settled."""
    badge = page.locator(f'.message.assistant[data-index="{index}"] .badge')
    badge.wait_for(timeout=ANSWER_TIMEOUT_MS)
    page.wait_for_function(
        f"""() => {{ const b = document.querySelector('.message.assistant[data-index="{index}"] .badge');
                    return b && b.dataset.state !== "pending"; }}""",
        timeout=ANSWER_TIMEOUT_MS, polling=100,  # by interval: requestAnimationFrame stalls in a background tab
    )
    return badge


def csp_violations(page) -> list[str]:
    found = list(page.evaluate("window.__csp"))
    found += [m for m in page.console_log if "Content Security Policy" in m or "Content-Security-Policy" in m]
    return found


@pytest.fixture(scope="module")
def browser(browser_factory):
    return browser_factory()


def test_page_is_served_signed_with_a_strict_csp_and_its_digest_is_attested(chat_server):
    key = public_key_from_b64(requests.get(chat_server.url + "/v1/keys", timeout=10).json()["public_key"])
    r = requests.get(chat_server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert r.headers["Content-Security-Policy"] == PAGE_CSP
    assert "'unsafe-inline'" not in PAGE_CSP
    verify_response(key, request=RequestInfo("GET", "/"), status=200, headers=dict(r.headers), body=r.content)
    manifest = requests.get(chat_server.url + "/ui/manifest.json", timeout=10)
    assert manifest.status_code == 200
    files = json.loads(manifest.content)["files"]
    assert set(files) == {"index.html", "app.js", "app.css"}
    for name, entry in files.items():
        served = requests.get(f"{chat_server.url}/ui/{name}", timeout=10).content
        assert hashlib.sha256(served).hexdigest() == entry["sha256"]
        assert served == (ROOT / "appliance" / "web" / "ui" / name).read_bytes()
    assert r.content == requests.get(chat_server.url + "/ui/index.html", timeout=10).content
    for name in ("nope.js", "..%2Fresources%2Fui.py", "__init__.py"):
        assert requests.get(f"{chat_server.url}/ui/{name}", timeout=10).status_code == 404
    nonce = secrets.token_hex(32)
    doc = requests.get(chat_server.url + "/v1/attestation", params={"nonce": nonce}, timeout=30).json()
    assert doc["claims"]["ui_sha256"] == hashlib.sha256(manifest.content).hexdigest()


def test_chat_streams_a_verified_answer(chat_server, browser):
    page = open_chat(browser, chat_server.url)
    assert page.evaluate("window.isSecureContext") is True
    panel = page.locator("#attestation")
    assert panel.get_attribute("data-state") == "simulated"
    assert panel.get_attribute("data-ui-match") == "true"
    assert "SIMULATED" in page.text_content("#attestation-summary")
    assert "appliance verify" in panel.text_content()
    assert page.eval_on_selector_all("#model-picker option", "os => os.map(o => o.value)") == ["m"]

    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    page.type("#input", "second line")
    assert page.input_value("#input") == "first line\nsecond line"
    assert page.locator(".message").count() == 0  # Shift+Enter did not send
    page.press("#input", "Enter")
    badge = wait_answer(page, 1)
    assert badge.text_content() == "Verified", badge.text_content()
    assert badge.get_attribute("data-engine") == "webcrypto"
    assert page.text_content('.message.user[data-index="0"] .content') == "first line\nsecond line"
    assert page.text_content('.message.assistant[data-index="1"] .content').strip()
    assert page.locator("#conversations li").count() == 1
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert page.evaluate("document.cookie") == ""
    assert csp_violations(page) == []


def test_edit_resend_and_regenerate(chat_server, browser):
    page = open_chat(browser, chat_server.url)
    send(page, "Name a colour.")
    assert wait_answer(page, 1).text_content() == "Verified"
    send(page, "And a fruit.")
    assert wait_answer(page, 3).text_content() == "Verified"
    assert page.locator(".message").count() == 4

    page.click('.message.user[data-index="0"] .edit')
    page.fill('.message.user[data-index="0"] textarea', "Name a planet.")
    page.click('.message.user[data-index="0"] button:has-text("Save & send")')
    assert wait_answer(page, 1).text_content() == "Verified"
    assert page.locator(".message").count() == 2  # everything after the edited message is gone
    assert page.text_content('.message.user[data-index="0"] .content') == "Name a planet."

    page.click("#regenerate")
    assert wait_answer(page, 1).text_content() == "Verified"
    assert page.locator(".message").count() == 2
    assert csp_violations(page) == []


def test_dark_mode_toggle(chat_server, browser):
    page = open_chat(browser, chat_server.url)
    page.emulate_media(color_scheme="light")
    send(page, "Show a Python function that adds two numbers, in a code block.")
    assert wait_answer(page, 1).text_content() == "Verified"
    background = "getComputedStyle(document.body).backgroundColor"
    light = page.evaluate(background)
    shots = os.environ.get("APPLIANCE_SCREENSHOTS") == "1"
    if shots:
        (ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
        page.click("#attestation-toggle")
        page.screenshot(path=str(ROOT / "docs" / "screenshots" / "chat-light.png"))
    page.click("#theme-toggle")
    dark = page.evaluate(background)
    assert light == "rgb(255, 255, 255)" and dark == "rgb(13, 17, 23)", (light, dark)
    if shots:
        page.screenshot(path=str(ROOT / "docs" / "screenshots" / "chat-dark.png"))
    page.click("#theme-toggle")
    assert page.evaluate(background) == light
    # With no explicit choice, the page follows the system's preference.
    page.evaluate("delete document.documentElement.dataset.theme")
    page.emulate_media(color_scheme="dark")
    assert page.evaluate(background) == dark
    assert csp_violations(page) == []


def test_an_altered_stream_is_not_verified(chat_server, browser):
    proxy = TamperingProxy(chat_server.port)
    try:
        page = open_chat(browser, f"http://127.0.0.1:{proxy.port}")
        assert page.locator("#attestation").get_attribute("data-state") == "simulated"  # attestation is untouched
        send(page, "Count to five.")
        badge = wait_answer(page, 1)
        text = badge.text_content()
        assert proxy.tampered == 1
        assert text.startswith("Not verified: stream:") and "does not match the events before it" in text, text
        assert page.text_content('.message.assistant[data-index="1"] .content').strip()  # shown, but not verified
    finally:
        proxy.close()


def test_insecure_context_verifies_with_pure_js(chat_server, browser_factory):
    context = browser_factory("--host-resolver-rules=MAP appliance.test 127.0.0.1")
    page = open_chat(context, f"http://appliance.test:{chat_server.port}")
    assert page.evaluate("window.isSecureContext") is False
    assert page.evaluate("typeof crypto.subtle") == "undefined"
    assert page.locator("#attestation").get_attribute("data-state") == "simulated"
    assert page.locator("#attestation").get_attribute("data-ui-match") == "true"
    send(page, "Say hello.")
    badge = wait_answer(page, 1)
    assert badge.text_content() == "Verified", badge.text_content()
    assert badge.get_attribute("data-engine") == "pure-js"
    assert csp_violations(page) == []


def test_api_key_is_asked_for_and_kept_in_memory(start_server, model_files, browser):
    key = secrets.token_urlsafe(24)
    config = CHAT_KEYED.format(sha256=hashlib.sha256(key.encode()).hexdigest())
    keyed = start_server(models={"m": model_files.main}, config=config, name="webchat-keyed")
    assert requests.get(keyed.url + "/", timeout=10).status_code == 200  # the page itself is public
    assert requests.get(keyed.url + "/v1/models", timeout=10).status_code == 401
    page = browser.new_page()
    page.bring_to_front()
    page.add_init_script(CSP_WATCH)
    page.console_log = []  # type: ignore[attr-defined]
    page.goto(keyed.url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)
    assert page.is_visible("#apikey")
    page.fill("#apikey-input", key)
    page.click("#apikey-form button")
    page.wait_for_function("() => document.querySelectorAll('#model-picker option').length === 1", timeout=30_000, polling=100)
    assert page.is_hidden("#apikey")
    page.fill("#max-tokens", MAX_TOKENS)
    send(page, "Hello.")
    # The answer's signature covers appliance-client (the key's name): the page requires it.
    assert wait_answer(page, 1).text_content() == "Verified"
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert csp_violations(page) == []


CHAT_KEYED = """
[attestation]
provider = "simulated"
rate_per_minute = 0

[[auth.api_keys]]
name = "browser"
sha256 = "{sha256}"
scopes = ["inference"]
"""
