// The audit console's calls to the auditor API and what it checks of each answer.
//
// No DOM here, so tests/console drives this very module under Node.js against a running
// gateway. The server's word is never taken for a root: roots come from checkpoints whose
// signature verified with the key (and, for a PEM key, the origin) the auditor gave, leaf
// hashes are recomputed from the entries, and proofs and partners' cosignatures are checked
// here (verify.js). A cosignature of a partner whose key the auditor did not give is the
// gateway's word, and is returned as such.

import {
  VerifyError,
  b64decode,
  entryLeafHash,
  hex,
  importLogKey,
  noteInText,
  verifyCheckpoint,
  verifyConsistency,
  verifyCosignature,
  verifyInclusion,
} from "./verify.js";

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.name = "ApiError";
    this.status = status;
  }
}

// The audit event kinds (gateway/audit/events.py EventKind; a test compares the two lists).
export const EVENTS = [
  "received", "rejected", "accepted", "duplicate", "delivered", "submitted", "submit_rejected",
  "sent", "attempt_failed", "receipt_received", "acknowledged", "partner_rejected", "resigned",
  "dead", "query", "operator_action", "key_change", "poison", "tls_refused", "checkpoint_sent",
  "checkpoint_witnessed", "cosignature_received", "history_inconsistent",
];

export const ENTRY_FILTERS = [
  "since", "until", "partner", "type", "message_id", "correlation_id", "event", "outcome",
];

// A filter's value as the page sends it, or null when the field is left empty.
function given(value) {
  return value === undefined || value === null || String(value).trim() === "" ? null : String(value).trim();
}

// The filters that name one member of an entry, by the entry member they name.
const MEMBER_FILTERS = {
  message_id: "message_id", correlation_id: "correlation_id", event: "event", outcome: "outcome", type: "message_type",
};

// What an entry listed for `filters` does not match of them, or null. Its proof says it is in
// the log, not that it is what was asked for: a gateway answering a message's trail with
// another message's entry is caught here. Times are compared to the millisecond either way
// (the gateway rounds a finer bound), and a bound the browser cannot read is left to the
// gateway, which refuses it.
export function filterMismatch(entry, filters) {
  for (const [name, member] of Object.entries(MEMBER_FILTERS)) {
    const wanted = given(filters[name]);
    if (wanted !== null && entry[member] !== wanted) {
      return `its ${member} is ${entry[member] ?? "absent"}, not ${wanted}`;
    }
  }
  const partner = given(filters.partner);
  if (partner !== null && entry.sender !== partner && entry.recipient !== partner) {
    return `neither its sender nor its recipient is ${partner}`;
  }
  const at = Date.parse(entry.at);
  const since = Date.parse(given(filters.since));
  const until = Date.parse(given(filters.until));
  if (!Number.isNaN(since) && !(at >= since - 1)) return `its time ${entry.at} is before ${given(filters.since)}`;
  if (!Number.isNaN(until) && !(at < until + 1)) return `its time ${entry.at} is not before ${given(filters.until)}`;
  return null;
}

function queryString(params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && String(value).trim() !== "") {
      query.set(name, String(value).trim());
    }
  }
  const text = query.toString();
  return text ? `?${text}` : "";
}

// What the page can check of a listing by itself, beyond each entry's proof. Positions come
// in strictly increasing order, as the API is asked for them (`after` is a position cursor).
// With no filter every entry is listed, and as a position is a leaf index and the log never
// deletes an entry, positions run 0, 1, 2, ... with no gap. An entry the checkpoint does not
// cover cannot be listed before one it covers: positions at or past the checkpoint's size
// come last, so such an entry claims a place it does not hold. The covered entry after it
// keeps its place (its inclusion proof is checked at that position) and is compared with the
// row before the misplaced ones.
export class ListingCheck {
  constructor({ filtered, size = null }) {
    this.filtered = filtered;
    this.size = size;
    this.rows = 0;
    this.previous = null;
    // rows (by index) the checkpoint does not cover, and the position before the first of them
    this.uncovered = [];
    this.beforeUncovered = null;
  }

  // The next row's position -> { problem: text or null, earlier: [{ row, problem }] }, where
  // `earlier` are rows shown before that this one proves misplaced.
  next(seq) {
    const row = this.rows++;
    const result = { problem: null, earlier: [] };
    // no position at all: verifyEntry refuses the row, and it is not compared with others
    if (!Number.isSafeInteger(seq) || seq < 0) return result;
    const covered = this.size !== null && seq < this.size;
    if (covered && this.uncovered.length) {
      result.earlier = this.uncovered.map((index) => ({
        row: index,
        problem: `out of order: placed after the checkpoint (size ${this.size}), yet listed before entry ${seq}, which it covers`,
      }));
      this.uncovered = [];
      this.previous = this.beforeUncovered;
    }
    const previous = this.previous;
    if (previous !== null && seq <= previous) {
      result.problem = `out of order: listed after entry ${previous}`;
      return result;
    }
    const first = (previous ?? -1) + 1;
    if (!this.filtered && seq !== first) {
      const missing = seq - first === 1 ? `entry ${first} is` : `entries ${first} to ${seq - 1} are`;
      result.problem = `${missing} missing from the listing with no filter`;
    }
    if (this.size !== null && !covered) {
      if (!this.uncovered.length) this.beforeUncovered = previous;
      this.uncovered.push(row);
    }
    this.previous = seq;
    return result;
  }
}

// The log key the auditor gave: a PEM key named by the origin they gave with it, or a note
// verifier key, which names the log itself (an origin given with it must be that name).
export async function auditorLogKey(keyMaterial, origin = null) {
  const logKey = await importLogKey(keyMaterial, origin);
  if (origin && logKey.name !== origin) {
    throw new VerifyError(
      `the verifier key names the log ${JSON.stringify(logKey.name)}, not the origin given, ${JSON.stringify(origin)}`,
    );
  }
  return logKey;
}

// POSIX seconds as RFC 3339 UTC, or as the number when no date can hold it.
function cosignedAt(seconds) {
  const date = new Date(seconds * 1000);
  return Number.isNaN(date.getTime()) ? `time ${seconds}` : date.toISOString().replace(".000Z", "Z");
}

export class AuditClient {
  constructor({ baseUrl = "", token, fetchImpl = globalThis.fetch.bind(globalThis) }) {
    if (!token) throw new ApiError(401, "no API token given (it needs the audit:read scope)");
    this.baseUrl = baseUrl;
    this.token = token;
    this.fetch = fetchImpl;
  }

  async request(path) {
    let response;
    try {
      response = await this.fetch(this.baseUrl + path, {
        headers: { Authorization: `Bearer ${this.token}`, Accept: "application/json" },
      });
    } catch (error) {
      throw new ApiError(0, `the gateway cannot be reached (${error.message})`);
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const problem = await response.json();
        detail = problem.detail || problem.title || detail;
      } catch {
        // not a problem document: keep the status text
      }
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  async get(path) {
    return (await this.request(path)).json();
  }

  // One page of the entries matching `filters`; `after` is the previous page's next_after.
  async entries(filters = {}, after = null) {
    const params = {};
    for (const name of ENTRY_FILTERS) params[name] = filters[name];
    params.after = after;
    params.limit = filters.limit ?? 50;
    return this.get(`/api/v1/audit/entries${queryString(params)}`);
  }

  // The latest checkpoint, its signature verified with the auditor's copy of the log key
  // (auditorLogKey: the gateway's answer never names the log), the key returned with it, and
  // each cosignature the gateway reports checked (checkCosignatures) with `witnesses`, the
  // partners' keys the auditor gave (verify.js importWitnessKeys).
  async checkpoint(keyMaterial, { origin = null, witnesses = new Map() } = {}) {
    const logKey = await auditorLogKey(keyMaterial, origin);
    const answer = await this.get("/api/v1/audit/checkpoint");
    const body = await verifyCheckpoint(answer.note, logKey);
    const checkpoint = { ...body, logKey, note: answer.note };
    checkpoint.cosignatures = await this.checkCosignatures(answer.cosignatures, checkpoint, witnesses);
    return checkpoint;
  }

  // Each cosignature reported with the checkpoint -> { partner, receivedAt, size, status,
  // problem, cosignedAt }. Whatever the key, the cosigned note must be a checkpoint of this log
  // signed by its key, and its tree a prefix of the current checkpoint's (the consistency proof
  // the gateway gives with it). Then status is "verified" when the partner's cosignature/v1
  // verifies with the key the auditor gave for it, "unverified" when none was given (the
  // gateway's word: it checked the cosignature when it came in), "failed" when any check
  // fails (`problem` says which). Last, a "missing" row for each partner whose key was given
  // and whose cosignature is not reported.
  async checkCosignatures(reported, checkpoint, witnesses) {
    if (!Array.isArray(reported)) throw new VerifyError("the checkpoint answer has no list of cosignatures");
    const results = [];
    for (const cosig of reported) {
      const partner = typeof cosig?.partner === "string" ? cosig.partner : "(no partner named)";
      const result = {
        partner, receivedAt: cosig?.received_at ?? null, size: null, status: "failed", problem: null, cosignedAt: null,
      };
      try {
        if (typeof cosig?.note !== "string") throw new VerifyError("the gateway gives no cosigned note");
        const body = await verifyCheckpoint(cosig.note, checkpoint.logKey);
        result.size = body.size;
        if (body.size > checkpoint.size) {
          throw new VerifyError(`it cosigns size ${body.size}, larger than the current checkpoint's ${checkpoint.size}`);
        }
        if (!Array.isArray(cosig.consistency_proof)) throw new VerifyError("no consistency proof to the current checkpoint");
        await verifyConsistency({
          oldSize: body.size,
          size: checkpoint.size,
          oldRoot: body.root,
          root: checkpoint.root,
          proof: cosig.consistency_proof.map((h, i) => b64decode(h, `consistency proof element ${i}`)),
        });
        const key = witnesses.get(partner);
        if (key) {
          result.cosignedAt = cosignedAt((await verifyCosignature(cosig.note, key, checkpoint.logKey)).timestamp);
          result.status = "verified";
        } else {
          result.status = "unverified";
        }
      } catch (error) {
        result.problem = error.message;
      }
      results.push(result);
    }
    for (const partner of witnesses.keys()) {
      if (!results.some((r) => r.partner === partner)) {
        results.push({ partner, receivedAt: null, size: null, status: "missing", problem: null, cosignedAt: null });
      }
    }
    return results;
  }

  // The entry's own hash, then its inclusion in the verified checkpoint's tree. An entry the
  // checkpoint does not cover (or with no checkpoint) is not proven: its position and its
  // leaf hash are the gateway's word alone.
  async verifyEntry(item, checkpoint) {
    if (!Number.isSafeInteger(item.seq) || item.seq < 0) {
      throw new VerifyError(`entry position ${JSON.stringify(item.seq)} is not a whole number`);
    }
    const leaf = await entryLeafHash(item.entry);
    if (hex(leaf) !== hex(b64decode(item.leaf_hash, "leaf hash"))) {
      throw new VerifyError(`entry ${item.seq} does not hash to the leaf hash stored with it`);
    }
    if (!checkpoint || item.seq >= checkpoint.size) {
      return { covered: false, leaf };
    }
    const proof = await this.get(
      `/api/v1/audit/proofs/inclusion${queryString({ index: item.seq, size: checkpoint.size })}`,
    );
    await verifyInclusion({
      index: item.seq,
      size: checkpoint.size,
      leaf,
      proof: proof.proof.map((h, i) => b64decode(h, `proof element ${i}`)),
      root: checkpoint.root,
    });
    return { covered: true, leaf, proofLength: proof.proof.length };
  }

  // An earlier checkpoint note (kept by the auditor: pasted, or kept by this browser) against
  // the verified current one.
  async verifyConsistency(oldNote, logKey, checkpoint) {
    const old = await verifyCheckpoint(noteInText(oldNote), logKey);
    if (old.size > checkpoint.size) {
      throw new VerifyError(
        `the earlier checkpoint (size ${old.size}) is larger than the current one (size ${checkpoint.size}): the log shrank`,
      );
    }
    const answer = await this.get(
      `/api/v1/audit/proofs/consistency${queryString({ old_size: old.size, size: checkpoint.size })}`,
    );
    await verifyConsistency({
      oldSize: old.size,
      size: checkpoint.size,
      oldRoot: old.root,
      root: checkpoint.root,
      proof: answer.proof.map((h, i) => b64decode(h, `proof element ${i}`)),
    });
    return { oldSize: old.size, size: checkpoint.size, proofLength: answer.proof.length };
  }

  // The offline bundle (`c2c-gateway audit verify` checks it); the export itself is audited.
  async exportBundle(params = {}) {
    const response = await this.request(`/api/v1/audit/export${queryString(params)}`);
    const disposition = response.headers.get("Content-Disposition") || "";
    const match = /filename="([^"]+)"/.exec(disposition);
    return { name: match ? match[1] : "audit-bundle.jsonl", data: await response.arrayBuffer() };
  }

  // The gateway recomputes every leaf and node of its store (recorded as an operator action).
  async storeCheck() {
    return this.get("/api/v1/audit/verify");
  }
}
