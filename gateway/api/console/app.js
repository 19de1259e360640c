// The audit console page: wiring between the form fields and client.js.
//
// Text from the log (partner ids, reasons) is only ever set as textContent, never parsed as
// HTML; the page's Content-Security-Policy allows this origin's scripts alone.

import { AuditClient, EVENTS, ENTRY_FILTERS } from "./client.js";
import { b64encode, hex } from "./verify.js";

const TOKEN = "c2c.audit.token";
const LOG_KEY = "c2c.audit.logKey";
const SEEN = "c2c.audit.checkpoint:";

const $ = (id) => document.getElementById(id);

const state = { client: null, checkpoint: null, logKey: null, filters: {}, after: null };

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

async function loadCheckpoint(keyMaterial) {
  const { client } = state;
  state.checkpoint = null;
  let cp;
  try {
    cp = await client.checkpoint(keyMaterial);
  } catch (error) {
    if (error.status === 404) {
      show("checkpoint-status", "No checkpoint has been signed yet: entries can be read, not proven.", "warn");
      return;
    }
    throw error;
  }
  state.logKey = cp.logKey;
  state.checkpoint = cp;
  $("cp-origin").textContent = cp.origin;
  $("cp-size").textContent = `${cp.size} entries`;
  $("cp-root").textContent = b64encode(cp.root);
  $("cp-time").textContent = cp.time ?? "(no time line)";
  $("cp-key").textContent = state.logKey.vkey;
  $("cp-cosigners").textContent = cp.cosignatures.length
    ? cp.cosignatures.map((c) => `${c.partner} (received ${c.receivedAt})`).join(", ")
    : "none yet";
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
    show("monitor-status", `NOT consistent with the checkpoint of your last visit: ${error.message}`, "bad");
  }
}

async function verifyRow(item, statusCell) {
  if (!state.checkpoint) {
    statusCell.textContent = "no checkpoint";
    return;
  }
  try {
    const result = await state.client.verifyEntry(item, state.checkpoint);
    statusCell.textContent = result.covered ? "✓ included" : "hash ✓, after checkpoint";
    statusCell.className = result.covered ? "ok" : "warn";
  } catch (error) {
    statusCell.textContent = `✗ ${error.message}`;
    statusCell.className = "bad";
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

async function loadEntries(append) {
  if (!append) {
    $("entry-rows").replaceChildren();
    state.after = null;
  }
  show("entries-status", "Loading…");
  const page = await state.client.entries(state.filters, state.after);
  const pending = [];
  for (const item of page.items) {
    const e = item.entry;
    const row = document.createElement("tr");
    const status = cell("…");
    row.append(
      cell(String(item.seq)), cell(e.at), cell(e.event), cell(e.sender), cell(e.recipient),
      cell(e.message_type), messageCell(e.message_id), cell(e.outcome), status,
    );
    row.tabIndex = 0;
    row.addEventListener("click", () => showEntry(item, status));
    row.addEventListener("keydown", (event) => {
      if (event.key === "Enter") showEntry(item, status);
    });
    $("entry-rows").append(row);
    pending.push([item, status]);
  }
  state.after = page.next_after;
  $("more").hidden = page.next_after === null;
  const shown = $("entry-rows").children.length;
  show("entries-status", `${shown} entr${shown === 1 ? "y" : "ies"} shown; checking proofs…`);
  for (const [item, status] of pending) await verifyRow(item, status);
  const bad = $("entry-rows").querySelectorAll("td.bad").length;
  show(
    "entries-status",
    bad ? `${shown} entries shown; ${bad} FAILED verification` : `${shown} entries shown, each checked`,
    bad ? "bad" : "",
  );
}

async function open(event) {
  event?.preventDefault();
  const token = $("token").value.trim();
  const keyMaterial = $("log-key").value.trim();
  sessionStorage.setItem(TOKEN, token);
  localStorage.setItem(LOG_KEY, keyMaterial);
  try {
    state.client = new AuditClient({ token });
    show("access-status", "Opening…");
    await loadCheckpoint(keyMaterial);
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
  $("access-form").addEventListener("submit", open);
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN);
    localStorage.removeItem(LOG_KEY);
    $("token").value = "";
    $("log-key").value = "";
    show("access-status", "Token and key forgotten.");
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
