// Verification an auditor's browser does itself, trusting nothing the server says.
//
// RFC 8785 canonical JSON of an audit entry, RFC 6962 leaf and node hashes, the RFC 9162
// inclusion (2.1.3.2) and consistency (2.1.4.2) proof checks, and C2SP signed-note checkpoints
// with Ed25519 (c2sp.org/signed-note, c2sp.org/tlog-checkpoint). The same rules as the
// gateway's Python (gateway/audit/merkle.py, gateway/crypto/notes.py); tests/console runs
// this module under Node.js against proofs and checkpoints the Python side made.
//
// Everything here is pure: Web Crypto (browser or Node.js 20+) and no DOM.

export class VerifyError extends Error {
  constructor(message) {
    super(message);
    this.name = "VerifyError";
  }
}

const HASH_SIZE = 32;
const SIG_ED25519 = 0x01;
const SIG_COSIGNATURE_V1 = 0x04;
const MAX_TIMESTAMP = 2n ** 63n - 1n;
const DASH = "\u2014 ";
const encoder = new TextEncoder();

export function b64decode(text, what = "value") {
  if (typeof text !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) {
    throw new VerifyError(`${what} is not valid base64`);
  }
  let binary;
  try {
    binary = atob(text);
  } catch {
    throw new VerifyError(`${what} is not valid base64`);
  }
  const bytes = Uint8Array.from(binary, (ch) => ch.charCodeAt(0));
  if (b64encode(bytes) !== text) {
    throw new VerifyError(`${what} is not canonical base64`);
  }
  return bytes;
}

export function b64encode(bytes) {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

export function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function equal(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

// RFC 8785: ECMAScript number and string serialization (JSON.stringify's), object members
// sorted by the UTF-16 code units of their names (the default Array.prototype.sort order).
export function canonicalJson(value) {
  if (value === null || typeof value === "boolean" || typeof value === "string") {
    if (typeof value === "string" && /\p{Cs}/u.test(value)) {
      throw new VerifyError("a string holds a lone surrogate, which RFC 8785 does not allow");
    }
    return JSON.stringify(value);
  }
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new VerifyError("RFC 8785 has no form for NaN or Infinity");
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (typeof value === "object") {
    const names = Object.keys(value).sort();
    return `{${names.map((n) => `${canonicalJson(n)}:${canonicalJson(value[n])}`).join(",")}}`;
  }
  throw new VerifyError(`RFC 8785 has no form for a ${typeof value}`);
}

export async function leafHash(data) {
  return sha256(concat(Uint8Array.of(0x00), data));
}

export async function entryLeafHash(entry) {
  return leafHash(encoder.encode(canonicalJson(entry)));
}

export async function nodeHash(left, right) {
  return sha256(concat(Uint8Array.of(0x01), left, right));
}

function checkHash(value, what) {
  if (!(value instanceof Uint8Array) || value.length !== HASH_SIZE) {
    throw new VerifyError(`${what} is not a ${HASH_SIZE}-byte hash`);
  }
}

function checkSize(value, what) {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new VerifyError(`${what} must be a non-negative integer`);
  }
}

// Sizes stay below 2^53, so halving is done with arithmetic: JS bit operators are 32-bit.
const odd = (n) => n % 2 === 1;
const half = (n) => Math.floor(n / 2);

export async function verifyInclusion({ index, size, leaf, proof, root }) {
  checkSize(index, "leaf index");
  checkSize(size, "tree size");
  checkHash(leaf, "leaf hash");
  checkHash(root, "root hash");
  if (index >= size) throw new VerifyError(`leaf ${index} is not below the tree size ${size}`);
  proof.forEach((p, i) => checkHash(p, `inclusion proof element ${i}`));
  let fn = index;
  let sn = size - 1;
  let r = leaf;
  for (const p of proof) {
    if (sn === 0) throw new VerifyError(`inclusion proof of leaf ${index} is too long`);
    if (odd(fn) || fn === sn) {
      r = await nodeHash(p, r);
      if (!odd(fn)) {
        while (!odd(fn) && fn !== 0) {
          fn = half(fn);
          sn = half(sn);
        }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn = half(fn);
    sn = half(sn);
  }
  if (sn !== 0) throw new VerifyError(`inclusion proof of leaf ${index} is too short`);
  if (!equal(r, root)) {
    throw new VerifyError(`inclusion proof of leaf ${index} in tree size ${size} leads to another root`);
  }
}

export async function verifyConsistency({ oldSize, size, oldRoot, root, proof }) {
  checkSize(oldSize, "old tree size");
  checkSize(size, "tree size");
  checkHash(oldRoot, "old root hash");
  checkHash(root, "root hash");
  if (oldSize > size) throw new VerifyError(`tree size ${oldSize} cannot be a prefix of tree size ${size}`);
  proof.forEach((p, i) => checkHash(p, `consistency proof element ${i}`));
  if (oldSize === size) {
    if (proof.length) throw new VerifyError("consistency proof between equal sizes must be empty");
    if (!equal(oldRoot, root)) throw new VerifyError(`two different roots for tree size ${size}`);
    return;
  }
  if (oldSize === 0) {
    if (proof.length) throw new VerifyError("consistency proof from the empty tree must be empty");
    return;
  }
  if (!proof.length) throw new VerifyError(`empty consistency proof from size ${oldSize} to size ${size}`);
  const path = [...proof];
  // an exact power of two: the old root is itself a node of the new tree
  if (Number.isInteger(Math.log2(oldSize))) path.unshift(oldRoot);
  let fn = oldSize - 1;
  let sn = size - 1;
  while (odd(fn)) {
    fn = half(fn);
    sn = half(sn);
  }
  let fr = path[0];
  let sr = path[0];
  for (const c of path.slice(1)) {
    if (sn === 0) throw new VerifyError(`consistency proof from size ${oldSize} is too long`);
    if (odd(fn) || fn === sn) {
      fr = await nodeHash(c, fr);
      sr = await nodeHash(c, sr);
      if (!odd(fn)) {
        while (!odd(fn) && fn !== 0) {
          fn = half(fn);
          sn = half(sn);
        }
      }
    } else {
      sr = await nodeHash(sr, c);
    }
    fn = half(fn);
    sn = half(sn);
  }
  if (sn !== 0) throw new VerifyError(`consistency proof from size ${oldSize} is too short`);
  if (!equal(fr, oldRoot)) {
    throw new VerifyError(`consistency proof does not lead to the old root of size ${oldSize}`);
  }
  if (!equal(sr, root)) throw new VerifyError(`consistency proof does not lead to the root of size ${size}`);
}

// --- signed notes and checkpoints ---------------------------------------------------------

export function parseNote(note) {
  if (typeof note !== "string") throw new VerifyError("a note is text");
  if (/[\u0000-\u0009\u000b-\u001f]/.test(note)) {
    throw new VerifyError("note contains a control character other than newline");
  }
  if (!note.endsWith("\n")) throw new VerifyError("note does not end with a newline");
  const split = note.lastIndexOf("\n\n");
  if (split < 0) throw new VerifyError("note has no blank line before its signatures");
  const text = note.slice(0, split + 1);
  const lines = note.slice(split + 2).split("\n").slice(0, -1);
  if (!lines.length) throw new VerifyError("note has no signature lines");
  const signatures = lines.map((line, i) => {
    if (!line.startsWith(DASH)) {
      throw new VerifyError(`signature line ${i + 1} does not start with an em dash and space`);
    }
    const fields = line.slice(DASH.length).split(" ");
    if (fields.length !== 2 || !fields[0]) {
      throw new VerifyError(`signature line ${i + 1} is not '\u2014 <name> <base64>'`);
    }
    const blob = b64decode(fields[1], `signature line ${i + 1}`);
    if (blob.length < 5) throw new VerifyError(`signature line ${i + 1} is too short`);
    return { name: fields[0], keyId: hex(blob.slice(0, 4)), signature: blob.slice(4) };
  });
  return { text, signatures };
}

// The note a pasted text or a file holds, in its C2SP form (as gateway/crypto/notes.py
// note_in_file reads an auditor's file): CRLF line endings are read as newlines, and blank or
// whitespace-only lines after its last line dropped (`jq -r` adds a newline, editors more).
// The note returned ends with one newline after its last signature line; its signatures are
// then checked over its text exactly.
export function noteInText(text) {
  const lf = String(text).replace(/\r\n/g, "\n");
  let end = lf.length;
  while (end > 0 && " \t\r\n".includes(lf[end - 1])) end -= 1;
  if (end === 0) throw new VerifyError("empty or blank: it holds no note");
  const newline = lf.indexOf("\n", end);
  return newline < 0 ? lf : lf.slice(0, newline + 1);
}

export function parseCheckpoint(text) {
  const lines = text.slice(0, -1).split("\n");
  if (lines.length < 3) throw new VerifyError("checkpoint has fewer than three lines (origin, size, root hash)");
  const [origin, sizeText, rootText, ...extensions] = lines;
  if (!origin) throw new VerifyError("checkpoint origin line is empty");
  if (!/^(0|[1-9][0-9]*)$/.test(sizeText) || !Number.isSafeInteger(Number(sizeText))) {
    throw new VerifyError(`checkpoint tree size ${JSON.stringify(sizeText)} is not a canonical decimal`);
  }
  const root = b64decode(rootText, "checkpoint root hash");
  checkHash(root, "checkpoint root hash");
  if (extensions.some((line) => !line)) throw new VerifyError("checkpoint has an empty extension line");
  const time = extensions.find((line) => line.startsWith("time "));
  return { origin, size: Number(sizeText), root, time: time ? time.slice(5) : null };
}

async function keyIdOf(name, raw, type = SIG_ED25519) {
  const digest = await sha256(concat(encoder.encode(`${name}\n`), Uint8Array.of(type), raw));
  return hex(digest.slice(0, 4));
}

const NO_ED25519 = "this browser has no Ed25519 in Web Crypto (Chrome or Edge 137+, Firefox 129+, Safari 17+ have it)";

function pemBody(pem) {
  const match = /-----BEGIN PUBLIC KEY-----([\s\S]*?)-----END PUBLIC KEY-----/.exec(pem);
  if (!match) return null;
  return b64decode(match[1].replace(/\s+/g, ""), "PEM public key");
}

// An Ed25519 public key given as a PEM file (no name: { name: null, type: null }) or as a
// note verifier key "<name>+<hex id>+<base64(type || key)>", whose id must match its name,
// type and key.
async function readKey(material) {
  const text = String(material).trim();
  const der = pemBody(text);
  if (der) {
    let key;
    try {
      key = await crypto.subtle.importKey("spki", der, { name: "Ed25519" }, true, ["verify"]);
    } catch (error) {
      throw new VerifyError(error.name === "NotSupportedError" ? NO_ED25519 : "the PEM public key is not an Ed25519 key");
    }
    return { name: null, type: null, key, raw: new Uint8Array(await crypto.subtle.exportKey("raw", key)) };
  }
  // name+id+key, split at the first two '+' only: base64 has '+' of its own
  const match = /^([^+\s]+)\+([0-9a-f]{8})\+(\S+)$/.exec(text);
  if (!match) {
    throw new VerifyError("the key is neither a PEM public key nor '<name>+<hex id>+<base64 key>'");
  }
  const [name, id, material64] = match.slice(1);
  const blob = b64decode(material64, "verifier key");
  if (blob.length !== 33 || ![SIG_ED25519, SIG_COSIGNATURE_V1].includes(blob[0])) {
    return { name, type: null };
  }
  const [type, raw] = [blob[0], blob.slice(1)];
  if ((await keyIdOf(name, raw, type)) !== id) {
    throw new VerifyError("the verifier key's id does not match its name and key");
  }
  let key;
  try {
    key = await crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
  } catch (error) {
    throw new VerifyError(error.name === "NotSupportedError" ? NO_ED25519 : "the verifier key is not an Ed25519 key");
  }
  return { name, type, key, raw };
}

// The log's key, from the PEM file operators hold (audit.pub) or from a note verifier key
// string "<name>+<hex id>+<base64(0x01 || key)>". The key's name is the log's origin: a PEM
// file does not hold it, so it must come with it from the auditor, never from the gateway
// (a log key signs under any name it is given, a "shadow" log's checkpoints too).
export async function importLogKey(material, origin) {
  const read = await readKey(material);
  if (read.name === null) {
    if (!origin) {
      throw new VerifyError(
        "a PEM key does not name the log: give the log's origin with it, or give its note verifier key, which names it",
      );
    }
    read.name = origin;
  } else if (read.type !== SIG_ED25519) {
    throw new VerifyError("the verifier key is not an Ed25519 note key (type 0x01)");
  }
  const { name, key, raw } = read;
  const keyId = await keyIdOf(name, raw);
  return { name, keyId, key, raw, vkey: `${name}+${keyId}+${b64encode(concat(Uint8Array.of(SIG_ED25519), raw))}` };
}

// A partner's audit key, to check its cosignatures with: its PEM file (audit.pub) or a note
// verifier key of type 0x04 (cosignature/v1) or 0x01 (the same key, as the partner signs its
// own log's checkpoints with it). A verifier key pins the cosigner name; with a PEM file the
// name on the signature line is taken, as `audit verify --witness-key` does: the signature is
// the key's whatever the line's name.
export async function importWitnessKey(material) {
  const read = await readKey(material);
  if (read.name !== null && read.type === null) {
    throw new VerifyError("the verifier key is not an Ed25519 key of type 0x01 or 0x04");
  }
  return { name: read.name, key: read.key, raw: read.raw };
}

const PARTY = /\s*([A-Z]{2}-[A-Z0-9]{2,16})(?:\s*=\s*|\s+)(-----BEGIN PUBLIC KEY-----[\s\S]*?-----END PUBLIC KEY-----|\S+)/;

// The partners' keys field: "<partner id> <key>" entries (or "<partner id>=<key>"), the key a
// verifier key or a PEM block on the lines after the partner id -> Map(partner id -> key).
export async function importWitnessKeys(text) {
  const keys = new Map();
  const source = String(text);
  // sticky, and one per call: its position must not be shared across awaits
  const entry = new RegExp(PARTY.source, "y");
  while (source.slice(entry.lastIndex).trim()) {
    const at = entry.lastIndex;
    const match = entry.exec(source);
    if (!match) {
      const rest = source.slice(at).trim().slice(0, 40).replace(/\s+/g, " ");
      throw new VerifyError(`partners' keys: '${rest}' is not '<partner id> <key>'`);
    }
    const [, partner, material] = match;
    if (keys.has(partner)) throw new VerifyError(`partners' keys: ${partner} is given twice`);
    try {
      keys.set(partner, await importWitnessKey(material));
    } catch (error) {
      throw new VerifyError(`partners' keys: ${partner}: ${error.message}`);
    }
  }
  return keys;
}

// The checkpoint body, once the log key's signature on it verifies.
export async function verifyCheckpoint(note, logKey) {
  const { text, signatures } = parseNote(note);
  const body = parseCheckpoint(text);
  if (body.origin !== logKey.name) {
    throw new VerifyError(`checkpoint is from log ${JSON.stringify(body.origin)}, the key is for ${JSON.stringify(logKey.name)}`);
  }
  const ours = signatures.filter((s) => s.name === logKey.name && s.keyId === logKey.keyId);
  if (!ours.length) {
    const found = [...new Set(signatures.map((s) => `${s.name} (${s.keyId})`))].join(", ");
    throw new VerifyError(
      `checkpoint carries no signature by the log key ${logKey.name} (${logKey.keyId}); found: ${found}: ` +
        "signed by another key, or forged",
    );
  }
  for (const sig of ours) {
    const ok = sig.signature.length === 64
      && await crypto.subtle.verify({ name: "Ed25519" }, logKey.key, sig.signature, encoder.encode(text));
    if (!ok) throw new VerifyError(`the log's signature (key ${logKey.keyId}) on the checkpoint does not verify`);
  }
  return body;
}

// The partner's cosignature/v1 (c2sp.org/tlog-cosignature, type 0x04) on a note, by
// `witness` (importWitnessKey): key id || 8-byte big-endian timestamp || Ed25519 signature
// over "cosignature/v1\ntime <timestamp>\n" and the note text, as the gateway's
// gateway/audit/checkpoint.py verify_cosignature checks it. A line of the log's own key is
// no witness's.
export async function verifyCosignature(note, witness, logKey) {
  if (equal(witness.raw, logKey.raw)) {
    throw new VerifyError("the partner's key is the log's own key, which cannot witness the log");
  }
  const { text, signatures } = parseNote(note);
  const lines = [];
  for (const sig of signatures) {
    if (witness.name !== null && sig.name !== witness.name) continue;
    if (sig.keyId === (await keyIdOf(sig.name, witness.raw, SIG_COSIGNATURE_V1))) lines.push(sig);
  }
  if (!lines.length) {
    const named = witness.name === null ? "" : ` (${witness.name})`;
    throw new VerifyError(`the note carries no cosignature by this key${named}`);
  }
  let verified = null;
  for (const sig of lines) {
    const who = `the cosignature by ${sig.name} (key ${sig.keyId})`;
    if (sig.signature.length !== 72) throw new VerifyError(`${who} is not 8 + 64 bytes (timestamp and signature)`);
    const stamp = sig.signature.slice(0, 8);
    const timestamp = stamp.reduce((n, byte) => (n << 8n) | BigInt(byte), 0n);
    if (timestamp > MAX_TIMESTAMP) throw new VerifyError(`${who} has a timestamp beyond 2^63-1`);
    const message = concat(encoder.encode(`cosignature/v1\ntime ${timestamp}\n`), encoder.encode(text));
    if (!(await crypto.subtle.verify({ name: "Ed25519" }, witness.key, sig.signature.slice(8), message))) {
      throw new VerifyError(`${who} does not verify`);
    }
    verified ??= { name: sig.name, keyId: sig.keyId, timestamp: Number(timestamp) };
  }
  return verified;
}
