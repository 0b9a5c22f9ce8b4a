// The web chat. State lives in this page's memory only: no cookies, localStorage or IndexedDB.
import { Marked } from "marked";
import DOMPurify from "dompurify";
import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import c from "highlight.js/lib/languages/c";
import cpp from "highlight.js/lib/languages/cpp";
import go from "highlight.js/lib/languages/go";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import python from "highlight.js/lib/languages/python";
import rust from "highlight.js/lib/languages/rust";
import sql from "highlight.js/lib/languages/sql";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";
import { engine, hex, randomHex, sha256, unb64, utf8 } from "./crypto.js";
import { SentRequest, StreamVerifier, VerificationError, checkAttestation, verifyResponse } from "./verify.js";

for (const [name, lang] of Object.entries({ bash, c, cpp, go, javascript, json, python, rust, sql, typescript, xml, yaml })) {
  hljs.registerLanguage(name, lang);
}
const marked = new Marked({ gfm: true, breaks: false });
const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const state = {
  apiKey: null, // memory only
  trust: null, // {publicKey, attested, simulated, error}
  conversations: [],
  current: null,
  busy: null, // the AbortController of the answer being generated
};

// ---------------------------------------------------------------------------------------------
// Signed requests: every answer is checked against the key the attestation bound.

async function signedFetch(method, target, bodyObj, { signal } = {}) {
  const body = bodyObj === undefined ? new Uint8Array(0) : utf8(JSON.stringify(bodyObj));
  const nonce = randomHex(16);
  const headers = { "appliance-nonce": nonce };
  if (bodyObj !== undefined) headers["content-type"] = "application/json";
  if (state.apiKey) headers.authorization = `Bearer ${state.apiKey}`;
  const resp = await fetch(target, { method, headers, body: bodyObj === undefined ? undefined : body, signal, cache: "no-store", credentials: "omit" });
  return { resp, request: new SentRequest(method, target, body, nonce) };
}

async function fetchVerifiedJson(target, publicKey) {
  const { resp, request } = await signedFetch("GET", target);
  const body = new Uint8Array(await resp.arrayBuffer());
  if (publicKey) await verifyResponse(publicKey, request, resp.status, resp.headers, body);
  return { status: resp.status, json: JSON.parse(new TextDecoder().decode(body)) };
}

// ---------------------------------------------------------------------------------------------
// Attestation

async function attest() {
  const panel = $("attestation");
  const nonce = randomHex(32);
  const manifestBytes = new Uint8Array(await (await fetch("/ui/manifest.json", { cache: "no-store" })).arrayBuffer());
  const servedUi = hex(await sha256(manifestBytes));
  let trust;
  try {
    const keysResp = await signedFetch("GET", "/v1/keys");
    const keysBody = new Uint8Array(await keysResp.resp.arrayBuffer());
    const keys = JSON.parse(new TextDecoder().decode(keysBody));
    const { resp, request } = await signedFetch("GET", `/v1/attestation?nonce=${nonce}`);
    const docBytes = new Uint8Array(await resp.arrayBuffer());
    if (resp.status === 503) {
      // No attestation on this appliance: the key is only what /v1/keys says (trust on first use).
      const pk = unb64(keys.public_key);
      await verifyResponse(pk, keysResp.request, keysResp.resp.status, keysResp.resp.headers, keysBody);
      trust = { publicKey: pk, attested: false, simulated: false, claims: null, factors: [["attestation", "skip", "disabled on this appliance: the key comes from /v1/keys only"]] };
    } else {
      const doc = JSON.parse(new TextDecoder().decode(docBytes));
      const result = await checkAttestation(doc, nonce, keys);
      // The attestation document and the key set were themselves signed with the attested key.
      await verifyResponse(result.publicKey, request, resp.status, resp.headers, docBytes);
      await verifyResponse(result.publicKey, keysResp.request, keysResp.resp.status, keysResp.resp.headers, keysBody);
      result.factors.push(["response-signature", "pass", "the attestation response is signed by the attested key, bound to this nonce"]);
      trust = { ...result, attested: true, provider: doc.provider, format: doc.format };
    }
  } catch (e) {
    trust = { publicKey: null, attested: false, error: e instanceof VerificationError ? e.message : `attestation: ${e.message}` };
  }
  trust.servedUi = servedUi;
  trust.manifest = manifestBytes;
  state.trust = trust;
  renderAttestation(panel, trust);
}

function renderAttestation(panel, t) {
  panel.replaceChildren();
  panel.append(el("h2", "", "Attestation"));
  const summary = $("attestation-summary");
  if (t.error) {
    summary.textContent = "FAILED";
    summary.className = "fail";
    panel.append(el("p", "fail", `Not verified: ${t.error}. Answers cannot be verified.`));
  } else if (!t.attested) {
    summary.textContent = "not attested";
    summary.className = "skip";
    panel.append(el("p", "skip", "This appliance serves no attestation: answers are checked against the key from /v1/keys only."));
  } else {
    summary.textContent = t.simulated ? "SIMULATED" : `${t.provider} (browser checks only)`;
    summary.className = t.simulated ? "simulated" : "pass";
    if (t.simulated) {
      panel.append(el("p", "simulated", "SIMULATED: no TEE. This proves the binding of the signing key to these claims only, nothing about a TEE."));
    }
    panel.append(el("p", "", "The TEE quote's certificate chain is not verified in the browser: use `appliance verify` for the full check."));
  }
  const table = el("table");
  const row = (k, v, cls) => {
    const tr = el("tr");
    tr.append(el("td", "", k), el("td", cls || "", v));
    table.append(tr);
  };
  if (t.claims) {
    row("provider", `${t.provider} (${t.format})`, t.simulated ? "simulated" : "");
    row("binary", `${t.claims.binary.kind} sha256 ${t.claims.binary.sha256}`);
    for (const m of t.claims.models || []) row(`model ${m.name}`, `sha256 ${m.sha256}`);
    row("signing key", t.claims.signing_key.kid);
    row("UI claimed", t.claims.ui_sha256 || "(not claimed)");
  }
  const uiMatch = t.claims && t.claims.ui_sha256 === t.servedUi;
  row("UI served", `${t.servedUi}${t.claims ? (uiMatch ? "  (matches the claim)" : "  (DIFFERS from the claim)") : ""}`,
    t.claims ? (uiMatch ? "pass" : "fail") : "");
  for (const [name, status, detail] of t.factors || []) row(name, `${status}: ${detail}`, status);
  row("crypto", engine() === "webcrypto" ? "WebCrypto (Ed25519, SHA-2)" : "pure JavaScript (@noble), no crypto.subtle here");
  panel.append(table);
  panel.dataset.state = t.error ? "failed" : t.attested ? (t.simulated ? "simulated" : "attested") : "unattested";
  panel.dataset.uiMatch = String(Boolean(uiMatch));
}

// ---------------------------------------------------------------------------------------------
// Models

async function loadModels() {
  const picker = $("model-picker");
  const { resp, request } = await signedFetch("GET", "/v1/models");
  const body = new Uint8Array(await resp.arrayBuffer());
  if (resp.status === 401) {
    $("apikey").hidden = false;
    return;
  }
  $("apikey").hidden = true;
  if (state.trust && state.trust.publicKey) {
    try {
      await verifyResponse(state.trust.publicKey, request, resp.status, resp.headers, body);
      picker.title = "model list verified";
    } catch (e) {
      picker.title = `model list not verified: ${e.message}`;
    }
  }
  const list = JSON.parse(new TextDecoder().decode(body));
  const current = picker.value;
  picker.replaceChildren(...(list.data || []).map((m) => { const o = el("option", "", m.id); o.value = m.id; return o; }));
  if (current) picker.value = current;
}

// ---------------------------------------------------------------------------------------------
// Conversations (memory only)

function newConversation() {
  const conv = { id: randomHex(8), title: "New chat", messages: [] };
  state.conversations.unshift(conv);
  state.current = conv;
  render();
}

function renderConversations() {
  const ul = $("conversations");
  ul.replaceChildren(...state.conversations.map((conv) => {
    const li = el("li", conv === state.current ? "current" : "", conv.title);
    li.addEventListener("click", () => { if (!state.busy) { state.current = conv; render(); } });
    return li;
  }));
}

function renderMarkdown(target, text) {
  const html = DOMPurify.sanitize(marked.parse(text), { FORBID_ATTR: ["style"], FORBID_TAGS: ["style", "form"] });
  target.innerHTML = html;
  for (const block of target.querySelectorAll("pre code")) {
    const lang = [...block.classList].find((k) => k.startsWith("language-"));
    if (!lang || hljs.getLanguage(lang.slice(9))) hljs.highlightElement(block);
  }
}

function messageNode(conv, msg, index) {
  const node = el("div", `message ${msg.role}`);
  node.dataset.index = String(index);
  const head = el("div", "role", msg.role === "user" ? "You" : "Assistant");
  node.append(head);
  const content = el("div", "content");
  node.append(content);
  if (msg.role === "user") {
    content.textContent = msg.content;
    const edit = el("button", "linkish edit", "Edit");
    edit.type = "button";
    edit.addEventListener("click", () => startEdit(conv, index, node));
    head.append(edit);
  } else {
    renderMarkdown(content, msg.content);
    const badge = el("span", "badge");
    msg.badge = badge;
    setBadge(msg);
    head.append(badge);
  }
  msg.node = node;
  msg.contentNode = content;
  return node;
}

function setBadge(msg) {
  const b = msg.badge;
  if (!b) return;
  const v = msg.verification;
  if (v.state === "verified") {
    b.className = "badge verified";
    b.textContent = "Verified";
  } else if (v.state === "pending") {
    b.className = "badge pending";
    b.textContent = "Verifying…";
  } else {
    b.className = "badge unverified";
    b.textContent = `Not verified: ${v.reason}`;
  }
  b.title = v.detail || "";
  b.dataset.state = v.state;
  b.dataset.engine = v.engine || "";
}

function render() {
  renderConversations();
  const box = $("messages");
  const conv = state.current;
  box.replaceChildren(...conv.messages.map((m, i) => messageNode(conv, m, i)));
  const last = conv.messages[conv.messages.length - 1];
  $("regenerate").hidden = Boolean(state.busy) || !last || last.role !== "assistant";
  box.scrollTop = box.scrollHeight;
}

function startEdit(conv, index, node) {
  if (state.busy) return;
  const msg = conv.messages[index];
  const area = el("textarea");
  area.value = msg.content;
  area.rows = 3;
  const send = el("button", "", "Save & send");
  send.type = "button";
  const cancel = el("button", "", "Cancel");
  cancel.type = "button";
  const content = node.querySelector(".content");
  content.replaceChildren(area, send, cancel);
  area.focus();
  cancel.addEventListener("click", render);
  send.addEventListener("click", () => {
    const text = area.value.trim();
    if (!text) return;
    conv.messages.splice(index); // the edited message and everything after it
    conv.messages.push({ role: "user", content: text });
    generate(conv);
  });
}

// ---------------------------------------------------------------------------------------------
// Generating one answer, verified as it streams

async function generate(conv) {
  const model = $("model-picker").value;
  const history = conv.messages.map((m) => ({ role: m.role, content: m.content }));
  const request = { model, messages: history, stream: true };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) request.max_tokens = maxTokens;
  const msg = { role: "assistant", content: "", verification: { state: "pending" } };
  conv.messages.push(msg);
  if (conv.title === "New chat") conv.title = history[history.length - 1].content.slice(0, 40);
  const controller = new AbortController();
  state.busy = controller;
  $("stop").hidden = false;
  $("send").disabled = true;
  render();
  const v = (stateName, reason, detail) => {
    msg.verification = { state: stateName, reason, detail, engine: engine() };
    setBadge(msg);
  };
  let redraw = 0;
  try {
    const { resp, request: sent } = await signedFetch("POST", "/v1/chat/completions",
      request, { signal: controller.signal });
    const key = state.trust && state.trust.publicKey;
    if (resp.status === 401) $("apikey").hidden = false;
    if (!(resp.headers.get("content-type") || "").startsWith("text/event-stream")) {
      const body = new Uint8Array(await resp.arrayBuffer());
      let text;
      try { text = JSON.parse(new TextDecoder().decode(body)).error.message; } catch { text = `HTTP ${resp.status}`; }
      msg.content = `**Error ${resp.status}:** ${text}`;
      renderMarkdown(msg.contentNode, msg.content);
      if (!key) throw new VerificationError(state.trust && state.trust.error ? state.trust.error : "no trusted key");
      await verifyResponse(key, sent, resp.status, resp.headers, body);
      v("verified", "", "an error answer, signed by the attested key");
      return;
    }
    const onEvent = (text) => {
      if (!text.startsWith("data: ")) return;
      let chunk;
      try { chunk = JSON.parse(text.slice(6)); } catch { return; }
      if (chunk.error) msg.content += `\n\n**Error:** ${chunk.error.message}`;
      for (const ch of chunk.choices || []) if (ch.index === 0 && ch.delta && ch.delta.content) msg.content += ch.delta.content;
      if (!redraw) redraw = setTimeout(() => { redraw = 0; renderMarkdown(msg.contentNode, msg.content); }, 60);
    };
    // Shown as it arrives, marked "Verifying…" until the final signed line checks out.
    const verifier = key ? new StreamVerifier(key, sent, resp.status, resp.headers, onEvent) : null;
    let headerError = null;
    if (verifier) {
      try { await verifier.start(); } catch (e) { headerError = e; }
    }
    const reader = resp.body.getReader();
    let streamError = headerError;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (verifier && !streamError) {
        try { await verifier.push(value); } catch (e) { streamError = e; }
      } else {
        // Unverifiable: still show the text, never "Verified".
        fallbackParse(value, onEvent, msg);
      }
    }
    clearTimeout(redraw);
    renderMarkdown(msg.contentNode, msg.content);
    if (!verifier) throw new VerificationError(state.trust && state.trust.error ? state.trust.error : "no trusted key");
    if (streamError) throw streamError;
    const result = verifier.finish();
    v("verified", "", `signature, ${result.seq} chained events, ${result.checkpoints} checkpoints and the final signed line (finish: ${result.finishReason})`);
  } catch (e) {
    clearTimeout(redraw);
    if (e.name === "AbortError") {
      renderMarkdown(msg.contentNode, msg.content);
      v("unverified", "stopped before the signed end of the stream");
    } else if (e instanceof VerificationError) {
      v("unverified", e.message);
    } else {
      v("unverified", `request failed (${e.message})`);
    }
  } finally {
    state.busy = null;
    $("stop").hidden = true;
    $("send").disabled = false;
    const last = conv.messages[conv.messages.length - 1];
    $("regenerate").hidden = conv !== state.current || !last || last.role !== "assistant";
    renderConversations();
  }
}

const fallbackBuffers = new WeakMap();
function fallbackParse(bytes, onEvent, msg) {
  const prev = fallbackBuffers.get(msg) || "";
  const text = prev + new TextDecoder().decode(bytes, { stream: true });
  const parts = text.split("\n\n");
  fallbackBuffers.set(msg, parts.pop());
  for (const p of parts) onEvent(`${p}\n\n`);
}

function send() {
  const input = $("input");
  const text = input.value.trim();
  if (!text || state.busy) return;
  input.value = "";
  state.current.messages.push({ role: "user", content: text });
  generate(state.current);
}

// ---------------------------------------------------------------------------------------------
// Wiring

function toggleTheme() {
  const root = document.documentElement;
  const dark = root.dataset.theme ? root.dataset.theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
  root.dataset.theme = dark ? "light" : "dark";
  $("theme-toggle").textContent = dark ? "Dark mode" : "Light mode";
}

async function main() {
  if (matchMedia("(prefers-color-scheme: dark)").matches) $("theme-toggle").textContent = "Light mode";
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => state.busy && state.busy.abort());
  $("regenerate").addEventListener("click", () => {
    const conv = state.current;
    if (state.busy || !conv.messages.length || conv.messages[conv.messages.length - 1].role !== "assistant") return;
    conv.messages.pop();
    generate(conv);
  });
  $("new-chat").addEventListener("click", () => { if (!state.busy) newConversation(); });
  $("theme-toggle").addEventListener("click", toggleTheme);
  $("about-toggle").addEventListener("click", () => { $("about").hidden = !$("about").hidden; });
  $("attestation-toggle").addEventListener("click", () => { $("attestation").hidden = !$("attestation").hidden; });
  $("apikey-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.apiKey = $("apikey-input").value || null;
    $("apikey-input").value = "";
    loadModels();
  });
  newConversation();
  await attest();
  await loadModels();
  document.body.dataset.ready = "true";
}

main();
