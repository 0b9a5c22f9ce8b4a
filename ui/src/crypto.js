// The one door to the crypto primitives: WebCrypto where the page has it (a secure context), else
// the audited pure-JS @noble implementations. Callers never touch either directly.
import * as ed from "@noble/ed25519";
import { sha256 as nobleSha256, sha512 as nobleSha512 } from "@noble/hashes/sha2.js";

ed.hashes.sha512 = nobleSha512;

const subtle = globalThis.crypto && globalThis.crypto.subtle ? globalThis.crypto.subtle : null;
let webEd25519 = subtle !== null; // cleared if this browser's WebCrypto has no Ed25519

export const utf8 = (s) => new TextEncoder().encode(s);

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

export function b64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

export function b64url(bytes) {
  return b64(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function unb64(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) {
    throw new Error("not base64");
  }
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

export const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

export function randomHex(n) {
  const b = new Uint8Array(n);
  globalThis.crypto.getRandomValues(b); // available in insecure contexts too
  return hex(b);
}

export async function sha256(bytes) {
  return subtle ? new Uint8Array(await subtle.digest("SHA-256", bytes)) : nobleSha256(bytes);
}

export async function sha512(bytes) {
  return subtle ? new Uint8Array(await subtle.digest("SHA-512", bytes)) : nobleSha512(bytes);
}

/** Ed25519 (RFC 8032) verification: true or false, never throws for a bad signature. */
export async function ed25519Verify(publicKey, signature, message) {
  if (publicKey.length !== 32 || signature.length !== 64) return false;
  if (webEd25519) {
    try {
      const key = await subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
      return await subtle.verify({ name: "Ed25519" }, key, signature, message);
    } catch (e) {
      if (e && e.name !== "NotSupportedError") return false;
      webEd25519 = false; // no Ed25519 in this WebCrypto: use the pure-JS path from now on
    }
  }
  try {
    return ed.verify(signature, message, publicKey, { zip215: false });
  } catch {
    return false;
  }
}

/** Which implementation verifies signatures here: "webcrypto" or "pure-js". */
export const engine = () => (webEd25519 ? "webcrypto" : "pure-js");

/** Constant-time comparison of two strings (digests, key ids). */
export function same(a, b) {
  if (typeof a !== "string" || typeof b !== "string" || a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return d === 0;
}
