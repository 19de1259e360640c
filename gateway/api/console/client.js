// The audit console's calls to the auditor API and what it checks of each answer.
//
// No DOM here, so tests/console drives this very module under Node.js against a running
// gateway. The server's word is never taken for a root: roots come from checkpoints whose
// signature verified with the key the auditor gave, leaf hashes are recomputed from the
// entries, and proofs are checked here (verify.js).

import {
  VerifyError,
  b64decode,
  entryLeafHash,
  hex,
  importLogKey,
  verifyCheckpoint,
  verifyConsistency,
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
  // (PEM, named by the log's origin, or a note verifier key); the key is returned with it.
  async checkpoint(keyMaterial) {
    const answer = await this.get("/api/v1/audit/checkpoint");
    const logKey = await importLogKey(keyMaterial, answer.origin);
    const body = await verifyCheckpoint(answer.note, logKey);
    return {
      ...body,
      logKey,
      note: answer.note,
      cosignatures: answer.cosignatures.map((c) => ({ partner: c.partner, receivedAt: c.received_at })),
    };
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

  // An earlier checkpoint note (kept by the auditor) against the verified current one.
  async verifyConsistency(oldNote, logKey, checkpoint) {
    const old = await verifyCheckpoint(oldNote, logKey);
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
