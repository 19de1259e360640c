// The audit console page: wiring between the form fields and client.js.
//
// Text from the log (partner ids, reasons) is only ever set as textContent, never parsed as
// HTML; the page's Content-Security-Policy allows this origin's scripts alone.

import { AuditClient, EVENTS, ENTRY_FILTERS, ListingCheck, auditorLogKey, filterMismatch } from "./client.js";
import { b64encode, hex, importWitnessKeys, verifyCheckpoint } from "./verify.js";

const TOKEN = "c2c.audit.token";
const LOG_KEY = "c2c.audit.logKey";
const LOG_ORIGIN = "c2c.audit.logOrigin";
const WITNESS_KEYS = "c2c.audit.witnessKeys";
const SEEN = "c2c.audit.checkpoint:";

const $ = (id) => document.getElementById(id);

// `historyLost`: the log's history does not match what this browser verified before;
// `listing`: the rows shown ({ item, status, kind, checked, problem }), the checkpoint they are
// proven against and the order check across their pages.
const state = {
  client: null, checkpoint: null, logKey: null, historyLost: false, filters: {}, after: null, listing: null,
};

function show(id, text, kind = "") {
  const node = $(id);
  node.textContent = text;
  node.className = `status ${kind}`.trim();
}

function cell(text, className = "") {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (className) td.className = className;
  return td;
}

function formValues(form) {
  return Object.fromEntries(new FormData(form).entries());
}

// The checkpoint this browser verified with this key on an earlier visit, if any: its slot is
// named by the verifier key (the log's origin and key), and the note must still verify.
async function earlierCheckpoint(keyMaterial, origin) {
  const logKey = await auditorLogKey(keyMaterial, origin);
  const note = localStorage.getItem(SEEN + logKey.vkey);
  if (note === null) return null;
  try {
    return { note, ...(await verifyCheckpoint(note, logKey)) };
  } catch {
    // a note that no longer parses: not this key's evidence
    return null;
  }
}

// A cosignature's line: its verdict first, in words; the class colours it.
function cosignatureItem(c) {
  const li = document.createElement("li");
  if (c.status === "verified") {
    li.textContent = `✓ ${c.partner} cosigned size ${c.size} (at ${c.cosignedAt}): signature verified with its key, consistent with this checkpoint`;
    li.className = "ok";
  } else if (c.status === "unverified") {
    li.textContent = `${c.partner} cosigned size ${c.size}: reported by the gateway, not verified (no audit key given for ${c.partner})`;
    li.className = "warn";
  } else if (c.status === "missing") {
    li.textContent = `${c.partner}: no cosignature reported by the gateway (its key is given)`;
    li.className = "warn";
  } else {
    li.textContent = `✗ ${c.partner}: cosignature FAILED verification: ${c.problem}`;
    li.className = "bad";
  }
  return li;
}

function showCosignatures(cosignatures) {
  $("cp-cosigners").replaceChildren(...cosignatures.map(cosignatureItem));
  const count = (status) => cosignatures.filter((c) => c.status === status).length;
  const [verified, unverified, failed] = ["verified", "unverified", "failed"].map(count);
  const missing = cosignatures.filter((c) => c.status === "missing").map((c) => c.partner);
  if (!cosignatures.length) {
    show("cosign-status", "No partner's cosignature is reported by the gateway.");
    return;
  }
  const parts = [];
  if (failed) parts.push(`${failed} FAILED verification`);
  if (verified) parts.push(`${verified} verified in this browser`);
  if (unverified) parts.push(`${unverified} reported by the gateway, not verified`);
  if (missing.length) parts.push(`none reported for ${missing.join(", ")}`);
  const kind = failed ? "bad" : unverified || missing.length ? "warn" : "ok";
  show("cosign-status", `Partners' cosignatures: ${parts.join(", ")}.`, kind);
}

async function loadCheckpoint(keyMaterial, origin, witnesses) {
  const { client } = state;
  state.checkpoint = null;
  state.historyLost = false;
  for (const id of ["cp-origin", "cp-size", "cp-root", "cp-time", "cp-key", "cp-note"]) {
    $(id).textContent = "";
  }
  $("cp-cosigners").replaceChildren();
  show("cosign-status", "");
  show("monitor-status", "");
  let cp;
  try {
    cp = await client.checkpoint(keyMaterial, { origin, witnesses });
  } catch (error) {
    if (error.status !== 404) throw error;
    const earlier = await earlierCheckpoint(keyMaterial, origin);
    if (!earlier) {
      show("checkpoint-status", "No checkpoint has been signed yet: entries can be read, not proven.", "warn");
      return;
    }
    // the earlier note is kept: it is the evidence
    state.historyLost = true;
    show(
      "checkpoint-status",
      `The gateway shows no checkpoint, yet this browser verified a checkpoint of size ${earlier.size} ` +
        "on an earlier visit: the log's history is hidden or lost. No entry can be proven.",
      "bad",
    );
    show(
      "monitor-status",
      `NOT consistent with your last visit: the checkpoint of size ${earlier.size}` +
        `${earlier.time ? ` signed at ${earlier.time}` : ""} is kept in this browser as evidence.`,
      "bad",
    );
    return;
  }
  state.logKey = cp.logKey;
  state.checkpoint = cp;
  $("cp-origin").textContent = cp.origin;
  $("cp-size").textContent = `${cp.size} entries`;
  $("cp-root").textContent = b64encode(cp.root);
  $("cp-time").textContent = cp.time ?? "(no time line)";
  $("cp-key").textContent = state.logKey.vkey;
  showCosignatures(cp.cosignatures);
  $("cp-note").textContent = cp.note;
  show("checkpoint-status", "Signature verified in this browser with your log key.", "ok");
  await monitor(cp);
}

// Like a transparency-log monitor: the checkpoint verified on the last visit must be a prefix
// of today's, or the history was rewritten in between.
async function monitor(cp) {
  const slot = SEEN + state.logKey.vkey;
  const earlier = localStorage.getItem(slot);
  if (!earlier) {
    localStorage.setItem(slot, cp.note);
    show("monitor-status", "First visit with this key: this checkpoint is kept to check the next one against.");
    return;
  }
  try {
    const result = await state.client.verifyConsistency(earlier, state.logKey, cp);
    localStorage.setItem(slot, cp.note);
    show(
      "monitor-status",
      `Consistent with the checkpoint verified on your last visit (size ${result.oldSize} → ${result.size}).`,
      "ok",
    );
  } catch (error) {
    // the earlier note is kept: it is the evidence
    state.historyLost = true;
    show("monitor-status", `NOT consistent with the checkpoint of your last visit: ${error.message}`, "bad");
  }
}

// A row's verdict: "proven" (included in the signed checkpoint), "after" (past the
// checkpoint), "unproven" (no verified checkpoint) or "bad".
const VERDICTS = {
  proven: ["✓ included in the checkpoint", "ok"],
  after: ["not proven: after the checkpoint", "warn"],
  unproven: ["not proven: no verified checkpoint", "warn"],
};

function mark(row, kind, problem = "") {
  row.kind = kind;
  [row.status.textContent, row.status.className] = kind === "bad" ? [`✗ ${problem}`, "bad"] : VERDICTS[kind];
}

// A row's verdict joins its own check (`checked`: { covered } or { error }, once its proof is
// in) with its place in the listing (`problem`), which a later row may still find wrong, and
// whether it is what the search asked for (`unmatched`).
function render(listing, row) {
  const { checked, problem, unmatched } = row;
  if (!checked) return;
  const failures = [checked.error, problem, unmatched].filter(Boolean);
  if (failures.length) mark(row, "bad", failures.join("; "));
  else mark(row, checked.covered ? "proven" : listing.checkpoint ? "after" : "unproven");
}

async function verifyRow(listing, row) {
  try {
    row.checked = { covered: (await state.client.verifyEntry(row.item, listing.checkpoint)).covered };
  } catch (error) {
    row.checked = { error: error.message };
  }
  render(listing, row);
}

// Proven entries are counted apart from those the page cannot prove.
function summary({ rows, checkpoint }) {
  const count = (kind) => rows.filter((r) => r.kind === kind).length;
  const [proven, after, unproven, bad] = ["proven", "after", "unproven", "bad"].map(count);
  const shown = `${rows.length} entr${rows.length === 1 ? "y" : "ies"} shown`;
  const parts = [];
  if (bad) parts.push(`${bad} FAILED verification`);
  if (checkpoint) {
    parts.push(`${proven} proven against the signed checkpoint`);
    if (after) parts.push(`${after} after it (not yet provable)`);
  } else if (unproven) {
    parts.push(`${unproven} not proven (no verified checkpoint)`);
  }
  if (state.historyLost) parts.push("and the log's history does not match your earlier visit (see the checkpoint)");
  const kind = bad || state.historyLost ? "bad" : after || unproven ? "warn" : "ok";
  return [rows.length ? `${shown}: ${parts.join(", ")}.` : "No entries shown.", rows.length ? kind : ""];
}

// The line above the table, for the listing shown only: a listing a newer one replaced keeps
// quiet. Its summary waits until every row shown, of any of its pages, is checked.
function progress(listing) {
  if (state.listing !== listing) return;
  const { rows } = listing;
  if (rows.some((r) => r.kind === "pending")) {
    show("entries-status", `${rows.length} entr${rows.length === 1 ? "y" : "ies"} shown; checking proofs…`);
  } else {
    show("entries-status", ...summary(listing));
  }
}

function showEntry(item, statusCell) {
  $("entry").hidden = false;
  $("entry-title").textContent = `Entry ${item.seq}`;
  $("entry-json").textContent = JSON.stringify(item.entry, null, 2);
  show("entry-status", `Leaf hash ${hex(Uint8Array.from(atob(item.leaf_hash), (c) => c.charCodeAt(0)))}. Proof: ${statusCell.textContent}`,
    statusCell.className);
}

// A message id opens the message's whole trail: every entry that names it.
function messageCell(messageId) {
  const td = cell("", "id");
  if (!messageId) return td;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "link";
  button.textContent = messageId;
  button.title = "Show every entry of this message";
  button.addEventListener("click", guard(async (event) => {
    event.stopPropagation();
    const form = $("filter-form");
    form.reset();
    form.elements.namedItem("message_id").value = messageId;
    state.filters = { message_id: messageId };
    await loadEntries(false);
  }, "entries-status"));
  td.append(button);
  return td;
}

// Rows are fed to the order check as they are added, before any proof is awaited: a page
// loaded while an earlier one's proofs are still being checked comes after it. "More" is
// disabled while a page loads, as a second click would ask for the same page again.
async function loadEntries(append) {
  const more = $("more");
  if (!append) {
    $("entry-rows").replaceChildren();
    state.after = null;
    state.listing = {
      rows: [],
      filters: { ...state.filters },
      checkpoint: state.checkpoint,
      order: new ListingCheck({
        filtered: Object.values(state.filters).some((v) => v !== undefined && v !== null && String(v).trim() !== ""),
        size: state.checkpoint?.size ?? null,
      }),
    };
  }
  const { listing } = state;
  more.disabled = true;
  show("entries-status", "Loading…");
  let page;
  try {
    page = await state.client.entries(state.filters, state.after);
  } catch (error) {
    if (state.listing !== listing) return;
    throw error;
  } finally {
    if (state.listing === listing) more.disabled = false;
  }
  // a newer listing replaced this one while the page loaded: its table is not this one's
  if (state.listing !== listing) return;
  const added = [];
  for (const item of page.items) {
    const e = item.entry;
    const tr = document.createElement("tr");
    const status = cell("…");
    tr.append(
      cell(String(item.seq)), cell(e.at), cell(e.event), cell(e.sender), cell(e.recipient),
      cell(e.message_type), messageCell(e.message_id), cell(e.outcome), status,
    );
    tr.tabIndex = 0;
    tr.addEventListener("click", () => showEntry(item, status));
    tr.addEventListener("keydown", (event) => {
      if (event.key === "Enter") showEntry(item, status);
    });
    $("entry-rows").append(tr);
    const { problem, earlier } = listing.order.next(item.seq);
    const mismatch = filterMismatch(e, listing.filters);
    const unmatched = mismatch && `not what the search asked for: ${mismatch}`;
    const row = { item, status, kind: "pending", checked: null, problem, unmatched };
    listing.rows.push(row);
    added.push(row);
    for (const misplaced of earlier) {
      const shown = listing.rows[misplaced.row];
      shown.problem = misplaced.problem;
      render(listing, shown);
    }
  }
  state.after = page.next_after;
  more.hidden = page.next_after === null;
  progress(listing);
  for (const row of added) {
    if (state.listing !== listing) return;
    await verifyRow(listing, row);
  }
  progress(listing);
}

async function open(event) {
  event?.preventDefault();
  const token = $("token").value.trim();
  const keyMaterial = $("log-key").value.trim();
  const origin = $("log-origin").value.trim();
  const witnessKeys = $("witness-keys").value.trim();
  sessionStorage.setItem(TOKEN, token);
  localStorage.setItem(LOG_KEY, keyMaterial);
  localStorage.setItem(LOG_ORIGIN, origin);
  localStorage.setItem(WITNESS_KEYS, witnessKeys);
  try {
    state.client = new AuditClient({ token });
    show("access-status", "Opening…");
    await loadCheckpoint(keyMaterial, origin, await importWitnessKeys(witnessKeys));
    for (const id of ["checkpoint", "entries", "tools"]) $(id).hidden = false;
    show("access-status", "");
    await loadEntries(false);
  } catch (error) {
    show("access-status", error.message, "bad");
  }
}

function guard(action, statusId) {
  return async (event) => {
    event?.preventDefault();
    try {
      await action(event);
    } catch (error) {
      show(statusId, error.message, "bad");
    }
  };
}

function init() {
  for (const name of EVENTS) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("event-select").append(option);
  }
  $("token").value = sessionStorage.getItem(TOKEN) ?? "";
  $("log-key").value = localStorage.getItem(LOG_KEY) ?? "";
  $("log-origin").value = localStorage.getItem(LOG_ORIGIN) ?? "";
  $("witness-keys").value = localStorage.getItem(WITNESS_KEYS) ?? "";
  $("access-form").addEventListener("submit", open);
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN);
    for (const slot of [LOG_KEY, LOG_ORIGIN, WITNESS_KEYS]) localStorage.removeItem(slot);
    for (const id of ["token", "log-key", "log-origin", "witness-keys"]) $(id).value = "";
    show("access-status", "Token and keys forgotten.");
  });
  $("filter-form").addEventListener("submit", guard(async () => {
    const values = formValues($("filter-form"));
    state.filters = Object.fromEntries(ENTRY_FILTERS.map((name) => [name, values[name]]));
    await loadEntries(false);
  }, "entries-status"));
  $("more").addEventListener("click", guard(() => loadEntries(true), "entries-status"));
  $("consistency-form").addEventListener("submit", guard(async () => {
    if (!state.checkpoint) throw new Error("no verified checkpoint to compare with");
    const result = await state.client.verifyConsistency($("old-note").value, state.logKey, state.checkpoint);
    show("consistency-status", `Consistent: size ${result.oldSize} is a prefix of size ${result.size}.`, "ok");
  }, "consistency-status"));
  $("export-form").addEventListener("submit", guard(async () => {
    show("export-status", "Exporting…");
    const bundle = await state.client.exportBundle(formValues($("export-form")));
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([bundle.data], { type: "application/x-ndjson" }));
    link.download = bundle.name;
    link.click();
    URL.revokeObjectURL(link.href);
    show("export-status", `Downloaded ${bundle.name} (${bundle.data.byteLength} bytes).`, "ok");
  }, "export-status"));
  $("store-check").addEventListener("click", guard(async () => {
    show("store-check-status", "Checking every entry and node…");
    const report = await state.client.storeCheck();
    show(
      "store-check-status",
      report.ok
        ? `OK: ${report.checked} of ${report.size} entries checked.`
        : `${report.problem_count} problem(s), first at position ${report.first_bad_position}: ${report.problems.map((p) => p.what).join("; ")}`,
      report.ok ? "ok" : "bad",
    );
  }, "store-check-status"));
  if ($("token").value && $("log-key").value) open();
}

init();
