// In-browser verification, ported from the Python reference (attestation/signing.py, claims.py,
// verify.py; spec/signing.md and spec/attestation.md). Every check throws VerificationError naming
// what failed; nothing returns "false" to be forgotten.
import { b64, b64url, concat, ed25519Verify, hex, same, sha256, sha512, unb64, utf8 } from "./crypto.js";

export class VerificationError extends Error {}
const fail = (msg) => { throw new VerificationError(msg); };

const LABEL = "appliance";
const TAG = "appliance-v1";
const CHAIN_DOMAIN = utf8("appliance-stream-v1\0");
const CHECKPOINT_DOMAIN = utf8("appliance-checkpoint-v1\0");
const FINAL_DOMAIN = utf8("appliance-final-v1\0");
const REQUEST_DOMAIN = utf8("appliance-request-v1\0");
const CLAIMS_DOMAIN = utf8("appliance-claims-v1\0");
const CHECKPOINT_PREFIX = ": appliance-checkpoint ";
const FINAL_PREFIX = ": appliance-final ";
const DONE = "data: [DONE]\n\n";

export const keyId = async (raw) => b64url(await sha256(raw));
export const contentDigest = async (body) => `sha-256=:${b64(await sha256(body))}:`;

/** Python's json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True). */
export function canonicalJson(value) {
  const walk = (v) => {
    if (v === null || typeof v !== "object") return JSON.stringify(v);
    if (Array.isArray(v)) return `[${v.map(walk).join(",")}]`;
    const keys = Object.keys(v).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)); // code unit order = Python's for BMP keys
    return `{${keys.map((k) => `${JSON.stringify(k)}:${walk(v[k])}`).join(",")}}`;
  };
  return walk(value).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

// ---------------------------------------------------------------------------------------------
// RFC 8941 dictionaries, as far as Signature-Input and Signature need them. Each member keeps the
// exact text of its value: RFC 9421 rebuilds @signature-params from the field as received.

function parseDictionary(text) {
  const members = new Map();
  let i = 0;
  const ws = () => { while (text[i] === " " || text[i] === "\t") i++; };
  const key = () => {
    const m = /^[a-z*][a-z0-9_\-.*]*/.exec(text.slice(i));
    if (!m) fail("signature: malformed structured field");
    i += m[0].length;
    return m[0];
  };
  const bare = () => {
    const rest = text.slice(i);
    let m;
    if ((m = /^"((?:[^"\\]|\\["\\])*)"/.exec(rest))) { i += m[0].length; return m[1].replace(/\\(["\\])/g, "$1"); }
    if ((m = /^:([A-Za-z0-9+/=]*):/.exec(rest))) { i += m[0].length; return { bytes: m[1] }; }
    if ((m = /^-?[0-9]{1,15}(?![.0-9])/.exec(rest))) { i += m[0].length; return Number(m[0]); }
    if ((m = /^\?[01]/.exec(rest))) { i += m[0].length; return m[0] === "?1"; }
    if ((m = /^[A-Za-z*][A-Za-z0-9:/!#$%&'*+\-.^_`|~]*/.exec(rest))) { i += m[0].length; return { token: m[0] }; }
    fail("signature: malformed structured field value");
  };
  const params = () => {
    const out = {};
    while (text[i] === ";") {
      i++; ws();
      const k = key();
      if (text[i] === "=") { i++; out[k] = bare(); } else out[k] = true;
    }
    return out;
  };
  ws();
  while (i < text.length) {
    const k = key();
    const start = i + 1;
    let value;
    if (text[i] !== "=") fail("signature: malformed structured field");
    i++;
    if (text[i] === "(") {
      i++;
      const items = [];
      for (;;) {
        while (text[i] === " ") i++;
        if (text[i] === ")") { i++; break; }
        if (i >= text.length) fail("signature: malformed inner list");
        items.push({ value: bare(), params: params() });
        if (text[i] !== " " && text[i] !== ")") fail("signature: malformed inner list");
      }
      value = { items };
    } else value = { item: bare() };
    value.params = params();
    value.raw = text.slice(start, i);
    if (members.has(k)) members.delete(k); // RFC 8941: the last one wins, in its place
    members.set(k, value);
    ws();
    if (i < text.length) {
      if (text[i] !== ",") fail("signature: malformed structured field");
      i++; ws();
    }
  }
  return members;
}

// ---------------------------------------------------------------------------------------------
// Responses (spec/signing.md §2)

/** What the response must answer: the request as this page sent it. */
export class SentRequest {
  constructor(method, target, body, nonce) {
    this.method = method.toUpperCase();
    this.target = target; // origin form; this page only sends well-formed targets
    this.body = body; // Uint8Array, exactly the bytes sent
    this.nonce = nonce; // the appliance-nonce header sent, or null
  }
  get path() { const q = this.target.indexOf("?"); return q < 0 ? this.target : this.target.slice(0, q); }
  get query() { const q = this.target.indexOf("?"); return q < 0 ? "?" : this.target.slice(q); }
  async bodyDigest() { return contentDigest(this.body); }
  /** The stream's final binding: b64(SHA-256("appliance-request-v1\0" || method \n target \n body digest \n nonce)). */
  async digest() {
    const parts = [this.method, this.target, await this.bodyDigest(), this.nonce || ""];
    return b64(await sha256(concat(REQUEST_DOMAIN, utf8(parts.join("\n")))));
  }
}

function requiredComponents({ streaming, hasNonce, hasClient }) {
  // This page never sends Content-Digest, so the body is bound by appliance-request-digest.
  const c = ['"@status"', '"content-type"', '"x-request-id"', streaming ? '"appliance-stream"' : '"content-digest"'];
  if (hasClient) c.push('"appliance-client"');
  c.push('"appliance-request-digest"', '"@method";req', '"@path";req', '"@query";req');
  if (hasNonce) c.push('"appliance-nonce";req');
  return c;
}

/**
 * Check the RFC 9421 header signature of a response against the key and the request sent.
 * `headers` is a fetch Headers object. Returns {created}.
 */
export async function verifyHeaders(publicKey, request, status, headers, { streaming }) {
  const sigInput = headers.get("signature-input");
  const sigField = headers.get("signature");
  if (sigInput === null || sigField === null) fail("signature: the response carries no Signature/Signature-Input");
  const inputs = parseDictionary(sigInput);
  const sigs = parseDictionary(sigField);
  const input = inputs.get(LABEL);
  const sig = sigs.get(LABEL);
  if (!input || !input.items || !sig || !sig.item || typeof sig.item.bytes !== "string") {
    fail("signature: no appliance signature");
  }
  const p = input.params;
  if (p.tag !== TAG) fail("signature: not an appliance-v1 signature");
  if (p.alg !== "ed25519") fail("signature: alg must be ed25519");
  if (!same(p.keyid, await keyId(publicKey))) fail("signature: keyid does not match the public key");
  if (!Number.isInteger(p.created)) fail("signature: created is required");

  const covered = input.items.map((it) => {
    if (typeof it.value !== "string") fail("signature: malformed component");
    const names = Object.keys(it.params);
    if (names.some((n) => n !== "req") || (it.params.req !== undefined && it.params.req !== true)) {
      fail("signature: unsupported component parameter");
    }
    return { name: it.value, req: it.params.req === true, id: `"${it.value}"${it.params.req ? ";req" : ""}` };
  });
  const required = requiredComponents({
    streaming, hasNonce: request.nonce !== null, hasClient: headers.get("appliance-client") !== null,
  });
  const ids = covered.map((c) => c.id);
  if (ids.length !== required.length || required.some((r) => !ids.includes(r)) || new Set(ids).size !== ids.length) {
    fail(`signature: covers ${ids.join(" ")}, expected ${required.join(" ")}`);
  }
  const lines = covered.map((c) => {
    let v;
    if (c.req) {
      if (c.name === "@method") v = request.method;
      else if (c.name === "@path") v = request.path;
      else if (c.name === "@query") v = request.query;
      else if (c.name === "appliance-nonce") v = request.nonce;
      else fail(`signature: cannot resolve ${c.id}`);
    } else if (c.name === "@status") v = String(status);
    else if (c.name.startsWith("@")) fail(`signature: cannot resolve ${c.id}`);
    else {
      v = headers.get(c.name);
      if (v === null) fail(`signature: covered field ${c.name} is missing`);
      v = v.trim();
    }
    return `${c.id}: ${v}`;
  });
  lines.push(`"@signature-params": ${input.raw}`);
  const base = utf8(lines.join("\n"));
  let signature;
  try { signature = unb64(sig.item.bytes); } catch { fail("signature: not base64"); }
  if (!(await ed25519Verify(publicKey, signature, base))) fail("signature: does not verify for this request and response");
  // The signed body binding must be the digest of the body this page sent.
  if (!same(headers.get("appliance-request-digest") || "", await request.bodyDigest())) {
    fail("appliance-request-digest: not the digest of the body sent (the response answers another request)");
  }
  return { created: p.created };
}

/** A complete (non-stream) response: header signature and Content-Digest over the body bytes. */
export async function verifyResponse(publicKey, request, status, headers, body) {
  const r = await verifyHeaders(publicKey, request, status, headers, { streaming: false });
  if (!same(headers.get("content-digest") || "", await contentDigest(body))) {
    fail("content-digest: the body does not match the signed digest");
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Streams (spec/signing.md §3): feed the bytes as they arrive; onEvent gets each chained event's
// text at once (shown as unverified until the final line checks out).

export class StreamVerifier {
  constructor(publicKey, request, status, headers, onEvent) {
    this.publicKey = publicKey;
    this.request = request;
    this.status = status;
    this.headers = headers;
    this.onEvent = onEvent;
    this.buffer = new Uint8Array(0);
    this.seq = 0;
    this.head = null;
    this.finalSeen = false;
    this.doneAfterFinal = false;
    this.checkpoints = 0;
    this.result = null;
  }

  async start() {
    await verifyHeaders(this.publicKey, this.request, this.status, this.headers, { streaming: true });
    if (this.headers.get("appliance-stream") !== "sha256-chain-v1") fail("stream: appliance-stream must be sha256-chain-v1");
    this.head = await sha256(concat(CHAIN_DOMAIN, utf8(this.headers.get("signature"))));
  }

  async push(chunk) {
    let from = Math.max(0, this.buffer.length - 1); // bytes before it were already searched
    this.buffer = this.buffer.length ? concat(this.buffer, chunk) : chunk;
    let start = 0;
    for (let i = from; i + 1 < this.buffer.length; i++) {
      if (this.buffer[i] === 10 && this.buffer[i + 1] === 10) {
        await this.event(this.buffer.subarray(start, i + 2));
        start = i + 2;
        i++;
      }
    }
    this.buffer = this.buffer.slice(start);
  }

  async event(bytes) {
    const text = new TextDecoder("utf-8", { fatal: false }).decode(bytes);
    if (this.doneAfterFinal) fail("stream: events after data: [DONE]");
    if (this.finalSeen) {
      if (text !== DONE) fail("stream: events after the final checkpoint other than data: [DONE]");
      this.doneAfterFinal = true;
      return;
    }
    if (text.startsWith(CHECKPOINT_PREFIX)) {
      const cp = jsonLine(text, CHECKPOINT_PREFIX, "checkpoint");
      if (cp.seq !== this.seq || cp.chain !== b64(this.head)) {
        fail(`stream: checkpoint after event ${this.seq} does not match the events before it`);
      }
      const seq = new Uint8Array(8);
      new DataView(seq.buffer).setBigUint64(0, BigInt(this.seq));
      await checkSig(this.publicKey, concat(CHECKPOINT_DOMAIN, seq, this.head), cp.sig, `checkpoint after event ${this.seq}`);
      this.checkpoints++;
    } else if (text.startsWith(FINAL_PREFIX)) {
      const fin = jsonLine(text, FINAL_PREFIX, "final checkpoint");
      const sig = fin.sig;
      delete fin.sig;
      const keys = Object.keys(fin).sort().join(",");
      if (keys !== "chain,finish_reason,request,seq,usage,v" || fin.seq !== this.seq || fin.chain !== b64(this.head)
          || fin.request !== (await this.request.digest())) {
        fail("stream: final checkpoint does not match the events or the request");
      }
      await checkSig(this.publicKey, concat(FINAL_DOMAIN, utf8(canonicalJson(fin))), sig, "final checkpoint");
      this.finalSeen = true;
      this.result = { seq: this.seq, finishReason: fin.finish_reason, usage: fin.usage, checkpoints: this.checkpoints };
    } else if (text === DONE) {
      fail("stream: data: [DONE] before the final checkpoint");
    } else {
      this.head = await sha256(concat(this.head, bytes));
      this.seq++;
      this.onEvent(text);
    }
  }

  /** The stream ended: everything must have checked out. */
  finish() {
    if (this.buffer.length) fail("stream: truncated (does not end with a complete event)");
    if (!this.finalSeen) fail("stream: truncated (no final checkpoint)");
    if (!this.doneAfterFinal) fail("stream: no data: [DONE] after the final checkpoint");
    return this.result;
  }
}

function jsonLine(text, prefix, what) {
  let obj;
  try { obj = JSON.parse(text.slice(prefix.length).trim()); } catch { fail(`stream: malformed ${what}`); }
  if (obj === null || typeof obj !== "object" || Array.isArray(obj) || obj.v !== 1) fail(`stream: unsupported ${what} version`);
  return obj;
}

async function checkSig(publicKey, payload, sigB64, what) {
  let sig;
  try { sig = unb64(sigB64 || ""); } catch { fail(`stream: bad signature on the ${what}`); }
  if (!(await ed25519Verify(publicKey, sig, payload))) fail(`stream: bad signature on the ${what}`);
}

// ---------------------------------------------------------------------------------------------
// Attestation (spec/attestation.md): the browser checks the binding of the claims to the evidence's
// report data, the nonce, and the key; it does NOT check a hardware quote's certificate chain.

// Where each format keeps its 64 bytes of report data (spec/attestation.md §4).
const REPORT_DATA_OFFSET = { "tdx-quote-v4": 0x238, "sev-snp-report": 0x50, "sgx-quote-v3": 0x170 };

/**
 * `doc`: the parsed /v1/attestation body; `nonce`: the 64 hex sent; `keys`: the parsed /v1/keys body.
 * Returns {claims, factors, publicKey, simulated}; factors are [name, "pass"|"fail"|"skip", detail].
 */
export async function checkAttestation(doc, nonce, keys) {
  const factors = [];
  const add = (name, status, detail) => factors.push([name, status, detail]);
  if (!doc || doc.version !== 1) fail("attestation: not an attestation document of version 1");
  let claimsBytes, evidence;
  try {
    claimsBytes = unb64(doc.claims_b64);
    evidence = unb64(doc.evidence_b64);
  } catch { fail("attestation: claims_b64 or evidence_b64 is not base64"); }
  if (claimsBytes.length > 65536 || evidence.length > 65536) fail("attestation: claims or evidence larger than 64 KiB");
  const expected = await sha512(concat(CLAIMS_DOMAIN, claimsBytes));
  const simulated = doc.format === "simulated-v1";
  let reportData = null;
  if (simulated) {
    let ev;
    try { ev = JSON.parse(new TextDecoder().decode(evidence)); } catch { fail("attestation: simulated evidence is not JSON"); }
    if (!ev || ev.simulated !== true || ev.format !== "simulated-v1") fail("attestation: not simulated-v1 evidence");
    reportData = typeof ev.report_data === "string" ? ev.report_data : "";
  } else if (doc.format in REPORT_DATA_OFFSET) {
    const at = REPORT_DATA_OFFSET[doc.format];
    if (evidence.length < at + 64) fail("attestation: evidence too short for its format");
    reportData = hex(evidence.subarray(at, at + 64));
  }
  if (reportData === null) {
    add("report-data", "skip", `${doc.format}: report data not located in the browser`);
  } else if (same(reportData, hex(expected))) {
    add("report-data", "pass", "the evidence's report data is SHA-512 over these claims");
  } else {
    fail("attestation: the evidence's report data does not match the claims");
  }
  add("evidence-signature", "skip", simulated
    ? "SIMULATED: no hardware signed this evidence"
    : "the TEE quote's signature and certificate chain are not verified in the browser: use `appliance verify` for the full check");

  const claimsText = new TextDecoder().decode(claimsBytes);
  let claims;
  try { claims = JSON.parse(claimsText); } catch { fail("attestation: claims are not JSON"); }
  if (!claims || claims.version !== 1) fail("attestation: unsupported claims version");
  if (canonicalJson(claims) !== claimsText) fail("attestation: claims are not in canonical form");
  add("claims", "pass", `appliance ${claims.appliance_version} (${claims.variant})`);
  if (!same(claims.nonce, nonce)) fail("attestation: the claims carry another nonce (replayed evidence?)");
  add("nonce", "pass", "the evidence answers this page's fresh nonce");
  if (claims.provider !== doc.provider) fail("attestation: claims name another provider than the document");

  const sk = claims.signing_key || {};
  let publicKey;
  try { publicKey = unb64(sk.public_key); } catch { fail("attestation: malformed signing public key"); }
  if (publicKey.length !== 32 || !same(await keyId(publicKey), sk.kid)) fail("attestation: the signing key's kid is not its digest");
  if (!keys || !same(keys.kid, sk.kid) || !same(keys.public_key, sk.public_key)) {
    fail("attestation: /v1/keys serves another key than the attested one");
  }
  add("signing-key", "pass", `kid ${sk.kid} is the attested key and the one /v1/keys serves`);
  return { claims, factors, publicKey, simulated };
}
